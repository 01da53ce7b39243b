"""The JSON API under /api: jobs, schedules, queues, status, workers, events.

Owns: the routes and their request and response shapes. Every route is thin: it
validates with the same code the CLI uses (ops.job_spec_from_object and the scheduler's
own checks for jobs, recurring.define_for_task for schedules, validate_queue_name), calls
the store or the operator read models (ops.py), and returns the JSON the CLI prints with
--json (job objects: `ls --json` plus `queue`; one job: `show --json`; `status --json`;
`workers --json`; `schedules --json`).

Invariants: nothing is written before the whole request is valid; no SQL is built from
request text (every value is a query parameter); errors are `{"error": "<one line>"}`
(the handlers in app.py map pgsched's exceptions to statuses: InvalidInput 400, not
found 404, conflicts and wrong states 409).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import recurring
from ..errors import InvalidInput, JobConflict, JobNotFound, PgschedError, ScheduleNotFound
from ..jobjson import job_to_json, to_jsonable
from ..ops import (
    RETRYABLE_STATUSES,
    gather,
    job_json,
    job_spec_from_object,
    queue_to_json,
    retry_jobs,
    retry_matching,
    schedule_to_json,
    worker_json,
)
from ..queues import validate_queue_name
from ..scheduler import ConflictResolution
from ..store import STATUSES
from ..timing import parse_duration
from .feed import stream

router = APIRouter(prefix="/api")
HEARTBEAT_SECONDS = 15.0
OUTCOMES = 5

# `:path` in the routes: a job id may hold "/" (a client sends it as %2F, which the
# server decodes before routing).
JobId = Annotated[str, Path(min_length=1, max_length=255)]
ScheduleId = Annotated[str, Path(min_length=1, max_length=200)]


# 0 (claimed first) to 9, or the name of one of them.
Priority = Literal["normal", "critical"] | Annotated[int, Field(ge=0, le=9)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobIn(Strict):
    task: str = Field(min_length=1, max_length=255)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    execution_time: str | None = Field(None, description="Aware ISO 8601 time.")
    delay: float | str | None = Field(None, description='Seconds, or a duration like "5m".')
    id: str | None = None
    priority: Priority | None = None
    max_retries: int | None = Field(None, ge=0)
    timeout: float | str | None = Field(None, description="Seconds or a duration.")
    misfire_grace: float | str | None = Field(None, description='Seconds, a duration, "none".')
    queue: str | None = None
    on_conflict: Literal["raise", "ignore", "replace"] = "raise"
    unique_for: float | str | None = Field(
        None, description='Seconds or a duration like "5m": see docs/job-control.md.')
    unique_key: str | None = None
    depends_on: list[str] = Field(
        [], description="Ids of jobs that must complete first: see docs/job-control.md.")


class ScheduleBody(Strict):
    task: str = Field(min_length=1, max_length=255)
    cron: str | None = None
    tz: str | None = None
    every: str | None = Field(None, description='An interval like "15m".')
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    catch_up: Literal["latest", "skip", "all"] = "latest"
    overlap: bool = Field(True, description="False: skip a window while a run is active.")
    priority: Priority | None = None
    max_retries: int | None = Field(None, ge=0)
    timeout: float | None = Field(None, gt=0)


class ScheduleIn(ScheduleBody):
    id: str = Field(min_length=1, max_length=200)
    on_conflict: Literal["raise", "ignore", "replace"] = "raise"


class BulkRetry(Strict):
    status: list[Literal["failed", "expired", "cancelled"]] = ["failed"]
    task: str | None = None
    queue: str | None = None


class PauseIn(Strict):
    reason: str | None = Field(None, max_length=500)


def service(request: Request) -> Any:
    return request.app.state.pgsched


# -- jobs --------------------------------------------------------------------------------


def _cursor(row: dict[str, Any]) -> str:
    raw = json.dumps([row["created_at"].isoformat(), row["id"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(text: str) -> tuple[datetime, str]:
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return datetime.fromisoformat(at), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidInput("invalid `before`: pass the `next` value of the previous page") \
            from None


@router.get("/jobs", summary="List jobs, newest first (keyset-paged)")
async def list_jobs(
    request: Request,
    status: Annotated[list[str] | None, Query(description="Repeatable.")] = None,
    task: str | None = None,
    queue: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[str | None, Query(description="`next` of the previous page.")] = None,
) -> dict[str, Any]:
    statuses = [s for value in status or [] for s in value.split(",") if s]
    for name in statuses:
        if name not in STATUSES:
            raise InvalidInput(f"unknown status {name!r}: use one of {', '.join(STATUSES)}")
    if queue is not None:
        validate_queue_name(queue)
    svc = await service(request).ready()
    rows = await svc.store.list_jobs(
        statuses=statuses or None, task=task, queue=queue, limit=limit + 1,
        before=_parse_cursor(before) if before else None)
    page = rows[:limit]
    return {"jobs": [job_to_json(r) for r in page],
            "next": _cursor(page[-1]) if len(rows) > limit else None}


@router.post("/jobs", status_code=201, summary="Schedule a job (as `pgsched add`)")
async def add_job(request: Request, response: Response, body: JobIn) -> dict[str, Any]:
    svc = await service(request).ready()
    given = body.model_dump(exclude_unset=True,
                            exclude={"on_conflict", "unique_for", "unique_key", "depends_on"})
    # The job-file keys `pgsched add --from` reads: one validator for both.
    renames = {"execution_time": "at", "delay": "in", "max_retries": "retries"}
    nullable = ("timeout", "misfire_grace")  # null there means "no limit"
    line = {renames.get(k, k): v for k, v in given.items() if v is not None or k in nullable}
    if "at" in line and "in" in line:
        raise InvalidInput("use either execution_time or delay, not both")
    try:
        spec = job_spec_from_object(line, tz=svc.settings.jobs.timezone,
                                    now=await svc.store.db_now())
    except InvalidInput as exc:  # name the keys as this API spells them
        message = str(exc)
        for ours, theirs in renames.items():
            message = message.replace(f'"{theirs}"', f'"{ours}"')
        raise InvalidInput(message) from None
    svc.check_task(str(spec.func))
    svc.scheduler.validate(spec)
    mode = ConflictResolution.parse(body.on_conflict)
    unique = body.unique_for is not None or body.unique_key is not None
    if body.depends_on and unique:
        raise InvalidInput("depends_on cannot be combined with unique_for: schedule the job "
                           "that waits on its own")
    if unique:
        unique_for = (body.unique_for if not isinstance(body.unique_for, str)
                      else parse_duration(body.unique_for))
        job_id, added = await svc.scheduler.schedule_unique(
            replace(spec, unique_for=unique_for, unique_key=body.unique_key),
            conflict_resolution=mode)
        if not added:
            response.status_code = 200  # the pending or running job holding the key
        return job_to_json(await _job_row(svc, job_id))
    if body.depends_on:  # as schedule(depends_on=...): checked and written by the store
        job_id = await svc.scheduler.schedule(
            spec.func, execution_time=spec.execution_time, args=spec.args,
            kwargs=spec.kwargs, priority=spec.priority, max_retries=spec.max_retries,
            job_id=spec.job_id, timeout=spec.timeout,
            misfire_grace_time=spec.misfire_grace_time, queue=spec.queue,
            conflict_resolution=mode, depends_on=body.depends_on)
        return job_to_json(await _job_row(svc, job_id))
    [job_id] = await svc.scheduler.schedule_bulk([spec], conflict_resolution=mode)
    if job_id is None:
        if mode is ConflictResolution.REPLACE:
            raise JobConflict(f"job {spec.job_id!r} is running and cannot be replaced; "
                              "try again later")
        response.status_code = 200  # ignore: the existing job, unchanged
        job_id = spec.job_id
    return job_to_json(await _job_row(svc, job_id))


@router.post("/jobs/retry", summary="Retry every failed (expired, cancelled) job matching")
async def bulk_retry(request: Request, body: BulkRetry) -> dict[str, Any]:
    if body.queue is not None:
        validate_queue_name(body.queue)
    svc = await service(request).ready()
    ids = await retry_matching(svc.store, statuses=list(dict.fromkeys(body.status)),
                               task=body.task, queue=body.queue)
    if ids:  # too many to publish one by one: every client reloads instead
        svc.feed.publish("resync", {})
    return {"retried": len(ids), "ids": ids}


async def _job_row(svc: Any, job_id: str) -> dict[str, Any]:
    row = await svc.store.get_job(job_id)
    if row is None:
        raise JobNotFound(f"job {job_id}: not found")
    return row


@router.get("/jobs/{job_id:path}", summary="One job with every attempt (as `pgsched show --json`)")
async def get_job(request: Request, job_id: JobId) -> dict[str, Any]:
    svc = await service(request).ready()
    row = await _job_row(svc, job_id)
    return {**job_json(row, await svc.store.db_now()), "queue": row["queue"]}


async def _cancel(request: Request, response: Response, job_id: str) -> dict[str, Any]:
    svc = await service(request).ready()
    done = await svc.store.request_cancel(ids=[job_id], task=None, queue=None)
    if job_id not in done:
        status = (await svc.store.job_statuses([job_id])).get(job_id)
        if status is None:
            raise JobNotFound(f"job {job_id}: not found")
        raise JobConflict(f"job {job_id}: already {status}")
    if done[job_id] == "running":
        response.status_code = 202  # its worker was told; it ends cancelled shortly
    return job_to_json(await _job_row(svc, job_id))


@router.post("/jobs/{job_id:path}/cancel", summary="Cancel a pending or running job")
async def cancel_job(request: Request, response: Response, job_id: JobId) -> dict[str, Any]:
    return await _cancel(request, response, job_id)


@router.delete("/jobs/{job_id:path}", summary="Cancel a job (the same as POST .../cancel)")
async def delete_job(request: Request, response: Response, job_id: JobId) -> dict[str, Any]:
    return await _cancel(request, response, job_id)


@router.post("/jobs/{job_id:path}/retry", summary="Retry a failed, expired or cancelled job")
async def retry_job(request: Request, job_id: JobId) -> dict[str, Any]:
    svc = await service(request).ready()
    if not await retry_jobs(svc.store, [job_id]):
        status = (await svc.store.job_statuses([job_id])).get(job_id)
        if status is None:
            raise JobNotFound(f"job {job_id}: not found")
        raise JobConflict(f"job {job_id} is {status}; only "
                          f"{', '.join(RETRYABLE_STATUSES)} jobs can be retried")
    row = await _job_row(svc, job_id)
    svc.feed.observe([row])
    return job_to_json(row)


# -- schedules ---------------------------------------------------------------------------


async def _schedule(svc: Any, schedule_id: str) -> dict[str, Any]:
    rows = await svc.store.list_schedules(schedule_id)
    if not rows:
        raise ScheduleNotFound(f"no schedule {schedule_id!r}")
    return schedule_to_json(rows[0])


@router.get("/schedules", summary="Schedules with their last five outcomes")
async def list_schedules(request: Request) -> dict[str, Any]:
    svc = await service(request).ready()
    outcomes: dict[str, list[dict[str, Any]]] = {}
    for row in await svc.store.schedule_outcomes(limit=OUTCOMES):
        outcomes.setdefault(row.pop("schedule_id"), []).append(to_jsonable(row))
    return {"schedules": [{**schedule_to_json(r), "outcomes": outcomes.get(r["id"], [])}
                          for r in await svc.store.list_schedules()]}


async def _define(svc: Any, schedule_id: str, body: ScheduleBody, on_conflict: str) -> bool:
    svc.check_task(body.task)
    definition = recurring.define_for_task(
        body.task, schedule_id=schedule_id, cron=body.cron, every=body.every, tz=body.tz,
        args=body.args, kwargs=body.kwargs, catch_up=body.catch_up, overlap=body.overlap,
        priority=body.priority, max_retries=body.max_retries, timeout=body.timeout)
    return await recurring.add_schedule(svc.store, definition,
                                        default_tz=svc.settings.jobs.timezone,
                                        on_conflict=on_conflict)


@router.post("/schedules", status_code=201, summary="Create a schedule (as `add --cron`)")
async def add_schedule(request: Request, response: Response, body: ScheduleIn
                       ) -> dict[str, Any]:
    svc = await service(request).ready()
    if not await _define(svc, body.id, body, body.on_conflict):
        response.status_code = 200  # ignore: the existing schedule, unchanged
    return await _schedule(svc, body.id)


@router.get("/schedules/{schedule_id}", summary="One schedule")
async def get_schedule(request: Request, schedule_id: ScheduleId) -> dict[str, Any]:
    return await _schedule(await service(request).ready(), schedule_id)


@router.put("/schedules/{schedule_id}", summary="Replace an existing schedule's definition")
async def put_schedule(request: Request, schedule_id: ScheduleId, body: ScheduleBody
                       ) -> dict[str, Any]:
    svc = await service(request).ready()
    current = await _schedule(svc, schedule_id)
    if current["origin"] == "code":
        raise PgschedError(f"schedule {schedule_id!r} is defined in code (@periodic): "
                           "change it there")
    await _define(svc, schedule_id, body, "replace")
    return await _schedule(svc, schedule_id)


@router.delete("/schedules/{schedule_id}", summary="Delete a schedule (its jobs stay)")
async def delete_schedule(request: Request, schedule_id: ScheduleId) -> dict[str, Any]:
    svc = await service(request).ready()
    row = await recurring.remove_schedule(svc.store, schedule_id)
    return {"id": row["id"], "origin": row["origin"]}


@router.post("/schedules/{schedule_id}/pause", summary="Stop a schedule firing")
async def pause_schedule(request: Request, schedule_id: ScheduleId) -> dict[str, Any]:
    svc = await service(request).ready()
    await recurring.pause_schedule(svc.store, schedule_id)
    return await _schedule(svc, schedule_id)


@router.post("/schedules/{schedule_id}/resume", summary="Let a paused schedule fire again")
async def resume_schedule(request: Request, schedule_id: ScheduleId) -> dict[str, Any]:
    svc = await service(request).ready()
    await recurring.resume_schedule(svc.store, schedule_id)
    return await _schedule(svc, schedule_id)


@router.post("/schedules/{schedule_id}/trigger", status_code=201,
             summary="Run a schedule's task now as one extra job")
async def trigger_schedule(request: Request, schedule_id: ScheduleId) -> dict[str, Any]:
    svc = await service(request).ready()
    job_id = await recurring.trigger_schedule(svc.store, schedule_id)
    return job_to_json(await _job_row(svc, job_id))


# -- queues, status, workers -------------------------------------------------------------


@router.get("/queues", summary="Queues (as `pgsched queues --json`)")
async def list_queues(request: Request) -> dict[str, Any]:
    svc = await service(request).ready()
    return {"queues": [queue_to_json(r) for r in await svc.store.queue_stats()]}


@router.post("/queues/{name}/pause", summary="Stop every worker claiming from a queue")
async def pause_queue(request: Request, name: str,
                      body: Annotated[PauseIn | None, Body()] = None) -> dict[str, Any]:
    validate_queue_name(name)
    svc = await service(request).ready()
    client = request.client.host if request.client else "?"
    changed = await svc.store.pause_queues([name], paused_by=f"web@{client}",
                                           reason=body.reason if body else None)
    return {"queue": name, "paused": True, "changed": name in changed}


@router.post("/queues/{name}/resume", summary="Let workers claim from a queue again")
async def resume_queue(request: Request, name: str) -> dict[str, Any]:
    validate_queue_name(name)
    svc = await service(request).ready()
    changed = await svc.store.resume_queues([name])
    return {"queue": name, "paused": False, "changed": name in changed}


@router.get("/status", summary="Counts, lag, throughput, workers (as `status --json`)")
async def status(request: Request, active: Annotated[bool, Query(
        description="Count only pending and running jobs (cheap on a big history; the "
                    "dashboard's figures)")] = False) -> dict[str, Any]:
    svc = await service(request).ready()
    return (await gather(svc.store, stale_after=svc.settings.worker.lease_seconds,
                         active_only=active)).to_json()


@router.get("/workers", summary="The worker registry (as `workers --json`)")
async def workers(request: Request) -> list[dict[str, Any]]:
    svc = await service(request).ready()
    stale = svc.settings.worker.lease_seconds
    return [worker_json(w, stale) for w in await svc.store.list_workers()]


@router.get("/throughput", summary="Jobs ended per minute over the last hour, by outcome")
async def throughput(request: Request) -> dict[str, Any]:
    svc = await service(request).ready()
    return {"minutes": [{**r, "minute": r["minute"].astimezone(UTC).isoformat()}
                        for r in await svc.store.throughput_series()]}


@router.get("/events", summary="Server-Sent Events: job, queues, workers, schedules, resync",
            response_class=StreamingResponse)
async def events(request: Request) -> StreamingResponse:
    svc = await service(request).ready()
    return StreamingResponse(
        stream(svc.feed, request.headers.get("last-event-id"), heartbeat=svc.heartbeat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
