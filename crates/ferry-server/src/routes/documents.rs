//! Document routes: one document by id (all its query options), `_all_docs`, `_local` docs.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_core::couch::{CouchDoc, DocExtras, document_json, replicated_document};
use ferry_core::json::RawJson;
use ferry_core::model::{Body, Document};
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use ferry_store::{AllDocsQuery, Edit, StoredRevision};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::params::{JsonBody, Params, parse_rev, parse_rev_list};

type QueryMap = Query<HashMap<String, String>>;

/// The revision named by an `If-Match` header, CouchDB's alternative to `?rev=`.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<Rev>> {
    headers
        .get(axum::http::header::IF_MATCH)
        .map(|value| {
            let text = value
                .to_str()
                .map_err(|_| ApiError::bad_request("Invalid If-Match header"))?;
            parse_rev(text.trim_matches('"'))
        })
        .transpose()
}

/// `GET /{db}/{doc_id}` with `rev`, `revs`, `revs_info`, `conflicts`, `deleted_conflicts`,
/// `open_revs`, `latest`.
pub(crate) async fn get_document(
    State(state): State<AppState>,
    Path((db, doc_id)): Path<(String, String)>,
    query: QueryMap,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    let revs = params.flag("revs", false)?;
    let revs_info = params.flag("revs_info", false)?;
    let conflicts = params.flag("conflicts", false)?;
    let deleted_conflicts = params.flag("deleted_conflicts", false)?;
    let latest = params.flag("latest", false)?;
    let with_hlc = params.flag("ferry", false)?;
    let rev = params.rev("rev")?;
    let open_revs = params.json(&["open_revs"])?;
    let revs_limit = state.limits.revs_limit;

    if let Some(open_revs) = open_revs {
        let wanted = match &open_revs {
            Value::String(all) if all == "all" => None,
            list => Some(parse_rev_list(list)?),
        };
        let rows = state
            .with_endpoint(&db, move |endpoint| {
                endpoint.open_revisions(&doc_id, wanted, latest)
            })
            .await?;
        /// One revision of an `open_revs` answer, as CouchDB writes it.
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        enum OpenRev {
            Found { ok: RawJson },
            Missing { missing: String },
        }
        let body = rows
            .into_iter()
            .map(|row| {
                Ok(match row {
                    Ok(revision) => OpenRev::Found {
                        ok: revision_document(&revision, revs, with_hlc)?,
                    },
                    Err(missing) => OpenRev::Missing {
                        missing: missing.to_string(),
                    },
                })
            })
            .collect::<ApiResult<Vec<OpenRev>>>()?;
        return Ok(Json(body).into_response());
    }

    let doc_for_read = doc_id.clone();
    let (tree, revision) = state
        .with_db(&db, move |db| {
            let Some(tree) = db.get_tree(&doc_for_read)? else {
                return Ok((None, None));
            };
            let rev = match rev {
                Some(rev) => rev,
                None => tree.winner().expect("a stored tree has a winner").rev,
            };
            let revision = db.get_revision(&doc_for_read, &rev, revs_limit)?;
            Ok((Some(tree), revision))
        })
        .await?;
    let (Some(tree), Some(revision)) = (tree, revision) else {
        return Err(ApiError::not_found("missing"));
    };
    let asked_for_rev = params.text("rev").is_some();
    if revision.deleted && !asked_for_rev {
        return Err(ApiError::not_found("deleted"));
    }
    let Some(body) = revision.parsed_body()? else {
        return Err(ApiError::not_found("missing"));
    };
    let conflict_list = tree.conflicts();
    let mut document = document_json(
        &doc_id,
        &revision.path[0],
        revision.deleted,
        &body,
        &DocExtras {
            revisions: revs.then_some(revision.path.as_slice()),
            conflicts: conflicts.then_some(conflict_list.as_slice()),
            hlc: with_hlc.then_some(revision.hlc),
        },
    );
    if deleted_conflicts {
        let deleted = tree.deleted_conflicts();
        if !deleted.is_empty() {
            document["_deleted_conflicts"] = deleted.iter().map(Rev::to_string).collect();
        }
    }
    if revs_info {
        document["_revs_info"] = revs_info_json(&tree, &revision.path);
    }
    Ok(Json(document).into_response())
}

fn revs_info_json(tree: &RevTree, path: &[Rev]) -> Value {
    path.iter()
        .enumerate()
        .map(|(index, rev)| {
            // Only the requested revision's body is known to be stored; CouchDB reports
            // older ones as "missing" once compacted, which is what a client must expect.
            let status = if tree.is_deleted(rev) {
                "deleted"
            } else if index == 0 {
                "available"
            } else {
                "missing"
            };
            json!({"rev": rev.to_string(), "status": status})
        })
        .collect()
}

