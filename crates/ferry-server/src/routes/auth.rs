//! Authentication over HTTP: the middleware that identifies every request, CouchDB's
//! `_session` (cookie login, used by PouchDB and browsers) and `POST /_ferry/login` (bearer
//! access tokens for Ferry clients and scripts).
//!
//! A request may carry `Authorization: Basic …` (name and password), `Authorization: Bearer …`
//! (an access token) or the `AuthSession` cookie. Wrong basic or bearer credentials are a 401
//! whatever the path; an expired cookie counts as no credentials, as in CouchDB. Without
//! credentials only the public routes answer (welcome, health, `_session`, login, and the sync
//! session, which authenticates inside its `hello`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{Auth, AuthError, Identity};
use crate::error::{ApiError, ApiResult};

/// The cookie CouchDB (and so PouchDB) uses for session logins.
const SESSION_COOKIE: &str = "AuthSession";

/// Routes that answer without credentials.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/" | "/health" | "/_up" | "/_session" | "/_ferry/login" | "/_ferry/sync"
    )
}

/// Credentials found in a request's headers.
enum Presented {
    Basic { name: String, password: String },
    Bearer(String),
    Cookie(String),
}

fn presented(headers: &HeaderMap) -> Result<Option<Presented>, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("The Authorization header is not readable."))?;
        if let Some(encoded) = text.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| ApiError::unauthorized("Malformed basic credentials."))?;
            let (name, password) = decoded
                .split_once(':')
                .ok_or_else(|| ApiError::unauthorized("Malformed basic credentials."))?;
            return Ok(Some(Presented::Basic {
                name: name.to_owned(),
                password: password.to_owned(),
            }));
        }
        if let Some(token) = text.strip_prefix("Bearer ") {
            return Ok(Some(Presented::Bearer(token.trim().to_owned())));
        }
        return Err(ApiError::unauthorized(
            "Unsupported Authorization scheme: use Basic or Bearer.",
        ));
    }
    Ok(session_cookie(headers).map(Presented::Cookie))
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|cookie| {
            cookie
                .trim()
                .strip_prefix(SESSION_COOKIE)?
                .strip_prefix('=')
                .filter(|token| !token.is_empty())
                .map(str::to_owned)
        })
}

fn verify(auth: &Auth, presented: Presented) -> Result<Option<Identity>, AuthError> {
    match presented {
        Presented::Basic { name, password } => auth.verify_password(&name, &password).map(Some),
        Presented::Bearer(token) => auth.verify_access_token(&token).map(Some),
        // An expired or revoked session cookie is no session at all.
        Presented::Cookie(token) => Ok(auth.verify_access_token(&token).ok()),
    }
}

/// The identity of a request, from its headers: `None` when it carries no (valid) session.
async fn identify(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<Identity>> {
    if !state.auth().config().required {
        return Ok(Some(Identity::anonymous_admin()));
    }
    match presented(headers)? {
        None => Ok(None),
        Some(presented) => {
            state
                .authenticate(move |auth| verify(auth, presented))
                .await
        }
    }
}

/// Middleware: attaches the caller's [`Identity`] to the request, or answers 401.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    match identify(&state, request.headers()).await {
        Err(error) => error.into_response(),
        Ok(Some(identity)) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Ok(None) if is_public(request.uri().path()) => next.run(request).await,
        Ok(None) => {
            ApiError::unauthorized("You are not authorized to access this db.").into_response()
        }
    }
}

#[derive(Deserialize)]
struct LoginBody {
    name: String,
    password: String,
}

/// Reads `{name, password}` as JSON or as a URL-encoded form (CouchDB accepts both).
fn login_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<LoginBody> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
    let parsed = if is_form {
        serde_urlencoded::from_bytes(body).map_err(|error| error.to_string())
    } else {
        serde_json::from_slice(body).map_err(|error| error.to_string())
    };
    parsed.map_err(|error| ApiError::bad_request(format!("expected name and password: {error}")))
}

fn user_context(identity: Option<&Identity>) -> Value {
    json!({
        "name": identity.and_then(|identity| identity.user.clone()),
        "roles": identity.map(Identity::roles).unwrap_or_default(),
    })
}

/// The session cookie: never readable by scripts (`HttpOnly`), not sent with another site's
/// requests (`SameSite=Lax`), and over TLS only when the server serves TLS (`Secure`).
fn cookie_header(state: &AppState, token: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if state.serves_tls() { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Version=1; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}"
    ))
    .expect("tokens are hex")
}

/// `POST /_session`: logs in with a name and password; sets the session cookie.
pub(crate) async fn post_session(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let LoginBody { name, password } = login_body(&headers, &body)?;
    let (identity, issued) = state
        .authenticate(move |auth| auth.login(&name, &password))
        .await?;
    let max_age = state.auth().config().access_token_ttl.as_secs();
    let mut response = Json(json!({
        "ok": true,
        "name": identity.user,
        "roles": identity.roles(),
    }))
    .into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie_header(&state, &issued.token, max_age),
    );
    Ok(response)
}

/// `GET /_session`: who the caller is (`name` is null when anonymous).
pub(crate) async fn get_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let identity = identify(&state, &headers).await?;
    let method = match presented(&headers)? {
        Some(Presented::Cookie(_)) => Some("cookie"),
        Some(_) => Some("default"),
        None => None,
    };
    Ok(Json(json!({
        "ok": true,
        "userCtx": user_context(identity.as_ref()),
        "info": {
            "authentication_handlers": ["cookie", "default"],
            "authenticated": identity.as_ref().and(method),
        },
    })))
}

/// `DELETE /_session`: logs out (the cookie's token stops working at once).
pub(crate) async fn delete_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(token) = session_cookie(&headers) {
        state
            .authenticate(move |auth| auth.revoke_access_token(&token))
            .await?;
    }
    let mut response = Json(json!({"ok": true})).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie_header(&state, "", 0));
    Ok(response)
}

/// `POST /_ferry/login`: a bearer access token for a name and password.
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let LoginBody { name, password } = login_body(&headers, &body)?;
    let (identity, issued) = state
        .authenticate(move |auth| auth.login(&name, &password))
        .await?;
    Ok(Json(json!({
        "ok": true,
        "user": identity.user,
        "roles": identity.roles(),
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_at": issued.expires_ms,
    })))
}
