//! `submit`, `status`, `cancel`, `retry`, `resolve`: sent to the running engine's
//! API when one runs for this data directory; otherwise appended to the embedded
//! log directly (the next `tasker run` decides them) or read from it.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tasker_engine::codec;
use tasker_engine::log::{Log, partition_for_task};
use tasker_engine::record::{
    CancelTask, Command, CorrelationId, Envelope, Position, RawJson, RequestTask, ResolveStep,
    RetryTask, TaskId, Timestamp,
};
use tasker_engine::runtime::{new_task_id, to_record};
use tasker_engine::state::State;

use crate::cli::{Cli, ResolveArgs, StatusArgs, SubmitArgs, TaskCommandArgs};
use crate::client::{Answer, ApiClient, find_running};
use crate::failure::WithHint;
use crate::views::TaskJson;
use crate::wiring::Setup;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn read_json_arg(text: &str, what: &str) -> anyhow::Result<RawJson> {
    let text = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {what} from {path}"))?
        }
        None => text.to_owned(),
    };
    RawJson::parse(&text)
        .map_err(anyhow::Error::from)
        .hint(format!(
            "{what} must be JSON, e.g. '{{\"order_id\": 1}}', or @file.json"
        ))
}

/// `ns/name@version` into its parts.
fn parse_template_ref(s: &str) -> anyhow::Result<(String, String, Option<String>)> {
    let (path, version) = match s.split_once('@') {
        Some((p, v)) => (p, Some(v.to_owned())),
        None => (s, None),
    };
    match path.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_owned(), name.to_owned(), version))
        }
        _ => Err(anyhow::anyhow!("`{s}` is not namespace/name[@version]"))
            .hint("e.g. tasker submit shop/order@1.0.0 --context '{\"order_id\": 1, \"amount_cents\": 100}'"),
    }
}

fn parse_task(id: &str) -> anyhow::Result<TaskId> {
    id.parse::<TaskId>()
        .map_err(anyhow::Error::from)
        .hint("task ids are UUIDs, as printed by `tasker submit`")
}

pub fn submit(cli: &Cli, args: &SubmitArgs) -> anyhow::Result<()> {
    let (namespace, name, version) = parse_template_ref(&args.template)?;
    let context = read_json_arg(&args.context, "--context")?;
    let request = RequestTask {
        namespace,
        name,
        version,
        context,
        idempotency_key: args.idempotency_key.clone(),
        initiator: args.initiator.clone(),
        source_system: Some("tasker-cli".into()),
        reason: args.reason.clone(),
        tags: args.tags.clone(),
    };
    let setup = Setup::load(cli)?;
    if let Some(run) = find_running(&setup.config.data_dir) {
        let client = ApiClient::new(&run.api);
        let body = json!({
            "namespace": request.namespace, "name": request.name, "version": request.version,
            "context": request.context.to_value(), "idempotency_key": request.idempotency_key,
            "initiator": request.initiator, "source_system": request.source_system,
            "reason": request.reason, "tags": request.tags,
        });
        let rt = runtime()?;
        return rt.block_on(async {
            let answer = client.post("/v1/tasks", &body).await.hint(format!(
                "`tasker run` (pid {}) does not answer at {}; is it still starting?",
                run.pid, run.api
            ))?;
            let task_id = print_answer(cli, answer)?;
            if args.wait {
                let task = wait_terminal(&client, &task_id).await?;
                print_task(cli, &task)?;
            }
            Ok(())
        });
    }
    if args.wait {
        return Err(anyhow::anyhow!("--wait needs a running engine"))
            .hint("start `tasker run` first");
    }
    let log = setup.open_log()?;
    let task_id = new_task_id(
        &request.namespace,
        request.idempotency_key.as_deref(),
        log.partitions(),
    );
    let env = Envelope::command(
        task_id,
        CorrelationId::generate(),
        Timestamp::now(),
        Command::RequestTask(request),
    );
    append_directly(cli, log.as_ref(), env)
}

/// With no engine running, records the command in the log for the next `tasker run`.
fn append_directly(cli: &Cli, log: &dyn Log, env: Envelope) -> anyhow::Result<()> {
    let partition = partition_for_task(env.task_id, log.partitions());
    let mut writer = log
        .writer(partition)
        .map_err(crate::wiring::explain_log_error)?;
    let ns = match &env.body {
        tasker_engine::record::Body::Command(Command::RequestTask(r)) => {
            Some(bytes::Bytes::from(r.namespace.clone()))
        }
        _ => None,
    };
    let record = to_record(&env, ns, &mut Vec::new())?;
    let position = writer.append(&[record])?[0];
    if cli.json {
        println!(
            "{}",
            json!({"status": "recorded", "task_id": env.task_id.to_string(), "partition": partition.0, "position": position.0})
        );
    } else {
        println!(
            "recorded {} for task {} at partition {partition} position {position}",
            env.record_type(),
            env.task_id
        );
        println!("no engine is running: it will be decided when `tasker run` starts");
    }
    Ok(())
}

fn print_answer(cli: &Cli, answer: Answer) -> anyhow::Result<String> {
    match answer {
        Answer::Ok(a) => {
            if cli.json {
                println!("{}", serde_json::to_string(&a)?);
            } else if a.status == "duplicate" {
                println!(
                    "{} (idempotency key already used; existing task)",
                    a.task_id
                );
            } else {
                println!("{}", a.task_id);
            }
            Ok(a.task_id)
        }
        Answer::Refused(p) => {
            if cli.json {
                println!("{}", serde_json::to_string(&p)?);
            }
            let mut msg = p.detail.clone();
            for d in &p.details {
                msg.push_str(&format!("\n  {d}"));
            }
            Err(anyhow::anyhow!("{msg}")).hint(match p.reason.as_deref() {
                Some("unknown_template") | Some("unknown_version") => {
                    "`tasker templates list` shows what is installed"
                }
                Some("invalid_context") => "fix the context to match the template's context_schema",
                Some("invalid_transition") => {
                    "`tasker status <task>` shows the task's current state"
                }
                _ => "see `tasker status <task>`",
            })
        }
    }
}

