"""The A/B: the same checkpoint and prompts under the baseline, the grid and the strongest 1-D
layout; identical tokens checked; medians and spread of every metric; .md, .csv and .png.

    python scripts/ab_compare.py --config configs/cpu_dense.yaml --config configs/cpu_moe.yaml

Each config names its layouts (`baseline`, `grid`, `tp`). Without `--load`, a checkpoint is
made first by a short pretraining run (the config's `training` section) under the baseline
layout; every layout then loads it. Each layout runs as one `megatron_mxn.inference.generate` job (one
untimed warm-up generation, then `--repeats` timed ones), launched with torchrun on this machine
or, with `--launcher srun` inside an sbatch allocation, one torchrun per node. The raw JSON of
every job is kept under `<results-dir>/<run>/`; a failed layout is reported, not lost.

`--prompt-lengths 2048,4096,8192` sweeps the context: every layout runs at each prompt length
(one job each, the same seeded random prompts for every layout), one table per length, and
`<run>-context.png` plots median TPOT and the bytes each group sends per layer and decode step
against the prompt length. A point whose megatron-core prefill would build s x s attention
scores too large for `--memory-budget-gib` over all ranks is skipped with a message.

`--kv-budget-mib X` gives every layout the same KV-cache budget per rank and runs the largest
batch each can hold (megatron_mxn/tools/kv_budget.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from megatron_mxn.analysis.collective_prices import fit
from megatron_mxn.megatron_lm.run_configs import flag_keys, load_config
from megatron_mxn.tools.ab_jobs import (  # noqa: F401 (prefill_score_bytes: tests, docs)
    Launcher,
    _calls,
    _extra_value,
    _kib,
    make_checkpoint,
    measure_collective_latency,
    memory_budget_bytes,
    per_repeat_values,
    prefill_score_bytes,
    run_job,
    spread,
    too_large,
)

# (key in a generate report's per-repeat entry, column title, scale, unit, better)
METRICS = [
    ("output_tokens_per_s", "output tokens/s", 1.0, "", "higher"),
    ("total_tokens_per_s", "total tokens/s", 1.0, "", "higher"),
    ("tpot_median_s", "TPOT median", 1e3, "ms", "lower"),
    ("tpot_p90_s", "TPOT p90", 1e3, "ms", "lower"),
    ("ttft_s", "TTFT", 1e3, "ms", "lower"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # (no abbreviations: a pass-through --prompt-length must not be read as --prompt-lengths)
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
    p.add_argument("--prompt-lengths", default=None, type=prompt_lengths,
                   help="comma-separated prompt lengths (e.g. 2048,4096,8192): run every layout "
                        "at each (default: the config's inference prompt-length)")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="CPU (gloo) configs: skip a layout and prompt length whose megatron-core "
                        "prefill scores (s x s per head, over the node's ranks) exceed this "
                        "(default: half the memory available when the job starts)")
    p.add_argument("--kv-budget-mib", type=float, default=None,
                   help="equal KV-cache budget per rank (MiB): each layout runs the largest "
                        "batch whose KV cache per rank fits it, at each prompt length "
                        "(megatron_mxn/tools/kv_budget.py); reports the batch reached, output "
                        "tokens/s and TPOT")
    p.add_argument("--no-collective-latency", dest="collective_latency", action="store_false",
                   help="skip the collective-latency job (megatron_mxn/tools/"
                        "collective_latency.py) and the column that prices each layout's "
                        "decode-step collectives with it (the --kv-budget-mib mode does "
                        "not run it)")
    args, generate_extra = p.parse_known_args(argv)
    if args.load and len(args.config) > 1:
        p.error("--load goes with a single --config")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    clash = {"--prompt-length", "--prompts-file"} & {a.split("=")[0] for a in generate_extra}
    if args.prompt_lengths and clash:
        p.error(f"--prompt-lengths sets the prompts; drop {sorted(clash)}")
    args.generate_extra = generate_extra  # e.g. --max-new-tokens 8, passed to every layout
    args.layouts = [x for x in args.layouts.split(",") if x]
    if args.kv_budget_mib is not None:
        from megatron_mxn.tools.kv_budget import check_budget_args

        error = check_budget_args(args)
        if error:
            p.error(error)
    return args


def prompt_lengths(text: str) -> List[int]:
    """'2048,4096,8192' -> [2048, 4096, 8192]: positive, distinct, ascending."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of whole numbers (e.g. 2048,4096,8192)")
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': prompt lengths must be >= 1")
    if lengths != sorted(set(lengths)):
        raise argparse.ArgumentTypeError(f"'{text}': give distinct lengths in ascending order")
    return lengths


