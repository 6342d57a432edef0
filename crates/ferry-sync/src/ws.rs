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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_core::json::RawJson;
use ferry_core::model::Revision;
use ferry_core::protocol::{
    BulkDocsResult, BulkGetResult, ChangesResult, ClientFrame, Hello, HelloAuth, Op, ServerFrame,
    VERSIONS, WireError, result_as,
};
use ferry_core::replicate::{Checkpoint, Seq};
use ferry_core::rev::Rev;
use futures_util::{SinkExt, StreamExt};
use reqwest::Url;
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::tls::{TlsOptions, default_client_config, tls_problem};
use crate::{ChangesFilter, ChangesPage, Peer, RejectedRevision, ServerTime, SyncError, session};

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
    /// The `auth` member of the next `hello`: a reconnect token, an access token, or a name
    /// and password; `None` to send none.
    fn hello_auth(&self) -> Option<HelloAuth>;
    /// The server accepted the session and issued the next reconnect token.
    fn reconnect_token_issued(&self, token: &str, expires_ms: u64);
}

/// The credentials of a URL's `user:password@`, presented as they are.
struct UrlCredentials {
    name: String,
    password: String,
}

impl SessionCredentials for UrlCredentials {
    fn hello_auth(&self) -> Option<HelloAuth> {
        Some(HelloAuth {
            name: Some(self.name.clone()),
            password: Some(self.password.clone()),
            ..HelloAuth::default()
        })
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
    /// The largest frame the server takes, from its last `welcome` (0: not known).
    max_frame_bytes: AtomicU64,
    /// The server's clock in its last `welcome`.
    server_time: ServerTime,
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

/// What a request came back with: its result, or the server's refusal.
type Answer = Result<Result<RawJson, WireError>, SyncError>;

enum Outgoing {
    Request {
        op: Op,
        reply: oneshot::Sender<Answer>,
    },
    Frame(ClientFrame),
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
            max_frame_bytes: AtomicU64::new(0),
            server_time: ServerTime::default(),
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
        let hello = ClientFrame::Hello(Hello {
            versions: VERSIONS.to_vec(),
            db: self.db.clone(),
            create: self.create.load(Ordering::SeqCst),
            replica_id: self.replica_id.clone(),
            auth: self.credentials.as_ref().and_then(|c| c.hello_auth()),
        });
        socket
            .send(Message::Text(hello.encode().into()))
            .await
            .map_err(|error| self.lost(error.to_string()))?;
        let answer = loop {
            let message = tokio::time::timeout(OPEN_TIMEOUT, socket.next())
                .await
                .map_err(|_| self.lost("no welcome"))?
                .ok_or_else(|| self.lost("closed before welcome"))?
                .map_err(|error| self.lost(error.to_string()))?;
            if let Message::Text(text) = message {
                break ServerFrame::decode(text.as_bytes())
                    .map_err(|error| self.lost(format!("instead of a welcome: {error}")))?;
            }
        };
        let welcome = match answer {
            ServerFrame::Welcome(welcome) => welcome,
            ServerFrame::Error(error) => return Err(self.refused(&error)),
            _ => return Err(self.lost("expected welcome")),
        };
        if let (Some(credentials), Some(token)) = (&self.credentials, &welcome.reconnect_token) {
            let expires_ms = welcome.reconnect_expires_at.unwrap_or(0);
            credentials.reconnect_token_issued(token, expires_ms);
        }
        self.max_frame_bytes
            .store(welcome.max_frame_bytes.unwrap_or(0), Ordering::SeqCst);
        if let Some(server_ms) = welcome.server_time_ms {
            self.server_time.record(server_ms);
        }
        // Ping well within the server's idle timeout, whatever this client was set to.
        let mut heartbeat = self.heartbeat;
        if let Some(idle_ms) = welcome.idle_timeout_ms {
            heartbeat.interval = heartbeat
                .interval
                .min(Duration::from_millis(idle_ms / 3))
                .max(Duration::from_millis(10));
            heartbeat.silence_timeout = heartbeat.silence_timeout.max(heartbeat.interval);
        }
        let (requests, outgoing) = mpsc::channel(64);
        let (changed_sender, changed) = watch::channel(welcome.update_seq);
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(run_connection(
            socket,
            outgoing,
            changed_sender,
            alive.clone(),
            self.session_url.to_string(),
            heartbeat,
        ));
        Ok(Connection {
            requests,
            changed,
            subscribed: AtomicBool::new(false),
            alive,
        })
    }

    /// Sends one request and returns its result as the type its op answers with.
    async fn request<T: serde::de::DeserializeOwned>(&self, op: Op) -> Result<T, SyncError> {
        let name = op.name();
        let connection = self.connection().await?;
        let (reply, answer) = oneshot::channel();
        connection
            .requests
            .send(Outgoing::Request { op, reply })
            .await
            .map_err(|_| self.lost("the session ended"))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, answer)
            .await
            .map_err(|_| self.lost(format!("no answer to {name}")))?
            .map_err(|_| self.lost("the session ended"))??;
        let result = response.map_err(|error| self.refused(&error))?;
        result_as(name, &result).map_err(|error| self.invalid(error.to_string()))
    }

