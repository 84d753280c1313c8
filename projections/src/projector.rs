//! The projector: reads a partition's records from its checkpoint, folds runs of
//! them into batches (bounded by size and time), and writes each batch with its
//! checkpoint in one transaction. A crash anywhere leaves the read model as if the
//! batch never happened; a restart continues from the checkpoint, so there are no
//! gaps and nothing counts twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tasker_engine::codec;
use tasker_engine::log::{Log, LogError, StoredRecord};
use tasker_engine::record::{ContentType, Kind, PartitionId, Position, Timestamp};

use crate::batch::Batch;
use crate::store::{Store, StoreError};

/// How a projector batches.
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    /// The checkpoint name (several projections could read one log).
    pub name: String,
    /// Records per batch, at most.
    pub max_records: usize,
    /// How long a partial batch may wait for more records.
    pub max_delay: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            name: "read_model".into(),
            max_records: 10_000,
            max_delay: Duration::from_millis(50),
        }
    }
}

/// Why a projector stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The read model was projected from another log (a recreated topic, a wiped
    /// data directory): projecting this one from the checkpoint would skip its
    /// first records. Rebuild the read model (`tasker project --rebuild`) or use
    /// another database.
    #[error(
        "partition {partition}: the read model was projected from another log: {detail}; \
         rebuild it (`tasker project --rebuild`) or point this log at another database"
    )]
    OtherLog {
        partition: PartitionId,
        detail: String,
    },
}

/// Lag and progress of one partition's projector, readable from any thread.
#[derive(Debug, Default)]
pub struct Progress {
    /// Every record before this position is in the read model.
    pub position: AtomicU64,
    /// Records the log holds beyond the checkpoint, as of the last look.
    pub lag_records: AtomicU64,
    /// Log time of the newest projected event, in ms.
    pub last_event_at: AtomicI64,
    pub events: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
    /// Why the projector stopped, once it has stopped on an error.
    pub failed: std::sync::OnceLock<String>,
    /// The checkpoint was found to follow this log: from here on `position` is
    /// this log's.
    pub checked: AtomicBool,
}

