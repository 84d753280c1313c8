//! Records: ids, the envelope, commands, events, type names. The vocabulary of the log.

mod catalog;
mod command;
mod envelope;
mod event;
mod ids;
mod json;
mod snapshot;
mod to_json;
mod types;

pub use catalog::{COMMON_FIELDS, CatalogEntry, ENGINE_FIELDS, Field, catalog, catalog_markdown};
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
pub use to_json::record_json;
pub use types::{ContentType, Kind, RecordType, UnknownName};
