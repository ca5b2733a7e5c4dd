"""Bookkeeping for CPU-mode runtime patches: what each one wraps, for which versions, and why.

Every patch names a dotted target (the function or attribute it replaces). For megatron-core
targets it also records a fingerprint of the target's source as it was when the patch was
written, so that a test fails loudly when megatron-core changes the code under a patch.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List


@dataclass(frozen=True)
class Patch:
    """One runtime patch of CPU mode."""

    target: str  # dotted path of the wrapped/replaced object
    versions: str  # versions the patch was written and tested against
    reason: str  # what fails on CPU without it
    install: Callable[[], None]
    fingerprint: str | None = None  # sha1 of the target's source (megatron targets only)
    scope: str = "core"  # core: CPU mode; training: CPU mode for megatron.training; wheel: always
    # (install_wheel_fixes); grid: always, with the grid attention (install_grid_guards)


PATCHES: List[Patch] = []


def patch(target: str, versions: str, reason: str, fingerprint: str | None = None,
          scope: str = "core"):
    """Decorator: register `fn` as the installer of a patch of `target`."""

    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES.append(Patch(target, versions, reason, fn, fingerprint, scope))
        return fn

    return register


def resolve(target: str) -> Any:
    """Import the longest module prefix of `target` and walk the remaining attributes."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import any prefix of {target!r}")


def source_fingerprint(obj: Any) -> str:
    """Short sha1 of an object's source code."""
    source = inspect.getsource(inspect.unwrap(obj))
    return hashlib.sha1(source.encode()).hexdigest()[:12]


def find_original(obj: Any) -> Any:
    """The object a patch replaced (patched callables keep it in `__wrapped__`)."""
    return getattr(obj, "__wrapped__", obj)
