//! `audit verify`: checks that a partition's log is the one the engine wrote, and
//! names the position of anything changed, dropped or reordered. What each check
//! detects, and how exactly it can name the place, is in `docs/audit.md`:
//!
//! - structure (embedded log): frame checksums, segment headers, contiguous
//!   segments, sealed segments' record counts, whole batches;
//! - references: the chain head (and state digest) at every position the engine
//!   snapshotted ([`References`]) and at the end of every sealed range;
//! - the seal: a short hash of every record sealed by an earlier clean run;
//! - consistency, record by record: it decodes; its headers agree with its body;
//!   events fold without anomalies; an event answers an earlier command of its own
//!   task; commands are answered in order; engine clocks do not jump back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use super::checkpoints::References;
use super::seal::{MAX_ENTRY, Seal};
use super::{AuditError, record_hash};
use crate::codec::{self, JsonFallback};
use crate::log::{Log, Record};
use crate::record::{
    Body, Command, ContentType, Envelope, Kind, PartitionId, Position, SCHEMA_VERSION, TaskId,
    Timestamp,
};
use crate::runtime::derive_task_id;
use crate::state::{Applied, Digest, HashChain, State};

/// Settings of a verification.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The embedded log's root directory, read file by file; `None` reads through
    /// the [`Log`] (Kafka).
    pub file_root: Option<PathBuf>,
    /// The engine's snapshot directory (snapshots and chain checkpoints).
    pub snapshot_root: Option<PathBuf>,
    /// Where seals live (`<data_dir>/audit`).
    pub audit_dir: PathBuf,
    pub retention_ms: u64,
    /// Extend the seal over what was verified, when nothing was wrong.
    pub seal: bool,
    /// How far an engine-written record's time may be behind the previous one's.
    pub clock_skew_ms: u64,
    /// The wall clock, for "stamped in the future" (the caller reads it).
    pub now: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing found wrong, at a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub position: Position,
    pub severity: Severity,
    /// Which check: frame, segments, seal, chain, digest, decode, headers, fold,
    /// source_position, answers, time.
    pub check: &'static str,
    pub message: String,
}

/// The result for one partition.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub partition: PartitionId,
    /// Records before this position were checked.
    pub end: Position,
    pub records: u64,
    pub chain: Digest,
    pub digest: Digest,
    /// Sorted by position, errors before warnings at one position.
    pub findings: Vec<Finding>,
    /// The smallest position of an error: where the log first differs from what the
    /// engine wrote, or the first position where that is detectable.
    pub first_error: Option<Position>,
    /// From the references: the first change lies at a position in `[from, to)`.
    pub window: Option<(Position, Position)>,
    /// References (snapshot positions, checkpoints) compared.
    pub references_checked: usize,
    /// Problems with the references themselves.
    pub reference_problems: Vec<String>,
    /// Records from this position on are covered by no reference nor seal (only the
    /// consistency checks apply to them).
    pub covered_until: Position,
    pub sealed_before: Position,
    pub sealed_now: Position,
}

impl Verdict {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }
}

