-- 0022: a busy worker's reservation of a due suspect (fetcher.py, reserve_suspect in
-- queries.sql). A suspect runs alone; a worker busy with other jobs that has waited
-- SUSPECT_DRAIN_SECONDS for a worker to take it reserves it and claims nothing until its
-- own jobs are done. The row stays pending meanwhile: any worker that holds nothing still
-- claims it at once, and other busy workers, seeing it reserved, do not stop claiming for
-- it too. NULL, or a time past, is no reservation; the reserving worker renews it while it
-- waits, so a reservation left by a worker that died lapses on its own.
--
-- Nullable without a default: PostgreSQL adds it without rewriting or scanning the table.
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS reserved_until timestamptz;
