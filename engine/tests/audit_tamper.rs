//! `audit verify` on tampered copies of a real embedded log: a flipped byte (the
//! frame checksum names it), a record edited and re-framed with a valid checksum,
//! a dropped record, two swapped records, a truncated log. With a seal from an
//! earlier clean run the exact position is named; without one, the first
//! detectable position and the window between the engine's chain checkpoints
//! that holds the change (see docs/audit.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tasker_engine::audit::verify::{Verdict, VerifyOptions, verify_partition};
use tasker_engine::codec;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::file::{FRAME_HEADER_LEN, FileLog, FileLogConfig, SEGMENT_HEADER_LEN};
use tasker_engine::log::{Log, StoredRecord};
use tasker_engine::record::{
    Body, Command, CorrelationId, Envelope, Event, PartitionId, Position, RawJson, RecordType,
    RequestTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions};

const P: PartitionId = PartitionId(0);

const FLAKY: &str = "
namespace: tamper
name: flaky
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - name: b
    handler: fail
    depends_on: [a]
    retry_limit: 3
    backoff: { initial: 2ms, max: 5ms }
    config: { times: 1 }
  - { name: c, handler: noop, depends_on: [b] }
";

/// A data directory with a finished run: ~1,000 records, snapshots (and so chain
/// checkpoints) every 100 events.
fn build() -> tempfile::TempDir {
    let dir = tempfile::TempDir::new().unwrap();
    let handlers = Arc::new(HandlerRegistry::with_builtins());
    let registry = Arc::new(TemplateRegistry::new(handlers, None));
    registry.add_yaml(FLAKY, "flaky.yaml").unwrap();
    let log: Arc<dyn Log> = Arc::new(
        FileLog::open(
            dir.path().join("log"),
            FileLogConfig {
                partitions: 1,
                ..FileLogConfig::default()
            },
        )
        .unwrap(),
    );
    let options = EngineOptions {
        snapshot_dir: Some(dir.path().join("snapshots")),
        snapshot_every_events: 100,
        snapshot_interval: Duration::from_millis(1),
        ..EngineOptions::default()
    };
    let engine = Engine::start(log, registry, options, None).unwrap();
    let mut ids = Vec::new();
    for i in 0..80 {
        let id = TaskId::generate();
        ids.push(id);
        let env = Envelope::command(
            id,
            CorrelationId::generate(),
            Timestamp::now(),
            Command::RequestTask(RequestTask {
                namespace: "tamper".into(),
                name: "flaky".into(),
                context: RawJson::from_trusted(format!(r#"{{"i":{i}}}"#)),
                ..RequestTask::default()
            }),
        );
        engine.request_blocking(env).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids
        .iter()
        .any(|id| engine.task(*id).is_none_or(|t| !t.status.is_terminal()))
    {
        assert!(Instant::now() < deadline, "tasks did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.shutdown();
    dir
}

fn options(dir: &Path, seal: bool) -> VerifyOptions {
    VerifyOptions {
        file_root: Some(dir.join("log")),
        snapshot_root: Some(dir.join("snapshots")),
        audit_dir: dir.join("audit"),
        retention_ms: 60_000,
        seal,
        clock_skew_ms: 5_000,
        now: Timestamp::now(),
    }
}

fn verify(dir: &Path, seal: bool) -> Verdict {
    let log = FileLog::open_existing(dir.join("log")).unwrap();
    verify_partition(&log, P, &options(dir, seal), &AtomicU64::new(0)).unwrap()
}

fn copy(from: &Path) -> tempfile::TempDir {
    let to = tempfile::TempDir::new().unwrap();
    copy_dir(from, to.path());
    to
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn records(dir: &Path) -> Vec<StoredRecord> {
    let log = FileLog::open_existing(dir.join("log")).unwrap();
    let end = log.end(P).unwrap();
    let mut reader = log.reader(P, Position(0)).unwrap();
    let mut out = Vec::new();
    while reader.position() < end {
        out.extend(reader.poll(100_000, Duration::from_millis(100)).unwrap());
    }
    out
}

fn segment(dir: &Path) -> PathBuf {
    dir.join("log/p00000/00000000000000000000.seg")
}

/// Writes `records` as the partition's whole log, framed and checksummed by the
/// log's own writer: an edit by someone who knows the format.
fn reframe(dir: &Path, records: &[StoredRecord]) {
    let pdir = dir.join("log/p00000");
    for e in std::fs::read_dir(&pdir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let log = FileLog::open(
        dir.join("log"),
        FileLogConfig {
            partitions: 1,
            ..FileLogConfig::default()
        },
    )
    .unwrap();
    let mut writer = log.writer(P).unwrap();
    for chunk in records.chunks(50) {
        let batch: Vec<_> = chunk.iter().map(|r| r.record.clone()).collect();
        writer.append(&batch).unwrap();
    }
}

/// The byte offset of record `position`'s payload in the (single) segment file.
fn payload_offset(dir: &Path, position: u64) -> usize {
    let data = std::fs::read(segment(dir)).unwrap();
    let mut off = SEGMENT_HEADER_LEN;
    for _ in 0..position {
        let len = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap()) as usize;
        off += FRAME_HEADER_LEN + len;
    }
    let ns_len = data[off + FRAME_HEADER_LEN + 29] as usize;
    off + FRAME_HEADER_LEN + 30 + ns_len
}

/// A record of `t` in the middle of the log.
fn middle(records: &[StoredRecord], t: RecordType) -> u64 {
    let n = records.len();
    records[n / 3..]
        .iter()
        .find(|r| r.record.headers.record_type == Some(t))
        .unwrap()
        .position
        .0
}

fn assert_named(v: &Verdict, at: u64, check: &str) {
    assert_eq!(
        v.first_error,
        Some(Position(at)),
        "expected the first error at {at}: {:#?}",
        v.findings
    );
    assert!(
        v.findings
            .iter()
            .any(|f| f.position == Position(at) && f.check == check),
        "expected a `{check}` finding at {at}: {:#?}",
        v.findings
    );
}

/// Without a seal: the change is inside the reported window, which the engine's
/// checkpoints bound, and the first error is at or after it.
fn assert_windowed(v: &Verdict, at: u64) {
    let first = v
        .first_error
        .unwrap_or_else(|| panic!("no error for a change at {at}: {v:#?}"));
    assert!(
        first.0 >= at,
        "first error {first} before the change at {at}"
    );
    if let Some((from, to)) = v.window {
        assert!(
            from.0 <= at && at < to.0,
            "the change at {at} is outside the window [{from}, {to}): {:#?}",
            v.findings
        );
    }
}

fn without_seal(dir: &Path) {
    std::fs::remove_dir_all(dir.join("audit")).unwrap();
}

#[test]
fn audit_verify_names_tampered_records() {
    let original = build();
    let clean = verify(original.path(), true);
    assert_eq!(clean.errors(), 0, "{:#?}", clean.findings);
    assert!(clean.references_checked >= 2, "{clean:?}");
    assert_eq!(clean.sealed_now, clean.end);
    let all = records(original.path());
    assert_eq!(all.len() as u64, clean.end.0);
    let again = verify(original.path(), true);
    assert_eq!(again.errors(), 0);
    assert!(again.references_checked > clean.references_checked);

    // 1. A flipped byte: the frame checksum fails right there, seal or not.
    let k = middle(&all, RecordType::StepCompleted);
    let d = copy(original.path());
    let off = payload_offset(d.path(), k);
    let mut bytes = std::fs::read(segment(d.path())).unwrap();
    bytes[off + 3] ^= 0x20;
    std::fs::write(segment(d.path()), &bytes).unwrap();
    assert_named(&verify(d.path(), false), k, "frame");
    without_seal(d.path());
    assert_named(&verify(d.path(), false), k, "frame");

    // 2. An edited result, re-framed with a valid checksum.
    let d = copy(original.path());
    let mut edited = all.clone();
    let i = k as usize;
    let mut env = codec::decode(&edited[i].record.payload).unwrap();
    let Body::Event(Event::StepCompleted(c)) = &mut env.body else {
        panic!("not a step.completed: {env:?}")
    };
    c.result = RawJson::from_trusted(r#"{"amount":1000000}"#.into());
    edited[i].record.payload = Bytes::from(codec::encode(&env).unwrap());
    reframe(d.path(), &edited);
    let sealed = verify(d.path(), false);
    assert_named(&sealed, k, "seal");
    without_seal(d.path());
    let unsealed = verify(d.path(), false);
    assert_windowed(&unsealed, k);
    assert!(unsealed.window.is_some(), "{:#?}", unsealed.findings);
    assert!(
        unsealed.findings.iter().any(|f| f.check == "chain"),
        "{:#?}",
        unsealed.findings
    );

    // 3. A header edited (the namespace subscribers filter on): named exactly by
    //    the header check, even without a seal.
    let d = copy(original.path());
    let mut edited = all.clone();
    edited[i].record.headers.namespace = Some(Bytes::from_static(b"other"));
    reframe(d.path(), &edited);
    without_seal(d.path());
    assert_named(&verify(d.path(), false), k, "headers");

    // 4. A dropped record.
    let d = copy(original.path());
    let mut dropped = all.clone();
    dropped.remove(i);
    reframe(d.path(), &dropped);
    assert_named(&verify(d.path(), false), k, "seal");
    without_seal(d.path());
    assert_windowed(&verify(d.path(), false), k);

    // 4b. A dropped command: its answer now points at a record that is no command.
    let c = middle(&all, RecordType::TaskRequested);
    let d = copy(original.path());
    let mut dropped = all.clone();
    dropped.remove(c as usize);
    reframe(d.path(), &dropped);
    without_seal(d.path());
    let v = verify(d.path(), false);
    assert_windowed(&v, c);
    assert!(
        v.findings
            .iter()
            .any(|f| f.check == "source_position" && f.position.0 >= c),
        "{:#?}",
        v.findings
    );

    // 5. Two records swapped (of different tasks, so nothing else notices).
    let j = (i + 1..all.len())
        .find(|j| all[*j].record.key != all[i].record.key)
        .unwrap();
    let d = copy(original.path());
    let mut swapped = all.clone();
    swapped.swap(i, j);
    reframe(d.path(), &swapped);
    assert_named(&verify(d.path(), false), k, "seal");
    without_seal(d.path());
    assert_windowed(&verify(d.path(), false), k);

    // 6. The tail cut off: the seal knows how long the log was.
    let d = copy(original.path());
    let cut = all.len() - 7;
    reframe(d.path(), &all[..cut]);
    let v = verify(d.path(), false);
    assert_eq!(
        v.first_error,
        Some(Position(cut as u64)),
        "{:#?}",
        v.findings
    );
    // Without the seal, the engine's last checkpoint (at the old end) tells.
    without_seal(d.path());
    let v = verify(d.path(), false);
    assert_eq!(
        v.first_error,
        Some(Position(cut as u64)),
        "{:#?}",
        v.findings
    );
    assert!(
        v.findings.iter().any(|f| f.check == "chain"),
        "{:#?}",
        v.findings
    );

    // A clean copy is still clean, and the seal did not move on failures.
    let d = copy(original.path());
    let v = verify(d.path(), false);
    assert_eq!(v.errors(), 0, "{:#?}", v.findings);
    assert_eq!(v.sealed_before, clean.end);
}
