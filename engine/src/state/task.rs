//! One task's state and the appliers for its events.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ApplyError;
use super::dag::Dag;
use super::step::{StepState, StepStatus};
use crate::record::{CorrelationId, Event, RequestTask, StepId, TaskId, Timestamp};

/// Task states, as in the original Tasker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum TaskStatus {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::InProgress,
        TaskStatus::Complete,
        TaskStatus::Error,
        TaskStatus::Cancelled,
        TaskStatus::ResolvedManually,
    ];

    /// The state machine: `pending -> in_progress -> complete | error`;
    /// `pending | in_progress -> cancelled`; `error -> in_progress` (retry);
    /// `error -> resolved_manually`.
    pub fn can_become(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Pending, InProgress)
                | (Pending, Cancelled)
                | (InProgress, Complete)
                | (InProgress, Error)
                | (InProgress, Cancelled)
                | (Error, InProgress)
                | (Error, ResolvedManually)
        )
    }

    /// Will never change again, so the task may leave memory after retention.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Complete | TaskStatus::Cancelled | TaskStatus::ResolvedManually
        )
    }

    /// Complete, error, cancelled or resolved: nothing runs until someone acts.
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskStatus::Pending | TaskStatus::InProgress)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Complete => "complete",
            TaskStatus::Error => "error",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::ResolvedManually => "resolved_manually",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            TaskStatus::Pending => 0,
            TaskStatus::InProgress => 1,
            TaskStatus::Complete => 2,
            TaskStatus::Error => 3,
            TaskStatus::Cancelled => 4,
            TaskStatus::ResolvedManually => 5,
        }
    }
}

/// One task as the fold knows it.
#[derive(Clone, Debug)]
pub struct TaskState {
    pub id: TaskId,
    pub correlation_id: CorrelationId,
    pub status: TaskStatus,
    pub dag: Arc<Dag>,
    /// The accepted request (context, initiator, tags, idempotency key, ...).
    pub request: Arc<RequestTask>,
    pub steps: Vec<StepState>,
    pub accepted_at: Timestamp,
    pub started_at: Option<Timestamp>,
    /// When the task last reached a terminal status.
    pub finished_at: Option<Timestamp>,
}

impl TaskState {
    /// The state `task.accepted` creates.
    pub fn accepted(
        id: TaskId,
        correlation_id: CorrelationId,
        dag: Arc<Dag>,
        request: Arc<RequestTask>,
        at: Timestamp,
    ) -> Self {
        let steps = vec![StepState::new(); dag.len()];
        TaskState {
            id,
            correlation_id,
            status: TaskStatus::Pending,
            dag,
            request,
            steps,
            accepted_at: at,
            started_at: None,
            finished_at: None,
        }
    }

    pub fn step(&self, id: StepId) -> Option<&StepState> {
        self.steps.get(id.index())
    }

    pub fn step_name(&self, id: StepId) -> &str {
        self.dag
            .snapshot()
            .step(id)
            .map(|s| s.name.as_str())
            .unwrap_or("?")
    }

    /// Every parent of `step` is complete or resolved by hand.
    pub fn parents_satisfied(&self, step: StepId) -> bool {
        self.dag.parents(step).all(|p| {
            self.steps
                .get(p.index())
                .is_some_and(|s| s.status.satisfies_dependents())
        })
    }

