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
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;

use ferry_core::couch::revision_from_checked_text;
use ferry_core::filter::ChangesFilter;
use ferry_core::json::RawJson;
use ferry_core::protocol::{
    Ack, BulkDocsResult, BulkGetResult, ChangesResult, ChangesRow, ClientFrame,
    FRAME_ENVELOPE_DEPTH, FrameError, HelloAuth, Op, RevEntry, RevRef, ServerFrame, VERSIONS,
    Welcome, WireError,
};
use ferry_core::rev::Rev;
use ferry_store::endpoint::Endpoint;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio::sync::watch;

use crate::AppState;
use crate::auth::{Identity, IssuedToken};
use crate::connections::{BudgetExceeded, ConnectionHandle};
use crate::error::{ApiError, ApiResult};
use crate::routes::documents::revision_document;

/// Requests a session answers at once. A client pipelines (a push writes one batch while it
/// reads the next); past this many, the session reads no further frame until one is answered,
/// which bounds what one session holds in memory.
const MAX_IN_FLIGHT: usize = 4;

/// The initial read buffer and the write batching threshold of a session's socket.
const SESSION_BUFFER_BYTES: usize = 4 * 1024;

/// Replica ids are at most this long.
const MAX_REPLICA_ID: usize = 128;

/// What a session may send before authenticating beyond `max_unauthenticated_bytes`: the
/// WebSocket framing of its hello, and pings.
const PRE_HELLO_FRAMING_BYTES: usize = 1024;

/// How long a refused session is kept open after its close frame, so that the client reads
/// the close frame before the connection goes (closing a socket with unread data resets it).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The close codes a session ends with (RFC 6455, section 7.4.1; `docs/protocol.md`).
mod close {
    /// The frame broke the WebSocket protocol itself.
    pub(super) const PROTOCOL: u16 = 1002;
    /// A binary frame: the protocol is text frames of JSON.
    pub(super) const UNSUPPORTED: u16 = 1003;
    /// A text frame that is not UTF-8.
    pub(super) const INVALID_PAYLOAD: u16 = 1007;
    /// A frame that is not the protocol (not JSON, not a known frame, out of order), a
    /// refused `hello`, or no `hello` in time.
    pub(super) const POLICY: u16 = 1008;
    /// A frame larger than the limit.
    pub(super) const TOO_BIG: u16 = 1009;
    /// The server is full (sessions); retry later.
    pub(super) const TRY_AGAIN_LATER: u16 = 1013;
}

/// Upgrades the request to a session. Credentials on the upgrade request itself (a cookie, a
/// bearer token) are enough; otherwise `hello` must carry them.
///
/// A session holds one of the few unauthenticated slots until its `hello` is checked, and one
/// of `max_sessions` only from then on, so clients that never say hello cannot lock real users
/// out; until then it may send `max_unauthenticated_bytes` at most.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    identity: Option<Extension<Identity>>,
    connection: Option<Extension<ConnectionHandle>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Saves the client a hello when the answer would be no anyway.
    if state.sessions_full() {
        return too_many_sessions().into_response();
    }
    let Some(unauthenticated) = state.unauthenticated_session_permit() else {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_unauthenticated_sessions",
            "The server holds as many sessions waiting for hello as it is configured for; \
             retry later.",
        )
        .into_response();
    };
    let connection = connection.map(|Extension(connection)| connection);
    if let Some(connection) = &connection {
        // The hello itself, with room for its framing and a few pings.
        connection.limit_reads(Some(
            state
                .max_unauthenticated_bytes()
                .saturating_add(PRE_HELLO_FRAMING_BYTES),
        ));
    }
    let limit = state.limits.max_request_bytes;
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // Most sessions sit idle: small buffers (they grow for large frames) keep thousands
        // of open sessions cheap, instead of 128 KiB of read buffer each.
        .read_buffer_size(SESSION_BUFFER_BYTES)
        .write_buffer_size(SESSION_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let mut session = Session {
                state,
                socket,
                identity: identity.map(|Extension(identity)| identity),
                connection,
                unauthenticated: Some(unauthenticated),
                permit: None,
            };
            if let Err(reason) = session.run().await {
                tracing::debug!(%reason, "sync session ended");
            }
        })
}

fn too_many_sessions() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_sessions",
        "The server holds as many sync sessions as it is configured for; retry later.",
    )
}

