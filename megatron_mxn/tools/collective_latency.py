"""What one collective costs on this machine, and what a decode step's collectives cost at
those prices.

A decode step of a small batch moves a few KiB per collective, so its time in collectives is
set by each collective's latency, not its bytes: the layouts compare by how many collectives
they issue, over how many ranks, with which algorithm. This tool measures, in one torchrun job
on the backend the runs use (gloo on CPU, NCCL on GPUs), the time of every collective the
layouts issue (all-reduce, all-gather, reduce-scatter, all-to-all, broadcast, send) over groups
of every size G that divides the world, all groups busy at once as in a step, at a small and
a large payload, and fits t(payload) = alpha + beta * payload per (op, G).

`decode_step_seconds(report, fit(table))` prices a generate report's decode steps (its
`comm_steps` rows: [op, group, G, payload, inside, calls]) with that fit
(megatron_mxn/analysis/collective_prices.py): the A/B's column "collectives at measured
latency" (tools/ab_compare.py), what the transport alone costs a layout's decode step on this
machine. The planner takes the same table (`plan --collective-latency FILE`).

    python -m torch.distributed.run --nproc-per-node 4 -m megatron_mxn.tools.collective_latency \\
        --output-json collective_latency.json          (make bench-collectives)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List, Sequence

from megatron_mxn.analysis.collective_prices import cells, fit, step_seconds

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send")
PAYLOADS = (1024, 256 * 1024)  # bytes: a decode step's size, and one where bandwidth shows


def group_sizes(world: int) -> List[int]:
    """The group sizes measured: every divisor of the world from 2 up."""
    return [g for g in range(2, world + 1) if world % g == 0]


def _run_op(op: str, group, payload: int, device):
    """One call of `op` over `group` (this rank's block of G consecutive ranks) with a
    `payload`-byte tensor in the role CommRecord gives it (the all-reduce's tensor, the
    all-gather's output, the reduce-scatter's and the all-to-all's input)."""
    import torch
    import torch.distributed as dist

    g = dist.get_world_size(group)
    n = max(g, payload // 4 // g * g)  # fp32 elements, divisible by G
    full = torch.ones(n, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_gather":
        piece = torch.ones(n // g, device=device)
        return lambda: dist.all_gather_into_tensor(full, piece, group=group)
    if op == "reduce_scatter":
        piece = torch.empty(n // g, device=device)
        return lambda: dist.reduce_scatter_tensor(piece, full, group=group)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full, group=group)
    if op == "broadcast":
        root = dist.get_global_rank(group, 0)
        return lambda: dist.broadcast(full, root, group=group)
    if op == "send":  # one hop in a group of two: its first rank to its second (PP's activations)
        me = dist.get_group_rank(group, dist.get_rank())
        peer = dist.get_global_rank(group, 1 - me)
        if me == 0:
            return lambda: dist.send(full, peer, group=group)
        return lambda: dist.recv(full, peer, group=group)
    raise ValueError(f"unknown collective {op!r}; known: {OPS}")


def measure(iters: int = 30, repeats: int = 5, payloads: Sequence[int] = PAYLOADS) -> dict:
    """Time every op over every group size (run on every rank of an initialized world).
    Returns {"world", "backend", "seconds": {op: {G: {payload: s}}}}: per call, the slowest
    rank's mean over `iters` calls, median of `repeats` such loops (a barrier before each)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    seconds: Dict[str, Dict[int, Dict[int, float]]] = {op: {} for op in OPS}
    for g in group_sizes(world):
        group, subgroups = dist.new_subgroups(group_size=g)
        for op in OPS:
            if op == "send" and g != 2:
                continue  # a send is one hop whatever the group
            for payload in payloads:
                call = _run_op(op, group, payload, device)
                loops = []
                for _ in range(repeats):
                    call(), call()  # warm (connections, buffers)
                    _sync(device)
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(iters):
                        call()
                    _sync(device)
                    took = torch.tensor([(time.perf_counter() - start) / iters], device=device)
                    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slowest rank's view
                    loops.append(float(took))
                seconds[op].setdefault(g, {})[payload] = statistics.median(loops)
        for sub in subgroups:
            dist.destroy_process_group(sub)
    return {"world": world, "backend": dist.get_backend(),
            "seconds": {op: by_g for op, by_g in seconds.items() if by_g}}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def decode_step_seconds(report: dict, fitted: Dict[str, Dict[int, tuple]]) -> float:
    """A generate report's mean decode step (steps 1..) priced by `fitted`, on its busiest
    pipeline stage (a stage's ranks issue the same collectives)."""
    per_stage = []
    for stage in report["per_stage"].values():
        decode = stage["comm_steps"][1:]
        per_stage.append(sum(step_seconds(rows, fitted) for rows in decode) / max(len(decode), 1))
    return max(per_stage)


def markdown(table: dict) -> List[str]:
    """The measured table: one row per op and group size, microseconds per call."""
    measured = cells(table)
    payloads = sorted({p for by_g in measured.values() for by_p in by_g.values() for p in by_p})
    fitted = fit(table)
    head = ["collective", "ranks"] + [f"{_size(p)} (us)" for p in payloads] + [
        "alpha (us)", "beta (us / KiB)"]
    lines = [f"{table['world']} ranks, {table['backend']}; each cell: one call, the slowest "
             "rank's mean over a loop, median of the loops; every group of the size busy at "
             "once.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, by_g in measured.items():
        for g, by_p in sorted(by_g.items()):
            alpha, beta = fitted[op][g]
            row = [f"{1e6 * by_p[p]:.0f}" if p in by_p else "" for p in payloads]
            lines.append(f"| {op} | {g} | " + " | ".join(row)
                         + f" | {1e6 * alpha:.0f} | {1e6 * beta * 1024:.2f} |")
    return lines


def _size(payload: int) -> str:
    return f"{payload // 1024} KiB" if payload >= 1024 else f"{payload} B"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-json", help="write the measured table here (rank 0)")
    p.add_argument("--output-md", help="write the markdown table here (rank 0)")
    p.add_argument("--iters", type=int, default=30, help="calls per timed loop")
    p.add_argument("--repeats", type=int, default=5, help="timed loops per cell (median)")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        table = measure(args.iters, args.repeats)
        if dist.get_rank() == 0:
            lines = markdown(table)
            print("\n".join(lines), flush=True)
            if args.output_json:
                with open(args.output_json, "w") as f:
                    json.dump(table, f, indent=1)
            if args.output_md:
                with open(args.output_md, "w") as f:
                    f.write("# Collective latency\n\n`" + _command(table["world"]) + "`\n\n"
                            + "\n".join(lines) + "\n")
    finally:
        dist.destroy_process_group()
    return 0


def _command(world: int) -> str:
    return (f"python -m torch.distributed.run --nproc-per-node {world} -m "
            "megatron_mxn.tools.collective_latency")


if __name__ == "__main__":
    raise SystemExit(main())
