//! What readers see: the published view, snapshots and digest answers.

use std::path::PathBuf;

use super::*;
use crate::runtime::pacing::{BACKGROUND_SHARE, DutyCycle};

impl Processor {
    pub(super) fn publish(&mut self, live: bool) {
        self.publish_at(self.read_pos, live);
    }

    /// Publishes the view as the fold of the records before `position`.
    pub(super) fn publish_at(&mut self, position: Position, live: bool) {
        self.tasks_gauge.set(self.state.task_count() as i64);
        self.view.store(Arc::new(PartitionView::new(
            self.partition,
            position,
            self.appended_end,
            self.epoch,
            live,
            Arc::clone(&self.table),
        )));
    }

    /// A snapshot is due, and can start: not while the previous one is still
    /// being written. (New work waits while a due snapshot waits for the log to
    /// settle; counting one that cannot start made every round wait for its
    /// append to be durable, without group commit, for as long as a slow
    /// snapshot ran.)
    pub(super) fn snapshot_due(&self) -> bool {
        self.snapshots.is_some()
            && self.snapshot_job.as_ref().is_none_or(|j| j.is_finished())
            && self.events_since_snapshot > 0
            && (self.events_since_snapshot >= self.options.snapshot_every_events
                || self.last_snapshot.elapsed() >= self.options.snapshot_interval)
    }

    pub(super) fn maybe_snapshot(&mut self) {
        if self.snapshot_due() && self.settled() {
            self.snapshot(false);
        }
    }

    /// Snapshots the state if it is exactly the fold of the log read so far. The
    /// tasks come from a persistent map (taking it is O(1)) and are hashed,
    /// encoded (both only when changed since the last snapshot) and written,
    /// most often as a delta, on a background thread; `wait` (at shutdown)
    /// writes in line.
    pub(super) fn snapshot(&mut self, wait: bool) {
        let Some(store) = self.snapshots.clone() else {
            return;
        };
        // A running snapshot is never due, so only shutdown finds one still
        // being written here, and waits for it.
        if let Some(job) = self.snapshot_job.take() {
            self.join_snapshot(job);
        }
        if !self.settled() || self.events_since_snapshot == 0 {
            return;
        }
        let (partition, position, chain) = (self.partition, self.read_pos, self.chain);
        let metrics = Arc::clone(&self.metrics);
        let done = move |written: Result<PathBuf, SnapshotError>| match written {
            Ok(path) => {
                metrics.snapshots_written.inc();
                if path.extension().is_some_and(|e| e == "delta") {
                    metrics.snapshot_deltas_written.inc();
                }
                if let Ok(file) = std::fs::metadata(&path) {
                    metrics.snapshot_bytes_written.add(file.len());
                }
                tracing::debug!(%partition, file = %path.display(), "snapshot written");
            }
            Err(e) => tracing::error!(%partition, error = %e, "snapshot failed; will retry"),
        };
        if self.snapshot_tasks.len() != self.state.task_count() {
            tracing::warn!(
                view = self.snapshot_tasks.len(),
                state = self.state.task_count(),
                "view and state disagree; snapshotting the state in line"
            );
            // The whole state, from which the next delta cannot follow.
            self.snapshot_cache.reset_chain();
            done(store.write_state(partition, position, chain, &self.state));
        } else {
            let meta = self.state.snapshot_meta(&self.snapshot_cache);
            let tasks = self.snapshot_tasks.clone();
            let mut cache = std::mem::take(&mut self.snapshot_cache);
            let write = move || {
                let mut duty = DutyCycle::new(BACKGROUND_SHARE);
                match meta.encode_paced(tasks.values(), &mut cache, &mut || duty.pause()) {
                    Ok(state) => {
                        let written = store.write_next(partition, position, chain, &state);
                        drop(state);
                        if let Ok((_, next)) = &written {
                            cache.written(*next);
                        }
                        done(written.map(|(path, _)| path));
                    }
                    Err(e) => {
                        tracing::error!(%partition, error = %e, "cannot encode a snapshot; will retry")
                    }
                }
                cache
            };
            if wait {
                // At shutdown, in line: usually a small delta, not the whole state.
                self.snapshot_cache = write();
            } else {
                let job = std::thread::Builder::new()
                    .name(format!("tasker-snap{}", partition.0))
                    .spawn(move || {
                        background_priority();
                        write()
                    });
                match job {
                    Ok(handle) => self.snapshot_job = Some(handle),
                    Err(e) => {
                        tracing::error!(%partition, error = %e, "cannot start the snapshot thread")
                    }
                }
            }
        }
        self.events_since_snapshot = 0;
        self.last_snapshot = Instant::now();
    }

    /// Waits for a background snapshot and takes its cache back (a panicked one
    /// leaves an empty cache: the next snapshot hashes and encodes everything).
    fn join_snapshot(&mut self, job: std::thread::JoinHandle<SnapshotCache>) {
        if let Ok(cache) = job.join() {
            self.snapshot_cache = cache;
        }
    }

    /// Answers digest requests once the state is exactly the fold of the log prefix.
    pub(super) fn answer_digests(&mut self) {
        if self.digest_waiters.is_empty() || !self.settled() {
            return;
        }
        let report = DigestReport {
            partition: self.partition,
            position: self.read_pos,
            digest: self.state.digest(),
            chain: self.chain.head(),
            records: self.chain.count(),
            tasks_in_memory: self.state.task_count(),
        };
        for w in self.digest_waiters.drain(..) {
            let _ = w.send(report.clone());
        }
    }
}

/// Lowers the calling thread's scheduling priority (nice 10: about a tenth of a
/// busy core's share). A snapshot of a large state hashes and encodes every task
/// in memory; at full priority it took a quarter of a 2-core machine for seconds
/// and stalled the processors and log writers (p99 latency 80-200 ms); niced, it
/// uses what they leave. Best effort: a platform without per-thread priorities
/// runs it as is.
fn background_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        // Only ever lower it (a process already niced further stays so).
        let lower = getpriority_process(me).is_ok_and(|now| now < BACKGROUND_NICE);
        if lower && let Err(e) = setpriority_process(me, BACKGROUND_NICE) {
            tracing::debug!(error = %e, "cannot lower the snapshot thread's priority");
        }
    }
}

#[cfg(target_os = "linux")]
const BACKGROUND_NICE: i32 = 10;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn snapshot_threads_run_at_background_priority() {
        let seen = std::thread::spawn(|| {
            let before = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
            super::background_priority();
            let after = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
            (before.unwrap(), after.unwrap())
        })
        .join()
        .unwrap();
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        assert_eq!(seen, (mine, mine.max(super::BACKGROUND_NICE)));
        // Only that thread: this one keeps its priority.
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap(),
            mine
        );
    }
}