async fn wait_terminal(client: &ApiClient, task_id: &str) -> anyhow::Result<TaskJson> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(t) = client.task(task_id).await?
            && !matches!(t.status.as_str(), "pending" | "in_progress")
        {
            return Ok(t);
        }
        if Instant::now() > deadline {
            anyhow::bail!("task {task_id} is still running after 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_task(cli: &Cli, task: &TaskJson) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(task)?);
    } else {
        print!("{}", task.to_text());
    }
    Ok(())
}

pub fn status(cli: &Cli, args: &StatusArgs) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let running = find_running(&setup.config.data_dir);
    if args.digest || args.task.is_none() {
        let run = running
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no engine is running for {}",
                    setup.config.data_dir.display()
                )
            })
            .hint("`tasker status` without a task reports a live engine; start `tasker run`, or give a task id")?;
        let client = ApiClient::new(&run.api);
        let (digests, projector) = runtime()?
            .block_on(async { anyhow::Ok((client.digests().await?, client.projector().await?)) })?;
        if cli.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"partitions": digests, "projector": projector})
                )?
            );
        } else {
            for d in &digests {
                println!(
                    "partition {} position {} digest {} chain {} ({} records, {} tasks in memory)",
                    d.partition, d.position, d.digest, d.chain, d.records, d.tasks_in_memory
                );
            }
            for p in &projector {
                println!(
                    "read model partition {} at {}: {} records / {:.1} s behind, {} events, {} retries",
                    p.partition, p.position, p.lag_records, p.lag_seconds, p.events, p.retries
                );
                if let Some(e) = &p.error {
                    println!("read model partition {} STOPPED: {e}", p.partition);
                }
            }
        }
        return Ok(());
    }
    let id = args
        .task
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("which task?"))
        .hint("tasker status <task-id>, or tasker status --digest")?;
    let task_id = parse_task(id)?;
    if let Some(run) = running {
        let answer = runtime()?.block_on(ApiClient::new(&run.api).task(id))?;
        if let Ok(task) = answer {
            return print_task(cli, &task);
        }
    }
    // No engine (or the task left its memory): fold the task's partition from the log.
    let log = setup.open_log_for_reading()?;
    let state = fold_partition(&*log, partition_for_task(task_id, log.partitions()))?;
    let task = state
        .task(&task_id)
        .ok_or_else(|| anyhow::anyhow!("task {task_id} is not in the log"))
        .hint("check the id, and --data-dir / --config")?;
    print_task(cli, &TaskJson::from_state(task))
}

/// Every event of a partition folded, keeping finished tasks (no retention).
pub fn fold_partition(
    log: &dyn Log,
    partition: tasker_engine::record::PartitionId,
) -> anyhow::Result<State> {
    let mut state = State::new(u64::MAX);
    let end = log.end(partition)?;
    let mut reader = log.reader(partition, Position(0))?;
    while reader.position() < end {
        let batch = reader.poll(65_536, Duration::from_millis(100))?;
        if batch.is_empty() {
            break;
        }
        for rec in batch {
            if let Ok(env) = codec::decode(&rec.record.payload) {
                state.apply(&env);
            }
        }
    }
    Ok(state)
}

fn control(cli: &Cli, task: &str, path: &str, body: Value, command: Command) -> anyhow::Result<()> {
    let task_id = parse_task(task)?;
    let setup = Setup::load(cli)?;
    if let Some(run) = find_running(&setup.config.data_dir) {
        let client = ApiClient::new(&run.api);
        let answer =
            runtime()?.block_on(client.post(&format!("/v1/tasks/{task_id}{path}"), &body))?;
        print_answer(cli, answer)?;
        return Ok(());
    }
    let env = Envelope::command(
        task_id,
        CorrelationId::generate(),
        Timestamp::now(),
        command,
    );
    append_directly(cli, setup.open_log()?.as_ref(), env)
}

pub fn cancel(cli: &Cli, args: &TaskCommandArgs) -> anyhow::Result<()> {
    control(
        cli,
        &args.task,
        "/cancel",
        json!({"reason": args.reason, "requested_by": args.requested_by}),
        Command::CancelTask(CancelTask {
            requested_by: args.requested_by.clone(),
            reason: args.reason.clone(),
        }),
    )
}

pub fn retry(cli: &Cli, args: &TaskCommandArgs) -> anyhow::Result<()> {
    control(
        cli,
        &args.task,
        "/retry",
        json!({"reason": args.reason, "requested_by": args.requested_by}),
        Command::RetryTask(RetryTask {
            requested_by: args.requested_by.clone(),
            reason: args.reason.clone(),
        }),
    )
}

pub fn resolve(cli: &Cli, args: &ResolveArgs) -> anyhow::Result<()> {
    let result = args
        .result
        .as_deref()
        .map(|r| read_json_arg(r, "--result"))
        .transpose()?;
    control(
        cli,
        &args.task,
        &format!("/steps/{}/resolve", args.step),
        json!({
            "result": result.as_ref().map(RawJson::to_value),
            "skip_dependents": args.skip_dependents,
            "reason": args.reason, "resolved_by": args.resolved_by,
        }),
        Command::ResolveStep(ResolveStep {
            step: args.step.clone(),
            result,
            resolved_by: args.resolved_by.clone(),
            reason: args.reason.clone(),
            skip_dependents: args.skip_dependents,
        }),
    )
}
