//! Commands: requests written to the log by clients, answered by the engine with events.

use serde::{Deserialize, Serialize};

use super::json::RawJson;
use super::types::RecordType;

/// Everything a client can ask of the engine. Variant order is the wire tag: append
/// new variants at the end, never reorder.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Command {
    RequestTask(RequestTask),
    CancelTask(CancelTask),
    RetryTask(RetryTask),
    ResolveStep(ResolveStep),
    ReportStepResult(ReportStepResult),
}

impl Command {
    pub fn record_type(&self) -> RecordType {
        match self {
            Command::RequestTask(_) => RecordType::TaskRequested,
            Command::CancelTask(_) => RecordType::TaskCancelRequested,
            Command::RetryTask(_) => RecordType::TaskRetryRequested,
            Command::ResolveStep(_) => RecordType::StepResolveRequested,
            Command::ReportStepResult(_) => RecordType::StepResultReported,
        }
    }
}

/// `task.requested`: start a task from a template.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub struct RequestTask {
    pub namespace: String,
    pub name: String,
    /// A semver version or requirement; `None` takes the highest installed version.
    pub version: Option<String>,
    pub context: RawJson,
    /// A second request with the same key (per namespace, within retention) is
    /// answered with the first task's id.
    pub idempotency_key: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
}

/// `task.cancel_requested`: stop a pending or running task.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub struct CancelTask {
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// `task.retry_requested`: give the failed steps of a task in `error` fresh attempts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub struct RetryTask {
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// `step.resolve_requested`: an operator settles a failed step by hand.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub struct ResolveStep {
    /// The step's name in the task's template.
    pub step: String,
    /// The result children see in place of the handler's; `None` means `null`.
    pub result: Option<RawJson>,
    pub resolved_by: Option<String>,
    pub reason: Option<String>,
    /// Also skip every step downstream of this one that has not run, so the task
    /// can finish without them.
    pub skip_dependents: bool,
}

/// `step.result_reported`: a remote worker's outcome for one attempt of a step.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ReportStepResult {
    pub step: String,
    pub attempt: u32,
    pub outcome: StepOutcome,
}

/// How one attempt of a step ended, as a handler or remote worker reports it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum StepOutcome {
    Completed { result: RawJson },
    Failed(StepError),
}

/// Why an attempt failed. `retryable` is the handler's verdict; the template's
/// `retryable` and `retry_limit` still decide whether another attempt happens.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct StepError {
    pub kind: StepErrorKind,
    pub message: String,
    /// The handler's Retry-After, which wins over the template's backoff.
    pub retry_after_ms: Option<u64>,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            kind: StepErrorKind::Retryable,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        StepError {
            kind: StepErrorKind::Permanent,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn timeout(after_ms: u64) -> Self {
        StepError {
            kind: StepErrorKind::Timeout,
            message: format!("step timed out after {after_ms} ms"),
            retry_after_ms: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, StepErrorKind::Permanent)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum StepErrorKind {
    Retryable,
    Permanent,
    Timeout,
}

impl StepErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepErrorKind::Retryable => "retryable",
            StepErrorKind::Permanent => "permanent",
            StepErrorKind::Timeout => "timeout",
        }
    }
}
