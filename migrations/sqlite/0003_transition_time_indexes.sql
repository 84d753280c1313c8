-- As ../0004_transition_time_indexes.sql: no query reads transitions by time.
DROP INDEX tasker_task_transitions_occurred_at;
DROP INDEX tasker_workflow_step_transitions_occurred_at;
