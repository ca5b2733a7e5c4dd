"""The sequence-split core: exact attention of one head group with O(s) memory and no
redundant softmax (docs/design.md, "Sequence-split core").

Rank j of a dim-slice group holds dims j of every token's q/k/v. For the core, the group trades
the dim split for a sequence split: an all-to-all gives rank j all dims of its query tokens
(2m zig-zag chunks of the sequence, rank j taking chunks j and 2m-1-j, so causal work is
balanced), K and V are all-gathered along the head dim, a fused kernel attends the local
queries to all keys, and a second all-to-all returns dims j of every token's output (the
layout linear_proj expects). Backward: the reverse all-to-alls and a reduce-scatter of dK, dV.

A length that 2m does not divide is cut into chunks whose sizes differ by one (the all-to-alls
carry per-rank row counts); chunks may be empty when the sequence is shorter than 2m.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region

from megatron_mxn.attention import kernels
from megatron_mxn.attention.collectives import all_to_all_rows
from megatron_mxn.attention.mask import MaskSpec


def chunk_bounds(length: int, dim_slices: int) -> List[int]:
    """Start of each of the 2m zig-zag chunks (and the end): sizes differ by at most one."""
    parts = 2 * dim_slices
    return [k * length // parts for k in range(parts + 1)]


def owned_chunks(rank: int, dim_slices: int):
    """The two chunks rank j computes: j and 2m-1-j (early and late positions)."""
    return rank, 2 * dim_slices - 1 - rank


def seq_split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        group: dist.ProcessGroup, *, scale: float, mask: MaskSpec,
                        dropout_p: float = 0.0, sink: Optional[torch.Tensor] = None,
                        backend: str = "auto", return_kv: bool = False):
    """query [sq, b, hq, d/m], key/value [sk, b, hk, d/m] (this rank's dims) -> the attention
    output [sq, b, hq, d/m] (this rank's dims; value's own when they differ: MLA). mask: of
    the sq rows against the sk keys (mask.py; each chunk takes its rows, the kernel cuts the
    keys to the chunk's band). sink: [hq] attention-sink logits. return_kv: return (output,
    (k, v)) with the all-gathered K/V [sk, b, hk, d] (a prefill fills the position-sharded KV
    cache from them)."""
    m, j = dist.get_world_size(group), dist.get_rank(group)
    sq, b, hq, dl = query.shape
    bounds = chunk_bounds(sq, m)
    chunks = [(bounds[a], bounds[a + 1]) for a in range(2 * m)]
    rows_of = [[chunks[a] for a in owned_chunks(r, m)] for r in range(m)]
    counts = [sum(e - s for s, e in rows_of[r]) for r in range(m)]
    order = torch.cat([torch.arange(s, e, device=query.device)
                       for r in range(m) for s, e in rows_of[r]])

    # Q: my dims of rank r's tokens go to rank r; I receive every rank's dims of mine.
    q = all_to_all_rows(query.index_select(0, order), group, counts, [counts[j]] * m)
    q = q.view(m, counts[j], b, hq, dl).permute(1, 2, 3, 0, 4).reshape(counts[j], b, hq, m * dl)
    k = all_gather_last_dim_from_tensor_parallel_region(key.contiguous(), group=group)
    v = all_gather_last_dim_from_tensor_parallel_region(value.contiguous(), group=group)
    gathered = k, v
    k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, hk, sk, d]

    outs, start = [], 0
    for s, e in rows_of[j]:
        q_chunk = q[start:start + e - s].permute(1, 2, 0, 3)  # [b, hq, rows, d]
        start += e - s
        outs.append(kernels.attention(q_chunk, k, v, scale=scale, mask=mask.rows(s, e),
                                      dropout_p=dropout_p, sink=sink, backend=backend))
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3)  # [my tokens, b, hq, d]

    # O: dims r of my tokens go back to rank r; I receive dims j of every token (order).
    dv = value.size(-1)  # (MLA: another head dim than q/k)
    out = out.reshape(counts[j], b, hq, m, dv).permute(3, 0, 1, 2, 4).reshape(-1, b, hq, dv)
    out = all_to_all_rows(out, group, [counts[j]] * m, counts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(sq, device=order.device)
    out = out.index_select(0, inverse)
    return (out, gathered) if return_kv else out
