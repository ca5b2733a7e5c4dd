"""--mxn-attention schedules: gather and auto compute megatron-core's TP=1 model exactly;
sliced is the seed paper's per-slice model, checked against plain torch; auto's choices."""

import pytest

from megatron_mxn.attention.schedules import ScoreShape, decide_schedule, get_schedule
from tests.cases.equivalence import compare_with_tp1
from tests.cases.schedules import (auto_choices, fused_dropout_is_consistent,
                                  sliced_matches_plain_torch)
from tests.test_equivalence import CASES, FP32_TOL, _check

pytestmark = pytest.mark.uses_pool


# The sequence-split core on what the grid must support (the cases of test_equivalence.py):
# causal without a mask tensor (all but padding_mask), uneven chunks (14 tokens over 2m = 4 or
# 8 chunks), bf16.
SEQ_CASES = ["2x2", "1x4", "2x4", "gqa_n_gt_g_4x2", "mqa_2x2", "rope_interleaved_2x2",
             "rope_half_1x4", "qk_layernorm_2x2", "qkv_bias_2x2", "padding_mask_2x2",
             "sequence_parallel_2x2", "pp2_grid_2x2", "recompute_selective_1x4"]


@pytest.mark.parametrize("schedule,name,more", [
    ("gather", "2x2", {}), ("gather", "1x4", {}), ("gather", "qk_layernorm_2x2", {}),
    ("gather", "pp2_grid_1x2", {}), ("gather", "sequence_parallel_2x2", {}),
    ("auto", "2x2", {}),
    *[("seq", name, {}) for name in SEQ_CASES],
    ("seq", "2x2", {"seq": 14}), ("seq", "1x4", {"seq": 14}), ("seq", "2x4", {"seq": 14}),
])
def test_exact_schedules_match_tp1(request, tmp_path, schedule, name, more):
    n, m, world, extra = CASES[name]
    pool = request.getfixturevalue(f"pool{world}")
    _check(pool.run(compare_with_tp1, ckpt_dir=str(tmp_path), n=n, m=m, schedule=schedule,
                    **extra, **more), FP32_TOL)


@pytest.mark.parametrize("name", ["2x2", "gqa_n_gt_g_4x2"])
def test_seq_bf16_matches_tp1(request, tmp_path, name):
    n, m, world, extra = CASES[name]
    pool = request.getfixturevalue(f"pool{world}")
    _check(pool.run(compare_with_tp1, ckpt_dir=str(tmp_path), n=n, m=m, schedule="seq",
                    dtype="bf16", **extra), 2e-2)


@pytest.mark.parametrize("n,m,kv_heads", [(2, 2, 2), (1, 4, 2), (4, 1, 1), (2, 2, 1)])
def test_sliced_is_plain_per_slice_attention(pool4, n, m, kv_heads):
    for err in pool4.run(sliced_matches_plain_torch, n=n, m=m, kv_heads=kv_heads):
        for what, value in err.items():
            assert value < 1e-5, (what, value)


def test_auto_picks_seq_for_prefill_and_exact_for_decode(pool4):
    # 8 heads of 16 dims, 2 KV heads, grid 1x4 (h/n = 8 heads and 2 KV heads of 4 dims per
    # rank), fp32: a prefill of 64 fills the 2m = 8 chunks of the sequence-split core, which
    # also sends 8x fewer bytes than reducing the scores (gather: 6.4x fewer).
    shape = ScoreShape(1, 8, 2, 64, 64, 4, 4, 4)
    assert tuple(get_schedule(name).call_bytes(shape) for name in ("exact", "gather", "seq")) \
        == (196608, 30720, 24576)
    assert decide_schedule("auto", shape).name == "seq"
    # fewer queries than chunks (a short prefill after a long cache): the cheaper score schedule
    assert decide_schedule("auto", ScoreShape(1, 8, 2, 7, 1000, 4, 4, 4)).name == "gather"
    decode = ScoreShape(1, 8, 2, 1, 65, 4, 4, 4)
    assert decide_schedule("auto", decode).name == "exact"
    results = pool4.run(auto_choices, n=1, m=4, prefill=64)
    for decisions, _ in results:
        assert decisions == [("prefill", 64, 64, "seq"), ("decode", 1, 65, "exact")]
    log = results[0][1]  # rank 0 logs each new choice, once per model (layer 1), at INFO
    assert log.splitlines() == [
        "[mxn] auto attention, prefill (sq=64, sk=64): seq (per layer and rank it sends: "
        "exact 196608 B, gather 30720 B, seq 24576 B)",
        "[mxn] auto attention, decode (sq=1, sk=65): exact (per layer and rank it sends: "
        "exact 3120 B, gather 6624 B, seq 12672 B)"]
    assert all(r[1] == "" for r in results[1:])


@pytest.mark.parametrize("n,m,schedule", [(1, 2, "seq"), (1, 2, "sliced")])
def test_fused_schedules_apply_dropout_consistently(pool2, n, m, schedule):
    for r in pool2.run(fused_dropout_is_consistent, n=n, m=m, schedule=schedule):
        assert r["linear_identity_err"] < 1e-5, r
        assert r["reproducible"] and r["dropped_something"], r
        assert r["mean_rel_err"] < 0.2, r  # 48 draws of p=0.5: ~0.1 noise (l2)
