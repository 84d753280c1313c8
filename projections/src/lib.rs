//! Tasker's read models. A projector reads events from the log and writes rows
//! (tasks, steps, DAG edges, transitions) into PostgreSQL, or SQLite for the
//! embedded default, in one transaction per batch together with its checkpoint.
//! SQL functions (`migrations/`) answer Tasker's questions: readiness, dependency
//! levels, analytics, slowest steps and tasks, health counts, execution context.

pub mod batch;
pub mod postgres;
pub mod projector;
pub mod read_model;
pub mod sqlite;
pub mod store;

pub use projector::{Progress, ProjectorError, ProjectorOptions, run_partition};
pub use read_model::{
    AnalyticsMetrics, DependencyLevel, ExecutionContext, HealthCounts, SlowStep, SlowTask,
    SlowestFilter, StepReadiness, StepRow, TaskRow,
};
pub use store::{Checkpoint, Store, StoreError};
