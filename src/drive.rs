//! Driving an in-process engine with many tasks and timing each one from submit to
//! its terminal event: shared by `tasker demo` and `tasker bench`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tasker_engine::record::{Envelope, TaskId};
use tasker_engine::runtime::{Engine, SubmitError, TaskObserver};
use tasker_engine::state::{TaskState, TaskStatus};

use crate::bursts::{self, Bursts};

/// Sends every finished task's id and status, with the time it was seen.
pub fn observer() -> (TaskObserver, Receiver<(TaskId, TaskStatus, Instant)>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let observer: TaskObserver = Arc::new(move |t: &TaskState| {
        let _ = tx.send((t.id, t.status, Instant::now()));
    });
    (observer, rx)
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    pub elapsed: Duration,
    /// Submit to terminal event, microseconds.
    pub latency_us: Histogram<u64>,
    pub statuses: HashMap<TaskStatus, usize>,
    pub finished: Vec<TaskId>,
    pub offered_rate: Option<f64>,
    /// How late the paced generator submitted its latest task (`--rate` only).
    pub max_submit_lag: Duration,
    /// Per finished task: when it was due (submitted, at `--rate`) after the
    /// run's start, and its latency, both in µs: where in the run the tail is.
    pub due_and_latency_us: Vec<(u32, u32)>,
}

pub struct Driver<'a> {
    engine: &'a Engine,
    done: Receiver<(TaskId, TaskStatus, Instant)>,
    started: HashMap<TaskId, Instant>,
    outcome: Outcome,
    progress: ProgressBar,
    t0: Instant,
}

impl<'a> Driver<'a> {
    pub fn new(
        engine: &'a Engine,
        done: Receiver<(TaskId, TaskStatus, Instant)>,
        total: usize,
        quiet: bool,
    ) -> Self {
        let progress = if quiet {
            ProgressBar::hidden()
        } else {
            let pb = ProgressBar::new(total as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bar:40} {pos}/{len} tasks finished  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb
        };
        Driver {
            engine,
            done,
            started: HashMap::with_capacity(total),
            outcome: Outcome {
                elapsed: Duration::ZERO,
                latency_us: tasker_engine::runtime::metrics::new_histogram(),
                statuses: HashMap::new(),
                finished: Vec::with_capacity(total),
                offered_rate: None,
                max_submit_lag: Duration::ZERO,
                due_and_latency_us: Vec::with_capacity(total),
            },
            progress,
            t0: Instant::now(),
        }
    }

    fn collect(&mut self) {
        while let Ok((id, status, at)) = self.done.try_recv() {
            self.record(id, status, at);
        }
    }

    fn record(&mut self, id: TaskId, status: TaskStatus, at: Instant) {
        if let Some(start) = self.started.remove(&id) {
            let latency = at.saturating_duration_since(start).as_micros().max(1) as u64;
            let _ = self.outcome.latency_us.record(latency);
            let due = start.saturating_duration_since(self.t0).as_micros();
            self.outcome.due_and_latency_us.push((
                u32::try_from(due).unwrap_or(u32::MAX),
                u32::try_from(latency).unwrap_or(u32::MAX),
            ));
            *self.outcome.statuses.entry(status).or_default() += 1;
            self.outcome.finished.push(id);
            self.progress.inc(1);
        }
    }

