"""pgsched's benchmark: `python -m bench` (from the repository root).

Runs, in one process tree and one run, on a throw-away embedded PostgreSQL (or --dsn):
enqueue-loop, enqueue-bulk (100k and 10k), drain-1 (default configuration and at 100),
drain-2, backlog, due-latency (idle and under load), enqueue-latency, recurring at scale,
idle cost, and the raw ceiling (plain COPY, a single-row INSERT loop and a claim-100 SKIP
LOCKED loop on the same server) with the latency floor (raw_latency.py); with --peers
pgqueuer, PgQueuer beside them (peers.py).
Prints a Markdown report and writes bench/results/latest.json and .md (and --out). Worker
figures come from real `python -m pgsched worker` processes.

The benchmark never decides whether the test suite passes; tests/test_bench_smoke.py only
runs --quick to keep this code working. Figures are only meaningful with the machine
they were measured on, which is recorded in the JSON.
"""
