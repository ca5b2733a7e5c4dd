"""Functions that run on every rank of a worker pool (tests/pool.py); one per test case."""
