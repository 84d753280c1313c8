//! The read model's queries and their typed answers: a task and its steps, step
//! readiness, dependency levels, analytics, slowest steps and tasks, health counts
//! and a task's execution context. PostgreSQL answers through the `*_v01` SQL
//! functions of `migrations/0002_functions.sql`; SQLite runs equivalent SQL and
//! gives identical answers (a conformance test compares them). Every query of the
//! read model lives in this module; values are always bound, never formatted in.
//!
//! Times are [`Timestamp`]s (milliseconds since the Unix epoch, the log's unit);
//! every question that depends on "now" takes it as `as_of`, so an answer is a
//! pure function of the log and that time.

use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use tasker_engine::record::{TaskId, Timestamp};
use uuid::Uuid;

use crate::store::{Store, StoreError};

/// A task row with its template's namespace, name and version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    pub task_id: TaskId,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: String,
    pub context: serde_json::Value,
    pub requested_at: Timestamp,
    pub started_at: Option<Timestamp>,
    /// When the task last reached a terminal status.
    pub completed_at: Option<Timestamp>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub correlation_id: Uuid,
    pub log_partition: u32,
    /// Position of `task.accepted` in its partition.
    pub log_position: u64,
    pub updated_at: Timestamp,
}

/// A step row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRow {
    pub task_id: TaskId,
    pub step_index: u32,
    pub name: String,
    pub handler: String,
    pub status: String,
    pub attempts: u32,
    pub retry_limit: u32,
    pub retryable: bool,
    pub last_attempted_at: Option<Timestamp>,
    pub last_failure_at: Option<Timestamp>,
    pub next_retry_at: Option<Timestamp>,
    pub backoff_request_seconds: Option<i64>,
    pub results: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub duration_ms: Option<i64>,
    pub updated_at: Timestamp,
}

/// One step's readiness (`get_step_readiness_status_v01`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepReadiness {
    pub task_id: TaskId,
    pub step_index: u32,
    pub name: String,
    pub current_state: String,
    /// Every parent is complete or resolved_manually.
    pub dependencies_satisfied: bool,
    /// The step itself may make an attempt at `as_of`: pending, or in error,
    /// retryable, with attempts left and its backoff elapsed.
    pub retry_eligible: bool,
    /// The engine's readiness: the task is pending or in progress, the step is
    /// retry-eligible and its dependencies are satisfied.
    pub ready_for_execution: bool,
    pub last_failure_at: Option<Timestamp>,
    pub next_retry_at: Option<Timestamp>,
    pub total_parents: u32,
    pub completed_parents: u32,
    pub attempts: u32,
    pub retry_limit: u32,
    pub backoff_request_seconds: Option<i64>,
    pub last_attempted_at: Option<Timestamp>,
}

/// A step's depth in its task's DAG (`calculate_dependency_levels_v01`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DependencyLevel {
    pub step_index: u32,
    pub name: String,
    /// 0 for roots, else the length of the longest path from a root.
    pub level: u32,
}

/// System analytics (`get_analytics_metrics_v01`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalyticsMetrics {
    /// Tasks pending or in progress.
    pub active_tasks_count: u64,
    /// Namespaces with at least one task.
    pub total_namespaces_count: u64,
    /// Distinct (namespace, name) with at least one task.
    pub unique_task_types_count: u64,
    /// complete / (complete + error) over the tasks requested in the hour before
    /// `as_of`, 3 decimals; 1.0 when there are none.
    pub system_health_score: f64,
    /// Tasks requested in (since, as_of].
    pub task_throughput: u64,
    pub completion_count: u64,
    pub error_count: u64,
    /// Percent of the period's tasks, 2 decimals.
    pub completion_rate: f64,
    pub error_rate: f64,
    /// Steps whose latest attempt ended in (since, as_of]: complete ones by
    /// `completed_at`, ones in error by `last_failure_at`.
    pub step_throughput: u64,
    /// complete / (complete + error) over those steps, 3 decimals; 1.0 when none.
    pub step_success_rate: f64,
    /// Over the period's complete tasks (requested -> completed), whole ms.
    pub avg_task_duration_ms: Option<i64>,
    /// Execution time over the period's complete steps, whole ms.
    pub avg_step_duration_ms: Option<i64>,
    pub period_start: Timestamp,
    pub calculated_at: Timestamp,
}

/// Which steps or tasks the slowest-queries consider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlowestFilter {
    /// Only those finished after this time (`None`: all).
    pub since: Option<Timestamp>,
    pub limit: u32,
    pub namespace: Option<String>,
    pub task_name: Option<String>,
    pub version: Option<String>,
}

impl Default for SlowestFilter {
    fn default() -> Self {
        SlowestFilter {
            since: None,
            limit: 10,
            namespace: None,
            task_name: None,
            version: None,
        }
    }
}

/// One of the slowest completed steps (`get_slowest_steps_v01`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlowStep {
    pub task_id: TaskId,
    pub step_index: u32,
    pub step_name: String,
    pub namespace: String,
    pub task_name: String,
    pub version: String,
    /// Execution time of the attempt that completed.
    pub duration_ms: i64,
    pub attempts: u32,
    pub retry_limit: u32,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
}

/// One of the slowest finished tasks (`get_slowest_tasks_v01`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlowTask {
    pub task_id: TaskId,
    pub namespace: String,
    pub task_name: String,
    pub version: String,
    pub status: String,
    /// requested_at -> completed_at.
    pub duration_ms: i64,
    pub step_count: u64,
    pub completed_steps: u64,
    pub error_steps: u64,
    pub requested_at: Timestamp,
    pub completed_at: Timestamp,
    pub initiator: Option<String>,
}

