"""Hybrid-stack spec (megatron-core's HybridModel) with the grid attention.

megatron-core's stock `hybrid_stack_spec` is built from Transformer Engine modules only. This spec
derives every layer kind from megatron-core's own GPT layer specs (local or TE) instead, so that
the attention layers (`*`) get the grid attention and the MLP (`-`) and MoE (`E`) layers run on
megatron-core's local modules on CPU. The other layer kinds (Mamba `M`, GDN, MLA, DSA, MTP) are the
stock spec's, seeing ordinary TP of size n*m.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from typing import Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.hybrid.hybrid_block import HybridStack

from megatron_mxn.attention import hooks
from megatron_mxn.attention.spec import get_mxn_layer_spec
from megatron_mxn.grid.layout import MxnConfigError

MAMBA = "M"


def check_hybrid_pattern(pattern: Optional[str]) -> None:
    """Refuse a pattern this machine cannot run, identically on every rank (it depends only on
    the pattern and the machine), so callers can check before any collective.

    Mamba layers (`M`) run megatron's MambaMixer, whose mamba_ssm / causal_conv1d kernels need
    CUDA: without a GPU they would fail only in the first forward, on every rank at once.
    """
    if not pattern or MAMBA not in pattern:
        return
    import torch

    if not torch.cuda.is_available():  # (CPU mode runs only where CUDA is not available)
        raise MxnConfigError(
            f"hybrid layer pattern {pattern!r} has Mamba layers ('M'), which cannot run on CPU: "
            "megatron's MambaMixer needs the CUDA kernels of mamba_ssm and causal_conv1d; use a "
            "GPU, or a pattern of attention '*', MLP '-' and MoE 'E' layers")


def _half_layer(layer_spec, keep_attention: bool, module=None):
    """One half of a GPT TransformerLayer spec: its attention (input norm, self-attention, bda)
    or its MLP (pre-MLP norm, MLP or MoE, bda), the other half replaced by identities, as the
    hybrid stack's one-sublayer layers are. The checkpoint key map keeps the TE names of the half
    that stays, so local and TE hybrid checkpoints share keys."""
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    sub = copy.deepcopy(layer_spec.submodules)
    if keep_attention:
        sub.pre_mlp_layernorm, sub.mlp, sub.mlp_bda = IdentityOp, IdentityOp, IdentityFuncOp
        prefix = "input_layernorm."
    else:
        sub.input_layernorm, sub.self_attention = IdentityOp, IdentityOp
        sub.self_attn_bda = IdentityFuncOp
        prefix = "pre_mlp_layernorm."
    sub.sharded_state_dict_keys_map = {
        k: v for k, v in sub.sharded_state_dict_keys_map.items() if k == prefix}
    return ModuleSpec(module=module or layer_spec.module, submodules=sub)


def get_mxn_hybrid_stack_spec(dim_slices: Optional[int] = None, rotary_percent: float = 1.0,
                              qk_layernorm: bool = False, normalization: Optional[str] = None,
                              moe_grouped_gemm: bool = False, use_te: bool = False,
                              hybrid_layer_pattern: Optional[str] = None):
    """A `hybrid_stack_spec` for megatron-core's HybridModel with the grid attention.

    Attention layers are megatron-core's GPT attention with MxnSelfAttention (see
    get_mxn_layer_spec; dim_slices defaults to the initialized grid's, `rotary_percent` must be
    the model's, 0 without RoPE). MLP and MoE layers are megatron-core's: local modules
    (`use_te=False`, runs on CPU) or Transformer Engine's as in the stock hybrid_stack_spec
    (`use_te=True`, needs TE). The MoE layer's expert count comes from the model config, as in
    the stock spec. `hybrid_layer_pattern`, when given, is checked (check_hybrid_pattern).
    Installs the grid attention's hooks (megatron_mxn.attention.hooks.install).
    """
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import MoETransformerLayer

    hooks.install()
    check_hybrid_pattern(hybrid_layer_pattern)
    if use_te:
        if importlib.util.find_spec("transformer_engine") is None:
            raise MxnConfigError("use_te=True needs Transformer Engine, which is not installed; "
                                 "use use_te=False (megatron-core's local modules)")
        gpt_layer = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        kwargs = {"qk_layernorm": qk_layernorm}
    else:
        gpt_layer = gpt_layer_specs.get_gpt_layer_local_spec
        kwargs = {"qk_layernorm": qk_layernorm, "normalization": normalization}
    dense = gpt_layer(**kwargs)
    # Any expert count selects the MoE modules; the model's comes from its config.
    moe = gpt_layer(num_experts=2, moe_grouped_gemm=moe_grouped_gemm, **kwargs)
    submodules = dataclasses.replace(
        hybrid_stack_spec.submodules,  # a new dataclass; the stock one is left alone
        attention_layer=get_mxn_layer_spec(_half_layer(dense, True), dim_slices, rotary_percent),
        mlp_layer=_half_layer(dense, False, MLPLayer),
        moe_layer=_half_layer(moe, False, MoETransformerLayer))
    return ModuleSpec(module=HybridStack if use_te else LocalNormHybridStack,
                      submodules=submodules)


class LocalNormHybridStack(HybridStack):
    """megatron-core's HybridStack with megatron-core's local final norm: the stock stack always
    builds Transformer Engine's TENorm, which does not exist without TE."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            norm = LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
            self.final_norm = norm(config=config, hidden_size=config.hidden_size,
                                   eps=config.layernorm_epsilon)
