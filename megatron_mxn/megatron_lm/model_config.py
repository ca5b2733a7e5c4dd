"""The grid's TransformerConfig and layer spec from Megatron's args.

Imports no megatron at the top (the entry points import it before installing CPU mode)."""

from __future__ import annotations

from typing import Optional

from megatron_mxn.attention import options
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.patching import override

override("megatron.training.argument_utils.core_transformer_config_from_args",
         "megatron.training from megatron-core 0.19.x",
         "it builds an MLATransformerConfig for --multi-latent-attention whatever config class "
         "it is given (read from megatron.core.transformer when called): "
         "mxn_transformer_config_from_args has it read MxnMLATransformerConfig there for the "
         "duration of the call", "0caf9151ab54")


def mxn_transformer_config_from_args(args, config_class=None):
    """megatron's TransformerConfig from args, as an MxnTransformerConfig (head counts checked
    against the head groups n, not the TP size), or with --multi-latent-attention an
    MxnMLATransformerConfig. Drop-in for core_transformer_config_from_args; `config_class` is
    accepted for that signature and must be None."""
    if config_class is not None:
        raise MxnConfigError("the grid builds its own TransformerConfig subclass")
    import megatron.core.transformer as transformer
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_mxn.attention.config import MxnMLATransformerConfig, MxnTransformerConfig

    if not getattr(args, "multi_latent_attention", False):
        return core_transformer_config_from_args(args, config_class=MxnTransformerConfig)
    # megatron picks MLATransformerConfig for MLA, importing it from megatron.core.transformer
    # when called: the grid's subclass there for the call (its fields, incl. mxn_*, from args)
    stock = transformer.MLATransformerConfig
    transformer.MLATransformerConfig = MxnMLATransformerConfig
    try:
        config = core_transformer_config_from_args(args, config_class=MxnTransformerConfig)
    finally:
        transformer.MLATransformerConfig = stock
    if not isinstance(config, MxnMLATransformerConfig):
        raise MxnConfigError("megatron.training did not build an MLA config for "
                             "--multi-latent-attention (a megatron.training change?)")
    # megatron's YaRN flags for MLA: MLATransformerConfig names three of them without the
    # yarn_ prefix, which megatron.training copies only for standard attention
    for flag, field in YARN_MLA_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config, field, value)
    return config


# --yarn-* flag (args attribute) -> MLATransformerConfig field
YARN_MLA_FIELDS = {"yarn_original_max_position_embeddings": "original_max_position_embeddings",
                   "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


def mxn_gpt_config_from_args(args, model_config_cls=None):
    """Megatron's GPTModelConfig from args, with the grid: MxnTransformerConfig, the grid's
    builder (MxnGPTModelConfig) and a layer spec callable that swaps in the grid attention."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_mxn.megatron_lm.gpt_builder import MxnGPTModelConfig

    config = mxn_transformer_config_from_args(args)
    check_grid_options(args, config)
    cfg = gpt_config_from_args(args, config=config,
                               model_config_cls=model_config_cls or MxnGPTModelConfig)
    fused_tp = getattr(args, "mxn_tp_core", "megatron") == "fused"  # (m = 1: flags.py)
    if args.mxn_dim_slices > 1 or config.multi_latent_attention or fused_tp:
        # (MLA at plain TP too: megatron's local spec gets the reference MLA core)
        cfg.transformer_layer_spec = GridLayerSpec(args.mxn_dim_slices,
                                                   cfg.transformer_layer_spec,
                                                   fused_tp=fused_tp)
    return cfg


def check_grid_options(args, config) -> None:
    """Refuse, before any collective, what the grid attention does not compute exactly: every
    TransformerConfig option (megatron_mxn.attention.options.check_config) and the model's
    position embedding. Includes --attention-backend local, for which megatron.training's
    GPTModelBuilder would swap the grid's core attention for megatron's DotProductAttention.
    With m = 1 the layers are megatron-core's own attention: nothing to check, except that MLA
    without Transformer Engine needs the reference MLA core (GridLayerSpec puts it in), which
    --attention-backend local would replace by megatron's DotProductAttention (it cannot build
    MLA). MLA on the grid: also MLATransformerConfig's options (options.check_mla_config)."""
    mla = getattr(config, "multi_latent_attention", False)
    if mla and getattr(config, "mxn_dim_slices", 1) <= 1 and \
            str(getattr(args, "attention_backend", "")).endswith("local") and \
            getattr(args, "transformer_impl", "local") != "transformer_engine":
        raise MxnConfigError(
            "--multi-latent-attention with --attention-backend local: megatron-core's local "
            "DotProductAttention cannot build MLA (no k_channels/v_channels); leave the "
            "attention backend to the entry point, which uses the reference MLA core")
    if getattr(config, "mxn_dim_slices", 1) <= 1:
        return
    options.check_model(config, position_embedding_type=args.position_embedding_type)
    options.check_config(config)
    if mla:
        options.check_mla_config(config)


class GridLayerSpec:
    """`GPTModelConfig.transformer_layer_spec` callable: the base spec (megatron's default for
    the config when none) with the grid attention, or (fused_tp, m = 1) with megatron's
    attention on the fused core. For MLA, megatron's local MLA core (which cannot build MLA)
    becomes the plugin's MlaDotProductAttention first (mla_core.with_mla_core), which the grid
    (m > 1) then replaces by its own. Pure: the builder made the groups first."""

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
        if model_config.transformer.multi_latent_attention:
            from megatron_mxn.attention.mla_core import with_mla_core

            base = with_mla_core(base, only_local=True)
        if self.fused_tp:  # (m = 1: megatron's attention, the fused core)
            return get_fused_tp_layer_spec(base)
        if self.dim_slices == 1:  # (MLA at plain TP: megatron's MLA, the reference core)
            return base
        rotary = model_rotary_percent(model_config.position_embedding_type,
                                      model_config.rotary_percent)
        return get_mxn_layer_spec(base, dim_slices=self.dim_slices, rotary_percent=rotary)
