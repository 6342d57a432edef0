//! Query parameters and request bodies as CouchDB clients send them.
//!
//! CouchDB query parameters are JSON values (`startkey="a"`, `open_revs=["1-x"]`, `limit=10`)
//! with a few bare forms accepted for convenience (`since=now`, `include_docs=true`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request};
use ferry_core::json::parse_within;
use ferry_core::rev::Rev;
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The raw query string, parsed on demand.
#[derive(Debug, Default)]
pub struct Params(pub HashMap<String, String>);

impl Params {
    /// From axum's query extractor.
    pub fn from_query(query: Query<HashMap<String, String>>) -> Params {
        Params(query.0)
    }

    fn raw(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find_map(|name| self.0.get(*name).map(String::as_str))
    }

    /// A boolean (`true`/`false`), absent → `default`.
    pub fn flag(&self, name: &str, default: bool) -> ApiResult<bool> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid boolean parameter {name}: {other:?}"
            ))),
        }
    }

    /// A non-negative integer.
    pub fn number(&self, name: &str) -> ApiResult<Option<u64>> {
        self.raw(&[name])
            .map(|text| {
                text.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "Invalid value for {name}: expected a non-negative integer, got {text:?}"
                    ))
                })
            })
            .transpose()
    }

    /// A JSON value (bare strings are accepted as strings), under any of `names`.
    pub fn json(&self, names: &[&str]) -> ApiResult<Option<Value>> {
        self.raw(names)
            .map(|text| {
                serde_json::from_str(text).or_else(|_| {
                    if text.starts_with(['[', '{', '"']) {
                        Err(ApiError::bad_request(format!(
                            "Invalid JSON in parameter {}",
                            names[0]
                        )))
                    } else {
                        Ok(Value::String(text.to_owned()))
                    }
                })
            })
            .transpose()
    }

    /// A string-valued JSON parameter (document ids for `startkey` and friends).
    pub fn key(&self, names: &[&str]) -> ApiResult<Option<String>> {
        match self.json(names)? {
            None => Ok(None),
            Some(Value::String(key)) => Ok(Some(key)),
            Some(_) => Err(ApiError::bad_request(format!(
                "{} must be a string (document ids are strings)",
                names[0]
            ))),
        }
    }

    /// A plain string.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.raw(&[name])
    }

    /// A revision (`rev=1-abc`).
    pub fn rev(&self, name: &str) -> ApiResult<Option<Rev>> {
        self.raw(&[name]).map(parse_rev).transpose()
    }
}

/// Parses a revision or answers 400.
pub fn parse_rev(text: &str) -> ApiResult<Rev> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("Invalid rev format: {text:?}")))
}

/// Parses a JSON array of revisions.
pub fn parse_rev_list(value: &Value) -> ApiResult<Vec<Rev>> {
    value
        .as_array()
        .ok_or_else(|| ApiError::bad_request("Expected an array of revisions"))?
        .iter()
        .map(|rev| {
            rev.as_str()
                .ok_or_else(|| ApiError::bad_request("Revisions must be strings"))
                .and_then(parse_rev)
        })
        .collect()
}

/// A request body parsed as strict JSON: size-checked by the body limit layer, refusing
/// duplicate keys, nested at most the document depth limit plus `ENVELOPE_DEPTH`.
pub struct JsonBody(pub Value);

/// How deep the request envelope around documents goes (`{"docs": [ {document} ]}`).
pub const ENVELOPE_DEPTH: usize = 2;

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<JsonBody, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(format!(
                        "The request body is larger than the {} bytes allowed",
                        state.limits.max_request_bytes
                    ))
                } else {
                    ApiError::bad_request(rejection.body_text())
                }
            })?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "Request body is empty; JSON expected",
            ));
        }
        let value = parse_within(
            &bytes,
            state.limits.max_json_depth + ENVELOPE_DEPTH,
            state.limits.max_json_values,
        )
        .map_err(ApiError::from)?;
        Ok(JsonBody(value))
    }
}