    /// Submits one task, waiting out backpressure; its latency counts from `start`.
    fn submit(&mut self, envelope: Envelope, start: Instant) -> anyhow::Result<()> {
        let id = envelope.task_id;
        self.started.insert(id, start);
        loop {
            match self.engine.submit(envelope.clone()) {
                Ok(_answer) => return Ok(()),
                Err(SubmitError::Overloaded(_)) => {
                    self.collect();
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Submits every task (all at once, or paced at `rate` per second) and waits
    /// until each is terminal.
    pub fn run(
        mut self,
        tasks: Vec<Envelope>,
        rate: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let total = tasks.len();
        let t0 = Instant::now();
        self.t0 = t0;
        match rate {
            None => {
                for env in tasks {
                    self.submit(env, Instant::now())?;
                }
            }
            Some(rate) => {
                // Open-loop pacing: every millisecond, submit whatever is due by now.
                // Each task's latency counts from when it was due, not from when the
                // generator got to it, so a generator held up (by the engine's
                // backpressure or by the scheduler) cannot hide the wait
                // (coordinated omission).
                let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut next = t0;
                for env in tasks {
                    while next > Instant::now() {
                        self.collect();
                        std::thread::sleep(Duration::from_millis(1).min(next - Instant::now()));
                    }
                    let lag = Instant::now().saturating_duration_since(next);
                    self.outcome.max_submit_lag = self.outcome.max_submit_lag.max(lag);
                    self.submit(env, next)?;
                    next += interval;
                }
                self.outcome.offered_rate = Some(total as f64 / t0.elapsed().as_secs_f64());
            }
        }
        let deadline = Instant::now() + timeout;
        while self.outcome.finished.len() < total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!(
                    "{} of {total} tasks did not finish within {timeout:?}",
                    total - self.outcome.finished.len()
                );
            }
            if let Ok((id, status, at)) =
                self.done.recv_timeout(left.min(Duration::from_millis(200)))
            {
                self.record(id, status, at);
            }
        }
        self.outcome.elapsed = t0.elapsed();
        self.progress.finish_and_clear();
        Ok(self.outcome)
    }
}

/// Where a run's slowest tasks were due: in steady noise, or in bursts.
#[derive(Debug, Clone, PartialEq)]
pub struct TailBursts {
    pub window: Duration,
    pub windows: usize,
    /// Windows holding at least one task slower than the threshold.
    pub windows_in_tail: usize,
    /// Runs of such windows (closer than [`bursts::BURST_GAP`] join one burst).
    pub bursts: Bursts,
}

/// Groups the tasks slower than `threshold_us` by when they were due. Bursts at
/// a steady period point at something periodic, such as a host that slows its
/// cores (`cargo bench --bench host`); a tail spread over the whole run points
/// at steady overload.
pub fn tail_bursts(samples: &[(u32, u32)], threshold_us: u64, window: Duration) -> TailBursts {
    let width = window.as_micros().max(1) as u64;
    let last = samples
        .iter()
        .map(|(due, _)| u64::from(*due))
        .max()
        .unwrap_or(0);
    let windows = (last / width + 1) as usize;
    let mut in_tail = vec![false; windows];
    for (due, latency) in samples {
        if u64::from(*latency) > threshold_us {
            in_tail[(u64::from(*due) / width) as usize] = true;
        }
    }
    let tail_windows = in_tail
        .iter()
        .enumerate()
        .filter(|(_, t)| **t)
        .map(|(i, _)| Duration::from_micros(i as u64 * width));
    TailBursts {
        window,
        windows,
        windows_in_tail: in_tail.iter().filter(|t| **t).count(),
        bursts: bursts::bursts(tail_windows),
    }
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_tasks_due_close_together_form_one_burst_and_bursts_are_spaced() {
        let ms = |v: u32| v * 1000;
        let mut samples: Vec<(u32, u32)> = (0..3000).map(|i| (ms(i), 500)).collect();
        // Two bursts: tasks due at 1.00-1.25 s and 2.50-2.55 s were slow.
        for s in samples.iter_mut() {
            if (1000..1250).contains(&(s.0 / 1000)) || (2500..2550).contains(&(s.0 / 1000)) {
                s.1 = ms(80);
            }
        }
        let t = tail_bursts(&samples, 20_000, Duration::from_millis(100));
        assert_eq!(t.windows, 30);
        assert_eq!(t.windows_in_tail, 4);
        assert_eq!(
            t.bursts.starts,
            vec![Duration::from_millis(1000), Duration::from_millis(2500)]
        );
        assert_eq!(t.bursts.median_gap, Some(Duration::from_millis(1500)));
        let none = tail_bursts(&samples, 100_000, Duration::from_millis(100));
        assert_eq!((none.windows_in_tail, none.bursts.starts.len()), (0, 0));
        assert_eq!(none.bursts.median_gap, None);
    }
}
