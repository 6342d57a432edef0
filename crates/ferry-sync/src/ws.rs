//! A peer on a Ferry server over a WebSocket sync session (`docs/protocol.md`).
//!
//! One connection task owns the socket. Requests from any number of replications (a push and
//! a pull share the session) go to it through a channel with a reply slot; it numbers them,
//! sends them, and routes each response back by id. `changed` notifications update a watch
//! channel that [`Peer::wait_for_changes`] waits on, so live pulls are woken by the server
//! instead of polling. When the socket dies, every waiting request fails with a transient
//! error and the next request opens a new session.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_core::couch::{revision_from_json, revision_into_json};
use ferry_core::model::Revision;
use ferry_core::replicate::Checkpoint;
use ferry_core::rev::Rev;
use futures_util::{SinkExt, StreamExt};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::tls::{TlsOptions, default_client_config, tls_problem};
use crate::wire::{bulk_get_docs, change_rows, parse_rev_list, revs_diff_request};
use crate::{ChangesFilter, ChangesPage, Peer, RejectedRevision, SyncError};

/// The protocol versions this client speaks.
const VERSIONS: &[u64] = &[1];
/// How often the client says it is alive.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A session that receives nothing for this long is considered lost.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a session may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What a [`WsPeer`] presents in `hello`, and where the reconnect tokens the server issues go.
///
/// A client keeps the latest reconnect token and presents it on the next connection, so an
/// interrupted session resumes without asking the user to log in again (`docs/protocol.md`).
pub trait SessionCredentials: Send + Sync {
    /// The `auth` member of the next `hello`: `{"reconnect_token"}`, `{"token"}` (an access
    /// token) or `{"name", "password"}`; `None` to send none.
    fn hello_auth(&self) -> Option<Value>;
    /// The server accepted the session and issued the next reconnect token.
    fn reconnect_token_issued(&self, token: &str, expires_ms: u64);
}

/// The credentials of a URL's `user:password@`, presented as they are.
struct UrlCredentials {
    name: String,
    password: String,
}

impl SessionCredentials for UrlCredentials {
    fn hello_auth(&self) -> Option<Value> {
        Some(json!({"name": self.name, "password": self.password}))
    }

    fn reconnect_token_issued(&self, _token: &str, _expires_ms: u64) {}
}

/// A replication peer on a Ferry server database, over one WebSocket session.
///
/// Built from the database's HTTP URL (`http://host:port/db`); the session goes to
/// `ws://host:port/_ferry/sync` (`wss://` over TLS for an `https://` URL; `ws://` and `wss://`
/// database URLs are taken as they are). [`Peer::describe`] is the same as
/// [`crate::HttpPeer`]'s for the same database, so switching transport keeps the replication's
/// checkpoints. Credentials come from the URL (`http://user:password@host/db`) or from
/// [`WsPeer::with_credentials`]. Which certificates a `wss://` session trusts:
/// [`WsPeer::with_tls`].
pub struct WsPeer {
    session_url: Url,
    tls: Arc<rustls::ClientConfig>,
    database_url: String,
    db: String,
    replica_id: String,
    create: AtomicBool,
    credentials: Option<Arc<dyn SessionCredentials>>,
    heartbeat: Heartbeat,
    connection: Mutex<Option<Arc<Connection>>>,
}

/// How often the client pings, and how long a silent session lives.
#[derive(Clone, Copy, Debug)]
struct Heartbeat {
    interval: Duration,
    silence_timeout: Duration,
}

struct Connection {
    requests: mpsc::Sender<Outgoing>,
    /// The server's latest announced sequence.
    changed: watch::Receiver<u64>,
    subscribed: AtomicBool,
    alive: Arc<AtomicBool>,
}

enum Outgoing {
    Request {
        frame: Map<String, Value>,
        reply: oneshot::Sender<Result<Value, SyncError>>,
    },
    Frame(Value),
}

