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
    export_count    bigint NOT NULL DEFAULT 0 CHECK (export_count >= 0),
    last_export_at  timestamptz,
    created_at      timestamptz NOT NULL
);

-- The ledger: one row per reservation, never deleted.
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
