-- The read model: tasks, steps, their DAG and their transitions, projected from
-- the event log by the projector (see migrations/README.md for the rules).

CREATE TABLE tasker_task_namespaces (
    task_namespace_id BIGSERIAL PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    created_at        TIMESTAMPTZ NOT NULL
);
COMMENT ON COLUMN tasker_task_namespaces.created_at IS 'time of the first task.accepted in the namespace';

CREATE TABLE tasker_named_tasks (
    named_task_id     BIGSERIAL PRIMARY KEY,
    task_namespace_id BIGINT NOT NULL REFERENCES tasker_task_namespaces (task_namespace_id),
    name              TEXT NOT NULL,
    version           TEXT NOT NULL,
    template          JSONB NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    UNIQUE (task_namespace_id, name, version)
);
COMMENT ON COLUMN tasker_named_tasks.template IS 'the resolved template snapshot carried by task.accepted';

CREATE TABLE tasker_tasks (
    task_id          UUID PRIMARY KEY,
    named_task_id    BIGINT NOT NULL REFERENCES tasker_named_tasks (named_task_id),
    status           TEXT NOT NULL,
    context          JSONB NOT NULL,
    requested_at     TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    completed_at     TIMESTAMPTZ,
    initiator        TEXT,
    source_system    TEXT,
    reason           TEXT,
    tags             JSONB NOT NULL DEFAULT '[]',
    idempotency_key  TEXT,
    correlation_id   UUID NOT NULL,
    log_partition    INTEGER NOT NULL,
    log_position     BIGINT NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
COMMENT ON COLUMN tasker_tasks.requested_at IS 'time of task.accepted (when the task came to exist)';
COMMENT ON COLUMN tasker_tasks.completed_at IS 'time the task last reached a terminal status (complete, error, cancelled, resolved_manually)';
COMMENT ON COLUMN tasker_tasks.log_position IS 'position of task.accepted in its log partition';
COMMENT ON COLUMN tasker_tasks.updated_at IS 'time of the latest event applied to the row (log time, not wall time)';
CREATE INDEX tasker_tasks_status ON tasker_tasks (status);
CREATE INDEX tasker_tasks_named_task_completed ON tasker_tasks (named_task_id, completed_at);
CREATE INDEX tasker_tasks_completed_at ON tasker_tasks (completed_at);
CREATE INDEX tasker_tasks_requested_at ON tasker_tasks (requested_at);

CREATE TABLE tasker_workflow_steps (
    task_id                 UUID NOT NULL REFERENCES tasker_tasks (task_id),
    step_index              INTEGER NOT NULL,
    name                    TEXT NOT NULL,
    handler                 TEXT NOT NULL,
    status                  TEXT NOT NULL,
    attempts                INTEGER NOT NULL DEFAULT 0,
    retry_limit             INTEGER NOT NULL,
    retryable               BOOLEAN NOT NULL,
    last_attempted_at       TIMESTAMPTZ,
    last_failure_at         TIMESTAMPTZ,
    next_retry_at           TIMESTAMPTZ,
    backoff_request_seconds INTEGER,
    results                 JSONB,
    error                   JSONB,
    started_at              TIMESTAMPTZ,
    completed_at            TIMESTAMPTZ,
    duration_ms             BIGINT,
    updated_at              TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (task_id, step_index)
);
COMMENT ON COLUMN tasker_workflow_steps.step_index IS 'the step''s index in the task''s template snapshot (topological order)';
COMMENT ON COLUMN tasker_workflow_steps.attempts IS 'attempts started since the step was created or its task last retried';
COMMENT ON COLUMN tasker_workflow_steps.retry_limit IS 'maximum attempts, the first included';
COMMENT ON COLUMN tasker_workflow_steps.next_retry_at IS 'in error: when the next attempt is due, decided by step.failed; NULL when terminal';
COMMENT ON COLUMN tasker_workflow_steps.backoff_request_seconds IS 'Retry-After the handler asked for, if any';
COMMENT ON COLUMN tasker_workflow_steps.completed_at IS 'when the step reached complete, resolved_manually, skipped or cancelled';
COMMENT ON COLUMN tasker_workflow_steps.duration_ms IS 'completed_at - started_at of the attempt that completed (execution time)';
CREATE INDEX tasker_workflow_steps_status ON tasker_workflow_steps (status);
CREATE INDEX tasker_workflow_steps_completed_at ON tasker_workflow_steps (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX tasker_workflow_steps_duration ON tasker_workflow_steps (duration_ms DESC) WHERE duration_ms IS NOT NULL;

CREATE TABLE tasker_workflow_step_edges (
    task_id    UUID NOT NULL REFERENCES tasker_tasks (task_id),
    from_step  INTEGER NOT NULL,
    to_step    INTEGER NOT NULL,
    name       TEXT NOT NULL DEFAULT 'provides',
    PRIMARY KEY (task_id, from_step, to_step)
);
COMMENT ON TABLE tasker_workflow_step_edges IS 'the DAG: to_step depends on from_step';
CREATE INDEX tasker_workflow_step_edges_to ON tasker_workflow_step_edges (task_id, to_step);

CREATE TABLE tasker_task_transitions (
    task_id       UUID NOT NULL REFERENCES tasker_tasks (task_id),
    sort_key      BIGINT NOT NULL,
    from_state    TEXT,
    to_state      TEXT NOT NULL,
    most_recent   BOOLEAN NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    metadata      JSONB NOT NULL DEFAULT '{}',
    event_type    TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    log_position  BIGINT NOT NULL,
    PRIMARY KEY (task_id, sort_key)
);
COMMENT ON COLUMN tasker_task_transitions.sort_key IS 'the event''s log position: orders a task''s transitions';
CREATE UNIQUE INDEX tasker_task_transitions_most_recent ON tasker_task_transitions (task_id) WHERE most_recent;
CREATE INDEX tasker_task_transitions_occurred_at ON tasker_task_transitions (occurred_at);

CREATE TABLE tasker_workflow_step_transitions (
    task_id       UUID NOT NULL,
    step_index    INTEGER NOT NULL,
    sort_key      BIGINT NOT NULL,
    from_state    TEXT,
    to_state      TEXT NOT NULL,
    most_recent   BOOLEAN NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    metadata      JSONB NOT NULL DEFAULT '{}',
    event_type    TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    log_position  BIGINT NOT NULL,
    PRIMARY KEY (task_id, step_index, sort_key),
    FOREIGN KEY (task_id, step_index) REFERENCES tasker_workflow_steps (task_id, step_index)
);
COMMENT ON COLUMN tasker_workflow_step_transitions.sort_key IS 'the event''s log position';
CREATE UNIQUE INDEX tasker_workflow_step_transitions_most_recent
    ON tasker_workflow_step_transitions (task_id, step_index) WHERE most_recent;
CREATE INDEX tasker_workflow_step_transitions_occurred_at ON tasker_workflow_step_transitions (occurred_at);

CREATE TABLE tasker_projection_checkpoints (
    projector     TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    position      BIGINT NOT NULL,
    epoch         BIGINT NOT NULL DEFAULT 0,
    events        BIGINT NOT NULL DEFAULT 0,
    last_event_at TIMESTAMPTZ,
    PRIMARY KEY (projector, log_partition)
);
COMMENT ON COLUMN tasker_projection_checkpoints.position IS 'every record before this position is in the read model';
COMMENT ON COLUMN tasker_projection_checkpoints.epoch IS 'highest ownership epoch seen: events of older epochs after it are ignored, as the engine does';
COMMENT ON COLUMN tasker_projection_checkpoints.last_event_at IS 'log time of the last projected event (for lag in seconds)';

-- Times cross the wire as milliseconds since the Unix epoch (the log's unit).
CREATE FUNCTION tasker_ms_to_ts(ms BIGINT) RETURNS TIMESTAMPTZ
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT TIMESTAMPTZ 'epoch' + ms * INTERVAL '1 millisecond' $$;

CREATE FUNCTION tasker_ts_to_ms(ts TIMESTAMPTZ) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT (EXTRACT(EPOCH FROM ts) * 1000)::BIGINT $$;
