-- Every SQL statement of the metering service, loaded by name (metering/sql.py).
-- Lock order, to stay free of deadlocks: exports row -> daily_usage -> project_daily_usage -> export_counters
-- -> projects -> export_rollups -> render_time_histogram. A reservation starts at daily_usage (its export row
-- is new); only reservations lock export_counters. The system summaries' delta tables are only appended to.

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

-- name: ensure_usage_rows
-- The user's and the project's counters of the day and their running export counters, created at 0 when
-- missing (locks nothing). A new running counter starts on the day (no history to write when its first
-- export comes, and the update that counts it leaves its indexed columns alone). $1 user, $2 day, $3 project.
WITH daily AS (
    INSERT INTO daily_usage (user_id, day, used) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING
), counters AS (
    INSERT INTO export_counters (kind, id, current_day) VALUES ('project', $3, $2), ('user', $1, $2)
    ON CONFLICT DO NOTHING
)
INSERT INTO project_daily_usage (project_id, day, used) VALUES ($3, $2, 0) ON CONFLICT DO NOTHING;

-- name: reserve
-- A whole reservation in one statement, its own transaction: lock the user's day row, then the project's,
-- then their running counters, gate on the tier's limits, record the RESERVED export and count it (the day's
-- usage, the project's, the running counters, the project row, the rollup, a system rollup delta). Every
-- reservation of one user on one day queues on the first lock, on every replica, and reads the counts as they
-- are once it has the lock. The gate applies the same comparisons as QuotaPolicy.check, which still decides
-- every refusal from the counts returned here.
-- Returns one row: new_day = 1 when a day row or a running counter is missing (run ensure_usage_rows, then
-- this again); late = 1 when the user's or project's counter has moved on to a later day (this day ended
-- while the call waited: reserve it with lock_reserve_many and reserve_many, whose second statement sees the
-- counters' history as it is once they are locked, which this statement's snapshot may not); no export when
-- the gate refused or the idempotency key is taken (a replay). in_flight counts the user's reservations as of
-- the statement's start, this one included.
-- $1 user, $2 day, $3 project, $4 idempotency key, $5 export_id, $6 fingerprint, $7 render mode, $8 format,
-- $9 resolution, $10 requested seconds, $11 now, $12 lease end; the tier table as arrays: $13 names,
-- $14 daily limits, $15 longest videos (seconds), $16 project daily limits (NULL: no limit); $17 the tier
-- of accounts with none (or one no longer configured).
WITH daily AS MATERIALIZED (
    SELECT used FROM daily_usage WHERE user_id = $1 AND day = $2 FOR UPDATE
), project_day AS MATERIALIZED (
    -- Joined with `daily` so that it locks only once the user's row is locked (this file's lock order).
    SELECT p.used FROM project_daily_usage p CROSS JOIN daily
    WHERE p.project_id = $3 AND p.day = $2
    FOR UPDATE OF p
), counter AS MATERIALIZED (
    -- The project's and the user's running counters, locked once the day rows are.
    SELECT c.kind, c.id, c.current_day, c.exports, c.mp4, c.webm, c.gif
    FROM export_counters c
    WHERE ((c.kind = 'project' AND c.id = $3) OR (c.kind = 'user' AND c.id = $1))
      AND EXISTS (SELECT FROM project_day)
    ORDER BY c.kind, c.id
    FOR UPDATE OF c
), tier AS (
    SELECT t.name, t.daily_limit, t.max_seconds, t.project_limit
    FROM unnest($13::text[], $14::bigint[], $15::double precision[], $16::bigint[])
        AS t(name, daily_limit, max_seconds, project_limit)
    WHERE t.name = coalesce(
        (SELECT a.tier FROM accounts a WHERE a.user_id = $1 AND a.tier = ANY($13::text[])), $17::text
    )
), decision AS MATERIALIZED (
    SELECT daily.used, project_day.used AS project_used, tier.name AS tier,
           (SELECT count(*) FROM counter) = 2 AS counted,
           EXISTS (SELECT FROM counter WHERE counter.current_day > $2) AS late,
           (tier.max_seconds IS NULL OR $10::double precision <= tier.max_seconds)
           AND (tier.daily_limit IS NULL OR daily.used < tier.daily_limit)
           AND (tier.project_limit IS NULL OR project_day.used < tier.project_limit) AS fits
    FROM daily CROSS JOIN project_day CROSS JOIN tier
), inserted AS (
    INSERT INTO exports (
        export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
        resolution, requested_duration_seconds, usage_day, created_at, lease_expires_at
    )
    SELECT $5::uuid, $1, $3, $4::text, $6::text, 'RESERVED', $7::text, $8::text, $9::text, $10, $2, $11::timestamptz,
           $12::timestamptz
    FROM decision WHERE decision.fits AND decision.counted AND NOT decision.late
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING *
), counter_history AS (
    -- The day moved on: the totals through the counter's old current day become its history.
    INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
    SELECT c.kind, c.id, c.current_day, c.exports, c.mp4, c.webm, c.gif
    FROM counter c
    WHERE c.current_day < $2 AND EXISTS (SELECT FROM inserted)
), counter_count AS (
    UPDATE export_counters c
    SET exports = c.exports + 1, mp4 = c.mp4 + ($8::text = 'mp4')::int, webm = c.webm + ($8::text = 'webm')::int,
        gif = c.gif + ($8::text = 'gif')::int, current_day = $2,
        last_export_at = greatest(c.last_export_at, $11::timestamptz)
    FROM counter locked
    WHERE c.kind = locked.kind AND c.id = locked.id AND EXISTS (SELECT FROM inserted)
), system AS (
    INSERT INTO system_rollup_deltas (
        day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT $2, $8::text, $7::text, 1, 1, 0, 0, 0, 0, 0, 0, $11::timestamptz FROM inserted
), daily_count AS (
    UPDATE daily_usage SET used = used + 1
    WHERE user_id = $1 AND day = $2 AND EXISTS (SELECT FROM inserted)
), project_count AS (
    UPDATE project_daily_usage SET used = used + 1
    WHERE project_id = $3 AND day = $2 AND EXISTS (SELECT FROM inserted)
), project AS (
    -- Its owner, once (its counts are the running counter's).
    INSERT INTO projects (project_id, user_id, created_at) SELECT $3, $1, $11 FROM inserted
    ON CONFLICT (project_id) DO NOTHING
), rollup AS (
    INSERT INTO export_rollups AS r (day, user_id, project_id, format, render_mode, exports, reserved, last_export_at)
    SELECT $2, $1, $3, $8, $7, 1, 1, $11 FROM inserted
    ON CONFLICT (day, user_id, project_id, format, render_mode) DO UPDATE
    SET exports = r.exports + 1, reserved = r.reserved + 1,
        last_export_at = greatest(r.last_export_at, EXCLUDED.last_export_at)
)
SELECT (decision.used IS NULL OR NOT decision.counted)::integer AS new_day, decision.late::integer AS late,
       decision.used, decision.project_used, decision.tier, inserted.*,
       (SELECT count(*) FROM exports WHERE user_id = $1 AND status = 'RESERVED') + 1 AS in_flight
FROM (SELECT) AS one
LEFT JOIN decision ON true
LEFT JOIN inserted ON true;

-- name: lock_reserve_many
-- A batch of reservations (metering/batching.py) starts here: its users' rows of the day, then its
-- projects', then their running counters (created at 0 when missing, locked, each in key order: every batch
-- locks in that order, so batches never wait in a circle), its users' tiers and which of its idempotency keys
-- are taken.
-- A key committed while the batch waited for a lock is missed here and found by reserve_many instead.
-- $1 the batch's users (distinct), $2 day, $3 its projects (distinct), $4 user and $5 idempotency key of
-- each request, $6 the batch's lock_timeout (set before the first lock, for the whole transaction: a batch
-- does not wait long on a lock; it is split and each call waits alone). Rows: (kind, id, idempotency_key,
-- used, tier) with kind user, project, tier or taken.
WITH daily AS (
    INSERT INTO daily_usage AS d (user_id, day, used)
    SELECT u, $2, 0 FROM unnest($1::text[]) AS u WHERE set_config('lock_timeout', $6::text, true) IS NOT NULL
    ORDER BY u
    ON CONFLICT (user_id, day) DO UPDATE SET used = d.used
    RETURNING user_id, used
), project AS (
    INSERT INTO project_daily_usage AS p (project_id, day, used)
    SELECT p, $2, 0 FROM unnest($3::text[]) AS p WHERE (SELECT count(*) FROM daily) >= 0 ORDER BY p
    ON CONFLICT (project_id, day) DO UPDATE SET used = p.used
    RETURNING project_id, used
), counter AS (
    INSERT INTO export_counters AS c (kind, id, current_day)
    SELECT k.kind, k.id, $2
    FROM (SELECT 'project' AS kind, p AS id FROM unnest($3::text[]) AS p
          UNION ALL
          SELECT 'user', u FROM unnest($1::text[]) AS u) AS k
    WHERE (SELECT count(*) FROM project) >= 0
    ORDER BY k.kind, k.id
    ON CONFLICT (kind, id) DO UPDATE SET exports = c.exports
)
SELECT 'user' AS kind, user_id AS id, NULL::text AS idempotency_key, used, NULL::text AS tier FROM daily
UNION ALL
SELECT 'project', project_id, NULL, used, NULL FROM project
UNION ALL
SELECT 'tier', user_id, NULL, NULL, tier FROM accounts WHERE user_id = ANY($1::text[])
UNION ALL
SELECT 'taken', e.user_id, e.idempotency_key, NULL, NULL
FROM unnest($4::text[], $5::text[]) AS k(user_id, idempotency_key)
JOIN exports e ON e.user_id = k.user_id AND e.idempotency_key = k.idempotency_key;

