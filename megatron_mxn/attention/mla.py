"""Multi-latent attention (MLA, DeepSeek-V2/V3) on the head-group x dim-slice grid, exact
(docs/design.md, "Multi-latent attention").

megatron-core's MLASelfAttention projects the hidden states down to latents (q: q_lora_rank,
or none; kv: kv_lora_rank plus one shared RoPE key of qk_pos_emb_head_dim dims), normalizes
them, and projects them up to per-head q (qk_head_dim + qk_pos_emb_head_dim), k (qk_head_dim,
plus the shared RoPE key) and v (v_head_dim). On the grid the down-projections, their norms and
the RoPE key stay as megatron has them (column-parallel over the TP group, gathered); the
up-projections and linear_proj hold, on rank (i, j), head group i's heads restricted to dims j
of each part (grid/mla_layout.py): the same local sizes a TP rank of an n*m group has. Every
score is a sum over the m slices, so the grid's schedules compute exact attention; the
query/key and value head dims differ, which the score schedules and the sequence-split core
take as they come (kernels.py pads the narrower side).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.typed_torch import apply_module
from megatron.core.utils import deprecate_inference_params

from megatron_mxn.attention import options
from megatron_mxn.attention.core import MxnDotProductAttention
from megatron_mxn.attention.layer_specs import module_class
from megatron_mxn.attention.mla_decode import (
    LATENT_POSITIONS,
    check_kv_cache_request,
    gather_absorbed_queries,
    latent_cache,
    latent_position_attention,
)
from megatron_mxn.attention.position_cache import kv_cache_requested, use_kv_cache
from megatron_mxn.attention.sharding import shard_grid_weights
from megatron_mxn.grid.groups import MxnProcessGroupCollection, grid_groups_of
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.grid.mla_layout import MlaLayout
from megatron_mxn.patching import override

CORE = "megatron-core 0.19.x"
MLA = "megatron.core.transformer.multi_latent_attention."
override(MLA + "MLASelfAttention.get_query_key_value_tensors", CORE,
         "MxnMLASelfAttention.get_query_key_value_tensors rewrites it for the grid (heads of one "
         "group, dims of one slice, the RoPE frequencies cut to the slice); its down-projection "
         "and latent split copy megatron's, and the shared RoPE key's gradient is summed over "
         "the TP group", "c6a6d455d98e")
override(MLA + "MultiLatentAttention.forward", CORE,
         "MxnMLASelfAttention.forward runs inference with a static context on the grid's "
         "latent cache (mla_decode.py), refuses packed sequences and otherwise calls it",
         "d02bfbf841ed")
override(MLA + "MLASelfAttention.prepare_for_absorption", CORE,
         "MxnMLASelfAttention.prepare_for_absorption is a no-op: with cache_mla_latents the "
         "grid absorbs the up-projections at decode itself (mla_decode.py) and keeps "
         "linear_kv_up_proj (megatron's deletes it, for its dynamic engine)", "27a4aacfa4dd")


class MxnMlaDotProductAttention(MxnDotProductAttention):
    """The grid's core (schedules exact, gather, seq, auto) for MLA: query/key heads of
    qk_head_dim + qk_pos_emb_head_dim dims, value heads of v_head_dim (per slice: 1/m of each);
    megatron's MLA hands it the head dims and its YaRN-scaled softmax scale."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)


