//! The service layer under REST and GraphQL: every operation checks the caller's
//! permission, then reads the engine's published views (never the processor) or
//! the read model, or submits a command and waits for its answer.
//!
//! Where a task is read from: the engine's in-memory view first (it is the freshest
//! and exact), then the read model for tasks that left memory after
//! `engine.retention` or live on partitions another engine owns. Listings merge
//! both (see [`AppState::list_tasks`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tasker_engine::record::{
    Command, CorrelationId, Envelope, RawJson, RejectReason, RequestTask, TaskId, Timestamp,
};
use tasker_engine::runtime::{SubmitError, SubmitOutcome, new_task_id};
use tasker_engine::state::TaskState;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Permission, Principal, Scope};
use super::problem::Problem;
use super::read::{self, ListedTask, TaskFilter};
use crate::views::{StepErrorJson, StepJson, TaskJson};

/// The body of `POST /v1/tasks` (and GraphQL `createTask`).
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub namespace: String,
    pub name: String,
    /// An exact version or a semver requirement (`^1.2`); none takes the highest.
    pub version: Option<String>,
    /// The task's context; validated against the template's JSON Schema.
    #[serde(default)]
    pub context: Option<serde_json::Value>,
    /// A second request with the same key (per namespace) answers the first task.
    pub idempotency_key: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Optional client-chosen task id (UUIDv7 recommended).
    pub task_id: Option<String>,
    /// Overrides the `X-Correlation-ID` header.
    pub correlation_id: Option<String>,
}

/// A command's answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
pub struct Accepted {
    /// `accepted` (202), `recorded` (202: appended for the engine that owns the
    /// partition), `applied` (200) or `duplicate` (200: idempotency key seen before).
    pub status: String,
    pub task_id: String,
    /// The command's position in its partition.
    pub position: u64,
}

/// A task without its context and steps, for listings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
pub struct TaskSummary {
    pub task_id: String,
    pub correlation_id: String,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: String,
    pub accepted_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    /// `memory` (the engine's live view) or `read_model`.
    pub source: String,
}

/// One page of tasks, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
pub struct TaskPage {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Filters and paging of `GET /v1/tasks`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// pending, in_progress, complete, error, cancelled, resolved_manually.
    pub status: Option<String>,
    pub namespace: Option<String>,
    /// The template name.
    pub name: Option<String>,
    /// Accepted at or after: RFC 3339 (`2026-11-26T10:00:00Z`), epoch milliseconds,
    /// or a duration back from now (`15m`, `24h`).
    pub since: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1..=500 (default 50).
    pub limit: Option<u32>,
}

/// A step with its readiness and depth in the DAG.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepDetail {
    #[serde(flatten)]
    pub step: StepJson,
    /// The engine would start it now (pending or retry due, parents done, task open).
    pub ready: bool,
    /// 0 for roots, else the longest path from a root.
    pub level: u32,
}

/// One transition of a task or of one of its steps, from the read model.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, async_graphql::SimpleObject)]
pub struct HistoryEntry {
    pub partition: u32,
    /// The event's position in its partition (the order of the history).
    pub position: u64,
    pub occurred_at: String,
    pub event_type: String,
    /// The step, for step transitions.
    pub step: Option<String>,
    pub from_state: Option<String>,
    pub to_state: String,
    pub metadata: serde_json::Value,
}

pub const TASK_STATUSES: &[&str] = &[
    "pending",
    "in_progress",
    "complete",
    "error",
    "cancelled",
    "resolved_manually",
];

pub fn parse_id(id: &str) -> Result<TaskId, Problem> {
    id.parse().map_err(|e| {
        Problem::bad_request(
            "invalid_task_id",
            format!("`{id}` is not a task id (UUID): {e}"),
        )
    })
}

/// `since` as RFC 3339, epoch milliseconds, or a duration before `now`.
pub fn parse_since(text: &str, now: Timestamp) -> Result<Timestamp, Problem> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(Timestamp::from_millis(ms));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        return Ok(Timestamp::from_millis(ms));
    }
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(Timestamp::from_millis(
            now.as_millis().saturating_sub(d.as_millis() as u64),
        ));
    }
    Err(Problem::bad_request(
        "invalid_query",
        format!("`{t}` is not an RFC 3339 time, epoch milliseconds, or a duration like 15m"),
    ))
}