    /// A refusal from the server, typed like an HTTP error with the status the same failure
    /// has over HTTP, which says whether retrying can help.
    fn refused(&self, error: &WireError) -> SyncError {
        SyncError::Http {
            url: self.session_url.to_string(),
            status: error.status,
            error: error.error.clone(),
            reason: error.reason.clone(),
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
    let mut waiting: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
    let mut next_id = 0u64;
    let mut ping = tokio::time::interval(heartbeat.interval);
    let mut last_heard = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            message = outgoing.recv() => {
                let frame = match message {
                    None => break "the peer was dropped".to_owned(),
                    Some(Outgoing::Frame(frame)) => frame,
                    Some(Outgoing::Request { op, reply }) => {
                        next_id += 1;
                        waiting.insert(next_id, reply);
                        ClientFrame::Request { id: next_id, op }
                    }
                };
                if let Err(error) = sink.send(Message::Text(frame.encode().into())).await {
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
                let frame = match ServerFrame::decode(text.as_bytes()) {
                    Ok(frame) => frame,
                    Err(error) => break format!("the server sent an invalid frame: {error}"),
                };
                match frame {
                    ServerFrame::Response { id, result, error } => {
                        if let Some(reply) = waiting.remove(&id) {
                            let answer = match error {
                                Some(error) => Err(error),
                                None => Ok(result.unwrap_or_else(|| RawJson::of(&()))),
                            };
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    ServerFrame::Changed { seq } => {
                        changed.send_if_modified(|latest| {
                            let newer = seq > *latest;
                            *latest = (*latest).max(seq);
                            newer
                        });
                    }
                    ServerFrame::Error(error) => break format!("server error: {}", error.reason),
                    ServerFrame::Welcome(_) | ServerFrame::Pong => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > heartbeat.silence_timeout {
                    break "the server went silent".to_owned();
                }
                let frame = ClientFrame::Ping.encode();
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

    fn server_time_ms(&self) -> Option<u64> {
        self.server_time.now_ms()
    }

    fn max_request_bytes(&self) -> Option<usize> {
        match self.max_frame_bytes.load(Ordering::SeqCst) {
            0 => None,
            bytes => Some(usize::try_from(bytes).unwrap_or(usize::MAX)),
        }
    }

    async fn get_checkpoint(&self, replication_id: &str) -> Result<Option<Checkpoint>, SyncError> {
        // A checkpoint this client cannot read only costs a fuller comparison.
        let checkpoint: Value = self
            .request(Op::GetCheckpoint {
                checkpoint_id: replication_id.to_owned(),
            })
            .await?;
        Ok(serde_json::from_value(checkpoint).ok())
    }

    async fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        let _: Value = self
            .request(Op::PutCheckpoint {
                checkpoint_id: replication_id.to_owned(),
                checkpoint: checkpoint.clone(),
            })
            .await?;
        Ok(())
    }

    async fn changes(
        &self,
        since: &Seq,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        let op = session::changes_op(crate::seq_number(since)?, limit, filter);
        let result: ChangesResult = self.request(op).await?;
        Ok(session::changes_page(result))
    }

    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        let missing: std::collections::BTreeMap<String, Vec<Rev>> = self
            .request(Op::RevsDiff {
                revs: revs.into_iter().collect(),
            })
            .await?;
        Ok(missing.into_iter().collect())
    }

    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        let mut docs = session::wanted_refs(wanted);
        let mut revisions = Vec::new();
        // Answers are bounded by bytes, so a batch of large documents comes in several; each
        // answers at least one revision, so this ends.
        while !docs.is_empty() {
            let asked = docs.len();
            let result: BulkGetResult = self.request(session::bulk_get_op(docs)).await?;
            let (fetched, unserved) =
                session::fetched(result, asked).map_err(|detail| self.invalid(detail))?;
            revisions.extend(fetched);
            docs = unserved;
        }
        Ok(revisions)
    }

    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        let (op, sent) = session::bulk_docs_op(&revisions);
        let result: BulkDocsResult = self.request(op).await?;
        session::refused(result, sent).map_err(|detail| self.invalid(detail))
    }

    async fn wait_for_changes(&self, since: &Seq, timeout: Duration) -> Result<bool, SyncError> {
        let since = crate::seq_number(since)?;
        let connection = self.connection().await?;
        if !connection.subscribed.swap(true, Ordering::SeqCst) {
            connection
                .requests
                .send(Outgoing::Frame(ClientFrame::Subscribe { since }))
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
