"""The grid's TransformerConfig and layer spec from Megatron's args, and the grid's process
groups added to Megatron's parallel_state when the model is built."""

from __future__ import annotations

from typing import Optional

from megatron_mxn.attention import options
from megatron_mxn.grid.layout import MxnConfigError


def mxn_transformer_config_from_args(args, config_class=None):
    """megatron's TransformerConfig from args, as an MxnTransformerConfig (head counts checked
    against the head groups n, not the TP size). Drop-in for core_transformer_config_from_args;
    `config_class` is accepted for that signature and must be None."""
    if config_class is not None:
        raise MxnConfigError("the grid builds its own TransformerConfig subclass")
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_mxn.attention.config import MxnTransformerConfig

    return core_transformer_config_from_args(args, config_class=MxnTransformerConfig)


def mxn_gpt_config_from_args(args, model_config_cls=None):
    """Megatron's GPTModelConfig from args, with the grid: MxnTransformerConfig and a layer
    spec callable that swaps in the grid attention (megatron's default spec otherwise)."""
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelConfig

    config = mxn_transformer_config_from_args(args)
    check_grid_options(args, config)
    cfg = gpt_config_from_args(args, config=config,
                               model_config_cls=model_config_cls or GPTModelConfig)
    if args.mxn_dim_slices > 1:
        cfg.transformer_layer_spec = GridLayerSpec(args.mxn_head_groups, args.mxn_dim_slices,
                                                   cfg.transformer_layer_spec)
    return cfg


def check_grid_options(args, config) -> None:
    """Refuse, before any collective, what the grid attention does not compute exactly: every
    TransformerConfig option (megatron_mxn.attention.options.check_config) and the model's
    position embedding. Includes --attention-backend local, for which megatron.training's
    GPTModelBuilder would swap the grid's core attention for megatron's DotProductAttention.
    With m = 1 the layers are megatron-core's own attention: nothing to check."""
    if getattr(config, "mxn_dim_slices", 1) <= 1:
        return
    options.check_model(config, position_embedding_type=args.position_embedding_type)
    options.check_config(config)


class GridLayerSpec:
    """`GPTModelConfig.transformer_layer_spec` callable: on first use (right after Megatron's
    initialization, when the model is built) adds the grid sub-groups to parallel_state and
    logs the layout; then returns the base spec with the grid attention."""

    def __init__(self, head_groups: int, dim_slices: int, base=None):
        self.head_groups, self.dim_slices, self.base = head_groups, dim_slices, base

    def __call__(self, model_config, vp_stage: Optional[int] = None):
        from megatron.training.models.gpt import default_layer_spec

        from megatron_mxn.grid.groups import mxn_parallel_is_initialized
        from megatron_mxn.attention.self_attention import model_rotary_percent
        from megatron_mxn.attention.spec import get_mxn_layer_spec

        if not mxn_parallel_is_initialized():
            initialize_grid_after_megatron(self.head_groups, self.dim_slices)
        base = self.base
        if base is None:
            base = default_layer_spec(model_config, vp_stage)
        elif callable(base) and not hasattr(base, "submodules"):
            base = base(model_config)
        rotary = model_rotary_percent(model_config.position_embedding_type,
                                      model_config.rotary_percent)
        return get_mxn_layer_spec(base, dim_slices=self.dim_slices, rotary_percent=rotary)


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
