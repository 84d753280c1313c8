//! The executor: runs steps on a tokio pool with adaptive bounded concurrency.
//! Jobs arrive from processors over a crossbeam channel; each outcome goes back to
//! its processor's inbox, which turns it into events. The executor never touches
//! state.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
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
    in_flight: Mutex<usize>,
    freed: Condvar,
    limit: Mutex<AdaptiveLimit>,
}

/// Runs jobs until every sender is dropped.
pub(crate) struct Executor {
    jobs: Option<Sender<Job>>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
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
        let handle = runtime.handle().clone();
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let slots = Arc::new(Slots {
            in_flight: Mutex::new(0),
            freed: Condvar::new(),
            limit: Mutex::new(AdaptiveLimit::new(min, max)),
        });
        metrics.executor_limit.set(min as i64);
        let dispatcher = std::thread::Builder::new()
            .name("tasker-dispatch".into())
            .spawn(move || dispatch(rx, handle, slots, metrics))?;
        Ok(Executor {
            jobs: Some(tx),
            dispatcher: Some(dispatcher),
            runtime: Some(runtime),
        })
    }

    pub(crate) fn sender(&self) -> Option<Sender<Job>> {
        self.jobs.clone()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
        if let Some(rt) = self.runtime.take() {
            // In-flight attempts are abandoned; after a restart they run again.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dispatch(
    rx: Receiver<Job>,
    rt: tokio::runtime::Handle,
    slots: Arc<Slots>,
    metrics: Arc<Metrics>,
) {
    while let Ok(job) = rx.recv() {
        metrics.executor_queued.set(rx.len() as i64);
        {
            let mut n = lock(&slots.in_flight);
            while *n >= lock(&slots.limit).current() {
                n = slots.freed.wait(n).unwrap_or_else(|p| p.into_inner());
            }
            *n += 1;
            metrics.executor_in_flight.set(*n as i64);
        }
        let slots = Arc::clone(&slots);
        let metrics = Arc::clone(&metrics);
        let queue = rx.clone();
        rt.spawn(async move {
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
            metrics.step_latency_us.record(micros);
            let limit = lock(&slots.limit).on_sample(micros as f64, queue.len());
            metrics.executor_limit.set(limit as i64);
            {
                let mut n = lock(&slots.in_flight);
                *n -= 1;
                metrics.executor_in_flight.set(*n as i64);
            }
            slots.freed.notify_one();
            // The processor may have stopped (shutdown, fencing): the attempt then
            // runs again after a restart, as documented.
            let _ = reply.send(Inbox::StepDone {
                task,
                step,
                attempt,
                outcome,
            });
        });
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