impl WsPeer {
    /// A peer on the database at `url` (`http://host:port/db`), for the replica `replica_id`.
    pub fn new(url: &str, replica_id: &str) -> Result<WsPeer, SyncError> {
        let mut parsed = Url::parse(url).map_err(|_| SyncError::InvalidUrl(url.to_owned()))?;
        let db = parsed.path().trim_matches('/').to_owned();
        let (scheme, database_scheme) = match parsed.scheme() {
            "http" | "ws" => ("ws", "http"),
            "https" | "wss" => ("wss", "https"),
            _ => return Err(SyncError::InvalidUrl(url.to_owned())),
        };
        // The database is named by its HTTP URL whatever the transport, so that the
        // replication id (and so the checkpoints) stays the same.
        parsed
            .set_scheme(database_scheme)
            .map_err(|()| SyncError::InvalidUrl(url.to_owned()))?;
        if db.is_empty() || db.contains('/') || parsed.host_str().is_none() {
            return Err(SyncError::InvalidUrl(url.to_owned()));
        }
        let mut database_url = parsed;
        let credentials = crate::take_url_credentials(&mut database_url).map(|(name, password)| {
            Arc::new(UrlCredentials { name, password }) as Arc<dyn SessionCredentials>
        });
        let mut session_url = database_url.clone();
        session_url
            .set_scheme(scheme)
            .map_err(|()| SyncError::InvalidUrl(url.to_owned()))?;
        session_url.set_path("/_ferry/sync");
        session_url.set_query(None);
        database_url.set_path(&format!("/{db}/"));
        Ok(WsPeer {
            session_url,
            tls: default_client_config(),
            database_url: database_url.to_string(),
            db,
            replica_id: replica_id.to_owned(),
            create: AtomicBool::new(false),
            credentials,
            heartbeat: Heartbeat {
                interval: PING_INTERVAL,
                silence_timeout: SILENCE_TIMEOUT,
            },
            connection: Mutex::new(None),
        })
    }

    /// Pings every `interval` and treats `silence_timeout` without any frame from the server
    /// as a lost session (defaults: 15 s and 30 s). Shorter values notice a stalled network
    /// sooner at the cost of more traffic.
    #[must_use]
    pub fn with_heartbeat(mut self, interval: Duration, silence_timeout: Duration) -> WsPeer {
        self.heartbeat = Heartbeat {
            interval: interval.max(Duration::from_millis(10)),
            silence_timeout: silence_timeout.max(interval),
        };
        self
    }

    /// Trusts the certificates `tls` names, in addition to the web's authorities, for a
    /// `wss://` session (a server with a self-signed certificate or a private authority).
    pub fn with_tls(mut self, tls: &TlsOptions) -> Result<WsPeer, SyncError> {
        self.tls = tls.client_config()?;
        Ok(self)
    }

    /// Presents `credentials` when opening sessions (instead of the URL's).
    #[must_use]
    pub fn with_credentials(mut self, credentials: Arc<dyn SessionCredentials>) -> WsPeer {
        self.credentials = Some(credentials);
        self
    }

    /// Closes the current session, if any; the next request opens a new one.
    pub async fn disconnect(&self) {
        self.connection.lock().await.take();
    }

    fn lost(&self, detail: impl Into<String>) -> SyncError {
        SyncError::Session {
            url: self.session_url.to_string(),
            detail: detail.into(),
        }
    }

