//! Records as JSON for other languages: the one place an event becomes JSON (the
//! `data` of CloudEvents, `tasker tail --json`, the Kafka JSON mirror, audit
//! output). Commands keep the exact wire form clients publish
//! ([`crate::codec::command_to_json`]), so a command's JSON decodes back to it.
//!
//! Every struct is destructured without `..`: a new field does not compile until it
//! is given a JSON name here and in the catalog (`catalog.rs`), and a test checks
//! the two agree for every record type.

use serde_json::{Map, Value, json};

use super::command::StepError;
use super::envelope::{Body, Envelope};
use super::event::{
    Control, Event, PartitionClaimed, RejectReason, StepCancelled, StepCompleted, StepFailed,
    StepResolvedManually, StepRetryDue, StepSkipped, StepStarted, TaskAccepted, TaskCancelled,
    TaskFailed, TaskRejected, TaskRetried,
};
use super::json::RawJson;
use super::snapshot::{BackoffSpec, StepSpec, TemplateSnapshot};
use super::{RequestTask, Timestamp};

/// The record as one JSON object: `type`, the envelope fields, then the body's
/// fields (see `docs/events.md`).
pub fn record_json(env: &Envelope) -> Value {
    if let Body::Command(_) = &env.body
        && let Some(text) = crate::codec::command_to_json(env)
        && let Ok(value) = serde_json::from_str(&text)
    {
        return value;
    }
    let mut out = Map::new();
    out.insert("type".into(), env.record_type().name().into());
    out.insert("task_id".into(), env.task_id.to_string().into());
    out.insert(
        "correlation_id".into(),
        env.correlation_id.to_string().into(),
    );
    out.insert("at".into(), env.at.as_millis().into());
    out.insert("epoch".into(), env.epoch.0.into());
    if let Some(p) = env.source_position {
        out.insert("source_position".into(), p.0.into());
    }
    match &env.body {
        Body::Event(e) => event_fields(e, &mut out),
        Body::Control(Control::PartitionClaimed(PartitionClaimed { epoch, owner })) => {
            out.insert("claimed_epoch".into(), epoch.0.into());
            out.insert("owner".into(), owner.as_str().into());
        }
        // Only reached if a command failed to serialize (it cannot): say what it was.
        Body::Command(_) => {}
    }
    Value::Object(out)
}

fn raw(j: &RawJson) -> Value {
    serde_json::from_str(j.as_str()).unwrap_or(Value::Null)
}

fn ms(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| t.as_millis().into())
}

fn error_json(e: &StepError) -> Value {
    let StepError {
        kind,
        message,
        retry_after_ms,
    } = e;
    json!({"kind": kind.as_str(), "message": message, "retry_after_ms": retry_after_ms})
}

fn request_fields(r: &RequestTask, out: &mut Map<String, Value>) {
    let RequestTask {
        namespace,
        name,
        version,
        context,
        idempotency_key,
        initiator,
        source_system,
        reason,
        tags,
    } = r;
    out.insert("namespace".into(), namespace.as_str().into());
    out.insert("name".into(), name.as_str().into());
    out.insert("version".into(), json!(version));
    out.insert("context".into(), raw(context));
    out.insert("idempotency_key".into(), json!(idempotency_key));
    out.insert("initiator".into(), json!(initiator));
    out.insert("source_system".into(), json!(source_system));
    out.insert("reason".into(), json!(reason));
    out.insert("tags".into(), json!(tags));
}

fn template_json(t: &TemplateSnapshot) -> Value {
    let TemplateSnapshot {
        namespace,
        name,
        version,
        steps,
    } = t;
    let step_json = |s: &StepSpec| {
        let StepSpec {
            name,
            handler,
            depends_on,
            retryable,
            retry_limit,
            timeout_ms,
            backoff,
            config,
        } = s;
        let BackoffSpec {
            initial_ms,
            max_ms,
            jitter_pct,
        } = backoff;
        let parents: Vec<&str> = depends_on
            .iter()
            .filter_map(|p| t.step(*p).map(|p| p.name.as_str()))
            .collect();
        json!({
            "name": name, "handler": handler, "depends_on": parents,
            "retryable": retryable, "retry_limit": retry_limit, "timeout_ms": timeout_ms,
            "backoff": {"initial_ms": initial_ms, "max_ms": max_ms, "jitter_pct": jitter_pct},
            "config": raw(config),
        })
    };
    json!({
        "namespace": namespace, "name": name, "version": version,
        "steps": steps.iter().map(step_json).collect::<Vec<_>>(),
    })
}

fn event_fields(e: &Event, out: &mut Map<String, Value>) {
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    match e {
        Event::TaskAccepted(TaskAccepted { request, template }) => {
            let mut fields = Map::new();
            request_fields(request, &mut fields);
            for (k, v) in fields {
                put(&k, v);
            }
            put("template", template_json(template));
        }
        Event::TaskRejected(TaskRejected {
            command,
            reason,
            message,
            details,
        }) => {
            put("command", json!(command.map(|c| c.name())));
            put("reason", reason.code().into());
            let existing = match reason {
                RejectReason::DuplicateIdempotencyKey { existing } => {
                    Value::from(existing.to_string())
                }
                _ => Value::Null,
            };
            put("existing_task_id", existing);
            put("message", message.as_str().into());
            put("details", json!(details));
        }
        Event::TaskStarted | Event::TaskCompleted | Event::TaskResolvedManually => {}
        Event::StepStarted(StepStarted { step, attempt }) => {
            put("step", step.0.into());
            put("attempt", (*attempt).into());
        }
        Event::StepCompleted(StepCompleted {
            step,
            attempt,
            result,
        }) => {
            put("step", step.0.into());
            put("attempt", (*attempt).into());
            put("result", raw(result));
        }
        Event::StepFailed(StepFailed {
            step,
            attempt,
            error,
            retry_at,
        }) => {
            put("step", step.0.into());
            put("attempt", (*attempt).into());
            put("error", error_json(error));
            put("retry_at", ms(*retry_at));
        }
        Event::StepRetryDue(StepRetryDue {
            step,
            reset_attempts,
        }) => {
            put("step", step.0.into());
            put("reset_attempts", (*reset_attempts).into());
        }
        Event::StepSkipped(StepSkipped { step, reason }) => {
            put("step", step.0.into());
            put("reason", reason.as_str().into());
        }
        Event::StepCancelled(StepCancelled { step }) => put("step", step.0.into()),
        Event::StepResolvedManually(StepResolvedManually {
            step,
            result,
            resolved_by,
            reason,
        }) => {
            put("step", step.0.into());
            put("result", raw(result));
            put("resolved_by", json!(resolved_by));
            put("reason", json!(reason));
        }
        Event::TaskFailed(TaskFailed { failed_steps }) => {
            put(
                "failed_steps",
                json!(failed_steps.iter().map(|s| s.0).collect::<Vec<_>>()),
            );
        }
        Event::TaskCancelled(TaskCancelled {
            requested_by,
            reason,
        })
        | Event::TaskRetried(TaskRetried {
            requested_by,
            reason,
        }) => {
            put("requested_by", json!(requested_by));
            put("reason", json!(reason));
        }
    }
}
