//! `tasker replay`: refolds the log, partitions in parallel, with a progress bar;
//! prints each partition's state digest and hash-chain head at its end position
//! (comparable with `tasker status --digest`), and with `--verify` compares them
//! with every snapshot and chain checkpoint the engine wrote.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tasker_engine::audit::Bound;
use tasker_engine::audit::checkpoints::References;
use tasker_engine::audit::replay::{ReplayOptions, ReplayReport, compare, replay_partition_state};
use tasker_engine::log::Log;
use tasker_engine::record::PartitionId;

use crate::cli::{Cli, ReplayArgs};
use crate::failure::WithHint;
use crate::wiring::Setup;

/// The partitions a command works on: all, or the one asked for.
pub fn partitions(log: &dyn Log, only: Option<u32>) -> anyhow::Result<Vec<PartitionId>> {
    match only {
        Some(p) if p < log.partitions() => Ok(vec![PartitionId(p)]),
        Some(p) => Err(anyhow::anyhow!(
            "partition {p} does not exist (the log has {})",
            log.partitions()
        ))
        .hint("partitions are numbered from 0"),
        None => Ok((0..log.partitions()).map(PartitionId).collect()),
    }
}

/// Runs `work` for every partition on a few threads, showing `total` records of
/// progress (counted by `work` in the counter it gets); results in partition order.
pub fn run_partitions<T: Send>(
    cli: &Cli,
    partitions: &[PartitionId],
    total: u64,
    unit: &str,
    work: impl Fn(PartitionId, &AtomicU64) -> anyhow::Result<T> + Sync,
) -> Vec<anyhow::Result<T>> {
    let bar = if cli.json || total == 0 {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(total);
        let template = format!(
            "{{spinner}} {{bar:40}} {{human_pos}}/{{human_len}} {unit}  {{per_sec}}  eta {{eta}}"
        );
        pb.set_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    };
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(partitions.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let progress = AtomicU64::new(0);
    let results: Mutex<Vec<Option<anyhow::Result<T>>>> =
        Mutex::new((0..partitions.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&p) = partitions.get(i) else { break };
                    let r = work(p, &progress);
                    if let Ok(mut all) = results.lock() {
                        all[i] = Some(r);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while done.load(Ordering::Relaxed) < partitions.len() {
            bar.set_position(progress.load(Ordering::Relaxed).min(total));
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    bar.set_position(progress.load(Ordering::Relaxed).min(total));
    bar.finish_and_clear();
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("a worker thread panicked"))))
        .collect()
}

pub fn replay(cli: &Cli, args: &ReplayArgs) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let log = setup.open_log_for_reading()?;
    let parts = partitions(&*log, args.partition)?;
    let snapshots = setup.config.data_dir.join("snapshots");
    let references: Vec<References> = parts
        .iter()
        .map(|p| {
            if args.verify {
                References::load(&snapshots, *p)
            } else {
                References::default()
            }
        })
        .collect();
    let mut total = 0;
    for p in &parts {
        let end = log.end(*p)?.0;
        total += match args.to {
            Some(Bound::Position(to)) => end.min(to.0),
            _ => end,
        };
    }
    let retention_ms = setup.resolved.retention.as_millis() as u64;
    // Partitions run in parallel; with fewer partitions than cores each also
    // reads and chains on a second thread.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pipeline = parts.len() < cores;
    let started = Instant::now();
    let log: Arc<dyn Log> = log;
    let results = run_partitions(cli, &parts, total, "records", |p, progress| {
        let i = parts.iter().position(|x| *x == p).unwrap_or(0);
        let options = ReplayOptions {
            to: args.to,
            retention_ms,
            capture: references[i].points.iter().map(|r| r.position).collect(),
            pipeline,
            ..ReplayOptions::default()
        };
        let (report, state) = replay_partition_state(&*log, p, &options, progress)?;
        // The process exits right after: freeing the state would only cost time.
        std::mem::forget(state);
        Ok(report)
    });
    let secs = started.elapsed().as_secs_f64();
    let mut reports: Vec<ReplayReport> = Vec::new();
    for r in results {
        reports.push(
            r.hint("the log could not be read where named; `tasker audit verify` checks it")?,
        );
    }
    let records: u64 = reports.iter().map(|r| r.records).sum();
    let events: u64 = reports.iter().map(|r| r.events).sum();
    let mut disagreements = 0;
    let mut out = Vec::new();
    for (report, refs) in reports.iter().zip(&references) {
        let comparisons = compare(report, &refs.points);
        let first_bad = comparisons
            .iter()
            .find(|c| c.replayed.is_some() && !c.agrees());
        if first_bad.is_some() {
            disagreements += 1;
        }
        if cli.json {
            out.push(json!({
                "partition": report.partition.0,
                "position": report.end.0,
                "digest": report.digest.to_hex(),
                "chain": report.chain.to_hex(),
                "records": report.records,
                "events": report.events,
                "tasks_in_memory": report.tasks_in_memory,
                "anomalies": report.stats.anomalies,
                "fenced": report.stats.fenced,
                "undecodable": report.undecodable,
                "last_time": report.last_time.map(|t| t.to_string()),
                "verify": args.verify.then(|| json!({
                    "references": comparisons.iter().map(|c| json!({
                        "position": c.reference.position.0,
                        "source": c.reference.source,
                        "reached": c.replayed.is_some(),
                        "chain_agrees": c.replayed.map(|r| r.chain == c.reference.chain),
                        "digest_agrees": c.replayed.map(|r| r.digest == c.reference.digest),
                    })).collect::<Vec<_>>(),
                    "first_disagreement": first_bad.map(|c| c.reference.position.0),
                    "problems": refs.problems,
                })),
            }));
            continue;
        }
        println!(
            "partition {} position {} digest {} chain {} ({} records, {} events, {} tasks in memory)",
            report.partition,
            report.end,
            report.digest,
            report.chain,
            report.records,
            report.events,
            report.tasks_in_memory
        );
        if report.stats.anomalies > 0 || report.undecodable > 0 {
            println!(
                "  {} events did not fit the state and {} did not decode (ignored, as the engine does); `tasker audit verify` names them",
                report.stats.anomalies, report.undecodable
            );
        }
        if args.verify {
            print_verification(report, refs, &comparisons);
        }
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "partitions": out,
                "records": records,
                "events": events,
                "seconds": secs,
                "records_per_s": records as f64 / secs.max(1e-9),
            }))?
        );
    } else {
        println!(
            "replayed {records} records ({events} events) in {secs:.2} s: {:.0} records/s",
            records as f64 / secs.max(1e-9)
        );
    }
    if disagreements > 0 {
        return Err(anyhow::anyhow!(
            "{disagreements} partition(s) disagree with the engine's snapshots"
        ))
        .hint("`tasker audit verify` names the changed, dropped or moved record");
    }
    Ok(())
}

