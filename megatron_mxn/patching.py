"""Every runtime change megatron_mxn makes to megatron-core, megatron.training or torch, and every
piece of megatron-core code it copies or overrides, in one registry.

A `Patch` names its target (a dotted path), the versions it was written for, why it exists, its
scope (who installs it, and when) and, for megatron targets, a fingerprint of the target's
source as it was when the patch was written, so that tests/test_patches.py and
tests/test_cpu_mode.py fail loudly when megatron-core changes the code under a patch.

Registering a patch (the `patch` decorator, `override`) only lists it: nothing is installed
when a module is imported. The scopes:

| scope | installed by | what |
|---|---|---|
| core | `megatron_mxn.cpu.enable()` | CPU mode: megatron-core and torch without a GPU |
| training | `cpu.enable(training=True)` | CPU mode for megatron.training |
| wheel | `cpu.install_wheel_fixes()`, `cpu.enable(training=True)` | what the wheel needs anywhere |
| grid | `megatron_mxn.attention.hooks.install()` | the grid attention's guards and checks |
| parser | `megatron_lm.flags.add_mxn_args`, on its parser | grid flags resolved while parsing |
| training-log | `megatron_lm.flags.resolve_mxn_args`, if asked | additions to Megatron's log |
| override | never: a megatron_mxn subclass copies or overrides it | (fingerprint only) |

`attention.hooks.install()` is called by the spec builders (`get_mxn_layer_spec`,
`get_mxn_hybrid_stack_spec`) and by the entry points, which also install CPU mode or the wheel
fixes first (`cpu.install_for_this_machine()`).

This module is the bottom layer of the package: it imports nothing from megatron_mxn.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

SCOPES = ("core", "training", "wheel", "grid", "parser", "training-log", "override")
# The scopes `install` installs as a whole; the others are installed by their own functions
# (with arguments), or never.
INSTALLABLE = ("core", "training", "wheel", "grid")


@dataclass(frozen=True)
class Patch:
    """One runtime patch of megatron-core / megatron.training / torch, or one piece of
    megatron-core code megatron_mxn copies or overrides (scope "override")."""

    target: str  # dotted path of the wrapped, replaced, copied or overridden object
    versions: str  # versions the patch was written and tested against
    reason: str  # what fails (or what the copy is for) without it
    install: Optional[Callable[..., None]]  # its installer; None for overrides
    fingerprint: Optional[str] = None  # sha1 of the target's source (megatron targets)
    scope: str = "core"  # see SCOPES


PATCHES: List[Patch] = []
_INSTALLED: set = set()  # (target, scope) of the patches installed in this process


def _register(p: Patch) -> None:
    if p.scope not in SCOPES:
        raise ValueError(f"unknown patch scope {p.scope!r} (scopes: {SCOPES})")
    if p.scope in INSTALLABLE and p.install is None:
        raise ValueError(f"{p.target}: a patch of scope {p.scope!r} needs an installer")
    PATCHES.append(p)


def patch(target: str, versions: str, reason: str, fingerprint: Optional[str] = None,
          scope: str = "core"):
    """Decorator: register `fn` as the installer of a patch of `target` (it is not called)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        _register(Patch(target, versions, reason, fn, fingerprint, scope))
        return fn

    return register


def override(target: str, versions: str, reason: str, fingerprint: str) -> None:
    """Register megatron-core code that a megatron_mxn subclass copies or overrides (nothing
    is installed: the registry keeps its fingerprint so that a change is noticed)."""
    _register(Patch(target, versions, reason, None, fingerprint, "override"))


def install(scopes: Iterable[str]) -> None:
    """Install every registered patch of `scopes` not yet installed (idempotent). Only the
    patches whose modules have been imported are registered: each scope's owner imports them
    (megatron_mxn.cpu, megatron_mxn.attention.hooks)."""
    scopes = set(scopes)
    unknown = scopes - set(INSTALLABLE)
    if unknown:
        raise ValueError(f"scopes {sorted(unknown)} are not installed as a whole "
                         f"(installable: {INSTALLABLE})")
    for p in list(PATCHES):
        key = (p.target, p.scope)
        if p.scope in scopes and key not in _INSTALLED:
            p.install()
            _INSTALLED.add(key)


def is_installed(scope: str) -> bool:
    """True once some patch of `scope` has been installed in this process."""
    return any(s == scope for _, s in _INSTALLED)


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


def replace(target: str, make: Callable[[Any], Any]) -> None:
    """Replace `target` (a dotted path) by `make(original)`, keeping the original reachable
    (as `__wrapped__` of a replacing function)."""
    owner_path, attr = target.rsplit(".", 1)
    owner = resolve(owner_path)
    original = getattr(owner, attr)
    replacement = make(original)
    inner = replacement.__func__ if isinstance(replacement, staticmethod) else replacement
    if inspect.isfunction(inner):
        functools.update_wrapper(inner, original)
    setattr(owner, attr, replacement)


def source_fingerprint(obj: Any) -> str:
    """Short sha1 of an object's source code."""
    source = inspect.getsource(inspect.unwrap(obj))
    return hashlib.sha1(source.encode()).hexdigest()[:12]


def find_original(obj: Any) -> Any:
    """The object a patch replaced (patched callables keep it in `__wrapped__`)."""
    return getattr(obj, "__wrapped__", obj)
