//! State snapshots on disk, so a restart folds only what was written after one.
//!
//! ```text
//! <dir>/p00003/00000000000001234567.snap    state as of position 1234567
//! <dir>/p00003/00000000000001290001.delta   changes from the snapshot or delta
//!                                           it names (its base) to 1290001
//! file = magic "TSKRSNAP" | "TSKRDLTA" | version u16 = 1 | crc32c u32 (of payload)
//!        | len u64 | payload
//! ```
//! Written to a temporary file, fsynced, then renamed. A delta holds only the
//! tasks changed since its base (finished tasks kept for the retention window
//! are written once, not at every snapshot); a full snapshot starts a new chain
//! when the deltas since the last one add up to the state's size (or number
//! 64), so a restart reads at most about twice a full snapshot. The newest
//! three full snapshots and the deltas after the oldest of them are kept. A
//! damaged file is skipped for an older snapshot (or a full replay), never
//! trusted. Temporary files a crash left are removed by the next snapshot.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pacing::{self, BACKGROUND_SHARE, PACE_BYTES, Paced};
use crate::codec;
use crate::record::{PartitionId, Position};
use crate::state::{Digest, EncodedState, HashChain, State, StateDelta, StateSnapshot, Written};

const MAGIC: &[u8; 8] = b"TSKRSNAP";
const DELTA_MAGIC: &[u8; 8] = b"TSKRDLTA";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 4 + 8;
const KEEP: usize = 3;
/// Deltas in one chain, at most: a quiet partition's deltas are tiny and would
/// never add up to the state's size.
const MAX_DELTAS: u32 = 64;

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

/// What a delta file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaFile {
    pub partition: PartitionId,
    pub position: Position,
    pub chain: HashChain,
    pub digest: Digest,
    /// The snapshot or delta this one applies to.
    pub base: Position,
    pub delta: StateDelta,
}

/// A full snapshot or a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SnapshotKind {
    Full,
    Delta,
}

