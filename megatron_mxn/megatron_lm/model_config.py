"""The grid's TransformerConfig and layer spec from Megatron's args.

Imports no megatron at the top (the entry points import it before installing CPU mode)."""

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
    """Megatron's GPTModelConfig from args, with the grid: MxnTransformerConfig, the grid's
    builder (MxnGPTModelConfig) and a layer spec callable that swaps in the grid attention."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_mxn.megatron_lm.gpt_builder import MxnGPTModelConfig

    config = mxn_transformer_config_from_args(args)
    check_grid_options(args, config)
    cfg = gpt_config_from_args(args, config=config,
                               model_config_cls=model_config_cls or MxnGPTModelConfig)
    if args.mxn_dim_slices > 1:
        cfg.transformer_layer_spec = GridLayerSpec(args.mxn_dim_slices,
                                                   cfg.transformer_layer_spec)
    elif getattr(args, "mxn_tp_core", "megatron") == "fused":
        cfg.transformer_layer_spec = GridLayerSpec(1, cfg.transformer_layer_spec,
                                                   fused_tp=True)
    return cfg


def check_grid_options(args, config) -> None:
    """Refuse, before any collective, what the grid attention does not compute exactly: every
    TransformerConfig option (megatron_mxn.attention.options.check_config) and the model's
    position embedding. Includes --attention-backend local, for which megatron.training's
    GPTModelBuilder would swap the grid's core attention for megatron's DotProductAttention.
    With m = 1 the layers are megatron-core's own attention: nothing to check."""
    if getattr(args, "multi_latent_attention", False) and getattr(args, "mxn_dim_slices", 1) > 1:
        # (megatron.training builds an MLATransformerConfig for MLA, whatever config class it
        # is given: the config carries no grid fields)
        raise MxnConfigError(
            "multi_latent_attention=True is not supported by the grid's Megatron-LM entry "
            "points yet (their MLA config and flags are issue 20's later parts); the Python API "
            "runs MLA on the grid: MxnMLATransformerConfig + get_mxn_layer_spec")
    if getattr(config, "mxn_dim_slices", 1) <= 1:
        return
    options.check_model(config, position_embedding_type=args.position_embedding_type)
    options.check_config(config)


class GridLayerSpec:
    """`GPTModelConfig.transformer_layer_spec` callable: the base spec (megatron's default for
    the config when none) with the grid attention, or (fused_tp, m = 1) with megatron's
    attention on the fused core. Pure: the builder made the groups first."""

    def __init__(self, dim_slices: int, base=None, fused_tp: bool = False):
        self.dim_slices, self.base, self.fused_tp = dim_slices, base, fused_tp

    def __call__(self, model_config, vp_stage: Optional[int] = None):
        from megatron.training.models.gpt import default_layer_spec

        from megatron_mxn.attention.self_attention import model_rotary_percent
        from megatron_mxn.attention.spec import get_fused_tp_layer_spec, get_mxn_layer_spec

        base = self.base
        if base is None:
            base = default_layer_spec(model_config, vp_stage)
        elif callable(base) and not hasattr(base, "submodules"):
            base = base(model_config)
        if self.fused_tp:  # (m = 1: megatron's attention, the fused core)
            return get_fused_tp_layer_spec(base)
        rotary = model_rotary_percent(model_config.position_embedding_type,
                                      model_config.rotary_percent)
        return get_mxn_layer_spec(base, dim_slices=self.dim_slices, rotary_percent=rotary)
