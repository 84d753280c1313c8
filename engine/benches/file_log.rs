//! The embedded file log: append throughput and per-batch append latency with
//! `fsync = batch` at several batch sizes, what an append costs when it rolls to
//! a new segment, then read-back throughput.
//!
//! `cargo bench -p tasker-engine --bench file_log` (optionally `-- <records>`).
//! The log lives in a temporary directory under Cargo's target dir (a real disk,
//! not tmpfs, so fsync costs what it costs); it is removed at the end.
// A benchmark program: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use tasker_engine::log::file::{FileLog, FileLogConfig, FsyncPolicy};
use tasker_engine::log::{Headers, Log, LogWriter, Record};
use tasker_engine::record::{
    ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp,
};

const PAYLOAD_BYTES: usize = 100;
const DEFAULT_RECORDS: usize = 1_000_000;
const BATCH_SIZES: [usize; 4] = [1, 100, 1_000, 10_000];
/// Batch size 1 pays one fdatasync per record: stop it after this long.
const TIME_LIMIT: Duration = Duration::from_secs(10);
const READ_REPETITIONS: usize = 5;
const POLL_MAX: usize = 10_000;

fn record(i: u64) -> Record {
    let mut payload = vec![0u8; PAYLOAD_BYTES];
    for (j, b) in payload.iter_mut().enumerate() {
        *b = (i as usize + j) as u8;
    }
    Record {
        key: TaskId::v7(Timestamp(1_700_000_000_000 + i), u128::from(i)),
        headers: Headers {
            content_type: ContentType::Bincode,
            kind: Some(Kind::Event),
            record_type: Some(RecordType::StepCompleted),
            schema: 1,
            namespace: Some(Bytes::from_static(b"bench")),
        },
        timestamp: Timestamp(1_700_000_000_000 + i),
        payload: Bytes::from(payload),
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

struct AppendResult {
    records: usize,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// The log and its writer, still open.
    log: FileLog,
    writer: Box<dyn LogWriter>,
}

/// Appends `total` records in batches of `batch` to a fresh log at `dir`.
fn append(dir: &std::path::Path, batch: usize, total: usize) -> AppendResult {
    let log = FileLog::open(
        dir,
        FileLogConfig {
            partitions: 1,
            fsync: FsyncPolicy::Batch,
            ..FileLogConfig::default()
        },
    )
    .unwrap();
    let mut writer = log.writer(PartitionId(0)).unwrap();
    let template: Vec<Record> = (0..batch as u64).map(record).collect();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    let mut written = 0usize;
    let start = Instant::now();
    while written < total {
        let n = batch.min(total - written);
        let t = Instant::now();
        let positions = writer.append(&template[..n]).unwrap();
        latency_us
            .record((t.elapsed().as_micros() as u64).max(1))
            .unwrap();
        debug_assert_eq!(positions.first(), Some(&Position(written as u64)));
        written += n;
        if start.elapsed() > TIME_LIMIT {
            break;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(log.end(PartitionId(0)).unwrap(), Position(written as u64));
    AppendResult {
        records: written,
        elapsed,
        latency_us,
        log,
        writer,
    }
}

const ROLL_SEGMENT_BYTES: u64 = 1 << 20;
const ROLL_BATCH: usize = 100;
const ROLLS: usize = 200;

/// Appends batches of [`ROLL_BATCH`] to a log with small segments until it has
/// rolled [`ROLLS`] times; returns the latencies of the appends that rolled and
/// of the others.
fn rolls(dir: &std::path::Path) -> (Histogram<u64>, Histogram<u64>) {
    let log = FileLog::open(
        dir,
        FileLogConfig {
            partitions: 1,
            segment_bytes: ROLL_SEGMENT_BYTES,
            fsync: FsyncPolicy::Batch,
            ..FileLogConfig::default()
        },
    )
    .unwrap();
    let mut writer = log.writer(PartitionId(0)).unwrap();
    let template: Vec<Record> = (0..ROLL_BATCH as u64).map(record).collect();
    let pdir = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let segments = || {
        std::fs::read_dir(&pdir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
            })
            .count()
    };
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    let (mut rolled, mut other) = (new_hist(), new_hist());
    let mut count = segments();
    while rolled.len() < ROLLS as u64 {
        let t = Instant::now();
        writer.append(&template).unwrap();
        let us = (t.elapsed().as_micros() as u64).max(1);
        let now = segments();
        if now > count {
            rolled.record(us).unwrap();
        } else {
            other.record(us).unwrap();
        }
        count = now;
    }
    (rolled, other)
}

/// Reads every record of partition 0 from the start; returns (records, bytes, time).
fn read_all(log: &dyn Log, expected: usize) -> (usize, usize, Duration) {
    let mut reader = log.reader(PartitionId(0), Position(0)).unwrap();
    let (mut count, mut bytes) = (0usize, 0usize);
    let start = Instant::now();
    while count < expected {
        let got = reader.poll(POLL_MAX, Duration::ZERO).unwrap();
        assert!(!got.is_empty(), "log ended at {count} of {expected}");
        for r in &got {
            debug_assert_eq!(r.position, Position(count as u64));
            bytes += r.record.payload.len();
            count += 1;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(count, expected);
    assert_eq!(bytes, expected * PAYLOAD_BYTES);
    (count, bytes, elapsed)
}

fn read_reps(label: &str, log: &dyn Log, records: usize) {
    let mut rates = Vec::new();
    for _ in 0..READ_REPETITIONS {
        let (count, _, elapsed) = read_all(log, records);
        rates.push(count as f64 / elapsed.as_secs_f64());
    }
    let runs: Vec<String> = rates.iter().map(|r| format!("{:.2}M", r / 1e6)).collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "  {label:<28} best {:>10.0} records/s   median {:>10.0} records/s   ({:.0} MiB/s payload; runs {})",
        rates[rates.len() - 1],
        rates[rates.len() / 2],
        rates[rates.len() / 2] * PAYLOAD_BYTES as f64 / (1 << 20) as f64,
        runs.join(" ")
    );
}

fn main() {
    let total = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(DEFAULT_RECORDS);
    let root = tempfile::Builder::new()
        .prefix("tasker-bench-file-log")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    println!(
        "file log at {} ({PAYLOAD_BYTES}-byte payloads, fsync = batch, 64 MiB segments)",
        root.path().display()
    );
    println!();
    println!(
        "{:>6} {:>10} {:>14} {:>9}   {:>10} {:>10} {:>10}",
        "batch", "records", "records/s", "MiB/s", "p50", "p99", "max"
    );
    let mut biggest = None;
    for batch in BATCH_SIZES {
        let dir = root.path().join(format!("batch-{batch}"));
        let r = append(&dir, batch, total);
        let secs = r.elapsed.as_secs_f64();
        println!(
            "{:>6} {:>10} {:>14.0} {:>9.1}   {:>10} {:>10} {:>10}{}",
            batch,
            r.records,
            r.records as f64 / secs,
            (r.records * PAYLOAD_BYTES) as f64 / secs / (1 << 20) as f64,
            fmt_us(r.latency_us.value_at_quantile(0.5)),
            fmt_us(r.latency_us.value_at_quantile(0.99)),
            fmt_us(r.latency_us.max()),
            if r.records < total {
                "  (time limit)"
            } else {
                ""
            }
        );
        biggest = Some((dir, r));
    }
    println!("latency = one append() call (encode + write + fdatasync) per batch");
    println!();
    let (rolled, other) = rolls(&root.path().join("rolls"));
    println!(
        "appends of {ROLL_BATCH} records into {} MiB segments, {ROLLS} rolls:",
        ROLL_SEGMENT_BYTES >> 20
    );
    for (label, h) in [
        ("the append that rolled", &rolled),
        ("every other append", &other),
    ] {
        println!(
            "  {label:<24} {:>7} appends   p50 {:>9}   p99 {:>9}   p99.9 {:>9}   max {:>9}",
            h.len(),
            fmt_us(h.value_at_quantile(0.5)),
            fmt_us(h.value_at_quantile(0.99)),
            fmt_us(h.value_at_quantile(0.999)),
            fmt_us(h.max()),
        );
    }
    println!();

    let (dir, last) = biggest.unwrap();
    let records = last.records;
    println!(
        "reading back the {records} records appended in batches of {}:",
        BATCH_SIZES[BATCH_SIZES.len() - 1]
    );
    // In the writer's process (the runtime's case: readers follow the writer's end).
    read_reps("same process as the writer", &last.log, records);
    drop(last.writer);
    drop(last.log);
    // As another process would: no writer here, the end is found by scanning segments.
    let log = FileLog::open_existing(&dir).unwrap();
    read_reps("another process", &log, records);
    println!("(page cache warm; poll({POLL_MAX}) until every record was read)");
    println!(
        "targets: append >= 500,000 records/s with fsync = batch; read >= 2,000,000 records/s"
    );
}