    /// The engine's readiness rule, shared with the SQL read model: the task is
    /// pending or in progress, the step is pending (or in error, retryable, attempts
    /// left and backoff elapsed at `now`), and every parent is complete or resolved.
    /// The first attempt is always eligible.
    pub fn is_step_ready(&self, step: StepId, now: Timestamp) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        let (Some(s), Some(spec)) = (self.step(step), self.dag.snapshot().step(step)) else {
            return false;
        };
        let eligible = match s.status {
            StepStatus::Pending => true,
            StepStatus::Error => {
                s.retry_at.is_some_and(|at| now >= at)
                    && spec.retryable
                    && s.attempts < spec.retry_limit.max(1)
            }
            StepStatus::InProgress
            | StepStatus::Complete
            | StepStatus::Skipped
            | StepStatus::Cancelled
            | StepStatus::ResolvedManually => false,
        };
        eligible && self.parents_satisfied(step)
    }

    /// Applies one event of this task. Illegal transitions leave the state untouched.
    pub fn apply(&mut self, event: &Event, at: Timestamp) -> Result<(), ApplyError> {
        match event {
            Event::TaskAccepted(_) => Err(ApplyError::DuplicateTask(self.id)),
            // A rejection changes nothing (the refused command was about this task).
            Event::TaskRejected(_) => Ok(()),
            Event::TaskStarted => {
                self.require(TaskStatus::Pending, TaskStatus::InProgress)?;
                self.transition(TaskStatus::InProgress)?;
                self.started_at.get_or_insert(at);
                Ok(())
            }
            Event::TaskCompleted => self.finish(TaskStatus::Complete, at),
            Event::TaskFailed(_) => self.finish(TaskStatus::Error, at),
            Event::TaskCancelled(_) => self.finish(TaskStatus::Cancelled, at),
            Event::TaskResolvedManually => self.finish(TaskStatus::ResolvedManually, at),
            Event::TaskRetried(_) => {
                self.require(TaskStatus::Error, TaskStatus::InProgress)?;
                self.transition(TaskStatus::InProgress)?;
                self.finished_at = None;
                Ok(())
            }
            Event::StepStarted(e) => {
                let id = self.id;
                let step = self.step_mut(e.step, StepStatus::InProgress)?;
                if e.attempt != step.attempts + 1 {
                    return Err(ApplyError::AttemptMismatch {
                        task: id,
                        step: e.step,
                        expected: step.attempts + 1,
                        got: e.attempt,
                    });
                }
                step.status = StepStatus::InProgress;
                step.attempts = e.attempt;
                step.retry_at = None;
                step.started_at = Some(at);
                Ok(())
            }
            Event::StepCompleted(e) => {
                let id = self.id;
                let step = self.step_mut(e.step, StepStatus::Complete)?;
                check_attempt(id, e.step, step, e.attempt)?;
                step.status = StepStatus::Complete;
                step.result = Some(e.result.clone());
                step.finished_at = Some(at);
                Ok(())
            }
            Event::StepFailed(e) => {
                let id = self.id;
                let step = self.step_mut(e.step, StepStatus::Error)?;
                check_attempt(id, e.step, step, e.attempt)?;
                step.status = StepStatus::Error;
                step.retry_at = e.retry_at;
                step.last_error = Some(Arc::new(e.error.clone()));
                step.last_failure_at = Some(at);
                Ok(())
            }
            Event::StepRetryDue(e) => {
                let step = self.step_mut(e.step, StepStatus::Pending)?;
                step.status = StepStatus::Pending;
                step.retry_at = None;
                if e.reset_attempts {
                    step.attempts = 0;
                }
                Ok(())
            }
            Event::StepSkipped(e) => {
                let step = self.step_mut(e.step, StepStatus::Skipped)?;
                step.status = StepStatus::Skipped;
                step.finished_at = Some(at);
                Ok(())
            }
            Event::StepCancelled(e) => {
                let step = self.step_mut(e.step, StepStatus::Cancelled)?;
                step.status = StepStatus::Cancelled;
                step.finished_at = Some(at);
                Ok(())
            }
            Event::StepResolvedManually(e) => {
                let step = self.step_mut(e.step, StepStatus::ResolvedManually)?;
                step.status = StepStatus::ResolvedManually;
                step.retry_at = None;
                step.result = Some(e.result.clone());
                step.finished_at = Some(at);
                Ok(())
            }
        }
    }

    /// Events that share a target status differ in where they may come from.
    fn require(&self, from: TaskStatus, to: TaskStatus) -> Result<(), ApplyError> {
        if self.status == from {
            Ok(())
        } else {
            Err(ApplyError::IllegalTaskTransition {
                task: self.id,
                from: self.status,
                to,
            })
        }
    }

    fn transition(&mut self, to: TaskStatus) -> Result<(), ApplyError> {
        if !self.status.can_become(to) {
            return Err(ApplyError::IllegalTaskTransition {
                task: self.id,
                from: self.status,
                to,
            });
        }
        self.status = to;
        Ok(())
    }

    fn finish(&mut self, to: TaskStatus, at: Timestamp) -> Result<(), ApplyError> {
        self.transition(to)?;
        self.finished_at = Some(at);
        Ok(())
    }

    /// The step, if it exists and may move to `to`.
    fn step_mut(&mut self, id: StepId, to: StepStatus) -> Result<&mut StepState, ApplyError> {
        let task = self.id;
        let step = self
            .steps
            .get_mut(id.index())
            .ok_or(ApplyError::UnknownStep { task, step: id })?;
        if !step.status.can_become(to) {
            return Err(ApplyError::IllegalStepTransition {
                task,
                step: id,
                from: step.status,
                to,
            });
        }
        Ok(step)
    }
}

fn check_attempt(
    task: TaskId,
    id: StepId,
    step: &StepState,
    attempt: u32,
) -> Result<(), ApplyError> {
    if attempt == step.attempts {
        Ok(())
    } else {
        Err(ApplyError::AttemptMismatch {
            task,
            step: id,
            expected: step.attempts,
            got: attempt,
        })
    }
}
