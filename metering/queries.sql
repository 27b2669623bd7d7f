-- Every SQL statement of the metering service, loaded by name (metering/sql.py).
-- Lock order, to stay free of deadlocks: exports row -> daily_usage -> project_daily_usage -> projects
-- -> export_rollups -> render_time_histogram. A reservation starts at daily_usage (its export row is new).

-- name: advisory_lock
SELECT pg_advisory_lock($1);

-- name: advisory_unlock
SELECT pg_advisory_unlock($1);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: ping
SELECT 1;

-- name: database_exists
SELECT true FROM pg_database WHERE datname = $1;

-- name: export_by_idempotency_key
SELECT * FROM exports WHERE user_id = $1 AND idempotency_key = $2;

-- name: lock_daily_usage
-- Creates the user's row for the day if needed and locks it: every reservation of one user on one day
-- queues here, on every replica. Returns the exports counted so far.
INSERT INTO daily_usage AS d (user_id, day, used) VALUES ($1, $2, 0)
ON CONFLICT (user_id, day) DO UPDATE SET used = d.used
RETURNING used;

-- name: reserve_context
-- Run with the user's day row locked (lock_daily_usage): locks the project's day row, and reads the user's
-- tier and the export already holding this idempotency key, if any. A statement of its own, so that its
-- snapshot sees a replay committed while this transaction waited for the user's lock.
-- $1 user, $2 idempotency key, $3 project, $4 day. One row; its export columns are NULL without a replay.
WITH project AS (
    INSERT INTO project_daily_usage AS p (project_id, day, used) VALUES ($3, $4, 0)
    ON CONFLICT (project_id, day) DO UPDATE SET used = p.used
    RETURNING used
)
SELECT project.used AS project_used, (SELECT tier FROM accounts WHERE user_id = $1) AS tier, e.*
FROM project LEFT JOIN exports e ON e.user_id = $1 AND e.idempotency_key = $2;

-- name: daily_used
SELECT used FROM daily_usage WHERE user_id = $1 AND day = $2;

-- name: add_daily_used
UPDATE daily_usage SET used = used + $3 WHERE user_id = $1 AND day = $2;

-- name: add_project_daily_used
UPDATE project_daily_usage SET used = used + $3 WHERE project_id = $1 AND day = $2;

-- name: account_tier
SELECT tier FROM accounts WHERE user_id = $1;

-- name: upsert_account_tier
INSERT INTO accounts AS a (user_id, tier, created_at, updated_at) VALUES ($1, $2, $3, $3)
ON CONFLICT (user_id) DO UPDATE SET tier = EXCLUDED.tier, updated_at = EXCLUDED.updated_at
RETURNING user_id, tier, created_at, updated_at;

-- name: in_flight
SELECT count(*) FROM exports WHERE user_id = $1 AND status = 'RESERVED';

-- name: in_flight_total
SELECT count(*) FROM exports WHERE status = 'RESERVED';

