//! The sync connection: credentials, reconnect tokens, the connection state machine, and the
//! background loop that keeps a replica in sync with a server.
//!
//! One loop per replica ([`Ferry::start_sync`]) opens a WebSocket session, pushes then pulls
//! continuously over it, and when the session breaks goes through the states of
//! [`ConnectionState`]: `Interrupted`, then `Reconnecting` after an exponential backoff with
//! jitter, then `Connected` again, resuming from the checkpoints on both sides. Local writes
//! never wait for any of this.
//!
//! Authentication: the first session presents the application's [`Credentials`]; the server
//! answers with a reconnect token, kept in the replica (a local document), and every later
//! session presents that token instead, getting the next one back. When a reconnect token is
//! refused (expired, revoked) the loop falls back to the credentials; when those are refused
//! too, it asks the application's [`SyncOptions::on_authentication_failure`] callback. The outbox
//! is never touched by any of this: pending writes wait for a session that is accepted.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::connection::{Command, Connection, Event, FailureKind, Jitter};
pub use ferry_core::connection::{ConnectionState, ReconnectPolicy};
use ferry_core::protocol::HelloAuth;
use ferry_store::Replica;
use ferry_store::clock::ReplicaClock;
use ferry_sync::{
    LocalPeer, Peer, ReplicationOptions, SessionCredentials, SyncError, TlsOptions, WsPeer,
};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use crate::{ClientError, Ferry};

/// How a replica authenticates to the server.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// A user name and password (checked by the server with argon2; sent only inside the
    /// session's `hello`).
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// An access token from `POST /_ferry/login`.
    AccessToken(String),
}

impl Credentials {
    /// A user name and password.
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::Password {
            user: user.into(),
            password: password.into(),
        }
    }

    fn hello_auth(&self) -> HelloAuth {
        match self {
            Credentials::Password { user, password } => HelloAuth {
                name: Some(user.clone()),
                password: Some(password.clone()),
                ..HelloAuth::default()
            },
            Credentials::AccessToken(token) => HelloAuth {
                token: Some(token.clone()),
                ..HelloAuth::default()
            },
        }
    }
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { user, .. } => write!(f, "Password {{ user: {user:?}, .. }}"),
            Credentials::AccessToken(_) => write!(f, "AccessToken(..)"),
        }
    }
}

/// Why the server refused to authenticate the replica; given to the fallback callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticationFailure {
    /// The server's reason.
    pub reason: String,
    /// How many times in a row authentication failed.
    pub attempts: u32,
}

type FallbackFuture = Pin<Box<dyn Future<Output = Option<Credentials>> + Send>>;
type Fallback = Arc<dyn Fn(AuthenticationFailure) -> FallbackFuture + Send + Sync>;

/// Where and how to sync.
///
/// ```
/// use ferry_client::{Credentials, SyncOptions};
/// let options = SyncOptions::new("http://127.0.0.1:5984/notes")
///     .credentials(Credentials::password("ann", "a long password"))
///     .on_authentication_failure(|failure| async move {
///         eprintln!("login needed: {}", failure.reason);
///         None // or Some(credentials asked from the user)
///     });
/// ```
#[derive(Clone)]
pub struct SyncOptions {
    url: String,
    credentials: Option<Credentials>,
    fallback: Option<Fallback>,
    reconnect: ReconnectPolicy,
    batch_size: usize,
    max_write_bytes: usize,
    heartbeat: Option<(Duration, Duration)>,
    only_subscribed: bool,
    ca_file: Option<PathBuf>,
}

impl SyncOptions {
    /// Sync with the server database at `url` (`http://host:port/db`; the session itself runs
    /// over a WebSocket on the same host, over TLS for `https://host:port/db`).
    pub fn new(url: impl Into<String>) -> SyncOptions {
        SyncOptions {
            url: url.into(),
            credentials: None,
            fallback: None,
            reconnect: ReconnectPolicy::default(),
            batch_size: DEFAULT_BATCH_SIZE,
            max_write_bytes: ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES,
            heartbeat: None,
            only_subscribed: false,
            ca_file: None,
        }
    }

    /// Authenticate with these credentials (until a reconnect token replaces them).
    #[must_use]
    pub fn credentials(mut self, credentials: Credentials) -> SyncOptions {
        self.credentials = Some(credentials);
        self
    }

