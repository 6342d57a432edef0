//! `GET /_ferry/sync`: the WebSocket sync session (`docs/protocol.md`).
//!
//! A session is a loop over one socket: requests are answered concurrently (up to
//! [`MAX_IN_FLIGHT`]), each by the same store calls the HTTP endpoints make, and each response
//! carries its request's id; meanwhile, a subscribed session is told when its database's
//! sequence moves. The session holds no replication state of its own: checkpoints
//! are `_local` documents, so a session lost at any point is simply opened again.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use ferry_core::couch::revision_from_json;
use ferry_core::filter::ChangesFilter;
use ferry_core::json::parse_strict;
use ferry_core::replicate::Checkpoint;
use ferry_core::rev::Rev;
use ferry_store::endpoint::EndpointError;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::AppState;
use crate::auth::{Identity, IssuedToken};
use crate::error::{ApiError, ApiResult};
use crate::params::{ENVELOPE_DEPTH, parse_rev, parse_rev_list};
use crate::routes::changes::{ChangesRequest, page, page_json};
use crate::routes::documents::revision_document;

/// The protocol versions this server speaks.
const VERSIONS: &[u64] = &[1];
/// How long a client may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that sends nothing (not even a ping) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests a session answers at once. A client pipelines (a push writes one batch while it
/// reads the next); past this many, the session reads no further frame until one is answered,
/// which bounds what one session holds in memory.
const MAX_IN_FLIGHT: usize = 4;
/// Requests nest one level deeper than `_bulk_docs` bodies: `{"op", "docs": [doc]}`.
const REQUEST_DEPTH: usize = ENVELOPE_DEPTH;

/// The initial read buffer and the write batching threshold of a session's socket.
const SESSION_BUFFER_BYTES: usize = 4 * 1024;

/// Replica ids are at most this long.
const MAX_REPLICA_ID: usize = 128;

/// Upgrades the request to a session. Credentials on the upgrade request itself (a cookie, a
/// bearer token) are enough; otherwise `hello` must carry them.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    identity: Option<Extension<Identity>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(permit) = state.session_permit() else {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_sessions",
            "The server holds as many sync sessions as it is configured for; retry later.",
        )
        .into_response();
    };
    upgrade
        .max_message_size(state.limits.max_request_bytes)
        // Most sessions sit idle: small buffers (they grow for large frames) keep thousands
        // of open sessions cheap, instead of 128 KiB of read buffer each.
        .read_buffer_size(SESSION_BUFFER_BYTES)
        .write_buffer_size(SESSION_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            let mut session = Session {
                state,
                socket,
                identity: identity.map(|Extension(identity)| identity),
            };
            if let Err(reason) = session.run().await {
                tracing::debug!(%reason, "sync session ended");
            }
        })
}

struct Session {
    state: AppState,
    socket: WebSocket,
    /// Who the upgrade request authenticated as, if anyone.
    identity: Option<Identity>,
}

/// An error as the session sends it: CouchDB's `error` and `reason`, and the HTTP status the
/// same failure would have (which tells a client whether retrying can help).
fn error_json(error: &ApiError) -> Value {
    json!({"error": error.error, "reason": error.reason, "status": error.status.as_u16()})
}

/// The frame refusing a session.
fn error_frame(error: &ApiError) -> Value {
    let mut frame = error_json(error);
    frame["type"] = json!("error");
    frame
}

impl Session {
    async fn send(&mut self, frame: &Value) -> Result<(), String> {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .map_err(|error| error.to_string())
    }