impl SnapshotKind {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            SnapshotKind::Full => MAGIC,
            SnapshotKind::Delta => DELTA_MAGIC,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            SnapshotKind::Full => "snap",
            SnapshotKind::Delta => "delta",
        }
    }
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
        let payload = codec::canonical_bytes(&file).map_err(|e| SnapshotError::Damaged {
            path: self.partition_dir(file.partition),
            reason: e.to_string(),
        })?;
        self.write_parts(
            SnapshotKind::Full,
            file.partition,
            file.position,
            file.chain,
            file.digest,
            [&*payload].into_iter(),
        )
    }

    /// Writes a snapshot whose state was encoded from a [`SnapshotCache`] (the
    /// same file as [`SnapshotStore::write`] of the state it stands for).
    ///
    /// [`SnapshotCache`]: crate::state::SnapshotCache
    pub fn write_encoded(
        &self,
        partition: PartitionId,
        position: Position,
        chain: HashChain,
        state: &EncodedState<'_>,
    ) -> Result<PathBuf, SnapshotError> {
        // A struct encodes as its fields one after another: the file's fields
        // before `state`, then the state's own bytes.
        let head = self.encode_head(partition, &(partition, position, &chain, &state.digest))?;
        self.write_parts(
            SnapshotKind::Full,
            partition,
            position,
            chain,
            state.digest,
            std::iter::once(&*head).chain(state.parts()),
        )
    }

    /// Writes an encoded state as the next link of its chain: a delta from the
    /// last one written while the deltas since the chain's full snapshot add up
    /// to less than the whole state (and number fewer than [`MAX_DELTAS`]),
    /// else a full snapshot, which starts a new chain (so a restart reads at
    /// most the chain's full snapshot plus about one state's worth of deltas,
    /// in a bounded number of files). Returns the file and what the cache
    /// records as written.
    pub fn write_next(
        &self,
        partition: PartitionId,
        position: Position,
        chain: HashChain,
        state: &EncodedState<'_>,
    ) -> Result<(PathBuf, Written), SnapshotError> {
        match state.base {
            Some(base) if delta_follows(&base, state.delta_size(), state.size()) => {
                let path = self.write_delta(partition, position, chain, base.position, state)?;
                let next = Written {
                    position,
                    deltas: base.deltas + 1,
                    delta_bytes: base.delta_bytes + state.delta_size(),
                };
                Ok((path, next))
            }
            _ => {
                let path = self.write_encoded(partition, position, chain, state)?;
                let next = Written {
                    position,
                    deltas: 0,
                    delta_bytes: 0,
                };
                Ok((path, next))
            }
        }
    }

    /// Writes the delta of an encoded state from the snapshot at `base`.
    pub fn write_delta(
        &self,
        partition: PartitionId,
        position: Position,
        chain: HashChain,
        base: Position,
        state: &EncodedState<'_>,
    ) -> Result<PathBuf, SnapshotError> {
        let head = self.encode_head(
            partition,
            &(partition, position, &chain, &state.digest, base),
        )?;
        self.write_parts(
            SnapshotKind::Delta,
            partition,
            position,
            chain,
            state.digest,
            std::iter::once(&*head).chain(state.delta_parts()),
        )
    }

    fn encode_head<T: Serialize>(
        &self,
        partition: PartitionId,
        fields: &T,
    ) -> Result<Vec<u8>, SnapshotError> {
        codec::canonical_bytes(fields).map_err(|e| SnapshotError::Damaged {
            path: self.partition_dir(partition),
            reason: e.to_string(),
        })
    }

    /// Writes a payload given in parts (checksummed and written one by one, so
    /// no buffer the size of the payload is made) durably, then prunes old ones.
    fn write_parts<'p>(
        &self,
        kind: SnapshotKind,
        partition: PartitionId,
        position: Position,
        chain: HashChain,
        digest: Digest,
        parts: impl Iterator<Item = &'p [u8]> + Clone,
    ) -> Result<PathBuf, SnapshotError> {
        let checkpoint = crate::audit::checkpoints::Checkpoint {
            position,
            chain: chain.head(),
            digest,
        };
        let dir = self.partition_dir(partition);
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { op, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let (crc, len) = parts.clone().fold((0u32, 0u64), |(crc, len), part| {
            (crc32c::crc32c_append(crc, part), len + part.len() as u64)
        });
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(kind.magic());
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        let path = dir.join(format!("{:020}.{}", position.0, kind.extension()));
        let tmp = path.with_extension(format!("{}.tmp", kind.extension()));
        fs::File::create(&tmp)
            .and_then(|f| {
                use std::io::Write;
                let paced = Paced::new(f, PACE_BYTES).with_duty(BACKGROUND_SHARE);
                let mut out = std::io::BufWriter::with_capacity(1 << 20, paced);
                out.write_all(&header)?;
                for part in parts {
                    out.write_all(part)?;
                }
                out.into_inner()
                    .map_err(std::io::IntoInnerError::into_error)?
                    .into_inner()
                    .sync_all()
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
        self.prune(partition);
        Ok(path)
    }

    /// Removes full snapshots beyond the newest [`KEEP`], the deltas no kept
    /// snapshot starts a chain for, and temporary files a crash left behind
    /// (only this thread writes the partition's snapshots, and its own file
    /// is renamed by now). Files shrink a step at a time before they go, so the
    /// device's discard does not hold the log's syncs (see [`pacing`]).
    fn prune(&self, partition: PartitionId) {
        let leftovers = fs::read_dir(self.partition_dir(partition))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"));
        for path in leftovers {
            remove(&path);
        }
        let full = self.list(partition);
        let Some(oldest_kept) = full.get(full.len().saturating_sub(KEEP)).map(|f| f.0) else {
            return;
        };
        for (_, path) in full.into_iter().rev().skip(KEEP) {
            remove(&path);
        }
        for (_, path) in self
            .files(partition, SnapshotKind::Delta)
            .into_iter()
            .filter(|d| d.0 < oldest_kept)
        {
            remove(&path);
        }
    }

    /// Full snapshot files of a partition, oldest first, with their positions.
    pub fn list(&self, partition: PartitionId) -> Vec<(Position, PathBuf)> {
        self.files(partition, SnapshotKind::Full)
    }

    /// Snapshot files of one kind, oldest first, with their positions.
    pub fn files(&self, partition: PartitionId, kind: SnapshotKind) -> Vec<(Position, PathBuf)> {
        let dir = self.partition_dir(partition);
        let suffix = format!(".{}", kind.extension());
        let mut out: Vec<(Position, PathBuf)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let pos = name.strip_suffix(&suffix)?.parse::<u64>().ok()?;
                Some((Position(pos), e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Snapshot files of both kinds, oldest first.
    pub fn all_files(&self, partition: PartitionId) -> Vec<(Position, SnapshotKind, PathBuf)> {
        let mut all: Vec<_> = [SnapshotKind::Full, SnapshotKind::Delta]
            .into_iter()
            .flat_map(|kind| {
                self.files(partition, kind)
                    .into_iter()
                    .map(move |(position, path)| (position, kind, path))
            })
            .collect();
        all.sort();
        all
    }

    /// Reads and checks one snapshot file.
    pub fn read(path: &Path) -> Result<SnapshotFile, SnapshotError> {
        read_file(path, SnapshotKind::Full)
    }

    /// Reads and checks one delta file.
    pub fn read_delta(path: &Path) -> Result<DeltaFile, SnapshotError> {
        read_file(path, SnapshotKind::Delta)
    }

    /// The snapshot a file stands for: a full one as read, a delta applied to
    /// the chain it ends (every link read and checked).
    pub fn load(
        &self,
        partition: PartitionId,
        kind: SnapshotKind,
        path: &Path,
    ) -> Result<SnapshotFile, SnapshotError> {
        let mut deltas = Vec::new();
        let mut next = (kind, path.to_owned());
        let full = loop {
            match next.0 {
                SnapshotKind::Full => break SnapshotStore::read(&next.1)?,
                SnapshotKind::Delta => {
                    let delta = SnapshotStore::read_delta(&next.1)?;
                    let base =
                        self.find(partition, delta.base)
                            .ok_or_else(|| SnapshotError::Damaged {
                                path: next.1.clone(),
                                reason: format!("its base snapshot at {} is missing", delta.base),
                            })?;
                    // Positions only decrease along a chain, so it ends.
                    if base.1 >= delta.position {
                        return Err(SnapshotError::Damaged {
                            path: next.1,
                            reason: format!("its base {} is not before it", delta.base),
                        });
                    }
                    deltas.push((next.1, delta));
                    next = (base.0, base.2);
                }
            }
        };
        let mut file = full;
        for (path, delta) in deltas.into_iter().rev() {
            if delta.partition != file.partition || delta.base != file.position {
                return Err(SnapshotError::Damaged {
                    path,
                    reason: "it does not follow its base".into(),
                });
            }
            if file.state.apply(delta.delta).is_none() {
                return Err(SnapshotError::Damaged {
                    path,
                    reason: "its templates or evictions do not follow its base's".into(),
                });
            }
            file.position = delta.position;
            file.chain = delta.chain;
            file.digest = delta.digest;
        }
        Ok(file)
    }

    /// The file of either kind at a position.
    fn find(
        &self,
        partition: PartitionId,
        position: Position,
    ) -> Option<(SnapshotKind, Position, PathBuf)> {
        [SnapshotKind::Full, SnapshotKind::Delta]
            .into_iter()
            .find_map(|kind| {
                let path = self.partition_dir(partition).join(format!(
                    "{:020}.{}",
                    position.0,
                    kind.extension()
                ));
                path.exists().then_some((kind, position, path))
            })
    }

    /// The newest snapshot (full, or a delta applied to its chain) that reads
    /// back whole and whose state matches its digest.
    pub fn latest(&self, partition: PartitionId) -> Option<(Restored, State)> {
        for (_, kind, path) in self.all_files(partition).into_iter().rev() {
            match self.load(partition, kind, &path) {
                Ok(file) if file.partition == partition => {
                    let restored = Restored {
                        position: file.position,
                        chain: file.chain,
                        digest: file.digest,
                    };
                    let Some(state) = State::from_snapshot(file.state) else {
                        tracing::warn!(file = %path.display(), "snapshot is inconsistent; trying an older one");
                        continue;
                    };
                    if state.digest() != restored.digest {
                        tracing::warn!(file = %path.display(), "snapshot digest mismatch; trying an older one");
                        continue;
                    }
                    return Some((restored, state));
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

/// Where a restored state stands: the fold of every record before `position`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub position: Position,
    pub chain: HashChain,
    pub digest: Digest,
}

/// Whether the next snapshot may be a delta after `base`: the chain's deltas,
/// this one included, stay within the state's size and [`MAX_DELTAS`].
fn delta_follows(base: &Written, delta_size: u64, state_size: u64) -> bool {
    base.deltas < MAX_DELTAS && base.delta_bytes + delta_size <= state_size
}

/// Reads a file of either kind: header, length and checksum checked, payload
/// decoded.
fn read_file<T: serde::de::DeserializeOwned>(
    path: &Path,
    kind: SnapshotKind,
) -> Result<T, SnapshotError> {
    let bytes = fs::read(path).map_err(|source| SnapshotError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })?;
    let damaged = |reason: String| SnapshotError::Damaged {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < HEADER || &bytes[..8] != kind.magic() {
        return Err(damaged(format!(
            "not a Tasker {}",
            match kind {
                SnapshotKind::Full => "snapshot",
                SnapshotKind::Delta => "snapshot delta",
            }
        )));
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

/// Removes a pruned snapshot file; one that cannot be removed is reported and
/// tried again at the next prune.
fn remove(path: &Path) {
    match pacing::remove_gently(path, pacing::STEP_BYTES, pacing::STEP_PAUSE) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove an old snapshot")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_ends_at_the_state_size_or_the_delta_count() {
        let base = |deltas, delta_bytes| Written {
            position: Position(1),
            deltas,
            delta_bytes,
        };
        assert!(delta_follows(&base(0, 0), 100, 1_000));
        assert!(delta_follows(&base(5, 900), 100, 1_000));
        assert!(!delta_follows(&base(5, 901), 100, 1_000));
        assert!(delta_follows(&base(MAX_DELTAS - 1, 0), 1, 1_000));
        assert!(!delta_follows(&base(MAX_DELTAS, 0), 1, 1_000));
    }
}
