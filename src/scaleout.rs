//! `tasker bench --engines N[,M...]` on Kafka: the same workload run by N `tasker
//! run` processes sharing one topic through the consumer group, timed from the
//! first command produced to the last `task.completed` read from the topic, and,
//! with `--read-model`, to the read model the engines share (a scratch PostgreSQL
//! database, emptied first) holding every task as complete.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tasker_engine::codec;
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::log::{Log, partition_for_task};
use tasker_engine::record::{
    Command as Cmd, CorrelationId, Envelope, Event, PartitionId, RawJson, RecordType, RequestTask,
    TaskId, Timestamp,
};
use tasker_engine::runtime::to_record;
use tasker_engine::template::Template;
use tasker_projections::Store;

/// One run's result.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub engines: usize,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub projection: Option<Projection>,
    /// The machine's and the engines' CPU over the timed window (Linux).
    pub cpu: Option<crate::cpu::Usage>,
}

/// How the engines' shared read model kept up.
#[derive(Debug, Clone, Copy)]
pub struct Projection {
    /// From the first command to every task complete in the read model.
    pub seconds: f64,
    /// The database's transactions (the bench's own few polls included): a
    /// rollback is a batch lost to another engine's projector.
    pub commits: i64,
    pub rollbacks: i64,
}

/// The `--read-model` database, emptied for each run.
struct ReadModel {
    rt: tokio::runtime::Runtime,
    url: String,
    pool: sqlx::PgPool,
}

impl ReadModel {
    fn open(url: &str) -> anyhow::Result<ReadModel> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let pool = rt
            .block_on(async {
                let store = Store::open(url).await?;
                store.migrate().await?;
                store.reset("read_model").await?;
                match store {
                    Store::Postgres(pg) => anyhow::Ok(pg.pool().clone()),
                    Store::Sqlite(_) => anyhow::bail!("--read-model needs a postgres:// URL"),
                }
            })
            .with_context(|| format!("preparing the read model at --read-model {url}"))?;
        Ok(ReadModel {
            rt,
            url: url.to_owned(),
            pool,
        })
    }

    /// Tasks the read model holds as complete.
    fn complete(&self) -> anyhow::Result<i64> {
        Ok(self.rt.block_on(
            sqlx::query_scalar("SELECT count(*) FROM tasker_tasks WHERE status = 'complete'")
                .fetch_one(&self.pool),
        )?)
    }

    /// (commits, rollbacks) of the database so far.
    fn transactions(&self) -> anyhow::Result<(i64, i64)> {
        Ok(self.rt.block_on(
            sqlx::query_as(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database
                 WHERE datname = current_database()",
            )
            .fetch_one(&self.pool),
        )?)
    }
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The partitions an engine reports owning; none while its API does not answer.
fn owned(http: &reqwest::blocking::Client, api: &str) -> Vec<u64> {
    http.get(format!("{api}/v1/digests"))
        .send()
        .ok()
        .and_then(|r| r.json::<Vec<serde_json::Value>>().ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d["partition"].as_u64())
        .collect()
}

/// What every run of a scale-out bench does.
pub struct Workload<'a> {
    pub template_yaml: &'a str,
    pub template: &'a Template,
    pub tasks: usize,
    pub partitions: u32,
    /// The PostgreSQL server for the engines' shared read model, if any.
    pub read_model: Option<&'a str>,
}

