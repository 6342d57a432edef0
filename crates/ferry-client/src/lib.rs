//! Ferry's client SDK: a local database that always works, and syncs when it can.
//!
//! [`Ferry`] opens a local replica (one SQLite file) with no server at all
//! ([`Ferry::initialize_offline`]). Documents live in [`Collection`]s, typed with serde or raw
//! JSON. Every write is durable before the call returns and stays **pending** in the replica's
//! outbox until a push to the server acknowledges it ([`Ferry::status`],
//! [`Ferry::document_status`]). Queries run on the local store; [`Collection::watch`] and
//! [`Query::watch`] are streams that emit again whenever a change (local, from another process
//! on the same file, or from sync) touches what they show.
//!
//! [`Ferry::start_sync`] syncs in the background over a WebSocket session (push, then pull,
//! continuously), reconnecting after interruptions with backoff and resuming with a reconnect
//! token; [`Ferry::connection_events`] reports what the connection does. See
//! [`SyncOptions`] for credentials, the fallback authentication callback and offline
//! subscriptions.
//!
//! **Blocking calls.** The local API (`Collection`'s reads and writes, queries, conflicts,
//! [`Ferry::status`]) is synchronous: each call is a SQLite transaction, and each write waits
//! for its commit to reach the disk (an fsync) before it returns, so a saved write survives a
//! crash or power loss. That takes microseconds to a few milliseconds; in async code, call
//! batches of them through `tokio::task::spawn_blocking` when latency matters. So are opening a
//! replica and [`Ferry::start_sync`] (they read it). The SDK's async methods and the background
//! sync ([`Ferry::sync_once`], [`Ferry::push_once`], [`Ferry::pull_once`], [`Ferry::push_to`],
//! [`Ferry::pull_from`], [`Ferry::wait_for_acknowledgement`], the sync loop: reading the
//! replica, storing pulled revisions, resolving their conflicts, recording acknowledgements and
//! refusals, keeping reconnect tokens) call the store only on tokio's blocking threads, at most
//! [`FerryBuilder::max_blocking_calls`] at once, never on an executor thread.
//!
//! ```no_run
//! # async fn run() -> Result<(), ferry_client::ClientError> {
//! use ferry_client::{Credentials, Ferry, SyncOptions};
//! let ferry = Ferry::initialize_offline("app.ferry", "alice")?;
//! let _sync = ferry.start_sync(
//!     SyncOptions::new("http://127.0.0.1:5984/groceries")
//!         .credentials(Credentials::password("alice", "a long password"))
//!         .on_authentication_failure(|failure| async move {
//!             eprintln!("please log in again: {}", failure.reason);
//!             None
//!         }),
//! )?;
//! ferry.collection::<serde_json::Value>("todos").insert(&serde_json::json!({"title": "milk"}))?;
//! ferry.wait_for_acknowledgement(std::time::Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! ```
//! # fn main() -> Result<(), ferry_client::ClientError> {
//! use ferry_client::Ferry;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Todo { title: String, done: bool }
//!
//! let dir = tempfile::tempdir().unwrap();
//! let ferry = Ferry::initialize_offline(dir.path().join("app.ferry"), "ann")?;
//! let todos = ferry.collection::<Todo>("todos");
//! let milk = todos.insert(&Todo { title: "buy milk".into(), done: false })?;
//! todos.patch(&milk.id, &serde_json::json!({"done": true}))?;
//! assert!(todos.get(&milk.id)?.unwrap().value.done);
//! assert_eq!(ferry.status()?.pending, 1); // not yet acknowledged by a server
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferry_store::StoreError;
use ferry_store::clock::ReplicaClock;
use ferry_store::endpoint::{Endpoint, EndpointConfig, EndpointError, Fanout};
use ferry_store::{PendingState, Replica};
use ferry_sync::{LocalPeer, SyncError};
use tokio::sync::watch;

mod collection;
mod conflicts;
mod connection;
mod offline;
mod open;
mod sync;

