//! One step's state and its transitions.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::{RawJson, StepError, Timestamp};

/// Step states, as in the original Tasker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum StepStatus {
    Pending,
    InProgress,
    Complete,
    Error,
    Skipped,
    Cancelled,
    ResolvedManually,
}

impl StepStatus {
    pub const ALL: [StepStatus; 7] = [
        StepStatus::Pending,
        StepStatus::InProgress,
        StepStatus::Complete,
        StepStatus::Error,
        StepStatus::Skipped,
        StepStatus::Cancelled,
        StepStatus::ResolvedManually,
    ];

    /// The state machine: `pending -> in_progress -> complete | error`,
    /// `error -> pending` (retry due), `pending -> skipped | cancelled`,
    /// `in_progress -> cancelled`, `error -> resolved_manually`.
    pub fn can_become(self, to: StepStatus) -> bool {
        use StepStatus::*;
        matches!(
            (self, to),
            (Pending, InProgress)
                | (Pending, Skipped)
                | (Pending, Cancelled)
                | (InProgress, Complete)
                | (InProgress, Error)
                | (InProgress, Cancelled)
                | (Error, Pending)
                | (Error, ResolvedManually)
        )
    }

    /// Parents in these states let children run.
    pub fn satisfies_dependents(self) -> bool {
        matches!(self, StepStatus::Complete | StepStatus::ResolvedManually)
    }

    /// Finished without blocking the task's completion.
    pub fn is_done_ok(self) -> bool {
        matches!(
            self,
            StepStatus::Complete | StepStatus::Skipped | StepStatus::ResolvedManually
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::InProgress => "in_progress",
            StepStatus::Complete => "complete",
            StepStatus::Error => "error",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
            StepStatus::ResolvedManually => "resolved_manually",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            StepStatus::Pending => 0,
            StepStatus::InProgress => 1,
            StepStatus::Complete => 2,
            StepStatus::Error => 3,
            StepStatus::Skipped => 4,
            StepStatus::Cancelled => 5,
            StepStatus::ResolvedManually => 6,
        }
    }
}

/// One step of one task, as the fold knows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StepState {
    pub status: StepStatus,
    /// Attempts started since the step was created or its task was last retried.
    pub attempts: u32,
    /// In `error`: when the next attempt is due (decided by `step.failed`), or `None`
    /// when the failure is terminal.
    pub retry_at: Option<Timestamp>,
    pub last_error: Option<Arc<StepError>>,
    pub last_failure_at: Option<Timestamp>,
    /// The handler's (or the operator's) result, what children receive.
    pub result: Option<RawJson>,
    /// When the current or last attempt started.
    pub started_at: Option<Timestamp>,
    /// When the step reached complete / resolved / skipped / cancelled.
    pub finished_at: Option<Timestamp>,
}

impl StepState {
    pub fn new() -> Self {
        StepState {
            status: StepStatus::Pending,
            attempts: 0,
            retry_at: None,
            last_error: None,
            last_failure_at: None,
            result: None,
            started_at: None,
            finished_at: None,
        }
    }

    /// In `error` with no further attempt decided.
    pub fn is_terminal_error(&self) -> bool {
        self.status == StepStatus::Error && self.retry_at.is_none()
    }

    /// In `error` and waiting for its backoff to elapse.
    pub fn is_awaiting_retry(&self) -> bool {
        self.status == StepStatus::Error && self.retry_at.is_some()
    }
}

impl Default for StepState {
    fn default() -> Self {
        StepState::new()
    }
}
