//! Envelopes to log records: payload bytes plus the headers subscribers filter on.

use bytes::Bytes;

use crate::codec::{self, EncodeError};
use crate::log::{Headers, Record};
use crate::record::{ContentType, Envelope, SCHEMA_VERSION};

/// Encodes `envelope` into a record, tagging it with the task's namespace.
pub fn to_record(
    envelope: &Envelope,
    namespace: Option<Bytes>,
    buf: &mut Vec<u8>,
) -> Result<Record, EncodeError> {
    buf.clear();
    codec::encode_into(envelope, buf)?;
    Ok(Record {
        key: envelope.task_id,
        headers: Headers {
            content_type: ContentType::Bincode,
            kind: Some(envelope.kind()),
            record_type: Some(envelope.record_type()),
            schema: SCHEMA_VERSION,
            namespace,
        },
        timestamp: envelope.at,
        payload: Bytes::copy_from_slice(buf),
    })
}
