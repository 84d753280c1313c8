//! Auditing the log: replay it into the state digest and hash chain the live engine
//! reports ([`replay`]), verify that no record was changed, dropped or reordered
//! ([`verify`], see `docs/audit.md` for exactly what is detected and how), and show
//! any task's history and state at any point ([`history`], found through a
//! per-partition task index, [`index`]).
//!
//! Everything here reads the log through the [`Log`](crate::log::Log) trait (both
//! backends) plus, for the embedded log, its segment files directly (to name
//! damaged frames). Reference points outside the log: the engine's snapshots and
//! its chain checkpoint file ([`checkpoints`]), and the seal `audit verify` keeps
//! ([`seal`]).

pub mod bound;
pub mod checkpoints;
pub mod history;
pub mod index;
pub mod replay;
pub(crate) mod scan;
pub mod seal;
pub mod verify;

use std::path::PathBuf;

pub use bound::Bound;

use crate::log::{LogError, Record};
use crate::record::{PartitionId, Position};

/// Why an audit could not run (what it found is reported, not an error).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "partition {partition} starts at position {start}: the records before it are gone, so it cannot be replayed from the beginning"
    )]
    NotFromStart {
        partition: PartitionId,
        start: Position,
    },
}

pub(crate) fn io_err(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> AuditError + use<> {
    let path = path.to_owned();
    move |source| AuditError::Io { op, path, source }
}

/// A short hash of everything a record is (key, time, headers, payload), for the
/// seal and the task index. The hash chain covers payloads only; this also covers
/// the headers, so a changed header is found too.
pub fn record_hash(record: &Record) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(record.key.as_bytes());
    h.update(&record.timestamp.as_millis().to_le_bytes());
    let headers = &record.headers;
    h.update(&[
        headers.content_type.code(),
        headers.kind.map_or(0, |k| k.code()),
        headers.record_type.map_or(0, |t| t.code()),
    ]);
    h.update(&headers.schema.to_le_bytes());
    match &headers.namespace {
        Some(ns) => {
            h.update(&[1]);
            h.update(&(ns.len() as u64).to_le_bytes());
            h.update(ns);
        }
        None => {
            h.update(&[0]);
        }
    }
    h.update(&record.payload);
    let b = h.finalize();
    let b = b.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// `p00003`: the per-partition name used by every audit file.
pub(crate) fn partition_name(p: PartitionId) -> String {
    format!("p{:05}", p.0)
}