/// Runs the workload on `engines` processes.
pub fn run(
    base: &KafkaLogConfig,
    workload: &Workload<'_>,
    engines: usize,
    quiet: bool,
) -> anyhow::Result<Run> {
    let &Workload {
        template_yaml,
        template,
        tasks,
        partitions,
        read_model,
    } = workload;
    let read_model = read_model.map(ReadModel::open).transpose()?;
    let before = match &read_model {
        Some(db) => db.transactions()?,
        None => (0, 0),
    };
    let dir = tempfile::TempDir::new()?;
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates)?;
    std::fs::write(templates.join("bench.yaml"), template_yaml)?;
    let mut config = base.clone();
    config.topic = format!("tasker-scaleout-{}", uuid::Uuid::now_v7().simple());
    config.partitions = partitions;
    let kafka = Arc::new(KafkaLog::open(config.clone())?);
    let log: Arc<dyn Log> = kafka.clone();
    // The producer gets its id while the engines start (an idempotent
    // producer's first append otherwise waits ~500 ms for it, in the window).
    kafka.connect_writers(Duration::from_secs(10))?;
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    let mut apis = Vec::new();
    for i in 0..engines {
        let data = dir.path().join(format!("engine{i}"));
        std::fs::create_dir_all(&data)?;
        let mut command = Command::new(&exe);
        match &read_model {
            Some(db) => command.env("DATABASE_URL", &db.url),
            None => command.env("TASKER_PROJECTOR__ENABLED", "false"),
        };
        let child = command
            .arg("--data-dir")
            .arg(&data)
            .arg("run")
            .arg("--templates")
            .arg(&templates)
            // The kernel signals the engine when this thread (main) ends.
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .env("TASKER_LOG__BACKEND", "kafka")
            .env("TASKER_KAFKA_BROKERS", &config.brokers)
            .env("TASKER_LOG__TOPIC", &config.topic)
            .env("TASKER_LOG__PARTITIONS", partitions.to_string())
            .env("TASKER_KAFKA__GROUP_ID", &config.topic)
            .env("TASKER_API__BIND", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting an engine process")?;
        children.0.push(child);
        apis.push(wait_api(&data, children.0.last_mut())?);
    }
    // Wait for the group to spread every partition over the engines.
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owned: Vec<Vec<u64>> = apis.iter().map(|a| owned(&http, a)).collect();
        let total: usize = owned.iter().map(Vec::len).sum();
        if total == partitions as usize
            && owned
                .iter()
                .all(|o| !o.is_empty() || engines > partitions as usize)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer group never assigned every partition: {owned:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Watch every partition for terminal tasks, from the current end.
    let (tx, rx) = crossbeam_channel::unbounded::<TaskId>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watchers = Vec::new();
    for p in 0..partitions {
        let (log, tx, stop) = (Arc::clone(&log), tx.clone(), Arc::clone(&stop));
        let from = log.end(PartitionId(p))?;
        watchers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut r = log.reader(PartitionId(p), from)?;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for rec in r.poll(10_000, Duration::from_millis(100))? {
                    let terminal = matches!(
                        rec.record.headers.record_type,
                        Some(RecordType::TaskCompleted | RecordType::TaskFailed)
                    );
                    if terminal
                        && let Ok(env) = codec::decode(&rec.record.payload)
                        && matches!(
                            env.as_event(),
                            Some(Event::TaskCompleted | Event::TaskFailed(_))
                        )
                    {
                        let _ = tx.send(env.task_id);
                    }
                }
            }
            Ok(())
        }));
    }
    // Produce every command straight to its partition, one producer per partition.
    let snapshot = template.snapshot();
    let mut per_partition: Vec<Vec<Envelope>> = vec![Vec::new(); partitions as usize];
    let mut ids = HashSet::with_capacity(tasks);
    for _ in 0..tasks {
        let id = TaskId::generate();
        ids.insert(id);
        per_partition[partition_for_task(id, partitions).0 as usize].push(Envelope::command(
            id,
            CorrelationId::from_uuid(*id.as_uuid()),
            Timestamp::now(),
            Cmd::RequestTask(RequestTask {
                namespace: snapshot.namespace.clone(),
                name: snapshot.name.clone(),
                version: Some(snapshot.version.clone()),
                context: RawJson::empty_object(),
                ..RequestTask::default()
            }),
        ));
    }
    let started = Instant::now();
    let cpu = crate::cpu::Window::start(&children.0.iter().map(Child::id).collect::<Vec<_>>());
    let mut producers = Vec::new();
    for (p, envs) in per_partition.into_iter().enumerate() {
        let log = Arc::clone(&log);
        let ns = bytes::Bytes::from(snapshot.namespace.clone());
        producers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut w = log.writer(PartitionId(p as u32))?;
            let mut buf = Vec::new();
            for chunk in envs.chunks(1_000) {
                let records = chunk
                    .iter()
                    .map(|e| to_record(e, Some(ns.clone()), &mut buf))
                    .collect::<Result<Vec<_>, _>>()?;
                w.append(&records)?;
            }
            Ok(())
        }));
    }
    for p in producers {
        p.join()
            .map_err(|_| anyhow::anyhow!("a producer panicked"))??;
    }
    let progress = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(tasks as u64)
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut left = ids;
    while !left.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} tasks did not finish",
            left.len()
        );
        if let Ok(id) = rx.recv_timeout(Duration::from_millis(200))
            && left.remove(&id)
        {
            progress.inc(1);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    progress.finish_and_clear();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in watchers {
        let _ = w.join();
    }
    let projection = match &read_model {
        Some(db) => {
            while db.complete()? < tasks as i64 {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the read model never held every task as complete"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let projected = started.elapsed().as_secs_f64();
            // Stopped engines have flushed their statistics.
            drop(children);
            std::thread::sleep(Duration::from_secs(1));
            let (commits, rollbacks) = db.transactions()?;
            Some(Projection {
                seconds: projected,
                commits: commits - before.0,
                rollbacks: rollbacks - before.1,
            })
        }
        None => {
            drop(children);
            None
        }
    };
    Ok(Run {
        engines,
        seconds,
        tasks_per_s: tasks as f64 / seconds,
        projection,
        cpu,
    })
}

fn wait_api(data: &Path, child: Option<&mut Child>) -> anyhow::Result<String> {
    let info = data.join("run.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let child = child.ok_or_else(|| anyhow::anyhow!("no engine process"))?;
    loop {
        if let Ok(text) = std::fs::read_to_string(&info)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(api) = v["api"].as_str()
        {
            return Ok(api.to_owned());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("an engine process exited with {status}");
        }
        anyhow::ensure!(Instant::now() < deadline, "an engine process did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}
