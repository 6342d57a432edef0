//! The replication endpoints: `_revs_diff`, `_bulk_get` and `_bulk_docs`.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use ferry_core::couch::{
    BulkDocsRow, BulkGetDoc, BulkGetItem, BulkGetResult, CouchDoc, RevsDiffAnswer,
};
use ferry_core::json::RawJson;
use ferry_core::model::Revision;
use ferry_core::rev::Rev;
use ferry_store::Edit;
use ferry_store::StoredRevision;
use ferry_store::endpoint::{Endpoint, EndpointError};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::params::{JsonBody, Params, parse_rev, parse_rev_list};
use crate::routes::documents::revision_document;

type QueryMap = Query<HashMap<String, String>>;

/// `POST /{db}/_revs_diff`: `{"id": ["rev", ...]}` → the revisions this database lacks.
pub(crate) async fn revs_diff(
    State(state): State<AppState>,
    Path(db): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<BTreeMap<String, RevsDiffAnswer>>> {
    let Value::Object(map) = body else {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    };
    let asked: Vec<(String, Vec<Rev>)> = map
        .into_iter()
        .map(|(doc_id, revs)| Ok((doc_id, parse_rev_list(&revs)?)))
        .collect::<ApiResult<_>>()?;
    let answers = state
        .with_endpoint(&db, move |endpoint| endpoint.revs_diff(&asked))
        .await?;
    let response: BTreeMap<String, RevsDiffAnswer> = answers
        .into_iter()
        .map(|(doc_id, diff)| {
            let answer = RevsDiffAnswer {
                missing: diff.missing,
                possible_ancestors: diff.possible_ancestors,
            };
            (doc_id, answer)
        })
        .collect();
    Ok(Json(response))
}

/// `POST /{db}/_bulk_get?revs=true&latest=true`: `{"docs": [{"id", "rev"?}]}`.
pub(crate) async fn bulk_get(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    let revs = params.flag("revs", false)?;
    let latest = params.flag("latest", false)?;
    let with_hlc = params.flag("ferry", false)?;
    let requests = body
        .get("docs")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_request("Request body must have a `docs` array"))?;
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
    // Ferry's extension: answer entries up to `max_bytes` (at least one), and list the rest
    // as `unserved`, so a client's memory for one answer is bounded by what it asks.
    let max_bytes = params.number("max_bytes")?.map_or(usize::MAX, |bytes| {
        usize::try_from(bytes).unwrap_or(usize::MAX)
    });
    // The answer is written a few documents at a time as the client reads it, so what the
    // server holds is bounded by the chunk, not by the request (up to `max_batch_docs`
    // documents of `max_document_bytes` each). The first chunk is read before the response
    // starts, so a missing database or an oversized request still gets its status.
    let total = wanted.len();
    let mut chunks: std::collections::VecDeque<Vec<(String, Option<Rev>)>> =
        wanted.chunks(BULK_GET_CHUNK).map(<[_]>::to_vec).collect();
    let first = chunks.pop_front().unwrap_or_default();
    let first = state
        .with_endpoint(&db, move |endpoint| {
            endpoint.check_batch("documents", total)?;
            bulk_get_rows(endpoint, first, latest)
        })
        .await?;
    let (sender, receiver) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let mut text = String::from("{\"results\":[");
        let (mut written, mut bytes) = (0usize, 0usize);
        let mut unserved: Vec<BulkGetItem> = Vec::new();
        let mut current = Some(first);
        while let Some(rows) = current.take() {
            for (doc_id, rev, revisions) in rows {
                let entry = result_entry(&doc_id, revisions, revs, with_hlc);
                if !unserved.is_empty() || (written > 0 && bytes + entry.len() > max_bytes) {
                    unserved.push(asked_entry(doc_id, rev));
                    continue;
                }
                if written > 0 {
                    text.push(',');
                }
                text.push_str(&entry);
                written += 1;
                bytes += entry.len();
            }
            if sender
                .send(Bytes::from(std::mem::take(&mut text)))
                .await
                .is_err()
            {
                return;
            }
            if !unserved.is_empty() {
                // Over the budget: the rest is listed, not read.
                let rest = chunks.drain(..).flatten();
                unserved.extend(rest.map(|(doc_id, rev)| asked_entry(doc_id, rev)));
                break;
            }
            let Some(next) = chunks.pop_front() else {
                break;
            };
            let rows = state
                .with_endpoint(&db, move |endpoint| bulk_get_rows(endpoint, next, latest))
                .await;
            let Ok(rows) = rows else {
                // The status is sent: an unfinished body tells the client it failed.
                tracing::warn!(db = %db, "a _bulk_get answer failed midway");
                return;
            };
            current = Some(rows);
        }
        let end = if unserved.is_empty() {
            "]}".to_owned()
        } else {
            let unserved = serde_json::to_string(&unserved).expect("revision ids serialize");
            format!("],\"unserved\":{unserved}}}")
        };
        let _ = sender.send(Bytes::from(end)).await;
    });
    Ok(super::json_stream(receiver))
}

