//! `tasker tail`: follows the log's events as they are appended, one line each (or
//! CloudEvents JSON lines with `--json`, the same the Kafka mirror publishes).
//! With `--name` it is a durable subscription that resumes where it stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use tasker_engine::audit::history::describe;
use tasker_engine::config::Backend;
use tasker_engine::record::PartitionId;
use tasker_engine::subscribe::{
    CursorStore, FileCursors, Filter, KafkaCursors, NoCursors, Subscriber, check_name,
};

use crate::cli::{Cli, TailArgs};
use crate::failure::WithHint;
use crate::wiring::Setup;

pub fn tail(cli: &Cli, args: &TailArgs) -> anyhow::Result<()> {
    let filter = Filter::parse(&args.types, &args.namespaces)
        .map_err(anyhow::Error::msg)
        .hint("e.g. --type task.completed,step.failed --namespace shop")?;
    let setup = Setup::load(cli)?;
    let log = setup.open_log_for_reading()?;
    let name = args.name.clone().unwrap_or_else(|| "tail".into());
    check_name(&name)
        .map_err(anyhow::Error::from)
        .hint("a subscription name names a file and a consumer group")?;
    let cursors: Box<dyn CursorStore> = match (&args.name, setup.config.log.backend) {
        (None, _) => Box::new(NoCursors),
        (Some(n), Backend::File) => Box::new(FileCursors::new(
            setup.config.data_dir.join("cursors").join(n),
        )),
        (Some(n), Backend::Kafka) => Box::new(KafkaCursors::new(&setup.kafka_config()?, n)?),
    };
    let partitions: Vec<PartitionId> = (0..log.partitions()).map(PartitionId).collect();
    let mut ends = BTreeMap::new();
    for p in &partitions {
        ends.insert(*p, log.end(*p)?);
    }
    let mut sub = Subscriber::open(&name, log, &partitions, filter, args.from, cursors)?;
    let topic = setup.config.log.topic.clone();
    let durable = args.name.is_some();
    let mut shown = 0usize;
    let stdout = std::io::stdout();
    loop {
        let batch = sub.poll(1_000, Duration::from_millis(250))?;
        let mut out = stdout.lock();
        for (i, d) in batch.iter().enumerate() {
            if cli.json {
                writeln!(out, "{}", d.cloud_event(&topic).to_json_line())?;
            } else {
                let (who, what) = describe(&d.envelope, None);
                writeln!(
                    out,
                    "{}  {}:{:<8}  {:24}  {}  {}{}",
                    d.envelope.at,
                    d.partition,
                    d.position.0,
                    d.envelope.record_type().name(),
                    d.envelope.task_id,
                    what,
                    who.filter(|w| !w.starts_with("engine"))
                        .map(|w| format!("  ({w})"))
                        .unwrap_or_default()
                )?;
            }
            shown += 1;
            if args.limit.is_some_and(|l| shown >= l) {
                out.flush()?;
                if durable {
                    // What this batch printed, in every partition: a batch
                    // spans partitions, and the limit may stop it in any.
                    sub.commit_deliveries(&batch[..=i])?;
                }
                return Ok(());
            }
        }
        out.flush()?;
        drop(out);
        if durable {
            sub.commit_polled()?;
        }
        if args.no_follow
            && batch.is_empty()
            && ends
                .iter()
                .all(|(p, end)| sub.polled().get(p).is_some_and(|at| at >= end))
        {
            return Ok(());
        }
    }
}
