"""MLA inference on the grid: the latent KV cache sharded by position over all n*m ranks, with
absorbed queries (docs/design.md, "MLA decode: the latent cache by position").

MLA caches, per token and layer, one latent shared by all heads: c (kv_lora_rank, L) and the
RoPE key k_pe (qk_pos_emb_head_dim, r). Tensor parallelism cannot split it (every TP rank's
heads read all of it), so each TP rank holds the whole latent cache. Here rank t of the n*m
grid keeps the latents of the positions p with p % (n*m) == t: 1/(n*m) of TP's cache. With the
up-projections absorbed (score = (W_UK^T q_nope) . c + q_pe . k_pe, output = W_UV (sum_p a_p
c_p)), a step with s_q new tokens on rank (i, j):

1. the down-projections as megatron has them: every rank has the new tokens' latents (the
   owners append theirs) and its own head group's query dims j, from which it computes the
   absorbed query's partial q_nope[j] W_UK[j] [h/n, L] and takes its RoPE dims j [h/n, r/m];
2. one all-gather over the n*m ranks: every rank sums the partials of each head group over
   its m slices, which gives it the absorbed queries of all h heads [h, L + r];
3. every rank attends all h heads to its own positions (one latent of L + r dims is the key of
   every head, its first L dims the value): a partial latent output and its log-sum-exp (fp32);
4. one all-to-all over the n*m ranks: rank t sends rank (i', j') head group i''s partial
   latent outputs with their log-sum-exps (b*h/n*s_q*(L + 1) fp32 per destination); the
   receiver weighs the n*m pieces, exact as in position_cache.py, applies its W_UV slice
   [h/n, v/m, L] and hands linear_proj the value dims j of its heads, as in training.

Two collectives per layer and step, whose bytes do not depend on the context. A prefill into
an empty cache runs the layer's own schedule instead (O(s) memory; mla.py); a later prefill
chunk takes the steps above with a causal mask over positions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_mxn.attention import kernels
from megatron_mxn.attention.collectives import exchange_head_groups_with_lse
from megatron_mxn.attention.mask import MaskSpec
from megatron_mxn.attention.position_cache import PositionShardedCache
from megatron_mxn.attention.schedules import KVCache
from megatron_mxn.grid.layout import MxnConfigError


class LatentPositionsCache(KVCache):
    """The name generate() reports for MLA on the grid (not selectable: MLA has one cache)."""

    name = "latent-positions"
    label = " KV-by-position"  # (MLA's KV cache is its latent; the layout names as positions')

    def held(self, context: int, head_dim: int, dim_slices: int):
        raise NotImplementedError("the latent cache is sized by latent_cache_bytes")


LATENT_POSITIONS = LatentPositionsCache()


def latent_cache_rows(max_seq: int, world: int) -> int:
    """Positions of a context of max_seq that the rank with the most of them keeps."""
    return -(-max_seq // world)


def latent_cache_bytes(max_seq: int, batch: int, latent_dim: int, world: int,
                       element_size: int) -> int:
    """One layer's latent cache on one rank: ceil(max_seq/(n*m)) x batch x (L + r)."""
    return latent_cache_rows(max_seq, world) * batch * latent_dim * element_size


def check_kv_cache_request(requested: Optional[str]) -> None:
    """MLA on the grid has one KV cache (the latent by position); an explicit `dims` (the
    dim-sliced up-projected K/V) is refused, not ignored."""
    if requested not in (None, "auto", "positions", LATENT_POSITIONS.name):
        raise MxnConfigError(
            f"mxn_kv_cache={requested!r}: MLA on the grid keeps only the latent KV cache sharded "
            "by position (use auto or positions)")


def latent_cache(context, layer_number: int, latent_dim: int, world: int, rank: int,
                 dtype: torch.dtype, device) -> PositionShardedCache:
    """This layer's latent cache in megatron's static inference context (created on first
    use, sized for the context's whole length and batch)."""
    caches = context.key_value_memory_dict
    if layer_number not in caches:
        caches[layer_number] = PositionShardedCache(
            context.max_sequence_length, context.max_batch_size, 1, latent_dim, world, rank,
            dtype, device, values=False)
    return caches[layer_number]


@torch.no_grad()
def gather_absorbed_queries(q_absorbed: torch.Tensor, q_pe: torch.Tensor, group,
                            head_groups: int) -> torch.Tensor:
    """q_absorbed [sq, b, h/n, L] (this rank's partial over its query dims) and q_pe
    [sq, b, h/n, r/m] (its RoPE dims) -> the absorbed queries of all heads [b, h, sq, L + r]
    (RoPE dims in slice order, as the cached keys), in one all-gather over the n*m ranks."""
    world = dist.get_world_size(group)
    m = world // head_groups
    sq, b, hn, latent = q_absorbed.shape
    mine = torch.cat([q_absorbed, q_pe.to(q_absorbed.dtype)], dim=-1).contiguous()
    out = mine.new_empty((world * sq, *mine.shape[1:]))
    dist.all_gather_into_tensor(out, mine, group=group)
    out = out.view(head_groups, m, sq, b, hn, -1)  # tp rank = i*m + j
    absorbed = out[..., :latent].float().sum(dim=1).to(mine.dtype)  # [n, sq, b, hn, L]
    absorbed = absorbed.permute(2, 0, 3, 1, 4).reshape(b, head_groups * hn, sq, latent)
    pe = out[..., latent:].permute(3, 0, 4, 2, 1, 5)  # [b, n, hn, sq, m, r/m]
    pe = pe.reshape(b, head_groups * hn, sq, -1)
    return torch.cat([absorbed, pe], dim=-1)


@torch.no_grad()
def latent_position_attention(queries: torch.Tensor, latent: torch.Tensor,
                              cache: PositionShardedCache, start: int, batch: slice, group,
                              head_groups: int, latent_dim: int, scale: float,
                              mask: MaskSpec) -> torch.Tensor:
    """queries [b, h, sq, L + r] (all heads, absorbed, gather_absorbed_queries), latent
    [sq, b, L + r] (the new tokens' c and rotated k_pe, positions start .. start+sq-1) ->
    this rank's head group's latent output [sq, b, h/n, L] (fp32), exactly combined."""
    sq = queries.size(2)
    cache.store(latent.unsqueeze(2), None, start, batch)
    own, _, masked = cache.visible(mask, sq, start + sq, batch)  # [own, b, 1, L + r]
    own = own.permute(1, 2, 0, 3)
    # the value of every head is the latent's first L dims: attend to the whole latent, keep L
    partial, lse = kernels.attention_with_lse(queries, own, own, scale=scale, mask=masked)
    pieces, lses = exchange_head_groups_with_lse(partial[..., :latent_dim], lse, group,
                                                 head_groups)
    return kernels.merge_partials(pieces, lses).permute(2, 0, 1, 3)  # [sq, b, h/n, L]
