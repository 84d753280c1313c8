-- The projector's write path, measured (docs/benchmarks.md, "Read models").
--
-- Foreign keys go: every row a batch inserts or updates fired a row-level
-- referential-integrity trigger that looked up and share-locked its parent row
-- (a task for each step, edge and transition; a step for each step transition),
-- about a third of the write time of a batch. The projector is the only writer
-- and creates parents before children in the same transaction as the events that
-- name them (task.accepted inserts the task, its steps and its edges), so the
-- constraints checked nothing the projector can get wrong without its tests
-- failing. TRUNCATE in `reset` names every table, so it does not need CASCADE.
-- The SQLite store keeps its foreign keys (checks there are plain index lookups).

ALTER TABLE tasker_tasks
    DROP CONSTRAINT tasker_tasks_named_task_id_fkey;
ALTER TABLE tasker_workflow_steps
    DROP CONSTRAINT tasker_workflow_steps_task_id_fkey;
ALTER TABLE tasker_workflow_step_edges
    DROP CONSTRAINT tasker_workflow_step_edges_task_id_fkey;
ALTER TABLE tasker_task_transitions
    DROP CONSTRAINT tasker_task_transitions_task_id_fkey;
ALTER TABLE tasker_workflow_step_transitions
    DROP CONSTRAINT tasker_workflow_step_transitions_task_id_step_index_fkey;
