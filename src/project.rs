//! The read-model projector in the binary: started by `tasker run` (for the
//! partitions its engine owns when the read model is shared, every partition when
//! it is the process's own), or alone by `tasker project` (optionally rebuilding
//! the read model from the start of the log, with a progress bar).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
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

/// Partitions and their projectors' progress.
pub type Projected = Vec<(PartitionId, Arc<Progress>)>;

/// The partitions being projected and their progress, as the API reports them.
#[derive(Clone, Default)]
pub struct Active(Arc<ArcSwap<Projected>>);

impl Active {
    pub fn list(&self) -> Arc<Projected> {
        self.0.load_full()
    }
}

/// Which partitions a process projects.
pub type Scope = Box<dyn Fn() -> Vec<PartitionId> + Send + Sync>;

/// Every partition of `log`: a read model of this process's own (SQLite), or
/// `tasker project`.
pub fn all_partitions(log: &dyn Log) -> Scope {
    let n = log.partitions();
    Box::new(move || (0..n).map(PartitionId).collect())
}

/// How often a followed scope is asked again.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// One partition's projector task.
struct Running {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<()>,
}

/// Projectors running on the current tokio runtime: one per partition in
/// `scope`, started and stopped as the scope changes.
pub struct Projectors {
    stop: Arc<AtomicBool>,
    supervisor: tokio::task::JoinHandle<()>,
    pub progress: Active,
    pub store: Store,
}

impl Projectors {
    /// Starts a projector for every partition in `scope` now, then follows it.
    pub fn start(
        store: Store,
        log: Arc<dyn Log>,
        scope: Scope,
        options: &ProjectorOptions,
    ) -> Projectors {
        let stop = Arc::new(AtomicBool::new(false));
        let mut supervisor = Supervisor {
            store: store.clone(),
            log,
            options: options.clone(),
            running: BTreeMap::new(),
            stopping: Vec::new(),
            active: Active::default(),
        };
        supervisor.follow(&scope());
        let progress = supervisor.active.clone();
        let task = tokio::spawn(supervisor.run(scope, Arc::clone(&stop)));
        Projectors {
            stop,
            supervisor: task,
            progress,
            store,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.supervisor.await;
    }
}

struct Supervisor {
    store: Store,
    log: Arc<dyn Log>,
    options: ProjectorOptions,
    running: BTreeMap<PartitionId, Running>,
    /// Projectors of partitions that left the scope, until they have finished.
    stopping: Vec<(PartitionId, tokio::task::JoinHandle<()>)>,
    active: Active,
}

impl Supervisor {
    async fn run(mut self, scope: Scope, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(FOLLOW_EVERY).await;
            self.follow(&scope());
        }
        for (p, r) in std::mem::take(&mut self.running) {
            r.stop.store(true, Ordering::Relaxed);
            self.stopping.push((p, r.task));
        }
        for (_, task) in self.stopping.drain(..) {
            let _ = task.await;
        }
    }

