"""Security end to end through the CLI: least privilege, secrets, identifiers, hostile
values. Roles and password authentication need a server the test owns (the `cluster`
fixture); everything runs as real `python -m pgsched` processes."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import cli_env, finished_jobs, run_cli, write_config
from typer.testing import CliRunner

from pgsched.cli import app

TRACEBACK = "Traceback (most recent call last)"


def one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert TRACEBACK not in proc.stderr
    # A password in --dsn earns a warning line of its own (test_hostile.py checks it).
    lines = [line for line in proc.stderr.strip().splitlines()
             if "--dsn carries a password" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@dataclass
class Roles:
    owner: str
    runtime: str
    owner_dsn: str
    runtime_dsn: str
    superuser_dsn: str
    schema: str


@pytest.fixture
def roles(cluster) -> Iterator[Roles]:
    """An owner role that may create schemas and a runtime role with no grants at all."""
    suffix = secrets.token_hex(4)
    owner, runtime, password = f"owner_{suffix}", f"runtime_{suffix}", secrets.token_hex(8)
    cluster.start()
    with psycopg.connect(cluster.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT CREATE ON DATABASE postgres TO {owner}")
        conn.execute(f"CREATE ROLE {runtime} LOGIN PASSWORD '{password}'")
    base = f"127.0.0.1:{cluster.port}/postgres"
    yield Roles(owner, runtime, f"postgresql://{owner}:{password}@{base}",
                f"postgresql://{runtime}:{password}@{base}", cluster.superuser_dsn,
                f"s_{suffix}")
    with psycopg.connect(cluster.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS s_{suffix} CASCADE")
        for role in (runtime, owner):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", [schema]).fetchone()[0]


def test_runtime_role_runs_worker_add_and_ls_with_only_the_grants_it_needs(roles, tmp_path):
    owner_config = write_config(_mkdir(tmp_path, "owner"), roles.owner_dsn, roles.schema)
    runtime_config = write_config(_mkdir(tmp_path, "runtime"), roles.runtime_dsn, roles.schema)

    # The runtime role cannot set the schema up itself: one clear line, nothing created.
    error = one_line_error(run_cli("migrate", config=runtime_config), 1)
    assert "permission denied" in error and "pgsched migrate --grant ROLE" in error
    assert not schema_exists(roles.superuser_dsn, roles.schema)

    migrated = run_cli("migrate", "--grant", roles.runtime, config=owner_config)
    assert migrated.returncode == 0 and migrated.stdout.strip().isdigit(), migrated.stderr

    added = run_cli("add", "add", "--args", "[2, 3]", "--id", "least-1", config=runtime_config)
    assert (added.returncode, added.stdout.strip()) == (0, "least-1"), added.stderr
    # The worker's default --migrate is a no-op on an up-to-date schema: no DDL needed.
    worked = run_cli("worker", "--burst", config=runtime_config)
    assert worked.returncode == 0, worked.stderr
    listed = run_cli("ls", "--json", config=runtime_config)
    assert [(j["id"], j["status"], j["result"]) for j in json.loads(listed.stdout)] == \
        [("least-1", "completed", 5)]
    cancel = run_cli("cancel", "least-1", config=runtime_config)
    assert "already completed" in one_line_error(cancel, 1)

    with psycopg.connect(roles.superuser_dsn) as conn:
        granted = set(conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = %s AND table_schema = %s", [roles.runtime, roles.schema]))
    dml = {"SELECT", "INSERT", "UPDATE", "DELETE"}
    assert granted == {(t, p) for t in ("jobs", "workers", "schedules", "paused_queues",
                                        "queue_limits", "job_dependencies", "worker_crashes")
                       for p in dml} | \
        {("schema_migrations", "SELECT")}

    s = roles.schema
    with psycopg.connect(roles.runtime_dsn, autocommit=True) as conn:
        for ddl in (f"CREATE TABLE {s}.x (i int)", f"ALTER TABLE {s}.jobs ADD COLUMN x int",
                    f"DROP TABLE {s}.workers", f"TRUNCATE {s}.jobs",
                    f"CREATE INDEX ON {s}.jobs (task)", f"DROP TYPE {s}.job_status CASCADE",
                    f"INSERT INTO {s}.schema_migrations VALUES (999, 'evil')",
                    f"DELETE FROM {s}.schema_migrations"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)

    # Granting again (after an upgrade) is harmless.
    again = run_cli("migrate", "--grant", roles.runtime, config=owner_config)
    assert again.returncode == 0, again.stderr


def _mkdir(parent: Path, name: str) -> Path:
    (parent / name).mkdir(exist_ok=True)
    return parent / name


def test_grant_refuses_bad_and_unknown_roles_without_writing(roles, tmp_path):
    config = write_config(tmp_path, roles.owner_dsn, roles.schema)
    bad = run_cli("migrate", "--grant", 'x"; DROP SCHEMA public; --', config=config)
    assert "invalid role name" in one_line_error(bad, 2)
    unknown = run_cli("migrate", "--grant", "nobody_here", config=config)
    assert "role 'nobody_here' does not exist" in one_line_error(unknown, 1)
    # The migration and the grant are one transaction: nothing half-written.
    assert not schema_exists(roles.superuser_dsn, roles.schema)


# -- secrets ---------------------------------------------------------------------------


def test_dsn_password_never_in_output_logs_or_errors(cluster, schema, tmp_path):
    cluster.start()
    password = cluster.app_password
    config = write_config(tmp_path, cluster.app_dsn(), schema)
    runs = [run_cli("migrate", config=config),
            run_cli("add", "add", "--args", "[1, 2]", "--id", "secret-1", config=config),
            run_cli("worker", "--burst", config=config),
            run_cli("ls", config=config), run_cli("ls", "--json", config=config)]
    assert [r.returncode for r in runs] == [0] * 5, [r.stderr for r in runs]
    assert "secret-1" in runs[3].stdout

    port = f"127.0.0.1:{cluster.port}"
    failing = {
        "unreachable": f"postgresql://pgsched_app:{password}@127.0.0.1:1/postgres",
        "wrong password": f"postgresql://pgsched_app:{password}x@{port}/postgres",
        "keyword form": f"host=127.0.0.1 port=1 user=u password='{password} with spaces'",
        "unquoted space": f"host=127.0.0.1 user=u password={password} tail",
        "bad escape": f"postgresql://u:{password}%zz@{port}/postgres",
    }
    with ThreadPoolExecutor(len(failing)) as pool:
        results = dict(zip(failing, pool.map(
            lambda dsn: run_cli("--dsn", dsn, "--schema", schema, "ls"), failing.values()),
            strict=True))
    for name, proc in results.items():
        error = one_line_error(proc, 2 if name in ("unquoted space", "bad escape") else 1)
        assert password not in error, name
    assert "Connection refused" in results["unreachable"].stderr
    assert "password authentication failed" in results["wrong password"].stderr
    assert "cannot be parsed" in results["bad escape"].stderr

    env = cli_env(PGSCHED_DSN=failing["unreachable"])
    via_env = run_cli("--schema", schema, "ls", env=env)
    assert password not in one_line_error(via_env, 1)
    for proc in [*runs, *results.values(), via_env]:
        assert password not in proc.stdout + proc.stderr


def test_readable_config_with_a_password_gets_a_chmod_warning(cluster, schema, tmp_path):
    cluster.start()
    config = write_config(tmp_path, cluster.app_dsn(), schema)
    assert run_cli("migrate", config=config).returncode == 0
    config.chmod(0o644)
    worker = run_cli("worker", "--burst", config=config)
    assert worker.returncode == 0, worker.stderr
    warnings = [json.loads(line) for line in worker.stderr.splitlines()
                if '"config_warning"' in line]
    assert len(warnings) == 1
    assert str(config) in warnings[0]["message"] and "chmod 600" in warnings[0]["message"]
    assert cluster.app_password not in worker.stderr
    config.chmod(0o600)
    assert "config_warning" not in run_cli("worker", "--burst", config=config).stderr


# -- identifiers and task names -----------------------------------------------------------


@pytest.mark.parametrize("schema_name", ['x"; DROP SCHEMA public CASCADE; --', "1abc",
                                         "a" * 64, "pg_catalog", "ünï"])
def test_injection_through_the_schema_name_is_refused(pg_dsn, tmp_path, schema_name):
    flag = run_cli("--dsn", pg_dsn, "--schema", schema_name, "migrate")
    one_line_error(flag, 2)
    config = write_config(tmp_path, pg_dsn, "placeholder")
    config.write_text(config.read_text().replace('"placeholder"', json.dumps(schema_name)))
    one_line_error(run_cli("migrate", config=config), 2)


async def test_only_registered_tasks_run_nothing_is_imported_from_the_database(
        sched, pg_dsn, schema, tmp_path):
    """A job row naming a module function is put back as unknown (never run); the module
    never loads."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\ndef run(): pass\n")
    config = write_config(tmp_path, pg_dsn, schema)
    for name in ("evil_mod.run", "evil_mod:run", "os.system"):
        run_cli("add", name, config=config)  # refused by the CLI: the name is unknown
    # Write the rows directly, as an attacker with INSERT on the table could.
    async with sched.store.pool.connection() as conn:
        for name in ("evil_mod.run", "evil_mod:run", "os.system"):
            await conn.execute(f'INSERT INTO "{schema}".jobs (id, task, execution_time) '
                               "VALUES (%s, %s, now())", [name, name])
    env = cli_env(PYTHONPATH=str(tmp_path))
    assert run_cli("worker", "--burst", config=config, env=env).returncode == 0
    for name in ("evil_mod.run", "evil_mod:run", "os.system"):
        job = await sched.store.get_job(name)
        assert job["status"] == "pending" and "not registered" in job["last_error"]
        assert job["errors"][-1]["outcome"] == "task_unknown"
    assert not marker.exists()


