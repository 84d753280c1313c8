//! State snapshots on disk, so a restart folds only what was written after one.
//!
//! ```text
//! <dir>/p00003/00000000000001234567.snap   state as of position 1234567
//! file = magic "TSKRSNAP" | version u16 = 1 | crc32c u32 (of payload) | len u64 | payload
//! ```
//! Written to a temporary file, fsynced, then renamed; the newest three are kept.
//! A damaged snapshot is skipped for an older one (or a full replay), never trusted.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::record::{PartitionId, Position};
use crate::state::{Digest, HashChain, State, StateSnapshot};

const MAGIC: &[u8; 8] = b"TSKRSNAP";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 4 + 8;
const KEEP: usize = 3;

/// What a snapshot file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub partition: PartitionId,
    /// The state is the fold of every record before this position.
    pub position: Position,
    pub chain: HashChain,
    pub digest: Digest,
    pub state: StateSnapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
}

/// Snapshots of every partition under one directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SnapshotStore { dir: dir.into() }
    }

    fn partition_dir(&self, p: PartitionId) -> PathBuf {
        self.dir.join(format!("p{:05}", p.0))
    }

    /// Writes a snapshot of `state` at `position` durably, then prunes old ones.
    pub fn write_state(
        &self,
        partition: PartitionId,
        position: Position,
        chain: HashChain,
        state: &State,
    ) -> Result<PathBuf, SnapshotError> {
        self.write(SnapshotFile {
            partition,
            position,
            chain,
            digest: state.digest(),
            state: state.to_snapshot(),
        })
    }

    /// Writes a snapshot file durably, then prunes old ones.
    pub fn write(&self, file: SnapshotFile) -> Result<PathBuf, SnapshotError> {
        let (partition, position) = (file.partition, file.position);
        let checkpoint = crate::audit::checkpoints::Checkpoint {
            position,
            chain: file.chain.head(),
            digest: file.digest,
        };
        let dir = self.partition_dir(partition);
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { op, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let payload = codec::canonical_bytes(&file).map_err(|e| SnapshotError::Damaged {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let path = dir.join(format!("{:020}.snap", position.0));
        let tmp = path.with_extension("snap.tmp");
        // Header and payload written apart: no second buffer the size of the
        // payload (tens to hundreds of megabytes for a large state).
        fs::File::create(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(&header)?;
                f.write_all(&payload)?;
                f.sync_all()
            })
            .map_err(io("write and sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &dir))?;
        // The chain checkpoint outlives the snapshot (audits compare against it).
        if let Err(e) = crate::audit::checkpoints::append(&self.dir, partition, &checkpoint) {
            tracing::warn!(error = %e, "cannot append the chain checkpoint");
        }
        for old in self.list(partition).into_iter().rev().skip(KEEP) {
            let _ = fs::remove_file(old.1);
        }
        Ok(path)
    }

    /// Snapshot files of a partition, oldest first, with their positions.
    pub fn list(&self, partition: PartitionId) -> Vec<(Position, PathBuf)> {
        let dir = self.partition_dir(partition);
        let mut out: Vec<(Position, PathBuf)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let pos = name.strip_suffix(".snap")?.parse::<u64>().ok()?;
                Some((Position(pos), e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Reads and checks one snapshot file.
    pub fn read(path: &Path) -> Result<SnapshotFile, SnapshotError> {
        let bytes = fs::read(path).map_err(|source| SnapshotError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        let damaged = |reason: String| SnapshotError::Damaged {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(damaged("not a Tasker snapshot".into()));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(damaged(format!("unsupported snapshot version {version}")));
        }
        let crc = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[14..22]);
        let payload = &bytes[HEADER..];
        if u64::from_le_bytes(len) != payload.len() as u64 {
            return Err(damaged("truncated".into()));
        }
        if crc32c::crc32c(payload) != crc {
            return Err(damaged("checksum mismatch".into()));
        }
        codec::from_canonical_bytes(payload).map_err(|e| damaged(e.to_string()))
    }

    /// The newest snapshot that reads back whole and whose state matches its digest.
    pub fn latest(&self, partition: PartitionId) -> Option<(SnapshotFile, State)> {
        for (_, path) in self.list(partition).into_iter().rev() {
            match SnapshotStore::read(&path) {
                Ok(file) if file.partition == partition => {
                    let Some(state) = State::from_snapshot(file.state.clone()) else {
                        tracing::warn!(file = %path.display(), "snapshot is inconsistent; trying an older one");
                        continue;
                    };
                    if state.digest() != file.digest {
                        tracing::warn!(file = %path.display(), "snapshot digest mismatch; trying an older one");
                        continue;
                    }
                    return Some((file, state));
                }
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "snapshot of another partition; ignored")
                }
                Err(e) => tracing::warn!(error = %e, "skipping snapshot"),
            }
        }
        None
    }
}
