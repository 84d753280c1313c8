//! Is this machine steady enough for the latency targets? Two probes that run no
//! Tasker code, so a latency tail in `tasker bench` can be told apart as the
//! host's:
//!
//! - **cpu**: one thread per core repeats a fixed unit of pure arithmetic (~2.5
//!   ms on a quiet core, calibrated at start; no memory, no syscalls) and times
//!   each unit. On a steady machine every unit takes about the same time. A unit
//!   that takes over twice the median ran on a slowed core; units slowed on
//!   every core at once point at the host (another tenant, a CPU quota), not at
//!   this machine's own processes.
//! - **disk**: two threads (like two partitions) write 4 KiB and `fdatasync` in
//!   a loop, in `$TMPDIR` (the bench's data directory) or `--dir`, and report
//!   each sync's time: first appending (the file grows, so every sync also
//!   commits the file system's journal), as the log does, then overwriting
//!   files zeroed beforehand (the sync flushes data only), which is what
//!   preallocating segments would save (docs/benchmarks.md: not enough to pay
//!   for itself on this VM).
//!
//! ```sh
//! cargo bench -p tasker --bench host                     # 10 s of each
//! cargo bench -p tasker --bench host -- --seconds 30 --dir /work/data
//! ```
//!
//! Run it with nothing else busy: another process on the cores slows the units
//! too (and `perf record -a` alongside tells whether anything else ran). A
//! benchmark, not a test: it reports and asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark program

use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A unit is slowed when it takes this many times the median.
const SLOWED: f64 = 2.0;
#[path = "../src/bursts.rs"]
mod bursts;

fn main() {
    let mut seconds = 10.0_f64;
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds N")
            }
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            "--bench" => {}
            other => panic!("unknown argument {other}: use --seconds N, --dir PATH"),
        }
    }
    let run = Duration::from_secs_f64(seconds);
    cpu(run);
    disk(run, &dir);
}

/// One unit of work: a linear congruential generator, `n` steps.
fn unit(n: u64) -> u64 {
    let mut x = black_box(1u64);
    for _ in 0..n {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    black_box(x)
}

/// Steps for a unit of ~2.5 ms: the fastest of a few tries, so a slowed
/// calibration does not shrink the unit.
fn calibrate() -> u64 {
    let n = 1_000_000;
    let best = (0..20)
        .map(|_| {
            let t = Instant::now();
            unit(n);
            t.elapsed()
        })
        .min()
        .expect("tries");
    (n as f64 * 2.5e-3 / best.as_secs_f64().max(1e-9)) as u64
}

fn cpu(run: Duration) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = calibrate();
    let start = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let mut units = Vec::new();
                while start.elapsed() < run {
                    let t = Instant::now();
                    unit(n);
                    units.push((t - start, t.elapsed()));
                }
                units
            })
        })
        .collect();
    let per_core: Vec<Vec<(Duration, Duration)>> = threads
        .into_iter()
        .map(|t| t.join().expect("core"))
        .collect();
    println!("cpu: {cores} cores, fixed units of {n} steps, {run:?}");
    let mut slowed_starts = Vec::new();
    for (core, units) in per_core.iter().enumerate() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for (_, took) in units {
            let _ = h.record(took.as_micros().max(1) as u64);
        }
        let median = h.value_at_quantile(0.5) as f64;
        let slowed: Vec<_> = units
            .iter()
            .filter(|(_, took)| took.as_micros() as f64 > SLOWED * median)
            .collect();
        let lost: Duration = slowed.iter().map(|(_, took)| *took).sum();
        println!(
            "  thread {core}: {} units, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} slowed (> {SLOWED}x), {:.1} % of the time in them",
            units.len(),
            median / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3,
            slowed.len(),
            100.0 * lost.as_secs_f64() / run.as_secs_f64(),
        );
        slowed_starts.push(slowed.iter().map(|(at, _)| *at).collect::<Vec<_>>());
    }
    // Episodes on the first thread, and how many of them every thread shared.
    let episodes = bursts::bursts(slowed_starts[0].iter().copied());
    let shared = episodes
        .starts
        .iter()
        .filter(|e| {
            slowed_starts[1..]
                .iter()
                .all(|starts| starts.iter().any(|s| s.abs_diff(**e) < bursts::BURST_GAP))
        })
        .count();
    let at: Vec<String> = episodes
        .starts
        .iter()
        .take(12)
        .map(|e| format!("{:.2}", e.as_secs_f64()))
        .collect();
    println!(
        "  slowed episodes on thread 0: {} ({} of them on every thread at once), median {:.2} s apart, starting at {} s",
        episodes.starts.len(),
        shared,
        episodes.median_gap.unwrap_or_default().as_secs_f64(),
        at.join(", "),
    );
}

/// Where each sync's write lands: past the end of the file (its size changes,
/// so `fdatasync` commits the file-system journal) or inside a file written
/// full of zeros beforehand (only the data is flushed).
#[derive(Clone, Copy, Debug)]
enum Writes {
    Append,
    Overwrite,
}

/// Bytes each probe thread preallocates in overwrite mode; it wraps around.
const PREALLOCATED: u64 = 64 << 20;

fn disk(run: Duration, dir: &std::path::Path) {
    for writes in [Writes::Append, Writes::Overwrite] {
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let path = dir.join(format!("tasker-host-probe-{}-{i}", std::process::id()));
                std::thread::spawn(move || syncs(run, &path, writes))
            })
            .collect();
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for t in threads {
            h.add(t.join().expect("disk thread")).expect("merge");
        }
        let over = |ms: u64| h.count_between(ms * 1000 + 1, h.max().max(ms * 1000 + 1));
        println!(
            "disk: 4 KiB {writes:?} + fdatasync, 2 threads, in {}, {run:?}: {} syncs, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; {} over 20 ms, {} over 50 ms",
            dir.display(),
            h.len(),
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3,
            over(20),
            over(50),
        );
    }
}

fn syncs(run: Duration, path: &std::path::Path, writes: Writes) -> Histogram<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::create(path).expect("probe file");
    if let Writes::Overwrite = writes {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..PREALLOCATED >> 20 {
            file.write_all(&zeros).expect("preallocate");
        }
        file.sync_all().expect("sync preallocated");
        file.seek(SeekFrom::Start(0)).expect("seek");
    }
    let block = [0x5a_u8; 4096];
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut at = 0u64;
    let start = Instant::now();
    while start.elapsed() < run {
        if let Writes::Overwrite = writes
            && at == PREALLOCATED
        {
            file.seek(SeekFrom::Start(0)).expect("seek");
            at = 0;
        }
        file.write_all(&block).expect("write");
        at += block.len() as u64;
        let t = Instant::now();
        file.sync_data().expect("fdatasync");
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(path);
    h
}
