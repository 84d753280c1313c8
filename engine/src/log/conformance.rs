//! The behaviour every log backend must have, as functions any backend's tests call
//! (`conformance_tests!` expands them into one `#[test]` each). Test support:
//! failing assertions are the point, so `expect` is allowed here.
#![allow(clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Headers, Log, LogError, LogReader, Record, StoredRecord};
use crate::record::{ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp};

/// A log under test that can be closed and opened again (as a new process would).
pub trait TestLog {
    fn log(&self) -> Arc<dyn Log>;
    /// Drops every handle and opens the same log again.
    fn reopen(&mut self) -> Result<(), LogError>;
}

/// Makes fresh, empty logs for the suite.
pub trait Harness {
    fn fresh(&self, partitions: u32) -> Result<Box<dyn TestLog>, LogError>;
}

/// A recognizable record: payload and headers derived from `i`.
pub fn sample(i: u64) -> Record {
    let kinds = [Kind::Command, Kind::Event, Kind::Control];
    let types = [
        RecordType::TaskRequested,
        RecordType::StepCompleted,
        RecordType::PartitionClaimed,
    ];
    Record {
        key: TaskId::v7(Timestamp(1_700_000_000_000 + i), u128::from(i)),
        headers: Headers {
            content_type: if i.is_multiple_of(2) {
                ContentType::Bincode
            } else {
                ContentType::Json
            },
            kind: Some(kinds[(i % 3) as usize]),
            record_type: Some(types[(i % 3) as usize]),
            schema: 1,
            namespace: (!i.is_multiple_of(4)).then(|| Bytes::from(format!("ns{}", i % 4))),
        },
        timestamp: Timestamp(1_700_000_000_000 + i),
        payload: Bytes::from(format!("payload-{i}-{}", "x".repeat((i % 50) as usize))),
    }
}

fn read_all(log: &dyn Log, partition: PartitionId, from: Position, n: usize) -> Vec<StoredRecord> {
    read_up_to(&mut *log.reader(partition, from).expect("reader"), n)
}

/// Up to `n` records from `r`, polling for at most 30 s.
fn read_up_to(r: &mut dyn LogReader, n: usize) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        out.extend(
            r.poll(n - out.len(), Duration::from_millis(200))
                .expect("poll"),
        );
    }
    out
}

fn assert_same(got: &StoredRecord, want: &Record, position: Position) {
    assert_eq!(got.position, position, "position");
    assert_eq!(got.record.key, want.key, "key at {position}");
    assert_eq!(got.record.payload, want.payload, "payload at {position}");
    assert_eq!(got.record.headers, want.headers, "headers at {position}");
    assert_eq!(
        got.record.timestamp, want.timestamp,
        "timestamp at {position}"
    );
}

/// Batches get contiguous, increasing positions starting at `end()`, and read back
/// identical (key, headers, timestamp, payload), in order.
pub fn append_then_read_back(h: &dyn Harness) {
    let t = h.fresh(1).expect("fresh log");
    let log = t.log();
    let p = PartitionId(0);
    let start = log.end(p).expect("end");
    let mut w = log.writer(p).expect("writer");
    let mut all = Vec::new();
    let mut next = start;
    for batch in [1u64, 7, 120] {
        let records: Vec<Record> = (0..batch).map(|i| sample(all.len() as u64 + i)).collect();
        let positions = w.append(&records).expect("append");
        assert_eq!(positions.len(), records.len());
        for pos in positions {
            assert_eq!(pos, next, "positions are contiguous");
            next = next.next();
        }
        all.extend(records);
    }
    assert_eq!(log.end(p).expect("end"), next);
    let got = read_all(&*log, p, start, all.len());
    assert_eq!(got.len(), all.len());
    for (i, (g, want)) in got.iter().zip(&all).enumerate() {
        assert_same(g, want, Position(start.0 + i as u64));
    }
}

