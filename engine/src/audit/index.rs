//! The task index: where in a partition a task's records are, so `audit task`
//! reads a few blocks of the log instead of all of it.
//!
//! The partition is cut into blocks of [`BLOCK`] records; for each block the index
//! keeps the sorted 64-bit fingerprints of the task ids in it (a lookup reads only
//! blocks holding the task's fingerprint, then keeps the records whose key is the
//! task) and the partition's control records (ownership claims, which the task's
//! fold needs for fencing) in full. It is only a locator: a stale or missing
//! index costs time, never a wrong answer, except that a log replaced by a
//! different one with at least as many records is detected only through its first
//! record (then the index is rebuilt).
//!
//! It is maintained by its readers: a lookup first indexes the records appended
//! since the last one (reading only their headers), writes whole blocks back
//! (temporary file + rename), and scans the unfinished last block directly.
//!
//! ```text
//! <data_dir>/audit/pNNNNN.tasks = header block*
//! header  = magic "TSKRTIDX" | version u16 = 1 | partition u32 | block u32
//!         | first record hash u32 | crc32c u32 (of the 22 bytes)
//! block   = start u64 | count u32 | fingerprints u32 | controls u32
//!         | fingerprint u64 * n | control* | crc32c u32
//! control = position u64 | timestamp u64 | key [16] | kind u8 | type u8 | len u32 | payload
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashSet;

use super::{AuditError, io_err, partition_name, record_hash};
use crate::log::{Headers, Log, Record, StoredRecord, partition_for_task};
use crate::record::{ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp};

/// Records per block.
pub const BLOCK: u64 = 16_384;

const MAGIC: &[u8; 8] = b"TSKRTIDX";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 4 + 4 + 4 + 4;

/// A task id's fingerprint in the index.
pub fn fingerprint(task: &TaskId) -> u64 {
    let (hi, lo) = task.as_uuid().as_u64_pair();
    let mut z = hi ^ lo.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    start: Position,
    count: u32,
    fingerprints: Vec<u64>,
    controls: Vec<StoredRecord>,
}

impl Block {
    fn end(&self) -> Position {
        Position(self.start.0 + u64::from(self.count))
    }
}

/// How a lookup went, for `--verbose` output and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupStats {
    pub partition: PartitionId,
    /// The partition's end when the lookup read it.
    pub end: Position,
    /// Positions indexed before the lookup, and after it.
    pub indexed_before: Position,
    pub indexed_now: Position,
    /// Records read to bring the index up to date (headers only).
    pub records_indexed: u64,
    /// Index blocks whose fingerprints matched, and so were read.
    pub blocks_read: usize,
    /// The index did not match the log and was rebuilt.
    pub rebuilt: bool,
}

fn index_path(dir: &Path, p: PartitionId) -> PathBuf {
    dir.join(format!("{}.tasks", partition_name(p)))
}

