//! Logs and traces: `tracing` to stderr (text, or JSON lines with
//! `TASKER_LOG_FORMAT=json`), and with the `otlp` build feature and
//! `telemetry.otlp_endpoint` set, spans exported over OTLP/HTTP (protobuf).
//!
//! Spans: `http` per request (method, path, status, correlation_id), `command`
//! per command (type, task_id, correlation_id, position) both in the API and in
//! the processor that decides it, `step` per attempt in the executor (task_id,
//! step, attempt, correlation_id). They are at INFO: `RUST_LOG=info` (or `-v`)
//! turns them on.

use tasker_engine::config::TelemetryConfig;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; flushes it when dropped.
#[derive(Debug, Default)]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` wins, else warnings (-v info,
/// -vv debug).
pub fn init(verbose: u8, telemetry: Option<&TelemetryConfig>) -> Guard {
    let default = match verbose {
        0 => "warn",
        1 => "info,tasker=info,tasker_engine=info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("TASKER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // The verbosity filters the log lines only: exported spans have their own
    // level, so a quiet process still sends its traces.
    let fmt = fmt.with_filter(filter);
    let endpoint = telemetry.and_then(|t| t.otlp_endpoint.clone());
    #[cfg(feature = "otlp")]
    {
        if let (Some(endpoint), Some(t)) = (endpoint, telemetry) {
            match otlp(&endpoint, &t.service_name) {
                Ok(provider) => {
                    use opentelemetry::trace::TracerProvider as _;
                    let tracer = provider.tracer("tasker");
                    let spans = tracing_subscriber::filter::Targets::new()
                        .with_target("tasker", tracing::Level::INFO)
                        .with_target("tasker_engine", tracing::Level::INFO)
                        .with_target("tasker_projections", tracing::Level::INFO);
                    tracing_subscriber::registry()
                        .with(fmt)
                        .with(
                            tracing_opentelemetry::layer()
                                .with_tracer(tracer)
                                .with_filter(spans),
                        )
                        .init();
                    return Guard {
                        provider: Some(provider),
                    };
                }
                Err(e) => eprintln!("warning: OTLP export to {endpoint} disabled: {e}"),
            }
        }
    }
    #[cfg(not(feature = "otlp"))]
    if let Some(endpoint) = endpoint {
        eprintln!(
            "warning: telemetry.otlp_endpoint = {endpoint:?} is ignored: this tasker was built \
             without the `otlp` feature (cargo build --features otlp)"
        );
    }
    tracing_subscriber::registry().with(fmt).init();
    Guard::default()
}

use tracing_subscriber::Layer as _;

#[cfg(feature = "otlp")]
fn otlp(
    endpoint: &str,
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, Box<dyn std::error::Error>> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
