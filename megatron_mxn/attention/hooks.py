"""What the grid attention installs in megatron-core and torch: `install()`.

Importing this module installs nothing. `install()` (idempotent) is called by the spec builders
(`get_mxn_layer_spec`, `get_mxn_hybrid_stack_spec`) and by the entry points, so that a grid
model built through them is covered; it installs the registered patches of scope "grid"
(megatron_mxn.patching):

* the model check: a global torch module-registration hook that refuses, when a language model
  (GPTModel and its kin) attaches its decoder, grid attention layers built for another RoPE
  than the model's (self_attention._check_rotary_of_model);
* the engine guards. `StaticInferenceEngine(controller, legacy=True)` with a
  `TextGenerationController` over a `GPTInferenceWrapper` and a `StaticInferenceContext`
  generates with a grid model (greedy or sampled, `SamplingParams`), on GPUs and in CPU mode. In
  megatron-core 0.19 the same engine built without `legacy=True` serves its requests with the
  dynamic inference context (paged KV blocks), which the grid attention does not support;
  megatron would find out only at the first forward pass, or swallow the failure and fall back.
  Engines that would use the dynamic context with a grid model are refused when they are
  built: the guards wrap the engines' constructors (other models are untouched).
"""

from __future__ import annotations

import inspect

import torch

from megatron_mxn import patching
from megatron_mxn.attention.self_attention import MxnSelfAttention, _check_rotary_of_model
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.patching import patch, replace

CORE = "megatron-core 0.19.x"
STATIC_ENGINE = "megatron.core.inference.engines.static_engine.StaticInferenceEngine.__init__"
DYNAMIC_ENGINE = "megatron.core.inference.engines.dynamic_engine.DynamicInferenceEngine.__init__"


def install() -> None:
    """Install the grid attention's hooks (the registered patches of scope "grid"; idempotent)."""
    patching.install({"grid"})


def has_grid_attention(model) -> bool:
    """True when `model` (possibly wrapped) holds a grid attention layer."""
    return any(isinstance(module, MxnSelfAttention) for module in model.modules())


def refuse_dynamic_context(model, engine: str) -> None:
    """Raise MxnConfigError when `engine` would serve the grid model `model` with
    megatron-core's dynamic inference context (the same on every rank, before any collective)."""
    if has_grid_attention(model):
        raise MxnConfigError(
            f"{engine} would serve this grid model with megatron-core's dynamic inference "
            "context, which the grid attention does not support: build "
            "StaticInferenceEngine(controller, ..., legacy=True) over a StaticInferenceContext "
            "(the static KV cache)")


@patch("megatron.core.models.gpt.gpt_model.GPTModel.__init__", CORE,
       "not replaced: a global module-registration hook (torch.nn.modules.module."
       "register_module_module_registration_hook) checks, when a model attaches its `decoder`, "
       "that every grid attention layer inside was built for the model's rotary dims; it relies "
       "on GPTModel.__init__ (and its kin) setting rotary_percent and position_embedding_type "
       "before it builds the decoder", fingerprint="f2a7ff7b71bf", scope="grid")
def _rotary_check_of_models():
    torch.nn.modules.module.register_module_module_registration_hook(_check_rotary_of_model)


def _guard(target: str, engine: str, model_of, refused):
    """Wrap the constructor at `target`: `refused(arguments)` says whether this call would
    use the dynamic context, `model_of(arguments)` gives the model it serves."""

    def make(orig):
        signature = inspect.signature(orig)

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            if refused(bound.arguments):
                refuse_dynamic_context(model_of(bound.arguments), engine)
            orig(self, *args, **kwargs)

        return __init__

    replace(target, make)


@patch(STATIC_ENGINE, CORE,
       "without legacy=True megatron-core 0.19's StaticInferenceEngine builds a "
       "DynamicInferenceContext and a DynamicInferenceEngine under the hood (and on an "
       "exception silently falls back to the static engine); a grid model cannot be served "
       "by the dynamic context: refused at construction, naming legacy=True",
       fingerprint="38cfeb6537f4", scope="grid")
def _static_engine_needs_legacy():
    _guard(STATIC_ENGINE, "StaticInferenceEngine(..., legacy=False)",
           lambda a: a["text_generation_controller"].inference_wrapped_model.model,
           lambda a: not a["legacy"])


@patch(DYNAMIC_ENGINE, CORE,
       "the dynamic engine runs the model with a DynamicInferenceContext (paged KV blocks, "
       "packed requests), which the grid attention does not support: refused at construction",
       fingerprint="5af9c5816ee5", scope="grid")
def _no_dynamic_engine():
    _guard(DYNAMIC_ENGINE, "DynamicInferenceEngine",
           lambda a: a["controller"].inference_wrapped_model.model, lambda a: True)
