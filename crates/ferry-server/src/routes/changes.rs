//! `_changes`: the feed replication reads, in its three forms.
//!
//! - `feed=normal`: the changes after `since`, up to `limit`, then `last_seq`.
//! - `feed=longpoll`: the same, but when there are none yet, waits until a change arrives or
//!   the timeout passes.
//! - `feed=continuous`: one JSON line per change as they happen, until `limit` rows or the
//!   timeout.
//!
//! Waiting feeds send a newline every `heartbeat` milliseconds so that clients and proxies with
//! idle timeouts keep the connection (PouchDB sends `heartbeat=10000`). Filters (`_doc_ids`,
//! `_selector`) are applied while scanning, so a response holds at most `limit` rows however
//! many changes are scanned: memory is bounded by the page, not by the database.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use ferry_core::couch::{ChangesFilterBody, ChangesRow, DocExtras, RevEntry, document_json};
use ferry_core::filter::ChangesFilter;
use ferry_core::replicate::Seq;
use ferry_store::Change;
use ferry_store::endpoint::ChangesPage;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::params::{ENVELOPE_DEPTH, Params};

type QueryMap = Query<HashMap<String, String>>;

/// The shortest heartbeat interval accepted, so a client cannot make the server spin.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Feed {
    Normal,
    Longpoll,
    Continuous,
}

#[derive(Clone, Debug)]
pub(crate) struct ChangesRequest {
    pub(crate) since: u64,
    pub(crate) limit: usize,
    pub(crate) all_leaves: bool,
    pub(crate) include_docs: bool,
    pub(crate) conflicts: bool,
    pub(crate) feed: Feed,
    pub(crate) timeout: Duration,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) filter: ChangesFilter,
}

/// `GET /{db}/_changes`.
pub(crate) async fn get_changes(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    let request = parse_request(&state, &db, &params, None).await?;
    respond(state, db, request).await
}

/// `POST /{db}/_changes`: filters in the body (`{"doc_ids": [...]}` or `{"selector": {...}}`).
pub(crate) async fn post_changes(
    State(state): State<AppState>,
    Path(db): Path<String>,
    query: QueryMap,
    body: Bytes,
) -> ApiResult<Response> {
    let params = Params::from_query(query);
    // An empty body is allowed (the filter may be in the query string).
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let value = ferry_core::json::parse_within(
            &body,
            state.limits.max_json_depth + ENVELOPE_DEPTH,
            state.limits.max_json_values,
        )
        .map_err(ApiError::from)?;
        let body: ChangesFilterBody = serde_json::from_value(value)
            .map_err(|error| ApiError::bad_request(format!("Invalid _changes body: {error}")))?;
        Some(body)
    };
    let request = parse_request(&state, &db, &params, body).await?;
    respond(state, db, request).await
}

