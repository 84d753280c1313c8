//! The executor: runs steps on a tokio pool with adaptive bounded concurrency.
//! Processors hand jobs over through a cloneable [`Steps`] handle; each outcome
//! goes back to its processor's inbox, which turns it into events. The executor
//! never touches state.
//!
//! A job starts as a tokio task straight from the processor's thread when there is
//! room under the limit; otherwise it waits in a queue that finishing tasks drain
//! (each runs queued jobs before it ends), so no thread sits between a processor
//! and the pool.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use futures_util::FutureExt;

use super::Inbox;
use super::limit::AdaptiveLimit;
use super::metrics::Metrics;
use crate::handler::{StepContext, StepHandler};
use crate::record::{RawJson, StepError, StepId, StepOutcome, TaskId};

/// One attempt of one step to run.
pub(crate) struct Job {
    pub task: TaskId,
    pub step: StepId,
    pub attempt: u32,
    pub handler: Arc<dyn StepHandler>,
    pub ctx: StepContext,
    pub reply: Sender<Inbox>,
}

struct Slots {
    in_flight: usize,
    queued: VecDeque<Job>,
    limit: AdaptiveLimit,
}

struct Shared {
    slots: Mutex<Slots>,
    metrics: Arc<Metrics>,
}

/// Where processors send jobs; cheap to clone.
#[derive(Clone)]
pub(crate) struct Steps {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Steps {
    /// Starts `job` now if the limit allows, else queues it behind the running ones.
    #[cfg(test)]
    pub(crate) fn send(&self, job: Job) {
        self.send_all(vec![job]);
    }

