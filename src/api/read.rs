//! Read-model queries the API needs that `tasker_projections::read_model` does not
//! offer (yet): listing tasks with filters and a keyset cursor, a task's
//! transitions (its history), its DAG edges, and whether every migration this
//! binary knows is applied. Values are always bound, never formatted in. These
//! belong in the projections crate; they live here until it grows them.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::migrate::Migrator;
use tasker_engine::record::{TaskId, Timestamp};
use tasker_projections::{Store, StoreError};
use uuid::Uuid;

/// Filters of `GET /v1/tasks` as the read model sees them.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Tasks accepted at or after this time.
    pub since: Option<Timestamp>,
    /// Only task ids below this one (the keyset cursor; newest first).
    pub before: Option<TaskId>,
    /// Only these namespaces (a principal's scope); `None` is every namespace.
    pub namespaces: Option<Vec<String>>,
}

/// A task row without its context and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedTask {
    pub task_id: TaskId,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: String,
    pub requested_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub correlation_id: Uuid,
}

/// One task or step transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub partition: u32,
    pub position: u64,
    pub occurred_at: Timestamp,
    pub event_type: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub metadata: serde_json::Value,
    pub step_index: Option<u32>,
    pub step_name: Option<String>,
}

const LIST_COLUMNS_PG: &str = "
    SELECT t.task_id, n.name AS namespace, nt.name, nt.version, t.status,
           tasker_ts_to_ms(t.requested_at) AS requested_at,
           tasker_ts_to_ms(t.started_at) AS started_at,
           tasker_ts_to_ms(t.completed_at) AS completed_at,
           t.initiator, t.source_system, t.reason, t.tags::text AS tags, t.idempotency_key,
           t.correlation_id
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE ($1::text IS NULL OR t.status = $1)
      AND ($2::text IS NULL OR n.name = $2)
      AND ($3::text IS NULL OR nt.name = $3)
      AND ($4::bigint IS NULL OR t.requested_at >= tasker_ms_to_ts($4))
      AND ($5::uuid IS NULL OR t.task_id < $5)
      AND ($6::text[] IS NULL OR n.name = ANY($6))
    ORDER BY t.task_id DESC
    LIMIT $7";

const LIST_LITE: &str = "
    SELECT t.task_id, n.name AS namespace, nt.name, nt.version, t.status,
           t.requested_at, t.started_at, t.completed_at,
           t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key, t.correlation_id
    FROM tasker_tasks t
    JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
    JOIN tasker_task_namespaces n ON n.task_namespace_id = nt.task_namespace_id
    WHERE (?1 IS NULL OR t.status = ?1)
      AND (?2 IS NULL OR n.name = ?2)
      AND (?3 IS NULL OR nt.name = ?3)
      AND (?4 IS NULL OR t.requested_at >= ?4)
      AND (?5 IS NULL OR t.task_id < ?5)
      AND (?6 IS NULL OR n.name IN (SELECT value FROM json_each(?6)))
    ORDER BY t.task_id DESC
    LIMIT ?7";

const HISTORY_PG: &str = "
    SELECT x.* FROM (
        SELECT tt.sort_key, tt.log_partition, tt.log_position,
               tasker_ts_to_ms(tt.occurred_at) AS occurred_at, tt.event_type, tt.from_state,
               tt.to_state, tt.metadata::text AS metadata, NULL::integer AS step_index,
               NULL::text AS step_name
        FROM tasker_task_transitions tt WHERE tt.task_id = $1
        UNION ALL
        SELECT st.sort_key, st.log_partition, st.log_position,
               tasker_ts_to_ms(st.occurred_at) AS occurred_at, st.event_type, st.from_state,
               st.to_state, st.metadata::text AS metadata, st.step_index, s.name AS step_name
        FROM tasker_workflow_step_transitions st
        JOIN tasker_workflow_steps s ON s.task_id = st.task_id AND s.step_index = st.step_index
        WHERE st.task_id = $1
    ) x
    ORDER BY x.sort_key, x.step_index NULLS FIRST
    LIMIT 10000";

