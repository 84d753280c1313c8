//! Authentication and authorization of the HTTP API. When `auth.enabled`, every
//! request but `/health/live`, `/health/ready` and `/v1/openapi.json` carries
//! `Authorization: Bearer <token>`: a static token from `[[auth.tokens]]` or a JWT
//! (HS256 or RS256) verified with `[auth.jwt]`. Either gives a [`Principal`]: a set
//! of Tasker permissions (`tasker.<resource>:<action>`) and the namespaces they
//! apply to. No or an invalid token is 401; a valid token without the permission,
//! or outside its namespaces, is 403. With auth disabled everyone may do anything.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tasker_engine::config::AuthConfig;

use super::AppState;
use super::problem::Problem;

/// One of Tasker's permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    TaskCreate,
    TaskIndex,
    TaskShow,
    TaskCancel,
    TaskRetry,
    StepShow,
    StepResolve,
    HandlerIndex,
    AnalyticsIndex,
    MetricsIndex,
    HealthStatusIndex,
}

impl Permission {
    /// `(resource, action)`, as in `tasker.<resource>:<action>`.
    pub fn parts(self) -> (&'static str, &'static str) {
        match self {
            Permission::TaskCreate => ("task", "create"),
            Permission::TaskIndex => ("task", "index"),
            Permission::TaskShow => ("task", "show"),
            Permission::TaskCancel => ("task", "cancel"),
            Permission::TaskRetry => ("task", "retry"),
            Permission::StepShow => ("workflow_step", "show"),
            Permission::StepResolve => ("workflow_step", "resolve"),
            Permission::HandlerIndex => ("handler", "index"),
            Permission::AnalyticsIndex => ("analytics", "index"),
            Permission::MetricsIndex => ("metrics", "index"),
            Permission::HealthStatusIndex => ("health_status", "index"),
        }
    }

    pub fn name(self) -> String {
        let (r, a) = self.parts();
        format!("tasker.{r}:{a}")
    }
}

/// Which namespaces a principal's permissions cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Only(Vec<String>),
}

impl Scope {
    fn from_list(list: &[String]) -> Scope {
        if list.iter().any(|n| n == "*") {
            Scope::All
        } else {
            Scope::Only(list.to_vec())
        }
    }
}

/// Who is calling, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: Arc<str>,
    grants: Arc<Vec<String>>,
    scope: Arc<Scope>,
}

impl Principal {
    /// Auth disabled: every permission in every namespace.
    pub fn unrestricted() -> Principal {
        static ANONYMOUS: std::sync::OnceLock<Principal> = std::sync::OnceLock::new();
        ANONYMOUS
            .get_or_init(|| Principal {
                subject: "anonymous".into(),
                grants: Arc::new(vec!["*".into()]),
                scope: Arc::new(Scope::All),
            })
            .clone()
    }

    pub fn new(subject: &str, grants: Vec<String>, namespaces: &[String]) -> Principal {
        Principal {
            subject: subject.into(),
            grants: Arc::new(grants),
            scope: Arc::new(Scope::from_list(namespaces)),
        }
    }

    pub fn has(&self, p: Permission) -> bool {
        let (resource, action) = p.parts();
        self.grants.iter().any(|g| {
            g == "*"
                || g.strip_prefix("tasker.")
                    .and_then(|r| r.split_once(':'))
                    .is_some_and(|(r, a)| r == resource && (a == "*" || a == action))
        })
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn covers(&self, namespace: &str) -> bool {
        match &*self.scope {
            Scope::All => true,
            Scope::Only(list) => list.iter().any(|n| n == namespace),
        }
    }

    /// 403 unless the principal has `p` (in `namespace`, when given).
    pub fn require(&self, p: Permission, namespace: Option<&str>) -> Result<(), Problem> {
        if !self.has(p) {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!("{} lacks the permission {}", self.subject, p.name()),
            ));
        }
        match namespace {
            Some(ns) if !self.covers(ns) => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "namespace_denied",
                format!(
                    "{} may not use {} in namespace `{ns}`",
                    self.subject,
                    p.name()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// 403 unless the principal has `p` in every namespace (system-wide answers).
    pub fn require_all_namespaces(&self, p: Permission) -> Result<(), Problem> {
        self.require(p, None)?;
        match &*self.scope {
            Scope::All => Ok(()),
            Scope::Only(_) => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "namespace_denied",
                format!(
                    "{} is limited to some namespaces; {} without a namespace needs all of them",
                    self.subject,
                    p.name()
                ),
            )),
        }
    }
}

struct Jwt {
    key: DecodingKey,
    validation: Validation,
    permissions_claim: String,
    namespaces_claim: String,
}

