//! Typed configuration: `tasker.toml` plus `TASKER_*` environment overrides,
//! validated at start. Every error names the key and the bad value. No file and no
//! variables at all gives the embedded default under `./tasker-data`.
//!
//! Environment overrides: `TASKER_<SECTION>__<KEY>=value` (double underscore between
//! levels), e.g. `TASKER_LOG__BACKEND=kafka`, `TASKER_EXECUTION__MAX_CONCURRENT_STEPS=64`.
//! Aliases: `TASKER_DATA_DIR`, `TASKER_KAFKA_BROKERS` (-> `kafka.brokers`) and
//! `DATABASE_URL` (-> `database.url`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::log::file::FsyncPolicy;

/// A configuration problem, naming the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config `{key}`{}: {message}", value.as_ref().map(|v| format!(" = {v:?}")).unwrap_or_default())]
pub struct ConfigError {
    pub key: String,
    pub value: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, value: impl std::fmt::Display, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_owned(),
            value: Some(value.to_string()),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    File,
    Kafka,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded log, snapshots and the SQLite read model live.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub kafka: KafkaConfig,
    pub engine: EngineConfig,
    pub execution: ExecutionConfig,
    pub templates: TemplatesConfig,
    pub api: ApiConfig,
    pub database: DatabaseConfig,
    pub projector: ProjectorConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Run the read-model projector inside `tasker run`.
    pub enabled: bool,
    /// Records per read-model transaction, at most.
    pub batch_records: usize,
    /// How long a partial batch waits for more records.
    pub max_delay: String,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            enabled: true,
            batch_records: 10_000,
            max_delay: "50ms".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub backend: Backend,
    /// Fixed when the log is created.
    pub partitions: u32,
    /// `batch` (group commit, default), `always`, `interval:<duration>`, `never`.
    pub fsync: String,
    pub segment_bytes: u64,
    /// The Kafka topic (and the embedded log's name in messages).
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: Option<String>,
    pub group_id: String,
    /// Producer batching: how long to wait to fill a batch.
    pub linger_ms: u64,
    pub batch_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// How long a finished task stays in memory (idempotency, retry, status).
    pub retention: String,
    /// Write a state snapshot after this many events...
    pub snapshot_every_events: u64,
    /// ...or this long, whichever comes first.
    pub snapshot_interval: String,
    /// `task.requested` contexts larger than this are rejected.
    pub max_context_bytes: usize,
    /// Records decided and appended per processor round, at most.
    pub max_batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    pub min_concurrent_steps: usize,
    pub max_concurrent_steps: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// A directory of template YAML files; none = only the bundled examples.
    pub dir: Option<PathBuf>,
    /// Reload templates when files in `dir` change.
    pub watch: bool,
    pub watch_interval: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub bind: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL for the read model; none = SQLite under `data_dir`.
    pub url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tasker-data"),
            log: LogConfig::default(),
            kafka: KafkaConfig::default(),
            engine: EngineConfig::default(),
            execution: ExecutionConfig::default(),
            templates: TemplatesConfig::default(),
            api: ApiConfig::default(),
            database: DatabaseConfig::default(),
            projector: ProjectorConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: Backend::File,
            partitions: 4,
            fsync: "batch".into(),
            segment_bytes: 64 * 1024 * 1024,
            topic: "tasker.log".into(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: None,
            group_id: "tasker-engine".into(),
            linger_ms: 5,
            batch_size: 1_000_000,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            retention: "15m".into(),
            snapshot_every_events: 1_000_000,
            snapshot_interval: "60s".into(),
            max_context_bytes: 256 * 1024,
            max_batch: 8192,
        }
    }
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            min_concurrent_steps: 8,
            max_concurrent_steps: 512,
        }
    }
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: None,
            watch: true,
            watch_interval: "1s".into(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            bind: "127.0.0.1:7878".into(),
        }
    }
}

/// Settings parsed out of their string forms, ready for the runtime.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub fsync: FsyncPolicy,
    pub retention: Duration,
    pub snapshot_interval: Duration,
    pub watch_interval: Duration,
    pub bind: SocketAddr,
    pub projector_delay: Duration,
}

const ALIASES: &[(&str, &str)] = &[
    ("TASKER_DATA_DIR", "data_dir"),
    ("TASKER_KAFKA_BROKERS", "kafka.brokers"),
    ("DATABASE_URL", "database.url"),
];