    /// The open session, opening one if there is none or the last one was lost.
    async fn connection(&self) -> Result<Arc<Connection>, SyncError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.alive.load(Ordering::SeqCst)
        {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.open().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn open(&self) -> Result<Connection, SyncError> {
        // Connecting (TCP, TLS, the WebSocket upgrade) runs in a task of its own, which starts
        // at the top of a worker thread's stack. Polled from here it would run below every
        // future of the replication and the client's sync loop, which in unoptimized builds
        // fill most of a 2 MiB stack: rustls' certificate checks overflowed it.
        let url = self.session_url.to_string();
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let connecting = tokio::spawn(tokio::time::timeout(
            OPEN_TIMEOUT,
            // Nagle's algorithm would hold small frames back for tens of milliseconds.
            tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector)),
        ));
        let _abort_if_dropped = AbortOnDrop(connecting.abort_handle());
        let (mut socket, _) = connecting
            .await
            .map_err(|error| self.lost(format!("the connecting task failed: {error}")))?
            .map_err(|_| self.lost("timed out connecting"))?
            .map_err(|error| match tls_problem(&error) {
                Some(problem) => SyncError::Tls {
                    url: self.session_url.to_string(),
                    problem,
                },
                None => self.lost(format!("cannot connect: {error}")),
            })?;
        let mut hello = json!({
            "type": "hello",
            "versions": VERSIONS,
            "db": self.db,
            "create": self.create.load(Ordering::SeqCst),
            "replica_id": self.replica_id,
        });
        if let Some(auth) = self.credentials.as_ref().and_then(|c| c.hello_auth()) {
            hello["auth"] = auth;
        }
        socket
            .send(Message::Text(hello.to_string().into()))
            .await
            .map_err(|error| self.lost(error.to_string()))?;
        let welcome = loop {
            let message = tokio::time::timeout(OPEN_TIMEOUT, socket.next())
                .await
                .map_err(|_| self.lost("no welcome"))?
                .ok_or_else(|| self.lost("closed before welcome"))?
                .map_err(|error| self.lost(error.to_string()))?;
            if let Message::Text(text) = message {
                break serde_json::from_str::<Value>(&text)
                    .map_err(|_| self.lost("the welcome is not JSON"))?;
            }
        };
        if welcome["type"] == "error" {
            return Err(self.refused(&welcome));
        }
        if welcome["type"] != "welcome" {
            return Err(self.lost("expected welcome"));
        }
        if let (Some(credentials), Some(token)) =
            (&self.credentials, welcome["reconnect_token"].as_str())
        {
            let expires_ms = welcome["reconnect_expires_at"].as_u64().unwrap_or(0);
            credentials.reconnect_token_issued(token, expires_ms);
        }
        let (requests, outgoing) = mpsc::channel(64);
        let (changed_sender, changed) = watch::channel(welcome["update_seq"].as_u64().unwrap_or(0));
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(run_connection(
            socket,
            outgoing,
            changed_sender,
            alive.clone(),
            self.session_url.to_string(),
            self.heartbeat,
        ));
        Ok(Connection {
            requests,
            changed,
            subscribed: AtomicBool::new(false),
            alive,
        })
    }

    async fn request(&self, op: &str, mut frame: Map<String, Value>) -> Result<Value, SyncError> {
        let connection = self.connection().await?;
        frame.insert("type".into(), json!("request"));
        frame.insert("op".into(), json!(op));
        let (reply, answer) = oneshot::channel();
        connection
            .requests
            .send(Outgoing::Request { frame, reply })
            .await
            .map_err(|_| self.lost("the session ended"))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .map_err(|_| self.lost(format!("no answer to {op}")))?
            .map_err(|_| self.lost("the session ended"))??;
        if let Some(error) = response.get("error") {
            return Err(self.refused(error));
        }
        Ok(response.get("result").cloned().unwrap_or(Value::Null))
    }

    /// A refusal from the server (`{"error", "reason", "status"}`), typed like an HTTP error
    /// with the status the same failure has over HTTP, which says whether retrying can help.
    fn refused(&self, error: &Value) -> SyncError {
        SyncError::Http {
            url: self.session_url.to_string(),
            status: error["status"]
                .as_u64()
                .and_then(|status| u16::try_from(status).ok())
                .unwrap_or(400),
            error: error["error"].as_str().unwrap_or("error").to_owned(),
            reason: error["reason"].as_str().unwrap_or_default().to_owned(),
        }
    }

    fn invalid(&self, detail: impl Into<String>) -> SyncError {
        SyncError::InvalidResponse {
            url: self.session_url.to_string(),
            detail: detail.into(),
        }
    }
}

