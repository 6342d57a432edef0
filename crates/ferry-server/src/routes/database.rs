//! Database routes: create, inspect, delete.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};

/// `GET /{db}`: CouchDB's database info.
pub(crate) async fn info(
    State(state): State<AppState>,
    Path(db): Path<String>,
) -> ApiResult<Json<Value>> {
    let info = state.with_db(&db, |db| db.info()).await?;
    Ok(Json(json!({
        "db_name": info.name,
        "doc_count": info.doc_count,
        "doc_del_count": info.deleted_count,
        "update_seq": info.update_seq,
        "purge_seq": 0,
        "compact_running": false,
        "instance_start_time": "0",
        "disk_format_version": 8,
        "replica_id": info.replica_id,
    })))
}

/// `PUT /{db}`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Path(db): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    state
        .run(move |backend| backend.create_database(&db).map(|_| ()))
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"ok": true}))))
}

/// `DELETE /{db}`: administrators only, since it drops every replica's data at once.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(db): Path<String>,
) -> ApiResult<Json<Value>> {
    if !identity.admin {
        return Err(ApiError::forbidden(
            "Only administrators may delete a database.",
        ));
    }
    state
        .run(move |backend| backend.delete_database(&db))
        .await?;
    Ok(Json(json!({"ok": true})))
}

/// `POST /{db}/_ensure_full_commit`: every commit is already durable; kept for old clients.
pub(crate) async fn ensure_full_commit(
    State(state): State<AppState>,
    Path(db): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    state.with_db(&db, |db| db.info()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"ok": true, "instance_start_time": "0"})),
    ))
}

/// `POST /{db}/_compact`: drops old and superseded revision bodies (administrators only, as in
/// CouchDB). Runs to completion before answering 202, CouchDB's status for it.
pub(crate) async fn compact(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(db): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if !identity.admin {
        return Err(ApiError::forbidden(
            "Only administrators may compact a database.",
        ));
    }
    let dropped = state.with_db(&db, |db| db.compact()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"ok": true, "bodies_dropped": dropped})),
    ))
}