/// Counts by status and retry situation (`get_system_health_counts_v01`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCounts {
    pub total_tasks: u64,
    pub pending_tasks: u64,
    pub in_progress_tasks: u64,
    pub complete_tasks: u64,
    pub error_tasks: u64,
    pub cancelled_tasks: u64,
    pub resolved_manually_tasks: u64,
    pub total_steps: u64,
    pub pending_steps: u64,
    pub in_progress_steps: u64,
    pub complete_steps: u64,
    pub error_steps: u64,
    pub skipped_steps: u64,
    pub cancelled_steps: u64,
    pub resolved_manually_steps: u64,
    /// In error with a retry scheduled (retryable, attempts left, next_retry_at set).
    pub retryable_error_steps: u64,
    /// In error with attempts >= retry_limit.
    pub exhausted_retry_steps: u64,
    /// In error with next_retry_at after `as_of`.
    pub in_backoff_steps: u64,
}

/// One task's execution context (`get_task_execution_context_v01`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutionContext {
    pub task_id: TaskId,
    pub namespace: String,
    pub task_name: String,
    pub status: String,
    pub total_steps: u64,
    pub pending_steps: u64,
    pub in_progress_steps: u64,
    /// Complete, resolved_manually or skipped.
    pub completed_steps: u64,
    /// In error (awaiting a retry or not).
    pub failed_steps: u64,
    pub ready_steps: u64,
    /// has_ready_steps | processing | blocked_by_failures | all_complete |
    /// waiting_for_dependencies.
    pub execution_status: String,
    /// execute_ready_steps | wait_for_completion | handle_failures |
    /// finalize_task | wait_for_dependencies.
    pub recommended_action: String,
    /// completed_steps / total_steps in percent, 2 decimals.
    pub completion_percentage: f64,
    /// healthy | recovering | blocked | unknown.
    pub health_status: String,
}

// ---------------------------------------------------------------------------
// Columns: one decoding per result type for both databases
// ---------------------------------------------------------------------------

fn unexpected_null(col: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: "unexpected NULL".into(),
    }
}

fn bad_value(col: &str, e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: Box::new(e),
    }
}

/// The column types a result needs, read the same way from either database.
trait Columns {
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error>;
    fn real(&self, col: &str) -> Result<f64, sqlx::Error>;
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error>;

    fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
        self.opt_int(col)?.ok_or_else(|| unexpected_null(col))
    }
    fn count(&self, col: &str) -> Result<u64, sqlx::Error> {
        u64::try_from(self.int(col)?).map_err(|e| bad_value(col, e))
    }
    fn small(&self, col: &str) -> Result<u32, sqlx::Error> {
        u32::try_from(self.int(col)?).map_err(|e| bad_value(col, e))
    }
    fn text(&self, col: &str) -> Result<String, sqlx::Error> {
        self.opt_text(col)?.ok_or_else(|| unexpected_null(col))
    }
    fn opt_time(&self, col: &str) -> Result<Option<Timestamp>, sqlx::Error> {
        self.opt_int(col)?
            .map(|ms| u64::try_from(ms).map(Timestamp::from_millis))
            .transpose()
            .map_err(|e| bad_value(col, e))
    }
    fn time(&self, col: &str) -> Result<Timestamp, sqlx::Error> {
        self.opt_time(col)?.ok_or_else(|| unexpected_null(col))
    }
    fn task_id(&self, col: &str) -> Result<TaskId, sqlx::Error> {
        self.uuid(col).map(TaskId::from_uuid)
    }
    fn opt_json(&self, col: &str) -> Result<Option<serde_json::Value>, sqlx::Error> {
        self.opt_text(col)?
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| bad_value(col, e))
    }
    fn json(&self, col: &str) -> Result<serde_json::Value, sqlx::Error> {
        self.opt_json(col)?.ok_or_else(|| unexpected_null(col))
    }
}

impl Columns for PgRow {
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        // BIGINT, or INTEGER columns of the tables.
        match self.try_get::<Option<i64>, _>(col) {
            Ok(v) => Ok(v),
            Err(_) => Ok(self.try_get::<Option<i32>, _>(col)?.map(i64::from)),
        }
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(col)
    }
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
        self.try_get(col)
    }
    fn real(&self, col: &str) -> Result<f64, sqlx::Error> {
        self.try_get(col)
    }
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        self.try_get(col)
    }
}

impl Columns for SqliteRow {
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(col)
    }
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
        self.try_get(col)
    }
    fn real(&self, col: &str) -> Result<f64, sqlx::Error> {
        self.try_get(col)
    }
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        let text: String = self.try_get(col)?;
        text.parse().map_err(|e| bad_value(col, e))
    }
}

impl TaskRow {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        let tags = r.json("tags")?;
        Ok(TaskRow {
            task_id: r.task_id("task_id")?,
            namespace: r.text("namespace")?,
            name: r.text("name")?,
            version: r.text("version")?,
            status: r.text("status")?,
            context: r.json("context")?,
            requested_at: r.time("requested_at")?,
            started_at: r.opt_time("started_at")?,
            completed_at: r.opt_time("completed_at")?,
            initiator: r.opt_text("initiator")?,
            source_system: r.opt_text("source_system")?,
            reason: r.opt_text("reason")?,
            tags: serde_json::from_value(tags).map_err(|e| bad_value("tags", e))?,
            idempotency_key: r.opt_text("idempotency_key")?,
            correlation_id: r.uuid("correlation_id")?,
            log_partition: r.small("log_partition")?,
            log_position: r.count("log_position")?,
            updated_at: r.time("updated_at")?,
        })
    }
}

