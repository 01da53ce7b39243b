-- 0006: stored priorities are the ones a claim walks, and a bounded error history.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.

-- A claim walks the JobPriority values one by one (claim_jobs), so a row with any other
-- priority would never be claimed, counted as due or listed as next. The allowed values
-- are one named constraint per table: widening them (to 0-9, say) is a migration that
-- drops both and adds them again with the new list. NOT VALID: adding them takes a brief
-- lock and reads no row; 0007 checks the existing rows without blocking writers.
ALTER TABLE {schema}.jobs ADD CONSTRAINT jobs_priority_claimed
    CHECK (priority IN (1, 5)) NOT VALID;
ALTER TABLE {schema}.schedules ADD CONSTRAINT schedules_priority_claimed
    CHECK (priority IN (1, 5)) NOT VALID;

-- The `errors` history with one more entry, keeping the entries of the first keep_first
-- and the last keep_last attempts (the store passes ERRORS_KEPT_FIRST/LAST): a job
-- retried or recovered without end keeps a row of bounded size.
CREATE FUNCTION {schema}.append_error(
    history jsonb, entry jsonb, keep_first integer, keep_last integer
) RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_array_length(history) < keep_first + keep_last THEN history || entry
        ELSE (SELECT jsonb_agg(e.value ORDER BY e.n)
              FROM jsonb_array_elements(history || entry) WITH ORDINALITY AS e(value, n)
              WHERE e.n <= keep_first OR e.n > jsonb_array_length(history) + 1 - keep_last)
    END
$$;
