"""CPU mode: run megatron-core (and megatron_mxn on top of it) on CPU with the gloo backend.

Call `enable()` once per process, before building models (`enable(training=True)` before
using Megatron-LM's training package). It is meant for debugging layouts on a laptop and for
CI; on GPUs nothing here is needed. Every patch is listed in `PATCHES` with the function it
replaces, the versions it was written for and the failure it fixes.
"""

from __future__ import annotations

import torch

from megatron_mxn.cpu import core as _core  # noqa: F401  (registers the patches)
from megatron_mxn.cpu import training as _training  # noqa: F401
from megatron_mxn.inference import engine as _engine  # noqa: F401  (the grid's engine guards)
from megatron_mxn.cpu.registry import PATCHES, Patch

_INSTALLED: set = set()


def _install(scopes) -> None:
    for p in PATCHES:
        key = (p.target, p.scope)
        if p.scope in scopes and key not in _INSTALLED:
            p.install()
            _INSTALLED.add(key)


def enable(training: bool = False) -> None:
    """Install the CPU-mode patches (idempotent); with training=True also those for
    megatron.training (pretrain loop, arguments, initialization)."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_mxn.cpu.enable() is for machines without a usable GPU; CUDA is "
            "available here (hide it with CUDA_VISIBLE_DEVICES= to debug on CPU)")
    _install({"core", "wheel", "training"} if training else {"core"})


def install_wheel_fixes() -> None:
    """Fixes the megatron-core wheel's training package needs on any machine (idempotent)."""
    _install({"wheel"})


def install_grid_guards() -> None:
    """Guards that refuse what a grid model cannot run (megatron-core's dynamic inference
    engine), on any machine; installed by the grid attention's module (idempotent)."""
    _install({"grid"})


def is_enabled() -> bool:
    """True once `enable()` has run in this process."""
    return any(scope == "core" for _, scope in _INSTALLED)


__all__ = ["enable", "install_grid_guards", "install_wheel_fixes", "is_enabled", "PATCHES", "Patch"]