/// Documents of a `_bulk_get` read at once.
const BULK_GET_CHUNK: usize = 16;

/// What `_bulk_get` answers for each of `wanted`: the asked revision (or the winner), or the
/// leaves descending from it with `latest`.
/// Each row carries what was asked (the id, the revision if any), to be listed as `unserved`
/// when the answer's budget runs out before it.
type BulkGetRow = (String, Option<Rev>, Vec<Result<StoredRevision, Rev>>);

fn bulk_get_rows(
    endpoint: &Endpoint<'_>,
    wanted: Vec<(String, Option<Rev>)>,
    latest: bool,
) -> Result<Vec<BulkGetRow>, EndpointError> {
    let mut rows = Vec::with_capacity(wanted.len());
    for (doc_id, rev) in wanted {
        let revisions = match &rev {
            Some(rev) => endpoint.open_revisions(&doc_id, Some(vec![rev.clone()]), latest)?,
            None => match endpoint.database().get_document(&doc_id)? {
                Some(document) => {
                    endpoint.open_revisions(&doc_id, Some(vec![document.rev]), false)?
                }
                None => Vec::new(),
            },
        };
        rows.push((doc_id, rev, revisions));
    }
    Ok(rows)
}

/// A `_bulk_get` request entry as the client wrote it.
fn asked_entry(id: String, rev: Option<Rev>) -> BulkGetItem {
    BulkGetItem { id, rev }
}

/// The `results` entry of one row, as JSON text.
fn result_entry(
    doc_id: &str,
    revisions: Vec<Result<StoredRevision, Rev>>,
    revs: bool,
    with_hlc: bool,
) -> String {
    let docs: Vec<BulkGetDoc> = if revisions.is_empty() {
        vec![BulkGetDoc::missing(doc_id, None)]
    } else {
        revisions
            .into_iter()
            .map(|revision| match revision {
                // The answer has started: a stored document that cannot be written out (a
                // damaged body) is answered as missing, and said in the log.
                Ok(revision) => match revision_document(&revision, revs, with_hlc) {
                    Ok(document) => BulkGetDoc::found(document),
                    Err(error) => {
                        tracing::error!(doc_id, reason = %error.reason, "bulk_get");
                        BulkGetDoc::missing(doc_id, revision.path.first())
                    }
                },
                Err(rev) => BulkGetDoc::missing(doc_id, Some(&rev)),
            })
            .collect()
    };
    let result = BulkGetResult {
        id: doc_id.to_owned(),
        docs,
    };
    serde_json::to_string(&result).expect("a bulk_get result serializes")
}

