"""The import-layer contract of megatron_mxn: layers that only point down.

    base (patching) -> grid -> attention -> runtime (cpu/, accounting) ->
        entry points (inference/, megatron_lm/, convert/) -> analysis -> tools

A module may import (at module level or inside a function) only modules of its own layer or of
the layers before it; the packages of one layer (inference and megatron_lm, cpu and accounting)
import each other in one direction only, and the module graph has no cycle. Every module of
megatron_mxn/ must be mapped to a layer in LAYERS (a module belongs to its longest match).
Parses the sources with ast: no torch.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_mxn"

# (layer, the modules/packages in it), bottom first. A module belongs to its longest match;
# the root package `megatron_mxn` (names imported lazily from grid/ and attention/) only by name.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("base", ("megatron_mxn.patching",)),  # the patch registry; imports nothing of ours
    ("grid", ("megatron_mxn.grid",)),  # the grid itself: layout, process groups, RNG
    ("attention", ("megatron_mxn", "megatron_mxn.attention")),  # the layer for megatron-core
    # What a process runs beside the model: CPU mode, and the collective counter the entry
    # points and the analysis share.
    ("runtime", ("megatron_mxn.cpu", "megatron_mxn.accounting")),
    # Siblings: inference/generate.py uses megatron_lm's flags and configs, never the reverse;
    # the HF converter (convert/) imports neither, so both may use its config mapping.
    ("entry", ("megatron_mxn.inference", "megatron_mxn.megatron_lm", "megatron_mxn.convert")),
    ("analysis", ("megatron_mxn.analysis",)),  # the cost model and the planner's model
    # Tools, imported by nothing in the library: the A/B driver (scripts/ab_compare.py), the
    # planner's report writers and CLI (python -m megatron_mxn.tools.plan) and the demo
    # (python -m megatron_mxn.demo); the scripts of scripts/ (benchmarks) sit above all.
    ("tools", ("megatron_mxn.tools", "megatron_mxn.demo")),
)
ORDER = {name: k for k, (name, _) in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> Optional[Tuple[str, str]]:
    """(layer, LAYERS entry) of a module: its longest matching entry."""
    best = None
    for layer, entries in LAYERS:
        for entry in entries:
            hit = module == entry or (entry != "megatron_mxn" and module.startswith(entry + "."))
            if hit and (best is None or len(entry) > len(best[1])):
                best = (layer, entry)
    return best


def imports_of(name: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int, bool]]:
    """(imported megatron_mxn module, line, inside a function) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    local: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local.update(id(sub) for sub in ast.walk(node) if sub is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [s for s in subs if s in known] or [base]
        for target in targets:
            if target == "megatron_mxn" or target.startswith("megatron_mxn."):
                while target not in known and "." in target:  # (an attribute of a module)
                    target = target.rpartition(".")[0]
                yield target, node.lineno, id(node) in local


@functools.lru_cache(maxsize=None)
def graph():
    known = modules()
    edges: Dict[str, Set[str]] = defaultdict(set)
    where: Dict[Tuple[str, str], Tuple[int, bool]] = {}
    for name, path in known.items():
        for target, line, local in imports_of(name, path, set(known)):
            if target != name:
                edges[name].add(target)
                where.setdefault((name, target), (line, local))
    return known, edges, where


def lazy_exports() -> Dict[str, str]:
    """The root package's `_EXPORTS` (name -> module imported on first use)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def find_cycle(nodes, edges) -> Optional[List[str]]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    unmapped = [m for m in modules() if unit_of(m) is None]
    assert not unmapped, f"map these modules to a layer in LAYERS: {unmapped}"


def test_imports_point_down_or_sideways():
    known, edges, where = graph()
    wrong = []
    for src, targets in edges.items():
        layer, _ = unit_of(src)
        for dst in targets:
            to, _ = unit_of(dst)
            if ORDER[to] > ORDER[layer]:
                line, local = where[(src, dst)]
                wrong.append(f"{src} ({layer}) imports {dst} ({to}) at line {line}"
                             + (" (inside a function)" if local else ""))
    assert not wrong, "imports pointing up a layer:\n" + "\n".join(sorted(wrong))


def test_the_root_package_exports_only_grid_and_attention_names():
    root = ORDER[unit_of("megatron_mxn")[0]]
    wrong = {name: module for name, module in lazy_exports().items()
             if module not in modules() or ORDER[unit_of(module)[0]] > root}
    assert lazy_exports() and not wrong, wrong


def test_the_module_graph_has_no_cycle():
    known, edges, _ = graph()
    assert find_cycle(known, edges) is None, " -> ".join(find_cycle(known, edges))


def test_packages_of_one_layer_import_each_other_one_way():
    """inference -> megatron_lm but never back; cpu and accounting do not meet; etc."""
    _, edges, where = graph()
    units: Dict[str, Set[str]] = defaultdict(set)
    for src, targets in edges.items():
        for dst in targets:
            (layer, a), (other, b) = unit_of(src), unit_of(dst)
            if layer == other and a != b:
                units[a].add(b)
    cycle = find_cycle(set(units) | {b for bs in units.values() for b in bs}, units)
    assert cycle is None, "packages of one layer import each other: " + " -> ".join(cycle)


def test_tools_are_not_imported_by_the_library():
    _, edges, _ = graph()
    offenders = [f"{src} imports {dst}" for src, targets in edges.items() for dst in targets
                 if unit_of(dst)[0] == "tools" and unit_of(src)[0] != "tools"]
    assert not offenders, offenders
