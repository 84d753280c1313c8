//! Tasks as JSON and as text: one shape for the API, `status --json` and the
//! terminal.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tasker_engine::record::Timestamp;
use tasker_engine::state::TaskState;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct TaskJson {
    pub task_id: String,
    pub correlation_id: String,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: String,
    pub accepted_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub context: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub steps: Vec<StepJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct StepJson {
    pub name: String,
    pub handler: String,
    pub status: String,
    pub attempts: u32,
    pub retry_limit: u32,
    pub retryable: bool,
    pub depends_on: Vec<String>,
    pub retry_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub result: Option<serde_json::Value>,
    pub error: Option<StepErrorJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct StepErrorJson {
    pub kind: String,
    pub message: String,
}

fn ts(t: Option<Timestamp>) -> Option<String> {
    t.map(|t| t.to_string())
}

impl TaskJson {
    pub fn from_state(task: &TaskState) -> TaskJson {
        let snapshot = task.dag.snapshot();
        let steps = snapshot
            .steps
            .iter()
            .zip(&task.steps)
            .map(|(spec, s)| StepJson {
                name: spec.name.clone(),
                handler: spec.handler.clone(),
                status: s.status.as_str().to_owned(),
                attempts: s.attempts,
                retry_limit: spec.retry_limit,
                retryable: spec.retryable,
                depends_on: spec
                    .depends_on
                    .iter()
                    .filter_map(|p| snapshot.step(*p).map(|p| p.name.clone()))
                    .collect(),
                retry_at: ts(s.retry_at),
                started_at: ts(s.started_at),
                finished_at: ts(s.finished_at),
                duration_ms: match (s.started_at, s.finished_at) {
                    (Some(a), Some(b)) => Some(b.millis_since(a)),
                    _ => None,
                },
                result: s.result.as_ref().map(|r| r.to_value()),
                error: s.last_error.as_ref().map(|e| StepErrorJson {
                    kind: e.kind.as_str().to_owned(),
                    message: e.message.clone(),
                }),
            })
            .collect();
        TaskJson {
            task_id: task.id.to_string(),
            correlation_id: task.correlation_id.to_string(),
            namespace: snapshot.namespace.clone(),
            name: snapshot.name.clone(),
            version: snapshot.version.clone(),
            status: task.status.as_str().to_owned(),
            accepted_at: task.accepted_at.to_string(),
            started_at: ts(task.started_at),
            finished_at: ts(task.finished_at),
            context: task.request.context.to_value(),
            idempotency_key: task.request.idempotency_key.clone(),
            initiator: task.request.initiator.clone(),
            source_system: task.request.source_system.clone(),
            reason: task.request.reason.clone(),
            tags: task.request.tags.clone(),
            steps,
        }
    }

    /// A table for the terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "task {}  {}/{}@{}  {}",
            self.task_id, self.namespace, self.name, self.version, self.status
        );
        let _ = writeln!(
            out,
            "  accepted {}{}",
            self.accepted_at,
            self.finished_at
                .as_ref()
                .map(|f| format!("  finished {f}"))
                .unwrap_or_default()
        );
        let width = self
            .steps
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "  {:width$}  {:17}  {:8}  {:>8}  NOTE",
            "STEP", "STATUS", "ATTEMPTS", "MS"
        );
        for s in &self.steps {
            let note = match (&s.error, &s.retry_at) {
                (Some(e), Some(at)) => format!("{}; retry at {at}", e.message),
                (Some(e), None) if s.status == "error" => e.message.clone(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:width$}  {:17}  {:8}  {:>8}  {}",
                s.name,
                s.status,
                format!("{}/{}", s.attempts, s.retry_limit),
                s.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
                note
            );
        }
        out
    }
}