async fn parse_request(
    state: &AppState,
    db: &str,
    params: &Params,
    body: Option<ChangesFilterBody>,
) -> ApiResult<ChangesRequest> {
    let ChangesFilterBody { doc_ids, selector } = body.unwrap_or_default();
    if params.flag("descending", false)? {
        return Err(ApiError::bad_request(
            "descending changes feeds are not supported",
        ));
    }
    let feed = match params.text("feed").unwrap_or("normal") {
        "normal" => Feed::Normal,
        "longpoll" => Feed::Longpoll,
        "continuous" => Feed::Continuous,
        other => {
            return Err(ApiError::bad_request(format!(
                "Unsupported feed {other:?}: use normal, longpoll or continuous"
            )));
        }
    };
    let since = match params.json(&["since"])? {
        None => 0,
        Some(Value::String(now)) if now == "now" => {
            state.with_db(db, |db| db.info()).await?.update_seq
        }
        Some(Value::Number(number)) => number
            .as_u64()
            .ok_or_else(|| ApiError::bad_request("since must be a non-negative integer"))?,
        Some(Value::String(text)) => text
            .parse()
            .map_err(|_| ApiError::bad_request(format!("Invalid since value {text:?}")))?,
        Some(_) => return Err(ApiError::bad_request("Invalid since value")),
    };
    let max_rows = state.limits.max_page_rows;
    let limit = params.number("limit")?.map_or(max_rows, |limit| {
        usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .clamp(1, max_rows)
    });
    let all_leaves = match params.text("style").unwrap_or("main_only") {
        "main_only" => false,
        "all_docs" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "Unsupported style {other:?}"
            )));
        }
    };
    let timeout = params
        .number("timeout")?
        .map_or(state.default_feed_timeout(), Duration::from_millis);
    let heartbeat = match params.text("heartbeat") {
        None | Some("false") => None,
        Some("true") => Some(Duration::from_secs(60)),
        Some(_) => params
            .number("heartbeat")?
            .map(|ms| Duration::from_millis(ms).max(MIN_HEARTBEAT)),
    };
    let filter = match params.text("filter") {
        None => ChangesFilter::all(),
        Some("_doc_ids") => {
            let ids = match doc_ids {
                Some(ids) => ids,
                None => {
                    let ids = params
                        .json(&["doc_ids"])?
                        .ok_or_else(|| ApiError::bad_request("filter=_doc_ids needs doc_ids"))?;
                    serde_json::from_value(ids)
                        .map_err(|_| ApiError::bad_request("doc_ids must be an array of strings"))?
                }
            };
            if ids.len() > state.limits.max_batch_docs {
                return Err(ApiError::too_large(format!(
                    "{} doc_ids, at most {} allowed",
                    ids.len(),
                    state.limits.max_batch_docs
                )));
            }
            ChangesFilter::doc_ids(ids)
        }
        Some("_selector") => {
            let selector = selector.ok_or_else(|| {
                ApiError::bad_request("filter=_selector needs a selector in the body")
            })?;
            ChangesFilter::selector(selector)
                .map_err(|error| ApiError::bad_request(error.to_string()))?
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "filter {other:?} is not supported: use _doc_ids or _selector"
            )));
        }
    };
    Ok(ChangesRequest {
        since,
        limit,
        all_leaves,
        include_docs: params.flag("include_docs", false)?,
        conflicts: params.flag("conflicts", false)?,
        feed,
        timeout,
        heartbeat,
        filter,
    })
}

fn change_row(change: &Change, request: &ChangesRequest) -> Value {
    let changes: Vec<RevEntry> = if request.all_leaves {
        // The winner first, then the other leaves, as CouchDB lists them.
        std::iter::once(&change.rev)
            .chain(
                change
                    .leaves
                    .iter()
                    .map(|leaf| &leaf.rev)
                    .filter(|rev| *rev != &change.rev),
            )
            .map(|rev| RevEntry { rev: rev.clone() })
            .collect()
    } else {
        vec![RevEntry {
            rev: change.rev.clone(),
        }]
    };
    let doc = request.include_docs.then(|| {
        let conflicts: Vec<_> = change
            .leaves
            .iter()
            .filter(|leaf| !leaf.deleted && leaf.rev != change.rev)
            .map(|leaf| leaf.rev.clone())
            .collect();
        let empty = ferry_core::model::Body::new();
        document_json(
            &change.doc_id,
            &change.rev,
            change.deleted,
            change.body.as_ref().unwrap_or(&empty),
            &DocExtras {
                conflicts: (request.conflicts && !change.deleted).then_some(conflicts.as_slice()),
                ..DocExtras::default()
            },
        )
    });
    let row = ChangesRow {
        seq: Seq::from(change.seq),
        id: change.doc_id.clone(),
        changes,
        deleted: change.deleted,
        doc,
    };
    serde_json::to_value(row).expect("a changes row serializes")
}

