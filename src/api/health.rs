//! Health: `/health/live` (the process answers), `/health/ready` (the log is
//! writable, the read model reachable and migrated, the projector keeping up) and
//! `/health/status` (counts by status from `get_system_health_counts_v01`, cached).
//! Live and ready never need a token.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tasker_engine::log::Log;
use tasker_engine::record::{PartitionId, Position, Timestamp};
use tasker_engine::runtime::PartitionStatus;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Permission, Principal};
use super::problem::Problem;
use super::read;

/// `/health/live`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Live {
    pub status: String,
}

/// One readiness check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// `log`, `read_model`, `migrations` or `projector`.
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// `/health/ready`'s answer (200 when every check is ok, else 503).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// `ready` or `not_ready`.
    pub status: String,
    pub checks: Vec<Check>,
}

/// One partition as this engine runs it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PartitionHealth {
    pub partition: u32,
    /// `starting`, `live`, `restarting` or `stopped`.
    pub status: String,
    pub error: Option<String>,
    pub tasks_in_memory: usize,
}

/// `/health/status`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// Task and step counts by status and retry situation
    /// (`get_system_health_counts_v01`), or null without a read model.
    pub counts: Option<serde_json::Value>,
    pub partitions: Vec<PartitionHealth>,
    /// When the counts were computed (they are reused for `health.status_cache`).
    pub computed_at: String,
}

/// The cached answer of `/health/status`.
#[derive(Debug, Default)]
pub struct StatusCache(tokio::sync::Mutex<Option<(Instant, Timestamp, Option<serde_json::Value>)>>);

/// The process answers.
#[utoipa::path(get, path = "/health/live", tag = "health", security(()),
    responses((status = 200, body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live {
        status: "ok".into(),
    })
}

fn partition_health(state: &AppState) -> Vec<PartitionHealth> {
    state
        .engine
        .owned_partitions()
        .into_iter()
        .map(|p| {
            let (status, error) = match state.engine.status(p) {
                Some(PartitionStatus::Starting) | None => ("starting", None),
                Some(PartitionStatus::Live) => ("live", None),
                Some(PartitionStatus::Restarting { error }) => ("restarting", Some(error)),
                Some(PartitionStatus::Stopped { error }) => ("stopped", error),
            };
            PartitionHealth {
                partition: p.0,
                status: status.into(),
                error,
                tasks_in_memory: state.engine.view(p).map(|v| v.task_count()).unwrap_or(0),
            }
        })
        .collect()
}

async fn check_read_model(state: &AppState, checks: &mut Vec<Check>) {
    let Some(store) = &state.read_model else {
        checks.push(Check {
            name: "read_model".into(),
            ok: true,
            detail: "not configured (projector.enabled = false)".into(),
        });
        return;
    };
    let timeout = Duration::from_secs(2);
    match tokio::time::timeout(timeout, read::missing_migrations(store)).await {
        Ok(Ok(missing)) => {
            checks.push(Check {
                name: "read_model".into(),
                ok: true,
                detail: format!("{} reachable", store.kind()),
            });
            checks.push(Check {
                name: "migrations".into(),
                ok: missing.is_empty(),
                detail: if missing.is_empty() {
                    "all applied".into()
                } else {
                    format!("not applied: {}", missing.join(", "))
                },
            });
        }
        Ok(Err(e)) => checks.push(Check {
            name: "read_model".into(),
            ok: false,
            detail: e.to_string(),
        }),
        Err(_) => checks.push(Check {
            name: "read_model".into(),
            ok: false,
            detail: format!("no answer within {timeout:?}"),
        }),
    }
}

/// How long readiness waits for the log's ends.
const ENDS_TIMEOUT: Duration = Duration::from_secs(2);

/// The log's end in each of `partitions`, read off the runtime: on Kafka each
/// is a broker round trip, which a broker that does not answer holds for
/// seconds, and a blocked worker would stall every request of the API. Stops
/// at the first partition that fails.
async fn log_ends(
    log: Arc<dyn Log>,
    partitions: Vec<PartitionId>,
) -> Result<BTreeMap<PartitionId, Position>, String> {
    let query = tokio::task::spawn_blocking(move || {
        partitions
            .into_iter()
            .map(|p| log.end(p).map(|end| (p, end)))
            .collect::<Result<BTreeMap<_, _>, _>>()
    });
    match tokio::time::timeout(ENDS_TIMEOUT, query).await {
        Ok(Ok(Ok(ends))) => Ok(ends),
        Ok(Ok(Err(e))) => Err(format!("cannot read the log's end: {e}")),
        Ok(Err(e)) => Err(format!("the query of the log's end stopped: {e}")),
        Err(_) => Err(format!("the log's end: no answer within {ENDS_TIMEOUT:?}")),
    }
}

/// The projector's lag against `ends` (the log's ends, where they could be
/// read; else each projector's last look).
fn check_projector(
    state: &AppState,
    ends: &BTreeMap<PartitionId, Position>,
    checks: &mut Vec<Check>,
) {
    if state.projector.list().is_empty() {
        return;
    }
    let (max_records, max_age) = (
        state.settings.max_projector_lag_records,
        state.settings.max_projector_lag,
    );
    let mut problems = Vec::new();
    let mut worst = (0u64, 0f64);
    for p in super::audit::projector_progress(state) {
        if let Some(e) = &p.error {
            problems.push(format!(
                "partition {}: the projector stopped: {e}",
                p.partition
            ));
            continue;
        }
        let records = ends
            .get(&PartitionId(p.partition))
            .map_or(p.lag_records, |e| e.0.saturating_sub(p.position));
        worst = (worst.0.max(records), worst.1.max(p.lag_seconds));
        if records > max_records || p.lag_seconds > max_age.as_secs_f64() {
            problems.push(format!(
                "partition {} is {records} records / {:.1}s behind",
                p.partition, p.lag_seconds
            ));
        }
    }
    checks.push(Check {
        name: "projector".into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            format!(
                "at most {} records / {:.1}s behind (limits {max_records} / {max_age:?})",
                worst.0, worst.1
            )
        } else {
            problems.join("; ")
        },
    });
}

