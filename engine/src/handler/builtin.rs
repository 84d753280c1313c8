//! Built-in handlers for tests, benchmarks and demos.

use std::time::Duration;

use serde_json::{Value, json};

use super::{StepContext, StepHandler};
use crate::record::StepError;

/// Completes at once with `{}`.
#[derive(Debug, Clone, Copy)]
pub struct NoopHandler;

#[async_trait::async_trait]
impl StepHandler for NoopHandler {
    async fn call(&self, _ctx: StepContext) -> Result<Value, StepError> {
        Ok(json!({}))
    }
}

/// Sleeps `config.ms` milliseconds (default 10), then completes.
#[derive(Debug, Clone, Copy)]
pub struct SleepHandler;

#[async_trait::async_trait]
impl StepHandler for SleepHandler {
    async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
        let ms = ctx
            .config_value()
            .get("ms")
            .and_then(Value::as_u64)
            .unwrap_or(10);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!({ "slept_ms": ms }))
    }
}

/// Fails on purpose. `config`:
/// - `times: N` fails the first N attempts, then completes;
/// - `always: true` fails every attempt;
/// - `rate: 0.0..1.0` fails that fraction of attempts, chosen by a hash of
///   (task, step, attempt) so a rerun fails the same ones;
/// - `permanent: true` makes the failures non-retryable;
/// - `retry_after_ms: N` asks for that delay before the next attempt.
#[derive(Debug, Clone, Copy)]
pub struct FailHandler;

#[async_trait::async_trait]
impl StepHandler for FailHandler {
    async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
        let config = ctx.config_value();
        let times = config.get("times").and_then(Value::as_u64);
        let always = config
            .get("always")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let rate = config.get("rate").and_then(Value::as_f64);
        let fail = always
            || times.is_some_and(|n| u64::from(ctx.attempt) <= n)
            || rate.is_some_and(|r| unit_hash(&ctx) < r)
            || (times.is_none() && rate.is_none() && config.get("always").is_none());
        if !fail {
            return Ok(json!({ "attempt": ctx.attempt }));
        }
        let message = format!("`fail` handler failed attempt {} on purpose", ctx.attempt);
        let mut error = if config
            .get("permanent")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            StepError::permanent(message)
        } else {
            StepError::retryable(message)
        };
        error.retry_after_ms = config.get("retry_after_ms").and_then(Value::as_u64);
        Err(error)
    }
}

/// A value in [0, 1) from the attempt's identity.
fn unit_hash(ctx: &StepContext) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(ctx.task_id.as_bytes());
    h.update(ctx.step.as_bytes());
    h.update(&ctx.attempt.to_le_bytes());
    let b = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&b.as_bytes()[..8]);
    (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{CorrelationId, RawJson, StepErrorKind, TaskId, Timestamp};

    fn ctx(config: &str, attempt: u32, seed: u128) -> StepContext {
        StepContext {
            task_id: TaskId::v7(Timestamp(1), seed),
            correlation_id: CorrelationId::NIL,
            namespace: "t".into(),
            task_name: "t".into(),
            version: "1.0.0".into(),
            step: "s".into(),
            attempt,
            context: RawJson::empty_object(),
            parents: vec![],
            config: RawJson::parse(config).unwrap(),
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn fail_handler_follows_its_config() {
        let h = FailHandler;
        assert!(h.call(ctx(r#"{"times":2}"#, 1, 0)).await.is_err());
        assert!(h.call(ctx(r#"{"times":2}"#, 2, 0)).await.is_err());
        assert!(h.call(ctx(r#"{"times":2}"#, 3, 0)).await.is_ok());
        let e = h
            .call(ctx(
                r#"{"always":true,"permanent":true,"retry_after_ms":5}"#,
                9,
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind, StepErrorKind::Permanent);
        assert_eq!(e.retry_after_ms, Some(5));
        assert!(
            h.call(ctx("{}", 1, 0)).await.is_err(),
            "no config fails always"
        );
        let mut failed = 0;
        for seed in 0..1000 {
            let first = h.call(ctx(r#"{"rate":0.3}"#, 1, seed)).await.is_err();
            let again = h.call(ctx(r#"{"rate":0.3}"#, 1, seed)).await.is_err();
            assert_eq!(first, again, "rate failures are deterministic");
            failed += usize::from(first);
        }
        assert!(
            (200..400).contains(&failed),
            "{failed} of 1000 failed at rate 0.3"
        );
        let r = SleepHandler.call(ctx(r#"{"ms":1}"#, 1, 0)).await.unwrap();
        assert_eq!(r["slept_ms"], 1);
    }
}
