"""megatron's HybridModel (`--hybrid-layer-pattern`) from Megatron's args, with the grid: the
model config and a builder that puts the grid's hybrid stack spec in.

Imports megatron.training at the top: import it only for hybrid models."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from megatron.training.argument_utils import hybrid_config_from_args
from megatron.training.models.hybrid import HybridModelBuilder, HybridModelConfig

from megatron_mxn.attention.hybrid_spec import check_hybrid_pattern, get_mxn_hybrid_stack_spec
from megatron_mxn.attention.self_attention import model_rotary_percent
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.grid_groups import join_grid_groups
from megatron_mxn.megatron_lm.model_config import (
    check_grid_options,
    mxn_transformer_config_from_args,
)


def mxn_hybrid_config_from_args(args) -> "MxnHybridModelConfig":
    """Megatron's HybridModelConfig from args, with MxnTransformerConfig and the grid's builder.
    Refuses, before any collective, what the grid or this machine cannot run (no pattern; Mamba
    layers without CUDA)."""
    if not getattr(args, "hybrid_layer_pattern", None):
        raise MxnConfigError("a hybrid model needs --hybrid-layer-pattern (e.g. '*-*-': "
                             "attention '*', MLP '-', MoE 'E', Mamba 'M')")
    check_hybrid_pattern(args.hybrid_layer_pattern)
    config = mxn_transformer_config_from_args(args)
    check_grid_options(args, config)
    if getattr(args, "mxn_tp_core", "megatron") != "megatron":
        raise MxnConfigError("--mxn-tp-core fused is for GPT models; hybrid models run "
                             "megatron's core under plain TP")
    if config.mxn_dim_slices > 1 and getattr(args, "spec", None) is not None:
        raise MxnConfigError(
            f"--spec {' '.join(args.spec)} would replace the grid's hybrid stack spec, so no "
            "layer would run the grid attention; leave --spec out (the grid builds its own "
            "stack spec from --hybrid-layer-pattern)")
    return hybrid_config_from_args(args, config=config, model_config_cls=MxnHybridModelConfig)


def hybrid_stack_spec_for(model_config: HybridModelConfig):
    """The grid's hybrid stack spec for a HybridModelConfig (m from its MxnTransformerConfig;
    Transformer Engine modules when the config asks for them)."""
    t = model_config.transformer
    m = getattr(t, "mxn_dim_slices", 1)
    rotary = model_rotary_percent(model_config.position_embedding_type,
                                  model_config.rotary_percent)
    return get_mxn_hybrid_stack_spec(
        dim_slices=m, rotary_percent=rotary, qk_layernorm=t.qk_layernorm,
        normalization=t.normalization, moe_grouped_gemm=t.moe_grouped_gemm,
        use_te=t.transformer_impl == "transformer_engine",
        hybrid_layer_pattern=model_config.hybrid_layer_pattern)


class MxnHybridModelBuilder(HybridModelBuilder):
    """megatron's HybridModelBuilder, after adding the grid's sub-groups (join_grid_groups), on
    the grid's hybrid stack spec when the config names none (megatron's default, the stock
    spec, needs Transformer Engine and has no grid)."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        join_grid_groups(self._model_config.transformer)
        if self._model_config.hybrid_stack_spec is None:
            self._model_config.hybrid_stack_spec = hybrid_stack_spec_for(self._model_config)
        return super().build_model(pg_collection, pre_process, post_process, vp_stage)


@dataclasses.dataclass(kw_only=True)
class MxnHybridModelConfig(HybridModelConfig):
    """HybridModelConfig built by MxnHybridModelBuilder (Megatron's loop builds the model through
    the config's `builder` path)."""

    builder: ClassVar[str] = "megatron_mxn.megatron_lm.hybrid_config.MxnHybridModelBuilder"
