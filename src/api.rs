//! The HTTP API served by `tasker run` (`api.bind`): submit and control tasks,
//! read them, and audit digests. Errors are RFC 9457 problem+json.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tasker_engine::record::{
    CancelTask, Command, CorrelationId, Envelope, RawJson, RejectReason, RequestTask, ResolveStep,
    RetryTask, TaskId, Timestamp,
};
use tasker_engine::runtime::{Engine, SubmitError, SubmitOutcome, new_task_id};

use crate::views::TaskJson;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// The read model and the projector's progress, when `tasker run` projects.
    pub read_model: Option<tasker_projections::Store>,
    pub projector: Vec<(
        tasker_engine::record::PartitionId,
        Arc<tasker_projections::Progress>,
    )>,
}

impl axum::extract::FromRef<AppState> for Arc<Engine> {
    fn from_ref(s: &AppState) -> Arc<Engine> {
        Arc::clone(&s.engine)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}", get(show_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/retry", post(retry_task))
        .route("/v1/tasks/{id}/steps/{step}/resolve", post(resolve_step))
        .route("/v1/digests", get(digests))
        .route("/v1/projector", get(projector_status))
        .with_state(state)
}

/// An RFC 9457 problem.
#[derive(Debug, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("https://tasker.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            reason: Some(code.to_owned()),
            details: Vec::new(),
            task_id: None,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(&self)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A command's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    /// `accepted`, `applied` or `duplicate` (idempotency key seen before).
    pub status: String,
    pub task_id: String,
    pub position: u64,
}

fn status_for(reason: &RejectReason) -> StatusCode {
    match reason {
        RejectReason::UnknownTemplate
        | RejectReason::UnknownVersion
        | RejectReason::UnknownTask
        | RejectReason::UnknownStep => StatusCode::NOT_FOUND,
        RejectReason::InvalidContext
        | RejectReason::ContextTooLarge
        | RejectReason::Malformed
        | RejectReason::UnsupportedSchema => StatusCode::UNPROCESSABLE_ENTITY,
        RejectReason::DuplicateTask
        | RejectReason::DuplicateIdempotencyKey { .. }
        | RejectReason::InvalidTransition
        | RejectReason::StaleAttempt
        | RejectReason::WrongPartition => StatusCode::CONFLICT,
    }
}

async fn answer(engine: &Engine, envelope: Envelope) -> Response {
    match engine.request(envelope).await {
        Ok(SubmitOutcome::Accepted { task_id, position }) => (
            StatusCode::ACCEPTED,
            Json(Accepted {
                status: "accepted".into(),
                task_id: task_id.to_string(),
                position: position.0,
            }),
        )
            .into_response(),
        Ok(SubmitOutcome::Recorded { task_id, position }) => (
            StatusCode::ACCEPTED,
            Json(Accepted {
                status: "recorded".into(),
                task_id: task_id.to_string(),
                position: position.0,
            }),
        )
            .into_response(),
        Ok(SubmitOutcome::Applied {
            task_id, position, ..
        }) => (
            StatusCode::OK,
            Json(Accepted {
                status: "applied".into(),
                task_id: task_id.to_string(),
                position: position.0,
            }),
        )
            .into_response(),
        Ok(SubmitOutcome::Rejected {
            reason: RejectReason::DuplicateIdempotencyKey { existing },
            position,
            ..
        }) => (
            StatusCode::OK,
            Json(Accepted {
                status: "duplicate".into(),
                task_id: existing.to_string(),
                position: position.0,
            }),
        )
            .into_response(),
        Ok(SubmitOutcome::Rejected {
            task_id,
            reason,
            message,
            details,
            ..
        }) => {
            let mut p = Problem::new(status_for(&reason), reason.code(), message);
            p.details = details;
            p.task_id = Some(task_id.to_string());
            p.into_response()
        }
        Err(e @ SubmitError::Overloaded(_)) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
                .into_response()
        }
        Err(e) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
        .into_response(),
    }
}

/// A path segment that is not a task id.
struct BadId(String);

impl IntoResponse for BadId {
    fn into_response(self) -> Response {
        Problem::new(StatusCode::BAD_REQUEST, "invalid_task_id", self.0).into_response()
    }
}

fn parse_id(id: &str) -> Result<TaskId, BadId> {
    id.parse()
        .map_err(|e| BadId(format!("`{id}` is not a task id (UUID): {e}")))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub namespace: String,
    pub name: String,
    pub version: Option<String>,
    #[serde(default)]
    pub context: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Optional client-chosen id (UUIDv7 recommended).
    pub task_id: Option<String>,
    pub correlation_id: Option<String>,
}

