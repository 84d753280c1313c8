//! The end of a round: one append, then its side effects once it is durable
//! (replies, step dispatches, the view, observers).

use super::*;

impl Processor {
    /// Appends the round's commands and events in one batch, then releases its
    /// side effects: replies, dispatches, view, observers.
    pub(super) fn flush(&mut self) -> Result<(), ProcessorError> {
        let round = std::mem::take(&mut self.round);
        if round.commands.is_empty() && round.events.is_empty() {
            let idle =
                round.dispatch.is_empty() && round.replies.is_empty() && round.changed.is_empty();
            if idle {
                self.round = round;
                return Ok(());
            }
            // Side effects without new records (re-dispatches after a restart): they
            // wait only for what was appended before them.
            let commit = Commit {
                end: self.appended_end,
                replies: round.replies,
                dispatch: round.dispatch,
                finished: round.finished,
                views: round
                    .changed
                    .iter()
                    .map(|id| (*id, self.state.task_shared(id).cloned()))
                    .collect(),
                counts: round.counts,
            };
            if self.durable_end >= self.appended_end {
                self.release(commit);
            } else {
                self.pending_dispatch += commit.dispatch.len();
                self.commits.push_back(commit);
            }
            return Ok(());
        }
        let mut records: Vec<Record> =
            Vec::with_capacity(round.commands.len() + round.events.len());
        let mut buf = std::mem::take(&mut self.buf);
        for env in round
            .commands
            .iter()
            .map(|(e, _)| e)
            .chain(round.events.iter())
        {
            let ns = self.namespace_of(env);
            let record = to_record(env, ns, &mut buf).map_err(|source| ProcessorError::Encode {
                partition: self.partition,
                source,
            })?;
            records.push(record);
        }
        self.buf = buf;
        let n_cmd = round.commands.len();
        let n = records.len() as u64;
        let positions: Vec<Position> = if self.exclusive {
            // Nobody else writes: the log is exactly what this processor appends, at
            // positions it knows in advance.
            for record in &records {
                self.chain.push(&record.payload);
            }
            self.metrics.records_read.add(n);
            (0..n).map(|i| Position(self.appended_end.0 + i)).collect()
        } else {
            self.append_now(&records)?
        };
        for ((_, reply), pos) in round.commands.into_iter().zip(&positions) {
            if let Some(reply) = reply {
                self.waiting.insert(*pos, reply);
            }
        }
        if !self.exclusive {
            self.own.extend(positions[n_cmd..].iter().copied());
        }
        if let Some(last) = positions.last() {
            self.appended_end = self.appended_end.max(last.next());
            if self.exclusive {
                self.read_pos = self.appended_end;
            }
        }
        self.events_since_snapshot += (positions.len() - n_cmd) as u64;
        let mut views: Vec<(TaskId, Option<Arc<TaskState>>)> = round
            .changed
            .iter()
            .map(|id| (*id, self.state.task_shared(id).cloned()))
            .collect();
        views.extend(self.state.take_evicted().into_iter().map(|id| (id, None)));
        let commit = Commit {
            end: self.appended_end,
            replies: round.replies,
            dispatch: round.dispatch,
            finished: round.finished,
            views,
            counts: round.counts,
        };
        let mut changed = round.changed;
        changed.clear();
        self.round = Round {
            changed,
            ..Round::default()
        };
        let mut commit = commit;
        if self.options.eager_dispatch && self.exclusive && self.pipeline.is_some() {
            // This batch is ordered before anything its steps cause: a result is
            // appended after the start, so it never becomes durable without it.
            let started = std::mem::take(&mut commit.dispatch);
            self.dispatch(&started);
        }
        match (&self.pipeline, self.exclusive) {
            (Some(pipe), true) => {
                if !pipe.submit(records, self.appended_end) {
                    return Err(ProcessorError::Log {
                        partition: self.partition,
                        source: LogError::Config("the log writer thread stopped".into()),
                    });
                }
                self.pending_dispatch += commit.dispatch.len();
                self.commits.push_back(commit);
            }
            (None, true) => {
                let appended = self.append_now(&records)?;
                if appended.first() != positions.first() || appended.len() != positions.len() {
                    return Err(ProcessorError::Log {
                        partition: self.partition,
                        source: LogError::Config(format!(
                            "the exclusive writer appended at {:?}.., expected {:?}",
                            appended.first(),
                            positions.first()
                        )),
                    });
                }
                self.durable_end = self.appended_end;
                self.release(commit);
            }
            (_, false) => {
                self.durable_end = self.appended_end;
                self.release(commit);
            }
        }
        Ok(())
    }

