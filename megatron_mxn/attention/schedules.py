"""The grid's attention schedules and the bytes each one sends over the dim-slice group.

Rank (i, j) holds Q_ij [b, h/n, sq, d/m] and K_ij [b, g', sk, d/m] (g' = its KV heads).

* exact:  S_i = sum_j Q_ij K_ij^T, an fp32 all-reduce of b*(h/n)*sq*sk scores over the m ranks.
* gather: all-gather Q_i. and K_i. (their dims) over the m ranks and compute S_i locally; the
          backward of the all-gather is a reduce-scatter, which sums dQ/dK exactly.
* seq:    the sequence-split core (attention/seq_split.py): all-to-all Q to [sq/m tokens, all
          d dims], all-gather K and V (backward: reduce-scatter), a fused kernel on the local
          queries, all-to-all O back. O(s) memory and 1/m of the head group's softmax per rank.
* auto:   per call: `seq` when the queries fill the 2m chunks (training, prefill: it needs no
          score matrix and repeats no softmax), else the one of exact/gather sending fewer
          bytes (decode: exact), so the choice follows phase and shape.
* sliced: the seed paper's per-slice softmax(Q_ij K_ij^T / sqrt(d/m)) V_ij: no score traffic,
          but h*m heads of size d/m, i.e. a different model than the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("exact", "gather", "seq", "auto", "sliced")
EXACT_SCHEDULES = ("exact", "gather", "seq", "auto")  # compute standard attention


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


def collectives(schedule: str, s: ScoreShape):
    """[(op, payload bytes)] the schedule issues over the dim-slice group in one forward call;
    payload = the all-reduce's tensor or the all-gather's output (the accounting's convention)."""
    m = s.dim_slices
    if m == 1 or schedule == "sliced":
        return []
    if schedule == "exact":
        return [("all_reduce", s.batch * s.heads * s.sq * s.sk * 4)]
    if schedule == "gather":
        return [("all_gather", s.sq * s.batch * s.heads * s.slice_dim * m * s.elem_bytes),
                ("all_gather", s.sk * s.batch * s.kv_heads * s.slice_dim * m * s.elem_bytes)]
    if schedule == "seq":  # (all-to-all payload: the input, Q's and O's are the same size)
        q = s.sq * s.batch * s.heads * s.slice_dim * s.elem_bytes
        kv = s.sk * s.batch * s.kv_heads * s.slice_dim * m * s.elem_bytes
        return [("all_to_all", q), ("all_gather", kv), ("all_gather", kv), ("all_to_all", q)]
    raise ValueError(f"no fixed collectives for schedule {schedule!r}")


def sent_bytes(op: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends in one call (ring algorithms; payload = the all-reduce's tensor,
    the all-gather's output, the reduce-scatter's input, the message of a send)."""
    if group_size <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (group_size - 1) / group_size * payload
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (group_size - 1) / group_size * payload
    return float(payload)  # send, broadcast (root's view)


def schedule_bytes(schedule: str, s: ScoreShape) -> float:
    return sum(sent_bytes(op, size, s.dim_slices) for op, size in collectives(schedule, s))


def choose(schedule: str, s: ScoreShape) -> str:
    """The schedule a call runs. `auto`: `seq` once every one of the 2m chunks holds a query
    (its memory is O(s) where the others hold the s_q x s_k scores, and it does 1/m of their
    softmax work); shorter calls (decode) take the one of exact/gather sending fewer bytes
    (ties: exact, one collective instead of two)."""
    if schedule != "auto":
        return schedule
    if s.dim_slices > 1 and s.sq >= 2 * s.dim_slices:
        return "seq"
    return "gather" if schedule_bytes("gather", s) < schedule_bytes("exact", s) else "exact"


def score_memory_bytes(schedule: str, s: ScoreShape) -> int:
    """The attention core's largest activations per rank and call: the fp32 scores and
    probabilities of the score schedules, O(s_q s_k); Q, K, V and O with the full head dim
    for seq, O(s) (the fused kernel keeps no score matrix)."""
    if schedule in ("exact", "gather"):
        return 2 * s.batch * s.heads * s.sq * s.sk * 4
    d = s.slice_dim * s.dim_slices
    if schedule == "seq":
        return (2 * s.sq // s.dim_slices * s.heads + 2 * s.sk * s.kv_heads) * s.batch * d * \
            s.elem_bytes
    return 4 * s.batch * (s.sq * s.heads + s.sk * s.kv_heads) * s.slice_dim * s.elem_bytes


# ---------------------------------------------------------------- KV cache layouts (decode)
KV_CACHES = ("auto", "dims", "positions")


def decode_context(prompt: int, new_tokens: int) -> int:
    """The mean context length of a generation's decode steps, at which `auto` picks the
    cache (one choice for the whole run: both caches hold every position)."""
    return prompt + (new_tokens + 1) // 2


def position_cache_collectives(s: ScoreShape):
    """[(op, payload bytes)] of one call through the position-sharded KV cache
    (attention/position_cache.py): all-gather of the new q, k, v dims, all-gather of the fp32
    log-sum-exps, reduce-scatter of the weighted fp32 partial outputs. None depends on s_k."""
    m, d = s.dim_slices, s.slice_dim * s.dim_slices
    if m == 1:
        return []
    return [("all_gather", s.sq * s.batch * (s.heads + 2 * s.kv_heads) * d * s.elem_bytes),
            ("all_gather", m * s.batch * s.heads * s.sq * 4),
            ("reduce_scatter", s.sq * s.batch * s.heads * d * 4)]


def cached_call_collectives(schedule: str, kv_cache: str, s: ScoreShape):
    """[(op, payload)] over the dim-slice group of one inference call with a KV cache holding
    s.sk - s.sq earlier positions. `kv_cache` is resolved (dims | positions)."""
    if kv_cache != "positions" or s.dim_slices == 1:
        return collectives(choose(schedule, s), s)
    if s.sq > 1 and s.sq == s.sk:  # prefill into an empty cache: the layer's schedule
        chosen = choose(schedule, s)
        fill = [] if chosen == "seq" else [  # seq hands over its gathered K/V
            ("all_gather", s.sk * s.batch * s.kv_heads * s.slice_dim * s.dim_slices *
             s.elem_bytes)] * 2
        return collectives(chosen, s) + fill
    return position_cache_collectives(s)


def choose_kv_cache(kv_cache: str, schedule: str, s: ScoreShape) -> str:
    """The KV cache layout of a run. `auto`: positions when a decode step at s.sk keys (one
    query) sends fewer bytes through it than through the dim-sliced cache (whose score
    all-reduce grows with s_k; the crossover is a few dozen keys), else dims."""
    if kv_cache != "auto":
        return kv_cache
    if s.dim_slices == 1:
        return "dims"
    decode = ScoreShape(s.batch, s.heads, s.kv_heads, 1, s.sk, s.slice_dim, s.dim_slices,
                        s.elem_bytes)
    cost = {name: sum(sent_bytes(op, size, s.dim_slices)
                      for op, size in cached_call_collectives(schedule, name, decode))
            for name in ("dims", "positions")}
    return "positions" if cost["positions"] < cost["dims"] else "dims"

