//! Talking to a running `tasker run` from other CLI invocations: it advertises its
//! API address in `<data_dir>/run.json`. With `auth.enabled`, the CLI sends
//! `TASKER_API_TOKEN` as its bearer token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{Accepted, DigestJson, Problem};
use crate::views::TaskJson;

/// What `tasker run` writes while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub pid: u32,
    pub api: String,
}

pub fn run_info_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run.json")
}

/// The running engine for `data_dir`, if its process is alive.
pub fn find_running(data_dir: &Path) -> Option<RunInfo> {
    let text = std::fs::read_to_string(run_info_path(data_dir)).ok()?;
    let info: RunInfo = serde_json::from_str(&text).ok()?;
    Path::new(&format!("/proc/{}", info.pid))
        .exists()
        .then_some(info)
}

fn auth_headers() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("TASKER_API_TOKEN")
        && let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        h.insert(reqwest::header::AUTHORIZATION, v);
    }
    h
}

/// A command's answer from the API.
#[derive(Debug)]
pub enum Answer {
    Ok(Accepted),
    Refused(Problem),
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(auth_headers())
                .build()
                .unwrap_or_default(),
        }
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await?;
        if resp.status().is_success() {
            Ok(Answer::Ok(resp.json().await?))
        } else {
            Ok(Answer::Refused(resp.json().await?))
        }
    }

    pub async fn task(&self, id: &str) -> anyhow::Result<Result<TaskJson, Problem>> {
        let resp = self
            .http
            .get(format!("{}/v1/tasks/{id}", self.base))
            .send()
            .await?;
        if resp.status().is_success() {
            Ok(Ok(resp.json().await?))
        } else {
            Ok(Err(resp.json().await?))
        }
    }

    pub async fn projector(&self) -> anyhow::Result<Vec<crate::api::ProjectorJson>> {
        Ok(self
            .http
            .get(format!("{}/v1/projector", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn digests(&self) -> anyhow::Result<Vec<DigestJson>> {
        Ok(self
            .http
            .get(format!("{}/v1/digests", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}
