//! HTTP load: `POST /v1/tasks` at a fixed rate against a real `tasker run` on
//! loopback, from a small Rust load generator (raw HTTP/1.1 over keep-alive
//! connections, one thread, open loop: latency is measured from each request's
//! scheduled time, so a slow server cannot hide queueing). Reports accepted/s and
//! latency percentiles (hdrhistogram), then checks that every 202 has its task in
//! the read model. A benchmark, not a test: nothing is asserted on time.
//!
//! ```sh
//! cargo bench -p tasker --bench http_load                       # 10,000/s for 30 s
//! cargo bench -p tasker --bench http_load -- --rate 12000 --seconds 30 --connections 128
//! cargo bench -p tasker --bench http_load -- --project-after   # read model built after the load
//! cargo bench -p tasker --bench http_load -- --postgres postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! By default `tasker run` projects into its SQLite read model while serving, as
//! deployed; `--project-after` starts it with `projector.enabled = false` and runs
//! `tasker project --once` after the load, to measure the API and engine alone.
//! `--postgres URL` projects into a fresh database on that server instead of
//! SQLite (dropped afterwards). While loading, the projector's lag is sampled
//! from `/v1/projector` every 250 ms and its maximum reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark program

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEMPLATE: &str = r#"
namespace: load
name: one
version: 1.0.0
description: One no-op step.
steps:
  - name: only
    handler: noop
"#;