/// Every record of `task` (by key) and every control record of its partition, in
/// position order. With `index_dir`, through (and maintaining) the task index;
/// without, by reading the whole partition.
pub fn task_records(
    log: &dyn Log,
    index_dir: Option<&Path>,
    task: TaskId,
) -> Result<(Vec<StoredRecord>, LookupStats), AuditError> {
    let partition = partition_for_task(task, log.partitions());
    let end = log.end(partition)?;
    let start = log.start(partition)?;
    let mut stats = LookupStats {
        partition,
        end,
        ..LookupStats::default()
    };
    let wanted = |r: &Record| r.key == task || r.headers.kind == Some(Kind::Control);
    let Some(dir) = index_dir else {
        let mut out = Vec::new();
        read_range(log, partition, start, end, |rec| {
            if wanted(&rec.record) {
                out.push(rec);
            }
        })?;
        return Ok((out, stats));
    };
    let first_hash = first_record_hash(log, partition, start, end)?;
    let path = index_path(dir, partition);
    let mut blocks = match load(&path, partition)? {
        Some((hash, blocks))
            if hash == first_hash
                && blocks.first().is_none_or(|b| b.start == start)
                && blocks.last().is_none_or(|b| b.end() <= end) =>
        {
            blocks
        }
        Some(_) => {
            stats.rebuilt = true;
            Vec::new()
        }
        None => Vec::new(),
    };
    let indexed = blocks.last().map_or(start, Block::end);
    stats.indexed_before = indexed;
    let fp = fingerprint(&task);
    let mut out: Vec<StoredRecord> = Vec::new();
    // Old blocks holding the task.
    let mut reader = log.reader(partition, start)?;
    for block in &blocks {
        out.extend(block.controls.iter().cloned());
        if block.fingerprints.binary_search(&fp).is_err() {
            continue;
        }
        stats.blocks_read += 1;
        reader.seek(block.start)?;
        let mut left = u64::from(block.count);
        while left > 0 {
            let batch = reader.poll(left.min(BLOCK) as usize, Duration::from_millis(200))?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                if rec.position >= block.end() {
                    left = 0;
                    break;
                }
                left -= 1;
                if rec.record.key == task {
                    out.push(rec);
                }
            }
        }
    }
    // New records: index them, keeping the task's as we go.
    let mut building = BlockBuilder::new(indexed);
    let mut added = Vec::new();
    read_range(log, partition, indexed, end, |rec| {
        stats.records_indexed += 1;
        if wanted(&rec.record) {
            out.push(rec.clone());
        }
        if let Some(done) = building.push(rec) {
            added.push(done);
        }
    })?;
    if !added.is_empty() || stats.rebuilt {
        blocks.extend(added);
        save(&path, partition, first_hash, &blocks)?;
    }
    stats.indexed_now = blocks.last().map_or(start, Block::end);
    out.sort_by_key(|r| r.position);
    out.dedup_by_key(|r| r.position);
    Ok((out, stats))
}

/// Reads single records (commands a task's events answer whose key is not the
/// task, e.g. JSON requests keyed by idempotency key).
pub fn read_positions(
    log: &dyn Log,
    partition: PartitionId,
    positions: &[Position],
) -> Result<Vec<StoredRecord>, AuditError> {
    let mut out = Vec::new();
    if positions.is_empty() {
        return Ok(out);
    }
    let mut reader = log.reader(partition, positions[0])?;
    for &p in positions {
        reader.seek(p)?;
        if let Some(rec) = reader
            .poll(1, Duration::from_millis(200))?
            .into_iter()
            .find(|r| r.position == p)
        {
            out.push(rec);
        }
    }
    Ok(out)
}

fn read_range(
    log: &dyn Log,
    partition: PartitionId,
    from: Position,
    to: Position,
    mut visit: impl FnMut(StoredRecord),
) -> Result<(), AuditError> {
    if from >= to {
        return Ok(());
    }
    let mut reader = log.reader(partition, from)?;
    let mut idle = 0;
    while reader.position() < to {
        let batch = reader.poll(16_384, Duration::from_millis(200))?;
        if batch.is_empty() {
            idle += 1;
            if idle > 25 {
                break;
            }
            continue;
        }
        idle = 0;
        for rec in batch {
            if rec.position >= to {
                return Ok(());
            }
            visit(rec);
        }
    }
    Ok(())
}

fn first_record_hash(
    log: &dyn Log,
    partition: PartitionId,
    start: Position,
    end: Position,
) -> Result<u32, AuditError> {
    if start >= end {
        return Ok(0);
    }
    let mut reader = log.reader(partition, start)?;
    Ok(reader
        .poll(1, Duration::from_millis(500))?
        .first()
        .map_or(0, |r| record_hash(&r.record)))
}

struct BlockBuilder {
    start: Position,
    count: u32,
    fingerprints: FxHashSet<u64>,
    controls: Vec<StoredRecord>,
}

impl BlockBuilder {
    fn new(start: Position) -> Self {
        BlockBuilder {
            start,
            count: 0,
            fingerprints: FxHashSet::default(),
            controls: Vec::new(),
        }
    }

    /// Adds a record; returns the block once it is whole.
    fn push(&mut self, rec: StoredRecord) -> Option<Block> {
        if rec.record.headers.kind == Some(Kind::Control) {
            self.controls.push(rec.clone());
        } else if !rec.record.key.is_nil() {
            self.fingerprints.insert(fingerprint(&rec.record.key));
        }
        self.count = (rec.position.0 + 1 - self.start.0) as u32;
        if u64::from(self.count) < BLOCK {
            return None;
        }
        let mut fingerprints: Vec<u64> = self.fingerprints.drain().collect();
        fingerprints.sort_unstable();
        let block = Block {
            start: self.start,
            count: self.count,
            fingerprints,
            controls: std::mem::take(&mut self.controls),
        };
        self.start = block.end();
        self.count = 0;
        Some(block)
    }
}

