//! Running the `tasker` binary as a child process, as a user would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tasker")
}

/// `tasker --data-dir <dir> <args>` with a clean environment for Tasker settings.
pub fn tasker(data_dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--data-dir").arg(data_dir);
    // The child sees only what the test gives it: scripts/test exports DATABASE_URL
    // for the PostgreSQL tests, and servers sharing that database would see each
    // other's tasks.
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKER_") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c.env("TASKER_API__BIND", "127.0.0.1:0");
    c
}

/// A `tasker run` child process and its API address.
pub struct Server {
    pub child: Child,
    pub api: String,
    pub data_dir: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `tasker run` and waits until its API answers.
    pub fn start(data_dir: &Path, templates: &Path, env: &[(&str, &str)]) -> Server {
        let info = data_dir.join("run.json");
        let _ = std::fs::remove_file(&info);
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.join(format!("run-{}.log", std::process::id()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = tasker(data_dir);
        cmd.arg("run").arg("--templates").arg(templates);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn tasker run");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "tasker run exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&info)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(child.id()))
            {
                let api = v["api"].as_str().unwrap().to_owned();
                return Server {
                    child,
                    api,
                    data_dir: data_dir.to_owned(),
                    log,
                };
            }
            assert!(Instant::now() < deadline, "tasker run did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or snapshot.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "tasker run exited with {status}: {}",
                    self.logs()
                );
                return;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("tasker run did not stop on SIGTERM: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    /// A test that fails half way must not leave its server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A database of its own on `DATABASE_URL`'s server, dropped with this value, for
/// tests whose engines share a read model.
pub struct Database {
    pub url: String,
    server: String,
    name: String,
}

impl Database {
    pub async fn create() -> Database {
        use sqlx::Connection;
        let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "DATABASE_URL is not set. This test needs PostgreSQL: run scripts/test (it \
                 provisions one), or export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
            )
        });
        let name = format!("tasker_e2e_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL ({server}): {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let mut url = reqwest::Url::parse(&server).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        Database {
            url: url.to_string(),
            server,
            name,
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // A runtime of its own: the value may drop inside another one.
        let _ = std::thread::spawn(move || {
            use sqlx::Connection;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                anyhow::Ok(())
            })?;
            anyhow::Ok(())
        })
        .join();
    }
}