fn ts(t: Option<Timestamp>) -> Option<String> {
    t.map(|t| t.to_string())
}

fn summary_of(task: &TaskState) -> TaskSummary {
    let snap = task.dag.snapshot();
    TaskSummary {
        task_id: task.id.to_string(),
        correlation_id: task.correlation_id.to_string(),
        namespace: snap.namespace.clone(),
        name: snap.name.clone(),
        version: snap.version.clone(),
        status: task.status.as_str().to_owned(),
        accepted_at: task.accepted_at.to_string(),
        started_at: ts(task.started_at),
        finished_at: ts(task.finished_at),
        initiator: task.request.initiator.clone(),
        source_system: task.request.source_system.clone(),
        reason: task.request.reason.clone(),
        tags: task.request.tags.clone(),
        idempotency_key: task.request.idempotency_key.clone(),
        source: "memory".into(),
    }
}

fn summary_of_row(row: ListedTask) -> TaskSummary {
    TaskSummary {
        task_id: row.task_id.to_string(),
        correlation_id: row.correlation_id.to_string(),
        namespace: row.namespace,
        name: row.name,
        version: row.version,
        status: row.status,
        accepted_at: row.requested_at.to_string(),
        started_at: ts(row.started_at),
        finished_at: ts(row.completed_at),
        initiator: row.initiator,
        source_system: row.source_system,
        reason: row.reason,
        tags: row.tags,
        idempotency_key: row.idempotency_key,
        source: "read_model".into(),
    }
}

/// Depth of every step (its snapshot is in topological order).
fn levels(parents: &[Vec<usize>]) -> Vec<u32> {
    let mut out = vec![0u32; parents.len()];
    for i in 0..parents.len() {
        out[i] = parents[i]
            .iter()
            .filter_map(|p| out.get(*p).map(|l| l + 1))
            .max()
            .unwrap_or(0);
    }
    out
}

