//! Scanning a segment's bytes, and deciding what recovery does with damage. Pure
//! functions over a byte slice, so every failure case is a unit test.

use super::format::{FRAME_MAGIC, FrameCheck, SEGMENT_HEADER_LEN, check_frame};

/// One sparse index entry every this many records.
pub const INDEX_STRIDE: u64 = 512;

/// What a segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// Bytes from the start of the file up to the end of the last whole batch.
    pub valid_len: u64,
    /// Records in those whole batches.
    pub records: u64,
    /// `(record index in segment, byte offset)` every [`INDEX_STRIDE`] records.
    pub index: Vec<(u64, u64)>,
    /// Where and why the scan stopped before the end of the bytes, if it did.
    pub damage: Option<Damage>,
    /// Zero bytes after the last whole batch: space preallocated for appends
    /// (see `segment::prepare_spare`), not damage.
    pub zero_tail: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub reason: &'static str,
    /// A complete batch was found after the damage: the damage is not a torn tail.
    pub intact_after: bool,
}

/// Scans frames from just after the segment header.
pub fn scan(data: &[u8]) -> ScanResult {
    let mut off = SEGMENT_HEADER_LEN.min(data.len());
    let mut records = 0u64;
    let mut index = Vec::new();
    let mut batch_end = (off, 0u64); // (offset, records) after the last whole batch
    let mut stopped: Option<(usize, &'static str)> = None;
    let mut zero_tail = 0;
    while off < data.len() {
        if data[off] == 0 && is_zero(&data[off..]) {
            // No frame starts with a zero byte: the rest is preallocated space.
            zero_tail = data.len() - off;
            break;
        }
        match check_frame(&data[off..]) {
            FrameCheck::Valid {
                total,
                end_of_batch,
            } => {
                if records.is_multiple_of(INDEX_STRIDE) {
                    index.push((records, off as u64));
                }
                records += 1;
                off += total;
                if end_of_batch {
                    batch_end = (off, records);
                }
            }
            FrameCheck::Incomplete => {
                stopped = Some((off, "truncated frame"));
                break;
            }
            FrameCheck::Invalid(reason) => {
                stopped = Some((off, reason));
                break;
            }
        }
    }
    if stopped.is_none() && batch_end.0 < off {
        stopped = Some((batch_end.0, "batch without its final record"));
    }
    let (valid_len, records) = batch_end;
    index.retain(|(i, _)| *i < records);
    if stopped.is_some() {
        zero_tail = 0;
    }
    let damage = stopped.map(|(offset, reason)| Damage {
        offset: offset as u64,
        reason,
        intact_after: whole_batch_after(data, offset + 1) && !torn_over_zeros(data, offset),
    });
    ScanResult {
        valid_len: valid_len as u64,
        records,
        index,
        damage,
        zero_tail: zero_tail as u64,
    }
}

/// Whether every byte is zero (vectorizes, unlike an early-exit loop).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0, |acc, b| acc | b) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// The sector size a disk writes atomically at the least.
const SECTOR: usize = 512;

/// Whether the damage at `from` is one batch written over preallocated zeros
/// whose sectors did not all reach the disk before a crash: a whole zero sector
/// inside the damage, then the batch's intact final frame, then only zeros. Bit
/// rot leaves no zero sector, and damage in an older batch is followed by more
/// than one batch. Without this, a power loss during an append into a
/// preallocated segment would read as corruption instead of a torn tail.
pub(crate) fn torn_over_zeros(data: &[u8], from: usize) -> bool {
    let mut p = from + 1;
    let (end_start, end) = loop {
        if p + 2 > data.len() {
            return false;
        }
        if data[p..p + 2] == FRAME_MAGIC
            && let FrameCheck::Valid {
                total,
                end_of_batch: true,
            } = check_frame(&data[p..])
        {
            break (p, p + total);
        }
        p += 1;
    };
    let first_sector = from.div_ceil(SECTOR) * SECTOR;
    let zero_sector = (first_sector..end_start.saturating_sub(SECTOR - 1))
        .step_by(SECTOR)
        .any(|s| is_zero(&data[s..s + SECTOR]));
    zero_sector && is_zero(&data[end..])
}

/// Looks for any valid frame that ends a batch at or after `from`.
pub(super) fn whole_batch_after(data: &[u8], from: usize) -> bool {
    let mut p = from;
    while p + 2 <= data.len() {
        if data[p..p + 2] == FRAME_MAGIC
            && let FrameCheck::Valid {
                end_of_batch: true, ..
            } = check_frame(&data[p..])
        {
            return true;
        }
        p += 1;
    }
    false
}

/// What opening a partition does about a segment's damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    Clean,
    /// The last segment ends in a torn batch (never acknowledged): cut it off.
    TruncateTail {
        at: u64,
        dropped_bytes: u64,
    },
    /// Durable data is damaged: stop and name the place.
    Refuse {
        offset: u64,
        reason: String,
    },
}

