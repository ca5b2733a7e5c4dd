"""The README's Python example, executed on a worker pool's ranks."""

from __future__ import annotations

from megatron_mxn.attention.self_attention import MxnSelfAttention


def run_python_example(code: str) -> dict:
    """exec the example; report what it built on this rank."""
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Python API example)", "exec"), namespace)
    model = namespace["model"]
    layers = [m for m in model.modules() if isinstance(m, MxnSelfAttention)]
    return {"grid_layers": len(layers),
            "heads_per_rank": layers[0].mxn_layout.heads_per_rank,
            "slice_dim": layers[0].mxn_layout.slice_dim,
            "qkv_shape": tuple(layers[0].linear_qkv.weight.shape),
            "proj_shape": tuple(layers[0].linear_proj.weight.shape)}
