//! Shared by the `api_*` tests: templates, a `tasker run` with a config file, and
//! a small blocking HTTP client that returns status, headers and JSON.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder};
use serde_json::Value;

use crate::support::Server;

pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "shop/order.yaml",
        r#"
namespace: shop
name: order
version: 1.0.0
description: Validate, charge, ship.
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: { type: integer }
steps:
  - name: validate
    handler: noop
  - name: charge
    handler: noop
    depends_on: [validate]
  - name: ship
    handler: noop
    depends_on: [charge]
"#,
    ),
    (
        "shop/broken.yaml",
        r#"
namespace: shop
name: broken
version: 1.0.0
description: A step that always fails for good, and one after it.
steps:
  - name: explode
    handler: fail
    retryable: false
    config: { always: true, permanent: true }
  - name: after
    handler: noop
    depends_on: [explode]
"#,
    ),
    (
        "shop/slow.yaml",
        r#"
namespace: shop
name: slow
version: 1.0.0
description: Sleeps long enough to be cancelled.
steps:
  - name: nap
    handler: sleep
    timeout: 5m
    config: { ms: 120000 }
"#,
    ),
    (
        "billing/invoice.yaml",
        r#"
namespace: billing
name: invoice
version: 2.1.0
description: Another namespace.
steps:
  - name: draft
    handler: noop
"#,
    ),
];

/// A temp dir with templates, a data dir, and `tasker.toml` holding `config`.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub templates: PathBuf,
    pub data: PathBuf,
    pub config: PathBuf,
}

impl Env {
    pub fn new(config: &str) -> Env {
        let dir = tempfile::TempDir::new().unwrap();
        let templates = dir.path().join("templates");
        for (name, yaml) in TEMPLATES {
            let path = templates.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, yaml).unwrap();
        }
        let config_path = dir.path().join("tasker.toml");
        std::fs::write(&config_path, config).unwrap();
        Env {
            data: dir.path().join("data"),
            templates,
            config: config_path,
            dir,
        }
    }

    pub fn start(&self, env: &[(&str, &str)]) -> Server {
        let config = self.config.display().to_string();
        let mut all = vec![("TASKER_CONFIG", config.as_str())];
        all.extend_from_slice(env);
        Server::start(&self.data, &self.templates, &all)
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub correlation: Option<String>,
    pub www_authenticate: Option<String>,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }

    /// Asserts an RFC 9457 problem with this status and reason.
    pub fn problem(&self, status: u16, reason: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.content_type, "application/problem+json",
            "{}",
            self.text
        );
        let p = self.json();
        assert_eq!(p["status"], status, "{p}");
        assert_eq!(p["reason"], reason, "{p}");
        assert!(p["type"].as_str().unwrap().ends_with(reason), "{p}");
        assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
        p
    }
}

/// A blocking client for one server, with an optional bearer token.
pub struct Api {
    pub base: String,
    pub http: Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            http: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            token: None,
        }
    }

    pub fn with_token(&self, token: &str) -> Api {
        Api {
            base: self.base.clone(),
            http: self.http.clone(),
            token: Some(token.to_owned()),
        }
    }

    fn send(&self, rb: RequestBuilder) -> Answer {
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let resp = rb.send().unwrap();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let correlation = header("x-correlation-id");
        let www_authenticate = header("www-authenticate");
        let status = resp.status().as_u16();
        Answer {
            status,
            content_type,
            correlation,
            www_authenticate,
            text: resp.text().unwrap(),
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    pub fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    /// POSTs raw bytes as `content_type`.
    pub fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .body(body),
        )
    }

    pub fn request(&self, rb: RequestBuilder) -> Answer {
        self.send(rb)
    }

    /// Requests a `shop/order` task and returns its id.
    pub fn order(&self, order_id: i64) -> String {
        let a = self.post(
            "/v1/tasks",
            &serde_json::json!({"namespace": "shop", "name": "order", "context": {"order_id": order_id}}),
        );
        assert_eq!(a.status, 202, "{}", a.text);
        a.json()["task_id"].as_str().unwrap().to_owned()
    }

    /// Waits until `GET /v1/tasks/{id}` shows `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.get(&format!("/v1/tasks/{id}"));
            if a.status == 200 && a.json()["status"] == status {
                return a.json();
            }
            assert!(
                Instant::now() < deadline,
                "task {id} never reached {status}: {}",
                a.text
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `path` answers 200 and `ok` holds for its JSON.
    pub fn wait_for(&self, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.get(path);
            if a.status == 200 && ok(&a.json()) {
                return a.json();
            }
            assert!(
                Instant::now() < deadline,
                "{path} never matched: {}",
                a.text
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
