"""Start N local ranks on CPU with the gloo backend and run one function on all of them.

For the demo and the CPU examples: each rank enables CPU mode, joins a gloo world over
loopback, runs `fn(*args)`; rank results come back in rank order. A failure on any rank is
re-raised here with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable, List


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bootstrap_rank(rank: int, world: int, port: int, training: bool = False) -> None:
    """Make this process rank `rank` of a `world`-rank gloo world on loopback, in CPU mode
    (with megatron.training's patches when `training`): the one start-up shared by
    run_on_cpu_ranks, the test worker pool (tests/pool.py) and the HF converter's one rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="")
    import torch

    torch.set_num_threads(1)
    import megatron_mxn.cpu

    megatron_mxn.cpu.enable(training=training)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _rank_main(rank: int, world: int, port: int, fn, args, results) -> None:
    try:
        bootstrap_rank(rank, world, port)
        from megatron_mxn.grid.groups import clean_shutdown

        with clean_shutdown():  # (every group destroyed before the process exits)
            results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001  (reported to the launcher)
        results.put((rank, False, traceback.format_exc()))


def run_on_cpu_ranks(world: int, fn: Callable, *args) -> List[Any]:
    """Run fn(*args) on `world` gloo ranks (spawned processes); return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out, failed = {}, {}
    try:
        for _ in range(world):
            rank, ok, value = results.get()
            (out if ok else failed)[rank] = value
            if failed:
                break
    finally:
        if failed:
            for p in procs:
                p.kill()
        for p in procs:
            p.join()
    if failed:
        rank, tb = next(iter(failed.items()))
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return [out[r] for r in range(world)]