/// A stored revision in CouchDB form, written around its stored text (with `_revisions` when
/// `revs`, `_ferry` when `with_hlc`).
pub(crate) fn revision_document(
    revision: &StoredRevision,
    revs: bool,
    with_hlc: bool,
) -> ApiResult<RawJson> {
    let empty = RawJson::of(&Body::new());
    replicated_document(
        &revision.doc_id,
        &revision.path,
        revision.deleted,
        revs,
        with_hlc.then_some(revision.hlc),
        revision.body.as_ref().unwrap_or(&empty),
    )
    .map_err(|error| ApiError::internal(format!("stored document {}: {error}", revision.doc_id)))
}

/// Writes one document edit and answers CouchDB's `{"ok", "id", "rev"}`.
async fn write_one(
    state: &AppState,
    db_name: &str,
    edit: Edit,
    status: StatusCode,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let doc_id = edit.doc_id.clone();
    let result = state
        .with_endpoint(db_name, move |endpoint| endpoint.write_edits(vec![edit]))
        .await?
        .remove(0);
    let rev = result?;
    Ok((
        status,
        Json(json!({"ok": true, "id": doc_id, "rev": rev.to_string()})),
    ))
}

/// `PUT /{db}/{doc_id}`: create or update (or, with `new_edits=false`, store as replicated).
pub(crate) async fn put_document(
    State(state): State<AppState>,
    Path((db, doc_id)): Path<(String, String)>,
    headers: HeaderMap,
    query: QueryMap,
    JsonBody(value): JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let params = Params::from_query(query);
    let doc = CouchDoc::parse(value).map_err(|error| ApiError::bad_request(error.to_string()))?;
    if doc.id.as_ref().is_some_and(|id| id != &doc_id) {
        return Err(ApiError::bad_request(
            "Document id in the body does not match the URL",
        ));
    }
    if !params.flag("new_edits", true)? {
        let revision = crate::routes::replication::replicated_revision(doc, Some(&doc_id))?;
        let mut outcome = state
            .with_endpoint(&db, move |endpoint| {
                endpoint.write_revisions(vec![revision])
            })
            .await?;
        let ack = outcome.acks.remove(0);
        if let Some(refused) = ack.refused {
            return Err(ApiError::from(refused));
        }
        let rev = ack.rev;
        return Ok((
            StatusCode::CREATED,
            Json(json!({"ok": true, "id": doc_id, "rev": rev.to_string()})),
        ));
    }
    let base = match (doc.rev, params.rev("rev")?, if_match(&headers)?) {
        (Some(body_rev), Some(query_rev), _) if body_rev != query_rev => {
            return Err(ApiError::bad_request(
                "Document rev from request body and query string have different values",
            ));
        }
        (body_rev, query_rev, header_rev) => body_rev.or(query_rev).or(header_rev),
    };
    let edit = Edit {
        deleted: doc.deleted,
        ..Edit::put(doc_id, base, doc.body)
    };
    write_one(&state, &db, edit, StatusCode::CREATED).await
}

/// `POST /{db}`: create a document, with a generated UUIDv7 id when it has no `_id`.
pub(crate) async fn post_document(
    State(state): State<AppState>,
    Path(db): Path<String>,
    JsonBody(value): JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let doc = CouchDoc::parse(value).map_err(|error| ApiError::bad_request(error.to_string()))?;
    let doc_id = doc
        .id
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let edit = Edit {
        deleted: doc.deleted,
        ..Edit::put(doc_id, doc.rev, doc.body)
    };
    write_one(&state, &db, edit, StatusCode::CREATED).await
}

/// `DELETE /{db}/{doc_id}?rev=...`: writes a tombstone.
pub(crate) async fn delete_document(
    State(state): State<AppState>,
    Path((db, doc_id)): Path<(String, String)>,
    headers: HeaderMap,
    query: QueryMap,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let params = Params::from_query(query);
    let Some(rev) = params.rev("rev")?.or(if_match(&headers)?) else {
        return Err(ApiError::conflict());
    };
    write_one(&state, &db, Edit::delete(doc_id, rev), StatusCode::OK).await
}

/// `GET /{db}/_all_docs`.
pub(crate) async fn get_all_docs(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    let keys = match params.json(&["keys"])? {
        Some(keys) => Some(keys),
        None => params.json(&["key"])?.map(|key| Value::Array(vec![key])),
    };
    all_docs(state, db, params, keys).await
}

