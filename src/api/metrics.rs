//! `/metrics`: the engine's counters, gauges and hdrhistogram latencies, the
//! projector's lag and rejected records by reason, in the Prometheus text format
//! (version 0.0.4). Latencies are rendered twice: as a histogram with fixed
//! buckets (aggregatable across engines) and as a summary with quantiles read
//! from the hdrhistogram (exact to 3 significant digits).

use std::fmt::Write as _;

use axum::extract::{Extension, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hdrhistogram::Histogram;
use tasker_engine::runtime::{Metrics, PartitionStatus};

use super::AppState;
use super::auth::{Permission, Principal};
use super::problem::Problem;

/// Bucket bounds in seconds for latency histograms.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Bucket bounds for batch sizes (records).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0,
];
const QUANTILES: &[f64] = &[0.5, 0.9, 0.99, 0.999];

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, "", value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.family(name, "gauge", help);
        self.sample(name, "", value);
    }

    /// A histogram and a summary of `h`, whose values are `unit` of the rendered
    /// unit (e.g. 1e-6 for microseconds rendered as seconds).
    fn distribution(
        &mut self,
        name: &str,
        help: &str,
        h: &Histogram<u64>,
        unit: f64,
        buckets: &[f64],
    ) {
        self.family(name, "histogram", help);
        for le in buckets {
            let raw = (le / unit).floor() as u64;
            let count = if h.is_empty() {
                0
            } else {
                h.count_between(0, raw)
            };
            self.sample(&format!("{name}_bucket"), &format!("le=\"{le}\""), count);
        }
        self.sample(&format!("{name}_bucket"), "le=\"+Inf\"", h.len());
        let sum: f64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum();
        self.sample(&format!("{name}_sum"), "", sum * unit);
        self.sample(&format!("{name}_count"), "", h.len());
        let q = format!("{name}_quantiles");
        self.family(
            &q,
            "summary",
            &format!("{help} (quantiles from the hdrhistogram)"),
        );
        for quantile in QUANTILES {
            let v = if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(*quantile) as f64 * unit
            };
            self.sample(&q, &format!("quantile=\"{quantile}\""), v);
        }
        self.sample(&format!("{q}_sum"), "", sum * unit);
        self.sample(&format!("{q}_count"), "", h.len());
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text for an engine's `Metrics` and this process's projector.
pub fn render(state: &AppState) -> String {
    let m: &Metrics = state.engine.metrics();
    let mut o = Out(String::with_capacity(16 * 1024));
    o.family("tasker_tasks_total", "counter", "Tasks by outcome.");
    for (outcome, c) in [
        ("accepted", &m.tasks_accepted),
        ("completed", &m.tasks_completed),
        ("failed", &m.tasks_failed),
        ("cancelled", &m.tasks_cancelled),
        ("resolved_manually", &m.tasks_resolved),
    ] {
        o.sample(
            "tasker_tasks_total",
            &format!("outcome=\"{outcome}\""),
            c.get(),
        );
    }
    o.family("tasker_steps_total", "counter", "Step attempts by outcome.");
    for (outcome, c) in [
        ("started", &m.steps_started),
        ("completed", &m.steps_completed),
        ("failed", &m.steps_failed),
        ("retried", &m.steps_retried),
    ] {
        o.sample(
            "tasker_steps_total",
            &format!("outcome=\"{outcome}\""),
            c.get(),
        );
    }
    o.family(
        "tasker_rejected_records_total",
        "counter",
        "Commands refused (task.rejected), by reason.",
    );
    for (reason, n) in m.rejections() {
        o.sample(
            "tasker_rejected_records_total",
            &format!("reason=\"{}\"", escape(reason)),
            n,
        );
    }
    o.counter(
        "tasker_malformed_records_total",
        "Records that could not be decoded.",
        m.malformed_records.get(),
    );
    o.counter(
        "tasker_stale_results_total",
        "Step results that no longer matched the state.",
        m.stale_results.get(),
    );
    o.counter(
        "tasker_ignored_events_total",
        "Events the fold ignored (fenced writers, anomalies).",
        m.ignored_events.get(),
    );
    o.counter(
        "tasker_log_records_appended_total",
        "Records appended to the log.",
        m.records_appended.get(),
    );
    o.counter(
        "tasker_log_gaps_total",
        "Times a reader skipped positions and the processor read its partition again.",
        m.log_gaps.get(),
    );
    o.counter(
        "tasker_log_slow_appends_total",
        "Embedded-log appends (write + fsync) slower than 50 ms.",
        m.slow_appends.get(),
    );
    o.counter(
        "tasker_log_records_read_total",
        "Records read from the log.",
        m.records_read.get(),
    );
    o.counter(
        "tasker_snapshots_written_total",
        "State snapshots written (full and deltas).",
        m.snapshots_written.get(),
    );
    o.counter(
        "tasker_snapshot_deltas_written_total",
        "State snapshots written as deltas from the one before.",
        m.snapshot_deltas_written.get(),
    );
    o.counter(
        "tasker_snapshot_bytes_written_total",
        "Bytes of state snapshots written.",
        m.snapshot_bytes_written.get(),
    );
    o.gauge(
        "tasker_executor_in_flight",
        "Step attempts running now.",
        m.executor_in_flight.get(),
    );
    o.gauge(
        "tasker_executor_concurrency_limit",
        "The executor's adaptive concurrency limit.",
        m.executor_limit.get(),
    );
    o.gauge(
        "tasker_executor_queued",
        "Step attempts waiting for the executor.",
        m.executor_queued.get(),
    );
    o.gauge(
        "tasker_processor_queue_depth",
        "Messages waiting in processor inboxes.",
        m.processor_inbox.get(),
    );
    o.gauge(
        "tasker_tasks_in_memory",
        "Tasks in the engine's memory.",
        m.tasks_in_memory.get(),
    );
    o.distribution(
        "tasker_step_duration_seconds",
        "Step attempt execution time.",
        &m.step_latency_us.snapshot(),
        1e-6,
        SECONDS_BUCKETS,
    );
    o.distribution(
        "tasker_task_duration_seconds",
        "Task time from task.accepted to its terminal event.",
        &m.task_latency_ms.snapshot(),
        1e-3,
        SECONDS_BUCKETS,
    );
    o.distribution(
        "tasker_log_append_duration_seconds",
        "Log append (write + fsync) time per batch.",
        &m.append_latency_us.snapshot(),
        1e-6,
        SECONDS_BUCKETS,
    );
    o.distribution(
        "tasker_log_append_batch_records",
        "Records per log append.",
        &m.append_batch_records.snapshot(),
        1.0,
        SIZE_BUCKETS,
    );
    o.family(
        "tasker_partition_live",
        "gauge",
        "1 when this engine's processor for the partition is live.",
    );
    for p in state.engine.owned_partitions() {
        let live = matches!(state.engine.status(p), Some(PartitionStatus::Live));
        o.sample(
            "tasker_partition_live",
            &format!("partition=\"{}\"", p.0),
            i64::from(live),
        );
    }
    let progress = super::audit::projector_progress(state);
    type Value = fn(&super::audit::ProjectorJson) -> f64;
    let families: [(&str, &str, &str, Value); 5] = [
        (
            "tasker_projector_lag_records",
            "gauge",
            "Log records not yet in the read model.",
            |p| p.lag_records as f64,
        ),
        (
            "tasker_projector_lag_seconds",
            "gauge",
            "Log time between the newest record and the newest projected event.",
            |p| p.lag_seconds,
        ),
        (
            "tasker_projector_events_total",
            "counter",
            "Events written to the read model.",
            |p| p.events as f64,
        ),
        (
            "tasker_projector_stopped",
            "gauge",
            "1 when the partition's projector stopped on an error (see /v1/projector).",
            |p| f64::from(u8::from(p.error.is_some())),
        ),
        (
            "tasker_projector_retries_total",
            "counter",
            "Read-model writes retried after transient errors.",
            |p| p.retries as f64,
        ),
    ];
    if !progress.is_empty() {
        for (name, kind, help, value) in families {
            o.family(name, kind, help);
            for p in &progress {
                o.sample(name, &format!("partition=\"{}\"", p.partition), value(p));
            }
        }
    }
    o.0
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn metrics(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Response {
    if let Err(p) = who.require_all_namespaces(Permission::MetricsIndex) {
        return p.into_response();
    }
    let mut resp = render(&state).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_render_buckets_and_quantiles() {
        let mut h = tasker_engine::runtime::metrics::new_histogram();
        for us in [100u64, 200, 300, 2_000, 40_000] {
            h.record(us).unwrap();
        }
        let mut o = Out(String::new());
        o.distribution("x_seconds", "X.", &h, 1e-6, SECONDS_BUCKETS);
        let text = o.0;
        assert!(text.contains("# TYPE x_seconds histogram"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.0005\"} 3"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.0025\"} 4"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 5"), "{text}");
        assert!(text.contains("x_seconds_count 5"), "{text}");
        assert!(
            text.contains("# TYPE x_seconds_quantiles summary"),
            "{text}"
        );
        let p99 = text
            .lines()
            .find(|l| l.starts_with("x_seconds_quantiles{quantile=\"0.99\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((p99 - 0.04).abs() < 0.0001, "{p99}");
    }
}
