//! Authentication and authorization: static tokens and JWTs (HS256, RS256) with
//! namespace-scoped permissions. The matrix: no token, bad token, expired JWT,
//! right token in the wrong namespace, right token -> 401/401/401/403/2xx.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod api_support;
mod support;

use api_support::{Api, Env, fixture};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
const ADMIN: &str = "admin-token-0123456789";
const SHOP: &str = "shop-token-0123456789";
const READER: &str = "reader-token-0123456789";

fn config(jwt: &str) -> String {
    format!(
        r#"
[auth]
enabled = true

[[auth.tokens]]
name = "admin"
token = "{ADMIN}"
permissions = ["*"]

[[auth.tokens]]
name = "shop-ops"
token = "{SHOP}"
permissions = ["tasker.task:*", "tasker.workflow_step:*", "tasker.handler:index", "tasker.analytics:index"]
namespaces = ["shop"]

[[auth.tokens]]
name = "reader"
token = "{READER}"
permissions = ["tasker.task:index", "tasker.task:show"]

{jwt}
"#
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn order_body(ns: &str) -> Value {
    match ns {
        "shop" => json!({"namespace": "shop", "name": "order", "context": {"order_id": 1}}),
        _ => json!({"namespace": "billing", "name": "invoice"}),
    }
}

#[test]
fn tokens_and_jwts_are_checked_per_permission_and_namespace() {
    let env = Env::new(&config(&format!(
        "[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\nissuer = \"tests\"\n"
    )));
    let server = env.start(&[]);
    let anon = Api::new(&server.api);
    let admin = anon.with_token(ADMIN);
    let shop = anon.with_token(SHOP);
    let reader = anon.with_token(READER);
    let good_jwt = hs(json!({"sub": "svc", "iss": "tests", "exp": now() + 600,
        "permissions": ["tasker.task:create", "tasker.task:show"], "namespaces": ["shop"]}));
    let expired = hs(json!({"sub": "svc", "iss": "tests", "exp": now() - 3600,
        "permissions": ["*"]}));
    let wrong_issuer =
        hs(json!({"sub": "svc", "iss": "elsewhere", "exp": now() + 600, "permissions": ["*"]}));
    let forged = jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        json!({"sub": "svc", "iss": "tests", "exp": now() + 600, "permissions": ["*"]}),
    );

    // The matrix on POST /v1/tasks.
    let a = anon.post("/v1/tasks", &order_body("shop"));
    a.problem(401, "missing_token");
    assert!(
        a.www_authenticate
            .as_deref()
            .is_some_and(|w| w.starts_with("Bearer")),
        "{a:?}"
    );
    anon.with_token("wrong-token-0123456789")
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    let a = anon
        .with_token(&expired)
        .post("/v1/tasks", &order_body("shop"));
    a.problem(401, "token_expired");
    assert!(
        a.www_authenticate
            .as_deref()
            .is_some_and(|w| w.contains("invalid_token")),
        "{a:?}"
    );
    anon.with_token(&forged)
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    anon.with_token(&wrong_issuer)
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    let malformed = anon.request(
        anon.http
            .post(format!("{}/v1/tasks", anon.base))
            .header("Authorization", "Basic Zm9vOmJhcg==")
            .json(&order_body("shop")),
    );
    malformed.problem(401, "invalid_token");
    shop.post("/v1/tasks", &order_body("billing"))
        .problem(403, "namespace_denied");
    anon.with_token(&good_jwt)
        .post("/v1/tasks", &order_body("billing"))
        .problem(403, "namespace_denied");
    reader
        .post("/v1/tasks", &order_body("shop"))
        .problem(403, "permission_denied");
    let a = shop.post("/v1/tasks", &order_body("shop"));
    assert_eq!(a.status, 202, "{}", a.text);
    let shop_task = a.json()["task_id"].as_str().unwrap().to_owned();
    let a = anon
        .with_token(&good_jwt)
        .post("/v1/tasks", &order_body("shop"));
    assert_eq!(a.status, 202, "{}", a.text);
    let a = admin.post("/v1/tasks", &order_body("billing"));
    assert_eq!(a.status, 202, "{}", a.text);
    let billing_task = a.json()["task_id"].as_str().unwrap().to_owned();
    admin.wait_status(&shop_task, "complete");
    admin.wait_status(&billing_task, "complete");

    // Reads are scoped too: a shop token does not see billing's task.
    assert_eq!(shop.get(&format!("/v1/tasks/{shop_task}")).status, 200);
    shop.get(&format!("/v1/tasks/{billing_task}"))
        .problem(403, "namespace_denied");
    anon.get(&format!("/v1/tasks/{shop_task}"))
        .problem(401, "missing_token");
    anon.with_token(&expired)
        .get(&format!("/v1/tasks/{shop_task}"))
        .problem(401, "token_expired");
    assert_eq!(reader.get(&format!("/v1/tasks/{billing_task}")).status, 200);
    reader
        .get(&format!("/v1/tasks/{shop_task}/steps"))
        .problem(403, "permission_denied");
    let listed = shop.get("/v1/tasks?limit=500").json();
    assert!(
        listed["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["namespace"] == "shop"),
        "{listed}"
    );
    shop.get("/v1/tasks?namespace=billing")
        .problem(403, "namespace_denied");
    let listed = admin.get("/v1/tasks?limit=500").json();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 3, "{listed}");
    // Commands on another namespace's task.
    shop.post(&format!("/v1/tasks/{billing_task}/cancel"), &json!({}))
        .problem(403, "namespace_denied");
    reader
        .post(&format!("/v1/tasks/{shop_task}/cancel"), &json!({}))
        .problem(403, "permission_denied");
    shop.post(&format!("/v1/tasks/{shop_task}/cancel"), &json!({}))
        .problem(409, "invalid_transition");
    // Templates are filtered; analytics without a namespace needs every namespace.
    let templates = shop.get("/v1/templates").json();
    assert!(
        templates
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["namespace"] == "shop"),
        "{templates}"
    );
    shop.get("/v1/templates/billing")
        .problem(403, "namespace_denied");
    shop.get("/v1/analytics/performance")
        .problem(403, "namespace_denied");
    assert_eq!(
        shop.get("/v1/analytics/bottlenecks?namespace=shop").status,
        200
    );
    assert_eq!(admin.get("/v1/analytics/performance").status, 200);
    // Operations.
    anon.get("/metrics").problem(401, "missing_token");
    shop.get("/metrics").problem(403, "permission_denied");
    let m = admin.get("/metrics");
    assert_eq!(m.status, 200, "{}", m.text);
    shop.get("/health/status").problem(403, "permission_denied");
    assert_eq!(admin.get("/health/status").status, 200);
    anon.get("/v1/events/catalog").problem(401, "missing_token");
    assert_eq!(reader.get("/v1/events/catalog").status, 200);
    // Health and the spec never need a token.
    assert_eq!(anon.get("/health/live").status, 200);
    assert_eq!(anon.get("/health/ready").status, 200);
    assert_eq!(anon.get("/v1/openapi.json").status, 200);
    // GraphQL: 401 without a token, and refusals inside the GraphQL answer.
    let q = json!({"query": "mutation { createTask(input: {namespace: \"billing\", name: \"invoice\"}) { taskId } }"});
    anon.post("/graphql", &q).problem(401, "missing_token");
    let a = shop.post("/graphql", &q);
    assert_eq!(a.status, 200, "{}", a.text);
    let errors = &a.json()["errors"];
    assert_eq!(errors[0]["extensions"]["status"], 403, "{errors}");
    assert_eq!(
        errors[0]["extensions"]["reason"], "namespace_denied",
        "{errors}"
    );
    // The CLI sends TASKER_API_TOKEN.
    let out = support::tasker(&server.data_dir)
        .env("TASKER_API_TOKEN", ADMIN)
        .args(["status", &shop_task, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"complete\""));
    server.stop();
}

