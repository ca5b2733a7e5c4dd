"""megatron_mxn: head-group x dim-slice grid attention for megatron-core.

One attention layer spreads over n head groups x m slices of every head's dims (n*m ranks,
which are the layer's tensor-parallel group) and computes exact multi-head attention.

Names are imported on first use, so that `import megatron_mxn.cpu` (and helper processes that
re-import an entry script) stay light.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GridLayout": "megatron_mxn.grid.layout",
    "MxnConfigError": "megatron_mxn.grid.layout",
    "MxnDotProductAttention": "megatron_mxn.attention.core",
    "MxnProcessGroupCollection": "megatron_mxn.grid.groups",
    "MxnSelfAttention": "megatron_mxn.attention.self_attention",
    "MxnTransformerConfig": "megatron_mxn.attention.config",
    "MxnMLATransformerConfig": "megatron_mxn.attention.config",
    "MxnMLASelfAttention": "megatron_mxn.attention.mla",
    "MlaDotProductAttention": "megatron_mxn.attention.mla_core",
    "with_mla_core": "megatron_mxn.attention.mla_core",
    "check_hybrid_pattern": "megatron_mxn.attention.hybrid_spec",
    "destroy_mxn_parallel": "megatron_mxn.grid.groups",
    "get_grid": "megatron_mxn.grid.groups",
    "get_mxn_gpt_layer_local_spec": "megatron_mxn.attention.spec",
    "get_mxn_gpt_layer_te_spec": "megatron_mxn.attention.spec",
    "get_mxn_hybrid_stack_spec": "megatron_mxn.attention.hybrid_spec",
    "get_mxn_layer_spec": "megatron_mxn.attention.spec",
    "grid_layout": "megatron_mxn.attention.self_attention",
    "initialize_mxn_parallel": "megatron_mxn.grid.groups",
    "mxn_parallel_is_initialized": "megatron_mxn.grid.groups",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_mxn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