fn rejection_status(reason: &RejectReason) -> StatusCode {
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

/// A command's outcome as HTTP: a status and body, or a problem.
pub fn outcome(
    result: Result<SubmitOutcome, SubmitError>,
) -> Result<(StatusCode, Accepted), Problem> {
    let ok = |code, status: &str, task_id: TaskId, position: tasker_engine::record::Position| {
        Ok((
            code,
            Accepted {
                status: status.into(),
                task_id: task_id.to_string(),
                position: position.0,
            },
        ))
    };
    match result {
        Ok(SubmitOutcome::Accepted { task_id, position }) => {
            ok(StatusCode::ACCEPTED, "accepted", task_id, position)
        }
        Ok(SubmitOutcome::Recorded { task_id, position }) => {
            ok(StatusCode::ACCEPTED, "recorded", task_id, position)
        }
        Ok(SubmitOutcome::Applied {
            task_id, position, ..
        }) => ok(StatusCode::OK, "applied", task_id, position),
        Ok(SubmitOutcome::Rejected {
            reason: RejectReason::DuplicateIdempotencyKey { existing },
            position,
            ..
        }) => ok(StatusCode::OK, "duplicate", existing, position),
        Ok(SubmitOutcome::Rejected {
            task_id,
            reason,
            message,
            details,
            ..
        }) => {
            let mut p = Problem::new(rejection_status(&reason), reason.code(), message);
            p.details = details;
            p.task_id = Some(task_id.to_string());
            Err(p)
        }
        Err(e @ SubmitError::Overloaded(_)) => {
            Err(Problem::unavailable("overloaded", e.to_string()))
        }
        Err(e) => Err(Problem::unavailable("unavailable", e.to_string())),
    }
}

impl AppState {
    async fn submit(&self, envelope: Envelope) -> Result<(StatusCode, Accepted), Problem> {
        outcome(self.engine.request(envelope).await)
    }

    /// `task.requested`.
    pub async fn create_task(
        &self,
        who: &Principal,
        body: CreateTask,
        correlation: CorrelationId,
    ) -> Result<(StatusCode, Accepted), Problem> {
        who.require(Permission::TaskCreate, Some(&body.namespace))?;
        let task_id = match body.task_id.as_deref() {
            Some(id) => parse_id(id)?,
            None => new_task_id(
                &body.namespace,
                body.idempotency_key.as_deref(),
                self.engine.log().partitions(),
            ),
        };
        let correlation_id = match body.correlation_id.as_deref() {
            Some(c) => c.parse().map_err(|_| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    format!("correlation_id `{c}` is not a UUID"),
                )
            })?,
            None => correlation,
        };
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
        let span = tracing::info_span!("command", r#type = "task.requested", task_id = %task_id, correlation_id = %correlation_id);
        tracing::Instrument::instrument(self.submit(envelope), span).await
    }

    /// The namespace of a task, from memory or the read model.
    async fn namespace_of(&self, id: TaskId) -> Result<Option<String>, Problem> {
        if let Some(task) = self.engine.task(id) {
            return Ok(Some(task.dag.snapshot().namespace.clone()));
        }
        match &self.read_model {
            Some(store) => Ok(store
                .task(id)
                .await
                .map_err(|e| Problem::read_model(&e))?
                .map(|t| t.namespace)),
            None => Ok(None),
        }
    }

    /// Checks `p` for a task's namespace; a principal limited to some namespaces
    /// gets 404 for a task nobody here knows.
    async fn authorize_task(
        &self,
        who: &Principal,
        p: Permission,
        id: TaskId,
    ) -> Result<(), Problem> {
        who.require(p, None)?;
        match self.namespace_of(id).await? {
            Some(ns) => who.require(p, Some(&ns)),
            None if *who.scope() == Scope::All => Ok(()),
            None => Err(unknown_task(id)),
        }
    }

    /// Cancel, retry or resolve: any command about an existing task.
    pub async fn task_command(
        &self,
        who: &Principal,
        id: TaskId,
        permission: Permission,
        command: Command,
        correlation: CorrelationId,
    ) -> Result<(StatusCode, Accepted), Problem> {
        self.authorize_task(who, permission, id).await?;
        let span = tracing::info_span!("command", r#type = command.record_type().name(), task_id = %id, correlation_id = %correlation);
        let envelope = Envelope::command(id, correlation, Timestamp::now(), command);
        tracing::Instrument::instrument(self.submit(envelope), span).await
    }

    /// A task with its steps: memory, else the read model.
    pub async fn task(&self, who: &Principal, id: TaskId) -> Result<TaskJson, Problem> {
        who.require(Permission::TaskShow, None)?;
        if let Some(task) = self.engine.task(id) {
            who.require(Permission::TaskShow, Some(&task.dag.snapshot().namespace))?;
            return Ok(TaskJson::from_state(&task));
        }
        let Some(store) = &self.read_model else {
            return Err(unknown_task(id));
        };
        let Some(row) = store.task(id).await.map_err(|e| Problem::read_model(&e))? else {
            return Err(unknown_task(id));
        };
        who.require(Permission::TaskShow, Some(&row.namespace))?;
        let steps = store.steps(id).await.map_err(|e| Problem::read_model(&e))?;
        let edges = read::edges(store, id)
            .await
            .map_err(|e| Problem::read_model(&e))?;
        let names: BTreeMap<u32, String> = steps
            .iter()
            .map(|s| (s.step_index, s.name.clone()))
            .collect();
        let steps = steps
            .into_iter()
            .map(|s| StepJson {
                depends_on: edges
                    .iter()
                    .filter(|(_, to)| *to == s.step_index)
                    .filter_map(|(from, _)| names.get(from).cloned())
                    .collect(),
                name: s.name,
                handler: s.handler,
                status: s.status,
                attempts: s.attempts,
                retry_limit: s.retry_limit,
                retryable: s.retryable,
                retry_at: ts(s.next_retry_at),
                started_at: ts(s.started_at),
                finished_at: ts(s.completed_at),
                duration_ms: s.duration_ms.and_then(|d| u64::try_from(d).ok()),
                result: s.results,
                error: s.error.map(|e| StepErrorJson {
                    kind: e["kind"].as_str().unwrap_or("error").to_owned(),
                    message: e["message"].as_str().unwrap_or_default().to_owned(),
                }),
            })
            .collect();
        Ok(TaskJson {
            task_id: row.task_id.to_string(),
            correlation_id: row.correlation_id.to_string(),
            namespace: row.namespace,
            name: row.name,
            version: row.version,
            status: row.status,
            accepted_at: row.requested_at.to_string(),
            started_at: ts(row.started_at),
            finished_at: ts(row.completed_at),
            context: row.context,
            idempotency_key: row.idempotency_key,
            initiator: row.initiator,
            source_system: row.source_system,
            reason: row.reason,
            tags: row.tags,
            steps,
        })
    }

    /// A task's steps with readiness and level.
    pub async fn steps(&self, who: &Principal, id: TaskId) -> Result<Vec<StepDetail>, Problem> {
        who.require(Permission::StepShow, None)?;
        let now = Timestamp::now();
        if let Some(task) = self.engine.task(id) {
            who.require(Permission::StepShow, Some(&task.dag.snapshot().namespace))?;
            let json = TaskJson::from_state(&task);
            let parents: Vec<Vec<usize>> = task
                .dag
                .snapshot()
                .steps
                .iter()
                .map(|s| s.depends_on.iter().map(|p| p.index()).collect())
                .collect();
            let levels = levels(&parents);
            return Ok(json
                .steps
                .into_iter()
                .zip(task.dag.step_ids())
                .zip(levels)
                .map(|((step, id), level)| StepDetail {
                    step,
                    ready: task.is_step_ready(id, now),
                    level,
                })
                .collect());
        }
        let Some(store) = &self.read_model else {
            return Err(unknown_task(id));
        };
        let mut task = self.task(&Principal::unrestricted(), id).await?;
        who.require(Permission::StepShow, Some(&task.namespace))?;
        let readiness = store
            .readiness(&[id], now)
            .await
            .map_err(|e| Problem::read_model(&e))?;
        let levels = store
            .dependency_levels(id)
            .await
            .map_err(|e| Problem::read_model(&e))?;
        let ready: BTreeMap<&str, bool> = readiness
            .iter()
            .map(|r| (r.name.as_str(), r.ready_for_execution))
            .collect();
        let level: BTreeMap<&str, u32> =
            levels.iter().map(|l| (l.name.as_str(), l.level)).collect();
        Ok(std::mem::take(&mut task.steps)
            .into_iter()
            .map(|step| StepDetail {
                ready: ready.get(step.name.as_str()).copied().unwrap_or(false),
                level: level.get(step.name.as_str()).copied().unwrap_or(0),
                step,
            })
            .collect())
    }

    /// A task's transitions from the read model, in log order.
    pub async fn history(&self, who: &Principal, id: TaskId) -> Result<Vec<HistoryEntry>, Problem> {
        who.require(Permission::TaskShow, None)?;
        let Some(store) = &self.read_model else {
            return Err(Problem::no_read_model());
        };
        let ns = self
            .namespace_of(id)
            .await?
            .ok_or_else(|| unknown_task(id))?;
        who.require(Permission::TaskShow, Some(&ns))?;
        let rows = read::history(store, id)
            .await
            .map_err(|e| Problem::read_model(&e))?;
        Ok(rows
            .into_iter()
            .map(|t| HistoryEntry {
                partition: t.partition,
                position: t.position,
                occurred_at: t.occurred_at.to_string(),
                event_type: t.event_type,
                step: t.step_name,
                from_state: t.from_state,
                to_state: t.to_state,
                metadata: t.metadata,
            })
            .collect())
    }

    /// Tasks newest first (by id: UUIDv7 ids sort by creation time), from memory
    /// and the read model merged: a task in memory is shown as memory has it (the
    /// read model may lag); the read model adds tasks that left memory or belong
    /// to partitions another engine owns. The cursor is the last id of a page.
    pub async fn list_tasks(&self, who: &Principal, q: &ListQuery) -> Result<TaskPage, Problem> {
        who.require(Permission::TaskIndex, None)?;
        if let Some(ns) = &q.namespace {
            who.require(Permission::TaskIndex, Some(ns))?;
        }
        if let Some(s) = &q.status
            && !TASK_STATUSES.contains(&s.as_str())
        {
            return Err(Problem::bad_request(
                "invalid_query",
                format!("status `{s}` is not one of {}", TASK_STATUSES.join(", ")),
            ));
        }
        let limit = q.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(Problem::bad_request(
                "invalid_query",
                "limit must be between 1 and 500",
            ));
        }
        let now = Timestamp::now();
        let since = q
            .since
            .as_deref()
            .map(|s| parse_since(s, now))
            .transpose()?;
        let before = q.cursor.as_deref().map(parse_id).transpose()?;
        let scope = match who.scope() {
            Scope::All => None,
            Scope::Only(list) => Some(list.clone()),
        };
        let take = limit as usize + 1;
        let matches = |t: &TaskState| {
            let snap = t.dag.snapshot();
            before.is_none_or(|b| t.id < b)
                && q.status.as_deref().is_none_or(|s| t.status.as_str() == s)
                && q.namespace.as_deref().is_none_or(|n| snap.namespace == n)
                && q.name.as_deref().is_none_or(|n| snap.name == n)
                && since.is_none_or(|s| t.accepted_at >= s)
                && scope.as_ref().is_none_or(|l| l.contains(&snap.namespace))
        };
        let mut in_memory: Vec<Arc<TaskState>> = Vec::new();
        let mut memory_ids = std::collections::HashSet::new();
        let mut views = Vec::new();
        for p in self.engine.owned_partitions() {
            if let Some(view) = self.engine.view(p) {
                views.push(view);
            }
        }
        for view in &views {
            for task in view.tasks() {
                memory_ids.insert(task.id);
                if matches(&task) {
                    in_memory.push(task);
                }
            }
        }
        if in_memory.len() > take {
            in_memory.select_nth_unstable_by(take, |a, b| b.id.cmp(&a.id));
            in_memory.truncate(take);
        }
        let mut page: Vec<(TaskId, TaskSummary)> =
            in_memory.iter().map(|t| (t.id, summary_of(t))).collect();
        let mut floor = None;
        if let Some(store) = &self.read_model {
            let filter = TaskFilter {
                status: q.status.clone(),
                namespace: q.namespace.clone(),
                name: q.name.clone(),
                since,
                before,
                namespaces: scope,
            };
            let rows = read::list_tasks(store, &filter, take as u32)
                .await
                .map_err(|e| Problem::read_model(&e))?;
            if rows.len() == take {
                // Past the read model's last row there may be more it did not return.
                floor = rows.last().map(|r| r.task_id);
            }
            page.extend(
                rows.into_iter()
                    .filter(|r| !memory_ids.contains(&r.task_id))
                    .map(|r| (r.task_id, summary_of_row(r))),
            );
        }
        page.sort_by_key(|p| std::cmp::Reverse(p.0));
        if let Some(floor) = floor {
            page.retain(|(id, _)| *id >= floor);
        }
        let more = page.len() > limit as usize || floor.is_some();
        page.truncate(limit as usize);
        let next_cursor = if more {
            page.last().map(|(id, _)| id.to_string())
        } else {
            None
        };
        Ok(TaskPage {
            tasks: page.into_iter().map(|(_, s)| s).collect(),
            next_cursor,
        })
    }
}

pub fn unknown_task(id: TaskId) -> Problem {
    let mut p = Problem::not_found(
        "unknown_task",
        format!("no task {id} in memory or in the read model"),
    );
    p.task_id = Some(id.to_string());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_since() {
        // a -> (b, c) -> d, e alone
        let parents = vec![vec![], vec![0], vec![0], vec![1, 2], vec![]];
        assert_eq!(levels(&parents), vec![0, 1, 1, 2, 0]);
        let now = Timestamp::from_millis(10_000_000);
        assert_eq!(
            parse_since("15m", now).unwrap().as_millis(),
            10_000_000 - 900_000
        );
        assert_eq!(parse_since("1234", now).unwrap().as_millis(), 1234);
        assert_eq!(
            parse_since("1970-01-01T00:00:01Z", now)
                .unwrap()
                .as_millis(),
            1000
        );
        assert_eq!(parse_since("yesterday", now).unwrap_err().status, 400);
    }
}
