//! Building the engine's parts from configuration: the log, the template registry
//! and the runtime options.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tasker_engine::config::{Backend, Config, Resolved};
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::log::{Log, LogError};
use tasker_engine::registry::TemplateRegistry;

use crate::cli::Cli;
use crate::examples;
use crate::failure::WithHint;

/// Validated configuration for this invocation.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: Config,
    pub resolved: Resolved,
}

impl Setup {
    pub fn load(cli: &Cli) -> anyhow::Result<Setup> {
        let (mut config, resolved) = Config::load(cli.config.as_deref())
            .hint("fix the key named above in tasker.toml or the TASKER_* variable")?;
        if let Some(dir) = &cli.data_dir {
            config.data_dir = dir.clone();
        }
        Ok(Setup { config, resolved })
    }

    pub fn log_dir(&self) -> PathBuf {
        self.config.data_dir.join("log")
    }

    /// Opens the log for reading and writing (creating the embedded one if missing).
    pub fn open_log(&self) -> anyhow::Result<Arc<dyn Log>> {
        match self.config.log.backend {
            Backend::File => {
                let log = FileLog::open(
                    self.log_dir(),
                    FileLogConfig {
                        partitions: self.config.log.partitions,
                        segment_bytes: self.config.log.segment_bytes,
                        fsync: self.resolved.fsync,
                        faults: None,
                    },
                )
                .map_err(explain_log_error)?;
                Ok(Arc::new(log))
            }
            Backend::Kafka => {
                let log = self.open_kafka()?;
                // The producer connects and gets its id (idempotence) now, not
                // during the first append, which would wait ~500 ms for it.
                if let Err(e) = log.connect_writers(Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "the producer could not connect yet; appends will retry");
                }
                Ok(Arc::new(log))
            }
        }
    }

    fn open_kafka(&self) -> anyhow::Result<KafkaLog> {
        KafkaLog::open(self.kafka_config()?)
            .map_err(anyhow::Error::from)
            .hint("check kafka.brokers / TASKER_KAFKA_BROKERS and that the brokers are up")
    }

    pub fn kafka_config(&self) -> anyhow::Result<KafkaLogConfig> {
        let brokers = self
            .config
            .kafka
            .brokers
            .clone()
            .ok_or_else(|| anyhow::anyhow!("kafka.brokers is not set"))
            .hint("set TASKER_KAFKA_BROKERS=host:9092")?;
        let mut c =
            KafkaLogConfig::new(&brokers, &self.config.log.topic, self.config.log.partitions);
        c.linger_ms = self.config.kafka.linger_ms;
        c.batch_size = self.config.kafka.batch_size;
        c.fetch_wait_ms = self.config.kafka.fetch_wait_ms;
        Ok(c)
    }

    /// Opens an existing log for reading (the embedded one without its writer lock,
    /// with the partition count it was created with).
    pub fn open_log_for_reading(&self) -> anyhow::Result<Arc<dyn Log>> {
        if self.config.log.backend == Backend::Kafka {
            return Ok(Arc::new(self.open_kafka()?));
        }
        let dir = self.log_dir();
        let log = FileLog::open_existing(&dir)
            .map_err(explain_log_error)
            .hint(format!(
                "no log at {}; run `tasker run` or `tasker submit` first, or pass --data-dir",
                dir.display()
            ))?;
        Ok(Arc::new(log))
    }

    /// Bundled examples plus the configured (or given) template directory. Invalid
    /// template files fail the start with every error listed.
    pub fn registry(
        &self,
        handlers: Arc<HandlerRegistry>,
        dir_override: Option<&Path>,
    ) -> anyhow::Result<Arc<TemplateRegistry>> {
        let dir = dir_override
            .map(Path::to_owned)
            .or_else(|| self.config.templates.dir.clone());
        let registry = Arc::new(TemplateRegistry::new(handlers, dir.clone()));
        for (name, yaml) in examples::TEMPLATES {
            registry
                .add_yaml(yaml, name)
                .with_context(|| format!("bundled template {name}"))?;
        }
        if let Some(dir) = &dir {
            if !dir.is_dir() {
                return Err(anyhow::anyhow!(
                    "template directory {} does not exist",
                    dir.display()
                ))
                .hint("create it, or point templates.dir / --templates at one");
            }
            let report = registry.load_dir();
            if !report.errors.is_empty() {
                let all: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
                return Err(anyhow::anyhow!("invalid templates:\n{}", all.join("\n")))
                    .hint(format!("run `tasker templates check {}`", dir.display()));
            }
        }
        Ok(registry)
    }
}

/// Adds what to do about the common log errors.
pub fn explain_log_error(e: LogError) -> anyhow::Error {
    let hint = match &e {
        LogError::Locked { .. } => {
            "another `tasker run` owns this log; send commands to it (it answers on api.bind) or stop it"
        }
        LogError::Corrupt { .. } => {
            "the log is damaged where named; restore it from a backup, or truncate it there on purpose"
        }
        LogError::Config(_) => "check log.partitions against the existing log",
        _ => "check the path and its permissions",
    };
    anyhow::Error::new(crate::failure::Hinted {
        error: e.into(),
        hint: hint.into(),
    })
}
