//! Starting a processor: restore, catch up with the log, claim the partition,
//! finish what the previous owner left.

use super::*;

impl Processor {
    /// Takes the partition's writer, restores the newest snapshot and folds the rest
    /// of the log, claims the partition with a higher epoch, then finishes what the
    /// previous owner left: unanswered commands, interrupted steps, cut cascades.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn recover(
        partition: PartitionId,
        log: Arc<dyn Log>,
        registry: Arc<TemplateRegistry>,
        options: Arc<EngineOptions>,
        inbox: Receiver<Inbox>,
        self_tx: Sender<Inbox>,
        jobs: Option<Steps>,
        view: Arc<ArcSwap<PartitionView>>,
        metrics: Arc<Metrics>,
        observer: Option<TaskObserver>,
    ) -> Result<Processor, ProcessorError> {
        let log_err = |source| ProcessorError::Log { partition, source };
        let writer = log.writer(partition).map_err(log_err)?;
        let snapshots = options.snapshot_dir.as_ref().map(SnapshotStore::new);
        let (mut state, chain, read_pos) = match snapshots
            .as_ref()
            .and_then(|s| s.latest(partition))
        {
            Some((file, state)) => {
                tracing::info!(%partition, position = %file.position, tasks = state.task_count(), "restored snapshot");
                (state, file.chain, file.position)
            }
            None => (
                State::new(options.retention.as_millis() as u64),
                HashChain::genesis(partition),
                log.start(partition).map_err(log_err)?,
            ),
        };
        state.track_evictions();
        let mut p = Processor {
            partition,
            partitions: log.partitions(),
            log,
            writer: Some(writer),
            state,
            chain,
            read_pos,
            epoch: Epoch(0),
            exclusive: false,
            durable_end: read_pos,
            pipeline: None,
            commits: VecDeque::new(),
            pending_dispatch: 0,
            own: VecDeque::new(),
            appended_end: read_pos,
            registry,
            options,
            inbox,
            self_tx,
            jobs,
            timers: Timers::default(),
            view,
            table: Arc::default(),
            snapshot_tasks: imbl::HashMap::new(),
            snapshots,
            snapshot_job: None,
            snapshot_cache: SnapshotCache::default(),
            events_since_snapshot: 0,
            last_snapshot: Instant::now(),
            tasks_gauge: GaugePart::new(Arc::clone(&metrics), |m| &m.tasks_in_memory),
            inbox_gauge: GaugePart::new(Arc::clone(&metrics), |m| &m.processor_inbox),
            metrics,
            observer,
            waiting: FxHashMap::default(),
            digest_waiters: Vec::new(),
            ready: VecDeque::new(),
            queued: FxHashSet::default(),
            in_flight: 0,
            namespaces: FxHashMap::default(),
            round: Round::default(),
            buf: Vec::with_capacity(4096),
            shutting_down: false,
        };
        let mut unanswered = p.catch_up(None)?;
        p.appended_end = p.read_pos;
        p.exclusive = p.writer.as_ref().is_some_and(|w| w.exclusive());
        // Claim the partition: every older writer is fenced from here on.
        p.epoch = Epoch(p.state.epoch().0 + 1);
        let claim = Envelope {
            task_id: TaskId::NIL,
            correlation_id: CorrelationId::NIL,
            source_position: None,
            epoch: p.epoch,
            at: Timestamp::now(),
            body: Body::Control(Control::PartitionClaimed(PartitionClaimed {
                epoch: p.epoch,
                owner: p.options.owner.clone(),
            })),
        };
        if p.exclusive {
            // Nothing can land before the claim: apply it as it is appended.
            p.state.apply(&claim);
            p.round.events.push(claim);
        } else {
            // Others may have appended since the catch-up: fold everything up to
            // and including the claim in log order, exactly as a replay will.
            let record = to_record(&claim, None, &mut Vec::new())
                .map_err(|source| ProcessorError::Encode { partition, source })?;
            let at = p.append_now(&[record])?;
            if let Some(claimed) = at.first() {
                unanswered.extend(p.catch_up(Some(claimed.next()))?);
            }
            let answered = p.state.answered();
            unanswered.retain(|r| Some(r.position) > answered);
            p.appended_end = p.read_pos;
            p.durable_end = p.read_pos;
            if p.state.epoch() != p.epoch {
                return Err(ProcessorError::Fenced {
                    partition,
                    epoch: p.state.epoch(),
                });
            }
        }
        let now = Timestamp::now();
        for record in unanswered {
            p.on_command_record(&record, now);
        }
        p.timers = Timers::from_state(&p.state);
        let ids: Vec<TaskId> = p.state.tasks().map(|t| t.id).collect();
        for id in ids {
            if let Ok(events) = decide(&p.state, Input::Reconcile { task: id }, now) {
                let corr = p.correlation(id);
                p.emit(id, corr, None, events, now);
            }
            p.round.changed.insert(id);
            let Some(task) = p.state.task(&id) else {
                continue;
            };
            if task.status.is_terminal() {
                continue;
            }
            let steps: Vec<(StepId, StepStatus, u32)> = task
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| (StepId(i as u32), s.status, s.attempts))
                .collect();
            for (step, status, attempts) in steps {
                match status {
                    // Interrupted attempts run again (handlers are at-least-once).
                    StepStatus::InProgress => p.round.dispatch.push((id, step, attempts)),
                    StepStatus::Pending => p.enqueue_step(id, step),
                    _ => {}
                }
            }
        }
        p.start_ready();
        p.flush()?;
        p.publish(true);
        if p.exclusive
            && let Some(writer) = p.writer.take()
        {
            let name = format!("tasker-w{}", p.partition.0);
            let pipe = WriterThread::start(writer, Arc::clone(&p.metrics), name).map_err(|e| {
                ProcessorError::Log {
                    partition,
                    source: LogError::Io {
                        op: "spawn the writer thread",
                        path: std::path::PathBuf::new(),
                        source: e,
                    },
                }
            })?;
            p.pipeline = Some(pipe);
        }
        tracing::info!(partition = %p.partition, epoch = %p.epoch, position = %p.read_pos, tasks = p.state.task_count(), "partition recovered");
        Ok(p)
    }

    /// Folds everything from `read_pos` to the end of the log; returns the commands
    /// no event answered yet, in log order.
    /// `until`: read at least up to this position (default: the log's end now).
    pub(super) fn catch_up(
        &mut self,
        until: Option<Position>,
    ) -> Result<Vec<StoredRecord>, ProcessorError> {
        let partition = self.partition;
        let log_err = |source| ProcessorError::Log { partition, source };
        let mut reader = self.log.reader(partition, self.read_pos).map_err(log_err)?;
        let mut pending: VecDeque<StoredRecord> = VecDeque::new();
        // Where a gap in positions was last read again from (see below).
        let mut reread: Option<Position> = None;
        'read: loop {
            let end = match until {
                Some(u) => u,
                None => self.log.end(partition).map_err(log_err)?,
            };
            if self.read_pos >= end {
                break;
            }
            let batch = reader
                .poll(8192, Duration::from_millis(200))
                .map_err(log_err)?;
            for rec in batch {
                if rec.position > self.read_pos {
                    // Records missing between the log and the reader: read
                    // again from the first one missing, once. A gap still there
                    // is the log's own (it holds nothing at those positions).
                    self.metrics.log_gaps.inc();
                    if reread != Some(self.read_pos) {
                        reread = Some(self.read_pos);
                        reader.seek(self.read_pos).map_err(log_err)?;
                        continue 'read;
                    }
                    tracing::warn!(partition = %partition, expected = %self.read_pos, got = %rec.position, "the log holds no records between these positions; going on");
                }
                self.chain.push(&rec.record.payload);
                self.read_pos = rec.position.next();
                self.metrics.records_read.inc();
                match rec.record.headers.kind {
                    Some(Kind::Event) | Some(Kind::Control) => {
                        if let Ok(env) = codec::decode(&rec.record.payload) {
                            self.fold(&env);
                        } else {
                            self.metrics.ignored_events.inc();
                        }
                    }
                    Some(Kind::Command) | None => pending.push_back(rec),
                }
                let answered = self.state.answered();
                while pending
                    .front()
                    .is_some_and(|r| Some(r.position) <= answered)
                {
                    pending.pop_front();
                }
            }
        }
        let answered = self.state.answered();
        Ok(pending
            .into_iter()
            .filter(|r| Some(r.position) > answered)
            .collect())
    }

    pub(super) fn fold(&mut self, env: &Envelope) {
        match self.state.apply(env) {
            Applied::Event | Applied::Control | Applied::Command => {}
            Applied::Fenced { .. } => self.metrics.ignored_events.inc(),
            Applied::Anomaly(e) => {
                self.metrics.ignored_events.inc();
                tracing::warn!(partition = %self.partition, error = %e, "event does not fit the state; ignored");
            }
        }
    }
}
