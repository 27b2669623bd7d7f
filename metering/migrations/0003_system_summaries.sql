-- System-wide stats that cost the same at 10k exports and at 1M, kept in the same statements as the rollups
-- (metering/queries.sql: reserve, reserve_many, complete, complete_many, rollup_transition):
--
-- * system_rollups: export_rollups without the user and project (a window reads at most days x 6 rows), and
--   system_render_time_histogram: render_time_histogram without them. Every writer of a day would queue on
--   these few rows, holding their locks through its commit, so writers only append to
--   system_rollup_deltas / system_render_time_deltas (no lock, no index); compact_export_summaries() folds
--   the deltas into the rows, one replica at a time, every second (metering/server.py). Readers add the
--   deltas not folded yet: a fold is one transaction, so a delta is seen exactly once either way.
-- * export_counters / export_counter_history: the running export count of every user and project, and its
--   value at the end of each earlier day with exports. A window's count is the running count minus the one
--   at the end of the day before the window: one row and one index entry per user or project, however long
--   its history, where summing its daily rollups grows with every day it exports. A reservation locks its
--   user's and project's counters after their day rows (ensure_usage_rows and lock_reserve_many create
--   them), so their history only changes under that lock.
--
-- rebuild_export_summaries() recomputes all of them from the rollups: the migration runs it once, operators
-- and bulk loaders may run it again (it locks the rollups against writers while it works).

CREATE TABLE system_rollups (
    day                         date NOT NULL,
    format                      text NOT NULL,
    render_mode                 text NOT NULL,
    exports                     bigint NOT NULL DEFAULT 0,
    reserved                    bigint NOT NULL DEFAULT 0,
    completed                   bigint NOT NULL DEFAULT 0,
    failed                      bigint NOT NULL DEFAULT 0,
    cancelled                   bigint NOT NULL DEFAULT 0,
    expired                     bigint NOT NULL DEFAULT 0,
    completed_duration_seconds  double precision NOT NULL DEFAULT 0,
    completed_bytes             bigint NOT NULL DEFAULT 0,
    last_export_at              timestamptz,
    PRIMARY KEY (day, format, render_mode)
);

CREATE TABLE system_rollup_deltas (
    day                         date NOT NULL,
    format                      text NOT NULL,
    render_mode                 text NOT NULL,
    exports                     bigint NOT NULL,
    reserved                    bigint NOT NULL,
    completed                   bigint NOT NULL,
    failed                      bigint NOT NULL,
    cancelled                   bigint NOT NULL,
    expired                     bigint NOT NULL,
    completed_duration_seconds  double precision NOT NULL,
    completed_bytes             bigint NOT NULL,
    last_export_at              timestamptz
);

CREATE TABLE system_render_time_histogram (
    day     date NOT NULL,
    bucket  integer NOT NULL,
    count   bigint NOT NULL DEFAULT 0 CHECK (count >= 0),
    PRIMARY KEY (day, bucket)
);

CREATE TABLE system_render_time_deltas (
    day     date NOT NULL,
    bucket  integer NOT NULL,
    count   bigint NOT NULL
);

CREATE TABLE export_counters (
    kind            text NOT NULL CHECK (kind IN ('user', 'project')),
    id              text NOT NULL,
    exports         bigint NOT NULL DEFAULT 0,
    mp4             bigint NOT NULL DEFAULT 0,
    webm            bigint NOT NULL DEFAULT 0,
    gif             bigint NOT NULL DEFAULT 0,
    last_export_at  timestamptz,
    current_day     date,  -- the latest day with an export; NULL before the first
    PRIMARY KEY (kind, id)
);

-- Changes only when a user's or project's day moves on, so most counter updates stay HOT.
CREATE INDEX export_counters_current_day ON export_counters (kind, current_day);

-- The counters as they stood at the end of `day` (exports of that day and before), for every day with
-- exports before the counter's current_day.
CREATE TABLE export_counter_history (
    kind     text NOT NULL,
    id       text NOT NULL,
    day      date NOT NULL,
    exports  bigint NOT NULL,
    mp4      bigint NOT NULL,
    webm     bigint NOT NULL,
    gif      bigint NOT NULL,
    PRIMARY KEY (kind, id, day)
);

-- The totals of every user (or project) at the end of one day in one range: a window starting the day after
-- reads them all at once; a counter with no row on that day falls back to its latest earlier one.
CREATE INDEX export_counter_history_by_day ON export_counter_history (kind, day, id) INCLUDE (exports, mp4, webm, gif);

