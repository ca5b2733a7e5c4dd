"""Which layout wins, before renting the GPUs: `python -m megatron_mxn.tools.plan --config X.yaml`.

Enumerates every layout of the cluster's GPUs that the model allows (TP x PP x DP, and grid
n x m x PP x DP with the exact, gather, seq and auto schedules and, for inference, each KV
cache: dims, positions, auto; the baseline TP=8 PP=2 is always shown), and predicts per
rank: weight, activation and KV-cache memory, bytes sent per layer on
intra-node and inter-node links (megatron_mxn.analysis.cost_model: exact for dense models, checked
against measurement), and the time of a step from a roofline per layer (matmul FLOP/s vs HBM
bandwidth) plus alpha-beta collectives, the pipeline's micro-batch slots per step and, for
training, the data-parallel gradient all-reduce. Markdown on stdout; `--out PREFIX`
also writes PREFIX.csv and PREFIX.png. `--kv-cache-sweep` instead compares the grid's two KV
caches with TP over context length x batch (decode bytes, KV memory, TPOT). `--kv-budget GIB`
instead gives the config's layouts the same KV-cache memory per GPU and predicts the largest
batch each holds at each of `--prompts` and what it delivers (megatron_mxn.analysis.budget); for
an MLA model (`multi-latent-attention`: configs/deepseek_v3.yaml, configs/kimi_k2.yaml) the
cache is the latent, TP keeps all of it on every GPU and the grid 1/(n*m) of it by position
(megatron_mxn.analysis.mla), and the table gives the decode step only (TPOT, no TTFT).

The predictions are megatron_mxn.analysis.planner's; this module writes them out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_mxn.accounting import format_bytes
from megatron_mxn.analysis import mla
from megatron_mxn.analysis.budget import BudgetRow, MlaBudgetRow, budget_rows, mla_budget_rows
from megatron_mxn.analysis.collective_prices import fit
from megatron_mxn.analysis.cost_model import Layout, ModelShape, check_layout
from megatron_mxn.analysis.planner import (
    BASELINE,
    CACHES,
    PRESETS,
    Cluster,
    Prediction,
    Workload,
    config_layouts,
    load_cluster,
    plan,
    predict,
)
from megatron_mxn.attention.schedules import AUTO
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.run_configs import load_config


def _mib(x: float) -> str:
    return format_bytes(x, smallest="MiB")


def why(rows: List[Prediction], work: Workload) -> str:
    """One line: the winner against the baseline (or the runner-up), by the deciding term."""
    if not rows or not rows[0].fits:
        return "No layout fits in the GPUs' memory (see the rows marked 'does not fit')."
    win = rows[0]
    other = next((r for r in rows if (r.baseline or r.named == "baseline")
                  and r is not win),
                 rows[1] if len(rows) > 1 else None)
    if other is None:
        return f"{win.layout} is the only layout that fits."
    unit = "decode step" if work.kind == "infer" else "iteration"
    ms = (lambda v: f"{v * 1e3:.3f} ms")
    deciding = max((("compute/HBM", win.compute_s, other.compute_s),
                    ("communication", win.comm_s, other.comm_s)),
                   key=lambda t: t[2] - t[1])
    speed = win.tokens_per_s / other.tokens_per_s
    return (f"{win.layout} wins ({speed:.2f}x the tokens/s of {other.layout}) mainly on "
            f"{deciding[0]}: per {unit} {ms(deciding[1])} against {ms(deciding[2])} "
            f"(compute/HBM {ms(win.compute_s)} vs {ms(other.compute_s)}, communication "
            f"{ms(win.comm_s)} vs {ms(other.comm_s)}, pipeline "
            f"{win.slots} vs {other.slots} micro-batch slots per {unit}); KV cache per rank "
            f"{_mib(win.kv_B)} vs {_mib(other.kv_B)}.")


def to_markdown(rows: List[Prediction], model_name: str, cluster: Cluster, work: Workload,
                top: int) -> str:
    shown = rows[:top] + [r for r in rows[top:] if r.baseline or r.named]
    if work.kind == "infer":
        what = (f"inference, batch {work.batch}, prompt {work.prompt}, {work.new_tokens} new "
                "tokens" + (f", prefill chunks of {work.prefill_chunk}" if work.prefill_chunk
                            else ""))
        cols = ["#", "layout", "auto picks", "weights/rank", "KV/rank", "act/rank",
                "decode B/layer intra", "decode B/layer inter", "TTFT ms", "TPOT ms",
                "tokens/s", "vs baseline"]
    else:
        what = f"training, global batch {work.batch}, seq {work.seq}, micro-batch {work.micro_batch}"
        cols = ["#", "layout", "auto picks", "weights/rank", "opt/rank", "act/rank",
                "B/layer intra", "B/layer inter", "step ms", "tokens/s", "vs baseline"]
    base = next((r for r in rows if r.baseline), None)
    if base is None:  # fewer than 16 GPUs: the config's baseline layout stands in
        base = next((r for r in rows if r.named == "baseline"), None)
    lines = [f"## {model_name} on {cluster.name} ({cluster.gpus} GPUs): {what}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in shown:
        vs = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
        tag = "baseline" if r.baseline else (f"config: {r.named}" if r.named else "")
        name = r.layout + (f" ({tag})" if tag else "") + (
            "" if r.fits else " (does not fit)")
        rank = "-" if r.rank is None else r.rank
        if work.kind == "infer":
            cells = [rank, name, r.picks, _mib(r.weights_B), _mib(r.kv_B),
                     _mib(r.act_B), _mib(r.intra_B), _mib(r.inter_B),
                     f"{r.ttft_s * 1e3:.2f}", f"{r.tpot_s * 1e3:.3f}",
                     f"{r.tokens_per_s:.0f}", vs]
        else:
            cells = [rank, name, r.picks, _mib(r.weights_B), _mib(r.opt_B),
                     _mib(r.act_B), _mib(r.intra_B), _mib(r.inter_B),
                     f"{r.step_s * 1e3:.1f}", f"{r.tokens_per_s:.0f}", vs]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", why(rows, work), "",
              f"{len(rows)} layouts fit in {0.9 * cluster.hbm_bytes / 2**30:.1f} GiB per GPU. "
              "Predicted, not measured: roofline per layer at "
              f"{cluster.efficiency:.0%} of peak, alpha-beta collectives, ring all-reduce."]
    return "\n".join(lines)


def sweep_layouts(model: ModelShape, cfg: dict, gpus: int,
                  grids: Optional[str] = None) -> List[Layout]:
    """The KV-cache sweep's columns: the baseline, TP over all GPUs, and each grid of `grids`
    ("4x2,4x4": n x m with the auto schedule, DP over the other GPUs) or else of the config
    (its schedule; auto when it names none), with the dims and with the positions cache."""
    out = [replace(BASELINE, dp=max(gpus // BASELINE.world, 1)), Layout(tp=gpus)]
    if grids:
        chosen = []
        for nm in grids.split(","):
            n, m = _ints(nm.replace("x", ","))
            chosen.append(Layout(tp=n * m, dp=max(gpus // (n * m), 1), dim_slices=m,
                                 schedule=AUTO))
    else:
        named = [x for xs in config_layouts(cfg, gpus).values() for x in xs if x.dim_slices > 1]
        chosen = [x for x in named if x.schedule == AUTO] or named[:1]
    out += [replace(x, kv_cache=kv) for x in chosen for kv in CACHES]
    unique = {x.name: x for x in out}
    for layout in unique.values():
        check_layout(model, layout)
    return list(unique.values())


def kv_cache_sweep(model: ModelShape, cluster: Cluster, layouts: List[Layout],
                   contexts: Sequence[int], batches: Sequence[int], new_tokens: int,
                   prefill_chunk: int = 0) -> str:
    """Where each KV cache wins: per context length (KV positions after the generation of
    `new_tokens`) the decode bytes per layer and step and the KV bytes per rank of one
    sequence per replica (both grow linearly with the batch), then the predicted TPOT per
    batch (split over the DP replicas)."""
    def row(layout: Layout, context: int, batch: int) -> Tuple[Prediction, float]:
        """(the prediction, decode bytes sent per layer and step over all micro-batches)"""
        batch = max(batch, layout.dp)  # (fewer sequences than replicas: one per busy replica)
        micro = min(layout.pp, batch // layout.dp)  # (and fewer micro-batches than PP)
        layout = replace(layout, micro_batches=micro)
        r = predict(model, layout, cluster, Workload(
            "infer", batch, context - new_tokens, new_tokens, prefill_chunk=prefill_chunk))
        return r, (r.intra_B + r.inter_B) * micro

    names = [x.name for x in layouts]
    head = ["| context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines = [f"Per sequence (batch 1): decode bytes sent per layer and step / KV cache per rank "
             f"({model.layers} layers; {new_tokens} new tokens)", "", *head]
    for c in contexts:
        cells = [row(x, c, 1) for x in layouts]
        lines.append(f"| {c // 1024}K | " + " | ".join(
            f"{_mib(sent)} / {_mib(r.kv_B)}" for r, sent in cells) + " |")
    chunks = f"prefill chunks of {prefill_chunk}" if prefill_chunk else "one prefill"
    lines += ["", f"Predicted TPOT ms (*: KV cache, weights and {chunks}'s activations do not "
              "fit)", "",
              head[0].replace("| context |", "| context | batch |") + " fastest |",
              "|" + "---|" * (len(names) + 3)]
    for c in contexts:
        for b in batches:
            cells = [row(x, c, b)[0] for x in layouts]
            fits = [r for r in cells if r.fits]
            best = min(fits, key=lambda r: r.tpot_s).layout if fits else "-"
            lines.append(f"| {c // 1024}K | {b} | " + " | ".join(
                f"{r.tpot_s * 1e3:.3f}" + ("" if r.fits else "*") for r in cells)
                + f" | {best} |")
    return "\n".join(lines)


def budget_markdown(rows: List[BudgetRow], model_name: str, cluster: Cluster, budget_gib: float,
                    new_tokens: int, prefill_chunk: int) -> str:
    """The --kv-budget table: per prompt length and layout, the batch reached and its
    predicted times; ratios against the config's `tp` layout at the same prompt."""
    chunks = f", prefill chunks of {prefill_chunk}" if prefill_chunk else ""
    cols = ["prompt", "layout", "KV/GPU per sequence", "batch reached", "KV/GPU", "memory/GPU",
            "TTFT ms", "TPOT ms", "decode tokens/s", "tokens/s", "batch vs tp",
            "decode tokens/s vs tp"]
    lines = [f"## {model_name} on {cluster.name} ({cluster.gpus} GPUs): the largest batch at "
             f"{budget_gib:g} GiB of KV cache per GPU, {new_tokens} new tokens{chunks}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ref = {r.prompt: r for r in rows if r.name == "tp"}
    for r in rows:
        p, base = r.prediction, ref.get(r.prompt)
        label = f"{r.layout} (config: {r.name})"
        if p is None:
            lines.append(f"| {r.prompt // 1024}K | {label} | {_mib(r.per_sequence_B)} | 0 | | | "
                         "| | | | | |")
            continue
        fits = "" if p.fits else " (does not fit)"
        vs = (lambda a, b: f"{a / b:.2f}x" if b else "-")
        lines.append("| " + " | ".join([
            f"{r.prompt // 1024}K", label, _mib(r.per_sequence_B), str(r.batch), _mib(r.kv_B),
            _mib(p.memory_B) + fits, f"{p.ttft_s * 1e3:.0f}", f"{p.tpot_s * 1e3:.2f}",
            f"{r.decode_tokens_per_s:.0f}", f"{p.tokens_per_s:.0f}",
            vs(r.batch, base.batch if base else 0),
            vs(r.decode_tokens_per_s, base.decode_tokens_per_s if base else 0)]) + " |")
    lines += ["", f"batch reached: the largest batch (over the DP replicas, a multiple of the "
              "micro-batches) whose KV cache per GPU fits the budget; decode tokens/s: batch / "
              "TPOT; tokens/s: batch x new tokens over the whole generation (prefill included). "
              "Predicted, not measured: roofline per layer at "
              f"{cluster.efficiency:.0%} of peak, alpha-beta collectives, ring all-reduce."]
    return "\n".join(lines)


def mla_layouts(model: mla.MlaModel, cfg: dict, gpus: int) -> Dict[str, mla.MlaServing]:
    """The MLA config's layouts that use exactly `gpus` GPUs (TP x PP, or a grid n x m, with
    no DP replicas: a config lists the layouts of several cluster sizes), each checked."""
    out = {}
    for name, flags in (cfg.get("layouts") or {}).items():
        layout = mla.serving_of(flags, gpus)
        if layout.tp * layout.pp == gpus:
            mla.check_serving(model, layout)
            out[name] = layout
    if not out:
        raise MxnConfigError(f"the config names no MLA layout of exactly {gpus} GPUs "
                             "(TP x PP or n x m)")
    return out


def mla_budget_markdown(rows: List[MlaBudgetRow], model: mla.MlaModel, model_name: str,
                        cluster: Cluster, budget_gib: float, new_tokens: int) -> str:
    """The --kv-budget table of an MLA model: per prompt length and layout, the latent cache
    per GPU, the batch reached, memory, the predicted TPOT, the attention's decode bytes, and
    ratios against plain TP over all the GPUs with its latent cache."""
    cols = ["prompt", "layout", "cache/GPU per sequence", "batch reached", "cache/GPU",
            "weights/GPU", "memory/GPU", "TPOT ms", "decode tokens/s",
            "attention sent/GPU per layer & step", "batch vs TP", "decode tokens/s vs TP"]
    lines = [f"## {model_name} (MLA) on {cluster.name} ({cluster.gpus} GPUs): the largest batch "
             f"at {budget_gib:g} GiB of cache per GPU, {new_tokens} new tokens", "",
             f"per token and layer the latent cache holds kv_lora_rank + qk_pos_emb_head_dim = "
             f"{model.kv_lora} + {model.rope_dim} elements ({model.elem_bytes} bytes each); "
             f"{model.layers} layers", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ref = {r.prompt: r for r in rows if not r.layout.grid and r.layout.cache == mla.LATENT
           and r.layout.pp == 1 and r.layout.tp == cluster.gpus}
    vs = (lambda a, b: f"{a / b:.2f}x" if b else "-")
    for r in rows:
        p, base = r.prediction, ref.get(r.prompt)
        label = f"{r.layout.name} (config: {r.name})"
        if p is None:
            lines.append(f"| {r.prompt // 1024}K | {label} | {_mib(r.per_sequence_B)} | 0 | | "
                         f"{_mib(mla.weight_bytes(model, r.layout))} | | | | | 0.00x | |")
            continue
        base_tps = base.prediction.decode_tokens_per_s if base and base.prediction else 0
        lines.append("| " + " | ".join([
            f"{r.prompt // 1024}K", label, _mib(r.per_sequence_B), str(p.batch), _mib(p.cache_B),
            _mib(p.weights_B), _mib(p.memory_B) + ("" if p.fits else " (does not fit)"),
            f"{p.tpot_s * 1e3:.2f}", f"{p.decode_tokens_per_s:.0f}",
            _mib(p.attention_sent_B), vs(p.batch, base.batch if base else 0),
            vs(p.decode_tokens_per_s, base_tps)]) + " |")
    lines += ["", "batch reached: the largest batch (a multiple of the PP micro-batches) whose "
              "cache per GPU after the new tokens fits the budget; TPOT: one decode step at the "
              "mean context (prompt + half the new tokens), the busiest pipeline stage; "
              "attention sent: bytes one GPU sends for one layer's attention in one decode step "
              "(megatron's down-projection all-gathers, the grid's query all-gather and "
              "partials all-to-all, linear_proj's all-reduce). memory/GPU: weights, cache and "
              f"decode buffers against 90% of {cluster.hbm_bytes / 1e9:.0f} GB (prefill "
              "activations not counted). Predicted, not measured: roofline per layer and part "
              f"at {cluster.efficiency:.0%} of peak, alpha-beta collectives, ring algorithms, "
              "uniform expert routing."]
    return "\n".join(lines)


def write_csv(path: str, rows: List[Prediction]) -> None:
    """One line per layout, a column per field (Prediction.as_row)."""
    table = [r.as_row() for r in rows]
    keys = sorted({k for r in table for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)


def write_png(path: str, rows: List[Prediction], title: str, top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:top] + [r for r in rows[top:] if r.baseline or r.named]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.5))
    colors = ["C3" if r.baseline else ("C0" if r.m == 1 else "C1") for r in shown]
    ax.barh([r.layout for r in shown][::-1], [r.tokens_per_s for r in shown][::-1],
            color=colors[::-1])
    ax.set_xlabel("predicted tokens/s (red: baseline, blue: TP, orange: grid)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise MxnConfigError(f"expected comma-separated integers, got {text!r}") from None


def with_measured_prices(cluster: Cluster, path: str) -> Cluster:
    """The cluster with its collectives priced by a collective_latency table measured on as
    many ranks as it has GPUs (the table's groups are the plan's group sizes)."""
    import json

    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as err:
        raise MxnConfigError(f"--collective-latency {path}: not a collective_latency JSON "
                             f"table ({err})") from None
    if table.get("world") != cluster.gpus:
        raise MxnConfigError(
            f"--collective-latency {path} was measured on {table.get('world')} ranks, but the "
            f"plan is for {cluster.gpus} GPUs: measure on the plan's GPUs (or set --gpus)")
    return replace(cluster, name=f"{cluster.name}; collectives at the latency measured in "
                                 f"{path}", prices=fit(table))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="model YAML (configs/)")
    p.add_argument("--cluster", default=None,
                   help=f"preset ({', '.join(PRESETS)}) or YAML file; default: the config's "
                        "cluster.preset")
    p.add_argument("--workload", choices=("infer", "train"), default="infer")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="assume prefill in chunks of this many tokens, as megatron-core's "
                        "dynamic inference engine does (megatron_mxn.inference.generate prefills the "
                        "whole prompt at once: the default)")
    p.add_argument("--gpus", type=int, default=None, help="override the cluster's GPU count")
    p.add_argument("--collective-latency", default=None, metavar="JSON",
                   help="price every collective with the table measured on the cluster itself "
                        "(python -m torch.distributed.run --nproc-per-node G -m "
                        "megatron_mxn.tools.collective_latency --output-json JSON, on the "
                        "plan's GPUs) instead of the preset's latency and bandwidth")
    p.add_argument("--top", type=int, default=12, help="rows shown (the baseline always)")
    p.add_argument("--out", default=None, help="also write OUT.csv and OUT.png")
    p.add_argument("--kv-cache-sweep", action="store_true",
                   help="instead: the baseline, TP and the config's grids with each KV cache "
                        "over --contexts x --batches (decode bytes, KV bytes, TPOT)")
    p.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072",
                   help="--kv-cache-sweep: KV positions after the generation (comma-separated)")
    p.add_argument("--batches", default="1,8,32", help="--kv-cache-sweep: batch sizes")
    p.add_argument("--kv-budget", type=float, default=None, metavar="GIB",
                   help="instead: every layout of the config gets GIB of KV cache per GPU; the "
                        "largest batch each holds at each of --prompts and its predicted "
                        "TTFT, TPOT and tokens/s")
    p.add_argument("--prompts", default=None,
                   help="--kv-budget: prompt lengths (comma-separated; default: the config's)")
    p.add_argument("--grids", default=None,
                   help="--kv-cache-sweep: grids n x m (e.g. 4x2,4x4); default: the config's")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    model = ModelShape.from_flags(cfg.get("model") or {})
    cluster = load_cluster(args.cluster or (cfg.get("cluster") or {}).get("preset",
                                                                          "h100-sxm-2x8"))
    if args.gpus:
        cluster = replace(cluster, gpus=args.gpus)
    if args.collective_latency:
        cluster = with_measured_prices(cluster, args.collective_latency)
    inf = cfg.get("inference") or {}
    tr = cfg.get("training") or {}
    work = Workload(
        kind=args.workload,
        batch=args.batch or int(inf.get("batch-size", 8) if args.workload == "infer"
                                else tr.get("global-batch-size", 8)),
        prompt=args.prompt or int(inf.get("prompt-length", 32)),
        new_tokens=args.new_tokens or int(inf.get("max-new-tokens", 16)),
        seq=args.seq or int((cfg.get("model") or {}).get("seq-length", 1024)),
        micro_batch=args.micro_batch, prefill_chunk=args.prefill_chunk)
    name = args.config.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if mla.is_mla(cfg.get("model") or {}):
        model = mla.MlaModel.from_flags(cfg["model"])
        if args.kv_budget is None or args.kv_cache_sweep:
            raise MxnConfigError("an MLA model (multi-latent-attention): the planner has the "
                                 "--kv-budget table only (the latent cache, batch and TPOT)")
        if args.kv_budget <= 0:
            raise MxnConfigError("--kv-budget must be > 0 (GiB of cache per GPU)")
        prompts = _ints(args.prompts) if args.prompts else [work.prompt]
        rows = mla_budget_rows(model, cluster, mla_layouts(model, cfg, cluster.gpus),
                               args.kv_budget * 2**30, prompts, work.new_tokens)
        print(mla_budget_markdown(rows, model, name, cluster, args.kv_budget, work.new_tokens))
        return 0
    if args.kv_budget is not None:
        if args.kv_budget <= 0:
            raise MxnConfigError("--kv-budget must be > 0 (GiB of KV cache per GPU)")
        prompts = _ints(args.prompts) if args.prompts else [work.prompt]
        layouts = {n: next((x for x in xs if x.schedule == AUTO), xs[0])
                   for n, xs in config_layouts(cfg, cluster.gpus).items()}
        for layout in layouts.values():
            check_layout(model, layout)
        print(budget_markdown(budget_rows(model, cluster, layouts, args.kv_budget * 2**30,
                                          prompts, work.new_tokens, args.prefill_chunk),
                              name, cluster, args.kv_budget, work.new_tokens,
                              args.prefill_chunk))
        return 0
    if args.kv_cache_sweep:
        print(f"## {name} on {cluster.name} ({cluster.gpus} GPUs): decode with each KV cache\n")
        print(kv_cache_sweep(model, cluster, sweep_layouts(model, cfg, cluster.gpus, args.grids),
                             _ints(args.contexts), _ints(args.batches), work.new_tokens,
                             args.prefill_chunk))
        return 0
    rows = plan(model, cluster, work, config_layouts(cfg, cluster.gpus))
    text = to_markdown(rows, name, cluster, work, args.top)
    print(text)
    if args.out:
        write_csv(args.out + ".csv", rows)
        write_png(args.out + ".png", rows, text.splitlines()[0][3:], args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
