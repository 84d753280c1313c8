//! `tasker run`: the engine, its step executor and the HTTP API in one process,
//! until Ctrl-C or SIGTERM (then a clean stop: rounds finish, snapshots are written).

use std::sync::Arc;

use anyhow::Context;

use tasker_engine::config::Backend;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::runtime::{Engine, EngineOptions, GroupMembership};

use crate::api;
use crate::cli::{Cli, RunArgs};
use crate::client::{RunInfo, run_info_path};
use crate::failure::WithHint;
use crate::wiring::Setup;

pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<()> {
    if let Some(parent) = args.parent_pid {
        stop_with_parent(parent)?;
    }
    let setup = Setup::load(cli)?;
    let handlers = Arc::new(HandlerRegistry::with_builtins());
    let registry = setup.registry(handlers, args.templates.as_deref())?;
    let _watch = setup
        .config
        .templates
        .watch
        .then(|| registry.watch(setup.resolved.watch_interval));
    let log = setup.open_log()?;
    let options = EngineOptions::from_config(&setup.config, &setup.resolved);
    let kafka = setup.config.log.backend == Backend::Kafka;
    let engine = Arc::new(
        if kafka {
            // Partitions come and go with the consumer group.
            Engine::new(Arc::clone(&log), Arc::clone(&registry), options, None)
        } else {
            Engine::start(Arc::clone(&log), Arc::clone(&registry), options, None)
        }
        .map_err(|e| anyhow::anyhow!(e))
        .hint("see the error above; `tasker status <task>` reads the log without an engine")?,
    );
    let membership = if kafka {
        Some(
            GroupMembership::join(
                Arc::clone(&engine),
                &setup.kafka_config()?,
                &setup.config.kafka.group_id,
            )
            .map_err(anyhow::Error::from)
            .hint("check the brokers; the engine joins the consumer group kafka.group_id")?,
        )
    } else {
        None
    };
    // Every event as CloudEvents JSON to `mirror.topic`, for the partitions owned.
    let mirror = if kafka && setup.config.mirror.enabled {
        let owner = Arc::clone(&engine);
        Some(
            tasker_engine::mirror::Mirror::start(
                Arc::clone(&log),
                &setup.kafka_config()?,
                &setup.config.mirror.topic,
                move || owner.owned_partitions(),
            )
            .map_err(anyhow::Error::from)
            .hint("check the brokers and mirror.topic")?,
        )
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tasker-api")
        .enable_all()
        .build()?;
    let bind = setup.resolved.bind;
    let info_path = run_info_path(&setup.config.data_dir);
    let projectors = if setup.config.projector.enabled {
        let store = rt.block_on(crate::project::open_store(&setup))?;
        // A shared read model (PostgreSQL) is projected by each engine for the
        // partitions it owns, following them as the group moves them, so every
        // batch is written once; a read model of this process's own (SQLite) needs
        // every partition. A projector still writing a partition that moved away
        // loses nothing: checkpoints are compared and moved atomically.
        let scope: crate::project::Scope = match &store {
            tasker_projections::Store::Postgres(_) => {
                let engine = Arc::clone(&engine);
                Box::new(move || engine.owned_partitions())
            }
            tasker_projections::Store::Sqlite(_) => crate::project::all_partitions(log.as_ref()),
        };
        Some(rt.block_on(async {
            crate::project::Projectors::start(
                store,
                Arc::clone(&log),
                scope,
                &crate::project::options(&setup),
            )
        }))
    } else {
        None
    };
    rt.block_on(async {
        let templates = registry.catalog().templates().count();
        if !setup.config.api.enabled {
            eprintln!(
                "tasker running: {} | {templates} templates | API disabled | Ctrl-C to stop",
                log.describe()
            );
            shutdown_signal().await;
            return anyhow::Ok(());
        }
        let state = api::AppState::new(
            Arc::clone(&engine),
            projectors.as_ref().map(|p| p.store.clone()),
            projectors
                .as_ref()
                .map(|p| p.progress.clone())
                .unwrap_or_default(),
            &setup.config,
            &setup.resolved,
        )
        .hint("fix the [auth] key named above")?;
        let listener = tokio::net::TcpListener::bind(bind).await.hint(format!(
            "api.bind {bind} is taken; set another with TASKER_API__BIND"
        ))?;
        let addr = listener.local_addr()?;
        let info = RunInfo {
            pid: std::process::id(),
            api: format!("http://{addr}"),
        };
        write_run_info(&info_path, &info).hint(format!(
            "cannot write {}: data_dir must be a writable directory",
            info_path.display()
        ))?;
        eprintln!(
            "tasker running: {} | {templates} templates | API http://{addr} | Ctrl-C to stop",
            log.describe()
        );
        let app = api::router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_file(&info_path);
    if let Some(p) = projectors {
        rt.block_on(p.stop());
    }
    eprintln!("stopping: finishing rounds and writing snapshots");
    drop(mirror);
    drop(membership);
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown(),
        Err(shared) => drop(shared),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Asks the kernel for SIGTERM when the thread that started this process
/// ends, then checks that `parent` is still that process: one that died
/// before the request was made would otherwise leave this engine running.
#[cfg(target_os = "linux")]
fn stop_with_parent(parent: u32) -> anyhow::Result<()> {
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    set_parent_process_death_signal(Some(Signal::TERM))
        .context("asking for a signal when the parent process ends")?;
    let alive = getppid().is_some_and(|p| p.as_raw_nonzero().get() as u32 == parent);
    anyhow::ensure!(alive, "the parent process {parent} has already ended");
    Ok(())
}

/// Elsewhere the parent stops its engines itself when it ends normally.
#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_parent: u32) -> anyhow::Result<()> {
    Ok(())
}

/// Advertises the API in `<data_dir>/run.json`, making the directory if it is
/// new: on Kafka without a SQLite read model nothing else creates it before
/// the first snapshot.
fn write_run_info(path: &std::path::Path, info: &RunInfo) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec(info)?)
}