const HISTORY_LITE: &str = "
    SELECT x.* FROM (
        SELECT tt.sort_key, tt.log_partition, tt.log_position, tt.occurred_at, tt.event_type,
               tt.from_state, tt.to_state, tt.metadata, NULL AS step_index, NULL AS step_name
        FROM tasker_task_transitions tt WHERE tt.task_id = ?1
        UNION ALL
        SELECT st.sort_key, st.log_partition, st.log_position, st.occurred_at, st.event_type,
               st.from_state, st.to_state, st.metadata, st.step_index, s.name AS step_name
        FROM tasker_workflow_step_transitions st
        JOIN tasker_workflow_steps s ON s.task_id = st.task_id AND s.step_index = st.step_index
        WHERE st.task_id = ?1
    ) x
    ORDER BY x.sort_key, x.step_index NULLS FIRST
    LIMIT 10000";

const EDGES_PG: &str = "SELECT from_step, to_step FROM tasker_workflow_step_edges WHERE task_id = $1 ORDER BY to_step, from_step";
const EDGES_LITE: &str = "SELECT from_step, to_step FROM tasker_workflow_step_edges WHERE task_id = ?1 ORDER BY to_step, from_step";

static PG_MIGRATIONS: Migrator = sqlx::migrate!("./migrations");
static LITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

fn decode_err(col: &str, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Database(sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: Box::new(e),
    })
}

fn time(ms: Option<i64>) -> Option<Timestamp> {
    ms.and_then(|m| u64::try_from(m).ok())
        .map(Timestamp::from_millis)
}

fn tags(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| decode_err("tags", e))
}

/// Tasks matching `f`, newest id first, at most `limit`.
pub async fn list_tasks(
    store: &Store,
    f: &TaskFilter,
    limit: u32,
) -> Result<Vec<ListedTask>, StoreError> {
    let since = f.since.map(|t| t.as_millis() as i64);
    let limit = i64::from(limit);
    match store {
        Store::Postgres(s) => {
            let rows = sqlx::query(LIST_COLUMNS_PG)
                .bind(f.status.as_deref())
                .bind(f.namespace.as_deref())
                .bind(f.name.as_deref())
                .bind(since)
                .bind(f.before.map(|t| *t.as_uuid()))
                .bind(f.namespaces.clone())
                .bind(limit)
                .fetch_all(s.pool())
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListedTask {
                        task_id: TaskId::from_uuid(r.try_get("task_id")?),
                        namespace: r.try_get("namespace")?,
                        name: r.try_get("name")?,
                        version: r.try_get("version")?,
                        status: r.try_get("status")?,
                        requested_at: time(r.try_get("requested_at")?).unwrap_or_default(),
                        started_at: time(r.try_get("started_at")?),
                        completed_at: time(r.try_get("completed_at")?),
                        initiator: r.try_get("initiator")?,
                        source_system: r.try_get("source_system")?,
                        reason: r.try_get("reason")?,
                        tags: tags(r.try_get("tags")?)?,
                        idempotency_key: r.try_get("idempotency_key")?,
                        correlation_id: r.try_get("correlation_id")?,
                    })
                })
                .collect()
        }
        Store::Sqlite(s) => {
            let namespaces = f
                .namespaces
                .as_ref()
                .map(|n| serde_json::Value::from(n.clone()).to_string());
            let rows = sqlx::query(LIST_LITE)
                .bind(f.status.as_deref())
                .bind(f.namespace.as_deref())
                .bind(f.name.as_deref())
                .bind(since)
                .bind(f.before.map(|t| t.to_string()))
                .bind(namespaces)
                .bind(limit)
                .fetch_all(s.pool())
                .await?;
            rows.iter()
                .map(|r| {
                    let id: String = r.try_get("task_id")?;
                    let corr: String = r.try_get("correlation_id")?;
                    Ok(ListedTask {
                        task_id: id.parse().map_err(|e| decode_err("task_id", e))?,
                        namespace: r.try_get("namespace")?,
                        name: r.try_get("name")?,
                        version: r.try_get("version")?,
                        status: r.try_get("status")?,
                        requested_at: time(r.try_get("requested_at")?).unwrap_or_default(),
                        started_at: time(r.try_get("started_at")?),
                        completed_at: time(r.try_get("completed_at")?),
                        initiator: r.try_get("initiator")?,
                        source_system: r.try_get("source_system")?,
                        reason: r.try_get("reason")?,
                        tags: tags(r.try_get("tags")?)?,
                        idempotency_key: r.try_get("idempotency_key")?,
                        correlation_id: corr
                            .parse()
                            .map_err(|e| decode_err("correlation_id", e))?,
                    })
                })
                .collect()
        }
    }
}

