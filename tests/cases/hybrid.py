"""megatron-core's HybridModel with the grid: equivalence, checkpoints and refusals.

The model cases themselves are the GPT ones (tests/cases/equivalence.py, runtime.py): with
`ModelSpec.hybrid` set, tests/cases/common.build_model builds a HybridModel on
megatron_mxn.get_mxn_hybrid_stack_spec (grid) or on the same spec with m = 1 (megatron-core's
own attention and local modules, the reference)."""

from __future__ import annotations

import megatron_mxn
from megatron_mxn.grid.layout import MxnConfigError


def mamba_refusal(pattern: str) -> str:
    """The error every rank raises for a Mamba pattern on CPU, before any collective (no group
    but the world exists when it is raised)."""
    try:
        megatron_mxn.get_mxn_hybrid_stack_spec(dim_slices=2, hybrid_layer_pattern=pattern)
    except MxnConfigError as e:
        return str(e)
    return "not refused"
