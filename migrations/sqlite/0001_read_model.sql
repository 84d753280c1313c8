-- The read model for the embedded SQLite store: the same tables and columns as
-- the PostgreSQL one (../0001_read_model.sql). Differences of representation:
-- times are INTEGER milliseconds since the Unix epoch, UUIDs and JSON are TEXT,
-- booleans are INTEGER 0/1.

CREATE TABLE tasker_task_namespaces (
    task_namespace_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL UNIQUE,
    created_at        INTEGER NOT NULL
);

CREATE TABLE tasker_named_tasks (
    named_task_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    task_namespace_id INTEGER NOT NULL REFERENCES tasker_task_namespaces (task_namespace_id),
    name              TEXT NOT NULL,
    version           TEXT NOT NULL,
    template          TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    UNIQUE (task_namespace_id, name, version)
);

CREATE TABLE tasker_tasks (
    task_id          TEXT PRIMARY KEY,
    named_task_id    INTEGER NOT NULL REFERENCES tasker_named_tasks (named_task_id),
    status           TEXT NOT NULL,
    context          TEXT NOT NULL,
    requested_at     INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    initiator        TEXT,
    source_system    TEXT,
    reason           TEXT,
    tags             TEXT NOT NULL DEFAULT '[]',
    idempotency_key  TEXT,
    correlation_id   TEXT NOT NULL,
    log_partition    INTEGER NOT NULL,
    log_position     INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX tasker_tasks_status ON tasker_tasks (status);
CREATE INDEX tasker_tasks_named_task_completed ON tasker_tasks (named_task_id, completed_at);
CREATE INDEX tasker_tasks_completed_at ON tasker_tasks (completed_at);
CREATE INDEX tasker_tasks_requested_at ON tasker_tasks (requested_at);

CREATE TABLE tasker_workflow_steps (
    task_id                 TEXT NOT NULL REFERENCES tasker_tasks (task_id),
    step_index              INTEGER NOT NULL,
    name                    TEXT NOT NULL,
    handler                 TEXT NOT NULL,
    status                  TEXT NOT NULL,
    attempts                INTEGER NOT NULL DEFAULT 0,
    retry_limit             INTEGER NOT NULL,
    retryable               INTEGER NOT NULL,
    last_attempted_at       INTEGER,
    last_failure_at         INTEGER,
    next_retry_at           INTEGER,
    backoff_request_seconds INTEGER,
    results                 TEXT,
    error                   TEXT,
    started_at              INTEGER,
    completed_at            INTEGER,
    duration_ms             INTEGER,
    updated_at              INTEGER NOT NULL,
    PRIMARY KEY (task_id, step_index)
);
CREATE INDEX tasker_workflow_steps_status ON tasker_workflow_steps (status);
CREATE INDEX tasker_workflow_steps_completed_at ON tasker_workflow_steps (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX tasker_workflow_steps_duration ON tasker_workflow_steps (duration_ms DESC) WHERE duration_ms IS NOT NULL;

CREATE TABLE tasker_workflow_step_edges (
    task_id    TEXT NOT NULL REFERENCES tasker_tasks (task_id),
    from_step  INTEGER NOT NULL,
    to_step    INTEGER NOT NULL,
    name       TEXT NOT NULL DEFAULT 'provides',
    PRIMARY KEY (task_id, from_step, to_step)
);
CREATE INDEX tasker_workflow_step_edges_to ON tasker_workflow_step_edges (task_id, to_step);

CREATE TABLE tasker_task_transitions (
    task_id       TEXT NOT NULL REFERENCES tasker_tasks (task_id),
    sort_key      INTEGER NOT NULL,
    from_state    TEXT,
    to_state      TEXT NOT NULL,
    most_recent   INTEGER NOT NULL,
    occurred_at   INTEGER NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    event_type    TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    log_position  INTEGER NOT NULL,
    PRIMARY KEY (task_id, sort_key)
);
CREATE UNIQUE INDEX tasker_task_transitions_most_recent ON tasker_task_transitions (task_id) WHERE most_recent;
CREATE INDEX tasker_task_transitions_occurred_at ON tasker_task_transitions (occurred_at);

CREATE TABLE tasker_workflow_step_transitions (
    task_id       TEXT NOT NULL,
    step_index    INTEGER NOT NULL,
    sort_key      INTEGER NOT NULL,
    from_state    TEXT,
    to_state      TEXT NOT NULL,
    most_recent   INTEGER NOT NULL,
    occurred_at   INTEGER NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    event_type    TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    log_position  INTEGER NOT NULL,
    PRIMARY KEY (task_id, step_index, sort_key),
    FOREIGN KEY (task_id, step_index) REFERENCES tasker_workflow_steps (task_id, step_index)
);
CREATE UNIQUE INDEX tasker_workflow_step_transitions_most_recent
    ON tasker_workflow_step_transitions (task_id, step_index) WHERE most_recent;
CREATE INDEX tasker_workflow_step_transitions_occurred_at ON tasker_workflow_step_transitions (occurred_at);

CREATE TABLE tasker_projection_checkpoints (
    projector     TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    epoch         INTEGER NOT NULL DEFAULT 0,
    events        INTEGER NOT NULL DEFAULT 0,
    last_event_at INTEGER,
    PRIMARY KEY (projector, log_partition)
);
