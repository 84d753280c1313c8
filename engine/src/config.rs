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
    pub mirror: MirrorConfig,
    pub auth: AuthConfig,
    pub health: HealthConfig,
    pub telemetry: TelemetryConfig,
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

/// The JSON mirror: every event republished as a CloudEvents JSON message to a
/// Kafka topic, for consumers in any language (Kafka backend only; on the embedded
/// log `tasker tail --json` prints the same lines).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Run the mirror inside `tasker run`.
    pub enabled: bool,
    /// The topic it publishes to (created with the log's partition count).
    pub topic: String,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            enabled: false,
            topic: "tasker.events.json".into(),
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
    /// How long the broker may hold a fetch that finds nothing new: the idle
    /// cost of every reader (one fetch per reader per wait) against the read
    /// latency on brokers that answer a held fetch only when it expires.
    pub fetch_wait_ms: u64,
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
    /// When a started step goes to its handler: once its `step.started` is on disk
    /// (`durable`, default) or as soon as it is decided (`eager`).
    pub dispatch: Dispatch,
}

/// When started steps reach their handlers. `eager` (the default) saves one fsync
/// per DAG level of latency; the price is that a crash before the group commit
/// lands can run an attempt the log never records, so the restarted engine runs
/// the same attempt number again (Temporal records an activity's start only with
/// its result, for the same reason). Handlers are at-least-once either way;
/// nothing is recorded twice. `durable` waits for `step.started` to be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    Durable,
    #[default]
    Eager,
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
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
    /// JSON bodies nested deeper than this are refused (400).
    pub max_json_depth: usize,
}

/// Bearer-token authentication of the HTTP API (`/health/live` and
/// `/health/ready` never need it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub enabled: bool,
    /// Static bearer tokens with their permissions.
    pub tokens: Vec<StaticToken>,
    /// JSON Web Tokens signed with a configured key.
    pub jwt: Option<JwtConfig>,
}

/// One static bearer token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    /// Who holds it (logs, never the token itself).
    pub name: String,
    pub token: String,
    /// `tasker.<resource>:<action>`, `tasker.<resource>:*` or `*`.
    pub permissions: Vec<String>,
    /// Namespaces the permissions apply to; `*` (the default) is every namespace.
    #[serde(default = "all_namespaces")]
    pub namespaces: Vec<String>,
}

fn all_namespaces() -> Vec<String> {
    vec!["*".to_owned()]
}

/// How JWT bearer tokens are verified. Claims: `exp` (required), `sub`, and the
/// permission and namespace lists named by `permissions_claim` / `namespaces_claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// `HS256` (shared `secret`) or `RS256` (`public_key_file`, PEM).
    pub algorithm: String,
    pub secret: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    pub leeway: String,
    pub permissions_claim: String,
    pub namespaces_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: "HS256".into(),
            secret: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway: "30s".into(),
            permissions_claim: "permissions".into(),
            namespaces_claim: "namespaces".into(),
        }
    }
}

/// The resources and actions of API permissions (`tasker.<resource>:<action>`).
pub const PERMISSIONS: &[(&str, &[&str])] = &[
    ("task", &["create", "index", "show", "cancel", "retry"]),
    ("workflow_step", &["show", "resolve"]),
    ("handler", &["index"]),
    ("analytics", &["index"]),
    ("metrics", &["index"]),
    ("health_status", &["index"]),
];

/// Checks a permission's form: `*`, `tasker.<resource>:*` or `tasker.<resource>:<action>`.
pub fn check_permission(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let known = || {
        PERMISSIONS
            .iter()
            .map(|(r, a)| format!("tasker.{r}:{}", a.join("|")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((resource, action)) = p.strip_prefix("tasker.").and_then(|r| r.split_once(':')) else {
        return Err(format!(
            "not `tasker.<resource>:<action>` or `*`; known: {}",
            known()
        ));
    };
    match PERMISSIONS.iter().find(|(r, _)| *r == resource) {
        Some((_, actions)) if action == "*" || actions.contains(&action) => Ok(()),
        _ => Err(format!("unknown permission; known: {}", known())),
    }
}

/// What `/health/ready` and `/health/status` accept and cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Not ready while any partition's projector is more records behind than this...
    pub max_projector_lag_records: u64,
    /// ...or its newest projected event is older than the log's by more than this.
    pub max_projector_lag: String,
    /// How long `/health/status` reuses its counts.
    pub status_cache: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_projector_lag_records: 100_000,
            max_projector_lag: "60s".into(),
            status_cache: "15s".into(),
        }
    }
}

