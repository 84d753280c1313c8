//! `/v1/analytics`: system performance over a period and the slowest steps and
//! tasks (bottlenecks), answered by the read model's SQL functions.

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};
use tasker_engine::record::Timestamp;
use tasker_projections::{AnalyticsMetrics, SlowStep, SlowTask, SlowestFilter};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Permission, Principal};
use super::problem::{ApiQuery, Problem};

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PerformanceQuery {
    /// The period before now the rates cover (`1h` default, `15m`, `24h`).
    pub period: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BottleneckQuery {
    pub namespace: Option<String>,
    /// The template name.
    pub name: Option<String>,
    pub version: Option<String>,
    /// Only steps and tasks finished within this period before now (default: all).
    pub period: Option<String>,
    /// How many of each, 1..=100 (default 10).
    pub limit: Option<u32>,
}

/// System performance (`get_analytics_metrics_v01`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Performance {
    pub active_tasks_count: u64,
    pub total_namespaces_count: u64,
    pub unique_task_types_count: u64,
    /// complete / (complete + error) over the last hour's tasks.
    pub system_health_score: f64,
    /// Tasks requested in the period.
    pub task_throughput: u64,
    pub completion_count: u64,
    pub error_count: u64,
    /// Percent of the period's tasks.
    pub completion_rate: f64,
    pub error_rate: f64,
    pub step_throughput: u64,
    pub step_success_rate: f64,
    pub avg_task_duration_ms: Option<i64>,
    pub avg_step_duration_ms: Option<i64>,
    pub period_start: String,
    pub calculated_at: String,
}

impl From<AnalyticsMetrics> for Performance {
    fn from(m: AnalyticsMetrics) -> Self {
        Performance {
            active_tasks_count: m.active_tasks_count,
            total_namespaces_count: m.total_namespaces_count,
            unique_task_types_count: m.unique_task_types_count,
            system_health_score: m.system_health_score,
            task_throughput: m.task_throughput,
            completion_count: m.completion_count,
            error_count: m.error_count,
            completion_rate: m.completion_rate,
            error_rate: m.error_rate,
            step_throughput: m.step_throughput,
            step_success_rate: m.step_success_rate,
            avg_task_duration_ms: m.avg_task_duration_ms,
            avg_step_duration_ms: m.avg_step_duration_ms,
            period_start: m.period_start.to_string(),
            calculated_at: m.calculated_at.to_string(),
        }
    }
}

/// A slow completed step (`get_slowest_steps_v01`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SlowStepJson {
    pub task_id: String,
    pub step: String,
    pub namespace: String,
    pub task_name: String,
    pub version: String,
    pub duration_ms: i64,
    pub attempts: u32,
    pub retry_limit: u32,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

/// A slow finished task (`get_slowest_tasks_v01`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SlowTaskJson {
    pub task_id: String,
    pub namespace: String,
    pub task_name: String,
    pub version: String,
    pub status: String,
    pub duration_ms: i64,
    pub step_count: u64,
    pub completed_steps: u64,
    pub error_steps: u64,
    pub requested_at: String,
    pub completed_at: String,
    pub initiator: Option<String>,
}

impl From<SlowStep> for SlowStepJson {
    fn from(s: SlowStep) -> Self {
        SlowStepJson {
            task_id: s.task_id.to_string(),
            step: s.step_name,
            namespace: s.namespace,
            task_name: s.task_name,
            version: s.version,
            duration_ms: s.duration_ms,
            attempts: s.attempts,
            retry_limit: s.retry_limit,
            started_at: s.started_at.map(|t| t.to_string()),
            completed_at: s.completed_at.map(|t| t.to_string()),
        }
    }
}

impl From<SlowTask> for SlowTaskJson {
    fn from(t: SlowTask) -> Self {
        SlowTaskJson {
            task_id: t.task_id.to_string(),
            namespace: t.namespace,
            task_name: t.task_name,
            version: t.version,
            status: t.status,
            duration_ms: t.duration_ms,
            step_count: t.step_count,
            completed_steps: t.completed_steps,
            error_steps: t.error_steps,
            requested_at: t.requested_at.to_string(),
            completed_at: t.completed_at.to_string(),
            initiator: t.initiator,
        }
    }
}

/// The slowest steps and tasks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Bottlenecks {
    pub slowest_steps: Vec<SlowStepJson>,
    pub slowest_tasks: Vec<SlowTaskJson>,
}

fn period(
    text: Option<&str>,
    default: Option<std::time::Duration>,
) -> Result<Option<std::time::Duration>, Problem> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t.trim()).map(Some).map_err(|e| {
            Problem::bad_request(
                "invalid_query",
                format!("period `{t}` is not a duration like 15m or 24h: {e}"),
            )
        }),
    }
}

/// System performance over a period (read model; every namespace).
#[utoipa::path(get, path = "/v1/analytics/performance", tag = "analytics", params(PerformanceQuery),
    responses((status = 200, body = Performance), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, description = "no read model", body = Problem)))]
pub async fn performance(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<PerformanceQuery>,
) -> Result<Json<Performance>, Problem> {
    who.require_all_namespaces(Permission::AnalyticsIndex)?;
    let period = period(
        q.period.as_deref(),
        Some(std::time::Duration::from_secs(3600)),
    )?
    .unwrap_or_default();
    let store = state
        .read_model
        .as_ref()
        .ok_or_else(Problem::no_read_model)?;
    let now = Timestamp::now();
    let since = Timestamp::from_millis(now.as_millis().saturating_sub(period.as_millis() as u64));
    let m = store
        .analytics(since, now)
        .await
        .map_err(|e| Problem::read_model(&e))?;
    Ok(Json(m.into()))
}

/// The slowest completed steps and finished tasks, with filters.
#[utoipa::path(get, path = "/v1/analytics/bottlenecks", tag = "analytics", params(BottleneckQuery),
    responses((status = 200, body = Bottlenecks), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, description = "no read model", body = Problem)))]
pub async fn bottlenecks(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<BottleneckQuery>,
) -> Result<Json<Bottlenecks>, Problem> {
    match &q.namespace {
        Some(ns) => who.require(Permission::AnalyticsIndex, Some(ns))?,
        None => who.require_all_namespaces(Permission::AnalyticsIndex)?,
    }
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(Problem::bad_request(
            "invalid_query",
            "limit must be between 1 and 100",
        ));
    }
    let store = state
        .read_model
        .as_ref()
        .ok_or_else(Problem::no_read_model)?;
    let since = period(q.period.as_deref(), None)?.map(|p| {
        Timestamp::from_millis(
            Timestamp::now()
                .as_millis()
                .saturating_sub(p.as_millis() as u64),
        )
    });
    let filter = SlowestFilter {
        since,
        limit,
        namespace: q.namespace,
        task_name: q.name,
        version: q.version,
    };
    let steps = store
        .slowest_steps(&filter)
        .await
        .map_err(|e| Problem::read_model(&e))?;
    let tasks = store
        .slowest_tasks(&filter)
        .await
        .map_err(|e| Problem::read_model(&e))?;
    Ok(Json(Bottlenecks {
        slowest_steps: steps.into_iter().map(Into::into).collect(),
        slowest_tasks: tasks.into_iter().map(Into::into).collect(),
    }))
}
