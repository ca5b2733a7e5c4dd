"""The position-sharded KV cache: grid decode whose traffic does not grow with the context
(docs/design.md, "Position-sharded KV cache").

The dim-sliced cache (megatron's own layout on the grid: rank j keeps dims j of every position)
makes each decode step all-reduce B*(h/n)*s_k partial scores over the dim-slice group. Here rank
j of a dim-slice group keeps the full-d, rotated K and V of the positions p with p % m == j
(the same bytes). One step with s_q new tokens:

1. one all-gather over the dim-slice group turns this rank's dims of the new q, k, v into all
   dims; the owners of the new positions append their k and v;
2. every rank attends the queries to its own positions: a partial output O_j and its
   log-sum-exp L_j (fp32);
3. the exact combination O = sum_j exp(L_j - L) O_j with L = logsumexp_j L_j takes one
   all-to-all: rank j sends rank k dims k of O_j together with L_j (one fp32 block of
   b*h/n*s_q*(d/m + 1) floats per destination), and rank k weighs the m pieces it receives
   itself, which leaves it dims k of O: the layout linear_proj expects.

Two collectives per layer and step. The all-gather of step 1 cannot carry anything else: it
runs before attention, when nothing of the combination exists yet.

Bytes per layer and step: O(b*(h/n + 2g')*d), independent of s_k. A prefill into an empty cache
runs the layer's training schedule (core.prefill returns the K/V with all dims: the ones the
sequence-split core gathered, else one more all-gather); a later prefill chunk (s_q < s_k)
takes the steps above with a causal mask over positions.

Which cache a static inference context uses (this one or megatron's dim-sliced one) is kept
here, per context (kv_cache_of), not on megatron's context object.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region

from megatron_mxn.attention import kernels
from megatron_mxn.attention.collectives import exchange_dim_slices_with_lse
from megatron_mxn.attention.mask import MaskSpec
from megatron_mxn.attention.schedules import AUTO, KVCache, ScoreShape, decide_kv_cache


def owned_positions(length: int, shards: int, rank: int) -> int:
    """How many of the positions 0 .. length-1 rank `rank` of `shards` owns (p % shards ==
    rank)."""
    return max(0, (length - rank + shards - 1) // shards)


class PositionShardedCache:
    """One layer's K/V buffers on one rank: [ceil(max_seq/shards), max_batch, kv heads, d], of
    the positions p with p % shards == rank (shards: the m ranks of a dim-slice group; for
    MLA's latent all n*m ranks). values=False: keys only (MLA's latent is its own value)."""

    def __init__(self, max_seq: int, max_batch: int, kv_heads: int, head_dim: int,
                 shards: int, rank: int, dtype: torch.dtype, device, values: bool = True):
        self.shards, self.rank = shards, rank
        rows = -(-max_seq // shards)
        self.key = torch.empty(rows, max_batch, kv_heads, head_dim, dtype=dtype, device=device)
        self.value = torch.empty_like(self.key) if values else None

    def __iter__(self):  # (key, value), as megatron's cache entries (the buffers held)
        return iter((self.key,) if self.value is None else (self.key, self.value))

    def store(self, key: torch.Tensor, value: Optional[torch.Tensor], start: int,
              batch: slice) -> None:
        """key/value [s, b, kv heads, d] of positions start .. start+s-1: keep the owned ones
        (value None: a keys-only cache)."""
        m = self.shards
        first = (self.rank - start) % m  # first row of key that this rank owns
        rows = key[first::m]
        if rows.size(0):
            at = (start + first) // m
            self.key[at:at + rows.size(0), batch] = rows
            if self.value is not None:
                self.value[at:at + rows.size(0), batch] = value[first::m]

    def owned(self, length: int, batch: slice):
        """K, V [owned, b, kv heads, d] of this rank's positions among 0 .. length-1."""
        n = owned_positions(length, self.shards, self.rank)
        return self.key[:n, batch], None if self.value is None else self.value[:n, batch]

    def visible(self, mask: MaskSpec, sq: int, end: int, batch: slice):
        """(K, V [own, b, kv heads, d] of this rank's positions that the sq rows ending at
        position end-1 may see (a window leaves older ones out; a rank may own none), and the
        mask over them: None when one query sees every key of its band)."""
        m, j = self.shards, self.rank
        lo, hi = mask.key_range(sq, end)
        first, stop = owned_positions(lo, m, j), owned_positions(hi, m, j)
        key, value = self.owned(hi, batch)
        value = None if value is None else value[first:stop]
        masked = None
        if sq > 1 or mask.padding is not None:
            masked = mask.tensor(sq, stop - first, key.device, key_positions=torch.arange(
                first, stop, device=key.device) * m + j)
        return key[first:stop], value, masked


