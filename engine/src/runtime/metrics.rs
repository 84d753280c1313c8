//! The engine's counters, gauges and latency histograms (hdrhistogram), shared by
//! processors and the executor and rendered for `/metrics` by the binary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::record::Event;

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

/// What one batch's events add to the task and step counters. They are added
/// when the batch is durable: a batch whose append fails is decided again after
/// the processor restarts, and counting it at decision would count it twice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventCounts {
    tasks_accepted: u64,
    tasks_completed: u64,
    tasks_failed: u64,
    tasks_cancelled: u64,
    tasks_resolved: u64,
    steps_started: u64,
    steps_completed: u64,
    steps_failed: u64,
    steps_retried: u64,
}

impl EventCounts {
    pub(crate) fn count(&mut self, event: &Event) {
        match event {
            Event::TaskAccepted(_) => self.tasks_accepted += 1,
            Event::TaskCompleted => self.tasks_completed += 1,
            Event::TaskFailed(_) => self.tasks_failed += 1,
            Event::TaskCancelled(_) => self.tasks_cancelled += 1,
            Event::TaskResolvedManually => self.tasks_resolved += 1,
            Event::StepStarted(_) => self.steps_started += 1,
            Event::StepCompleted(_) => self.steps_completed += 1,
            Event::StepFailed(f) => {
                self.steps_failed += 1;
                self.steps_retried += u64::from(f.retry_at.is_some());
            }
            // Not counted: they change no outcome a dashboard follows.
            Event::TaskRejected(_)
            | Event::TaskStarted
            | Event::TaskRetried(_)
            | Event::StepRetryDue(_)
            | Event::StepSkipped(_)
            | Event::StepCancelled(_)
            | Event::StepResolvedManually(_) => {}
        }
    }

    pub(crate) fn add_to(&self, m: &Metrics) {
        m.tasks_accepted.add(self.tasks_accepted);
        m.tasks_completed.add(self.tasks_completed);
        m.tasks_failed.add(self.tasks_failed);
        m.tasks_cancelled.add(self.tasks_cancelled);
        m.tasks_resolved.add(self.tasks_resolved);
        m.steps_started.add(self.steps_started);
        m.steps_completed.add(self.steps_completed);
        m.steps_failed.add(self.steps_failed);
        m.steps_retried.add(self.steps_retried);
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
