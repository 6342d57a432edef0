//! Server-level routes: the welcome document, health, database list, uuids.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};

/// `GET /`: CouchDB's welcome document. PouchDB reads `uuid` to name replications.
pub(crate) async fn welcome(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "couchdb": "Welcome",
        "version": "3.3.3",
        "uuid": state.server_uuid(),
        "vendor": {"name": "Ferry", "version": env!("CARGO_PKG_VERSION")},
        "features": [],
    }))
}

/// `GET /health` and `GET /_up`: the server answers and its storage is readable. How many
/// databases it holds is for administrators only.
pub(crate) async fn health(
    State(state): State<AppState>,
    identity: Option<Extension<Identity>>,
) -> ApiResult<Json<Value>> {
    let databases = state.run(|backend| backend.database_names()).await?;
    if identity.is_some_and(|Extension(identity)| identity.admin) {
        return Ok(Json(json!({"status": "ok", "databases": databases.len()})));
    }
    Ok(Json(json!({"status": "ok"})))
}

/// `GET /_all_dbs`.
pub(crate) async fn all_dbs(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let names = state.run(|backend| backend.database_names()).await?;
    Ok(Json(json!(names)))
}

/// At most this many uuids per `GET /_uuids` request.
const MAX_UUIDS: u64 = 1000;

/// `GET /_uuids?count=N`: UUIDv7 ids (time-ordered, so new documents sort last).
pub(crate) async fn uuids(Query(query): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let count = match query.get("count") {
        None => 1,
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("count must be a positive integer"))?,
    };
    if count > MAX_UUIDS {
        return Err(ApiError::bad_request(format!(
            "count must be at most {MAX_UUIDS}"
        )));
    }
    let uuids: Vec<String> = (0..count)
        .map(|_| uuid::Uuid::now_v7().simple().to_string())
        .collect();
    Ok(Json(json!({ "uuids": uuids })))
}
