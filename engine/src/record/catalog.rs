//! The record catalog: for every record type, its fields as they appear in the
//! record's JSON form ([`super::record_json`]), for `tasker events`, the API and
//! `docs/events.md` (generated from here by a test). The names, kinds and
//! meanings come from [`RecordType`]; this file adds the fields.

use std::fmt::Write as _;

use serde::Serialize;

use super::types::{Kind, RecordType};

/// One field of a record's JSON form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Field {
    pub name: &'static str,
    /// JSON type: `string`, `uuid`, `integer`, `boolean`, `json` (any value), `ms`
    /// (milliseconds since the Unix epoch), `[T]` a list, `object`.
    #[serde(rename = "type")]
    pub ty: &'static str,
    /// May be `null` or absent.
    pub optional: bool,
    pub doc: &'static str,
}

const fn f(name: &'static str, ty: &'static str, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        optional: false,
        doc,
    }
}

const fn opt(name: &'static str, ty: &'static str, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        optional: true,
        doc,
    }
}

/// Fields every record's JSON carries.
pub const COMMON_FIELDS: &[Field] = &[
    f("type", "string", "The record type, e.g. `step.completed`."),
    f(
        "task_id",
        "uuid",
        "The task (also the Kafka key). Nil for records about no task.",
    ),
    f(
        "correlation_id",
        "uuid",
        "Carried from the request through every record of the task.",
    ),
    f("at", "ms", "When the writer stamped the record."),
];

/// Fields events and control records carry in addition (commands do not).
pub const ENGINE_FIELDS: &[Field] = &[
    f(
        "epoch",
        "integer",
        "The writer's ownership epoch; the fold ignores events of an epoch older than the latest claim.",
    ),
    opt(
        "source_position",
        "integer",
        "The position of the command this event answers, absent when it answers none.",
    ),
];

const REQUEST: &[Field] = &[
    f("namespace", "string", "The template's namespace."),
    f("name", "string", "The template's name."),
    opt(
        "version",
        "string",
        "A semver version or requirement; absent takes the highest installed version.",
    ),
    f(
        "context",
        "json",
        "The task's input, checked against the template's context schema.",
    ),
    opt(
        "idempotency_key",
        "string",
        "A second request with the same key in the namespace gets the first task.",
    ),
    opt("initiator", "string", "Who asked (a person or a system)."),
    opt(
        "source_system",
        "string",
        "Which system the request came from.",
    ),
    opt("reason", "string", "Why the task was requested."),
    opt("tags", "[string]", "Free-form labels."),
];

const STEP: Field = f(
    "step",
    "integer",
    "The step's index in the task's template (`task.accepted` lists the steps in this order).",
);
const ATTEMPT: Field = f("attempt", "integer", "The attempt, counting from 1.");
const REQUESTED_BY: Field = opt("requested_by", "string", "Who asked.");
const REASON: Field = opt("reason", "string", "Why.");