impl StepRow {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(StepRow {
            task_id: r.task_id("task_id")?,
            step_index: r.small("step_index")?,
            name: r.text("name")?,
            handler: r.text("handler")?,
            status: r.text("status")?,
            attempts: r.small("attempts")?,
            retry_limit: r.small("retry_limit")?,
            retryable: r.flag("retryable")?,
            last_attempted_at: r.opt_time("last_attempted_at")?,
            last_failure_at: r.opt_time("last_failure_at")?,
            next_retry_at: r.opt_time("next_retry_at")?,
            backoff_request_seconds: r.opt_int("backoff_request_seconds")?,
            results: r.opt_json("results")?,
            error: r.opt_json("error")?,
            started_at: r.opt_time("started_at")?,
            completed_at: r.opt_time("completed_at")?,
            duration_ms: r.opt_int("duration_ms")?,
            updated_at: r.time("updated_at")?,
        })
    }
}

impl StepReadiness {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(StepReadiness {
            task_id: r.task_id("task_id")?,
            step_index: r.small("step_index")?,
            name: r.text("name")?,
            current_state: r.text("current_state")?,
            dependencies_satisfied: r.flag("dependencies_satisfied")?,
            retry_eligible: r.flag("retry_eligible")?,
            ready_for_execution: r.flag("ready_for_execution")?,
            last_failure_at: r.opt_time("last_failure_at")?,
            next_retry_at: r.opt_time("next_retry_at")?,
            total_parents: r.small("total_parents")?,
            completed_parents: r.small("completed_parents")?,
            attempts: r.small("attempts")?,
            retry_limit: r.small("retry_limit")?,
            backoff_request_seconds: r.opt_int("backoff_request_seconds")?,
            last_attempted_at: r.opt_time("last_attempted_at")?,
        })
    }
}

impl DependencyLevel {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(DependencyLevel {
            step_index: r.small("step_index")?,
            name: r.text("name")?,
            level: r.small("level")?,
        })
    }
}

impl AnalyticsMetrics {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(AnalyticsMetrics {
            active_tasks_count: r.count("active_tasks_count")?,
            total_namespaces_count: r.count("total_namespaces_count")?,
            unique_task_types_count: r.count("unique_task_types_count")?,
            system_health_score: r.real("system_health_score")?,
            task_throughput: r.count("task_throughput")?,
            completion_count: r.count("completion_count")?,
            error_count: r.count("error_count")?,
            completion_rate: r.real("completion_rate")?,
            error_rate: r.real("error_rate")?,
            step_throughput: r.count("step_throughput")?,
            step_success_rate: r.real("step_success_rate")?,
            avg_task_duration_ms: r.opt_int("avg_task_duration_ms")?,
            avg_step_duration_ms: r.opt_int("avg_step_duration_ms")?,
            period_start: r.time("period_start")?,
            calculated_at: r.time("calculated_at")?,
        })
    }
}

impl SlowStep {
    fn from_row(r: &(impl Columns + ?Sized)) -> Result<Self, sqlx::Error> {
        Ok(SlowStep {
            task_id: r.task_id("task_id")?,
            step_index: r.small("step_index")?,
            step_name: r.text("step_name")?,
            namespace: r.text("namespace")?,
            task_name: r.text("task_name")?,
            version: r.text("version")?,
            duration_ms: r.int("duration_ms")?,
            attempts: r.small("attempts")?,
            retry_limit: r.small("retry_limit")?,
            started_at: r.opt_time("started_at")?,
            completed_at: r.opt_time("completed_at")?,
        })
    }
}

impl SlowTask {
    fn from_row(r: &(impl Columns + ?Sized)) -> Result<Self, sqlx::Error> {
        Ok(SlowTask {
            task_id: r.task_id("task_id")?,
            namespace: r.text("namespace")?,
            task_name: r.text("task_name")?,
            version: r.text("version")?,
            status: r.text("status")?,
            duration_ms: r.int("duration_ms")?,
            step_count: r.count("step_count")?,
            completed_steps: r.count("completed_steps")?,
            error_steps: r.count("error_steps")?,
            requested_at: r.time("requested_at")?,
            completed_at: r.time("completed_at")?,
            initiator: r.opt_text("initiator")?,
        })
    }
}

impl HealthCounts {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(HealthCounts {
            total_tasks: r.count("total_tasks")?,
            pending_tasks: r.count("pending_tasks")?,
            in_progress_tasks: r.count("in_progress_tasks")?,
            complete_tasks: r.count("complete_tasks")?,
            error_tasks: r.count("error_tasks")?,
            cancelled_tasks: r.count("cancelled_tasks")?,
            resolved_manually_tasks: r.count("resolved_manually_tasks")?,
            total_steps: r.count("total_steps")?,
            pending_steps: r.count("pending_steps")?,
            in_progress_steps: r.count("in_progress_steps")?,
            complete_steps: r.count("complete_steps")?,
            error_steps: r.count("error_steps")?,
            skipped_steps: r.count("skipped_steps")?,
            cancelled_steps: r.count("cancelled_steps")?,
            resolved_manually_steps: r.count("resolved_manually_steps")?,
            retryable_error_steps: r.count("retryable_error_steps")?,
            exhausted_retry_steps: r.count("exhausted_retry_steps")?,
            in_backoff_steps: r.count("in_backoff_steps")?,
        })
    }
}

