"""`python -m bench`: run pgsched's benchmark and print the table (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
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
from .report import evaluate, machine_line, table
from .scenarios import SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgsched's benchmark: throughput, latency and idle cost, each beside "
                    "what plain SQL achieves on the same server in the same run.")
    parser.add_argument("--dsn", help="run on this PostgreSQL (creates and drops bench_* "
                                      "schemas) instead of a throw-away embedded server")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that everything runs, measures nothing")
    parser.add_argument("--out", type=Path, help=f"also write the JSON here (always: {RESULTS})")
    parser.add_argument("--only", help="comma-separated scenarios to run: "
                                       + ", ".join(SCENARIOS))
    parser.add_argument("--concurrency", type=int,
                        help="[worker] concurrency of the worker processes (default: pgsched's)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [s for s in args.only.split(",") if s not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario {unknown[0]!r}: use one of {', '.join(SCENARIOS)}")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


async def run(args: argparse.Namespace) -> dict:
    names = args.only.split(",") if args.only else list(SCENARIOS)
    sizes = QUICK if args.quick else Sizes()
    workdir = make_workdir()
    embedded = args.dsn is None
    try:
        if embedded:
            dsn, server_log = start_embedded(workdir)
        else:
            dsn, server_log = args.dsn, None
        h = Harness(dsn, sizes, workdir, concurrency=args.concurrency, server_log=server_log)
        machine = await h.machine()
        print(f"machine: {machine_line(machine)}", file=sys.stderr)
        metrics: dict = {}
        started = time.monotonic()
        try:
            for name in names:
                t0 = time.monotonic()
                print(f"{name} ...", end="", flush=True, file=sys.stderr)
                metrics.update(await SCENARIOS[name](h))
                print(f" {time.monotonic() - t0:.1f}s", file=sys.stderr)
        finally:
            h.kill_all()
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "scenarios": names,
            "duration_s": round(time.monotonic() - started, 1),
            "machine": machine,
            "sizes": vars(sizes),
            "worker_concurrency": args.concurrency,
            "metrics": metrics,
            "targets": evaluate(metrics),
        }
    finally:
        if embedded:
            stop_embedded(workdir)
        remove_workdir(workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, default=str) + "\n"
    for path in filter(None, [RESULTS, args.out]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(machine_line(result["machine"]))
    print(table(result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
