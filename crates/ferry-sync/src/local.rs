//! A peer over a local `ferry_store::Database`: its replica endpoint on blocking threads.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::model::Revision;
use ferry_core::replicate::{Checkpoint, Seq};
use ferry_core::rev::Rev;
use ferry_store::clock::{ReplicaClock, SystemClock};
use ferry_store::endpoint::{
    Endpoint, EndpointConfig, EndpointError, Fanout, KeepConflicts, NoFanout, Resolver,
    WriteOutcome,
};
use ferry_store::{Change, Database, StoreError, StoredRevision};

use crate::{
    BlockingCalls, ChangesFilter, ChangesPage, Peer, RejectedRevision, SyncError, seq_number,
};

/// How often a local wait for changes looks at the store.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How far ahead of this machine's clock a received clock may be and still be adopted, for
/// peers not given the replica's own clock.
const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A replication peer over a local database (a client's replica, or a server database when
/// replicating inside one process): every step is a call of `ferry_store::endpoint`, the
/// same code the server answers with.
///
/// Store calls are blocking SQLite calls, so each runs on tokio's blocking threads, a few at
/// a time ([`BlockingCalls`]).
#[derive(Clone)]
pub struct LocalPeer {
    db: Arc<dyn Database>,
    replica_id: String,
    config: Arc<EndpointConfig>,
    clock: Arc<ReplicaClock>,
    fanout: Arc<dyn Fanout>,
    resolver: Arc<dyn Resolver>,
    /// Woken when the owner of the store knows it wrote, so waits need not poll to notice.
    wakeup: Option<tokio::sync::watch::Receiver<u64>>,
    blocking: BlockingCalls,
}

impl LocalPeer {
    /// A peer over `db`, with default limits, every conflict kept, a clock of its own on the
    /// system's time, nobody told of its writes, and a bound on its store calls of its own.
    pub fn new(db: Arc<dyn Database>) -> Result<LocalPeer, SyncError> {
        let replica_id = db.info()?.replica_id;
        Ok(LocalPeer {
            db,
            replica_id,
            config: Arc::new(EndpointConfig::default()),
            clock: Arc::new(ReplicaClock::new(
                Arc::new(SystemClock),
                DEFAULT_MAX_DRIFT_MS,
            )),
            fanout: Arc::new(NoFanout),
            resolver: Arc::new(KeepConflicts),
            wakeup: None,
            blocking: BlockingCalls::new(BlockingCalls::DEFAULT_MAX)?,
        })
    }

    /// Shares `blocking`'s bound on store calls at once (the replica's other async work's).
    #[must_use]
    pub fn with_blocking_calls(mut self, blocking: BlockingCalls) -> LocalPeer {
        self.blocking = blocking;
        self
    }

    /// Uses the replica's own clock: revisions written here are observed by the clock that
    /// stamps the replica's edits, so an edit always orders after what it was based on.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<ReplicaClock>) -> LocalPeer {
        self.clock = clock;
        self
    }

    /// Checks and resolves by `config` (limits, conflict policies).
    #[must_use]
    pub fn with_config(mut self, config: EndpointConfig) -> LocalPeer {
        self.config = Arc::new(config);
        self
    }

    /// Resolves the conflicts pulled revisions create by `resolver`, right after each batch.
    #[must_use]
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> LocalPeer {
        self.resolver = resolver;
        self
    }

    /// Announces every committed write to `fanout`.
    #[must_use]
    pub fn with_fanout(mut self, fanout: Arc<dyn Fanout>) -> LocalPeer {
        self.fanout = fanout;
        self
    }

    /// Wakes waits for changes as soon as `wakeup` changes, instead of at the next poll (the
    /// client SDK bumps it after each local write). Polling goes on, for writes made by other
    /// processes on the same file.
    #[must_use]
    pub fn with_wakeup(mut self, wakeup: tokio::sync::watch::Receiver<u64>) -> LocalPeer {
        self.wakeup = Some(wakeup);
        self
    }

    /// The database.
    pub fn database(&self) -> &Arc<dyn Database> {
        &self.db
    }

    /// Runs `work` on the replica's endpoint, on a blocking thread.
    async fn endpoint<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Endpoint<'_>) -> Result<T, EndpointError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let peer = self.clone();
        self.blocking
            .run(move || {
                let endpoint = Endpoint::new(&*peer.db, &peer.config, &peer.clock, &*peer.fanout)
                    .resolving_by(&*peer.resolver);
                work(&endpoint)
            })
            .await?
            .map_err(SyncError::from)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let db = self.db.clone();
        self.blocking
            .run(move || work(&*db))
            .await?
            .map_err(SyncError::from)
    }
}

