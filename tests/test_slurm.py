"""The SLURM launchers on a real one-node SLURM cluster on localhost, in CPU/gloo mode (4 ranks):
scripts/slurm/pretrain.sbatch makes a checkpoint, scripts/slurm/ab_compare.sbatch runs the A/B
on it. Each job's srun steps start torchrun with the c10d rendezvous, as on a GPU cluster.

Needs SLURM (installed with apt-get when missing and running as root; set MXN_SLURM_INSTALL=0
to forbid that); skipped, with the reason, when it cannot be had. See tests/slurm_cluster.py.
"""

import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import ClusterUnavailable, free_port, start_cluster

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

REPO = Path(__file__).resolve().parent.parent

JOB_TIMEOUT = 240  # seconds per job; each takes about a minute on a 2-core machine


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    yield cluster
    cluster.stop()


def cpu_job_env(**extra):
    """The launchers' CPU mode on this node, with this test's interpreter."""
    return {"MXN_CPU": "1", "NPROC_PER_NODE": "4", "VENV": sys.prefix,
            "MASTER_PORT": str(free_port()), **extra}


def submit(slurm, script, tmp_path, env, timeout=JOB_TIMEOUT):
    """Submit a launcher from the repository and wait; returns the job's final state and output."""
    # The scripts ask for 2 nodes x 8 GPUs: one node, no GPUs here. The output goes to tmp_path,
    # not into the repository the job runs in.
    job_id = slurm.sbatch(script, ["--nodes=1", "--gpus-per-node=0",
                                   f"--output={tmp_path / 'slurm-%x-%j.out'}"], env, cwd=REPO)
    info = slurm.wait(job_id, timeout)
    log = Path(info.get("StdOut", ""))
    text = log.read_text(errors="replace") if log.is_file() else f"(no job output at {log})"
    return info, text


def submit_ok(slurm, script, tmp_path, env):
    info, text = submit(slurm, script, tmp_path, env)
    ok = info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0"
    if not ok:  # the job's output, the logs of the steps it ran, the daemons' logs
        print(f"\n--- {info.get('StdOut')} ---\n{text}")
        for step_log in sorted(tmp_path.rglob("*.log")):
            print(f"\n--- {step_log} (end) ---\n{step_log.read_text(errors='replace')[-4000:]}")
        print(slurm.log_tails())
    assert ok, (f"{script}: job {info.get('JobId')} {info.get('JobState')}, "
                f"exit {info.get('ExitCode')}")
    return text


def test_pretrain_then_ab_compare_sbatch(slurm, tmp_path):
    ckpt = tmp_path / "ckpt"
    text = submit_ok(slurm, "scripts/slurm/pretrain.sbatch", tmp_path, cpu_job_env(
        CONFIG="configs/cpu_dense.yaml", LAYOUT="baseline", TRAIN_ITERS="2", SAVE=str(ckpt)))
    assert "--rdzv-backend=c10d" in text  # the launcher printed what it ran
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    results = tmp_path / "results"
    submit_ok(slurm, "scripts/slurm/ab_compare.sbatch", tmp_path, cpu_job_env(
        CONFIGS="configs/cpu_dense.yaml", LAYOUTS="grid", REPEATS="1", RUN="slurm-ab",
        RESULTS_DIR=str(results), LOAD=str(ckpt), EXTRA_ARGS="--max-new-tokens 4"))
    report = results / "slurm-ab.md"
    assert report.is_file() and report.read_text().strip(), f"{report} missing or empty"


def test_layout_check_rejects_dim_slices_across_nodes(slurm, tmp_path):
    """3 ranks per node cannot hold the grid's dim-slice groups of 2: the job fails before any
    rank starts, saying why."""
    info, text = submit(slurm, "scripts/slurm/pretrain.sbatch", tmp_path,
                        cpu_job_env(NPROC_PER_NODE="3", LAYOUT="grid"), timeout=60)
    assert info["JobState"] == "FAILED", text
    assert "mxn-dim-slices=2" in text and "inside one node" in text, text
    assert "torch.distributed.run" not in text, text


def test_gpu_mode_dry_run(slurm, tmp_path):
    """The 16-GPU A/B's set-up and command line with 8 ranks per node (DRY_RUN: nothing runs),
    on the default GPU configs when they exist: their grid must fit in an 8-GPU node."""
    env = {"MXN_CPU": "0", "DRY_RUN": "1", "GPUS_PER_NODE": "8", "VENV": sys.prefix, "RUN": "dry"}
    if not all((REPO / c).is_file() for c in ("configs/paper_dense.yaml",
                                               "configs/paper_moe.yaml")):
        env["CONFIGS"] = "configs/cpu_dense.yaml"
    info, text = submit(slurm, "scripts/slurm/ab_compare.sbatch", tmp_path, env, timeout=60)
    assert info["JobState"] == "COMPLETED", text
    assert "GPU/nccl" in text and "CUDA_DEVICE_MAX_CONNECTIONS=1" in text, text
    assert "--launcher srun --nnodes 1 --nproc-per-node 8" in text, text
    assert "--layouts baseline,grid,tp" in text, text
