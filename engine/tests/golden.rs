//! Golden files: the exact bytes of every record type as schema 1 writes them, and
//! the JSON commands external clients publish. An old record must decode forever,
//! so a fixture is never changed: a change in the format is a new schema version.
//!
//! Missing fixtures are written only with `TASKER_BLESS=1`; an existing fixture is
//! never rewritten, blessed or not.

// Test code: clippy.toml's allow-*-in-tests covers `#[test]` functions only, not
// the helpers of an integration-test crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tasker_engine::codec::{self, DecodeError, JsonCommand, JsonFallback};
use tasker_engine::record::{
    BackoffSpec, Body, CancelTask, Command, ContentType, Control, CorrelationId, Envelope, Epoch,
    Event, Kind, PartitionClaimed, Position, RawJson, RecordType, RejectReason, ReportStepResult,
    RequestTask, ResolveStep, RetryTask, StepCancelled, StepCompleted, StepError, StepErrorKind,
    StepFailed, StepId, StepOutcome, StepResolvedManually, StepRetryDue, StepSkipped, StepSpec,
    StepStarted, TaskAccepted, TaskCancelled, TaskFailed, TaskId, TaskRejected, TaskRetried,
    TemplateSnapshot, Timestamp,
};
use uuid::Uuid;

const TASK: TaskId = TaskId::from_uuid(Uuid::from_u128(0x0190_1f0c_5a00_7abc_8def_0123_4567_89ab));
const OTHER_TASK: TaskId =
    TaskId::from_uuid(Uuid::from_u128(0x0190_1f0b_0000_7000_8000_0000_0000_0042));
const CORRELATION: CorrelationId =
    CorrelationId::from_uuid(Uuid::from_u128(0x0190_1f0c_59ff_7111_9222_3333_4444_5555));
/// 2024-06-10T06:13:20.123Z: large enough that every varint takes its long form.
const AT: Timestamp = Timestamp::from_millis(1_718_000_000_123);
const EVENT_EPOCH: Epoch = Epoch(3);
/// The command an event answers; above 2^16 so the varint is multi-byte.
const SOURCE: Position = Position(70_001);

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn blessing() -> bool {
    std::env::var("TASKER_BLESS").is_ok_and(|v| v == "1")
}

fn json(text: &str) -> RawJson {
    RawJson::parse(text).unwrap()
}

