"""What serving an MLA model (DeepSeek-V3, Kimi-K2) costs per GPU in decode: the latent cache,
the weights (MoE experts over EP), the bytes and time of one decode step, for megatron's TP with
its latent cache, TP x PP, megatron's static (non-absorbed) cache and the grid n x m with the
latent cache sharded by position over all n*m ranks (docs/planner.md, "MLA models").

MLA caches, per layer and token, one latent c of kv_lora_rank (L) elements and the shared RoPE
key of qk_pos_emb_head_dim (r): L + r elements, used by every head. Megatron's TP
(`--cache-mla-latents`, absorbed decode) cannot split it: every TP rank keeps the whole latent
cache and attends its h/tp heads to all s positions. The grid keeps the positions p with
p mod n*m = t on rank t (1/(n*m) of the cache) and attends all h heads to them, at the price of
one all-gather of the absorbed queries and one all-to-all of the fp32 partial outputs and their
log-sum-exps per layer and step, whose bytes do not depend on s. Megatron's static cache (no
absorption) keeps per rank the up-projected keys and values of its h/tp heads,
(a + r + v) elements per head and token.

Precision (the planner's convention for these configs): linear weights of the attention, the
dense MLPs and the experts in fp8 (1 byte, as DeepSeek-V3 and Kimi-K2 are released; the block
scales, 1/32768 of that, are left out) when the config sets `fp8-format`, else bf16; embeddings,
output layer, norms and routers in bf16; the latent cache and activations in bf16
(`elem_bytes`). The model is a roofline like planner.layer_time, but per part (weights, attention
core) and with the experts a micro-batch actually touches under uniform routing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

from megatron_mxn.accounting import CommRecord
from megatron_mxn.analysis.cost_model import Layout
from megatron_mxn.analysis.planner import Cluster, comm_time
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.grid.mla_layout import MlaLayout
from megatron_mxn.megatron_lm.run_configs import flag_keys

LATENT, POSITIONS, STATIC = "latent", "latent-by-position", "static"


def is_mla(flags: Dict[str, object]) -> bool:
    return bool(flag_keys(flags).get("multi-latent-attention"))


def _moe_layer_pattern(freq: object, layers: int) -> Tuple[bool, ...]:
    """Megatron's --moe-layer-freq: an int k (every k-th layer is MoE) or a list expression
    such as "([0]*3+[1]*58)" (1 = MoE)."""
    if isinstance(freq, int) or str(freq).strip().isdigit():
        k = int(freq)
        return tuple(i % k == 0 for i in range(layers))
    out: List[int] = []
    text = str(freq).replace(" ", "").strip("()")
    for part in text.split("+"):
        match = re.fullmatch(r"\[([0-9,]*)\](?:\*(\d+))?", part)
        if not match:
            raise MxnConfigError(f"moe-layer-freq {freq!r}: expected an int or a list "
                                 "expression like ([0]*3+[1]*58)")
        items = [int(x) for x in match.group(1).split(",") if x]
        out += items * int(match.group(2) or 1)
    if len(out) != layers:
        raise MxnConfigError(f"moe-layer-freq {freq!r} names {len(out)} layers, the model has "
                             f"{layers}")
    return tuple(bool(x) for x in out)


@dataclass(frozen=True)
class MlaModel:
    """The numbers of an MLA (MoE) GPT model the costs depend on (Megatron flag names)."""

    layers: int  # num-layers
    hidden: int  # hidden-size
    heads: int  # num-attention-heads (h)
    query_groups: int  # num-query-groups (h without group-query-attention)
    q_lora: int  # q-lora-rank (0: one linear_q_proj)
    kv_lora: int  # kv-lora-rank (L)
    qk_head_dim: int  # qk-head-dim (a)
    rope_dim: int  # qk-pos-emb-head-dim (r)
    v_head_dim: int  # v-head-dim (v)
    ffn: int  # ffn-hidden-size (the dense layers)
    vocab: int  # vocab-size (+1 with the NullTokenizer)
    moe_layers: Tuple[bool, ...]  # from moe-layer-freq
    experts: int = 0  # num-experts
    topk: int = 0  # moe-router-topk
    moe_ffn: int = 0  # moe-ffn-hidden-size
    shared_ffn: int = 0  # moe-shared-expert-intermediate-size
    weight_bytes: int = 2  # linear weights: 1 with fp8-format, else elem_bytes
    elem_bytes: int = 2  # latent cache, activations, embeddings, norms (bf16)
    vocab_divisible_by: int = 128  # make-vocab-size-divisible-by

    @classmethod
    def from_flags(cls, flags: Dict[str, object]) -> "MlaModel":
        f = flag_keys(flags)
        if not f.get("multi-latent-attention"):
            raise MxnConfigError("not an MLA model: the config does not set "
                                 "multi-latent-attention")
        if not f.get("swiglu") or not f.get("untie-embeddings-and-output-weights"):
            raise MxnConfigError("the MLA planner models SwiGLU MLPs and untied embeddings "
                                 "(swiglu, untie-embeddings-and-output-weights)")
        layers, heads = int(f["num-layers"]), int(f["num-attention-heads"])
        experts = int(f.get("num-experts") or 0)
        vocab = int(f.get("vocab-size") or 0)
        if f.get("tokenizer-type", "NullTokenizer") == "NullTokenizer":
            vocab += 1
        elem = 2 if (f.get("bf16") or f.get("fp16")) else 4
        return cls(
            layers=layers, hidden=int(f["hidden-size"]), heads=heads,
            query_groups=int(f["num-query-groups"]) if f.get("group-query-attention") else heads,
            q_lora=int(f.get("q-lora-rank") or 0), kv_lora=int(f.get("kv-lora-rank") or 32),
            qk_head_dim=int(f.get("qk-head-dim") or 128),
            rope_dim=int(f.get("qk-pos-emb-head-dim") or 64),
            v_head_dim=int(f.get("v-head-dim") or 128),
            ffn=int(f.get("ffn-hidden-size") or 4 * int(f["hidden-size"])), vocab=vocab,
            moe_layers=(_moe_layer_pattern(f.get("moe-layer-freq", 1), layers) if experts
                        else (False,) * layers),
            experts=experts, topk=int(f.get("moe-router-topk") or (2 if experts else 0)),
            moe_ffn=int(f.get("moe-ffn-hidden-size") or 0),
            shared_ffn=int(f.get("moe-shared-expert-intermediate-size") or 0),
            weight_bytes=1 if f.get("fp8-format") else elem, elem_bytes=elem,
            vocab_divisible_by=int(f.get("make-vocab-size-divisible-by") or 128))

    @property
    def latent(self) -> int:
        """Elements cached per token and layer: the latent (L) and the shared RoPE key (r)."""
        return self.kv_lora + self.rope_dim

    def padded_vocab(self, tp: int) -> int:
        unit = self.vocab_divisible_by * tp
        return -(-self.vocab // unit) * unit

    def attention_params(self) -> int:
        """Linear parameters of one MLA layer (all ranks together)."""
        h, a, r, v, d = self.heads, self.qk_head_dim, self.rope_dim, self.v_head_dim, self.hidden
        q = d * self.q_lora + self.q_lora * h * (a + r) if self.q_lora else d * h * (a + r)
        return q + d * self.latent + self.kv_lora * h * (a + v) + h * v * d

    def total_params(self) -> int:
        """Every parameter (for the docs' check against the published totals)."""
        d = self.hidden
        moe = sum(self.moe_layers)
        per_expert = 3 * d * self.moe_ffn
        mlp = ((self.layers - moe) * 3 * d * self.ffn
               + moe * (self.experts * per_expert + 3 * d * self.shared_ffn + self.experts * d))
        return self.layers * self.attention_params() + mlp + 2 * self.vocab * d


@dataclass(frozen=True)
class MlaServing:
    """One serving layout of an MLA model: TP (x PP x DP) with megatron's latent or static
    cache, or the grid n x m (TP = n*m) with the latent cache sharded by position."""

    tp: int
    pp: int = 1
    dp: int = 1
    grid: bool = False
    dim_slices: int = 1  # m (grid only)
    cache: str = LATENT  # latent | static (TP); latent-by-position (grid)

    @property
    def head_groups(self) -> int:
        return self.tp // self.dim_slices

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        pp = f" PP={self.pp}" if self.pp > 1 else ""
        dp = f" DP={self.dp}" if self.dp > 1 else ""
        if self.grid:
            return f"grid {self.head_groups}x{self.dim_slices}{pp}{dp} latent-by-position"
        return f"TP={self.tp}{pp}{dp} {self.cache}"


def serving_of(flags: Dict[str, object], gpus: int) -> MlaServing:
    """A config layout's flags as an MlaServing: the grid when it names --mxn-head-groups or
    --mxn-dim-slices (its cache by position; m = 1 is a grid too: the cache still splits over
    all n ranks), else TP with --cache-mla-latents (latent) or without (static)."""
    f = flag_keys(flags)
    m = int(f.get("mxn-dim-slices") or 1)
    grid = "mxn-head-groups" in f or "mxn-dim-slices" in f
    tp = int(f.get("tensor-model-parallel-size") or 0) or int(f.get("mxn-head-groups") or 1) * m
    pp = int(f.get("pipeline-model-parallel-size") or 1)
    if grid and str(f.get("mxn-kv-cache", "positions")) not in ("positions", "auto"):
        raise MxnConfigError(f"MLA on the grid keeps the latent cache by position: "
                             f"--mxn-kv-cache {f['mxn-kv-cache']} is not modelled (use positions)")
    if tp % m:
        raise MxnConfigError(f"TP ({tp}) must be divisible by the dim slices ({m})")
    cache = POSITIONS if grid else (LATENT if f.get("cache-mla-latents") else STATIC)
    return MlaServing(tp=tp, pp=pp, dp=max(gpus // (tp * pp), 1), grid=grid, dim_slices=m,
                      cache=cache)


def check_serving(model: MlaModel, layout: MlaServing) -> None:
    """The grid's MLA rules (grid/mla_layout.py and MxnMLASelfAttention), megatron's TP and
    expert rules, as errors naming the rule."""
    h, g, tp = model.heads, model.query_groups, layout.tp
    if layout.grid:
        MlaLayout(layout.head_groups, layout.dim_slices, h, model.qk_head_dim, model.rope_dim,
                  model.v_head_dim)
        if g >= tp and (h % tp or g % tp):
            raise MxnConfigError(
                f"MLA on the grid needs num_attention_heads ({h}) and num_query_groups ({g}) "
                f"divisible by n*m = {tp} (or num_query_groups < n*m)")
    elif h % tp:
        raise MxnConfigError(f"num_attention_heads ({h}) must be divisible by TP ({tp})")
    if layout.pp > model.layers:
        raise MxnConfigError(f"PP ({layout.pp}) exceeds num_layers ({model.layers})")
    for name, size in (("ffn_hidden_size", model.ffn), ("moe_shared_expert_intermediate_size",
                                                        model.shared_ffn)):
        if size % tp:
            raise MxnConfigError(f"{name} ({size}) must be divisible by TP ({tp})")
    if model.experts:
        ep, etp = expert_layout(model, layout)
        if model.moe_ffn % etp:
            raise MxnConfigError(f"moe_ffn_hidden_size ({model.moe_ffn}) must be divisible by "
                                 f"the expert TP ({etp})")


def expert_layout(model: MlaModel, layout: MlaServing) -> Tuple[int, int]:
    """(EP, expert TP) over the ranks of a stage, as planner._expert_layout: whole experts per
    rank while they last."""
    stage = layout.tp * layout.dp
    ep = math.gcd(model.experts, stage) if model.experts else 1
    return ep, stage // ep


def stage_layers(model: MlaModel, layout: MlaServing) -> List[range]:
    """The layers of each pipeline stage: the first stages take one more when PP does not
    divide num_layers (Megatron: --decoder-last-pipeline-num-layers)."""
    base, extra = divmod(model.layers, layout.pp)
    out, start = [], 0
    for s in range(layout.pp):
        size = base + (s < extra)
        out.append(range(start, start + size))
        start += size
    return out


def cache_per_layer(model: MlaModel, layout: MlaServing, batch: int, context: int) -> int:
    """Cache bytes of one layer on the busiest rank for `batch` sequences of `context`
    positions: the whole latent under TP; ceil(context / (n*m)) positions of it on the grid;
    the static cache's keys and values of h/tp heads."""
    e = model.elem_bytes
    if layout.grid:
        return batch * -(-context // layout.tp) * model.latent * e
    if layout.cache == STATIC:
        heads = model.heads // layout.tp
        return batch * context * heads * (model.qk_head_dim + model.rope_dim
                                          + model.v_head_dim) * e
    return batch * context * model.latent * e


def cache_bytes(model: MlaModel, layout: MlaServing, batch: int, context: int) -> int:
    """Cache bytes per GPU: its stage's layers (the largest stage)."""
    return cache_per_layer(model, layout, batch, context) * max(
        len(s) for s in stage_layers(model, layout))


def _layer_weights(model: MlaModel, layout: MlaServing, layer: int) -> Dict[str, float]:
    """Bytes of one layer's parameters on one rank, by part: attention (linears over TP, the
    latent norms replicated), mlp (dense: over TP; MoE: the shared expert over TP and the
    router) and experts (all of this rank's experts)."""
    tp, d, wb, e = layout.tp, model.hidden, model.weight_bytes, model.elem_bytes
    attention = model.attention_params() // tp * wb + (2 * d + model.q_lora + model.kv_lora) * e
    if not model.moe_layers[layer]:
        return {"attention": attention, "mlp": 3 * d * model.ffn // tp * wb, "experts": 0.0}
    ep, etp = expert_layout(model, layout)
    return {"attention": attention,
            "mlp": 3 * d * model.shared_ffn // tp * wb + model.experts * d * e,
            "experts": model.experts // ep * 3 * d * (model.moe_ffn // etp) * wb}


def weight_bytes(model: MlaModel, layout: MlaServing) -> int:
    """Parameter bytes of a rank of the largest stage: its layers, the embedding on the first
    stage, the final norm and the output layer on the last (bf16, over TP)."""
    out = []
    vocab = model.padded_vocab(layout.tp) * model.hidden // layout.tp * model.elem_bytes
    stages = stage_layers(model, layout)
    for s, layers in enumerate(stages):
        total = sum(sum(_layer_weights(model, layout, i).values()) for i in layers)
        total += vocab * ((s == 0) + (s == len(stages) - 1))
        out.append(total + model.hidden * model.elem_bytes * (s == len(stages) - 1))
    return int(max(out))


def _record(op: str, size: int, payload: float, group: str = "TP") -> CommRecord:
    return CommRecord(op, group, size, int(payload), True)


def attention_collectives(model: MlaModel, layout: MlaServing, mb: int) -> Counter:
    """The collectives of one layer's attention in one decode step of `mb` sequences, on every
    rank ({CommRecord: calls}; payload as accounting: the all-gather's output, the
    all-to-all's input): megatron's all-gathers of the q and kv down-projections' outputs
    (column-parallel), on the grid the all-gather of the absorbed queries and the all-to-all
    of the partial outputs with their log-sum-exps, and linear_proj's all-reduce."""
    out: Counter = Counter()
    tp, e = layout.tp, model.elem_bytes
    if tp == 1:
        return out
    if model.q_lora:
        out[_record("all_gather", tp, mb * model.q_lora * e)] += 1
    out[_record("all_gather", tp, mb * model.latent * e)] += 1
    if layout.grid:
        n, m, h, L = layout.head_groups, layout.dim_slices, model.heads, model.kv_lora
        # each rank: its h/n heads' absorbed query partial (L) and its r/m RoPE dims
        out[_record("all_gather", tp, tp * mb * (h // n) * (L + model.rope_dim // m) * e)] += 1
        # to each of the n*m ranks: head group i's partial outputs (L) and lse, fp32
        out[_record("all_to_all", tp, tp * mb * (h // n) * (L + 1) * 4)] += 1
    out[_record("all_reduce", tp, mb * model.hidden * e)] += 1
    return out


def mlp_collectives(model: MlaModel, layout: MlaServing, mb: int, moe: bool) -> Counter:
    """A dense MLP's all-reduce over TP; a MoE layer's token all-to-all over EP (dispatch and
    combine, uniform routing, as planner._moe_collectives) and its shared expert's all-reduce."""
    out: Counter = Counter()
    tp, e = layout.tp, model.elem_bytes
    if tp > 1:
        out[_record("all_reduce", tp, mb * model.hidden * e)] += 1
    if moe:
        ep, _ = expert_layout(model, layout)
        if ep > 1:
            out[_record("all_to_all", ep, mb * model.topk * model.hidden * e, "EP")] += 2
    return out


def decode_bytes_sent(model: MlaModel, layout: MlaServing, mb: int) -> float:
    """Bytes one rank sends for one layer's attention in one decode step (ring algorithms)."""
    return sum(r.sent_bytes * c for r, c in attention_collectives(model, layout, mb).items())


@dataclass(frozen=True)
class CoreCost:
    """One layer's attention core in one decode step on one rank: FLOPs and bytes read."""

    flops: float
    bytes: float


def core_cost(model: MlaModel, layout: MlaServing, mb: int, context: int) -> CoreCost:
    """Absorbed decode (latent caches): per head and position 2(L + r) FLOPs for the score and
    2L for the output, one read of each cached latent for all the rank's heads (FlashMLA-like),
    plus the absorption matmuls (q_nope x W_UK, x W_UV). Static cache: per head and position
    2(a + r) + 2v FLOPs and reads of its keys and values."""
    L, r, a, v, h = model.kv_lora, model.rope_dim, model.qk_head_dim, model.v_head_dim, model.heads
    if layout.cache == STATIC:
        heads = h // layout.tp
        return CoreCost(mb * context * heads * 2 * (a + r + v),
                        cache_per_layer(model, layout, mb, context))
    if layout.grid:
        positions, heads = -(-context // layout.tp), h  # all heads on its own positions
        absorb = 2 * mb * (h // layout.head_groups) * (a + v) // layout.dim_slices * L
    else:
        positions, heads = context, h // layout.tp
        absorb = 2 * mb * heads * (a + v) * L
    return CoreCost(mb * positions * heads * 2 * (2 * L + r) + absorb,
                    cache_per_layer(model, layout, mb, context))


def experts_touched(model: MlaModel, layout: MlaServing, tokens: int) -> float:
    """Expected share of a rank's experts that `tokens` tokens route to (uniform routing: each
    expert is picked by a token with probability topk / experts)."""
    if not model.experts:
        return 0.0
    return 1.0 - (1.0 - model.topk / model.experts) ** tokens


@dataclass(frozen=True)
class MlaPrediction:
    """One layout at one batch and context: memory per GPU and the decode step."""

    layout: str
    batch: int
    weights_B: int
    cache_B: int
    memory_B: float
    fits: bool
    tpot_s: float
    compute_s: float
    comm_s: float
    attention_sent_B: float  # per layer and decode step, all micro-batches

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.tpot_s if self.tpot_s else 0.0


def predict_decode(model: MlaModel, layout: MlaServing, cluster: Cluster, batch: int,
                   context: int) -> MlaPrediction:
    """Memory per GPU at `batch` sequences (over the DP replicas) of `context` positions and
    the predicted time of one decode step: per layer, roofline(weights) + roofline(attention
    core) + the layer overhead + the collectives (planner.comm_time's alpha-beta on each
    group's link); the pipeline's max(M, P) micro-batch slots, the busiest stage; the logits
    on the last stage."""
    check_serving(model, layout)
    micro = layout.pp
    per_replica = batch // layout.dp
    mb = max(per_replica // micro, 1)
    F = cluster.flops * cluster.efficiency
    hbm = cluster.hbm_bw * cluster.efficiency
    link = Layout(tp=layout.tp, pp=layout.pp, dp=layout.dp)  # (what comm_time's links need)
    core = core_cost(model, layout, mb, context)
    core_s = max(core.flops / F, core.bytes / hbm)
    ep, _ = expert_layout(model, layout)
    touched = experts_touched(model, layout, mb)
    stage_s, stage_compute, stage_comm = [], [], []
    stages = stage_layers(model, layout)
    for s, layers in enumerate(stages):
        compute = comm = 0.0
        for i in layers:
            w = _layer_weights(model, layout, i)
            read = w["attention"] + w["mlp"] + w["experts"] * touched
            # matmul FLOPs: 2 per parameter and token; the experts see topk/EP of the tokens
            params = (w["attention"] + w["mlp"]) / model.weight_bytes
            flops = 2 * mb * params + 2 * mb * model.topk / ep * (
                w["experts"] / model.weight_bytes / max(model.experts // ep, 1))
            compute += max(flops / F, read / hbm) + core_s + cluster.layer_overhead
            records = attention_collectives(model, layout, mb)
            records.update(mlp_collectives(model, layout, mb, model.moe_layers[i]))
            comm += comm_time(records, link, cluster).total_s
        outside: Counter = Counter()
        if s == 0 and layout.tp > 1:
            outside[_record("all_reduce", layout.tp, mb * model.hidden * model.elem_bytes)] += 1
        if s == len(stages) - 1:
            vocab = model.padded_vocab(layout.tp) // layout.tp
            compute += max(2 * mb * model.hidden * vocab / F,
                           model.hidden * vocab * model.elem_bytes / hbm)
            if layout.tp > 1:
                outside[_record("all_gather", layout.tp, mb * vocab * layout.tp * 4)] += 1
        if layout.pp > 1:
            outside[_record("send", 2, mb * model.hidden * model.elem_bytes, "PP")] += 1
        comm += comm_time(outside, link, cluster).total_s
        stage_s.append(compute + comm)
        stage_compute.append(compute)
        stage_comm.append(comm)
    slots = max(micro, layout.pp)
    busiest = max(range(len(stages)), key=lambda k: stage_s[k])
    weights = weight_bytes(model, layout)
    cache = cache_bytes(model, layout, per_replica, context)
    # decode activations: a few hidden-size buffers and the fp32 partials (prefill not counted)
    act = 8 * mb * model.hidden * model.elem_bytes + 4 * mb * model.heads * (model.kv_lora + 1)
    memory = weights + cache + act
    return MlaPrediction(
        layout=layout.name, batch=batch, weights_B=weights, cache_B=cache, memory_B=memory,
        fits=memory <= 0.9 * cluster.hbm_bytes, tpot_s=slots * stage_s[busiest],
        compute_s=slots * stage_compute[busiest], comm_s=slots * stage_comm[busiest],
        attention_sent_B=decode_bytes_sent(model, layout, mb) * micro)


def largest_batch(model: MlaModel, layout: MlaServing, budget_bytes: float, context: int) -> int:
    """The largest batch (over the DP replicas; per replica a multiple of the PP micro-batches)
    whose cache per GPU for `context` positions fits `budget_bytes`; 0 when none fits."""
    if budget_bytes <= 0 or context < 1:
        raise MxnConfigError("the cache budget and the context must be positive")
    per_sequence = cache_bytes(model, layout, 1, context)
    per_replica = int(budget_bytes // per_sequence) // layout.pp * layout.pp
    assert per_replica == 0 or cache_bytes(model, layout, per_replica, context) <= budget_bytes
    return per_replica * layout.dp
