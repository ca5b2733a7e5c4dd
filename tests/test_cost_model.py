"""The cost model predicts every collective (op, group, payload, calls) of prefill and decode
steps exactly, and each rank's weight and KV-cache bytes, on several layouts."""

import dataclasses

import pytest

from megatron_mxn.analysis.cost_model import Layout, ModelShape, check_layout
from megatron_mxn.grid.layout import MxnConfigError
from tests.cases.cost import measured_vs_predicted

pytestmark = pytest.mark.uses_pool


@pytest.mark.parametrize("n,m,pp,grid,schedule,extra", [
    (2, 2, 1, True, "exact", {}),
    (1, 4, 1, True, "gather", {}),
    (2, 2, 1, True, "auto", {"kv_heads": 1, "qk_norm": "LayerNorm"}),  # KV shared by groups
    (4, 1, 1, False, "exact", {}),  # megatron-core TP=4 with 2 KV heads
    (2, 1, 2, False, "exact", {}),  # TP=2 PP=2
    (1, 2, 2, True, "exact", {}),  # grid 1x2 x PP 2
    (4, 2, 1, True, "exact", {}),  # n=4 > g=2: K/V gathered over KV-share groups of 2
], ids=["grid2x2", "grid1x4-gather", "grid2x2-auto-mqa-qknorm", "tp4", "tp2pp2", "grid1x2pp2",
        "grid4x2-kv-share"])
def test_measured_equals_predicted(request, n, m, pp, grid, schedule, extra):
    pool = request.getfixturevalue(f"pool{n * m * pp if n * m * pp > 4 else 4}")
    for r in pool.run(measured_vs_predicted, n=n, m=m, pp=pp, grid=grid, schedule=schedule,
                       **extra):
        for step, (measured, predicted) in enumerate(r["steps"]):
            assert measured == predicted, (r["rank"], step, measured, predicted)
        assert r["per_layer"][0], r["per_layer"]  # each layer's bytes by group, decode step
        assert r["weights"][0] == r["weights"][1], r
        assert r["kv"][0] == r["kv"][1], r


@pytest.mark.parametrize("n,m,schedule", [(2, 2, "exact"), (1, 4, "auto")],
                         ids=["grid2x2-exact", "grid1x4-auto"])
def test_position_cache_measured_equals_predicted(pool4, n, m, schedule):
    """The position-sharded KV cache: the prefill (exact: the schedule plus the K/V gathers
    that fill the cache; auto: seq, which hands its gathered K/V over) and each decode step
    as predicted, and a decode step sends the same bytes at prompt 16 as at prompt 48."""
    decode = {}
    for prompt_len in (16, 48):
        for r in pool4.run(measured_vs_predicted, n=n, m=m, pp=1, grid=True, schedule=schedule,
                           kv_cache="positions", prompt_len=prompt_len):
            for step, (measured, predicted) in enumerate(r["steps"]):
                assert measured == predicted, (r["rank"], step, measured, predicted)
            assert r["per_layer"][0], r["per_layer"]
            assert r["kv"][0] == r["kv"][1], r
            decode.setdefault(r["rank"], []).append(r["decode_sent"])
    for rank, (short, long) in decode.items():
        assert short == long and short["dim-slice"] > 0, (rank, short, long)


def test_layout_rules_are_named():
    model = ModelShape(layers=4, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                       vocab=128256)
    with pytest.raises(MxnConfigError, match=r"num_attention_heads \(32\) must be divisible "
                                             r"by the head groups n \(3\)"):
        check_layout(model, Layout(tp=6, dim_slices=2))
    with pytest.raises(MxnConfigError, match=r"rotary dims \(128\) must be divisible by 2\*m "
                                             r"\(256\)"):
        check_layout(model, Layout(tp=128, dim_slices=128))
    learned = dataclasses.replace(model, learned_positions=1024)  # no RoPE pairs to keep
    with pytest.raises(MxnConfigError, match=r"the K/V rows of a dim slice \(2\*d/m = 2\) must "
                                             r"split evenly over the n/g = 4 head groups"):
        check_layout(learned, Layout(tp=32 * 128, dim_slices=128))
    with pytest.raises(MxnConfigError, match=r"num_layers \(4\) must be divisible by PP \(3\)"):
        check_layout(model, Layout(tp=8, pp=3))
    check_layout(model, Layout(tp=16, dim_slices=4))  # the seed's grid 4x4
    with pytest.raises(MxnConfigError, match=r"kv_cache must be one of \('auto', 'dims', "
                                             r"'positions'\), got 'rows'"):
        Layout(tp=16, dim_slices=4, kv_cache="rows")