fn request() -> RequestTask {
    RequestTask {
        namespace: "shop".into(),
        name: "order".into(),
        version: Some("^1.2".into()),
        context: json(r#"{"order_id":42,"items":["sku-1","sku-2"]}"#),
        idempotency_key: Some("order-42".into()),
        initiator: Some("alice@example.com".into()),
        source_system: Some("storefront".into()),
        reason: Some("customer checkout".into()),
        tags: vec!["priority".into(), "eu-west".into()],
    }
}

/// Three steps (validate -> payment, validate + payment -> ship) with every field
/// set and differing from the defaults.
fn snapshot() -> TemplateSnapshot {
    TemplateSnapshot {
        namespace: "shop".into(),
        name: "order".into(),
        version: "1.2.0".into(),
        steps: vec![
            StepSpec {
                name: "validate".into(),
                handler: "noop".into(),
                depends_on: vec![],
                retryable: true,
                retry_limit: 3,
                timeout_ms: 30_000,
                backoff: BackoffSpec::default(),
                config: json("{}"),
            },
            StepSpec {
                name: "payment".into(),
                handler: "http".into(),
                depends_on: vec![StepId(0)],
                retryable: true,
                retry_limit: 5,
                timeout_ms: 2_000,
                backoff: BackoffSpec {
                    initial_ms: 100,
                    max_ms: 5_000,
                    jitter_pct: 0,
                },
                config: json(r#"{"url":"http://127.0.0.1:9/pay"}"#),
            },
            StepSpec {
                name: "ship".into(),
                handler: "sleep".into(),
                depends_on: vec![StepId(0), StepId(1)],
                retryable: false,
                retry_limit: 1,
                timeout_ms: 1_500,
                backoff: BackoffSpec {
                    initial_ms: 250,
                    max_ms: 60_000,
                    jitter_pct: 25,
                },
                config: json(r#"{"ms":10}"#),
            },
        ],
    }
}

fn command(command: Command) -> Envelope {
    Envelope::command(TASK, CORRELATION, AT, command)
}

fn event(event: Event) -> Envelope {
    Envelope {
        task_id: TASK,
        correlation_id: CORRELATION,
        source_position: Some(SOURCE),
        epoch: EVENT_EPOCH,
        at: AT,
        body: Body::Event(event),
    }
}

/// The frozen sample of each record type. The match has no wildcard on purpose: a
/// new record type does not compile until it has a sample (and then a fixture).
fn sample(t: RecordType) -> Envelope {
    match t {
        RecordType::TaskRequested => command(Command::RequestTask(request())),
        RecordType::TaskCancelRequested => command(Command::CancelTask(CancelTask {
            requested_by: Some("bob".into()),
            reason: Some("customer cancelled".into()),
        })),
        RecordType::TaskRetryRequested => command(Command::RetryTask(RetryTask {
            requested_by: Some("carol".into()),
            reason: Some("payment provider is back".into()),
        })),
        RecordType::StepResolveRequested => command(Command::ResolveStep(ResolveStep {
            step: "payment".into(),
            result: Some(json(r#"{"paid":true,"by":"hand"}"#)),
            resolved_by: Some("dave".into()),
            reason: Some("charged by phone".into()),
            skip_dependents: true,
        })),
        RecordType::StepResultReported => command(Command::ReportStepResult(ReportStepResult {
            step: "payment".into(),
            attempt: 2,
            outcome: StepOutcome::Failed(StepError {
                kind: StepErrorKind::Timeout,
                message: "gateway did not answer in 2000 ms".into(),
                retry_after_ms: Some(1_500),
            }),
        })),
        RecordType::TaskAccepted => event(Event::TaskAccepted(TaskAccepted {
            request: request(),
            template: Arc::new(snapshot()),
        })),
        RecordType::TaskRejected => event(Event::TaskRejected(TaskRejected {
            command: Some(RecordType::StepResultReported),
            reason: RejectReason::DuplicateIdempotencyKey {
                existing: OTHER_TASK,
            },
            message: "idempotency key `order-42` in namespace `shop` already created a task".into(),
            details: vec!["first detail".into(), "second detail".into()],
        })),
        RecordType::TaskStarted => event(Event::TaskStarted),
        RecordType::StepStarted => event(Event::StepStarted(StepStarted {
            step: StepId(2),
            attempt: 3,
        })),
        RecordType::StepCompleted => event(Event::StepCompleted(StepCompleted {
            step: StepId(1),
            attempt: 2,
            result: json(r#"{"charge_id":"ch_1","amount":1999}"#),
        })),
        RecordType::StepFailed => event(Event::StepFailed(StepFailed {
            step: StepId(1),
            attempt: 1,
            error: StepError {
                kind: StepErrorKind::Retryable,
                message: "HTTP 503 from gateway".into(),
                retry_after_ms: Some(1_500),
            },
            retry_at: Some(Timestamp::from_millis(AT.as_millis() + 1_500)),
        })),
        RecordType::StepRetryDue => event(Event::StepRetryDue(StepRetryDue {
            step: StepId(1),
            reset_attempts: true,
        })),
        RecordType::StepSkipped => event(Event::StepSkipped(StepSkipped {
            step: StepId(2),
            reason: "`payment` was resolved with skip_dependents".into(),
        })),
        RecordType::StepCancelled => event(Event::StepCancelled(StepCancelled { step: StepId(2) })),
        RecordType::StepResolvedManually => {
            event(Event::StepResolvedManually(StepResolvedManually {
                step: StepId(1),
                result: json(r#"{"paid":true,"by":"hand"}"#),
                resolved_by: Some("dave".into()),
                reason: Some("charged by phone".into()),
            }))
        }
        RecordType::TaskCompleted => event(Event::TaskCompleted),
        RecordType::TaskFailed => event(Event::TaskFailed(TaskFailed {
            failed_steps: vec![StepId(1), StepId(2)],
        })),
        RecordType::TaskCancelled => event(Event::TaskCancelled(TaskCancelled {
            requested_by: Some("bob".into()),
            reason: Some("customer cancelled".into()),
        })),
        RecordType::TaskRetried => event(Event::TaskRetried(TaskRetried {
            requested_by: Some("carol".into()),
            reason: Some("payment provider is back".into()),
        })),
        RecordType::TaskResolvedManually => event(Event::TaskResolvedManually),
        RecordType::PartitionClaimed => Envelope {
            task_id: TaskId::NIL,
            correlation_id: CorrelationId::NIL,
            source_position: None,
            epoch: Epoch(4),
            at: AT,
            body: Body::Control(Control::PartitionClaimed(PartitionClaimed {
                epoch: Epoch(4),
                owner: "worker-7.example.net:4242".into(),
            })),
        },
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Checks one fixture against today's encoder and decoder; returns the problems.
fn check_fixture(t: RecordType, path: &Path, bless: bool) -> Vec<String> {
    let name = format!("{}.bin", t.name());
    let expected = sample(t);
    let mut problems = Vec::new();
    if expected.record_type() != t || expected.kind() != t.kind() {
        problems.push(format!(
            "{name}: the sample is a {}",
            expected.record_type()
        ));
    }
    let encoded = codec::encode(&expected).unwrap();
    let on_disk = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if bless {
                std::fs::write(path, &encoded).unwrap();
                eprintln!("blessed new fixture {}", path.display());
                encoded.clone()
            } else {
                problems.push(format!(
                    "{name}: no fixture for record type `{t}`. If `{t}` is new, create it once \
                     with `TASKER_BLESS=1 cargo test -p tasker-engine --test golden` and commit it"
                ));
                return problems;
            }
        }
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    if on_disk != encoded {
        let at = first_difference(&on_disk, &encoded);
        problems.push(format!(
            "{name}: today's encoder differs from the frozen fixture at byte {at} \
             (fixture {:02x?}, encoder {:02x?}; {} vs {} bytes). Never change a fixture: \
             restore the old encoding and add a new schema version instead",
            on_disk.get(at),
            encoded.get(at),
            on_disk.len(),
            encoded.len()
        ));
    }
    match codec::decode(&on_disk) {
        Ok(decoded) if decoded == expected => {}
        Ok(decoded) => problems.push(format!(
            "{name}: decodes to a different value\n  expected {expected:?}\n  got      {decoded:?}"
        )),
        Err(e) => problems.push(format!("{name}: no longer decodes: {e}")),
    }
    if codec::peek_schema(&on_disk) != Some(1) {
        problems.push(format!("{name}: is not a schema 1 record"));
    }
    problems
}

#[test]
fn every_record_type_has_a_frozen_fixture_that_still_round_trips() {
    let dir = golden_dir();
    let bless = blessing();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut problems = Vec::new();
    for t in RecordType::ALL {
        problems.extend(check_fixture(
            *t,
            &dir.join(format!("{}.bin", t.name())),
            bless,
        ));
    }
    // A fixture whose type no longer exists means a record type was renamed or
    // dropped: old logs still hold it.
    let known: BTreeSet<String> = RecordType::ALL
        .iter()
        .map(|t| format!("{}.bin", t.name()))
        .collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if file.ends_with(".bin") && !known.contains(&file) {
            problems.push(format!("{file}: names no record type of this build"));
        }
    }
    assert_eq!(RecordType::ALL.len(), 21, "update the golden samples");
    assert!(
        problems.is_empty(),
        "golden fixtures:\n{}",
        problems.join("\n")
    );
}

#[test]
fn fixtures_reject_corruption_instead_of_misreading_it() {
    // The frozen bytes are also a corpus for the decoder's failure paths.
    let bytes = codec::encode(&sample(RecordType::TaskAccepted)).unwrap();
    for cut in 0..bytes.len() {
        assert!(
            codec::decode(&bytes[..cut]).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
    let mut newer = bytes.clone();
    newer[0] = 2;
    assert_eq!(
        codec::decode(&newer),
        Err(DecodeError::UnsupportedSchema(2))
    );
    let mut longer = bytes;
    longer.push(0);
    assert_eq!(
        codec::decode(&longer),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
}

/// Variant order is the wire tag of every enum inside a record; the fixtures pin
/// one variant each, this pins them all (name -> tag, by hand, not by index).
#[test]
fn enum_wire_tags_are_frozen() {
    let tag = |bytes: Vec<u8>| bytes[0];
    let record_types: [(&str, u8); 21] = [
        ("task.requested", 0),
        ("task.cancel_requested", 1),
        ("task.retry_requested", 2),
        ("step.resolve_requested", 3),
        ("step.result_reported", 4),
        ("task.accepted", 5),
        ("task.rejected", 6),
        ("task.started", 7),
        ("step.started", 8),
        ("step.completed", 9),
        ("step.failed", 10),
        ("step.retry_due", 11),
        ("step.skipped", 12),
        ("step.cancelled", 13),
        ("step.resolved_manually", 14),
        ("task.completed", 15),
        ("task.failed", 16),
        ("task.cancelled", 17),
        ("task.retried", 18),
        ("task.resolved_manually", 19),
        ("partition.claimed", 20),
    ];
    for (name, expected) in record_types {
        let t = RecordType::from_name(name).unwrap();
        assert_eq!(
            codec::canonical_bytes(&t).unwrap(),
            vec![expected],
            "{name}"
        );
    }
    let reasons = [
        (RejectReason::Malformed, 0),
        (RejectReason::UnsupportedSchema, 1),
        (RejectReason::UnknownTemplate, 2),
        (RejectReason::UnknownVersion, 3),
        (RejectReason::InvalidContext, 4),
        (RejectReason::ContextTooLarge, 5),
        (RejectReason::DuplicateTask, 6),
        (RejectReason::DuplicateIdempotencyKey { existing: TASK }, 7),
        (RejectReason::UnknownTask, 8),
        (RejectReason::UnknownStep, 9),
        (RejectReason::InvalidTransition, 10),
        (RejectReason::StaleAttempt, 11),
        (RejectReason::WrongPartition, 12),
    ];
    for (reason, expected) in reasons {
        let bytes = codec::canonical_bytes(&reason).unwrap();
        assert_eq!(bytes[0], expected, "{reason:?}");
        let decoded: RejectReason = codec::from_canonical_bytes(&bytes).unwrap();
        assert_eq!(decoded, reason);
    }
    for (kind, expected) in [
        (StepErrorKind::Retryable, 0),
        (StepErrorKind::Permanent, 1),
        (StepErrorKind::Timeout, 2),
    ] {
        assert_eq!(
            codec::canonical_bytes(&kind).unwrap(),
            vec![expected],
            "{kind:?}"
        );
    }
    let completed = StepOutcome::Completed {
        result: RawJson::null(),
    };
    let failed = StepOutcome::Failed(StepError::permanent("x"));
    assert_eq!(tag(codec::canonical_bytes(&completed).unwrap()), 0);
    assert_eq!(tag(codec::canonical_bytes(&failed).unwrap()), 1);
}

// ---- JSON commands, as any Kafka client publishes them ----

/// What the engine fills in when a JSON command leaves fields out.
const FALLBACK: JsonFallback = JsonFallback {
    task_id: OTHER_TASK,
    at: Timestamp::from_millis(1_718_000_999_000),
};

/// Every JSON fixture and the envelope it must become.
fn json_fixtures() -> Vec<(&'static str, Envelope)> {
    let completed = command(Command::ReportStepResult(ReportStepResult {
        step: "payment".into(),
        attempt: 1,
        outcome: StepOutcome::Completed {
            result: json(r#"{"charge_id":"ch_1","amount":1999}"#),
        },
    }));
    // Only what the format requires: the engine picks the task id and time, the
    // correlation id defaults to the task id, the context to `{}`.
    let minimal = Envelope::command(
        FALLBACK.task_id,
        CorrelationId::from_uuid(*FALLBACK.task_id.as_uuid()),
        FALLBACK.at,
        Command::RequestTask(RequestTask {
            namespace: "shop".into(),
            name: "order".into(),
            context: RawJson::empty_object(),
            ..RequestTask::default()
        }),
    );
    vec![
        ("task.requested.json", sample(RecordType::TaskRequested)),
        ("task.requested.minimal.json", minimal),
        (
            "task.cancel_requested.json",
            sample(RecordType::TaskCancelRequested),
        ),
        (
            "task.retry_requested.json",
            sample(RecordType::TaskRetryRequested),
        ),
        (
            "step.resolve_requested.json",
            sample(RecordType::StepResolveRequested),
        ),
        (
            "step.result_reported.json",
            sample(RecordType::StepResultReported),
        ),
        ("step.result_reported.completed.json", completed),
    ]
}

#[test]
fn json_command_fixtures_decode_to_known_commands() {
    let dir = golden_dir().join("json");
    let fixtures = json_fixtures();
    let listed: BTreeSet<&str> = fixtures.iter().map(|(f, _)| *f).collect();
    for t in RecordType::ALL.iter().filter(|t| t.kind() == Kind::Command) {
        let file = format!("{}.json", t.name());
        assert!(listed.contains(file.as_str()), "no JSON fixture for {t}");
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            listed.contains(file.as_str()),
            "{file} is not checked by this test"
        );
    }
    for (file, expected) in fixtures {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (JSON fixtures are written by hand)",
                path.display()
            )
        });
        let decoded: JsonCommand = codec::decode_json_command(&bytes)
            .unwrap_or_else(|e| panic!("{file} no longer decodes: {e}"));
        let full = !file.contains("minimal");
        assert_eq!(decoded.task_id.is_some(), full, "{file}: task_id");
        assert_eq!(
            decoded.correlation_id.is_some(),
            full,
            "{file}: correlation_id"
        );
        assert_eq!(decoded.at.is_some(), full, "{file}: at");
        assert_eq!(decoded.into_envelope(&FALLBACK), expected, "{file}");
        // Without a content-type header the payload is sniffed as JSON.
        let sniffed = codec::decode_any(ContentType::Unknown, &bytes, &FALLBACK).unwrap();
        assert_eq!(sniffed, expected, "{file} (sniffed)");
    }
}
