//! Reading one partition in order, across segments, waking on appends made by a
//! writer in the same process (or polling the files when the writer is elsewhere).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::Shared;
use super::format::{FrameCheck, SEGMENT_HEADER_LEN, check_frame, decode_frame};
use super::scan::scan;
use super::segment::{self, io_err, read_index, readable_segments, spare_base};
use crate::log::{LogError, LogReader, StoredRecord};
use crate::record::{PartitionId, Position};

const CHUNK: usize = 1 << 20;

/// A cursor over one partition.
#[derive(Debug)]
pub struct FileReader {
    shared: Arc<Shared>,
    segment: Option<OpenSegment>,
    /// Position of the next frame in the open segment (or of the next record).
    next: u64,
    /// Frames before this position are skipped (after a seek into a segment).
    skip_to: u64,
}

#[derive(Debug)]
struct OpenSegment {
    base: u64,
    path: PathBuf,
    file: File,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: BytesMut,
    eof: bool,
}

impl FileReader {
    pub(crate) fn new(shared: Arc<Shared>, from: Position) -> Result<FileReader, LogError> {
        Ok(FileReader {
            shared,
            segment: None,
            next: from.0,
            skip_to: from.0,
        })
    }

    /// Opens the segment holding `self.skip_to`, starting at the closest indexed frame.
    fn open_segment(&mut self) -> Result<bool, LogError> {
        let dir = &self.shared.dir;
        let partition = self.shared.partition.0;
        let bases = readable_segments(dir, partition)?;
        let target = self.skip_to;
        let Some(&base) = bases.iter().rev().find(|&&b| b <= target) else {
            if let Some(&first) = bases.first() {
                return Err(LogError::PositionGone {
                    partition: self.shared.partition,
                    position: Position(target),
                    start: Position(first),
                });
            }
            return Ok(false); // nothing written yet
        };
        let Some((path, mut file)) = segment::open_segment(dir, partition, base)? else {
            return Ok(false); // gone since the listing: look again on the next poll
        };
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        if file.read_exact(&mut header).is_err() {
            return Ok(false); // being created
        }
        super::format::decode_segment_header(&header).map_err(|reason| LogError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason,
        })?;
        let (mut pos, mut offset) = (base, SEGMENT_HEADER_LEN as u64);
        if let Some((_, index)) = read_index(dir, base)
            && let Some(&(rel, off)) = index.iter().rev().find(|(rel, _)| base + rel <= target)
        {
            pos = base + rel;
            offset = off;
        }
        file.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek segment", &path))?;
        self.next = pos;
        self.segment = Some(OpenSegment {
            base,
            path,
            file,
            offset,
            buf: BytesMut::new(),
            eof: false,
        });
        Ok(true)
    }

    /// Moves to the segment starting at `self.next`, if the writer created it.
    fn next_segment(&mut self) -> Result<bool, LogError> {
        if self.segment.as_ref().is_some_and(|s| s.base >= self.next) {
            return Ok(false);
        }
        let dir = &self.shared.dir;
        let exists = segment::segment_path(dir, self.next).exists()
            // A writer in this process adopted any spare a crash left.
            || (self.shared.visible_end().is_none()
                && spare_base(dir, self.shared.partition.0)? == Some(self.next));
        if !exists {
            return Ok(false);
        }
        self.segment = None;
        self.skip_to = self.skip_to.max(self.next);
        self.open_segment()
    }

    /// Reads what is available now, up to `max` records and below `limit`.
    fn read_available(
        &mut self,
        max: usize,
        limit: Option<u64>,
        out: &mut Vec<StoredRecord>,
    ) -> Result<(), LogError> {
        if self.segment.is_none() && !self.open_segment()? {
            return Ok(());
        }
        while out.len() < max && limit.is_none_or(|l| self.next < l) {
            let Some(seg) = self.segment.as_mut() else {
                return Ok(());
            };
            match check_frame(&seg.buf) {
                FrameCheck::Valid { total, .. } => {
                    let frame = seg.buf.split_to(total).freeze();
                    seg.offset += total as u64;
                    if self.next >= self.skip_to {
                        out.push(StoredRecord {
                            position: Position(self.next),
                            record: decode_frame(&frame),
                        });
                    }
                    self.next += 1;
                }
                FrameCheck::Incomplete => {
                    if !seg.eof && fill(seg)? {
                        continue;
                    }
                    seg.eof = false; // look again on the next poll
                    if seg.buf.is_empty() && self.next_segment()? {
                        continue;
                    }
                    if limit.is_some_and(|l| self.next < l) {
                        return Err(self.corrupt("the log ends before its committed end"));
                    }
                    return Ok(());
                }
                FrameCheck::Invalid(reason) => {
                    let sealed = readable_segments(&self.shared.dir, self.shared.partition.0)?
                        .last()
                        .is_some_and(|&b| b > seg.base);
                    if sealed || limit.is_some_and(|l| self.next < l) || intact_after(seg)? {
                        return Err(self.corrupt(reason));
                    }
                    // An unrecovered torn tail of a writer in another process.
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn corrupt(&self, reason: &str) -> LogError {
        match &self.segment {
            Some(seg) => LogError::Corrupt {
                path: seg.path.clone(),
                offset: seg.offset,
                reason: format!("{reason} (position {})", self.next),
            },
            None => LogError::Corrupt {
                path: self.shared.dir.clone(),
                offset: 0,
                reason: reason.to_owned(),
            },
        }
    }
}

/// Whether whole batches follow damage at the start of `seg.buf` (then it is
/// corruption, not a torn tail). Reads the rest of the segment; only on damage.
fn intact_after(seg: &mut OpenSegment) -> Result<bool, LogError> {
    let mut rest = Vec::new();
    seg.file
        .read_to_end(&mut rest)
        .map_err(io_err("read segment", &seg.path))?;
    seg.buf.extend_from_slice(&rest);
    Ok(super::scan::whole_batch_after(&seg.buf, 1))
}

/// Reads the next chunk of the segment; false at end of file.
fn fill(seg: &mut OpenSegment) -> Result<bool, LogError> {
    let old = seg.buf.len();
    seg.buf.resize(old + CHUNK, 0);
    let n = seg.file.read(&mut seg.buf[old..]);
    let n = match n {
        Ok(n) => n,
        Err(e) => {
            seg.buf.truncate(old);
            return Err(io_err("read segment", &seg.path)(e));
        }
    };
    seg.buf.truncate(old + n);
    if n == 0 {
        seg.eof = true;
    }
    Ok(n > 0)
}

impl LogReader for FileReader {
    fn partition(&self) -> PartitionId {
        self.shared.partition
    }

    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<StoredRecord>, LogError> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::with_capacity(max.min(4096));
        loop {
            let limit = self.shared.visible_end();
            self.read_available(max, limit, &mut out)?;
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(out);
            }
            self.shared.wait_for(self.next.max(self.skip_to), deadline);
        }
    }

    fn seek(&mut self, to: Position) -> Result<(), LogError> {
        self.segment = None;
        self.next = to.0;
        self.skip_to = to.0;
        Ok(())
    }

    fn position(&self) -> Position {
        Position(self.next.max(self.skip_to))
    }
}

/// The end of a partition no writer in this process knows: the last segment's base
/// plus its whole batches.
pub(crate) fn scan_end(shared: &Shared) -> Result<u64, LogError> {
    let partition = shared.partition.0;
    let Some(&base) = readable_segments(&shared.dir, partition)?.last() else {
        return Ok(0);
    };
    let Some((path, mut file)) = segment::open_segment(&shared.dir, partition, base)? else {
        return Err(LogError::Corrupt {
            path: segment::segment_path(&shared.dir, base),
            offset: 0,
            reason: "the last segment disappeared while the log was read".into(),
        });
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(io_err("read segment", &path))?;
    Ok(base + scan(&data).records)
}
