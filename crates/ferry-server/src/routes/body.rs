//! Request bodies: refused up front when they declare more than the limit, and read in full
//! under a deadline before any handler sees them (`docs/limits.md`).
//!
//! Every handler reads its whole body anyway (JSON, forms); reading it here, once, is what
//! lets a body that stalls be answered 408 instead of holding its connection and memory for as
//! long as the client likes. Login bodies, which anyone may send, get the small
//! pre-authentication limit.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper::body::Body as _;

use crate::AppState;
use crate::error::ApiError;

/// Routes whose body is read before its sender is authenticated.
fn is_unauthenticated_body(path: &str) -> bool {
    matches!(path, "/_session" | "/_ferry/login")
}

/// The most bytes a body sent to `path` may have.
fn limit_for(state: &AppState, path: &str) -> usize {
    if is_unauthenticated_body(path) {
        state
            .max_unauthenticated_bytes()
            .min(state.limits.max_request_bytes)
    } else {
        state.limits.max_request_bytes
    }
}

/// An error answered before the body was read: the connection cannot be reused.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn too_large(limit: usize) -> Response {
    closing(ApiError::too_large(format!(
        "The request body is larger than this server accepts here ({limit} bytes)."
    )))
}

/// Middleware: refuses a request whose `Content-Length` exceeds the limit with 413, before
/// authentication or anything else reads it.
pub(crate) async fn refuse_declared_length(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = limit_for(&state, request.uri().path());
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return too_large(limit);
    }
    next.run(request).await
}

/// Middleware: reads the request body in full, within the limit and the body deadline, and
/// hands the handler the bytes.
pub(crate) async fn read_body(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().size_hint().exact() == Some(0) {
        return next.run(request).await;
    }
    let limit = limit_for(&state, request.uri().path());
    let timeout = state.request_body_timeout();
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, collect(body, limit)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(Unread::TooLarge)) => too_large(limit),
        Ok(Err(Unread::Failed(error))) => closing(ApiError::bad_request(format!(
            "The request body could not be read: {error}"
        ))),
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs_f64()
            ),
        )),
    }
}

enum Unread {
    TooLarge,
    Failed(axum::Error),
}

async fn collect(body: Body, limit: usize) -> Result<Bytes, Unread> {
    let declared = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Unread::Failed)?;
        if bytes.len() + chunk.len() > limit {
            return Err(Unread::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(bytes))
}
