-- Indexes the read-model queries need, as in ../0002_functions.sql (the
-- questions themselves are SQL in projections/src/read_model.rs: SQLite has no
-- stored functions).

-- Slowest finished tasks first (times are INTEGER ms here).
CREATE INDEX tasker_tasks_duration ON tasker_tasks ((completed_at - requested_at) DESC, task_id)
    WHERE completed_at IS NOT NULL;
-- Steps that failed in a period (analytics).
CREATE INDEX tasker_workflow_steps_failed_at ON tasker_workflow_steps (last_failure_at)
    WHERE status = 'error';