-- Folds the delta rows into system_rollups and system_render_time_histogram, in one transaction; returns
-- how many delta rows it folded. One caller at a time: while another folds, it returns 0 at once.
CREATE FUNCTION compact_export_summaries() RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    rollups bigint;
    buckets bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(8319676203190614305) THEN  -- the bytes "summary!"; no other lock uses it
        RETURN 0;
    END IF;
    WITH taken AS (
        DELETE FROM system_rollup_deltas RETURNING *
    ), folded AS (
        INSERT INTO system_rollups AS s (
            day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
            completed_duration_seconds, completed_bytes, last_export_at
        )
        SELECT day, format, render_mode, sum(exports), sum(reserved), sum(completed), sum(failed), sum(cancelled),
               sum(expired), sum(completed_duration_seconds), sum(completed_bytes), max(last_export_at)
        FROM taken GROUP BY 1, 2, 3
        ON CONFLICT (day, format, render_mode) DO UPDATE
        SET exports = s.exports + EXCLUDED.exports, reserved = s.reserved + EXCLUDED.reserved,
            completed = s.completed + EXCLUDED.completed, failed = s.failed + EXCLUDED.failed,
            cancelled = s.cancelled + EXCLUDED.cancelled, expired = s.expired + EXCLUDED.expired,
            completed_duration_seconds = s.completed_duration_seconds + EXCLUDED.completed_duration_seconds,
            completed_bytes = s.completed_bytes + EXCLUDED.completed_bytes,
            last_export_at = greatest(s.last_export_at, EXCLUDED.last_export_at)
    )
    SELECT count(*) INTO rollups FROM taken;
    WITH taken AS (
        DELETE FROM system_render_time_deltas RETURNING *
    ), folded AS (
        INSERT INTO system_render_time_histogram AS s (day, bucket, count)
        SELECT day, bucket, sum(count) FROM taken GROUP BY 1, 2
        ON CONFLICT (day, bucket) DO UPDATE SET count = s.count + EXCLUDED.count
    )
    SELECT count(*) INTO buckets FROM taken;
    RETURN rollups + buckets;
END;
$$;

-- All the summaries recomputed from the rollups, which are locked against writers meanwhile (SHARE mode:
-- readers go on). For this migration, a repair, or after a bulk load done with the triggers disabled.
CREATE FUNCTION rebuild_export_summaries() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    LOCK TABLE export_rollups, render_time_histogram IN SHARE MODE;
    DELETE FROM system_rollup_deltas;
    DELETE FROM system_render_time_deltas;
    DELETE FROM system_rollups;
    DELETE FROM system_render_time_histogram;
    DELETE FROM export_counter_history;
    DELETE FROM export_counters;
    INSERT INTO system_rollups (
        day, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT day, format, render_mode, sum(exports), sum(reserved), sum(completed),
           sum(failed), sum(cancelled), sum(expired), sum(completed_duration_seconds), sum(completed_bytes),
           max(last_export_at)
    FROM export_rollups GROUP BY 1, 2, 3;
    INSERT INTO system_render_time_histogram (day, bucket, count)
    SELECT day, bucket, sum(count) FROM render_time_histogram GROUP BY 1, 2;
    CREATE TEMPORARY TABLE counter_days ON COMMIT DROP AS
    SELECT kind, id, day,
           sum(exports) OVER running AS exports,
           sum(mp4) OVER running AS mp4, sum(webm) OVER running AS webm, sum(gif) OVER running AS gif,
           max(last_export_at) OVER running AS last_export_at,
           max(day) OVER (PARTITION BY kind, id) AS current_day
    FROM (
        SELECT k.kind, k.id, r.day, sum(r.exports) AS exports,
               coalesce(sum(r.exports) FILTER (WHERE r.format = 'mp4'), 0) AS mp4,
               coalesce(sum(r.exports) FILTER (WHERE r.format = 'webm'), 0) AS webm,
               coalesce(sum(r.exports) FILTER (WHERE r.format = 'gif'), 0) AS gif,
               max(r.last_export_at) AS last_export_at
        FROM export_rollups r
        CROSS JOIN LATERAL (VALUES ('user', r.user_id), ('project', r.project_id)) AS k(kind, id)
        GROUP BY 1, 2, 3
        HAVING sum(r.exports) > 0
    ) AS per_day
    WINDOW running AS (PARTITION BY kind, id ORDER BY day);
    INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
    SELECT kind, id, day, exports, mp4, webm, gif FROM counter_days WHERE day < current_day;
    INSERT INTO export_counters (kind, id, exports, mp4, webm, gif, last_export_at, current_day)
    SELECT kind, id, exports, mp4, webm, gif, last_export_at, day FROM counter_days WHERE day = current_day;
    DROP TABLE counter_days;
END;
$$;

SELECT rebuild_export_summaries();