#[test]
fn rs256_jwts_verify_with_the_configured_public_key() {
    let public = fixture("jwt/rs256-public.pem");
    let env = Env::new(&config(&format!(
        "[auth.jwt]\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\naudience = \"tasker\"\n",
        public.display()
    )));
    let server = env.start(&[]);
    let anon = Api::new(&server.api);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt/rs256-private.pem")).unwrap())
        .unwrap();
    let token = |claims: Value| jwt(Algorithm::RS256, &key, claims);
    let good = token(json!({"sub": "svc", "aud": "tasker", "exp": now() + 600,
        "permissions": "tasker.task:create tasker.task:show", "namespaces": ["shop"]}));
    let expired =
        token(json!({"sub": "svc", "aud": "tasker", "exp": now() - 3600, "permissions": ["*"]}));
    let other_audience =
        token(json!({"sub": "svc", "aud": "billing", "exp": now() + 600, "permissions": ["*"]}));
    // An HS256 token signed with the public key's bytes must not pass (algorithm confusion).
    let confused = jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        json!({"sub": "svc", "aud": "tasker", "exp": now() + 600, "permissions": ["*"]}),
    );

    anon.post("/v1/tasks", &order_body("shop"))
        .problem(401, "missing_token");
    anon.with_token("garbage.garbage.garbage")
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    anon.with_token(&expired)
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "token_expired");
    anon.with_token(&other_audience)
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    anon.with_token(&confused)
        .post("/v1/tasks", &order_body("shop"))
        .problem(401, "invalid_token");
    anon.with_token(&good)
        .post("/v1/tasks", &order_body("billing"))
        .problem(403, "namespace_denied");
    let a = anon
        .with_token(&good)
        .post("/v1/tasks", &order_body("shop"));
    assert_eq!(a.status, 202, "{}", a.text);
    let id = a.json()["task_id"].as_str().unwrap().to_owned();
    anon.with_token(&good).wait_status(&id, "complete");
    anon.with_token(&good)
        .post(&format!("/v1/tasks/{id}/retry"), &json!({}))
        .problem(403, "permission_denied");
    server.stop();
}

#[test]
fn invalid_auth_configuration_stops_the_start_naming_the_key() {
    let env = Env::new(&config(
        "[auth.jwt]\nalgorithm = \"RS256\"\npublic_key_file = \"/nonexistent/key.pem\"\n",
    ));
    let out = support::tasker(&env.data)
        .env("TASKER_CONFIG", &env.config)
        .args(["run", "--templates"])
        .arg(&env.templates)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.jwt.public_key_file"), "{err}");
    let env = Env::new("[auth]\nenabled = true\n");
    let out = support::tasker(&env.data)
        .env("TASKER_CONFIG", &env.config)
        .args(["run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.enabled"));
}
