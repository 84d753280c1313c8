//! `POST /graphql`: queries `tasks`, `task`, `step`, `tasksByStatus` and mutations
//! `createTask`, `cancelTask`, `retryTask`, `resolveStep`, through the same
//! service layer (and permission checks) as REST. A refused operation is a
//! GraphQL error whose `extensions` carry the problem's `status` and `reason`.

use async_graphql::{Context, EmptySubscription, ErrorExtensions, InputObject, Object, Schema};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use tasker_engine::record::{CancelTask, Command, RawJson, ResolveStep, RetryTask};

use super::auth::{Permission, Principal};
use super::problem::{Problem, parse_json};
use super::service::{Accepted, CreateTask, ListQuery, TaskPage, parse_id};
use super::{AppState, Correlation};
use crate::views::{StepJson, TaskJson};

pub type TaskerSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

pub fn schema() -> TaskerSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .limit_depth(16)
        .limit_complexity(2_000)
        .finish()
}

impl From<Problem> for async_graphql::Error {
    fn from(p: Problem) -> Self {
        let reason = p.reason.clone().unwrap_or_default();
        let status = p.status;
        async_graphql::Error::new(p.detail).extend_with(|_, e| {
            e.set("status", status);
            e.set("reason", reason.clone());
        })
    }
}

struct Call<'a> {
    state: &'a AppState,
    who: &'a Principal,
    correlation: tasker_engine::record::CorrelationId,
}

fn call<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<Call<'a>> {
    Ok(Call {
        state: ctx.data::<AppState>()?,
        who: ctx.data::<Principal>()?,
        correlation: ctx.data::<Correlation>()?.0,
    })
}

fn not_found_to_none<T>(r: Result<T, Problem>) -> async_graphql::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(p) if p.status == 404 => Ok(None),
        Err(p) => Err(p.into()),
    }
}

#[derive(Debug, Default)]
pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Tasks newest first, with filters and a cursor (`after` = a page's `nextCursor`).
    #[allow(clippy::too_many_arguments)] // one argument per GraphQL field argument
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        status: Option<String>,
        namespace: Option<String>,
        name: Option<String>,
        since: Option<String>,
        after: Option<String>,
        first: Option<u32>,
    ) -> async_graphql::Result<TaskPage> {
        let c = call(ctx)?;
        let q = ListQuery {
            status,
            namespace,
            name,
            since,
            cursor: after,
            limit: first,
        };
        Ok(c.state.list_tasks(c.who, &q).await?)
    }

    /// Tasks with one status, newest first.
    async fn tasks_by_status(
        &self,
        ctx: &Context<'_>,
        status: String,
        after: Option<String>,
        first: Option<u32>,
    ) -> async_graphql::Result<TaskPage> {
        let c = call(ctx)?;
        let q = ListQuery {
            status: Some(status),
            cursor: after,
            limit: first,
            ..ListQuery::default()
        };
        Ok(c.state.list_tasks(c.who, &q).await?)
    }

    /// A task with its steps; null when unknown.
    async fn task(&self, ctx: &Context<'_>, id: String) -> async_graphql::Result<Option<TaskJson>> {
        let c = call(ctx)?;
        let id = parse_id(&id)?;
        not_found_to_none(c.state.task(c.who, id).await)
    }

    /// One step of a task; null when the task or step is unknown.
    async fn step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        name: String,
    ) -> async_graphql::Result<Option<StepJson>> {
        let c = call(ctx)?;
        let id = parse_id(&task_id)?;
        c.who.require(Permission::StepShow, None)?;
        let task = not_found_to_none(c.state.task(c.who, id).await)?;
        Ok(task.and_then(|t| t.steps.into_iter().find(|s| s.name == name)))
    }
}

/// The input of `createTask` (the body of `POST /v1/tasks`).
#[derive(Debug, InputObject)]
pub struct CreateTaskInput {
    pub namespace: String,
    pub name: String,
    pub version: Option<String>,
    pub context: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    #[graphql(default)]
    pub tags: Vec<String>,
    pub task_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct MutationRoot;

#[Object]
impl MutationRoot {
    async fn create_task(
        &self,
        ctx: &Context<'_>,
        input: CreateTaskInput,
    ) -> async_graphql::Result<Accepted> {
        let c = call(ctx)?;
        let body = CreateTask {
            namespace: input.namespace,
            name: input.name,
            version: input.version,
            context: input.context,
            idempotency_key: input.idempotency_key,
            initiator: input.initiator,
            source_system: input.source_system,
            reason: input.reason,
            tags: input.tags,
            task_id: input.task_id,
            correlation_id: None,
        };
        Ok(c.state.create_task(c.who, body, c.correlation).await?.1)
    }

    async fn cancel_task(
        &self,
        ctx: &Context<'_>,
        id: String,
        reason: Option<String>,
    ) -> async_graphql::Result<Accepted> {
        let c = call(ctx)?;
        let id = parse_id(&id)?;
        let cmd = Command::CancelTask(CancelTask {
            requested_by: Some(c.who.subject.to_string()),
            reason,
        });
        Ok(c.state
            .task_command(c.who, id, Permission::TaskCancel, cmd, c.correlation)
            .await?
            .1)
    }

    async fn retry_task(
        &self,
        ctx: &Context<'_>,
        id: String,
        reason: Option<String>,
    ) -> async_graphql::Result<Accepted> {
        let c = call(ctx)?;
        let id = parse_id(&id)?;
        let cmd = Command::RetryTask(RetryTask {
            requested_by: Some(c.who.subject.to_string()),
            reason,
        });
        Ok(c.state
            .task_command(c.who, id, Permission::TaskRetry, cmd, c.correlation)
            .await?
            .1)
    }

    async fn resolve_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        result: Option<serde_json::Value>,
        #[graphql(default)] skip_dependents: bool,
        reason: Option<String>,
    ) -> async_graphql::Result<Accepted> {
        let c = call(ctx)?;
        let id = parse_id(&task_id)?;
        let cmd = Command::ResolveStep(ResolveStep {
            step,
            result: result.as_ref().map(RawJson::from_value),
            resolved_by: Some(c.who.subject.to_string()),
            reason,
            skip_dependents,
        });
        Ok(c.state
            .task_command(c.who, id, Permission::StepResolve, cmd, c.correlation)
            .await?
            .1)
    }
}

/// Executes one GraphQL request (`{"query": ..., "variables": ...}`).
#[utoipa::path(post, path = "/graphql", tag = "graphql",
    request_body(content = Object, description = "a GraphQL request: query, variables, operationName"),
    responses((status = 200, description = "a GraphQL response (errors inside)", body = Object),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 413, body = Problem)))]
pub async fn execute(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(corr): Extension<Correlation>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return super::problem::body_problem(&e).into_response(),
    };
    let request: async_graphql::Request = match parse_json(&body) {
        Ok(r) => r,
        Err(p) => return p.into_response(),
    };
    let schema = state.graphql.clone();
    let response = schema
        .execute(request.data(state).data(who).data(corr))
        .await;
    Json(response).into_response()
}
