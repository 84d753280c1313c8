//! Byte layout of segment files. All integers little endian.
//!
//! ```text
//! segment = header(32) frame*
//! header  = magic "TSKRSEG\0" (8) | format u16 = 1 | flags u16 = 0 | partition u32
//!         | base position u64 | crc32c u32 (of the previous 24 bytes) | zero (4)
//! frame   = magic 0xF7 0x5A | flags u8 | reserved u8 | len u32 | crc32c u32 | body(len)
//!           crc covers flags, reserved, len and body; flags bit 0 = last record of
//!           an append batch (a batch is all-or-nothing on recovery)
//! body    = timestamp u64 | key [16] | content_type u8 | kind u8 (0 = unknown)
//!         | record_type u8 (0 = unknown) | schema u16 | ns_len u8 | ns | payload
//! ```

use bytes::Bytes;

use crate::log::{Headers, Record};
use crate::record::{ContentType, Kind, RecordType, TaskId, Timestamp};

pub const SEGMENT_MAGIC: &[u8; 8] = b"TSKRSEG\0";
pub const FORMAT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;
pub const FRAME_MAGIC: [u8; 2] = [0xF7, 0x5A];
pub const FRAME_HEADER_LEN: usize = 12;
pub const BODY_FIXED_LEN: usize = 8 + 16 + 1 + 1 + 1 + 2 + 1;
pub const FLAG_END_OF_BATCH: u8 = 1;
/// The largest frame body a reader accepts (payload limit plus headers).
pub const MAX_BODY_LEN: usize = crate::codec::MAX_RECORD_BYTES + BODY_FIXED_LEN + 255;

pub fn encode_segment_header(partition: u32, base: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&partition.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns (partition, base) or why it is bad.
pub fn decode_segment_header(h: &[u8]) -> Result<(u32, u64), String> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(format!("segment header truncated to {} bytes", h.len()));
    }
    if &h[..8] != SEGMENT_MAGIC {
        return Err("not a Tasker segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc != crc32c::crc32c(&h[..24]) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported segment format version {version}"));
    }
    let partition = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let mut base = [0u8; 8];
    base.copy_from_slice(&h[16..24]);
    Ok((partition, u64::from_le_bytes(base)))
}

/// Appends one frame for `record` to `out`.
pub fn encode_frame(record: &Record, end_of_batch: bool, out: &mut Vec<u8>) {
    let ns: &[u8] = record
        .headers
        .namespace
        .as_deref()
        .map(|n| &n[..n.len().min(255)])
        .unwrap_or(&[]);
    let body_len = BODY_FIXED_LEN + ns.len() + record.payload.len();
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC);
    out.push(if end_of_batch { FLAG_END_OF_BATCH } else { 0 });
    out.push(0);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.extend_from_slice(&record.timestamp.as_millis().to_le_bytes());
    out.extend_from_slice(record.key.as_bytes());
    out.push(record.headers.content_type.code());
    out.push(record.headers.kind.map_or(0, Kind::code));
    out.push(record.headers.record_type.map_or(0, RecordType::code));
    out.extend_from_slice(&record.headers.schema.to_le_bytes());
    out.push(ns.len() as u8);
    out.extend_from_slice(ns);
    out.extend_from_slice(&record.payload);
    let crc = frame_crc(&out[start + 2..start + 8], &out[start + FRAME_HEADER_LEN..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(flags_len: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(flags_len), body)
}

/// The outcome of looking at the bytes where a frame should start.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameCheck {
    /// A whole, valid frame of `total` bytes (header included).
    Valid { total: usize, end_of_batch: bool },
    /// Fewer bytes than the frame needs: end of data (or a torn write).
    Incomplete,
    /// Not a valid frame: bad magic, impossible length or checksum mismatch.
    Invalid(&'static str),
}

/// Validates the frame at the start of `buf` without decoding it.
pub fn check_frame(buf: &[u8]) -> FrameCheck {
    if buf.len() < FRAME_HEADER_LEN {
        if buf.len() >= 2 && buf[..2] != FRAME_MAGIC {
            return FrameCheck::Invalid("bad frame magic");
        }
        return FrameCheck::Incomplete;
    }
    if buf[..2] != FRAME_MAGIC {
        return FrameCheck::Invalid("bad frame magic");
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if !(BODY_FIXED_LEN..=MAX_BODY_LEN).contains(&len) {
        return FrameCheck::Invalid("impossible frame length");
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return FrameCheck::Incomplete;
    }
    let crc = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if crc != frame_crc(&buf[2..8], &buf[FRAME_HEADER_LEN..total]) {
        return FrameCheck::Invalid("frame checksum mismatch");
    }
    let ns_len = buf[FRAME_HEADER_LEN + BODY_FIXED_LEN - 1] as usize;
    if BODY_FIXED_LEN + ns_len > len {
        return FrameCheck::Invalid("namespace longer than the frame");
    }
    FrameCheck::Valid {
        total,
        end_of_batch: buf[2] & FLAG_END_OF_BATCH != 0,
    }
}

/// Decodes a frame already checked by [`check_frame`]; `frame` is exactly its bytes
/// and stays shared (no copy) by the record's payload and namespace.
pub fn decode_frame(frame: &Bytes) -> Record {
    let b = &frame[FRAME_HEADER_LEN..];
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&b[..8]);
    let mut key = [0u8; 16];
    key.copy_from_slice(&b[8..24]);
    let ns_len = b[29] as usize;
    let ns_start = FRAME_HEADER_LEN + BODY_FIXED_LEN;
    let namespace = (ns_len > 0).then(|| frame.slice(ns_start..ns_start + ns_len));
    Record {
        key: TaskId::from_uuid(uuid::Uuid::from_bytes(key)),
        headers: Headers {
            content_type: ContentType::from_code(b[24]),
            kind: Kind::from_code(b[25]),
            record_type: RecordType::from_code(b[26]),
            schema: u16::from_le_bytes([b[27], b[28]]),
            namespace,
        },
        timestamp: Timestamp::from_millis(u64::from_le_bytes(ts)),
        payload: frame.slice(ns_start + ns_len..),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &'static [u8]) -> Record {
        Record {
            key: TaskId::v7(Timestamp(3), 4),
            headers: Headers {
                content_type: ContentType::Bincode,
                kind: Some(Kind::Event),
                record_type: Some(RecordType::StepCompleted),
                schema: 1,
                namespace: Some(Bytes::from_static(b"shop")),
            },
            timestamp: Timestamp(1234),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn frames_round_trip_and_every_corruption_is_caught() {
        let r = record(b"hello world");
        let mut buf = Vec::new();
        encode_frame(&r, true, &mut buf);
        let total = buf.len();
        assert_eq!(
            check_frame(&buf),
            FrameCheck::Valid {
                total,
                end_of_batch: true
            }
        );
        assert_eq!(decode_frame(&Bytes::from(buf.clone())), r);
        for cut in 0..total {
            assert_eq!(
                check_frame(&buf[..cut]),
                FrameCheck::Incomplete,
                "cut at {cut}"
            );
        }
        for i in 0..total {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    !matches!(check_frame(&bad), FrameCheck::Valid { .. }),
                    "flip of byte {i} bit {bit} went unnoticed"
                );
            }
        }
        let h = encode_segment_header(3, 77);
        assert_eq!(decode_segment_header(&h), Ok((3, 77)));
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
    }
}
