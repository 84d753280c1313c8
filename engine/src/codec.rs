//! The only place record bytes are made or read: bincode (pinned at 2.0.1, serde,
//! standard config, size-limited) for everything the engine writes, and JSON for
//! commands from any client.
//!
//! Payload layout (bincode standard config, varint integers):
//! `schema: u16` then the envelope of that schema version. Schema 1 is
//! [`Envelope`] as declared in `record`; it is frozen, and golden files under
//! `engine/tests/golden/` fail the build if a byte changes.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::record::{
    Body, CancelTask, Command, ContentType, CorrelationId, Envelope, RawJson, RecordType,
    ReportStepResult, RequestTask, ResolveStep, RetryTask, SCHEMA_VERSION, StepError,
    StepErrorKind, StepOutcome, TaskId, Timestamp,
};

/// The largest record payload the decoder accepts (and the encoder produces).
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

type Config = Configuration<LittleEndian, Varint, Limit<MAX_RECORD_BYTES>>;

const fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// The largest value [`from_canonical_bytes`] accepts (state snapshots are big).
pub const MAX_CANONICAL_BYTES: usize = 1 << 30;

type BulkConfig = Configuration<LittleEndian, Varint, Limit<MAX_CANONICAL_BYTES>>;

const fn bulk_config() -> BulkConfig {
    bincode::config::standard().with_limit::<MAX_CANONICAL_BYTES>()
}

/// Why bytes did not become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record payload")]
    Empty,
    #[error("record payload of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("unsupported record schema version {0} (this build reads 1..={SCHEMA_VERSION})")]
    UnsupportedSchema(u16),
    #[error("malformed bincode record: {0}")]
    Bincode(String),
    #[error("{extra} unexpected bytes after the record")]
    TrailingBytes { extra: usize },
    #[error("malformed JSON command: {0}")]
    Json(String),
    #[error("unknown command type `{0}`")]
    UnknownType(String),
    #[error("record type `{0}` cannot be sent as a JSON command")]
    NotACommand(String),
    #[error("field `{field}`: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
}

/// Why a record could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode record: {0}")]
    Bincode(String),
    #[error("encoded record of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
}

/// Appends the encoded envelope to `buf` (reused across records on the hot path).
pub fn encode_into(envelope: &Envelope, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = buf.len();
    bincode::serde::encode_into_std_write(SCHEMA_VERSION, buf, config())
        .and_then(|_| bincode::serde::encode_into_std_write(envelope, buf, config()))
        .map_err(|e| EncodeError::Bincode(e.to_string()))?;
    let len = buf.len() - start;
    if len > MAX_RECORD_BYTES {
        buf.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            limit: MAX_RECORD_BYTES,
        });
    }
    Ok(())
}

pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(128);
    encode_into(envelope, &mut buf)?;
    Ok(buf)
}

/// The canonical bytes of any engine value (digests, snapshots); same config as records.
pub fn canonical_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, bulk_config())
        .map_err(|e| EncodeError::Bincode(e.to_string()))
}

