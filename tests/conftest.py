import pytest

from tests.pool import WorkerPool

_POOLS = {}
POOL_FIXTURES = {"pool2", "pool4", "pool8"}
MAX_THREADS_PER_RANK = 200  # (a fresh rank has 7; a hybrid MoE case leaves ~125)


def get_pool(world_size: int) -> WorkerPool:
    """The session's pool of `world_size` ranks, restarted if a previous case killed it or
    left its ranks with too many threads (tests/pool.py: destroyed gloo groups that C++ still
    holds keep theirs, and hundreds of them slow every later case)."""
    pool = _POOLS.get(world_size)
    if pool is not None and pool.alive and pool.max_threads() > MAX_THREADS_PER_RANK:
        pool.close()
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture
def pool4():
    return get_pool(4)


@pytest.fixture
def pool8():
    return get_pool(8)


@pytest.fixture
def pool2():
    return get_pool(2)


def _uses_pool(item) -> bool:
    """Cases taking a pool fixture, or marked `uses_pool` (they pick the pool at run time)."""
    return (bool(POOL_FIXTURES & set(getattr(item, "fixturenames", ())))
            or item.get_closest_marker("uses_pool") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "uses_pool: the case runs on a worker pool it picks itself")
    config.addinivalue_line("markers", "launches: the case starts processes of its own "
                            "(torchrun, the A/B driver, SLURM, scripts)")
    config.addinivalue_line("markers", "fast: set by conftest on every case that neither uses "
                            "a worker pool nor launches processes (`make test-fast`)")


def pytest_collection_modifyitems(session, config, items):
    """Tier the cases (`fast` = in this process only: layout, schedules, cost model, configs,
    options; `make test-fast` runs them) and run the cases that use worker pools first, so the
    pools can be shut down before the tests that launch their own processes (idle ranks still
    cost CPU on a 2-core machine)."""
    for item in items:
        if not _uses_pool(item) and item.get_closest_marker("launches") is None:
            item.add_marker(pytest.mark.fast)
    items.sort(key=lambda item: not _uses_pool(item))


def pytest_runtest_setup(item):
    if not _uses_pool(item):
        _close_pools()


def pytest_sessionfinish(session, exitstatus):
    _close_pools()


@pytest.fixture(scope="session")
def cpu_dense_ab(tmp_path_factory):
    """The CPU-sized dense A/B, run once through scripts/ab_compare.py (which pretrains the
    checkpoint first): its results folder. Later tests reuse the checkpoint it made."""
    import os
    import subprocess
    import sys

    from tests.launch import REPO

    results = tmp_path_factory.mktemp("ab")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ab_compare.py"), "--config",
         str(REPO / "configs" / "cpu_dense.yaml"), "--layouts", "baseline,grid,tp,tp_fused",
         "--results-dir", str(results), "--run", "ab",
         "--repeats", "2", "--max-new-tokens", "4", "--mxn-log-comm"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return results, proc


@pytest.fixture(scope="session")
def cpu_dense_checkpoint(cpu_dense_ab):
    results, proc = cpu_dense_ab
    ckpt = results / "ab" / "cpu_dense" / "checkpoint"
    assert (ckpt / "latest_checkpointed_iteration.txt").exists(), proc.stdout[-3000:]
    return ckpt
