//! `tasker audit verify` (is the log the one the engine wrote? where not?) and
//! `tasker audit task` (a task's history and its state at any point).

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::json;
use tasker_engine::audit::history::task_history;
use tasker_engine::audit::verify::{Severity, Verdict, VerifyOptions, verify_partition};
use tasker_engine::config::Backend;
use tasker_engine::log::Log;
use tasker_engine::record::{TaskId, Timestamp};

use crate::cli::{AuditTaskArgs, AuditVerifyArgs, Cli};
use crate::failure::WithHint;
use crate::replay::{partitions, run_partitions};
use crate::views::TaskJson;
use crate::wiring::Setup;

/// How far an engine record's time may go back before it is reported.
const CLOCK_SKEW_MS: u64 = 5_000;
/// Findings printed per partition (all are in `--json`).
const SHOWN: usize = 20;

pub fn verify(cli: &Cli, args: &AuditVerifyArgs) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let log: Arc<dyn Log> = setup.open_log_for_reading()?;
    let parts = partitions(&*log, args.partition)?;
    let data = &setup.config.data_dir;
    let options = VerifyOptions {
        file_root: (setup.config.log.backend == Backend::File).then(|| setup.log_dir()),
        snapshot_root: Some(data.join("snapshots")),
        audit_dir: data.join("audit"),
        retention_ms: setup.resolved.retention.as_millis() as u64,
        seal: !args.no_seal,
        clock_skew_ms: CLOCK_SKEW_MS,
        now: Timestamp::now(),
    };
    let mut total = 0;
    for p in &parts {
        total += log.end(*p)?.0;
    }
    let results = run_partitions(cli, &parts, total, "records", |p, progress| {
        Ok(verify_partition(&*log, p, &options, progress)?)
    });
    let mut verdicts = Vec::new();
    for r in results {
        verdicts.push(r.hint("the audit could not read what is named above")?);
    }
    let errors: usize = verdicts.iter().map(Verdict::errors).sum();
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ok": errors == 0,
                "partitions": verdicts.iter().map(verdict_json).collect::<Vec<_>>(),
            }))?
        );
    } else {
        for v in &verdicts {
            print!("{}", verdict_text(v));
        }
    }
    if errors > 0 {
        let first: Vec<String> = verdicts
            .iter()
            .filter_map(|v| {
                v.first_error
                    .map(|p| format!("partition {} position {p}", v.partition))
            })
            .collect();
        return Err(anyhow::anyhow!(
            "the log differs from what the engine wrote: first at {}",
            first.join(", ")
        ))
        .hint("see docs/audit.md for what each check means; restore the log from a backup taken before the change");
    }
    Ok(())
}

fn verdict_json(v: &Verdict) -> serde_json::Value {
    json!({
        "partition": v.partition.0,
        "end": v.end.0,
        "records": v.records,
        "chain": v.chain.to_hex(),
        "digest": v.digest.to_hex(),
        "errors": v.errors(),
        "first_error": v.first_error.map(|p| p.0),
        "window": v.window.map(|(a, b)| json!({"from": a.0, "to": b.0})),
        "references_checked": v.references_checked,
        "reference_problems": v.reference_problems,
        "covered_until": v.covered_until.0,
        "sealed_before": v.sealed_before.0,
        "sealed_now": v.sealed_now.0,
        "findings": v.findings,
    })
}

fn verdict_text(v: &Verdict) -> String {
    let mut out = String::new();
    let errors = v.errors();
    let warnings = v.findings.len() - errors;
    let _ = writeln!(
        out,
        "partition {}: {} records, chain {} — {}",
        v.partition,
        v.records,
        v.chain,
        match v.first_error {
            None => format!(
                "OK ({} reference points agree{})",
                v.references_checked,
                if warnings > 0 {
                    format!(", {warnings} warning(s)")
                } else {
                    String::new()
                }
            ),
            Some(p) => format!("CHANGED: first wrong at position {p}"),
        }
    );
    if let Some((from, to)) = v.window {
        let _ = writeln!(
            out,
            "  the first change is a record at a position in [{from}, {to}): the chain agreed with the engine's records at {from} and not at {to}"
        );
    }
    for f in v.findings.iter().take(SHOWN) {
        let _ = writeln!(
            out,
            "  {} {:>10} {:<15} {}",
            match f.severity {
                Severity::Error => "error  ",
                Severity::Warning => "warning",
            },
            f.position.0,
            f.check,
            f.message
        );
    }
    if v.findings.len() > SHOWN {
        let _ = writeln!(out, "  ... {} more (see --json)", v.findings.len() - SHOWN);
    }
    for p in &v.reference_problems {
        let _ = writeln!(out, "  reference problem: {p}");
    }
    if v.covered_until < v.end {
        let _ = writeln!(
            out,
            "  records {}..{} are after the last checkpoint and seal: only their consistency was checked",
            v.covered_until, v.end
        );
    }
    if v.sealed_now > v.sealed_before {
        let _ = writeln!(
            out,
            "  sealed records {}..{} (a later change to them is named exactly)",
            v.sealed_before, v.sealed_now
        );
    }
    out
}

pub fn task(cli: &Cli, args: &AuditTaskArgs) -> anyhow::Result<()> {
    let task: TaskId = args
        .task
        .parse()
        .map_err(anyhow::Error::from)
        .hint("task ids are UUIDs, as printed by `tasker submit`")?;
    let setup = Setup::load(cli)?;
    let log = setup.open_log_for_reading()?;
    let index_dir = setup.config.data_dir.join("audit");
    let history = task_history(
        &*log,
        (!args.no_index).then_some(index_dir.as_path()),
        task,
        args.at,
    )?;
    if history.entries.is_empty() && history.later == 0 {
        return Err(anyhow::anyhow!(
            "task {task} is not in the log (partition {})",
            history.partition
        ))
        .hint("check the id, and --data-dir / --config");
    }
    let state = history.state.as_ref().map(TaskJson::from_state);
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "task_id": task.to_string(),
                "partition": history.partition.0,
                "as_of": history.as_of.0,
                "at": args.at.map(|b| b.to_string()),
                "history": history.entries,
                "later_records": history.later,
                "state": state,
            }))?
        );
        return Ok(());
    }
    println!(
        "task {task}  partition {}  as of position {}{}",
        history.partition,
        history.as_of,
        args.at.map(|b| format!(" ({b})")).unwrap_or_default()
    );
    println!();
    println!(
        "  {:>10}  {:24}  {:24}  {:22}  WHAT",
        "POSITION", "TIME", "TYPE", "WHO"
    );
    for e in &history.entries {
        println!(
            "  {:>10}  {:24}  {:24}  {:22}  {}{}",
            e.position.0,
            e.at.to_string(),
            e.record_type.map_or("?", |t| t.name()),
            e.who.as_deref().unwrap_or("-"),
            e.summary,
            e.note
                .as_deref()
                .map(|n| format!("  [{n}]"))
                .unwrap_or_default()
        );
    }
    if history.later > 0 {
        println!("  ... {} later record(s) not shown", history.later);
    }
    println!();
    match state {
        Some(s) => print!("{}", s.to_text()),
        None => println!("the task did not exist at that point"),
    }
    Ok(())
}
