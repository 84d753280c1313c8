//! The read-model projector in the binary: started by `tasker run` for the
//! partitions it owns, or alone by `tasker project` (optionally rebuilding the read
//! model from the start of the log, with a progress bar).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tasker_engine::log::Log;
use tasker_engine::record::PartitionId;
use tasker_projections::{Progress, ProjectorOptions, Store, run_partition};

use crate::cli::{Cli, ProjectArgs};
use crate::failure::WithHint;
use crate::wiring::Setup;

/// Where the read model lives: `database.url`, else SQLite under `data_dir`.
pub fn store_url(setup: &Setup) -> String {
    setup.config.database.url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            setup.config.data_dir.join("read-model.db").display()
        )
    })
}

/// Opens the read model and applies its migrations.
pub async fn open_store(setup: &Setup) -> anyhow::Result<Store> {
    let url = store_url(setup);
    let store = Store::open(&url)
        .await
        .hint("check database.url / DATABASE_URL, and that the database is running")?;
    store
        .migrate()
        .await
        .hint("the read-model database could not be migrated; see the error above")?;
    Ok(store)
}

pub fn options(setup: &Setup) -> ProjectorOptions {
    ProjectorOptions {
        name: "read_model".into(),
        max_records: setup.config.projector.batch_records,
        max_delay: setup.resolved.projector_delay,
    }
}

/// Projectors running on the current tokio runtime.
pub struct Projectors {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub progress: Vec<(PartitionId, Arc<Progress>)>,
    pub store: Store,
}

impl Projectors {
    pub fn start(
        store: Store,
        log: Arc<dyn Log>,
        partitions: &[PartitionId],
        options: &ProjectorOptions,
    ) -> Projectors {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut progress = Vec::new();
        for &p in partitions {
            let prog = Arc::new(Progress::default());
            progress.push((p, Arc::clone(&prog)));
            let (store, log, options, stop) = (
                store.clone(),
                Arc::clone(&log),
                options.clone(),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                if let Err(e) = run_partition(store, log, p, options, prog, stop).await {
                    tracing::error!(partition = %p, error = %e, "projector stopped");
                }
            }));
        }
        Projectors {
            stop,
            tasks,
            progress,
            store,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// `tasker project`: runs the projector alone.
pub fn project(cli: &Cli, args: &ProjectArgs) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let log = setup.open_log_for_reading()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = open_store(&setup).await?;
        if args.rebuild {
            store.reset("read_model").await?;
        }
        let partitions: Vec<PartitionId> = (0..log.partitions()).map(PartitionId).collect();
        let mut total = 0u64;
        let mut start = 0u64;
        for p in &partitions {
            total += log.end(*p)?.0;
            start += store.checkpoint("read_model", *p).await?.position.0;
        }
        let projectors = Projectors::start(store.clone(), Arc::clone(&log), &partitions, &options(&setup));
        let bar = if cli.json {
            ProgressBar::hidden()
        } else {
            let pb = ProgressBar::new(total);
            pb.set_style(
                ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} records  {per_sec}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb
        };
        bar.set_position(start);
        let started = Instant::now();
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            let done: u64 = projectors
                .progress
                .iter()
                .map(|(_, p)| p.position.load(Ordering::Relaxed))
                .sum();
            bar.set_position(done.min(total));
            if args.once && done >= total {
                break;
            }
            tokio::select! {
                _ = &mut ctrl_c => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        bar.finish_and_clear();
        let events: u64 = projectors
            .progress
            .iter()
            .map(|(_, p)| p.events.load(Ordering::Relaxed))
            .sum();
        projectors.stop().await;
        let secs = started.elapsed().as_secs_f64();
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"events": events, "seconds": secs, "events_per_s": events as f64 / secs.max(1e-9), "store": store.kind()})
            );
        } else {
            println!(
                "projected {events} events into {} in {secs:.2} s ({:.0} events/s)",
                store.kind(),
                events as f64 / secs.max(1e-9)
            );
        }
        anyhow::Ok(())
    })
}
