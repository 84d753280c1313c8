//! Fold throughput on one thread: decode + apply, and apply alone, over a log of
//! diamond-shaped tasks (A -> (B, C) -> D) produced by `decide` as the engine would.
//!
//! `cargo bench -p tasker-engine --bench fold` (optionally `-- <events>`; add
//! `--profile` to run only decode + apply, for a profiler).
//! Prints events/s per repetition, then the best and the median.
// A benchmark program: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tasker_engine::codec;
use tasker_engine::decide::{Input, Resolution, decide};
use tasker_engine::record::{
    BackoffSpec, Body, Command, CorrelationId, Envelope, Epoch, Position, RawJson, RequestTask,
    StepId, StepOutcome, StepSpec, TaskId, TemplateSnapshot, Timestamp,
};
use tasker_engine::state::{Applied, Dag, State};

const DEFAULT_EVENTS: usize = 2_000_000;
const REPETITIONS: usize = 5;
/// Tasks in flight at once while generating (their events interleave in the log).
const IN_FLIGHT: usize = 1_000;
/// Log time between two new tasks: with 182k tasks the log spans ~30 minutes, so
/// the default 15-minute retention evicts finished tasks along the way.
const MS_PER_TASK: u64 = 10;
/// Envelopes decoded ahead (untimed) for each apply-only chunk.
const CHUNK: usize = 65_536;

/// The encoded log: one buffer, records delimited by `ends`.
struct EncodedLog {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl EncodedLog {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.bytes[start..end];
            start = end;
            r
        })
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

fn diamond() -> TemplateSnapshot {
    let step = |name: &str, parents: &[u32]| StepSpec {
        name: name.into(),
        handler: "noop".into(),
        depends_on: parents.iter().map(|&p| StepId(p)).collect(),
        retryable: true,
        retry_limit: 3,
        timeout_ms: 30_000,
        backoff: BackoffSpec::default(),
        config: RawJson::empty_object(),
    };
    TemplateSnapshot {
        namespace: "bench".into(),
        name: "diamond".into(),
        version: "1.0.0".into(),
        steps: vec![
            step("a", &[]),
            step("b", &[0]),
            step("c", &[0]),
            step("d", &[1, 2]),
        ],
    }
}