/// A reader can start anywhere, and seek.
pub fn read_from_any_position(h: &dyn Harness) {
    let t = h.fresh(1).expect("fresh log");
    let log = t.log();
    let p = PartitionId(0);
    let start = log.end(p).expect("end");
    let records: Vec<Record> = (0..50).map(sample).collect();
    log.writer(p)
        .expect("writer")
        .append(&records)
        .expect("append");
    for from in [0usize, 1, 25, 49] {
        let got = read_all(&*log, p, Position(start.0 + from as u64), 50 - from);
        assert_eq!(got.len(), 50 - from, "from {from}");
        assert_same(&got[0], &records[from], Position(start.0 + from as u64));
    }
    let mut r = log.reader(p, start).expect("reader");
    r.seek(Position(start.0 + 40)).expect("seek");
    let got = r.poll(100, Duration::from_secs(5)).expect("poll");
    assert!(!got.is_empty());
    assert_same(&got[0], &records[40], Position(start.0 + 40));
    assert!(r.position() > Position(start.0 + 40));
}

/// `poll` waits for appends and returns soon after one lands; with nothing to
/// read it returns empty once the wait is over.
pub fn poll_waits_for_appends(h: &dyn Harness) {
    let t = h.fresh(1).expect("fresh log");
    let log = t.log();
    let p = PartitionId(0);
    let start = log.end(p).expect("end");
    let mut r = log.reader(p, start).expect("reader");
    let t0 = Instant::now();
    assert!(
        r.poll(10, Duration::from_millis(100))
            .expect("poll")
            .is_empty()
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(90),
        "poll returned early"
    );
    let writer_log = Arc::clone(&log);
    let appender = std::thread::spawn(move || {
        let mut w = writer_log.writer(p).expect("writer");
        std::thread::sleep(Duration::from_millis(200));
        w.append(&[sample(1)]).expect("append");
        std::thread::sleep(Duration::from_millis(500));
    });
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t0.elapsed() < Duration::from_secs(20) {
        got = r.poll(10, Duration::from_secs(10)).expect("poll");
    }
    assert_eq!(got.len(), 1);
    assert_same(&got[0], &sample(1), start);
    appender.join().expect("appender");
}

/// Partitions are separate sequences.
pub fn partitions_are_independent(h: &dyn Harness) {
    let t = h.fresh(3).expect("fresh log");
    let log = t.log();
    assert_eq!(log.partitions(), 3);
    let mut starts = Vec::new();
    for p in 0..3u32 {
        let part = PartitionId(p);
        starts.push(log.end(part).expect("end"));
        let records: Vec<Record> = (0..=u64::from(p))
            .map(|i| sample(100 * u64::from(p) + i))
            .collect();
        log.writer(part)
            .expect("writer")
            .append(&records)
            .expect("append");
    }
    for p in 0..3u32 {
        let part = PartitionId(p);
        let got = read_all(&*log, part, starts[p as usize], p as usize + 1);
        assert_eq!(got.len(), p as usize + 1);
        assert_same(&got[0], &sample(100 * u64::from(p)), starts[p as usize]);
        let mut r = log
            .reader(part, got.last().expect("one").position.next())
            .expect("reader");
        assert!(
            r.poll(10, Duration::from_millis(50))
                .expect("poll")
                .is_empty()
        );
    }
    assert!(
        log.writer(PartitionId(3)).is_err(),
        "partition 3 must not exist"
    );
}

/// Everything appended is there after the log is opened again, and appends continue
/// at the old end.
pub fn survives_reopen(h: &dyn Harness) {
    let mut t = h.fresh(1).expect("fresh log");
    let p = PartitionId(0);
    let start = t.log().end(p).expect("end");
    let first: Vec<Record> = (0..10).map(sample).collect();
    {
        let log = t.log();
        log.writer(p)
            .expect("writer")
            .append(&first)
            .expect("append");
    }
    t.reopen().expect("reopen");
    let log = t.log();
    assert_eq!(log.end(p).expect("end"), Position(start.0 + 10));
    let pos = log
        .writer(p)
        .expect("writer")
        .append(&[sample(10)])
        .expect("append");
    assert_eq!(pos, vec![Position(start.0 + 10)]);
    let got = read_all(&*log, p, start, 11);
    assert_eq!(got.len(), 11);
    assert_same(&got[10], &sample(10), Position(start.0 + 10));
}

/// Large batches stay ordered and complete.
pub fn large_batches_stay_ordered(h: &dyn Harness) {
    let t = h.fresh(1).expect("fresh log");
    let log = t.log();
    let p = PartitionId(0);
    let start = log.end(p).expect("end");
    let mut w = log.writer(p).expect("writer");
    let records: Vec<Record> = (0..5_000).map(sample).collect();
    for chunk in records.chunks(1_000) {
        w.append(chunk).expect("append");
    }
    let got = read_all(&*log, p, start, records.len());
    assert_eq!(got.len(), records.len());
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.position, Position(start.0 + i as u64));
        assert_eq!(g.record.payload, records[i].payload);
    }
}

