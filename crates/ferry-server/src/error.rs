//! Errors as HTTP responses, in CouchDB's shape: a status and `{"error": ..., "reason": ...}`.
//!
//! Client errors (4xx) carry their reason to the client and are not logged as failures.
//! Internal errors become a generic 500 whose body does not leak internals; the full error is
//! logged.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_core::model::DocumentError;
use ferry_store::StoreError;
use ferry_store::endpoint::{EndpointError, Refusal};
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// CouchDB's short error code (`not_found`, `conflict`, `bad_request`, ...).
    pub error: &'static str,
    /// A sentence for humans.
    pub reason: String,
}

impl ApiError {
    /// An error with the given status, code and reason.
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            reason: reason.into(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// 401 `unauthorized`: no credentials, or wrong ones.
    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
    }

    /// 403 `forbidden`: authenticated, but not allowed to do this.
    pub fn forbidden(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", reason)
    }

    /// 404 `not_found`.
    pub fn not_found(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", reason)
    }

    /// 409 `conflict`.
    pub fn conflict() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "Document update conflict.",
        )
    }

    /// 413 `too_large`.
    pub fn too_large(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", reason)
    }

    /// 500, logged in full, answered without details.
    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "The server failed to handle the request; the details are in its log.",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NoSuchDatabase(_) => ApiError::not_found("Database does not exist."),
            StoreError::DatabaseExists(_) => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "file_exists",
                "The database could not be created, the file already exists.",
            ),
            StoreError::InvalidDatabaseName(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "illegal_database_name",
                error.to_string(),
            ),
            StoreError::LocalConflict => ApiError::conflict(),
            StoreError::InvalidRevision { .. } | StoreError::InvalidQuery(_) => {
                ApiError::bad_request(error.to_string())
            }
            StoreError::StorageFull(_) => {
                tracing::error!(%error, "a write failed for lack of storage");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "The server could not store the request: its disk is full. Nothing of it was stored; retry later.",
                )
            }
            StoreError::TooManyDatabases { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "database_quota", error.to_string())
            }
            StoreError::TooManyOpen { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_open_databases",
                format!("{error}; retry shortly"),
            ),
            StoreError::Corrupt { what, .. } => {
                tracing::error!(%error, "stored data cannot be read");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_data",
                    format!(
                        "The stored {what} cannot be read; the rest of the database is served. The details are in the server's log."
                    ),
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<ferry_core::json::JsonError> for ApiError {
    fn from(error: ferry_core::json::JsonError) -> ApiError {
        match error {
            ferry_core::json::JsonError::TooManyValues(_) => ApiError::too_large(error.to_string()),
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

impl From<&Refusal> for ApiError {
    fn from(refusal: &Refusal) -> ApiError {
        let status = match refusal {
            Refusal::Invalid(DocumentError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Conflict(_) => return ApiError::conflict(),
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, refusal.code(), refusal.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        ApiError::from(&refusal)
    }
}

impl From<EndpointError> for ApiError {
    fn from(error: EndpointError) -> ApiError {
        match error {
            EndpointError::TooMany { .. } => ApiError::too_large(error.to_string()),
            EndpointError::InvalidCheckpoint(_) => ApiError::bad_request(error.to_string()),
            EndpointError::Refused { refusal, .. } => ApiError::from(refusal),
            EndpointError::Store(error) => ApiError::from(error),
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(error: crate::auth::AuthError) -> ApiError {
        match error {
            crate::auth::AuthError::Rejected(reason) => ApiError::unauthorized(reason),
            crate::auth::AuthError::Invalid(reason) => ApiError::bad_request(reason),
            crate::auth::AuthError::Store(error) => ApiError::from(error),
            crate::auth::AuthError::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_logins",
                "The server is checking as many passwords as it is configured for; retry shortly.",
            ),
        }
    }
}

/// Seconds a client is asked to wait before retrying a 503 (every 503 is a momentary lack of
/// capacity: password checks, session places, open databases).
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "error": self.error, "reason": self.reason })),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
