"""The Megatron-LM checkout patch (patches/) and the CPU runner for Megatron scripts."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch import REPO, TINY_GPT, torchrun

APPLY = REPO / "patches" / "apply_megatron_lm.sh"


def test_apply_refuses_a_directory_that_is_not_a_checkout(tmp_path):
    proc = subprocess.run([str(APPLY), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "is not a Megatron-LM checkout" in proc.stderr


def test_patch_is_the_minimal_change():
    patch = (REPO / "patches" / "megatron_lm_core_r0.19.0_pretrain_gpt.patch").read_text()
    added = [l for l in patch.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in patch.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert len(removed) == 3 and len(added) <= 8
    assert any("with_mxn_args(" in l for l in added)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason=(
    "needs a Megatron-LM core_r0.19.0 checkout in $MEGATRON_LM (GitHub is not reachable from "
    "CI) and pybind11 for its dataset helpers"))
def test_patched_checkout_trains_with_the_grid_on_cpu(tmp_path):
    checkout = tmp_path / "Megatron-LM"
    shutil.copytree(os.environ["MEGATRON_LM"], checkout, ignore=shutil.ignore_patterns(".git"))
    subprocess.run([str(APPLY), str(checkout)], check=True)
    env_path = f"{checkout}{os.pathsep}{REPO}"
    run = torchrun("-m megatron_mxn.cpu", 4, [
        str(checkout / "pretrain_gpt.py"), *TINY_GPT, "--mock-data", "--train-iters", "3",
        "--mxn-head-groups", "2", "--mxn-dim-slices", "2"], tmp_path / "run",
        pythonpath=env_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "> mxn grid: 2 head groups x 2 dim slices" in run.rank_logs[0]
    assert sorted(run.by_iteration("lm loss")) == [1, 2, 3]