struct Session {
    state: AppState,
    socket: WebSocket,
    /// Who the upgrade request authenticated as, if anyone.
    identity: Option<Identity>,
    /// The connection the session runs on, when served by `ferry serve`.
    connection: Option<ConnectionHandle>,
    /// The session's unauthenticated slot, until its hello is checked.
    unauthenticated: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its session slot, from then on.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What the socket brought.
enum Incoming {
    Frame(ClientFrame),
    /// A frame that is not the protocol: the session is refused with the reason.
    Invalid(FrameError),
    /// A frame the socket refused (too big, binary, not UTF-8, not WebSocket): the session is
    /// closed with this code.
    Refused(u16, ApiError),
    /// Nothing arrived in time.
    TimedOut,
    /// The client closed the session.
    Closed,
}

/// The close code and error for a frame the WebSocket layer could not read, or `None` when
/// the connection itself is gone (nothing can be said on it).
fn refusal_of(error: axum::Error) -> Option<(u16, ApiError)> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    let error = error.into_inner().downcast::<Error>().ok()?;
    Some(match *error {
        Error::Capacity(error) => (
            close::TOO_BIG,
            ApiError::too_large(format!("frame too large: {error}")),
        ),
        Error::Utf8(_) => (
            close::INVALID_PAYLOAD,
            ApiError::bad_request("a text frame is not valid UTF-8"),
        ),
        Error::Io(error)
            if error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<BudgetExceeded>())
                .is_some() =>
        {
            let budget = error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<BudgetExceeded>())
                .map_or(0, |budget| budget.0);
            (
                close::TOO_BIG,
                ApiError::too_large(format!(
                    "more than {budget} bytes before authentication: hello must be small"
                )),
            )
        }
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        Error::Protocol(error) => (
            close::PROTOCOL,
            ApiError::bad_request(format!("WebSocket protocol error: {error}")),
        ),
        _ => return None,
    })
}

/// An error as the session carries it.
fn wire_error(error: &ApiError) -> WireError {
    WireError {
        error: error.error.to_owned(),
        reason: error.reason.clone(),
        status: error.status.as_u16(),
    }
}

