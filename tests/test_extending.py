"""docs/extending.md's toy schedule `gather_qk`, registered from this module (not in the
package): the grid computes megatron-core's TP=1 model under it, a generation issues exactly the
collectives the cost model predicts from it, and the page shows this file's tests verbatim."""

import re

import pytest

from megatron_mxn.analysis.cost_model import Layout, ModelShape, layer_collectives
from megatron_mxn.attention.schedules import get_schedule
from tests.cases.cost import measured_vs_predicted
from tests.cases.options import variants_match_tp1
from tests.launch import REPO

PAGE = REPO / "docs" / "extending.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
# The page's schedule, run as the page shows it: importing this module registers it, here and
# on each rank of a pool (which imports this module to run its cases).
exec(compile(next(b for b in BLOCKS if b.startswith("# gather_qk.py")), str(PAGE), "exec"))

# ---- shown on docs/extending.md from here


def trains_like_tp1():
    """On each rank: one training step of the grid 2x2 under gather_qk against TP=1."""
    return variants_match_tp1(2, 2, [{"name": "toy", "schedules": ["gather_qk"]}])


def generates_as_predicted(kv_cache: str):
    """On each rank: a generation on the grid 1x4, every collective counted and predicted."""
    return measured_vs_predicted(n=1, m=4, pp=1, grid=True, schedule="gather_qk",
                                 kv_cache=kv_cache)


def test_the_grid_trains_like_tp1(pool4):
    for rows in pool4.run(trains_like_tp1):
        for r in rows:  # logits, loss and every gradient against megatron-core's TP=1
            assert r["err"] < 1e-5, r


@pytest.mark.parametrize("kv_cache", ["dims", "positions"])
def test_a_generation_sends_what_the_cost_model_predicts(pool4, kv_cache):
    # positions: the prefill gathers K and V once more (gather_qk does not hand them over)
    for r in pool4.run(generates_as_predicted, kv_cache=kv_cache):
        for step, (measured, predicted) in enumerate(r["steps"]):
            assert measured == predicted, (r["rank"], step, measured, predicted)


def test_the_cost_model_prices_it():
    model = ModelShape(layers=2, hidden=64, heads=8, kv_heads=2, head_dim=16, ffn=256,
                       vocab=128, elem_bytes=4)
    layout = Layout(tp=4, dim_slices=4, schedule="gather_qk")  # 8 heads, 2 KV heads per rank
    calls = layer_collectives(model, layout, mb=2, sq=16, sk=16)
    dim_slice = {(r.op, r.payload_bytes): n for r, n in calls.items() if r.group == "dim-slice"}
    rows = 2 * (16 * 8 + 16 * 2)  # b * (sq * h/n + sk * g'): Q's and K's rows of d/m dims
    assert dim_slice == {("all_gather", rows * 4 * 4 * 4): 1}  # x d/m x m x fp32
    assert get_schedule("gather_qk").exact  # standard attention: its checkpoints are TP's


# ---- to here


def test_the_page_shows_these_tests():
    source = open(__file__).read()
    shown = source.split("# ---- shown on docs/extending.md from here\n\n\n")[1]
    shown = shown.split("\n\n\n# ---- to here")[0] + "\n"
    assert shown in BLOCKS, "docs/extending.md must show this file's tests as they are"
