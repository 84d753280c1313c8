//! Chain checkpoints: what the engine vouched for, kept outside the log. Every time
//! the engine writes a snapshot it also appends `(position, chain head, digest)` to
//! `<snapshots>/pNNNNN/chain.ckpt`; snapshots are pruned (the newest three stay),
//! the checkpoint file is not, so every position the engine ever snapshotted stays
//! a reference for `replay --verify` and `audit verify`.
//!
//! ```text
//! chain.ckpt = entry*
//! entry      = position u64 | chain head [32] | state digest [32] | crc32c u32 (of the 72 bytes)
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{AuditError, io_err, partition_name};
use crate::record::{PartitionId, Position};
use crate::runtime::snapshot::SnapshotStore;
use crate::state::Digest;

pub const FILE: &str = "chain.ckpt";
const ENTRY: usize = 8 + 32 + 32 + 4;

/// The chain head and state digest of a partition after every record before
/// `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: Position,
    pub chain: Digest,
    pub digest: Digest,
}

fn file(snapshot_root: &Path, partition: PartitionId) -> PathBuf {
    snapshot_root.join(partition_name(partition)).join(FILE)
}

/// Appends a checkpoint durably (the snapshot store calls this).
pub fn append(
    snapshot_root: &Path,
    partition: PartitionId,
    c: &Checkpoint,
) -> Result<(), AuditError> {
    let path = file(snapshot_root, partition);
    let mut entry = Vec::with_capacity(ENTRY);
    entry.extend_from_slice(&c.position.0.to_le_bytes());
    entry.extend_from_slice(&c.chain.0);
    entry.extend_from_slice(&c.digest.0);
    let crc = crc32c::crc32c(&entry);
    entry.extend_from_slice(&crc.to_le_bytes());
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // A torn earlier append leaves a partial entry: pad it out so this one stays
    // aligned (the partial entry fails its checksum and is reported).
    let len = f.metadata().map_err(io_err("stat", &path))?.len();
    let torn = (len % ENTRY as u64) as usize;
    if torn != 0 {
        f.write_all(&vec![0; ENTRY - torn])
            .map_err(io_err("pad", &path))?;
    }
    f.write_all(&entry)
        .and_then(|_| f.sync_data())
        .map_err(io_err("append", &path))
}

/// The checkpoints of a partition in file order, and how many entries were damaged.
pub fn read(snapshot_root: &Path, partition: PartitionId) -> (Vec<Checkpoint>, usize) {
    let Ok(bytes) = fs::read(file(snapshot_root, partition)) else {
        return (Vec::new(), 0);
    };
    let mut out = Vec::new();
    let mut damaged = 0;
    for e in bytes.chunks(ENTRY) {
        if e.len() < ENTRY {
            damaged += 1;
            continue;
        }
        let crc = u32::from_le_bytes([e[72], e[73], e[74], e[75]]);
        if crc32c::crc32c(&e[..72]) != crc {
            damaged += 1;
            continue;
        }
        let mut pos = [0u8; 8];
        pos.copy_from_slice(&e[..8]);
        let mut chain = [0u8; 32];
        chain.copy_from_slice(&e[8..40]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&e[40..72]);
        out.push(Checkpoint {
            position: Position(u64::from_le_bytes(pos)),
            chain: Digest(chain),
            digest: Digest(digest),
        });
    }
    (out, damaged)
}

/// A point where the engine recorded what the log must fold to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub position: Position,
    pub chain: Digest,
    pub digest: Digest,
    /// Where it came from, for messages.
    pub source: String,
}

/// Every reference of a partition, by position: snapshot files and the checkpoint
/// file. `problems` lists what could not be used (damaged files, references that
/// contradict each other at one position).
#[derive(Debug, Clone, Default)]
pub struct References {
    pub points: Vec<Reference>,
    pub problems: Vec<String>,
}

impl References {
    pub fn load(snapshot_root: &Path, partition: PartitionId) -> References {
        let mut out = References::default();
        let store = SnapshotStore::new(snapshot_root);
        for (_, path) in store.list(partition) {
            match SnapshotStore::read(&path) {
                Ok(s) if s.partition == partition => out.points.push(Reference {
                    position: s.position,
                    chain: s.chain.head(),
                    digest: s.digest,
                    source: format!("snapshot {}", path.display()),
                }),
                Ok(s) => out.problems.push(format!(
                    "snapshot {} belongs to partition {}",
                    path.display(),
                    s.partition
                )),
                Err(e) => out.problems.push(e.to_string()),
            }
        }
        let (checkpoints, damaged) = read(snapshot_root, partition);
        if damaged > 0 {
            out.problems.push(format!(
                "{damaged} damaged entries in {}",
                file(snapshot_root, partition).display()
            ));
        }
        let ckpt = file(snapshot_root, partition);
        for c in checkpoints {
            out.points.push(Reference {
                position: c.position,
                chain: c.chain,
                digest: c.digest,
                source: format!("checkpoint in {}", ckpt.display()),
            });
        }
        out.points.sort_by_key(|r| r.position);
        let mut kept: Vec<Reference> = Vec::with_capacity(out.points.len());
        for r in std::mem::take(&mut out.points) {
            match kept.last() {
                Some(last) if last.position == r.position => {
                    if last.chain != r.chain || last.digest != r.digest {
                        out.problems.push(format!(
                            "{} and {} disagree about position {}",
                            last.source, r.source, r.position
                        ));
                    }
                }
                _ => kept.push(r),
            }
        }
        out.points = kept;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_append_read_back_and_survive_a_torn_entry() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = PartitionId(2);
        fs::create_dir_all(dir.path().join("p00002")).unwrap();
        let c = |n: u64| Checkpoint {
            position: Position(n),
            chain: Digest([n as u8; 32]),
            digest: Digest([n as u8 + 1; 32]),
        };
        append(dir.path(), p, &c(10)).unwrap();
        // a torn append
        let path = file(dir.path(), p);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        append(dir.path(), p, &c(20)).unwrap();
        let (got, damaged) = read(dir.path(), p);
        assert_eq!(got, vec![c(10), c(20)]);
        assert_eq!(damaged, 1);
        let refs = References::load(dir.path(), p);
        assert_eq!(refs.points.len(), 2);
        assert_eq!(refs.points[1].position, Position(20));
        assert_eq!(refs.problems.len(), 1, "{:?}", refs.problems);
    }
}