/// Runs diamond tasks through `decide` and the fold until `target` events exist;
/// returns the log and the live state's digest.
fn generate(target: usize) -> (EncodedLog, State) {
    let resolution: Resolution = Ok(Arc::new(Dag::new(Arc::new(diamond()))));
    let mut state = State::default();
    let mut log = EncodedLog {
        bytes: Vec::with_capacity(target * 64),
        ends: Vec::with_capacity(target + 16),
    };
    let mut position = 0u64;
    let mut append = |state: &mut State, log: &mut EncodedLog, env: Envelope| {
        let applied = state.apply(&env);
        assert!(
            matches!(applied, Applied::Event | Applied::Command),
            "{applied:?}"
        );
        codec::encode_into(&env, &mut log.bytes).unwrap();
        log.ends.push(log.bytes.len());
        position += 1;
        Position(position - 1)
    };
    // Each task in flight: (id, correlation, next step outcome to report).
    let mut flight: Vec<(TaskId, CorrelationId, u32)> = Vec::with_capacity(IN_FLIGHT);
    let mut next_task = 0u64;
    let mut now = 1_700_000_000_000u64;
    let mut cursor = 0usize;
    let done = StepOutcome::Completed {
        result: RawJson::from_trusted(r#"{"ok":true}"#.into()),
    };
    while log.len() < target || !flight.is_empty() {
        if flight.len() < IN_FLIGHT && log.len() < target {
            next_task += 1;
            now += MS_PER_TASK;
            let id = TaskId::v7(Timestamp(now), u128::from(next_task));
            let correlation = CorrelationId::from_uuid(*id.as_uuid());
            let command = Command::RequestTask(RequestTask {
                namespace: "bench".into(),
                name: "diamond".into(),
                version: None,
                context: RawJson::from_trusted(format!(r#"{{"order":{next_task}}}"#)),
                ..RequestTask::default()
            });
            // Commands live in the log too, but the measured log holds events only.
            let events = decide(
                &state,
                Input::Command {
                    task: id,
                    command: &command,
                    resolution: Some(&resolution),
                },
                Timestamp(now),
            )
            .unwrap();
            for event in events {
                append(&mut state, &mut log, event_env(id, correlation, now, event));
            }
            for event in start_ready(&state, id, Timestamp(now)) {
                append(&mut state, &mut log, event_env(id, correlation, now, event));
            }
            flight.push((id, correlation, 0));
            continue;
        }
        // Finish the next running step of some task in flight, round robin.
        cursor = (cursor + 1) % flight.len();
        let (id, correlation, ref mut next) = flight[cursor];
        let step = StepId(*next);
        let events = decide(
            &state,
            Input::StepFinished {
                task: id,
                step,
                attempt: 1,
                outcome: &done,
            },
            Timestamp(now),
        )
        .unwrap();
        *next += 1;
        if *next == 4 {
            flight.swap_remove(cursor);
        }
        for event in events {
            append(&mut state, &mut log, event_env(id, correlation, now, event));
        }
        for event in start_ready(&state, id, Timestamp(now)) {
            append(&mut state, &mut log, event_env(id, correlation, now, event));
        }
    }
    (log, state)
}

/// Starts the steps of `task` that are ready, as the processor does when it has
/// capacity (`decide` never starts steps by itself). Each start is decided on the
/// state before the others' events apply, which is fine: starts are independent.
fn start_ready(state: &State, task: TaskId, now: Timestamp) -> Vec<tasker_engine::record::Event> {
    let pending: Vec<StepId> = state
        .task(&task)
        .map(|t| {
            t.steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.status == tasker_engine::state::StepStatus::Pending)
                .map(|(i, _)| StepId(i as u32))
                .collect()
        })
        .unwrap_or_default();
    pending
        .into_iter()
        .filter_map(|step| decide(state, Input::StartStep { task, step }, now).ok())
        .flatten()
        .collect()
}

fn event_env(
    task: TaskId,
    correlation: CorrelationId,
    now: u64,
    event: tasker_engine::record::Event,
) -> Envelope {
    Envelope {
        task_id: task,
        correlation_id: correlation,
        source_position: None,
        epoch: Epoch(0),
        at: Timestamp(now),
        body: Body::Event(event),
    }
}

/// Decodes and folds every record into a fresh state.
fn decode_and_apply(log: &EncodedLog) -> (Duration, State) {
    let mut state = State::default();
    let start = Instant::now();
    for bytes in log.iter() {
        let env = codec::decode(bytes).unwrap();
        black_box(state.apply(&env));
    }
    (start.elapsed(), state)
}

/// Decodes chunks untimed, then times folding them.
fn apply_only(log: &EncodedLog) -> (Duration, State) {
    let mut state = State::default();
    let mut timed = Duration::ZERO;
    let mut chunk: Vec<Envelope> = Vec::with_capacity(CHUNK);
    let mut records = log.iter().peekable();
    while records.peek().is_some() {
        chunk.clear();
        chunk.extend(
            records
                .by_ref()
                .take(CHUNK)
                .map(|b| codec::decode(b).unwrap()),
        );
        let start = Instant::now();
        for env in &chunk {
            black_box(state.apply(env));
        }
        timed += start.elapsed();
    }
    (timed, state)
}

fn decode_only(log: &EncodedLog) -> Duration {
    let start = Instant::now();
    for bytes in log.iter() {
        black_box(codec::decode(bytes).unwrap());
    }
    start.elapsed()
}

/// Where decoding time goes: the log split by record type, each part decoded alone
/// (best of `REPETITIONS`).
fn decode_by_type(log: &EncodedLog) {
    let mut groups: Vec<(&'static str, Vec<&[u8]>)> = Vec::new();
    for bytes in log.iter() {
        let name = codec::decode(bytes).unwrap().record_type().name();
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, g)) => g.push(bytes),
            None => groups.push((name, vec![bytes])),
        }
    }
    let total = decode_only(log).as_secs_f64();
    println!("decode cost by record type:");
    for (name, records) in &groups {
        let best = (0..REPETITIONS)
            .map(|_| {
                let start = Instant::now();
                for bytes in records {
                    black_box(codec::decode(bytes).unwrap());
                }
                start.elapsed()
            })
            .min()
            .unwrap();
        let bytes: usize = records.iter().map(|r| r.len()).sum();
        println!(
            "  {name:<16} {:>8} records  {:>5.0} bytes avg  {:>6.0} ns/record  {:>4.0}% of decode time",
            records.len(),
            bytes as f64 / records.len() as f64,
            best.as_nanos() as f64 / records.len() as f64,
            100.0 * best.as_secs_f64() / total
        );
    }
}