def comm_time(report: dict) -> str:
    from megatron_mxn.inference.benchmark import comm_time  # (imports torch: not at start-up)

    return comm_time(report)


def cpu_time(report: dict) -> str:
    from megatron_mxn.inference.benchmark import cpu_time  # (imports torch: not at start-up)

    return cpu_time(report)


def model_table(model: str, reports: Dict[str, Optional[dict]],
                skipped: Optional[Dict[str, str]] = None) -> List[str]:
    """Markdown lines for one model (and prompt length): the layouts' metrics, identical
    tokens, ratios; the skipped layouts and why."""
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
        "collectives / layer / decode step", "in collectives / decode step",
        "CPU time / decode step (all ranks)",
        "collectives at measured latency / decode step / rank", "tokens = baseline"]
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
        same = ("n/a" if base_hash is None
                else "yes" if r["tokens_sha256"] == base_hash else "NO")
        lines.append(f"| {r['layout']['name']} | " + " | ".join(
            cells + [_kib(r["kv_cache_bytes_per_rank"]), _kib(r["peak_memory_bytes_per_rank"]),
                     comm, _calls(r["comm_collectives_per_layer_per_decode_step"]),
                     comm_time(r), cpu_time(r), _priced(r), same]) + " |")
    lines.append("")
    for name, why in (skipped or {}).items():
        lines.append(f"Skipped {name}: {why}.")
    lines.append(f"All layouts {'run ' if skipped else ''}generated identical tokens: "
                 f"{'yes' if len(hashes) == 1 and len(ok) == len(reports) else 'NO'}.")
    for other in ("baseline", "tp", "tp_fused"):
        if "grid" in ok and other in ok:
            g, o = per_repeat_values(ok["grid"]), per_repeat_values(ok[other])
            parts = [f"{title} x{statistics.median(g[k]) / statistics.median(o[k]):.2f}"
                     for k, title, _, _, _ in METRICS[:3]]
            kv = ok["grid"]["kv_cache_bytes_per_rank"] / ok[other]["kv_cache_bytes_per_rank"]
            parts.append(f"KV cache x{kv:.2f}")
            if PRICED in ok["grid"] and PRICED in ok[other]:
                parts.append("collectives at measured latency "
                             f"x{ok['grid'][PRICED] / ok[other][PRICED]:.2f}")
            lines.append(f"grid / {other}: " + ", ".join(parts) + ".")
    return lines + [""]


# a report's decode step priced by the run's collective-latency job (added by main())
PRICED = "collective_seconds_per_decode_step_at_measured_latency"


def _priced(report: dict) -> str:
    return f"{1e3 * report[PRICED]:.1f} ms" if PRICED in report else "n/a"


def latency_section(model: str, table: Optional[dict]) -> List[str]:
    """The measured latency table behind the priced column (nothing when its job was skipped
    or failed: the column then says n/a)."""
    if table is None:
        return []
    from megatron_mxn.tools.collective_latency import markdown

    return ([f"### Collective latency ({model}'s ranks)", "",
            "What each layout's decode-step collectives cost at these prices is the column "
            "'collectives at measured latency': the part of a rank's decode step that the "
            "transport alone sets on this machine (a pipeline stage's rank, for PP: a token "
            "crosses every stage; megatron_mxn/tools/collective_latency.py).", ""]
            + markdown(table) + [""])


