//! OAuth client-credentials tokens and bearer authentication.
//!
//! `POST /oauth/token` checks an access key and secret with the entities
//! service (`svc.auth.verify`) and issues a short-lived HS256 JWT naming the
//! service user and its organization. Every `/organizations/{orgId}/...`
//! route then requires that token, and only for its own organization.
//! Verifying a token needs no bus round trip.

use std::time::Duration;

use axum::extract::{RawPathParams, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meterline_shared::protocol::{Principal, VerifyRequest};
use meterline_shared::{bus, codec, subjects, ServiceError};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use crate::body::LimitedBody;
use crate::error::ApiError;
use crate::AppState;

/// The `iss` of every token this gateway issues and accepts.
pub const ISSUER: &str = "meterline";
/// The `scope` m3ter reports for its tokens; SDKs ignore it but expect it.
pub const SCOPE: &str = "m3ter-resources/m3ter-scope";
/// Clock skew tolerated when checking `exp`, in seconds.
const LEEWAY_SECS: u64 = 30;

/// The claims of a gateway token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The service user's id.
    pub sub: String,
    /// The organization the token is valid for.
    pub org: String,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    /// Unique token id (a ULID), for audit logs.
    pub jti: String,
}

/// Who is calling: put in the request's extensions by [`require_bearer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub org_id: String,
    pub service_user_id: String,
}

impl Caller {
    /// The key of the caller's per-source rate limit: `<org>.<service
    /// user>` (an org id never contains a dot, so keys cannot collide).
    pub fn source_key(&self) -> String {
        format!("{}.{}", self.org_id, self.service_user_id)
    }
}

/// Signs and verifies tokens with one HS256 key.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl TokenKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = LEEWAY_SECS;
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// How long issued tokens are valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A signed token for `principal`, valid from now for the configured TTL.
    pub fn issue(&self, principal: &Principal) -> Result<String, ServiceError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: principal.service_user_id.clone(),
            org: principal.org_id.clone(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            iss: ISSUER.to_owned(),
            jti: ulid::Ulid::new().to_string(),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use it for expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, ServiceError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(ServiceError::internal)
    }

    /// The claims of a valid token, or a 401 saying why it is not.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::unauthorized("token expired"),
                _ => ApiError::unauthorized("invalid token"),
            })
    }
}

/// The grant, from a form body or a JSON body (m3ter's SDKs send JSON).
#[derive(Debug, Default, Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    #[allow(dead_code)]
    scope: Option<String>,
}

#[derive(Debug, Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    scope: &'static str,
}

fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) => ct.to_ascii_lowercase().contains("json"),
        None => body.trim_ascii_start().starts_with(b"{"),
    }
}

fn parse_grant(headers: &HeaderMap, body: &[u8]) -> Result<TokenRequest, ApiError> {
    if body.trim_ascii().is_empty() {
        return Ok(TokenRequest::default());
    }
    if is_json(headers, body) {
        return serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("malformed token request: {e}"))
                .with_oauth("invalid_request")
        });
    }
    let mut req = TokenRequest::default();
    for (k, v) in form_urlencoded::parse(body) {
        let slot = match k.as_ref() {
            "grant_type" => &mut req.grant_type,
            "client_id" => &mut req.client_id,
            "client_secret" => &mut req.client_secret,
            "scope" => &mut req.scope,
            _ => continue,
        };
        *slot = Some(v.into_owned());
    }
    Ok(req)
}

/// `Authorization: Basic base64(accessKey:secret)`: `None` when there is no
/// Basic header, an error when there is one and it is malformed.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or_default();
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let malformed =
        || ApiError::unauthorized("malformed basic credentials").with_oauth("invalid_client");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (key, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok(Some((key.to_owned(), secret.to_owned())))
}

/// `POST /oauth/token`: the client-credentials grant.
#[instrument(skip_all)]
pub async fn issue_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let grant = parse_grant(&headers, &body)?;
    match grant.grant_type.as_deref() {
        Some("client_credentials") => {}
        None => {
            return Err(
                ApiError::bad_request("grant_type is required").with_oauth("invalid_request")
            )
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "grant_type {other:?} is not supported; use client_credentials"
            ))
            .with_oauth("unsupported_grant_type"))
        }
    }
    let (access_key, secret) = match basic_credentials(&headers)? {
        Some(creds) => creds,
        None => match (grant.client_id, grant.client_secret) {
            (Some(id), Some(secret)) => (id, secret),
            _ => return Err(ApiError::unauthorized(
                "missing client credentials: send Authorization: Basic base64(accessKey:secret)",
            )
            .with_oauth("invalid_client")),
        },
    };
    let payload = serde_json::to_vec(&VerifyRequest {
        access_key: access_key.clone(),
        secret,
    })
    .map_err(ServiceError::internal)?;
    let reply = bus::request(
        &state.inner.nats,
        subjects::AUTH_VERIFY.to_owned(),
        codec::Codec::Json.headers(),
        payload.into(),
    )
    .await
    .map_err(|e| {
        warn!(%access_key, code = ?e.code, reason = %e.message, "token request refused");
        let oauth = if e.code == meterline_shared::ErrorCode::Unauthorized {
            Some("invalid_client")
        } else {
            None
        };
        ApiError {
            oauth,
            ..ApiError::from(e)
        }
    })?;
    let principal: Principal = serde_json::from_slice(&reply).map_err(ServiceError::internal)?;
    let token = state.inner.keys.issue(&principal)?;
    info!(org = %principal.org_id, service_user = %principal.service_user_id, "token issued");
    let response = TokenResponse {
        access_token: token,
        token_type: "Bearer",
        expires_in: state.inner.keys.ttl().as_secs(),
        scope: SCOPE,
    };
    Ok((
        [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        Json(response),
    )
        .into_response())
}