/// Aborts a task when dropped, so that a cancelled open does not leave its connecting task
/// behind.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection task: multiplexes requests, routes responses, tracks notifications, pings.
async fn run_connection(
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    mut outgoing: mpsc::Receiver<Outgoing>,
    changed: watch::Sender<u64>,
    alive: Arc<AtomicBool>,
    url: String,
    heartbeat: Heartbeat,
) {
    let (mut sink, mut stream) = socket.split();
    let mut waiting: HashMap<u64, oneshot::Sender<Result<Value, SyncError>>> = HashMap::new();
    let mut next_id = 0u64;
    let mut ping = tokio::time::interval(heartbeat.interval);
    let mut last_heard = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            message = outgoing.recv() => {
                let frame = match message {
                    None => break "the peer was dropped".to_owned(),
                    Some(Outgoing::Frame(frame)) => frame,
                    Some(Outgoing::Request { mut frame, reply }) => {
                        next_id += 1;
                        frame.insert("id".into(), json!(next_id));
                        waiting.insert(next_id, reply);
                        Value::Object(frame)
                    }
                };
                if let Err(error) = sink.send(Message::Text(frame.to_string().into())).await {
                    break error.to_string();
                }
            }
            message = stream.next() => {
                last_heard = tokio::time::Instant::now();
                let text = match message {
                    None => break "closed by the server".to_owned(),
                    Some(Err(error)) => break error.to_string(),
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) => break "closed by the server".to_owned(),
                    Some(Ok(_)) => continue,
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    break "the server sent a frame that is not JSON".to_owned();
                };
                match frame["type"].as_str() {
                    Some("response") => {
                        let reply = frame["id"].as_u64().and_then(|id| waiting.remove(&id));
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(frame));
                        }
                    }
                    Some("changed") => {
                        if let Some(seq) = frame["seq"].as_u64() {
                            changed.send_if_modified(|latest| {
                                let newer = seq > *latest;
                                *latest = (*latest).max(seq);
                                newer
                            });
                        }
                    }
                    Some("error") => break format!("server error: {}", frame["reason"]),
                    _ => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > heartbeat.silence_timeout {
                    break "the server went silent".to_owned();
                }
                let frame = json!({"type": "ping"}).to_string();
                if let Err(error) = sink.send(Message::Text(frame.into())).await {
                    break error.to_string();
                }
            }
        }
    };
    alive.store(false, Ordering::SeqCst);
    tracing::debug!(%reason, "sync session closed");
    for (_, reply) in waiting {
        let _ = reply.send(Err(SyncError::Session {
            url: url.clone(),
            detail: reason.clone(),
        }));
    }
    // Wake live waits so they notice the session is gone.
    drop(changed);
}

impl Peer for WsPeer {
    fn describe(&self) -> String {
        self.database_url.clone()
    }

    async fn prepare(&self, create: bool) -> Result<(), SyncError> {
        if create {
            self.create.store(true, Ordering::SeqCst);
        }
        self.connection().await.map(|_| ())
    }

    async fn get_checkpoint(&self, replication_id: &str) -> Result<Option<Checkpoint>, SyncError> {
        let mut frame = Map::new();
        frame.insert("checkpoint_id".into(), json!(replication_id));
        let result = self.request("get_checkpoint", frame).await?;
        Ok(serde_json::from_value(result).ok())
    }

