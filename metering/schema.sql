-- The schema every migration in migrations/ adds up to. tests/test_metering_migrations.py
-- checks that migrating an empty database gives exactly this; update both together.

CREATE TABLE accounts (
    user_id     text PRIMARY KEY,
    tier        text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- One row per project, kept in the same transaction as the ledger row that touches it.
CREATE TABLE projects (
    project_id      text PRIMARY KEY,
    user_id         text NOT NULL,  -- the user who first exported it
    -- Not written since 0003 (export_counters holds a project's count and last export); the release before
    -- 0003 still writes them during a rolling upgrade, so they go in a later migration.
    export_count    bigint NOT NULL DEFAULT 0 CHECK (export_count >= 0),
    last_export_at  timestamptz,
    created_at      timestamptz NOT NULL
);

-- The ledger: one row per reservation. Closed exports older than the retention window move to
-- exports_archive (metering/archive.py); nothing else deletes a row.
CREATE TABLE exports (
    export_id                   uuid PRIMARY KEY,
    user_id                     text NOT NULL,
    project_id                  text NOT NULL,
    idempotency_key             text NOT NULL,
    request_fingerprint         text NOT NULL,
    status                      text NOT NULL
        CHECK (status IN ('RESERVED', 'COMPLETED', 'FAILED', 'CANCELLED', 'EXPIRED')),
    render_mode                 text NOT NULL CHECK (render_mode IN ('local', 'lambda')),
    format                      text NOT NULL CHECK (format IN ('mp4', 'webm', 'gif')),
    resolution                  text NOT NULL,
    requested_duration_seconds  double precision NOT NULL CHECK (requested_duration_seconds > 0),
    duration_seconds            double precision,
    file_size_bytes             bigint CHECK (file_size_bytes >= 0),
    output_uri                  text,
    render_seconds              double precision,
    error                       text,
    usage_day                   date NOT NULL,  -- the quota day this export counts against
    created_at                  timestamptz NOT NULL,
    completed_at                timestamptz,
    lease_expires_at            timestamptz NOT NULL,
    expired_at                  timestamptz,    -- set when the lease ran out, kept after a late Complete
    CONSTRAINT exports_user_idempotency_key UNIQUE (user_id, idempotency_key)
);

CREATE INDEX exports_user_history ON exports (user_id, created_at DESC, export_id DESC);
CREATE INDEX exports_user_project_history ON exports (user_id, project_id, created_at DESC, export_id DESC);
CREATE INDEX exports_reserved_by_lease ON exports (lease_expires_at) WHERE status = 'RESERVED';
CREATE INDEX exports_reserved_by_user ON exports (user_id) WHERE status = 'RESERVED';
-- The archiver's way to old closed exports (0002); RESERVED rows never enter it.
CREATE INDEX exports_closed_by_created ON exports (created_at) WHERE status <> 'RESERVED';

-- What a quota check reads and locks: RESERVED + COMPLETED exports of one user on one day.
CREATE TABLE daily_usage (
    user_id  text NOT NULL,
    day      date NOT NULL,
    used     bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (user_id, day)
);

CREATE TABLE project_daily_usage (
    project_id  text NOT NULL,
    day         date NOT NULL,
    used        bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (project_id, day)
);

-- Stats rollup: counts of the exports created on `day`, by their current status.
CREATE TABLE export_rollups (
    day                         date NOT NULL,
    user_id                     text NOT NULL,
    project_id                  text NOT NULL,
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
    PRIMARY KEY (day, user_id, project_id, format, render_mode)
);

CREATE INDEX export_rollups_user_day ON export_rollups (user_id, day);
CREATE INDEX export_rollups_project_day ON export_rollups (project_id, day);

-- Render times of completed exports in log buckets (2% wide), for percentiles without a scan.
CREATE TABLE render_time_histogram (
    day         date NOT NULL,
    user_id     text NOT NULL,
    project_id  text NOT NULL,
    bucket      integer NOT NULL,
    count       bigint NOT NULL DEFAULT 0 CHECK (count >= 0),
    PRIMARY KEY (day, user_id, project_id, bucket)
);

CREATE INDEX render_time_histogram_user_day ON render_time_histogram (user_id, day);
CREATE INDEX render_time_histogram_project_day ON render_time_histogram (project_id, day);

-- Closed exports past the retention window, moved here from `exports` by the archiver, one partition per
-- calendar month (UTC) of created_at, created on demand by exports_archive_partition(). No unique
-- idempotency key: a unique index of a partitioned table must include the partition key, and a key this old
-- is past any retry (a replay of it is a new request).
CREATE TABLE exports_archive (
    export_id                   uuid NOT NULL,
    user_id                     text NOT NULL,
    project_id                  text NOT NULL,
    idempotency_key             text NOT NULL,
    request_fingerprint         text NOT NULL,
    status                      text NOT NULL
        CHECK (status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'EXPIRED')),  -- never RESERVED
    render_mode                 text NOT NULL,
    format                      text NOT NULL,
    resolution                  text NOT NULL,
    requested_duration_seconds  double precision NOT NULL,
    duration_seconds            double precision,
    file_size_bytes             bigint,
    output_uri                  text,
    render_seconds              double precision,
    error                       text,
    usage_day                   date NOT NULL,
    created_at                  timestamptz NOT NULL,
    completed_at                timestamptz,
    lease_expires_at            timestamptz NOT NULL,
    expired_at                  timestamptz,
    archived_at                 timestamptz NOT NULL,
    -- created_at never changes, so one export always lands in the same partition: this is unique per export.
    CONSTRAINT exports_archive_pkey PRIMARY KEY (export_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE INDEX exports_archive_user_history ON exports_archive (user_id, created_at DESC, export_id DESC);
CREATE INDEX exports_archive_user_project_history
    ON exports_archive (user_id, project_id, created_at DESC, export_id DESC);

-- The partition of the month holding `moment` (UTC), created when missing; returns it. Archivers on several
-- replicas may ask at once: an advisory lock makes them take turns. The partition is created as a plain
-- table and then attached, which locks the parent only against other DDL (SHARE UPDATE EXCLUSIVE), never
-- against history reads or the archiver's inserts, as CREATE TABLE ... PARTITION OF would.
CREATE FUNCTION exports_archive_partition(moment timestamptz) RETURNS regclass
LANGUAGE plpgsql
SET lock_timeout = '5s'
AS $$
DECLARE
    first_day date := date_trunc('month', moment AT TIME ZONE 'UTC')::date;
    partition_name text := 'exports_archive_' || to_char(first_day, 'YYYY_MM');
    lower_bound timestamptz := first_day::timestamp AT TIME ZONE 'UTC';
    upper_bound timestamptz := (first_day + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    parent_schema name := (SELECT relnamespace::regnamespace::name FROM pg_class WHERE oid = 'exports_archive'::regclass);
    existing oid;
BEGIN
    PERFORM pg_advisory_xact_lock(7021784069121140001);  -- the bytes "archive!"; no other lock uses it
    SELECT c.oid INTO existing
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname = partition_name AND n.nspname = parent_schema;
    IF existing IS NOT NULL THEN
        IF NOT EXISTS (
            SELECT FROM pg_inherits WHERE inhrelid = existing AND inhparent = 'exports_archive'::regclass
        ) THEN
            RAISE EXCEPTION 'table %.% exists but is not a partition of exports_archive', parent_schema, partition_name
                USING HINT = 'A month detached for cold storage must be dropped or renamed before exports of '
                             'that month can be archived again.';
        END IF;
        RETURN existing::regclass;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I.%I (LIKE exports_archive INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
        parent_schema, partition_name
    );
    EXECUTE format(
        'ALTER TABLE exports_archive ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
        parent_schema, partition_name, lower_bound, upper_bound
    );
    RETURN format('%I.%I', parent_schema, partition_name)::regclass;
END;
$$;

-- System-wide summaries kept by triggers (0003): see migrations/0003_system_summaries.sql for why.
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