    /// Called when the server refuses both the reconnect token and the credentials; return
    /// new credentials to retry with, or `None` to stay in
    /// [`ConnectionState::AuthenticationFailed`] (pending writes are kept).
    #[must_use]
    pub fn on_authentication_failure<F, Fut>(mut self, callback: F) -> SyncOptions
    where
        F: Fn(AuthenticationFailure) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Credentials>> + Send + 'static,
    {
        self.fallback = Some(Arc::new(move |failure| Box::pin(callback(failure))));
        self
    }

    /// How the loop reconnects.
    #[must_use]
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> SyncOptions {
        self.reconnect = policy;
        self
    }

    /// Changes per batch (default 500; memory is bounded by it).
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> SyncOptions {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The most bytes one write of a batch carries (default 4 MiB): a batch of large
    /// documents goes in several writes, each under the server's request limit, so any
    /// document within the document limit syncs. Keep it below the server's
    /// `--max-request-bytes`.
    ///
    /// ```
    /// let options = ferry_client::SyncOptions::new("ws://127.0.0.1:4984/todos")
    ///     .max_write_bytes(1024 * 1024);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn max_write_bytes(mut self, bytes: usize) -> SyncOptions {
        self.max_write_bytes = bytes;
        self
    }

    /// Pings the server every `interval`, and treats `silence_timeout` without hearing from it
    /// as an interruption (defaults: 15 s and 30 s). A stalled network (packets silently
    /// dropped) is noticed only this way.
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration, silence_timeout: Duration) -> SyncOptions {
        self.heartbeat = Some((interval, silence_timeout));
        self
    }

    /// Pull only what the replica's offline subscriptions match
    /// ([`Ferry::subscribe_offline`]) instead of mirroring the whole server database. Local
    /// changes are pushed either way.
    #[must_use]
    pub fn only_subscribed(mut self) -> SyncOptions {
        self.only_subscribed = true;
        self
    }

    /// Trust the certificate authority (or the self-signed certificate) in the PEM file at
    /// `path` for an `https://` server, in addition to the web's authorities: for servers
    /// whose certificate a private authority issued. The file is read when syncing starts
    /// ([`Ferry::start_sync`] and [`Ferry::sync_once`] fail if it is unreadable or holds no
    /// certificate). A certificate that is still not trusted shows as
    /// [`ConnectionState::Disconnected`] with a reason that says so.
    #[must_use]
    pub fn trust_ca_file(mut self, path: impl Into<PathBuf>) -> SyncOptions {
        self.ca_file = Some(path.into());
        self
    }

    /// The server database URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The connection state shared by a replica's handles.
pub(crate) struct ConnectionShared {
    state: watch::Sender<ConnectionState>,
    events: broadcast::Sender<ConnectionState>,
    online: watch::Sender<bool>,
    /// Whether a sync started by this handle's replica runs (one at a time).
    syncing: std::sync::atomic::AtomicBool,
}

impl ConnectionShared {
    pub(crate) fn new() -> ConnectionShared {
        ConnectionShared {
            state: watch::channel(ConnectionState::Offline).0,
            events: broadcast::channel(256).0,
            online: watch::channel(true).0,
            syncing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn set(&self, state: ConnectionState) {
        let changed = self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state.clone();
            changed
        });
        if changed {
            tracing::debug!(?state, "connection state");
            let _ = self.events.send(state);
        }
    }
}

/// Changes per batch by default: five times CouchDB's 100, since each batch costs a few disk
/// flushes on each side (measured in BENCHMARKS.md); a batch of typical documents stays well
/// under a megabyte.
const DEFAULT_BATCH_SIZE: usize = 500;

/// How often a process waiting for another one's sync loop checks whether it may take over.
const LEADER_POLL: Duration = Duration::from_millis(250);

/// The key of the local document holding the latest reconnect token.
const RECONNECT_TOKEN_DOC: &str = "ferry-reconnect-token";

/// Credentials as the sync loop tracks them: the application's, the latest reconnect token,
/// and which of the two the last `hello` presented.
struct ClientAuth {
    db: Arc<dyn Replica>,
    /// Reconnect tokens expire by it.
    clock: Arc<ReplicaClock>,
    /// Tokens are per server: the session URL they were issued for.
    server: String,
    state: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    credentials: Option<Credentials>,
    reconnect: Option<(String, u64)>,
    presented_reconnect_token: bool,
}

