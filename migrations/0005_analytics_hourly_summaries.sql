-- Hourly summaries for get_analytics_metrics_v01, so a period of any length costs
-- its whole hours from one summary row each plus at most two partial hours from
-- the rows themselves (docs/benchmarks.md, "Read models": a 30-day period over
-- 1,000,000 steps was an aggregate over every row of it, 160-210 ms).
--
-- The projector keeps them in the batch's transaction (projections/src/postgres.rs):
-- rows a batch creates are summed by the projector, updated rows contribute the
-- difference between how they were and how they are, one upsert per touched hour.
-- Statement-level triggers with transition tables did the same with less code and
-- cost the projector about half its throughput. Hours are UTC (date_trunc with an
-- explicit zone), whatever the session's TimeZone.
-- `reset` truncates these tables with the rest; tasker_rebuild_hourly_v01()
-- recomputes them from the rows (used below for existing read models, and by the
-- benchmark after its bulk inserts).

CREATE TABLE tasker_task_hourly (
    hour             TIMESTAMPTZ PRIMARY KEY,
    requested        BIGINT NOT NULL,
    complete         BIGINT NOT NULL,
    error            BIGINT NOT NULL,
    complete_span_us BIGINT NOT NULL
);
COMMENT ON TABLE tasker_task_hourly IS
    'per UTC hour of requested_at: tasks requested, how many are complete / in error now, '
    'and the sum of completed_at - requested_at of the complete ones (microseconds)';

CREATE TABLE tasker_step_hourly (
    hour        TIMESTAMPTZ PRIMARY KEY,
    complete    BIGINT NOT NULL,
    timed       BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL
);
COMMENT ON TABLE tasker_step_hourly IS
    'per UTC hour of completed_at: complete steps, how many have a duration, and the sum of their durations';

-- Recomputes both summaries from the rows.
CREATE FUNCTION tasker_rebuild_hourly_v01() RETURNS void
LANGUAGE sql VOLATILE
AS $$
    TRUNCATE tasker_task_hourly, tasker_step_hourly;
    INSERT INTO tasker_task_hourly (hour, requested, complete, error, complete_span_us)
    SELECT date_trunc('hour', t.requested_at, 'UTC'), count(*),
           count(*) FILTER (WHERE t.status = 'complete'), count(*) FILTER (WHERE t.status = 'error'),
           COALESCE(sum((EXTRACT(EPOCH FROM t.completed_at - t.requested_at) * 1000000)::BIGINT)
                        FILTER (WHERE t.status = 'complete'), 0)
    FROM tasker_tasks t
    GROUP BY 1;
    INSERT INTO tasker_step_hourly (hour, complete, timed, duration_ms)
    SELECT date_trunc('hour', s.completed_at, 'UTC'), count(*), count(s.duration_ms),
           COALESCE(sum(s.duration_ms), 0)
    FROM tasker_workflow_steps s
    WHERE s.status = 'complete' AND s.completed_at IS NOT NULL
    GROUP BY 1;
$$;

SELECT tasker_rebuild_hourly_v01();

