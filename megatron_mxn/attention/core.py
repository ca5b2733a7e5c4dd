"""Softmax attention for one rank (i, j) of the grid.

The rank holds d/m dims of h/n query heads (and of their KV heads). Q_ij K_ij^T is a partial
sum of the full scores; summing it over the dim-slice group (in fp32) gives S_i = Q_i K_i^T,
identical on the m ranks (schedule `exact`; `gather` gets the same S_i from all-gathered Q/K
slices, see schedules.py). softmax(S_i / sqrt(d)) then uses the full head dim and megatron's own
masking, and P_i V_ij is local: the output holds dims j of heads i. Those score schedules build
the s_q x s_k matrix (score_attention, shared by them); `seq` (seq_split.py) and `sliced`
instead run the fused kernels of kernels.py and never do.

Each call runs the schedule object schedules.decide_schedule returns for its shape
(`schedule.forward(core, ...)`); this module holds what they share: megatron's softmax, the
scale, the sink, dropout and its RNG streams, and the dim-slice group's collectives.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_mxn.attention.collectives import all_reduce_sum
from megatron_mxn.attention.mask import MaskSpec
from megatron_mxn.grid.rng import head_group_rng_fork
from megatron_mxn.grid.groups import grid_groups_of
from megatron_mxn.attention.schedules import (
    AUTO,
    Schedule,
    ScoreShape,
    auto_candidates,
    decide_schedule,
    get_schedule,
)

log = logging.getLogger("megatron_mxn")


class MxnDotProductAttention(DotProductAttention):
    """megatron's DotProductAttention, sized for one head group, with the partial-score
    all-reduce over the dim-slice group between QK^T and the softmax."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        grid = grid_groups_of(pg_collection)
        # Size the parent for one head group: h/n heads of the full head dim d (so the softmax
        # scale is 1/sqrt(d)); KV heads shared by several head groups count as one per group.
        head_view = copy.copy(config)
        head_view.num_query_groups = max(config.num_query_groups, grid.head_groups)
        super().__init__(head_view, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type,
                         pg_collection=ProcessGroupCollection(tp=grid.head_group_group))
        self.config = config
        self.dim_slice_group = grid.dim_slice_group
        self.dim_slices = grid.dim_slices
        self.head_group_index = grid.head_group_index
        self.dim_slice_index = grid.dim_slice_index
        self.schedule = getattr(config, "mxn_attention", AUTO)  # a registered name, or auto
        named = None if self.schedule == AUTO else get_schedule(self.schedule)
        # auto: (phase, sq, sk, chosen) the first time each phase picks a schedule (bounded:
        # at most one entry per phase and schedule)
        self.decisions = []
        # The layer's sliding window (megatron's rule for which layers have one). Every path
        # takes it through one MaskSpec (mask_of); megatron's softmax gets the built mask.
        self.window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None
        self.scale_mask_softmax.window_size = None
        self.scale_mask_softmax.attn_mask_type = AttnMaskType.no_mask
        scale = named.softmax_scale(config, grid.dim_slices) if named else None
        if scale is not None:  # (sliced: 1/sqrt(d/m))
            self.softmax_scale = scale

    def _decide(self, shape: ScoreShape) -> Schedule:
        schedule = decide_schedule(self.schedule, shape)
        if self.schedule == AUTO:
            phase = "decode" if shape.sq == 1 else "training" if self.training else "prefill"
            if not any(d[0] == phase and d[3] == schedule.name for d in self.decisions):
                self.decisions.append((phase, shape.sq, shape.sk, schedule.name))
                if self.layer_number == 1 and dist.get_rank() == 0 and \
                        log.isEnabledFor(logging.INFO):
                    sends = ", ".join(f"{s.name} {s.call_bytes(shape):.0f} B"
                                      for s in auto_candidates())
                    log.info("[mxn] auto attention, %s (sq=%d, sk=%d): %s (per layer and rank "
                             "it sends: %s)", phase, shape.sq, shape.sk, schedule.name, sends)
        return schedule

    def _call(self, query, key, attention_mask, attn_mask_type):
        """The schedule and the MaskSpec of a call."""
        sq, b, _, dl = query.shape
        sk = key.size(0)
        schedule = self._decide(ScoreShape(b, self.num_attention_heads_per_partition,
                                           key.size(2), sq, sk, dl, self.dim_slices,
                                           query.element_size()))
        return schedule, self.mask_of(attention_mask, attn_mask_type, sq, sk)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, h/n, d/m], key/value [sk, b, kv heads, d/m] -> [sq, b, h/n * d/m]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the grid attention supports neither packed sequences nor an "
                             "attention bias")
        schedule, mask = self._call(query, key, attention_mask, attn_mask_type)
        return schedule.forward(self, query, key, value, mask, self.sink())[0]

    def prefill(self, query, key, value, attention_mask, attn_mask_type=None):
        """forward() of a prefill into the position-sharded KV cache: (output, (key, value)
        [sk, b, kv heads, d] with all dims). A schedule that all-gathered them hands them over
        (seq); otherwise they are all-gathered here."""
        schedule, mask = self._call(query, key, attention_mask, attn_mask_type)
        out, kv = schedule.forward(self, query, key, value, mask, self.sink(), keep_kv=True)
        if kv is None:
            kv = self.all_gather_dims(key), self.all_gather_dims(value)
        return out, kv

    # ---------------------------------------------------------------- for the schedules
    def all_gather_dims(self, t: torch.Tensor) -> torch.Tensor:
        """t with the last dim all-gathered over the dim-slice group (rank order; backward:
        reduce-scatter, which sums the gradients of the m ranks)."""
        return all_gather_last_dim_from_tensor_parallel_region(t.contiguous(),
                                                               group=self.dim_slice_group)

    def all_reduce_dims(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over the dim-slice group (backward: again the sum)."""
        return all_reduce_sum(t, self.dim_slice_group)

    @property
    def kernel_scale(self) -> float:
        """The fused kernels' softmax scale (megatron's scale times its query-key layer
        scaling coefficient)."""
        return self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)

    @property
    def dropout_p(self) -> float:
        return self.attention_dropout.p if self.training else 0.0

    def rank_rng(self):
        """The fused kernels' dropout stream: each rank's own (its rows or dims are its own)."""
        return get_cuda_rng_tracker().fork() if self.dropout_p else contextlib.nullcontext()

    def score_attention(self, query, key, value, mask: MaskSpec, sink, reduce=None):
        """The score schedules' shared part: fp32 scores Q K^T of query [sq, b, h/n, dq] and
        key [sk, b, kv heads, dq] (this rank's dims, or all d after a gather), `reduce(scores)`
        (exact: the sum over the dim-slice group), megatron's masked softmax with the sink,
        dropout from the head group's stream (the m ranks drop the same entries), and P V with
        value [sk, b, kv heads, d/m] -> [sq, b, h/n * d/m]."""
        heads = self.num_attention_heads_per_partition
        sq, b, _, dq = query.shape
        sk, dl = key.size(0), value.size(-1)
        repeat = heads // self.num_query_groups_per_partition
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)

        # Scores in fp32: [b * heads, sq, sk]
        q = query.permute(1, 2, 0, 3).reshape(b * heads, sq, dq)
        k = key.permute(1, 2, 3, 0).reshape(b * heads, dq, sk)
        scores = fp32_scores(q, k)
        if reduce is not None:
            scores = reduce(scores)
        scores = (scores * self.softmax_scale).view(b, heads, sq, sk)

        # megatron's masking and softmax (the unfused path: scores are fp32 here), with the
        # mask built from the layer's MaskSpec (lower-right causal, window, padding) and the
        # attention sink as megatron's SoftmaxOne adds it.
        probs = self.scale_mask_softmax.forward_torch_softmax(
            scores, mask.tensor(sq, sk, scores.device), sink)
        probs = probs.to(value.dtype)
        if self.training and self.attention_dropout.p > 0:
            with head_group_rng_fork(self.head_group_index):
                probs = self.attention_dropout(probs)

        v = value.permute(1, 2, 0, 3).reshape(b * heads, sk, dl)
        context = torch.bmm(probs.view(b * heads, sq, sk), v)
        return context.view(b, heads, sq, dl).permute(2, 0, 1, 3).reshape(sq, b, heads * dl)

    def mask_of(self, attention_mask, attn_mask_type, sq: int, sk: int) -> MaskSpec:
        """The MaskSpec of a call with sq queries (the last sq of sk positions: a prefill chunk
        or decode step after a KV cache is lower-right aligned). A mask tensor is used as given
        (True = masked out); causal applies when there is none; a window replaces both, as in
        megatron's softmax."""
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and \
            attention_mask is None
        return MaskSpec.of(causal, sk - sq, self.window, attention_mask)

    def sink(self) -> Optional[torch.Tensor]:
        """This head group's attention-sink logits [h/n] (softmax_type off-by-one: zeros;
        learnable: the parameter), or None. Each of the m ranks of a head group sees part of
        its gradient (its dims of dO, or its query rows), so the backward sums it over the
        dim-slice group and every replica gets the whole."""
        offset = self.softmax_offset
        if offset is None or not offset.requires_grad or self.dim_slices == 1:
            return offset
        return copy_to_tensor_model_parallel_region(offset, group=self.dim_slice_group)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The learnable sink under megatron's key and global shape [h]: head group i holds
        heads i*h/n .. (i+1)*h/n - 1; its m dim-slice ranks are replicas (slice 0 writes)."""
        if self.config.softmax_type != "learnable":
            return {}
        dp = metadata["dp_cp_group"].rank() if metadata and metadata.get("dp_cp_group") \
            else parallel_state.get_data_parallel_rank(with_context_parallel=True)
        prepend = len(sharded_offsets)
        key = f"{prefix}softmax_offset"
        return {key: ShardedTensor.from_rank_offsets(
            key, self.softmax_offset, *sharded_offsets,
            (prepend, self.head_group_index, self.config.num_attention_heads //
             self.num_attention_heads_per_partition),
            replica_id=(0, self.dim_slice_index, dp), prepend_axis_num=prepend)}


def fp32_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k in fp32. Partial scores are summed over the dim-slice group, so they must not be
    rounded to bf16/fp16 first. On CUDA the low-precision matmul accumulates and writes fp32
    (bmm's out_dtype; no fp32 copies of Q and K); CPU has no such kernel, so Q/K are upcast."""
    if q.dtype == torch.float32:
        return torch.bmm(q, k)
    if q.is_cuda:
        return torch.bmm(q, k, out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float())

