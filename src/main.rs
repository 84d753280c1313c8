//! `tasker`: the command line, the HTTP API and the wiring of the engine.

/// mimalloc: the engine allocates on one thread (processors) and frees on
/// another (executor, writer); glibc's arenas contend on that pattern.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for the whole process, first thing. mimalloc asks
/// for 2 MiB pages where the kernel allows it (`madvise`), and faulting, zeroing
/// and splitting them cost the processor threads 7–20 ms of CPU at a time, a few
/// times a second while the state grows: p99 at 18,000 diamonds/s was 80–130 ms
/// with them and 4–7 ms without, at the same peak throughput
/// (docs/benchmarks.md). Best effort: a kernel without the flag keeps its default.
#[cfg(target_os = "linux")]
fn no_huge_pages() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

#[cfg(not(target_os = "linux"))]
fn no_huge_pages() {}

mod api;
mod audit;
mod bench;
mod bursts;
mod cli;
mod client;
mod commands;
mod cpu;
mod demo;
mod drive;
mod events;
mod examples;
mod failure;
mod project;
mod query;
mod replay;
mod run;
mod scaffold;
mod scaleout;
mod tail;
mod telemetry;
mod views;
mod wiring;
mod workloads;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{AuditCommand, Cli, Command, NewCommand, TemplatesCommand};

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    // Only `run` exports traces; its configuration errors are reported by `run`.
    let telemetry = matches!(cli.command, Command::Run(_))
        .then(|| tasker_engine::config::Config::load(cli.config.as_deref()).ok())
        .flatten()
        .map(|(c, _)| c.telemetry);
    let _telemetry = telemetry::init(cli.verbose, telemetry.as_ref());
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli, args),
        Command::Submit(args) => commands::submit(&cli, args),
        Command::Status(args) => commands::status(&cli, args),
        Command::Cancel(args) => commands::cancel(&cli, args),
        Command::Retry(args) => commands::retry(&cli, args),
        Command::Resolve(args) => commands::resolve(&cli, args),
        Command::Templates(TemplatesCommand::List) => scaffold::list(&cli),
        Command::Templates(TemplatesCommand::Check { dir }) => scaffold::check(dir),
        Command::New(NewCommand::Template { name, dir }) => scaffold::new_template(name, dir),
        Command::New(NewCommand::Handler { name, dir }) => scaffold::new_handler(name, dir),
        Command::Demo(args) => demo::demo(&cli, args),
        Command::Bench(args) => bench::bench(&cli, args),
        Command::Project(args) => project::project(&cli, args),
        Command::Replay(args) => replay::replay(&cli, args),
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(&cli, args),
        Command::Audit(AuditCommand::Task(args)) => audit::task(&cli, args),
        Command::Tail(args) => tail::tail(&cli, args),
        Command::Events => events::events(&cli),
        Command::Query(cmd) => query::query(&cli, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            failure::report(&e);
            ExitCode::FAILURE
        }
    }
}