    /// Starts what the limit allows of a round's `jobs` and queues the rest. The
    /// ones that start cross to the pool as one task, which spawns the others from
    /// inside it (local run queues) and runs the first itself: one hand-off from
    /// the processor's thread per round instead of one per step.
    pub(crate) fn send_all(&self, jobs: Vec<Job>) {
        let mut run_now = Vec::new();
        {
            let mut slots = lock(&self.shared.slots);
            for job in jobs {
                if slots.in_flight < slots.limit.current() {
                    slots.in_flight += 1;
                    run_now.push(job);
                } else {
                    slots.queued.push_back(job);
                }
            }
            let metrics = &self.shared.metrics;
            metrics.executor_in_flight.set(slots.in_flight as i64);
            metrics.executor_queued.set(slots.queued.len() as i64);
        }
        if run_now.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        // After shutdown the runtime drops the task; the attempts run again after a
        // restart, as documented.
        self.runtime.spawn(async move {
            let mut jobs = run_now.into_iter();
            let first = jobs.next();
            for job in jobs {
                tokio::spawn(run_jobs(job, Arc::clone(&shared)));
            }
            if let Some(job) = first {
                run_queue(job, shared).await;
            }
        });
    }
}

/// Owns the pool; dropping it abandons in-flight attempts.
pub(crate) struct Executor {
    steps: Option<Steps>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl Executor {
    pub(crate) fn start(
        min: usize,
        max: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Executor> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("tasker-step")
            .enable_all()
            .build()?;
        metrics.executor_limit.set(min as i64);
        let steps = Steps {
            shared: Arc::new(Shared {
                slots: Mutex::new(Slots {
                    in_flight: 0,
                    queued: VecDeque::new(),
                    limit: AdaptiveLimit::new(min, max),
                }),
                metrics,
            }),
            runtime: runtime.handle().clone(),
        };
        Ok(Executor {
            steps: Some(steps),
            runtime: Some(runtime),
        })
    }

    pub(crate) fn steps(&self) -> Option<Steps> {
        self.steps.clone()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.steps = None;
        if let Some(rt) = self.runtime.take() {
            // In-flight attempts are abandoned; after a restart they run again.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `job`, then queued jobs while the limit allows, then frees its slot.
/// (Boxed: it spawns itself, and a named future type breaks the cycle.)
fn run_jobs(job: Job, shared: Arc<Shared>) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(run_queue(job, shared))
}

async fn run_queue(mut job: Job, shared: Arc<Shared>) {
    loop {
        let started = Instant::now();
        let Job {
            task,
            step,
            attempt,
            handler,
            ctx,
            reply,
        } = job;
        let outcome = run(handler, ctx).await;
        let micros = started.elapsed().as_micros() as u64;
        shared.metrics.step_latency_us.record(micros);
        // The processor may have stopped (shutdown, fencing): the attempt then runs
        // again after a restart, as documented.
        let _ = reply.send(Inbox::StepDone {
            task,
            step,
            attempt,
            outcome,
        });
        let next = {
            let mut slots = lock(&shared.slots);
            let queued = slots.queued.len();
            let limit = slots.limit.on_sample(micros as f64, queued);
            shared.metrics.executor_limit.set(limit as i64);
            let next = if slots.in_flight <= limit {
                slots.queued.pop_front()
            } else {
                None
            };
            // A grown limit starts more of the queue than this task can run.
            while next.is_some() && slots.in_flight < limit {
                let Some(extra) = slots.queued.pop_front() else {
                    break;
                };
                slots.in_flight += 1;
                tokio::spawn(run_jobs(extra, Arc::clone(&shared)));
            }
            if next.is_none() {
                slots.in_flight -= 1;
            }
            shared
                .metrics
                .executor_in_flight
                .set(slots.in_flight as i64);
            shared
                .metrics
                .executor_queued
                .set(slots.queued.len() as i64);
            next
        };
        match next {
            Some(j) => job = j,
            None => return,
        }
    }
}

/// Runs one attempt with its timeout, turning panics and timeouts into errors
/// (a timed-out handler future is dropped, which cancels it).
async fn run(handler: Arc<dyn StepHandler>, ctx: StepContext) -> StepOutcome {
    let timeout = ctx.timeout;
    let span = tracing::info_span!(
        "step",
        task_id = %ctx.task_id,
        step = %ctx.step,
        attempt = ctx.attempt,
        correlation_id = %ctx.correlation_id,
    );
    let call = tracing::Instrument::instrument(
        std::panic::AssertUnwindSafe(handler.call(ctx)).catch_unwind(),
        span,
    );
    match tokio::time::timeout(timeout, call).await {
        Err(_) => StepOutcome::Failed(StepError::timeout(timeout.as_millis() as u64)),
        Ok(Err(payload)) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            StepOutcome::Failed(StepError::permanent(format!("handler panicked: {text}")))
        }
        Ok(Ok(Ok(value))) => StepOutcome::Completed {
            result: RawJson::from_trusted(value.to_string()),
        },
        Ok(Ok(Err(error))) => StepOutcome::Failed(error),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Sleeps a little and records how many calls overlapped.
    struct Overlap {
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl StepHandler for Overlap {
        async fn call(&self, _ctx: StepContext) -> Result<serde_json::Value, StepError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(serde_json::json!({}))
        }
    }

    fn ctx(step: u32) -> StepContext {
        StepContext {
            task_id: TaskId::NIL,
            correlation_id: crate::record::CorrelationId::NIL,
            namespace: "t".into(),
            task_name: "t".into(),
            version: "1.0.0".into(),
            step: format!("s{step}"),
            attempt: 1,
            context: RawJson::default(),
            parents: Vec::new(),
            config: RawJson::default(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn jobs_beyond_the_limit_wait_and_every_job_reports_once() {
        let metrics = Arc::new(Metrics::default());
        let executor = Executor::start(3, 3, Arc::clone(&metrics)).unwrap();
        let steps = executor.steps().unwrap();
        let handler = Arc::new(Overlap {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let job = |i: u32| Job {
            task: TaskId::NIL,
            step: StepId(i),
            attempt: 1,
            handler: Arc::clone(&handler) as Arc<dyn StepHandler>,
            ctx: ctx(i),
            reply: tx.clone(),
        };
        // One at a time, then a round of 30 at once (most of it queued).
        for i in 0..10 {
            steps.send(job(i));
        }
        steps.send_all((10..40).map(job).collect());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Inbox::StepDone { step, outcome, .. } => {
                    assert!(matches!(outcome, StepOutcome::Completed { .. }));
                    assert!(seen.insert(step.0), "step {} reported twice", step.0);
                }
                _ => panic!("not a step outcome"),
            }
        }
        assert_eq!(seen.len(), 40);
        assert_eq!(handler.peak.load(Ordering::SeqCst), 3, "the limit holds");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(metrics.executor_in_flight.get(), 0);
        assert_eq!(metrics.executor_queued.get(), 0);
        // A processor still holding its handle after shutdown loses the job (it runs
        // again after a restart) without a panic.
        drop(executor);
        steps.send(Job {
            task: TaskId::NIL,
            step: StepId(99),
            attempt: 1,
            handler: handler as Arc<dyn StepHandler>,
            ctx: ctx(99),
            reply: tx,
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }
}
