//! The replication endpoints: `_revs_diff`, `_bulk_get` and `_bulk_docs`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use ferry_core::couch::CouchDoc;
use ferry_core::model::Revision;
use ferry_core::rev::Rev;
use ferry_store::Edit;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::params::{JsonBody, Params, parse_rev, parse_rev_list};
use crate::routes::documents::{open_revisions, revision_document};

type QueryMap = Query<HashMap<String, String>>;

pub(crate) fn check_batch(state: &AppState, count: usize, what: &str) -> ApiResult<()> {
    if count > state.limits.max_batch_docs {
        return Err(ApiError::too_large(format!(
            "{count} {what} in one request, at most {} allowed",
            state.limits.max_batch_docs
        )));
    }
    Ok(())
}

/// `POST /{db}/_revs_diff`: `{"id": ["rev", ...]}` → the revisions this database lacks.
pub(crate) async fn revs_diff(
    State(state): State<AppState>,
    Path(db): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let Value::Object(map) = body else {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    };
    check_batch(&state, map.len(), "documents")?;
    let asked: Vec<(String, Vec<Rev>)> = map
        .into_iter()
        .map(|(doc_id, revs)| Ok((doc_id, parse_rev_list(&revs)?)))
        .collect::<ApiResult<_>>()?;
    let answers = state.with_db(&db, move |db| db.revs_diff(&asked)).await?;
    let mut response = Map::new();
    for (doc_id, diff) in answers {
        if diff.missing.is_empty() {
            continue;
        }
        let mut entry = json!({
            "missing": diff.missing.iter().map(Rev::to_string).collect::<Vec<_>>(),
        });
        if !diff.possible_ancestors.is_empty() {
            entry["possible_ancestors"] =
                diff.possible_ancestors.iter().map(Rev::to_string).collect();
        }
        response.insert(doc_id, entry);
    }
    Ok(Json(Value::Object(response)))
}

/// `POST /{db}/_bulk_get?revs=true&latest=true`: `{"docs": [{"id", "rev"?}]}`.
pub(crate) async fn bulk_get(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let params = Params::from_query(query);
    let revs = params.flag("revs", false)?;
    let latest = params.flag("latest", false)?;
    let with_hlc = params.flag("ferry", false)?;
    let requests = body
        .get("docs")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_request("Request body must have a `docs` array"))?;
    check_batch(&state, requests.len(), "documents")?;
    let mut wanted: Vec<(String, Option<Rev>)> = Vec::with_capacity(requests.len());
    for request in requests {
        let doc_id = request
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("Each request needs a string `id`"))?;
        let rev = match request.get("rev") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(parse_rev(text)?),
            Some(_) => return Err(ApiError::bad_request("`rev` must be a string")),
        };
        wanted.push((doc_id.to_owned(), rev));
    }
    let revs_limit = state.limits.revs_limit;
    let rows = state
        .with_db(&db, move |db| {
            let mut rows = Vec::with_capacity(wanted.len());
            for (doc_id, rev) in wanted {
                let revisions = match rev {
                    Some(rev) => {
                        open_revisions(&*db, &doc_id, Some(vec![rev]), latest, revs_limit)?
                    }
                    None => match db.get_document(&doc_id)? {
                        Some(document) => open_revisions(
                            &*db,
                            &doc_id,
                            Some(vec![document.rev]),
                            false,
                            revs_limit,
                        )?,
                        None => Vec::new(),
                    },
                };
                rows.push((doc_id, revisions));
            }
            Ok(rows)
        })
        .await?;
    let results: Vec<Value> = rows
        .into_iter()
        .map(|(doc_id, revisions)| {
            let docs: Vec<Value> = if revisions.is_empty() {
                vec![json!({"error": {
                    "id": doc_id, "rev": "undefined", "error": "not_found", "reason": "missing"
                }})]
            } else {
                revisions
                    .into_iter()
                    .map(|revision| match revision {
                        Ok(revision) => json!({"ok": revision_document(&revision, revs, with_hlc)}),
                        Err(rev) => json!({"error": {
                            "id": doc_id, "rev": rev.to_string(),
                            "error": "not_found", "reason": "missing"
                        }}),
                    })
                    .collect()
            };
            json!({"id": doc_id, "docs": docs})
        })
        .collect();
    Ok(Json(json!({ "results": results })))
}

