//! OTLP export: `tasker run` built with the `otlp` feature and
//! `telemetry.otlp_endpoint` set posts its spans (OTLP/HTTP, protobuf) to the
//! collector, at the default verbosity, with the task id on them. The collector
//! here is a plain HTTP listener that keeps what it receives; the bytes are the
//! exporter's real requests.
#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Server;

const TEMPLATE: &str = "namespace: otel\nname: two\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n";

/// Correlation ids are UUIDs; other values are replaced by a generated one.
const CORRELATION: &str = "0192f0c4-1d2e-7a3b-8c4d-5e6f708192a3";

/// (path, body) of every request the collector got.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Accepts HTTP/1.1 requests (keep-alive) and answers each with an empty 200,
/// which is an empty `ExportTraceServiceResponse`.
fn collector() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let got: Received = Arc::default();
    let sink = Arc::clone(&got);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h == "\r\n" || h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    sink.lock().unwrap().push((path, body));
                    out.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    )
                    .unwrap();
                }
            });
        }
    });
    (addr, got)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn spans_reach_the_collector_with_the_task_id() {
    let (endpoint, got) = collector();
    let dir = tempfile::TempDir::new().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("two.yaml"), TEMPLATE).unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &templates,
        &[
            ("TASKER_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("TASKER_TELEMETRY__SERVICE_NAME", "tasker-otlp-test"),
            ("TASKER_PROJECTOR__ENABLED", "false"),
        ],
    );
    let http = reqwest::blocking::Client::new();
    let created: Value = http
        .post(format!("{}/v1/tasks", server.api))
        .header("x-correlation-id", CORRELATION)
        .json(&json!({"namespace": "otel", "name": "two", "context": {}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let task_id = created["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t: Value = http
            .get(format!("{}/v1/tasks/{task_id}", server.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if t["status"] == "complete" {
            break;
        }
        assert!(Instant::now() < deadline, "task did not complete: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clean stop flushes the batch exporter.
    server.stop();
    let got = got.lock().unwrap();
    let traces: Vec<&Vec<u8>> = got
        .iter()
        .filter(|(path, _)| path == "/v1/traces")
        .map(|(_, body)| body)
        .collect();
    assert!(
        !traces.is_empty(),
        "no POST /v1/traces reached the collector; got {:?}",
        got.iter().map(|(p, b)| (p, b.len())).collect::<Vec<_>>()
    );
    let all: Vec<u8> = traces.into_iter().flatten().copied().collect();
    assert!(
        contains(&all, b"tasker-otlp-test"),
        "the service name is on the resource"
    );
    assert!(
        contains(&all, task_id.as_bytes()),
        "a span carries the task id {task_id}"
    );
    assert!(
        contains(&all, CORRELATION.as_bytes()),
        "a span carries the correlation id from X-Correlation-ID"
    );
}
