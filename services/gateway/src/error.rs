//! Errors as the HTTP client sees them: every error response is JSON
//! `{"message": "..."}` with the status its [`ErrorCode`] decides.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meterline_shared::{ErrorCode, ServiceError};
use serde::Serialize;

/// The error of every handler: a [`ServiceError`] plus, for the OAuth token
/// endpoint, the RFC 6749 `error` code, and for a rate limit, when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub error: ServiceError,
    /// RFC 6749 §5.2 error code (`invalid_client`, ...), only on `/oauth/token`.
    pub oauth: Option<&'static str>,
    /// When the request may be retried: sent as `Retry-After` (whole
    /// seconds) and `retry-after-ms` (which m3ter's SDKs read first).
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            error: ServiceError::new(code, message),
            oauth: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// Tells the client when to retry.
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Adds an OAuth error code to the body.
    pub fn with_oauth(mut self, code: &'static str) -> Self {
        self.oauth = Some(code);
        self
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.error.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        ApiError {
            error,
            oauth: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = json_message(status, &self.error.message, self.oauth);
        if status == StatusCode::UNAUTHORIZED {
            let challenge = if self.oauth.is_some() {
                "Basic realm=\"meterline\""
            } else {
                "Bearer"
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if status == StatusCode::CONFLICT {
            // A version conflict needs a fresh read, not the same request
            // again: tells the m3ter SDKs (which retry 409 by default) so.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Some(wait) = self.retry_after {
            let headers = response.headers_mut();
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::ratelimit::retry_after_secs(wait)),
            );
            let ms = wait.as_micros().div_ceil(1000).max(1);
            headers.insert(
                "retry-after-ms",
                HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
            );
        }
        response
    }
}

fn json_message(status: StatusCode, message: &str, error: Option<&str>) -> Response {
    let body = serde_json::to_vec(&ErrorBody { message, error }).unwrap_or_else(|_| b"{}".to_vec());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Unknown route.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// Known route, wrong method.
pub async fn method_not_allowed() -> Response {
    json_message(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
        None,
    )
}

/// The largest error body the safety net rewrites; anything larger is
/// replaced by the status text.
const MAX_REWRITTEN_BODY: usize = 4096;

/// Safety net: any error response that is not JSON (axum's own rejections,
/// the body limit, a layer's plain-text reply) is rewritten as
/// `{"message": ...}`, so a client can always parse an error. Also counts
/// responses by status.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    metrics::counter!("meterline_gateway_responses_total", "status" => status.as_str().to_owned())
        .increment(1);
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_REWRITTEN_BODY)
        .await
        .unwrap_or_else(|_| Bytes::new());
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        t => t.to_owned(),
    };
    let body = serde_json::to_vec(&ErrorBody {
        message: &message,
        error: None,
    })
    .unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_are_json_with_the_code_status() {
        let r = ApiError::from(ServiceError::conflict("version 3 is stale")).into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"message": "version 3 is stale"}));
    }

    #[tokio::test]
    async fn rate_limit_errors_say_when_to_retry() {
        let r = ApiError::new(ErrorCode::TooManyRequests, "slow down")
            .with_retry_after(Duration::from_millis(1200))
            .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1200");
        let r = ApiError::new(ErrorCode::TooManyRequests, "slow down").into_response();
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
    }

    #[tokio::test]
    async fn oauth_errors_carry_the_rfc_code_and_a_challenge() {
        let r = ApiError::unauthorized("bad secret")
            .with_oauth("invalid_client")
            .into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "invalid_client");
        assert_eq!(v["message"], "bad secret");
    }
}
