//! The command line: every subcommand and its arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tasker",
    version,
    about = "Workflow orchestration on an append-only event log",
    long_about = "Tasker runs versioned workflow templates (DAGs of steps). Every state change \
                  is an event in a log (embedded segment files by default, Kafka in production); \
                  a deterministic engine folds the events into task and step state.\n\n\
                  With no configuration everything lives under ./tasker-data."
)]
pub struct Cli {
    /// Configuration file (default: ./tasker.toml if present).
    #[arg(long, global = true, env = "TASKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir` (log, snapshots, read model).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the engine: processors, step executor and HTTP API, until Ctrl-C.
    Run(RunArgs),
    /// Request a task: `tasker submit shop/order@1.0.0 --context '{"order_id":1}'`.
    Submit(SubmitArgs),
    /// Show a task and its steps.
    Status(StatusArgs),
    /// Cancel a pending or running task.
    Cancel(TaskCommandArgs),
    /// Retry the failed steps of a task in error.
    Retry(TaskCommandArgs),
    /// Settle a failed step by hand.
    Resolve(ResolveArgs),
    /// List installed templates or check template files.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Scaffold a template or a Rust step handler.
    #[command(subcommand)]
    New(NewCommand),
    /// Run the bundled order workflow a few thousand times and summarize.
    Demo(DemoArgs),
    /// Measure throughput and latency on the embedded log.
    Bench(BenchArgs),
    /// Run the read-model projector alone (e.g. to rebuild it).
    Project(ProjectArgs),
    /// Refold the log into each partition's state digest and hash-chain head.
    Replay(ReplayArgs),
    /// Verify the log's integrity, or show a task's history and past state.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Follow the log's events as they are appended.
    Tail(TailArgs),
    /// List every record type with its kind, fields and meaning.
    Events,
    /// Ask the read model: analytics, slowest steps/tasks, health, a task's readiness.
    #[command(subcommand)]
    Query(QueryCommand),
}

/// The read model's questions (see docs/read-models.md); `--json` prints the
/// typed answer.
#[derive(Subcommand, Debug)]
pub enum QueryCommand {
    /// Throughput, completion and error rates, average durations over a period.
    Analytics {
        /// How far back from `--as-of` the period starts (e.g. 15m, 24h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        period: std::time::Duration,
        #[command(flatten)]
        time: TimeArgs,
    },
    /// The slowest completed steps, slowest first.
    SlowestSteps(SlowestArgs),
    /// The slowest finished tasks, slowest first.
    SlowestTasks(SlowestArgs),
    /// Tasks and steps by status, and steps by retry situation.
    Health {
        #[command(flatten)]
        time: TimeArgs,
    },
    /// Each step of a task: state, parents done, attempts, and whether it is ready.
    Readiness {
        task: String,
        #[command(flatten)]
        time: TimeArgs,
    },
    /// Each step's depth in the task's DAG (0 = roots).
    Levels { task: String },
    /// A task's progress and the recommended next action.
    Context {
        task: String,
        #[command(flatten)]
        time: TimeArgs,
    },
}

#[derive(Args, Debug)]
pub struct TimeArgs {
    /// Answer as of this RFC 3339 time (default: now).
    #[arg(long)]
    pub as_of: Option<String>,
}

#[derive(Args, Debug)]
pub struct SlowestArgs {
    /// Only those finished within this long before now (e.g. 24h; default: all).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub period: Option<std::time::Duration>,
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
    #[arg(long)]
    pub namespace: Option<String>,
    /// Template name.
    #[arg(long)]
    pub name: Option<String>,
    /// Template version.
    #[arg(long)]
    pub version: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Stop here: a position (the records before it, as `status --digest` reports
    /// positions) or an RFC 3339 time (up to the first record stamped later).
    #[arg(long)]
    pub to: Option<tasker_engine::audit::Bound>,
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Compare with every snapshot and chain checkpoint the engine wrote and name
    /// the first position where they disagree.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check that no record was changed, dropped or reordered, and name the
    /// position if one was (see docs/audit.md).
    Verify(AuditVerifyArgs),
    /// A task's history (every command and event) and its state at a point.
    Task(AuditTaskArgs),
}

#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Do not extend the seal (by default a clean run seals what it verified).
    #[arg(long)]
    pub no_seal: bool,
}

