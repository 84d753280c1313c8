-- Tasker's questions over the read model, as versioned SQL functions (see
-- migrations/README.md: a changed function is a new `_v02` in a new migration).
--
-- Conventions:
-- * Every function is STABLE with a typed RETURNS TABLE. Most are LANGUAGE sql,
--   so the planner inlines them into the caller's statement and plans them for
--   the actual arguments (a one-hour and a thirty-day window need different
--   plans). Readiness, asked many times a second for one task, is plpgsql with
--   a cached generic plan (planning would cost more than running it).
-- * Every question that depends on "now" takes the reference time as a parameter
--   (`as_of`, defaulting to now()), so an answer is a pure function of the log and
--   that time: tests and the SQLite store give identical answers.
-- * Ratios are computed in integer arithmetic and rounded half up to a fixed
--   number of decimals before they become double precision, so PostgreSQL and
--   SQLite produce the same bits.
-- * Parameters whose names are also column names are referred to by
--   `function_name.parameter`; every column is qualified.

-- Readiness of every step of the given tasks at `as_of`: the engine's rule
-- (`TaskState::is_step_ready`). A step is ready when its task is pending or
-- in_progress, the step may make an attempt (pending; or in error, retryable,
-- attempts < retry_limit and next_retry_at <= as_of), and every parent is
-- complete or resolved_manually.
CREATE FUNCTION get_step_readiness_status_v01(task_ids UUID[], as_of TIMESTAMPTZ DEFAULT now())
RETURNS TABLE (
    task_id                 UUID,
    step_index              INTEGER,
    name                    TEXT,
    current_state           TEXT,
    dependencies_satisfied  BOOLEAN,
    retry_eligible          BOOLEAN,
    ready_for_execution     BOOLEAN,
    last_failure_at         TIMESTAMPTZ,
    next_retry_at           TIMESTAMPTZ,
    total_parents           INTEGER,
    completed_parents       INTEGER,
    attempts                INTEGER,
    retry_limit             INTEGER,
    backoff_request_seconds INTEGER,
    last_attempted_at       TIMESTAMPTZ
)
LANGUAGE plpgsql STABLE PARALLEL SAFE
-- One plan for every call: a custom plan costs ~0.5 ms to make, twice what
-- running it for a 20-step task costs; the generic plan is the same index walk.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH steps AS (
        SELECT s.task_id, s.step_index, s.name, s.status, s.attempts, s.retry_limit,
               s.retryable, s.last_failure_at, s.next_retry_at, s.backoff_request_seconds,
               s.last_attempted_at, t.status IN ('pending', 'in_progress') AS task_active
        FROM tasker_tasks t
        JOIN tasker_workflow_steps s ON s.task_id = t.task_id
        WHERE t.task_id = ANY (task_ids)
    ),
    parents AS (
        SELECT e.task_id, e.to_step, count(*)::INTEGER AS total,
               count(*) FILTER (WHERE p.status IN ('complete', 'resolved_manually'))::INTEGER
                   AS done
        FROM tasker_workflow_step_edges e
        JOIN steps p ON p.task_id = e.task_id AND p.step_index = e.from_step
        WHERE e.task_id = ANY (task_ids)
        GROUP BY e.task_id, e.to_step
    )
    SELECT s.task_id, s.step_index, s.name, s.status,
           d.satisfied,
           r.eligible,
           s.task_active AND r.eligible AND d.satisfied,
           s.last_failure_at, s.next_retry_at,
           d.total, d.done,
           s.attempts, s.retry_limit, s.backoff_request_seconds, s.last_attempted_at
    FROM steps s
    LEFT JOIN parents p ON p.task_id = s.task_id AND p.to_step = s.step_index
    CROSS JOIN LATERAL (
        SELECT COALESCE(p.total, 0) AS total, COALESCE(p.done, 0) AS done,
               COALESCE(p.total, 0) = COALESCE(p.done, 0) AS satisfied
    ) d
    CROSS JOIN LATERAL (
        SELECT s.status = 'pending'
               OR (s.status = 'error' AND s.retryable
                   AND s.attempts < GREATEST(s.retry_limit, 1)
                   AND COALESCE(s.next_retry_at <= as_of, false)) AS eligible
    ) r
    ORDER BY s.task_id, s.step_index;
