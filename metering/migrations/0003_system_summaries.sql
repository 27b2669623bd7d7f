-- System-wide stats that cost the same at 10k exports and at 1M: summaries kept by triggers on the rollups,
-- so every writer of export_rollups and render_time_histogram (reserve, complete, their batches, the reaper)
-- moves them in its own transaction, and none can forget to.
--
-- * system_rollups: export_rollups without the user and project, split over 8 shards (by user) so that
--   concurrent writers of one day do not all queue on one row. A window reads at most days x 48 rows.
-- * system_render_time_histogram: render_time_histogram without the user and project.
-- * export_counters / export_counter_history: the running export count of every user and project, and its
--   value at the end of each earlier day with exports. A window's count is the running count minus the one
--   at the end of the day before the window: one row and one index probe per user or project, however long
--   its history, where summing its daily rollups grows with every day it exports.
--
-- rebuild_export_summaries() recomputes all four from the rollups: the migration runs it once, operators
-- and bulk loaders may run it again (it locks the rollups against writers while it works).

CREATE TABLE system_rollups (
    day                         date NOT NULL,
    shard                       smallint NOT NULL,  -- hashtext(user_id) & 7
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
    PRIMARY KEY (day, shard, format, render_mode)
);

CREATE TABLE system_render_time_histogram (
    day     date NOT NULL,
    bucket  integer NOT NULL,
    count   bigint NOT NULL DEFAULT 0 CHECK (count >= 0),
    PRIMARY KEY (day, bucket)
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

CREATE TYPE export_rollup_delta AS (
    day                         date,
    user_id                     text,
    project_id                  text,
    format                      text,
    render_mode                 text,
    exports                     bigint,
    reserved                    bigint,
    completed                   bigint,
    failed                      bigint,
    cancelled                   bigint,
    expired                     bigint,
    completed_duration_seconds  double precision,
    completed_bytes             bigint,
    last_export_at              timestamptz
);

CREATE TYPE export_counter_delta AS (
    kind            text,
    id              text,
    day             date,
    exports         bigint,
    mp4             bigint,
    webm            bigint,
    gif             bigint,
    last_export_at  timestamptz
);

-- One user's or project's new exports of one day, in any order of days: moves the day on (the totals so far
-- become the history of the old current day), or adds to the current day, or, for a day already past (an
-- export whose day ended while it was being reserved), adds to every total through that day and later.
-- The counter row is locked by the caller; each statement here takes a fresh snapshot (a VOLATILE PL/pgSQL
-- function), so it sees history written by any transaction that held the lock before.
CREATE FUNCTION export_counter_step(step export_counter_delta) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    current date;
BEGIN
    SELECT c.current_day INTO current FROM export_counters c WHERE c.kind = step.kind AND c.id = step.id;
    IF current < step.day THEN
        INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
        SELECT c.kind, c.id, c.current_day, c.exports, c.mp4, c.webm, c.gif
        FROM export_counters c WHERE c.kind = step.kind AND c.id = step.id;
    ELSIF current > step.day THEN
        INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
        SELECT step.kind, step.id, step.day, coalesce(before.exports, 0), coalesce(before.mp4, 0),
               coalesce(before.webm, 0), coalesce(before.gif, 0)
        FROM (SELECT) AS one
        LEFT JOIN LATERAL (
            SELECT h.* FROM export_counter_history h
            WHERE h.kind = step.kind AND h.id = step.id AND h.day < step.day
            ORDER BY h.day DESC LIMIT 1
        ) before ON true
        ON CONFLICT (kind, id, day) DO NOTHING;
        UPDATE export_counter_history h
        SET exports = h.exports + step.exports, mp4 = h.mp4 + step.mp4, webm = h.webm + step.webm,
            gif = h.gif + step.gif
        WHERE h.kind = step.kind AND h.id = step.id AND h.day >= step.day;
    END IF;
    UPDATE export_counters c
    SET exports = c.exports + step.exports, mp4 = c.mp4 + step.mp4, webm = c.webm + step.webm,
        gif = c.gif + step.gif, current_day = greatest(c.current_day, step.day),
        last_export_at = greatest(c.last_export_at, step.last_export_at)
    WHERE c.kind = step.kind AND c.id = step.id;
END;
$$;

-- Applies changes of export_rollups rows: the counters of users and projects with new exports (created
-- when missing, locked in key order), then the system rollup (in key order). Every writer locks in this
-- order, after the rollups, so writers never wait in a circle.
CREATE FUNCTION apply_export_rollup_deltas(deltas export_rollup_delta[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    moved export_counter_delta[];
    step export_counter_delta;
BEGIN
    IF coalesce(cardinality(deltas), 0) = 0 THEN
        RETURN;
    END IF;
    moved := ARRAY(
        SELECT ROW(k.kind, k.id, d.day, sum(d.exports),
                   coalesce(sum(d.exports) FILTER (WHERE d.format = 'mp4'), 0),
                   coalesce(sum(d.exports) FILTER (WHERE d.format = 'webm'), 0),
                   coalesce(sum(d.exports) FILTER (WHERE d.format = 'gif'), 0),
                   max(d.last_export_at))::export_counter_delta
        FROM unnest(deltas) d
        CROSS JOIN LATERAL (VALUES ('user', d.user_id), ('project', d.project_id)) AS k(kind, id)
        WHERE d.exports <> 0
        GROUP BY k.kind, k.id, d.day
        ORDER BY k.kind, k.id, d.day
    );
    IF cardinality(moved) > 0 THEN
        -- A counter seen for the first time starts with this statement's counts, and is done; the rest
        -- exist, or are created empty (several days at once) and take the steps below.
        WITH created AS (
            INSERT INTO export_counters (kind, id, exports, mp4, webm, gif, last_export_at, current_day)
            SELECT m.kind, m.id, m.exports, m.mp4, m.webm, m.gif, m.last_export_at, m.day
            FROM unnest(moved) m
            WHERE NOT EXISTS (SELECT FROM unnest(moved) o WHERE o.kind = m.kind AND o.id = m.id AND o.day <> m.day)
            ORDER BY m.kind, m.id
            ON CONFLICT (kind, id) DO NOTHING
            RETURNING kind, id
        )
        SELECT ARRAY(
            SELECT m FROM unnest(moved) m
            WHERE NOT EXISTS (SELECT FROM created c WHERE c.kind = m.kind AND c.id = m.id)
            ORDER BY m.kind, m.id, m.day
        ) INTO moved;
    END IF;
    IF cardinality(moved) > 0 THEN
        INSERT INTO export_counters (kind, id)
        SELECT DISTINCT m.kind, m.id FROM unnest(moved) m ORDER BY m.kind, m.id
        ON CONFLICT (kind, id) DO NOTHING;
        PERFORM FROM export_counters c
        WHERE (c.kind, c.id) IN (SELECT m.kind, m.id FROM unnest(moved) m)
        ORDER BY c.kind, c.id
        FOR UPDATE;
        -- The usual case in one statement each: one day per counter, the current one or a later one.
        INSERT INTO export_counter_history (kind, id, day, exports, mp4, webm, gif)
        SELECT c.kind, c.id, c.current_day, c.exports, c.mp4, c.webm, c.gif
        FROM export_counters c JOIN unnest(moved) m ON m.kind = c.kind AND m.id = c.id
        WHERE c.current_day < m.day
          AND NOT EXISTS (SELECT FROM unnest(moved) o WHERE o.kind = m.kind AND o.id = m.id AND o.day <> m.day);
        UPDATE export_counters c
        SET exports = c.exports + m.exports, mp4 = c.mp4 + m.mp4, webm = c.webm + m.webm, gif = c.gif + m.gif,
            current_day = m.day, last_export_at = greatest(c.last_export_at, m.last_export_at)
        FROM unnest(moved) m
        WHERE m.kind = c.kind AND m.id = c.id AND (c.current_day IS NULL OR c.current_day <= m.day)
          AND NOT EXISTS (SELECT FROM unnest(moved) o WHERE o.kind = m.kind AND o.id = m.id AND o.day <> m.day);
        -- The rest (a past day, or several days of one counter): a step at a time, oldest day first. The
        -- updated counters above now have current_day = m.day, so they are not picked again.
        FOR step IN
            SELECT m.* FROM unnest(moved) m JOIN export_counters c ON c.kind = m.kind AND c.id = m.id
            WHERE c.current_day > m.day
               OR EXISTS (SELECT FROM unnest(moved) o WHERE o.kind = m.kind AND o.id = m.id AND o.day <> m.day)
            ORDER BY m.kind, m.id, m.day
        LOOP
            PERFORM export_counter_step(step);
        END LOOP;
    END IF;
    INSERT INTO system_rollups AS s (
        day, shard, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT d.day, hashtext(d.user_id) & 7, d.format, d.render_mode, sum(d.exports), sum(d.reserved),
           sum(d.completed), sum(d.failed), sum(d.cancelled), sum(d.expired), sum(d.completed_duration_seconds),
           sum(d.completed_bytes), max(d.last_export_at)
    FROM unnest(deltas) d
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, shard, format, render_mode) DO UPDATE
    SET exports = s.exports + EXCLUDED.exports, reserved = s.reserved + EXCLUDED.reserved,
        completed = s.completed + EXCLUDED.completed, failed = s.failed + EXCLUDED.failed,
        cancelled = s.cancelled + EXCLUDED.cancelled, expired = s.expired + EXCLUDED.expired,
        completed_duration_seconds = s.completed_duration_seconds + EXCLUDED.completed_duration_seconds,
        completed_bytes = s.completed_bytes + EXCLUDED.completed_bytes,
        last_export_at = greatest(s.last_export_at, EXCLUDED.last_export_at);
END;
$$;

CREATE FUNCTION export_rollups_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM apply_export_rollup_deltas(ARRAY(
        SELECT ROW(n.day, n.user_id, n.project_id, n.format, n.render_mode, n.exports, n.reserved, n.completed,
                   n.failed, n.cancelled, n.expired, n.completed_duration_seconds, n.completed_bytes,
                   n.last_export_at)::export_rollup_delta
        FROM inserted_rows n
    ));
    RETURN NULL;
END;
$$;

CREATE FUNCTION export_rollups_updated() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM apply_export_rollup_deltas(ARRAY(
        SELECT ROW(n.day, n.user_id, n.project_id, n.format, n.render_mode, n.exports - o.exports,
                   n.reserved - o.reserved, n.completed - o.completed, n.failed - o.failed,
                   n.cancelled - o.cancelled, n.expired - o.expired,
                   n.completed_duration_seconds - o.completed_duration_seconds,
                   n.completed_bytes - o.completed_bytes, n.last_export_at)::export_rollup_delta
        FROM new_rows n JOIN old_rows o USING (day, user_id, project_id, format, render_mode)
    ));
    RETURN NULL;
END;
$$;

CREATE TRIGGER export_rollups_inserted AFTER INSERT ON export_rollups
REFERENCING NEW TABLE AS inserted_rows
FOR EACH STATEMENT EXECUTE FUNCTION export_rollups_inserted();

CREATE TRIGGER export_rollups_updated AFTER UPDATE ON export_rollups
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION export_rollups_updated();

-- Render-time buckets of every user and project added up per day, in key order.
CREATE FUNCTION render_time_histogram_changed() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO system_render_time_histogram AS s (day, bucket, count)
        SELECT n.day, n.bucket, sum(n.count) FROM inserted_rows n
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, bucket) DO UPDATE SET count = s.count + EXCLUDED.count;
    ELSE
        INSERT INTO system_render_time_histogram AS s (day, bucket, count)
        SELECT n.day, n.bucket, sum(n.count - o.count)
        FROM new_rows n JOIN old_rows o USING (day, user_id, project_id, bucket)
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (day, bucket) DO UPDATE SET count = s.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER render_time_histogram_inserted AFTER INSERT ON render_time_histogram
REFERENCING NEW TABLE AS inserted_rows
FOR EACH STATEMENT EXECUTE FUNCTION render_time_histogram_changed();

CREATE TRIGGER render_time_histogram_updated AFTER UPDATE ON render_time_histogram
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION render_time_histogram_changed();

-- All four summaries recomputed from the rollups, which are locked against writers meanwhile (SHARE mode:
-- readers go on). For this migration, a repair, or after a bulk load done with the triggers disabled.
CREATE FUNCTION rebuild_export_summaries() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    LOCK TABLE export_rollups, render_time_histogram IN SHARE MODE;
    DELETE FROM system_rollups;
    DELETE FROM system_render_time_histogram;
    DELETE FROM export_counter_history;
    DELETE FROM export_counters;
    INSERT INTO system_rollups (
        day, shard, format, render_mode, exports, reserved, completed, failed, cancelled, expired,
        completed_duration_seconds, completed_bytes, last_export_at
    )
    SELECT day, hashtext(user_id) & 7, format, render_mode, sum(exports), sum(reserved), sum(completed),
           sum(failed), sum(cancelled), sum(expired), sum(completed_duration_seconds), sum(completed_bytes),
           max(last_export_at)
    FROM export_rollups GROUP BY 1, 2, 3, 4;
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
