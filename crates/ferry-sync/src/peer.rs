//! [`Peer`]: one end of a replication, as the drivers see it.

use std::future::Future;
use std::time::Duration;

use ferry_core::model::Revision;
use ferry_core::replicate::{ChangeRow, Checkpoint};
use ferry_core::rev::Rev;

use crate::{ChangesFilter, Seq, SyncError};

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
    pub last_seq: Seq,
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
        since: &Seq,
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
        since: &Seq,
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