/// Traces and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (needs the `otlp` build feature).
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "tasker".into(),
        }
    }
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
            mirror: MirrorConfig::default(),
            auth: AuthConfig::default(),
            health: HealthConfig::default(),
            telemetry: TelemetryConfig::default(),
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
            fetch_wait_ms: 10,
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
            dispatch: Dispatch::Eager,
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
            max_body_bytes: 1024 * 1024,
            max_json_depth: 64,
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
    pub health_max_projector_lag: Duration,
    pub health_status_cache: Duration,
    pub jwt_leeway: Duration,
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
        if self.kafka.fetch_wait_ms > 60_000 {
            return Err(ConfigError::new(
                "kafka.fetch_wait_ms",
                self.kafka.fetch_wait_ms,
                "must be at most 60000",
            ));
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
        self.validate_mirror()?;
        let bind: SocketAddr = self.api.bind.parse().map_err(|e| {
            ConfigError::new(
                "api.bind",
                &self.api.bind,
                format!("not an address like 127.0.0.1:7878: {e}"),
            )
        })?;
        if self.api.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "api.max_body_bytes",
                self.api.max_body_bytes,
                "must be at least 1024",
            ));
        }
        if !(2..=1024).contains(&self.api.max_json_depth) {
            return Err(ConfigError::new(
                "api.max_json_depth",
                self.api.max_json_depth,
                "must be between 2 and 1024",
            ));
        }
        let jwt_leeway = self.validate_auth()?;
        let health_max_projector_lag =
            duration("health.max_projector_lag", &self.health.max_projector_lag)?;
        let health_status_cache = duration("health.status_cache", &self.health.status_cache)?;
        if let Some(url) = &self.telemetry.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "telemetry.otlp_endpoint",
                url,
                "must be an http:// or https:// URL",
            ));
        }
        Ok(Resolved {
            fsync,
            retention,
            snapshot_interval,
            watch_interval,
            bind,
            projector_delay,
            health_max_projector_lag,
            health_status_cache,
            jwt_leeway,
        })
    }
}

impl Config {
    /// `[auth]`: every token has a name, a secret and known permissions; the JWT
    /// key matches its algorithm. Returns the JWT leeway.
    fn validate_auth(&self) -> Result<Duration, ConfigError> {
        let auth = &self.auth;
        for (i, t) in auth.tokens.iter().enumerate() {
            let key = |field: &str| format!("auth.tokens[{i}].{field}");
            if t.name.trim().is_empty() {
                return Err(ConfigError::new(&key("name"), &t.name, "must not be empty"));
            }
            if t.token.len() < 16 {
                return Err(ConfigError {
                    key: key("token"),
                    value: None,
                    message: "must be at least 16 characters".into(),
                });
            }
            if auth.tokens[..i].iter().any(|o| o.token == t.token) {
                return Err(ConfigError {
                    key: key("token"),
                    value: None,
                    message: "is used by another token".into(),
                });
            }
            for p in &t.permissions {
                check_permission(p).map_err(|m| ConfigError::new(&key("permissions"), p, m))?;
            }
            if t.namespaces.is_empty() {
                return Err(ConfigError {
                    key: key("namespaces"),
                    value: None,
                    message: "must name at least one namespace (or `*` for all)".into(),
                });
            }
        }
        let Some(jwt) = &auth.jwt else {
            if auth.enabled && auth.tokens.is_empty() {
                return Err(ConfigError {
                    key: "auth.enabled".into(),
                    value: Some("true".into()),
                    message: "needs auth.tokens or auth.jwt, or nobody can call the API".into(),
                });
            }
            return Ok(Duration::from_secs(30));
        };
        match jwt.algorithm.as_str() {
            "HS256" => {
                if jwt.secret.as_deref().is_none_or(|s| s.len() < 32) {
                    return Err(ConfigError {
                        key: "auth.jwt.secret".into(),
                        value: None,
                        message: "HS256 needs a secret of at least 32 bytes".into(),
                    });
                }
            }
            "RS256" => {
                if jwt.public_key_file.is_none() {
                    return Err(ConfigError {
                        key: "auth.jwt.public_key_file".into(),
                        value: None,
                        message: "RS256 needs a PEM public key file".into(),
                    });
                }
            }
            other => {
                return Err(ConfigError::new(
                    "auth.jwt.algorithm",
                    other,
                    "must be HS256 or RS256",
                ));
            }
        }
        duration("auth.jwt.leeway", &jwt.leeway)
    }
}

impl Config {
    fn validate_mirror(&self) -> Result<(), ConfigError> {
        let topic = &self.mirror.topic;
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.is_empty()
            || topic.len() > 249
            || topic == "."
            || topic == ".."
            || !topic.chars().all(legal)
        {
            return Err(ConfigError::new(
                "mirror.topic",
                topic,
                "must be a Kafka topic name: 1-249 of A-Z a-z 0-9 . _ -",
            ));
        }
        if *topic == self.log.topic {
            return Err(ConfigError::new(
                "mirror.topic",
                topic,
                "must differ from log.topic (the mirror would read its own output)",
            ));
        }
        if self.mirror.enabled && self.log.backend != Backend::Kafka {
            return Err(ConfigError::new(
                "mirror.enabled",
                true,
                "the mirror publishes to Kafka and needs log.backend = \"kafka\"; on the embedded log, `tasker tail --json` prints the same CloudEvents",
            ));
        }
        Ok(())
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
        assert!(!c.auth.enabled);
        assert_eq!(c.api.max_body_bytes, 1 << 20);
        assert_eq!(r.health_status_cache, Duration::from_secs(15));
    }

