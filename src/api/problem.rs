//! RFC 9457 problem details, and the request extractors that turn every bad input
//! (invalid JSON, wrong types, unknown fields, too deep, too large, bad query
//! strings) into one.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An RFC 9457 problem (`application/problem+json`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// A stable machine-readable code (`unknown_task`, `invalid_context`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Further messages, e.g. every JSON Schema error of a context.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("https://tasker.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            reason: Some(code.to_owned()),
            details: Vec::new(),
            task_id: None,
        }
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found(code: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn unavailable(code: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
    }

    /// The read model is needed but this process does not project.
    pub fn no_read_model() -> Problem {
        Problem::unavailable(
            "read_model_disabled",
            "this answer comes from the read model, and this `tasker run` has none \
             (projector.enabled = false)",
        )
    }

    /// A read-model query failed.
    pub fn read_model(e: &tasker_projections::StoreError) -> Problem {
        tracing::warn!(error = %e, "read-model query failed");
        Problem::unavailable("read_model_unavailable", e.to_string())
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            let code = self.reason.as_deref().unwrap_or("invalid_token");
            let value = if code == "missing_token" {
                "Bearer realm=\"tasker\"".to_owned()
            } else {
                format!(
                    "Bearer realm=\"tasker\", error=\"invalid_token\", error_description=\"{}\"",
                    code
                )
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

/// The deepest JSON nesting the API accepts (`api.max_json_depth`); set once at
/// start, read by every body extractor.
static MAX_DEPTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

pub fn set_max_json_depth(depth: usize) {
    let _ = MAX_DEPTH.set(depth);
}

fn max_depth() -> usize {
    MAX_DEPTH.get().copied().unwrap_or(64)
}

/// How deeply `bytes` nest arrays and objects (strings skipped), stopping early
/// once past `limit`.
pub fn json_depth(bytes: &[u8], limit: usize) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    max = depth;
                    if max > limit {
                        return max;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses a JSON body into `T` with the API's rules: syntax errors are 400
/// `invalid_json`; a body nested deeper than `api.max_json_depth` is 400
/// `json_too_deep`; wrong types, missing or unknown fields are 422 `invalid_body`
/// naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let limit = max_depth();
    if json_depth(bytes, limit) > limit {
        return Err(Problem::bad_request(
            "json_too_deep",
            format!("the body nests arrays/objects deeper than {limit} levels"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        json_problem(&e.into_inner(), &path)
    })?;
    de.end().map_err(|e| json_problem(&e, "."))?;
    Ok(value)
}

fn json_problem(e: &serde_json::Error, path: &str) -> Problem {
    let at = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!(" at `{path}`")
    };
    match e.classify() {
        serde_json::error::Category::Data => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("{e}{at}"),
        ),
        _ => Problem::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    }
}

pub fn body_problem(rejection: &axum::extract::rejection::BytesRejection) -> Problem {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            status,
            "body_too_large",
            "the request body is larger than api.max_body_bytes",
        )
    } else {
        Problem::new(status, "unreadable_body", rejection.body_text())
    }
}

fn is_json(req_content_type: Option<&HeaderValue>) -> bool {
    req_content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let base = v.split(';').next().unwrap_or("").trim();
            base.eq_ignore_ascii_case("application/json") || base.ends_with("+json")
        })
        .unwrap_or(false)
}

/// A JSON body (`application/json`), parsed with [`parse_json`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_problem(&e))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// An optional JSON body: none (empty) gives `T::default()`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let json = is_json(req.headers().get(header::CONTENT_TYPE));
        let has_type = req.headers().contains_key(header::CONTENT_TYPE);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_problem(&e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        if has_type && !json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// Query parameters; unknown or malformed ones are 400 `invalid_query`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| Problem::bad_request("invalid_query", e.body_text()))
    }
}

/// Unknown routes.
pub async fn not_found() -> Problem {
    Problem::not_found("no_route", "no such endpoint; see /v1/openapi.json")
}

/// Known routes, wrong method.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see /v1/openapi.json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // fields are read by serde only
    struct Body {
        name: String,
        n: Option<u32>,
    }

    #[test]
    fn bad_bodies_become_problems() {
        assert_eq!(json_depth(br#"{"a": [[{"b": "[[[["}]]]}"#, 64), 4);
        assert_eq!(json_depth(br#""\"[[[""#, 64), 0);
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(json_depth(deep.as_bytes(), 64), 65);
        let cases: &[(&str, u16, &str)] = &[
            ("{", 400, "invalid_json"),
            (r#"{"name": "x"} trailing"#, 400, "invalid_json"),
            (r#"{"name": 5}"#, 422, "invalid_body"),
            (r#"{"name": "x", "n": "five"}"#, 422, "invalid_body"),
            (r#"{"name": "x", "extra": 1}"#, 422, "invalid_body"),
            (r#"{"n": 1}"#, 422, "invalid_body"),
            (&deep, 400, "json_too_deep"),
        ];
        for (body, status, code) in cases {
            let p = parse_json::<Body>(body.as_bytes()).unwrap_err();
            assert_eq!(
                (p.status, p.reason.as_deref()),
                (*status, Some(*code)),
                "{body}: {p:?}"
            );
        }
        let p = parse_json::<Body>(br#"{"name": "x", "n": "five"}"#).unwrap_err();
        assert!(p.detail.contains("`n`"), "{}", p.detail);
        assert!(parse_json::<Body>(br#"{"name": "x", "n": 3}"#).is_ok());
    }
}
