"""The grid's attention schedules and KV caches: one object each, in one registry, and the one
place where `auto` is decided (adding one: docs/extending.md).

Rank (i, j) holds Q_ij [b, h/n, sq, d/m] and K_ij [b, g', sk, d/m] (g' = its KV heads).

* exact:  S_i = sum_j Q_ij K_ij^T, an fp32 all-reduce of b*(h/n)*sq*sk scores over the m ranks.
* gather: all-gather Q_i. and K_i. (their dims) over the m ranks and compute S_i locally; the
          backward of the all-gather is a reduce-scatter, which sums dQ/dK exactly.
* seq:    the sequence-split core (attention/seq_split.py): all-to-all Q to [sq/m tokens, all
          d dims], all-gather K and V (backward: reduce-scatter), a fused kernel on the local
          queries, all-to-all O back. O(s) memory and 1/m of the head group's softmax per rank.
* sliced: the seed paper's per-slice softmax(Q_ij K_ij^T / sqrt(d/m)) V_ij: no score traffic,
          but h*m heads of size d/m, i.e. a different model than the checkpoint's.
* auto:   per call (decide_schedule): `seq` when the queries fill the 2m chunks (training,
          prefill: it needs no score matrix and repeats no softmax), else the one of
          exact/gather sending fewer bytes (decode: exact), so the choice follows phase and shape.

KV caches (inference): `dims` (megatron's own cache on the grid: rank j keeps dims j of every
position) and `positions` (attention/position_cache.py: rank j keeps all dims of the positions
p % m == j); `auto` (decide_kv_cache) takes the one whose decode step sends fewer bytes.

A schedule knows its forward (MxnDotProductAttention calls `schedule.forward(core, ...)`), the
collectives of one call (`collectives(shape)`, priced by `sent_bytes`), its activation memory
and score traffic, whether it computes standard attention (`exact`) and whether it hands the
K/V it all-gathered over (`hands_over_kv`: a prefill into the position-sharded cache keeps
them). The core, the cost model, the planner and generation read these objects; the names are
the user's (`--mxn-attention`, `--mxn-kv-cache`). This module imports no megatron (the planner
runs without it): a forward imports its kernels when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from megatron_mxn.grid.layout import MxnConfigError

AUTO = "auto"  # decided per call (schedules) or per run (KV caches): not a registered object

Collectives = List[Tuple[str, int]]  # [(op, payload bytes)] over the dim-slice group


@dataclass(frozen=True)
class ScoreShape:
    """What one rank's core attention sees in one call."""

    batch: int
    heads: int  # query heads on this rank (h/n)
    kv_heads: int  # KV heads on this rank before GQA expansion
    sq: int
    sk: int
    slice_dim: int  # d/m
    dim_slices: int  # m
    elem_bytes: int  # bytes of one Q/K element (2 for fp16/bf16, 4 for fp32)


