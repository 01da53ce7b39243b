"""The benchmark (`python -m bench`) still runs end to end and reports every figure.

Only --quick (tiny sizes, one round) on the test server: this checks that the code works,
never how fast anything is (speed belongs to the benchmark itself, not to the suite).
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
from conftest import ROOT, cli_env


def test_quick_benchmark_produces_every_metric(pg_dsn, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--dsn", pg_dsn, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    missing = [t["label"] for t in result["targets"] if t["value"] is None]
    assert missing == [], f"no figure for {missing}"
    unjudged = [t["label"] for t in result["targets"] if t["target"] and t["met"] is None]
    assert unjudged == [], f"targets that could not be evaluated: {unjudged}"
    assert "| scenario |" in done.stdout and result["machine"]["postgresql"]
    with psycopg.connect(pg_dsn) as conn:
        leftovers = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", ["bench_%"]).fetchall()
    assert leftovers == [], "the benchmark left schemas behind"