const CANCEL_OR_RETRY: &[Field] = &[REQUESTED_BY, REASON];
const RESOLVE_REQUESTED: &[Field] = &[
    f("step", "string", "The step's name."),
    opt(
        "result",
        "json",
        "What the step's children receive instead of a handler's result (null when absent).",
    ),
    opt("resolved_by", "string", "The operator."),
    REASON,
    opt(
        "skip_dependents",
        "boolean",
        "Also skip every step downstream that has not run.",
    ),
];
const RESULT_REPORTED: &[Field] = &[
    f("step", "string", "The step's name."),
    ATTEMPT,
    f("status", "string", "`completed` or `failed`."),
    opt("result", "json", "The result, when completed."),
    opt(
        "error",
        "object",
        "When failed: `kind` (retryable, permanent, timeout), `message`, `retry_after_ms`.",
    ),
];
const TASK_ACCEPTED: &[Field] = &[
    f("namespace", "string", "The template's namespace."),
    f("name", "string", "The template's name."),
    opt(
        "version",
        "string",
        "The version or requirement as requested.",
    ),
    f("context", "json", "The task's input."),
    opt(
        "idempotency_key",
        "string",
        "The request's idempotency key.",
    ),
    opt("initiator", "string", "Who asked."),
    opt(
        "source_system",
        "string",
        "Which system the request came from.",
    ),
    opt("reason", "string", "Why the task was requested."),
    f("tags", "[string]", "Free-form labels."),
    f(
        "template",
        "object",
        "The resolved template version the task runs: `namespace`, `name`, `version`, `steps` (each `name`, `handler`, `depends_on` (names), `retryable`, `retry_limit`, `timeout_ms`, `backoff` {`initial_ms`, `max_ms`, `jitter_pct`}, `config`).",
    ),
];
const TASK_REJECTED: &[Field] = &[
    opt(
        "command",
        "string",
        "The refused command's type; null when its bytes could not be decoded.",
    ),
    f(
        "reason",
        "string",
        "malformed, unsupported_schema, unknown_template, unknown_version, invalid_context, context_too_large, duplicate_task, duplicate_idempotency_key, unknown_task, unknown_step, invalid_transition, stale_attempt or wrong_partition.",
    ),
    opt(
        "existing_task_id",
        "uuid",
        "For duplicate_idempotency_key: the task the key already created.",
    ),
    f("message", "string", "What was wrong, for people."),
    f(
        "details",
        "[string]",
        "Itemized problems (e.g. one per JSON Schema violation).",
    ),
];
const NO_FIELDS: &[Field] = &[];
const STEP_STARTED: &[Field] = &[STEP, ATTEMPT];
const STEP_COMPLETED: &[Field] = &[
    STEP,
    ATTEMPT,
    f(
        "result",
        "json",
        "The handler's result; children receive it.",
    ),
];
const STEP_FAILED: &[Field] = &[
    STEP,
    ATTEMPT,
    f(
        "error",
        "object",
        "`kind` (retryable, permanent, timeout), `message`, `retry_after_ms` (the handler's Retry-After, or null).",
    ),
    opt(
        "retry_at",
        "ms",
        "When the next attempt is due; null when the failure is terminal.",
    ),
];
const STEP_RETRY_DUE: &[Field] = &[
    STEP,
    f(
        "reset_attempts",
        "boolean",
        "The attempt count starts over (the task was retried).",
    ),
];
const STEP_SKIPPED: &[Field] = &[STEP, f("reason", "string", "Why it will not run.")];
const STEP_CANCELLED: &[Field] = &[STEP];
const STEP_RESOLVED: &[Field] = &[
    STEP,
    f(
        "result",
        "json",
        "What the step's children receive (null when none was given).",
    ),
    opt("resolved_by", "string", "The operator."),
    REASON,
];
const TASK_FAILED: &[Field] = &[f(
    "failed_steps",
    "[integer]",
    "The steps that failed terminally.",
)];
const CANCELLED_OR_RETRIED: &[Field] = &[REQUESTED_BY, REASON];
const PARTITION_CLAIMED: &[Field] = &[
    f(
        "claimed_epoch",
        "integer",
        "The new ownership epoch (equal to `epoch`).",
    ),
    f(
        "owner",
        "string",
        "Who claimed the partition (host and process).",
    ),
];

impl RecordType {
    /// The record's own fields in its JSON form (after the common ones).
    pub fn fields(self) -> &'static [Field] {
        match self {
            RecordType::TaskRequested => REQUEST,
            RecordType::TaskCancelRequested | RecordType::TaskRetryRequested => CANCEL_OR_RETRY,
            RecordType::StepResolveRequested => RESOLVE_REQUESTED,
            RecordType::StepResultReported => RESULT_REPORTED,
            RecordType::TaskAccepted => TASK_ACCEPTED,
            RecordType::TaskRejected => TASK_REJECTED,
            RecordType::TaskStarted
            | RecordType::TaskCompleted
            | RecordType::TaskResolvedManually => NO_FIELDS,
            RecordType::StepStarted => STEP_STARTED,
            RecordType::StepCompleted => STEP_COMPLETED,
            RecordType::StepFailed => STEP_FAILED,
            RecordType::StepRetryDue => STEP_RETRY_DUE,
            RecordType::StepSkipped => STEP_SKIPPED,
            RecordType::StepCancelled => STEP_CANCELLED,
            RecordType::StepResolvedManually => STEP_RESOLVED,
            RecordType::TaskFailed => TASK_FAILED,
            RecordType::TaskCancelled | RecordType::TaskRetried => CANCELLED_OR_RETRIED,
            RecordType::PartitionClaimed => PARTITION_CLAIMED,
        }
    }

    /// Every field of the record's JSON form: common, engine (events and control
    /// records), then its own.
    pub fn all_fields(self) -> Vec<Field> {
        let mut out = COMMON_FIELDS.to_vec();
        if self.kind() != Kind::Command {
            out.extend_from_slice(ENGINE_FIELDS);
        }
        out.extend_from_slice(self.fields());
        out
    }
}

