//! Events: facts the engine appended. The fold applies these and nothing else.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{RequestTask, StepError};
use super::ids::{Epoch, StepId, TaskId, Timestamp};
use super::json::RawJson;
use super::snapshot::TemplateSnapshot;
use super::types::RecordType;

/// Every state change. Variant order is the wire tag: append new variants at the
/// end, never reorder or change a payload (add a new version instead).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Event {
    TaskAccepted(TaskAccepted),
    TaskRejected(TaskRejected),
    TaskStarted,
    StepStarted(StepStarted),
    StepCompleted(StepCompleted),
    StepFailed(StepFailed),
    StepRetryDue(StepRetryDue),
    StepSkipped(StepSkipped),
    StepCancelled(StepCancelled),
    StepResolvedManually(StepResolvedManually),
    TaskCompleted,
    TaskFailed(TaskFailed),
    TaskCancelled(TaskCancelled),
    TaskRetried(TaskRetried),
    TaskResolvedManually,
}

impl Event {
    pub fn record_type(&self) -> RecordType {
        match self {
            Event::TaskAccepted(_) => RecordType::TaskAccepted,
            Event::TaskRejected(_) => RecordType::TaskRejected,
            Event::TaskStarted => RecordType::TaskStarted,
            Event::StepStarted(_) => RecordType::StepStarted,
            Event::StepCompleted(_) => RecordType::StepCompleted,
            Event::StepFailed(_) => RecordType::StepFailed,
            Event::StepRetryDue(_) => RecordType::StepRetryDue,
            Event::StepSkipped(_) => RecordType::StepSkipped,
            Event::StepCancelled(_) => RecordType::StepCancelled,
            Event::StepResolvedManually(_) => RecordType::StepResolvedManually,
            Event::TaskCompleted => RecordType::TaskCompleted,
            Event::TaskFailed(_) => RecordType::TaskFailed,
            Event::TaskCancelled(_) => RecordType::TaskCancelled,
            Event::TaskRetried(_) => RecordType::TaskRetried,
            Event::TaskResolvedManually => RecordType::TaskResolvedManually,
        }
    }

    /// The step this event is about, if any.
    pub fn step(&self) -> Option<StepId> {
        match self {
            Event::StepStarted(e) => Some(e.step),
            Event::StepCompleted(e) => Some(e.step),
            Event::StepFailed(e) => Some(e.step),
            Event::StepRetryDue(e) => Some(e.step),
            Event::StepSkipped(e) => Some(e.step),
            Event::StepCancelled(e) => Some(e.step),
            Event::StepResolvedManually(e) => Some(e.step),
            Event::TaskAccepted(_)
            | Event::TaskRejected(_)
            | Event::TaskStarted
            | Event::TaskCompleted
            | Event::TaskFailed(_)
            | Event::TaskCancelled(_)
            | Event::TaskRetried(_)
            | Event::TaskResolvedManually => None,
        }
    }
}

/// `task.accepted`: the request passed validation; the task exists from here on.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TaskAccepted {
    pub request: RequestTask,
    /// Shared with the registry and the fold (serialized as the snapshot itself).
    pub template: Arc<TemplateSnapshot>,
}

/// `task.rejected`: a command was refused; nothing else changed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TaskRejected {
    /// The refused command's type, `None` when its bytes could not be decoded.
    pub command: Option<RecordType>,
    pub reason: RejectReason,
    pub message: String,
    /// Itemized problems, e.g. one line per JSON Schema violation.
    pub details: Vec<String>,
}

/// Why a command was refused; stable codes for metrics and clients.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum RejectReason {
    Malformed,
    UnsupportedSchema,
    UnknownTemplate,
    UnknownVersion,
    InvalidContext,
    ContextTooLarge,
    DuplicateTask,
    DuplicateIdempotencyKey { existing: TaskId },
    UnknownTask,
    UnknownStep,
    InvalidTransition,
    StaleAttempt,
    WrongPartition,
}

impl RejectReason {
    /// A stable snake_case code for metrics labels and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedSchema => "unsupported_schema",
            RejectReason::UnknownTemplate => "unknown_template",
            RejectReason::UnknownVersion => "unknown_version",
            RejectReason::InvalidContext => "invalid_context",
            RejectReason::ContextTooLarge => "context_too_large",
            RejectReason::DuplicateTask => "duplicate_task",
            RejectReason::DuplicateIdempotencyKey { .. } => "duplicate_idempotency_key",
            RejectReason::UnknownTask => "unknown_task",
            RejectReason::UnknownStep => "unknown_step",
            RejectReason::InvalidTransition => "invalid_transition",
            RejectReason::StaleAttempt => "stale_attempt",
            RejectReason::WrongPartition => "wrong_partition",
        }
    }
}

/// `step.started`: attempt `attempt` (1-based) was handed to a handler.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepStarted {
    pub step: StepId,
    pub attempt: u32,
}

/// `step.completed`: the attempt succeeded with `result`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepCompleted {
    pub step: StepId,
    pub attempt: u32,
    pub result: RawJson,
}

/// `step.failed`: the attempt failed; `retry_at` is when the next attempt is due,
/// decided once here (backoff with jitter), or `None` when the failure is terminal.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepFailed {
    pub step: StepId,
    pub attempt: u32,
    pub error: StepError,
    pub retry_at: Option<Timestamp>,
}

/// `step.retry_due`: the step is pending again, after its backoff elapsed or because
/// an operator retried the task (`reset_attempts`: the attempt count starts over).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepRetryDue {
    pub step: StepId,
    pub reset_attempts: bool,
}

/// `step.skipped`: the step will never run because its task finished without it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepSkipped {
    pub step: StepId,
    pub reason: String,
}

/// `step.cancelled`: the step's task was cancelled before the step finished.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepCancelled {
    pub step: StepId,
}

/// `step.resolved_manually`: an operator settled a failed step.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepResolvedManually {
    pub step: StepId,
    pub result: RawJson,
    pub resolved_by: Option<String>,
    pub reason: Option<String>,
}

/// `task.failed`: a step failed terminally and nothing else can run.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TaskFailed {
    pub failed_steps: Vec<StepId>,
}

/// `task.cancelled`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TaskCancelled {
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// `task.retried`: a task in `error` runs again, because an operator retried it or
/// resolved a step that unblocks others.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TaskRetried {
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// Records that are about the log itself rather than a task.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Control {
    /// A writer took the partition; events of lower epochs written after this are void.
    PartitionClaimed(PartitionClaimed),
}

impl Control {
    pub fn record_type(&self) -> RecordType {
        match self {
            Control::PartitionClaimed(_) => RecordType::PartitionClaimed,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct PartitionClaimed {
    pub epoch: Epoch,
    /// Who claimed it (host and process), for operators.
    pub owner: String,
}