# -- hostile values --------------------------------------------------------------------------


def test_hostile_values_through_the_cli(pg_dsn, schema, tmp_path):
    config = write_config(tmp_path, pg_dsn, schema)
    assert run_cli("migrate", config=config).returncode == 0

    name = one_line_error(run_cli("add", "t" * 10_000, config=config), 2)
    assert "invalid task name" in name and len(name) < 300  # not echoed in full
    long_id = one_line_error(run_cli("add", "add", "--args", "[1, 1]", "--id", "i" * 10_000,
                                     config=config), 2)
    assert "invalid job id" in long_id and len(long_id) < 300
    one_line_error(run_cli("add", "add", "--id", "line\nbreak", config=config), 2)
    for bad_args in ("[NaN]", "[Infinity]", '{"a": 1}', "[1,", "null"):
        one_line_error(run_cli("add", "add", "--args", bad_args, config=config), 2)
    one_line_error(run_cli("add", "add", "--kwargs", '{"a": -Infinity}', config=config), 2)

    weird = "it's \"quoted\" ünïcødé 🚀 ; DROP TABLE jobs; --"
    added = run_cli("add", "add", "--args", "[40, 2]", "--id", weird, config=config)
    assert added.stdout.rstrip("\n") == weird, added.stderr
    assert run_cli("worker", "--burst", config=config).returncode == 0
    listed = json.loads(run_cli("ls", "--json", config=config).stdout)
    assert [(j["id"], j["result"]) for j in listed] == [(weird, 42)]
    assert weird in run_cli("ls", config=config).stdout
    assert "already completed" in one_line_error(run_cli("cancel", weird, config=config), 1)

    # Just under Linux's 128 KiB limit for one argument: a big but fine payload.
    big = json.dumps(["x" * 120_000])  # record(key) takes one argument
    assert run_cli("add", "record", "--args", big, "--id", "big", config=config).returncode == 0


