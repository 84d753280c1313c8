//! The bad-input catalogue: each kind of bad input gets a typed rejection record
//! and/or error, is counted in a metric, and the engine keeps processing the next
//! record. (HTTP handler responses of every class, oversized response bodies and
//! non-JSON bodies are covered in `http_handler.rs`; API-level limits in the
//! binary's API tests; Kafka garbage in `kafka_engine.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tasker_engine::codec;
use tasker_engine::handler::{HandlerRegistry, StepContext, StepHandler};
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::log::{Headers, Log, Record, partition_for_task};
use tasker_engine::record::{
    CancelTask, Command, ContentType, CorrelationId, Envelope, Event, Kind, PartitionId, Position,
    RawJson, RecordType, RejectReason, ReportStepResult, RequestTask, ResolveStep, RetryTask,
    StepError, StepErrorKind, StepOutcome, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions, SubmitOutcome, to_record};
use tasker_engine::state::{StepStatus, TaskStatus};
use tasker_engine::template::{Template, TemplateErrorKind};

struct Panics;
#[async_trait::async_trait]
impl StepHandler for Panics {
    async fn call(&self, _ctx: StepContext) -> Result<serde_json::Value, StepError> {
        panic!("the handler blew up")
    }
}

struct Hangs;
#[async_trait::async_trait]
impl StepHandler for Hangs {
    async fn call(&self, _ctx: StepContext) -> Result<serde_json::Value, StepError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(serde_json::json!({}))
    }
}

const TEMPLATES: &[&str] = &[
    "namespace: bad\nname: ok\nversion: 1.0.0\ncontext_schema: { type: object, properties: { n: { type: integer } } }\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n",
    "namespace: bad\nname: panics\nversion: 1.0.0\nsteps:\n  - { name: a, handler: panics, retry_limit: 1 }\n",
    "namespace: bad\nname: hangs\nversion: 1.0.0\nsteps:\n  - { name: a, handler: hangs, timeout: 100ms, retry_limit: 2, backoff: { initial: 10ms } }\n",
];

struct Setup {
    dir: tempfile::TempDir,
    partitions: u32,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::TempDir::new().unwrap(),
            partitions: 2,
        }
    }

    fn log(&self) -> Arc<dyn Log> {
        Arc::new(
            FileLog::open(
                self.dir.path(),
                FileLogConfig {
                    partitions: self.partitions,
                    ..FileLogConfig::default()
                },
            )
            .unwrap(),
        )
    }

    fn engine(&self) -> Engine {
        let handlers = Arc::new(HandlerRegistry::with_builtins());
        handlers.register("panics", Panics);
        handlers.register("hangs", Hangs);
        let registry = Arc::new(TemplateRegistry::new(handlers, None));
        for t in TEMPLATES {
            registry.add_yaml(t, "bad.yaml").unwrap();
        }
        let options = EngineOptions {
            max_context_bytes: 1024,
            ..EngineOptions::default()
        };
        Engine::start(self.log(), registry, options, None).unwrap()
    }

    /// Appends raw records to a partition while no engine runs (as `tasker submit`
    /// does), for inputs no Rust client would produce.
    fn append_raw(&self, partition: PartitionId, records: &[Record]) -> Vec<Position> {
        let log = self.log();
        let mut w = log.writer(partition).unwrap();
        w.append(records).unwrap()
    }
}

fn raw(key: TaskId, content_type: ContentType, payload: &[u8]) -> Record {
    Record {
        key,
        headers: Headers {
            content_type,
            kind: Some(Kind::Command),
            record_type: None,
            schema: 0,
            namespace: None,
        },
        timestamp: Timestamp::now(),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn req(name: &str, context: &str) -> Envelope {
    Envelope::command(
        TaskId::generate(),
        CorrelationId::NIL,
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "bad".into(),
            name: name.into(),
            context: RawJson::parse(context).unwrap(),
            ..RequestTask::default()
        }),
    )
}