/// Readers are independent: several at once on one partition (and on others)
/// each read from their own position, seek on their own, and a reader opened
/// after another on the same partition closed starts where it is told.
pub fn readers_are_independent(h: &dyn Harness) {
    let t = h.fresh(2).expect("fresh log");
    let log = t.log();
    let (p0, p1) = (PartitionId(0), PartitionId(1));
    let (s0, s1) = (log.end(p0).expect("end"), log.end(p1).expect("end"));
    let zero: Vec<Record> = (0..30).map(sample).collect();
    let one: Vec<Record> = (100..110).map(sample).collect();
    log.writer(p0)
        .expect("writer")
        .append(&zero)
        .expect("append");
    log.writer(p1)
        .expect("writer")
        .append(&one)
        .expect("append");
    let at = |s: Position, i: u64| Position(s.0 + i);
    let mut a = log.reader(p0, s0).expect("reader");
    let mut b = log.reader(p0, at(s0, 20)).expect("reader");
    let mut c = log.reader(p1, s1).expect("reader");
    // Polled in turns, a few records at a time.
    let (mut got_a, mut got_b, mut got_c) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while (got_a.len() < 30 || got_b.len() < 10 || got_c.len() < 10) && Instant::now() < deadline {
        for (r, got, want) in [
            (&mut a, &mut got_a, 30),
            (&mut b, &mut got_b, 10),
            (&mut c, &mut got_c, 10),
        ] {
            if got.len() < want {
                got.extend(r.poll(4, Duration::from_millis(50)).expect("poll"));
            }
        }
    }
    assert_eq!((got_a.len(), got_b.len(), got_c.len()), (30, 10, 10));
    for (i, g) in got_a.iter().enumerate() {
        assert_same(g, &zero[i], at(s0, i as u64));
    }
    for (i, g) in got_b.iter().enumerate() {
        assert_same(g, &zero[20 + i], at(s0, 20 + i as u64));
    }
    for (i, g) in got_c.iter().enumerate() {
        assert_same(g, &one[i], at(s1, i as u64));
    }
    // A seek moves one reader only.
    a.seek(at(s0, 5)).expect("seek");
    let back = read_some(&mut *a, 1);
    assert_same(&back[0], &zero[5], at(s0, 5));
    assert!(
        b.poll(10, Duration::from_millis(50))
            .expect("poll")
            .is_empty()
    );
    // The partition's first reader closes; the next starts where it is told.
    drop(a);
    let mut d = log.reader(p0, at(s0, 12)).expect("reader");
    let again = read_some(&mut *d, 3);
    for (i, g) in again.iter().take(3).enumerate() {
        assert_same(g, &zero[12 + i], at(s0, 12 + i as u64));
    }
    b.seek(at(s0, 29)).expect("seek");
    assert_same(&read_some(&mut *b, 1)[0], &zero[29], at(s0, 29));
}

/// At least `n` records from `r`, within 30 s.
fn read_some(r: &mut dyn LogReader, n: usize) -> Vec<StoredRecord> {
    let out = read_up_to(r, n);
    assert!(out.len() >= n, "{} of {n} records", out.len());
    out
}

/// Expands the suite into `#[test]` functions for one backend's harness.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        #[test]
        fn conformance_append_then_read_back() {
            $crate::log::conformance::append_then_read_back(&$harness);
        }
        #[test]
        fn conformance_read_from_any_position() {
            $crate::log::conformance::read_from_any_position(&$harness);
        }
        #[test]
        fn conformance_poll_waits_for_appends() {
            $crate::log::conformance::poll_waits_for_appends(&$harness);
        }
        #[test]
        fn conformance_partitions_are_independent() {
            $crate::log::conformance::partitions_are_independent(&$harness);
        }
        #[test]
        fn conformance_survives_reopen() {
            $crate::log::conformance::survives_reopen(&$harness);
        }
        #[test]
        fn conformance_readers_are_independent() {
            $crate::log::conformance::readers_are_independent(&$harness);
        }
        #[test]
        fn conformance_large_batches_stay_ordered() {
            $crate::log::conformance::large_batches_stay_ordered(&$harness);
        }
    };
}
