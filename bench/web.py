"""The `web` scenario's measurements: `pgsched web` beside a big jobs table.

Given a schema already holding the backlog (1M finished + 200k pending jobs), it starts
one `pgsched web` process and measures, from this process over HTTP:
- GET /api/jobs?limit=50 and GET /api/status: sequential requests, p50/p95/max;
- completion to SSE event: jobs added one at a time run on a real worker; for each, the
  time from its finished_at (database clock, same machine) to the arrival of its
  `completed` event on one EventSource-like client;
- 200 SSE clients on the one process: its CPU and RSS while jobs keep finishing, and
  the share of job events each client received.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import psutil
from psycopg import sql

from pgsched import Scheduler

from .harness import BenchError, Harness

TOKEN = "bench-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def percentiles(values_ms: list[float], name: str) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {
        f"{name}_p50_ms": statistics.median(ordered),
        f"{name}_p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        f"{name}_max_ms": ordered[-1],
    }


async def _address(proc: Any, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"pgsched web: listening on (http://[^/\s]+)",
                          proc.log_path.read_text())
        if found:
            return found[1]
        if proc.proc.poll() is not None:
            raise BenchError(f"pgsched web exited:\n{proc.log_tail()}")
        await asyncio.sleep(0.05)
    raise BenchError(f"pgsched web did not start:\n{proc.log_tail()}")


async def _latency(client: httpx.AsyncClient, path: str, n: int) -> list[float]:
    for _ in range(5):  # warm-up: connections, plans, caches
        (await client.get(path, headers=AUTH)).raise_for_status()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        (await client.get(path, headers=AUTH)).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return times


class Listener:
    """One SSE client: the arrival time of each job event, by (id, status)."""

    def __init__(self, client: httpx.AsyncClient):
        self.arrived: dict[tuple[str, str], float] = {}
        self.jobs = 0
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self._read(client))

    async def _read(self, client: httpx.AsyncClient) -> None:
        import json

        async with client.stream("GET", "/api/events", headers=AUTH,
                                 timeout=httpx.Timeout(30, read=None)) as response:
            response.raise_for_status()
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                    self.connected.set()
                elif line.startswith("data: ") and kind == "job":
                    data = json.loads(line[6:])
                    self.jobs += 1
                    self.arrived.setdefault((data["id"], data["status"]), time.time())

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _finished_at(h: Harness, schema: str, prefix: str) -> dict[str, datetime]:
    async with await h.connect() as conn:
        cur = await conn.execute(sql.SQL(
            "SELECT id, finished_at FROM {}.jobs WHERE id LIKE %s AND status = 'completed'"
        ).format(sql.Identifier(schema)), [prefix + "%"])
        return dict(await cur.fetchall())


async def measure(h: Harness, schema: str, *, requests: int, sse_jobs: int, clients: int,
                  load_seconds: float) -> dict[str, Any]:
    web = h.start_web(schema, TOKEN)
    worker = h.start_worker(schema)
    try:
        url = await _address(web)
        await h.wait_listening(schema)  # the worker (the web feed polls: never idle on LISTEN)
        limits = httpx.Limits(max_connections=clients + 20, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client, \
                Scheduler(h.dsn, schema=schema) as sched:
            metrics: dict[str, Any] = {}
            metrics.update(percentiles(
                await _latency(client, "/api/jobs?limit=50", requests), "web_jobs"))
            metrics.update(percentiles(await _latency(client, "/api/status", requests),
                                       "web_status"))
            metrics.update(percentiles(
                await _latency(client, "/api/status?active=true", requests), "web_status_active"))

            # Completion to event: one job at a time, each run by the idle worker.
            listener = Listener(client)
            await asyncio.wait_for(listener.connected.wait(), 30)
            for i in range(sse_jobs):
                await sched.schedule("noop", job_id=f"sse-{i:05d}")
                await asyncio.sleep(0.1)
            await h.wait_finished(schema, "sse-", sse_jobs)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(
                    1 for (_, s) in listener.arrived if s == "completed") < sse_jobs:
                await asyncio.sleep(0.05)
            await listener.close()
            finished = await _finished_at(h, schema, "sse-")
            delays = [(listener.arrived[(i, "completed")] - at.timestamp()) * 1000
                      for i, at in finished.items() if (i, "completed") in listener.arrived]
            if len(delays) < sse_jobs:
                raise BenchError(f"only {len(delays)}/{sse_jobs} completion events arrived")
            metrics.update(percentiles(delays, "web_sse_latency"))

            # Many clients: the web process's CPU and memory while 20 jobs/s finish.
            listeners = [Listener(client) for _ in range(clients)]
            await asyncio.wait_for(asyncio.gather(*(x.connected.wait() for x in listeners)),
                                   60)
            process = psutil.Process(web.proc.pid)
            cpu = process.cpu_times()
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < load_seconds:
                await sched.schedule("noop", job_id=f"load-{sent:06d}")
                sent += 1
                await asyncio.sleep(0.05)
            await h.wait_finished(schema, "load-", sent)
            await asyncio.sleep(1)  # the last events reach the clients
            elapsed = time.monotonic() - started
            after = process.cpu_times()
            rss = process.memory_info().rss
            received = [sum(1 for (i, s) in x.arrived if i.startswith("load-") and
                            s == "completed") for x in listeners]
            await asyncio.gather(*(x.close() for x in listeners))
            metrics.update({
                "web_sse_clients": clients,
                "web_sse_clients_cpu_percent":
                    ((after.user - cpu.user) + (after.system - cpu.system)) / elapsed * 100,
                "web_sse_clients_rss_mb": rss / 2**20,
                "web_sse_clients_jobs_per_s": sent / elapsed,
                "web_sse_clients_min_delivered": min(received) / sent,
            })
            return metrics
    finally:
        await worker.stop()
        web.proc.terminate()
        await web.wait(30)
