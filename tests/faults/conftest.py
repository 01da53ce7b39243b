"""Fixtures for the fault-injection tests (helpers live in faults/kit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from pgsched import Scheduler

from .cluster import Cluster
from .kit import fault_options
from .pgbouncer import PgBouncer, PgBouncerUnavailable


@pytest.fixture
async def cluster_sched(cluster: Cluster, schema: str) -> AsyncIterator[Scheduler]:
    """A migrated schema on the throwaway cluster, reached as the application role."""
    cluster.start()  # a failed test may have left it stopped
    async with Scheduler(cluster.app_dsn(), schema=schema, options=fault_options()) as s:
        await s.migrate()
        yield s
    cluster.start()
    with psycopg.connect(cluster.superuser_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def pgbouncer(cluster: Cluster) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the throwaway cluster (pgbouncer.py)."""
    try:
        bouncer = PgBouncer(cluster)
    except PgBouncerUnavailable as exc:
        pytest.skip(f"cannot run PgBouncer: {exc}")
    yield bouncer
    bouncer.destroy()
