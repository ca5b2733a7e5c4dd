"""The grid computes megatron-core's TP=1 model: logits and every gradient, fp32 and bf16.

Each case trains one step of megatron-core's stock GPT at TP=1, saves it with
dist_checkpointing, loads the same weights into the grid model and compares the full logits,
the loss and every parameter gradient (DDP + finalize_model_grads, reassembled to the full
layout from the checkpoint sharding) against the reference.
"""

import pytest

from tests.cases.equivalence import compare_with_tp1

pytestmark = pytest.mark.uses_pool

FP32_TOL = 1e-5
BF16_TOL = 2e-2

# (n, m, pool size, extra model/layout settings)
CASES = {
    "1x2": (1, 2, 4, {}),
    "2x1": (2, 1, 4, {}),
    "2x2": (2, 2, 4, {}),
    "1x4": (1, 4, 4, {}),
    "4x1": (4, 1, 4, {}),
    "2x4": (2, 4, 8, {}),
    "4x2_n_eq_g": (4, 2, 8, {"kv_heads": 4}),  # what 4x1 / 2x1 (m = 1) cover, with m > 1
    "gqa_n_gt_g_4x2": (4, 2, 8, {"kv_heads": 2}),
    "mqa_2x2": (2, 2, 4, {"kv_heads": 1}),
    "mha_2x2": (2, 2, 4, {"kv_heads": 8}),
    "rope_interleaved_2x2": (2, 2, 4, {"interleaved": True}),
    "rope_half_1x4": (1, 4, 4, {"rotary_percent": 0.5}),
    "no_rope_1x4": (1, 4, 4, {"position": "learned_absolute"}),
    "qk_layernorm_2x2": (2, 2, 4, {"qk_norm": "LayerNorm"}),
    "qk_rmsnorm_1x4": (1, 4, 4, {"qk_norm": "RMSNorm"}),
    "qkv_bias_2x2": (2, 2, 4, {"qkv_bias": True}),
    "padding_mask_2x2": (2, 2, 4, {"padding_mask": True}),
    "sequence_parallel_2x2": (2, 2, 4, {"sp": True}),
    "recompute_full_2x2": (2, 2, 4, {"recompute": "full"}),
    "recompute_selective_1x4": (1, 4, 4, {"recompute": "selective"}),
    "pp2_grid_1x2": (1, 2, 4, {"pp": 2}),
    "pp2_grid_2x2": (2, 2, 8, {"pp": 2}),
}


def _run(request, tmp_path, n, m, world, extra, **more):
    pool = request.getfixturevalue(f"pool{world}")
    results = pool.run(compare_with_tp1, ckpt_dir=str(tmp_path), n=n, m=m, **extra, **more)
    return results


def _check(results, tol):
    with_logits = [r for r in results if "logits" in r]
    assert with_logits, "no rank reported logits"
    for r in with_logits:
        assert r["logits"] < tol, r["logits"]
        assert r["loss"] < tol, r["loss"]
    for r in results:
        worst = max(r["grad"], key=r["grad"].get)
        assert r["grad"][worst] < tol, (worst, r["grad"][worst])
        assert any("linear_qkv" in k for k in r["grad_keys"])


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_tp1(request, tmp_path, name):
    n, m, world, extra = CASES[name]
    _check(_run(request, tmp_path, n, m, world, extra), FP32_TOL)


@pytest.mark.parametrize("name,dtype", [("2x2", "bf16"), ("gqa_n_gt_g_4x2", "bf16"),
                                        ("qk_layernorm_2x2", "bf16"), ("2x2", "fp16")])
def test_half_precision_matches_tp1(request, tmp_path, name, dtype):
    """bf16/fp16 grid vs the fp32 TP=1 model with the same (bf16-representable) weights:
    within 2e-2. (megatron's own TP=1 model at that precision is measured too and printed for
    comparison: on cancellation-heavy gradients such as the q_layernorm bias it is not more
    accurate.)"""
    n, m, world, extra = CASES[name]
    results = _run(request, tmp_path, n, m, world, extra, dtype=dtype)
    _check(results, BF16_TOL)
    for r in results[:1]:
        worst = max(r["grad"], key=r["grad"].get)
        print(f"{name}: grid {dtype} worst grad {worst} {r['grad'][worst]:.2e} "
              f"(megatron TP=1 {dtype}: {r['tp1']['grad'][worst]:.2e})")
