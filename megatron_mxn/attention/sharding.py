"""dist_checkpointing for grid-sharded attention weights, under megatron's TP keys and shapes.

A grid rank holds a regular but non-contiguous set of rows of linear_qkv (columns of
linear_proj). Saved as a ShardedTensorFactory whose build step emits one ShardedTensor per
aligned contiguous chunk, all under the standard key and global shape, a checkpoint written
under any grid or TP size loads under any other.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def grid_sharded_factory(original: ShardedTensor, indices: Sequence[int], chunk: int, axis: int,
                         sharded_offsets: Tuple[Tuple[int, int, int], ...] = ()
                         ) -> ShardedTensorFactory:
    """Re-express megatron's TP shard `original` as the grid shard whose local slices along
    `axis` are the global `indices` (in local order), cut into aligned runs of `chunk`."""
    prepend = len(sharded_offsets)
    total = original.global_shape[prepend + axis]
    starts: List[int] = [indices[b] for b in range(0, len(indices), chunk)]
    if indices != [s + k for s in starts for k in range(chunk)]:
        raise AssertionError(f"{original.key}: grid indices are not aligned runs of {chunk}")

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        return [
            ShardedTensor.from_rank_offsets(
                key, data.narrow(axis, b * chunk, chunk), *sharded_offsets,
                (prepend + axis, start // chunk, total // chunk),
                replica_id=replica_id, prepend_axis_num=prepend)
            for b, start in enumerate(starts)
        ]

    def merge(pieces):
        return torch.cat(pieces, dim=axis)

    return ShardedTensorFactory(original.key, original.data, build, merge, original.replica_id)


def shard_grid_weights(sd: dict, prefix: str, entries, sharded_offsets=()) -> dict:
    """Replace, in a module's sharded state dict `sd`, each present `prefix + name` of
    `entries` ((name, this rank's indices, chunk, axis), as the grid layout gives them) by its
    grid-shaped factory: megatron's keys and global shapes, the grid's shards."""
    for name, indices, chunk, axis in entries:
        key = prefix + name
        if key in sd:
            sd[key] = grid_sharded_factory(sd[key], indices, chunk, axis, sharded_offsets)
    return sd