@torch.no_grad()
def position_sharded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               cache: PositionShardedCache, start: int, batch: slice, group,
                               scale: float, mask: MaskSpec,
                               sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """query [sq, b, hq, d/m], key/value [sq, b, hk, d/m] (this rank's dims of the new tokens at
    positions start .. start+sq-1, RoPE applied) -> output [sq, b, hq * d/m] (dims of this
    rank). mask: the new rows against positions 0 .. start+sq-1 (mask.py; q_offset = start).
    sink: [hq] attention-sink logits, one more term of the merged softmax's denominator."""
    sq, b, hq, dl = query.shape
    hk = key.size(2)
    qkv = all_gather_last_dim_from_tensor_parallel_region(  # [sq, b, hq+2hk, d], rank order
        torch.cat([query, key, value], dim=2), group=group)
    q, k, v = qkv.split([hq, hk, hk], dim=2)
    cache.store(k, v, start, batch)

    # This rank's share: its positions inside the rows' band, a partial output and its
    # log-sum-exp (fp32).
    k_own, v_own, masked = cache.visible(mask, sq, start + sq, batch)
    partial, lse = kernels.attention_with_lse(
        q.permute(1, 2, 0, 3), k_own.permute(1, 2, 0, 3), v_own.permute(1, 2, 0, 3),
        scale=scale, mask=masked)  # [b, hq, sq, d], [b, hq, sq]

    # Exact combination, in one all-to-all: rank k receives dims k of every O_i with its L_i
    # and weighs them by exp(L_i - L) itself, which leaves it dims k of O.
    pieces, lses = exchange_dim_slices_with_lse(  # [m, b, hq, sq, dl], [m, b, hq, sq]
        partial, lse, group)
    out = kernels.merge_partials(  # (the sink: once per head, not once per rank)
        pieces, lses, None if sink is None else sink.view(1, hq, 1)).permute(2, 0, 1, 3)
    return out.to(query.dtype).reshape(sq, b, hq * dl)


# ---------------------------------------------------------------- the KV cache of a context
@dataclass
class KVCacheRun:
    """The grid's KV cache of one static inference context: what was asked for and for which
    workload (generate() records them), and what its layers use (decided at their first call,
    then the same for every layer and step)."""

    requested: Optional[str] = None  # dims | positions | auto; None: the config's mxn_kv_cache
    batch: Optional[int] = None  # sequences per forward call (None: the context's maximum)
    prompt: Optional[int] = None  # the longest prompt (None: the context's whole length)
    new_tokens: int = 0
    chosen: Optional[KVCache] = None


class _PerContext:
    """{context: KVCacheRun} that neither keeps a context alive nor stores anything on it
    (megatron's StaticInferenceContext defines __eq__ and is unhashable: keyed by its id, the
    entry leaves with the context)."""

    def __init__(self):
        self._runs = {}

    def get(self, context) -> Optional[KVCacheRun]:
        entry = self._runs.get(id(context))
        return entry[1] if entry is not None and entry[0]() is context else None

    def set(self, context, run: KVCacheRun) -> KVCacheRun:
        key = id(context)

        def forget(ref, key=key):
            if self._runs.get(key, (None,))[0] is ref:
                del self._runs[key]

        self._runs[key] = (weakref.ref(context, forget), run)
        return run


_RUNS = _PerContext()


def request_kv_cache(context, kv_cache: Optional[str], batch: int, prompt: int,
                     new_tokens: int) -> None:
    """generate(): the KV cache asked for (None: the config's) and the run's workload
    (sequences per forward call, longest prompt, new tokens) of a new context."""
    _RUNS.set(context, KVCacheRun(kv_cache, batch, prompt, new_tokens))


def kv_cache_of(context, config, shape_of: Callable[[int], ScoreShape]) -> KVCache:
    """The KV cache of a static inference context, decided once (schedules.decide_kv_cache)
    for its recorded request and workload; a context nobody recorded (a megatron engine's) takes
    the config's mxn_kv_cache (default auto) for its whole length. shape_of(batch): the layer's
    ScoreShape of a call of `batch` sequences."""
    run = _RUNS.get(context) or _RUNS.set(context, KVCacheRun())
    if run.chosen is None:
        run.chosen = decide_kv_cache(
            run.requested or getattr(config, "mxn_kv_cache", AUTO),
            getattr(config, "mxn_attention", AUTO),
            shape_of(run.batch or context.max_batch_size),
            context.max_sequence_length if run.prompt is None else run.prompt, run.new_tokens)
    return run.chosen


def use_kv_cache(context, cache: KVCache) -> None:
    """Record the cache a layer with only one (MLA on the grid) runs in `context`."""
    run = _RUNS.get(context) or _RUNS.set(context, KVCacheRun())
    run.chosen = cache


def kv_cache_requested(context) -> Optional[str]:
    """The KV cache generate() asked for in `context` (None: none recorded)."""
    run = _RUNS.get(context)
    return None if run is None else run.requested


def kv_cache_used(context) -> Optional[str]:
    """The name of the KV cache the grid layers used in `context` (None: no grid layer with
    m > 1 ran in it)."""
    run = _RUNS.get(context)
    return run.chosen.name if run is not None and run.chosen is not None else None
