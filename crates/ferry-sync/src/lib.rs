//! Runs Ferry's replication between two peers: a local store, or a remote server over the
//! CouchDB replication protocol.
//!
//! The algorithm itself is `ferry_core::replicate::Replication`, a state machine with no I/O.
//! This crate is its async shell: a [`Peer`] trait with two implementations ([`LocalPeer`] over
//! a `ferry_store::Database`, [`HttpPeer`] over HTTP, [`WsPeer`] over a WebSocket sync
//! session as `docs/protocol.md` describes it; both speak TLS for `https://` URLs, trusting
//! what [`TlsOptions`] says), and the drivers [`replicate`] (one way,
//! one-shot or continuous) and [`sync`] (push, then pull). Both ways continuously, with a
//! client replica's outbox, is the SDK's (`ferry_client::Ferry`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use ferry_store::{Backend, Edit, StoreConfig, sqlite::SqliteBackend};
//! use ferry_sync::{LocalPeer, ReplicationOptions, replicate};
//!
//! let dir = tempfile::tempdir()?;
//! let backend = SqliteBackend::open(dir.path(), StoreConfig::default())?;
//! let (a, b) = (backend.create_database("a")?, backend.create_database("b")?);
//! let body = serde_json::json!({"title": "milk"}).as_object().unwrap().clone();
//! a.write_edits(vec![Edit::put("todos:1", None, body)])?;
//!
//! let stats = replicate(
//!     &LocalPeer::new(a)?,
//!     &LocalPeer::new(b.clone())?,
//!     &ReplicationOptions::default(),
//!     |_| {},
//! )
//! .await?;
//! assert_eq!(stats.docs_written, 1);
//! assert!(b.get_document("todos:1")?.is_some());
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use ferry_core::model::Revision;
use ferry_core::replicate::{
    Action, ChangeRow, Checkpoint, Replication, ReplicationConfig, ReplicationError, Response,
};
use ferry_core::rev::Rev;
use serde_json::Value;
use sha2::{Digest, Sha256};

mod http;
mod local;
mod read_ahead;
mod tls;
mod wire;
mod ws;

pub use ferry_core::filter::ChangesFilter;
pub use ferry_core::replicate::Stats;
pub use http::HttpPeer;
pub use local::LocalPeer;
pub use tls::{TlsOptions, TlsProblem};
pub use ws::{SessionCredentials, WsPeer};

