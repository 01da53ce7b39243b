"""Migrations: upgrading step by step equals a fresh install; concurrent runs are safe."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from pgsched.store import NO_TRANSACTION, Store, migrations, open_pool, split_statements

CATALOG = {
    "columns": """SELECT table_name, column_name, data_type, udt_name, column_default,
                         is_nullable FROM information_schema.columns WHERE table_schema = %s
                  ORDER BY 1, 2""",
    "indexes": """SELECT tablename, indexname, replace(indexdef, %s, 'S')
                  FROM pg_indexes WHERE schemaname = %s ORDER BY 1, 2""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                      FROM pg_constraint WHERE connamespace = %s::regnamespace ORDER BY 2""",
    "enums": """SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
                WHERE t.typnamespace = %s::regnamespace ORDER BY 1, e.enumsortorder""",
}


def catalog(dsn: str, schema: str) -> dict[str, list]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        result = {}
        for name, query in CATALOG.items():
            params = [f'"{schema}".', schema] if name == "indexes" else [schema]
            rows = conn.execute(query, params).fetchall()
            result[name] = [tuple(str(v).replace(schema, "S") for v in row) for row in rows]
        return result


@pytest.fixture
def two_schemas(pg_dsn):
    names = [f"m_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    yield names
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def test_step_by_step_upgrade_equals_fresh_install(pg_dsn, two_schemas):
    fresh, stepped = two_schemas
    pool = await open_pool(pg_dsn)
    try:
        assert await Store(pool, fresh).migrate() == migrations()[-1][0]
        store = Store(pool, stepped)
        for number, _, _ in migrations():
            assert await store.migrate(target=number) == number
        assert await store.schema_version() == migrations()[-1][0]
    finally:
        await pool.close()
    assert catalog(pg_dsn, fresh) == catalog(pg_dsn, stepped)
    assert catalog(pg_dsn, fresh)["columns"]  # the comparison saw real tables


async def test_concurrent_migrations_serialise(pg_dsn, two_schemas):
    schema = two_schemas[0]
    pools = [await open_pool(pg_dsn) for _ in range(3)]
    try:
        versions = await asyncio.gather(*(Store(p, schema).migrate() for p in pools))
        assert set(versions) == {migrations()[-1][0]}
    finally:
        for p in pools:
            await p.close()


def test_migration_numbers_are_unique():
    numbers = [n for n, _, _ in migrations()]
    assert len(numbers) == len(set(numbers)) and numbers[0] == 1


def test_no_transaction_migrations_split_into_statements_without_comment_chunks():
    text = ("-- pgsched: no-transaction\n-- a header; with a semicolon inside\n"
            "CREATE INDEX CONCURRENTLY a ON t (x)\n    WHERE y;\n-- between\n"
            "DROP INDEX CONCURRENTLY IF EXISTS b;  \n-- a trailing comment;\n")
    assert split_statements(text) == [
        "-- pgsched: no-transaction\n-- a header; with a semicolon inside\n"
        "CREATE INDEX CONCURRENTLY a ON t (x)\n    WHERE y",
        "-- between\nDROP INDEX CONCURRENTLY IF EXISTS b",
    ]


def test_a_dollar_quoted_body_is_one_statement_of_a_no_transaction_migration():
    text = ("-- pgsched: no-transaction\n-- a $$ in a comment is no quote\n"
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
            "DECLARE\n    x int;\nBEGIN\n    x := length('$$');\n    RETURN x;\nEND\n"
            "$body$;\nDROP INDEX CONCURRENTLY IF EXISTS b;\n")
    assert split_statements(text) == [
        "-- pgsched: no-transaction\n-- a $$ in a comment is no quote\n"
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
        "DECLARE\n    x int;\nBEGIN\n    x := length('$$');\n    RETURN x;\nEND\n$body$",
        "DROP INDEX CONCURRENTLY IF EXISTS b",
    ]


def test_every_index_build_on_an_existing_table_is_concurrent():
    for number, name, text in migrations():
        if number >= 4:  # 0001/0002 build indexes on the tables they create
            builds = [s for s in split_statements(text) if "CREATE INDEX" in s.upper()
                      or "CREATE UNIQUE INDEX" in s.upper()]
            assert all("CONCURRENTLY" in s.upper() for s in builds), (number, name)
            assert not builds or text.startswith(NO_TRANSACTION), (number, name)


@pytest.mark.parametrize("code, expected", [
    # A $$ in a string literal opens no body: what follows is still split.
    ("COMMENT ON TABLE t IS 'costs $$';\nDROP INDEX CONCURRENTLY IF EXISTS b;\n",
     ["COMMENT ON TABLE t IS 'costs $$'", "DROP INDEX CONCURRENTLY IF EXISTS b"]),
    # Nor one in a comment after the body's closing quote, on its line.
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n    SELECT 1;\n$$  -- no $$ here\n"
     ";\nDROP INDEX CONCURRENTLY IF EXISTS b;\n",
     ["CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n    SELECT 1;\n$$  -- no $$ here",
      "DROP INDEX CONCURRENTLY IF EXISTS b"]),
    # Nor one in a block comment.
    ("/* bodies are quoted with $$ */\nDROP INDEX CONCURRENTLY IF EXISTS a;\n"
     "DROP INDEX CONCURRENTLY IF EXISTS b;\n",
     ["/* bodies are quoted with $$ */\nDROP INDEX CONCURRENTLY IF EXISTS a",
      "DROP INDEX CONCURRENTLY IF EXISTS b"]),
    # A -- in a string is no comment, and a ; ending a line inside a string ends nothing.
    ("CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT ''--'' || $x$a;\n$x$';\n"
     "DROP INDEX CONCURRENTLY IF EXISTS b;\n",
     ["CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT ''--'' || $x$a;\n$x$'",
      "DROP INDEX CONCURRENTLY IF EXISTS b"]),
    # A $ inside an identifier starts no quote.
    ("CREATE INDEX CONCURRENTLY a$b$ ON t (x);\nDROP INDEX CONCURRENTLY IF EXISTS b;\n",
     ["CREATE INDEX CONCURRENTLY a$b$ ON t (x)", "DROP INDEX CONCURRENTLY IF EXISTS b"]),
])
def test_only_a_dollar_quote_in_code_keeps_a_statement_whole(code, expected):
    """split_statements tells a dollar quote from a $$ in a string literal, a comment or an
    identifier, as PostgreSQL does: one taken for a quote swallows every statement after
    it into one, which PostgreSQL refuses (CONCURRENTLY cannot run in a multi-statement
    string), and a ; taken for an end cuts a literal in two."""
    assert split_statements(NO_TRANSACTION + code)[1:] == expected[1:]
    assert split_statements(NO_TRANSACTION + code)[0] == NO_TRANSACTION + expected[0]