impl Session {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), String> {
        self.socket
            .send(Message::Text(frame.encode().into()))
            .await
            .map_err(|error| error.to_string())
    }

    /// The next frame. Cancel-safe: a frame is either returned or left unread.
    async fn receive(&mut self, timeout: Option<Duration>) -> Result<Incoming, String> {
        loop {
            let message = match timeout {
                Some(timeout) => match tokio::time::timeout(timeout, self.socket.recv()).await {
                    Ok(message) => message,
                    Err(_) => return Ok(Incoming::TimedOut),
                },
                None => self.socket.recv().await,
            };
            let Some(message) = message else {
                return Ok(Incoming::Closed);
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    let reason = error.to_string();
                    return match refusal_of(error) {
                        Some((code, error)) => Ok(Incoming::Refused(code, error)),
                        None => Err(reason),
                    };
                }
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => return Ok(Incoming::Closed),
                // Pings are answered by the WebSocket layer.
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Binary(_) => {
                    return Ok(Incoming::Refused(
                        close::UNSUPPORTED,
                        ApiError::bad_request("binary frames are not the protocol: send text"),
                    ));
                }
            };
            let before_hello = self.unauthenticated.is_some();
            let most = self.state.max_unauthenticated_bytes();
            if before_hello && text.len() > most {
                // Not parsed: a JSON tree costs many times its text.
                return Ok(Incoming::Refused(
                    close::TOO_BIG,
                    ApiError::too_large(format!(
                        "a frame before authentication may have {most} bytes at most"
                    )),
                ));
            }
            let depth = self.state.limits.max_json_depth + FRAME_ENVELOPE_DEPTH;
            let values = self.state.limits.max_json_values;
            return Ok(
                match ClientFrame::decode_within(text.as_bytes(), depth, values) {
                    Ok(frame) => Incoming::Frame(frame),
                    Err(error) => Incoming::Invalid(error),
                },
            );
        }
    }

    /// Ends the session: an error frame, then a close frame with `code` and the reason.
    async fn refuse_with(&mut self, code: u16, error: ApiError) -> Result<(), String> {
        let _ = self.send(&ServerFrame::Error(wire_error(&error))).await;
        let reason = close_reason(&error.reason);
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = self.socket.send(Message::Close(Some(frame))).await;
        // The session is over: its places are free for others while it lingers.
        self.unauthenticated = None;
        self.permit = None;
        // A frame read in full leaves the socket readable: wait for the client's own close.
        // After one that was not (too big), what follows is the rest of it, so only wait.
        let readable = !matches!(code, close::TOO_BIG | close::PROTOCOL);
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            if !readable {
                return std::future::pending().await;
            }
            while let Some(Ok(message)) = self.socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        Err(error.reason)
    }

    async fn refuse(&mut self, error: ApiError) -> Result<(), String> {
        self.refuse_with(close::POLICY, error).await
    }

    /// Ends the session for what [`Session::receive`] brought instead of a frame.
    async fn refuse_incoming(&mut self, incoming: Incoming) -> Result<(), String> {
        match incoming {
            Incoming::Closed => Ok(()),
            Incoming::Refused(code, error) => self.refuse_with(code, error).await,
            Incoming::TimedOut => {
                let reason = if self.unauthenticated.is_some() {
                    format!(
                        "no hello within {} s",
                        self.state.hello_timeout().as_secs_f64()
                    )
                } else {
                    format!(
                        "nothing received for {} s",
                        self.state.session_idle_timeout().as_secs_f64()
                    )
                };
                self.refuse(ApiError::new(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    reason,
                ))
                .await
            }
            Incoming::Invalid(error) => self.refuse(ApiError::bad_request(error.to_string())).await,
            Incoming::Frame(_) => {
                self.refuse(ApiError::bad_request("this frame is not expected here"))
                    .await
            }
        }
    }

    async fn run(&mut self) -> Result<(), String> {
        let hello = match self.receive(Some(self.state.hello_timeout())).await? {
            Incoming::Frame(ClientFrame::Hello(hello)) => hello,
            Incoming::Frame(_) => {
                return self
                    .refuse(ApiError::bad_request("the first message must be hello"))
                    .await;
            }
            other => return self.refuse_incoming(other).await,
        };
        let Some(version) = VERSIONS
            .iter()
            .rev()
            .find(|v| hello.versions.contains(v))
            .copied()
        else {
            return self
                .refuse(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "unsupported_version",
                    format!("this server speaks versions {VERSIONS:?}"),
                ))
                .await;
        };
        let db = hello.db;
        let replica = hello.replica_id;
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
            hello.auth.unwrap_or_default(),
            &replica,
        )
        .await
        {
            Ok(authenticated) => authenticated,
            Err(error) => return self.refuse(error).await,
        };
        let Some(permit) = self.state.session_permit() else {
            return self
                .refuse_with(close::TRY_AGAIN_LATER, too_many_sessions())
                .await;
        };
        self.permit = Some(permit);
        self.unauthenticated = None;
        if let Some(connection) = &self.connection {
            connection.limit_reads(None);
        }
        let create = hello.create;
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
        let welcome = Welcome {
            version,
            server: self.state.server_uuid().to_owned(),
            update_seq: info.update_seq,
            user: identity.user.clone(),
            reconnect_token: reconnect.as_ref().map(|issued| issued.token.clone()),
            reconnect_expires_at: reconnect.as_ref().map(|issued| issued.expires_ms),
            max_frame_bytes: Some(self.state.limits.max_request_bytes as u64),
            idle_timeout_ms: Some(
                u64::try_from(self.state.session_idle_timeout().as_millis()).unwrap_or(u64::MAX),
            ),
            server_time_ms: Some(self.state.wall_ms()),
        };
        self.send(&ServerFrame::Welcome(welcome)).await?;
        tracing::debug!(user = ?identity.user, %replica, %db, "sync session opened");

        let mut notifications = self.state.subscribe(&db, info.update_seq);
        // The last sequence announced to a subscribed client, or None when not subscribed.
        let mut announced: Option<u64> = None;
        // After a `changed`, the next one waits for the client's next `changes` request: it is
        // going to read everything up to then anyway, and a client that stopped reading (a
        // backgrounded app) then costs nothing per write, however busy the database.
        let mut armed = true;
        // Requests being answered: the last sequence a `changes` read, and the response.
        let mut in_flight = FuturesUnordered::new();
        loop {
            // A session waiting on its own requests is not idle.
            let idle_timeout = in_flight
                .is_empty()
                .then_some(self.state.session_idle_timeout());
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
                    let (read_changes, response): (Option<u64>, ServerFrame) = (read_changes, response);
                    if let Some(read) = read_changes {
                        armed = true;
                        // What the response carries needs no announcement: announcing it
                        // would wake the client for nothing and disarm the session before the
                        // write that matters.
                        if let Some(last) = announced {
                            announced = Some(last.max(read));
                        }
                    }
                    self.send(&response).await?;
                }
                incoming = self.receive(idle_timeout), if in_flight.len() < MAX_IN_FLIGHT => {
                    match incoming? {
                        // A request the server cannot carry out is an error, not a close.
                        Incoming::Invalid(FrameError::InvalidRequest { id, detail }) => {
                            let response = ServerFrame::Response {
                                id,
                                result: None,
                                error: Some(wire_error(&ApiError::bad_request(detail))),
                            };
                            self.send(&response).await?;
                        }
                        Incoming::Frame(ClientFrame::Request { id, op }) => {
                            let state = self.state.clone();
                            let db = db.clone();
                            in_flight.push(async move { answer(&state, &db, id, op).await });
                        }
                        Incoming::Frame(ClientFrame::Subscribe { since }) => {
                            announced = Some(since);
                            armed = !self.announce(&mut notifications, &mut announced).await?;
                        }
                        Incoming::Frame(ClientFrame::Unsubscribe) => announced = None,
                        Incoming::Frame(ClientFrame::Ping) => self.send(&ServerFrame::Pong).await?,
                        Incoming::Frame(ClientFrame::Hello(_)) => {
                            return self
                                .refuse(ApiError::bad_request("hello was already said"))
                                .await;
                        }
                        other => return self.refuse_incoming(other).await,
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
            self.send(&ServerFrame::Changed { seq: latest }).await?;
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
    auth: HelloAuth,
    replica: &str,
) -> ApiResult<(Identity, Option<IssuedToken>)> {
    if !state.auth().config().required {
        return Ok((Identity::anonymous_admin(), None));
    }
    let replica = replica.to_owned();
    if let Some(token) = auth.reconnect_token {
        let (identity, next) = state
            .authenticate(move |auth| auth.resume(&token, &replica))
            .await?;
        return Ok((identity, Some(next)));
    }
    let identity = if let Some(token) = auth.token {
        state
            .authenticate(move |auth| auth.verify_access_token(&token))
            .await?
    } else if let (Some(name), Some(password)) = (auth.name, auth.password) {
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

/// A close frame's reason: at most 123 bytes (RFC 6455), cut at a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// The response to one request, and the sequence a `changes` read up to.
async fn answer(state: &AppState, db: &str, id: u64, op: Op) -> (Option<u64>, ServerFrame) {
    let reads_changes = matches!(op, Op::Changes { .. });
    let handled = state
        .with_endpoint(db, move |endpoint| handle_request(endpoint, op))
        .await;
    match handled {
        Ok(Answered { result, read_up_to }) => {
            let response = ServerFrame::Response {
                id,
                result: Some(result),
                error: None,
            };
            (read_up_to, response)
        }
        Err(error) => {
            let response = ServerFrame::Response {
                id,
                result: None,
                error: Some(wire_error(&error)),
            };
            (reads_changes.then_some(0), response)
        }
    }
}

/// A request's result, as the text the response carries.
#[derive(Debug)]
pub struct Answered {
    /// The result.
    pub result: RawJson,
    /// For `changes`: the sequence the page read up to.
    pub read_up_to: Option<u64>,
}

fn to_result(result: impl serde::Serialize) -> Answered {
    Answered {
        result: RawJson::of(&result),
        read_up_to: None,
    }
}

/// Carries out one session request on a database's replica endpoint and returns its result
/// (`docs/protocol.md`): the synchronous part of the session, run on a blocking thread. Public
/// so the fuzz targets run exactly what the server runs.
pub fn handle_request(endpoint: &Endpoint<'_>, op: Op) -> ApiResult<Answered> {
    match op {
        Op::GetCheckpoint { checkpoint_id } => {
            let id = non_empty(checkpoint_id)?;
            Ok(to_result(endpoint.checkpoint(&id)?))
        }
        Op::PutCheckpoint {
            checkpoint_id,
            checkpoint,
        } => {
            let id = non_empty(checkpoint_id)?;
            endpoint.put_checkpoint(&id, &checkpoint)?;
            Ok(to_result(json!({})))
        }
        Op::Changes {
            since,
            limit,
            doc_ids,
            selector,
        } => {
            let limit = limit.map_or(usize::MAX, |limit| {
                usize::try_from(limit).unwrap_or(usize::MAX)
            });
            let filter = match (doc_ids, selector) {
                (Some(ids), _) => ChangesFilter::doc_ids(ids),
                (None, Some(selector)) => ChangesFilter::selector(selector)
                    .map_err(|error| ApiError::bad_request(error.to_string()))?,
                (None, None) => ChangesFilter::all(),
            };
            let page = endpoint.changes(since, limit, &filter, false)?;
            let pending = page.pending();
            let results = page
                .changes
                .into_iter()
                .map(|change| ChangesRow {
                    seq: change.seq.into(),
                    // The winner first, then the other leaves, as CouchDB lists them.
                    changes: std::iter::once(change.rev.clone())
                        .chain(
                            change
                                .leaves
                                .into_iter()
                                .map(|leaf| leaf.rev)
                                .filter(|rev| *rev != change.rev),
                        )
                        .map(|rev| RevEntry { rev })
                        .collect(),
                    id: change.doc_id,
                    deleted: change.deleted,
                    doc: None,
                })
                .collect();
            Ok(Answered {
                read_up_to: Some(page.last_seq),
                ..to_result(ChangesResult {
                    results,
                    last_seq: page.last_seq,
                    pending,
                })
            })
        }
        Op::RevsDiff { revs } => {
            let asked: Vec<(String, Vec<Rev>)> = revs.into_iter().collect();
            let missing: BTreeMap<String, Vec<Rev>> = endpoint
                .revs_diff(&asked)?
                .into_iter()
                .map(|(doc_id, diff)| (doc_id, diff.missing))
                .collect();
            Ok(to_result(missing))
        }
        Op::BulkGet { docs, max_bytes } => {
            let wanted: Vec<(String, Rev)> = docs
                .into_iter()
                .map(|wanted| (wanted.id, wanted.rev))
                .collect();
            // A client that bounds its answers gets at most that much, and never more than a
            // frame the server would itself accept.
            let stored = match max_bytes {
                Some(max_bytes) => endpoint.fetch_within(
                    &wanted,
                    usize::try_from(max_bytes)
                        .unwrap_or(usize::MAX)
                        .min(endpoint.limits().max_request_bytes),
                )?,
                None => endpoint.fetch(&wanted)?,
            };
            let mut result = BulkGetResult {
                docs: Vec::new(),
                missing: Vec::new(),
                unserved: Vec::new(),
            };
            let mut stored = stored.into_iter();
            for (id, rev) in wanted {
                match stored.next() {
                    Some(Some(stored)) => result.docs.push(revision_document(&stored, true, true)?),
                    Some(None) => result.missing.push(RevRef { id, rev }),
                    None => result.unserved.push(RevRef { id, rev }),
                }
            }
            Ok(to_result(result))
        }
        Op::BulkDocs { docs } => {
            // A revision that cannot be read is a broken client: refuse the request.
            let revisions = docs
                .into_iter()
                .map(|doc| {
                    revision_from_checked_text(&doc)
                        .map_err(|error| ApiError::bad_request(error.to_string()))
                })
                .collect::<ApiResult<Vec<_>>>()?;
            let outcome = endpoint.write_revisions(revisions)?;
            let acks = outcome
                .acks
                .into_iter()
                .map(|ack| {
                    let refused = ack.refused.map(ApiError::from);
                    Ack {
                        id: ack.doc_id,
                        rev: ack.rev,
                        ok: refused.is_none(),
                        error: refused.as_ref().map(|error| error.error.to_owned()),
                        reason: refused.map(|error| error.reason),
                    }
                })
                .collect();
            Ok(to_result(BulkDocsResult { acks }))
        }
    }
}

fn non_empty(checkpoint_id: String) -> ApiResult<String> {
    if checkpoint_id.is_empty() {
        return Err(ApiError::bad_request(
            "checkpoint_id must be a non-empty string",
        ));
    }
    Ok(checkpoint_id)
}