/// Ready for traffic: every partition's processor is live (so its writer can
/// append) and the log answers, the read model answers with every migration
/// applied, and the projector is within `health.max_projector_lag_records` /
/// `max_projector_lag`.
#[utoipa::path(get, path = "/health/ready", tag = "health", security(()),
    responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut checks = Vec::new();
    let parts = partition_health(&state);
    let bad: Vec<String> = parts
        .iter()
        .filter(|p| p.status != "live")
        .map(|p| {
            format!(
                "partition {} {}{}",
                p.partition,
                p.status,
                p.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let kafka = state.engine.log().shared_writers();
    let mut partitions: BTreeSet<PartitionId> = parts
        .iter()
        .map(|p| PartitionId(p.partition))
        .chain(state.projector.list().iter().map(|(p, _)| *p))
        .collect();
    if partitions.is_empty() {
        // An engine owning nothing still appends clients' commands (Kafka):
        // the log must answer.
        partitions.insert(PartitionId(0));
    }
    let ends = log_ends(
        Arc::clone(state.engine.log()),
        partitions.into_iter().collect(),
    )
    .await;
    checks.push(Check {
        name: "log".into(),
        ok: bad.is_empty() && (kafka || !parts.is_empty()) && ends.is_ok(),
        detail: if !bad.is_empty() {
            bad.join("; ")
        } else if let Err(e) = &ends {
            e.clone()
        } else if parts.is_empty() {
            if kafka {
                "no partition assigned yet (consumer group)".into()
            } else {
                "no partition running".into()
            }
        } else {
            format!(
                "{} partitions live on {}",
                parts.len(),
                state.engine.log().describe()
            )
        },
    });
    check_read_model(&state, &mut checks).await;
    check_projector(&state, &ends.unwrap_or_default(), &mut checks);
    let ok = checks.iter().all(|c| c.ok);
    let body = Ready {
        status: if ok { "ready" } else { "not_ready" }.into(),
        checks,
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Counts by status (cached for `health.status_cache`, 15 s by default) and the
/// partitions this engine runs.
#[utoipa::path(get, path = "/health/status", tag = "health",
    responses((status = 200, body = Status), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn status(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Status>, Problem> {
    who.require_all_namespaces(Permission::HealthStatusIndex)?;
    let mut cache = state.status_cache.0.lock().await;
    let fresh = cache
        .as_ref()
        .is_some_and(|(at, _, _)| at.elapsed() < state.settings.status_cache);
    if !fresh {
        let now = Timestamp::now();
        let counts = match &state.read_model {
            Some(store) => {
                let c = store
                    .health_counts(now)
                    .await
                    .map_err(|e| Problem::read_model(&e))?;
                Some(serde_json::to_value(c).unwrap_or_default())
            }
            None => None,
        };
        *cache = Some((Instant::now(), now, counts));
    }
    let (_, computed_at, counts) =
        cache
            .clone()
            .unwrap_or((Instant::now(), Timestamp::now(), None));
    Ok(Json(Status {
        counts,
        partitions: partition_health(&state),
        computed_at: computed_at.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tasker_engine::log::{LogError, LogReader, LogWriter};

    use super::*;

    /// A log whose `end` takes `delay`, or fails, as a broker that does not
    /// answer or refuses.
    #[derive(Debug)]
    struct Slow {
        delay: Duration,
        fail: bool,
        calls: std::sync::atomic::AtomicU32,
    }

    impl Log for Slow {
        fn partitions(&self) -> u32 {
            3
        }
        fn writer(&self, _: PartitionId) -> Result<Box<dyn LogWriter>, LogError> {
            Err(LogError::Config("read only".into()))
        }
        fn reader(&self, _: PartitionId, _: Position) -> Result<Box<dyn LogReader>, LogError> {
            Err(LogError::Config("no records".into()))
        }
        fn end(&self, p: PartitionId) -> Result<Position, LogError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(LogError::Kafka("all brokers down".into()));
            }
            Ok(Position(u64::from(p.0) * 10))
        }
        fn start(&self, _: PartitionId) -> Result<Position, LogError> {
            Ok(Position(0))
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    fn slow(delay: Duration, fail: bool) -> Arc<Slow> {
        Arc::new(Slow {
            delay,
            fail,
            calls: Default::default(),
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn readiness_reads_the_log_ends_off_the_runtime_and_gives_up_in_time() {
        let all = || (0..3).map(PartitionId).collect::<Vec<_>>();
        let ends = log_ends(slow(Duration::ZERO, false), all()).await.unwrap();
        assert_eq!(ends.get(&PartitionId(2)), Some(&Position(20)));
        // A broker that does not answer: the single runtime thread stays free
        // (the timer fires) and the answer says why.
        let t0 = Instant::now();
        let err = log_ends(slow(Duration::from_secs(4), true), all())
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(err.contains("no answer within"), "{err}");
        // One that refuses: the first failure ends the query.
        let refusing = slow(Duration::ZERO, true);
        let err = log_ends(Arc::clone(&refusing) as Arc<dyn Log>, all())
            .await
            .unwrap_err();
        assert!(err.contains("all brokers down"), "{err}");
        assert_eq!(refusing.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