impl ExecutionContext {
    fn from_row(r: &impl Columns) -> Result<Self, sqlx::Error> {
        Ok(ExecutionContext {
            task_id: r.task_id("task_id")?,
            namespace: r.text("namespace")?,
            task_name: r.text("task_name")?,
            status: r.text("status")?,
            total_steps: r.count("total_steps")?,
            pending_steps: r.count("pending_steps")?,
            in_progress_steps: r.count("in_progress_steps")?,
            completed_steps: r.count("completed_steps")?,
            failed_steps: r.count("failed_steps")?,
            ready_steps: r.count("ready_steps")?,
            execution_status: r.text("execution_status")?,
            recommended_action: r.text("recommended_action")?,
            completion_percentage: r.real("completion_percentage")?,
            health_status: r.text("health_status")?,
        })
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis() as i64
}

fn collect<R, T>(
    rows: &[R],
    f: impl Fn(&R) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(|r| f(r).map_err(StoreError::from))
        .collect()
}

// ---------------------------------------------------------------------------
// PostgreSQL: the SQL functions, times converted at the boundary (inline: see
// the note in `postgres.rs` on `tasker_ms_to_ts` / `tasker_ts_to_ms`)
// ---------------------------------------------------------------------------

const PG_TASK: &str = "
    SELECT t.task_id, n.name AS namespace, nt.name, nt.version, t.status, t.context::text AS context,
           (EXTRACT(EPOCH FROM t.requested_at) * 1000)::BIGINT AS requested_at, (EXTRACT(EPOCH FROM t.started_at) * 1000)::BIGINT AS started_at,
           (EXTRACT(EPOCH FROM t.completed_at) * 1000)::BIGINT AS completed_at, t.initiator, t.source_system, t.reason,
           t.tags::text AS tags, t.idempotency_key, t.correlation_id, t.log_partition, t.log_position,
           (EXTRACT(EPOCH FROM t.updated_at) * 1000)::BIGINT AS updated_at
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE t.task_id = $1";

const PG_STEPS: &str = "
    SELECT s.task_id, s.step_index, s.name, s.handler, s.status, s.attempts, s.retry_limit, s.retryable,
           (EXTRACT(EPOCH FROM s.last_attempted_at) * 1000)::BIGINT AS last_attempted_at,
           (EXTRACT(EPOCH FROM s.last_failure_at) * 1000)::BIGINT AS last_failure_at,
           (EXTRACT(EPOCH FROM s.next_retry_at) * 1000)::BIGINT AS next_retry_at, s.backoff_request_seconds,
           s.results::text AS results, s.error::text AS error,
           (EXTRACT(EPOCH FROM s.started_at) * 1000)::BIGINT AS started_at, (EXTRACT(EPOCH FROM s.completed_at) * 1000)::BIGINT AS completed_at,
           s.duration_ms, (EXTRACT(EPOCH FROM s.updated_at) * 1000)::BIGINT AS updated_at
    FROM tasker_workflow_steps s
    WHERE s.task_id = $1
    ORDER BY s.step_index";

const PG_READINESS: &str = "
    SELECT r.task_id, r.step_index, r.name, r.current_state, r.dependencies_satisfied,
           r.retry_eligible, r.ready_for_execution,
           (EXTRACT(EPOCH FROM r.last_failure_at) * 1000)::BIGINT AS last_failure_at,
           (EXTRACT(EPOCH FROM r.next_retry_at) * 1000)::BIGINT AS next_retry_at,
           r.total_parents, r.completed_parents, r.attempts, r.retry_limit,
           r.backoff_request_seconds, (EXTRACT(EPOCH FROM r.last_attempted_at) * 1000)::BIGINT AS last_attempted_at
    FROM get_step_readiness_status_v01($1::uuid[], (TIMESTAMPTZ 'epoch' + ($2)::BIGINT * INTERVAL '1 millisecond')) r
    ORDER BY r.task_id, r.step_index";

const PG_LEVELS: &str = "
    SELECT l.step_index, l.name, l.level
    FROM calculate_dependency_levels_v01($1) l
    ORDER BY l.level, l.step_index";

const PG_ANALYTICS: &str = "
    SELECT a.active_tasks_count, a.total_namespaces_count, a.unique_task_types_count,
           a.system_health_score, a.task_throughput, a.completion_count, a.error_count,
           a.completion_rate, a.error_rate, a.step_throughput, a.step_success_rate,
           a.avg_task_duration_ms, a.avg_step_duration_ms,
           (EXTRACT(EPOCH FROM a.period_start) * 1000)::BIGINT AS period_start,
           (EXTRACT(EPOCH FROM a.calculated_at) * 1000)::BIGINT AS calculated_at
    FROM get_analytics_metrics_v01((TIMESTAMPTZ 'epoch' + ($1)::BIGINT * INTERVAL '1 millisecond'), (TIMESTAMPTZ 'epoch' + ($2)::BIGINT * INTERVAL '1 millisecond')) a";

const PG_SLOWEST_STEPS: &str = "
    SELECT s.task_id, s.step_index, s.step_name, s.namespace, s.task_name, s.version,
           s.duration_ms, s.attempts, s.retry_limit,
           (EXTRACT(EPOCH FROM s.started_at) * 1000)::BIGINT AS started_at, (EXTRACT(EPOCH FROM s.completed_at) * 1000)::BIGINT AS completed_at
    FROM get_slowest_steps_v01((TIMESTAMPTZ 'epoch' + ($1)::BIGINT * INTERVAL '1 millisecond'), $2, $3, $4, $5) s
    ORDER BY s.duration_ms DESC, s.task_id, s.step_index";

const PG_SLOWEST_TASKS: &str = "
    SELECT s.task_id, s.namespace, s.task_name, s.version, s.status, s.duration_ms, s.step_count,
           s.completed_steps, s.error_steps, (EXTRACT(EPOCH FROM s.requested_at) * 1000)::BIGINT AS requested_at,
           (EXTRACT(EPOCH FROM s.completed_at) * 1000)::BIGINT AS completed_at, s.initiator
    FROM get_slowest_tasks_v01((TIMESTAMPTZ 'epoch' + ($1)::BIGINT * INTERVAL '1 millisecond'), $2, $3, $4, $5) s
    ORDER BY s.duration_ms DESC, s.task_id";

const PG_HEALTH: &str = "SELECT h.* FROM get_system_health_counts_v01((TIMESTAMPTZ 'epoch' + ($1)::BIGINT * INTERVAL '1 millisecond')) h";

const PG_CONTEXT: &str = "
    SELECT c.* FROM get_task_execution_context_v01($1, (TIMESTAMPTZ 'epoch' + ($2)::BIGINT * INTERVAL '1 millisecond')) c";

// ---------------------------------------------------------------------------
// SQLite: the same questions in SQLite's dialect (times are INTEGER ms)
// ---------------------------------------------------------------------------

const LITE_TASK: &str = "
    SELECT t.task_id, n.name AS namespace, nt.name, nt.version, t.status, t.context,
           t.requested_at, t.started_at, t.completed_at, t.initiator, t.source_system, t.reason,
           t.tags, t.idempotency_key, t.correlation_id, t.log_partition, t.log_position, t.updated_at
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE t.task_id = ?1";

const LITE_STEPS: &str = "
    SELECT s.task_id, s.step_index, s.name, s.handler, s.status, s.attempts, s.retry_limit,
           s.retryable, s.last_attempted_at, s.last_failure_at, s.next_retry_at,
           s.backoff_request_seconds, s.results, s.error, s.started_at, s.completed_at,
           s.duration_ms, s.updated_at
    FROM tasker_workflow_steps s
    WHERE s.task_id = ?1
    ORDER BY s.step_index";

/// `get_step_readiness_status_v01` as a CTE named `readiness`: the tasks are the
/// JSON array bound to `?1`, `as_of` is `?2`. (A macro, so queries can `concat!`
/// it into their `&'static str`.)
macro_rules! lite_readiness_cte {
    () => {
        "readiness_base AS (
            SELECT s.task_id, s.step_index, s.name, s.status, s.attempts, s.retry_limit,
                   s.last_failure_at, s.next_retry_at, s.backoff_request_seconds,
                   s.last_attempted_at, t.status AS task_status,
                   (SELECT count(*) FROM tasker_workflow_step_edges e
                    WHERE e.task_id = s.task_id AND e.to_step = s.step_index) AS total_parents,
                   (SELECT count(*) FROM tasker_workflow_step_edges e
                    JOIN tasker_workflow_steps p ON p.task_id = e.task_id AND p.step_index = e.from_step
                    WHERE e.task_id = s.task_id AND e.to_step = s.step_index
                      AND p.status IN ('complete', 'resolved_manually')) AS completed_parents,
                   (s.status = 'pending'
                    OR (s.status = 'error' AND s.retryable
                        AND s.attempts < max(s.retry_limit, 1)
                        AND coalesce(s.next_retry_at <= ?2, 0))) AS eligible
            FROM tasker_tasks t
            JOIN tasker_workflow_steps s ON s.task_id = t.task_id
            WHERE t.task_id IN (SELECT value FROM json_each(?1))
        ),
        readiness AS (
            SELECT b.task_id, b.step_index, b.name, b.status AS current_state,
                   b.total_parents = b.completed_parents AS dependencies_satisfied,
                   b.eligible AS retry_eligible,
                   (b.task_status IN ('pending', 'in_progress') AND b.eligible
                    AND b.total_parents = b.completed_parents) AS ready_for_execution,
                   b.last_failure_at, b.next_retry_at, b.total_parents, b.completed_parents,
                   b.attempts, b.retry_limit, b.backoff_request_seconds, b.last_attempted_at
            FROM readiness_base b
        )"
    };
}