/// `POST /{db}/_all_docs` with `{"keys": [...]}`.
pub(crate) async fn post_all_docs(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    all_docs(state, db, params, body.get("keys").cloned()).await
}

fn all_docs_row(document: &Document, include_docs: bool, conflicts: bool) -> Value {
    let mut row = json!({
        "id": document.doc_id,
        "key": document.doc_id,
        "value": {"rev": document.rev.to_string()},
    });
    if document.deleted {
        row["value"]["deleted"] = Value::Bool(true);
    }
    if include_docs {
        row["doc"] = if document.deleted {
            Value::Null
        } else {
            document_json(
                &document.doc_id,
                &document.rev,
                false,
                &document.body,
                &DocExtras {
                    conflicts: conflicts.then_some(document.conflicts.as_slice()),
                    ..DocExtras::default()
                },
            )
        };
    }
    row
}

/// Rows with documents read at once: an `_all_docs` answer of up to `max_page_rows` (or
/// `max_batch_docs` keys) documents of up to `max_document_bytes` each is written a chunk at a
/// time as the client reads it, instead of being held whole.
const ROWS_CHUNK: usize = 16;

async fn all_docs(
    state: AppState,
    db: String,
    params: Params,
    keys: Option<Value>,
) -> ApiResult<Response> {
    let include_docs = params.flag("include_docs", false)?;
    let conflicts = params.flag("conflicts", false)?;
    let max_rows = state.limits.max_page_rows;
    let limit = params.number("limit")?.map_or(max_rows, |limit| {
        usize::try_from(limit).unwrap_or(usize::MAX).min(max_rows)
    });
    let skip = usize::try_from(params.number("skip")?.unwrap_or(0)).unwrap_or(usize::MAX);
    if let Some(keys) = keys {
        let keys: Vec<String> = keys
            .as_array()
            .ok_or_else(|| ApiError::bad_request("`keys` must be an array"))?
            .iter()
            .map(|key| {
                key.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad_request("keys must be strings"))
            })
            .collect::<ApiResult<_>>()?;
        if keys.len() > state.limits.max_batch_docs {
            return Err(ApiError::too_large(format!(
                "{} keys requested, at most {} allowed",
                keys.len(),
                state.limits.max_batch_docs
            )));
        }
        let total = state.with_db(&db, |db| Ok(db.info()?.doc_count)).await?;
        let head = format!("{{\"total_rows\":{total},\"offset\":0,\"rows\":[");
        return streamed_rows(state, db, head, keys, include_docs, conflicts).await;
    }
    // The ids and revisions first (small rows); documents, if asked for, a chunk at a time.
    let query = AllDocsQuery {
        start_key: params.key(&["startkey", "start_key"])?,
        end_key: params.key(&["endkey", "end_key"])?,
        inclusive_end: params.flag("inclusive_end", true)?,
        descending: params.flag("descending", false)?,
        skip,
        limit,
        include_bodies: false,
    };
    let (total, documents) = state
        .with_db(&db, move |db| {
            Ok((db.info()?.doc_count, db.all_docs(&query)?))
        })
        .await?;
    if include_docs {
        let head = format!("{{\"total_rows\":{total},\"offset\":{skip},\"rows\":[");
        let ids = documents
            .into_iter()
            .map(|document| document.doc_id)
            .collect();
        return streamed_rows(state, db, head, ids, true, conflicts).await;
    }
    let rows: Vec<Value> = documents
        .iter()
        .map(|document| all_docs_row(document, false, conflicts))
        .collect();
    Ok(Json(json!({"total_rows": total, "offset": skip, "rows": rows})).into_response())
}

