"""`python -m bench`: run pgsched's benchmark and print the table (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .harness import (
    QUICK,
    BenchError,
    Harness,
    Sizes,
    make_workdir,
    remove_workdir,
    start_embedded,
    stop_embedded,
)
from .peers import PEERS, peer_scenarios
from .report import evaluate, machine_line, markdown
from .scenarios import NAMES, scenarios

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgsched's benchmark: throughput, latency and idle cost, each beside "
                    "what plain SQL achieves on the same server in the same run.")
    parser.add_argument("--dsn", help="run on this PostgreSQL (creates and drops bench_* "
                                      "schemas) instead of a throw-away embedded server")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round: checks that everything runs, measures "
                             "nothing")
    parser.add_argument("--out", type=Path,
                        help=f"also write the JSON here (a full run always writes {RESULTS})")
    parser.add_argument("--only", help="comma-separated scenarios to run: " + ", ".join(NAMES)
                        + " (and with --peers, the peer's: pgqueuer-drain-1, ...)")
    parser.add_argument("--peers", default="",
                        help="comma-separated peers to measure beside pgsched: "
                             + ", ".join(PEERS) + " (installed on first use into "
                             "bench/.peer-venv, never into pgsched's environment)")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="the scale scenario also runs its workers through PgBouncer in "
                             "transaction mode (needs the pgbouncer binary)")
    parser.add_argument("--scale-workers", type=str, default=None,
                        help="comma-separated worker counts of the scale scenario "
                             "(default 1,10,50)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput scenarios run this many times, alternating with the "
                             "raw ceiling; the table shows medians (default 3)")
    args = parser.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer {unknown[0]!r}: use one of {', '.join(PEERS)}")
    if args.only:
        names = NAMES + [s.name for s in peer_scenarios(args.peers)]
        unknown = [s for s in args.only.split(",") if s not in names]
        if unknown:
            parser.error(f"unknown scenario {unknown[0]!r}: use one of {', '.join(names)}")
    if args.scale_workers is not None:
        try:
            args.scale_workers = tuple(int(n) for n in args.scale_workers.split(","))
        except ValueError:
            parser.error("--scale-workers: comma-separated whole numbers, e.g. 10,50")
        if not args.scale_workers or min(args.scale_workers) < 1:
            parser.error("--scale-workers: each count must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quick:
        args.rounds = 1
    return args


def _medians(runs: list[dict]) -> dict:
    """Per metric, the median over the rounds (a metric every round produced)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def run(args: argparse.Namespace) -> dict:
    every = scenarios() + peer_scenarios(args.peers)
    # Within a round, throughput first (pgsched, the raw ceiling and the peers within
    # minutes of each other); the scenarios that run once end the first round. A full run
    # leaves out the opt-in scenarios (web); --quick checks that all of them run.
    chosen = [s for s in sorted(every, key=lambda s: not s.repeated)
              if (s.name in args.only.split(",") if args.only else s.default or args.quick)]
    sizes = QUICK if args.quick else Sizes()
    if args.scale_workers:
        sizes = dataclasses.replace(sizes, scale_workers=args.scale_workers)
    workdir = make_workdir()
    embedded = args.dsn is None
    try:
        if embedded:
            dsn, server_log, server_pid = start_embedded(workdir)
        else:
            dsn, server_log, server_pid = args.dsn, None, None
        h = Harness(dsn, sizes, workdir, server_log=server_log, server_pid=server_pid,
                    pgbouncer=args.pgbouncer)
        machine = await h.machine()
        load_at_start = os.getloadavg()
        print(f"machine: {machine_line(machine)}", file=sys.stderr)
        runs: dict[str, list[dict]] = {s.name: [] for s in chosen}
        started = time.monotonic()
        try:
            for round_no in range(args.rounds):
                for s in chosen:
                    if s.repeated or round_no == 0:
                        await _run_one(h, s, runs, round_no)
        finally:
            h.kill_all()
            for s in chosen:
                cleanup = getattr(s.run, "cleanup", None)
                if cleanup is not None:
                    await cleanup(h)
        metrics: dict = {}
        for s in chosen:
            metrics.update(_medians(runs[s.name]) if s.repeated else runs[s.name][0])
        # Every repeated scenario's figures of one round, for ratios paired by round.
        rounds = [{k: v for s in chosen if s.repeated for k, v in runs[s.name][i].items()}
                  for i in range(args.rounds)]
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "rounds": args.rounds,
            "duration_s": round(time.monotonic() - started, 1),
            "machine": machine,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "peers": args.peers,
            "sizes": vars(sizes),
            "metrics": metrics,
            "targets": evaluate(metrics, rounds),
            "runs": runs,
            "rounds_metrics": rounds,
        }
    finally:
        if embedded:
            stop_embedded(workdir)
        remove_workdir(workdir)


async def _run_one(h: Harness, s, runs: dict[str, list[dict]], round_no: int) -> None:
    t0 = time.monotonic()
    print(f"round {round_no + 1} {s.name} ...", end="", flush=True, file=sys.stderr)
    runs[s.name].append(await s.run(h))
    h.measured.update(runs[s.name][-1])
    print(f" {time.monotonic() - t0:.1f}s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, default=str) + "\n"
    report = markdown(result)
    # A quick run measures nothing worth keeping: it never replaces the latest results.
    for path in filter(None, [None if args.quick else RESULTS, args.out]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".md").write_text(report)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