const LITE_READINESS: &str = concat!(
    "WITH ",
    lite_readiness_cte!(),
    " SELECT * FROM readiness ORDER BY task_id, step_index"
);

const LITE_LEVELS: &str = "
    WITH RECURSIVE
    bound AS (
        SELECT count(*) AS steps FROM tasker_workflow_steps s WHERE s.task_id = ?1
    ),
    walk (step_index, level) AS (
        SELECT s.step_index, 0
        FROM tasker_workflow_steps s
        WHERE s.task_id = ?1
          AND NOT EXISTS (
              SELECT 1 FROM tasker_workflow_step_edges e
              WHERE e.task_id = s.task_id AND e.to_step = s.step_index)
        UNION
        SELECT e.to_step, w.level + 1
        FROM walk w
        JOIN tasker_workflow_step_edges e ON e.task_id = ?1 AND e.from_step = w.step_index
        JOIN bound b ON w.level < b.steps
    )
    SELECT s.step_index, s.name, max(w.level) AS level
    FROM walk w
    JOIN tasker_workflow_steps s ON s.task_id = ?1 AND s.step_index = w.step_index
    GROUP BY s.step_index, s.name
    ORDER BY level, s.step_index";

const LITE_ANALYTICS: &str = "
    SELECT
        (SELECT count(*) FROM tasker_tasks t WHERE t.status IN ('pending', 'in_progress'))
            AS active_tasks_count,
        (SELECT count(*) FROM tasker_task_namespaces n
         WHERE EXISTS (SELECT 1 FROM tasker_named_tasks nt
                       JOIN tasker_tasks t ON t.named_task_id = nt.named_task_id
                       WHERE nt.task_namespace_id = n.task_namespace_id))
            AS total_namespaces_count,
        (SELECT count(*) FROM (
             SELECT DISTINCT nt.task_namespace_id, nt.name FROM tasker_named_tasks nt
             WHERE EXISTS (SELECT 1 FROM tasker_tasks t WHERE t.named_task_id = nt.named_task_id)
         )) AS unique_task_types_count,
        CASE WHEN r.ok + r.failed > 0
             THEN CAST((r.ok * 2000 + r.ok + r.failed) / (2 * (r.ok + r.failed)) AS REAL) / 1000
             ELSE 1.0 END AS system_health_score,
        k.throughput AS task_throughput, k.completions AS completion_count,
        k.errors AS error_count,
        CASE WHEN k.throughput > 0
             THEN CAST((k.completions * 20000 + k.throughput) / (2 * k.throughput) AS REAL) / 100
             ELSE 0.0 END AS completion_rate,
        CASE WHEN k.throughput > 0
             THEN CAST((k.errors * 20000 + k.throughput) / (2 * k.throughput) AS REAL) / 100
             ELSE 0.0 END AS error_rate,
        c.ok + f.failed AS step_throughput,
        CASE WHEN c.ok + f.failed > 0
             THEN CAST((c.ok * 2000 + c.ok + f.failed) / (2 * (c.ok + f.failed)) AS REAL) / 1000
             ELSE 1.0 END AS step_success_rate,
        CASE WHEN k.completions > 0 THEN (2 * k.span + k.completions) / (2 * k.completions) END
            AS avg_task_duration_ms,
        CASE WHEN c.timed > 0 THEN (2 * c.ms + c.timed) / (2 * c.timed) END
            AS avg_step_duration_ms,
        ?1 AS period_start,
        ?2 AS calculated_at
    FROM (
        SELECT count(*) AS throughput,
               count(*) FILTER (WHERE t.status = 'complete') AS completions,
               count(*) FILTER (WHERE t.status = 'error') AS errors,
               sum(t.completed_at - t.requested_at) FILTER (WHERE t.status = 'complete') AS span
        FROM tasker_tasks t
        WHERE t.requested_at > ?1 AND t.requested_at <= ?2
    ) k
    CROSS JOIN (
        SELECT count(*) AS ok, sum(s.duration_ms) AS ms, count(s.duration_ms) AS timed
        FROM tasker_workflow_steps s
        WHERE s.completed_at > ?1 AND s.completed_at <= ?2 AND s.status = 'complete'
    ) c
    CROSS JOIN (
        SELECT count(*) AS failed
        FROM tasker_workflow_steps s
        WHERE s.status = 'error' AND s.last_failure_at > ?1 AND s.last_failure_at <= ?2
    ) f
    CROSS JOIN (
        SELECT count(*) FILTER (WHERE t.status = 'complete') AS ok,
               count(*) FILTER (WHERE t.status = 'error') AS failed
        FROM tasker_tasks t
        WHERE t.requested_at > ?2 - 3600000 AND t.requested_at <= ?2
    ) r";