/// One catalog entry, as `tasker events --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    #[serde(rename = "type")]
    pub name: &'static str,
    pub kind: &'static str,
    pub code: u8,
    pub meaning: &'static str,
    pub fields: Vec<Field>,
}

/// The whole catalog, in code order.
pub fn catalog() -> Vec<CatalogEntry> {
    RecordType::ALL
        .iter()
        .map(|t| CatalogEntry {
            name: t.name(),
            kind: t.kind().as_str(),
            code: t.code(),
            meaning: t.meaning(),
            fields: t.all_fields(),
        })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}

fn field_rows(out: &mut String, fields: &[Field]) {
    let _ = writeln!(out, "| field | type | meaning |");
    let _ = writeln!(out, "|---|---|---|");
    for field in fields {
        let ty = if field.optional {
            format!("{}, optional", field.ty)
        } else {
            field.ty.to_owned()
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} |",
            field.name,
            escape(&ty),
            escape(field.doc)
        );
    }
}

/// `docs/events.md`: the catalog for people.
pub fn catalog_markdown() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Event catalog");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "<!-- Generated from engine/src/record/catalog.rs and types.rs; do not edit. \
         Regenerate: TASKER_BLESS=1 cargo test -p tasker-engine --test catalog -->"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Every record in the log has a type (the `tasker-type` header), a kind and a \
         stable one-byte code (the embedded log's frame byte). Clients write **commands**; \
         only the engine writes **events** and **control** records. `tasker events` prints \
         this catalog, `tasker events --json` as JSON."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "The fields below are those of a record's JSON form: the `data` of the CloudEvents \
         that `tasker tail --json` prints and the Kafka JSON mirror publishes, and the \
         payload of `tasker audit task --json`. A command's JSON form is exactly what a \
         client publishes to start or steer a task (see the README). Times are \
         milliseconds since the Unix epoch; JSON values (contexts, results, configs) are \
         embedded as JSON."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "## Fields of every record");
    let _ = writeln!(out);
    field_rows(&mut out, COMMON_FIELDS);
    let _ = writeln!(out);
    let _ = writeln!(out, "Events and control records also carry:");
    let _ = writeln!(out);
    field_rows(&mut out, ENGINE_FIELDS);
    let _ = writeln!(out);
    let _ = writeln!(out, "## CloudEvents");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Each event is published as a CloudEvents 1.0 structured-mode JSON object: \
         `specversion` `1.0`, `id` `<partition>-<position>` (unique per log; use it to \
         drop duplicates, delivery is at least once), `source` \
         `tasker://<topic>/<partition>`, `type` the record type, `subject` the task id, \
         `time` RFC 3339, `datacontenttype` `application/json`, `data` the record's JSON \
         form. The extension attribute `taskernamespace` carries the task's namespace when \
         the record's headers name it."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "## Types");
    let _ = writeln!(out);
    let _ = writeln!(out, "| type | kind | code | meaning |");
    let _ = writeln!(out, "|---|---|---|---|");
    for t in RecordType::ALL {
        let _ = writeln!(
            out,
            "| [`{}`](#{}) | {} | {} | {} |",
            t.name(),
            t.name().replace('.', ""),
            t.kind().as_str(),
            t.code(),
            escape(t.meaning())
        );
    }
    for t in RecordType::ALL {
        let _ = writeln!(out);
        let _ = writeln!(out, "### {}", t.name());
        let _ = writeln!(out);
        let _ = writeln!(out, "{} {}", capitalize(t.kind().as_str()), t.meaning());
        let _ = writeln!(out);
        if t.fields().is_empty() {
            let _ = writeln!(out, "No fields beyond those of every record.");
        } else {
            field_rows(&mut out, t.fields());
        }
    }
    out
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(c) => format!("{}{}:", c.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}