/// Verifies one partition from its first record to its end.
pub fn verify_partition(
    log: &dyn Log,
    partition: PartitionId,
    options: &VerifyOptions,
    progress: &AtomicU64,
) -> Result<Verdict, AuditError> {
    let seal = Seal::load(&options.audit_dir, partition)?;
    let references = options
        .snapshot_root
        .as_ref()
        .map(|root| References::load(root, partition))
        .unwrap_or_default();
    let mut c = Checker::new(log.partitions(), partition, options, seal, &references);
    let mut damaged = false;
    let end = match &options.file_root {
        Some(root) => {
            let raw = super::scan::scan_partition(root, partition, |pos, rec| {
                c.record(pos, &rec);
                progress.fetch_add(1, Ordering::Relaxed);
            })?;
            damaged = raw.findings.iter().any(|f| f.error);
            for f in raw.findings {
                let where_ = format!("{} byte {}", f.path.display(), f.offset);
                c.find(
                    f.position,
                    if f.error {
                        Severity::Error
                    } else {
                        Severity::Warning
                    },
                    "frame",
                    format!("{} ({where_})", f.message),
                );
            }
            raw.end
        }
        None => {
            let end = log.end(partition)?;
            let mut reader = log.reader(partition, log.start(partition)?)?;
            let mut idle = 0;
            while reader.position() < end {
                let batch = reader.poll(16_384, Duration::from_millis(200))?;
                if batch.is_empty() {
                    idle += 1;
                    if idle > 50 {
                        break;
                    }
                    continue;
                }
                idle = 0;
                for rec in batch.into_iter().filter(|r| r.position < end) {
                    c.record(rec.position, &rec.record);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
            c.next
        }
    };
    c.finish(end, options, damaged)
}

/// The running checks over one partition.
struct Checker<'a> {
    partitions: u32,
    partition: PartitionId,
    skew_ms: u64,
    now: Timestamp,
    next: Position,
    records: u64,
    chain: HashChain,
    state: State,
    seal: Option<Seal>,
    seal_mismatches: u64,
    /// Hashes of records past the seal's end, for extending it.
    new_hashes: Vec<u32>,
    seal_heads: BTreeMap<Position, Digest>,
    references: &'a References,
    next_reference: usize,
    references_checked: usize,
    /// The last position whose reference agreed (genesis always does).
    last_agreed: Position,
    first_disagreed: Option<Position>,
    /// Command positions and the task their answer must name.
    commands: FxHashMap<u64, TaskId>,
    answered: FxHashSet<u64>,
    namespaces: FxHashMap<TaskId, bytes::Bytes>,
    last_engine_at: Option<Timestamp>,
    /// No position was skipped (a seal needs contiguous positions).
    contiguous: bool,
    findings: Vec<Finding>,
}

impl<'a> Checker<'a> {
    fn new(
        partitions: u32,
        partition: PartitionId,
        options: &VerifyOptions,
        seal: Option<Seal>,
        references: &'a References,
    ) -> Self {
        Checker {
            partitions,
            partition,
            skew_ms: options.clock_skew_ms,
            now: options.now,
            next: Position(0),
            records: 0,
            chain: HashChain::genesis(partition),
            state: State::new(options.retention_ms),
            seal,
            seal_mismatches: 0,
            new_hashes: Vec::new(),
            seal_heads: BTreeMap::new(),
            references,
            next_reference: 0,
            references_checked: 0,
            last_agreed: Position(0),
            first_disagreed: None,
            commands: FxHashMap::default(),
            answered: FxHashSet::default(),
            namespaces: FxHashMap::default(),
            last_engine_at: None,
            contiguous: true,
            findings: Vec::new(),
        }
    }

    fn find(&mut self, position: Position, severity: Severity, check: &'static str, m: String) {
        self.findings.push(Finding {
            position,
            severity,
            check,
            message: m,
        });
    }

    fn seal_end(&self) -> Position {
        self.seal.as_ref().map_or(Position(0), Seal::end)
    }

    /// Compares everything known about the state after the records before `at`.
    fn check_references(&mut self, at: Position) {
        let refs = self.references;
        while let Some(r) = refs.points.get(self.next_reference) {
            if r.position > at {
                break;
            }
            self.next_reference += 1;
            if r.position < at {
                continue; // a position the log skips (Kafka)
            }
            self.references_checked += 1;
            let chain = self.chain.head();
            if chain != r.chain {
                self.disagree(at);
                self.find(
                    at,
                    Severity::Error,
                    "chain",
                    format!(
                        "the chain head after the records before {at} is {chain}, but {} says {}: a record before {at} was changed, dropped, added or moved",
                        r.source, r.chain
                    ),
                );
            } else {
                let digest = self.state.digest();
                if digest != r.digest {
                    self.disagree(at);
                    self.find(
                        at,
                        Severity::Error,
                        "digest",
                        format!(
                            "the records before {at} are those the engine wrote (the chain agrees) but fold to digest {digest}, not {} as {} says: the fold is not deterministic across versions",
                            r.digest, r.source
                        ),
                    );
                } else if self.first_disagreed.is_none() {
                    self.last_agreed = at;
                }
            }
        }
        if let Some(seal) = &self.seal
            && let Some(e) = seal.entries.iter().find(|e| e.end() == at)
        {
            let expected = e.chain_after;
            let chain = self.chain.head();
            self.references_checked += 1;
            if chain != expected {
                self.disagree(at);
                self.find(
                    at,
                    Severity::Error,
                    "seal",
                    format!(
                        "the chain head after the records before {at} is {chain}, but the seal says {expected}"
                    ),
                );
            } else if self.first_disagreed.is_none() {
                self.last_agreed = at;
            }
        }
    }

    fn disagree(&mut self, at: Position) {
        if self.first_disagreed.is_none() {
            self.first_disagreed = Some(at);
        }
    }

    fn record(&mut self, position: Position, rec: &Record) {
        if position != self.next {
            self.contiguous = false;
            self.find(
                position,
                Severity::Warning,
                "positions",
                format!("positions jump from {} to {position}", self.next),
            );
        }
        self.check_references(position);
        self.records += 1;
        self.next = position.next();
        self.chain.push(&rec.payload);
        let hash = record_hash(rec);
        match &self.seal {
            Some(seal) if position < seal.end() => {
                if seal.hash_at(position).is_some_and(|sealed| sealed != hash) {
                    self.seal_mismatches += 1;
                    if self.seal_mismatches == 1 {
                        self.find(
                            position,
                            Severity::Error,
                            "seal",
                            "the record differs from the one sealed at this position (changed, or another record moved here)".into(),
                        );
                    }
                }
            }
            _ => self.new_hashes.push(hash),
        }
        let seal_end = self.seal_end();
        if position.next().0 > seal_end.0
            && ((position.next().0 - seal_end.0).is_multiple_of(MAX_ENTRY as u64))
        {
            self.seal_heads.insert(position.next(), self.chain.head());
        }
        self.check_record(position, rec);
    }

    fn check_record(&mut self, position: Position, rec: &Record) {
        let headers = &rec.headers;
        let engine_written = matches!(headers.kind, Some(Kind::Event) | Some(Kind::Control));
        let decoded = if engine_written {
            match codec::decode(&rec.payload) {
                Ok(env) => env,
                Err(e) => {
                    self.find(
                        position,
                        Severity::Error,
                        "decode",
                        format!("an engine-written record that does not decode: {e}"),
                    );
                    return;
                }
            }
        } else {
            let fallback = JsonFallback {
                task_id: derive_task_id(self.partition, self.partitions, position, rec.timestamp),
                at: rec.timestamp,
            };
            match codec::decode_any(headers.content_type, &rec.payload, &fallback) {
                Ok(env) => env,
                Err(_) => {
                    // Garbage from a client: the engine answers it with task.rejected.
                    let task = if rec.key.is_nil() {
                        TaskId::NIL
                    } else {
                        rec.key
                    };
                    self.commands.insert(position.0, task);
                    return;
                }
            }
        };
        self.check_headers(position, rec, &decoded);
        match &decoded.body {
            Body::Command(_) => {
                self.commands.insert(position.0, decoded.task_id);
            }
            Body::Event(_) | Body::Control(_) => {
                if !engine_written {
                    self.find(
                        position,
                        Severity::Warning,
                        "headers",
                        format!(
                            "a {} record without the headers of an engine-written one",
                            decoded.record_type()
                        ),
                    );
                    return;
                }
                self.check_answer(position, &decoded);
                self.check_time(position, decoded.at);
                match self.state.apply(&decoded) {
                    Applied::Anomaly(e) => self.find(
                        position,
                        Severity::Error,
                        "fold",
                        format!(
                            "the {} does not fit the state the log folds to before it: {e}",
                            decoded.record_type()
                        ),
                    ),
                    Applied::Event
                    | Applied::Control
                    | Applied::Command
                    | Applied::Fenced { .. } => {}
                }
            }
        }
        if let Body::Event(crate::record::Event::TaskAccepted(a)) = &decoded.body {
            self.namespaces.insert(
                decoded.task_id,
                bytes::Bytes::from(a.request.namespace.clone()),
            );
        }
    }

    fn check_headers(&mut self, position: Position, rec: &Record, env: &Envelope) {
        let h = &rec.headers;
        let mut wrong = Vec::new();
        if let Some(kind) = h.kind
            && kind != env.kind()
        {
            wrong.push(format!(
                "kind {} (the body is a {})",
                kind.as_str(),
                env.kind().as_str()
            ));
        }
        if let Some(t) = h.record_type
            && t != env.record_type()
        {
            wrong.push(format!("type {t} (the body is {})", env.record_type()));
        }
        if h.content_type == ContentType::Bincode {
            if rec.key != env.task_id {
                wrong.push(format!(
                    "key {} (the body's task is {})",
                    rec.key, env.task_id
                ));
            }
            if rec.timestamp != env.at {
                wrong.push(format!("time {} (the body says {})", rec.timestamp, env.at));
            }
            if h.schema != 0
                && h.schema != codec::peek_schema(&rec.payload).unwrap_or(SCHEMA_VERSION)
            {
                wrong.push(format!("schema {}", h.schema));
            }
        }
        if let Some(ns) = &h.namespace {
            let expected = match &env.body {
                Body::Command(Command::RequestTask(r)) => Some(r.namespace.as_bytes().to_vec()),
                Body::Event(crate::record::Event::TaskAccepted(a)) => {
                    Some(a.request.namespace.as_bytes().to_vec())
                }
                _ => self.namespaces.get(&env.task_id).map(|b| b.to_vec()),
            };
            if let Some(expected) = expected
                && expected[..] != ns[..]
            {
                wrong.push(format!(
                    "namespace `{}` (the task's is `{}`)",
                    String::from_utf8_lossy(ns),
                    String::from_utf8_lossy(&expected)
                ));
            }
        }
        if !wrong.is_empty() {
            self.find(
                position,
                Severity::Error,
                "headers",
                format!("the headers say {}", wrong.join(", ")),
            );
        }
    }

    fn check_answer(&mut self, position: Position, env: &Envelope) {
        let Some(source) = env.source_position else {
            return;
        };
        if source >= position {
            self.find(
                position,
                Severity::Error,
                "source_position",
                format!(
                    "the {} answers position {source}, which is not before it (a record before it is missing, or it was moved)",
                    env.record_type()
                ),
            );
            return;
        }
        match self.commands.get(&source.0) {
            None => self.find(
                position,
                Severity::Error,
                "source_position",
                format!(
                    "the {} answers position {source}, which holds no command (a record between them is missing or was moved)",
                    env.record_type()
                ),
            ),
            Some(task) if *task != env.task_id && !task.is_nil() => {
                let task = *task;
                self.find(
                    position,
                    Severity::Error,
                    "source_position",
                    format!(
                        "the {} of task {} answers position {source}, a command of task {task} (records were dropped or moved)",
                        env.record_type(),
                        env.task_id
                    ),
                );
            }
            Some(_) => {
                self.answered.insert(source.0);
            }
        }
    }

    fn check_time(&mut self, position: Position, at: Timestamp) {
        if at.as_millis() > self.now.as_millis().saturating_add(24 * 3600 * 1000) {
            self.find(
                position,
                Severity::Warning,
                "time",
                format!("stamped {at}, more than a day in the future"),
            );
        }
        if let Some(prev) = self.last_engine_at
            && at.saturating_add_ms(self.skew_ms) < prev
        {
            self.find(
                position,
                Severity::Warning,
                "time",
                format!(
                    "stamped {at}, {} ms before the previous engine record ({prev}): reordered records, or the engine's clock went back",
                    prev.millis_since(at)
                ),
            );
        }
        self.last_engine_at = Some(self.last_engine_at.map_or(at, |p| p.max(at)));
    }

    /// `damaged`: reading stopped at damage (the log goes on, unreadably).
    fn finish(
        mut self,
        end: Position,
        options: &VerifyOptions,
        damaged: bool,
    ) -> Result<Verdict, AuditError> {
        let references = self.references;
        self.check_references(end);
        let sealed_before = self.seal_end();
        if sealed_before > end && !damaged {
            self.find(
                end,
                Severity::Error,
                "seal",
                format!(
                    "the log ends at {end} but records up to {sealed_before} were sealed: the records from {end} on were removed"
                ),
            );
        }
        if !damaged && let Some(r) = references.points.iter().rev().find(|r| r.position > end) {
            self.find(
                end,
                Severity::Error,
                "chain",
                format!(
                    "the log ends at {end} but the engine checkpointed position {} ({}): the records from {end} on were removed",
                    r.position, r.source
                ),
            );
        }
        if self.seal_mismatches > 1 {
            let n = self.seal_mismatches;
            if let Some(f) = self.findings.iter_mut().find(|f| f.check == "seal") {
                f.message
                    .push_str(&format!("; {n} sealed records differ in all"));
            }
        }
        // A command left unanswered while a later one was answered.
        if let Some(&last) = self.answered.iter().max() {
            let mut unanswered: Vec<u64> = self
                .commands
                .keys()
                .copied()
                .filter(|q| *q < last && !self.answered.contains(q))
                .collect();
            unanswered.sort_unstable();
            if let Some(&q) = unanswered.first() {
                self.find(
                    Position(q),
                    Severity::Warning,
                    "answers",
                    format!(
                        "the command at {q} has no answer although commands up to {last} were answered ({} such commands): its events may have been dropped",
                        unanswered.len()
                    ),
                );
            }
        }
        let covered_until = references
            .points
            .iter()
            .map(|r| r.position)
            .filter(|p| *p <= end)
            .max()
            .unwrap_or(Position(0))
            .max(sealed_before.min(end));
        self.findings.sort_by_key(|f| (f.position, f.severity));
        let first_error = self
            .findings
            .iter()
            .find(|f| f.severity == Severity::Error)
            .map(|f| f.position);
        let window = self.first_disagreed.map(|to| (self.last_agreed, to));
        let mut sealed_now = sealed_before;
        if options.seal && self.contiguous && first_error.is_none() && end > sealed_before {
            let chain = self.chain.head();
            self.seal_heads.insert(end, chain);
            let heads = &self.seal_heads;
            Seal::extend(
                &options.audit_dir,
                self.partition,
                sealed_before,
                &self.new_hashes,
                |at| heads.get(&at).copied(),
            )?;
            sealed_now = end;
        }
        Ok(Verdict {
            partition: self.partition,
            end,
            records: self.records,
            chain: self.chain.head(),
            digest: self.state.digest(),
            findings: self.findings,
            first_error,
            window,
            references_checked: self.references_checked,
            reference_problems: references.problems.clone(),
            covered_until,
            sealed_before,
            sealed_now,
        })
    }
}