/// Replication failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The local store failed.
    #[error("local store: {0}")]
    Store(#[from] ferry_store::StoreError),
    /// The local replica refused a request as a whole (more items than its limits allow).
    #[error("local replica: {0}")]
    Endpoint(ferry_store::endpoint::EndpointError),
    /// The server answered with an error.
    #[error("{url} answered {status}: {error}: {reason}")]
    Http {
        /// The request URL (without credentials).
        url: String,
        /// The HTTP status.
        status: u16,
        /// CouchDB's error code.
        error: String,
        /// CouchDB's reason.
        reason: String,
    },
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach {url}: {source}")]
    Transport {
        /// The request URL (without credentials).
        url: String,
        /// The underlying error (boxed: the HTTP client is not part of this crate's API).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A TLS connection to the server could not be set up: its certificate was refused, or the
    /// handshake failed. Not transient: retrying gives the same answer.
    #[error("TLS with {url} failed: {problem}")]
    Tls {
        /// The URL (without credentials).
        url: String,
        /// What went wrong.
        problem: TlsProblem,
    },
    /// The TLS settings cannot be used (a CA file that cannot be read or holds no certificate).
    #[error("invalid TLS settings: {0}")]
    InvalidTlsOptions(String),
    /// The server answered something that is not the CouchDB protocol.
    #[error("invalid response from {url}: {detail}")]
    InvalidResponse {
        /// The request URL (without credentials).
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The URL is not an http(s) database URL.
    #[error("invalid database URL {0:?}: expected http(s)://host:port/database")]
    InvalidUrl(String),
    /// The peers broke the replication protocol.
    #[error("replication protocol: {0}")]
    Protocol(#[from] ReplicationError),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
    /// A sync session could not be opened, or was lost.
    #[error("sync session with {url}: {detail}")]
    Session {
        /// The session URL.
        url: String,
        /// What happened.
        detail: String,
    },
}

impl From<ferry_store::endpoint::EndpointError> for SyncError {
    fn from(error: ferry_store::endpoint::EndpointError) -> SyncError {
        match error {
            ferry_store::endpoint::EndpointError::Store(error) => SyncError::Store(error),
            other => SyncError::Endpoint(other),
        }
    }
}

impl SyncError {
    /// Whether retrying later may succeed (network trouble, server overload or restart).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Transport { .. } | SyncError::Task(_) | SyncError::Session { .. } => true,
            SyncError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// Whether the server refused the credentials (HTTP 401, or `unauthorized` in a session).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, SyncError::Http { status: 401, .. })
    }
}

/// A revision the target refused on its own, while the rest of its batch was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRevision {
    /// The document.
    pub doc_id: String,
    /// The refused revision.
    pub rev: Rev,
    /// The target's error code (`document_too_large`, `illegal_docid`, `forbidden`, ...).
    pub error: String,
    /// The target's reason.
    pub reason: String,
}

/// One page of a peer's changes feed.
#[derive(Clone, Debug, Default)]
pub struct ChangesPage {
    /// The rows, in sequence order.
    pub rows: Vec<ChangeRow>,
    /// The sequence to continue after.
    pub last_seq: Value,
    /// How many changes remain, when the peer says.
    pub pending: Option<u64>,
}

/// One end of a replication.
///
/// The methods mirror the steps of the replication algorithm. Implementations must make
/// `write_revisions` idempotent (writing the same revisions twice changes nothing) and must
/// never overwrite: revisions are merged into the documents' trees.
pub trait Peer: Send + Sync {
    /// A stable name for this peer, part of the replication id (never contains credentials).
    fn describe(&self) -> String;

    /// Makes sure the database exists, creating it when `create` is set.
    fn prepare(&self, create: bool) -> impl Future<Output = Result<(), SyncError>> + Send;

    /// The largest request the peer takes, when it said so (after [`Peer::prepare`]): writes
    /// to it are kept below it, whatever [`ReplicationOptions::max_write_bytes`] allows.
    fn max_request_bytes(&self) -> Option<usize> {
        None
    }

    /// The peer's clock now (ms since the epoch), estimated from its latest answer (after
    /// [`Peer::prepare`]), when it tells its time: a server does, a local replica does not. A
    /// client replica re-bases its clock on it
    /// ([`ferry_store::clock::ReplicaClock::rebase`]).
    fn server_time_ms(&self) -> Option<u64> {
        None
    }

    /// Reads the checkpoint `_local/{replication_id}`.
    fn get_checkpoint(
        &self,
        replication_id: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, SyncError>> + Send;

    /// Writes the checkpoint `_local/{replication_id}`.
    fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<(), SyncError>> + Send;

    /// Reads at most `limit` changes after `since` that pass `filter`.
    fn changes(
        &self,
        since: &Value,
        limit: usize,
        filter: &ChangesFilter,
    ) -> impl Future<Output = Result<ChangesPage, SyncError>> + Send;

    /// Which of these revisions the peer lacks.
    fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> impl Future<Output = Result<Vec<(String, Vec<Rev>)>, SyncError>> + Send;

    /// These revisions with their bodies and ancestry. Revisions the peer can no longer
    /// provide (compacted away) are left out.
    fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> impl Future<Output = Result<Vec<Revision>, SyncError>> + Send;

    /// Merges these revisions into the peer's trees. A peer may refuse single revisions (too
    /// large, invalid id) while storing the rest: those come back, with the peer's reason.
    fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> impl Future<Output = Result<Vec<RejectedRevision>, SyncError>> + Send;

    /// Waits up to `timeout` for changes after `since`; true if there are some.
    fn wait_for_changes(
        &self,
        since: &Value,
        timeout: Duration,
    ) -> impl Future<Output = Result<bool, SyncError>> + Send;
}

/// The time a server told in its latest answer, and when that answer arrived: its clock now is
/// that time plus the time elapsed since, on this machine's monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct ServerTime(std::sync::Mutex<Option<(u64, tokio::time::Instant)>>);

impl ServerTime {
    pub(crate) fn record(&self, server_ms: u64) {
        *self.lock() = Some((server_ms, tokio::time::Instant::now()));
    }

    pub(crate) fn now_ms(&self) -> Option<u64> {
        let told = *self.lock();
        told.map(|(server_ms, received)| {
            let since = u64::try_from(received.elapsed().as_millis()).unwrap_or(u64::MAX);
            server_ms.saturating_add(since)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, tokio::time::Instant)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How a replication runs.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    /// Changes per batch; memory use is proportional to it.
    pub batch_size: usize,
    /// The most bytes one write of a batch carries (see
    /// [`ReplicationConfig::max_write_bytes`]); keep it below the target's request limit.
    pub max_write_bytes: usize,
    /// Keep following the source once caught up, retrying after transient errors.
    pub continuous: bool,
    /// Which changes to carry.
    pub filter: ChangesFilter,
    /// Create the target database if it does not exist.
    pub create_target: bool,
    /// How long one wait for new changes lasts (a longpoll request to a server).
    pub wait_timeout: Duration,
    /// The longest pause between retries in continuous mode.
    pub max_backoff: Duration,
    /// In continuous mode, retry transient errors (true), or return them so the caller can
    /// reconnect its own way (a client's connection state machine).
    pub retry_transient: bool,
}

impl Default for ReplicationOptions {
    fn default() -> ReplicationOptions {
        ReplicationOptions {
            batch_size: 100,
            max_write_bytes: ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES,
            continuous: false,
            filter: ChangesFilter::default(),
            create_target: false,
            wait_timeout: Duration::from_secs(25),
            max_backoff: Duration::from_secs(30),
            retry_transient: true,
        }
    }
}

/// The id naming a replication's checkpoints: the same source, target and filter always give
/// the same id, so a restarted replication finds its checkpoint.
pub fn replication_id(source: &impl Peer, target: &impl Peer, filter: &ChangesFilter) -> String {
    let mut hasher = Sha256::new();
    for part in [source.describe(), target.describe(), filter.describe()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("ferry-{hex}")
}

/// Replicates from `source` to `target`: until caught up, or forever in continuous mode.
///
/// `progress` is called after every committed batch. In one-shot mode the first error is
/// returned. In continuous mode transient errors (network, 5xx) are retried with exponential
/// backoff and jitter, each retry resuming from the last checkpoint; other errors are returned.
pub async fn replicate<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    options: &ReplicationOptions,
    progress: impl FnMut(&Stats) + Send,
) -> Result<Stats, SyncError> {
    replicate_reporting(source, target, options, progress, |rejected| {
        tracing::warn!(doc_id = %rejected.doc_id, rev = %rejected.rev, reason = %rejected.reason, "the target refused a revision");
    })
    .await
}

/// [`replicate`], calling `rejected` for each revision the target refuses individually (a
/// client marks the document rejected in its outbox; the replication goes on without it).
pub async fn replicate_reporting<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    options: &ReplicationOptions,
    mut progress: impl FnMut(&Stats) + Send,
    mut rejected: impl FnMut(&RejectedRevision) + Send,
) -> Result<Stats, SyncError> {
    let mut failures = 0u32;
    let mut jitter = ferry_core::connection::Jitter::seeded(uuid::Uuid::new_v4().as_u64_pair().0);
    loop {
        match replicate_once(source, target, options, &mut progress, &mut rejected).await {
            Ok(stats) => return Ok(stats),
            Err(error) if options.continuous && options.retry_transient && error.is_transient() => {
                failures = failures.saturating_add(1);
                let pause = ferry_core::connection::backoff_delay(
                    failures,
                    INITIAL_BACKOFF,
                    options.max_backoff,
                    &mut jitter,
                );
                tracing::warn!(%error, retry_in_ms = pause.as_millis(), "replication interrupted");
                tokio::time::sleep(pause).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The most bytes of bodies one fetch answer from a Ferry server carries (it may answer less),
/// on either transport: a batch of large documents is fetched in several answers, each far
/// below the frame and request limits, and a client holds one at a time.
pub(crate) const FETCH_ANSWER_BYTES: usize = ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES;

/// The first pause after a transient failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

async fn replicate_once<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    options: &ReplicationOptions,
    progress: &mut (impl FnMut(&Stats) + Send),
    on_rejected: &mut (impl FnMut(&RejectedRevision) + Send),
) -> Result<Stats, SyncError> {
    target.prepare(options.create_target).await?;
    let replication_id = replication_id(source, target, &options.filter);
    // Room for the request's envelope (its framing, ids, commas) around the revisions.
    let max_write_bytes = match target.max_request_bytes() {
        Some(limit) => options.max_write_bytes.min(limit - limit / 8),
        None => options.max_write_bytes,
    };
    let mut replication = Replication::new(ReplicationConfig {
        replication_id: replication_id.clone(),
        session_id: uuid::Uuid::new_v4().simple().to_string(),
        batch_size: options.batch_size.max(1),
        max_write_bytes,
        continuous: options.continuous,
    });
    // The page after the current one, read while the current one is written.
    let mut ahead: Option<read_ahead::ReadAhead<_>> = None;
    let mut prepared: Option<read_ahead::Prepared> = None;
    loop {
        let response = match replication.next_action() {
            Action::ReadCheckpoints => {
                let (source_checkpoint, target_checkpoint) = tokio::try_join!(
                    source.get_checkpoint(&replication_id),
                    target.get_checkpoint(&replication_id)
                )?;
                Response::Checkpoints {
                    source: source_checkpoint,
                    target: target_checkpoint,
                }
            }
            Action::ReadChanges { since, limit } => {
                let read_ahead = match ahead.take() {
                    Some(ahead) => ahead.finish(&since, limit).await,
                    None => None,
                };
                let mut next = match read_ahead {
                    Some(next) => next?,
                    None => {
                        read_ahead::prepare(source, target, &options.filter, since, limit).await?
                    }
                };
                if next.page.rows.len() >= limit {
                    let since = next.page.last_seq.clone();
                    let work =
                        read_ahead::prepare(source, target, &options.filter, since.clone(), limit);
                    ahead = Some(read_ahead::ReadAhead::start(since, limit, work));
                }
                let page = std::mem::take(&mut next.page);
                prepared = Some(next);
                Response::Changes {
                    rows: page.rows,
                    last_seq: page.last_seq,
                    pending: page.pending,
                }
            }
            Action::RevsDiff { revs } => {
                let known = prepared.as_mut().and_then(|next| next.take_missing(&revs));
                match known {
                    Some(missing) => Response::Missing(missing),
                    None => Response::Missing(
                        read_ahead::alongside(target.revs_diff(revs), &mut ahead).await?,
                    ),
                }
            }
            Action::FetchRevisions { wanted } => {
                let known = prepared
                    .as_mut()
                    .and_then(|next| next.take_revisions(&wanted));
                match known {
                    Some(revisions) => Response::Revisions(revisions),
                    None => Response::Revisions(
                        read_ahead::alongside(source.fetch_revisions(wanted), &mut ahead).await?,
                    ),
                }
            }
            Action::WriteRevisions { revisions } => {
                let rejected =
                    read_ahead::alongside(target.write_revisions(revisions), &mut ahead).await?;
                rejected.iter().for_each(&mut *on_rejected);
                Response::Written {
                    rejected: rejected.len() as u64,
                }
            }
            Action::WriteCheckpoint { checkpoint } => {
                // The target's checkpoint matters most: it is written first. A source that
                // refuses the write (read-only) only costs a fuller comparison next time.
                read_ahead::alongside(
                    target.put_checkpoint(&replication_id, &checkpoint),
                    &mut ahead,
                )
                .await?;
                let source_checkpoint = source.put_checkpoint(&replication_id, &checkpoint);
                if let Err(error) = read_ahead::alongside(source_checkpoint, &mut ahead).await {
                    tracing::warn!(%error, "could not store the checkpoint on the source");
                }
                Response::CheckpointWritten
            }
            Action::WaitForChanges { since } => {
                progress(replication.stats());
                // A wait that ends with no news still reads the source again: a notification
                // that never came (lost, or a longpoll cut by a proxy) must not stall a live
                // replication. Quiet, that is one read per `wait_timeout`.
                source
                    .wait_for_changes(&since, options.wait_timeout)
                    .await?;
                Response::ChangesAvailable
            }
            Action::Finished(stats) => return Ok(stats),
        };
        let committed_batch = matches!(response, Response::CheckpointWritten);
        replication.handle(response)?;
        if committed_batch {
            progress(replication.stats());
        }
    }
}

/// What a sync did in each direction.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncStats {
    /// Local to remote.
    pub push: Stats,
    /// Remote to local.
    pub pull: Stats,
}

/// Pushes local changes, then pulls remote ones (the order LoopBack's algorithm uses, so
/// conflicts are detected on the server first and come back with the pull).
pub async fn sync<L: Peer, R: Peer>(
    local: &L,
    remote: &R,
    options: &ReplicationOptions,
) -> Result<SyncStats, SyncError> {
    let options = ReplicationOptions {
        continuous: false,
        ..options.clone()
    };
    let push = replicate(local, remote, &options, |_| {}).await?;
    let pull = replicate(remote, local, &options, |_| {}).await?;
    Ok(SyncStats { push, pull })
}

/// A sequence value as a local store's integer sequence.
pub(crate) fn seq_number(since: &Value) -> Result<u64, SyncError> {
    match since {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| SyncError::InvalidResponse {
        url: "local".into(),
        detail: format!("sequence {since} is not a local sequence number"),
    })
}

/// Removes `user:password@` from `url` and returns them percent-decoded.
pub(crate) fn take_url_credentials(url: &mut reqwest::Url) -> Option<(String, String)> {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = (!url.username().is_empty()).then(|| {
        (
            decode(url.username()),
            decode(url.password().unwrap_or_default()),
        )
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    credentials
}
