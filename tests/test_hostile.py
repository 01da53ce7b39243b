"""Hostile neighbours (issue 15): a role with no rights (or only the rights `migrate
--grant` gives), a poisoned row or a crafted input must not stop, spin or expose pgsched.
Everything runs as real `python -m pgsched` processes against a real server; the hostile
roles are created by the tests in a cluster they own."""

from __future__ import annotations

import json
import secrets

import psycopg
import pytest
from conftest import cli_env, run_cli, wait_until, write_config

TRACEBACK = "Traceback (most recent call last)"

SECRET = "S3CRET"

# -- DSN passwords ---------------------------------------------------------------------------

# Every spelling libpq reads a password from; each leaked through the pattern mask.
PASSWORD_SPELLINGS = {  # port 1: nothing listens, connecting fails fast
    "question mark in the userinfo": f"postgresql://root:S3?{SECRET}@localhost:1/db",
    "percent-encoded key": f"postgresql://localhost:1/db?pass%77ord={SECRET}",
    "percent-encoded value": "postgresql://root:%53%33CRET@localhost:1/db",
    "repeated key": f"postgresql://localhost:1/db?password=x&password={SECRET}",
    "key=value": f"host=localhost port=1 password={SECRET} dbname=db",
    "key=value quoted": f"host=localhost port=1 password='{SECRET} x' dbname=db",
    "sslpassword": f"postgresql://localhost:1/db?sslpassword={SECRET}",
}


@pytest.mark.parametrize("dsn", PASSWORD_SPELLINGS.values(), ids=PASSWORD_SPELLINGS.keys())
def test_config_masks_every_spelling_of_the_password(dsn):
    shown = run_cli("config", env=cli_env(PGSCHED_DSN=dsn))
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr and "S3%43" not in shown.stdout
    assert "***" in shown.stdout


@pytest.mark.parametrize("dsn", PASSWORD_SPELLINGS.values(), ids=PASSWORD_SPELLINGS.keys())
def test_world_readable_config_warns_for_every_spelling_of_the_password(tmp_path, dsn):
    config = write_config(tmp_path, "postgresql://placeholder", "pgsched")
    config.write_text(config.read_text().replace('"postgresql://placeholder"', json.dumps(dsn)))
    config.chmod(0o644)
    # The worker logs the warning at start, before it tries to connect (and fails to).
    shown = run_cli("worker", "--burst", config=config)
    assert "chmod 600" in shown.stderr, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr


@pytest.mark.parametrize("dsn", PASSWORD_SPELLINGS.values(), ids=PASSWORD_SPELLINGS.keys())
def test_a_password_in_dsn_on_the_command_line_gets_one_warning_line(dsn):
    shown = run_cli("--dsn", dsn, "config")
    assert shown.returncode == 0, shown.stderr
    warnings = [line for line in shown.stderr.splitlines() if "--dsn carries a password" in line]
    assert len(warnings) == 1 and "PGPASSFILE" in warnings[0], shown.stderr
    assert SECRET not in shown.stdout + shown.stderr


def test_no_password_in_dsn_no_warning():
    shown = run_cli("--dsn", "postgresql://app@localhost:1/db?sslmode=require", "config")
    assert shown.returncode == 0 and "password" not in shown.stderr, shown.stderr


# -- identifiers derived from the schema name -------------------------------------------------


async def test_a_63_character_schema_enqueues_and_wakes_its_worker(pg_dsn, tmp_path, workers):
    # pgsched_<schema> is 71 bytes here: add failed with a traceback (channel name too long).
    schema = "s" + secrets.token_hex(31)
    try:
        # A minute between polls: only the NOTIFY can get the job run within the deadline.
        config = write_config(tmp_path, pg_dsn, schema, poll_seconds=60)
        assert run_cli("migrate", config=config).returncode == 0
        workers(config)
        await wait_until(lambda: _listening(pg_dsn, schema[:20]), timeout=30,
                         what="the worker to LISTEN")
        added = run_cli("add", "add", "--args", "[2, 3]", "--id", "long-schema", config=config)
        assert added.returncode == 0 and TRACEBACK not in added.stderr, added.stderr
        await wait_until(lambda: _status(pg_dsn, schema, "long-schema") == "completed",
                         timeout=20, what="the job to run")
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _status(dsn: str, schema: str, job_id: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f'SELECT status FROM "{schema}".jobs WHERE id = %s',
                           [job_id]).fetchone()
    return row and row[0]


def _listening(dsn: str, schema_prefix: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                            [f'LISTEN "pgsched_{schema_prefix}%']).fetchone()[0] > 0