END
$$;
COMMENT ON FUNCTION get_step_readiness_status_v01(UUID[], TIMESTAMPTZ) IS
    'per step of the given tasks: state, parents, retry eligibility and readiness at as_of (the engine''s rule)';

-- Depth of every step of a task in its DAG: roots are level 0, every other step
-- is one more than its deepest parent (the longest path from a root). The walk
-- keeps distinct (step, level) pairs, so it is bounded by steps x levels, not by
-- the number of paths; the level bound stops it on a (malformed) cycle.
CREATE FUNCTION calculate_dependency_levels_v01(task_id UUID)
RETURNS TABLE (step_index INTEGER, name TEXT, level INTEGER)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH RECURSIVE
    bound AS (
        SELECT count(*)::INTEGER AS steps
        FROM tasker_workflow_steps s
        WHERE s.task_id = calculate_dependency_levels_v01.task_id
    ),
    walk (step_index, level) AS (
        SELECT s.step_index, 0
        FROM tasker_workflow_steps s
        WHERE s.task_id = calculate_dependency_levels_v01.task_id
          AND NOT EXISTS (
              SELECT 1 FROM tasker_workflow_step_edges e
              WHERE e.task_id = s.task_id AND e.to_step = s.step_index)
        UNION
        SELECT e.to_step, w.level + 1
        FROM walk w
        JOIN tasker_workflow_step_edges e
          ON e.task_id = calculate_dependency_levels_v01.task_id AND e.from_step = w.step_index
        JOIN bound b ON w.level < b.steps
    )
    SELECT s.step_index, s.name, max(w.level)::INTEGER
    FROM walk w
    JOIN tasker_workflow_steps s
      ON s.task_id = calculate_dependency_levels_v01.task_id AND s.step_index = w.step_index
    GROUP BY s.step_index, s.name
    ORDER BY 3, 1
$$;
COMMENT ON FUNCTION calculate_dependency_levels_v01(UUID) IS
    'level of every step of a task: 0 for roots, else the longest path from a root';