/// The `_all_docs` rows of `keys`, in order, each read as it is written: `head` opens the
/// answer up to its `rows` array. The first chunk is read before the response starts, so a
/// failure there keeps its status.
async fn streamed_rows(
    state: AppState,
    db: String,
    head: String,
    keys: Vec<String>,
    include_docs: bool,
    conflicts: bool,
) -> ApiResult<Response> {
    let mut keys = keys.into_iter();
    let mut rows = read_rows(&state, &db, keys.by_ref().take(ROWS_CHUNK).collect()).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<axum::body::Bytes>(1);
    tokio::spawn(async move {
        let mut text = head;
        let mut written = 0usize;
        loop {
            for (key, document) in &rows {
                if written > 0 {
                    text.push(',');
                }
                let row = match document {
                    Ok(Some(document)) => all_docs_row(document, include_docs, conflicts),
                    Ok(None) => json!({"key": key, "error": "not_found"}),
                    Err(error) => json!({"key": key, "error": error}),
                };
                text.push_str(&row.to_string());
                written += 1;
            }
            let next: Vec<String> = keys.by_ref().take(ROWS_CHUNK).collect();
            if next.is_empty() {
                text.push_str("]}");
                let _ = sender.send(text.into()).await;
                return;
            }
            if sender.send(std::mem::take(&mut text).into()).await.is_err() {
                return;
            }
            match read_rows(&state, &db, next).await {
                Ok(next) => rows = next,
                Err(error) => {
                    // The status is sent: an unfinished body tells the client it failed.
                    tracing::warn!(db = %db, reason = %error.reason, "an _all_docs answer failed midway");
                    return;
                }
            }
        }
    });
    Ok(super::json_stream(receiver))
}

/// The current winner of each of `keys`: `None` for a document that does not exist, and the
/// error code for one whose stored data cannot be read (that row alone fails, as in the
/// listing and the feeds).
type Row = (String, Result<Option<Document>, &'static str>);

async fn read_rows(state: &AppState, db: &str, keys: Vec<String>) -> ApiResult<Vec<Row>> {
    state
        .with_db(db, move |db| {
            keys.into_iter()
                .map(|key| match db.get_document(&key) {
                    Ok(document) => Ok((key, Ok(document))),
                    Err(ferry_store::StoreError::Corrupt { .. }) => Ok((key, Err("corrupt_data"))),
                    Err(error) => Err(error),
                })
                .collect()
        })
        .await
}

fn local_rev(text: &str) -> ApiResult<u64> {
    text.strip_prefix("0-")
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("Invalid rev format: {text:?}")))
}

/// `GET /{db}/_local/{id}`.
pub(crate) async fn get_local(
    State(state): State<AppState>,
    Path((db, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let local = state
        .with_db(&db, move |db| db.get_local(&id))
        .await?
        .ok_or_else(|| ApiError::not_found("missing"))?;
    let mut document = json!({
        "_id": format!("_local/{}", local.id),
        "_rev": format!("0-{}", local.rev),
    });
    for (key, value) in local.body {
        document[key] = value;
    }
    Ok(Json(document))
}

/// `PUT /{db}/_local/{id}`: the revision must match the stored one (`0-N`).
pub(crate) async fn put_local(
    State(state): State<AppState>,
    Path((db, id)): Path<(String, String)>,
    query: QueryMap,
    JsonBody(value): JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Value::Object(mut body) = value else {
        return Err(ApiError::bad_request("Document must be a JSON object"));
    };
    body.remove("_id");
    let rev = match body.remove("_rev") {
        Some(Value::String(text)) => Some(local_rev(&text)?),
        Some(_) => return Err(ApiError::bad_request("_rev must be a string")),
        None => Params::from_query(query)
            .text("rev")
            .map(local_rev)
            .transpose()?,
    };
    state.validate_local(&id, &body)?;
    // Replicators store their checkpoints as `_local` documents.
    ferry_store::failpoint::reached(ferry_store::failpoint::BEFORE_CHECKPOINT);
    let doc_id = format!("_local/{id}");
    let new_rev = state
        .with_db(&db, move |db| db.put_local(&id, rev, Some(body)))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"ok": true, "id": doc_id, "rev": format!("0-{new_rev}")})),
    ))
}

/// `DELETE /{db}/_local/{id}?rev=0-N`.
pub(crate) async fn delete_local(
    State(state): State<AppState>,
    Path((db, id)): Path<(String, String)>,
    query: QueryMap,
) -> ApiResult<Json<Value>> {
    let params = Params::from_query(query);
    let rev = params
        .text("rev")
        .map(local_rev)
        .transpose()?
        .ok_or_else(ApiError::conflict)?;
    let doc_id = format!("_local/{id}");
    state
        .with_db(&db, move |db| db.put_local(&id, Some(rev), None))
        .await?;
    Ok(Json(
        json!({"ok": true, "id": doc_id, "rev": format!("0-{}", rev + 1)}),
    ))
}

/// `GET /{db}/_ferry/resolutions/{doc_id}`: what this server's automatic resolutions of the
/// document did (policy, method, the revision written, the versions and values not kept).
pub(crate) async fn get_resolutions(
    State(state): State<AppState>,
    Path((db, doc_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let records = state
        .with_db(&db, move |db| db.resolutions(&doc_id))
        .await?;
    Ok(Json(json!({ "resolutions": records })))
}
