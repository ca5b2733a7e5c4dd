"""CPU mode: run megatron-core (and megatron_mxn on top of it) on CPU with the gloo backend.

Call `enable()` once per process, before building models (`enable(training=True)` before
using Megatron-LM's training package), or `install_for_this_machine()` from an entry point. It
is meant for debugging layouts on a laptop and for CI; on GPUs nothing here is needed but the
wheel fixes (`install_wheel_fixes()`). Importing this package installs nothing. Every patch is
listed in `PATCHES` (the registry of megatron_mxn.patching) with the function it replaces, the
versions it was written for and the failure it fixes.
"""

from __future__ import annotations

import torch

from megatron_mxn import patching
from megatron_mxn.cpu import core as _core  # noqa: F401  (registers the patches)
from megatron_mxn.cpu import training as _training  # noqa: F401
from megatron_mxn.patching import Patch

SCOPES = ("core", "training", "wheel")  # CPU mode, CPU mode for megatron.training, the wheel
PATCHES = tuple(p for p in patching.PATCHES if p.scope in SCOPES)


def enable(training: bool = False) -> None:
    """Install the CPU-mode patches (idempotent); with training=True also those for
    megatron.training (pretrain loop, arguments, initialization) and the wheel fixes."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_mxn.cpu.enable() is for machines without a usable GPU; CUDA is "
            "available here (hide it with CUDA_VISIBLE_DEVICES= to debug on CPU)")
    patching.install({"core", "wheel", "training"} if training else {"core"})


def install_wheel_fixes() -> None:
    """Fixes the megatron-core wheel's training package needs on any machine (idempotent)."""
    patching.install({"wheel"})


def install_for_this_machine(training: bool = True) -> bool:
    """What an entry point installs before it imports megatron: CPU mode (with
    megatron.training's patches when `training`) on a machine without a GPU, else the wheel
    fixes. Returns True in CPU mode."""
    if torch.cuda.is_available():
        install_wheel_fixes()
        return False
    enable(training=training)
    return True


def is_enabled() -> bool:
    """True once `enable()` has run in this process."""
    return patching.is_installed("core")


__all__ = ["enable", "install_for_this_machine", "install_wheel_fixes", "is_enabled", "PATCHES",
           "Patch", "SCOPES"]
