"""KV-cache decoding, checkpoint round trips, dropout streams and bad input, on gloo/CPU."""

import pytest

from tests.cases import runtime


@pytest.mark.parametrize("n,m,extra", [
    (2, 2, {}),
    (1, 4, {"kv_heads": 1}),
    (4, 1, {}),  # n > g with m = 1: megatron-core's attention (TP=4 > g=2)
    (2, 2, {"kv_heads": 1}),  # n > g on the grid: the KV head's slice gathered by 2 groups
    (2, 2, {"schedule": "auto"}),  # prefill with the sequence-split core, then decode
    (1, 4, {"schedule": "seq", "kv_heads": 1}),  # seq also for decode (chunks mostly empty)
    (2, 2, {"qk_norm": "RMSNorm", "interleaved": True}),
])
def test_decode_with_kv_cache_matches_tp1(pool4, tmp_path, n, m, extra):
    results = pool4.run(runtime.decode_matches_tp1, ckpt_dir=str(tmp_path), n=n, m=m,
                        steps=16, **extra)
    for r in results:
        assert r["tokens_equal"], r["tokens"]
        assert r["logits_err"] < 1e-5
        assert len(r["tokens"][0]) == 17  # prefill's token + 16 decode steps
    kv_heads = extra.get("kv_heads", 2)
    # Each rank caches 1/(n*m) of the TP=1 cache whenever n <= g, else one KV head's slice.
    share = n * m if n <= kv_heads else m * kv_heads
    assert {r["kv_bytes"] for r in results} == {results[0]["kv_bytes_tp1"] // share}


def test_checkpoint_round_trips_are_bit_identical(pool4, tmp_path):
    dirs = [tmp_path / name for name in ("tp4", "grid")]
    for d in dirs:
        d.mkdir()
    dirs = [str(d) for d in dirs]
    results = pool4.run(runtime.checkpoint_round_trip, dirs=dirs, qk_norm="LayerNorm",
                        qkv_bias=True)
    # grid 2x2 read TP=4's; TP=4 read the grid's; TP=1 read the grid's: all equal TP=4's
    assert results == [[True, True, True]] * 4


@pytest.mark.parametrize("n,m", [(2, 2), (1, 4)])
def test_dropout_is_shared_by_the_dim_slice_group(pool4, n, m):
    for r in pool4.run(runtime.dropout_masks, n=n, m=m):
        assert r["same_in_dim_slice_group"]
        assert r["differs_across_head_groups"]
        assert r["reproducible"]
        assert 0.4 < r["dropped_fraction"] < 0.6


def test_cpu_rng_tracker_really_forks(pool4):
    for r in pool4.run(runtime.rng_tracker_forks, tp=4):
        assert r == {"reproducible": True, "default_stream_untouched": True,
                     "distinct_per_tp_rank": True}


@pytest.mark.parametrize("case,rule", [
    ("bad_heads_not_divisible", "num_attention_heads (6) must be divisible by the head groups n"),
    ("bad_kv_groups", "num_query_groups (3) and the head groups n (2) must divide one another"),
    ("bad_head_dim_for_rope", "rotary dims (12) must be divisible by 2*m (8)"),
    ("bad_tp_size", "tensor_model_parallel_size (2) must equal head_groups x dim_slices"),
    ("bad_world_size", "world size (4) must be divisible by grid x PP x CP"),
    ("bad_context_parallel", "context parallelism (context_parallel_size=2) cannot be combined"),
    ("bad_unsupported_option", "attention_output_gate=True is not supported"),
    ("bad_rotary_percent_of_spec", "the grid attention was built for 16 rotary dims, but the "
                                   "model (GPTModel, position_embedding_type='rope', "
                                   "rotary_percent=0.5) rotates 8"),
])
def test_bad_input_fails_on_every_rank(pool4, case, rule):
    errors = pool4.run_expecting_error(getattr(runtime, case))
    for err in errors:
        assert "MxnConfigError" in err and rule in err, err


def test_grid_attention_sets_every_attribute_of_megatrons(pool4):
    """MxnSelfAttention mirrors SelfAttention.__init__ (which sizes heads by the TP size and so
    cannot run for the grid); this fails when megatron-core adds an attribute it would miss."""
    assert pool4.run(runtime.attention_attributes) == [[]] * 4