    /// The next JSON frame; `None` when the client closed the session. Cancel-safe: a frame is
    /// either returned or left unread.
    async fn receive(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, String> {
        loop {
            let message = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, self.socket.recv())
                    .await
                    .map_err(|_| "idle timeout".to_owned())?,
                None => self.socket.recv().await,
            };
            let Some(message) = message else {
                return Ok(None);
            };
            let text = match message.map_err(|error| error.to_string())? {
                Message::Text(text) => text,
                Message::Close(_) => return Ok(None),
                // Pings are answered by the WebSocket layer; binary frames are not ours.
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Binary(_) => {
                    return Err("binary frames are not part of the protocol".into());
                }
            };
            let depth = self.state.limits.max_json_depth + REQUEST_DEPTH;
            return parse_strict(text.as_bytes(), depth)
                .map(Some)
                .map_err(|error| format!("invalid frame: {error}"));
        }
    }

    async fn refuse(&mut self, error: ApiError) -> Result<(), String> {
        let _ = self.send(&error_frame(&error)).await;
        let _ = self.socket.send(Message::Close(None)).await;
        Err(error.reason)
    }

    async fn run(&mut self) -> Result<(), String> {
        let Some(hello) = self.receive(Some(HELLO_TIMEOUT)).await? else {
            return Ok(());
        };
        if hello["type"] != "hello" {
            return self
                .refuse(ApiError::bad_request("the first message must be hello"))
                .await;
        }
        let offered: Vec<u64> = hello["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        let Some(version) = VERSIONS.iter().rev().find(|v| offered.contains(v)).copied() else {
            return self
                .refuse(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "unsupported_version",
                    format!("this server speaks versions {VERSIONS:?}"),
                ))
                .await;
        };
        let Some(db) = hello["db"].as_str().map(str::to_owned) else {
            return self.refuse(ApiError::bad_request("hello needs a db")).await;
        };
        let replica = hello["replica_id"].as_str().unwrap_or_default().to_owned();
        if replica.is_empty() || replica.len() > MAX_REPLICA_ID {
            return self
                .refuse(ApiError::bad_request(format!(
                    "hello needs a replica_id of 1 to {MAX_REPLICA_ID} bytes"
                )))
                .await;
        }
        let (identity, reconnect) = match authenticate(
            &self.state,
            self.identity.clone(),
            &hello["auth"],
            &replica,
        )
        .await
        {
            Ok(authenticated) => authenticated,
            Err(error) => return self.refuse(error).await,
        };
        let create = hello["create"].as_bool().unwrap_or(false);
        let opened = {
            let db = db.clone();
            self.state
                .run(move |backend| {
                    let database = match backend.open_database(&db) {
                        Err(ferry_store::StoreError::NoSuchDatabase(_)) if create => {
                            match backend.create_database(&db) {
                                // Created meanwhile by another session.
                                Err(ferry_store::StoreError::DatabaseExists(_)) => {
                                    backend.open_database(&db)
                                }
                                other => other,
                            }
                        }
                        other => other,
                    }?;
                    database.info()
                })
                .await
        };
        let info = match opened {
            Ok(info) => info,
            Err(error) => return self.refuse(error).await,
        };
        let mut welcome = json!({
            "type": "welcome",
            "version": version,
            "server": self.state.server_uuid(),
            "update_seq": info.update_seq,
            "user": identity.user,
        });
        if let Some(reconnect) = reconnect {
            welcome["reconnect_token"] = json!(reconnect.token);
            welcome["reconnect_expires_at"] = json!(reconnect.expires_ms);
        }
        self.send(&welcome).await?;
        tracing::debug!(user = ?identity.user, %replica, %db, "sync session opened");

        let mut notifications = self.state.subscribe(&db, info.update_seq);
        // The last sequence announced to a subscribed client, or None when not subscribed.
        let mut announced: Option<u64> = None;
        // After a `changed`, the next one waits for the client's next `changes` request: it is
        // going to read everything up to then anyway, and a client that stopped reading (a
        // backgrounded app) then costs nothing per write, however busy the database.
        let mut armed = true;
        // Requests being answered: whether each is a `changes` read, and its response.
        let mut in_flight = FuturesUnordered::new();
        loop {
            // A session waiting on its own requests is not idle.
            let idle_timeout = in_flight.is_empty().then_some(IDLE_TIMEOUT);
            tokio::select! {
                // Notifications first: they are cheap, and a client should hear of a change
                // before the session turns to its next (possibly large) request.
                biased;
                changed = notifications.changed(), if announced.is_some() && armed => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    armed &= !self.announce(&mut notifications, &mut announced).await?;
                }
                Some((read_changes, response)) = in_flight.next(), if !in_flight.is_empty() => {
                    let response: Value = response;
                    if read_changes {
                        armed = true;
                        // What the response carries needs no announcement: announcing it
                        // would wake the client for nothing and disarm the session before the
                        // write that matters.
                        if let (Some(last), Some(read)) =
                            (announced, response["result"]["last_seq"].as_u64())
                        {
                            announced = Some(last.max(read));
                        }
                    }
                    self.send(&response).await?;
                }
                frame = self.receive(idle_timeout), if in_flight.len() < MAX_IN_FLIGHT => {
                    let Some(frame) = frame? else { return Ok(()) };
                    match frame["type"].as_str() {
                        Some("request") => {
                            let state = self.state.clone();
                            let db = db.clone();
                            let read_changes = frame["op"] == "changes";
                            in_flight.push(async move {
                                (read_changes, answer(&state, &db, frame).await)
                            });
                        }
                        Some("subscribe") => {
                            let since = frame["since"].as_u64().unwrap_or(0);
                            announced = Some(since);
                            armed = !self.announce(&mut notifications, &mut announced).await?;
                        }
                        Some("unsubscribe") => announced = None,
                        Some("ping") => self.send(&json!({"type": "pong"})).await?,
                        _ => {
                            return self
                                .refuse(ApiError::bad_request("unknown message type"))
                                .await;
                        }
                    }
                }
            }
        }
    }

    /// Sends `changed` if the database moved past what was last announced; whether it did.
    async fn announce(
        &mut self,
        notifications: &mut watch::Receiver<u64>,
        announced: &mut Option<u64>,
    ) -> Result<bool, String> {
        let latest = *notifications.borrow_and_update();
        if let Some(last) = *announced
            && latest > last
        {
            *announced = Some(latest);
            self.send(&json!({"type": "changed", "seq": latest}))
                .await?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Who the client is, from `hello.auth` (or the upgrade request's credentials), and the
/// reconnect token it resumes with next time (none when authentication is off).
async fn authenticate(
    state: &AppState,
    upgraded_as: Option<Identity>,
    auth: &Value,
    replica: &str,
) -> ApiResult<(Identity, Option<IssuedToken>)> {
    if !state.auth().config().required {
        return Ok((Identity::anonymous_admin(), None));
    }
    let replica = replica.to_owned();
    let field = |name: &str| auth[name].as_str().map(str::to_owned);
    if let Some(token) = field("reconnect_token") {
        let (identity, next) = state
            .authenticate(move |auth| auth.resume(&token, &replica))
            .await?;
        return Ok((identity, Some(next)));
    }
    let identity = if let Some(token) = field("token") {
        state
            .authenticate(move |auth| auth.verify_access_token(&token))
            .await?
    } else if let (Some(name), Some(password)) = (field("name"), field("password")) {
        state
            .authenticate(move |auth| auth.verify_password(&name, &password))
            .await?
    } else if let Some(identity) = upgraded_as {
        identity
    } else {
        return Err(ApiError::unauthorized(
            "Authentication required: hello needs auth.",
        ));
    };
    let user = identity.user.clone().unwrap_or_default();
    let first = state
        .authenticate(move |auth| auth.issue_reconnect_token(&user, &replica))
        .await?;
    Ok((identity, Some(first)))
}

/// The response to one request frame.
async fn answer(state: &AppState, db: &str, frame: Value) -> Value {
    let id = frame["id"].clone();
    match operation(state, db, frame).await {
        Ok(result) => json!({"type": "response", "id": id, "result": result}),
        Err(error) => json!({"type": "response", "id": id, "error": error_json(&error)}),
    }
}

/// Carries out one request on the database's replica endpoint (the same calls as the HTTP
/// routes make).
async fn operation(state: &AppState, db: &str, mut frame: Value) -> ApiResult<Value> {
    let frame = &mut frame;
    match frame["op"].as_str().unwrap_or_default() {
        "get_checkpoint" => {
            let id = checkpoint_id(frame)?;
            let checkpoint = state
                .with_endpoint(db, move |endpoint| endpoint.checkpoint(&id))
                .await?;
            Ok(serde_json::to_value(checkpoint).expect("checkpoints serialize"))
        }
        "put_checkpoint" => {
            let id = checkpoint_id(frame)?;
            let checkpoint: Checkpoint = serde_json::from_value(frame["checkpoint"].take())
                .map_err(|error| {
                    ApiError::bad_request(format!("put_checkpoint needs a checkpoint: {error}"))
                })?;
            state
                .with_endpoint(db, move |endpoint| {
                    endpoint.put_checkpoint(&id, &checkpoint)
                })
                .await?;
            Ok(json!({}))
        }
        "changes" => {
            let since = frame["since"].as_u64().unwrap_or(0);
            let limit = frame["limit"].as_u64().map_or(usize::MAX, |limit| {
                usize::try_from(limit).unwrap_or(usize::MAX)
            });
            let filter = if let Some(ids) = frame.get("doc_ids") {
                let ids = ids
                    .as_array()
                    .ok_or_else(|| ApiError::bad_request("doc_ids must be an array"))?
                    .iter()
                    .filter_map(|id| id.as_str().map(str::to_owned));
                ChangesFilter::doc_ids(ids)
            } else if let Some(selector) = frame.get_mut("selector") {
                ChangesFilter::selector(selector.take())
                    .map_err(|error| ApiError::bad_request(error.to_string()))?
            } else {
                ChangesFilter::all()
            };
            let request = ChangesRequest::replication_page(since, limit, filter);
            let page = page(state, db, &request, since, limit).await?;
            Ok(page_json(&page, &request))
        }
        "revs_diff" => {
            let Some(Value::Object(map)) = frame.get("revs") else {
                return Err(ApiError::bad_request("revs_diff needs a revs object"));
            };
            let asked: Vec<(String, Vec<Rev>)> = map
                .iter()
                .map(|(doc_id, revs)| Ok((doc_id.clone(), parse_rev_list(revs)?)))
                .collect::<ApiResult<_>>()?;
            let answers = state
                .with_endpoint(db, move |endpoint| endpoint.revs_diff(&asked))
                .await?;
            let missing: Map<String, Value> = answers
                .into_iter()
                .map(|(doc_id, diff)| {
                    (
                        doc_id,
                        diff.missing
                            .iter()
                            .map(|rev| Value::String(rev.to_string()))
                            .collect(),
                    )
                })
                .collect();
            Ok(Value::Object(missing))
        }
        "bulk_get" => {
            let requests = frame["docs"]
                .as_array()
                .ok_or_else(|| ApiError::bad_request("bulk_get needs docs"))?;
            let wanted: Vec<(String, Rev)> = requests
                .iter()
                .map(|request| {
                    let id = request["id"]
                        .as_str()
                        .ok_or_else(|| ApiError::bad_request("each doc needs an id"))?;
                    let rev = parse_rev(request["rev"].as_str().unwrap_or_default())?;
                    Ok((id.to_owned(), rev))
                })
                .collect::<ApiResult<_>>()?;
            let found = state
                .with_endpoint(db, move |endpoint| {
                    let stored = endpoint.fetch(&wanted)?;
                    Ok::<_, EndpointError>(wanted.into_iter().zip(stored).collect::<Vec<_>>())
                })
                .await?;
            let mut docs = Vec::new();
            let mut missing = Vec::new();
            for ((id, rev), stored) in found {
                match stored {
                    Some(stored) => docs.push(revision_document(&stored, true, true)),
                    None => missing.push(json!({"id": id, "rev": rev.to_string()})),
                }
            }
            Ok(json!({"docs": docs, "missing": missing}))
        }
        "bulk_docs" => {
            // Taken out of the frame, not copied: the bodies become the stored revisions.
            let Value::Array(docs) = frame["docs"].take() else {
                return Err(ApiError::bad_request("bulk_docs needs docs"));
            };
            // A revision that cannot be read is a broken client: refuse the request.
            let revisions = docs
                .into_iter()
                .map(|doc| {
                    revision_from_json(doc)
                        .map_err(|error| ApiError::bad_request(error.to_string()))
                })
                .collect::<ApiResult<Vec<_>>>()?;
            let outcome = state
                .with_endpoint(db, move |endpoint| endpoint.write_revisions(revisions))
                .await?;
            let acks: Vec<Value> = outcome
                .acks
                .into_iter()
                .map(|ack| match ack.refused {
                    None => json!({"id": ack.doc_id, "rev": ack.rev.to_string(), "ok": true}),
                    Some(refused) => {
                        let error = ApiError::from(refused);
                        json!({
                            "id": ack.doc_id, "rev": ack.rev.to_string(),
                            "error": error.error, "reason": error.reason,
                        })
                    }
                })
                .collect();
            Ok(json!({ "acks": acks }))
        }
        other => Err(ApiError::bad_request(format!("unknown op {other:?}"))),
    }
}

fn checkpoint_id(frame: &Value) -> ApiResult<String> {
    frame["checkpoint_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::bad_request("checkpoint_id must be a non-empty string"))
}
