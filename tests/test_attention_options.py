"""Sliding windows and attention sinks: the grid computes megatron-core's TP=1 model with them,
in training (logits, loss, every gradient) and in generation (tokens, per-step logits), under
every schedule and both KV caches. Each variant also has to change megatron's own model (a
window or sink that binds nothing would prove nothing)."""

import pytest

from tests.cases.common import SEQ
from tests.cases.options import decode_variants_match_tp1, variants_match_tp1
from tests.cases.runtime import checkpoint_round_trip

pytestmark = pytest.mark.uses_pool

TOL = 1e-5
PLAIN = {"spec": {"window_size": None, "softmax_type": "vanilla"}}
# auto (the default) picks the sequence-split core `seq` for every training step here
ALL = ["auto", "exact", "gather"]

# 16 tokens; on 2x2 the sequence-split core cuts them into 4 zig-zag chunks of 4, on 1x4 into 8
# of 2, so every window below has an edge inside a chunk; 14 tokens make the chunks uneven.
WINDOWS = [
    {"name": "shorter", "spec": {"window_size": (3, 0)}, "schedules": ALL},
    {"name": "one_short", "spec": {"window_size": (SEQ - 2, 0)}},
    {"name": "two_sided", "spec": {"window_size": (4, 2)}},
    {"name": "every_2nd_layer", "spec": {"window_size": (5, 0)},
     "config": {"window_attn_skip_freq": 2}},
    {"name": "uneven_chunks", "spec": {"window_size": (2, 0), "seq": 14}, "schedules": ["seq"]},
    {"name": "with_padding_mask", "spec": {"window_size": (6, 0), "padding_mask": True}},
]
# a window as long as the sequence (the last of 16 tokens sees all 16) or longer hides nothing
UNBOUND = [{"name": "equal", "spec": {"window_size": (SEQ - 1, 0)}},
           {"name": "longer", "spec": {"window_size": (40, 0)}}]
SINKS = [
    {"name": "learnable", "spec": {"softmax_type": "learnable"}, "schedules": ALL},
    {"name": "off_by_one", "spec": {"softmax_type": "off-by-one"}},
    {"name": "learnable_window_mqa", "spec": {"softmax_type": "learnable", "window_size": (4, 0),
                                              "kv_heads": 1}},
]


def _check(results, changes=True):
    worst = max((v for r in results for v in r), key=lambda v: v["err"])
    print(f"worst: {worst['name']} {worst['schedule']} {worst['worst']} {worst['err']:.2e}")
    for r in results:
        for v in r:
            assert v["err"] < TOL, v
            if changes:
                assert v["vs_plain"] > 1e-3, v  # the option binds in megatron's own model


@pytest.mark.parametrize("n,m,world", [(2, 2, 4), (1, 4, 4)])
def test_sliding_window_matches_tp1(request, n, m, world):
    pool = request.getfixturevalue(f"pool{world}")
    variants = WINDOWS if (n, m) == (2, 2) else WINDOWS[:3:2]
    _check(pool.run(variants_match_tp1, n=n, m=m,
                    variants=[{**v, "plain": PLAIN} for v in variants]))
    if (n, m) != (2, 2):
        return
    unbound = pool.run(variants_match_tp1, n=n, m=m,
                       variants=[{**v, "plain": PLAIN} for v in UNBOUND])
    _check(unbound, changes=False)
    assert all(v["vs_plain"] < 1e-6 for r in unbound for v in r)


@pytest.mark.parametrize("n,m,world", [(2, 2, 4), (1, 4, 4), (4, 2, 8)])
def test_attention_sinks_match_tp1(request, n, m, world):
    pool = request.getfixturevalue(f"pool{world}")
    # 1x4: the learnable sink under every schedule; 4x2: n > g (KV heads shared by groups)
    variants = SINKS if (n, m) == (2, 2) else SINKS[:1]
    if (n, m) == (4, 2):
        variants = [{**SINKS[0], "schedules": ["auto"]}]
    results = pool.run(variants_match_tp1, n=n, m=m,
                       variants=[{**v, "plain": PLAIN} for v in variants])
    _check(results)
    learnable = [v for r in results for v in r if v["name"] == "learnable"]
    assert all(any(k.endswith("core_attention.softmax_offset") for k in v["grad_keys"])
               for v in learnable)  # megatron's key; its gradient was compared


DECODE = [
    {"name": "window", "spec": {"window_size": (3, 0)}, "runs": [
        {"kv_cache": "dims"}, {"kv_cache": "positions"},
        {"kv_cache": "positions", "prompt_lengths": [10, 7, 4], "prefill_chunk": 3},
        {"kv_cache": "dims", "schedule": "exact", "prompt_lengths": [10, 7, 4],
         "prefill_chunk": 3}]},
    {"name": "sinks_alternating_window", "spec": {"softmax_type": "learnable",
                                                  "window_size": (4, 0)},
     "config": {"window_attn_skip_freq": 2}, "runs": [
        {"kv_cache": "dims"}, {"kv_cache": "positions", "prefill_chunk": 4}]},
    {"name": "off_by_one", "spec": {"softmax_type": "off-by-one"}, "runs": [
        {"kv_cache": "positions", "schedule": "exact"}]},
]
DECODE_1X4 = [{**DECODE[0], "runs": DECODE[0]["runs"][1:3]},
              {**DECODE[1], "runs": DECODE[1]["runs"][1:]}]


@pytest.mark.parametrize("n,m,world", [(2, 2, 4), (1, 4, 4)])
def test_window_and_sinks_generation_matches_tp1(request, n, m, world):
    """Greedy decoding with the dim-sliced and the position-sharded KV cache (a rank whose
    positions all lie before the window contributes nothing to the merge), chunked prefill and
    mixed prompt lengths: tokens equal to megatron's TP=1 model, logits within 1e-5."""
    pool = request.getfixturevalue(f"pool{world}")
    variants = DECODE if m == 2 else DECODE_1X4
    results = pool.run(decode_variants_match_tp1, n=n, m=m, variants=variants)
    print("worst logits error:", max(v["logits_err"] for r in results for v in r))
    for r in results:
        for v in r:
            assert v["tokens_equal"] and v["logits_err"] < TOL, v
            assert v["kv_cache_used"] == v["kv_cache"], v
            assert v["changes_model"] > 1e-3, v


def test_learnable_sinks_round_trip_through_checkpoints(pool4, tmp_path):
    """megatron's softmax_offset key: TP=4 -> grid 2x2 -> TP=4 and -> TP=1, bit-identical."""
    dirs = [tmp_path / name for name in ("tp4", "grid")]
    for d in dirs:
        d.mkdir()
    for same in pool4.run(checkpoint_round_trip, dirs=[str(d) for d in dirs],
                          softmax_type="learnable"):
        assert same == [True, True, True]
