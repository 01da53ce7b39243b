"""Statements are sent without their comments (store._compact): psycopg caches its parse
of a query only up to 4,096 characters, and the commented claims were 17-19 KB. What must
not change is what PostgreSQL reads."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from pgsched.store import _QUERIES, _bind, _compact

SQL = """-- name line: what pg_stat_activity shows
SELECT 'a -- not a comment'   -- gone1
       'b',   -- gone2: two constants on separate lines are one string
       "odd  -- name" AS "x  y",
       E'c\\'  -- d' AS e, /* gone3 /* nested */ gone4 */ 1 AS f,
       $q$ keep  -- this
  as is $q$ AS g"""


def test_comments_go_and_strings_names_and_bodies_stay(pg_dsn):
    compact = _compact(SQL)
    assert compact.startswith("-- name line: what pg_stat_activity shows\nSELECT")
    assert not any(f"gone{i}" in compact for i in range(1, 5)), compact
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        expected = conn.execute(SQL.replace('"odd  -- name"', "'n'")).fetchone()
        got = conn.execute(compact.replace('"odd  -- name"', "'n'")).fetchone()
    assert got == expected
    assert got["?column?"] == "a -- not a commentb"
    assert got["e"] == "c'  -- d" and got["g"] == " keep  -- this\n  as is "


def test_the_flat_claim_fits_psycopg_s_query_cache():
    """The claim of a worker of every queue, the statement every such worker sends most."""
    assert len(_bind(_QUERIES["claim_jobs_flat"], "pgsched", 32).encode()) <= 4096
