"""Helpers for the web tests: a real `pgsched web` process, and an SSE reader.

`WebProcess` starts `python -m pgsched --config ... web --listen 127.0.0.1:0` and reads
the address from the line it prints on stderr; `SseReader` collects the events of one
GET /api/events stream in a background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from conftest import ROOT, cli_env

TOKEN = "test-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


def add_web_section(config: Path, **web: str) -> Path:
    lines = ["", "[web]"] + [f'{k} = "{v}"' for k, v in web.items()]
    with config.open("a") as file:
        file.write("\n".join(lines) + "\n")
    return config


class WebProcess:
    def __init__(self, config: Path, *args: str):
        self.log_path = config.parent / f"web-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgsched", "--config", str(config), "web", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT)
        self.url = self._wait_for_address()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def _wait_for_address(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"pgsched web: (?:listening on|open) (http://[^/\s]+)", self.log())
            if found:
                return found[1]
            if self.proc.poll() is not None:
                raise AssertionError(f"pgsched web exited: {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"pgsched web did not start: {self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class SseReader:
    """Reads one event stream into `events` (dicts: id, event, data) until stopped."""

    def __init__(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]):
        self.events: list[dict[str, Any]] = []
        self.ended = asyncio.Event()
        self.status: int | None = None
        self._task = asyncio.create_task(self._read(client, url, headers))

    async def _read(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        try:
            async with client.stream("GET", url, headers=headers,
                                     timeout=httpx.Timeout(10, read=None)) as response:
                self.status = response.status_code
                event: dict[str, Any] = {}
                async for line in response.aiter_lines():
                    if not line:
                        if "event" in event:
                            event["data"] = json.loads(event.get("data", "null"))
                            self.events.append(event)
                        event = {}
                        continue
                    field, _, value = line.partition(": ")
                    if field in ("id", "event", "data"):
                        event[field] = value
        finally:
            self.ended.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await self._task