struct Args {
    rate: u64,
    seconds: u64,
    connections: usize,
    project_after: bool,
    postgres: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        rate: 10_000,
        seconds: 30,
        connections: 128,
        project_after: false,
        postgres: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        if argv[i] == "--project-after" {
            a.project_after = true;
        }
        if argv[i] == "--postgres" {
            a.postgres = argv.get(i + 1).cloned();
        }
        match (argv[i].as_str(), value) {
            ("--rate", Some(v)) => a.rate = v,
            ("--seconds", Some(v)) => a.seconds = v,
            ("--connections", Some(v)) => a.connections = v as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Server {
    child: Child,
    api: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

#[allow(clippy::zombie_processes)] // `Server::drop` waits for the child
fn start(dir: &Path, project: bool, database_url: Option<&str>) -> Server {
    let templates = dir.join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("one.yaml"), TEMPLATE).unwrap();
    let data = dir.join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasker"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKER_") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let child = cmd
        .arg("--data-dir")
        .arg(&data)
        .arg("run")
        .arg("--templates")
        .arg(&templates)
        .env("TASKER_API__BIND", "127.0.0.1:0")
        .envs(database_url.map(|u| ("DATABASE_URL", u)))
        .env(
            "TASKER_PROJECTOR__ENABLED",
            if project { "true" } else { "false" },
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let info = data.join("run.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&info)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Server {
                child,
                api: v["api"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("http://")
                    .to_owned(),
            };
        }
        assert!(Instant::now() < deadline, "tasker run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One keep-alive connection speaking just enough HTTP/1.1.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends a request and returns (status, body).
    async fn call(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap_or("");
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let total = end + 4 + len;
                while self.buf.len() < total {
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, self.buf[end + 4..total].to_vec()));
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn request(addr: &str, n: u64) -> Vec<u8> {
    let body = format!(r#"{{"namespace":"load","name":"one","context":{{"n":{n}}}}}"#);
    format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Outcome {
    latency_us: Histogram<u64>,
    accepted: Vec<String>,
    statuses: std::collections::BTreeMap<u16, u64>,
    errors: u64,
}

async fn connection(
    addr: String,
    index: u64,
    step: u64,
    rate: u64,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Outcome {
    let mut out = Outcome {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        accepted: Vec::new(),
        statuses: Default::default(),
        errors: 0,
    };
    let mut conn = Conn::open(&addr).await;
    let mut k = index;
    loop {
        let due = start + Duration::from_nanos(k * 1_000_000_000 / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        match conn.call(&request(&addr, k)).await {
            Ok((status, body)) => {
                let _ = out
                    .latency_us
                    .record(due.elapsed().as_micros().max(1) as u64);
                *out.statuses.entry(status).or_default() += 1;
                if status == 202
                    && let Ok(v) = serde_json::from_slice::<Value>(&body)
                    && let Some(id) = v["task_id"].as_str()
                {
                    out.accepted.push(id.to_owned());
                }
            }
            Err(_) => {
                out.errors += 1;
                conn = Conn::open(&addr).await;
            }
        }
        k += step;
    }
    out
}

fn scratch() -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("http-load-")
        .tempdir_in(base)
        .unwrap()
        .keep()
}

fn main() {
    let a = args();
    let dir = scratch();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A fresh database for the read model when projecting into PostgreSQL.
    let pg = a.postgres.as_ref().map(|admin| {
        let name = format!("tasker_http_load_{}", std::process::id());
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(admin).await.unwrap();
            // The name is ours (a fixed prefix and the process id), never input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        });
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        (admin.clone(), name.clone(), format!("{base}/{name}"))
    });
    let mut server = Some(start(
        &dir,
        !a.project_after,
        pg.as_ref().map(|(_, _, url)| url.as_str()),
    ));
    let addr = server.as_ref().map(|s| s.api.clone()).unwrap_or_default();
    // The projector's lag while loading: (max records behind, max seconds behind).
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        let url = format!("http://{addr}/v1/projector");
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let (mut records, mut seconds) = (0u64, 0f64);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(v) = client.get(&url).send().and_then(|r| r.json::<Value>()) {
                    let parts = v.as_array().cloned().unwrap_or_default();
                    records =
                        records.max(parts.iter().filter_map(|p| p["lag_records"].as_u64()).sum());
                    seconds = parts
                        .iter()
                        .filter_map(|p| p["lag_seconds"].as_f64())
                        .fold(seconds, f64::max);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (records, seconds)
        })
    };
    println!(
        "http_load: POST /v1/tasks at {}/s for {} s over {} connections against {addr} (data in {})",
        a.rate,
        a.seconds,
        a.connections,
        dir.display()
    );
    let (outcome, wall) = rt.block_on(async {
        // Warm up: a few hundred requests, not counted.
        let mut c = Conn::open(&addr).await;
        for n in 0..300 {
            let _ = c.call(&request(&addr, 1_000_000_000 + n)).await;
        }
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs(a.seconds);
        let began = Instant::now();
        let tasks: Vec<_> = (0..a.connections as u64)
            .map(|i| {
                tokio::spawn(connection(
                    addr.clone(),
                    i,
                    a.connections as u64,
                    a.rate,
                    start,
                    end,
                ))
            })
            .collect();
        let mut all = Outcome {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            accepted: Vec::new(),
            statuses: Default::default(),
            errors: 0,
        };
        for t in tasks {
            let o = t.await.unwrap();
            all.latency_us.add(&o.latency_us).unwrap();
            all.accepted.extend(o.accepted);
            for (s, n) in o.statuses {
                *all.statuses.entry(s).or_default() += n;
            }
            all.errors += o.errors;
        }
        (all, began.elapsed())
    });
    let h = &outcome.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "sent {} in {:.1} s: accepted {} ({:.0}/s), statuses {:?}, connection errors {}",
        h.len(),
        wall.as_secs_f64(),
        outcome.accepted.len(),
        outcome.accepted.len() as f64 / a.seconds as f64,
        outcome.statuses,
        outcome.errors
    );
    println!(
        "latency from schedule: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );

    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (lag_records, lag_seconds) = sampler.join().unwrap();
    if !a.project_after {
        println!(
            "projector lag while loading ({}): max {lag_seconds:.2} s, max {lag_records} records behind",
            if pg.is_some() { "PostgreSQL" } else { "SQLite" }
        );
    }

    // Where the time went, from the server's own histograms.
    let client = reqwest::blocking::Client::new();
    if let Ok(text) = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .and_then(|r| r.text())
    {
        let q = |name: &str, quantile: &str| {
            let series = format!("{name}{{quantile=\"{quantile}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        println!(
            "server: log append (write + fsync) p50 {:.2} ms p99 {:.2} ms; records per append p50 {:.0} p99 {:.0}",
            q("tasker_log_append_duration_seconds_quantiles", "0.5") * 1000.0,
            q("tasker_log_append_duration_seconds_quantiles", "0.99") * 1000.0,
            q("tasker_log_append_batch_records_quantiles", "0.5"),
            q("tasker_log_append_batch_records_quantiles", "0.99"),
        );
    }

    // Nothing lost: wait for the projector, then every accepted task is in the read model.
    let caught_up = Instant::now();
    if a.project_after {
        drop(server.take());
        let status = Command::new(env!("CARGO_BIN_EXE_tasker"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["project", "--once"])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tasker project --once failed");
    }
    let deadline = caught_up + Duration::from_secs(600);
    loop {
        let p: Value = if server.is_some() {
            client
                .get(format!("http://{addr}/v1/projector"))
                .send()
                .and_then(|r| r.json())
                .unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        let behind: u64 = p
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x["lag_records"].as_u64().unwrap_or(u64::MAX))
                    .sum()
            })
            .unwrap_or(u64::MAX);
        let ids: HashSet<String> = rt.block_on(async {
            if let Some((_, _, url)) = &pg {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let rows = sqlx::query("SELECT task_id::text AS task_id FROM tasker_tasks")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                return rows.iter().map(|r| r.get::<String, _>("task_id")).collect();
            }
            let url = format!("sqlite://{}", dir.join("data/read-model.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let rows = sqlx::query("SELECT task_id FROM tasker_tasks")
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            rows.iter().map(|r| r.get::<String, _>("task_id")).collect()
        });
        let missing = outcome
            .accepted
            .iter()
            .filter(|id| !ids.contains(*id))
            .count();
        if missing == 0 {
            println!(
                "read model: all {} accepted tasks present ({} rows) after {:.1} s of catching up",
                outcome.accepted.len(),
                ids.len(),
                caught_up.elapsed().as_secs_f64()
            );
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "{missing} accepted tasks never reached the read model (projector lag {behind})"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(server);
    if let Some((admin, name, _)) = &pg {
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(admin).await.unwrap();
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&pool)
            .await;
            pool.close().await;
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}
