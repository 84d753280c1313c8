//! The single writer of one partition: recovery on open, group commit, rolling.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::format::{SEGMENT_HEADER_LEN, decode_segment_header, encode_frame};
use super::roll::{self, Roller};
use super::scan::{INDEX_STRIDE, Recovery, recovery, scan};
use super::segment::{
    create_private_dir, create_segment, io_err, list_segments, read_index, segment_path,
    write_index,
};
use super::{FileLogConfig, FsyncPolicy, Shared};
use crate::codec::MAX_RECORD_BYTES;
use crate::log::{LogError, LogWriter, Record};
use crate::record::{PartitionId, Position};

/// Appends to one partition; holds the partition's lock file while alive.
#[derive(Debug)]
pub struct FileWriter {
    shared: Arc<Shared>,
    _lock: File,
    file: File,
    path: PathBuf,
    base: u64,
    seg_len: u64,
    seg_records: u64,
    index: Vec<(u64, u64)>,
    end: u64,
    buf: Vec<u8>,
    config: FileLogConfig,
    /// Set when a failed write could not be rolled back: every later append fails.
    poisoned: Option<String>,
    flusher: Option<Flusher>,
    roller: Roller,
}

#[derive(Debug)]
struct Flusher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl FileWriter {
    /// Takes the lock, recovers the last segment (truncating a torn tail), checks
    /// that segments are contiguous, and positions at the end.
    pub(crate) fn open(
        shared: Arc<Shared>,
        config: &FileLogConfig,
    ) -> Result<FileWriter, LogError> {
        let dir = shared.dir.clone();
        create_private_dir(&dir)?;
        let lock = take_lock(&dir)?;
        let partition = shared.partition.0;
        roll::recover_spare(&dir, partition)?;
        let mut bases = list_segments(&dir)?;
        if bases.is_empty() {
            create_segment(&dir, partition, 0)?;
            bases.push(0);
        }
        check_contiguous(&dir, &bases)?;
        let base = *bases.last().unwrap_or(&0);
        let path = segment_path(&dir, base);
        let mut data = fs::read(&path).map_err(io_err("read segment", &path))?;
        if data.len() < SEGMENT_HEADER_LEN {
            // Crashed while creating the segment (the first one, or in a roll):
            // nothing in it was ever acknowledged, and the segments before it
            // were checked to end where it starts.
            create_segment(&dir, partition, base)?;
            data = fs::read(&path).map_err(io_err("read segment", &path))?;
        }
        let (p, b) = decode_segment_header(&data).map_err(|reason| LogError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason,
        })?;
        if p != partition || b != base {
            return Err(LogError::Corrupt {
                path,
                offset: 0,
                reason: format!("header says partition {p} base {b}"),
            });
        }
        let scanned = scan(&data);
        match recovery(&scanned, data.len() as u64, true) {
            Recovery::Clean => {}
            Recovery::TruncateTail { at, dropped_bytes } => {
                tracing::warn!(
                    partition,
                    file = %path.display(),
                    offset = at,
                    dropped_bytes,
                    "truncating a torn tail left by a crash (an unacknowledged batch)"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open segment", &path))?;
                f.set_len(at)
                    .and_then(|_| f.sync_all())
                    .map_err(io_err("truncate torn tail", &path))?;
            }
            Recovery::Refuse { offset, reason } => {
                return Err(LogError::Corrupt {
                    path,
                    offset,
                    reason,
                });
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open segment", &path))?;
        file.seek(SeekFrom::Start(scanned.valid_len))
            .map_err(io_err("seek", &path))?;
        let end = base + scanned.records;
        let flusher = match config.fsync {
            FsyncPolicy::Interval(every) => Some(spawn_flusher(&file, &path, every)?),
            FsyncPolicy::Always | FsyncPolicy::Batch | FsyncPolicy::Never => None,
        };
        let roller = Roller::start(dir, partition)?;
        shared.publish(end, true);
        Ok(FileWriter {
            shared,
            _lock: lock,
            file,
            path,
            base,
            seg_len: scanned.valid_len,
            seg_records: scanned.records,
            index: scanned.index,
            end,
            buf: Vec::with_capacity(1 << 20),
            config: config.clone(),
            poisoned: None,
            flusher,
            roller,
        })
    }

    /// Seals the active segment and starts a new one at the current end: in
    /// the spare the roller prepared if there is one (see [`roll`]), the index
    /// written after.
    fn roll(&mut self) -> Result<(), LogError> {
        // Nothing to write with `fsync = batch` or `always` (every batch was
        // synced); otherwise what keeps the segments contiguous across a crash.
        self.file
            .sync_data()
            .map_err(io_err("sync segment", &self.path))?;
        let (dir, partition) = (&self.shared.dir, self.shared.partition.0);
        let file = match self.roller.take_spare() {
            Some(spare) => roll::adopt(spare, dir, partition, self.end)?,
            None => create_segment(dir, partition, self.end)?,
        };
        let index = std::mem::take(&mut self.index);
        self.roller.sealed(self.base, self.seg_records, index);
        self.flusher = None;
        self.file = file;
        self.path = segment_path(&self.shared.dir, self.end);
        self.base = self.end;
        self.seg_len = SEGMENT_HEADER_LEN as u64;
        self.seg_records = 0;
        if let FsyncPolicy::Interval(every) = self.config.fsync {
            self.flusher = Some(spawn_flusher(&self.file, &self.path, every)?);
        }
        Ok(())
    }

    fn write_batch(&mut self) -> Result<(), (std::io::Error, bool)> {
        let io = |e| (e, false);
        match self.config.fsync {
            FsyncPolicy::Always => {
                let mut off = 0;
                while off < self.buf.len() {
                    let len = frame_len(&self.buf[off..]);
                    self.write_at(off, off + len).map_err(io)?;
                    self.sync().map_err(|e| (e, true))?;
                    off += len;
                }
                Ok(())
            }
            FsyncPolicy::Batch => {
                self.write_at(0, self.buf.len()).map_err(io)?;
                self.sync().map_err(|e| (e, true))
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {
                self.write_at(0, self.buf.len()).map_err(io)
            }
        }
    }

    /// Writes `buf[from..to]` at the end of the segment, through the fault seam.
    fn write_at(&mut self, from: usize, to: usize) -> std::io::Result<()> {
        if let Some(faults) = &self.config.faults
            && let Err(fault) = faults.write(&self.path, self.seg_len + from as u64, to - from)
        {
            let cut = from + fault.written.min(to - from);
            self.file.write_all(&self.buf[from..cut])?;
            return Err(fault.error);
        }
        self.file.write_all(&self.buf[from..to])
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if let Some(faults) = &self.config.faults {
            faults.sync(&self.path)?;
        }
        self.file.sync_data()
    }
}

fn frame_len(buf: &[u8]) -> usize {
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    super::format::FRAME_HEADER_LEN + len
}

impl LogWriter for FileWriter {
    fn partition(&self) -> PartitionId {
        self.shared.partition
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn append(&mut self, batch: &[Record]) -> Result<Vec<Position>, LogError> {
        if let Some(why) = &self.poisoned {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: self.seg_len,
                reason: format!("writer stopped after an unrecoverable write error: {why}"),
            });
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(r) = batch.iter().find(|r| r.payload.len() > MAX_RECORD_BYTES) {
            return Err(LogError::RecordTooLarge {
                len: r.payload.len(),
                limit: MAX_RECORD_BYTES,
            });
        }
        if self.seg_len >= self.config.segment_bytes && self.seg_records > 0 {
            self.roll()?;
        }
        self.buf.clear();
        let mut new_index = Vec::new();
        for (i, record) in batch.iter().enumerate() {
            let n = self.seg_records + i as u64;
            if n.is_multiple_of(INDEX_STRIDE) {
                new_index.push((n, self.seg_len + self.buf.len() as u64));
            }
            encode_frame(record, i + 1 == batch.len(), &mut self.buf);
        }
        if let Err((e, fsync_failed)) = self.write_batch() {
            // Roll the file back to the last whole batch so the log stays valid.
            let rollback = self
                .file
                .set_len(self.seg_len)
                .and_then(|_| self.file.seek(SeekFrom::Start(self.seg_len)).map(|_| ()));
            if let Err(r) = rollback {
                self.poisoned = Some(format!("{e}; rollback failed: {r}"));
            } else if fsync_failed {
                // After a failed fsync the kernel's view of the file cannot be
                // trusted: stop; reopening recovers from what is on disk.
                self.poisoned = Some(format!("fsync failed: {e}"));
            }
            return Err(LogError::Io {
                op: "append",
                path: self.path.clone(),
                source: e,
            });
        }
        self.index.extend(new_index);
        self.seg_len += self.buf.len() as u64;
        self.seg_records += batch.len() as u64;
        let first = self.end;
        self.end += batch.len() as u64;
        self.shared.publish(self.end, true);
        Ok((first..self.end).map(Position).collect())
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.flusher = None;
        let _ = self.file.sync_data();
        self.shared.publish(self.end, false);
    }
}

fn spawn_flusher(
    file: &File,
    path: &std::path::Path,
    every: std::time::Duration,
) -> Result<Flusher, LogError> {
    let file = file
        .try_clone()
        .map_err(io_err("clone segment handle", path))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name("tasker-log-flush".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                if let Err(e) = file.sync_data() {
                    tracing::error!(error = %e, "background fsync of the log failed");
                }
            }
        })
        .map_err(io_err("spawn flusher", path))?;
    Ok(Flusher {
        stop,
        handle: Some(handle),
    })
}

/// Takes the partition's exclusive lock, naming the holder if it is taken.
fn take_lock(dir: &std::path::Path) -> Result<File, LogError> {
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("open lock", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = if holder.trim().is_empty() {
                "unknown process".to_owned()
            } else {
                holder.trim().to_owned()
            };
            return Err(LogError::Locked { path, holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    let who = format!("pid {}", std::process::id());
    file.set_len(0)
        .and_then(|_| file.write_all(who.as_bytes()))
        .map_err(io_err("write lock", &path))?;
    Ok(file)
}

/// Sealed segments must follow each other without gaps (a missing segment file is
/// corruption, never silently skipped).
fn check_contiguous(dir: &std::path::Path, bases: &[u64]) -> Result<(), LogError> {
    for pair in bases.windows(2) {
        let (base, next) = (pair[0], pair[1]);
        let count = match read_index(dir, base) {
            Some((count, _)) => count,
            None => {
                let path = segment_path(dir, base);
                let data = fs::read(&path).map_err(io_err("read segment", &path))?;
                let s = scan(&data);
                if let Recovery::Refuse { offset, reason } = recovery(&s, data.len() as u64, false)
                {
                    return Err(LogError::Corrupt {
                        path,
                        offset,
                        reason,
                    });
                }
                write_index(dir, base, s.records, &s.index)?;
                s.records
            }
        };
        if base + count != next {
            return Err(LogError::Corrupt {
                path: segment_path(dir, next),
                offset: 0,
                reason: format!(
                    "segment starts at position {next} but the previous one ends at {} (a segment is missing or damaged)",
                    base + count
                ),
            });
        }
    }
    Ok(())
}
