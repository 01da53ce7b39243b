"""docs/job-control.md's recipes for enqueueing inside an ORM's transaction, run as
written against the test server: a SQLAlchemy Session and Django's `transaction.atomic()`
(both over psycopg 3). The job commits with the ORM's writes, and a rollback leaves none."""

from __future__ import annotations

import asyncio
import urllib.parse

import psycopg
import pytest
from test_transactional import job_ids

from pgsched import Scheduler


@pytest.fixture
def orders(pg_dsn: str, schema: str, sched) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".orders (id int PRIMARY KEY)')
    return f'"{schema}".orders'


def test_sqlalchemy_session_commits_the_job_with_its_writes(pg_dsn, schema, orders):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    engine = sqlalchemy.create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg://"))
    sched = Scheduler(pg_dsn, schema=schema)
    try:
        for order, commit in ((1, False), (2, True)):
            with Session(engine) as session:
                session.begin()
                session.execute(sqlalchemy.text(f"INSERT INTO {orders} VALUES (:id)"),
                                {"id": order})
                conn = session.connection().connection.driver_connection
                sched.schedule_sync("noop", job_id=f"order-{order}", connection=conn)
                session.commit() if commit else session.rollback()
    finally:
        engine.dispose()
    assert asyncio.run(job_ids(pg_dsn, schema)) == ["order-2"]


def test_django_atomic_commits_the_job_with_its_writes(pg_dsn, schema, orders):
    pytest.importorskip("django")
    import django
    from django.conf import settings

    url = urllib.parse.urlsplit(pg_dsn)
    query = dict(urllib.parse.parse_qsl(url.query))
    if not settings.configured:
        settings.configure(DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
            "USER": url.username or "", "PASSWORD": url.password or "",
            "HOST": query.get("host", url.hostname or ""),
            "PORT": str(url.port or query.get("port", "")),
        }})
        django.setup()
    from django.db import connection, transaction

    sched = Scheduler(pg_dsn, schema=schema)
    try:
        with transaction.atomic():
            connection.cursor().execute(f"INSERT INTO {orders} VALUES (2)")
            connection.ensure_connection()
            sched.schedule_sync("noop", job_id="order-2", connection=connection.connection)
        with pytest.raises(RuntimeError), transaction.atomic():
            connection.cursor().execute(f"INSERT INTO {orders} VALUES (1)")
            sched.schedule_sync("noop", job_id="order-1", connection=connection.connection)
            raise RuntimeError("the view failed")
        # Outside atomic() Django autocommits: the job is written at once.
        sched.schedule_sync("noop", job_id="order-3", connection=connection.connection)
    finally:
        connection.close()
    assert asyncio.run(job_ids(pg_dsn, schema)) == ["order-2", "order-3"]