/// Decodes a value written by [`canonical_bytes`].
pub fn from_canonical_bytes<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bulk_config())
        .map_err(|e| DecodeError::Bincode(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Decodes an engine-written (bincode) record.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    check_len(bytes)?;
    let (schema, used): (u16, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError::Bincode(e.to_string()))?;
    let rest = &bytes[used..];
    match schema {
        1 => {
            let (envelope, used): (Envelope, usize) =
                bincode::serde::decode_from_slice(rest, config())
                    .map_err(|e| DecodeError::Bincode(e.to_string()))?;
            if used != rest.len() {
                return Err(DecodeError::TrailingBytes {
                    extra: rest.len() - used,
                });
            }
            Ok(envelope)
        }
        other => Err(DecodeError::UnsupportedSchema(other)),
    }
}

/// Reads just the schema version (for headers and diagnostics).
pub fn peek_schema(bytes: &[u8]) -> Option<u16> {
    bincode::serde::decode_from_slice::<u16, _>(bytes, config())
        .ok()
        .map(|(s, _)| s)
}

/// Decodes any record: bincode, or a JSON command, by `content_type`; when the
/// header is missing the payload is sniffed (JSON starts with `{`).
///
/// `fallback` fills what a JSON command may leave out (see [`JsonCommand`]).
pub fn decode_any(
    content_type: ContentType,
    bytes: &[u8],
    fallback: &JsonFallback,
) -> Result<Envelope, DecodeError> {
    let json = match content_type {
        ContentType::Json => true,
        ContentType::Bincode => false,
        ContentType::Unknown => bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{'),
    };
    if json {
        decode_json_command(bytes).map(|c| c.into_envelope(fallback))
    } else {
        decode(bytes)
    }
}

fn check_len(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    Ok(())
}

/// What the engine supplies when a JSON command leaves optional fields out.
#[derive(Debug, Clone, Copy)]
pub struct JsonFallback {
    /// Used for `task.requested` without `task_id`; the engine derives it from the
    /// record's partition and position so the choice is deterministic.
    pub task_id: TaskId,
    /// The record's timestamp (Kafka's, or the file log's).
    pub at: Timestamp,
}

/// A command decoded from JSON, before the engine fills in what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonCommand {
    pub task_id: Option<TaskId>,
    pub correlation_id: Option<CorrelationId>,
    pub at: Option<Timestamp>,
    pub command: Command,
}

impl JsonCommand {
    /// Completes the envelope; the correlation id defaults to the task id.
    pub fn into_envelope(self, fallback: &JsonFallback) -> Envelope {
        let task_id = self.task_id.unwrap_or(fallback.task_id);
        let correlation_id = self
            .correlation_id
            .unwrap_or_else(|| CorrelationId::from_uuid(*task_id.as_uuid()));
        Envelope::command(
            task_id,
            correlation_id,
            self.at.unwrap_or(fallback.at),
            self.command,
        )
    }
}

/// The JSON wire form any client can publish. `type` selects the command; the
/// other fields are those of the command (see `docs/events.md`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonWire<'a> {
    #[serde(rename = "type")]
    kind: String,
    task_id: Option<String>,
    correlation_id: Option<String>,
    at: Option<u64>,
    // task.requested
    namespace: Option<String>,
    name: Option<String>,
    version: Option<String>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    idempotency_key: Option<String>,
    initiator: Option<String>,
    source_system: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    // cancel / retry / resolve
    requested_by: Option<String>,
    step: Option<String>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    resolved_by: Option<String>,
    #[serde(default)]
    skip_dependents: bool,
    // step.result_reported
    attempt: Option<u32>,
    status: Option<String>,
    error: Option<JsonStepError>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStepError {
    kind: Option<String>,
    message: String,
    retry_after_ms: Option<u64>,
}

/// Decodes a JSON command. Malformed input is an error, never a panic.
pub fn decode_json_command(bytes: &[u8]) -> Result<JsonCommand, DecodeError> {
    check_len(bytes)?;
    let wire: JsonWire<'_> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
    let task_id = wire
        .task_id
        .as_deref()
        .map(|s| {
            s.parse::<TaskId>().map_err(|e| DecodeError::InvalidField {
                field: "task_id",
                message: e.to_string(),
            })
        })
        .transpose()?;
    let correlation_id = wire
        .correlation_id
        .as_deref()
        .map(|s| {
            s.parse::<CorrelationId>()
                .map_err(|e| DecodeError::InvalidField {
                    field: "correlation_id",
                    message: e.to_string(),
                })
        })
        .transpose()?;
    let record_type = RecordType::from_name(&wire.kind)
        .ok_or_else(|| DecodeError::UnknownType(wire.kind.clone()))?;
    let needs_task = |t: &Option<TaskId>| {
        if t.is_none() {
            Err(DecodeError::InvalidField {
                field: "task_id",
                message: format!("required for {}", wire.kind),
            })
        } else {
            Ok(())
        }
    };
    let command = match record_type {
        RecordType::TaskRequested => Command::RequestTask(RequestTask {
            namespace: required(wire.namespace, "namespace")?,
            name: required(wire.name, "name")?,
            version: wire.version,
            context: wire
                .context
                .map(|r| RawJson::from_trusted(r.get().to_owned()))
                .unwrap_or_else(RawJson::empty_object),
            idempotency_key: wire.idempotency_key,
            initiator: wire.initiator,
            source_system: wire.source_system,
            reason: wire.reason,
            tags: wire.tags,
        }),
        RecordType::TaskCancelRequested => {
            needs_task(&task_id)?;
            Command::CancelTask(CancelTask {
                requested_by: wire.requested_by,
                reason: wire.reason,
            })
        }
        RecordType::TaskRetryRequested => {
            needs_task(&task_id)?;
            Command::RetryTask(RetryTask {
                requested_by: wire.requested_by,
                reason: wire.reason,
            })
        }
        RecordType::StepResolveRequested => {
            needs_task(&task_id)?;
            Command::ResolveStep(ResolveStep {
                step: required(wire.step, "step")?,
                result: wire
                    .result
                    .map(|r| RawJson::from_trusted(r.get().to_owned())),
                resolved_by: wire.resolved_by,
                reason: wire.reason,
                skip_dependents: wire.skip_dependents,
            })
        }
        RecordType::StepResultReported => {
            needs_task(&task_id)?;
            let status = required(wire.status, "status")?;
            let outcome = match status.as_str() {
                "completed" => StepOutcome::Completed {
                    result: wire
                        .result
                        .map(|r| RawJson::from_trusted(r.get().to_owned()))
                        .unwrap_or_else(RawJson::null),
                },
                "failed" => {
                    let e = wire.error.ok_or(DecodeError::InvalidField {
                        field: "error",
                        message: "required when status is `failed`".into(),
                    })?;
                    let kind = match e.kind.as_deref().unwrap_or("retryable") {
                        "retryable" => StepErrorKind::Retryable,
                        "permanent" => StepErrorKind::Permanent,
                        "timeout" => StepErrorKind::Timeout,
                        other => {
                            return Err(DecodeError::InvalidField {
                                field: "error.kind",
                                message: format!(
                                    "`{other}` is not one of retryable, permanent, timeout"
                                ),
                            });
                        }
                    };
                    StepOutcome::Failed(StepError {
                        kind,
                        message: e.message,
                        retry_after_ms: e.retry_after_ms,
                    })
                }
                other => {
                    return Err(DecodeError::InvalidField {
                        field: "status",
                        message: format!("`{other}` is not one of completed, failed"),
                    });
                }
            };
            Command::ReportStepResult(ReportStepResult {
                step: required(wire.step, "step")?,
                attempt: wire.attempt.ok_or(DecodeError::InvalidField {
                    field: "attempt",
                    message: "required".into(),
                })?,
                outcome,
            })
        }
        other => return Err(DecodeError::NotACommand(other.name().to_owned())),
    };
    Ok(JsonCommand {
        task_id,
        correlation_id,
        at: wire.at.map(Timestamp::from_millis),
        command,
    })
}

fn required(value: Option<String>, field: &'static str) -> Result<String, DecodeError> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(DecodeError::InvalidField {
            field,
            message: "required".into(),
        }),
    }
}