pub use collection::{Collection, Doc, Query};
pub use conflicts::{
    Ancestor, Conflict, ConflictEvent, ConflictPolicy, CustomResolver, Resolve, Version,
};
pub use connection::{
    AuthenticationFailure, ConnectionState, Credentials, ReconnectPolicy, SyncHandle, SyncOptions,
};
pub use ferry_core::hlc::Timestamp;
pub use ferry_core::model::Limits;
pub use ferry_core::resolve::{Method as ResolutionMethod, Overridden, ResolutionRecord};
pub use ferry_core::rev::Rev;
pub use ferry_store::clock::{ManualClock, SystemClock, WallClock};
pub use ferry_store::{Durability, PageCache};
/// What [`Ferry::push_to`] and [`Ferry::pull_from`] work with: a peer, how to replicate, and
/// what a replication did.
pub use ferry_sync::{HttpPeer, Peer, ReplicationOptions, Stats, SyncStats, TlsOptions};
pub use offline::OfflineSubscription;
pub use open::FerryBuilder;

/// How often a replica looks for changes written by other processes on the same file.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(100);

/// How far ahead of this device's clock a pulled revision's clock may be and still be
/// adopted by the replica's clock (the server refuses revisions further ahead than its own
/// limit, 60 s by default).
const MAX_CLOCK_DRIFT_MS: u64 = 60_000;

/// A client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The local store failed.
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    /// A value could not be converted to or from JSON.
    #[error("document does not match its type: {0}")]
    Serde(#[from] serde_json::Error),
    /// A document was refused before being stored (not an object, too large, bad id...).
    #[error("invalid document: {0}")]
    InvalidDocument(String),
    /// A query or selector was refused.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The document does not exist (or is deleted).
    #[error("{collection}/{id} does not exist")]
    NotFound {
        /// The collection.
        collection: String,
        /// The id.
        id: String,
    },
    /// The document exists already (insert with an id that is taken).
    #[error("{collection}/{id} already exists")]
    AlreadyExists {
        /// The collection.
        collection: String,
        /// The id.
        id: String,
    },
    /// The document changed since the revision the write was based on.
    #[error("{collection}/{id} changed since revision {expected}")]
    Conflict {
        /// The collection.
        collection: String,
        /// The id.
        id: String,
        /// The revision the write expected.
        expected: String,
    },
    /// Syncing failed.
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    /// [`Ferry::start_sync`] was called while a sync it started is still running.
    #[error("this replica is already syncing; drop its SyncHandle first")]
    AlreadySyncing,
    /// An option given to [`Ferry::builder`] cannot work (a limit of zero).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// [`Ferry::start_sync`] was called outside a tokio runtime, which the sync runs on.
    #[error(
        "start_sync needs a tokio runtime: call it from async code (inside #[tokio::main] or Runtime::block_on)"
    )]
    NoRuntime,
}

/// What kind of failure a [`ClientError`] is: for code that decides what to do about one
/// (tell the user, retry later, ask for a new login) without matching every variant.
///
/// ```
/// use ferry_client::{ClientError, ErrorKind};
/// let error = ClientError::NotFound { collection: "todos".into(), id: "42".into() };
/// assert_eq!(error.kind(), ErrorKind::NotFound);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The document does not exist (or is deleted).
    NotFound,
    /// An insert's id is taken.
    AlreadyExists,
    /// The document changed since the revision the write was based on: read it and retry.
    Conflict,
    /// A document or value was refused before anything was stored (its shape, size, id or
    /// type).
    InvalidDocument,
    /// A query or selector was refused.
    InvalidQuery,
    /// The device's storage refused a write (full, a file size limit, a failing device);
    /// nothing of the call was stored and the replica is intact.
    StorageFull,
    /// The replica's file is damaged, or was written by a newer Ferry.
    Corrupt,
    /// Another failure of the local storage.
    Storage,
    /// The server refused the credentials: log in again.
    Unauthorized,
    /// The server could not be reached, or could not serve for now (overloaded, restarting):
    /// the same call may succeed later.
    Unavailable,
    /// The server refused a request, or the sync is misconfigured (its URL, TLS settings).
    Sync,
    /// The call was made where it cannot work (a second `start_sync`, outside a runtime), or
    /// with options that cannot work.
    Usage,
}

impl ClientError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Store(error) => store_error_kind(error),
            ClientError::Serde(_) | ClientError::InvalidDocument(_) => ErrorKind::InvalidDocument,
            ClientError::InvalidQuery(_) => ErrorKind::InvalidQuery,
            ClientError::NotFound { .. } => ErrorKind::NotFound,
            ClientError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            ClientError::Conflict { .. } => ErrorKind::Conflict,
            ClientError::Sync(SyncError::Store(error)) => store_error_kind(error),
            ClientError::Sync(error) if error.is_unauthorized() => ErrorKind::Unauthorized,
            ClientError::Sync(error) if error.is_transient() => ErrorKind::Unavailable,
            ClientError::Sync(_) => ErrorKind::Sync,
            ClientError::AlreadySyncing
            | ClientError::NoRuntime
            | ClientError::InvalidOptions(_) => ErrorKind::Usage,
        }
    }
}

