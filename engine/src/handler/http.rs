//! The `http` handler: POSTs the step's input as JSON to `config.url`, so
//! workflows can be written in any language.
//!
//! Responses: 2xx completes with the JSON body (empty = `null`; non-JSON fails
//! permanently); 429 and 503 retry, honoring `Retry-After`; 408 and other 5xx and
//! network errors/timeouts retry; 3xx and other 4xx (400, 401, 403, 404, 422, ...)
//! fail permanently. Bodies over `config.max_response_bytes` (default 1 MiB) fail
//! permanently.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{StepContext, StepHandler};
use crate::record::StepError;

const DEFAULT_MAX_RESPONSE: u64 = 1 << 20;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
}

impl Default for HttpHandler {
    fn default() -> Self {
        HttpHandler::new()
    }
}

impl HttpHandler {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tasker/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        HttpHandler { client }
    }
}

#[derive(Serialize)]
struct RequestBody<'a> {
    task_id: String,
    correlation_id: String,
    namespace: &'a str,
    name: &'a str,
    version: &'a str,
    step: &'a str,
    attempt: u32,
    context: &'a RawValue,
    parents: std::collections::BTreeMap<&'a str, &'a RawValue>,
    config: &'a RawValue,
}

fn raw(json: &crate::record::RawJson) -> Result<Box<RawValue>, StepError> {
    RawValue::from_string(json.as_str().to_owned())
        .map_err(|e| StepError::permanent(format!("invalid JSON in step input: {e}")))
}

#[async_trait::async_trait]
impl StepHandler for HttpHandler {
    async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
        let config = ctx.config_value();
        let url = config
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::permanent("the http handler needs `config.url`"))?
            .to_owned();
        let limit = config
            .get("max_response_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MAX_RESPONSE);
        let context = raw(&ctx.context)?;
        let step_config = raw(&ctx.config)?;
        let parent_values: Vec<(&str, Box<RawValue>)> = ctx
            .parents
            .iter()
            .map(|(n, r)| raw(r).map(|v| (n.as_str(), v)))
            .collect::<Result<_, _>>()?;
        let body = RequestBody {
            task_id: ctx.task_id.to_string(),
            correlation_id: ctx.correlation_id.to_string(),
            namespace: &ctx.namespace,
            name: &ctx.task_name,
            version: &ctx.version,
            step: &ctx.step,
            attempt: ctx.attempt,
            context: &context,
            parents: parent_values.iter().map(|(n, v)| (*n, &**v)).collect(),
            config: &step_config,
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| StepError::permanent(format!("cannot encode request: {e}")))?;
        let mut request = self
            .client
            .post(&url)
            .timeout(ctx.timeout)
            .header("content-type", "application/json")
            .header("x-correlation-id", ctx.correlation_id.to_string())
            .header(
                "idempotency-key",
                format!("{}/{}/{}", ctx.task_id, ctx.step, ctx.attempt),
            )
            .body(body);
        if let Some(headers) = config.get("headers").and_then(Value::as_object) {
            for (k, v) in headers {
                if let Some(v) = v.as_str() {
                    request = request.header(k.as_str(), v);
                }
            }
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| StepError::retryable(format!("POST {url} failed: {}", error_chain(&e))))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| StepError::retryable(format!("reading the response of {url}: {e}")))?
        {
            if bytes.len() as u64 + chunk.len() as u64 > limit {
                return Err(StepError::permanent(format!(
                    "{url} returned a body over the {limit}-byte limit"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        classify(&url, status.as_u16(), &bytes, retry_after)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Turns a response into the step's outcome (see the module docs).
fn classify(
    url: &str,
    status: u16,
    body: &[u8],
    retry_after_ms: Option<u64>,
) -> Result<Value, StepError> {
    let snippet = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    };
    match status {
        200..=299 => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(body).map_err(|e| {
                StepError::permanent(format!(
                    "{url} answered {status} with a body that is not JSON ({e}){}",
                    snippet()
                ))
            })
        }
        429 | 503 => {
            let mut e = StepError::retryable(format!("{url} answered {status}{}", snippet()));
            e.retry_after_ms = retry_after_ms;
            Err(e)
        }
        408 | 500..=599 => Err(StepError::retryable(format!(
            "{url} answered {status}{}",
            snippet()
        ))),
        300..=399 => Err(StepError::permanent(format!(
            "{url} answered with redirect {status}; configure the final URL"
        ))),
        _ => Err(StepError::permanent(format!(
            "{url} answered {status}{}",
            snippet()
        ))),
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StepErrorKind;

    #[test]
    fn responses_map_to_outcomes() {
        assert_eq!(classify("u", 200, br#"{"a":1}"#, None).unwrap()["a"], 1);
        assert_eq!(classify("u", 204, b"", None).unwrap(), Value::Null);
        let e = classify("u", 200, b"<html>", None).unwrap_err();
        assert_eq!(e.kind, StepErrorKind::Permanent);
        assert!(e.message.contains("not JSON"), "{}", e.message);
        for s in [400u16, 401, 403, 404, 409, 422, 301, 302] {
            assert_eq!(
                classify("u", s, b"", None).unwrap_err().kind,
                StepErrorKind::Permanent,
                "{s}"
            );
        }
        for s in [408u16, 500, 502, 504] {
            assert_eq!(
                classify("u", s, b"", None).unwrap_err().kind,
                StepErrorKind::Retryable,
                "{s}"
            );
        }
        let e = classify("u", 429, b"slow down", Some(3000)).unwrap_err();
        assert_eq!(
            (e.kind, e.retry_after_ms),
            (StepErrorKind::Retryable, Some(3000))
        );
        assert!(e.message.contains("slow down"));
        assert_eq!(parse_retry_after("7"), Some(7000));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(0));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
