-- Least privilege: what a runtime role needs to run `pgsched worker`, `add` and `ls`.
--
-- The schema's owner runs `pgsched migrate --grant ROLE`; ROLE then reads and writes job
-- rows and the worker registry, reads the migration version, uses pgsched's types, and
-- can do nothing else: no CREATE, ALTER, DROP, TRUNCATE, and no change to the migration
-- record. Re-run it after an upgrade that adds tables (it is idempotent).
--
-- {schema} is replaced by the quoted schema when the store loads this file; {{role}} and
-- {{type}} survive that as {role} and {type} and are replaced by Store._grant_runtime_role
-- with quoted, validated identifiers.

-- name: grant_runtime_role
-- The schema, its tables and its sequences, for one role.
GRANT USAGE ON SCHEMA {schema} TO {{role}};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {{role}};
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {schema}.schema_migrations FROM {{role}};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {{role}};
-- The one function that runs as the schema's owner (migration 0017): the worker's ANALYZE
-- of jobs after a burst.
GRANT EXECUTE ON FUNCTION {schema}.analyze_jobs() TO {{role}};

-- name: missing_roles
-- Which of the roles %(roles)s do not exist: checked before any migration runs, so that a
-- typo in --grant changes nothing (each migration commits on its own).
SELECT r.name FROM unnest(%(roles)s::text[]) AS r(name)
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name);

-- name: schema_types
-- The types pgsched created in the schema (enums, domains, composites; not the row types
-- of tables or the array types that come with every type).
SELECT t.typname
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_class c ON c.oid = t.typrelid
WHERE n.nspname = %(schema)s AND t.typelem = 0 AND (c.oid IS NULL OR c.relkind = 'c')
ORDER BY t.typname;

-- name: grant_type_usage
-- One of the schema's types, for one role.
GRANT USAGE ON TYPE {schema}.{{type}} TO {{role}};
