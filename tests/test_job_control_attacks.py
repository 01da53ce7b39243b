"""Attacks on issue 13's job control (review): what a task raises, a complete() from a
thread left behind, and a task holding its job's row lock, against a real PostgreSQL and
real `pgsched worker` processes. Each test names the promise it holds the code to."""

from __future__ import annotations

from pathlib import Path

from conftest import wait_until, write_config
from test_worker_core import ended

HOSTILE_TASKS = Path(__file__).resolve().parent / "hostile_tasks.py"
KINDS = ["delay_systemexit", "delay_keyboard", "delay_property", "reason_str_subclass",
         "reason_property"]


async def test_hostile_retry_and_fail_objects_fail_their_job_and_the_worker_lives(
        sched, tmp_path, pg_dsn, schema, workers):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(HOSTILE_TASKS))
    worker = workers(config)
    jobs = {f"{name}:{kind}": await sched.schedule(name, args=(kind,))
            for name in ("hostile", "hostile_sync") for kind in KINDS}
    jobs["picky_meta"] = await sched.schedule("picky_meta")
    jobs["hostile_result"] = await sched.schedule("hostile_result")
    jobs["picky_meta_timeout"] = await sched.schedule("picky_meta_timeout", timeout=0.2,
                                                     max_retries=1)

    async def statuses():
        return {what: str((await sched.get_job(job_id))["status"])
                for what, job_id in jobs.items()}

    async def all_ended():
        return not {"pending", "running"} & set((await statuses()).values())

    try:
        await wait_until(all_ended, timeout=20, what="every hostile job ended")
    finally:
        print(await statuses(), worker.proc.poll())
    assert set((await statuses()).values()) == {"failed"}
    after = await sched.schedule("fine")
    row = await wait_until(lambda: ended(sched, after), what="a job after them")
    assert str(row["status"]) == "completed"
    assert worker.proc.poll() is None, worker.log()[-2000:]
