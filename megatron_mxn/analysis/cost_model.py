"""What a layout costs per rank: every collective of a generation step, weights, KV cache.

The collectives are those megatron_mxn.inference.generation.generate issues with megatron-core's local
layers (dense MLP) and the grid attention, in megatron_mxn.accounting's convention (op, group,
payload = the all-reduce tensor / all-gather output / sent tensor, calls), so that predictions
and measurements compare exactly (tests/test_cost_model.py, scripts/validate_cost_model.py).
MoE token traffic depends on the routing and is estimated for uniform routing by the planner.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Dict, Optional

from megatron_mxn.accounting import CommRecord
from megatron_mxn.grid.layout import GridLayout, MxnConfigError
from megatron_mxn.grid.mla_layout import MlaLayout
from megatron_mxn.megatron_lm.run_configs import flag_keys
from megatron_mxn.attention.schedules import (
    AUTO,
    DIMS,
    KV_CACHES,
    KVCache,
    ScoreShape,
    decide_kv_cache,
    decide_schedule,
    get_kv_cache,
)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a GPT model that costs depend on (Megatron flag names in comments)."""

    layers: int  # num-layers
    hidden: int  # hidden-size
    heads: int  # num-attention-heads
    kv_heads: int  # num-query-groups (= heads without GQA)
    head_dim: int  # kv-channels
    ffn: int  # ffn-hidden-size
    vocab: int  # vocabulary before Megatron's padding (NullTokenizer: vocab-size + 1)
    swiglu: bool = False
    experts: int = 0  # num-experts
    topk: int = 0  # moe-router-topk
    moe_ffn: int = 0  # moe-ffn-hidden-size
    qk_norm: Optional[str] = None  # LayerNorm | RMSNorm when qk-layernorm
    elem_bytes: int = 2  # fp16/bf16: 2, fp32: 4
    untied: bool = True  # untie-embeddings-and-output-weights
    vocab_divisible_by: int = 128  # make-vocab-size-divisible-by
    normalization: str = "LayerNorm"  # normalization (LayerNorm has a bias, RMSNorm not)
    bias: bool = True  # linear biases (Megatron's default; --disable-bias-linear: False)
    learned_positions: int = 0  # max-position-embeddings with learned_absolute positions
    # multi-latent attention (multi-latent-attention; megatron.training's flag defaults)
    mla: bool = False
    kv_lora_rank: int = 0  # kv-lora-rank
    qk_head_dim: int = 0  # qk-head-dim (a)
    qk_pos_emb_head_dim: int = 0  # qk-pos-emb-head-dim (r)
    v_head_dim: int = 0  # v-head-dim

    @classmethod
    def from_flags(cls, flags: Dict[str, object]) -> "ModelShape":
        """From a config's `model` section (Megatron flag names, as in configs/*.yaml)."""
        f = flag_keys(flags)
        heads, hidden = int(f["num-attention-heads"]), int(f["hidden-size"])
        vocab = int(f.get("vocab-size") or 0)
        if f.get("tokenizer-type", "NullTokenizer") == "NullTokenizer":
            vocab += 1  # Megatron's NullTokenizer adds the EOD token
        experts = int(f.get("num-experts") or 0)
        ffn = int(f.get("ffn-hidden-size") or 4 * hidden)
        return cls(
            layers=int(f["num-layers"]), hidden=hidden, heads=heads,
            kv_heads=int(f["num-query-groups"]) if f.get("group-query-attention") else heads,
            head_dim=int(f.get("kv-channels") or hidden // heads), ffn=ffn, vocab=vocab,
            swiglu=bool(f.get("swiglu")), experts=experts,
            topk=int(f.get("moe-router-topk") or (2 if experts else 0)),
            moe_ffn=int(f.get("moe-ffn-hidden-size") or ffn) if experts else 0,
            qk_norm=(f.get("normalization", "LayerNorm") if f.get("qk-layernorm") else None),
            elem_bytes=2 if (f.get("fp16") or f.get("bf16")) else 4,
            untied=bool(f.get("untie-embeddings-and-output-weights")),
            vocab_divisible_by=int(f.get("make-vocab-size-divisible-by") or 128),
            normalization=str(f.get("normalization", "LayerNorm")),
            bias=not f.get("disable-bias-linear"),
            learned_positions=(int(f.get("max-position-embeddings") or 0) if f.get(
                "position-embedding-type", "learned_absolute") == "learned_absolute" else 0),
            **_mla_fields(f))

    def mla_cache_dims(self, dim_slices: int) -> int:
        """Elements one cached position of one sequence holds per head (megatron-core's MLA at
        plain TP: the up-projected key, a + r, and value, v) or, on the grid, of the latent
        cache (the kv latent and the shared RoPE key: kv_lora_rank + r, for all heads)."""
        if dim_slices > 1:
            return self.kv_lora_rank + self.qk_pos_emb_head_dim
        return self.qk_head_dim + self.qk_pos_emb_head_dim + self.v_head_dim

    def padded_vocab(self, tp: int) -> int:
        unit = self.vocab_divisible_by * tp
        return -(-self.vocab // unit) * unit


# megatron.training's defaults of its MLA flags (a config may leave them out)
MLA_FLAG_DEFAULTS = {"kv-lora-rank": 32, "qk-head-dim": 128, "qk-pos-emb-head-dim": 64,
                     "v-head-dim": 128}


def _mla_fields(f: Dict[str, object]) -> Dict[str, object]:
    if not f.get("multi-latent-attention"):
        return {}
    return {"mla": True, **{k.replace("-", "_"): int(f.get(k) or default)
                            for k, default in MLA_FLAG_DEFAULTS.items()}}


@dataclass(frozen=True)
class Layout:
    """TP (or grid n x m, TP = n*m) x PP x DP, the attention schedule, the expert layout."""

    tp: int
    pp: int = 1
    dp: int = 1
    dim_slices: int = 1  # m; 1 = megatron-core's own attention (plain TP)
    schedule: str = "exact"
    ep: int = 1
    etp: int = 1
    micro_batches: Optional[int] = None  # inference micro-batches (default: pp)
    kv_cache: str = "dims"  # the grid's KV cache: dims | positions | auto (resolve_kv_cache)

    def __post_init__(self):
        if self.kv_cache not in KV_CACHES:
            raise MxnConfigError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")

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
        if self.dim_slices > 1:  # (the cache's suffix as benchmark.layout_name's)
            cache = " KV-auto" if self.kv_cache == AUTO else get_kv_cache(self.kv_cache).label
            return f"grid {self.head_groups}x{self.dim_slices}{pp}{dp} {self.schedule}{cache}"
        return f"TP={self.tp}{pp}{dp}"


def check_layout(model: ModelShape, layout: Layout) -> None:
    """The rules of docs/design.md (and megatron-core's), as errors naming the rule."""
    n, m, tp = layout.head_groups, layout.dim_slices, layout.tp
    if tp % m:
        raise MxnConfigError(f"TP ({tp}) must be divisible by the dim slices ({m})")
    if model.layers % layout.pp:
        raise MxnConfigError(f"num_layers ({model.layers}) must be divisible by PP "
                             f"({layout.pp})")
    if m == 1:
        if model.heads % tp:
            raise MxnConfigError(f"num_attention_heads ({model.heads}) must be divisible by "
                                 f"TP ({tp})")
        if model.kv_heads % tp and tp % model.kv_heads:
            raise MxnConfigError(f"num_query_groups ({model.kv_heads}) and TP ({tp}) must "
                                 "divide one another")
    elif model.mla:  # the grid's MLA: heads over all n*m ranks, each part's dims over m
        if model.heads % tp:
            raise MxnConfigError(f"MLA on the grid needs num_attention_heads ({model.heads}) "
                                 f"divisible by n*m = {tp}")
        MlaLayout(n, m, model.heads, model.qk_head_dim, model.qk_pos_emb_head_dim,
                  model.v_head_dim)
    else:  # the grid attention's own rules (RoPE over the whole head unless positions are
        # learned: ModelShape does not say more)
        GridLayout(n, m, model.heads, model.kv_heads, model.head_dim,
                   rotary_dim=0 if model.learned_positions else model.head_dim)
    if model.ffn % tp:
        raise MxnConfigError(f"ffn_hidden_size ({model.ffn}) must be divisible by TP ({tp})")
    if model.experts:
        if model.experts % layout.ep:
            raise MxnConfigError(f"num_experts ({model.experts}) must be divisible by EP "
                                 f"({layout.ep})")
        if (tp * layout.dp) % (layout.ep * layout.etp):
            raise MxnConfigError(f"expert EP x ETP ({layout.ep} x {layout.etp}) must divide "
                                 f"the ranks of a stage (TP x DP = {tp * layout.dp})")


def _attention_split(layout: Layout) -> int:
    """Over how many ranks the heads are split: n head groups on the grid, TP otherwise."""
    return layout.head_groups if layout.dim_slices > 1 else layout.tp


def heads_per_rank(model: ModelShape, layout: Layout) -> int:
    return model.heads // _attention_split(layout)


def kv_heads_per_rank(model: ModelShape, layout: Layout) -> int:
    """Whole KV heads are replicated once the split exceeds them (never fewer than one)."""
    return max(model.kv_heads // _attention_split(layout), 1)


def score_shape(model: ModelShape, layout: Layout, mb: int, sq: int, sk: int) -> ScoreShape:
    """What one rank's attention core sees in one call (attention.schedules)."""
    m = layout.dim_slices
    return ScoreShape(mb, heads_per_rank(model, layout), kv_heads_per_rank(model, layout), sq,
                      sk, model.head_dim // m, m, model.elem_bytes)


def resolve_kv_cache(model: ModelShape, layout: Layout, mb: int, prompt: int,
                     new_tokens: int) -> Layout:
    """The layout with the KV cache a generation of `new_tokens` after `prompt` runs, in
    micro-batches of `mb` sequences: `auto` decided by schedules.decide_kv_cache, as the
    generation decides it, so that predictions follow the run."""
    if layout.kv_cache != AUTO:
        return layout
    cache = decide_kv_cache(AUTO, layout.schedule, score_shape(model, layout, mb, 1, 1), prompt,
                            new_tokens)
    return replace(layout, kv_cache=cache.name)


def _kv_cache(layout: Layout) -> KVCache:
    """The layout's resolved KV cache; `auto` depends on the workload, so it is refused."""
    if layout.kv_cache == AUTO:
        raise MxnConfigError(f"{layout.name}: kv_cache 'auto' depends on the workload; resolve "
                             "it with cost_model.resolve_kv_cache first")
    return get_kv_cache(layout.kv_cache)


def _no_mla(model: ModelShape, what: str) -> None:
    if model.mla:
        raise MxnConfigError(f"the cost model's {what} are standard attention's; for MLA it "
                             "computes the KV cache only (kv_cache_bytes)")


def _record(op: str, group: str, size: int, payload: int, inside: bool = True) -> CommRecord:
    return CommRecord(op, group, size, int(payload), inside)


def layer_collectives(model: ModelShape, layout: Layout, mb: int, sq: int, sk: int) -> Counter:
    """One transformer layer's forward for one micro-batch of `mb` sequences: `sq` new tokens
    attending to `sk` keys. {CommRecord: calls} on every rank of the layer."""
    _no_mla(model, "collectives")
    out: Counter = Counter()
    tp, n, m, e = layout.tp, layout.head_groups, layout.dim_slices, model.elem_bytes
    h, g, d, hidden = model.heads, model.kv_heads, model.head_dim, model.hidden
    if m == 1:
        if tp > 1 and g < tp:  # megatron-core gathers the whole QKV output and picks its heads
            out[_record("all_gather", "TP", tp, sq * mb * (h + 2 * g) * d * e)] += 1
    else:
        if n > g:  # a KV head's K/V slice, split over the n/g head groups sharing it
            share = n // g
            out[_record("all_gather", "head-group" if share == n else "KV-share", share,
                        sq * mb * 2 * d // m * e)] += 1
        if model.qk_norm:
            per = 2 if model.qk_norm == "LayerNorm" else 1
            out[_record("all_reduce", "dim-slice", m, sq * mb * (h // n) * 4)] += per
            out[_record("all_reduce", "dim-slice", m,
                        sq * mb * kv_heads_per_rank(model, layout) * 4)] += per
        shape = score_shape(model, layout, mb, sq, sk)
        schedule = decide_schedule(layout.schedule, shape)
        for op, payload in _kv_cache(layout).collectives(schedule, shape):
            out[_record(op, "dim-slice", m, payload)] += 1
    if tp > 1:
        out[_record("all_reduce", "TP", tp, sq * mb * hidden * e)] += 1  # attention output
        if not model.experts:
            out[_record("all_reduce", "TP", tp, sq * mb * hidden * e)] += 1  # MLP output
    return out


def step_collectives(model: ModelShape, layout: Layout, batch: int, prompt: int, step: int,
                     new_tokens: int, stage: int = 0) -> Counter:
    """Everything a rank of pipeline stage `stage` issues in generation step `step` (0: the
    prefill of `prompt` tokens, then one decode token each) of a dense model."""
    micro = layout.micro_batches or layout.pp
    mb = batch // micro
    sq = prompt if step == 0 else 1
    sk = prompt + step
    out: Counter = Counter()
    for record, calls in layer_collectives(model, layout, mb, sq, sk).items():
        out[record] += calls * micro * (model.layers // layout.pp)
    first, last = stage == 0, stage == layout.pp - 1
    tp = layout.tp
    if first and tp > 1:  # vocab-parallel embedding
        out[_record("all_reduce", "TP", tp, sq * mb * model.hidden * model.elem_bytes,
                    False)] += micro
    if last and tp > 1:  # the last position's logits, fp32, gathered over the vocab shards
        out[_record("all_gather", "TP", tp, mb * model.padded_vocab(tp) * 4, False)] += micro
    if not last:  # hidden states to the next stage
        out[_record("send", "PP", 2, sq * mb * model.hidden * model.elem_bytes, False)] += micro
    if last and layout.pp > 1 and step + 1 < new_tokens:  # new tokens back to the first stage
        out[_record("send", "PP", 2, mb * 8, False)] += micro
    return out


def layer_weight_bytes(model: ModelShape, layout: Layout) -> int:
    """Parameter bytes of one transformer layer on one rank with megatron-core's local layers
    (linears split over TP, norms and row-parallel biases replicated, experts over EP x ETP)."""
    _no_mla(model, "weights")
    tp = layout.tp
    h, g, d, hidden = model.heads, model.kv_heads, model.head_dim, model.hidden
    norm = hidden * (2 if model.normalization == "LayerNorm" else 1)
    qkv_rows = (h + 2 * g) * d
    attention = (qkv_rows * hidden + h * d * hidden) // tp + 2 * norm
    if model.bias:
        attention += qkv_rows // tp + hidden
    if model.qk_norm:
        attention += 2 * d * (2 if model.qk_norm == "LayerNorm" else 1)
    fc1 = (2 if model.swiglu else 1)
    if model.experts:
        per_expert = (fc1 + 1) * hidden * model.moe_ffn
        mlp = model.experts * per_expert // (layout.ep * layout.etp) + model.experts * hidden
    else:
        mlp = (fc1 + 1) * hidden * model.ffn // tp
        if model.bias:
            mlp += fc1 * model.ffn // tp + hidden
    return (attention + mlp) * model.elem_bytes


def weight_bytes(model: ModelShape, layout: Layout, stage: int = 0) -> int:
    """Parameter bytes of one rank of pipeline stage `stage`: its layers, plus the
    embeddings on the first stage and the final norm and output layer on the last."""
    hidden, vocab = model.hidden, model.padded_vocab(layout.tp)
    total = 0
    if stage == 0:
        total += vocab * hidden // layout.tp + model.learned_positions * hidden
    if stage == layout.pp - 1:
        norm = hidden * (2 if model.normalization == "LayerNorm" else 1)
        total += norm + (vocab * hidden // layout.tp if model.untied or layout.pp > 1 else 0)
    return (layer_weight_bytes(model, layout) * (model.layers // layout.pp)
            + total * model.elem_bytes)


def kv_cache_bytes(model: ModelShape, layout: Layout, batch: int, context: int) -> int:
    """K and V cache of one rank: its KV heads (whole ones under TP; replicated once TP > g)
    for `context` positions of `batch` sequences; on the grid its d/m dims of each position
    (dims cache) or all d dims of its ceil(context/m) positions (positions cache).
    MLA (mla_kv_cache_bytes): megatron's up-projected K and V of its h/TP heads at plain TP,
    the latent cache sharded by position over the n*m ranks on the grid."""
    if model.mla:
        return mla_kv_cache_bytes(model, layout, batch, context)
    m = layout.dim_slices
    positions, dims = (_kv_cache(layout) if m > 1 else DIMS).held(context, model.head_dim, m)
    return (2 * batch * positions * kv_heads_per_rank(model, layout) * dims * model.elem_bytes
            * (model.layers // layout.pp))


def mla_kv_cache_bytes(model: ModelShape, layout: Layout, batch: int, context: int) -> int:
    """The MLA cache of one rank. Plain TP: megatron-core's MLA caches the up-projected key
    (qk_head_dim + qk_pos_emb_head_dim) and value (v_head_dim) of its h/TP heads at every
    position. The grid: the latent cache (kv_lora_rank + qk_pos_emb_head_dim per position,
    shared by all heads), each of the n*m ranks holding ceil(context / (n*m)) positions,
    whatever the run's KV-cache name (the latent cache has one)."""
    tp, m = layout.tp, layout.dim_slices
    if m > 1:
        positions, heads = -(-context // tp), 1
    else:
        positions, heads = context, model.heads // tp
    return (batch * positions * heads * model.mla_cache_dims(m) * model.elem_bytes
            * (model.layers // layout.pp))


def with_schedule(layout: Layout, schedule: str) -> Layout:
    return replace(layout, schedule=schedule)
