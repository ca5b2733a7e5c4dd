"""megatron_mxn: head-group x dim-slice grid attention for megatron-core.

One attention layer spreads over n head groups x m slices of every head's dims (n*m ranks,
which are the layer's tensor-parallel group) and computes exact multi-head attention.
"""

__version__ = "0.1.0"

from megatron_mxn.attention import MxnSelfAttention, grid_layout  # noqa: E402
from megatron_mxn.config import MxnTransformerConfig  # noqa: E402
from megatron_mxn.core_attention import MxnDotProductAttention  # noqa: E402
from megatron_mxn.layout import GridLayout, MxnConfigError  # noqa: E402
from megatron_mxn.parallel_state import (  # noqa: E402
    MxnProcessGroupCollection,
    destroy_mxn_parallel,
    get_grid,
    initialize_mxn_parallel,
    mxn_parallel_is_initialized,
)
from megatron_mxn.spec import (  # noqa: E402
    get_mxn_gpt_layer_local_spec,
    get_mxn_gpt_layer_te_spec,
    get_mxn_layer_spec,
)

__all__ = [
    "GridLayout",
    "MxnConfigError",
    "MxnDotProductAttention",
    "MxnProcessGroupCollection",
    "MxnSelfAttention",
    "MxnTransformerConfig",
    "destroy_mxn_parallel",
    "get_grid",
    "get_mxn_gpt_layer_local_spec",
    "get_mxn_gpt_layer_te_spec",
    "get_mxn_layer_spec",
    "grid_layout",
    "initialize_mxn_parallel",
    "mxn_parallel_is_initialized",
]
