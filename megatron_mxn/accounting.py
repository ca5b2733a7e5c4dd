"""Count the collectives a piece of code issues: operation, group, payload, bytes on the wire.

`CommCounter` intercepts torch.distributed's collective functions (and the aliases megatron-core
binds to them at import time) while it is active. Bytes sent per rank follow the ring
algorithms NCCL and gloo use for large messages: an all-reduce of S bytes over G ranks sends
2(G-1)/G * S per rank, an all-gather or reduce-scatter whose full tensor is S bytes sends
(G-1)/G * S, an all-to-all whose input is S bytes (G-1)/G * S, a point-to-point send S.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_mxn.attention.schedules import sent_bytes

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
    inside: bool = True  # issued inside one of the modules given to mark_inside

    @property
    def sent_bytes(self) -> float:
        """Bytes each rank sends for this call (ring algorithms)."""
        return sent_bytes(self.op, self.payload_bytes, self.group_size)


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nbytes(x) for x in t)  # lists of tensors


class CommCounter:
    """Context manager counting every collective issued while it is active and recording.

    labels: {name: process group, or a tuple of groups sharing the name} used to name groups
    in the records (others are
    "group of G"). `recording` is the caller's switch (e.g. decode steps only);
    `mark_inside(modules)` tags the records issued inside those modules' forward.
    `counts` maps each distinct CommRecord to its number of calls, and `layer_bytes` the bytes
    sent inside each marked module by group ((layer number, group) -> bytes): two dict updates
    per collective, cheap enough to leave on. `seconds` is the wall time spent inside the
    recorded collectives, by (group, inside): on blocking backends (gloo) the collective's own
    time plus the wait for the slowest rank, the rest of a step being compute.
    """

    def __init__(self, labels: Optional[Dict[str, object]] = None):
        self.counts: Counter = Counter()
        self.layer_bytes: Counter = Counter()
        self.seconds: Counter = Counter()
        self.inside = True  # switched by mark_inside's hooks
        self.layer = None  # the marked module running now (its layer_number, or its index)
        self.recording = True  # switched by the caller
        self._labels = labels or {}
        self._undo: List[Callable[[], None]] = []

    def _label(self, group) -> str:
        for name, g in self._labels.items():
            if group is not None and (g is group or (isinstance(g, tuple) and group in g)):
                return name
        if group is None or group is dist.group.WORLD:
            return "world"
        return f"group of {dist.get_world_size(group)}"

    def _wrap(self, fn, op: str, arg: int, name: str):
        def counted(*args, **kwargs):
            if self.recording:
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                tensor = args[arg] if len(args) > arg else kwargs[name]
                size = dist.get_world_size(group) if op != "send" else 2
                record = CommRecord(op, self._label(group), size, _nbytes(tensor), self.inside)
                self.counts[record] += 1
                if self.layer is not None:
                    self.layer_bytes[(self.layer, record.group)] += record.sent_bytes
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                self.seconds[(record.group, record.inside)] += time.perf_counter() - start
                return out
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

    def mark_inside(self, modules) -> List:
        """Tag records issued while one of `modules` runs its forward (e.g. the transformer
        layers) as inside, the others as outside, and attribute their bytes to the module's
        `layer_number` (else its index); returns the hook handles (removed on exit)."""
        self.inside = False
        handles = []
        for index, module in enumerate(modules):
            number = getattr(module, "layer_number", index)

            def enter(*_, number=number):
                self.inside, self.layer = True, number

            def leave(*_):
                self.inside, self.layer = False, None

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        self._undo += [handle.remove for handle in handles]  # the hooks go with the counter
        return handles

    def sent_bytes_by_layer(self) -> Dict[int, Dict[str, float]]:
        """{layer number: {group: bytes sent}} for the marked modules."""
        return bytes_by_layer(self.layer_bytes)

    def sent_bytes_by_group(self, inside: Optional[bool] = None) -> Dict[str, float]:
        """Bytes this rank sent, per group label (only inside/outside records if asked)."""
        return sent_bytes_by_group(self.counts, inside)

    def total_sent_bytes(self) -> float:
        return sum(r.sent_bytes * calls for r, calls in self.counts.items())

    def reset(self) -> Counter:
        """Return the counts so far and start again (e.g. once per step); the per-layer bytes
        start again too."""
        counts, self.counts, self.layer_bytes = self.counts, Counter(), Counter()
        return counts

    def reset_seconds(self) -> Counter:
        """Return the seconds in collectives so far ({(group, inside): s}) and start again."""
        seconds, self.seconds = self.seconds, Counter()
        return seconds


# Helpers on counts ({CommRecord: calls}) and per-layer bytes ({(layer, group): bytes}), for
# counts kept beyond one CommCounter (per step, summed over steps, sent between ranks).

def sent_bytes_by_group(counts: Dict[CommRecord, float],
                        inside: Optional[bool] = None) -> Dict[str, float]:
    """Bytes sent per group label (only inside/outside records if asked)."""
    return _by_group(counts, inside, lambda r: r.sent_bytes)


def calls_by_group(counts: Dict[CommRecord, float],
                   inside: Optional[bool] = None) -> Dict[str, float]:
    """Collectives issued per group label (only inside/outside records if asked)."""
    return _by_group(counts, inside, lambda r: 1)


def _by_group(counts, inside, per_call) -> Dict[str, float]:
    out: Dict[str, float] = defaultdict(float)
    for r, calls in counts.items():
        if inside is None or r.inside == inside:
            out[r.group] += per_call(r) * calls
    return dict(out)


def bytes_by_layer(layer_bytes: Dict) -> Dict[int, Dict[str, float]]:
    """{(layer, group): bytes} -> {layer: {group: bytes}}, layers and groups in order."""
    out: Dict[int, Dict[str, float]] = defaultdict(dict)
    for (layer, group), sent in sorted(layer_bytes.items()):
        out[layer][group] = sent
    return dict(out)


def count_rows(counts: Dict[CommRecord, float]) -> List[list]:
    """Counts as sorted JSON-friendly rows [op, group, group size, payload, inside, calls]
    (how reports store them and how predictions are compared with them)."""
    return sorted([r.op, r.group, r.group_size, r.payload_bytes, r.inside, calls]
                  for r, calls in counts.items())


def counts_table(counts: Dict[CommRecord, float], per: float = 1.0) -> str:
    """Markdown: one row per (op, group, payload, inside), calls and bytes sent / `per`."""
    rows = sorted(counts.items(), key=lambda kv: (not kv[0].inside, kv[0].group, kv[0].op,
                                                  kv[0].payload_bytes))
    lines = ["| where | group | op | payload B | calls | sent B / rank |",
             "|---|---|---|---|---|---|"]
    for r, calls in rows:
        lines.append(f"| {'layers' if r.inside else 'outside'} | {r.group} ({r.group_size}) "
                     f"| {r.op} | {r.payload_bytes} | {calls / per:g} | "
                     f"{r.sent_bytes * calls / per:.0f} |")
    return "\n".join(lines)


# (label, ProcessGroupCollection field) of the groups CommCounter names, first match wins
GROUP_LABELS = (("TP", "tp"), ("dim-slice", None), ("head-group", None), ("KV-share", None),
                ("PP", "pp"),
                ("DP", "dp"), ("DP+CP", "dp_cp"), ("MP", "mp"), ("EP", "ep"),
                ("TPxEP", "tp_ep"), ("expert-TP", "expt_tp"), ("expert-DP", "expt_dp"),
                ("embedding", "embd"))


def group_labels() -> dict:
    """Names of megatron's and the grid's process groups (after initialization), for
    CommCounter: the same names in the training log, generation reports and the cost model."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_mxn.grid.groups import get_grid, mxn_parallel_is_initialized

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    grid = get_grid() if mxn_parallel_is_initialized() else None
    found = grid.labels() if grid else {}
    labels = {}
    for name, field in GROUP_LABELS:
        group = found.get(name) if field is None else getattr(pgs, field, None)
        if group is not None:
            labels[name] = group
    return labels


def format_bytes(x: float, digits: int = 2, smallest: str = "B") -> str:
    """Bytes in binary units, starting at `smallest` (whole bytes, `digits` decimals above)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    first = units.index(smallest)
    x /= 1024 ** first
    for unit in units[first:]:
        if abs(x) < 1024 or unit == units[-1]:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.{digits}f} {unit}"
        x /= 1024


def format_calls(calls: Dict[str, float]) -> str:
    """{group: collectives per layer and decode step} -> 'TP 4, dim-slice 2' ('none' if empty)."""
    return ", ".join(f"{k} {v:g}" for k, v in calls.items()) or "none"