impl Peer for LocalPeer {
    fn describe(&self) -> String {
        format!("local:{}", self.replica_id)
    }

    async fn prepare(&self, _create: bool) -> Result<(), SyncError> {
        Ok(())
    }

    async fn get_checkpoint(&self, replication_id: &str) -> Result<Option<Checkpoint>, SyncError> {
        let id = replication_id.to_owned();
        self.endpoint(move |endpoint| Ok(endpoint.checkpoint(&id)?))
            .await
    }

    async fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        let id = replication_id.to_owned();
        let checkpoint = checkpoint.clone();
        self.endpoint(move |endpoint| endpoint.put_checkpoint(&id, &checkpoint))
            .await
    }

    async fn changes(
        &self,
        since: &Seq,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        let since = seq_number(since)?;
        let filter = filter.clone();
        self.endpoint(move |endpoint| changes(endpoint, since, limit, &filter))
            .await
    }

    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        self.endpoint(move |endpoint| missing(endpoint, &revs))
            .await
    }

    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        self.endpoint(move |endpoint| fetch(endpoint, wanted)).await
    }

    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        let outcome = self
            .endpoint(move |endpoint| endpoint.write_revisions(revisions))
            .await?;
        Ok(refused(outcome))
    }

    async fn wait_for_changes(&self, since: &Seq, timeout: Duration) -> Result<bool, SyncError> {
        let since = seq_number(since)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Marked seen before reading the sequence, so a write after the read wakes us.
            let mut wakeup = self.wakeup.clone();
            if let Some(wakeup) = wakeup.as_mut() {
                wakeup.borrow_and_update();
            }
            let update_seq = self.blocking(|db| db.info()).await?.update_seq;
            if update_seq > since {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            // Polling still runs: other processes writing the same file wake nobody here.
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                Some(Ok(())) = async { Some(wakeup.as_mut()?.changed().await) } => {}
            }
        }
    }
}

// Each step of a replication on a replica's endpoint, synchronous: `LocalPeer` runs them on
// blocking threads, the simulator (`ferry-sim`) calls them as they are.

/// A page of the replica's changes as a replication reads it.
pub fn changes(
    endpoint: &Endpoint<'_>,
    since: u64,
    limit: usize,
    filter: &ChangesFilter,
) -> Result<ChangesPage, EndpointError> {
    let page = endpoint.changes(since, limit, filter, false)?;
    let pending = page.pending();
    Ok(ChangesPage {
        rows: page.changes.into_iter().map(Change::into_row).collect(),
        last_seq: Seq::from(page.last_seq),
        pending: Some(pending),
    })
}

/// Which of `revs` the replica lacks, by document.
pub fn missing(
    endpoint: &Endpoint<'_>,
    revs: &[(String, Vec<Rev>)],
) -> Result<Vec<(String, Vec<Rev>)>, EndpointError> {
    Ok(endpoint
        .revs_diff(revs)?
        .into_iter()
        .map(|(doc_id, diff)| (doc_id, diff.missing))
        .collect())
}

/// The wanted revisions the replica still has, with their bodies and ancestry (one no longer
/// kept is skipped, and said in the log).
pub fn fetch(
    endpoint: &Endpoint<'_>,
    wanted: Vec<(String, Vec<Rev>)>,
) -> Result<Vec<Revision>, EndpointError> {
    let wanted: Vec<(String, Rev)> = wanted
        .into_iter()
        .flat_map(|(doc_id, revs)| revs.into_iter().map(move |rev| (doc_id.clone(), rev)))
        .collect();
    let stored = endpoint.fetch(&wanted)?;
    let mut revisions = Vec::with_capacity(wanted.len());
    for ((doc_id, rev), stored) in wanted.iter().zip(stored) {
        match stored.and_then(StoredRevision::into_revision) {
            Some(revision) => revisions.push(revision),
            None => tracing::warn!(%doc_id, %rev, "revision no longer available; skipped"),
        }
    }
    Ok(revisions)
}

/// The revisions a write refused, as a replication counts them.
pub fn refused(outcome: WriteOutcome) -> Vec<RejectedRevision> {
    outcome
        .acks
        .into_iter()
        .filter_map(|ack| {
            let refused = ack.refused?;
            Some(RejectedRevision {
                doc_id: ack.doc_id,
                rev: ack.rev,
                error: refused.code().to_owned(),
                reason: refused.to_string(),
            })
        })
        .collect()
}
