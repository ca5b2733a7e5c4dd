"""The A/B at an equal KV-cache budget per rank (`ab_compare.py --kv-budget-mib X`).

A serving deployment sizes its batch by the memory left for the KV cache. A layout that keeps
less KV cache per rank (the grid: 1/(n*m) of it; TP beyond the KV heads replicates it) holds
more sequences in the same memory, so comparing layouts at one batch hides what the memory
buys. This mode gives every layout the same budget per rank: for each layout and prompt length
it runs the largest batch whose KV cache per rank (cost_model.kv_cache_bytes, equal to the
measured cache: tests/test_inference_cli.py) fits, and reports the batch reached, output
tokens/s and TPOT, in <run>.md, .csv and .png.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron_mxn.analysis.budget import largest_batch
from megatron_mxn.analysis.cost_model import Layout, ModelShape, kv_cache_bytes, resolve_kv_cache
from megatron_mxn.analysis.planner import config_layouts
from megatron_mxn.tools import ab_jobs as ab

MIB = 2 ** 20


def layout_for(cfg: dict, name: str, prompt: int, new_tokens: int) -> Tuple[Layout, int]:
    """(the cost model's Layout of config layout `name` with its KV cache resolved for this
    workload, its inference micro-batches)."""
    gpus = int((cfg.get("cluster") or {}).get("gpus") or 1)
    layout = config_layouts(cfg, gpus)[name][0]  # (the schedules share one KV cache size)
    micro = int((cfg.get("inference") or {}).get("inference-micro-batches") or 0) or layout.pp
    model = ModelShape.from_flags(cfg["model"])
    return resolve_kv_cache(model, layout, 1, prompt, new_tokens), micro


def plan_batches(cfg: dict, names: List[str], lengths: List[int], new_tokens: int,
                 budget_bytes: float) -> Dict[int, Dict[str, dict]]:
    """{prompt length: {layout: {batch, kv_bytes, per_sequence}}} before any job runs."""
    model = ModelShape.from_flags(cfg["model"])
    out: Dict[int, Dict[str, dict]] = {}
    for length in lengths:
        out[length] = {}
        for name in names:
            layout, micro = layout_for(cfg, name, length, new_tokens)
            context = length + new_tokens
            batch = largest_batch(model, layout, budget_bytes, context, micro)
            out[length][name] = dict(batch=batch, micro=micro, label=layout.name,
                                     per_sequence=kv_cache_bytes(model, layout, 1, context),
                                     kv_bytes=kv_cache_bytes(model, layout, batch, context))
    return out


def run_sweep(args, cfg: dict, cfg_path: str, model_dir: Path, ckpt: Path, launcher, run: str,
              out_dir: Path) -> int:
    """Run every layout at each prompt length with its largest batch; write the results."""
    new_tokens = int(ab._extra_value(args.generate_extra, "--max-new-tokens")
                     or (cfg.get("inference") or {}).get("max-new-tokens") or 16)
    lengths = args.prompt_lengths or [int((cfg.get("inference") or {}).get("prompt-length")
                                          or 32)]
    budget = args.kv_budget_mib * MIB
    planned = plan_batches(cfg, args.layouts, lengths, new_tokens, budget)
    results: Dict[int, Dict[str, dict]] = {}
    for length in lengths:
        results[length] = {}
        for name in args.layouts:
            row = results[length][name] = dict(planned[length][name], report=None, why=None)
            if row["batch"] == 0:
                row["why"] = (f"one micro-batch of {row['micro']} sequence(s) needs "
                              f"{ab._kib(row['per_sequence'] * row['micro'])} of KV cache per "
                              f"rank > the budget {args.kv_budget_mib:g} MiB")
            else:
                row["why"] = ab.too_large(cfg, name, length, args, batch=row["batch"])
            if row["why"]:
                print(f"[ab] SKIPPED prompt {length} / {name}: {row['why']}", flush=True)
                continue
            tag = f"-kv-p{length}"
            report_path = model_dir / f"{name}{tag}.json"
            report_path.unlink(missing_ok=True)
            cmd = launcher.command(["-m", "megatron_mxn.inference.generate", "--config",
                                    cfg_path, "--layout", name, "--load", str(ckpt),
                                    "--repeats", str(args.repeats), "--prompt-length",
                                    str(length), *args.generate_extra,
                                    "--batch-size", str(row["batch"]),
                                    "--output-json", str(report_path)])
            ok = ab.run_job(cmd, model_dir / f"{name}{tag}.log",
                            f"prompt {length} / {name}, batch {row['batch']}", args.timeout)
            row["report"] = (json.loads(report_path.read_text())
                             if ok and report_path.exists() else None)
            if row["report"] is None:
                row["why"] = "FAILED"
    command = (f"python scripts/ab_compare.py --config {cfg_path} --layouts "
               f"{','.join(args.layouts)} --repeats {args.repeats} --kv-budget-mib "
               f"{args.kv_budget_mib:g}"
               + (" --prompt-lengths " + ",".join(map(str, lengths)) if args.prompt_lengths
                  else "") + "".join(f" {a}" for a in args.generate_extra))
    lines = budget_table(run, command, args.kv_budget_mib, new_tokens, results)
    (out_dir / f"{run}.md").write_text("\n".join(lines))
    write_csv(out_dir / f"{run}.csv", results)
    write_chart(out_dir / f"{run}.png", results, args.kv_budget_mib)
    print("\n".join(lines), flush=True)
    print(f"[ab] wrote {out_dir / run}.md, .csv, .png (raw reports and logs in {model_dir})",
          flush=True)
    return 1 if any(r["why"] == "FAILED" for rows in results.values() for r in rows.values()) \
        else 0


def reload(cfg: dict, names: List[str], lengths: List[int], new_tokens: int,
           budget_mib: float, model_dir: Path) -> Dict[int, Dict[str, dict]]:
    """The results of an earlier sweep from its reports in `model_dir` (to rewrite its
    tables); a missing report reads as skipped."""
    planned = plan_batches(cfg, names, lengths, new_tokens, budget_mib * MIB)
    out: Dict[int, Dict[str, dict]] = {}
    for length in lengths:
        out[length] = {}
        for name in names:
            path = model_dir / f"{name}-kv-p{length}.json"
            report = json.loads(path.read_text()) if path.exists() else None
            out[length][name] = dict(planned[length][name], report=report,
                                     why=None if report else "no report")
    return out


def _values(report: dict) -> Dict[str, List[float]]:
    return ab.per_repeat_values(report)


def _cell(values: List[float], scale: float = 1.0) -> str:
    return (f"{statistics.median(values) * scale:.1f} [{min(values) * scale:.1f}-"
            f"{max(values) * scale:.1f}]")


def decode_tokens_per_s(row: dict) -> float:
    """Steady-state decode throughput: the batch over the median TPOT (output tokens/s also
    counts the prefill, which dominates a short generation)."""
    return row["batch"] / statistics.median(_values(row["report"])["tpot_median_s"])


def budget_table(run: str, command: str, budget_mib: float, new_tokens: int,
                 results: Dict[int, Dict[str, dict]]) -> List[str]:
    """Markdown: one table per prompt length, ratios against TP (the config's `tp`) and TP on
    the fused kernels (`tp_fused`) when they ran."""
    _kib = ab._kib
    lines = [f"# A/B {run}: equal KV-cache budget per rank", "", f"`{command}`", "",
             f"Every layout gets {budget_mib:g} MiB of KV cache per rank and runs the largest "
             "batch (a multiple of its micro-batches) whose cache fits (the cost model's "
             f"kv_cache_bytes for prompt + {new_tokens} new tokens). Output tokens/s: batch x "
             "new tokens over the whole generation (prefill included); decode tokens/s: batch / "
             "median TPOT. Cells: median [min-max] over the timed repeats.", ""]
    head = ["layout", "batch reached", "KV cache / rank", "output tokens/s", "decode tokens/s",
            "TPOT median (ms)", "TTFT (ms)", "batch vs TP=4", "output tokens/s vs TP=4",
            "decode tokens/s vs TP=4", "decode tokens/s vs TP=4 fused"]
    for length, rows in results.items():
        lines += [f"### prompt {length}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        ok = {n: r for n, r in rows.items() if r["report"] is not None}
        ref, fused = ok.get("tp"), ok.get("tp_fused")

        def vs(value: float, base: Optional[dict], of) -> str:
            return f"x{value / of(base):.2f}" if base else "n/a"

        def tps(r: dict) -> float:
            return statistics.median(_values(r["report"])["output_tokens_per_s"])

        for name, r in rows.items():
            label = r.get("label", name)
            if r["report"] is None:
                lines.append(f"| {label} | {r['batch']} | {_kib(r['kv_bytes'])} | "
                             f"{'FAILED' if r['why'] == 'FAILED' else 'skipped'} |"
                             + " |" * (len(head) - 4))
                continue
            v = _values(r["report"])
            decode = decode_tokens_per_s(r)
            lines.append("| " + " | ".join([
                r["report"]["layout"]["name"], str(r["batch"]),
                _kib(r["report"]["kv_cache_bytes_per_rank"]), _cell(v["output_tokens_per_s"]),
                f"{decode:.1f}", _cell(v["tpot_median_s"], 1e3), _cell(v["ttft_s"], 1e3),
                vs(r["batch"], ref, lambda b: b["batch"]), vs(tps(r), ref, tps),
                vs(decode, ref, decode_tokens_per_s),
                vs(decode, fused, decode_tokens_per_s)]) + " |")
        lines.append("")
        for name, r in rows.items():
            if r["why"] and r["why"] != "FAILED":
                lines.append(f"Skipped {r.get('label', name)}: {r['why']}.")
        lines.append("")
    return lines


def write_csv(path: Path, results: Dict[int, Dict[str, dict]]) -> None:
    """One row per prompt length, layout and metric (median, min, max over the repeats)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt_length", "layout", "metric", "median", "min", "max", "n"])
        for length, rows in results.items():
            for name, r in rows.items():
                label = r["report"]["layout"]["name"] if r["report"] else r.get("label", name)
                out.writerow([length, label, "batch", r["batch"], r["batch"], r["batch"], 1])
                if r["report"] is None:
                    out.writerow([length, label, "skipped" if r["why"] != "FAILED" else "failed",
                                  "", "", "", 0])
                    continue
                kv = r["report"]["kv_cache_bytes_per_rank"]
                out.writerow([length, label, "kv_cache_bytes_per_rank", kv, kv, kv, 1])
                for key, values in _values(r["report"]).items():
                    out.writerow([length, label, key, statistics.median(values), min(values),
                                  max(values), len(values)])
                decode = decode_tokens_per_s(r)
                out.writerow([length, label, "decode_tokens_per_s", decode, decode, decode, 1])


def write_chart(path: Path, results: Dict[int, Dict[str, dict]], budget_mib: float) -> None:
    """Batch reached, output tokens/s and decode tokens/s per layout, by prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for rows in results.values() for n in rows))
    panels = [("batch reached", lambda r: r["batch"]),
              ("output tokens/s (median)",
               lambda r: statistics.median(_values(r["report"])["output_tokens_per_s"])),
              ("decode tokens/s (batch / TPOT)", decode_tokens_per_s)]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        runs = [(x, r) for x, rows in enumerate(results.values())
                if (r := rows.get(name)) and r["report"] is not None]
        if not runs:
            continue
        label = runs[0][1]["report"]["layout"]["name"]
        xs = [x + (k - (len(names) - 1) / 2) * width for x, _ in runs]
        for ax, (_, value) in zip(axes, panels):
            ax.bar(xs, [value(r) for _, r in runs], width, color=f"C{k}", label=label)
    for ax, (title, _) in zip(axes, panels):
        ax.set_xticks(range(len(results)), [f"prompt {n}" for n in results])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"equal KV-cache budget: {budget_mib:g} MiB per rank", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_budget_args(args) -> Optional[str]:
    """The error of a --kv-budget-mib request that cannot run, or None."""
    if args.kv_budget_mib <= 0:
        return "--kv-budget-mib must be > 0"
    if len(args.config) > 1:
        return "--kv-budget-mib goes with a single --config"
    if "--batch-size" in {a.split("=")[0] for a in args.generate_extra}:
        return "--kv-budget-mib sets each layout's batch; drop --batch-size"
    return None
