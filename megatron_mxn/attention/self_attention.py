"""Self-attention on the head-group x dim-slice grid, as a megatron-core SelfAttention.

The layer keeps megatron's parameter names (linear_qkv, linear_proj, q/k_layernorm), its
forward (QKV, KV cache, RoPE, core attention, output projection) and its checkpoint keys.
What changes is the meaning of the local rows/columns (see grid.layout.GridLayout) and the core
attention (core.MxnDotProductAttention).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import (
    SelfAttention,
    SelfAttentionSubmodules,
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.typed_torch import apply_module
from megatron.core.utils import deprecate_inference_params

from megatron_mxn.attention import options
from megatron_mxn.attention.position_cache import (
    PositionShardedCache,
    kv_cache_of,
    position_sharded_attention,
)
from megatron_mxn.attention.schedules import POSITIONS, ScoreShape
from megatron_mxn.attention.sharding import shard_grid_weights
from megatron_mxn.grid.layout import GridLayout, MxnConfigError
from megatron_mxn.grid.groups import MxnProcessGroupCollection, grid_groups_of
from megatron_mxn.patching import override

# The megatron-core code MxnSelfAttention copies or overrides: a change there fails
# tests/test_patches.py until the copy below is reviewed and the fingerprint updated.
CORE = "megatron-core 0.19.x"
ATTENTION = "megatron.core.transformer.attention."
override(ATTENTION + "Attention.__init__", CORE,
         "MxnSelfAttention.__init__ copies it (with SelfAttention.__init__): it cannot run, since "
         "it sizes heads by the TP size n*m; every attribute it sets is set from the grid "
         "layout (tests/test_runtime.py checks none is missing)", "07d276e01ea1")
override(ATTENTION + "SelfAttention.__init__", CORE,
         "MxnSelfAttention.__init__ copies it: linear_qkv, linear_proj and the q/k norms built "
         "with the grid's sizes (the norms over dim slices)", "ab5b20ee8c0c")
override(ATTENTION + "SelfAttention.get_query_key_value_tensors", CORE,
         "overridden: the fused QKV output split per grid rank (h/n query heads, the KV heads "
         "of head group i, d/m dims each; the KV-share all-gather when n > g)", "0628792a7b6b")
override(ATTENTION + "Attention._adjust_key_value_for_inference", CORE,
         "overridden (calls it): a prefill chunk after a cache stays causal, where megatron's "
         "static path drops the mask after the prompt", "422e1996100e")
override(ATTENTION + "Attention.forward", CORE,
         "MxnSelfAttention.forward calls it with the rotary frequencies cut to the dim slice, "
         "and its position-sharded KV-cache path (_forward_position_cache) follows its "
         "inference steps (QKV, RoPE at the offset, core attention, linear_proj)",
         "f7a47792b619")


class MxnSelfAttention(SelfAttention):
    """Exact multi-head (MHA/GQA/MQA) self-attention spread over n head groups x m dim slices.

    Rank (i, j) holds h/n query heads and max(g/n, 1) KV heads, d/m dims of each. Its share of
    linear_qkv / linear_proj is what megatron's TP linears give a TP rank of an n*m group (only
    the meaning of the rows changes), so MLP, embeddings, SP, DDP and optimizers are unchanged.
    """

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.padding,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 pp_layer_offset: Optional[int] = None, name: Optional[str] = None,
                 rotary_percent: float = 1.0):
        # Every option of the config is classified in options.py: refuse what the grid does not
        # compute exactly (and a replaced core), on every rank, before any collective.
        options.check_config(config, layer_number)
        options.check_core_attention(submodules.core_attention)
        if getattr(config, "multi_latent_attention", False):
            raise MxnConfigError("multi_latent_attention is set but the layer spec builds "
                                 "SelfAttention: MLA needs megatron's MLA layer spec "
                                 "(get_gpt_layer_local_spec(multi_latent_attention=True)) "
                                 "through get_mxn_layer_spec")
        if pg_collection is None:
            pg_collection = MxnProcessGroupCollection.use_mpu_process_groups()
        grid = grid_groups_of(pg_collection)
        layout = grid_layout(config, grid.head_groups, grid.dim_slices, rotary_percent)
        _check_supported(config, pg_collection, grid)
        # SelfAttention.__init__ would size heads by the TP size n*m (and asserts h % (n*m)),
        # so the attributes its forward relies on are set here from the grid layout.
        MegatronModule.__init__(self, config=config)
        self.config = config
        self.layer_number = layer_number
        self._pp_layer_offset = pp_layer_offset
        self.attn_mask_type = attn_mask_type
        self.attention_type = "self"
        self.batch_invariant_mode = config.batch_invariant_mode
        self.flash_attention_version = config.flash_attention_version
        self._yarn_concentration_factor = _yarn_get_concentration_factor_from_config(config)
        self.query_projection_size = config.kv_channels * config.num_attention_heads
        self.kv_projection_size = config.kv_channels * config.num_query_groups
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.world_size = layout.world
        self.mxn_layout, self.mxn_grid = layout, grid
        self.hidden_size_per_attention_head = layout.slice_dim
        self.key_hidden_size = self.val_hidden_size = layout.slice_dim
        self.num_attention_heads_per_partition = layout.heads_per_rank
        self.num_query_groups_per_partition = layout.kv_heads_per_rank
        self.register_buffer(
            "mxn_rotary_index",
            torch.tensor(layout.rotary_dims(grid.dim_slice_index), dtype=torch.long),
            persistent=False)

        self.core_attention = submodules.core_attention(
            config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type="self", cp_comm_type=cp_comm_type,
            softmax_scale=config.softmax_scale, pg_collection=pg_collection)
        self.checkpoint_core_attention = (config.recompute_granularity == "selective"
                                          and "core_attn" in config.recompute_modules)
        offload = config.fine_grained_activation_offloading
        self.offload_qkv_linear = offload and "qkv_linear" in config.offload_modules
        self.offload_core_attention = offload and "core_attn" in config.offload_modules
        self.offload_attn_proj = offload and "attn_proj" in config.offload_modules

        self.linear_proj = submodules.linear_proj(
            self.query_projection_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=self.tp_group,
            name=None if name is None else name + ".linear_proj")
        self.linear_qkv_out_dim = self.query_projection_size + 2 * self.kv_projection_size
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size, self.linear_qkv_out_dim, config=config,
            init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.tp_group,
            name=None if name is None else name + ".linear_qkv")
        self.q_layernorm = self._build_qk_norm(submodules.q_layernorm)
        self.k_layernorm = self._build_qk_norm(submodules.k_layernorm)

    def _build_qk_norm(self, norm_cls):
        config = self.config
        if not (config.qk_layernorm or config.qk_l2_norm):
            if norm_cls not in (None, IdentityOp):
                raise MxnConfigError(f"the spec sets a q/k norm ({norm_cls}) but qk_layernorm "
                                     "and qk_l2_norm are disabled in the config")
            return None
        if norm_cls in (None, IdentityOp):
            raise MxnConfigError("qk_layernorm/qk_l2_norm is set but the spec has no q/k norm; "
                                 "build the spec with get_mxn_layer_spec")
        kind = "L2Norm" if config.qk_l2_norm else config.normalization
        return norm_cls(config=config, hidden_size=config.kv_channels,
                        eps=config.layernorm_epsilon,
                        dims=self.mxn_layout.dims(self.mxn_grid.dim_slice_index),
                        group=self.mxn_grid.dim_slice_group, kind=kind)

    # ------------------------------------------------------------------ forward
    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        """[sq, b, D] -> query [sq, b, h/n, d/m], key/value [sq, b, kv heads, d/m]."""
        if output_gate or not split_qkv:
            raise MxnConfigError("the grid attention needs split q/k/v without output gate")
        layout = self.mxn_layout
        mixed, _ = apply_module(self.linear_qkv)(hidden_states)
        if layout.kv_shared:
            # This rank holds 1/(n/g) of its KV head's K/V rows of slice j: gather them from
            # the n/g head groups sharing that head (backward: reduce-scatter, summing the K/V
            # grads of the sharers).
            nq = layout.heads_per_rank * layout.slice_dim
            q, kv_piece = mixed.split([nq, mixed.size(-1) - nq], dim=-1)
            kv = all_gather_last_dim_from_tensor_parallel_region(
                kv_piece, group=self.mxn_grid.kv_share_group(layout.kv_share))
            mixed = torch.cat([q, kv], dim=-1)
        groups = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups
        dl = layout.slice_dim
        mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * dl)
        query, key, value = torch.split(mixed, [per_group * dl, dl, dl], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, dl)
        if self.q_layernorm is not None:
            query = apply_module(self.q_layernorm)(query)
        if self.k_layernorm is not None:
            key = apply_module(self.k_layernorm)(key)
        return query, key, value

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context: Optional[BaseInferenceContext] = None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params: Optional[BaseInferenceContext] = None):
        """megatron's attention forward, with the rotary frequencies cut to this dim slice."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if inference_context is not None and not inference_context.is_static_batching():
            raise MxnConfigError("the grid attention supports megatron-core's static inference "
                                 "context (KV cache), not dynamic batching")
        if packed_seq_params is not None:
            raise MxnConfigError("the grid attention does not support packed sequences (THD)")
        rest = dict(key_value_states=key_value_states, rotary_pos_emb=rotary_pos_emb,
                    rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                    rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        if inference_context is not None and self.mxn_grid.dim_slices > 1:
            # the run's KV cache (schedules.decide_kv_cache, once per context) runs the call
            cache = kv_cache_of(inference_context, self.config,
                                lambda batch: self._decode_shape(batch, hidden_states))
            return cache.forward(self, hidden_states, attention_mask, inference_context, **rest)
        return self.megatron_forward(hidden_states, attention_mask,
                                     inference_context=inference_context, **rest)

    def megatron_forward(self, hidden_states, attention_mask, *, rotary_pos_emb=None,
                         **kwargs):
        """megatron's attention forward (and its KV cache: the dims cache), with the rotary
        frequencies cut to this dim slice."""
        return super().forward(hidden_states, attention_mask,
                               rotary_pos_emb=self._slice_rotary(rotary_pos_emb), **kwargs)

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        *args, **kwargs):
        """megatron's dim-sliced KV cache; a prefill chunk after a cache (several queries at an
        offset) stays causal, where megatron's static path drops the mask after the prompt."""
        out = super()._adjust_key_value_for_inference(inference_context, query, key, value,
                                                      *args, **kwargs)
        if inference_context is not None and query.size(0) > 1 and \
                self.attn_mask_type == AttnMaskType.causal:
            out = (*out[:4], AttnMaskType.causal, out[5])
        return out

    def _forward_position_cache(self, hidden_states, attention_mask, context, rotary_pos_emb):
        """Inference with the position-sharded KV cache (attention/position_cache.py): RoPE
        at the tokens' absolute positions, then a prefill into an empty cache through the
        layer's schedule, or the cache's own decode attention."""
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        start, sq = context.sequence_len_offset, query.size(0)
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        rotary_pos_emb = self._slice_rotary(rotary_pos_emb)
        if rotary_pos_emb is not None:
            if not isinstance(rotary_pos_emb, tuple):
                rotary_pos_emb = (rotary_pos_emb,) * 2
            query, key = (apply_rotary_pos_emb(
                t, emb[start:start + sq], config=self.config,
                mscale=self._yarn_concentration_factor, cp_group=self.pg_collection.cp)
                for t, emb in zip((query, key), rotary_pos_emb))
        cache = self._position_cache(context, key)
        batch = slice(context.batch_size_offset, context.batch_size_offset + query.size(1))
        core = self.core_attention
        if POSITIONS.prefills(sq, start + sq):  # the layer's schedule, with all dims of K/V
            out, (k, v) = core.prefill(query, key, value, attention_mask,
                                       attn_mask_type=self.attn_mask_type)
            cache.store(k, v, 0, batch)
        else:
            out = position_sharded_attention(
                query, key, value, cache, start, batch, self.mxn_grid.dim_slice_group,
                scale=core.kernel_scale,
                mask=core.mask_of(attention_mask, self.attn_mask_type, sq, start + sq),
                sink=core.softmax_offset)
        return apply_module(self.linear_proj)(out)

    def _decode_shape(self, batch: int, hidden_states) -> ScoreShape:
        """A decode call of `batch` sequences on this rank (the KV-cache choice sets its
        context length)."""
        layout = self.mxn_layout
        return ScoreShape(batch, layout.heads_per_rank, layout.kv_heads_per_rank, 1, 1,
                          layout.slice_dim, layout.dim_slices, hidden_states.element_size())

    def _position_cache(self, context, key) -> PositionShardedCache:
        caches = context.key_value_memory_dict
        if self.layer_number not in caches:
            caches[self.layer_number] = PositionShardedCache(
                context.max_sequence_length, context.max_batch_size, key.size(2),
                self.config.kv_channels, self.mxn_grid.dim_slices,
                self.mxn_grid.dim_slice_index, key.dtype, key.device)
        return caches[self.layer_number]

    def _slice_rotary(self, rotary_pos_emb):
        if rotary_pos_emb is None:
            return None
        if isinstance(rotary_pos_emb, tuple):
            return tuple(self._slice_rotary(t) for t in rotary_pos_emb)
        expected = self.mxn_layout.rotary_dim
        if rotary_pos_emb.size(-1) != expected:
            raise MxnConfigError(
                f"RoPE covers {rotary_pos_emb.size(-1)} head dims but the grid layer was built "
                f"for {expected} (rotary_percent of get_mxn_layer_spec must match the model's)")
        return rotary_pos_emb.index_select(-1, self.mxn_rotary_index)

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's TP keys and global shapes; grid-shaped shards (see sharding.py)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        layout, grid = self.mxn_layout, self.mxn_grid
        i, j = grid.head_group_index, grid.dim_slice_index
        return shard_grid_weights(sd, prefix, (
            ("linear_qkv.weight", layout.qkv_rows(i, j), layout.qkv_chunk, 0),
            ("linear_qkv.bias", layout.qkv_rows(i, j), layout.qkv_chunk, 0),
            ("linear_proj.weight", layout.proj_columns(i, j), layout.proj_chunk, 1),
        ), sharded_offsets)