fn on(task: TaskId, command: Command) -> Envelope {
    Envelope::command(task, CorrelationId::NIL, Timestamp::now(), command)
}

fn rejected(outcome: SubmitOutcome) -> RejectReason {
    match outcome {
        SubmitOutcome::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn wait_terminal(engine: &Engine, id: TaskId) -> Arc<tasker_engine::state::TaskState> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(t) = engine.task(id).filter(|t| t.status.is_terminal()) {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Proves the engine goes on: a valid task submitted after the bad input completes.
fn still_works(engine: &Engine) {
    let env = req("ok", "{}");
    let id = env.task_id;
    assert!(matches!(
        engine.request_blocking(env).unwrap(),
        SubmitOutcome::Accepted { .. }
    ));
    assert_eq!(wait_terminal(engine, id).status, TaskStatus::Complete);
}

fn rejections_in_log(log: &dyn Log) -> Vec<(Position, RejectReason, Option<RecordType>)> {
    let mut out = Vec::new();
    for p in 0..log.partitions() {
        let partition = PartitionId(p);
        let end = log.end(partition).unwrap();
        let mut r = log.reader(partition, Position(0)).unwrap();
        while r.position() < end {
            for rec in r.poll(1000, Duration::from_millis(100)).unwrap() {
                if let Ok(env) = codec::decode(&rec.record.payload)
                    && let Some(Event::TaskRejected(t)) = env.as_event()
                {
                    out.push((
                        env.source_position.unwrap_or_default(),
                        t.reason.clone(),
                        t.command,
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn undecodable_records_become_rejections_and_the_next_record_runs() {
    let s = Setup::new();
    let p = PartitionId(0);
    let good = bincode_command(p, s.partitions);
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut schema9 = good;
    schema9[0] = 9;
    let key = task_on(p, s.partitions);
    let records = vec![
        raw(key, ContentType::Unknown, b"\x07garbage \xff\xfe bytes"), // 1. garbage bytes
        raw(key, ContentType::Bincode, &truncated),                    // 2. truncated bincode
        raw(key, ContentType::Bincode, &schema9),                      // 3. wrong schema version
        raw(
            key,
            ContentType::Json,
            br#"{"type":"task.requested","namespace":["x"],"name":1}"#,
        ), // 4. wrong JSON types
        raw(key, ContentType::Json, br#"{"type":"task.completed"}"#), // 5. an event sent as a command
        raw(key, ContentType::Json, b""),                             // 6. empty payload
        raw(key, ContentType::Json, b"{\"type\": \"task.requested\", "), // 7. truncated JSON
    ];
    let positions = s.append_raw(p, &records);
    let engine = s.engine();
    still_works(&engine);
    let m = engine.metrics();
    assert_eq!(m.malformed_records.get(), records.len() as u64);
    // Garbage whose first byte reads as a schema number is `unsupported_schema`
    // (the version is checked first); everything else is `malformed`.
    let by_reason = m.rejections();
    let schema = by_reason.get("unsupported_schema").copied().unwrap_or(0);
    let malformed = by_reason.get("malformed").copied().unwrap_or(0);
    assert!(schema >= 1, "{by_reason:?}");
    assert_eq!(schema + malformed, records.len() as u64, "{by_reason:?}");
    engine.shutdown();
    let log = s.log();
    let rejected: Vec<Position> = rejections_in_log(&*log).iter().map(|r| r.0).collect();
    for pos in positions {
        assert!(
            rejected.contains(&pos),
            "no task.rejected answers position {pos}"
        );
    }
}

fn task_on(p: PartitionId, partitions: u32) -> TaskId {
    loop {
        let id = TaskId::generate();
        if partition_for_task(id, partitions) == p {
            return id;
        }
    }
}

fn bincode_command(p: PartitionId, partitions: u32) -> Vec<u8> {
    let env = Envelope::command(
        task_on(p, partitions),
        CorrelationId::NIL,
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "bad".into(),
            name: "ok".into(),
            context: RawJson::empty_object(),
            ..RequestTask::default()
        }),
    );
    codec::encode(&env).unwrap()
}

#[test]
fn invalid_requests_are_rejected_with_their_reason() {
    let s = Setup::new();
    let engine = s.engine();
    // 8. unknown template, 9. unknown version, 10. invalid context, 11. context too large
    assert_eq!(
        rejected(engine.request_blocking(req("nope", "{}")).unwrap()),
        RejectReason::UnknownTemplate
    );
    let mut v = req("ok", "{}");
    if let tasker_engine::record::Body::Command(Command::RequestTask(r)) = &mut v.body {
        r.version = Some("9.9.9".into());
    }
    assert_eq!(
        rejected(engine.request_blocking(v).unwrap()),
        RejectReason::UnknownVersion
    );
    match engine
        .request_blocking(req("ok", r#"{"n": "seven"}"#))
        .unwrap()
    {
        SubmitOutcome::Rejected {
            reason, details, ..
        } => {
            assert_eq!(reason, RejectReason::InvalidContext);
            assert!(details.iter().any(|d| d.starts_with("/n")), "{details:?}");
        }
        other => panic!("{other:?}"),
    }
    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(2000));
    assert_eq!(
        rejected(engine.request_blocking(req("ok", &big)).unwrap()),
        RejectReason::ContextTooLarge
    );
    // 12. duplicate idempotency key, 13. duplicate task id
    let mut first = req("ok", "{}");
    if let tasker_engine::record::Body::Command(Command::RequestTask(r)) = &mut first.body {
        r.idempotency_key = Some("k".into());
    }
    let mut second = first.clone();
    second.task_id = TaskId::generate();
    let key_partition = partition_for_task(first.task_id, s.partitions);
    while partition_for_task(second.task_id, s.partitions) != key_partition {
        second.task_id = TaskId::generate();
    }
    engine.request_blocking(first.clone()).unwrap();
    assert_eq!(
        rejected(engine.request_blocking(second).unwrap()),
        RejectReason::DuplicateIdempotencyKey {
            existing: first.task_id
        }
    );
    let mut again = first.clone();
    if let tasker_engine::record::Body::Command(Command::RequestTask(r)) = &mut again.body {
        r.idempotency_key = None;
    }
    assert_eq!(
        rejected(engine.request_blocking(again).unwrap()),
        RejectReason::DuplicateTask
    );
    let done = wait_terminal(&engine, first.task_id);
    // 14. cancel of an unknown task, 15. resolve of a step not in error,
    // 16. retry of a task not in error, 17. a stale step result
    let unknown = TaskId::generate();
    assert_eq!(
        rejected(
            engine
                .request_blocking(on(unknown, Command::CancelTask(CancelTask::default())))
                .unwrap()
        ),
        RejectReason::UnknownTask
    );
    let resolve = Command::ResolveStep(ResolveStep {
        step: "a".into(),
        ..ResolveStep::default()
    });
    assert_eq!(
        rejected(engine.request_blocking(on(done.id, resolve)).unwrap()),
        RejectReason::InvalidTransition
    );
    let resolve_unknown = Command::ResolveStep(ResolveStep {
        step: "zzz".into(),
        ..ResolveStep::default()
    });
    assert_eq!(
        rejected(
            engine
                .request_blocking(on(done.id, resolve_unknown))
                .unwrap()
        ),
        RejectReason::UnknownStep
    );
    assert_eq!(
        rejected(
            engine
                .request_blocking(on(done.id, Command::RetryTask(RetryTask::default())))
                .unwrap()
        ),
        RejectReason::InvalidTransition
    );
    let report = Command::ReportStepResult(ReportStepResult {
        step: "a".into(),
        attempt: 7,
        outcome: StepOutcome::Completed {
            result: RawJson::null(),
        },
    });
    assert_eq!(
        rejected(engine.request_blocking(on(done.id, report)).unwrap()),
        RejectReason::StaleAttempt
    );
    let by_reason = engine.metrics().rejections();
    for code in [
        "unknown_template",
        "unknown_version",
        "invalid_context",
        "context_too_large",
        "duplicate_idempotency_key",
        "duplicate_task",
        "unknown_task",
        "invalid_transition",
        "unknown_step",
        "stale_attempt",
    ] {
        assert!(
            by_reason.get(code).is_some_and(|n| *n >= 1),
            "no metric for {code}: {by_reason:?}"
        );
    }
    still_works(&engine);
    engine.shutdown();
}

#[test]
fn a_command_on_the_wrong_partition_is_rejected() {
    // 18. A client that partitions by something else than murmur2(task id).
    let s = Setup::new();
    let task = task_on(PartitionId(1), s.partitions);
    let env = on(task, Command::CancelTask(CancelTask::default()));
    let record = to_record(&env, None, &mut Vec::new()).unwrap();
    let positions = s.append_raw(PartitionId(0), &[record]);
    let engine = s.engine();
    still_works(&engine);
    assert_eq!(
        engine.metrics().rejections().get("wrong_partition"),
        Some(&1)
    );
    engine.shutdown();
    let r = rejections_in_log(&*s.log());
    assert!(
        r.contains(&(
            positions[0],
            RejectReason::WrongPartition,
            Some(RecordType::TaskCancelRequested)
        )),
        "{r:?}"
    );
}

#[test]
fn bad_templates_are_refused_with_their_errors() {
    // 19. a cyclic template, 20. a template with an unknown handler
    let cyclic = "namespace: bad\nname: cyc\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop, depends_on: [b] }\n  - { name: b, handler: noop, depends_on: [a] }\n";
    let err = Template::from_yaml(cyclic, "cyc.yaml").unwrap_err();
    assert!(
        matches!(err.0[0].kind, TemplateErrorKind::Cycle(_)),
        "{err}"
    );
    let registry = TemplateRegistry::new(Arc::new(HandlerRegistry::with_builtins()), None);
    let unknown = "namespace: bad\nname: h\nversion: 1.0.0\nsteps:\n  - { name: a, handler: does_not_exist }\n";
    let err = registry.add_yaml(unknown, "h.yaml").unwrap_err();
    assert!(
        matches!(err.0[0].kind, TemplateErrorKind::UnknownHandler(_)),
        "{err}"
    );
    assert!(
        err.to_string().contains("h.yaml: steps[0].handler"),
        "{err}"
    );
}

#[test]
fn handlers_that_panic_or_hang_fail_their_step_not_the_engine() {
    // 21. a panicking handler, 22. a handler that never answers (timeout)
    let s = Setup::new();
    let engine = s.engine();
    let p = req("panics", "{}");
    let pid = p.task_id;
    engine.request_blocking(p).unwrap();
    let h = req("hangs", "{}");
    let hid = h.task_id;
    engine.request_blocking(h).unwrap();
    let t = wait_terminal(&engine, pid);
    assert_eq!(t.status, TaskStatus::Error);
    let e = t.steps[0].last_error.as_ref().unwrap();
    assert_eq!(e.kind, StepErrorKind::Permanent);
    assert!(
        e.message.contains("handler panicked: the handler blew up"),
        "{}",
        e.message
    );
    let t = wait_terminal(&engine, hid);
    assert_eq!(t.status, TaskStatus::Error);
    assert_eq!(t.steps[0].status, StepStatus::Error);
    assert_eq!(t.steps[0].attempts, 2, "a timeout is retryable");
    assert_eq!(
        t.steps[0].last_error.as_ref().unwrap().kind,
        StepErrorKind::Timeout
    );
    assert!(engine.metrics().steps_failed.get() >= 3);
    still_works(&engine);
    engine.shutdown();
}
