//! `/v1/digests` and `/v1/projector`: per-partition audit digests and projector
//! progress, for `tasker status`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};
use tasker_engine::record::Timestamp;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Permission, Principal};
use super::problem::Problem;

/// One partition's digest, for `tasker status --digest`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DigestJson {
    pub partition: u32,
    /// The state is the fold of every record before this position.
    pub position: u64,
    pub digest: String,
    pub chain: String,
    pub records: u64,
    pub tasks_in_memory: usize,
}

/// One partition's projector progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectorJson {
    pub partition: u32,
    /// Every record before this position is in the read model.
    pub position: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub events: u64,
    pub retries: u64,
    /// Why this partition's projector stopped, if it did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// State digest and hash-chain head of every partition this engine owns.
#[utoipa::path(get, path = "/v1/digests", tag = "operations",
    responses((status = 200, body = Vec<DigestJson>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn digests(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<DigestJson>>, Problem> {
    who.require_all_namespaces(Permission::HealthStatusIndex)?;
    let mut out = Vec::new();
    for p in state.engine.owned_partitions() {
        let Some(rx) = state.engine.digest(p) else {
            continue;
        };
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
    Ok(Json(out))
}

pub fn projector_progress(state: &AppState) -> Vec<ProjectorJson> {
    let now = Timestamp::now();
    state
        .projector
        .list()
        .iter()
        .map(|(p, prog)| {
            let (lag_records, lag_seconds) = tasker_projections::projector::lag(prog, now);
            ProjectorJson {
                partition: p.0,
                position: prog.position.load(Ordering::Relaxed),
                lag_records,
                lag_seconds,
                events: prog.events.load(Ordering::Relaxed),
                retries: prog.retries.load(Ordering::Relaxed),
                error: prog.failed.get().cloned(),
            }
        })
        .collect()
}

/// Projector progress and lag per partition.
#[utoipa::path(get, path = "/v1/projector", tag = "operations",
    responses((status = 200, body = Vec<ProjectorJson>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn projector(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<ProjectorJson>>, Problem> {
    who.require_all_namespaces(Permission::HealthStatusIndex)?;
    Ok(Json(projector_progress(&state)))
}
