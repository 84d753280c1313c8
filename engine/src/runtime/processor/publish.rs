//! What readers see: the published view, snapshots and digest answers.

use super::*;

impl Processor {
    pub(super) fn publish(&mut self, live: bool) {
        self.publish_at(self.read_pos, live);
    }

    /// Publishes the view as the fold of the records before `position`.
    pub(super) fn publish_at(&mut self, position: Position, live: bool) {
        self.metrics
            .tasks_in_memory
            .set(self.state.task_count() as i64);
        self.view.store(Arc::new(PartitionView::new(
            self.partition,
            position,
            self.appended_end,
            self.epoch,
            live,
            Arc::clone(&self.table),
        )));
    }

    pub(super) fn snapshot_due(&self) -> bool {
        self.snapshots.is_some()
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
    /// tasks come from the published view (a persistent map, so taking it is O(1))
    /// and are encoded and written on a background thread; `wait` writes in line.
    pub(super) fn snapshot(&mut self, wait: bool) {
        let Some(store) = self.snapshots.clone() else {
            return;
        };
        // Waiting (at shutdown) includes a snapshot still being written.
        if wait && let Some(job) = self.snapshot_job.take() {
            let _ = job.join();
        }
        if !self.settled() || self.events_since_snapshot == 0 {
            return;
        }
        if let Some(job) = self.snapshot_job.take() {
            if !job.is_finished() && !wait {
                self.snapshot_job = Some(job);
                return;
            }
            let _ = job.join();
        }
        let (partition, position, chain) = (self.partition, self.read_pos, self.chain);
        let metrics = Arc::clone(&self.metrics);
        let write = move |file: SnapshotFile| match store.write(file) {
            Ok(path) => {
                metrics.snapshots_written.inc();
                tracing::debug!(%partition, file = %path.display(), "snapshot written");
            }
            Err(e) => tracing::error!(%partition, error = %e, "snapshot failed; will retry"),
        };
        let meta = self.state.snapshot_meta();
        if !wait && self.snapshot_tasks.len() != self.state.task_count() {
            tracing::warn!(
                view = self.snapshot_tasks.len(),
                state = self.state.task_count(),
                "view and state disagree; snapshotting in line"
            );
        }
        if wait || self.snapshot_tasks.len() != self.state.task_count() {
            write(SnapshotFile {
                partition,
                position,
                chain,
                digest: self.state.digest(),
                state: self.state.to_snapshot(),
            });
        } else {
            let tasks = self.snapshot_tasks.clone();
            let job = std::thread::Builder::new()
                .name(format!("tasker-snap{}", partition.0))
                .spawn(move || {
                    let digest = meta.digest(tasks.values().map(|t| &**t));
                    let state = StateSnapshot::from_tasks(tasks.values().map(|t| &**t), meta);
                    write(SnapshotFile {
                        partition,
                        position,
                        chain,
                        digest,
                        state,
                    });
                });
            match job {
                Ok(handle) => self.snapshot_job = Some(handle),
                Err(e) => {
                    tracing::error!(%partition, error = %e, "cannot start the snapshot thread")
                }
            }
        }
        self.events_since_snapshot = 0;
        self.last_snapshot = Instant::now();
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
