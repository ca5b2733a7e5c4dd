"""scripts/gpu_check.sh end to end on CPU (small shapes), so that the one-GPU run, which this
machine cannot do, does not first fail on a typo: exit code, tables, every case present."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

ROOT = Path(__file__).resolve().parents[1]
CPU_SEQS = (256, 512, 1024)
CASES = ("TP=8 (unfused scores, megatron-like)", "grid 2x4 exact (score matrix)",
         "grid 2x4 seq (fused)")


def test_gpu_check_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("numerics.md", "bench.md", "gpu_check.md"):
        assert (tmp_path / name).is_file(), name
    numerics = (tmp_path / "numerics.md").read_text()
    bf16 = [line for line in numerics.splitlines() if line.startswith("| bf16 |")]
    assert len(bf16) == 12 and all(line.endswith("| PASS |") for line in bf16), bf16
    assert "| FAIL |" not in numerics and "| FAIL |" not in (tmp_path / "gpu_check.md").read_text()
    bench = (tmp_path / "bench.md").read_text()
    for s in CPU_SEQS:
        for case in CASES:  # a timed row: "| s | case | median [min] | ..."
            assert re.search(rf"^\| {s} \| {re.escape(case)} \| [\d.]+ \[[\d.]+\] \|", bench,
                             re.M), (s, case, bench)
