//! The one error-code enum of Meterline.
//!
//! Every typed error of every service is classified once into an
//! [`ErrorCode`]. The code decides the HTTP status the gateway answers with,
//! the `Nats-Service-Error-Code` header a NATS request gets back, and what a
//! consumer does with the message that caused it.

use serde::{Deserialize, Serialize};

/// What went wrong, as far as a caller is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed or fails validation. Retrying will not help.
    BadRequest,
    /// No valid credentials or token.
    Unauthorized,
    /// Valid credentials, but not for this organization or operation.
    Forbidden,
    /// The addressed entity does not exist (or was deleted).
    NotFound,
    /// A version check failed: someone else wrote first.
    Conflict,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// A rate limit was hit.
    TooManyRequests,
    /// A dependency (the bus, a store) is not available right now. Retry.
    Unavailable,
    /// A bug or an unexpected state. Logged with detail; the caller gets little.
    Internal,
}

/// What a consumer does with a message whose handling failed with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerAction {
    /// The message can never succeed: terminate it (after recording why).
    Term,
    /// The failure is transient: redeliver later, with backoff.
    NakWithBackoff,
}

impl ErrorCode {
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The code carried in the `Nats-Service-Error-Code` header: the HTTP
    /// status, so NATS callers and HTTP callers read the same number.
    pub const fn nats_code(self) -> usize {
        self.http_status() as usize
    }

    pub fn from_nats_code(code: usize) -> Self {
        match code {
            400 => ErrorCode::BadRequest,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::TooManyRequests,
            503 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }

    pub const fn consumer_action(self) -> ConsumerAction {
        match self {
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::TooManyRequests => {
                ConsumerAction::NakWithBackoff
            }
            _ => ConsumerAction::Term,
        }
    }
}

/// An error with its code and a message fit to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// An unexpected failure. The detail is logged here; the caller only
    /// learns that something failed inside.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }
}

impl From<ServiceError> for async_nats::service::error::Error {
    fn from(e: ServiceError) -> Self {
        async_nats::service::error::Error {
            code: e.code.nats_code(),
            status: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_codes_round_trip() {
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::TooManyRequests,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_nats_code(c.nats_code()), c);
        }
    }
}
