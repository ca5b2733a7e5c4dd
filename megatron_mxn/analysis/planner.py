"""The planner's model: which layouts a cluster's GPUs allow and what each one costs per rank,
predicted (its tables, CSV, chart and CLI are the tool megatron_mxn.tools.plan's).

`candidate_layouts` enumerates TP x PP x DP and grid n x m x PP x DP with each schedule and,
for inference, each KV cache; `predict` prices one: weights, KV cache, activations and (in
training) optimizer state per rank; bytes per layer on intra- and inter-node links (the cost
model's collectives); and a step's time from a roofline per layer, alpha-beta collectives and
the pipeline's micro-batch slots. `plan` ranks them. The results are typed: `CommTime`
(collectives per link type), `LayerTime` (one layer and micro-batch), `PhaseTime` (a prefill or
decode step) and `Prediction` (one layout: a row of the plan; `as_row` for the CSV).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

import yaml

from megatron_mxn.accounting import CommRecord
from megatron_mxn.analysis.collective_prices import call_seconds
from megatron_mxn.megatron_lm.run_configs import flag_keys
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
    KVCache,
    Schedule,
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
    # measured per-call prices (analysis.collective_prices.fit of a collective_latency table):
    # when set, they price every collective instead of the latency and bandwidth above
    prices: Optional[dict] = field(default=None, compare=False, repr=False)


PRESETS = {
    # H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s dense FP16/BF16, NVLink 4 at
    # 900 GB/s bidirectional (450 GB/s per direction); one 400 Gb/s (50 GB/s) NIC per GPU.
    # NCCL latencies of a few microseconds inside a node and ~10-20 us across are typical.
    "h100-sxm-2x8": Cluster("2 x 8 H100 SXM, NVLink + 400 Gb/s IB", 16, 8, 450e9, 8e-6,
                            50e9, 20e-6, 3.35e12, 80e9, 989e12),
    # H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s, otherwise as the H100 (989 TFLOP/s dense
    # BF16, NVLink 4 at 450 GB/s per direction); one 400 Gb/s NIC per GPU. (The MLA configs:
    # DeepSeek-V3 / Kimi-K2 in fp8 need it; --gpus 8 is one node.)
    "h200-sxm-2x8": Cluster("2 x 8 H200 SXM, NVLink + 400 Gb/s IB", 16, 8, 450e9, 8e-6,
                            50e9, 20e-6, 4.8e12, 141e9, 989e12),
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


@dataclass(frozen=True)
class CommTime:
    """Time and bytes sent of some collectives, per link type (intra-node, inter-node)."""

    intra_s: float = 0.0
    inter_s: float = 0.0
    intra_B: float = 0.0
    inter_B: float = 0.0

    @property
    def total_s(self) -> float:
        return self.intra_s + self.inter_s


def comm_time(records: Dict[CommRecord, float], layout: Layout, cluster: Cluster) -> CommTime:
    """Alpha-beta time (a ring of G ranks takes G-1 latency steps per pass; or the cluster's
    measured prices) and bytes sent, per link type."""
    time = {"intra": 0.0, "inter": 0.0}
    sent = {"intra": 0.0, "inter": 0.0}
    for r, calls in records.items():
        link = link_of(r.group, layout, cluster)
        sent[link] += r.sent_bytes * calls
        if cluster.prices is not None and r.group_size > 1:  # measured on the machine
            time[link] += calls * call_seconds(r.op, r.group_size, r.payload_bytes,
                                               cluster.prices)
        else:
            bw = (cluster.intra_bw if link == "intra" else cluster.inter_bw) * cluster.efficiency
            alpha = cluster.intra_latency if link == "intra" else cluster.inter_latency
            steps = {"all_reduce": 2 * (r.group_size - 1), "send": 1}.get(r.op,
                                                                          r.group_size - 1)
            time[link] += calls * (steps * alpha + r.sent_bytes / bw)
    return CommTime(intra_s=time["intra"], inter_s=time["inter"], intra_B=sent["intra"],
                    inter_B=sent["inter"])


def _moe_collectives(model: ModelShape, layout: Layout, tokens: int) -> Dict[CommRecord, float]:
    """Uniform-routing estimate of the token all-to-all (dispatch + combine) over EP."""
    if not model.experts or layout.ep == 1:
        return {}
    payload = tokens * model.topk * model.hidden * model.elem_bytes
    return {CommRecord("all_to_all", "EP", layout.ep, payload): 2}


@dataclass(frozen=True)
class LayerTime:
    """One layer for one micro-batch: roofline compute/memory time, its collectives, and the
    schedule (or position-sharded KV cache) that runs its attention call."""

    compute_s: float
    comm: CommTime
    runner: Union[Schedule, KVCache]  # (decide_call's: the positions cache runs a decode call)

    @property
    def schedule(self) -> str:
        return self.runner.name


def layer_time(model: ModelShape, layout: Layout, cluster: Cluster, mb: int, sq: int,
               sk: int) -> LayerTime:
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
    return LayerTime(compute_s=compute, comm=comm_time(records, layout, cluster), runner=runner)


def _core_memory(model: ModelShape, layout: Layout, mb: int, sq: int, sk: int) -> int:
    """Activations of one attention core call per rank (Schedule.memory_bytes)."""
    shape = score_shape(model, layout, mb, sq, sk)
    schedule = decide_schedule(layout.schedule, shape) if layout.dim_slices > 1 else EXACT
    return schedule.memory_bytes(shape)


@dataclass(frozen=True)
class PhaseTime:
    """One inference step of a phase (a prefill chunk, or a decode step) over the pipeline:
    its micro-batch slots, each running every layer of a stage (`layer`) and the logits."""

    step_s: float
    compute_s: float
    comm_s: float
    slots: int
    layer: LayerTime


@dataclass
class Prediction:
    """One layout's predicted memory per rank and times: a row of the plan. Inference fills
    kv_cache (as resolved), ttft_s and tpot_s; training fills opt_B and step_s. The bytes per
    layer and comm_s/compute_s are of a decode step (inference) or an iteration (training).
    plan() sets rank, named (the config's layout name) and baseline."""

    layout: str  # Layout.name, as requested
    tp: int
    pp: int
    dp: int
    m: int
    schedule: str  # '-' without a grid
    kv_cache_requested: str  # '-' without a grid
    weights_B: int
    kv_B: int
    act_B: float
    tokens_per_s: float
    intra_B: float
    inter_B: float
    comm_s: float
    compute_s: float
    slots: int
    picks: str  # what `auto` chose, or '-'
    memory_B: float
    fits: bool
    kv_cache: Optional[str] = None
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    opt_B: Optional[float] = None
    step_s: Optional[float] = None
    rank: Union[int, str, None] = None  # 1 = best; '-' for a shown layout that does not fit
    named: Optional[str] = None
    baseline: bool = False

    def as_row(self) -> dict:
        """The row as the CSV writes it: the fields the workload and plan() set."""
        row = {k: v for k, v in asdict(self).items() if v is not None}
        if not self.baseline:
            del row["baseline"]
        return row


def predict(model: ModelShape, layout: Layout, cluster: Cluster, work: Workload) -> Prediction:
    """Memory per rank and predicted times of one layout (a KV cache `auto` as the run would
    resolve it for this workload)."""
    stages = range(layout.pp)
    weights = max(weight_bytes(model, layout, s) for s in stages)
    layers = model.layers // layout.pp
    micro = layout.micro_batches or layout.pp
    grid = layout.dim_slices > 1
    requested = layout.kv_cache if grid else "-"
    row = dict(layout=layout.name, tp=layout.tp, pp=layout.pp, dp=layout.dp, m=layout.dim_slices,
               schedule=layout.schedule if grid else "-", kv_cache_requested=requested,
               weights_B=weights)
    if work.kind == "infer":
        per_replica = work.batch // layout.dp
        mb = max(per_replica // micro, 1)
        layout = resolve_kv_cache(model, layout, mb, work.prompt, work.new_tokens)
        context = work.prompt + work.new_tokens
        kv = kv_cache_bytes(model, layout, per_replica, context)
        chunk = min(work.prefill_chunk or work.prompt, work.prompt)
        chunks = -(-work.prompt // chunk)
        # the attention core of one prefill chunk (score schedules: fp32 scores and
        # probabilities), plus a few hidden-size buffers
        act = (_core_memory(model, layout, mb, chunk, work.prompt)
               + 4 * mb * chunk * model.hidden * model.elem_bytes)
        phases: Dict[str, PhaseTime] = {}
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
            compute = times * slots * (layers * t.compute_s + logits)
            comm = times * slots * (layers * t.comm.total_s + outside.total_s / micro)
            phases[phase] = PhaseTime(step_s=compute + comm, compute_s=compute, comm_s=comm,
                                      slots=slots, layer=t)
        prefill, d = phases["prefill"], phases["decode"]
        total = prefill.step_s + (work.new_tokens - 1) * d.step_s
        picks = [f"{prefill.layer.schedule}/{d.layer.schedule}"] * (layout.schedule == AUTO)
        picks += [f"KV {layout.kv_cache}"] * (requested == AUTO)
        row.update(kv_cache=layout.kv_cache, kv_B=kv, act_B=act, ttft_s=prefill.step_s,
                   tpot_s=d.step_s, tokens_per_s=work.batch * work.new_tokens / total,
                   intra_B=d.layer.comm.intra_B, inter_B=d.layer.comm.inter_B, comm_s=d.comm_s,
                   compute_s=d.compute_s, slots=d.slots, picks=", ".join(picks) or "-")
        opt = 0
    else:
        layout = replace(layout, kv_cache=DIMS.name)  # (training keeps no KV cache)
        micro_batches = max(work.batch // (work.micro_batch * layout.dp), 1)
        t = layer_time(model, layout, cluster, work.micro_batch, work.seq, work.seq)
        params = weights / model.elem_bytes
        kv = 0
        heads = heads_per_rank(model, layout)
        # Korthikanti et al. 2022 (sbh(34 + 5as/h) per layer), with TP-split linears and the
        # grid's fp32 scores of h/n heads (the sequence-split core: its O(s) buffers instead)
        tokens = work.micro_batch * work.seq
        scores = (4 + model.elem_bytes + 1) * heads * work.seq * tokens
        if not t.runner.builds_scores:  # (a fused schedule: its own buffers)
            scores = _core_memory(model, layout, work.micro_batch, work.seq, work.seq)
        act = layers * (tokens * 34 * model.hidden // layout.tp + scores)
        opt = params * 16  # fp32 grads, master weights and two Adam moments
        per_micro = layers * 3 * t.compute_s + layers * 2 * t.comm.total_s
        dp_records = {}
        if layout.dp > 1:
            dp_records[CommRecord("all_reduce", "DP", layout.dp, int(params * 4))] = 1
        dp = comm_time(dp_records, layout, cluster)
        slots = micro_batches + layout.pp - 1
        step = slots * per_micro + dp.intra_s + dp.inter_s
        row.update(kv_B=kv, act_B=act, opt_B=opt, step_s=step,
                   tokens_per_s=work.batch * work.seq / step, intra_B=2 * t.comm.intra_B,
                   inter_B=2 * t.comm.inter_B, slots=slots,
                   comm_s=slots * layers * 2 * t.comm.total_s + dp.intra_s + dp.inter_s,
                   compute_s=slots * layers * 3 * t.compute_s,
                   picks=t.schedule if layout.schedule == AUTO else "-")
    memory = weights + kv + act + opt
    return Prediction(**row, memory_B=memory, fits=memory <= 0.9 * cluster.hbm_bytes)


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
         named: Optional[Dict[str, List[Layout]]] = None) -> List[Prediction]:
    """Every layout that fits, best first; the baseline and the `named` ones always (flagged
    when they do not fit)."""
    infer = work.kind == "infer"
    rows = [predict(model, layout, cluster, work) for layout in candidate_layouts(
        model, cluster.gpus, GRID_KV_CACHES if infer else (DIMS.name,))]
    for name, layouts in (named or {}).items():
        for layout in layouts:
            layout = layout if infer else replace(layout, kv_cache=DIMS.name)
            hit = [r for r in rows if r.layout == layout.name]
            if not hit:
                check_layout(model, layout)
                hit = [predict(model, layout, cluster, work)]
                rows += hit
            for r in hit:
                r.named = name
    key = (lambda r: -r.tokens_per_s)
    ranked = sorted([r for r in rows if r.fits], key=key)
    for k, r in enumerate(ranked, 1):
        r.rank = k
    for r in rows:
        if (r.tp, r.pp, r.m, r.dp) == (BASELINE.tp, BASELINE.pp, 1, cluster.gpus // 16):
            r.baseline = True
        if (r.baseline or r.named) and not r.fits:
            r.rank = "-"
            ranked.append(r)
    return ranked
