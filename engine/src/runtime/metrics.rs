//! The engine's counters, gauges and latency histograms (hdrhistogram), shared by
//! processors and the executor and rendered for `/metrics` by the binary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One processor's part of an engine-wide gauge (tasks in memory, inbox depth):
/// each processor moves the total by its own change, and a processor that stops
/// takes its part back out. (Setting a shared gauge from every partition showed
/// whichever partition wrote last.)
pub(crate) struct GaugePart {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &Gauge,
    value: i64,
}

impl GaugePart {
    pub(crate) fn new(metrics: Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        GaugePart {
            metrics,
            gauge,
            value: 0,
        }
    }

    pub(crate) fn set(&mut self, value: i64) {
        if value != self.value {
            (self.gauge)(&self.metrics).add(value - self.value);
            self.value = value;
        }
    }
}

impl Drop for GaugePart {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// A latency distribution (microseconds unless named otherwise).
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Mutex::new(new_histogram()))
    }
}

/// 1 µs .. 1 hour at 3 significant digits.
#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Latency {
    pub fn record(&self, value: u64) {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(value.max(1));
    }

    /// A copy of the distribution so far.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An append slower than this is counted in [`Metrics::slow_appends`] and logged.
pub const SLOW_APPEND: std::time::Duration = std::time::Duration::from_millis(50);

/// Everything the engine counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub tasks_accepted: Counter,
    pub tasks_completed: Counter,
    pub tasks_failed: Counter,
    pub tasks_cancelled: Counter,
    pub tasks_resolved: Counter,
    pub steps_started: Counter,
    pub steps_completed: Counter,
    pub steps_failed: Counter,
    pub steps_retried: Counter,
    /// Executor results that no longer matched the state (cancelled, superseded).
    pub stale_results: Counter,
    /// Records that could not be decoded (each became a `task.rejected`).
    pub malformed_records: Counter,
    /// Events ignored by the fold (fenced writers, anomalies).
    pub ignored_events: Counter,
    pub records_appended: Counter,
    /// Embedded-log appends (write + fsync, on the writer thread) that took
    /// longer than [`SLOW_APPEND`]: every task of the partition waited for each.
    pub slow_appends: Counter,
    pub records_read: Counter,
    /// Times a reader skipped positions and the processor read its partition
    /// again (see `ProcessorError::Gap`).
    pub log_gaps: Counter,
    pub snapshots_written: Counter,
    /// Of them, deltas (the others are full snapshots).
    pub snapshot_deltas_written: Counter,
    pub snapshot_bytes_written: Counter,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    pub append_latency_us: Latency,
    pub append_batch_records: Latency,
    pub step_latency_us: Latency,
    /// From `task.accepted` to the task's terminal event, in milliseconds.
    pub task_latency_ms: Latency,
    pub executor_in_flight: Gauge,
    pub executor_limit: Gauge,
    pub executor_queued: Gauge,
    pub processor_inbox: Gauge,
    pub tasks_in_memory: Gauge,
}

impl Metrics {
    /// Counts a rejected command by its reason code.
    pub fn reject(&self, code: &'static str) {
        let mut m = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(code).or_default() += 1;
    }

    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