-- System analytics for the period (since, as_of]:
-- * tasks: those requested in the period (Tasker's definition): throughput,
--   how many are complete / in error now, rates in percent (2 decimals), and the
--   average requested -> completed time of the complete ones;
-- * steps: those whose latest attempt ended in the period (completed_at, or
--   last_failure_at for steps in error): throughput, success rate complete /
--   (complete + error) (3 decimals, 1.0 without any) and the average execution
--   time of the complete ones. (Tasker counted the steps of the period's tasks;
--   steps' own times let an index find them without visiting every task.)
-- active_tasks_count is the tasks pending or in_progress now. The health score
-- is Tasker's: complete / (complete + error) over the tasks requested in the
-- hour before as_of, 3 decimals, 1.0 when there are none. Averages are whole
-- milliseconds (NULL without data).
CREATE FUNCTION get_analytics_metrics_v01(
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
             THEN div(2 * EXTRACT(EPOCH FROM k.span) * 1000 + k.completions, 2 * k.completions)::BIGINT
             END,
        CASE WHEN c.timed > 0 THEN div(2 * c.ms + c.timed, 2 * c.timed)::BIGINT END,
        since,
        as_of
    FROM (
        SELECT count(*) AS throughput,
               count(*) FILTER (WHERE t.status = 'complete') AS completions,
               count(*) FILTER (WHERE t.status = 'error') AS errors,
               sum(t.completed_at - t.requested_at) FILTER (WHERE t.status = 'complete') AS span
        FROM tasker_tasks t
        WHERE t.requested_at > since AND t.requested_at <= as_of
    ) k
    CROSS JOIN (
        SELECT count(*) AS ok, sum(s.duration_ms) AS ms, count(s.duration_ms) AS timed
        FROM tasker_workflow_steps s
        WHERE s.completed_at > since AND s.completed_at <= as_of AND s.status = 'complete'
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
COMMENT ON FUNCTION get_analytics_metrics_v01(TIMESTAMPTZ, TIMESTAMPTZ) IS
    'system overview, and the tasks requested and steps finished in (since, as_of]';

-- The slowest completed steps (execution time, duration_ms), slowest first; ties
-- by task and step. `since` keeps the steps completed after it (NULL: all).
CREATE FUNCTION get_slowest_steps_v01(
    since            TIMESTAMPTZ DEFAULT NULL,
    limit_count      INTEGER DEFAULT 10,
    namespace_filter TEXT DEFAULT NULL,
    task_name_filter TEXT DEFAULT NULL,
    version_filter   TEXT DEFAULT NULL)
RETURNS TABLE (
    task_id      UUID,
    step_index   INTEGER,
    step_name    TEXT,
    namespace    TEXT,
    task_name    TEXT,
    version      TEXT,
    duration_ms  BIGINT,
    attempts     INTEGER,
    retry_limit  INTEGER,
    started_at   TIMESTAMPTZ,
    completed_at TIMESTAMPTZ
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT s.task_id, s.step_index, s.name, n.name, nt.name, nt.version, s.duration_ms,
           s.attempts, s.retry_limit, s.started_at, s.completed_at
    FROM tasker_workflow_steps s
    JOIN tasker_tasks t ON t.task_id = s.task_id
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE s.status = 'complete' AND s.duration_ms IS NOT NULL
      AND (since IS NULL OR s.completed_at > since)
      AND (namespace_filter IS NULL OR n.name = namespace_filter)
      AND (task_name_filter IS NULL OR nt.name = task_name_filter)
      AND (version_filter IS NULL OR nt.version = version_filter)
    ORDER BY s.duration_ms DESC, s.task_id, s.step_index
    LIMIT limit_count
$$;
COMMENT ON FUNCTION get_slowest_steps_v01(TIMESTAMPTZ, INTEGER, TEXT, TEXT, TEXT) IS
    'the slowest completed steps by execution time, optionally since a time and for one namespace/name/version';

-- The slowest finished tasks (requested_at -> completed_at, any terminal status),
-- slowest first; ties by task. `since` keeps the tasks finished after it (NULL:
-- all). Step counts are computed for the returned tasks only. The order is the
-- one of the index tasker_tasks_duration (below), so the first rows come
-- straight from it.
CREATE FUNCTION get_slowest_tasks_v01(
    since            TIMESTAMPTZ DEFAULT NULL,
    limit_count      INTEGER DEFAULT 10,
    namespace_filter TEXT DEFAULT NULL,
    task_name_filter TEXT DEFAULT NULL,
    version_filter   TEXT DEFAULT NULL)
RETURNS TABLE (
    task_id         UUID,
    namespace       TEXT,
    task_name       TEXT,
    version         TEXT,
    status          TEXT,
    duration_ms     BIGINT,
    step_count      BIGINT,
    completed_steps BIGINT,
    error_steps     BIGINT,
    requested_at    TIMESTAMPTZ,
    completed_at    TIMESTAMPTZ,
    initiator       TEXT
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT top.task_id, top.namespace, top.task_name, top.version, top.status,
           top.duration_ms, c.step_count, c.completed_steps, c.error_steps,
           top.requested_at, top.completed_at, top.initiator
    FROM (
        SELECT t.task_id, n.name AS namespace, nt.name AS task_name, nt.version, t.status,
               tasker_ts_to_ms(t.completed_at) - tasker_ts_to_ms(t.requested_at) AS duration_ms,
               t.requested_at, t.completed_at, t.initiator
        FROM tasker_tasks t
        JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
        WHERE t.completed_at IS NOT NULL
          AND (since IS NULL OR t.completed_at > since)
          AND (namespace_filter IS NULL OR n.name = namespace_filter)
          AND (task_name_filter IS NULL OR nt.name = task_name_filter)
          AND (version_filter IS NULL OR nt.version = version_filter)
        ORDER BY t.completed_at - t.requested_at DESC, t.task_id
        LIMIT limit_count
    ) top
    CROSS JOIN LATERAL (
        SELECT count(*) AS step_count,
               count(*) FILTER (WHERE s.status = 'complete') AS completed_steps,
               count(*) FILTER (WHERE s.status = 'error') AS error_steps
        FROM tasker_workflow_steps s
        WHERE s.task_id = top.task_id
    ) c
    ORDER BY top.duration_ms DESC, top.task_id
$$;
COMMENT ON FUNCTION get_slowest_tasks_v01(TIMESTAMPTZ, INTEGER, TEXT, TEXT, TEXT) IS
    'the slowest finished tasks (requested to finished), optionally since a time and for one namespace/name/version';

-- Counts of tasks and steps by status, and of steps by retry situation at as_of:
-- retryable errors (a retry is scheduled: retryable, attempts left, next_retry_at
-- set), exhausted (attempts >= retry_limit) and in backoff (next_retry_at > as_of).
CREATE FUNCTION get_system_health_counts_v01(as_of TIMESTAMPTZ DEFAULT now())
RETURNS TABLE (
    total_tasks             BIGINT,
    pending_tasks           BIGINT,
    in_progress_tasks       BIGINT,
    complete_tasks          BIGINT,
    error_tasks             BIGINT,
    cancelled_tasks         BIGINT,
    resolved_manually_tasks BIGINT,
    total_steps             BIGINT,
    pending_steps           BIGINT,
    in_progress_steps       BIGINT,
    complete_steps          BIGINT,
    error_steps             BIGINT,
    skipped_steps           BIGINT,
    cancelled_steps         BIGINT,
    resolved_manually_steps BIGINT,
    retryable_error_steps   BIGINT,
    exhausted_retry_steps   BIGINT,
    in_backoff_steps        BIGINT
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    -- Counts by status come from the status indexes (index-only scans); only the
    -- steps in error are read for their retry situation.
    WITH
    tc AS (SELECT t.status, count(*) AS n FROM tasker_tasks t GROUP BY t.status),
    sc AS (SELECT s.status, count(*) AS n FROM tasker_workflow_steps s GROUP BY s.status)
    SELECT
        (SELECT COALESCE(sum(tc.n), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'pending'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'in_progress'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'complete'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'error'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'cancelled'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(tc.n) FILTER (WHERE tc.status = 'resolved_manually'), 0)::BIGINT FROM tc),
        (SELECT COALESCE(sum(sc.n), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'pending'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'in_progress'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'complete'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'error'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'skipped'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'cancelled'), 0)::BIGINT FROM sc),
        (SELECT COALESCE(sum(sc.n) FILTER (WHERE sc.status = 'resolved_manually'), 0)::BIGINT FROM sc),
        e.retryable, e.exhausted, e.in_backoff
    FROM (
        SELECT count(*) FILTER (WHERE s.retryable AND s.attempts < GREATEST(s.retry_limit, 1)
                                  AND s.next_retry_at IS NOT NULL) AS retryable,
               count(*) FILTER (WHERE s.attempts >= GREATEST(s.retry_limit, 1)) AS exhausted,
               count(*) FILTER (WHERE s.next_retry_at > as_of) AS in_backoff
        FROM tasker_workflow_steps s
        WHERE s.status = 'error'
    ) e
$$;
COMMENT ON FUNCTION get_system_health_counts_v01(TIMESTAMPTZ) IS
    'tasks and steps by status, and steps by retry situation at as_of';

-- One task's execution context at as_of, from its steps' readiness (Tasker's
-- vocabulary). completed_steps counts the steps done without blocking the task
-- (complete, resolved_manually, skipped); failed_steps the steps in error, of
-- which "blocked" ones have no retry coming (next_retry_at NULL or attempts
-- exhausted). execution_status / recommended_action, first match wins:
-- ready steps -> has_ready_steps / execute_ready_steps; steps in progress ->
-- processing / wait_for_completion; blocked steps -> blocked_by_failures /
-- handle_failures; every step done -> all_complete / finalize_task; otherwise
-- waiting_for_dependencies / wait_for_dependencies. health_status: healthy (no
-- failed step), recovering (failures, but ready steps or retries coming),
-- blocked (blocked steps and nothing ready). The parameter is `input_task_id`
-- because `task_id` names an output column.
CREATE FUNCTION get_task_execution_context_v01(input_task_id UUID, as_of TIMESTAMPTZ DEFAULT now())
RETURNS TABLE (
    task_id               UUID,
    namespace             TEXT,
    task_name             TEXT,
    status                TEXT,
    total_steps           BIGINT,
    pending_steps         BIGINT,
    in_progress_steps     BIGINT,
    completed_steps       BIGINT,
    failed_steps          BIGINT,
    ready_steps           BIGINT,
    execution_status      TEXT,
    recommended_action    TEXT,
    completion_percentage DOUBLE PRECISION,
    health_status         TEXT
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT t.task_id, n.name, nt.name, t.status,
           a.total, a.pending, a.in_progress, a.done, a.failed, a.ready,
           CASE WHEN a.ready > 0 THEN 'has_ready_steps'
                WHEN a.in_progress > 0 THEN 'processing'
                WHEN a.blocked > 0 THEN 'blocked_by_failures'
                WHEN a.total > 0 AND a.done = a.total THEN 'all_complete'
                ELSE 'waiting_for_dependencies' END,
           CASE WHEN a.ready > 0 THEN 'execute_ready_steps'
                WHEN a.in_progress > 0 THEN 'wait_for_completion'
                WHEN a.blocked > 0 THEN 'handle_failures'
                WHEN a.total > 0 AND a.done = a.total THEN 'finalize_task'
                ELSE 'wait_for_dependencies' END,
           CASE WHEN a.total > 0
                THEN ((a.done * 20000 + a.total) / (2 * a.total))::DOUBLE PRECISION / 100
                ELSE 0.0 END,
           CASE WHEN a.failed = 0 THEN 'healthy'
                WHEN a.ready > 0 THEN 'recovering'
                WHEN a.blocked > 0 THEN 'blocked'
                WHEN a.blocked = 0 THEN 'recovering'
                ELSE 'unknown' END
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    CROSS JOIN (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE r.current_state = 'pending') AS pending,
               count(*) FILTER (WHERE r.current_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE r.current_state IN ('complete', 'resolved_manually', 'skipped'))
                   AS done,
               count(*) FILTER (WHERE r.current_state = 'error') AS failed,
               count(*) FILTER (WHERE r.ready_for_execution) AS ready,
               count(*) FILTER (WHERE r.current_state = 'error'
                                  AND (r.next_retry_at IS NULL
                                       OR r.attempts >= GREATEST(r.retry_limit, 1))) AS blocked
        FROM get_step_readiness_status_v01(
                 ARRAY[input_task_id], as_of) r
    ) a
    WHERE t.task_id = input_task_id
$$;
COMMENT ON FUNCTION get_task_execution_context_v01(UUID, TIMESTAMPTZ) IS
    'one task''s step counts, readiness, recommended action and health at as_of';

-- Indexes the functions need.

-- get_slowest_tasks_v01 reads the slowest finished tasks first.
CREATE INDEX tasker_tasks_duration ON tasker_tasks ((completed_at - requested_at) DESC, task_id)
    WHERE completed_at IS NOT NULL;
-- get_analytics_metrics_v01 finds the steps that failed in a period.
CREATE INDEX tasker_workflow_steps_failed_at ON tasker_workflow_steps (last_failure_at)
    WHERE status = 'error';