def sent_bytes(op: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends in one call (ring algorithms; payload = the all-reduce's tensor,
    the all-gather's output, the reduce-scatter's input, the all-to-all's input, the
    message of a send)."""
    if group_size <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (group_size - 1) / group_size * payload
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (group_size - 1) / group_size * payload
    return float(payload)  # send, broadcast (root's view)


def _sent(calls: Collectives, s: ScoreShape) -> float:
    return sum(sent_bytes(op, size, s.dim_slices) for op, size in calls)


def _scores_bytes(s: ScoreShape) -> int:
    """The fp32 scores and probabilities of one call: b * (h/n) * s_q * s_k * 4 bytes each."""
    return 2 * s.batch * s.heads * s.sq * s.sk * 4


# ---------------------------------------------------------------- schedules
class Schedule:
    """How a head group's m ranks compute attention. Subclass, set `name`, implement `forward`
    and `collectives`, and `register_schedule` an instance."""

    name: str = ""
    exact: bool = True  # computes standard attention (False: another model, as `sliced`)
    hands_over_kv: bool = False  # forward all-gathers K and V (all d dims) and can return them
    builds_scores: bool = True  # materialises the s_q x s_k scores (else: a fused kernel)
    auto: bool = False  # `auto` may pick it (the built-in exact/gather/seq)

    def forward(self, core, query, key, value, mask, sink, keep_kv: bool = False):
        """query [sq, b, h/n, d/m], key/value [sk, b, g', d/m] (this rank's dims) ->
        (output [sq, b, h/n * d/m] (its dims of every head), K/V or None).

        core: the MxnDotProductAttention (its groups, softmax, scale, dropout; helpers
        all_gather_dims, all_reduce_dims, score_attention, kernel_scale, dropout_p, rank_rng).
        mask: the call's MaskSpec (mask.py). sink: the head group's attention-sink logits [h/n]
        or None. keep_kv: return the all-gathered (key, value) [sk, b, g', d] when this
        forward gathered them (hands_over_kv), else None is returned in their place."""
        raise NotImplementedError

    def collectives(self, s: ScoreShape) -> Collectives:
        """[(op, payload bytes)] over the dim-slice group in one forward call (none when
        s.dim_slices == 1); payload = the all-reduce's tensor or the all-gather's output (the
        accounting's convention). tests/test_cost_model.py holds them to the measured ones."""
        raise NotImplementedError

    def call_bytes(self, s: ScoreShape) -> float:
        """Bytes one rank sends over the dim-slice group in one call."""
        return _sent(self.collectives(s), s)

    def suits(self, s: ScoreShape) -> bool:
        """Whether `auto` may run this call with it (if `auto` considers it at all)."""
        return True

    def memory_bytes(self, s: ScoreShape) -> int:
        """The core's largest activations per rank and call (score schedules: the fp32 scores
        and probabilities, O(s_q s_k))."""
        return _scores_bytes(s)

    def score_bytes(self, s: ScoreShape) -> int:
        """Score bytes written to and read from memory in one call (the planner's roofline)."""
        return _scores_bytes(s) if self.builds_scores else 0

    def qk_dims(self, s: ScoreShape) -> int:
        """The dims each rank computes Q K^T over for all s_q rows (the planner's FLOPs)."""
        return s.slice_dim

    def flops(self, s: ScoreShape) -> int:
        """Q K^T and P V of one call on one rank."""
        return 2 * s.batch * s.heads * s.sq * s.sk * (self.qk_dims(s) + s.slice_dim)

    def softmax_scale(self, config, dim_slices: int) -> Optional[float]:
        """The core's softmax scale when it is not megatron's 1/sqrt(d) (None: megatron's)."""
        return None

    def __repr__(self) -> str:
        return f"<schedule {self.name}>"


class ScoreSchedule(Schedule):
    """Builds S_i = Q_i K_i^T on every rank of the head group and shares the rest with the
    others (core.score_attention: megatron's masked softmax with the sink, dropout from the
    head group's stream, P_i V_ij with the local V slice). A subclass says how the scores come
    together: `operands` (what Q K^T is computed from) and `reduce_scores` (applied to it)."""

    def operands(self, core, query, key):
        return query, key

    def reduce_scores(self, core, scores):
        return scores

    def forward(self, core, query, key, value, mask, sink, keep_kv: bool = False):
        query, key = self.operands(core, query, key)
        return core.score_attention(query, key, value, mask, sink,
                                    reduce=lambda scores: self.reduce_scores(core, scores)), None


class Exact(ScoreSchedule):
    """The partial scores of the m dim slices, summed by an fp32 all-reduce."""

    name, auto = "exact", True

    def reduce_scores(self, core, scores):
        return core.all_reduce_dims(scores)

    def collectives(self, s: ScoreShape) -> Collectives:
        if s.dim_slices == 1:
            return []
        return [("all_reduce", s.batch * s.heads * s.sq * s.sk * 4)]


class Gather(ScoreSchedule):
    """All-gathered Q and K dims (in the same order), S_i computed m-fold redundantly."""

    name, auto = "gather", True

    def operands(self, core, query, key):
        return core.all_gather_dims(query), core.all_gather_dims(key)

    def collectives(self, s: ScoreShape) -> Collectives:
        m = s.dim_slices
        if m == 1:
            return []
        return [("all_gather", s.sq * s.batch * s.heads * s.slice_dim * m * s.elem_bytes),
                ("all_gather", s.sk * s.batch * s.kv_heads * s.slice_dim * m * s.elem_bytes)]

    def qk_dims(self, s: ScoreShape) -> int:
        return s.slice_dim * s.dim_slices


class FusedSchedule(Schedule):
    """A fused kernel (kernels.py): no score matrix. Dropout comes from each rank's own stream
    (its rows or dims are its own); `attend` returns (output [sq, b, h/n, d/m], K/V or None)."""

    builds_scores = False

    def forward(self, core, query, key, value, mask, sink, keep_kv: bool = False):
        sq, b, heads, _ = query.shape
        sink = None if sink is None else sink.float()
        with core.rank_rng():
            out, kv = self.attend(core, query, key, value, mask, sink, keep_kv)
        return out.reshape(sq, b, heads * value.size(-1)), kv  # (MLA: v's dims differ)

    def attend(self, core, query, key, value, mask, sink, keep_kv: bool):
        raise NotImplementedError


class Seq(FusedSchedule):
    """The sequence-split core (seq_split.py); its all-gathered K/V can fill a cache."""

    name, auto, hands_over_kv = "seq", True, True

    def attend(self, core, query, key, value, mask, sink, keep_kv: bool):
        from megatron_mxn.attention.seq_split import seq_split_attention

        out, kv = seq_split_attention(query, key, value, core.dim_slice_group,
                                      scale=core.kernel_scale, mask=mask,
                                      dropout_p=core.dropout_p, sink=sink, return_kv=True)
        return out, kv if keep_kv else None

    def collectives(self, s: ScoreShape) -> Collectives:
        m = s.dim_slices
        if m == 1:
            return []
        # (all-to-all payload: the input; Q's and O's are the same size)
        q = s.sq * s.batch * s.heads * s.slice_dim * s.elem_bytes
        kv = s.sk * s.batch * s.kv_heads * s.slice_dim * m * s.elem_bytes
        return [("all_to_all", q), ("all_gather", kv), ("all_gather", kv), ("all_to_all", q)]

    def suits(self, s: ScoreShape) -> bool:
        """Every one of the 2m chunks holds a query."""
        return s.dim_slices > 1 and s.sq >= 2 * s.dim_slices

    def memory_bytes(self, s: ScoreShape) -> int:
        """Q, K, V and O with the full head dim: O(s) (the fused kernel keeps no scores)."""
        d = s.slice_dim * s.dim_slices
        return (2 * s.sq // s.dim_slices * s.heads + 2 * s.sk * s.kv_heads) * s.batch * d * \
            s.elem_bytes


class Sliced(FusedSchedule):
    """The seed paper's per-slice softmax on each rank's own dims: no communication, a
    different model (h*m heads of d/m dims, scale 1/sqrt(d/m))."""

    name, exact = "sliced", False

    def attend(self, core, query, key, value, mask, sink, keep_kv: bool):
        from megatron_mxn.attention import kernels

        out = kernels.attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
            scale=core.kernel_scale, mask=mask, dropout_p=core.dropout_p, sink=sink)
        return out.permute(2, 0, 1, 3), None

    def collectives(self, s: ScoreShape) -> Collectives:
        return []

    def memory_bytes(self, s: ScoreShape) -> int:
        return 4 * s.batch * (s.sq * s.heads + s.sk * s.kv_heads) * s.slice_dim * s.elem_bytes

    def softmax_scale(self, config, dim_slices: int) -> Optional[float]:
        if config.softmax_scale is not None:
            return None
        return 1.0 / (config.kv_channels // dim_slices) ** 0.5


# ---------------------------------------------------------------- KV caches (inference)
class KVCache:
    """How the grid keeps K and V between inference calls. Subclass, set `name`, and
    `register_kv_cache` an instance."""

    name: str = ""
    label: str = ""  # what a layout's name adds (cost_model.Layout.name, generate's report)
    auto: bool = False  # `auto` may pick it

    def forward(self, layer, hidden_states, attention_mask, context, **kwargs):
        """The grid attention layer's forward (MxnSelfAttention, m > 1) with this cache in
        megatron's static inference context; kwargs: megatron's SelfAttention.forward's."""
        raise NotImplementedError

    def runner(self, schedule: Schedule, s: ScoreShape):
        """What computes a call with s.sk - s.sq cached positions: `schedule` (the call's,
        decided), or the cache itself."""
        return schedule

    def collectives(self, schedule: Schedule, s: ScoreShape) -> Collectives:
        """Everything a call with s.sk - s.sq cached positions sends over the dim-slice
        group."""
        return schedule.collectives(s)

    def call_bytes(self, schedule: Schedule, s: ScoreShape) -> float:
        return _sent(self.collectives(schedule, s), s)

    def held(self, context: int, head_dim: int, dim_slices: int) -> Tuple[int, int]:
        """(positions, dims) of each KV head a rank keeps for `context` positions."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<KV cache {self.name}>"


class DimsCache(KVCache):
    """megatron's own static KV cache on the grid: dims j of every position; a decode step
    runs the layer's schedule over the whole context (exact: its score all-reduce grows with
    s_k)."""

    name, auto = "dims", True

    def forward(self, layer, hidden_states, attention_mask, context, **kwargs):
        return layer.megatron_forward(hidden_states, attention_mask,
                                      inference_context=context, **kwargs)

    def held(self, context: int, head_dim: int, dim_slices: int) -> Tuple[int, int]:
        return context, head_dim // dim_slices


class PositionsCache(KVCache):
    """The position-sharded cache (position_cache.py): all dims of the positions p % m == j;
    a call sends O(b (h/n + 2g') d) whatever s_k. A prefill into an empty cache runs the
    layer's schedule and keeps the K/V it hands over, or all-gathers them (two more
    all-gathers)."""

    name, label, auto = "positions", " KV-by-position", True
    builds_scores = True  # (as a decode call's runner: 1/m of the scores, unfused)

    def forward(self, layer, hidden_states, attention_mask, context, **kwargs):
        return layer._forward_position_cache(hidden_states, attention_mask, context,
                                             kwargs.get("rotary_pos_emb"))

    @staticmethod
    def prefills(sq: int, sk: int) -> bool:
        """A prefill into an empty cache (the layer's schedule runs it)."""
        return sq > 1 and sq == sk

    def runner(self, schedule: Schedule, s: ScoreShape):
        return schedule if s.dim_slices == 1 or self.prefills(s.sq, s.sk) else self

    def collectives(self, schedule: Schedule, s: ScoreShape) -> Collectives:
        m, d = s.dim_slices, s.slice_dim * s.dim_slices
        if m == 1:
            return schedule.collectives(s)
        if self.prefills(s.sq, s.sk):
            fill = [] if schedule.hands_over_kv else [
                ("all_gather", s.sk * s.batch * s.kv_heads * d * s.elem_bytes)] * 2
            return schedule.collectives(s) + fill
        # all-gather of the new q, k, v dims; one all-to-all of the fp32 partial outputs, each
        # destination's dims packed with the log-sum-exps: neither depends on s_k
        return [("all_gather", s.sq * s.batch * (s.heads + 2 * s.kv_heads) * d * s.elem_bytes),
                ("all_to_all", m * s.batch * s.heads * s.sq * (s.slice_dim + 1) * 4)]

    def held(self, context: int, head_dim: int, dim_slices: int) -> Tuple[int, int]:
        return -(-context // dim_slices), head_dim

    # as a call's runner (the planner): all d dims of 1/m of the positions, 1/m of the scores
    def flops(self, s: ScoreShape) -> int:
        return 2 * s.batch * s.heads * s.sq * s.sk * (s.slice_dim + s.slice_dim)

    def score_bytes(self, s: ScoreShape) -> int:
        return _scores_bytes(s) // s.dim_slices


# ---------------------------------------------------------------- the registry
_SCHEDULES: Dict[str, Schedule] = {}
_KV_CACHES: Dict[str, KVCache] = {}


def _register(table: dict, thing, kind: str):
    if not thing.name or thing.name == AUTO or thing.name in table:
        raise ValueError(f"a {kind} needs a name that is not {AUTO!r} and not yet registered "
                         f"({sorted(table)}), got {thing.name!r}")
    table[thing.name] = thing
    return thing


def register_schedule(schedule: Schedule) -> Schedule:
    """Make `schedule` available under its name (MxnTransformerConfig.mxn_attention, the cost
    model's Layout.schedule)."""
    return _register(_SCHEDULES, schedule, "schedule")


def register_kv_cache(cache: KVCache) -> KVCache:
    return _register(_KV_CACHES, cache, "KV cache")


def get_schedule(name: str) -> Schedule:
    """The registered schedule `name` (not `auto`: decide_schedule)."""
    try:
        return _SCHEDULES[name]
    except KeyError:
        raise MxnConfigError(f"mxn_attention must be one of {schedule_names()}, got "
                             f"{name!r}") from None


def get_kv_cache(name: str) -> KVCache:
    """The registered KV cache `name` (not `auto`: decide_kv_cache)."""
    try:
        return _KV_CACHES[name]
    except KeyError:
        raise MxnConfigError(f"kv_cache must be one of {kv_cache_names()}, got "
                             f"{name!r}") from None


def schedule_names() -> Tuple[str, ...]:
    """The names mxn_attention accepts now: the standard-attention schedules, auto, the
    others."""
    exact = tuple(name for name, s in _SCHEDULES.items() if s.exact)
    return exact + (AUTO,) + tuple(name for name, s in _SCHEDULES.items() if not s.exact)


def kv_cache_names() -> Tuple[str, ...]:
    return (AUTO,) + tuple(_KV_CACHES)


def standard_attention(name: str) -> bool:
    """Whether mxn_attention `name` computes standard attention (the checkpoint's model)."""
    return name == AUTO or get_schedule(name).exact


EXACT = register_schedule(Exact())
GATHER = register_schedule(Gather())
SEQ = register_schedule(Seq())
SLICED = register_schedule(Sliced())
DIMS = register_kv_cache(DimsCache())
POSITIONS = register_kv_cache(PositionsCache())

# The built-in names, fixed here: the choices of --mxn-attention and --mxn-kv-cache, and what
# the planner enumerates (a schedule registered later is accepted by the config and priced by
# the cost model, but neither offered nor enumerated).
SCHEDULES = schedule_names()  # ("exact", "gather", "seq", "auto", "sliced")
EXACT_SCHEDULES = tuple(name for name in SCHEDULES if standard_attention(name))
KV_CACHES = kv_cache_names()  # ("auto", "dims", "positions")


# ---------------------------------------------------------------- the decisions
def auto_candidates() -> List[Schedule]:
    """The schedules `auto` considers, in registration order."""
    return [x for x in _SCHEDULES.values() if x.auto]


def decide_schedule(name: str, s: ScoreShape) -> Schedule:
    """The schedule a call of shape `s` runs. `auto`, among the schedules it considers: a fused
    one that suits the call (seq, once every one of the 2m chunks holds a query: its memory is
    O(s) where the others hold the s_q x s_k scores, and it does 1/m of their softmax work),
    else the score schedule sending the fewest bytes (ties: the first registered, exact: one
    collective instead of two): decode takes exact, or gather for a few queries against a long
    cache."""
    if name != AUTO:
        return get_schedule(name)
    candidates = auto_candidates()
    fused = [x for x in candidates if not x.builds_scores and x.suits(s)]
    if fused:
        return fused[0]
    return min((x for x in candidates if x.builds_scores and x.suits(s)),
               key=lambda x: x.call_bytes(s))


def decide_call(schedule: str, kv_cache: str, s: ScoreShape):
    """What computes an inference call with s.sk - s.sq cached positions (kv_cache resolved):
    the decided schedule, or the position-sharded cache itself."""
    return get_kv_cache(kv_cache).runner(decide_schedule(schedule, s), s)


def decode_context(prompt: int, new_tokens: int) -> int:
    """The mean context length of a generation's decode steps (the decode traffic of each cache
    is linear in it, so the cheaper cache there sends fewer bytes over the whole run)."""
    return prompt + (new_tokens + 1) // 2


def decide_kv_cache(kv_cache: str, schedule: str, s: ScoreShape, prompt: int,
                    new_tokens: int = 0) -> KVCache:
    """The KV cache of a generation of `new_tokens` after `prompt` tokens (one choice for the
    whole run: every cache holds every position), for the schedule `schedule` and the ranks'
    shape `s` (its batch: the sequences of one forward call; its sq and sk are not used).
    `auto`: the cache whose decode step at the run's mean context length (decode_context)
    sends the fewest bytes (ties: the first registered, dims): the dims cache's score
    all-reduce grows with s_k, the position-sharded cache's traffic does not (the crossover is
    a few dozen positions). A context whose workload is unknown (a megatron engine's) is
    decided at its whole length: prompt = max_sequence_length, new_tokens = 0. With one dim
    slice there is one layout (dims). The layer, generate(), the CLI and the cost model all
    decide here."""
    if s.dim_slices == 1:
        return DIMS
    if kv_cache != AUTO:
        return get_kv_cache(kv_cache)
    decode = replace(s, sq=1, sk=decode_context(prompt, new_tokens))
    chosen = decide_schedule(schedule, decode)
    return min((c for c in _KV_CACHES.values() if c.auto),
               key=lambda c: c.call_bytes(chosen, decode))
