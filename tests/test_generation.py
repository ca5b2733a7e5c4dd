"""Generation (prefill + greedy decode with the KV cache, micro-batched through the pipeline)
under grid x PP and TP x PP layouts gives megatron-core's TP=1 tokens, dense and MoE, with
either KV cache of the grid."""

import pytest

from tests.cases.generation import generation_matches_tp1


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("n,m,pp,grid", [
    (2, 2, 1, True),  # grid 2x2
    (2, 1, 2, False),  # TP=2 PP=2 (megatron-core attention)
    (1, 2, 2, True),  # grid 1x2 x PP 2
])
def test_generation_matches_tp1(pool4, tmp_path, moe, n, m, pp, grid):
    extra = {"experts": 4} if moe else {}
    # the grid's two KV caches: position-sharded for the dense model, dim-sliced for MoE
    kv_cache = "dims" if moe or not grid else "positions"
    results = pool4.run(generation_matches_tp1, ckpt_dir=str(tmp_path), n=n, m=m, pp=pp,
                        grid=grid, micro_batches=2, kv_cache=kv_cache, **extra)
    last = [r for r in results if r is not None]
    assert len(last) == n * m  # every TP rank of the last stage reports
    for r in last:
        assert r["tokens_equal"]
        assert r["logits_err"] < 1e-5, r["logits_err"]
        assert r["steps"] == 8
        assert r["kv_cache"] == kv_cache
