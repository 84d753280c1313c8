//! Records: ids, the envelope, commands, events, type names. The vocabulary of the log.

mod command;
mod envelope;
mod event;
mod ids;
mod json;
mod snapshot;
mod types;

pub use command::{
    CancelTask, Command, ReportStepResult, RequestTask, ResolveStep, RetryTask, StepError,
    StepErrorKind, StepOutcome,
};
pub use envelope::{Body, Envelope, SCHEMA_VERSION};
pub use event::{
    Control, Event, PartitionClaimed, RejectReason, StepCancelled, StepCompleted, StepFailed,
    StepResolvedManually, StepRetryDue, StepSkipped, StepStarted, TaskAccepted, TaskCancelled,
    TaskFailed, TaskRejected, TaskRetried,
};
pub use ids::{CorrelationId, Epoch, PartitionId, Position, StepId, TaskId, Timestamp};
pub use json::RawJson;
pub use snapshot::{BackoffSpec, StepSpec, TemplateSnapshot};
pub use types::{ContentType, Kind, RecordType, UnknownName};
