-- pgsched: no-transaction
-- 0007: check the priority of existing rows against 0006's constraints.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Outside a transaction (the first line above; see README.md in this folder), each
-- statement commits on its own: VALIDATE takes a SHARE UPDATE EXCLUSIVE lock, so claims,
-- heartbeats and completions go on while it reads the table. Had it run in 0006's
-- transaction, it would have read the whole table under the ACCESS EXCLUSIVE lock of
-- ADD CONSTRAINT. A row with another priority fails it and leaves the version at 6:
-- fix the rows (UPDATE ... SET priority = 5 WHERE priority NOT IN (1, 5)) and migrate
-- again. Validating a validated constraint is a no-op, so a rerun is safe.
ALTER TABLE {schema}.jobs VALIDATE CONSTRAINT jobs_priority_claimed;
ALTER TABLE {schema}.schedules VALIDATE CONSTRAINT schedules_priority_claimed;