class MxnMLASelfAttention(MLASelfAttention):
    """megatron-core's MLASelfAttention with the grid's layout of its per-head projections
    (linear_q_proj or linear_q_up_proj, linear_kv_up_proj, linear_proj) and the grid's core.
    Keeps megatron's parameter names and checkpoint keys (TP <-> grid resharding)."""

    def __init__(self, config, submodules, layer_number: int,
                 attn_mask_type=AttnMaskType.padding, cp_comm_type: Optional[str] = None,
                 pg_collection=None, pp_layer_offset: Optional[int] = None,
                 name: Optional[str] = None):
        # refuse, on every rank and before any collective, what the grid's MLA does not compute
        options.check_config(config, layer_number)
        options.check_mla_config(config, layer_number)
        options.check_core_attention(submodules.core_attention)
        if pg_collection is None:
            pg_collection = MxnProcessGroupCollection.use_mpu_process_groups()
        grid = grid_groups_of(pg_collection)
        layout = mla_layout(config, grid.head_groups, grid.dim_slices)
        tp = pg_collection.tp.size()
        if tp != layout.world:
            raise MxnConfigError(f"the TP group ({tp} ranks) must be exactly the grid "
                                 f"({grid.head_groups} x {grid.dim_slices})")
        h, g = config.num_attention_heads, config.num_query_groups
        if g >= tp and (h % tp or g % tp):
            raise MxnConfigError(
                f"MLA on the grid needs num_attention_heads ({h}) and num_query_groups ({g}) "
                f"divisible by n*m = {tp} (or num_query_groups < n*m): megatron's "
                "MLASelfAttention sizes its heads by the TP size when it is built")
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                         pp_layer_offset=pp_layer_offset, name=name)
        self.mxn_layout, self.mxn_grid = layout, grid
        self.num_attention_heads_per_partition = layout.heads_per_rank
        # each slice's RoPE dims and their frequencies ([m, r/m]; this rank's: row j). The
        # cached RoPE key (decode) holds every slice's.
        slices = range(grid.dim_slices)
        self.register_buffer("mxn_rope_dims",
                             torch.tensor([layout.rope_dims(s) for s in slices]),
                             persistent=False)
        self.register_buffer("mxn_rotary_index",
                             torch.tensor([layout.rotary_freq_index(s) for s in slices]),
                             persistent=False)
        # the grid's latent cache serves inference (mla_decode.py), not megatron's absorption
        self.cache_mla_latents = False

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, position_ids=None, sequence_len_offset=None, *,
                inference_params=None):
        """megatron's MLA forward (training, and inference without a KV cache); with a
        static inference context, the latent cache by position (mla_decode.py)."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if packed_seq_params is not None:
            raise MxnConfigError("MLA on the grid does not support packed sequences (THD)")
        if inference_context is not None:
            return self._forward_latent_cache(hidden_states, attention_mask, inference_context)
        return super().forward(
            hidden_states, attention_mask, key_value_states=key_value_states,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, position_ids=position_ids,
            sequence_len_offset=sequence_len_offset)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    position_ids=None, packed_seq_params=None,
                                    inference_context=None, *, inference_params=None):
        """[s, b, D] -> query/key [s, b, h/n, a/m + r/m], value [s, b, h/n, v/m] (this rank's
        heads and dims; RoPE applied to the slice's pairs), and the two latents."""
        seq = self.rotary_pos_emb.get_rotary_seq_len(None, None, hidden_states, self.config,
                                                     None)
        freqs, mscale = self._rotary(seq)
        q_nope, q_pe, q_compressed, kv_latent, k_pos_emb, freqs = self._project(
            hidden_states, freqs, mscale)
        j = self.mxn_grid.dim_slice_index
        k_pe = self._rope(k_pos_emb.index_select(-1, self.mxn_rope_dims[j]).unsqueeze(-2),
                          freqs.index_select(-1, self.mxn_rotary_index[j]), mscale)
        key, value = self._keys_and_values(kv_latent, k_pe)
        return (torch.cat([q_nope, q_pe], dim=-1).contiguous(), key, value, q_compressed,
                kv_latent)

    def _project(self, hidden_states, freqs, mscale):
        """The layer's projections of hidden_states [s, b, D] whose RoPE frequencies start at
        freqs[0]: this rank's query dims (no-position part, RoPE part rotated) [s, b, h/n, .],
        the q latent (normed) or the hidden states, the kv latent (normed) [s, b, L], the
        unrotated RoPE key [s, b, r], and the frequencies of these s positions."""
        config, layout = self.config, self.mxn_layout
        q_compressed, kv_compressed, k_pos_emb = self._latents(hidden_states)
        if config.q_lora_rank is not None:
            q_compressed = self._q_latent_norm(q_compressed)
            q, _ = self.linear_q_up_proj(q_compressed)
        else:
            q, _ = self.linear_q_proj(q_compressed)
        a, r = layout.nope_slice, layout.rope_slice
        q_nope, q_pe = q.view(*q.shape[:-1], layout.heads_per_rank, a + r).split([a, r], dim=-1)
        freqs = freqs[:q.size(0)]
        q_pe = self._rope(q_pe, freqs.index_select(-1, self.mxn_rotary_index[
            self.mxn_grid.dim_slice_index]), mscale)
        kv_latent = apply_module(self.kv_layernorm)(kv_compressed)
        return q_nope, q_pe, q_compressed, kv_latent, k_pos_emb, freqs

    def _keys_and_values(self, kv_latent, k_pe):
        """kv latent [s, b, L] and this slice's rotated RoPE key [s, b, 1, r/m] -> this rank's
        keys [s, b, h/n, a/m + r/m] and values [s, b, h/n, v/m]."""
        layout = self.mxn_layout
        heads, a, v = layout.heads_per_rank, layout.nope_slice, layout.v_slice
        kv, _ = self.linear_kv_up_proj(kv_latent)
        k_nope, value = kv.view(*kv.shape[:-1], heads, a + v).split([a, v], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], dim=-1)
        return key.contiguous(), value.contiguous()

    def prepare_for_absorption(self):
        """No-op: the grid absorbs the up-projections at decode (_forward_latent_cache) and
        keeps linear_kv_up_proj, which megatron's version deletes."""

    def _forward_latent_cache(self, hidden_states, attention_mask, context):
        """Inference in megatron's static context with the latent cache sharded by position
        over all n*m ranks (mla_decode.py). A prefill into an empty cache runs the layer's
        schedule (the sequence-split core: O(s) memory) and keeps the owned latents; later
        calls (decode, prefill chunks) attend with absorbed queries: two collectives per layer
        and step, independent of the context length."""
        config, layout, grid = self.config, self.mxn_layout, self.mxn_grid
        if not context.is_static_batching():
            raise MxnConfigError("MLA on the grid supports megatron-core's static inference "
                                 "context, not dynamic batching")
        if config.sequence_parallel:
            raise MxnConfigError("MLA inference on the grid does not support sequence "
                                 "parallelism (turn it off for inference)")
        check_kv_cache_request(kv_cache_requested(context))
        use_kv_cache(context, LATENT_POSITIONS)
        start, sq = context.sequence_len_offset, hidden_states.size(0)
        freqs, mscale = self._rotary(start + sq)
        q_nope, q_pe, _, kv_latent, k_pos_emb, freqs = self._project(
            hidden_states, freqs[start:], mscale)
        k_pe = torch.cat([  # every slice's pairs, in slice order (as the queries' dims)
            self._rope(k_pos_emb.index_select(-1, dims).unsqueeze(-2),
                       freqs.index_select(-1, index), mscale)
            for dims, index in zip(self.mxn_rope_dims, self.mxn_rotary_index)],
            dim=-1)  # [sq, b, 1, r]
        latent = torch.cat([kv_latent, k_pe.squeeze(-2)], dim=-1)
        cache = latent_cache(context, self.layer_number, latent.size(-1), layout.world,
                             self.tp_group.rank(), latent.dtype, latent.device)
        batch = slice(context.batch_size_offset, context.batch_size_offset + latent.size(1))
        if start == 0:  # a prefill into an empty cache: the layer's schedule, O(s) memory
            cache.store(latent.unsqueeze(2), None, 0, batch)
            r = layout.rope_slice
            key, value = self._keys_and_values(
                kv_latent, k_pe[..., grid.dim_slice_index * r:(grid.dim_slice_index + 1) * r])
            out = self.core_attention(torch.cat([q_nope, q_pe], dim=-1).contiguous(), key,
                                      value, attention_mask, attn_mask_type=self.attn_mask_type)
            return apply_module(self.linear_proj)(out)
        heads, a = layout.heads_per_rank, layout.nope_slice
        up = self.linear_kv_up_proj.weight.view(heads, a + layout.v_slice, -1)
        up_k, up_v = up[:, :a], up[:, a:]  # [h/n, a/m, L], [h/n, v/m, L]
        queries = gather_absorbed_queries(torch.einsum("sbhd,hdc->sbhc", q_nope, up_k), q_pe,
                                          self.tp_group, grid.head_groups)
        mask = self.core_attention.mask_of(attention_mask, self.attn_mask_type, sq, start + sq)
        out = latent_position_attention(queries, latent, cache, start, batch, self.tp_group,
                                        grid.head_groups, config.kv_lora_rank,
                                        self.softmax_scale, mask)  # [sq, b, h/n, L]
        out = torch.einsum("sbhc,hdc->sbhd", out.to(up_v.dtype), up_v)
        return apply_module(self.linear_proj)(out.reshape(sq, out.size(1), -1))

    def _rotary(self, length: int):
        """(RoPE frequencies of positions 0 .. length-1, YaRN's mscale)."""
        if self.config.rope_type == "rope":
            return self.rotary_pos_emb(length), 1.0
        return self.rotary_pos_emb(length)

    def _rope(self, t, freqs, mscale):
        return apply_rotary_pos_emb(t, freqs, config=self.config, mscale=mscale,
                                    cp_group=self.pg_collection.cp, mla_rotary_interleaved=True)

    def _q_latent_norm(self, q_compressed):
        """The q latent's norm. megatron's finalize_model_grads sums the gradient of every
        parameter named q_layernorm over the TP group when qk_layernorm is set (meant for
        per-head q norms). MLA's q latent norm is replicated and, without sequence parallelism,
        sees the whole gradient on every rank, so it gets 1/tp of it here and the sum is exact
        (megatron's own MLA at TP > 1 with the local spec gets tp times the gradient)."""
        norm, tp = self.q_layernorm, self.world_size
        summed = self.config.qk_layernorm and not self.config.sequence_parallel
        if tp == 1 or not summed:
            return apply_module(norm)(q_compressed)
        params = {name: _ScaleGrad.apply(p, 1.0 / tp) for name, p in norm.named_parameters()}
        return torch.func.functional_call(norm, params, (q_compressed,))

    def _latents(self, hidden_states):
        """(q latent or the hidden states, kv latent, the shared RoPE key [s, b, r]) as
        megatron's MLA gets them; the RoPE key is used by every rank's heads, so its gradient
        is summed over the TP group (megatron's gather would keep only this rank's share)."""
        config, group = self.config, self.tp_group
        q_compressed, kv_combined = self._qkv_down_projection(hidden_states)
        split = [config.kv_lora_rank, config.qk_pos_emb_head_dim]
        if kv_combined.size(-1) != sum(split):  # column-parallel down-projection
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=group)
            kv_compressed, k_pos_emb = torch.split(kv_combined, split, dim=-1)
            if config.sequence_parallel:
                kv_compressed = scatter_to_sequence_parallel_region(kv_compressed, group=group)
            k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb, group=group)
        else:  # a duplicated down-projection
            kv_compressed, k_pos_emb = torch.split(kv_combined, split, dim=-1)
            if config.sequence_parallel:  # (backward: reduce-scatter, the sum)
                k_pos_emb = gather_from_sequence_parallel_region(k_pos_emb, group=group)
            else:
                k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb, group=group)
        return q_compressed, kv_compressed, k_pos_emb

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's TP keys and global shapes; grid-shaped shards (see sharding.py)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        layout, grid = self.mxn_layout, self.mxn_grid
        i, j = grid.head_group_index, grid.dim_slice_index
        return shard_grid_weights(sd, prefix, (
            ("linear_q_proj.weight", layout.q_rows(i, j), layout.q_chunk, 0),
            ("linear_q_up_proj.weight", layout.q_rows(i, j), layout.q_chunk, 0),
            ("linear_kv_up_proj.weight", layout.kv_up_rows(i, j), layout.kv_up_chunk, 0),
            ("linear_proj.weight", layout.proj_columns(i, j), layout.proj_chunk, 1),
        ), sharded_offsets)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def mla_layout(config, head_groups: int, dim_slices: int) -> MlaLayout:
    """The layout of `config`'s MLA on an n x m grid (raises MxnConfigError)."""
    return MlaLayout(head_groups, dim_slices, config.num_attention_heads, config.qk_head_dim,
                     config.qk_pos_emb_head_dim, config.v_head_dim)


