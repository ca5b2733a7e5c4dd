"""Which layout wins, before renting the GPUs: `python -m megatron_mxn.analysis.plan --config X.yaml`.

Enumerates every layout of the cluster's GPUs that the model allows (TP x PP x DP, and grid
n x m x PP x DP with the exact, gather, seq and auto schedules and, for inference, each KV
cache: dims, positions, auto; the baseline TP=8 PP=2 is always shown), and predicts per
rank: weight, activation and KV-cache memory, bytes sent per layer on
intra-node and inter-node links (megatron_mxn.analysis.cost_model: exact for dense models, checked
against measurement), and the time of a step from a roofline per layer (matmul FLOP/s vs HBM
bandwidth) plus alpha-beta collectives, the pipeline's micro-batch slots per step and, for
training, the data-parallel gradient all-reduce. Markdown on stdout; `--out PREFIX`
also writes PREFIX.csv and PREFIX.png. `--kv-cache-sweep` instead compares the grid's two KV
caches with TP over context length x batch (decode bytes, KV memory, TPOT).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import yaml

from megatron_mxn.analysis.accounting import CommRecord, format_bytes
from megatron_mxn.megatron_lm.run_configs import flag_keys, load_config
from megatron_mxn.analysis.cost_model import (
    Layout,
    ModelShape,
    check_layout,
    heads_per_rank,
    kv_cache_bytes,
    kv_heads_per_rank,
    layer_collectives,
    layer_weight_bytes,
    resolve_kv_cache,
    score_shape,
    step_collectives,
    weight_bytes,
)
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.attention.schedules import (
    AUTO,
    DIMS,
    EXACT,
    EXACT_SCHEDULES,
    KV_CACHES,
    decide_call,
    decide_schedule,
)


@dataclass(frozen=True)
class Cluster:
    """Per-GPU numbers; bandwidths are per direction, as a ring collective uses them."""

    name: str
    gpus: int
    gpus_per_node: int
    intra_bw: float  # B/s, one GPU's NVLink (or loopback) bandwidth
    intra_latency: float  # s per collective inside a node
    inter_bw: float  # B/s, one GPU's share of the inter-node network
    inter_latency: float  # s per collective across nodes
    hbm_bw: float  # B/s
    hbm_bytes: float  # capacity
    flops: float  # dense matmul FLOP/s at the model's precision
    efficiency: float = 0.6  # fraction of peak FLOP/s, HBM and link bandwidth reached
    layer_overhead: float = 30e-6  # s per layer and micro-batch: kernel launches, framework


PRESETS = {
    # H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s dense FP16/BF16, NVLink 4 at
    # 900 GB/s bidirectional (450 GB/s per direction); one 400 Gb/s (50 GB/s) NIC per GPU.
    # NCCL latencies of a few microseconds inside a node and ~10-20 us across are typical.
    "h100-sxm-2x8": Cluster("2 x 8 H100 SXM, NVLink + 400 Gb/s IB", 16, 8, 450e9, 8e-6,
                            50e9, 20e-6, 3.35e12, 80e9, 989e12),
    # This kind of CI machine: 2 cores shared by 4 gloo ranks over loopback (fp32).
    # (python and megatron overhead per layer dominate small models on CPU).
    "cpu-gloo": Cluster("4 gloo ranks on 2 CPU cores", 4, 4, 1.0e9, 1.5e-3, 1.0e9, 1.5e-3,
                        8e9, 6e9, 8e9, efficiency=1.0, layer_overhead=4e-3),
}


def load_cluster(name_or_path: str) -> Cluster:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    try:
        with open(name_or_path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise MxnConfigError(f"--cluster {name_or_path!r}: neither a preset "
                             f"({sorted(PRESETS)}) nor a YAML file") from None
    if "preset" in data:
        return replace(PRESETS[data.pop("preset")], **data)
    return Cluster(**{"name": name_or_path, **data})


@dataclass(frozen=True)
class Workload:
    kind: str  # infer | train
    batch: int  # infer: sequences; train: global batch
    prompt: int = 0  # infer
    new_tokens: int = 0  # infer
    seq: int = 0  # train
    micro_batch: int = 1  # train
    prefill_chunk: int = 0  # infer: prefill in chunks of this many tokens (0: all at once)


def divisors(x: int) -> List[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


GRID_SCHEDULES = EXACT_SCHEDULES  # the planner's choices for a grid: exact, gather, seq, auto
CACHES = tuple(kv for kv in KV_CACHES if kv != AUTO)  # the built-in KV caches: dims, positions
GRID_KV_CACHES = CACHES + (AUTO,)  # ... and for a grid's inference


def candidate_layouts(model: ModelShape, gpus: int,
                      kv_caches: Sequence[str] = (DIMS.name,)) -> List[Layout]:
    """Every TP x PP x DP and grid n x m x PP x DP (each schedule and KV cache of
    `kv_caches`) the rules allow."""
    out = []
    for pp in divisors(gpus):
        if model.layers % pp:
            continue
        for tp in divisors(gpus // pp):
            dp = gpus // (pp * tp)
            expert = _expert_layout(model, tp * dp)
            for m in divisors(tp):
                grid = [(sc, kv) for sc in GRID_SCHEDULES for kv in kv_caches]
                for schedule, kv in ([(EXACT.name, DIMS.name)] if m == 1 else grid):
                    layout = Layout(tp=tp, pp=pp, dp=dp, dim_slices=m, schedule=schedule,
                                    kv_cache=kv, **expert)
                    try:
                        check_layout(model, layout)
                    except MxnConfigError:
                        continue
                    out.append(layout)
    return out


def _expert_layout(model: ModelShape, stage_ranks: int) -> dict:
    """Whole experts per rank while they last (EP), then split experts (expert TP)."""
    if not model.experts:
        return {}
    ep = math.gcd(model.experts, stage_ranks)
    return {"ep": ep, "etp": stage_ranks // ep}


def link_of(group: str, layout: Layout, cluster: Cluster) -> str:
    """'intra' or 'inter': ranks are numbered TP-fastest, then DP, then PP (Megatron's order)."""
    stage = layout.tp * layout.dp
    span = {"TP": layout.tp, "dim-slice": layout.dim_slices, "head-group": layout.tp, "KV-share": layout.tp,
            "EP": stage, "DP": stage,
            "PP": 2 * stage}[group]  # PP: neighbouring stages, on one node when both fit
    return "intra" if span <= cluster.gpus_per_node else "inter"


def comm_time(records: Dict[CommRecord, float], layout: Layout, cluster: Cluster) -> dict:
    """Alpha-beta time (a ring of G ranks takes G-1 latency steps per pass) and bytes sent,
    per link type."""
    out = {"intra_s": 0.0, "inter_s": 0.0, "intra_B": 0.0, "inter_B": 0.0}
    for r, calls in records.items():
        link = link_of(r.group, layout, cluster)
        bw = (cluster.intra_bw if link == "intra" else cluster.inter_bw) * cluster.efficiency
        alpha = cluster.intra_latency if link == "intra" else cluster.inter_latency
        steps = {"all_reduce": 2 * (r.group_size - 1), "send": 1}.get(r.op, r.group_size - 1)
        out[f"{link}_B"] += r.sent_bytes * calls
        out[f"{link}_s"] += calls * (steps * alpha + r.sent_bytes / bw)
    return out


def _moe_collectives(model: ModelShape, layout: Layout, tokens: int) -> Dict[CommRecord, float]:
    """Uniform-routing estimate of the token all-to-all (dispatch + combine) over EP."""
    if not model.experts or layout.ep == 1:
        return {}
    payload = tokens * model.topk * model.hidden * model.elem_bytes
    return {CommRecord("all_to_all", "EP", layout.ep, payload): 2}


def layer_time(model: ModelShape, layout: Layout, cluster: Cluster, mb: int, sq: int,
               sk: int) -> dict:
    """Roofline compute/memory time plus collectives of one layer for one micro-batch. The
    positions cache's calls after a prefill read 1/m of the positions with all d dims: the
    same FLOPs and KV bytes as the dims cache's d/m dims of all, 1/m of the scores."""
    m, e = layout.dim_slices, model.elem_bytes
    kvh = kv_heads_per_rank(model, layout)
    d_local = model.head_dim // m
    shape = score_shape(model, layout, mb, sq, sk)
    # the schedule, or the position-sharded cache, that runs the call (m = 1: megatron's own
    # attention, which computes the scores as `exact` does)
    runner = decide_call(layout.schedule, layout.kv_cache, shape) if m > 1 else EXACT
    layer_w = layer_weight_bytes(model, layout)
    active = layer_w
    if model.experts:  # only topk of the experts work per token
        active = layer_w * min(1.0, model.topk / model.experts * layout.ep)
    flops = 2 * mb * sq * active / e + runner.flops(shape)
    hbm = active + 2 * mb * sk * kvh * d_local * e + runner.score_bytes(shape)
    compute = max(flops / (cluster.flops * cluster.efficiency),
                  hbm / (cluster.hbm_bw * cluster.efficiency)) + cluster.layer_overhead
    records = dict(layer_collectives(model, layout, mb, sq, sk))
    records.update(_moe_collectives(model, layout, mb * sq))
    comm = comm_time(records, layout, cluster)
    return {"compute_s": compute, **comm, "schedule": runner.name, "runner": runner}


def _core_memory(model: ModelShape, layout: Layout, mb: int, sq: int, sk: int) -> int:
    """Activations of one attention core call per rank (Schedule.memory_bytes)."""
    shape = score_shape(model, layout, mb, sq, sk)
    schedule = decide_schedule(layout.schedule, shape) if layout.dim_slices > 1 else EXACT
    return schedule.memory_bytes(shape)


def predict(model: ModelShape, layout: Layout, cluster: Cluster, work: Workload) -> dict:
    """Memory per rank and predicted times of one layout (a KV cache `auto` as the run would
    resolve it for this workload)."""
    stages = range(layout.pp)
    weights = max(weight_bytes(model, layout, s) for s in stages)
    layers = model.layers // layout.pp
    micro = layout.micro_batches or layout.pp
    grid = layout.dim_slices > 1
    row = {"layout": layout.name, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
           "m": layout.dim_slices, "schedule": layout.schedule if grid else "-",
           "kv_cache_requested": layout.kv_cache if grid else "-", "weights_B": weights}
    if work.kind == "infer":
        per_replica = work.batch // layout.dp
        mb = max(per_replica // micro, 1)
        layout = resolve_kv_cache(model, layout, mb, work.prompt, work.new_tokens)
        row["kv_cache"] = layout.kv_cache
        context = work.prompt + work.new_tokens
        row["kv_B"] = kv_cache_bytes(model, layout, per_replica, context)
        heads = heads_per_rank(model, layout)
        chunk = min(work.prefill_chunk or work.prompt, work.prompt)
        chunks = -(-work.prompt // chunk)
        # the attention core of one prefill chunk (score schedules: fp32 scores and
        # probabilities), plus a few hidden-size buffers
        row["act_B"] = (_core_memory(model, layout, mb, chunk, work.prompt)
                        + 4 * mb * chunk * model.hidden * model.elem_bytes)
        phases = {}
        for phase, sq, sk, times in (("prefill", chunk, (work.prompt + chunk) // 2, chunks),
                                     ("decode", 1, work.prompt + work.new_tokens // 2, 1)):
            t = layer_time(model, layout, cluster, mb, sq, sk)
            outside = comm_time(_outside(model, layout, per_replica, sq), layout, cluster)
            vocab = model.padded_vocab(layout.tp) / layout.tp
            logits = max(2 * mb * sq * model.hidden * vocab / (cluster.flops * cluster.efficiency),
                         model.hidden * vocab * model.elem_bytes / (cluster.hbm_bw
                                                                    * cluster.efficiency))
            # Micro-batch slots per step: the prefill fills the pipeline (M + P - 1); in decode
            # the stages work on different micro-batches at once (max(M, P) per step).
            slots = micro + layout.pp - 1 if phase == "prefill" else max(micro, layout.pp)
            compute = times * slots * (layers * t["compute_s"] + logits)
            comm = times * slots * (layers * (t["intra_s"] + t["inter_s"])
                                    + (outside["intra_s"] + outside["inter_s"]) / micro)
            phases[phase] = {"step_s": compute + comm, "step_compute_s": compute,
                             "step_comm_s": comm, "slots": slots, **t}
        row["ttft_s"] = phases["prefill"]["step_s"]
        row["tpot_s"] = phases["decode"]["step_s"]
        total = row["ttft_s"] + (work.new_tokens - 1) * row["tpot_s"]
        row["tokens_per_s"] = work.batch * work.new_tokens / total
        d = phases["decode"]
        picks = [f"{phases['prefill']['schedule']}/{d['schedule']}"] * (layout.schedule == AUTO)
        picks += [f"KV {layout.kv_cache}"] * (row["kv_cache_requested"] == AUTO)
        row.update(intra_B=d["intra_B"], inter_B=d["inter_B"], comm_s=d["step_comm_s"],
                   compute_s=d["step_compute_s"], slots=d["slots"],
                   picks=", ".join(picks) or "-")
    else:
        layout = replace(layout, kv_cache=DIMS.name)  # (training keeps no KV cache)
        micro_batches = max(work.batch // (work.micro_batch * layout.dp), 1)
        t = layer_time(model, layout, cluster, work.micro_batch, work.seq, work.seq)
        params = weights / model.elem_bytes
        row["kv_B"] = 0
        heads = heads_per_rank(model, layout)
        # Korthikanti et al. 2022 (sbh(34 + 5as/h) per layer), with TP-split linears and the
        # grid's fp32 scores of h/n heads (the sequence-split core: its O(s) buffers instead)
        tokens = work.micro_batch * work.seq
        scores = (4 + model.elem_bytes + 1) * heads * work.seq * tokens
        if not t["runner"].builds_scores:  # (a fused schedule: its own buffers)
            scores = _core_memory(model, layout, work.micro_batch, work.seq, work.seq)
        row["act_B"] = layers * (tokens * 34 * model.hidden // layout.tp + scores)
        row["opt_B"] = params * 16  # fp32 grads, master weights and two Adam moments
        per_micro = layers * 3 * (t["compute_s"]) + layers * 2 * (t["intra_s"] + t["inter_s"])
        dp_records = {}
        if layout.dp > 1:
            dp_records[CommRecord("all_reduce", "DP", layout.dp, int(params * 4))] = 1
        dp = comm_time(dp_records, layout, cluster)
        slots = micro_batches + layout.pp - 1
        row["step_s"] = slots * per_micro + dp["intra_s"] + dp["inter_s"]
        row["tokens_per_s"] = work.batch * work.seq / row["step_s"]
        row.update(intra_B=2 * t["intra_B"], inter_B=2 * t["inter_B"], slots=slots,
                   comm_s=slots * layers * 2 * (t["intra_s"] + t["inter_s"]) + dp["intra_s"]
                   + dp["inter_s"], compute_s=slots * layers * 3 * t["compute_s"],
                   picks=t["schedule"] if layout.schedule == AUTO else "-")
    row["memory_B"] = row["weights_B"] + row["kv_B"] + row["act_B"] + row.get("opt_B", 0)
    row["fits"] = row["memory_B"] <= 0.9 * cluster.hbm_bytes
    return row


def _outside(model: ModelShape, layout: Layout, batch: int, sq: int) -> Dict[CommRecord, float]:
    """Embedding, logits and pipeline traffic of a step (the busiest stage's view)."""
    counts = {}
    step = 0 if sq > 1 else 1  # a prefill of sq tokens, or a decode step
    for stage in {0, layout.pp - 1}:
        for r, c in step_collectives(model, layout, batch, sq, step, 2, stage).items():
            if not r.inside:
                counts[r] = max(counts.get(r, 0), c)
    return counts


BASELINE = Layout(tp=8, pp=2)


def config_layouts(cfg: dict, gpus: int) -> Dict[str, List[Layout]]:
    """The layouts a config names (a grid without --mxn-attention: each schedule), with their
    --mxn-kv-cache (default auto, as megatron_mxn.inference.generate's)."""
    out = {}
    for name, flags in (cfg.get("layouts") or {}).items():
        f = flag_keys(flags)
        m = int(f.get("mxn-dim-slices") or 1)
        tp = int(f.get("tensor-model-parallel-size") or 0) or int(
            f.get("mxn-head-groups") or 1) * m
        pp = int(f.get("pipeline-model-parallel-size") or 1)
        schedules = [f["mxn-attention"]] if "mxn-attention" in f else (
            list(GRID_SCHEDULES) if m > 1 else [EXACT.name])
        out[name] = [Layout(tp=tp, pp=pp, dp=max(gpus // (tp * pp), 1), dim_slices=m,
                            schedule=sc, kv_cache=str(f.get("mxn-kv-cache", AUTO)))
                     for sc in schedules]
    return out


def plan(model: ModelShape, cluster: Cluster, work: Workload,
         named: Optional[Dict[str, List[Layout]]] = None) -> List[dict]:
    """Every layout that fits, best first; the baseline and the `named` ones always (flagged
    when they do not fit)."""
    infer = work.kind == "infer"
    rows = [predict(model, layout, cluster, work) for layout in candidate_layouts(
        model, cluster.gpus, GRID_KV_CACHES if infer else (DIMS.name,))]
    for name, layouts in (named or {}).items():
        for layout in layouts:
            layout = layout if infer else replace(layout, kv_cache=DIMS.name)
            hit = [r for r in rows if r["layout"] == layout.name]
            if not hit:
                check_layout(model, layout)
                hit = [predict(model, layout, cluster, work)]
                rows += hit
            for r in hit:
                r["named"] = name
    key = (lambda r: -r["tokens_per_s"])
    ranked = sorted([r for r in rows if r["fits"]], key=key)
    for k, r in enumerate(ranked, 1):
        r["rank"] = k
    for r in rows:
        if (r["tp"], r["pp"], r["m"], r["dp"]) == (BASELINE.tp, BASELINE.pp, 1,
                                                  cluster.gpus // 16):
            r["baseline"] = True
        if (r.get("baseline") or r.get("named")) and not r["fits"]:
            r["rank"] = "-"
            ranked.append(r)
    return ranked


def _mib(x: float) -> str:
    return format_bytes(x, smallest="MiB")


def why(rows: List[dict], work: Workload) -> str:
    """One line: the winner against the baseline (or the runner-up), by the deciding term."""
    if not rows or not rows[0]["fits"]:
        return "No layout fits in the GPUs' memory (see the rows marked 'does not fit')."
    win = rows[0]
    other = next((r for r in rows if (r.get("baseline") or r.get("named") == "baseline")
                  and r is not win),
                 rows[1] if len(rows) > 1 else None)
    if other is None:
        return f"{win['layout']} is the only layout that fits."
    unit = "decode step" if work.kind == "infer" else "iteration"
    ms = (lambda v: f"{v * 1e3:.3f} ms")
    deciding = max((("compute/HBM", win["compute_s"], other["compute_s"]),
                    ("communication", win["comm_s"], other["comm_s"])),
                   key=lambda t: t[2] - t[1])
    speed = win["tokens_per_s"] / other["tokens_per_s"]
    return (f"{win['layout']} wins ({speed:.2f}x the tokens/s of {other['layout']}) mainly on "
            f"{deciding[0]}: per {unit} {ms(deciding[1])} against {ms(deciding[2])} "
            f"(compute/HBM {ms(win['compute_s'])} vs {ms(other['compute_s'])}, communication "
            f"{ms(win['comm_s'])} vs {ms(other['comm_s'])}, pipeline "
            f"{win['slots']} vs {other['slots']} micro-batch slots per {unit}); KV cache per rank "
            f"{_mib(win['kv_B'])} vs {_mib(other['kv_B'])}.")


def to_markdown(rows: List[dict], model_name: str, cluster: Cluster, work: Workload,
                top: int) -> str:
    shown = rows[:top] + [r for r in rows[top:] if r.get("baseline") or r.get("named")]
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
    base = next((r for r in rows if r.get("baseline")), None)
    if base is None:  # fewer than 16 GPUs: the config's baseline layout stands in
        base = next((r for r in rows if r.get("named") == "baseline"), None)
    lines = [f"## {model_name} on {cluster.name} ({cluster.gpus} GPUs): {what}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in shown:
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        tag = "baseline" if r.get("baseline") else (f"config: {r['named']}" if r.get("named")
                                                     else "")
        name = r["layout"] + (f" ({tag})" if tag else "") + (
            "" if r["fits"] else " (does not fit)")
        picks = r["picks"]
        if work.kind == "infer":
            cells = [r.get("rank", "-"), name, picks, _mib(r["weights_B"]), _mib(r["kv_B"]),
                     _mib(r["act_B"]), _mib(r["intra_B"]), _mib(r["inter_B"]),
                     f"{r['ttft_s'] * 1e3:.2f}", f"{r['tpot_s'] * 1e3:.3f}",
                     f"{r['tokens_per_s']:.0f}", vs]
        else:
            cells = [r.get("rank", "-"), name, picks, _mib(r["weights_B"]), _mib(r["opt_B"]),
                     _mib(r["act_B"]), _mib(r["intra_B"]), _mib(r["inter_B"]),
                     f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", vs]
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
    def row(layout: Layout, context: int, batch: int) -> dict:
        batch = max(batch, layout.dp)  # (fewer sequences than replicas: one per busy replica)
        micro = min(layout.pp, batch // layout.dp)  # (and fewer micro-batches than PP)
        layout = replace(layout, micro_batches=micro)
        r = predict(model, layout, cluster, Workload(
            "infer", batch, context - new_tokens, new_tokens, prefill_chunk=prefill_chunk))
        return {**r, "sent_B": (r["intra_B"] + r["inter_B"]) * micro}

    names = [x.name for x in layouts]
    head = ["| context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines = [f"Per sequence (batch 1): decode bytes sent per layer and step / KV cache per rank "
             f"({model.layers} layers; {new_tokens} new tokens)", "", *head]
    for c in contexts:
        cells = [row(x, c, 1) for x in layouts]
        lines.append(f"| {c // 1024}K | " + " | ".join(
            f"{_mib(r['sent_B'])} / {_mib(r['kv_B'])}" for r in cells) + " |")
    chunks = f"prefill chunks of {prefill_chunk}" if prefill_chunk else "one prefill"
    lines += ["", f"Predicted TPOT ms (*: KV cache, weights and {chunks}'s activations do not "
              "fit)", "",
              head[0].replace("| context |", "| context | batch |") + " fastest |",
              "|" + "---|" * (len(names) + 3)]
    for c in contexts:
        for b in batches:
            cells = [row(x, c, b) for x in layouts]
            fits = [r for r in cells if r["fits"]]
            best = min(fits, key=lambda r: r["tpot_s"])["layout"] if fits else "-"
            lines.append(f"| {c // 1024}K | {b} | " + " | ".join(
                f"{r['tpot_s'] * 1e3:.3f}" + ("" if r["fits"] else "*") for r in cells)
                + f" | {best} |")
    return "\n".join(lines)


def write_csv(path: str, rows: List[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_png(path: str, rows: List[dict], title: str, top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:top] + [r for r in rows[top:] if r.get("baseline") or r.get("named")]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.5))
    colors = ["C3" if r.get("baseline") else ("C0" if r["m"] == 1 else "C1") for r in shown]
    ax.barh([r["layout"] for r in shown][::-1], [r["tokens_per_s"] for r in shown][::-1],
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
    p.add_argument("--top", type=int, default=12, help="rows shown (the baseline always)")
    p.add_argument("--out", default=None, help="also write OUT.csv and OUT.png")
    p.add_argument("--kv-cache-sweep", action="store_true",
                   help="instead: the baseline, TP and the config's grids with each KV cache "
                        "over --contexts x --batches (decode bytes, KV bytes, TPOT)")
    p.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072",
                   help="--kv-cache-sweep: KV positions after the generation (comma-separated)")
    p.add_argument("--batches", default="1,8,32", help="--kv-cache-sweep: batch sizes")
    p.add_argument("--grids", default=None,
                   help="--kv-cache-sweep: grids n x m (e.g. 4x2,4x4); default: the config's")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    model = ModelShape.from_flags(cfg.get("model") or {})
    cluster = load_cluster(args.cluster or (cfg.get("cluster") or {}).get("preset",
                                                                          "h100-sxm-2x8"))
    if args.gpus:
        cluster = replace(cluster, gpus=args.gpus)
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
