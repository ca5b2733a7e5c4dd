"""KV-cache decoding, checkpoint round trips, dropout streams and bad input, on gloo/CPU."""

import pytest

from tests.cases import runtime


@pytest.mark.parametrize("n,m,extra", [
    (2, 2, {}),
    (4, 1, {}),  # n > g with m = 1: megatron-core's attention (TP=4 > g=2)
    (2, 2, {"kv_heads": 1}),  # n > g on the grid: the KV head's slice gathered by 2 groups
    (1, 4, {"schedule": "seq", "kv_heads": 1}),  # seq also for decode (chunks mostly empty)
    # the position-sharded cache: 33 decode steps wrap ownership around the m ranks 8+ times
    (1, 4, {"kv_cache": "positions", "kv_heads": 1, "steps": 33}),  # MQA
    (2, 2, {"kv_cache": "positions", "kv_heads": 1}),  # n > g
    (2, 2, {"kv_cache": "positions", "qk_norm": "RMSNorm", "interleaved": True}),
    (2, 2, {"kv_cache": "positions", "rotary_percent": 0.5, "schedule": "exact"}),
    # auto (the defaults): seq prefills; mixed prompt lengths and a chunked prefill (s_q < s_k);
    # 33 new tokens after the longest prompt (8): the mean decode context (25) passes the
    # crossover (21 positions) where the position-sharded cache sends fewer bytes
    (2, 2, {"schedule": "auto", "kv_cache": "auto", "prompt_lengths": [8, 5, 3],
            "prefill_chunk": 2, "steps": 32}),
    (2, 2, {"schedule": "auto", "kv_cache": "dims", "prompt_lengths": [8, 5, 3],
            "prefill_chunk": 3}),
])
def test_decode_with_kv_cache_matches_tp1(pool4, tmp_path, n, m, extra):
    results = pool4.run(runtime.decode_matches_tp1, ckpt_dir=str(tmp_path), n=n, m=m, **extra)
    _check_decode(results, n, m, extra)


def test_decode_on_eight_ranks_with_the_position_sharded_cache(pool8, tmp_path):
    extra = {"kv_cache": "positions", "steps": 32}
    _check_decode(pool8.run(runtime.decode_matches_tp1, ckpt_dir=str(tmp_path), n=2, m=4,
                            **extra), 2, 4, extra)


def _check_decode(results, n, m, extra):
    steps = extra.get("steps", 16)
    for r in results:
        assert r["tokens_equal"], r["tokens"]
        assert r["logits_err"] < 1e-5
        assert len(r["tokens"][0]) == steps + 1  # prefill's token + the decode steps
    kv_heads = extra.get("kv_heads", 2)
    # Each rank caches 1/(n*m) of the TP=1 cache whenever n <= g (else one KV head's part):
    # the dim-sliced cache d/m dims of every position, the position-sharded one every m-th
    # position (ceil(L/m) of the L positions) with all d dims.
    r = results[0]
    length = r["max_seq"]
    per_position_and_head = r["kv_bytes_tp1"] // (length * kv_heads)
    heads = max(kv_heads // n, 1)
    if r["kv_cache"] == "positions":
        want = per_position_and_head * -(-length // m) * heads
    else:
        want = per_position_and_head * length * heads // m
    assert {x["kv_bytes"] for x in results} == {want}
    assert r["kv_cache"] == ("dims" if m == 1 else extra.get("kv_cache", "dims")
                             if extra.get("kv_cache") != "auto" else "positions")


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


def test_the_kv_cache_choice_is_kept_per_context_not_on_it():
    """generate() records the request and workload of its context, the layers decide once
    (schedules.decide_kv_cache) and the report reads it back; megatron's context object gets no
    attribute, and the record goes with the context."""
    import gc
    from types import SimpleNamespace

    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_mxn.attention import position_cache
    from megatron_mxn.attention.schedules import ScoreShape

    config = SimpleNamespace(mxn_attention="auto", mxn_kv_cache="auto")
    shapes = []

    def shape_of(batch):  # grid 2x2 of the test model, fp32 (the crossover: 21 positions)
        shapes.append(batch)
        return ScoreShape(batch, 4, 1, 1, 1, 8, 2, 4)

    short, engine = StaticInferenceContext(3, 64), StaticInferenceContext(3, 64)
    before = dict(vars(short))
    position_cache.request_kv_cache(short, None, 1, 8, 17)  # mean decode context 17
    assert position_cache.kv_cache_used(short) is None  # (no layer ran yet)
    assert position_cache.kv_cache_of(short, config, shape_of).name == "dims"
    assert position_cache.kv_cache_of(short, config, shape_of).name == "dims"  # decided once
    assert shapes == [1] and position_cache.kv_cache_used(short) == "dims"
    # a context nobody recorded (megatron's engine): decided at its whole length, 64
    assert position_cache.kv_cache_of(engine, config, shape_of).name == "positions"
    assert shapes == [1, 3] and vars(short) == before
    runs = position_cache._RUNS._runs
    assert id(short) in runs
    key = id(short)
    del short
    gc.collect()
    assert key not in runs and id(engine) in runs