fn store_error_kind(error: &StoreError) -> ErrorKind {
    match error {
        StoreError::StorageFull(_) => ErrorKind::StorageFull,
        StoreError::Corrupt { .. } | StoreError::FutureSchema { .. } => ErrorKind::Corrupt,
        StoreError::InvalidQuery(_) => ErrorKind::InvalidQuery,
        StoreError::InvalidRevision { .. } => ErrorKind::InvalidDocument,
        StoreError::InvalidPageCache { .. } => ErrorKind::Usage,
        _ => ErrorKind::Storage,
    }
}

impl From<EndpointError> for ClientError {
    fn from(error: EndpointError) -> ClientError {
        match error {
            EndpointError::Store(error) => ClientError::Store(error),
            EndpointError::Refused { refusal, .. } => {
                ClientError::InvalidDocument(refusal.to_string())
            }
            other => ClientError::InvalidDocument(other.to_string()),
        }
    }
}

/// Counts of what the server has not acknowledged yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// Documents with local changes waiting for the server.
    pub pending: u64,
    /// Documents whose local change the server refused.
    pub rejected: u64,
}

/// Where one document stands with respect to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DocumentStatus {
    /// Changed locally; the server has not acknowledged it yet.
    Pending,
    /// The server has everything this replica has of it.
    Acknowledged,
    /// Concurrent versions exist; the application should resolve them.
    Conflicted,
    /// The server refused the local change.
    Rejected {
        /// The server's reason.
        reason: String,
    },
}

/// An offline-first local replica.
///
/// Cheap to clone; clones share the same replica.
#[derive(Clone)]
pub struct Ferry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ferry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ferry")
            .field("path", &self.inner.path)
            .field("user", &self.inner.user)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The local store and its outbox (SQLite; any [`Replica`] works).
    db: Arc<dyn Replica>,
    path: PathBuf,
    user: String,
    /// The replica's one clock: it stamps local edits and observes every pulled revision.
    clock: Arc<ReplicaClock>,
    /// The rules the replica's endpoint applies (limits; conflicts are resolved by the SDK's
    /// own policies, which may be application closures).
    endpoint: EndpointConfig,
    /// The replica's latest sequence, as last observed; watchers wait on it.
    changes: watch::Sender<u64>,
    /// Whether the cross-process poller runs (started by the first `subscribe` made inside a
    /// runtime).
    poller_started: std::sync::atomic::AtomicBool,
    connection: Arc<connection::ConnectionShared>,
    conflicts: conflicts::ConflictState,
    /// Bumped whenever this process changes the offline subscriptions.
    subscriptions_changed: watch::Sender<u64>,
    /// How many store calls async code (sync, watchers, the poller) makes at once.
    blocking: ferry_sync::BlockingCalls,
    /// The directory of a temporary replica, removed with the last handle (declared last so
    /// that it outlives the database).
    _temporary: Option<tempfile::TempDir>,
}

/// Wakes a replica's watchers when its endpoint commits (held weakly: a sync task must not
/// keep a dropped replica alive).
struct Watchers(Weak<Inner>);

impl Fanout for Watchers {
    fn committed(&self, _update_seq: u64, _doc_ids: &[String]) {
        if let Some(inner) = self.0.upgrade() {
            Ferry { inner }.notify_changed();
        }
    }
}

/// A broadcast channel's messages as a stream; a subscriber that falls behind the channel's
/// capacity skips the oldest messages instead of failing.
pub(crate) fn broadcast_stream<T: Clone + Send + 'static>(
    receiver: tokio::sync::broadcast::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    use tokio::sync::broadcast::error::RecvError;
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(message) => return Some((message, receiver)),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

impl Ferry {
    /// Opens (creating if needed) the local replica at `path` for `user`, with no server.
    /// Everything works offline; sync can start later.
    pub fn initialize_offline(path: impl AsRef<Path>, user: &str) -> Result<Ferry, ClientError> {
        Ferry::builder(user).open(path)
    }

