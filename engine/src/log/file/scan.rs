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
    while off < data.len() {
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
    let damage = stopped.map(|(offset, reason)| Damage {
        offset: offset as u64,
        reason,
        intact_after: whole_batch_after(data, offset + 1),
    });
    ScanResult {
        valid_len: valid_len as u64,
        records,
        index,
        damage,
    }
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
}
