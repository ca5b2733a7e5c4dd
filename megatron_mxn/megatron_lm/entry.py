"""What every entry point installs before it imports megatron: CPU mode on a machine without a
GPU (megatron_mxn.cpu) or else the fixes the megatron-core wheel needs, then the grid
attention's hooks (megatron_mxn.attention.hooks). Nothing is installed at import time."""

from __future__ import annotations

import megatron_mxn.cpu


def install() -> bool:
    """Install, in this order, CPU mode or the wheel fixes and the grid attention's hooks
    (idempotent); True in CPU mode. Call it before importing megatron."""
    cpu = megatron_mxn.cpu.install_for_this_machine(training=True)
    from megatron_mxn.attention import hooks  # (imports megatron: after CPU mode)

    hooks.install()
    return cpu
