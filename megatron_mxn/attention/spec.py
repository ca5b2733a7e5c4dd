"""Layer specs: megatron-core's GPT specs with self-attention replaced by the grid attention."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mxn.attention import hooks, options
from megatron_mxn.attention.layer_specs import layer_specs, module_class
from megatron_mxn.attention.self_attention import MxnSelfAttention
from megatron_mxn.attention.core import MxnDotProductAttention
from megatron_mxn.attention.mla import grid_mla_attention_spec
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.grid.groups import get_grid, mxn_parallel_is_initialized
from megatron_mxn.attention.qk_norm import SlicedHeadNorm


def get_mxn_layer_spec(base_spec, dim_slices: Optional[int] = None, rotary_percent: float = 1.0):
    """Return `base_spec` (a GPT layer ModuleSpec, a TransformerBlockSubmodules, or a block
    ModuleSpec) with every self-attention replaced by the grid attention (megatron's MLA
    self-attention by the grid's MLA, attention/mla.py).

    dim_slices: m; defaults to the initialized grid's. With m = 1 the grid is plain TP: standard
    self-attention stays megatron-core's own; MLA still becomes the grid's (n head groups, the
    latent cache sharded by position over the n ranks, and the gradients megatron's MLA at
    TP > 1 gets wrong made right: docs/design.md section 7).
    rotary_percent: the model's RoPE fraction (0 for models without RoPE); it fixes which head
    dims each slice holds so that RoPE pairs stay on one rank.
    Installs the grid attention's hooks (megatron_mxn.attention.hooks.install).
    """
    hooks.install()
    if dim_slices is None:
        if not mxn_parallel_is_initialized():
            raise MxnConfigError("pass dim_slices or call initialize_mxn_parallel first")
        dim_slices = get_grid().dim_slices
    spec = copy.deepcopy(base_spec)
    try:
        layers = layer_specs(spec)
    except MxnConfigError:
        if dim_slices == 1:  # (m = 1 changes only MLA layers of the specs it knows)
            return spec
        raise
    for layer in layers:
        attn = getattr(layer.submodules, "self_attention", None)
        module = module_class(attn)
        if isinstance(module, type) and issubclass(module, MLASelfAttention):
            layer.submodules.self_attention = grid_mla_attention_spec(attn)
            continue
        if dim_slices == 1:
            continue
        if not (isinstance(module, type) and issubclass(module, SelfAttention)):
            raise MxnConfigError(f"the layer spec's self_attention ({module}) is neither "
                                 "megatron-core's SelfAttention nor its MLASelfAttention; the "
                                 "grid replaces only those")
        _check_replaceable(module, attn.submodules.core_attention)
        sub = copy.copy(attn.submodules)
        sub.core_attention = MxnDotProductAttention
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(sub, name) not in (None, IdentityOp):
                setattr(sub, name, SlicedHeadNorm)
        layer.submodules.self_attention = ModuleSpec(
            module=MxnSelfAttention, params={**attn.params, "rotary_percent": rotary_percent},
            submodules=sub)
    return spec


# The core attentions the grid's core reproduces exactly: megatron-core's own.
_STOCK_CORES = {("megatron.core.transformer.dot_product_attention", "DotProductAttention"),
                ("megatron.core.extensions.transformer_engine", "TEDotProductAttention")}


def _check_replaceable(module, core) -> None:
    """The grid replaces megatron-core's SelfAttention and core attention by its own, which
    compute the same: a subclass or another core (say one with attention-logit soft-capping, or
    Kitchen's) would silently not run, so it is refused."""
    if module is not SelfAttention and not issubclass(module, MxnSelfAttention):
        raise MxnConfigError(
            f"the layer spec's self_attention is {module.__qualname__}, a subclass of "
            "megatron-core's SelfAttention: the grid would replace it (and whatever it "
            "changes) by its own; it replaces only SelfAttention itself")
    if not options.is_stock_core(core, _STOCK_CORES, MxnDotProductAttention):
        raise MxnConfigError(
            f"the layer spec's core_attention ({getattr(core, '__qualname__', core)}) is not "
            "megatron-core's DotProductAttention or TEDotProductAttention: the grid would "
            "replace it by its own core and whatever it computes differently would silently "
            "not run")


def get_fused_tp_layer_spec(base_spec):
    """`base_spec` (as get_mxn_layer_spec takes it) for plain TP (m = 1) with megatron-core's
    SelfAttention (or MLASelfAttention) unchanged and its core attention computed by the
    plugin's fused kernels (fused_core.FusedDotProductAttention, FusedMlaDotProductAttention):
    the TP baseline with the grid's kernels."""
    from megatron_mxn.attention.fused_core import (
        FUSED_CORES,
        FusedDotProductAttention,
        FusedMlaDotProductAttention,
    )
    from megatron_mxn.attention.mla import MLA_CORES

    spec = copy.deepcopy(base_spec)
    for layer in layer_specs(spec):
        attn = getattr(layer.submodules, "self_attention", None)
        module = module_class(attn)
        core = attn.submodules.core_attention
        if core in FUSED_CORES:
            continue  # (a block spec may list one layer spec object several times)
        if module is MLASelfAttention:
            if not options.is_stock_core(core, MLA_CORES):
                raise MxnConfigError(f"the MLA spec's core_attention "
                                     f"({getattr(core, '__qualname__', core)}) is not one the "
                                     "fused TP core computes the same as")
            fused = FusedMlaDotProductAttention
        elif module is SelfAttention:
            _check_replaceable(module, core)
            fused = FusedDotProductAttention
        else:
            raise MxnConfigError(f"the layer spec's self_attention ({module}) is not "
                                 "megatron-core's SelfAttention or MLASelfAttention; the fused "
                                 "TP core replaces only those ones' core")
        attn.submodules = copy.copy(attn.submodules)
        attn.submodules.core_attention = fused
    return spec


def get_mxn_gpt_layer_local_spec(dim_slices: Optional[int] = None,
                                 rotary_percent: float = 1.0, **kwargs):
    """megatron-core's get_gpt_layer_local_spec(**kwargs), with the grid attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_mxn_layer_spec(get_gpt_layer_local_spec(**kwargs), dim_slices, rotary_percent)


def get_mxn_gpt_layer_te_spec(dim_slices: Optional[int] = None,
                              rotary_percent: float = 1.0, **kwargs):
    """megatron-core's get_gpt_layer_with_transformer_engine_spec(**kwargs) (TE linears and
    norms), with the grid attention; needs Transformer Engine."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_mxn_layer_spec(get_gpt_layer_with_transformer_engine_spec(**kwargs), dim_slices,
                              rotary_percent)