#[derive(Args, Debug)]
pub struct AuditTaskArgs {
    /// The task id.
    pub task: String,
    /// Show the task as of a position (the records before it) or an RFC 3339 time.
    #[arg(long)]
    pub at: Option<tasker_engine::audit::Bound>,
    /// Read the whole partition instead of using (and updating) the task index.
    #[arg(long)]
    pub no_index: bool,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Record types to show, e.g. `task.completed,step.failed` (default: every event).
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// Only records of these namespaces.
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Where to start: `earliest`, `latest`, a position (in every partition) or an
    /// RFC 3339 time. A named subscription resumes from its committed position.
    #[arg(long, default_value = "latest")]
    pub from: tasker_engine::subscribe::StartAt,
    /// Subscribe durably under this name: positions are committed (a cursor file
    /// on the embedded log, the consumer group on Kafka) and the next run resumes.
    #[arg(long)]
    pub name: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop at the end of the log instead of following it.
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(Args, Debug)]
pub struct ProjectArgs {
    /// Empty the read model and project the whole log again.
    #[arg(long)]
    pub rebuild: bool,
    /// Stop once the read model has caught up with the log.
    #[arg(long)]
    pub once: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A directory of template YAML files (overrides `templates.dir`).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Stop, as on SIGTERM, when the process with this id (the one that
    /// started this engine) ends, killed or not: `tasker bench --engines`
    /// passes its own (Linux).
    #[arg(long, hide = true, value_name = "PID")]
    pub parent_pid: Option<u32>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// `namespace/name` or `namespace/name@version` (a version or semver requirement).
    pub template: String,
    /// The task's context: JSON text, or `@file.json`.
    #[arg(long, default_value = "{}")]
    pub context: String,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[arg(long)]
    pub initiator: Option<String>,
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Wait until the task is terminal and print it (needs a running engine).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The task id; omit with --digest to report every partition.
    pub task: Option<String>,
    /// Print each partition's state digest and hash-chain head (for audits).
    #[arg(long)]
    pub digest: bool,
}

#[derive(Args, Debug)]
pub struct TaskCommandArgs {
    pub task: String,
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long = "by")]
    pub requested_by: Option<String>,
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    pub task: String,
    /// The step's name.
    pub step: String,
    /// The result children receive instead of the handler's (JSON).
    #[arg(long)]
    pub result: Option<String>,
    /// Also skip every step downstream of this one that has not run.
    #[arg(long)]
    pub skip_dependents: bool,
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long = "by")]
    pub resolved_by: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TemplatesCommand {
    /// Templates the engine would load (bundled examples + `templates.dir`).
    List,
    /// Validate every template file in a directory (exit 1 on any error).
    Check { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum NewCommand {
    /// Write `<dir>/<namespace>/<name>.yaml`, a template that passes `templates check`.
    Template {
        /// `namespace/name`
        name: String,
        #[arg(long, default_value = "templates")]
        dir: PathBuf,
    },
    /// Write `<dir>/<name>.rs`, a Rust `StepHandler` to register with the engine.
    Handler {
        name: String,
        #[arg(long, default_value = "src/handlers")]
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many orders to run.
    #[arg(long, default_value_t = 3000)]
    pub tasks: usize,
    /// Keep the demo's data here instead of a temporary directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// A -> (B, C) -> D
    Diamond,
    /// 20 steps in a line
    Chain20,
    /// 1 -> 50 -> 1
    Fanout,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = Workload::Diamond)]
    pub workload: Workload,
    /// Run this template file as given instead of a built-in workload.
    #[arg(long)]
    pub template: Option<PathBuf>,
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// `batch` (group commit), `always`, `never` or `interval:<duration>`.
    #[arg(long, default_value = "batch")]
    pub fsync: String,
    #[arg(long, default_value_t = 2)]
    pub partitions: u32,
    /// Offer tasks at this many per second (latency under load) instead of all at once.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Context for each task (JSON).
    #[arg(long, default_value = "{}")]
    pub context: String,
    /// How long finished tasks stay in memory (engine.retention).
    #[arg(long, default_value = "15m")]
    pub retention: humantime::Duration,
    /// Run the workload this many times in a row (memory should stay flat once
    /// finished tasks outlive the retention).
    #[arg(long, default_value_t = 1)]
    pub waves: usize,
    /// Kafka only: run the workload on this many `tasker run` processes sharing the
    /// topic through the consumer group (a list like `1,2` runs each and reports the
    /// speed-up).
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<usize>,
    /// With `--engines`: the engines project into this PostgreSQL database
    /// (`postgres://...`), which the bench EMPTIES before each run (give it a
    /// scratch database), and each run also reports when the read model held
    /// every task as complete.
    #[arg(long, requires = "engines")]
    pub read_model: Option<String>,
}
