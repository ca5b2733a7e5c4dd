"""megatron-core's inference engine with grid models (gloo, CPU): greedy, sampled and
terminated generations equal TP=1's; the dynamic engine is refused at construction."""

from tests.cases import engine

LOG_PROB_TOL = 1e-5


def test_megatron_engine_on_the_grid_matches_tp1(pool4, tmp_path):
    results = pool4.run(engine.engine_matches_tp1, ckpt_dir=str(tmp_path))
    # every rank of the grid (one DP rank) draws the same tokens; TP=1 on 4 ranks is 4 DP
    # ranks, whose sampling seeds megatron offsets by the DP rank: DP rank 0 is compared
    assert all(r["grid"] == results[0]["grid"] for r in results[1:])
    want, got = results[0]["tp1"], results[0]["grid"]
    for mode in [*engine.SAMPLING, "eod"]:
        assert got[mode]["tokens"] == want[mode]["tokens"], mode
        assert got[mode]["text"] == want[mode]["text"], mode
        err = max(abs(a - b) for g, w in zip(got[mode]["log_probs"], want[mode]["log_probs"])
                  for a, b in zip(g, w))
        assert err <= LOG_PROB_TOL, (mode, err)
    tokens = {mode: got[mode]["tokens"] for mode in engine.SAMPLING}
    assert [len(t) for t in tokens["greedy"]] == [engine.NEW_TOKENS] * 2
    # sampling really sampled: each sampled mode departs from greedy somewhere
    assert tokens["top_k"] != tokens["greedy"] and tokens["top_p"] != tokens["greedy"]
    assert got["greedy"]["text"][0] == " " + " ".join(map(str, tokens["greedy"][0]))
    # the end-of-document id ends the sequence that generates it (megatron leaves it out of
    # the generated tokens); a sequence that does not generate it runs to the end
    eod = got["eod"]
    assert eod["tokens"][0] == tokens["greedy"][0][:3]
    for seq, greedy in zip(eod["tokens"], tokens["greedy"]):
        assert seq == (greedy[:greedy.index(eod["id"])] if eod["id"] in greedy else greedy)


RULE = ("would serve this grid model with megatron-core's dynamic inference context, which the "
        "grid attention does not support: build StaticInferenceEngine(controller, ..., "
        "legacy=True)")


def test_dynamic_engine_is_refused_at_construction(pool4):
    for r in pool4.run(engine.dynamic_engine_is_refused):
        assert r["static"].startswith("MxnConfigError: StaticInferenceEngine(..., legacy=False)")
        assert r["dynamic"].startswith("MxnConfigError: DynamicInferenceEngine would serve")
        assert RULE in r["static"] and RULE in r["dynamic"]
        assert any(m.startswith("Error initializing dynamic engine: max_requests must be "
                                "divisible by tp_size (4)") for m in r["non_grid"]), r["non_grid"]
