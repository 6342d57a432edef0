//! The sync connection: credentials, reconnect tokens, the connection state machine, and the
//! background loop that keeps a replica in sync with a server.
//!
//! One loop per replica ([`Ferry::start_sync`]) drives the connection machine of
//! `ferry_core::connection`, which decides every state and pause: it opens a WebSocket session,
//! pushes then pulls continuously over it, and when the session breaks goes through the states
//! of [`ConnectionState`]: `Interrupted`, then `Reconnecting` after an exponential backoff with
//! jitter, then `Connected` again, resuming from the checkpoints on both sides. Local writes
//! never wait for any of this.
//!
//! Authentication: the first session presents the application's [`Credentials`]; the server
//! answers with a reconnect token, kept in the replica (a local document), and every later
//! session presents that token instead, getting the next one back. When a reconnect token is
//! refused (expired, revoked) the loop falls back to the credentials; when those are refused
//! too, it asks the application's [`SyncOptions::on_authentication_failure`] callback. The outbox
//! is never touched by any of this: pending writes wait for a session that is accepted.
//!
//! `auth.rs` holds the credentials and reconnect tokens, `options.rs` [`SyncOptions`]; the
//! push and pull a session runs are in `crate::sync`.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::connection::{Command, Connection, Event, FailureKind, Jitter};
pub use ferry_core::connection::{ConnectionState, ReconnectPolicy};
use ferry_sync::{LocalPeer, Peer, ReplicationOptions, SyncError, TlsOptions, WsPeer};
use futures_util::Stream;
use tokio::sync::{broadcast, watch};

use crate::{ClientError, Ferry};

mod auth;
mod options;

use auth::ClientAuth;
use auth::Fallback;
pub use auth::{AuthenticationFailure, Credentials};
pub use options::SyncOptions;

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

/// How often a process waiting for another one's sync loop checks whether it may take over.
const LEADER_POLL: Duration = Duration::from_millis(250);

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
pub(crate) enum PullFilter {
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
    pub(crate) fn session_peer(
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
            self.inner.blocking.clone(),
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
        let (subscriptions_rev, pull_filter) = self
            .blocking({
                let options = options.clone();
                move |ferry| {
                    let (_, subscriptions_rev) = ferry.subscriptions_with_rev()?;
                    Ok((subscriptions_rev, ferry.pull_filter(&options)?))
                }
            })
            .await?
            .map_err(local_error)?;
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
    pub(crate) fn pull_filter(&self, options: &SyncOptions) -> Result<PullFilter, ClientError> {
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
            let current = self
                .blocking(|ferry| ferry.subscriptions_with_rev().map(|(_, current)| current))
                .await;
            if current.is_ok_and(|current| current.is_ok_and(|current| current != rev)) {
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
pub(crate) fn local_error(error: ClientError) -> SyncError {
    match error {
        ClientError::Store(error) => SyncError::Store(error),
        other => SyncError::Task(other.to_string()),
    }
}
