"""A core attention for megatron-core's multi-latent attention (MLA) at plain TP, written from
the formula: the reference the grid's MLA is tested against.

megatron-core 0.19's MLASelfAttention builds its core with `k_channels` and `v_channels` (MLA's
query/key heads have qk_head_dim + qk_pos_emb_head_dim dims, its value heads v_head_dim), which
only Transformer Engine's core accepts: with the local spec MLA does not build without TE. This
module is the local spec's missing piece (`with_mla_core`), so MLA runs on CPU at any TP size.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_mxn.attention.layer_specs import layer_specs, module_class
from megatron_mxn.grid.layout import MxnConfigError


class MlaDotProductAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v for query/key heads of one dim and value heads of
    another, on this TP rank's heads: query [sq, b, h/tp, dk], key [sk, b, h/tp, dk], value
    [sk, b, h/tp, dv] -> [sq, b, h/tp * dv]. The mask: the given tensor (True = masked out),
    else causal (lower-right aligned) for a causal layer. Scores and softmax in fp32."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        for name, on in (("softmax_type", config.softmax_type != "vanilla"),
                         ("window_size", config.window_size is not None),
                         ("context_parallel_size", config.context_parallel_size > 1)):
            if on:
                raise MxnConfigError(f"MlaDotProductAttention does not implement {name}="
                                     f"{getattr(config, name)!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.heads = divide(config.num_attention_heads, pg_collection.tp.size())
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else \
            1.0 / math.sqrt(k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise MxnConfigError("MlaDotProductAttention supports neither packed sequences nor "
                                 "an attention bias")
        sq, b, heads, _ = query.shape
        sk = key.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        mask = attention_mask
        if mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        if self.training and self.dropout_p > 0:
            with get_cuda_rng_tracker().fork():
                probs = torch.nn.functional.dropout(probs, self.dropout_p)
        out = torch.matmul(probs, v)  # [b, h, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * v.size(-1))


def with_mla_core(layer_spec, only_local: bool = False):
    """A copy of `layer_spec` (a GPT layer ModuleSpec, e.g. megatron-core's
    get_gpt_layer_local_spec(multi_latent_attention=True), or a decoder block spec such as
    get_gpt_decoder_block_spec's for MoE) whose MLA core attention is MlaDotProductAttention:
    megatron's MLA at plain TP without Transformer Engine. only_local: replace only
    megatron-core's local DotProductAttention (which cannot build MLA), keep any other core
    (Transformer Engine's) as it is."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    spec = copy.deepcopy(layer_spec)
    for layer in layer_specs(spec):
        attn = getattr(layer.submodules, "self_attention", None)
        module = module_class(attn)
        if not (isinstance(module, type) and issubclass(module, MLASelfAttention)):
            raise MxnConfigError(f"with_mla_core needs an MLA layer spec, got {module}")
        core = attn.submodules.core_attention
        if only_local and core is not DotProductAttention:
            continue
        attn.submodules = copy.copy(attn.submodules)
        attn.submodules.core_attention = MlaDotProductAttention
    return spec
