"""The planner: stable output for a fixed input (golden file), clear refusals, CSV and PNG."""

import csv
from pathlib import Path

import pytest

from megatron_mxn.tools import plan
from megatron_mxn.grid.layout import MxnConfigError

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "plan_paper_dense.md"


def test_paper_dense_plan_matches_golden_file(capsys):
    """Regenerate with: python -m megatron_mxn.tools.plan --config configs/paper_dense.yaml
    > tests/golden/plan_paper_dense.md (and review the diff)."""
    plan.main(["--config", str(REPO / "configs" / "paper_dense.yaml")])
    assert capsys.readouterr().out == GOLDEN.read_text()


def test_plan_shows_baseline_and_config_layouts_and_explains_the_winner(capsys):
    plan.main(["--config", str(REPO / "configs" / "paper_moe.yaml"), "--top", "3"])
    out = capsys.readouterr().out
    assert "TP=8 PP=2 (baseline)" in out
    for name in ("grid 4x4 exact KV-auto (config: grid)", "grid 4x4 gather KV-auto (config: grid)",
                 "grid 4x4 seq KV-auto (config: grid)", "grid 4x4 auto KV-auto (config: grid)",
                 "TP=16 (config: tp)"):
        assert name in out
    assert "| seq/positions, KV positions |" in out  # what auto picks, both choices
    assert " wins (" in out and "mainly on" in out


def test_impossible_layout_is_refused_with_the_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "paper_dense.yaml").read_text().replace(
        "grid: {mxn-head-groups: 4, mxn-dim-slices: 4}",
        "grid: {mxn-head-groups: 2, mxn-dim-slices: 128}"))
    with pytest.raises(MxnConfigError, match=r"rotary dims \(128\) must be divisible by 2\*m "
                                             r"\(256\)"):
        plan.main(["--config", str(bad)])
    with pytest.raises(MxnConfigError, match="neither a preset"):
        plan.main(["--config", str(bad), "--cluster", "no-such-cluster"])


def test_out_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "plan"
    plan.main(["--config", str(REPO / "configs" / "cpu_dense.yaml"), "--workload", "train",
               "--out", str(out)])
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert rows and all(float(r["step_s"]) > 0 for r in rows)
    assert any(r["named"] == "grid" for r in rows)
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"


def test_kv_cache_sweep_shows_where_each_cache_wins(capsys):
    """Per sequence, the dims cache's decode bytes grow with the context (the score
    all-reduce), the positions cache's do not; both hold the same KV bytes per rank."""
    plan.main(["--config", str(REPO / "configs" / "paper_dense.yaml"), "--kv-cache-sweep",
               "--contexts", "4096,131072", "--batches", "1,32"])
    out = capsys.readouterr().out
    head = "| context | TP=8 PP=2 | TP=16 | grid 4x4 auto | grid 4x4 auto KV-by-position |"
    assert head in out and head.replace("| context |", "| context | batch |") + " fastest |" in out
    assert "| 128K | 1 | 1.778* | 7.267* | 6.296 | 6.191 | grid 4x4 auto KV-by-position |" in out
    assert ("| 4K | 0.03 MiB / 4.00 MiB | 0.04 MiB / 8.00 MiB | 0.21 MiB / 4.00 MiB | "
            "0.03 MiB / 4.00 MiB |") in out
    assert ("| 128K | 0.03 MiB / 128.00 MiB | 0.04 MiB / 256.00 MiB | 6.03 MiB / 128.00 MiB | "
            "0.03 MiB / 128.00 MiB |") in out
    with pytest.raises(MxnConfigError, match="comma-separated integers, got '4K'"):
        plan.main(["--config", str(REPO / "configs" / "paper_dense.yaml"), "--kv-cache-sweep",
                   "--contexts", "4K"])


def _measured_table(world: int) -> dict:
    """A collective_latency table (as its JSON has it) whose every call costs 1 ms + 1 us
    per KiB, times the op's index + 1 (so that the ops are told apart)."""
    from megatron_mxn.tools.collective_latency import OPS, PAYLOADS, group_sizes

    return {"world": world, "backend": "gloo", "seconds": {
        op: {str(g): {str(p): (k + 1) * (1e-3 + 1e-6 * p / 1024) for p in PAYLOADS}
             for g in group_sizes(world) if op != "send" or g == 2}
        for k, op in enumerate(OPS)}}


def test_measured_collective_latency_prices_every_collective(tmp_path, capsys):
    """`--collective-latency`: the cluster's collectives cost what the table measured, not the
    preset's alpha-beta; a table measured on another number of ranks is refused."""
    from dataclasses import replace

    from megatron_mxn.accounting import CommRecord
    from megatron_mxn.analysis.collective_prices import fit
    from megatron_mxn.analysis.cost_model import Layout
    from megatron_mxn.analysis.planner import PRESETS, comm_time

    table = _measured_table(4)
    cluster = replace(PRESETS["cpu-gloo"], prices=fit(table))
    records = {CommRecord("all_reduce", "TP", 4, 2048): 3,  # op index 0: 1 ms + 2 us
               CommRecord("all_to_all", "dim-slice", 2, 1024): 2,  # index 3: 4 x 1.001 ms
               CommRecord("send", "PP", 2, 4096): 1,  # index 5: 6 x 1.004 ms
               CommRecord("all_reduce", "DP", 1, 4096): 7}  # one rank: free
    layout = Layout(tp=4, dim_slices=2)
    got = comm_time(records, layout, cluster)
    assert got.total_s == pytest.approx(3 * 1.002e-3 + 2 * 4 * 1.001e-3 + 6 * 1.004e-3)
    preset = comm_time(records, layout, PRESETS["cpu-gloo"])
    assert preset.total_s != pytest.approx(got.total_s)
    assert (got.intra_B, got.inter_B) == (preset.intra_B, preset.inter_B)  # bytes unchanged

    path = tmp_path / "latency.json"
    path.write_text(__import__("json").dumps(table))
    cpu_long = str(REPO / "configs" / "cpu_long.yaml")
    plan.main(["--config", cpu_long, "--collective-latency", str(path)])
    out = capsys.readouterr().out
    assert f"collectives at the latency measured in {path}" in out
    plan.main(["--config", cpu_long])
    assert capsys.readouterr().out != out
    path.write_text(__import__("json").dumps(_measured_table(2)))
    with pytest.raises(MxnConfigError, match=r"measured on 2 ranks, but the plan is for 4 GPUs"):
        plan.main(["--config", cpu_long, "--collective-latency", str(path)])