/// A task's transitions in log order (task-level first within one position).
pub async fn history(store: &Store, id: TaskId) -> Result<Vec<Transition>, StoreError> {
    fn meta(text: Option<String>) -> Result<serde_json::Value, StoreError> {
        text.map(|t| serde_json::from_str(&t).map_err(|e| decode_err("metadata", e)))
            .transpose()
            .map(|v| v.unwrap_or(serde_json::Value::Null))
    }
    fn small(v: Option<i64>) -> Option<u32> {
        v.and_then(|v| u32::try_from(v).ok())
    }
    match store {
        Store::Postgres(s) => {
            let rows = sqlx::query(HISTORY_PG)
                .bind(*id.as_uuid())
                .fetch_all(s.pool())
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(Transition {
                        partition: r.try_get::<i32, _>("log_partition")? as u32,
                        position: r.try_get::<i64, _>("log_position")? as u64,
                        occurred_at: time(r.try_get("occurred_at")?).unwrap_or_default(),
                        event_type: r.try_get("event_type")?,
                        from_state: r.try_get("from_state")?,
                        to_state: r.try_get("to_state")?,
                        metadata: meta(r.try_get("metadata")?)?,
                        step_index: small(
                            r.try_get::<Option<i32>, _>("step_index")?.map(i64::from),
                        ),
                        step_name: r.try_get("step_name")?,
                    })
                })
                .collect()
        }
        Store::Sqlite(s) => {
            let rows = sqlx::query(HISTORY_LITE)
                .bind(id.to_string())
                .fetch_all(s.pool())
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(Transition {
                        partition: r.try_get::<i64, _>("log_partition")? as u32,
                        position: r.try_get::<i64, _>("log_position")? as u64,
                        occurred_at: time(r.try_get("occurred_at")?).unwrap_or_default(),
                        event_type: r.try_get("event_type")?,
                        from_state: r.try_get("from_state")?,
                        to_state: r.try_get("to_state")?,
                        metadata: meta(r.try_get("metadata")?)?,
                        step_index: small(r.try_get("step_index")?),
                        step_name: r.try_get("step_name")?,
                    })
                })
                .collect()
        }
    }
}

/// A task's DAG edges `(parent, child)` by step index.
pub async fn edges(store: &Store, id: TaskId) -> Result<Vec<(u32, u32)>, StoreError> {
    let pairs: Vec<(i64, i64)> = match store {
        Store::Postgres(s) => sqlx::query(EDGES_PG)
            .bind(*id.as_uuid())
            .fetch_all(s.pool())
            .await?
            .iter()
            .map(|r| {
                Ok((
                    i64::from(r.try_get::<i32, _>("from_step")?),
                    i64::from(r.try_get::<i32, _>("to_step")?),
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?,
        Store::Sqlite(s) => sqlx::query(EDGES_LITE)
            .bind(id.to_string())
            .fetch_all(s.pool())
            .await?
            .iter()
            .map(|r| Ok((r.try_get("from_step")?, r.try_get("to_step")?)))
            .collect::<Result<_, sqlx::Error>>()?,
    };
    Ok(pairs
        .into_iter()
        .map(|(a, b)| (a as u32, b as u32))
        .collect())
}

/// Migrations this binary ships that the database has not applied successfully.
pub async fn missing_migrations(store: &Store) -> Result<Vec<String>, StoreError> {
    let (migrator, applied): (&Migrator, BTreeSet<i64>) = match store {
        Store::Postgres(s) => (
            &PG_MIGRATIONS,
            sqlx::query("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(s.pool())
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("version"))
                .collect::<Result<_, _>>()?,
        ),
        Store::Sqlite(s) => (
            &LITE_MIGRATIONS,
            sqlx::query("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(s.pool())
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("version"))
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{}_{}", m.version, m.description))
        .collect())
}