# The MLA cores the grid's reproduces: megatron-core's (which need TE for MLA) and the plugin's
# reference (mla_core.MlaDotProductAttention).
MLA_CORES = {("megatron.core.transformer.dot_product_attention", "DotProductAttention"),
             ("megatron.core.extensions.transformer_engine", "TEDotProductAttention"),
             ("megatron_mxn.attention.mla_core", "MlaDotProductAttention")}


def grid_mla_attention_spec(attn: ModuleSpec) -> ModuleSpec:
    """The grid's spec for megatron's MLA self-attention spec `attn`: MxnMLASelfAttention with
    the grid's core; the down-projections, norms and linears stay the spec's. A subclass of
    MLASelfAttention (FusedMLASelfAttention, ...) or another core would silently not run, so
    they are refused."""
    module = module_class(attn)
    if module is not MLASelfAttention and not issubclass(module, MxnMLASelfAttention):
        raise MxnConfigError(
            f"the layer spec's self_attention is {module.__qualname__}; the grid replaces "
            "megatron-core's MLASelfAttention itself, not its subclasses")
    core = attn.submodules.core_attention
    if not options.is_stock_core(core, MLA_CORES, MxnMlaDotProductAttention):
        raise MxnConfigError(
            f"the MLA spec's core_attention ({getattr(core, '__qualname__', core)}) is not "
            "megatron-core's DotProductAttention / TEDotProductAttention or the plugin's "
            "MlaDotProductAttention: the grid would replace it by its own core")
    sub = copy.copy(attn.submodules)
    sub.core_attention = MxnMlaDotProductAttention
    return ModuleSpec(module=MxnMLASelfAttention, params=dict(attn.params), submodules=sub)
