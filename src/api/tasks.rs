//! `/v1/tasks`: request, list, show, control tasks; their steps and history.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tasker_engine::record::{CancelTask, Command, RawJson, ResolveStep, RetryTask};
use utoipa::ToSchema;

use super::auth::{Permission, Principal};
use super::problem::{ApiJson, ApiQuery, OptionalJson, Problem};
use super::service::{
    Accepted, CreateTask, HistoryEntry, ListQuery, StepDetail, TaskPage, parse_id,
};
use super::{AppState, Correlation};
use crate::views::TaskJson;

/// The body of cancel and retry (optional).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskAction {
    pub reason: Option<String>,
    pub requested_by: Option<String>,
}

/// The body of a manual resolution (optional).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// The result the step's children see (default null).
    pub result: Option<serde_json::Value>,
    /// Also skip the pending steps downstream.
    #[serde(default)]
    pub skip_dependents: bool,
    pub reason: Option<String>,
    pub resolved_by: Option<String>,
}

fn reply(r: Result<(axum::http::StatusCode, Accepted), Problem>) -> Response {
    match r {
        Ok((code, body)) => (code, Json(body)).into_response(),
        Err(p) => p.into_response(),
    }
}

/// Cancel, retry and resolve: the task id from the path, then one command through
/// the service layer (which checks the permission).
async fn act(
    state: &AppState,
    who: &Principal,
    corr: &Correlation,
    id: &str,
    permission: Permission,
    cmd: Command,
) -> Response {
    match parse_id(id) {
        Ok(id) => reply(state.task_command(who, id, permission, cmd, corr.0).await),
        Err(p) => p.into_response(),
    }
}

/// Request a task.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = CreateTask,
    responses(
        (status = 202, description = "accepted: the task exists", body = Accepted),
        (status = 200, description = "duplicate idempotency key: the earlier task", body = Accepted),
        (status = 400, description = "invalid JSON or task id", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "unknown template or version", body = Problem),
        (status = 413, description = "body larger than api.max_body_bytes", body = Problem),
        (status = 422, description = "wrong field types, unknown fields, invalid context", body = Problem),
        (status = 503, description = "overloaded; retry", body = Problem),
    ))]
pub async fn create_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(corr): Extension<Correlation>,
    ApiJson(body): ApiJson<CreateTask>,
) -> Response {
    reply(state.create_task(&who, body, corr.0).await)
}

/// List tasks, newest first, with filters and a cursor.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, body = TaskPage),
        (status = 400, description = "bad filter or cursor", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
    ))]
pub async fn list_tasks(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<TaskPage>, Problem> {
    state.list_tasks(&who, &q).await.map(Json)
}

/// A task and its steps.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)")),
    responses(
        (status = 200, body = TaskJson),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
    ))]
pub async fn show_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskJson>, Problem> {
    let id = parse_id(&id)?;
    state.task(&who, id).await.map(Json)
}

/// A task's steps with readiness and DAG level.
#[utoipa::path(get, path = "/v1/tasks/{id}/steps", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)")),
    responses(
        (status = 200, body = Vec<StepDetail>),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
    ))]
pub async fn task_steps(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<StepDetail>>, Problem> {
    let id = parse_id(&id)?;
    state.steps(&who, id).await.map(Json)
}

/// A task's history: every task and step transition, in log order (read model).
#[utoipa::path(get, path = "/v1/tasks/{id}/history", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)")),
    responses(
        (status = 200, body = Vec<HistoryEntry>),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 503, description = "no read model", body = Problem),
    ))]
pub async fn task_history(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<HistoryEntry>>, Problem> {
    let id = parse_id(&id)?;
    state.history(&who, id).await.map(Json)
}

/// Cancel a pending or running task.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)")),
    request_body(content = Option<TaskAction>),
    responses(
        (status = 200, description = "applied", body = Accepted),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "the task cannot be cancelled now", body = Problem),
        (status = 422, body = Problem),
    ))]
pub async fn cancel_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(corr): Extension<Correlation>,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<TaskAction>,
) -> Response {
    let cmd = Command::CancelTask(CancelTask {
        requested_by: body.requested_by,
        reason: body.reason,
    });
    act(&state, &who, &corr, &id, Permission::TaskCancel, cmd).await
}

/// Retry the failed steps of a task in error.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)")),
    request_body(content = Option<TaskAction>),
    responses(
        (status = 200, description = "applied", body = Accepted),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "the task is not in error", body = Problem),
        (status = 422, body = Problem),
    ))]
pub async fn retry_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(corr): Extension<Correlation>,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<TaskAction>,
) -> Response {
    let cmd = Command::RetryTask(RetryTask {
        requested_by: body.requested_by,
        reason: body.reason,
    });
    act(&state, &who, &corr, &id, Permission::TaskRetry, cmd).await
}

/// Settle a failed step by hand.
#[utoipa::path(post, path = "/v1/tasks/{id}/steps/{step}/resolve", tag = "tasks",
    params(("id" = String, Path, description = "task id (UUID)"), ("step" = String, Path, description = "step name")),
    request_body(content = Option<Resolve>),
    responses(
        (status = 200, description = "applied", body = Accepted),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "unknown task or step", body = Problem),
        (status = 409, description = "the step is not in error", body = Problem),
        (status = 422, body = Problem),
    ))]
pub async fn resolve_step(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(corr): Extension<Correlation>,
    Path((id, step)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<Resolve>,
) -> Response {
    let cmd = Command::ResolveStep(ResolveStep {
        step,
        result: body.result.as_ref().map(RawJson::from_value),
        resolved_by: body.resolved_by,
        reason: body.reason,
        skip_dependents: body.skip_dependents,
    });
    act(&state, &who, &corr, &id, Permission::StepResolve, cmd).await
}
