//! Which web pages may call the server: its own origin, and the origins an administrator
//! allowed (`ferry serve --allow-origin`), none by default.
//!
//! A browser sends the `AuthSession` cookie with a request a page on another site makes, and
//! runs a WebSocket upgrade from any page without asking the server first. So a request that
//! says it comes from another page (its `Origin` header) is refused with 403 unless that
//! origin is allowed, before its credentials are checked (a page cannot make the server spend
//! password checks either); CORS answers name only allowed origins. Requests without `Origin`
//! (Ferry's clients, the CLI, PouchDB in Node, curl) are not a browser's and are served.

use std::str::FromStr;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::AppState;
use crate::error::ApiError;

/// A web origin a page may call the server from: `http://` or `https://`, a host and an
/// optional port, nothing else (no path, no wildcard: the server answers with credentials, so
/// `*` and `null` are refused).
///
/// ```
/// use ferry_server::Origin;
/// let origin: Origin = "https://App.Example.com:8443".parse().unwrap();
/// assert_eq!(origin.as_str(), "https://app.example.com:8443");
/// assert!("https://app.example.com/path".parse::<Origin>().is_err());
/// assert!("*".parse::<Origin>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin(String);

impl Origin {
    /// The origin as browsers send it (scheme and host in lower case).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Origin {
    type Err = String;

    fn from_str(text: &str) -> Result<Origin, String> {
        let refuse = |why: &str| Err(format!("invalid origin {text:?}: {why}"));
        let lower = text.trim().to_ascii_lowercase();
        let Some((scheme, authority)) = lower.split_once("://") else {
            return refuse("expected http://host or https://host[:port] (no wildcard, not null)");
        };
        if scheme != "http" && scheme != "https" {
            return refuse("the scheme must be http or https");
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal's colons are inside its brackets.
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (authority, None),
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !host_ok {
            return refuse(
                "the host may hold letters, digits, '.', '-' (or an [IPv6] literal), and no path",
            );
        }
        if let Some(port) = port
            && port.parse::<u16>().is_err()
        {
            return refuse("the port must be a number up to 65535");
        }
        Ok(Origin(lower))
    }
}

/// The origins allowed besides the server's own.
#[derive(Clone, Debug, Default)]
pub(crate) struct AllowedOrigins(Vec<Origin>);

impl AllowedOrigins {
    pub(crate) fn new(origins: &[Origin]) -> AllowedOrigins {
        AllowedOrigins(origins.to_vec())
    }

    /// Whether a request from `origin` to the server at `host` (its `Host` header) is served:
    /// the same origin (the authority matches, whatever the scheme a proxy in front changed),
    /// or an allowed one.
    fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        let same = origin
            .split_once("://")
            .zip(host)
            .is_some_and(|((_, authority), host)| authority.eq_ignore_ascii_case(host));
        same || self.0.iter().any(|allowed| allowed.0 == origin)
    }

    /// CORS answers for the allowed origins, with credentials (browser PouchDB logs in with
    /// the session cookie); a preflight from any other origin gets no CORS headers, so the
    /// browser does not send the request.
    pub(crate) fn cors_layer(&self) -> CorsLayer {
        let origins: Vec<HeaderValue> = self
            .0
            .iter()
            .filter_map(|origin| HeaderValue::from_str(origin.as_str()).ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true)
            .allow_methods(AllowMethods::mirror_request())
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::ETAG,
                header::CONTENT_TYPE,
                header::HeaderName::from_static(ferry_core::protocol::MAX_REQUEST_BYTES_HEADER),
            ])
            .max_age(std::time::Duration::from_secs(600))
    }
}

/// Middleware: 403 for a request whose `Origin` is neither the server's nor allowed.
pub(crate) async fn check_origin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|origin| state.allowed_origins().allows(origin, host));
        // A preflight is CORS's to answer (without CORS headers for this origin).
        if !allowed && request.method() != Method::OPTIONS {
            let shown = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            return ApiError::forbidden(format!(
                "Requests from the web origin {shown:?} are not allowed (ferry serve --allow-origin)."
            ))
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_compared_in_lower_case() {
        for good in [
            "http://localhost:3000",
            "https://app.example.com",
            "http://127.0.0.1:5984",
            "http://[::1]:8080",
        ] {
            assert!(good.parse::<Origin>().is_ok(), "{good}");
        }
        for bad in [
            "*",
            "null",
            "app.example.com",
            "ftp://app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com:99999",
            "https://",
            "https://user@app.example.com",
        ] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
        }
        let allowed = AllowedOrigins::new(&["https://App.example.com".parse().unwrap()]);
        assert!(allowed.allows("https://app.EXAMPLE.com", Some("ferry.example.com")));
        assert!(!allowed.allows("http://app.example.com", Some("ferry.example.com")));
        assert!(!allowed.allows("null", Some("ferry.example.com")));
        assert!(allowed.allows(
            "https://ferry.example.com:5984",
            Some("ferry.example.com:5984")
        ));
        assert!(!allowed.allows("https://ferry.example.com", Some("ferry.example.com:5984")));
        assert!(!AllowedOrigins::default().allows("https://app.example.com", None));
    }
}
