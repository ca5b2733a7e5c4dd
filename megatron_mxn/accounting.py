"""Count the collectives a piece of code issues: operation, group, payload, bytes on the wire.

`CommCounter` intercepts torch.distributed's collective functions (and the aliases megatron-core
binds to them at import time) while it is active. Bytes sent per rank follow the ring
algorithms NCCL and gloo use for large messages: an all-reduce of S bytes over G ranks sends
2(G-1)/G * S per rank, an all-gather or reduce-scatter whose full tensor is S bytes sends
(G-1)/G * S, a point-to-point send S.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

# torch.distributed function -> (op, position and name of the argument holding the full tensor)
_COLLECTIVES = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "_all_gather_base": ("all_gather", 0, "output_tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "_reduce_scatter_base": ("reduce_scatter", 1, "input"),
    "all_to_all_single": ("all_to_all", 1, "input"),
    "broadcast": ("broadcast", 0, "tensor"),
    "send": ("send", 0, "tensor"),
    "isend": ("send", 0, "tensor"),
}
# modules that bind torch.distributed functions to their own names at import time
_ALIASES = {
    "megatron.core.tensor_parallel.mappings": {
        "dist_all_gather_func": "all_gather_into_tensor",
        "dist_reduce_scatter_func": "reduce_scatter_tensor"},
}


@dataclass(frozen=True)
class CommRecord:
    op: str
    group: str  # label (see CommCounter.labels) or "group of G"
    group_size: int
    payload_bytes: int  # the full tensor: all-reduce input, all-gather output, RS input

    @property
    def sent_bytes(self) -> float:
        """Bytes each rank sends for this call (ring algorithms)."""
        g, s = self.group_size, self.payload_bytes
        if g <= 1:
            return 0.0
        if self.op == "all_reduce":
            return 2 * (g - 1) / g * s
        if self.op in ("all_gather", "reduce_scatter", "all_to_all"):
            return (g - 1) / g * s
        return float(s)  # send, broadcast (root's view)


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nbytes(x) for x in t)  # lists of tensors


class CommCounter:
    """Context manager recording every collective issued while it is active and enabled.

    labels: {name: process group} used to name groups in the records (others are
    "group of G"). Set `enabled = False` to pause (e.g. outside the layers of interest).
    """

    def __init__(self, labels: Optional[Dict[str, dist.ProcessGroup]] = None):
        self.records: List[CommRecord] = []
        self.enabled = True  # switched by count_only_inside's hooks
        self.recording = True  # switched by the caller
        self._labels = labels or {}
        self._undo: List[Callable[[], None]] = []

    def _label(self, group) -> str:
        for name, g in self._labels.items():
            if g is group:
                return name
        if group is None or group is dist.group.WORLD:
            return "world"
        return f"group of {dist.get_world_size(group)}"

    def _wrap(self, fn, op: str, arg: int, name: str):
        def counted(*args, **kwargs):
            if self.enabled and self.recording:
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                tensor = args[arg] if len(args) > arg else kwargs[name]
                size = dist.get_world_size(group) if op != "send" else 2
                self.records.append(CommRecord(op, self._label(group), size, _nbytes(tensor)))
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    def _patch(self, owner, attr: str, op: str, arg: int, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        setattr(owner, attr, self._wrap(original, op, arg, name))
        self._undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self) -> "CommCounter":
        for attr, spec in _COLLECTIVES.items():
            self._patch(dist, attr, *spec)
        for module, aliases in _ALIASES.items():
            mod = importlib.import_module(module)
            for attr, like in aliases.items():
                self._patch(mod, attr, *_COLLECTIVES[like])
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def count_only_inside(self, modules) -> List:
        """Count only while one of `modules` runs its forward (e.g. the transformer layers);
        returns the hook handles."""
        self.enabled = False
        handles = []
        for module in modules:
            handles.append(module.register_forward_pre_hook(
                lambda *_: setattr(self, "enabled", True)))
            handles.append(module.register_forward_hook(
                lambda *_: setattr(self, "enabled", False)))
        return handles

    def sent_bytes_by_group(self) -> Dict[str, float]:
        out: Dict[str, float] = defaultdict(float)
        for r in self.records:
            out[r.group] += r.sent_bytes
        return dict(out)

    def total_sent_bytes(self) -> float:
        return sum(r.sent_bytes for r in self.records)
