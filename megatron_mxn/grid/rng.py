"""One attention-dropout RNG stream per head group, shared by its m dim-slice ranks.

megatron forks attention dropout from the model-parallel stream, seeded per TP rank. On the
grid the m ranks of a head group each hold a slice of the same probabilities P_i, so they must
drop the same entries: their stream is seeded from the data-parallel seed (identical on every
TP rank) plus the head-group index.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

HEAD_GROUP_RNG = "mxn-head-group-rng"
SEED_OFFSET = 31415  # apart from megatron's +2718 (TP) and +1024 (expert) stream offsets


def head_group_seed(head_group_index: int) -> int:
    """The seed of head group i's stream. `torch.cuda.initial_seed()` is the seed megatron's
    model_parallel_cuda_manual_seed gave the default generator (CPU mode maps it to the CPU
    generator)."""
    return torch.cuda.initial_seed() + SEED_OFFSET + head_group_index


def head_group_rng_fork(head_group_index: int):
    """Context manager forking head group i's stream; adds it to megatron's RNG tracker on
    first use and again after megatron reseeds (which resets the tracker)."""
    tracker = get_cuda_rng_tracker()
    if HEAD_GROUP_RNG not in tracker.get_states():
        tracker.add(HEAD_GROUP_RNG, head_group_seed(head_group_index))
    return tracker.fork(HEAD_GROUP_RNG)
