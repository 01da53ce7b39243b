"""Peers: other Python schedulers on PostgreSQL, measured in the same run on the same server.

Owns: installing each peer into its own virtual environment under bench/ (never into
pgsched's: a peer is not a dependency), and the peer scenarios, which run the peer's side
in subprocesses with that environment's python (bench/peer_<name>.py) and return metrics
named like pgsched's with the peer's name in front (pgqueuer_drain_1_jobs_per_s beside
drain_1_jobs_per_s), so the report can put them side by side.

Only PgQueuer so far (`--peers pgqueuer`). Its virtual environment is bench/.peer-venv,
created on first use with `python -m venv` and `pip install 'pgqueuer[asyncpg]==<pinned>'`
(the same by hand: see docs/performance.md); delete the directory to reinstall.

Invariants: a peer works in its own bench_* schema, dropped when its scenario ends, and
on the same jobs as pgsched's scenario of the same name (10,000 no-op async jobs).

Failure: an install that fails, or a peer process that exits non-zero or overruns its
deadline, raises BenchError with the tail of its output.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from .harness import BenchError, Harness
from .scenarios import Metrics, Scenario, percentiles, q

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".peer-venv"
PGQUEUER = "pgqueuer[asyncpg]==1.6.0"
PGQUEUER_SCHEMA = "bench_pgqueuer"


@functools.cache
def peer_python() -> Path:
    """The peer environment's python, creating the environment first if needed."""
    python = PEER_VENV / "bin" / "python"
    probe = [str(python), "-c", "import pgqueuer, asyncpg"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {PGQUEUER} into {PEER_VENV} ...", file=sys.stderr)
    for command in ([sys.executable, "-m", "venv", str(PEER_VENV)],
                    [str(python), "-m", "pip", "install", "-q", PGQUEUER]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"could not install the peer ({' '.join(command)}):\n"
                             + (done.stderr or done.stdout)[-2000:])
    return python


class PgQueuerRun:
    """One PgQueuer subprocess: `bench/peer_pgqueuer.py COMMAND DSN [N]`."""

    def __init__(self, h: Harness, *args: str):
        env = {**os.environ, "PGQUEUER_SCHEMA": PGQUEUER_SCHEMA}
        self.out = h.workdir / f"pgqueuer-{args[0]}-{id(self)}.log"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [str(peer_python()), str(HERE / "peer_pgqueuer.py"), args[0], h.dsn, *args[1:]],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=h.workdir)

    async def result(self, timeout: float) -> dict:
        """Wait for the process; its last line of output, parsed."""
        for _ in range(int(timeout / 0.05)):
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            self.proc.kill()
            self.proc.wait()
        lines = self.out.read_text().splitlines()
        if self.proc.returncode != 0:
            raise BenchError(f"PgQueuer exited with {self.proc.returncode}:\n"
                             + "\n".join(lines[-15:]))
        return json.loads(lines[-1])


async def _fresh_pgqueuer(h: Harness) -> None:
    await h.drop_schema(PGQUEUER_SCHEMA)
    await PgQueuerRun(h, "install").result(60)


async def pgqueuer_enqueue_bulk(h: Harness) -> Metrics:
    await _fresh_pgqueuer(h)
    n = h.sizes.enqueue_bulk_small
    done = await PgQueuerRun(h, "enqueue", str(n)).result(60 + n / 1000)
    await h.drop_schema(PGQUEUER_SCHEMA)
    return {"pgqueuer_enqueue_bulk_10k_jobs_per_s": n / done["seconds"]}


def _pgqueuer_drain(processes: int):
    async def drain(h: Harness) -> Metrics:
        n = h.sizes.drain
        await _fresh_pgqueuer(h)
        await PgQueuerRun(h, "enqueue", str(n)).result(60 + n / 1000)
        runs = [PgQueuerRun(h, "drain") for _ in range(processes)]
        for run in runs:
            await run.result(60 + n / 100)
        # PgQueuer logs each pick and each success with the server's clock: the same
        # window as pgsched's first started_at to last finished_at.
        done, first, last = await h.one(q(
            "SELECT count(*) FILTER (WHERE status = 'successful'),"
            " min(created) FILTER (WHERE status = 'picked'),"
            " max(created) FILTER (WHERE status = 'successful') FROM {s}.pgqueuer_log",
            PGQUEUER_SCHEMA))
        await h.drop_schema(PGQUEUER_SCHEMA)
        if done != n:
            raise BenchError(f"PgQueuer drain-{processes}: {done}/{n} jobs succeeded")
        return {f"pgqueuer_drain_{processes}_jobs_per_s": n / (last - first).total_seconds()}

    return drain


async def pgqueuer_due_latency(h: Harness) -> Metrics:
    n = h.sizes.due_latency
    await _fresh_pgqueuer(h)
    done = await PgQueuerRun(h, "due", str(n)).result(60 + n * 0.1)
    await h.drop_schema(PGQUEUER_SCHEMA)
    return percentiles(done["delays_ms"], "pgqueuer_due_latency")


def peer_scenarios(peers: list[str]) -> list[Scenario]:
    """The scenarios of the peers asked for (`--peers`), throughput first."""
    if "pgqueuer" not in peers:
        return []
    return [
        Scenario("pgqueuer-enqueue-bulk", pgqueuer_enqueue_bulk, True),
        Scenario("pgqueuer-drain-1", _pgqueuer_drain(1), True),
        Scenario("pgqueuer-drain-2", _pgqueuer_drain(2), True),
        Scenario("pgqueuer-due-latency", pgqueuer_due_latency, False),
    ]


PEERS = ["pgqueuer"]
