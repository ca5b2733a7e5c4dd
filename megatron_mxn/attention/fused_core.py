"""The like-kernel TP baseline: megatron-core's attention (plain TP, m = 1) whose core runs the
plugin's fused kernels (kernels.attention: torch SDPA, the CPU flash op) instead of megatron's
unfused DotProductAttention (fp32 s x s scores, masked softmax).

The grid's `seq` core and its position-sharded KV cache run these kernels; megatron's local TP
does not, so a grid / TP ratio mixes the layout with the kernel. With this core the TP layout
is unchanged (same SelfAttention, weights, KV cache and collectives) and only the kernel of the
attention core differs: `--mxn-tp-core fused` (megatron_lm/flags.py) selects it. For MLA the
same holds with megatron's MLASelfAttention and the reference MLA core's function
(FusedMlaDotProductAttention).
"""

from __future__ import annotations

import contextlib

from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_mxn.attention import kernels
from megatron_mxn.attention.mask import MaskSpec
from megatron_mxn.attention.mla_core import MlaDotProductAttention


class FusedDotProductAttention(DotProductAttention):
    """megatron-core's DotProductAttention (same heads per partition, scale, window, sink and
    dropout stream) computed by kernels.attention: no score matrix for causal or unmasked
    attention, the same function up to floating-point rounding."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        self.window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, heads, d], key/value [sk, b, kv heads, d] -> [sq, b, heads * d]
        (fused_core_attention)."""
        _refuse_packed_and_bias(packed_seq_params, attention_bias)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())  # (megatron's choice of stream)
        sink = None if self.softmax_offset is None else self.softmax_offset.float()
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        return fused_core_attention(query, key, value, attention_mask,
                                    attn_mask_type or self.attn_mask_type, self.window, scale,
                                    dropout, rng, sink)


class FusedMlaDotProductAttention(MlaDotProductAttention):
    """The MLA core at plain TP (mla_core.MlaDotProductAttention: query/key heads of one dim,
    value heads of another, megatron's MLA scale) computed by kernels.attention (the narrower
    side zero-padded): the like-kernel TP baseline for MLA."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query/key [s, b, h/tp, a + r], value [sk, b, h/tp, v] -> [sq, b, h/tp * v]; the
        mask as MlaDotProductAttention reads it (fused_core_attention)."""
        _refuse_packed_and_bias(packed_seq_params, attention_bias)
        dropout = self.dropout_p if self.training else 0.0
        rng = get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext()
        return fused_core_attention(query, key, value, attention_mask,
                                    attn_mask_type or self.attn_mask_type, None,
                                    self.softmax_scale, dropout, rng)


FUSED_CORES = (FusedDotProductAttention, FusedMlaDotProductAttention)


def fused_core_attention(query, key, value, attention_mask, attn_mask_type, window, scale,
                         dropout, rng, sink=None):
    """The fused cores' attention in megatron's layout: query [sq, b, heads, dk], key/value
    [sk, b, kv heads, dk / dv] -> [sq, b, heads * dv]. The mask as the grid's core reads it
    (MaskSpec.of): causal, lower-right aligned, when the call is causal and has no mask tensor;
    a window replaces both. rng: the dropout's RNG context."""
    sq, b, heads, _ = query.shape
    causal = attn_mask_type == AttnMaskType.causal and attention_mask is None
    mask = MaskSpec.of(causal, key.size(0) - sq, window, attention_mask)
    with rng:
        out = kernels.attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                value.permute(1, 2, 0, 3), scale=scale, mask=mask,
                                dropout_p=dropout, sink=sink)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * value.size(-1))


def _refuse_packed_and_bias(packed_seq_params, attention_bias) -> None:
    if packed_seq_params is not None or attention_bias is not None:
        raise ValueError("the fused TP cores support neither packed sequences nor an "
                         "attention bias (use megatron's core: --mxn-tp-core megatron)")


def check_fused_model(model) -> int:
    """The number of attention cores of `model`, all fused; raises when any is not (megatron.
    training's --attention-backend local swaps megatron's core back in after the spec), so that
    a run labelled fused never measures megatron's kernel."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_mxn.grid.layout import MxnConfigError

    cores = [m.core_attention for m in model.modules()
             if isinstance(m, (SelfAttention, MLASelfAttention))]
    other = sorted({type(c).__qualname__ for c in cores if not isinstance(c, FUSED_CORES)})
    if other:
        raise MxnConfigError(f"--mxn-tp-core fused, but the model's attention runs {other} "
                             "(something replaced the fused core after the layer spec, e.g. "
                             "--attention-backend local)")
    return len(cores)
