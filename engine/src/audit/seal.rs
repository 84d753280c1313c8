//! The seal: what `audit verify` saw the last time it found nothing wrong. For
//! every record it verified, a 4-byte hash of the whole record ([`record_hash`]:
//! key, time, headers, payload), and at the end of each entry the chain head. A
//! later `audit verify` compares record by record, so it names the exact position
//! of a record changed, dropped or moved after it was sealed (a short hash can
//! collide; the chain head at the entry's end still catches the change, naming the
//! entry's range instead).
//!
//! ```text
//! <data_dir>/audit/pNNNNN.seal = header entry*
//! header = magic "TSKRSEAL" | version u16 = 1 | partition u32 | crc32c u32 (of the 14 bytes)
//! entry  = start u64 | count u32 | chain head after [32] | hash u32 * count | crc32c u32
//! ```
//! Entries are only appended, each after a verification without errors up to its end.
//!
//! [`record_hash`]: super::record_hash

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{AuditError, io_err, partition_name};
use crate::record::{PartitionId, Position};
use crate::state::Digest;

const MAGIC: &[u8; 8] = b"TSKRSEAL";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 4 + 4;
/// Records per entry at most (an entry is read and checked whole).
pub const MAX_ENTRY: usize = 1 << 20;

/// One sealed range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealEntry {
    pub start: Position,
    pub hashes: Vec<u32>,
    /// The chain head after the entry's last record.
    pub chain_after: Digest,
}

impl SealEntry {
    pub fn end(&self) -> Position {
        Position(self.start.0 + self.hashes.len() as u64)
    }
}

/// A partition's seal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seal {
    pub entries: Vec<SealEntry>,
}

pub fn path(audit_dir: &Path, partition: PartitionId) -> PathBuf {
    audit_dir.join(format!("{}.seal", partition_name(partition)))
}

impl Seal {
    /// Reads a partition's seal; `None` when there is none yet. A damaged seal is
    /// an error (it cannot be trusted, and must not be silently replaced).
    pub fn load(audit_dir: &Path, partition: PartitionId) -> Result<Option<Seal>, AuditError> {
        let path = path(audit_dir, partition);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let damaged = |reason: String| AuditError::Damaged {
            path: path.clone(),
            reason,
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(damaged("not a Tasker seal".into()));
        }
        let crc = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
        if crc32c::crc32c(&bytes[..14]) != crc {
            return Err(damaged("header checksum mismatch".into()));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(damaged(format!("unsupported version {version}")));
        }
        let p = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
        if p != partition.0 {
            return Err(damaged(format!("it seals partition {p}")));
        }
        let mut seal = Seal::default();
        let mut off = HEADER;
        while off < bytes.len() {
            let rest = &bytes[off..];
            if rest.len() < 8 + 4 + 32 + 4 {
                return Err(damaged(format!("truncated entry at byte {off}")));
            }
            let start = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as usize;
            let len = 8 + 4 + 32 + 4 * count + 4;
            if count > MAX_ENTRY || rest.len() < len {
                return Err(damaged(format!("truncated entry at byte {off}")));
            }
            let crc = u32::from_le_bytes(rest[len - 4..len].try_into().unwrap_or_default());
            if crc32c::crc32c(&rest[..len - 4]) != crc {
                return Err(damaged(format!("entry at byte {off} fails its checksum")));
            }
            let mut chain = [0u8; 32];
            chain.copy_from_slice(&rest[12..44]);
            let hashes = rest[44..len - 4]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let entry = SealEntry {
                start: Position(start),
                hashes,
                chain_after: Digest(chain),
            };
            if entry.start != seal.end() {
                return Err(damaged(format!(
                    "entry at byte {off} starts at position {start}, not {}",
                    seal.end()
                )));
            }
            seal.entries.push(entry);
            off += len;
        }
        Ok(Some(seal))
    }

    /// The first position not sealed.
    pub fn end(&self) -> Position {
        self.entries.last().map_or(Position(0), SealEntry::end)
    }

    /// The sealed hash of the record at `position`.
    pub fn hash_at(&self, position: Position) -> Option<u32> {
        let i = self
            .entries
            .partition_point(|e| e.end() <= position)
            .min(self.entries.len().saturating_sub(1));
        let e = self.entries.get(i)?;
        let idx = position.0.checked_sub(e.start.0)? as usize;
        e.hashes.get(idx).copied()
    }

    /// Appends entries for `hashes` (records from the seal's end on, with the chain
    /// head after each entry given by `chain_after(end)`), durably.
    pub fn extend(
        audit_dir: &Path,
        partition: PartitionId,
        start: Position,
        hashes: &[u32],
        mut chain_after: impl FnMut(Position) -> Option<Digest>,
    ) -> Result<(), AuditError> {
        fs::create_dir_all(audit_dir).map_err(io_err("create", audit_dir))?;
        let path = path(audit_dir, partition);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut buf = Vec::new();
        if f.metadata().map_err(io_err("stat", &path))?.len() == 0 {
            buf.extend_from_slice(MAGIC);
            buf.extend_from_slice(&VERSION.to_le_bytes());
            buf.extend_from_slice(&partition.0.to_le_bytes());
            let crc = crc32c::crc32c(&buf);
            buf.extend_from_slice(&crc.to_le_bytes());
        }
        let mut at = start.0;
        for chunk in hashes.chunks(MAX_ENTRY) {
            let end = Position(at + chunk.len() as u64);
            let Some(chain) = chain_after(end) else {
                break;
            };
            let entry_start = buf.len();
            buf.extend_from_slice(&at.to_le_bytes());
            buf.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            buf.extend_from_slice(&chain.0);
            for h in chunk {
                buf.extend_from_slice(&h.to_le_bytes());
            }
            let crc = crc32c::crc32c(&buf[entry_start..]);
            buf.extend_from_slice(&crc.to_le_bytes());
            at = end.0;
        }
        f.write_all(&buf)
            .and_then(|_| f.sync_data())
            .map_err(io_err("append", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_extends_reads_back_and_refuses_damage() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = PartitionId(1);
        assert_eq!(Seal::load(dir.path(), p).unwrap(), None);
        let heads = |end: Position| Some(Digest([end.0 as u8; 32]));
        Seal::extend(dir.path(), p, Position(0), &[1, 2, 3], heads).unwrap();
        Seal::extend(dir.path(), p, Position(3), &[4, 5], heads).unwrap();
        let seal = Seal::load(dir.path(), p).unwrap().unwrap();
        assert_eq!(seal.end(), Position(5));
        assert_eq!(seal.entries.len(), 2);
        assert_eq!(seal.entries[1].chain_after, Digest([5; 32]));
        let all: Vec<Option<u32>> = (0..6).map(|i| seal.hash_at(Position(i))).collect();
        assert_eq!(all, vec![Some(1), Some(2), Some(3), Some(4), Some(5), None]);
        assert!(Seal::load(dir.path(), PartitionId(0)).unwrap().is_none());
        let file = path(dir.path(), p);
        let mut bytes = fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert!(matches!(
            Seal::load(dir.path(), p),
            Err(AuditError::Damaged { .. })
        ));
    }
}
