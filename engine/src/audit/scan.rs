//! Reading an embedded-log partition straight from its segment files, reporting
//! every structural problem with its position, file and byte offset (the log's own
//! reader stops at the first one, or treats damage at the very end as a torn tail).

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{AuditError, io_err};
use crate::log::Record;
use crate::log::file::format::{
    FRAME_MAGIC, FrameCheck, SEGMENT_HEADER_LEN, check_frame, decode_frame, decode_segment_header,
};
use crate::log::file::segment::{
    open_segment, partition_dir, read_index, readable_segments, segment_path,
};
use crate::record::{PartitionId, Position};

/// A structural problem in the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawFinding {
    pub position: Position,
    pub path: PathBuf,
    pub offset: u64,
    pub message: String,
    /// False for a torn tail (a crash, repaired by the next writer).
    pub error: bool,
}

/// What the scan read.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawOutcome {
    /// The position after the last record in a whole batch that was visited.
    pub end: Position,
    pub findings: Vec<RawFinding>,
}

/// Visits every record of whole batches in order, until the end or the first
/// damage (after which positions are unknowable).
pub(crate) fn scan_partition(
    root: &Path,
    partition: PartitionId,
    mut visit: impl FnMut(Position, Record),
) -> Result<RawOutcome, AuditError> {
    let dir = partition_dir(root, partition.0);
    let bases = readable_segments(&dir, partition.0)?;
    let mut out = RawOutcome::default();
    let mut next = bases.first().copied().unwrap_or(0);
    if next != 0 {
        out.findings.push(RawFinding {
            position: Position(0),
            path: segment_path(&dir, next),
            offset: 0,
            message: format!("the first segment starts at position {next}, not 0"),
            error: true,
        });
    }
    let mut batch: Vec<(Position, Record)> = Vec::new();
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let Some((path, mut file)) = open_segment(&dir, partition.0, base)? else {
            return Err(io_err("open segment", &segment_path(&dir, base))(
                std::io::ErrorKind::NotFound.into(),
            ));
        };
        let finding = |position: u64, offset: u64, message: String| RawFinding {
            position: Position(position),
            path: path.clone(),
            offset,
            message,
            error: true,
        };
        if base != next {
            let message = if base > next {
                format!("records {next}..{base} are missing: the segment before ends at {next}")
            } else {
                format!("the segment starts at {base} but the one before already reached {next}")
            };
            out.findings.push(finding(next.min(base), 0, message));
            return Ok(out);
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(io_err("read segment", &path))?;
        let data = Bytes::from(data);
        match decode_segment_header(&data) {
            Ok((p, b)) if p == partition.0 && b == base => {}
            Ok((p, b)) => {
                out.findings.push(finding(
                    base,
                    0,
                    format!("the segment header says partition {p} base {b}"),
                ));
                return Ok(out);
            }
            Err(reason) => {
                out.findings.push(finding(base, 0, reason));
                return Ok(out);
            }
        }
        let mut off = SEGMENT_HEADER_LEN;
        let mut records = 0u64;
        while off < data.len() {
            match check_frame(&data[off..]) {
                FrameCheck::Valid {
                    total,
                    end_of_batch,
                } => {
                    let record = decode_frame(&data.slice(off..off + total));
                    batch.push((Position(base + records), record));
                    records += 1;
                    off += total;
                    if end_of_batch {
                        for (p, r) in batch.drain(..) {
                            visit(p, r);
                            out.end = p.next();
                        }
                    }
                }
                FrameCheck::Incomplete => {
                    let torn = last && !intact_after(&data, off + 1);
                    if !torn {
                        // Damage, not a crash: the records before it are intact.
                        for (p, r) in batch.drain(..) {
                            visit(p, r);
                            out.end = p.next();
                        }
                    }
                    out.findings.push(RawFinding {
                        error: !torn,
                        ..finding(
                            base + records,
                            off as u64,
                            if torn {
                                "the log ends in a torn write (a crash; the next writer truncates it)"
                                    .into()
                            } else {
                                "a frame longer than the data after it, followed by intact records \
                                 (a changed length, or damage)"
                                    .into()
                            },
                        )
                    });
                    return Ok(out);
                }
                FrameCheck::Invalid(reason) => {
                    for (p, r) in batch.drain(..) {
                        visit(p, r);
                        out.end = p.next();
                    }
                    out.findings.push(finding(
                        base + records,
                        off as u64,
                        format!("{reason}: the record was changed or damaged after it was written"),
                    ));
                    return Ok(out);
                }
            }
        }
        if !batch.is_empty() {
            let first = batch[0].0;
            out.findings.push(RawFinding {
                error: !last,
                ..finding(
                    first.0,
                    data.len() as u64,
                    format!(
                        "records from {first} on belong to a batch without its final record \
                         (a torn append{})",
                        if last {
                            "; the next writer truncates it"
                        } else {
                            ", in a sealed segment"
                        }
                    ),
                )
            });
            return Ok(out);
        }
        if !last
            && let Some((count, _)) = read_index(&dir, base)
            && count != records
        {
            out.findings.push(finding(
                base + records,
                data.len() as u64,
                format!("the segment holds {records} records but its index file says {count}"),
            ));
        }
        next = base + records;
    }
    Ok(out)
}

/// Whether a valid frame that ends a batch starts anywhere at or after `from`
/// (then damage before it is not a torn tail).
fn intact_after(data: &[u8], from: usize) -> bool {
    (from..data.len().saturating_sub(1)).any(|p| {
        data[p..p + 2] == FRAME_MAGIC
            && matches!(
                check_frame(&data[p..]),
                FrameCheck::Valid {
                    end_of_batch: true,
                    ..
                }
            )
    })
}
