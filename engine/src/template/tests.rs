use super::*;
use crate::record::StepId;

const ORDER: &str = r#"
namespace: shop
name: order
version: 1.2.0
description: Take an order from validation to notification.
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: { type: integer, minimum: 1 }
steps:
  - name: notify
    handler: noop
    depends_on: [ship]
  - name: validate
    handler: noop
  - name: payment
    handler: http
    depends_on: [validate]
    retry_limit: 5
    timeout: 2s
    backoff: { initial: 100ms, max: 5s, jitter_pct: 0 }
    config: { url: "http://127.0.0.1:9/pay" }
  - name: inventory
    handler: noop
    depends_on: [validate]
    retryable: false
  - name: ship
    handler: sleep
    depends_on: [payment, inventory]
    timeout: 1500
"#;

#[test]
fn parses_and_orders_steps_topologically() {
    let t = Template::from_yaml(ORDER, "order.yaml").expect("valid");
    let s = t.snapshot();
    assert_eq!(s.qualified_name(), "shop/order@1.2.0");
    let names: Vec<&str> = s.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["validate", "payment", "inventory", "ship", "notify"]
    );
    let ship = &s.steps[3];
    assert_eq!(ship.depends_on, vec![StepId(1), StepId(2)]);
    assert_eq!(ship.timeout_ms, 1500);
    let payment = &s.steps[1];
    assert_eq!(payment.retry_limit, 5);
    assert_eq!(payment.timeout_ms, 2000);
    assert_eq!(payment.backoff.initial_ms, 100);
    assert_eq!(payment.backoff.max_ms, 5000);
    assert_eq!(payment.backoff.jitter_pct, 0);
    assert_eq!(payment.config.to_value()["url"], "http://127.0.0.1:9/pay");
    assert!(!s.steps[2].retryable);
    assert_eq!(s.steps[0].retry_limit, 3);
    assert_eq!(s.steps[0].timeout_ms, 30_000);
    assert_eq!(t.dag().children(StepId(0)), &[StepId(1), StepId(2)]);
}

#[test]
fn validates_context_against_the_schema() {
    let t = Template::from_yaml(ORDER, "order.yaml").expect("valid");
    assert!(
        t.validate_context(&RawJson::parse(r#"{"order_id": 3}"#).unwrap())
            .is_ok()
    );
    let errors = t
        .validate_context(&RawJson::parse(r#"{"order_id": "x"}"#).unwrap())
        .unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("/order_id:"), "{errors:?}");
    let errors = t
        .validate_context(&RawJson::parse("{}").unwrap())
        .unwrap_err();
    assert!(errors[0].contains("order_id"), "{errors:?}");
}

fn errors_of(yaml: &str) -> Vec<TemplateError> {
    Template::from_yaml(yaml, "t.yaml").expect_err("invalid").0
}

#[test]
fn every_error_names_file_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "namespace: a\nname: b\nversion: 1.0\nsteps: [{name: x, handler: noop}]",
            "version",
            "not a semver",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: []",
            "steps",
            "no steps",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop}, {name: x, handler: noop}]",
            "steps[1].name",
            "more than once",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop, depends_on: [y]}]",
            "steps[0].depends_on[0]",
            "`y`",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop, depends_on: [z]}, {name: y, handler: noop, depends_on: [x]}, {name: z, handler: noop, depends_on: [y]}]",
            "depends_on",
            "cycle",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop, retry_limit: 0}]",
            "steps[0].retry_limit",
            "at least 1",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop, timeout: soon}]",
            "steps[0].timeout",
            "duration",
        ),
        (
            "namespace: a b\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop}]",
            "namespace",
            "letters",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\ncontext_schema: {type: 7}\nsteps: [{name: x, handler: noop}]",
            "context_schema",
            "JSON Schema",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: x, handler: noop, colour: red}]",
            "line",
            "colour",
        ),
    ];
    for (yaml, field, text) in cases {
        let errors = errors_of(yaml);
        let found = errors
            .iter()
            .any(|e| e.file == "t.yaml" && e.field.contains(field) && e.to_string().contains(text));
        assert!(found, "expected {field} / {text} in {errors:?}");
    }
}

#[test]
fn cycle_error_names_the_cycle() {
    let errors = errors_of(
        "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - {name: a, handler: noop, depends_on: [c]}\n  - {name: b, handler: noop, depends_on: [a]}\n  - {name: c, handler: noop, depends_on: [b]}\n  - {name: d, handler: noop}\n",
    );
    let TemplateErrorKind::Cycle(path) = &errors[0].kind else {
        panic!("{errors:?}")
    };
    assert_eq!(path.len(), 4, "{path:?}");
    assert_eq!(path.first(), path.last());
    let mut names: Vec<&str> = path[..3].iter().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    // self dependency
    let errors = errors_of(
        "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: a, handler: noop, depends_on: [a]}]",
    );
    assert!(errors[0].to_string().contains("a -> a"), "{errors:?}");
}

#[test]
fn unknown_handlers_are_reported_per_step() {
    let t = Template::from_yaml(ORDER, "order.yaml").expect("valid");
    let err = t
        .check_handlers("order.yaml", |h| h == "noop" || h == "sleep")
        .unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].field, "steps[1].handler");
    assert!(err.to_string().contains("`http` is not registered"));
}