def test_a_10_mb_payload_is_refused_and_nothing_is_written(pg_dsn, schema):
    """10 MB cannot be one argument of a real process (Linux caps it at 128 KiB), so this
    one goes through the same CLI function in-process."""
    assert run_cli("--dsn", pg_dsn, "--schema", schema, "migrate").returncode == 0
    runner = CliRunner()
    payload = json.dumps(["x" * 10_000_000])
    result = runner.invoke(app, ["--dsn", pg_dsn, "--schema", schema, "add", "add",
                                 "--args", payload, "--id", "huge"])
    assert result.exit_code == 2 and "limit is 1048576" in result.stderr
    assert len(result.stderr) < 500
    listed = runner.invoke(app, ["--dsn", pg_dsn, "--schema", schema, "ls", "--json"])
    assert json.loads(listed.stdout) == []



# -- pgsched vacuum reclaims the table ----------------------------------------------------


def _vacuum_stats(dsn: str, schema: str) -> tuple[int, bool]:
    """The jobs table's dead tuples and whether a manual VACUUM ever ran on it (autovacuum
    sets last_autovacuum instead, so it cannot pass for ours)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT n_dead_tup, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
            "WHERE schemaname = %s AND relname = 'jobs'", [schema]).fetchone()


def test_vacuum_cli_vacuums_the_table_as_owner_and_says_so_as_a_runtime_role(roles, tmp_path):
    from pgsched.cli.operate import RECLAIM_AFTER_ROWS

    owner_config = write_config(_mkdir(tmp_path, "owner"), roles.owner_dsn, roles.schema)
    runtime_config = write_config(_mkdir(tmp_path, "runtime"), roles.runtime_dsn, roles.schema)
    migrated = run_cli("migrate", "--grant", roles.runtime, config=owner_config)
    assert migrated.returncode == 0, migrated.stderr
    n = RECLAIM_AFTER_ROWS + 500

    # A runtime role deletes, cannot VACUUM a table it does not own: one line, exit 0.
    finished_jobs(roles.superuser_dsn, roles.schema, n, "r-")
    done = run_cli("vacuum", "--older-than", "1h", config=runtime_config, timeout=120)
    assert done.returncode == 0 and TRACEBACK not in done.stderr, done.stderr
    assert done.stdout.splitlines()[0] == f"completed: {n}"
    skipped = [line for line in done.stderr.splitlines() if "not vacuumed" in line]
    assert len(skipped) == 1 and "owner" in skipped[0], done.stderr
    dead, vacuumed = _vacuum_stats(roles.superuser_dsn, roles.schema)
    assert not vacuumed and dead >= n

    # The owner's run leaves no dead versions behind for autovacuum.
    finished_jobs(roles.superuser_dsn, roles.schema, n, "o-")
    done = run_cli("vacuum", "--older-than", "1h", config=owner_config, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "jobs table vacuumed and analyzed" in done.stderr.splitlines()
    dead, vacuumed = _vacuum_stats(roles.superuser_dsn, roles.schema)
    assert vacuumed and dead < 100, dead

    # A small run leaves the table to autovacuum: no VACUUM of a big table per few rows.
    finished_jobs(roles.superuser_dsn, roles.schema, 10, "s-")
    done = run_cli("vacuum", "--older-than", "1h", config=owner_config)
    assert done.returncode == 0 and "vacuumed" not in done.stderr, done.stderr
