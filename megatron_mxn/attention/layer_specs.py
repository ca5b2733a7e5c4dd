"""Walking megatron-core's GPT layer and decoder-block specs: their layer specs, and the class a
layer's self_attention spec names (the spec builders of spec.py, mla.py and mla_core.py)."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_mxn.grid.layout import MxnConfigError


def layer_specs(spec) -> list:
    """The layer specs of `spec`: a TransformerBlockSubmodules, a block ModuleSpec or one GPT
    layer ModuleSpec (a block may list one layer spec object several times)."""
    if isinstance(spec, TransformerBlockSubmodules):
        return spec.layer_specs
    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        return spec.submodules.layer_specs
    if isinstance(spec, ModuleSpec) and hasattr(spec.submodules, "self_attention"):
        return [spec]
    raise MxnConfigError(f"not a GPT layer or block spec: {type(spec).__name__}")


def module_class(attn):
    """The class a spec entry names: a ModuleSpec's module (imported when given as a
    (module, name) tuple), or the entry itself."""
    module = attn.module if isinstance(attn, ModuleSpec) else attn
    return import_module(module) if isinstance(module, tuple) else module