const LITE_SLOWEST_STEPS: &str = "
    SELECT s.task_id, s.step_index, s.name AS step_name, n.name AS namespace,
           nt.name AS task_name, nt.version, s.duration_ms, s.attempts, s.retry_limit,
           s.started_at, s.completed_at
    FROM tasker_workflow_steps s
    JOIN tasker_tasks t ON t.task_id = s.task_id
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE s.status = 'complete' AND s.duration_ms IS NOT NULL
      AND (?1 IS NULL OR s.completed_at > ?1)
      AND (?3 IS NULL OR n.name = ?3)
      AND (?4 IS NULL OR nt.name = ?4)
      AND (?5 IS NULL OR nt.version = ?5)
    ORDER BY s.duration_ms DESC, s.task_id, s.step_index
    LIMIT ?2";

const LITE_SLOWEST_TASKS: &str = "
    SELECT top.task_id, top.namespace, top.task_name, top.version, top.status, top.duration_ms,
           (SELECT count(*) FROM tasker_workflow_steps s WHERE s.task_id = top.task_id)
               AS step_count,
           (SELECT count(*) FROM tasker_workflow_steps s
            WHERE s.task_id = top.task_id AND s.status = 'complete') AS completed_steps,
           (SELECT count(*) FROM tasker_workflow_steps s
            WHERE s.task_id = top.task_id AND s.status = 'error') AS error_steps,
           top.requested_at, top.completed_at, top.initiator
    FROM (
        SELECT t.task_id, n.name AS namespace, nt.name AS task_name, nt.version, t.status,
               t.completed_at - t.requested_at AS duration_ms, t.requested_at, t.completed_at,
               t.initiator
        FROM tasker_tasks t
        JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
        WHERE t.completed_at IS NOT NULL
          AND (?1 IS NULL OR t.completed_at > ?1)
          AND (?3 IS NULL OR n.name = ?3)
          AND (?4 IS NULL OR nt.name = ?4)
          AND (?5 IS NULL OR nt.version = ?5)
        ORDER BY t.completed_at - t.requested_at DESC, t.task_id
        LIMIT ?2
    ) top
    ORDER BY top.duration_ms DESC, top.task_id";