/// Projects one partition until `stop` is set (or forever). If another projector
/// moves the checkpoint under this one, it starts over from the new checkpoint:
/// the comparison in the write transaction means nothing is applied twice.
pub async fn run_partition(
    store: Store,
    log: Arc<dyn Log>,
    partition: PartitionId,
    options: ProjectorOptions,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> Result<(), ProjectorError> {
    loop {
        let run = project_from_checkpoint(
            store.clone(),
            Arc::clone(&log),
            partition,
            options.clone(),
            Arc::clone(&progress),
            Arc::clone(&stop),
        )
        .await;
        match run {
            Err(ProjectorError::Store(StoreError::CheckpointMoved { found, .. })) => {
                tracing::info!(%partition, %found, "another projector moved the checkpoint; continuing from it");
            }
            other => return other,
        }
    }
}

async fn project_from_checkpoint(
    store: Store,
    log: Arc<dyn Log>,
    partition: PartitionId,
    options: ProjectorOptions,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> Result<(), ProjectorError> {
    let stop_reader = Arc::new(AtomicBool::new(false));
    let mut checkpoint = with_retry(&progress, &stop, StoreError::is_transient, || {
        store.checkpoint(&options.name, partition)
    })
    .await?;
    progress
        .position
        .store(checkpoint.position.0, Ordering::Relaxed);
    // The log may be unreachable for a while (a broker restarting): retried like
    // the store; only another log stops the projector.
    let check = || {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        let (at, last_record) = (checkpoint.position, checkpoint.last_record);
        async move {
            tokio::task::spawn_blocking(move || {
                same_log(log.as_ref(), partition, at, last_record, &stop)
            })
            .await
            .unwrap_or_else(|e| Err(LogError::Config(format!("the log check stopped: {e}")).into()))
        }
    };
    let is_log = |e: &ProjectorError| matches!(e, ProjectorError::Log(_));
    match with_retry(&progress, &stop, is_log, check).await {
        Ok(()) => progress.checked.store(true, Ordering::Relaxed),
        Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
        Err(e) => return Err(e),
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<StoredRecord>, LogError>>(8);
    let reader_stop = Arc::clone(&stop_reader);
    let outer_stop = Arc::clone(&stop);
    let mut reader = log.reader(partition, checkpoint.position)?;
    // Log reads block: they run on their own thread and hand batches over.
    let reader_thread = std::thread::Builder::new()
        .name(format!("tasker-proj{}", partition.0))
        .spawn(move || {
            while !reader_stop.load(Ordering::Relaxed) && !outer_stop.load(Ordering::Relaxed) {
                match reader.poll(8192, Duration::from_millis(100)) {
                    Ok(b) if b.is_empty() => {}
                    Ok(b) => {
                        if tx.blocking_send(Ok(b)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        })
        .map_err(|e| LogError::Io {
            op: "spawn projector reader",
            path: Default::default(),
            source: e,
        })?;
    let mut pending: std::collections::VecDeque<StoredRecord> = Default::default();
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let mut batch = Batch::new(partition, checkpoint.position, checkpoint.epoch);
        let mut last = None;
        let deadline = Instant::now() + options.max_delay;
        let mut records = 0usize;
        while records < options.max_records {
            if let Some(rec) = pending.pop_front() {
                add(&mut batch, &rec);
                records += 1;
                last = Some((rec.position, rec.record.payload));
                continue;
            }
            let wait = if records == 0 {
                Duration::from_millis(200)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(Ok(recs))) => pending.extend(recs),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => break,
                Err(_) => break,
            }
            if records == 0 && pending.is_empty() && stop.load(Ordering::Relaxed) {
                break;
            }
        }
        if batch.end <= checkpoint.position {
            continue;
        }
        batch.last_record = last
            .take()
            .map(|(at, payload)| (at, *blake3::hash(&payload).as_bytes()));
        let start = checkpoint.position;
        match with_retry(&progress, &stop, StoreError::is_transient, || {
            store.apply(&options.name, start, &batch)
        })
        .await
        {
            Ok(()) => {}
            Err(e) => break Err(e.into()),
        }
        checkpoint.position = batch.end;
        checkpoint.epoch = batch.epoch;
        progress.position.store(batch.end.0, Ordering::Relaxed);
        progress.events.fetch_add(batch.events, Ordering::Relaxed);
        progress.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = batch.last_event_at {
            progress
                .last_event_at
                .store(at.as_millis() as i64, Ordering::Relaxed);
        }
        // A broker round trip on Kafka: off the runtime's workers.
        let end = {
            let log = Arc::clone(&log);
            tokio::task::spawn_blocking(move || log.end(partition)).await
        };
        if let Ok(Ok(end)) = end {
            progress
                .lag_records
                .store(end.0.saturating_sub(batch.end.0), Ordering::Relaxed);
        }
    };
    stop_reader.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = tokio::task::spawn_blocking(move || reader_thread.join()).await;
    result
}

/// Checks that the record before the checkpoint is the one the checkpoint
/// follows, so a read model made from another log is not continued from this
/// one's middle. A checkpoint without the record (the first batch, or moved by a
/// projector that does not write it) is checked against the log's end only.
fn same_log(
    log: &dyn Log,
    partition: PartitionId,
    at: Position,
    last_record: Option<(Position, [u8; 32])>,
    stop: &AtomicBool,
) -> Result<(), ProjectorError> {
    if at.0 == 0 {
        return Ok(());
    }
    let end = log.end(partition)?;
    if end < at {
        return Err(ProjectorError::OtherLog {
            partition,
            detail: format!("its checkpoint is at {at}, but this log ends at {end}"),
        });
    }
    let before = Position(at.0 - 1);
    let Some(expected) = last_record.filter(|(p, _)| *p == before).map(|(_, h)| h) else {
        return Ok(());
    };
    let mut reader = log.reader(partition, before)?;
    let give_up = Instant::now() + Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() > give_up {
            // Retried by the caller, as any log failure.
            return Err(LogError::Config(format!(
                "cannot read position {before} to check the checkpoint"
            ))
            .into());
        }
        if let Some(rec) = reader.poll(1, Duration::from_millis(200))?.first() {
            if rec.position == before && *blake3::hash(&rec.record.payload).as_bytes() == expected {
                return Ok(());
            }
            return Err(ProjectorError::OtherLog {
                partition,
                detail: format!("the record at {before} is not the one its checkpoint follows"),
            });
        }
    }
    Ok(())
}

fn add(batch: &mut Batch, rec: &StoredRecord) {
    // Commands only move the checkpoint; events and control records are decoded.
    let env = match rec.record.headers.kind {
        Some(Kind::Event) | Some(Kind::Control) => codec::decode(&rec.record.payload).ok(),
        Some(Kind::Command) | None if rec.record.headers.content_type == ContentType::Bincode => {
            codec::decode(&rec.record.payload)
                .ok()
                .filter(|e| e.kind() != Kind::Command)
        }
        _ => None,
    };
    batch.add(rec.position, env.as_ref());
}

/// Retries transient failures (of the database, or of the log while the
/// checkpoint is checked) with backoff (100 ms doubling to 5 s) until they
/// succeed or the projector is stopped.
async fn with_retry<T, E, F, Fut>(
    progress: &Progress,
    stop: &AtomicBool,
    transient: fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && !stop.load(Ordering::Relaxed) => {
                progress.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?delay, "projector: retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Lag of a partition in records and seconds (against `now`), for status and metrics.
pub fn lag(progress: &Progress, now: Timestamp) -> (u64, f64) {
    let records = progress.lag_records.load(Ordering::Relaxed);
    let last = progress.last_event_at.load(Ordering::Relaxed);
    let seconds = if records == 0 || last <= 0 {
        0.0
    } else {
        now.millis_since(Timestamp::from_millis(last as u64)) as f64 / 1000.0
    };
    (records, seconds)
}

/// Start position helper for tests and tools.
pub fn start_of(log: &dyn Log, partition: PartitionId) -> Result<Position, LogError> {
    log.start(partition)
}