/// A replicated document of a `_bulk_docs` or `PUT ?new_edits=false` request, as a revision;
/// one that is not a revision at all (no `_id`, no `_rev`) refuses the request.
pub(crate) fn replicated_revision(doc: CouchDoc, url_id: Option<&str>) -> ApiResult<Revision> {
    let doc_id = match (doc.id.clone(), url_id) {
        (Some(id), _) => id,
        (None, Some(id)) => id.to_owned(),
        (None, None) => return Err(ApiError::bad_request("Every document needs an _id")),
    };
    let path = doc
        .path()
        .ok_or_else(|| ApiError::bad_request(format!("{doc_id}: new_edits=false needs _rev")))?;
    Ok(Revision {
        doc_id,
        path,
        deleted: doc.deleted,
        body: RawJson::canonical_object(&doc.body),
        hlc: doc.hlc,
    })
}

/// `POST /{db}/_bulk_docs`: local edits (`new_edits` true) or replicated revisions
/// (`new_edits: false`).
///
/// A body that is not a list of documents refuses the request and stores nothing. A document
/// that breaks a rule (id, depth, size, clock) is refused alone, with its error in the
/// response; the others are stored (`ferry_store::endpoint`, the same on every path).
pub(crate) async fn bulk_docs(
    State(state): State<AppState>,
    Path(db): Path<String>,
    JsonBody(mut body): JsonBody,
) -> ApiResult<(StatusCode, Json<Vec<BulkDocsRow>>)> {
    let new_edits = match body.get("new_edits") {
        None => true,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err(ApiError::bad_request("`new_edits` must be a boolean")),
    };
    // Taken out of the body, not copied: the documents become the stored bodies.
    let Some(Value::Array(docs)) = body.get_mut("docs").map(Value::take) else {
        return Err(ApiError::bad_request(
            "Request body must have a `docs` array",
        ));
    };
    let max = state.limits.max_batch_docs;
    if docs.len() > max {
        return Err(ApiError::too_large(format!(
            "{} documents in one request, at most {max} allowed",
            docs.len()
        )));
    }
    let mut parsed = Vec::with_capacity(docs.len());
    for doc in docs {
        parsed
            .push(CouchDoc::parse(doc).map_err(|error| ApiError::bad_request(error.to_string()))?);
    }

    if !new_edits {
        let revisions = parsed
            .into_iter()
            .map(|doc| replicated_revision(doc, None))
            .collect::<ApiResult<Vec<_>>>()?;
        let outcome = state
            .with_endpoint(&db, move |endpoint| endpoint.write_revisions(revisions))
            .await?;
        // As CouchDB: only the refused revisions are listed.
        let refused: Vec<BulkDocsRow> = outcome
            .acks
            .iter()
            .filter_map(|ack| {
                let error = ApiError::from(ack.refused.as_ref()?);
                let row =
                    BulkDocsRow::refused(&ack.doc_id, Some(&ack.rev), error.error, &error.reason);
                Some(row)
            })
            .collect();
        return Ok((StatusCode::CREATED, Json(refused)));
    }

    let edits: Vec<Edit> = parsed
        .into_iter()
        .map(|doc| Edit {
            doc_id: doc
                .id
                .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()),
            base: doc.rev,
            deleted: doc.deleted,
            body: doc.body,
            hlc: ferry_core::hlc::Timestamp::ZERO,
        })
        .collect();
    let ids: Vec<String> = edits.iter().map(|edit| edit.doc_id.clone()).collect();
    let results = state
        .with_endpoint(&db, move |endpoint| endpoint.write_edits(edits))
        .await?;
    let rows: Vec<BulkDocsRow> = ids
        .into_iter()
        .zip(results)
        .map(|(doc_id, result)| match result {
            Ok(rev) => BulkDocsRow::stored(&doc_id, &rev),
            Err(refusal) => {
                let error = ApiError::from(&refusal);
                BulkDocsRow::refused(&doc_id, None, error.error, &error.reason)
            }
        })
        .collect();
    Ok((StatusCode::CREATED, Json(rows)))
}