const LITE_HEALTH: &str = "
    WITH
    tc AS (SELECT t.status, count(*) AS n FROM tasker_tasks t GROUP BY t.status),
    sc AS (SELECT s.status, count(*) AS n FROM tasker_workflow_steps s GROUP BY s.status)
    SELECT
        (SELECT coalesce(sum(tc.n), 0) FROM tc) AS total_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'pending'), 0) FROM tc)
            AS pending_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'in_progress'), 0) FROM tc)
            AS in_progress_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'complete'), 0) FROM tc)
            AS complete_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'error'), 0) FROM tc) AS error_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'cancelled'), 0) FROM tc)
            AS cancelled_tasks,
        (SELECT coalesce(sum(tc.n) FILTER (WHERE tc.status = 'resolved_manually'), 0) FROM tc)
            AS resolved_manually_tasks,
        (SELECT coalesce(sum(sc.n), 0) FROM sc) AS total_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'pending'), 0) FROM sc)
            AS pending_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'in_progress'), 0) FROM sc)
            AS in_progress_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'complete'), 0) FROM sc)
            AS complete_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'error'), 0) FROM sc) AS error_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'skipped'), 0) FROM sc)
            AS skipped_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'cancelled'), 0) FROM sc)
            AS cancelled_steps,
        (SELECT coalesce(sum(sc.n) FILTER (WHERE sc.status = 'resolved_manually'), 0) FROM sc)
            AS resolved_manually_steps,
        e.retryable AS retryable_error_steps, e.exhausted AS exhausted_retry_steps,
        e.in_backoff AS in_backoff_steps
    FROM (
        SELECT count(*) FILTER (WHERE s.retryable AND s.attempts < max(s.retry_limit, 1)
                                  AND s.next_retry_at IS NOT NULL) AS retryable,
               count(*) FILTER (WHERE s.attempts >= max(s.retry_limit, 1)) AS exhausted,
               count(*) FILTER (WHERE s.next_retry_at > ?1) AS in_backoff
        FROM tasker_workflow_steps s
        WHERE s.status = 'error'
    ) e";

const LITE_CONTEXT: &str = concat!(
    "WITH ",
    lite_readiness_cte!(),
    ",
    a AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE r.current_state = 'pending') AS pending,
               count(*) FILTER (WHERE r.current_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE r.current_state IN ('complete', 'resolved_manually', 'skipped'))
                   AS done,
               count(*) FILTER (WHERE r.current_state = 'error') AS failed,
               count(*) FILTER (WHERE r.ready_for_execution) AS ready,
               count(*) FILTER (WHERE r.current_state = 'error'
                                  AND (r.next_retry_at IS NULL
                                       OR r.attempts >= max(r.retry_limit, 1))) AS blocked
        FROM readiness r
    )
    SELECT t.task_id, n.name AS namespace, nt.name AS task_name, t.status,
           a.total AS total_steps, a.pending AS pending_steps, a.in_progress AS in_progress_steps,
           a.done AS completed_steps, a.failed AS failed_steps, a.ready AS ready_steps,
           CASE WHEN a.ready > 0 THEN 'has_ready_steps'
                WHEN a.in_progress > 0 THEN 'processing'
                WHEN a.blocked > 0 THEN 'blocked_by_failures'
                WHEN a.total > 0 AND a.done = a.total THEN 'all_complete'
                ELSE 'waiting_for_dependencies' END AS execution_status,
           CASE WHEN a.ready > 0 THEN 'execute_ready_steps'
                WHEN a.in_progress > 0 THEN 'wait_for_completion'
                WHEN a.blocked > 0 THEN 'handle_failures'
                WHEN a.total > 0 AND a.done = a.total THEN 'finalize_task'
                ELSE 'wait_for_dependencies' END AS recommended_action,
           CASE WHEN a.total > 0
                THEN CAST((a.done * 20000 + a.total) / (2 * a.total) AS REAL) / 100
                ELSE 0.0 END AS completion_percentage,
           CASE WHEN a.failed = 0 THEN 'healthy'
                WHEN a.ready > 0 THEN 'recovering'
                WHEN a.blocked > 0 THEN 'blocked'
                WHEN a.blocked = 0 THEN 'recovering'
                ELSE 'unknown' END AS health_status
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    CROSS JOIN a
    WHERE t.task_id = ?3"
);

/// The JSON array of task ids SQLite's queries read with `json_each`.
fn id_array(ids: &[TaskId]) -> String {
    serde_json::Value::Array(
        ids.iter()
            .map(|id| serde_json::Value::String(id.to_string()))
            .collect(),
    )
    .to_string()
}

impl Store {
    /// One task row, `None` if the read model has no such task.
    pub async fn task(&self, id: TaskId) -> Result<Option<TaskRow>, StoreError> {
        let row = match self {
            Store::Postgres(s) => sqlx::query(PG_TASK)
                .bind(*id.as_uuid())
                .fetch_optional(s.pool())
                .await?
                .map(|r| TaskRow::from_row(&r)),
            Store::Sqlite(s) => sqlx::query(LITE_TASK)
                .bind(id.to_string())
                .fetch_optional(s.pool())
                .await?
                .map(|r| TaskRow::from_row(&r)),
        };
        Ok(row.transpose()?)
    }

