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