/// Encodes a command as the JSON any client would publish (tools and tests acting
/// as an external client). JSON values carried inside (context, results) keep their
/// exact text.
pub fn command_to_json(envelope: &Envelope) -> Option<String> {
    let Body::Command(command) = &envelope.body else {
        return None;
    };
    let raw = |j: &RawJson| RawValue::from_string(j.as_str().to_owned()).ok();
    let mut out = JsonOut {
        kind: command.record_type().name(),
        task_id: envelope.task_id.to_string(),
        correlation_id: envelope.correlation_id.to_string(),
        at: envelope.at.as_millis(),
        ..JsonOut::default()
    };
    match command {
        Command::RequestTask(r) => {
            out.namespace = Some(&r.namespace);
            out.name = Some(&r.name);
            out.version = r.version.as_deref();
            out.context = raw(&r.context);
            out.idempotency_key = r.idempotency_key.as_deref();
            out.initiator = r.initiator.as_deref();
            out.source_system = r.source_system.as_deref();
            out.reason = r.reason.as_deref();
            out.tags = &r.tags;
        }
        Command::CancelTask(c) => {
            out.requested_by = c.requested_by.as_deref();
            out.reason = c.reason.as_deref();
        }
        Command::RetryTask(c) => {
            out.requested_by = c.requested_by.as_deref();
            out.reason = c.reason.as_deref();
        }
        Command::ResolveStep(c) => {
            out.step = Some(&c.step);
            out.result = c.result.as_ref().and_then(raw);
            out.resolved_by = c.resolved_by.as_deref();
            out.reason = c.reason.as_deref();
            out.skip_dependents = c.skip_dependents;
        }
        Command::ReportStepResult(c) => {
            out.step = Some(&c.step);
            out.attempt = Some(c.attempt);
            match &c.outcome {
                StepOutcome::Completed { result } => {
                    out.status = Some("completed");
                    out.result = raw(result);
                }
                StepOutcome::Failed(e) => {
                    out.status = Some("failed");
                    out.error = Some(JsonErrorOut {
                        kind: e.kind.as_str(),
                        message: &e.message,
                        retry_after_ms: e.retry_after_ms,
                    });
                }
            }
        }
    }
    serde_json::to_string(&out).ok()
}

