//! `tasker`: the command line, the HTTP API and the wiring of the engine.

mod api;
mod bench;
mod cli;
mod client;
mod commands;
mod demo;
mod drive;
mod examples;
mod failure;
mod project;
mod run;
mod scaffold;
mod views;
mod wiring;
mod workloads;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, NewCommand, TemplatesCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            failure::report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` wins, else warnings (-v info, -vv debug).
/// `TASKER_LOG_FORMAT=json` switches to JSON lines.
fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,tasker=info,tasker_engine=info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("TASKER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