def write_csv(path: Path, results: Dict[str, Dict[str, Optional[dict]]],
              skipped: Optional[Dict[str, Dict[str, str]]] = None) -> None:
    """One row per model, layout and metric (median, min, max over the repeats)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", "layout", "prompt_length", "metric", "median", "min", "max", "n"])
        for model, reports in results.items():
            for name in (skipped or {}).get(model, {}):
                out.writerow([model, name, "", "skipped", "", "", "", 0])
            for name, r in reports.items():
                if r is None:
                    out.writerow([model, name, "", "failed", "", "", "", 0])
                    continue
                row = [model, r["layout"]["name"], r["workload"]["prompt_length"]]
                for key, values in per_repeat_values(r).items():
                    s = spread(values)
                    out.writerow(row + [key, s["median"], s["min"], s["max"], s["n"]])
                for key in ("kv_cache_bytes_per_rank", "peak_memory_bytes_per_rank"):
                    out.writerow(row + [key, r[key], r[key], r[key], 1])
                for group, v in r["comm_bytes_per_layer_per_decode_step"].items():
                    out.writerow(row + [f"sent_bytes_per_layer_step_{group}", v, v, v, 1])
                for group, v in r["comm_collectives_per_layer_per_decode_step"].items():
                    out.writerow(row + [f"collectives_per_layer_step_{group}", v, v, v, 1])
                if PRICED in r:
                    out.writerow(row + [PRICED, r[PRICED], r[PRICED], r[PRICED], 1])
                out.writerow(row + ["tokens_sha256", r["tokens_sha256"], "", "", 1])


def write_chart(path: Path, results: Dict[str, Dict[str, Optional[dict]]]) -> None:
    """Output tokens/s and TPOT per layout (bars: median, whiskers: min-max), one group per
    model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = sum(r is not None for reports in results.values() for r in reports.values())
    fig, axes = plt.subplots(1, 2, figsize=(max(11.0, 0.5 * bars), 4))
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


def write_context_chart(path: Path, sweeps: Dict[str, Dict[int, Dict[str, Optional[dict]]]]
                        ) -> None:
    """Against the prompt length, one line per layout: median TPOT (left) and the bytes each
    group sends per layer and decode step (right; solid TP, dashed dim-slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tpot, sent) = plt.subplots(1, 2, figsize=(11, 4))
    for model, by_length in sweeps.items():
        names = list(dict.fromkeys(n for reports in by_length.values() for n in reports))
        for k, name in enumerate(names):
            runs = [(length, reports[name]) for length, reports in by_length.items()
                    if reports.get(name)]
            if not runs:
                continue
            label = runs[0][1]["layout"]["name"] + (f" ({model})" if len(sweeps) > 1 else "")
            x = [length for length, _ in runs]
            tpot.plot(x, [statistics.median(per_repeat_values(r)["tpot_median_s"]) * 1e3
                          for _, r in runs], "o-", color=f"C{k}", label=label)
            groups = sorted({g for _, r in runs for g in r["comm_bytes_per_layer_per_decode_step"]})
            for group in groups:
                sent.plot(x, [r["comm_bytes_per_layer_per_decode_step"].get(group, 0)
                              for _, r in runs], "o--" if group == "dim-slice" else "o-",
                          color=f"C{k}", label=f"{label}: {group}")
    tpot.set_title("median TPOT, ms (lower is better)")
    sent.set_title("sent / layer / decode step / rank, bytes")
    sent.set_yscale("log")
    lengths = sorted({n for by_length in sweeps.values() for n in by_length})
    for ax in (tpot, sent):
        ax.set_xlabel("prompt length (tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_lengths(cfg: dict, cfg_path: str, lengths: List[int], extra: List[str]) -> None:
    """Every prompt length plus the new tokens fits the model's positions (before any job)."""
    model = flag_keys(cfg.get("model"))
    new = int(_extra_value(extra, "--max-new-tokens")
              or (cfg.get("inference") or {}).get("max-new-tokens") or 16)
    limit = int(model.get("max-position-embeddings") or model.get("seq-length") or 0)
    too_long = [n for n in lengths if limit and n + new > limit]
    if too_long:
        raise SystemExit(f"{cfg_path}: prompt length(s) {too_long} + {new} new tokens exceed "
                         f"max-position-embeddings ({limit})")