async fn create_task(State(engine): State<Arc<Engine>>, Json(body): Json<CreateTask>) -> Response {
    let task_id = match body.task_id.as_deref().map(parse_id).transpose() {
        Ok(Some(id)) => id,
        Ok(None) => new_task_id(
            &body.namespace,
            body.idempotency_key.as_deref(),
            engine.log().partitions(),
        ),
        Err(r) => return r.into_response(),
    };
    let correlation_id = body
        .correlation_id
        .as_deref()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(CorrelationId::generate);
    let context = body
        .context
        .as_ref()
        .map(RawJson::from_value)
        .unwrap_or_else(RawJson::empty_object);
    let envelope = Envelope::command(
        task_id,
        correlation_id,
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: body.namespace,
            name: body.name,
            version: body.version,
            context,
            idempotency_key: body.idempotency_key,
            initiator: body.initiator,
            source_system: body.source_system,
            reason: body.reason,
            tags: body.tags,
        }),
    );
    answer(&engine, envelope).await
}

async fn show_task(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match engine.task(id) {
        Some(task) => Json(TaskJson::from_state(&task)).into_response(),
        None => Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!(
                "task {id} is not in memory (unknown, or finished before the retention window)"
            ),
        )
        .into_response(),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAction {
    pub reason: Option<String>,
    pub requested_by: Option<String>,
}

fn command(id: TaskId, command: Command) -> Envelope {
    Envelope::command(id, CorrelationId::generate(), Timestamp::now(), command)
}

async fn cancel_task(
    State(engine): State<Arc<Engine>>,
    Path(id): Path<String>,
    body: Option<Json<TaskAction>>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let body = body.map(|b| b.0).unwrap_or_default();
    let cmd = Command::CancelTask(CancelTask {
        requested_by: body.requested_by,
        reason: body.reason,
    });
    answer(&engine, command(id, cmd)).await
}

async fn retry_task(
    State(engine): State<Arc<Engine>>,
    Path(id): Path<String>,
    body: Option<Json<TaskAction>>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let body = body.map(|b| b.0).unwrap_or_default();
    let cmd = Command::RetryTask(RetryTask {
        requested_by: body.requested_by,
        reason: body.reason,
    });
    answer(&engine, command(id, cmd)).await
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub skip_dependents: bool,
    pub reason: Option<String>,
    pub resolved_by: Option<String>,
}

async fn resolve_step(
    State(engine): State<Arc<Engine>>,
    Path((id, step)): Path<(String, String)>,
    body: Option<Json<Resolve>>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let body = body.map(|b| b.0).unwrap_or_default();
    let cmd = Command::ResolveStep(ResolveStep {
        step,
        result: body.result.as_ref().map(RawJson::from_value),
        resolved_by: body.resolved_by,
        reason: body.reason,
        skip_dependents: body.skip_dependents,
    });
    answer(&engine, command(id, cmd)).await
}

/// One partition's digest, for `tasker status --digest`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DigestJson {
    pub partition: u32,
    pub position: u64,
    pub digest: String,
    pub chain: String,
    pub records: u64,
    pub tasks_in_memory: usize,
}

async fn digests(State(engine): State<Arc<Engine>>) -> Response {
    let mut out = Vec::new();
    for p in engine.owned_partitions() {
        let Some(rx) = engine.digest(p) else { continue };
        if let Ok(r) = rx.await {
            out.push(DigestJson {
                partition: r.partition.0,
                position: r.position.0,
                digest: r.digest.to_hex(),
                chain: r.chain.to_hex(),
                records: r.records,
                tasks_in_memory: r.tasks_in_memory,
            });
        }
    }
    Json(out).into_response()
}

/// One partition's projector progress, for `tasker status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectorJson {
    pub partition: u32,
    pub position: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub events: u64,
    pub retries: u64,
}

async fn projector_status(State(state): State<AppState>) -> Response {
    let now = Timestamp::now();
    let out: Vec<ProjectorJson> = state
        .projector
        .iter()
        .map(|(p, prog)| {
            let (lag_records, lag_seconds) = tasker_projections::projector::lag(prog, now);
            ProjectorJson {
                partition: p.0,
                position: prog.position.load(std::sync::atomic::Ordering::Relaxed),
                lag_records,
                lag_seconds,
                events: prog.events.load(std::sync::atomic::Ordering::Relaxed),
                retries: prog.retries.load(std::sync::atomic::Ordering::Relaxed),
            }
        })
        .collect();
    Json(out).into_response()
}