    async fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        let mut frame = Map::new();
        frame.insert("checkpoint_id".into(), json!(replication_id));
        frame.insert(
            "checkpoint".into(),
            serde_json::to_value(checkpoint).expect("checkpoints serialize"),
        );
        self.request("put_checkpoint", frame).await.map(|_| ())
    }

    async fn changes(
        &self,
        since: &Value,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        let mut frame = Map::new();
        frame.insert("since".into(), json!(crate::seq_number(since)?));
        frame.insert("limit".into(), json!(limit));
        if let Some(doc_ids) = &filter.doc_ids {
            frame.insert("doc_ids".into(), json!(doc_ids));
        } else if let Some((selector, _)) = &filter.selector {
            frame.insert("selector".into(), selector.clone());
        }
        let result = self.request("changes", frame).await?;
        let rows = change_rows(&result["results"]).map_err(|detail| self.invalid(detail))?;
        Ok(ChangesPage {
            rows,
            last_seq: result["last_seq"].clone(),
            pending: result["pending"].as_u64(),
        })
    }

    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        let mut frame = Map::new();
        frame.insert("revs".into(), revs_diff_request(&revs));
        let result = self.request("revs_diff", frame).await?;
        let Value::Object(missing) = result else {
            return Err(self.invalid("revs_diff result is not an object"));
        };
        missing
            .into_iter()
            .map(|(doc_id, revs)| {
                let revs =
                    parse_rev_list(&revs).ok_or_else(|| self.invalid("invalid revisions"))?;
                Ok((doc_id, revs))
            })
            .collect()
    }

    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        let mut frame = Map::new();
        frame.insert("docs".into(), Value::Array(bulk_get_docs(&wanted)));
        let result = self.request("bulk_get", frame).await?;
        for missing in result["missing"].as_array().into_iter().flatten() {
            tracing::warn!(%missing, "revision not available on the server; skipped");
        }
        result["docs"]
            .as_array()
            .ok_or_else(|| self.invalid("bulk_get without docs"))?
            .iter()
            .map(|doc| {
                revision_from_json(doc.clone()).map_err(|error| self.invalid(error.to_string()))
            })
            .collect()
    }

    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        let sent: Vec<(String, Rev)> = revisions
            .iter()
            .map(|revision| (revision.doc_id.clone(), revision.rev().clone()))
            .collect();
        let docs: Vec<Value> = revisions
            .into_iter()
            .map(|revision| revision_into_json(revision, true))
            .collect();
        let mut frame = Map::new();
        frame.insert("docs".into(), Value::Array(docs));
        let result = self.request("bulk_docs", frame).await?;
        let acks = result["acks"]
            .as_array()
            .ok_or_else(|| self.invalid("bulk_docs without acks"))?;
        // One answer per revision sent, in order: stored, or refused with a reason.
        if acks.len() != sent.len() {
            return Err(self.invalid("the server did not answer for every revision"));
        }
        let mut rejected = Vec::new();
        for (ack, (doc_id, rev)) in acks.iter().zip(sent) {
            if ack["id"] != json!(doc_id) || ack["rev"] != json!(rev.to_string()) {
                return Err(self.invalid("acknowledgements out of order"));
            }
            if ack["ok"] == json!(true) {
                continue;
            }
            rejected.push(RejectedRevision {
                doc_id,
                rev,
                error: ack["error"].as_str().unwrap_or("unknown").to_owned(),
                reason: ack["reason"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(rejected)
    }

    async fn wait_for_changes(&self, since: &Value, timeout: Duration) -> Result<bool, SyncError> {
        let since = crate::seq_number(since)?;
        let connection = self.connection().await?;
        if !connection.subscribed.swap(true, Ordering::SeqCst) {
            connection
                .requests
                .send(Outgoing::Frame(
                    json!({"type": "subscribe", "since": since}),
                ))
                .await
                .map_err(|_| self.lost("the session ended"))?;
        }
        let mut changed = connection.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if *changed.borrow_and_update() > since {
                return Ok(true);
            }
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return Err(self.lost("the session ended"));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(false),
            }
        }
    }
}
