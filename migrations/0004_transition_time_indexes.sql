-- The transitions' occurred_at indexes go: no query reads transitions by time
-- (history is read per task, by primary key), and maintaining them was about a
-- sixth of the projector's write time (every event inserts a transition).
-- Recreate them in a later migration if a query starts filtering on time.
DROP INDEX tasker_task_transitions_occurred_at;
DROP INDEX tasker_workflow_step_transitions_occurred_at;