-- get_analytics_metrics_v01 with the same results (the PostgreSQL/SQLite
-- equivalence tests compare them with SQLite's direct query), reading the period's
-- whole UTC hours [lo, hi) from the summaries and the rest, (since, lo) and
-- [hi, as_of], from the rows. lo is the first hour boundary after `since`, hi the
-- last at or before `as_of`; when lo > hi the period lies within one hour and is
-- read from the rows alone. Tasks in error (for the step success rate) and the
-- health score's last hour stay direct queries: steps in error can leave that
-- state, and the hour is small.
CREATE OR REPLACE FUNCTION get_analytics_metrics_v01(
    since TIMESTAMPTZ DEFAULT now() - INTERVAL '1 hour',
    as_of TIMESTAMPTZ DEFAULT now())
RETURNS TABLE (
    active_tasks_count      BIGINT,
    total_namespaces_count  BIGINT,
    unique_task_types_count BIGINT,
    system_health_score     DOUBLE PRECISION,
    task_throughput         BIGINT,
    completion_count        BIGINT,
    error_count             BIGINT,
    completion_rate         DOUBLE PRECISION,
    error_rate              DOUBLE PRECISION,
    step_throughput         BIGINT,
    step_success_rate       DOUBLE PRECISION,
    avg_task_duration_ms    BIGINT,
    avg_step_duration_ms    BIGINT,
    period_start            TIMESTAMPTZ,
    calculated_at           TIMESTAMPTZ
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT
        (SELECT count(*) FROM tasker_tasks t WHERE t.status IN ('pending', 'in_progress')),
        (SELECT count(*) FROM tasker_task_namespaces n
         WHERE EXISTS (SELECT 1 FROM tasker_named_tasks nt
                       JOIN tasker_tasks t ON t.named_task_id = nt.named_task_id
                       WHERE nt.task_namespace_id = n.task_namespace_id)),
        (SELECT count(*) FROM (
             SELECT DISTINCT nt.task_namespace_id, nt.name FROM tasker_named_tasks nt
             WHERE EXISTS (SELECT 1 FROM tasker_tasks t WHERE t.named_task_id = nt.named_task_id)
         ) types),
        CASE WHEN r.ok + r.failed > 0
             THEN ((r.ok * 2000 + r.ok + r.failed) / (2 * (r.ok + r.failed)))::DOUBLE PRECISION / 1000
             ELSE 1.0 END,
        k.throughput, k.completions, k.errors,
        CASE WHEN k.throughput > 0
             THEN ((k.completions * 20000 + k.throughput) / (2 * k.throughput))::DOUBLE PRECISION / 100
             ELSE 0.0 END,
        CASE WHEN k.throughput > 0
             THEN ((k.errors * 20000 + k.throughput) / (2 * k.throughput))::DOUBLE PRECISION / 100
             ELSE 0.0 END,
        c.ok + f.failed,
        CASE WHEN c.ok + f.failed > 0
             THEN ((c.ok * 2000 + c.ok + f.failed) / (2 * (c.ok + f.failed)))::DOUBLE PRECISION / 1000
             ELSE 1.0 END,
        CASE WHEN k.completions > 0
             THEN div(2 * (k.span_us::NUMERIC / 1000) + k.completions, 2 * k.completions)::BIGINT
             END,
        CASE WHEN c.timed > 0 THEN div(2 * c.ms + c.timed, 2 * c.timed)::BIGINT END,
        since,
        as_of
    FROM (
        SELECT COALESCE(sum(p.n), 0)::BIGINT AS throughput,
               COALESCE(sum(p.c), 0)::BIGINT AS completions,
               COALESCE(sum(p.e), 0)::BIGINT AS errors,
               sum(p.us) AS span_us
        FROM (
            SELECT h.requested AS n, h.complete AS c, h.error AS e, h.complete_span_us AS us
            FROM tasker_task_hourly h
            WHERE h.hour >= date_trunc('hour', since, 'UTC') + INTERVAL '1 hour'
              AND h.hour < date_trunc('hour', as_of, 'UTC')
            UNION ALL
            SELECT 1, (t.status = 'complete')::int, (t.status = 'error')::int,
                   CASE WHEN t.status = 'complete'
                        THEN (EXTRACT(EPOCH FROM t.completed_at - t.requested_at) * 1000000)::BIGINT
                        ELSE 0 END
            FROM tasker_tasks t
            WHERE t.requested_at > since AND t.requested_at <= as_of
              AND t.requested_at < date_trunc('hour', since, 'UTC') + INTERVAL '1 hour'
            UNION ALL
            SELECT 1, (t.status = 'complete')::int, (t.status = 'error')::int,
                   CASE WHEN t.status = 'complete'
                        THEN (EXTRACT(EPOCH FROM t.completed_at - t.requested_at) * 1000000)::BIGINT
                        ELSE 0 END
            FROM tasker_tasks t
            WHERE t.requested_at <= as_of
              AND t.requested_at >= GREATEST(date_trunc('hour', as_of, 'UTC'),
                                             date_trunc('hour', since, 'UTC') + INTERVAL '1 hour')
        ) p
    ) k
    CROSS JOIN (
        SELECT COALESCE(sum(p.n), 0)::BIGINT AS ok, sum(p.ms) AS ms,
               COALESCE(sum(p.t), 0)::BIGINT AS timed
        FROM (
            SELECT h.complete AS n, h.duration_ms AS ms, h.timed AS t
            FROM tasker_step_hourly h
            WHERE h.hour >= date_trunc('hour', since, 'UTC') + INTERVAL '1 hour'
              AND h.hour < date_trunc('hour', as_of, 'UTC')
            UNION ALL
            SELECT 1, s.duration_ms, (s.duration_ms IS NOT NULL)::int
            FROM tasker_workflow_steps s
            WHERE s.status = 'complete' AND s.completed_at > since AND s.completed_at <= as_of
              AND s.completed_at < date_trunc('hour', since, 'UTC') + INTERVAL '1 hour'
            UNION ALL
            SELECT 1, s.duration_ms, (s.duration_ms IS NOT NULL)::int
            FROM tasker_workflow_steps s
            WHERE s.status = 'complete' AND s.completed_at <= as_of
              AND s.completed_at >= GREATEST(date_trunc('hour', as_of, 'UTC'),
                                             date_trunc('hour', since, 'UTC') + INTERVAL '1 hour')
        ) p
    ) c
    CROSS JOIN (
        SELECT count(*) AS failed
        FROM tasker_workflow_steps s
        WHERE s.status = 'error' AND s.last_failure_at > since AND s.last_failure_at <= as_of
    ) f
    CROSS JOIN (
        SELECT count(*) FILTER (WHERE t.status = 'complete') AS ok,
               count(*) FILTER (WHERE t.status = 'error') AS failed
        FROM tasker_tasks t
        WHERE t.requested_at > as_of - INTERVAL '1 hour' AND t.requested_at <= as_of
    ) r
$$;