    /// A task's steps, in step order.
    pub async fn steps(&self, id: TaskId) -> Result<Vec<StepRow>, StoreError> {
        match self {
            Store::Postgres(s) => {
                let rows = sqlx::query(PG_STEPS)
                    .bind(*id.as_uuid())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, StepRow::from_row)
            }
            Store::Sqlite(s) => {
                let rows = sqlx::query(LITE_STEPS)
                    .bind(id.to_string())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, StepRow::from_row)
            }
        }
    }

    /// Readiness of every step of `tasks` at `as_of`, by task then step.
    pub async fn readiness(
        &self,
        tasks: &[TaskId],
        as_of: Timestamp,
    ) -> Result<Vec<StepReadiness>, StoreError> {
        match self {
            Store::Postgres(s) => {
                let rows = sqlx::query(PG_READINESS)
                    .bind(tasks.iter().map(|t| *t.as_uuid()).collect::<Vec<_>>())
                    .bind(ms(as_of))
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, StepReadiness::from_row)
            }
            Store::Sqlite(s) => {
                let rows = sqlx::query(LITE_READINESS)
                    .bind(id_array(tasks))
                    .bind(ms(as_of))
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, StepReadiness::from_row)
            }
        }
    }

    /// Every step's level in its task's DAG, by level then step.
    pub async fn dependency_levels(&self, id: TaskId) -> Result<Vec<DependencyLevel>, StoreError> {
        match self {
            Store::Postgres(s) => {
                let rows = sqlx::query(PG_LEVELS)
                    .bind(*id.as_uuid())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, DependencyLevel::from_row)
            }
            Store::Sqlite(s) => {
                let rows = sqlx::query(LITE_LEVELS)
                    .bind(id.to_string())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, DependencyLevel::from_row)
            }
        }
    }

    /// System analytics for the tasks requested and the steps finished in
    /// (`since`, `as_of`].
    pub async fn analytics(
        &self,
        since: Timestamp,
        as_of: Timestamp,
    ) -> Result<AnalyticsMetrics, StoreError> {
        Ok(match self {
            Store::Postgres(s) => AnalyticsMetrics::from_row(
                &sqlx::query(PG_ANALYTICS)
                    .bind(ms(since))
                    .bind(ms(as_of))
                    .fetch_one(s.pool())
                    .await?,
            )?,
            Store::Sqlite(s) => AnalyticsMetrics::from_row(
                &sqlx::query(LITE_ANALYTICS)
                    .bind(ms(since))
                    .bind(ms(as_of))
                    .fetch_one(s.pool())
                    .await?,
            )?,
        })
    }

    /// The slowest completed steps, slowest first.
    pub async fn slowest_steps(&self, f: &SlowestFilter) -> Result<Vec<SlowStep>, StoreError> {
        self.slowest(f, PG_SLOWEST_STEPS, LITE_SLOWEST_STEPS, |r| {
            SlowStep::from_row(r)
        })
        .await
    }

    /// The slowest finished tasks, slowest first.
    pub async fn slowest_tasks(&self, f: &SlowestFilter) -> Result<Vec<SlowTask>, StoreError> {
        self.slowest(f, PG_SLOWEST_TASKS, LITE_SLOWEST_TASKS, |r| {
            SlowTask::from_row(r)
        })
        .await
    }

    /// Runs one of the slowest-* queries: both take (since, limit, namespace, name,
    /// version) in that order.
    async fn slowest<T>(
        &self,
        f: &SlowestFilter,
        pg: &'static str,
        lite: &'static str,
        from_row: fn(&dyn Columns) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, StoreError> {
        match self {
            Store::Postgres(s) => {
                let rows = sqlx::query(pg)
                    .bind(f.since.map(ms))
                    .bind(i32::try_from(f.limit).unwrap_or(i32::MAX))
                    .bind(f.namespace.as_deref())
                    .bind(f.task_name.as_deref())
                    .bind(f.version.as_deref())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, |r| from_row(r))
            }
            Store::Sqlite(s) => {
                let rows = sqlx::query(lite)
                    .bind(f.since.map(ms))
                    .bind(i64::from(f.limit))
                    .bind(f.namespace.as_deref())
                    .bind(f.task_name.as_deref())
                    .bind(f.version.as_deref())
                    .fetch_all(s.pool())
                    .await?;
                collect(&rows, |r| from_row(r))
            }
        }
    }

    /// Tasks and steps by status, and steps by retry situation at `as_of`.
    pub async fn health_counts(&self, as_of: Timestamp) -> Result<HealthCounts, StoreError> {
        Ok(match self {
            Store::Postgres(s) => HealthCounts::from_row(
                &sqlx::query(PG_HEALTH)
                    .bind(ms(as_of))
                    .fetch_one(s.pool())
                    .await?,
            )?,
            Store::Sqlite(s) => HealthCounts::from_row(
                &sqlx::query(LITE_HEALTH)
                    .bind(ms(as_of))
                    .fetch_one(s.pool())
                    .await?,
            )?,
        })
    }

    /// One task's execution context at `as_of`, `None` if there is no such task.
    pub async fn execution_context(
        &self,
        id: TaskId,
        as_of: Timestamp,
    ) -> Result<Option<ExecutionContext>, StoreError> {
        let row = match self {
            Store::Postgres(s) => sqlx::query(PG_CONTEXT)
                .bind(*id.as_uuid())
                .bind(ms(as_of))
                .fetch_optional(s.pool())
                .await?
                .map(|r| ExecutionContext::from_row(&r)),
            Store::Sqlite(s) => sqlx::query(LITE_CONTEXT)
                .bind(id_array(&[id]))
                .bind(ms(as_of))
                .bind(id.to_string())
                .fetch_optional(s.pool())
                .await?
                .map(|r| ExecutionContext::from_row(&r)),
        };
        Ok(row.transpose()?)
    }
}