/// Middleware of every `/organizations/{orgId}/...` route: the org id must be
/// a subject-safe token (400), the request must carry a valid bearer token
/// (401), and the token must be for that org (403). Puts a [`Caller`] in the
/// request's extensions.
pub async fn require_bearer(
    State(state): State<AppState>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let params = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let org = params
        .iter()
        .find(|(k, _)| *k == "orgId")
        .map(|(_, v)| v.to_owned())
        .ok_or_else(|| ApiError::bad_request("orgId is missing"))?;
    subjects::validate_token("orgId", &org)?;
    let token = bearer_token(req.headers())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let claims = state.inner.keys.verify(token)?;
    if claims.org != org {
        return Err(ApiError::forbidden(format!(
            "token is not valid for organization {org}"
        )));
    }
    req.extensions_mut().insert(Caller {
        org_id: org,
        service_user_id: claims.sub,
    });
    Ok(next.run(req).await)
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(b"unit-test-secret", Duration::from_secs(60))
    }

    fn principal() -> Principal {
        Principal {
            org_id: "org1".into(),
            service_user_id: "su1".into(),
        }
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_principal() {
        let k = keys();
        let claims = k.verify(&k.issue(&principal()).unwrap()).unwrap();
        assert_eq!(
            (
                claims.org.as_str(),
                claims.sub.as_str(),
                claims.iss.as_str()
            ),
            ("org1", "su1", ISSUER)
        );
        assert_eq!(claims.exp - claims.iat, 60);
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_told_apart() {
        let k = keys();
        let now = chrono::Utc::now().timestamp() as u64;
        let old = Claims {
            sub: "su1".into(),
            org: "org1".into(),
            iat: now - 7200,
            exp: now - 3600,
            iss: ISSUER.into(),
            jti: "j".into(),
        };
        assert_eq!(
            k.verify(&k.sign(&old).unwrap()).unwrap_err().error.message,
            "token expired"
        );
        let forged = TokenKeys::new(b"another-secret", Duration::from_secs(60))
            .issue(&principal())
            .unwrap();
        assert_eq!(
            k.verify(&forged).unwrap_err().error.message,
            "invalid token"
        );
        assert_eq!(
            k.verify("not.a.jwt").unwrap_err().error.message,
            "invalid token"
        );
        let foreign = Claims {
            iss: "someone-else".into(),
            exp: now + 60,
            ..old
        };
        assert_eq!(
            k.verify(&k.sign(&foreign).unwrap())
                .unwrap_err()
                .error
                .message,
            "invalid token"
        );
    }

    #[test]
    fn grants_parse_from_form_and_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let g = parse_grant(
            &h,
            b"grant_type=client_credentials&client_id=k&client_secret=s%2Fx",
        )
        .unwrap();
        assert_eq!(g.grant_type.as_deref(), Some("client_credentials"));
        assert_eq!(g.client_secret.as_deref(), Some("s/x"));
        let g = parse_grant(
            &HeaderMap::new(),
            br#"{"grant_type":"client_credentials","scope":"x"}"#,
        )
        .unwrap();
        assert_eq!(g.grant_type.as_deref(), Some("client_credentials"));
        assert!(parse_grant(&HeaderMap::new(), b"")
            .unwrap()
            .grant_type
            .is_none());
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(parse_grant(&h, b"{nope").unwrap_err().status(), 400);
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_credentials(&h).unwrap(), None);
        let enc = base64::engine::general_purpose::STANDARD.encode("key:sec:ret");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {enc}")).unwrap(),
        );
        assert_eq!(
            basic_credentials(&h).unwrap(),
            Some(("key".into(), "sec:ret".into()))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("basic !!!"));
        assert_eq!(basic_credentials(&h).unwrap_err().status(), 401);
    }

    #[test]
    fn bearer_tokens_are_found_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
    }
}