#[derive(serde::Serialize, Default)]
struct JsonOut<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    task_id: String,
    correlation_id: String,
    at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initiator: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    tags: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_by: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    skip_dependents: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<JsonErrorOut<'a>>,
}

#[derive(serde::Serialize)]
struct JsonErrorOut<'a> {
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Epoch, Event, Position, StepId, StepStarted};

    fn sample() -> Envelope {
        Envelope {
            task_id: TaskId::v7(Timestamp(1_700_000_000_000), 42),
            correlation_id: CorrelationId::NIL,
            source_position: Some(Position(7)),
            epoch: Epoch(3),
            at: Timestamp(1_700_000_000_001),
            body: Body::Event(Event::StepStarted(StepStarted {
                step: StepId(2),
                attempt: 1,
            })),
        }
    }

    #[test]
    fn round_trips_and_rejects_garbage_without_panicking() {
        let env = sample();
        let bytes = encode(&env).unwrap();
        assert_eq!(decode(&bytes).unwrap(), env);
        assert_eq!(peek_schema(&bytes), Some(1));
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
        let mut v2 = bytes;
        v2[0] = 9;
        assert_eq!(decode(&v2), Err(DecodeError::UnsupportedSchema(9)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        // a huge claimed string length must not allocate or panic
        let hostile = [1u8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode(&hostile).is_err());
    }

    #[test]
    fn json_commands_decode_and_fill_defaults() {
        let fallback = JsonFallback {
            task_id: TaskId::v7(Timestamp(5), 1),
            at: Timestamp(99),
        };
        let bytes = br#"{"type":"task.requested","namespace":"shop","name":"order",
            "context":{"order_id": 7, "items":[1,2]},"tags":["a"]}"#;
        let env = decode_any(ContentType::Unknown, bytes, &fallback).unwrap();
        assert_eq!(env.task_id, fallback.task_id);
        assert_eq!(env.at, Timestamp(99));
        assert_eq!(*env.correlation_id.as_uuid(), *fallback.task_id.as_uuid());
        let Some(Command::RequestTask(r)) = env.as_command() else {
            panic!("not a request: {env:?}")
        };
        assert_eq!(r.context.as_str(), r#"{"order_id": 7, "items":[1,2]}"#);
        assert_eq!(r.tags, vec!["a".to_string()]);

        let back = command_to_json(&env).unwrap();
        let again = decode_json_command(back.as_bytes()).unwrap();
        assert_eq!(again.into_envelope(&fallback).body, env.body);

        for (bad, why) in [
            (&br#"{"type":"task.requested","name":"x"}"#[..], "namespace"),
            (br#"{"type":"task.exploded"}"#, "unknown command"),
            (br#"{"type":"task.completed"}"#, "cannot be sent"),
            (br#"{"type":"task.cancel_requested"}"#, "task_id"),
            (
                br#"{"type":"task.requested","namespace":1}"#,
                "invalid type",
            ),
            (br#"{"type":"task.requested","bogus":1}"#, "unknown field"),
            (
                br#"{"type":"task.cancel_requested","task_id":"nope"}"#,
                "task_id",
            ),
            (b"{", "EOF"),
        ] {
            let err = decode_any(ContentType::Json, bad, &fallback).unwrap_err();
            assert!(err.to_string().contains(why), "{err} should mention {why}");
        }
    }
}
