"""CPU mode: run megatron-core (and megatron_mxn on top of it) on CPU with the gloo backend.

Call `enable()` once per process, before building models. It is meant for debugging layouts
on a laptop and for CI; on GPUs nothing here is needed. Every patch is listed in `PATCHES`
with the function it replaces, the versions it was written for and the failure it fixes.
"""

from __future__ import annotations

import torch

from megatron_mxn.cpu import core as _core  # noqa: F401  (registers the patches)
from megatron_mxn.cpu.registry import PATCHES, Patch

_ENABLED = False


def enable() -> None:
    """Install every CPU-mode patch (idempotent). Also pins torch to the CPU device."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_mxn.cpu.enable() is for machines without a usable GPU; CUDA is "
            "available here, so run megatron-core on the GPU instead"
        )
    for p in PATCHES:
        p.install()
    _ENABLED = True


def is_enabled() -> bool:
    """True once `enable()` has run in this process."""
    return _ENABLED


__all__ = ["enable", "is_enabled", "PATCHES", "Patch"]
