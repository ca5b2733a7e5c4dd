"""get_mxn_layer_spec on megatron-core's specs: what it replaces and what it leaves alone."""

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_mxn import (
    MxnConfigError,
    MxnDotProductAttention,
    MxnSelfAttention,
    get_mxn_gpt_layer_local_spec,
    get_mxn_layer_spec,
)
from megatron_mxn.attention.qk_norm import SlicedHeadNorm


def _attn(layer_spec):
    return layer_spec.submodules.self_attention


def test_layer_spec_gets_grid_attention_and_sliced_qk_norms():
    spec = get_mxn_gpt_layer_local_spec(dim_slices=2, rotary_percent=0.5, qk_layernorm=True)
    attn = _attn(spec)
    assert attn.module is MxnSelfAttention
    assert attn.params["rotary_percent"] == 0.5
    assert attn.submodules.core_attention is MxnDotProductAttention
    assert attn.submodules.q_layernorm is SlicedHeadNorm
    assert attn.submodules.k_layernorm is SlicedHeadNorm
    # the rest of the layer and the original spec are untouched
    base = get_gpt_layer_local_spec(qk_layernorm=True)
    assert repr(spec.submodules.mlp) == repr(base.submodules.mlp)
    assert _attn(base).module is SelfAttention


def test_one_dim_slice_keeps_megatron_attention():
    assert _attn(get_mxn_gpt_layer_local_spec(dim_slices=1)).module is SelfAttention


def test_decoder_block_spec_every_layer_replaced():
    """A block of dense and MoE layers (what get_gpt_decoder_block_spec builds)."""
    block = TransformerBlockSubmodules(layer_specs=[
        get_gpt_layer_local_spec(), get_gpt_layer_local_spec(num_experts=4),
        get_gpt_layer_local_spec(num_experts=4)])
    grid = get_mxn_layer_spec(block, dim_slices=2)
    assert len(grid.layer_specs) == 3
    assert all(_attn(layer).module is MxnSelfAttention for layer in grid.layer_specs)
    assert [type(l.submodules.mlp) for l in grid.layer_specs] == \
        [type(l.submodules.mlp) for l in block.layer_specs]


def test_non_self_attention_spec_is_refused():
    spec = get_gpt_layer_local_spec()
    _attn(spec).module = torch.nn.Identity
    with pytest.raises(MxnConfigError, match="is neither megatron-core's SelfAttention nor its "
                                             "MLASelfAttention"):
        get_mxn_layer_spec(spec, dim_slices=2)


def test_mla_spec_gets_the_grid_mla():
    """megatron's MLA layer spec: MxnMLASelfAttention with the grid's MLA core; the down- and
    up-projection linears and the latent norms stay the spec's (tests/test_mla.py)."""
    from megatron_mxn.attention.mla import MxnMLASelfAttention, MxnMlaDotProductAttention

    base = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    attn = _attn(get_mxn_layer_spec(base, dim_slices=2))
    assert attn.module is MxnMLASelfAttention
    assert attn.submodules.core_attention is MxnMlaDotProductAttention
    for name in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                 "linear_kv_up_proj", "q_layernorm", "kv_layernorm", "linear_proj"):
        assert getattr(attn.submodules, name) is getattr(_attn(base).submodules, name), name


def test_dim_slices_needed_without_grid():
    with pytest.raises(MxnConfigError, match="pass dim_slices or call initialize_mxn_parallel"):
        get_mxn_layer_spec(get_gpt_layer_local_spec())