fn report(name: &str, events: usize, mut times: Vec<Duration>) {
    times.sort();
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    let best = times[0];
    let median = times[times.len() / 2];
    println!(
        "{name:<16} best {:>12.0} events/s ({:>8.1} ns/event)   median {:>12.0} events/s   ({} runs)",
        rate(best),
        best.as_nanos() as f64 / events as f64,
        rate(median),
        times.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(DEFAULT_EVENTS);
    // `--profile`: only decode + apply, repeatedly, for perf/callgrind.
    let profile = args.iter().any(|a| a == "--profile");

    let t = Instant::now();
    let (log, live) = generate(target);
    let events = log.len();
    println!(
        "generated {events} events ({} diamond tasks, {:.1} MiB encoded, {:.0} bytes/event avg) in {:.1} s",
        events / 11,
        log.bytes.len() as f64 / (1 << 20) as f64,
        log.bytes.len() as f64 / events as f64,
        t.elapsed().as_secs_f64()
    );
    println!(
        "live state: {} tasks in memory, {} evicted, digest {}",
        live.task_count(),
        live.stats().evicted,
        live.digest()
    );

    if profile {
        for _ in 0..REPETITIONS {
            let (d, state) = decode_and_apply(&log);
            println!(
                "decode+apply {:.0} events/s ({} tasks in memory)",
                events as f64 / d.as_secs_f64(),
                state.task_count()
            );
        }
        return;
    }

    let mut full = Vec::new();
    let mut applied = Vec::new();
    let mut decoded = Vec::new();
    for rep in 0..REPETITIONS {
        let (d, state) = decode_and_apply(&log);
        assert_eq!(
            state.digest(),
            live.digest(),
            "replay digest differs from live"
        );
        assert_eq!(state.stats().anomalies, 0);
        full.push(d);
        let (a, state) = apply_only(&log);
        assert_eq!(state.digest(), live.digest());
        applied.push(a);
        decoded.push(decode_only(&log));
        println!(
            "rep {rep}: decode+apply {:>10.0} events/s   apply only {:>10.0} events/s   decode only {:>10.0} events/s",
            events as f64 / d.as_secs_f64(),
            events as f64 / a.as_secs_f64(),
            events as f64 / decoded[rep].as_secs_f64()
        );
    }
    println!();
    report("decode + apply", events, full);
    report("apply only", events, applied);
    report("decode only", events, decoded);
    println!();
    decode_by_type(&log);
    println!();
    snapshot_writes(&live);
    println!();
    println!("target: decode + apply >= 2,000,000 events/s on one core");
}

/// A snapshot of the live state written in line, as at shutdown: digest, image,
/// encode, write, fsync (the background snapshot does the same off the processor).
fn snapshot_writes(live: &State) {
    use tasker_engine::record::PartitionId;
    use tasker_engine::runtime::snapshot::SnapshotStore;
    use tasker_engine::state::HashChain;
    let dir = tempfile::TempDir::new().unwrap();
    let store = SnapshotStore::new(dir.path());
    let mut times = Vec::new();
    for rep in 0..REPETITIONS {
        let t = Instant::now();
        let path = store
            .write_state(
                PartitionId(0),
                Position(rep as u64 + 1),
                HashChain::genesis(PartitionId(0)),
                live,
            )
            .unwrap();
        times.push(t.elapsed());
        let bytes = std::fs::metadata(path).unwrap().len();
        println!(
            "snapshot {rep}: {} tasks, {:.1} MiB in {:.1} ms",
            live.task_count(),
            bytes as f64 / (1 << 20) as f64,
            times[rep].as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    let digest = live.digest();
    let d = t.elapsed();
    let t = Instant::now();
    let image = live.to_snapshot();
    let i = t.elapsed();
    let t = Instant::now();
    let bytes = codec::canonical_bytes(&(digest, image)).unwrap();
    println!(
        "  of which: digest {:.1} ms, image {:.1} ms, encode {:.1} ms ({} bytes)",
        d.as_secs_f64() * 1e3,
        i.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3,
        bytes.len()
    );
    // Background snapshots carry task hashes and encoded images over: a second
    // snapshot of an unchanged state hashes and encodes nothing, and its delta
    // holds no task.
    let mut cache = tasker_engine::state::SnapshotCache::default();
    for (i, pass) in ["cold", "warm"].into_iter().enumerate() {
        let t = Instant::now();
        let encoded = live
            .snapshot_meta(&cache)
            .encode(live.tasks_shared(), &mut cache)
            .unwrap();
        let e = t.elapsed();
        assert_eq!(encoded.digest, digest);
        let t = Instant::now();
        let (path, written) = store
            .write_next(
                PartitionId(0),
                Position((REPETITIONS + 1 + i) as u64),
                HashChain::genesis(PartitionId(0)),
                &encoded,
            )
            .unwrap();
        let w = t.elapsed();
        drop(encoded);
        cache.written(written);
        println!(
            "  background snapshot, {pass} cache: digest + encode {:.1} ms, write {:.1} ms ({}, {} bytes)",
            e.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            path.file_name().unwrap().to_string_lossy(),
            std::fs::metadata(&path).unwrap().len()
        );
    }
    times.sort();
    println!(
        "snapshot write: median {:.1} ms, best {:.1} ms",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
}