fn print_verification(
    report: &ReplayReport,
    refs: &References,
    comparisons: &[tasker_engine::audit::replay::Comparison],
) {
    for problem in &refs.problems {
        println!("  warning: {problem}");
    }
    if comparisons.is_empty() {
        println!("  no snapshots or checkpoints to compare with");
        return;
    }
    let reached: Vec<_> = comparisons
        .iter()
        .filter(|c| c.replayed.is_some())
        .collect();
    match reached.iter().find(|c| !c.agrees()) {
        None => println!(
            "  agrees with {} snapshot/checkpoint positions (up to {})",
            reached.len(),
            reached
                .last()
                .map_or("-".into(), |c| c.reference.position.to_string())
        ),
        Some(c) => {
            let Some(r) = c.replayed else { return };
            let what = match (r.chain == c.reference.chain, r.digest == c.reference.digest) {
                (false, _) => format!(
                    "the chain head is {} but the {} says {}: a record before {} differs from what the engine wrote",
                    r.chain, c.reference.source, c.reference.chain, r.position
                ),
                (true, _) => format!(
                    "the records are the same but fold to digest {}, not {} as the {} says",
                    r.digest, c.reference.digest, c.reference.source
                ),
            };
            let last_good = reached
                .iter()
                .take_while(|x| x.agrees())
                .last()
                .map_or("the start".into(), |x| {
                    format!("position {}", x.reference.position)
                });
            println!(
                "  DISAGREES first at position {} (after agreeing up to {last_good}): {what}",
                c.reference.position
            );
        }
    }
    let unreached = comparisons.len() - reached.len();
    if unreached > 0 {
        println!(
            "  {unreached} reference(s) lie beyond position {} and were not compared",
            report.end
        );
    }
}
