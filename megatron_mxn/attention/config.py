"""TransformerConfigs for grid models (whose head counts need not be multiples of the TP size),
standard and multi-latent attention."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_mxn.attention.schedules import kv_cache_names, schedule_names
from megatron_mxn.grid.layout import MxnConfigError


@dataclass
class MxnTransformerConfig(TransformerConfig):
    """A TransformerConfig whose attention runs on an n x m grid (TP size = n*m).

    megatron-core checks num_attention_heads and num_query_groups against the TP size; the grid
    only needs them compatible with the head groups n = TP / m. Checking h*m and g*m against
    n*m is exactly that rule, so the parent validation runs on scaled head counts, which are
    restored afterwards. Use it when h is not a multiple of n*m (e.g. 12 heads on a 2 x 4 grid);
    a plain TransformerConfig works whenever megatron-core's own check passes.
    """

    mxn_dim_slices: int = 1
    """m: slices of every head's dims. The head groups are tensor_model_parallel_size / m."""

    mxn_attention: str = "auto"
    """How the grid computes attention (megatron_mxn.attention.schedules): auto (the default;
    per call: seq for training and prefill, the cheaper score schedule for decode), exact
    (partial-score all-reduce), gather (all-gather of the Q/K slices), seq (the sequence-split
    core: fused kernel, O(s) memory), sliced (the seed paper's per-slice softmax: a different
    model), or one registered with schedules.register_schedule (docs/extending.md)."""

    mxn_kv_cache: str = "auto"
    """The grid's KV cache in inference (megatron_mxn.attention.schedules.kv_cache_names()): dims
    (each rank keeps d/m dims of every position; decode all-reduces scores over s_k), positions
    (each rank keeps all dims of every m-th position; decode traffic independent of s_k), or
    auto (whichever sends fewer bytes per decode step at the run's mean context length:
    schedules.decide_kv_cache)."""

    def __post_init__(self):
        if self.mxn_kv_cache not in kv_cache_names():  # (the registered ones)
            raise MxnConfigError(f"mxn_kv_cache must be one of {kv_cache_names()}, got "
                                 f"{self.mxn_kv_cache!r}")

        m, tp = self.mxn_dim_slices, self.tensor_model_parallel_size
        if self.mxn_attention not in schedule_names():
            raise MxnConfigError(f"mxn_attention must be one of {schedule_names()}, got "
                                 f"{self.mxn_attention!r}")
        if not isinstance(m, int) or m < 1 or tp % m:
            raise MxnConfigError(
                f"mxn_dim_slices ({m}) must be a positive divisor of "
                f"tensor_model_parallel_size ({tp})")
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        h, g, n = self.num_attention_heads, self.num_query_groups, tp // m
        if h % n:
            raise MxnConfigError(
                f"num_attention_heads ({h}) must be divisible by the head groups n = "
                f"tensor_model_parallel_size / mxn_dim_slices = {tp} / {m} = {n}")
        if g % n and n % g:
            raise MxnConfigError(
                f"num_query_groups ({g}) and the head groups n ({n}) must divide one another")
        self.num_attention_heads, self.num_query_groups = h * m, g * m
        try:
            super().__post_init__()
        finally:
            self.num_attention_heads, self.num_query_groups = h, g

    @property
    def mxn_head_groups(self) -> int:
        return self.tensor_model_parallel_size // self.mxn_dim_slices


@dataclass
class MxnMLATransformerConfig(MLATransformerConfig, MxnTransformerConfig):
    """megatron-core's MLATransformerConfig (multi-latent attention) with the grid's fields;
    build the layers from megatron's MLA layer spec through get_mxn_layer_spec. (MLA's class
    comes first so that its defaults, e.g. multi_latent_attention=True, win; its __post_init__
    runs the grid's, then TransformerConfig's.)"""
