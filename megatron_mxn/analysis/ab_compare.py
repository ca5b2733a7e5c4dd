"""The A/B: the same checkpoint and prompts under the baseline, the grid and the strongest 1-D
layout; identical tokens checked; medians and spread of every metric; .md, .csv and .png.

    python scripts/ab_compare.py --config configs/cpu_dense.yaml --config configs/cpu_moe.yaml

Each config names its layouts (`baseline`, `grid`, `tp`). Without `--load`, a checkpoint is
made first by a short pretraining run (the config's `training` section) under the baseline
layout; every layout then loads it. Each layout runs as one `megatron_mxn.inference.generate` job (one
untimed warm-up generation, then `--repeats` timed ones), launched with torchrun on this machine
or, with `--launcher srun` inside an sbatch allocation, one torchrun per node. The raw JSON of
every job is kept under `<results-dir>/<run>/`; a failed layout is reported, not lost.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_mxn.megatron_lm.run_configs import load_config
from megatron_mxn.cpu.launch import free_port

REPO = Path(__file__).resolve().parents[2]  # (megatron_mxn/analysis/ab_compare.py)

# (key in a generate report's per-repeat entry, column title, scale, unit, better)
METRICS = [
    ("output_tokens_per_s", "output tokens/s", 1.0, "", "higher"),
    ("total_tokens_per_s", "total tokens/s", 1.0, "", "higher"),
    ("tpot_median_s", "TPOT median", 1e3, "ms", "lower"),
    ("tpot_p90_s", "TPOT p90", 1e3, "ms", "lower"),
    ("ttft_s", "TTFT", 1e3, "ms", "lower"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True,
                   help="model/run YAML of configs/ (repeat the flag for several models)")
    p.add_argument("--layouts", default="baseline,grid,tp",
                   help="comma-separated layout names of the configs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per layout")
    p.add_argument("--run", default=None, help="name of the results files (default: ab-<configs>)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--load", default=None,
                   help="checkpoint to use (one config only); default: pretrain one first")
    p.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                   help="srun: inside an sbatch allocation, one torchrun per node")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: the config's cluster.gpus_per_node)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="nodes (default: cluster.gpus / cluster.gpus_per_node)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per job")
    args, generate_extra = p.parse_known_args(argv)
    if args.load and len(args.config) > 1:
        p.error("--load goes with a single --config")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.generate_extra = generate_extra  # e.g. --max-new-tokens 8, passed to every layout
    args.layouts = [x for x in args.layouts.split(",") if x]
    return args


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
    from megatron_mxn.analysis.accounting import format_bytes  # (imports torch: not at start-up)

    return format_bytes(x, smallest="KiB")


def model_table(model: str, reports: Dict[str, Optional[dict]]) -> List[str]:
    """Markdown lines for one model: the layouts' metrics, identical tokens, ratios."""
    ok = {name: r for name, r in reports.items() if r is not None}
    hashes = {r["tokens_sha256"] for r in ok.values()}
    lines = [f"### {model}", ""]
    if ok:
        w = next(iter(ok.values()))["workload"]
        lines += [f"batch {w['batch']}, prompt {w['prompt_length']}, {w['new_tokens']} new "
                  f"tokens, {w['repeats']} timed repeats, {w['device']}; {w['warmup']} "
                  "(excluded). Cells: median [min-max] over the repeats.", ""]
    head = ["layout"] + [f"{t} ({u})" if u else t for _, t, _, u, _ in METRICS] + [
        "KV cache / rank", "peak mem / rank", "sent / layer / decode step / rank",
        "tokens = baseline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_hash = ok.get("baseline", {}).get("tokens_sha256")
    for name, r in reports.items():
        if r is None:
            lines.append(f"| {name} | " + " | ".join(["FAILED"] + [""] * (len(head) - 2)) + " |")
            continue
        values = per_repeat_values(r)
        cells = []
        for key, _, scale, _, _ in METRICS:
            s = spread(values[key])
            cells.append(f"{s['median'] * scale:.1f} [{s['min'] * scale:.1f}-"
                         f"{s['max'] * scale:.1f}]")
        comm = ", ".join(f"{k} {_kib(v)}" for k, v in
                         r["comm_bytes_per_layer_per_decode_step"].items()) or "none"
        same = "yes" if base_hash is None or r["tokens_sha256"] == base_hash else "NO"
        lines.append(f"| {r['layout']['name']} | " + " | ".join(
            cells + [_kib(r["kv_cache_bytes_per_rank"]), _kib(r["peak_memory_bytes_per_rank"]),
                     comm, same]) + " |")
    lines.append("")
    lines.append(f"All layouts generated identical tokens: "
                 f"{'yes' if len(hashes) == 1 and len(ok) == len(reports) else 'NO'}.")
    for other in ("baseline", "tp"):
        if "grid" in ok and other in ok:
            g, o = per_repeat_values(ok["grid"]), per_repeat_values(ok[other])
            parts = [f"{title} x{statistics.median(g[k]) / statistics.median(o[k]):.2f}"
                     for k, title, _, _, _ in METRICS[:3]]
            kv = ok["grid"]["kv_cache_bytes_per_rank"] / ok[other]["kv_cache_bytes_per_rank"]
            lines.append(f"grid / {other}: " + ", ".join(parts) + f", KV cache x{kv:.2f}.")
    return lines + [""]


def write_csv(path: Path, results: Dict[str, Dict[str, Optional[dict]]]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", "layout", "metric", "median", "min", "max", "n"])
        for model, reports in results.items():
            for name, r in reports.items():
                if r is None:
                    out.writerow([model, name, "failed", "", "", "", 0])
                    continue
                for key, values in per_repeat_values(r).items():
                    s = spread(values)
                    out.writerow([model, r["layout"]["name"], key, s["median"], s["min"],
                                  s["max"], s["n"]])
                for key in ("kv_cache_bytes_per_rank", "peak_memory_bytes_per_rank"):
                    out.writerow([model, r["layout"]["name"], key, r[key], r[key], r[key], 1])
                for group, v in r["comm_bytes_per_layer_per_decode_step"].items():
                    out.writerow([model, r["layout"]["name"], f"sent_bytes_per_layer_step_{group}",
                                  v, v, v, 1])
                out.writerow([model, r["layout"]["name"], "tokens_sha256", r["tokens_sha256"],
                              "", "", 1])


def write_chart(path: Path, results: Dict[str, Dict[str, Optional[dict]]]) -> None:
    """Output tokens/s and TPOT per layout (bars: median, whiskers: min-max), one group per
    model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("output_tokens_per_s", "output tokens/s (higher is better)", 1.0),
              ("tpot_median_s", "TPOT, ms (lower is better)", 1e3)]
    for ax, (key, title, scale) in zip(axes, panels):
        x = 0
        ticks, labels = [], []
        for model, reports in results.items():
            for k, (name, r) in enumerate(reports.items()):
                if r is None:
                    continue
                s = spread(per_repeat_values(r)[key])
                med = s["median"] * scale
                ax.bar(x, med, color=f"C{k}", label=r["layout"]["name"] if model == next(
                    iter(results)) else None,
                       yerr=[[med - s["min"] * scale], [s["max"] * scale - med]], capsize=3)
                ticks.append(x)
                labels.append(f"{model}\n{r['layout']['name']}")
                x += 1
            x += 0.6
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    stems = [Path(c).stem for c in args.config]
    run = args.run or "ab-" + "+".join(stems)
    out_dir = Path(args.results_dir)
    work = out_dir / run
    results: Dict[str, Dict[str, Optional[dict]]] = {}
    for cfg_path, model in zip(args.config, stems):
        cfg = load_config(cfg_path)
        missing = [name for name in args.layouts if name not in (cfg.get("layouts") or {})]
        if missing:
            raise SystemExit(f"{cfg_path}: no layout(s) {missing}; it has "
                             f"{sorted(cfg.get('layouts') or {})}")
        cluster = cfg.get("cluster") or {}
        nproc = args.nproc_per_node or int(cluster.get("gpus_per_node", 1))
        nnodes = args.nnodes or max(1, int(cluster.get("gpus", nproc)) // nproc)
        launcher = Launcher(args.launcher, nnodes, nproc)
        model_dir = work / model
        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Path(args.load) if args.load else make_checkpoint(cfg_path, model_dir, launcher,
                                                                 args.timeout)
        results[model] = {}
        for name in args.layouts:
            report_path = model_dir / f"{name}.json"
            report_path.unlink(missing_ok=True)
            cmd = launcher.command(["-m", "megatron_mxn.inference.generate", "--config", cfg_path,
                                    "--layout", name, "--load", str(ckpt),
                                    "--repeats", str(args.repeats),
                                    "--output-json", str(report_path), *args.generate_extra])
            ok = run_job(cmd, model_dir / f"{name}.log", f"{model} / {name}", args.timeout)
            results[model][name] = (json.loads(report_path.read_text())
                                    if ok and report_path.exists() else None)
    lines = [f"# A/B {run}", "", f"`python scripts/ab_compare.py "
             + " ".join(f"--config {c}" for c in args.config)
             + f" --layouts {','.join(args.layouts)} --repeats {args.repeats}"
             + "".join(f" {a}" for a in args.generate_extra) + "`", ""]
    for model, reports in results.items():
        lines += model_table(model, reports)
    (out_dir / f"{run}.md").write_text("\n".join(lines))
    write_csv(out_dir / f"{run}.csv", results)
    write_chart(out_dir / f"{run}.png", results)
    print("\n".join(lines), flush=True)
    print(f"[ab] wrote {out_dir / run}.md, .csv, .png (raw reports and logs in {work})",
          flush=True)
    failed = [f"{m}/{n}" for m, rs in results.items() for n, r in rs.items() if r is None]
    differing = [m for m, rs in results.items()
                 if len({r["tokens_sha256"] for r in rs.values() if r}) > 1]
    if failed or differing:
        print(f"[ab] FAILED layouts: {failed}; models whose layouts disagree: {differing}",
              flush=True)
        return 1
    return 0