impl Config {
    /// Loads `path` (if given, it must exist; otherwise `./tasker.toml` if present),
    /// applies the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<(Config, Resolved), ConfigError> {
        let (text, source) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ConfigError {
                    key: "--config".into(),
                    value: Some(p.display().to_string()),
                    message: format!("cannot read: {e}"),
                })?,
                p.display().to_string(),
            ),
            None => match std::fs::read_to_string("tasker.toml") {
                Ok(t) => (t, "tasker.toml".to_owned()),
                Err(_) => (String::new(), "defaults".to_owned()),
            },
        };
        Config::from_sources(&text, &source, std::env::vars())
    }

    /// Parses TOML text and applies `env` overrides, then validates.
    pub fn from_sources(
        toml_text: &str,
        source: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Resolved), ConfigError> {
        let mut table: toml::Table = toml::from_str(toml_text).map_err(|e| ConfigError {
            key: source.to_owned(),
            value: None,
            message: e.message().to_owned(),
        })?;
        let mut from_env = Vec::new();
        for (name, value) in env {
            let path = if let Some((_, p)) = ALIASES.iter().find(|(n, _)| *n == name) {
                (*p).to_owned()
            } else if let Some(rest) = name.strip_prefix("TASKER_")
                && rest.contains("__")
            {
                rest.to_ascii_lowercase().replace("__", ".")
            } else {
                continue;
            };
            set_path(&mut table, &path, parse_env_value(&value)).map_err(|message| {
                ConfigError::new(&path, &value, format!("{message} (from {name})"))
            })?;
            from_env.push((path, name));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let var = from_env
                    .iter()
                    .find(|(path, _)| *path == key)
                    .map(|(_, var)| format!(" (from {var})"))
                    .unwrap_or_default();
                let message = e.into_inner().to_string();
                ConfigError {
                    key: if key == "." { source.to_owned() } else { key },
                    value: None,
                    message: format!("{}{var}", message.trim()),
                }
            })?;
        let resolved = config.validate()?;
        Ok((config, resolved))
    }

    /// Checks every setting's range and form.
    pub fn validate(&self) -> Result<Resolved, ConfigError> {
        if !(1..=1024).contains(&self.log.partitions) {
            return Err(ConfigError::new(
                "log.partitions",
                self.log.partitions,
                "must be between 1 and 1024",
            ));
        }
        if self.log.segment_bytes < 4096 {
            return Err(ConfigError::new(
                "log.segment_bytes",
                self.log.segment_bytes,
                "must be at least 4096",
            ));
        }
        let fsync: FsyncPolicy = self
            .log
            .fsync
            .parse()
            .map_err(|e: String| ConfigError::new("log.fsync", &self.log.fsync, e))?;
        if self.log.backend == Backend::Kafka
            && self.kafka.brokers.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError {
                key: "kafka.brokers".into(),
                value: None,
                message: "required when log.backend = \"kafka\" (or set TASKER_KAFKA_BROKERS)"
                    .into(),
            });
        }
        let e = &self.execution;
        if e.max_concurrent_steps == 0 || e.max_concurrent_steps > 100_000 {
            return Err(ConfigError::new(
                "execution.max_concurrent_steps",
                e.max_concurrent_steps,
                "must be between 1 and 100000",
            ));
        }
        if e.min_concurrent_steps == 0 || e.min_concurrent_steps > e.max_concurrent_steps {
            return Err(ConfigError::new(
                "execution.min_concurrent_steps",
                e.min_concurrent_steps,
                format!(
                    "must be between 1 and execution.max_concurrent_steps ({})",
                    e.max_concurrent_steps
                ),
            ));
        }
        if self.engine.max_context_bytes == 0
            || self.engine.max_context_bytes > crate::codec::MAX_RECORD_BYTES / 2
        {
            return Err(ConfigError::new(
                "engine.max_context_bytes",
                self.engine.max_context_bytes,
                format!(
                    "must be between 1 and {}",
                    crate::codec::MAX_RECORD_BYTES / 2
                ),
            ));
        }
        if self.engine.max_batch == 0 {
            return Err(ConfigError::new(
                "engine.max_batch",
                0,
                "must be at least 1",
            ));
        }
        if self.engine.snapshot_every_events == 0 {
            return Err(ConfigError::new(
                "engine.snapshot_every_events",
                0,
                "must be at least 1",
            ));
        }
        let retention = duration("engine.retention", &self.engine.retention)?;
        let snapshot_interval =
            duration("engine.snapshot_interval", &self.engine.snapshot_interval)?;
        let watch_interval = duration("templates.watch_interval", &self.templates.watch_interval)?;
        let projector_delay = duration("projector.max_delay", &self.projector.max_delay)?;
        if self.projector.batch_records == 0 {
            return Err(ConfigError::new(
                "projector.batch_records",
                0,
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            return Err(ConfigError::new(
                "database.url",
                url,
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        let bind: SocketAddr = self.api.bind.parse().map_err(|e| {
            ConfigError::new(
                "api.bind",
                &self.api.bind,
                format!("not an address like 127.0.0.1:7878: {e}"),
            )
        })?;
        Ok(Resolved {
            fsync,
            retention,
            snapshot_interval,
            watch_interval,
            bind,
            projector_delay,
        })
    }
}

fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| ConfigError::new(key, text, format!("not a duration like 30s or 15m: {e}")))
}

/// Environment values are TOML literals when they parse as one (numbers, booleans),
/// otherwise strings.
fn parse_env_value(raw: &str) -> toml::Value {
    let trimmed = raw.trim();
    if let Ok(table) = toml::from_str::<toml::Table>(&format!("v = {trimmed}"))
        && let Some(v) = table.get("v")
        && !matches!(v, toml::Value::Table(_))
    {
        return v.clone();
    }
    toml::Value::String(raw.to_owned())
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return Err("empty key".into());
    };
    let mut cur = table;
    for part in parts {
        let entry = cur
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    cur.insert(last.to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_the_embedded_engine() {
        let (c, r) = Config::from_sources("", "defaults", env(&[])).unwrap();
        assert_eq!(c.log.backend, Backend::File);
        assert_eq!(c.data_dir, PathBuf::from("tasker-data"));
        assert_eq!(r.fsync, FsyncPolicy::Batch);
        assert_eq!(r.retention, Duration::from_secs(900));
        assert_eq!(r.bind.port(), 7878);
    }

    #[test]
    fn file_then_env_overrides() {
        let toml = "[log]\npartitions = 2\n[execution]\nmax_concurrent_steps = 10\n";
        let (c, _) = Config::from_sources(
            toml,
            "tasker.toml",
            env(&[
                ("TASKER_EXECUTION__MAX_CONCURRENT_STEPS", "32"),
                ("TASKER_LOG__BACKEND", "kafka"),
                ("TASKER_KAFKA_BROKERS", "127.0.0.1:9092"),
                ("DATABASE_URL", "postgres://localhost/test"),
                ("TASKER_BLESS", "1"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.log.partitions, 2);
        assert_eq!(c.execution.max_concurrent_steps, 32);
        assert_eq!(c.log.backend, Backend::Kafka);
        assert_eq!(c.kafka.brokers.as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(c.database.url.as_deref(), Some("postgres://localhost/test"));
    }

    #[test]
    fn errors_name_the_key_and_value() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[log]\npartitions = 0", &[], "log.partitions` = \"0\""),
            (
                "[log]\nfsync = \"sometimes\"",
                &[],
                "log.fsync` = \"sometimes\"",
            ),
            (
                "",
                &[("TASKER_EXECUTION__MIN_CONCURRENT_STEPS", "9999")],
                "execution.min_concurrent_steps` = \"9999\"",
            ),
            (
                "[engine]\nretention = \"forever\"",
                &[],
                "engine.retention` = \"forever\"",
            ),
            (
                "[api]\nbind = \"localhost\"",
                &[],
                "api.bind` = \"localhost\"",
            ),
            ("[log]\nbackend = \"kafka\"", &[], "kafka.brokers"),
            ("[log]\nbakend = \"file\"", &[], "bakend"),
            ("", &[("TASKER_LOG__BAKEND", "file")], "TASKER_LOG__BAKEND"),
            ("", &[("TASKER_LOG__PARTITIONS", "many")], "partitions"),
            ("[log\n", &[], "tasker.toml"),
        ];
        for (toml, vars, expected) in cases {
            let err = Config::from_sources(toml, "tasker.toml", env(vars)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
    }
}