-- name: reserve_many
-- The admitted reservations of a batch, recorded and counted in one statement: the counts are added up
-- per day row, project and rollup row, and the project and rollup rows written in key order. The day rows
-- are locked already (lock_reserve_many). One element per reservation in $1 export ids, $2 users,
-- $3 projects, $4 idempotency keys, $5 fingerprints, $6 render modes, $7 formats, $8 resolutions,
-- $9 requested seconds; $10 day, $11 now, $12 lease end. Returns the exports recorded (nothing for a key
-- committed meanwhile), each with its user's reservations in flight before this statement.
-- The running counters were locked by lock_reserve_many, before this statement took its snapshot: it sees
-- their history as every earlier holder of those locks left it, also for a day that has ended meanwhile.
WITH request AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::double precision[])
        AS r(export_id, user_id, project_id, idempotency_key, request_fingerprint, render_mode, format,
             resolution, requested_duration_seconds)
), inserted AS (
    INSERT INTO exports (
        export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
        resolution, requested_duration_seconds, usage_day, created_at, lease_expires_at
    )
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, 'RESERVED', render_mode, format,
           resolution, requested_duration_seconds, $10::date, $11::timestamptz, $12::timestamptz
    FROM request
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING *
), counted AS MATERIALIZED (
    SELECT c.kind, c.id, c.current_day, c.exports, c.mp4, c.webm, c.gif, n.exports AS n, n.mp4 AS n_mp4,
           n.webm AS n_webm, n.gif AS n_gif, n.last_export_at AS n_last
    FROM export_counters c
    JOIN (
        SELECT k.kind, k.id, count(*) AS exports, count(*) FILTER (WHERE i.format = 'mp4') AS mp4,
               count(*) FILTER (WHERE i.format = 'webm') AS webm, count(*) FILTER (WHERE i.format = 'gif') AS gif,
               max(i.created_at) AS last_export_at
        FROM inserted i CROSS JOIN LATERAL (VALUES ('project', i.project_id), ('user', i.user_id)) AS k(kind, id)
        GROUP BY k.kind, k.id
    ) n ON n.kind = c.kind AND n.id = c.id
), counter_rolled AS (
    -- The day moved on: the totals through the counter's old current day become its history.
    INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
    SELECT kind, id, current_day, exports, mp4, webm, gif FROM counted WHERE current_day < $10::date
), counter_late_day AS (
    -- A day that has ended (the counter moved on while these calls waited): that day's totals, from the
    -- latest earlier ones, when it has none yet ...
    INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
    SELECT n.kind, n.id, $10::date, coalesce(p.exports, 0) + n.n, coalesce(p.mp4, 0) + n.n_mp4,
           coalesce(p.webm, 0) + n.n_webm, coalesce(p.gif, 0) + n.n_gif
    FROM counted n
    LEFT JOIN LATERAL (
        SELECT h.exports, h.mp4, h.webm, h.gif FROM export_counter_history h
        WHERE h.kind = n.kind AND h.id = n.id AND h.day < $10::date
        ORDER BY h.day DESC LIMIT 1
    ) p ON true
    WHERE n.current_day > $10::date
      AND NOT EXISTS (
          SELECT FROM export_counter_history s WHERE s.kind = n.kind AND s.id = n.id AND s.day = $10::date
      )
), counter_late_after AS (
    -- ... and every total through that day or a later one grows (the row inserted above is not among them).
    UPDATE export_counter_history h
    SET exports = h.exports + n.n, mp4 = h.mp4 + n.n_mp4, webm = h.webm + n.n_webm, gif = h.gif + n.n_gif
    FROM counted n
    WHERE n.current_day > $10::date AND h.kind = n.kind AND h.id = n.id AND h.day >= $10::date
), counter_count AS (
    UPDATE export_counters c
    SET exports = c.exports + n.n, mp4 = c.mp4 + n.n_mp4, webm = c.webm + n.n_webm, gif = c.gif + n.n_gif,
        current_day = greatest(c.current_day, $10::date), last_export_at = greatest(c.last_export_at, n.n_last)
    FROM counted n
    WHERE c.kind = n.kind AND c.id = n.id
), system AS (
    INSERT INTO system_rollup_deltas (
        day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT $10::date, format, render_mode, count(*), count(*), 0, 0, 0, 0, 0, 0, max(created_at)
    FROM inserted GROUP BY format, render_mode
), daily AS (
    UPDATE daily_usage d SET used = d.used + c.n
    FROM (SELECT user_id, count(*) AS n FROM inserted GROUP BY user_id) c
    WHERE d.user_id = c.user_id AND d.day = $10::date
), project_day AS (
    UPDATE project_daily_usage p SET used = p.used + c.n
    FROM (SELECT project_id, count(*) AS n FROM inserted GROUP BY project_id) c
    WHERE p.project_id = c.project_id AND p.day = $10::date
), project AS (
    INSERT INTO projects (project_id, user_id, created_at)
    SELECT project_id, min(user_id), $11::timestamptz FROM inserted GROUP BY project_id ORDER BY project_id
    ON CONFLICT (project_id) DO NOTHING
), rollup AS (
    INSERT INTO export_rollups AS r (day, user_id, project_id, format, render_mode, exports, reserved, last_export_at)
    SELECT $10::date, user_id, project_id, format, render_mode, count(*), count(*), $11::timestamptz
    FROM inserted GROUP BY user_id, project_id, format, render_mode ORDER BY user_id, project_id, format, render_mode
    ON CONFLICT (day, user_id, project_id, format, render_mode) DO UPDATE
    SET exports = r.exports + EXCLUDED.exports, reserved = r.reserved + EXCLUDED.reserved,
        last_export_at = greatest(r.last_export_at, EXCLUDED.last_export_at)
)
SELECT inserted.*,
       (SELECT count(*) FROM exports e WHERE e.user_id = inserted.user_id AND e.status = 'RESERVED') AS in_flight_before
FROM inserted;

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

-- name: rollup_transition
-- Moves one export between status columns: $6..$10 are -1/0/+1 deltas for reserved, completed, failed,
-- cancelled, expired; $11 and $12 add to the completed duration and bytes. The system rollup moves alike.
WITH rollup AS (
    UPDATE export_rollups
    SET reserved = reserved + $6, completed = completed + $7, failed = failed + $8,
        cancelled = cancelled + $9, expired = expired + $10,
        completed_duration_seconds = completed_duration_seconds + $11,
        completed_bytes = completed_bytes + $12
    WHERE day = $1 AND user_id = $2 AND project_id = $3 AND format = $4 AND render_mode = $5
    RETURNING 1
)
INSERT INTO system_rollup_deltas (
    day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
    completed_duration_seconds, completed_bytes, last_export_at
)
SELECT $1, $4, $5, 0, $6, $7, $8, $9, $10, $11, $12, NULL FROM rollup;

-- name: lock_export
SELECT * FROM exports WHERE export_id = $1 FOR UPDATE;

-- name: complete
-- Closes an export in one statement, its own transaction: lock the export's row, and when it moves (from
-- RESERVED or EXPIRED to another status) move its counts too: the user's and the project's day usage
-- when the slot changes hands (RESERVED and COMPLETED hold one), the rollup's status columns and the
-- render-time histogram; each step waits for the one before it (it reads its output) to keep this file's
-- lock order inside the statement. Returns the closed export with changed = true, or the export as it
-- was with changed = false (the same outcome again, or already closed otherwise), or no row (unknown).
-- $1 export_id, $2 outcome, $3 error, $4 bytes, $5 measured seconds, $6 output uri, $7 render seconds,
-- $8 now, $9 render-time bucket (NULL: none).
WITH old AS MATERIALIZED (
    SELECT * FROM exports WHERE export_id = $1 FOR UPDATE
), move AS MATERIALIZED (
    SELECT old.export_id, old.user_id, old.project_id, old.usage_day, old.format, old.render_mode, old.status,
           (CASE WHEN $2::text IN ('RESERVED', 'COMPLETED') THEN 1 ELSE 0 END)
           - (CASE WHEN old.status IN ('RESERVED', 'COMPLETED') THEN 1 ELSE 0 END) AS slot_delta,
           ($2::text = 'RESERVED')::int - (old.status = 'RESERVED')::int AS d_reserved,
           ($2::text = 'COMPLETED')::int - (old.status = 'COMPLETED')::int AS d_completed,
           ($2::text = 'FAILED')::int - (old.status = 'FAILED')::int AS d_failed,
           ($2::text = 'CANCELLED')::int - (old.status = 'CANCELLED')::int AS d_cancelled,
           ($2::text = 'EXPIRED')::int - (old.status = 'EXPIRED')::int AS d_expired,
           -- A completed export counts its measured length when reported, else the length asked for.
           CASE WHEN $2::text = 'COMPLETED' THEN coalesce($5::double precision, old.requested_duration_seconds)
                ELSE 0 END AS completed_seconds,
           CASE WHEN $2::text = 'COMPLETED' THEN coalesce($4::bigint, 0) ELSE 0 END AS completed_bytes
    FROM old
    WHERE old.status IN ('RESERVED', 'EXPIRED') AND old.status <> $2::text
), daily AS (
    UPDATE daily_usage d SET used = d.used + m.slot_delta
    FROM move m
    WHERE d.user_id = m.user_id AND d.day = m.usage_day AND m.slot_delta <> 0
    RETURNING 1
), project_day AS (
    UPDATE project_daily_usage p SET used = p.used + m.slot_delta
    FROM move m
    WHERE p.project_id = m.project_id AND p.day = m.usage_day AND m.slot_delta <> 0
      AND (SELECT count(*) FROM daily) >= 0
    RETURNING 1
), rollup AS (
    UPDATE export_rollups r
    SET reserved = r.reserved + m.d_reserved, completed = r.completed + m.d_completed,
        failed = r.failed + m.d_failed, cancelled = r.cancelled + m.d_cancelled, expired = r.expired + m.d_expired,
        completed_duration_seconds = r.completed_duration_seconds + m.completed_seconds,
        completed_bytes = r.completed_bytes + m.completed_bytes
    FROM move m
    WHERE r.day = m.usage_day AND r.user_id = m.user_id AND r.project_id = m.project_id
      AND r.format = m.format AND r.render_mode = m.render_mode
      AND (SELECT count(*) FROM project_day) >= 0
    RETURNING 1
), render_time AS (
    INSERT INTO render_time_histogram AS h (day, user_id, project_id, bucket, count)
    SELECT m.usage_day, m.user_id, m.project_id, $9::integer, 1
    FROM move m
    WHERE $2::text = 'COMPLETED' AND $9::integer IS NOT NULL AND (SELECT count(*) FROM rollup) >= 0
    ON CONFLICT (day, user_id, project_id, bucket) DO UPDATE SET count = h.count + 1
    RETURNING 1
), system AS (
    INSERT INTO system_rollup_deltas (
        day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT usage_day, format, render_mode, 0, d_reserved, d_completed, d_failed, d_cancelled, d_expired,
           completed_seconds, completed_bytes, NULL
    FROM move
), system_render_time AS (
    INSERT INTO system_render_time_deltas (day, bucket, count)
    SELECT usage_day, $9::integer, 1 FROM move WHERE $2::text = 'COMPLETED' AND $9::integer IS NOT NULL
), closed AS (
    UPDATE exports e
    SET status = $2::text, error = $3::text, file_size_bytes = $4::bigint, duration_seconds = $5::double precision,
        output_uri = $6::text, render_seconds = $7::double precision, completed_at = $8::timestamptz
    FROM move m
    WHERE e.export_id = m.export_id
      AND (SELECT count(*) FROM rollup) >= 0 AND (SELECT count(*) FROM render_time) >= 0
    RETURNING e.*, m.status AS previous_status
)
SELECT true AS changed, closed.* FROM closed
UNION ALL
SELECT false, old.*, old.status FROM old WHERE NOT EXISTS (SELECT FROM closed);

-- name: lock_exports_many
-- A batch of completions (metering/batching.py) starts here: its exports, locked in export_id order.
-- $1 export ids (distinct), $2 the batch's lock_timeout (as in lock_reserve_many).
SELECT * FROM exports
WHERE export_id = ANY($1::uuid[]) AND set_config('lock_timeout', $2::text, true) IS NOT NULL
ORDER BY export_id
FOR UPDATE;

-- name: complete_many
-- The closing completions of a batch (exports locked by lock_exports_many) in one statement: the exports
-- closed, and their counts moved, added up per day row, project, rollup row and histogram bucket. Every
-- kind of row is locked in key order, day rows before project rows before rollups before the histogram
-- (each step reads the one before it), as in this file's lock order, so batches never wait in a circle.
-- One element per completion: $1 export ids, $2 outcomes, $3 errors, $4 bytes, $5 measured seconds,
-- $6 output uris, $7 render seconds, $8 users, $9 projects, $10 the exports' days, $11 formats,
-- $12 render modes, $13 slot deltas, $14..$18 deltas of reserved, completed, failed, cancelled, expired,
-- $19 completed seconds, $20 completed bytes, $21 render-time buckets (NULL: none); $22 now.
WITH c AS MATERIALIZED (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::double precision[], $6::text[],
                $7::double precision[], $8::text[], $9::text[], $10::date[], $11::text[], $12::text[],
                $13::integer[], $14::integer[], $15::integer[], $16::integer[], $17::integer[], $18::integer[],
                $19::double precision[], $20::bigint[], $21::integer[])
        AS c(export_id, outcome, error, file_size_bytes, duration_seconds, output_uri, render_seconds, user_id,
             project_id, usage_day, format, render_mode, slot_delta, d_reserved, d_completed, d_failed,
             d_cancelled, d_expired, completed_seconds, completed_bytes, bucket)
), daily_delta AS MATERIALIZED (
    SELECT user_id, usage_day, sum(slot_delta) AS delta FROM c
    GROUP BY user_id, usage_day HAVING sum(slot_delta) <> 0
), daily_locked AS MATERIALIZED (
    SELECT d.user_id FROM daily_usage d JOIN daily_delta s ON d.user_id = s.user_id AND d.day = s.usage_day
    ORDER BY d.user_id, d.day
    FOR UPDATE OF d
), daily AS (
    UPDATE daily_usage d SET used = d.used + s.delta
    FROM daily_delta s
    WHERE d.user_id = s.user_id AND d.day = s.usage_day AND (SELECT count(*) FROM daily_locked) >= 0
    RETURNING 1
), project_delta AS MATERIALIZED (
    SELECT project_id, usage_day, sum(slot_delta) AS delta FROM c
    GROUP BY project_id, usage_day HAVING sum(slot_delta) <> 0
), project_locked AS MATERIALIZED (
    SELECT p.project_id FROM project_daily_usage p
    JOIN project_delta s ON p.project_id = s.project_id AND p.day = s.usage_day
    WHERE (SELECT count(*) FROM daily) >= 0
    ORDER BY p.project_id, p.day
    FOR UPDATE OF p
), project_day AS (
    UPDATE project_daily_usage p SET used = p.used + s.delta
    FROM project_delta s
    WHERE p.project_id = s.project_id AND p.day = s.usage_day AND (SELECT count(*) FROM project_locked) >= 0
    RETURNING 1
), rollup_delta AS MATERIALIZED (
    SELECT usage_day, user_id, project_id, format, render_mode,
           sum(d_reserved) AS reserved, sum(d_completed) AS completed, sum(d_failed) AS failed,
           sum(d_cancelled) AS cancelled, sum(d_expired) AS expired,
           sum(completed_seconds) AS completed_seconds, sum(completed_bytes) AS completed_bytes
    FROM c GROUP BY usage_day, user_id, project_id, format, render_mode
), rollup_locked AS MATERIALIZED (
    SELECT r.day FROM export_rollups r
    JOIN rollup_delta s ON r.day = s.usage_day AND r.user_id = s.user_id AND r.project_id = s.project_id
                       AND r.format = s.format AND r.render_mode = s.render_mode
    WHERE (SELECT count(*) FROM project_day) >= 0
    ORDER BY r.day, r.user_id, r.project_id, r.format, r.render_mode
    FOR UPDATE OF r
), rollup AS (
    UPDATE export_rollups r
    SET reserved = r.reserved + s.reserved, completed = r.completed + s.completed, failed = r.failed + s.failed,
        cancelled = r.cancelled + s.cancelled, expired = r.expired + s.expired,
        completed_duration_seconds = r.completed_duration_seconds + s.completed_seconds,
        completed_bytes = r.completed_bytes + s.completed_bytes
    FROM rollup_delta s
    WHERE r.day = s.usage_day AND r.user_id = s.user_id AND r.project_id = s.project_id
      AND r.format = s.format AND r.render_mode = s.render_mode AND (SELECT count(*) FROM rollup_locked) >= 0
    RETURNING 1
), render_time AS (
    INSERT INTO render_time_histogram AS h (day, user_id, project_id, bucket, count)
    SELECT usage_day, user_id, project_id, bucket, count(*) FROM c
    WHERE bucket IS NOT NULL AND (SELECT count(*) FROM rollup) >= 0
    GROUP BY usage_day, user_id, project_id, bucket
    ORDER BY usage_day, user_id, project_id, bucket
    ON CONFLICT (day, user_id, project_id, bucket) DO UPDATE SET count = h.count + EXCLUDED.count
    RETURNING 1
), system AS (
    INSERT INTO system_rollup_deltas (
        day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT usage_day, format, render_mode, 0, sum(reserved), sum(completed), sum(failed), sum(cancelled),
           sum(expired), sum(completed_seconds), sum(completed_bytes), NULL
    FROM rollup_delta GROUP BY usage_day, format, render_mode
), system_render_time AS (
    INSERT INTO system_render_time_deltas (day, bucket, count)
    SELECT usage_day, bucket, count(*) FROM c WHERE bucket IS NOT NULL GROUP BY usage_day, bucket
), closed AS (
    UPDATE exports e
    SET status = c.outcome, error = c.error, file_size_bytes = c.file_size_bytes,
        duration_seconds = c.duration_seconds, output_uri = c.output_uri, render_seconds = c.render_seconds,
        completed_at = $22::timestamptz
    FROM c
    WHERE e.export_id = c.export_id
      AND (SELECT count(*) FROM rollup) >= 0 AND (SELECT count(*) FROM render_time) >= 0
    RETURNING e.*
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

-- name: stats_rollup
-- Totals, per day, per format, per render mode and per day and format of the window in one pass over the
-- rollup.
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
GROUP BY GROUPING SETS ((), (day), (format), (render_mode), (day, format));

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
-- The busiest projects of the window, ranked on the rollup alone; only those $5 then look up their owner
-- (every rollup's project has its row: both are written by the same transaction).
WITH top AS (
    SELECT r.project_id, sum(r.exports)::bigint AS exports, max(r.last_export_at) AS last_export_at
    FROM export_rollups r
    WHERE r.day BETWEEN $1 AND $2
      AND ($3::text IS NULL OR r.user_id = $3)
      AND ($4::text IS NULL OR r.project_id = $4)
    GROUP BY r.project_id
    ORDER BY exports DESC, r.project_id
    LIMIT $5
)
SELECT top.project_id, p.user_id, top.exports, top.last_export_at
FROM top JOIN projects p ON p.project_id = top.project_id
ORDER BY top.exports DESC, top.project_id;

-- name: user_snapshot
-- A user's tier and today's count, for a per-user stats query with nothing in the window.
SELECT a.tier, coalesce(d.used, 0) AS used_today
FROM (SELECT $1::text AS user_id) u
LEFT JOIN accounts a ON a.user_id = u.user_id
LEFT JOIN daily_usage d ON d.user_id = u.user_id AND d.day = $2;

-- --- Operators' questions: who is near the daily limit --------------------------------------------------

-- name: near_limit_users
-- Users near their daily limit on day $1: today's users come from the export counters (or, narrowed to a
-- project, from its rollup rows of the day; every export adds to its user's daily_usage row, its counter and
-- its rollup row of the same day), their count from daily_usage, their tier from accounts. $2 user or NULL;
-- $3 project or NULL (users who exported in it that day). The tier table comes as parallel arrays: $4 names,
-- $5 daily limits (NULL: none), $6 the count from which a user of that tier is near the limit; $7 the tier of
-- a user without an account or on a tier no longer configured; $8 how many users to list.
-- Rows: the $8 most used users (tier_count NULL), then one row per tier with its number of such users
-- (user_id NULL).
WITH tiers AS (
    SELECT * FROM unnest($4::text[], $5::bigint[], $6::bigint[]) AS t(tier, daily_limit, near_from)
), active AS (
    -- Narrowed to a project: its rollup rows of the day. Otherwise the users whose latest export is today.
    SELECT DISTINCT user_id
    FROM export_rollups
    WHERE $3::text IS NOT NULL AND day = $1 AND project_id = $3 AND ($2::text IS NULL OR user_id = $2)
    UNION ALL
    SELECT id
    FROM export_counters
    WHERE $3::text IS NULL AND $2::text IS NULL AND kind = 'user' AND current_day = $1
    UNION ALL
    SELECT id  -- one user: its primary key, not every user of the day
    FROM export_counters
    WHERE $3::text IS NULL AND kind = 'user' AND id = $2 AND current_day = $1
), counted AS MATERIALIZED (
    -- The count: a scalar subquery, one primary-key lookup per user of the day, whatever the planner guesses
    -- (daily_usage has no index on the day alone). The tier: a join, so that the planner can hash a small
    -- accounts table once; as a subquery it scanned all of a tiny accounts table once per user (12 ms at a
    -- thousand users of the day and 100 accounts, 3.4 ms joined), and with a large one it looks each up.
    SELECT u.user_id,
           (SELECT d.used FROM daily_usage d WHERE d.user_id = u.user_id AND d.day = $1) AS used,
           a.tier AS account_tier
    FROM active u
    LEFT JOIN accounts a ON a.user_id = u.user_id
), near AS (
    SELECT c.user_id, t.tier, c.used, t.daily_limit
    FROM counted c
    LEFT JOIN tiers known ON known.tier = c.account_tier
    JOIN tiers t ON t.tier = coalesce(known.tier, $7)
    WHERE t.daily_limit IS NOT NULL AND c.used > 0 AND c.used >= t.near_from
)
(SELECT user_id, tier, used, daily_limit, NULL::bigint AS tier_count FROM near ORDER BY used DESC, user_id LIMIT $8)
UNION ALL
(SELECT NULL, tier, NULL, NULL, count(*) FROM near GROUP BY tier);

-- --- System-wide stats (no user, no project): the summaries of migrations/0003, never the per-user rollups --

-- name: system_stats_rollup
-- As stats_rollup, over the system rollup (at most 6 rows a day, however many exports) and its deltas not
-- folded yet (at most a second's worth). $1..$2 the window.
SELECT
    GROUPING(day) = 0 AS by_day, GROUPING(format) = 0 AS by_format, GROUPING(render_mode) = 0 AS by_mode,
    day, format, render_mode,
    sum(exports)::bigint AS exports, sum(reserved)::bigint AS reserved,
    sum(completed)::bigint AS completed, sum(failed)::bigint AS failed,
    sum(cancelled)::bigint AS cancelled, sum(expired)::bigint AS expired,
    sum(completed_duration_seconds) AS completed_duration_seconds,
    sum(completed_bytes)::bigint AS completed_bytes,
    max(last_export_at) AS last_export_at
FROM (
    SELECT * FROM system_rollups WHERE day BETWEEN $1 AND $2
    UNION ALL
    SELECT * FROM system_rollup_deltas WHERE day BETWEEN $1 AND $2
) AS system
GROUP BY GROUPING SETS ((), (day), (format), (render_mode), (day, format));

-- name: system_render_histogram
SELECT bucket, sum(count)::bigint AS count
FROM (
    SELECT bucket, count FROM system_render_time_histogram WHERE day BETWEEN $1 AND $2
    UNION ALL
    SELECT bucket, count FROM system_render_time_deltas WHERE day BETWEEN $1 AND $2
) AS system
GROUP BY bucket
ORDER BY bucket;

-- name: system_top_users
-- The busiest users of the window [$1, today]: each user's running count minus its count at the end of the
-- day before the window, for the users with an export in the window. Those counts come in one range of
-- export_counter_history_by_day; a user without a row on that day costs one probe for its latest earlier
-- row. $2 how many, $3 today. Favourite format: the most used in the window, ties to the alphabetically first.
WITH in_window AS (
    SELECT c.id AS user_id, c.last_export_at,
           c.exports - coalesce(e.exports, h.exports, 0) AS exports, c.mp4 - coalesce(e.mp4, h.mp4, 0) AS mp4,
           c.webm - coalesce(e.webm, h.webm, 0) AS webm, c.gif - coalesce(e.gif, h.gif, 0) AS gif
    FROM export_counters c
    LEFT JOIN export_counter_history e ON e.kind = 'user' AND e.day = $1::date - 1 AND e.id = c.id
    LEFT JOIN LATERAL (
        SELECT h.exports, h.mp4, h.webm, h.gif FROM export_counter_history h
        WHERE e.id IS NULL AND h.kind = 'user' AND h.id = c.id AND h.day < $1
        ORDER BY h.day DESC LIMIT 1
    ) h ON true
    WHERE c.kind = 'user' AND c.current_day >= $1
), top AS (
    SELECT * FROM in_window WHERE exports > 0 ORDER BY exports DESC, user_id LIMIT $2
)
SELECT top.user_id, top.exports, top.last_export_at,
       CASE WHEN top.gif >= top.mp4 AND top.gif >= top.webm THEN 'gif'
            WHEN top.mp4 >= top.webm THEN 'mp4' ELSE 'webm' END AS favorite_format,
       a.tier, coalesce(d.used, 0) AS used_today
FROM top
LEFT JOIN accounts a ON a.user_id = top.user_id
LEFT JOIN daily_usage d ON d.user_id = top.user_id AND d.day = $3
ORDER BY top.exports DESC, top.user_id;

-- name: system_top_projects
-- The busiest projects of the window [$1, today], counted as system_top_users; $2 how many.
WITH in_window AS (
    SELECT c.id AS project_id, c.last_export_at, c.exports - coalesce(e.exports, h.exports, 0) AS exports
    FROM export_counters c
    LEFT JOIN export_counter_history e ON e.kind = 'project' AND e.day = $1::date - 1 AND e.id = c.id
    LEFT JOIN LATERAL (
        SELECT h.exports FROM export_counter_history h
        WHERE e.id IS NULL AND h.kind = 'project' AND h.id = c.id AND h.day < $1
        ORDER BY h.day DESC LIMIT 1
    ) h ON true
    WHERE c.kind = 'project' AND c.current_day >= $1
), top AS (
    SELECT * FROM in_window WHERE exports > 0 ORDER BY exports DESC, project_id LIMIT $2
)
SELECT top.project_id, p.user_id, top.exports, top.last_export_at
FROM top JOIN projects p ON p.project_id = top.project_id
ORDER BY top.exports DESC, top.project_id;

-- name: compact_export_summaries
-- Folds the system summaries' delta rows (migrations/0003); returns how many it folded (0: none, or another
-- replica was folding).
SELECT compact_export_summaries();

-- --- Retention (migrations/0002_export_archive.sql): the archiver; history over the ledger and the archive ---

-- name: oldest_archivable_export
-- created_at of the oldest export the archiver may move: closed, created in [$2, $1) and closed before $1
-- (the cutoff); NULL when there is none. Reads the partial index exports_closed_by_created.
SELECT min(created_at) FROM exports
WHERE status <> 'RESERVED' AND created_at >= $2 AND created_at < $1
  AND coalesce(completed_at, expired_at, created_at) < $1;

-- name: ensure_archive_partition
-- The archive's partition for the month (UTC) of $1, created and attached when missing.
SELECT exports_archive_partition($1)::text;

-- name: archive_closed_exports
-- Moves up to $4 closed exports created in [$1, $2) (one month's partition) and closed before $3 from the
-- ledger to the archive, in one statement and so one transaction. Rows another archiver holds are skipped,
-- not waited for: every replica may run this at once and each export moves once. $5: archived_at.
-- Returns how many moved. Counters and rollups are untouched: they already count these exports.
WITH batch AS (
    SELECT export_id FROM exports
    WHERE status <> 'RESERVED' AND created_at >= $1 AND created_at < $2
      AND coalesce(completed_at, expired_at, created_at) < $3
    ORDER BY created_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM exports e USING batch
    WHERE e.export_id = batch.export_id AND e.status <> 'RESERVED'
    RETURNING e.*
), archived AS (
    INSERT INTO exports_archive (
        export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
        resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
        error, usage_day, created_at, completed_at, lease_expires_at, expired_at, archived_at
    )
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
           resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
           error, usage_day, created_at, completed_at, lease_expires_at, expired_at, $5
    FROM moved
    RETURNING 1
)
SELECT count(*) FROM archived;

-- name: list_user_history
-- ListExports: one keyset page ($2, $3: the last row's created_at and export_id; $4 rows) of a user's exports
-- over the ledger and the archive. One statement, so one snapshot: an export archived meanwhile shows up
-- exactly once, and the cursor does not care which table a row is in. Each branch reads its own history
-- index and stops after $4 rows; `created_at <= $2` lets the archive skip the months after the cursor.
(
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
           resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
           error, usage_day, created_at, completed_at, lease_expires_at, expired_at
    FROM exports
    WHERE user_id = $1 AND (created_at, export_id) < ($2, $3)
    ORDER BY created_at DESC, export_id DESC
    LIMIT $4
)
UNION ALL
(
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
           resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
           error, usage_day, created_at, completed_at, lease_expires_at, expired_at
    FROM exports_archive
    WHERE user_id = $1 AND created_at <= $2 AND (created_at, export_id) < ($2, $3)
    ORDER BY created_at DESC, export_id DESC
    LIMIT $4
)
ORDER BY created_at DESC, export_id DESC
LIMIT $4;

-- name: list_project_history
-- list_user_history narrowed to one project ($2); the cursor and the limit move to $3..$5.
(
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
           resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
           error, usage_day, created_at, completed_at, lease_expires_at, expired_at
    FROM exports
    WHERE user_id = $1 AND project_id = $2 AND (created_at, export_id) < ($3, $4)
    ORDER BY created_at DESC, export_id DESC
    LIMIT $5
)
UNION ALL
(
    SELECT export_id, user_id, project_id, idempotency_key, request_fingerprint, status, render_mode, format,
           resolution, requested_duration_seconds, duration_seconds, file_size_bytes, output_uri, render_seconds,
           error, usage_day, created_at, completed_at, lease_expires_at, expired_at
    FROM exports_archive
    WHERE user_id = $1 AND project_id = $2 AND created_at <= $3 AND (created_at, export_id) < ($3, $4)
    ORDER BY created_at DESC, export_id DESC
    LIMIT $5
)
ORDER BY created_at DESC, export_id DESC
LIMIT $5;
