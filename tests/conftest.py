import pytest

from tests.pool import WorkerPool

_POOLS = {}


def get_pool(world_size: int) -> WorkerPool:
    """The session's pool of `world_size` ranks, restarted if a previous case killed it."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


@pytest.fixture
def pool4():
    return get_pool(4)


@pytest.fixture
def pool8():
    return get_pool(8)


@pytest.fixture
def pool2():
    return get_pool(2)


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close()