fn load(path: &Path, partition: PartitionId) -> Result<Option<(u32, Vec<Block>)>, AuditError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    // A damaged or foreign index is rebuilt: it is only a locator.
    Ok(Some(
        parse(&bytes, partition).unwrap_or((u32::MAX, Vec::new())),
    ))
}

fn parse(bytes: &[u8], partition: PartitionId) -> Option<(u32, Vec<Block>)> {
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |b: &[u8], o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    if crc32c::crc32c(&bytes[..HEADER - 4]) != u32_at(bytes, HEADER - 4)? {
        return None;
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION
        || u32_at(bytes, 10)? != partition.0
        || u64::from(u32_at(bytes, 14)?) != BLOCK
    {
        return None;
    }
    let first_hash = u32_at(bytes, 18)?;
    let mut blocks = Vec::new();
    let mut off = HEADER;
    while off < bytes.len() {
        let b = &bytes[off..];
        let start = u64_at(b, 0)?;
        let count = u32_at(b, 8)?;
        let nfp = u32_at(b, 12)? as usize;
        let nctl = u32_at(b, 16)? as usize;
        let mut o = 20;
        let mut fingerprints = Vec::with_capacity(nfp);
        for _ in 0..nfp {
            fingerprints.push(u64_at(b, o)?);
            o += 8;
        }
        let mut controls = Vec::with_capacity(nctl);
        for _ in 0..nctl {
            let position = u64_at(b, o)?;
            let timestamp = u64_at(b, o + 8)?;
            let key: [u8; 16] = b.get(o + 16..o + 32)?.try_into().ok()?;
            let kind = *b.get(o + 32)?;
            let ty = *b.get(o + 33)?;
            let len = u32_at(b, o + 34)? as usize;
            let payload = b.get(o + 38..o + 38 + len)?;
            o += 38 + len;
            controls.push(StoredRecord {
                position: Position(position),
                record: Record {
                    key: TaskId::from_uuid(uuid::Uuid::from_bytes(key)),
                    headers: Headers {
                        content_type: ContentType::Bincode,
                        kind: Kind::from_code(kind),
                        record_type: RecordType::from_code(ty),
                        schema: crate::record::SCHEMA_VERSION,
                        namespace: None,
                    },
                    timestamp: Timestamp(timestamp),
                    payload: Bytes::copy_from_slice(payload),
                },
            });
        }
        if crc32c::crc32c(b.get(..o)?) != u32_at(b, o)? {
            return None;
        }
        off += o + 4;
        blocks.push(Block {
            start: Position(start),
            count,
            fingerprints,
            controls,
        });
    }
    Some((first_hash, blocks))
}

fn save(
    path: &Path,
    partition: PartitionId,
    first_hash: u32,
    blocks: &[Block],
) -> Result<(), AuditError> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&partition.0.to_le_bytes());
    buf.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    buf.extend_from_slice(&first_hash.to_le_bytes());
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    for block in blocks {
        let start = buf.len();
        buf.extend_from_slice(&block.start.0.to_le_bytes());
        buf.extend_from_slice(&block.count.to_le_bytes());
        buf.extend_from_slice(&(block.fingerprints.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(block.controls.len() as u32).to_le_bytes());
        for fp in &block.fingerprints {
            buf.extend_from_slice(&fp.to_le_bytes());
        }
        for c in &block.controls {
            buf.extend_from_slice(&c.position.0.to_le_bytes());
            buf.extend_from_slice(&c.record.timestamp.as_millis().to_le_bytes());
            buf.extend_from_slice(c.record.key.as_bytes());
            buf.push(c.record.headers.kind.map_or(0, Kind::code));
            buf.push(c.record.headers.record_type.map_or(0, RecordType::code));
            buf.extend_from_slice(&(c.record.payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&c.record.payload);
        }
        let crc = crc32c::crc32c(&buf[start..]);
        buf.extend_from_slice(&crc.to_le_bytes());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let tmp = path.with_extension(format!("tasks.{}.tmp", std::process::id()));
    fs::write(&tmp, &buf)
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(io_err("write", path))
}
