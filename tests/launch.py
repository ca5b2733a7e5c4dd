"""Run repository scripts under torchrun on CPU (gloo) from tests, and read their outputs."""

from __future__ import annotations

import atexit
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

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


def _rank_env(pythonpath: str = str(REPO)) -> Dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONPATH=pythonpath)


class Zygote:
    """The session's zygote (tests/zygote.py): a process that has imported torch and megatron
    once and forks the ranks of each job. Restarted if it died."""

    proc: Optional[subprocess.Popen] = None

    @classmethod
    def launch(cls, request: dict) -> dict:
        if cls.proc is None or cls.proc.poll() is not None:
            log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"zygote-{os.getpid()}.log", "w")
            cls.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=REPO,
                                        env=_rank_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, text=True)
            atexit.register(cls.close)
            ready = cls.proc.stdout.readline()
            assert ready.strip() == '{"ready": true}', f"the zygote did not start: {ready!r}"
        cls.proc.stdin.write(json.dumps(request) + "\n")
        cls.proc.stdin.flush()
        reply = cls.proc.stdout.readline()
        assert reply, "the zygote died during a launch"
        return json.loads(reply)

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            cls.proc.wait(timeout=30)


def _script_path(script: str) -> str:
    return script if script.startswith("-m ") else str(REPO / script)


def fork_ranks(script: str, nproc: int, args: List[str], workdir: Path, timeout: int,
               apart: bool = False) -> int:
    """Run `script` on `nproc` ranks forked from the zygote (rendezvous env:// on a free
    port, logs in workdir/logs/zygote/attempt_0/RANK/); the job's exit code, torchrun's way
    (the first rank's failure, or 0)."""
    env = dict(_rank_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    reply = Zygote.launch({"script": _script_path(script), "args": args, "nproc": nproc,
                           "cwd": str(workdir), "logs": str(workdir / "logs"), "env": env,
                           "timeout": timeout, "apart": apart})
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(script, timeout)
    failed = [c for c in reply["codes"] if c != 0]
    return failed[0] if failed else 0


def read_rank_logs(logs: Path) -> Dict[int, str]:
    """Each rank's stdout + stderr from a log folder laid out as torchrun's --log-dir (the
    zygote writes the same layout)."""
    rank_logs: Dict[int, str] = {}
    for path in sorted(glob.glob(str(logs / "**" / "attempt_*" / "*" / "std*.log"),
                                 recursive=True)):
        rank = int(Path(path).parent.name)
        rank_logs[rank] = rank_logs.get(rank, "") + Path(path).read_text()
    return rank_logs


def torchrun(script: str, nproc: int, args: List[str], workdir: Path, timeout: int = 300,
             metrics: bool = True, pythonpath: str = str(REPO), real: bool = False) -> Run:
    """Run `script` (a repository path, or "-m module") on `nproc` CPU ranks; per-rank logs
    and metrics land in `workdir`. The ranks are forked from the zygote (the same processes
    torchrun would start, without the import per rank); `real=True`, another PYTHONPATH or
    MXN_TESTS_TORCHRUN=1 in the environment runs torch.distributed.run itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    metrics_file = workdir / "metrics.jsonl"
    if metrics:
        args = [*args, "--mxn-metrics-file", str(metrics_file)]
    if real or pythonpath != str(REPO) or os.environ.get("MXN_TESTS_TORCHRUN"):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", f"--log-dir={logs}", "--redirects=3",
               *(script.split() if script.startswith("-m ") else [str(REPO / script)]), *args]
        proc = subprocess.run(cmd, cwd=workdir, env=_rank_env(pythonpath), capture_output=True,
                              text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    else:
        code, output = fork_ranks(script, nproc, args, workdir, timeout), ""
    rank_logs = read_rank_logs(logs)
    rows = []
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return Run(code, output, rank_logs, rows)


def run_ranks_apart(script: str, nproc: int, args: List[str], workdir: Path,
                    timeout: int = 300) -> Run:
    """Run `nproc` ranks that live apart (forked from the zygote with torchrun's env:// variables,
    no agent), so that one rank failing does not get the others killed: how tests check that
    an error is raised on every rank, not only on the first to reach it."""
    workdir.mkdir(parents=True, exist_ok=True)
    code = fork_ranks(script, nproc, args, workdir, timeout, apart=True)
    return Run(code, "", read_rank_logs(workdir / "logs"), [])


def rel_diff(a: Dict[int, float], b: Dict[int, float]) -> float:
    """Largest relative difference over the iterations both runs logged."""
    common = sorted(set(a) & set(b))
    assert common, (a, b)
    return max(abs(a[i] - b[i]) / max(abs(b[i]), 1e-12) for i in common)
