"""The benchmark (`python -m bench`) still runs end to end and reports every figure.

Only --quick (tiny sizes, one round) on the test server, without peers (PgQueuer would be
installed into its own environment first): this checks that the code works, never how fast
anything is (speed belongs to the benchmark itself, not to the suite). How the report judges
a target against a peer is pure logic, tested on made-up figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
from conftest import ROOT, cli_env

sys.path.insert(0, str(ROOT))  # bench/ is a directory of the checkout, not an installed package
from bench.report import evaluate, table


def test_quick_benchmark_produces_every_metric(pg_dsn, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--dsn", pg_dsn, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    # --quick runs the scale scenario with 1 and 2 workers and without PgBouncer: the
    # rows of 10 and 50 workers, and PgBouncer's, have no figure there.
    not_quick = (", 10 workers", ", 50 workers", "through PgBouncer")
    targets = [t for t in result["targets"]
               if not any(part in t["label"] for part in not_quick)]
    missing = [t["label"] for t in targets if t["value"] is None]
    assert missing == [], f"no figure for {missing}"
    unjudged = [t["label"] for t in targets if t["target"] and t["met"] is None]
    assert unjudged == [], f"targets that could not be evaluated: {unjudged}"
    assert "| scenario |" in done.stdout and result["machine"]["postgresql"]
    assert result["metrics"]["recurring_windows_lost"] == 0
    assert len(result["load_average_at_end"]) == 3
    # The opt-in scale scenarios ran on their own server and read its statistics: claims
    # found in pg_stat_statements (rows - jobs < 0 would mean the claim was not found).
    metrics = result["metrics"]
    assert metrics["scale_direct_2_steady_claims"] > 0
    assert 0 <= metrics["scale_direct_2_steady_start_delay_p50_ms"] \
        <= metrics["scale_direct_2_steady_start_delay_p95_ms"]
    assert all(v >= 0 for k, v in metrics.items() if k.endswith("_empty_claims_per_job"))
    assert metrics["churn_plain_jobs"] == metrics["churn_vacuum_jobs"] == 200
    assert metrics["retention_rows"] == 2_000
    # ops: every operator statement timed on its own server's table, judged in the report
    assert metrics["ops_rows"] == 20_000 and metrics["ops_top_counts_p95_ms"] > 0
    assert "| ops statement at 20,000 jobs |" in done.stdout
    assert "load average" in out.with_suffix(".md").read_text()
    with psycopg.connect(pg_dsn) as conn:
        leftovers = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", ["bench_%"]).fetchall()
    assert leftovers == [], "the benchmark left schemas behind"


def _drain_row(metrics: dict) -> dict:
    return next(t for t in evaluate(metrics) if t["label"].startswith("drain-1: 10k"))


def test_a_peer_target_is_judged_only_when_the_peer_was_measured():
    ours = {"drain_1_default_jobs_per_s": 7000.0, "raw_claim_jobs_per_s": 10000.0}
    alone = _drain_row(ours)
    assert alone["met"] is True and alone["peer"] is None  # 70% of raw, no peer to beat
    beaten = _drain_row({**ours, "pgqueuer_drain_1_jobs_per_s": 5000.0})
    assert beaten["peer_ratio"] == 1.4 and beaten["met"] is False  # 1.4x, not 1.5x
    ahead = _drain_row({**ours, "pgqueuer_drain_1_jobs_per_s": 4000.0})
    assert ahead["met"] is True
    assert "| PgQueuer |" in table({**ours, "pgqueuer_drain_1_jobs_per_s": 4000.0})
    assert "PgQueuer" not in table(ours)
