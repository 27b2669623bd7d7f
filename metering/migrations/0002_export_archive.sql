-- Retention: closed exports older than METERING_RETENTION_DAYS move from the hot ledger (`exports`) to
-- `exports_archive`, one partition per calendar month (UTC) of created_at, so an old month can be detached,
-- dumped and dropped without touching the rest. Stats never read either table (they read the rollups).
--
-- `exports` keeps its per-user unique idempotency key; the archive cannot enforce one (a unique index of a
-- partitioned table must include the partition key), and needs none: a key older than the retention window
-- is far past any retry, and a replay of it is a new request.

-- Finds old closed exports for the archiver without a scan; RESERVED rows never enter it.
CREATE INDEX exports_closed_by_created ON exports (created_at) WHERE status <> 'RESERVED';

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