-- name: reserve_export
-- A new RESERVED export and its counts (the day's usage, the project's, the project row, the rollup) in one
-- statement, so one round trip. The day rows are already locked by this transaction (lock_daily_usage,
-- reserve_context). Nothing happens when the idempotency key was committed meanwhile by a reservation
-- counted on another day: no row comes back. Returns the export and the user's reservations in flight,
-- this one included (the statement's snapshot does not see its own insert, hence + 1).
-- $1 export_id, $2 user, $3 project, $4 idempotency key, $5 fingerprint, $6 render mode, $7 format,
-- $8 resolution, $9 requested seconds, $10 day, $11 now, $12 lease end.
WITH inserted AS (
    INSERT INTO exports (
        export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
        resolution, requested_duration_seconds, usage_day, created_at, lease_expires_at
    ) VALUES ($1, $2, $3, $4, $5, 'RESERVED', $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING *
), daily AS (
    UPDATE daily_usage SET used = used + 1
    WHERE user_id = $2 AND day = $10 AND EXISTS (SELECT FROM inserted)
), project_day AS (
    UPDATE project_daily_usage SET used = used + 1
    WHERE project_id = $3 AND day = $10 AND EXISTS (SELECT FROM inserted)
), project AS (
    INSERT INTO projects AS p (project_id, user_id, export_count, last_export_at, created_at)
    SELECT $3, $2, 1, $11, $11 FROM inserted
    ON CONFLICT (project_id) DO UPDATE
    SET export_count = p.export_count + 1, last_export_at = greatest(p.last_export_at, EXCLUDED.last_export_at)
), rollup AS (
    INSERT INTO export_rollups AS r (day, user_id, project_id, format, render_mode, exports, reserved, last_export_at)
    SELECT $10, $2, $3, $7, $6, 1, 1, $11 FROM inserted
    ON CONFLICT (day, user_id, project_id, format, render_mode) DO UPDATE
    SET exports = r.exports + 1, reserved = r.reserved + 1,
        last_export_at = greatest(r.last_export_at, EXCLUDED.last_export_at)
)
SELECT inserted.*,
       (SELECT count(*) FROM exports WHERE user_id = $2 AND status = 'RESERVED') + 1 AS in_flight
FROM inserted;

-- name: rollup_transition
-- Moves one export between status columns: $6..$10 are -1/0/+1 deltas for reserved, completed, failed,
-- cancelled, expired; $11 and $12 add to the completed duration and bytes.
UPDATE export_rollups
SET reserved = reserved + $6, completed = completed + $7, failed = failed + $8,
    cancelled = cancelled + $9, expired = expired + $10,
    completed_duration_seconds = completed_duration_seconds + $11,
    completed_bytes = completed_bytes + $12
WHERE day = $1 AND user_id = $2 AND project_id = $3 AND format = $4 AND render_mode = $5;

-- name: lock_export
SELECT * FROM exports WHERE export_id = $1 FOR UPDATE;

-- name: complete_export
-- Closes an export locked by lock_export and moves its counts, in one statement: the user's and the
-- project's day usage when the slot changes hands, the rollup's status columns and the render-time
-- histogram. Each step waits for the one before it (it reads its output; the last step reads the rollup
-- too, since a step that cannot apply is planned away), which keeps this file's lock order inside the
-- statement.
-- $1 export_id, $2 outcome, $3 error, $4 bytes, $5 seconds, $6 output uri, $7 render seconds, $8 now;
-- $9 user, $10 project, $11 the export's day, $12 format, $13 render mode; $14 slot delta (-1, 0, +1);
-- $15..$19 deltas of reserved, completed, failed, cancelled, expired; $20 completed seconds, $21 completed
-- bytes; $22 render-time bucket, or NULL for none.
WITH daily AS (
    UPDATE daily_usage SET used = used + $14
    WHERE user_id = $9 AND day = $11 AND $14 <> 0
    RETURNING 1
), project_day AS (
    UPDATE project_daily_usage SET used = used + $14
    WHERE project_id = $10 AND day = $11 AND $14 <> 0 AND (SELECT count(*) FROM daily) >= 0
    RETURNING 1
), rollup AS (
    UPDATE export_rollups
    SET reserved = reserved + $15, completed = completed + $16, failed = failed + $17,
        cancelled = cancelled + $18, expired = expired + $19,
        completed_duration_seconds = completed_duration_seconds + $20,
        completed_bytes = completed_bytes + $21
    WHERE day = $11 AND user_id = $9 AND project_id = $10 AND format = $12 AND render_mode = $13
      AND (SELECT count(*) FROM project_day) >= 0
    RETURNING 1
), render_time AS (
    INSERT INTO render_time_histogram AS h (day, user_id, project_id, bucket, count)
    SELECT $11, $9, $10, $22::integer, 1 WHERE $22::integer IS NOT NULL AND (SELECT count(*) FROM rollup) >= 0
    ON CONFLICT (day, user_id, project_id, bucket) DO UPDATE SET count = h.count + 1
    RETURNING 1
), closed AS (
    UPDATE exports
    SET status = $2, error = $3, file_size_bytes = $4, duration_seconds = $5, output_uri = $6,
        render_seconds = $7, completed_at = $8
    WHERE export_id = $1 AND (SELECT count(*) FROM rollup) >= 0 AND (SELECT count(*) FROM render_time) >= 0
    RETURNING *
)
SELECT * FROM closed;

-- name: extend_lease
UPDATE exports SET lease_expires_at = $2 WHERE export_id = $1 AND status = 'RESERVED' RETURNING *;

-- name: expire_export
UPDATE exports SET status = 'EXPIRED', expired_at = $2 WHERE export_id = $1 AND status = 'RESERVED'
RETURNING *;

-- name: lock_overdue_reservation
-- One overdue reservation no other replica is working on.
SELECT * FROM exports
WHERE status = 'RESERVED' AND lease_expires_at < $1
ORDER BY lease_expires_at
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- name: list_user_exports
SELECT * FROM exports
WHERE user_id = $1 AND (created_at, export_id) < ($2, $3)
ORDER BY created_at DESC, export_id DESC
LIMIT $4;

-- name: list_project_exports
SELECT * FROM exports
WHERE user_id = $1 AND project_id = $2 AND (created_at, export_id) < ($3, $4)
ORDER BY created_at DESC, export_id DESC
LIMIT $5;

-- name: stats_rollup
-- Totals, per day, per format and per render mode of the window in one pass over the rollup.
-- $1..$2: first and last day; $3: user or NULL; $4: project or NULL.
SELECT
    GROUPING(day) = 0 AS by_day, GROUPING(format) = 0 AS by_format, GROUPING(render_mode) = 0 AS by_mode,
    day, format, render_mode,
    sum(exports)::bigint AS exports, sum(reserved)::bigint AS reserved,
    sum(completed)::bigint AS completed, sum(failed)::bigint AS failed,
    sum(cancelled)::bigint AS cancelled, sum(expired)::bigint AS expired,
    sum(completed_duration_seconds) AS completed_duration_seconds,
    sum(completed_bytes)::bigint AS completed_bytes,
    max(last_export_at) AS last_export_at
FROM export_rollups
WHERE day BETWEEN $1 AND $2
  AND ($3::text IS NULL OR user_id = $3)
  AND ($4::text IS NULL OR project_id = $4)
GROUP BY GROUPING SETS ((), (day), (format), (render_mode));

-- name: stats_render_histogram
SELECT bucket, sum(count)::bigint AS count
FROM render_time_histogram
WHERE day BETWEEN $1 AND $2
  AND ($3::text IS NULL OR user_id = $3)
  AND ($4::text IS NULL OR project_id = $4)
GROUP BY bucket
ORDER BY bucket;

-- name: stats_top_users
-- The busiest users of the window with their favourite format, tier and today's count ($5: how many,
-- $6: today).
WITH per_user AS (
    SELECT user_id, sum(exports)::bigint AS exports, max(last_export_at) AS last_export_at
    FROM export_rollups
    WHERE day BETWEEN $1 AND $2
      AND ($3::text IS NULL OR user_id = $3)
      AND ($4::text IS NULL OR project_id = $4)
    GROUP BY user_id
    ORDER BY exports DESC, user_id
    LIMIT $5
), favorite AS (
    SELECT DISTINCT ON (r.user_id) r.user_id, r.format
    FROM export_rollups r JOIN per_user u ON u.user_id = r.user_id
    WHERE r.day BETWEEN $1 AND $2 AND ($4::text IS NULL OR r.project_id = $4)
    GROUP BY r.user_id, r.format
    ORDER BY r.user_id, sum(r.exports) DESC, r.format
)
SELECT u.user_id, u.exports, u.last_export_at, f.format AS favorite_format, a.tier,
       coalesce(d.used, 0) AS used_today
FROM per_user u
JOIN favorite f ON f.user_id = u.user_id
LEFT JOIN accounts a ON a.user_id = u.user_id
LEFT JOIN daily_usage d ON d.user_id = u.user_id AND d.day = $6
ORDER BY u.exports DESC, u.user_id;

-- name: stats_top_projects
SELECT r.project_id, p.user_id, sum(r.exports)::bigint AS exports, max(r.last_export_at) AS last_export_at
FROM export_rollups r JOIN projects p ON p.project_id = r.project_id
WHERE r.day BETWEEN $1 AND $2
  AND ($3::text IS NULL OR r.user_id = $3)
  AND ($4::text IS NULL OR r.project_id = $4)
GROUP BY r.project_id, p.user_id
ORDER BY exports DESC, r.project_id
LIMIT $5;

-- name: user_snapshot
-- A user's tier and today's count, for a per-user stats query with nothing in the window.
SELECT a.tier, coalesce(d.used, 0) AS used_today
FROM (SELECT $1::text AS user_id) u
LEFT JOIN accounts a ON a.user_id = u.user_id
LEFT JOIN daily_usage d ON d.user_id = u.user_id AND d.day = $2;