/// Reads up to `limit` matching changes after `since`.
pub(crate) async fn page(
    state: &AppState,
    db: &str,
    request: &ChangesRequest,
    since: u64,
    limit: usize,
) -> ApiResult<ChangesPage> {
    let filter = request.filter.clone();
    let bodies = request.include_docs;
    state
        .with_endpoint(db, move |endpoint| {
            endpoint.changes(since, limit, &filter, bodies)
        })
        .await
}

/// A page in CouchDB's form.
pub(crate) fn page_json(page: &ChangesPage, request: &ChangesRequest) -> Value {
    let rows: Vec<Value> = page
        .changes
        .iter()
        .map(|change| change_row(change, request))
        .collect();
    json!({
        "results": rows,
        "last_seq": page.last_seq,
        "pending": page.pending(),
    })
}

/// Rows of a page with documents read at once.
const PAGE_CHUNK: usize = 16;

/// A normal feed with documents, written a few rows at a time as the client reads it: up to
/// `limit` rows of up to `max_document_bytes` each would otherwise be held whole. The first
/// rows are read before the response starts, so errors keep their status.
async fn streamed_page(
    state: AppState,
    db: String,
    request: ChangesRequest,
) -> ApiResult<Response> {
    let asked = rows_per_read(&request, request.limit);
    let first = page(&state, &db, &request, request.since, asked).await?;
    let (sender, receiver) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        send_page_in_chunks(&state, &db, &request, first, asked, &sender).await;
    });
    Ok(super::json_stream(receiver))
}

/// How many of the `left` rows a feed reads at once: [`PAGE_CHUNK`] with documents, all of
/// them without.
fn rows_per_read(request: &ChangesRequest, left: usize) -> usize {
    if request.include_docs {
        PAGE_CHUNK.min(left.max(1))
    } else {
        left
    }
}

/// Sends a page in CouchDB's form, starting with `first` (read with `asked` rows) and reading
/// the rest [`PAGE_CHUNK`] rows at a time while the client takes them.
async fn send_page_in_chunks(
    state: &AppState,
    db: &str,
    request: &ChangesRequest,
    first: ChangesPage,
    mut asked: usize,
    sender: &mpsc::Sender<Bytes>,
) {
    let limit = request.limit.max(1);
    let mut text = String::from("{\"results\":[");
    let mut sent = 0;
    let mut current = first;
    loop {
        for change in &current.changes {
            if sent > 0 {
                text.push(',');
            }
            text.push_str(&change_row(change, request).to_string());
            sent += 1;
        }
        let cursor = current.last_seq;
        if current.changes.len() < asked || sent >= limit {
            text.push_str(&format!(
                "],\"last_seq\":{cursor},\"pending\":{}}}",
                current.pending()
            ));
            let _ = sender.send(Bytes::from(text)).await;
            return;
        }
        if sender
            .send(Bytes::from(std::mem::take(&mut text)))
            .await
            .is_err()
        {
            return;
        }
        asked = rows_per_read(request, limit - sent);
        match page(state, db, request, cursor, asked).await {
            Ok(next) => current = next,
            Err(error) => {
                // The status is sent: an unfinished body tells the client it failed.
                tracing::warn!(db = %db, reason = %error.reason, "a changes page failed midway");
                return;
            }
        }
    }
}

async fn respond(state: AppState, db: String, request: ChangesRequest) -> ApiResult<Response> {
    if request.feed == Feed::Normal && request.include_docs {
        return streamed_page(state, db, request).await;
    }
    if request.feed == Feed::Normal {
        let page = page(&state, &db, &request, request.since, request.limit).await?;
        return Ok(Json(page_json(&page, &request)).into_response());
    }
    // Fail fast on a missing database, before a streaming response has started.
    let current = state.with_db(&db, |db| db.info()).await?.update_seq;
    let mut notifications = state.subscribe(&db, current);
    let (sender, receiver) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let result = match request.feed {
            Feed::Longpoll => longpoll(&state, &db, &request, &mut notifications, &sender).await,
            _ => continuous(&state, &db, &request, &mut notifications, &sender).await,
        };
        if let Err(error) = result {
            // The status line is already sent; end the body with the error as a last line.
            let line = json!({"error": error.error, "reason": error.reason}).to_string() + "\n";
            let _ = sender.send(Bytes::from(line)).await;
        }
    });
    Ok(super::json_stream(receiver))
}

