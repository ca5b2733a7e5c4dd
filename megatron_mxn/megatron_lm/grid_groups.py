"""The grid's process groups inside Megatron's: added to parallel_state after Megatron has
initialized its own (by the model builders, first thing, and by the generation entry point),
and the layout line printed at start-up. Imports no megatron at the top."""

from __future__ import annotations


def join_grid_groups(transformer_config) -> None:
    """Add the grid's sub-groups to Megatron's parallel_state, once, for a config with m > 1.
    Megatron's pretrain() initializes its own groups after the model config is made and before
    it builds the model; the model builders (MxnGPTModelBuilder, the hybrid one) call this
    first thing, so the groups exist before any layer spec or layer is made (pure specs)."""
    from megatron_mxn.grid.groups import mxn_parallel_is_initialized

    m = getattr(transformer_config, "mxn_dim_slices", 1)
    if m > 1 and not mxn_parallel_is_initialized():
        initialize_grid_after_megatron(transformer_config.tensor_model_parallel_size // m, m)


def initialize_grid_after_megatron(head_groups: int, dim_slices: int, announce: bool = True):
    """Add the grid sub-groups to Megatron's initialized parallel_state; print the layout."""
    import torch.distributed as dist

    from megatron_mxn.grid.groups import grid_groups_of, initialize_mxn_parallel

    pgs = initialize_mxn_parallel(head_groups, dim_slices)
    if announce and dist.get_rank() == 0:
        print(describe_grid(grid_groups_of(pgs)), flush=True)
    return pgs


def describe_grid(grid) -> str:
    """One line: the grid and which global ranks share a dim-slice / head-group group."""
    n, m = grid.head_groups, grid.dim_slices
    slices = [list(grid.tp_global_ranks[i * m:(i + 1) * m]) for i in range(n)]
    heads = [list(grid.tp_global_ranks[j::m]) for j in range(m)]
    return (f"> mxn grid: {n} head groups x {m} dim slices = TP {n * m}; in the TP group of "
            f"rank 0, dim-slice groups (score all-reduce, keep within a node) {slices}, "
            f"head-group groups {heads}")