    /// A replica in a new temporary file, deleted when the last handle is dropped: for tests
    /// and throwaway sessions. It behaves exactly like [`Ferry::initialize_offline`]'s.
    ///
    /// ```
    /// let ferry = ferry_client::Ferry::temporary("ann").unwrap();
    /// ferry.collection::<serde_json::Value>("notes").insert(&serde_json::json!({"a": 1})).unwrap();
    /// assert_eq!(ferry.status().unwrap().pending, 1);
    /// ```
    pub fn temporary(user: &str) -> Result<Ferry, ClientError> {
        Ferry::builder(user).open_temporary()
    }

    /// Changes the local document `key` by `change` (which says whether it changed anything),
    /// starting again from the stored one when another process wrote it meanwhile; returns
    /// whether it changed.
    pub(crate) fn update_local(
        &self,
        key: &str,
        change: impl Fn(&mut serde_json::Map<String, serde_json::Value>) -> Result<bool, ClientError>,
    ) -> Result<bool, ClientError> {
        loop {
            let (mut body, rev) = match self.inner.db.get_local(key)? {
                Some(doc) => (doc.body, Some(doc.rev)),
                None => (serde_json::Map::new(), None),
            };
            if !change(&mut body)? {
                return Ok(false);
            }
            match self.inner.db.put_local(key, rev, Some(body)) {
                Ok(_) => return Ok(true),
                Err(StoreError::LocalConflict) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The user this replica belongs to.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// The replica file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The limits documents are checked against.
    pub fn limits(&self) -> &Limits {
        &self.inner.endpoint.limits
    }

    /// The replica's id: unique to this replica file, for its whole life (a server's logs and
    /// checkpoints name the replica by it).
    pub fn replica_id(&self) -> Result<String, ClientError> {
        Ok(self.inner.db.info()?.replica_id)
    }

    /// The collections holding live documents, by name, with how many each holds.
    ///
    /// ```
    /// # let ferry = ferry_client::Ferry::temporary("ann").unwrap();
    /// ferry.collection::<serde_json::Value>("todos").insert(&serde_json::json!({})).unwrap();
    /// assert_eq!(ferry.collections().unwrap(), [("todos".to_owned(), 1)]);
    /// ```
    pub fn collections(&self) -> Result<Vec<(String, u64)>, ClientError> {
        Ok(self.inner.db.collections()?)
    }

    /// A collection of documents of type `T` (use `serde_json::Value` for raw JSON).
    pub fn collection<T>(&self, name: &str) -> Collection<T> {
        Collection::new(self.clone(), name)
    }

    /// How many local changes the server has not acknowledged, and how many it refused.
    pub fn status(&self) -> Result<SyncCounts, ClientError> {
        let summary = self.inner.db.outbox()?;
        Ok(SyncCounts {
            pending: summary.pending,
            rejected: summary.rejected,
        })
    }

    /// Where one document stands; `None` if it does not exist at all.
    pub fn document_status(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<DocumentStatus>, ClientError> {
        let doc_id = ferry_core::model::doc_id_in(collection, id);
        let Some(document) = self.inner.db.get_document(&doc_id)? else {
            return Ok(None);
        };
        Ok(Some(match self.inner.db.outbox_state(&doc_id)? {
            Some(PendingState::Rejected { reason }) => DocumentStatus::Rejected { reason },
            _ if !document.conflicts.is_empty() => DocumentStatus::Conflicted,
            Some(PendingState::Pending { .. }) => DocumentStatus::Pending,
            None => DocumentStatus::Acknowledged,
        }))
    }

    /// Waits until the server has acknowledged every local change (a sync must be running,
    /// see [`Ferry::start_sync`], in this process or another one on the same replica), or `timeout` passes; returns whether everything was
    /// acknowledged.
    pub async fn wait_for_acknowledgement(&self, timeout: Duration) -> Result<bool, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.subscribe();
        let nothing_pending = || async {
            let counts = self.blocking(|ferry| ferry.status()).await??;
            Ok::<bool, ClientError>(counts.pending == 0)
        };
        loop {
            if nothing_pending().await? {
                return Ok(true);
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep_until(deadline) => return nothing_pending().await,
                // Acknowledgements do not change the sequence; look again now and then.
                () = tokio::time::sleep(CROSS_PROCESS_POLL) => {}
            }
        }
    }

    /// Runs `work` on one of tokio's blocking threads, at most `max_blocking_calls` at once:
    /// the SDK's async paths call the store (SQLite, with an fsync per write) only through it,
    /// never on an executor thread.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Ferry) -> T + Send + 'static,
    ) -> Result<T, SyncError> {
        let ferry = self.clone();
        self.inner.blocking.run(move || work(ferry)).await
    }

    pub(crate) fn acknowledge(&self, last_seq: &ferry_sync::Seq) {
        if let Some(seq) = last_seq.number() {
            ferry_store::failpoint::reached(ferry_store::failpoint::BEFORE_RECORDING_ACK);
            match self.inner.db.acknowledge_through(seq) {
                Ok(count) if count > 0 => self.notify_changed(),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not record acknowledgements"),
            }
        }
    }

    pub(crate) fn database(&self) -> &dyn Replica {
        &*self.inner.db
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Runs `work` on the replica's endpoint (`ferry_store::endpoint`), the one way local
    /// edits and replicated revisions enter the store; what it commits wakes the watchers.
    pub(crate) fn endpoint<T>(
        &self,
        work: impl FnOnce(&Endpoint<'_>) -> Result<T, EndpointError>,
    ) -> Result<T, ClientError> {
        let fanout = Watchers(Arc::downgrade(&self.inner));
        let resolver = conflicts::PolicyResolver(Arc::downgrade(&self.inner));
        let endpoint = Endpoint::new(
            &*self.inner.db,
            &self.inner.endpoint,
            &self.inner.clock,
            &fanout,
        )
        .resolving_by(&resolver);
        Ok(work(&endpoint)?)
    }

    /// A replication peer over this replica, sharing its clock, limits and watchers.
    pub(crate) fn local_peer(&self) -> Result<LocalPeer, SyncError> {
        Ok(LocalPeer::new(self.inner.db.clone())?
            .with_blocking_calls(self.inner.blocking.clone())
            .with_clock(self.inner.clock.clone())
            .with_config(self.inner.endpoint.clone())
            .with_fanout(Arc::new(Watchers(Arc::downgrade(&self.inner))))
            .with_resolver(Arc::new(conflicts::PolicyResolver(Arc::downgrade(
                &self.inner,
            )))))
    }

    /// Tells watchers that the replica may have changed.
    pub(crate) fn notify_changed(&self) {
        if let Ok(info) = self.inner.db.info() {
            self.inner.changes.send_if_modified(|seq| {
                let newer = info.update_seq != *seq;
                *seq = info.update_seq;
                newer
            });
        }
    }

    /// A receiver woken whenever the replica's sequence moves, whoever wrote: this process,
    /// sync, or another process on the same file (noticed by a poller started on first use).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.ensure_poller();
        self.inner.changes.subscribe()
    }

    /// Starts the poller that notices other processes' writes, if it does not run yet and
    /// this is called inside a runtime (outside one, a later call inside one starts it).
    pub(crate) fn ensure_poller(&self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self
                .inner
                .poller_started
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let weak: Weak<Inner> = Arc::downgrade(&self.inner);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(CROSS_PROCESS_POLL).await;
                    let Some(inner) = weak.upgrade() else { break };
                    // Reading the sequence is a store call: not on the executor.
                    let ferry = Ferry { inner };
                    if ferry
                        .blocking(|ferry| ferry.notify_changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_store::Durability;

    use super::*;

    /// A local write the app was told is saved survives power loss: the replica commits with
    /// fsync (which no crash test can observe).
    #[test]
    fn replicas_commit_with_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let ferry = Ferry::initialize_offline(dir.path().join("app.ferry"), "someone").unwrap();
        assert_eq!(ferry.database().durability().unwrap(), Durability::Full);
    }

    /// Storage failures an application handles differently: a full disk (free space, retry)
    /// and a damaged or newer file (support), apart from the rest.
    #[test]
    fn storage_failures_have_their_own_kinds() {
        let kind = |error: StoreError| ClientError::Store(error).kind();
        assert_eq!(
            kind(StoreError::StorageFull("disk full".into())),
            ErrorKind::StorageFull
        );
        assert_eq!(
            kind(StoreError::FutureSchema {
                found: 9,
                supported: 3
            }),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(StoreError::Corrupt {
                what: "revision tree",
                detail: "truncated".into()
            }),
            ErrorKind::Corrupt
        );
        assert_eq!(kind(StoreError::LocalConflict), ErrorKind::Storage);
        // The same through a sync that failed in the local store.
        let through_sync = ClientError::Sync(SyncError::Store(StoreError::StorageFull(
            "disk full".into(),
        )));
        assert_eq!(through_sync.kind(), ErrorKind::StorageFull);
    }
}
