"""Prices of collectives measured on a machine (megatron_mxn/tools/collective_latency.py
measures them): the seconds of one call of an op over a group of G ranks, fitted as
alpha + beta * payload per (op, G), and what a step's collectives cost at those prices. The A/B
prices each layout's decode step with them; the planner prices its collectives with them instead
of a cluster preset's alpha-beta numbers (`plan --collective-latency FILE`)."""

from __future__ import annotations

from typing import Dict, Iterable, Sequence


def cells(table: dict) -> Dict[str, Dict[int, Dict[int, float]]]:
    """The measured seconds {op: {G: {payload: s}}} with integer keys (JSON makes them
    strings)."""
    return {op: {int(g): {int(p): float(s) for p, s in by_p.items()} for g, by_p in by_g.items()}
            for op, by_g in table["seconds"].items()}


def fit(table: dict) -> Dict[str, Dict[int, tuple]]:
    """{op: {G: (alpha s, beta s/B)}} from the measured table: alpha + beta * payload through
    the smallest and largest payload measured (beta >= 0)."""
    out: Dict[str, Dict[int, tuple]] = {}
    for op, by_g in cells(table).items():
        for g, by_payload in by_g.items():
            points = sorted(by_payload.items())
            (p0, t0), (p1, t1) = points[0], points[-1]
            beta = max(0.0, (t1 - t0) / (p1 - p0)) if p1 > p0 else 0.0
            out.setdefault(op, {})[g] = (max(0.0, t0 - beta * p0), beta)
    return out


def call_seconds(op: str, group_size: int, payload: int, fitted: Dict[str, Dict[int, tuple]]
                 ) -> float:
    """The fitted time of one call (a send: the two-rank one, whatever the label's size)."""
    size = 2 if op == "send" else group_size
    try:
        alpha, beta = fitted[op][size]
    except KeyError:
        raise KeyError(f"no measured time for {op} over {size} ranks (measured: "
                       f"{ {o: sorted(g) for o, g in fitted.items()} })") from None
    return alpha + beta * payload


def step_seconds(rows: Iterable[Sequence], fitted: Dict[str, Dict[int, tuple]]) -> float:
    """One step's collectives ([op, group, G, payload, inside, calls] rows) at the fitted
    prices; collectives over one rank cost nothing."""
    return sum(calls * call_seconds(op, size, payload, fitted)
               for op, _group, size, payload, _inside, calls in rows if size > 1)