    #[test]
    fn auth_tokens_and_jwt_parse() {
        let toml = r#"
[auth]
enabled = true
[[auth.tokens]]
name = "ops"
token = "0123456789abcdef"
permissions = ["tasker.task:*", "tasker.metrics:index"]
namespaces = ["shop"]
[auth.jwt]
algorithm = "HS256"
secret = "0123456789abcdef0123456789abcdef"
"#;
        let (c, r) = Config::from_sources(toml, "tasker.toml", env(&[])).unwrap();
        assert_eq!(c.auth.tokens.len(), 1);
        assert_eq!(c.auth.tokens[0].namespaces, vec!["shop".to_owned()]);
        assert_eq!(
            c.auth.jwt.as_ref().unwrap().permissions_claim,
            "permissions"
        );
        assert_eq!(r.jwt_leeway, Duration::from_secs(30));
        assert!(check_permission("*").is_ok());
        assert!(check_permission("tasker.workflow_step:resolve").is_ok());
        assert!(check_permission("tasker.workflow_step:cancel").is_err());
        assert!(check_permission("task:create").is_err());
    }

    #[test]
    fn file_then_env_overrides() {
        let toml = "[log]\npartitions = 2\n[execution]\nmax_concurrent_steps = 10\n";
        let (c, _) = Config::from_sources(
            toml,
            "tasker.toml",
            env(&[
                ("TASKER_EXECUTION__MAX_CONCURRENT_STEPS", "32"),
                ("TASKER_EXECUTION__DISPATCH", "durable"),
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
        assert_eq!(c.execution.dispatch, Dispatch::Durable);
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
            (
                "",
                &[("TASKER_KAFKA__FETCH_WAIT_MS", "600000")],
                "kafka.fetch_wait_ms` = \"600000\"",
            ),
            ("[log]\nbakend = \"file\"", &[], "bakend"),
            ("", &[("TASKER_LOG__BAKEND", "file")], "TASKER_LOG__BAKEND"),
            ("", &[("TASKER_LOG__PARTITIONS", "many")], "partitions"),
            ("", &[("TASKER_EXECUTION__DISPATCH", "soon")], "dispatch"),
            ("[log\n", &[], "tasker.toml"),
            (
                "[api]\nmax_body_bytes = 10",
                &[],
                "api.max_body_bytes` = \"10\"",
            ),
            ("[auth]\nenabled = true", &[], "auth.enabled"),
            (
                "[[auth.tokens]]\nname = \"ci\"\ntoken = \"0123456789abcdef\"\npermissions = [\"tasker.task:fly\"]",
                &[],
                "auth.tokens[0].permissions` = \"tasker.task:fly\"",
            ),
            (
                "[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"short\"",
                &[],
                "auth.jwt.secret",
            ),
            (
                "[auth.jwt]\nalgorithm = \"ES256\"",
                &[],
                "auth.jwt.algorithm` = \"ES256\"",
            ),
            (
                "",
                &[("TASKER_HEALTH__STATUS_CACHE", "often")],
                "health.status_cache` = \"often\"",
            ),
            (
                "[telemetry]\notlp_endpoint = \"grpc:4317\"",
                &[],
                "telemetry.otlp_endpoint",
            ),
        ];
        for (toml, vars, expected) in cases {
            let err = Config::from_sources(toml, "tasker.toml", env(vars)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
    }

    #[test]
    fn the_mirror_is_off_by_default_and_validated() {
        let (c, _) = Config::from_sources("", "defaults", env(&[])).unwrap();
        assert!(!c.mirror.enabled);
        assert_eq!(c.mirror.topic, "tasker.events.json");
        let kafka = [
            ("TASKER_LOG__BACKEND", "kafka"),
            ("TASKER_KAFKA_BROKERS", "h:9092"),
        ];
        let (c, _) = Config::from_sources("[mirror]\nenabled = true\n", "t", env(&kafka)).unwrap();
        assert!(c.mirror.enabled);
        for (toml, vars, expected) in [
            ("[mirror]\nenabled = true", &[][..], "mirror.enabled"),
            (
                "[mirror]\ntopic = \"a b\"",
                &kafka[..],
                "mirror.topic` = \"a b\"",
            ),
            (
                "[mirror]\ntopic = \"tasker.log\"",
                &kafka[..],
                "must differ from log.topic",
            ),
            ("[mirror]\ntopic = \"\"", &[][..], "mirror.topic"),
        ] {
            let err = Config::from_sources(toml, "t", env(vars)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
    }
}