impl ClientAuth {
    fn new(
        db: Arc<dyn Replica>,
        clock: Arc<ReplicaClock>,
        server: String,
        credentials: Option<Credentials>,
    ) -> ClientAuth {
        let reconnect = db
            .get_local(RECONNECT_TOKEN_DOC)
            .ok()
            .flatten()
            .filter(|doc| doc.body.get("server").and_then(Value::as_str) == Some(server.as_str()))
            .and_then(|doc| {
                let token = doc.body.get("token")?.as_str()?.to_owned();
                let expires = doc.body.get("expires_at")?.as_u64()?;
                Some((token, expires))
            });
        ClientAuth {
            db,
            clock,
            server,
            state: Mutex::new(AuthState {
                credentials,
                reconnect,
                presented_reconnect_token: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist(&self, reconnect: Option<&(String, u64)>) {
        let body = reconnect.map(|(token, expires)| {
            json!({"server": self.server, "token": token, "expires_at": expires})
                .as_object()
                .cloned()
                .unwrap_or_default()
        });
        let current = self.db.get_local(RECONNECT_TOKEN_DOC).ok().flatten();
        if current.is_none() && body.is_none() {
            return;
        }
        if let Err(error) = self
            .db
            .put_local(RECONNECT_TOKEN_DOC, current.map(|doc| doc.rev), body)
        {
            tracing::warn!(%error, "could not keep the reconnect token");
        }
    }

    /// The server refused what the last `hello` presented. Returns whether something else is
    /// left to try before asking the application.
    fn rejected(&self) -> bool {
        let mut state = self.state();
        if state.presented_reconnect_token {
            state.reconnect = None;
            state.presented_reconnect_token = false;
            drop(state);
            self.persist(None);
            return true;
        }
        false
    }

    fn set_credentials(&self, credentials: Credentials) {
        self.state().credentials = Some(credentials);
    }
}

impl SessionCredentials for ClientAuth {
    fn hello_auth(&self) -> Option<HelloAuth> {
        let mut state = self.state();
        // The replica's wall clock, corrected by the last re-base: the token's expiry is the
        // server's time.
        let now = self.clock.wall_ms();
        if let Some((token, expires)) = &state.reconnect
            && *expires > now
        {
            let auth = HelloAuth {
                reconnect_token: Some(token.clone()),
                ..HelloAuth::default()
            };
            state.presented_reconnect_token = true;
            return Some(auth);
        }
        state.presented_reconnect_token = false;
        state.credentials.as_ref().map(Credentials::hello_auth)
    }

    fn reconnect_token_issued(&self, token: &str, expires_ms: u64) {
        let reconnect = (token.to_owned(), expires_ms);
        self.persist(Some(&reconnect));
        self.state().reconnect = Some(reconnect);
    }
}

/// A background sync started by [`Ferry::start_sync`]; dropping it stops the sync.
pub struct SyncHandle {
    task: tokio::task::JoinHandle<()>,
    connection: Arc<ConnectionShared>,
}

impl SyncHandle {
    /// Stops syncing. Local changes made meanwhile stay pending until the next sync.
    pub fn stop(self) {}
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.connection.set(ConnectionState::Offline);
        self.connection
            .syncing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A session accepted by the server, and what its pull carries.
struct OpenSession {
    pull_filter: PullFilter,
    /// The offline subscriptions' revision the filter was made from, when the pull follows
    /// them.
    subscriptions_rev: Option<u64>,
}

/// What the pull carries.
enum PullFilter {
    /// Nothing: only subscriptions are pulled, and there are none.
    Nothing,
    /// These changes.
    Filter(ferry_sync::ChangesFilter),
}

/// How often a syncing process looks for subscription changes made by other processes.
const SUBSCRIPTIONS_POLL: Duration = Duration::from_millis(500);

impl Ferry {
    /// The connection's current state.
    pub fn connection_state(&self) -> ConnectionState {
        self.inner.connection.state.borrow().clone()
    }

    /// Every change of the connection state from now on, as a stream. A subscriber that falls
    /// more than 256 events behind skips the oldest ones.
    ///
    /// ```no_run
    /// # async fn run(ferry: ferry_client::Ferry) {
    /// use futures_util::StreamExt;
    /// let mut events = std::pin::pin!(ferry.connection_events());
    /// while let Some(state) = events.next().await {
    ///     println!("sync: {state:?}");
    /// }
    /// # }
    /// ```
    pub fn connection_events(&self) -> impl Stream<Item = ConnectionState> + Send + 'static {
        crate::broadcast_stream(self.inner.connection.events.subscribe())
    }

    /// Switches syncing on (`true`, the default) or off. Off closes the session at once and
    /// keeps it closed; local reads and writes go on. Switching on again reconnects
    /// immediately, also after [`ConnectionState::Disconnected`] or
    /// [`ConnectionState::AuthenticationFailed`].
    pub fn set_online(&self, online: bool) {
        // A toggle must always wake the loop, even when the value does not change.
        self.inner
            .connection
            .online
            .send_modify(|value| *value = online);
    }

    /// Whether the application wants the replica online.
    pub fn is_online(&self) -> bool {
        *self.inner.connection.online.borrow()
    }

    /// Pushes local changes to the server, then pulls remote ones, once, over a WebSocket
    /// session. Each pushed batch acknowledges the local changes it carried as soon as the
    /// server committed it.
    pub async fn sync_once(
        &self,
        options: &SyncOptions,
    ) -> Result<ferry_sync::SyncStats, ClientError> {
        let local = self.local_peer()?;
        let (remote, _) = self.session_peer(options)?;
        remote.prepare(true).await?;
        self.rebase_clock(&remote).await?;
        let replication = ReplicationOptions {
            create_target: true,
            batch_size: options.batch_size,
            max_write_bytes: options.max_write_bytes,
            ..ReplicationOptions::default()
        };
        let pull_filter = self.pull_filter(options)?;
        let push = self.push(&local, &remote, &replication, |_| {}).await?;
        let pull = self
            .pull(&local, &remote, &replication, &pull_filter)
            .await?;
        Ok(ferry_sync::SyncStats { push, pull })
    }

    /// Re-bases the replica's clock on the server's time (from the session's welcome, or an
    /// HTTP server's `Date`) and gives the waiting edits it stamped too far ahead for the
    /// server new clocks, before anything is pushed: a device whose clock is far off would
    /// otherwise have every edit refused as `clock_ahead`. The correction lasts while the replica is open; after it is opened again,
    /// the next session corrects edits made meanwhile.
    async fn rebase_clock(&self, remote: &impl Peer) -> Result<(), SyncError> {
        let Some(server_ms) = remote.server_time_ms() else {
            return Ok(());
        };
        let ferry = self.clone();
        tokio::task::spawn_blocking(move || {
            let clock = &ferry.inner.clock;
            let correction_ms = clock.rebase(server_ms);
            let restamped = ferry
                .inner
                .db
                .restamp_outbox(clock.far_ahead(), &mut || clock.now())?;
            if correction_ms != 0 || restamped > 0 {
                tracing::warn!(
                    correction_ms,
                    restamped,
                    "this device's clock is off: the replica's clock follows the server's"
                );
            }
            if restamped > 0 {
                ferry.notify_changed();
            }
            Ok::<(), ferry_store::StoreError>(())
        })
        .await
        .map_err(|error| SyncError::Task(error.to_string()))?
        .map_err(SyncError::Store)
    }

    /// Pushes this replica's changes to `remote`, any replication peer (an
    /// [`HttpPeer`](crate::HttpPeer) on a Ferry or CouchDB server, a [`WsPeer`]...), until
    /// caught up or, with `options.continuous`, for as long as it runs. Each batch the target
    /// commits is acknowledged in the outbox, and a revision it refuses marks its document
    /// rejected, as [`Ferry::sync_once`] does over its session; `progress` is told after each
    /// batch. The replica's clock is first re-based on the remote's, when it tells its time.
    /// For other transports and tools (the `ferry` command syncs over HTTP with it).
    ///
    /// ```no_run
    /// # async fn run(ferry: ferry_client::Ferry) -> Result<(), Box<dyn std::error::Error>> {
    /// use ferry_client::{HttpPeer, ReplicationOptions};
    /// let server = HttpPeer::new("http://127.0.0.1:5984/notes")?;
    /// let options = ReplicationOptions { create_target: true, ..Default::default() };
    /// let pushed = ferry.push_to(&server, &options, |_| {}).await?;
    /// let pulled = ferry.pull_from(&server, &options, |_| {}).await?;
    /// println!("{} up, {} down", pushed.docs_written, pulled.docs_written);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push_to(
        &self,
        remote: &impl Peer,
        options: &ReplicationOptions,
        progress: impl FnMut(&crate::Stats) + Send,
    ) -> Result<crate::Stats, ClientError> {
        let local = self.local_peer()?;
        remote.prepare(options.create_target).await?;
        self.rebase_clock(remote).await?;
        Ok(self.push(&local, remote, options, progress).await?)
    }

    /// Pulls `remote`'s changes (those `options.filter` selects) into this replica, until
    /// caught up or, with `options.continuous`, for as long as it runs: the counterpart of
    /// [`Ferry::push_to`]. Pulled conflicts are resolved by the collections' policies and
    /// watchers are woken, as with every pull.
    pub async fn pull_from(
        &self,
        remote: &impl Peer,
        options: &ReplicationOptions,
        progress: impl FnMut(&crate::Stats) + Send,
    ) -> Result<crate::Stats, ClientError> {
        let local = self.local_peer()?;
        let stats = ferry_sync::replicate(remote, &local, options, progress).await?;
        self.notify_changed();
        Ok(stats)
    }

    /// Replicates local changes to `remote`, acknowledging each batch it commits.
    async fn push(
        &self,
        local: &LocalPeer,
        remote: &impl Peer,
        replication: &ReplicationOptions,
        mut progress: impl FnMut(&ferry_sync::Stats) + Send,
    ) -> Result<ferry_core::replicate::Stats, SyncError> {
        let stats = ferry_sync::replicate_reporting(
            local,
            remote,
            replication,
            |stats| {
                self.acknowledge(&stats.last_seq);
                progress(stats);
            },
            |rejected| self.reject(rejected),
        )
        .await?;
        self.acknowledge(&stats.last_seq);
        Ok(stats)
    }

    /// Marks a document the server refused as rejected in the outbox, unless it was edited
    /// again since the refused revision was read (the new edit deserves its own try).
    fn reject(&self, rejected: &ferry_sync::RejectedRevision) {
        let db = &self.inner.db;
        let current = db.get_document(&rejected.doc_id).ok().flatten();
        if current.is_some_and(|document| document.rev == rejected.rev) {
            let reason = format!("{}: {}", rejected.error, rejected.reason);
            match db.reject(&rejected.doc_id, &reason) {
                Ok(()) => self.notify_changed(),
                Err(error) => tracing::warn!(%error, "could not record a rejection"),
            }
        }
    }

    /// Replicates what `filter` selects from the server, waking watchers after each batch.
    async fn pull(
        &self,
        local: &LocalPeer,
        remote: &WsPeer,
        replication: &ReplicationOptions,
        filter: &PullFilter,
    ) -> Result<ferry_core::replicate::Stats, SyncError> {
        let stats = match filter {
            // Nothing to pull until the subscriptions change (which ends the session).
            PullFilter::Nothing if replication.continuous => std::future::pending().await,
            PullFilter::Nothing => ferry_core::replicate::Stats::default(),
            PullFilter::Filter(filter) => {
                let replication = ReplicationOptions {
                    filter: filter.clone(),
                    ..replication.clone()
                };
                // Each stored batch resolves its conflicts and wakes the watchers itself (the
                // replica's endpoint, on a blocking thread).
                ferry_sync::replicate(remote, local, &replication, |_| {}).await?
            }
        };
        self.notify_changed();
        Ok(stats)
    }

    /// Syncs with the server continuously in both directions, in the background, until the
    /// returned handle is dropped. Interruptions are retried as [`SyncOptions::reconnect`]
    /// says; watch [`Ferry::connection_events`] to follow them. Local writes keep working
    /// whatever the connection does.
    ///
    /// Must be called inside a tokio runtime (the sync runs as a task on it); outside one it
    /// fails with [`ClientError::NoRuntime`].
    pub fn start_sync(&self, options: SyncOptions) -> Result<SyncHandle, ClientError> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(ClientError::NoRuntime);
        };
        // Fail now, not in the background, on a URL or replica that can never work.
        let local = self.local_peer()?.with_wakeup(self.subscribe());
        let (remote, auth) = self.session_peer(&options)?;
        if self
            .inner
            .connection
            .syncing
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ClientError::AlreadySyncing);
        }
        let ferry = self.clone();
        let task = runtime.spawn(async move {
            // Held until the task ends (or the process dies, when the OS releases it).
            let _leadership = ferry.become_sync_leader().await;
            ferry.sync_loop(options, local, remote, auth).await;
        });
        Ok(SyncHandle {
            task,
            connection: self.inner.connection.clone(),
        })
    }

    /// Waits until this process may run the replica's sync loop: the one holding an exclusive
    /// lock on `<replica>.sync-lock`. Other processes on the same replica wait in
    /// [`ConnectionState::SyncedByAnotherProcess`] and take over when the holder stops or
    /// dies. On a file system without locks, every process syncs (harmless: replication is
    /// idempotent, only wasteful).
    async fn become_sync_leader(&self) -> Option<std::fs::File> {
        let mut path = self.inner.path.clone().into_os_string();
        path.push(".sync-lock");
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(%error, "cannot open the sync lock; syncing without it");
                return None;
            }
        };
        loop {
            match file.try_lock() {
                Ok(()) => return Some(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    self.inner
                        .connection
                        .set(ConnectionState::SyncedByAnotherProcess);
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Err(std::fs::TryLockError::Error(error)) => {
                    tracing::warn!(%error, "cannot lock the sync lock; syncing without it");
                    return None;
                }
            }
        }
    }

    /// The server database, reached over a sync session that authenticates with `options`'
    /// credentials and this replica's reconnect token.
    fn session_peer(
        &self,
        options: &SyncOptions,
    ) -> Result<(WsPeer, Arc<ClientAuth>), ClientError> {
        let replica_id = self.inner.db.info()?.replica_id;
        let mut peer = WsPeer::new(&options.url, &replica_id)?;
        if let Some(ca_file) = &options.ca_file {
            peer = peer.with_tls(&TlsOptions::trusting_ca_file(ca_file)?)?;
        }
        if let Some((interval, silence_timeout)) = options.heartbeat {
            peer = peer.with_heartbeat(interval, silence_timeout);
        }
        let auth = Arc::new(ClientAuth::new(
            self.inner.db.clone(),
            self.inner.clock.clone(),
            peer.describe(),
            options.credentials.clone(),
        ));
        Ok((peer.with_credentials(auth.clone()), auth))
    }

    async fn sync_loop(
        self,
        options: SyncOptions,
        local: LocalPeer,
        remote: WsPeer,
        auth: Arc<ClientAuth>,
    ) {
        let connection = self.inner.connection.clone();
        let mut online = connection.online.subscribe();
        let replication = ReplicationOptions {
            create_target: true,
            continuous: true,
            retry_transient: false,
            batch_size: options.batch_size,
            max_write_bytes: options.max_write_bytes,
            wait_timeout: Duration::from_secs(10),
            ..ReplicationOptions::default()
        };
        let jitter = Jitter::seeded(uuid::Uuid::new_v4().as_u64_pair().0);
        let mut machine = Connection::new(options.reconnect.clone(), jitter);
        online.mark_unchanged();
        let mut step = machine.start(*online.borrow());
        let mut opened = None;
        loop {
            for state in step.entered {
                connection.set(state);
            }
            let event = match step.command {
                Command::Open => {
                    remote.disconnect().await;
                    tokio::select! {
                        result = self.open_session(&remote, &options) => match result {
                            Ok(session) => {
                                opened = Some(session);
                                Event::Opened
                            }
                            Err(error) => failure(&error, &auth),
                        },
                        _ = online.changed() => Event::Online(*online.borrow_and_update()),
                    }
                }
                Command::Await => {
                    let session = opened
                        .take()
                        .expect("a session is open after Event::Opened");
                    let replicating =
                        self.replicate_session(&local, &remote, &replication, session);
                    let event = tokio::select! {
                        event = replicating => event.unwrap_or_else(|error| failure(&error, &auth)),
                        _ = online.changed() => Event::Online(*online.borrow_and_update()),
                    };
                    remote.disconnect().await;
                    event
                }
                Command::Pause(delay) => tokio::select! {
                    () = tokio::time::sleep(delay) => Event::Elapsed,
                    _ = online.changed() => Event::Online(*online.borrow_and_update()),
                },
                Command::AwaitOnline => match online.changed().await {
                    Ok(()) => Event::Online(*online.borrow_and_update()),
                    Err(_) => return,
                },
                Command::AskCredentials { reason, attempts } => match &options.fallback {
                    None => Event::Credentials(false),
                    Some(fallback) => tokio::select! {
                        credentials = fallback(AuthenticationFailure { reason, attempts }) => {
                            let given = credentials.is_some();
                            if let Some(credentials) = credentials {
                                auth.set_credentials(credentials);
                            }
                            Event::Credentials(given)
                        }
                        _ = online.changed() => Event::Online(*online.borrow_and_update()),
                    },
                },
            };
            step = machine.handle(event);
        }
    }

    /// Opens a session: reads what the pull carries, says hello, re-bases the clock.
    async fn open_session(
        &self,
        remote: &WsPeer,
        options: &SyncOptions,
    ) -> Result<OpenSession, SyncError> {
        let (_, subscriptions_rev) = self.subscriptions_with_rev().map_err(local_error)?;
        let pull_filter = self.pull_filter(options).map_err(local_error)?;
        remote.prepare(true).await?;
        self.rebase_clock(remote).await?;
        Ok(OpenSession {
            pull_filter,
            subscriptions_rev: options.only_subscribed.then_some(subscriptions_rev),
        })
    }

    /// Pushes and pulls over an open session until something breaks, or until the offline
    /// subscriptions change and the pull must start again with the new filter
    /// ([`Event::Restart`]).
    async fn replicate_session(
        &self,
        local: &LocalPeer,
        remote: &WsPeer,
        replication: &ReplicationOptions,
        session: OpenSession,
    ) -> Result<Event, SyncError> {
        let pull_filter = &session.pull_filter;
        let replicating = async {
            // Catch up push first, then pull (conflicts surface on the server first and come
            // back with the pull), then follow both directions.
            let catch_up = ReplicationOptions {
                continuous: false,
                ..replication.clone()
            };
            self.push(local, remote, &catch_up, |_| {}).await?;
            self.pull(local, remote, &catch_up, pull_filter).await?;
            tokio::try_join!(
                self.push(local, remote, replication, |_| {}),
                self.pull(local, remote, replication, pull_filter),
            )?;
            Err::<Event, SyncError>(SyncError::Session {
                url: remote.describe(),
                detail: "replication ended".into(),
            })
        };
        let resubscribe = async {
            match session.subscriptions_rev {
                Some(rev) => self.subscriptions_change(rev).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = replicating => result,
            () = resubscribe => Ok(Event::Restart),
        }
    }

    /// What the pull carries under `options`.
    fn pull_filter(&self, options: &SyncOptions) -> Result<PullFilter, ClientError> {
        if !options.only_subscribed {
            return Ok(PullFilter::Filter(ferry_sync::ChangesFilter::default()));
        }
        let subscriptions = self.offline_subscriptions()?;
        Ok(match crate::offline::pull_selector(&subscriptions) {
            None => PullFilter::Nothing,
            Some(selector) => PullFilter::Filter(selector),
        })
    }

    /// Returns when the offline subscriptions differ from revision `rev`: changed by this
    /// process (woken at once) or by another one (noticed by polling).
    async fn subscriptions_change(&self, rev: u64) {
        let mut changed = self.inner.subscriptions_changed.subscribe();
        loop {
            if self
                .subscriptions_with_rev()
                .is_ok_and(|(_, current)| current != rev)
            {
                return;
            }
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep(SUBSCRIPTIONS_POLL) => {}
            }
        }
    }
}

/// How a session's `error` ended it, for the connection machine.
fn failure(error: &SyncError, auth: &ClientAuth) -> Event {
    let kind = if error.is_unauthorized() {
        FailureKind::Unauthorized {
            credentials_left: auth.rejected(),
        }
    } else if error.is_transient() {
        FailureKind::Transient
    } else {
        tracing::warn!(%error, "sync stopped by an error retrying may not fix");
        FailureKind::Permanent
    };
    Event::Failed {
        kind,
        reason: error.to_string(),
    }
}

/// A local failure as a sync error (the replica could not be read).
fn local_error(error: ClientError) -> SyncError {
    match error {
        ClientError::Store(error) => SyncError::Store(error),
        other => SyncError::Task(other.to_string()),
    }
}