    /// Appends on this thread (recovery, shared logs) and records the timing.
    pub(super) fn append_now(
        &mut self,
        records: &[Record],
    ) -> Result<Vec<Position>, ProcessorError> {
        let writer = self.writer.as_mut().ok_or_else(|| ProcessorError::Log {
            partition: self.partition,
            source: LogError::Config("the writer moved to the writer thread".into()),
        })?;
        let started = Instant::now();
        let positions = writer
            .append(records)
            .map_err(|source| ProcessorError::Log {
                partition: self.partition,
                source,
            })?;
        self.metrics
            .append_latency_us
            .record(started.elapsed().as_micros() as u64);
        self.metrics
            .append_batch_records
            .record(records.len() as u64);
        self.metrics.records_appended.add(records.len() as u64);
        Ok(positions)
    }

    /// The writer thread made everything before `end` durable.
    pub(super) fn on_durable(&mut self, end: Position) {
        self.durable_end = self.durable_end.max(end);
        while self
            .commits
            .front()
            .is_some_and(|c| c.end <= self.durable_end)
        {
            if let Some(commit) = self.commits.pop_front() {
                self.pending_dispatch = self.pending_dispatch.saturating_sub(commit.dispatch.len());
                self.release(commit);
            }
        }
    }

    /// Releases a durable batch's side effects. The view goes first, so a client
    /// that gets its answer also sees its effect.
    pub(super) fn release(&mut self, commit: Commit) {
        // Counted before the view shows the batch, so whoever sees a task
        // finish sees it counted.
        commit.counts.add_to(&self.metrics);
        // Exclusive writers run ahead of durability: the view describes the log up
        // to this batch's end, not up to what is appended after it.
        let position = if self.exclusive {
            commit.end
        } else {
            self.read_pos
        };
        for (id, view) in commit.views {
            match view {
                Some(t) => {
                    self.table.insert(id, position, Arc::clone(&t));
                    self.snapshot_tasks.insert(id, t);
                }
                None => {
                    self.table.remove(&id);
                    self.snapshot_tasks.remove(&id);
                }
            }
        }
        self.publish_at(position, true);
        for (pos, outcome) in commit.replies {
            if let Some(reply) = self.waiting.remove(&pos) {
                let _ = reply.send(Ok(outcome));
            }
        }
        self.dispatch(&commit.dispatch);
        for id in &commit.finished {
            if let Some(t) = self.state.task(id) {
                let ms = t
                    .finished_at
                    .unwrap_or(t.accepted_at)
                    .millis_since(t.accepted_at);
                self.metrics.task_latency_ms.record(ms);
                if let Some(observer) = &self.observer {
                    observer(t);
                }
            }
        }
    }

    /// The state is exactly the fold of the durable log read so far.
    pub(super) fn settled(&self) -> bool {
        self.read_pos >= self.appended_end && self.durable_end >= self.appended_end
    }

    /// Hands started attempts to the executor (after their `step.started` is durable).
    pub(super) fn dispatch(&mut self, started: &[(TaskId, StepId, u32)]) {
        let Some(jobs) = &self.jobs else { return };
        let mut sent = 0;
        let mut batch = Vec::with_capacity(started.len());
        for &(task_id, step, attempt) in started {
            let Some(task) = self.state.task(&task_id) else {
                continue;
            };
            let Some(s) = task.step(step) else { continue };
            if s.status != StepStatus::InProgress || s.attempts != attempt {
                continue; // cancelled or finished within the same round
            }
            let Some(spec) = task.dag.snapshot().step(step) else {
                continue;
            };
            if spec.handler == REMOTE_HANDLER {
                continue;
            }
            let snapshot = task.dag.snapshot();
            let ctx = crate::handler::StepContext {
                task_id,
                correlation_id: task.correlation_id,
                namespace: snapshot.namespace.clone(),
                task_name: snapshot.name.clone(),
                version: snapshot.version.clone(),
                step: spec.name.clone(),
                attempt,
                context: task.request.context.clone(),
                parents: task
                    .dag
                    .parents(step)
                    .map(|p| {
                        (
                            task.step_name(p).to_owned(),
                            task.steps[p.index()].result.clone().unwrap_or_default(),
                        )
                    })
                    .collect(),
                config: spec.config.clone(),
                timeout: Duration::from_millis(spec.timeout_ms),
            };
            match self.registry.handlers().get(&spec.handler) {
                Some(handler) => {
                    batch.push(Job {
                        task: task_id,
                        step,
                        attempt,
                        handler,
                        ctx,
                        reply: self.self_tx.clone(),
                    });
                    sent += 1;
                }
                None => {
                    let _ = self.self_tx.send(Inbox::StepDone {
                        task: task_id,
                        step,
                        attempt,
                        outcome: crate::record::StepOutcome::Failed(
                            crate::record::StepError::permanent(format!(
                                "handler `{}` is not registered in this engine",
                                spec.handler
                            )),
                        ),
                    });
                    sent += 1;
                }
            }
        }
        jobs.send_all(batch);
        self.in_flight += sent;
    }
}
