"""The collective-latency table (megatron_mxn/tools/collective_latency.py): measured on a real
gloo world, and the prices it puts on a generate report's decode steps."""

import pytest

from megatron_mxn.analysis.collective_prices import call_seconds, fit, step_seconds
from megatron_mxn.tools.collective_latency import (
    OPS,
    PAYLOADS,
    decode_step_seconds,
    markdown,
    measure,
)

# as a JSON round trip leaves it: string keys
TABLE = {"world": 4, "backend": "gloo", "seconds": {
    "all_reduce": {"2": {"1024": 0.001, "263168": 0.002}, "4": {"1024": 0.005, "263168": 0.004}},
    "all_to_all": {"2": {"1024": 0.0006, "263168": 0.0016}},
    "send": {"2": {"1024": 0.0003, "263168": 0.0005}},
}}


def test_fit_draws_alpha_beta_through_the_two_payloads():
    fitted = fit(TABLE)
    alpha, beta = fitted["all_reduce"][2]
    assert beta == pytest.approx(0.001 / 262144)
    assert alpha == pytest.approx(0.001 - 1024 * 0.001 / 262144)
    assert call_seconds("all_reduce", 2, 1024, fitted) == pytest.approx(0.001)
    assert call_seconds("all_reduce", 2, 263168, fitted) == pytest.approx(0.002)
    # a larger payload measured faster (noise) is no negative bandwidth: flat at the small one
    assert fitted["all_reduce"][4] == (0.005, 0.0)
    # a send is one hop, whatever its group's size in the record
    assert call_seconds("send", 4, 1024, fitted) == pytest.approx(0.0003)
    with pytest.raises(KeyError, match="no measured time for all_gather over 4 ranks"):
        call_seconds("all_gather", 4, 1024, fitted)


def test_a_reports_decode_steps_priced_on_its_busiest_stage():
    fitted = fit(TABLE)
    ar4 = ["all_reduce", "TP", 4, 1024, True, 8]
    a2a2 = ["all_to_all", "dim-slice", 2, 1024, True, 4]
    one_rank = ["all_reduce", "DP", 1, 1024, False, 3]  # (a group of one: no collective)
    assert step_seconds([ar4, a2a2, one_rank], fitted) == pytest.approx(8 * 0.005 + 4 * 0.0006)
    report = {"per_stage": {
        # step 0 (the prefill) is not a decode step
        "0": {"comm_steps": [[["all_reduce", "TP", 4, 10 ** 6, True, 99]], [ar4], [ar4, a2a2]]},
        "1": {"comm_steps": [[], [a2a2], [a2a2]]},
    }}
    want = (8 * 0.005 + (8 * 0.005 + 4 * 0.0006)) / 2
    assert decode_step_seconds(report, fitted) == pytest.approx(want)


def test_markdown_lists_every_op_and_size_in_microseconds():
    lines = markdown(TABLE)
    assert "| all_reduce | 4 | 5000 | 4000 | 5000 | 0.00 |" in lines
    assert "| send | 2 | 300 | 500 | 299 | 0.78 |" in lines


@pytest.mark.uses_pool
def test_measure_times_every_collective_on_a_gloo_world(pool4):
    tables = pool4.run(measure, iters=2, repeats=1)
    assert all(t == tables[0] for t in tables)  # every rank reports the slowest rank's times
    table = tables[0]
    assert table["world"] == 4 and table["backend"] == "gloo"
    assert sorted(table["seconds"]) == sorted(OPS)
    for op, by_g in table["seconds"].items():
        assert sorted(by_g) == ([2] if op == "send" else [2, 4]), op
        for by_payload in by_g.values():
            assert sorted(by_payload) == list(PAYLOADS)
            assert all(s > 0 for s in by_payload.values()), (op, by_payload)
    assert set(fit(table)["all_reduce"]) == {2, 4}
