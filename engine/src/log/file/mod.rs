//! The embedded log: a directory per partition of segment files, records framed
//! with length + CRC32C, group commit, torn-tail recovery and an exclusive writer
//! lock. See `format` for the bytes and `scan` for recovery rules.

pub(crate) mod format;
mod reader;
mod roll;
mod scan;
pub(crate) mod segment;
mod writer;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
pub use reader::FileReader;
pub use scan::{Damage, Recovery, ScanResult, recovery, scan};
pub use segment::create_private_dir;
pub use writer::FileWriter;

use super::{Log, LogError, LogReader, LogWriter};
use crate::record::{PartitionId, Position};
use segment::{io_err, partition_dir};

/// When appends reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync after every record (slow; for comparison).
    Always,
    /// One fdatasync per appended batch (group commit). The default.
    Batch,
    /// fdatasync in the background at this interval; a crash may lose the last interval.
    Interval(Duration),
    /// Never: the OS decides. A crash may lose anything not yet written back.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            other => match other.strip_prefix("interval:") {
                Some(d) => humantime::parse_duration(d)
                    .map(FsyncPolicy::Interval)
                    .map_err(|e| format!("`{d}`: {e}")),
                None => Err(format!(
                    "`{other}` is not one of always, batch, interval:<duration>, never"
                )),
            },
        }
    }
}

/// Settings of the embedded log.
#[derive(Clone, Debug)]
pub struct FileLogConfig {
    pub partitions: u32,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Test seam: consulted before every segment write and fsync.
    pub faults: Option<Arc<dyn FaultInjector>>,
}

impl Default for FileLogConfig {
    fn default() -> Self {
        FileLogConfig {
            partitions: 1,
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Batch,
            faults: None,
        }
    }
}

/// The file-system seam for fault injection (full disks, short writes, failing
/// fsyncs). Production code passes none; tests implement it.
pub trait FaultInjector: Send + Sync + std::fmt::Debug {
    /// Before writing `len` bytes at `offset` of `path`: `Ok` to write them all,
    /// or a fault that fails the write after its first `written` bytes.
    fn write(&self, path: &Path, offset: u64, len: usize) -> Result<(), InjectedFault>;
    /// Before an fsync of `path`.
    fn sync(&self, path: &Path) -> std::io::Result<()>;
}

/// A write that fails part way.
#[derive(Debug)]
pub struct InjectedFault {
    pub written: usize,
    pub error: std::io::Error,
}

/// What readers in this process know about a partition's writer.
#[derive(Debug)]
pub(crate) struct Shared {
    dir: PathBuf,
    partition: PartitionId,
    state: Mutex<SharedState>,
    appended: Condvar,
}

#[derive(Debug, Clone, Copy)]
struct SharedState {
    /// Records below this position are durable per the fsync policy.
    end: u64,
    writer_active: bool,
}

impl Shared {
    /// The end readers may read up to, when a writer in this process knows it.
    fn visible_end(&self) -> Option<u64> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.writer_active.then_some(s.end)
    }

    fn publish(&self, end: u64, writer_active: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.end = end;
        s.writer_active = writer_active;
        self.appended.notify_all();
    }

    /// Waits until a record at `position` may be readable or `deadline` passes.
    fn wait_for(&self, position: u64, deadline: Instant) {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !guard.writer_active {
            drop(guard);
            let nap = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5));
            std::thread::sleep(nap);
            return;
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .appended
            .wait_timeout_while(guard, timeout, |s| s.writer_active && s.end <= position);
    }
}

/// The embedded log rooted at a directory.
#[derive(Debug)]
pub struct FileLog {
    root: PathBuf,
    config: FileLogConfig,
    shared: Vec<Arc<Shared>>,
}

const META_FILE: &str = "META";

impl FileLog {
    /// Opens the log at `root`, creating it with `config.partitions` if missing. An
    /// existing log keeps its partition count; asking for another is an error.
    pub fn open(root: impl AsRef<Path>, config: FileLogConfig) -> Result<FileLog, LogError> {
        let root = root.as_ref().to_owned();
        if config.partitions == 0 {
            return Err(LogError::Config("partitions must be at least 1".into()));
        }
        create_private_dir(&root)?;
        let meta = root.join(META_FILE);
        match read_meta(&meta)? {
            Some(existing) if existing != config.partitions => {
                return Err(LogError::Config(format!(
                    "{} was created with {existing} partitions, not {}",
                    root.display(),
                    config.partitions
                )));
            }
            Some(_) => {}
            None => {
                let text = format!("format=1\npartitions={}\n", config.partitions);
                fs::write(&meta, text).map_err(io_err("write", &meta))?;
                segment::sync_dir(&root)?;
            }
        }
        Ok(FileLog::with_config(root, config))
    }

    /// Opens an existing log for reading, with the partition count it was made with.
    pub fn open_existing(root: impl AsRef<Path>) -> Result<FileLog, LogError> {
        let root = root.as_ref().to_owned();
        let partitions = read_meta(&root.join(META_FILE))?
            .ok_or_else(|| LogError::Config(format!("{} holds no Tasker log", root.display())))?;
        Ok(FileLog::with_config(
            root,
            FileLogConfig {
                partitions,
                ..FileLogConfig::default()
            },
        ))
    }

    fn with_config(root: PathBuf, config: FileLogConfig) -> FileLog {
        let shared = (0..config.partitions)
            .map(|p| {
                Arc::new(Shared {
                    dir: partition_dir(&root, p),
                    partition: PartitionId(p),
                    state: Mutex::new(SharedState {
                        end: 0,
                        writer_active: false,
                    }),
                    appended: Condvar::new(),
                })
            })
            .collect();
        FileLog {
            root,
            config,
            shared,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &FileLogConfig {
        &self.config
    }

    fn shared(&self, partition: PartitionId) -> Result<&Arc<Shared>, LogError> {
        self.shared
            .get(partition.0 as usize)
            .ok_or(LogError::NoSuchPartition {
                partition,
                partitions: self.config.partitions,
            })
    }
}

fn read_meta(path: &Path) -> Result<Option<u32>, LogError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("partitions="))
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| LogError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            reason: "no `partitions=` line".into(),
        })
}

impl Log for FileLog {
    fn partitions(&self) -> u32 {
        self.config.partitions
    }

    fn writer(&self, partition: PartitionId) -> Result<Box<dyn LogWriter>, LogError> {
        let shared = Arc::clone(self.shared(partition)?);
        Ok(Box::new(FileWriter::open(shared, &self.config)?))
    }

    fn reader(
        &self,
        partition: PartitionId,
        from: Position,
    ) -> Result<Box<dyn LogReader>, LogError> {
        let shared = Arc::clone(self.shared(partition)?);
        Ok(Box::new(FileReader::new(shared, from)?))
    }

    fn end(&self, partition: PartitionId) -> Result<Position, LogError> {
        let shared = self.shared(partition)?;
        if let Some(end) = shared.visible_end() {
            return Ok(Position(end));
        }
        reader::scan_end(shared).map(Position)
    }

    fn start(&self, partition: PartitionId) -> Result<Position, LogError> {
        let shared = self.shared(partition)?;
        Ok(Position(
            segment::list_segments(&shared.dir)?
                .first()
                .copied()
                .unwrap_or(0),
        ))
    }

    fn describe(&self) -> String {
        format!(
            "file log at {} ({} partitions)",
            self.root.display(),
            self.config.partitions
        )
    }
}

#[cfg(test)]
mod tests;
