"""megatron-core's HybridModel (layer patterns of attention '*', MLP '-', MoE 'E') with the
grid attention computes megatron-core's TP=1 HybridModel; its checkpoints reshard
bit-identically; Mamba patterns are refused on CPU."""

import pytest

from tests.cases import hybrid, runtime
from tests.cases.equivalence import compare_with_tp1
from tests.test_equivalence import FP32_TOL, _check

# (pattern, n, m, extra model settings); 1 layer of each kind per pattern half keeps them small
CASES = {
    "mlp_2x2": ("*-*-", 2, 2, {}),
    "mlp_1x4_qk_rmsnorm": ("*-*-", 1, 4, {"qk_norm": "RMSNorm"}),
    # megatron requires sequence parallelism for MoE under TP when training
    "moe_2x2": ("*E*E", 2, 2, {"experts": 4, "sp": True}),
    "moe_1x4": ("*E*E", 1, 4, {"experts": 4, "sp": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_fp32_matches_tp1(pool4, tmp_path, name):
    pattern, n, m, extra = CASES[name]
    results = pool4.run(compare_with_tp1, ckpt_dir=str(tmp_path), n=n, m=m, hybrid=pattern,
                        **extra)
    _check(results, FP32_TOL)
    keys = results[0]["grad_keys"]
    assert any("mlp.linear_fc1" in k for k in keys)
    if "E" in pattern:
        assert any("experts" in k for k in keys) and any("router" in k for k in keys)
    worst = max(max(r["grad"].values()) for r in results)
    print(f"hybrid {name}: logits {max(r.get('logits', 0) for r in results):.1e}, "
          f"worst grad {worst:.1e}")


def test_hybrid_checkpoint_round_trip_is_bit_identical(pool4, tmp_path):
    dirs = [tmp_path / name for name in ("tp4", "grid")]
    for d in dirs:
        d.mkdir()
    results = pool4.run(runtime.checkpoint_round_trip, dirs=[str(d) for d in dirs],
                        hybrid="*-*E", experts=4, qk_norm="LayerNorm")
    # grid 2x2 read TP=4's; TP=4 read the grid's; TP=1 read the grid's: all equal TP=4's
    assert results == [[True, True, True]] * 4


def test_mamba_pattern_is_refused_on_cpu(pool4):
    for message in pool4.run(hybrid.mamba_refusal, pattern="M*M-"):
        assert "'M*M-' has Mamba layers ('M'), which cannot run on CPU" in message, message
        assert "CUDA kernels of mamba_ssm and causal_conv1d" in message