def grid_layout(config: TransformerConfig, head_groups: int, dim_slices: int,
                rotary_percent: float = 1.0) -> GridLayout:
    """The layout of `config`'s attention on an n x m grid (raises MxnConfigError)."""
    return GridLayout(head_groups, dim_slices, config.num_attention_heads,
                      config.num_query_groups, config.kv_channels,
                      _rotary_dim(config, rotary_percent), bool(config.rotary_interleaved))


def _rotary_dim(config: TransformerConfig, rotary_percent: float) -> int:
    """Head dims rotated by RoPE, as megatron's RotaryEmbedding computes them."""
    return int(config.kv_channels * rotary_percent) if rotary_percent else 0


ROTARY_POSITION_TYPES = ("rope", "yarn", "mrope")


def model_rotary_percent(position_embedding_type, rotary_percent: float) -> float:
    """The fraction of head dims a model rotates, as megatron builds its embedding: RoPE's
    rotary_percent, all of them under YaRN (megatron's YaRN embedding ignores rotary_percent),
    none without RoPE. The grid's spec must be built for it."""
    if position_embedding_type == "yarn":
        return 1.0
    return rotary_percent if position_embedding_type in ROTARY_POSITION_TYPES else 0.0


def _check_rotary_of_model(model, name, submodule):
    """Global module-registration hook (installed by megatron_mxn.attention.hooks.install):
    when a language model (GPTModel and its kin, which build their rotary embedding before the
    decoder) attaches its decoder, every grid attention layer inside must have been built for
    the model's RoPE. The dims a slice holds depend on it, so a mismatch would load checkpoints
    into the wrong rows: it is refused here, before any weight is loaded or saved."""
    if name != "decoder" or not hasattr(model, "rotary_percent") or submodule is None:
        return None
    percent = model_rotary_percent(getattr(model, "position_embedding_type", None),
                                   model.rotary_percent)
    for layer in submodule.modules():
        if isinstance(layer, MxnSelfAttention):
            options.check_model(position_embedding_type=model.position_embedding_type)
            want = _rotary_dim(layer.config, percent)
            if layer.mxn_layout.rotary_dim != want:
                raise MxnConfigError(
                    f"the grid attention was built for {layer.mxn_layout.rotary_dim} rotary "
                    f"dims, but the model ({type(model).__name__}, position_embedding_type="
                    f"{model.position_embedding_type!r}, rotary_percent="
                    f"{model.rotary_percent}) rotates {want}: pass the model's rotary_percent "
                    "(0 without RoPE, 1 with YaRN) to get_mxn_layer_spec")
    return None


def _check_supported(config: TransformerConfig, pg_collection, grid) -> None:
    """The grid against its process groups (the config's options: options.check_config)."""
    tp = pg_collection.tp.size()
    if tp != grid.head_groups * grid.dim_slices:
        raise MxnConfigError(f"the TP group ({tp} ranks) must be exactly the grid "
                             f"({grid.head_groups} x {grid.dim_slices})")
    mxn_m = getattr(config, "mxn_dim_slices", grid.dim_slices)
    if mxn_m != grid.dim_slices:
        raise MxnConfigError(f"config.mxn_dim_slices ({mxn_m}) differs from the grid's dim "
                             f"slices ({grid.dim_slices})")