/// The API's authenticator, built once from `[auth]`.
pub struct Auth {
    enabled: bool,
    tokens: Vec<(Vec<u8>, Principal)>,
    jwt: Option<Jwt>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Auth {
    pub fn disabled() -> Auth {
        Auth {
            enabled: false,
            tokens: Vec::new(),
            jwt: None,
        }
    }

    /// Reads keys named by the (already validated) configuration.
    pub fn from_config(config: &AuthConfig, leeway: Duration) -> anyhow::Result<Auth> {
        if !config.enabled {
            return Ok(Auth::disabled());
        }
        let tokens = config
            .tokens
            .iter()
            .map(|t| {
                (
                    t.token.as_bytes().to_vec(),
                    Principal::new(&t.name, t.permissions.clone(), &t.namespaces),
                )
            })
            .collect();
        let jwt = match &config.jwt {
            None => None,
            Some(j) => {
                let (algorithm, key) = match j.algorithm.as_str() {
                    "RS256" => {
                        let path = j.public_key_file.clone().unwrap_or_default();
                        let pem = std::fs::read(&path).with_context(|| {
                            format!("auth.jwt.public_key_file: cannot read {}", path.display())
                        })?;
                        let key = DecodingKey::from_rsa_pem(&pem).with_context(|| {
                            format!(
                                "auth.jwt.public_key_file: {} is not an RSA public key in PEM",
                                path.display()
                            )
                        })?;
                        (Algorithm::RS256, key)
                    }
                    _ => (
                        Algorithm::HS256,
                        DecodingKey::from_secret(j.secret.as_deref().unwrap_or("").as_bytes()),
                    ),
                };
                let mut validation = Validation::new(algorithm);
                validation.leeway = leeway.as_secs();
                validation.set_required_spec_claims(&["exp"]);
                match &j.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &j.issuer {
                    validation.set_issuer(&[iss]);
                }
                Some(Jwt {
                    key,
                    validation,
                    permissions_claim: j.permissions_claim.clone(),
                    namespaces_claim: j.namespaces_claim.clone(),
                })
            }
        };
        Ok(Auth {
            enabled: true,
            tokens,
            jwt,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The principal for an `Authorization` header, or a 401 problem.
    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Principal, Problem> {
        if !self.enabled {
            return Ok(Principal::unrestricted());
        }
        let unauthorized = |code: &str, detail: &str| {
            Problem::new(StatusCode::UNAUTHORIZED, code, detail.to_owned())
        };
        let Some(value) = header else {
            return Err(unauthorized(
                "missing_token",
                "send Authorization: Bearer <token>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    "invalid_token",
                    "the Authorization header is not `Bearer <token>`",
                )
            })?;
        // Compare against every static token without stopping early, so timing
        // tells nothing about which bytes matched.
        let mut found = None;
        for (secret, principal) in &self.tokens {
            if constant_time_eq(secret, token.as_bytes()) {
                found = Some(principal);
            }
        }
        if let Some(p) = found {
            return Ok(p.clone());
        }
        let Some(jwt) = &self.jwt else {
            return Err(unauthorized("invalid_token", "unknown token"));
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &jwt.key,
            &jwt.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => unauthorized("token_expired", "the token has expired"),
            ErrorKind::ImmatureSignature => {
                unauthorized("invalid_token", "the token is not valid yet")
            }
            _ => unauthorized("invalid_token", &format!("the token does not verify: {e}")),
        })?;
        let claims = data.claims;
        let list = |name: &str| -> Option<Vec<String>> {
            match claims.get(name)? {
                serde_json::Value::String(s) => {
                    Some(s.split_whitespace().map(str::to_owned).collect())
                }
                serde_json::Value::Array(a) => Some(
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            }
        };
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or("jwt")
            .to_owned();
        let grants = list(&jwt.permissions_claim).unwrap_or_default();
        let namespaces = list(&jwt.namespaces_claim).unwrap_or_else(|| vec!["*".into()]);
        Ok(Principal::new(&subject, grants, &namespaces))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Paths anyone may call.
fn is_public(path: &str) -> bool {
    matches!(path, "/health/live" | "/health/ready" | "/v1/openapi.json")
}

/// Middleware: authenticates the request and stores its [`Principal`].
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        req.extensions_mut().insert(Principal::unrestricted());
        return next.run(req).await;
    }
    match state
        .auth
        .authenticate(req.headers().get(header::AUTHORIZATION))
    {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(problem) => problem.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_and_scopes() {
        let p = Principal::new(
            "ops",
            vec!["tasker.task:*".into(), "tasker.metrics:index".into()],
            &["shop".into()],
        );
        assert!(p.has(Permission::TaskCreate) && p.has(Permission::TaskRetry));
        assert!(p.has(Permission::MetricsIndex));
        assert!(!p.has(Permission::StepResolve));
        assert!(p.require(Permission::TaskShow, Some("shop")).is_ok());
        let denied = p
            .require(Permission::TaskShow, Some("billing"))
            .unwrap_err();
        assert_eq!(
            (denied.status, denied.reason.as_deref()),
            (403, Some("namespace_denied"))
        );
        let denied = p
            .require(Permission::StepResolve, Some("shop"))
            .unwrap_err();
        assert_eq!(denied.reason.as_deref(), Some("permission_denied"));
        assert!(p.require_all_namespaces(Permission::MetricsIndex).is_err());
        let admin = Principal::new("admin", vec!["*".into()], &["*".into()]);
        assert!(
            admin
                .require_all_namespaces(Permission::AnalyticsIndex)
                .is_ok()
        );
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
