"""A pool of worker processes forming one gloo world, reused across test cases.

Starting a rank costs seconds (importing torch and megatron on 2 cores), so each world size gets
one pool per test session. `pool.run(fn, **kwargs)` runs `fn(**kwargs)` on every rank (SPMD) and
returns the per-rank results; an exception on any rank fails the call with every rank's
traceback. A call that does not finish in time kills the pool (a hung collective cannot be
recovered) and the next call starts a fresh one.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

from megatron_mxn.cpu.launch import bootstrap_rank, free_port


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    os.setpgrp()  # own process group: close() also kills helpers this rank spawns
    bootstrap_rank(rank, world, port)
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, kwargs = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, "ok", fn(**kwargs)))
        except BaseException:  # noqa: BLE001  (reported to the test, which fails)
            results.put((rank, "error", traceback.format_exc()))
        finally:
            _reset_parallel_state()


def _reset_parallel_state() -> None:
    """Leave no parallel state and no process group but the world behind, whatever the case
    did (live gloo groups keep threads and sockets)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_mxn

    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)
    # A destroyed group lives on (with its gloo threads: a run loop and a TCP loop each) while
    # something holds it: megatron-core's RotaryEmbedding.forward is an lru_cache over `self`
    # (up to 32 modules, each with its cp group), MoE's global metrics tracker keeps each
    # entry's reduce group, and a model and its process-group collection form reference
    # cycles. Measured on three decode cases: 24 threads per rank after them, 6 (the start)
    # once the caches are cleared and the cycles collected. A hybrid MoE case (a DDP-wrapped
    # model) still leaves ~125 (43 groups held from C++, not found): the second no longer adds
    # to them once leftover modules are emptied, and conftest.get_pool restarts a pool whose
    # ranks pass MAX_THREADS_PER_RANK.
    _clear_megatron_caches()
    gc.collect()
    _empty_leftover_modules()


def _empty_leftover_modules() -> None:
    """A case's modules that outlive it are held from C++ (megatron's DDP registers hooks on
    the parameters' grad accumulators, whose closures hold the DDP module): empty them, so that
    their process groups and parameters go. No module outlives a case on purpose."""
    import torch

    leftovers = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    for module in leftovers:
        module.__dict__.clear()
    if leftovers:
        gc.collect()


def _clear_megatron_caches() -> None:
    """Clear megatron-core's lru_caches that keep modules (and their process groups) alive."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding

    from megatron.core.transformer.moe import moe_logging

    for cls in (rotary_pos_embedding.RotaryEmbedding,
                yarn_rotary_pos_embedding.YarnRotaryEmbedding):
        cached = cls.__dict__.get("forward")
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    moe_logging._MOE_METRICS_TRACKER = None  # (its entries keep their reduce groups)


class WorkerPool:
    def __init__(self, world_size: int, start_timeout: float = 300):
        self.world_size = world_size
        self.closed = False
        ctx = mp.get_context("spawn")
        port = free_port()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results),
                        daemon=False)  # ranks spawn helpers (dist-ckpt's writer queue)
            for r in range(world_size)
        ]
        atexit.register(self.close, force=True)
        for p in self.procs:
            p.start()
        self._collect("ready", start_timeout)

    def _collect(self, what: str, timeout: float):
        out, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            try:
                rank, status, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(out) - set(errors))
                raise TimeoutError(f"ranks {missing} did not finish {what} within {timeout:.0f} s"
                                   + "".join(f"\n--- rank {r} failed:\n{e}" for r, e in errors.items()))
            if status == "error":
                errors[rank] = value
                deadline = min(deadline, time.monotonic() + 60)  # peers may hang in a collective
            else:
                out[rank] = value
        if errors:
            raise AssertionError("".join(f"\n--- rank {r}:\n{e}" for r, e in sorted(errors.items())))
        return [out[r] for r in range(self.world_size)]

    def run(self, fn, timeout: float = 240, **kwargs):
        """Run fn(**kwargs) on every rank; return the list of per-rank results."""
        for q in self.tasks:
            q.put((fn.__module__, fn.__name__, kwargs))
        return self._collect(f"{fn.__name__}", timeout)

    def run_expecting_error(self, fn, timeout: float = 120, **kwargs):
        """Run fn(**kwargs) on every rank, which must fail on every rank (without hanging);
        return the per-rank tracebacks."""
        for q in self.tasks:
            q.put((fn.__module__, fn.__name__, kwargs))
        try:
            results = self._collect(f"{fn.__name__}", timeout)
        except AssertionError as err:
            errors = str(err).split("\n--- rank ")[1:]
            if len(errors) != self.world_size:
                raise AssertionError(f"only {len(errors)} of {self.world_size} ranks failed:"
                                     f"\n{err}") from None
            return errors
        raise AssertionError(f"{fn.__name__} succeeded on every rank: {results}")

    def max_threads(self) -> int:
        """The most threads any rank has now (Linux /proc; 0 where it cannot be read)."""
        counts = [0]
        for p in self.procs:
            try:
                counts.append(len(os.listdir(f"/proc/{p.pid}/task")))
            except OSError:
                pass
        return max(counts)

    @property
    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, TypeError):
                pass
            p.join(timeout=10)