/// Only the last segment may have a torn tail; damage followed by an intact batch,
/// or in any sealed segment, is corruption.
pub fn recovery(scan: &ScanResult, data_len: u64, is_last_segment: bool) -> Recovery {
    match &scan.damage {
        None => Recovery::Clean,
        Some(d) if is_last_segment && !d.intact_after => Recovery::TruncateTail {
            at: scan.valid_len,
            dropped_bytes: data_len - scan.valid_len,
        },
        Some(d) => Recovery::Refuse {
            offset: d.offset,
            reason: if d.intact_after {
                format!("{}, followed by intact records", d.reason)
            } else {
                d.reason.to_owned()
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::format::{encode_frame, encode_segment_header};
    use super::*;
    use crate::log::{Headers, Record};
    use crate::record::{TaskId, Timestamp};

    fn segment(batches: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let mut data = encode_segment_header(0, 0).to_vec();
        let mut ends = Vec::new();
        let mut n = 0u64;
        for &size in batches {
            for i in 0..size {
                let r = Record {
                    key: TaskId::NIL,
                    headers: Headers::unknown(),
                    timestamp: Timestamp(n),
                    payload: Bytes::from(vec![n as u8; 10 + (n % 7) as usize]),
                };
                encode_frame(&r, i + 1 == size, &mut data);
                n += 1;
            }
            ends.push(data.len());
        }
        (data, ends)
    }

    #[test]
    fn clean_segment_scans_whole() {
        let (data, _) = segment(&[3, 1, 600]);
        let s = scan(&data);
        assert_eq!(s.records, 604);
        assert_eq!(s.valid_len, data.len() as u64);
        assert_eq!(s.damage, None);
        assert_eq!(s.index.len(), 2);
        assert_eq!(recovery(&s, data.len() as u64, true), Recovery::Clean);
    }

    #[test]
    fn torn_tail_at_every_offset_drops_only_the_last_batch() {
        let (data, ends) = segment(&[2, 3]);
        let first_batch_end = ends[0] as u64;
        for cut in ends[0] + 1..data.len() {
            let s = scan(&data[..cut]);
            assert_eq!(s.records, 2, "cut at {cut}");
            assert_eq!(
                recovery(&s, cut as u64, true),
                Recovery::TruncateTail {
                    at: first_batch_end,
                    dropped_bytes: cut as u64 - first_batch_end
                },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn damage_before_intact_batches_is_refused() {
        let (mut data, ends) = segment(&[2, 2, 2]);
        let offset = ends[0] + 3;
        data[offset] ^= 0xFF;
        let s = scan(&data);
        assert_eq!(s.records, 2);
        match recovery(&s, data.len() as u64, true) {
            Recovery::Refuse { offset: at, reason } => {
                assert_eq!(at, ends[0] as u64);
                assert!(reason.contains("intact"), "{reason}");
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        // the same damage in a sealed segment is refused even without intact data after
        let (mut data, ends) = segment(&[2, 2]);
        let last = data.len() - 1;
        data[last] ^= 1;
        let s = scan(&data);
        assert!(matches!(
            recovery(&s, data.len() as u64, false),
            Recovery::Refuse { .. }
        ));
        assert_eq!(s.valid_len, ends[0] as u64);
    }

    #[test]
    fn zeroed_page_in_the_middle_is_refused() {
        let (mut data, _) = segment(&[40, 40, 40]);
        for b in &mut data[100..400] {
            *b = 0;
        }
        let s = scan(&data);
        assert!(
            matches!(recovery(&s, data.len() as u64, true), Recovery::Refuse { offset, .. } if offset <= 100)
        );
    }

    /// `data` padded with zeros to `len`, as an append into a preallocated segment leaves it.
    fn preallocated(mut data: Vec<u8>, len: usize) -> Vec<u8> {
        data.resize(len, 0);
        data
    }

    #[test]
    fn zeros_after_the_last_batch_are_preallocated_space() {
        let (data, _) = segment(&[3, 1, 600]);
        let n = data.len();
        let padded = preallocated(data, n + 70_000);
        let s = scan(&padded);
        assert_eq!(
            (s.records, s.valid_len, s.zero_tail),
            (604, n as u64, 70_000)
        );
        assert_eq!(s.damage, None);
        assert_eq!(recovery(&s, padded.len() as u64, true), Recovery::Clean);
        // an empty preallocated segment: the header, then zeros
        let s = scan(&preallocated(encode_segment_header(0, 0).to_vec(), 4096));
        assert_eq!((s.records, s.zero_tail, s.damage), (0, 4096 - 32, None));
    }

    #[test]
    fn a_batch_torn_over_preallocated_zeros_is_a_torn_tail_anywhere_it_tore() {
        let (data, ends) = segment(&[5, 200]);
        let len = data.len() + 8192;
        let padded = preallocated(data, len);
        // Any one sector of the last batch that never reached the disk.
        let first = ends[0].div_ceil(SECTOR) * SECTOR;
        let mut sectors = 0;
        for sector in (first..ends[1] - SECTOR).step_by(SECTOR) {
            let mut torn = padded.clone();
            torn[sector..sector + SECTOR].fill(0);
            let s = scan(&torn);
            assert_eq!(s.records, 5, "sector at {sector}");
            assert_eq!(
                recovery(&s, len as u64, true),
                Recovery::TruncateTail {
                    at: ends[0] as u64,
                    dropped_bytes: (len - ends[0]) as u64
                },
                "sector at {sector}"
            );
            sectors += 1;
        }
        assert!(sectors >= 4, "the last batch spans {sectors} whole sectors");
    }

    #[test]
    fn damage_over_preallocated_zeros_that_a_crash_cannot_explain_is_refused() {
        let (data, ends) = segment(&[200, 200]);
        let len = data.len() + 8192;
        let padded = preallocated(data, len);
        // A zeroed sector in the first batch: a whole batch follows it.
        let mut zeroed = padded.clone();
        let sector = 2 * SECTOR;
        assert!(sector + SECTOR < ends[0]);
        zeroed[sector..sector + SECTOR].fill(0);
        let s = scan(&zeroed);
        assert!(matches!(
            recovery(&s, len as u64, true),
            Recovery::Refuse { .. }
        ));
        // A flipped bit in the last batch leaves no zero sector: bit rot, not a crash.
        let mut flipped = padded;
        flipped[ends[0] + 700] ^= 0x10;
        let s = scan(&flipped);
        assert!(matches!(
            recovery(&s, len as u64, true),
            Recovery::Refuse { .. }
        ));
    }
}
