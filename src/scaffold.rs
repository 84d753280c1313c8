//! `tasker templates list|check` and `tasker new template|handler`.

use std::path::Path;
use std::sync::Arc;

use tasker_engine::handler::HandlerRegistry;
use tasker_engine::registry::TemplateRegistry;

use crate::cli::Cli;
use crate::failure::WithHint;
use crate::wiring::Setup;

pub fn list(cli: &Cli) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let registry = setup.registry(Arc::new(HandlerRegistry::with_builtins()), None)?;
    let catalog = registry.catalog();
    let mut rows: Vec<_> = catalog.templates().collect();
    rows.sort_by_key(|t| t.snapshot().qualified_name());
    if cli.json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|t| {
                serde_json::json!({
                    "namespace": t.namespace(), "name": t.name(), "version": t.version.to_string(),
                    "description": t.description,
                    "steps": t.snapshot().steps.iter().map(|s| serde_json::json!({
                        "name": s.name, "handler": s.handler,
                        "depends_on": s.depends_on.iter().filter_map(|p| t.snapshot().step(*p).map(|p| p.name.clone())).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for t in rows {
        println!(
            "{:32} {:3} steps  {}",
            t.snapshot().qualified_name(),
            t.snapshot().steps.len(),
            t.description
        );
    }
    Ok(())
}

/// Validates every template file under `dir`; prints each error, fails if any.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        return Err(anyhow::anyhow!("{} is not a directory", dir.display()))
            .hint("tasker templates check <dir-with-yaml-files>");
    }
    let registry = TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        Some(dir.to_owned()),
    );
    let report = registry.load_dir();
    for name in &report.loaded {
        println!("ok    {name}");
    }
    for e in &report.errors {
        for err in e.iter() {
            println!("error {err}");
        }
    }
    if report.errors.is_empty() {
        if report.loaded.is_empty() {
            return Err(anyhow::anyhow!(
                "no *.yaml or *.yml files in {}",
                dir.display()
            ))
            .hint("`tasker new template <namespace>/<name>` writes one");
        }
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} template file(s) are invalid",
            report.errors.len()
        ))
        .hint("fix the fields named above")
    }
}

pub fn new_template(name: &str, dir: &Path) -> anyhow::Result<()> {
    let Some((ns, n)) = name.split_once('/') else {
        return Err(anyhow::anyhow!("`{name}` is not namespace/name"))
            .hint("e.g. tasker new template billing/invoice");
    };
    let path = dir.join(ns).join(format!("{n}.yaml"));
    if path.exists() {
        return Err(anyhow::anyhow!("{} already exists", path.display()))
            .hint("pick another name or edit it");
    }
    std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
    let yaml = TEMPLATE_YAML
        .replace("{{DIR}}", &dir.display().to_string())
        .replace("{{NS}}", ns)
        .replace("{{NAME}}", n);
    std::fs::write(&path, yaml)?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn new_handler(name: &str, dir: &Path) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !ok {
        return Err(anyhow::anyhow!("`{name}` is not a snake_case name"))
            .hint("e.g. tasker new handler charge_card");
    }
    let path = dir.join(format!("{name}.rs"));
    if path.exists() {
        return Err(anyhow::anyhow!("{} already exists", path.display()))
            .hint("pick another name or edit it");
    }
    std::fs::create_dir_all(dir)?;
    let type_name: String = name
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let code = HANDLER_TEMPLATE
        .replace("{{TYPE}}", &type_name)
        .replace("{{NAME}}", name);
    std::fs::write(&path, code)?;
    println!("wrote {}", path.display());
    println!("register it: handlers.register(\"{name}\", {type_name}::default());");
    Ok(())
}

/// The scaffolded template.
const TEMPLATE_YAML: &str = r#"# A Tasker workflow template. Check it with: tasker templates check {{DIR}}
namespace: {{NS}}
name: {{NAME}}
version: 0.1.0
description: Describe what this workflow does.
# Every task's context must match this JSON Schema.
context_schema:
  type: object
  required: [id]
  properties:
    id: { type: integer }
steps:
  - name: fetch
    handler: noop
  - name: transform
    handler: noop
    depends_on: [fetch]
    retry_limit: 3          # attempts, the first included
    timeout: 30s
    backoff: { initial: 1s, max: 5m }
  - name: store
    handler: noop
    depends_on: [transform]
"#;

/// The scaffolded handler; `tests/cli.rs` compiles it against the engine.
pub const HANDLER_TEMPLATE: &str = r#"//! The `{{NAME}}` step handler.

use serde_json::{Value, json};
use tasker_engine::handler::{StepContext, StepHandler};
use tasker_engine::record::StepError;

/// Runs the `{{NAME}}` step. Attempts may run more than once (after a crash), so
/// make side effects idempotent, e.g. keyed by `ctx.task_id`, `ctx.step`, `ctx.attempt`.
#[derive(Debug, Default)]
pub struct {{TYPE}};

#[async_trait::async_trait]
impl StepHandler for {{TYPE}} {
    async fn call(&self, ctx: StepContext) -> Result<Value, StepError> {
        let context = ctx.context_value();
        let Some(id) = context.get("id").and_then(Value::as_i64) else {
            // Retrying cannot fix bad input: fail permanently.
            return Err(StepError::permanent("context.id is required"));
        };
        // Return the step's result; children see it in `ctx.parents`.
        Ok(json!({ "id": id, "attempt": ctx.attempt }))
    }
}
"#;
