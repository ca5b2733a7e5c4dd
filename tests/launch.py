"""Run repository scripts under torchrun on CPU (gloo) from tests, and read their outputs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from megatron_mxn.cpu.launch import free_port

REPO = Path(__file__).resolve().parent.parent

# A 2-layer GQA GPT small enough for CPU, with a vocabulary whose padding is the same for every
# TP size up to 8 (Megatron pads to a multiple of 128 x TP).
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
    "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--position-embedding-type", "rope", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "1023",  # NullTokenizer adds EOD: 1024 = 128 x 8
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-iters", "20", "--lr-warmup-iters", "0",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--seed", "1234",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]


@dataclass
class Run:
    returncode: int
    output: str  # torchrun's own output
    rank_logs: Dict[int, str]  # each rank's stdout + stderr
    metrics: List[dict]  # --mxn-metrics-file rows

    def by_iteration(self, key: str) -> Dict[int, float]:
        return {row["iteration"]: row[key] for row in self.metrics}


def torchrun(script: str, nproc: int, args: List[str], workdir: Path, timeout: int = 300,
             metrics: bool = True, pythonpath: str = str(REPO)) -> Run:
    """Run `script` (a repository path, or "-m module") on `nproc` CPU ranks; per-rank logs
    and metrics land in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    metrics_file = workdir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", f"--log-dir={logs}", "--redirects=3",
           *(script.split() if script.startswith("-m ") else [str(REPO / script)]), *args]
    if metrics:
        cmd += ["--mxn-metrics-file", str(metrics_file)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONPATH=pythonpath)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    rank_logs = {}
    for path in glob.glob(str(logs / "**" / "attempt_*" / "*" / "std*.log"), recursive=True):
        rank = int(Path(path).parent.name)
        rank_logs[rank] = rank_logs.get(rank, "") + Path(path).read_text()
    rows = []
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return Run(proc.returncode, proc.stdout + proc.stderr, rank_logs, rows)


def run_ranks_apart(script: str, nproc: int, args: List[str], workdir: Path,
                    timeout: int = 300) -> Run:
    """Start `nproc` ranks as independent processes (the env:// variables torchrun would set),
    so that one rank failing does not get the others killed: how tests check that an error is
    raised on every rank, not only on the first to reach it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = [sys.executable, *(script.split() if script.startswith("-m ") else [str(REPO / script)])]
    procs, files = [], []
    for rank in range(nproc):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONPATH=str(REPO), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(workdir / f"rank{rank}.log", "w")
        files.append(log)
        procs.append(subprocess.Popen([*base, *args], cwd=workdir, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    rank_logs = {r: (workdir / f"rank{r}.log").read_text() for r in range(nproc)}
    return Run(max(codes, key=abs), "", rank_logs, [])


def rel_diff(a: Dict[int, float], b: Dict[int, float]) -> float:
    """Largest relative difference over the iterations both runs logged."""
    common = sorted(set(a) & set(b))
    assert common, (a, b)
    return max(abs(a[i] - b[i]) / max(abs(b[i]), 1e-12) for i in common)