/// Stores replicated revisions in one transaction, resolves the conflicts they created by
/// their collections' policies, and wakes the feeds.
///
/// The resolution is written right after the batch's transaction: a crash in between leaves
/// the conflict (nothing is lost) until the document is written to again.
pub(crate) async fn store_revisions(
    state: &AppState,
    db: &str,
    revisions: Vec<Revision>,
) -> ApiResult<()> {
    for revision in &revisions {
        if let Some(hlc) = revision.hlc {
            state.observe(hlc);
        }
    }
    let default_hlc = state.now();
    let policies = state.conflict_policies().clone();
    let mut touched: Vec<String> = if policies.any_automatic() {
        revisions
            .iter()
            .map(|revision| revision.doc_id.clone())
            .collect()
    } else {
        Vec::new()
    };
    touched.sort();
    touched.dedup();
    let seq = state
        .with_db(db, move |db| {
            db.write_revisions(revisions, default_hlc)?;
            for doc_id in &touched {
                let policy = policies.for_doc(doc_id);
                if let Some(record) = ferry_store::resolve_conflict(&*db, doc_id, policy)? {
                    tracing::debug!(%doc_id, resolved = %record.resolved, %policy, "conflict resolved");
                }
            }
            Ok(db.info()?.update_seq)
        })
        .await?;
    ferry_store::failpoint::reached(ferry_store::failpoint::AFTER_COMMIT_BEFORE_ACK);
    state.notify(db, seq);
    Ok(())
}

/// `POST /{db}/_bulk_docs`: local edits (`new_edits` true, per-document results) or
/// replicated revisions (`new_edits: false`, all or nothing).
///
/// Every document is checked (structure, id, depth, size) before anything is written; one bad
/// document refuses the whole request, so a malformed batch never half-applies.
pub(crate) async fn bulk_docs(
    State(state): State<AppState>,
    Path(db): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let new_edits = match body.get("new_edits") {
        None => true,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err(ApiError::bad_request("`new_edits` must be a boolean")),
    };
    let Some(Value::Array(docs)) = body.get("docs") else {
        return Err(ApiError::bad_request(
            "Request body must have a `docs` array",
        ));
    };
    check_batch(&state, docs.len(), "documents")?;
    let mut parsed = Vec::with_capacity(docs.len());
    for doc in docs {
        let doc = CouchDoc::parse(doc.clone())
            .map_err(|error| ApiError::bad_request(error.to_string()))?;
        parsed.push(doc);
    }

    if !new_edits {
        let mut revisions = Vec::with_capacity(parsed.len());
        // Revisions refused one by one (as CouchDB reports forbidden ones): the rest is stored.
        let mut refused = Vec::new();
        for doc in parsed {
            let doc_id = doc
                .id
                .clone()
                .ok_or_else(|| ApiError::bad_request("Every document needs an _id"))?;
            let path = doc.path().ok_or_else(|| {
                ApiError::bad_request(format!("{doc_id}: new_edits=false needs _rev"))
            })?;
            state.validate_document(&doc_id, &doc.body)?;
            if let Err(error) = state.check_clock(doc.hlc) {
                refused.push(json!({
                    "id": doc_id, "rev": path[0].to_string(),
                    "error": error.error, "reason": error.reason,
                }));
                continue;
            }
            revisions.push(Revision {
                doc_id,
                path,
                deleted: doc.deleted,
                body: doc.body,
                hlc: doc.hlc,
            });
        }
        if !revisions.is_empty() {
            store_revisions(&state, &db, revisions).await?;
        }
        return Ok((StatusCode::CREATED, Json(Value::Array(refused))));
    }

    let mut edits = Vec::with_capacity(parsed.len());
    for doc in parsed {
        let doc_id = doc
            .id
            .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
        state.validate_document(&doc_id, &doc.body)?;
        edits.push(Edit {
            doc_id,
            base: doc.rev,
            deleted: doc.deleted,
            body: doc.body,
            hlc: state.now(),
        });
    }
    let ids: Vec<String> = edits.iter().map(|edit| edit.doc_id.clone()).collect();
    let (results, seq) = state
        .with_db(&db, move |db| {
            let results = db.write_edits(edits)?;
            Ok((results, db.info()?.update_seq))
        })
        .await?;
    state.notify(&db, seq);
    let rows: Vec<Value> = ids
        .into_iter()
        .zip(results)
        .map(|(doc_id, result)| match result {
            Ok(rev) => json!({"ok": true, "id": doc_id, "rev": rev.to_string()}),
            Err(_) => json!({
                "id": doc_id, "error": "conflict", "reason": "Document update conflict."
            }),
        })
        .collect();
    Ok((StatusCode::CREATED, Json(Value::Array(rows))))
}