/// What ended a wait for changes.
enum Woken {
    Changed,
    Heartbeat,
    TimedOut,
    Gone,
}

async fn wait(
    notifications: &mut tokio::sync::watch::Receiver<u64>,
    heartbeat: Option<Duration>,
    deadline: Instant,
) -> Woken {
    let heartbeat_at = heartbeat.map(|every| Instant::now() + every);
    tokio::select! {
        changed = notifications.changed() => if changed.is_ok() { Woken::Changed } else { Woken::Gone },
        () = tokio::time::sleep_until(heartbeat_at.unwrap_or(deadline)), if heartbeat_at.is_some_and(|at| at < deadline) => Woken::Heartbeat,
        () = tokio::time::sleep_until(deadline) => Woken::TimedOut,
    }
}

/// Waits for a change or the deadline, sending a heartbeat newline at every interval. False
/// when the feed should end: the client went away or the database's notifier closed.
async fn wait_with_heartbeats(
    notifications: &mut tokio::sync::watch::Receiver<u64>,
    heartbeat: Option<Duration>,
    deadline: Instant,
    sender: &mpsc::Sender<Bytes>,
) -> bool {
    loop {
        match wait(notifications, heartbeat, deadline).await {
            Woken::Changed | Woken::TimedOut => return true,
            Woken::Heartbeat => {
                if sender.send(Bytes::from_static(b"\n")).await.is_err() {
                    return false;
                }
            }
            Woken::Gone => return false,
        }
    }
}

async fn longpoll(
    state: &AppState,
    db: &str,
    request: &ChangesRequest,
    notifications: &mut tokio::sync::watch::Receiver<u64>,
    sender: &mpsc::Sender<Bytes>,
) -> ApiResult<()> {
    let deadline = Instant::now() + request.timeout;
    let asked = rows_per_read(request, request.limit);
    loop {
        notifications.borrow_and_update();
        let page = page(state, db, request, request.since, asked).await?;
        let filtered_progress = page.last_seq > request.since;
        if !page.changes.is_empty() || filtered_progress || Instant::now() >= deadline {
            if request.include_docs {
                send_page_in_chunks(state, db, request, page, asked, sender).await;
            } else {
                let _ = sender
                    .send(Bytes::from(page_json(&page, request).to_string()))
                    .await;
            }
            return Ok(());
        }
        if !wait_with_heartbeats(notifications, request.heartbeat, deadline, sender).await {
            return Ok(());
        }
    }
}

async fn continuous(
    state: &AppState,
    db: &str,
    request: &ChangesRequest,
    notifications: &mut tokio::sync::watch::Receiver<u64>,
    sender: &mpsc::Sender<Bytes>,
) -> ApiResult<()> {
    let deadline = Instant::now() + request.timeout;
    let mut since = request.since;
    let mut sent = 0usize;
    loop {
        notifications.borrow_and_update();
        let asked = rows_per_read(request, request.limit - sent);
        let page = page(state, db, request, since, asked).await?;
        since = page.last_seq;
        let found = page.changes.len();
        for change in &page.changes {
            let row = change_row(change, request);
            if sender
                .send(Bytes::from(row.to_string() + "\n"))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        sent += found;
        if sent >= request.limit || Instant::now() >= deadline {
            let end = json!({"last_seq": since, "pending": page.pending()});
            let _ = sender.send(Bytes::from(end.to_string() + "\n")).await;
            return Ok(());
        }
        if found > 0 {
            continue;
        }
        if !wait_with_heartbeats(notifications, request.heartbeat, deadline, sender).await {
            return Ok(());
        }
    }
}