def main(argv=None) -> int:
    args = parse_args(argv)
    stems = [Path(c).stem for c in args.config]
    run = args.run or "ab-" + "+".join(stems)
    out_dir = Path(args.results_dir)
    work = out_dir / run
    results: Dict[str, Dict[str, Optional[dict]]] = {}
    skipped: Dict[str, Dict[str, str]] = {}
    sweeps: Dict[str, Dict[int, Dict[str, Optional[dict]]]] = {}
    latency: Dict[str, Optional[dict]] = {}  # {model: the collective-latency table}
    for cfg_path, model in zip(args.config, stems):
        cfg = load_config(cfg_path)
        missing = [name for name in args.layouts if name not in (cfg.get("layouts") or {})]
        if missing:
            raise SystemExit(f"{cfg_path}: no layout(s) {missing}; it has "
                             f"{sorted(cfg.get('layouts') or {})}")
        if args.prompt_lengths:
            check_lengths(cfg, cfg_path, args.prompt_lengths, args.generate_extra)
        cluster = cfg.get("cluster") or {}
        nproc = args.nproc_per_node or int(cluster.get("gpus_per_node", 1))
        nnodes = args.nnodes or max(1, int(cluster.get("gpus", nproc)) // nproc)
        launcher = Launcher(args.launcher, nnodes, nproc)
        model_dir = work / model
        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Path(args.load) if args.load else make_checkpoint(cfg_path, model_dir, launcher,
                                                                 args.timeout)
        latency[model] = (measure_collective_latency(model_dir, launcher, args.timeout)
                          if args.collective_latency and args.kv_budget_mib is None else None)
        prices = None if latency[model] is None else fit(latency[model])
        if args.kv_budget_mib is not None:
            from megatron_mxn.tools.kv_budget import run_sweep

            return run_sweep(args, cfg, cfg_path, model_dir, ckpt, launcher, run, out_dir)
        for length in args.prompt_lengths or [None]:
            key = model if length is None else f"{model}, prompt {length}"
            tag = "" if length is None else f"-p{length}"
            results[key], skipped[key] = {}, {}
            if length is not None:
                sweeps.setdefault(model, {})[length] = results[key]
            for name in args.layouts:
                why = too_large(cfg, name, length, args) if length else None
                if why:
                    print(f"[ab] SKIPPED {key} / {name}: {why}", flush=True)
                    skipped[key][name] = why
                    continue
                report_path = model_dir / f"{name}{tag}.json"
                report_path.unlink(missing_ok=True)
                prompt = [] if length is None else ["--prompt-length", str(length)]
                cmd = launcher.command(["-m", "megatron_mxn.inference.generate", "--config",
                                        cfg_path, "--layout", name, "--load", str(ckpt),
                                        "--repeats", str(args.repeats), *prompt,
                                        "--output-json", str(report_path), *args.generate_extra])
                ok = run_job(cmd, model_dir / f"{name}{tag}.log", f"{key} / {name}",
                             args.timeout)
                results[key][name] = (json.loads(report_path.read_text())
                                      if ok and report_path.exists() else None)
                if results[key][name] is not None and prices is not None:
                    from megatron_mxn.tools.collective_latency import decode_step_seconds

                    results[key][name][PRICED] = decode_step_seconds(results[key][name], prices)
    sweep = ("" if not args.prompt_lengths
             else " --prompt-lengths " + ",".join(map(str, args.prompt_lengths)))
    lines = [f"# A/B {run}", "", f"`python scripts/ab_compare.py "
             + " ".join(f"--config {c}" for c in args.config)
             + f" --layouts {','.join(args.layouts)} --repeats {args.repeats}{sweep}"
             + "".join(f" {a}" for a in args.generate_extra) + "`", ""]
    for key, reports in results.items():
        lines += model_table(key, reports, skipped[key])
    for model, table in latency.items():
        lines += latency_section(model, table)
    (out_dir / f"{run}.md").write_text("\n".join(lines))
    write_csv(out_dir / f"{run}.csv", results, skipped)
    write_chart(out_dir / f"{run}.png", results)
    written = ".md, .csv, .png"
    if sweeps:
        write_context_chart(out_dir / f"{run}-context.png", sweeps)
        written += f" and {run}-context.png"
    print("\n".join(lines), flush=True)
    print(f"[ab] wrote {out_dir / run}{written} (raw reports and logs in {work})", flush=True)
    failed = [f"{m}/{n}" for m, rs in results.items() for n, r in rs.items() if r is None]
    differing = [m for m, rs in results.items()
                 if len({r["tokens_sha256"] for r in rs.values() if r}) > 1]
    if failed or differing:
        print(f"[ab] FAILED layouts: {failed}; models whose layouts disagree: {differing}",
              flush=True)
        return 1
    return 0