    /// Stops the projectors of partitions that left `wanted` and starts the new
    /// ones; a partition that comes back waits for its old projector to finish.
    fn follow(&mut self, wanted: &[PartitionId]) {
        self.stopping.retain(|(_, t)| !t.is_finished());
        let before = self.running.len();
        let gone: Vec<PartitionId> = self
            .running
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for p in &gone {
            if let Some(r) = self.running.remove(p) {
                r.stop.store(true, Ordering::Relaxed);
                self.stopping.push((*p, r.task));
            }
        }
        for &p in wanted {
            if self.running.contains_key(&p) || self.stopping.iter().any(|(q, _)| *q == p) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let progress = Arc::new(Progress::default());
            let (store, log, options) = (
                self.store.clone(),
                Arc::clone(&self.log),
                self.options.clone(),
            );
            let (s, prog) = (Arc::clone(&stop), Arc::clone(&progress));
            let task = tokio::spawn(async move {
                if let Err(e) = run_partition(store, log, p, options, Arc::clone(&prog), s).await {
                    tracing::error!(partition = %p, error = %e, "projector stopped");
                    let _ = prog.failed.set(e.to_string());
                }
            });
            self.running.insert(
                p,
                Running {
                    stop,
                    progress,
                    task,
                },
            );
        }
        if !gone.is_empty() || self.running.len() != before {
            tracing::info!(partitions = ?self.running.keys().map(|p| p.0).collect::<Vec<_>>(), "projecting");
        }
        let list = self
            .running
            .iter()
            .map(|(p, r)| (*p, Arc::clone(&r.progress)))
            .collect();
        self.active.0.store(Arc::new(list));
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
        let mut ends = BTreeMap::new();
        let mut start = 0u64;
        for p in (0..log.partitions()).map(PartitionId) {
            ends.insert(p, log.end(p)?.0);
            start += store.checkpoint("read_model", p).await?.position.0;
        }
        let total: u64 = ends.values().sum();
        let scope = all_partitions(log.as_ref());
        let projectors = Projectors::start(store.clone(), Arc::clone(&log), scope, &options(&setup));
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
        let failed = loop {
            let list = projectors.progress.list();
            if let Some(e) = list.iter().find_map(|(_, prog)| prog.failed.get()) {
                break Some(e.clone());
            }
            let done: u64 = list
                .iter()
                .map(|(_, p)| p.position.load(Ordering::Relaxed))
                .sum();
            bar.set_position(done.min(total));
            // Done when every partition's projector has checked its checkpoint
            // against this log and reached the end the log had at the start.
            let caught_up = list.len() == ends.len()
                && list.iter().all(|(p, prog)| {
                    prog.checked.load(Ordering::Relaxed)
                        && prog.position.load(Ordering::Relaxed) >= ends.get(p).copied().unwrap_or(0)
                });
            if args.once && caught_up {
                break None;
            }
            tokio::select! {
                _ = &mut ctrl_c => break None,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        bar.finish_and_clear();
        if let Some(e) = failed {
            projectors.stop().await;
            return Err(anyhow::anyhow!("the projector stopped: {e}")).hint("see the error above");
        }
        let events: u64 = projectors
            .progress
            .list()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use tasker_engine::log::file::{FileLog, FileLogConfig};

    use super::*;

    fn listed(p: &Projectors) -> Vec<u32> {
        p.progress.list().iter().map(|(p, _)| p.0).collect()
    }

    async fn wait_for(p: &Projectors, want: &[u32]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while listed(p) != want {
            assert!(
                Instant::now() < deadline,
                "projecting {:?}, not {want:?}",
                listed(p)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn projectors_follow_their_scope_as_partitions_come_and_go() {
        let dir = tempfile::TempDir::new().unwrap();
        let log: Arc<dyn Log> =
            Arc::new(FileLog::open(dir.path().join("log"), FileLogConfig::default()).unwrap());
        let store = Store::open(&format!("sqlite://{}", dir.path().join("rm.db").display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let owned = Arc::new(Mutex::new(vec![PartitionId(1)]));
        let scope: Scope = {
            let owned = Arc::clone(&owned);
            Box::new(move || owned.lock().unwrap().clone())
        };
        let options = ProjectorOptions {
            name: "read_model".into(),
            max_records: 100,
            max_delay: Duration::from_millis(10),
        };
        let projectors = Projectors::start(store, log, scope, &options);
        // The first scope is projected from the start, before any look again.
        assert_eq!(listed(&projectors), [1]);
        *owned.lock().unwrap() = vec![PartitionId(0), PartitionId(1), PartitionId(3)];
        wait_for(&projectors, &[0, 1, 3]).await;
        *owned.lock().unwrap() = vec![PartitionId(3)];
        wait_for(&projectors, &[3]).await;
        // A partition that comes back gets a projector again.
        *owned.lock().unwrap() = vec![PartitionId(1), PartitionId(3)];
        wait_for(&projectors, &[1, 3]).await;
        *owned.lock().unwrap() = Vec::new();
        wait_for(&projectors, &[]).await;
        tokio::time::timeout(Duration::from_secs(10), projectors.stop())
            .await
            .unwrap();
    }
}
