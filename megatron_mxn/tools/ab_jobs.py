"""What the A/B driver's jobs share (ab_compare.py, kv_budget.py): the launcher and a job's
run, a checkpoint, the memory check before a job, and the metrics of a generate report."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_mxn.cpu.launch import free_port
from megatron_mxn.megatron_lm.run_configs import flag_keys

REPO = Path(__file__).resolve().parents[2]  # (megatron_mxn/tools/ab_jobs.py)


def prefill_score_bytes(cfg: dict, layout: str, batch: int, length: int,
                        chunk: Optional[int] = None) -> int:
    """Estimated peak bytes per rank of a megatron-core (TP x PP) layout's prefill attention:
    its unfused core holds ~3 [micro-batch, heads / TP, chunk, s] tensors (the scores, their
    masked/scaled copy, the probabilities). 0 for a grid and for TP on the fused core
    (--mxn-tp-core fused): their prefill cores are O(s)."""
    model = flag_keys(cfg.get("model"))
    flags = flag_keys(cfg["layouts"][layout])
    if int(flags.get("mxn-dim-slices") or 1) > 1 or flags.get("mxn-tp-core") == "fused":
        return 0
    tp = int(flags.get("tensor-model-parallel-size") or 1)
    micro = int((cfg.get("inference") or {}).get("inference-micro-batches") or 0) or int(
        flags.get("pipeline-model-parallel-size") or 1)
    elem = 2 if (model.get("fp16") or model.get("bf16")) else 4
    heads = -(-int(model["num-attention-heads"]) // tp)
    return 3 * max(batch // micro, 1) * heads * min(chunk or length, length) * length * elem


def memory_budget_bytes(gib: Optional[float]) -> Optional[float]:
    """--memory-budget-gib, or half of MemAvailable (Linux: the other half for the processes
    themselves and the rest of the machine); None: unknown, no check."""
    if gib is not None:
        return gib * 2**30
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return 0.5 * kib * 1024


def _extra_value(extra: List[str], flag: str) -> Optional[str]:
    """The value of `flag` among the pass-through generate flags (last one wins)."""
    value = None
    for k, a in enumerate(extra):
        if a == flag and k + 1 < len(extra):
            value = extra[k + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


class Launcher:
    """Builds the command line of one distributed job (torchrun here, or srun + torchrun)."""

    def __init__(self, kind: str, nnodes: int, nproc: int):
        self.kind, self.nnodes, self.nproc = kind, nnodes, nproc
        self.port = int(os.environ.get("MASTER_PORT", "0")) or free_port()

    def command(self, target: List[str]) -> List[str]:
        self.port += 1  # a fresh rendezvous port per job
        torchrun = [sys.executable, "-m", "torch.distributed.run",
                    f"--nproc-per-node={self.nproc}"]
        if self.kind == "torchrun":
            return torchrun + [f"--nnodes={self.nnodes}", f"--master-port={self.port}", *target]
        addr = os.environ.get("MASTER_ADDR")
        if not addr:
            raise SystemExit("--launcher srun needs MASTER_ADDR (the sbatch scripts set it)")
        return ["srun", f"--nodes={self.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                *torchrun, f"--nnodes={self.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={addr}:{self.port}", *target]


def run_job(cmd: List[str], log: Path, what: str, timeout: int) -> bool:
    """Run one job, its output in `log`; progress on stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    print(f"[ab] {what}: {' '.join(cmd)}\n[ab]   log: {log}", flush=True)
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"[ab]   {what}: {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.monotonic() - start:.0f} s", flush=True)
    return code == 0


def per_repeat_values(report: dict) -> Dict[str, List[float]]:
    """Each metric's value in each timed repeat of one generate report."""
    rows = report["repeats"]
    return {"output_tokens_per_s": [r["output_tokens_per_s"] for r in rows],
            "total_tokens_per_s": [r["total_tokens_per_s"] for r in rows],
            "tpot_median_s": [r["tpot_s"]["median"] for r in rows],
            "tpot_p90_s": [r["tpot_s"]["p90"] for r in rows],
            "ttft_s": [r["ttft_s"] for r in rows]}


def spread(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _kib(x: float) -> str:
    from megatron_mxn.accounting import format_bytes  # (imports torch: not at start-up)

    return format_bytes(x, smallest="KiB")


def _calls(calls: dict) -> str:
    from megatron_mxn.accounting import format_calls  # (imports torch: not at start-up)

    return format_calls(calls)


def make_checkpoint(cfg_path: str, workdir: Path, launcher: Launcher, timeout: int) -> Path:
    ckpt = workdir / "checkpoint"
    if (ckpt / "latest_checkpointed_iteration.txt").exists():
        print(f"[ab] reusing checkpoint {ckpt}", flush=True)
        return ckpt
    cmd = launcher.command([str(REPO / "scripts" / "pretrain_gpt_mxn.py"), "--config", cfg_path,
                            "--layout", "baseline", "--save", str(ckpt)])
    if not run_job(cmd, workdir / "pretrain.log", f"checkpoint for {cfg_path}", timeout):
        raise SystemExit(f"[ab] pretraining the checkpoint failed; see {workdir / 'pretrain.log'}")
    return ckpt


def measure_collective_latency(workdir: Path, launcher: Launcher, timeout: int
                               ) -> Optional[dict]:
    """The collectives' latency on these ranks (megatron_mxn.tools.collective_latency: one job
    on the launcher's ranks, before the layouts run); None when the job fails (reported)."""
    out = workdir / "collective_latency.json"
    out.unlink(missing_ok=True)
    cmd = launcher.command(["-m", "megatron_mxn.tools.collective_latency", "--output-json",
                            str(out)])
    if not run_job(cmd, workdir / "collective_latency.log", "collective latency", timeout):
        return None
    return json.loads(out.read_text())


def too_large(cfg: dict, name: str, length: int, args, batch: Optional[int] = None
              ) -> Optional[str]:
    """Why the layout's prefill at this prompt length (and batch: by default the run's) would
    not fit in memory, or None."""
    batch = batch or int(_extra_value(args.generate_extra, "--batch-size")
                         or (cfg.get("inference") or {}).get("batch-size") or 8)
    chunk = _extra_value(args.generate_extra, "--prefill-chunk-size")
    per_rank = prefill_score_bytes(cfg, name, batch, length, int(chunk) if chunk else None)
    model = flag_keys(cfg.get("model"))
    if model.get("distributed-backend") != "gloo":
        return None  # (GPU ranks: each its own memory, not checked here)
    ranks = int((cfg.get("cluster") or {}).get("gpus_per_node") or 1)  # (sharing this memory)
    budget = memory_budget_bytes(args.memory_budget_gib)
    if budget is None or per_rank * ranks <= budget:
        return None
    return (f"megatron-core's prefill builds s x s attention scores: ~{_kib(per_rank)} per rank, "
            f"{_kib(per_rank * ranks)} over {ranks} ranks > the memory budget {_kib(budget)} "
            "(--memory-budget-gib); use a shorter prompt or --prefill-chunk-size")
