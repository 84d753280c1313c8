//! Where read models live: PostgreSQL, or SQLite for the embedded default. One
//! enum so the projector and the queries are written once.

use tasker_engine::record::{Epoch, PartitionId, Position, Timestamp};

use crate::batch::Batch;
use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;

/// How far a projector got in one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every record before this position is in the read model.
    pub position: Position,
    pub epoch: Epoch,
    pub events: u64,
    pub last_event_at: Option<Timestamp>,
    /// The position and BLAKE3 of the payload of the record at `position - 1`,
    /// to tell this log from another; `None` before the first batch, or when the
    /// checkpoint was last moved by a projector that does not record it.
    pub last_record: Option<(Position, [u8; 32])>,
}

/// A checkpoint's `last_record` from its columns, if they are whole.
pub(crate) fn last_record(
    hash: Option<Vec<u8>>,
    position: Option<i64>,
) -> Option<(Position, [u8; 32])> {
    let hash = <[u8; 32]>::try_from(hash?.as_slice()).ok()?;
    Some((Position(u64::try_from(position?).ok()?), hash))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the read-model database: {0}")]
    Connect(String),
    #[error("cannot migrate the read-model database: {0}")]
    Migrate(String),
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "partition {partition}: the checkpoint moved to {found} (expected {expected}); another projector is writing"
    )]
    CheckpointMoved {
        partition: PartitionId,
        expected: Position,
        found: Position,
    },
}

impl StoreError {
    /// Worth retrying after a pause (connection drops, serialization failures).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => !matches!(
                e,
                sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. }
            ),
            StoreError::Connect(_) => true,
            StoreError::Migrate(_) | StoreError::CheckpointMoved { .. } => false,
        }
    }
}

/// A read-model database.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl Store {
    /// `postgres://...` or `sqlite://path` (created if missing).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect(url).await?))
        } else {
            Ok(Store::Sqlite(SqliteStore::open(url).await?))
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.migrate().await,
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    pub async fn checkpoint(
        &self,
        projector: &str,
        partition: PartitionId,
    ) -> Result<Checkpoint, StoreError> {
        match self {
            Store::Postgres(s) => s.checkpoint(projector, partition).await,
            Store::Sqlite(s) => s.checkpoint(projector, partition).await,
        }
    }

    pub async fn apply(
        &self,
        projector: &str,
        start: Position,
        batch: &Batch,
    ) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.apply(projector, start, batch).await,
            Store::Sqlite(s) => s.apply(projector, start, batch).await,
        }
    }

    pub async fn reset(&self, projector: &str) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.reset(projector).await,
            Store::Sqlite(s) => s.reset(projector).await,
        }
    }
}
