//! A peer over a local `ferry_store::Database`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_core::hlc::HlcClock;
use ferry_core::model::{Limits, Revision};
use ferry_core::replicate::{ChangeRow, Checkpoint};
use ferry_core::rev::Rev;
use ferry_store::{Database, StoreError};
use serde_json::Value;

use crate::{ChangesFilter, ChangesPage, Peer, RejectedRevision, SyncError, seq_number};

/// How many store rows one scan step reads while filtering changes.
const SCAN_CHUNK: usize = 500;
/// How often a local wait for changes looks at the store.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A replication peer over a local database (a client's replica, or a server database when
/// replicating inside one process).
///
/// Store calls are blocking SQLite calls, so each runs on tokio's blocking threads.
#[derive(Clone)]
pub struct LocalPeer {
    db: Arc<dyn Database>,
    replica_id: String,
    clock: Arc<Mutex<HlcClock>>,
    revs_limit: usize,
    /// Woken when the owner of the store knows it wrote, so waits need not poll to notice.
    wakeup: Option<tokio::sync::watch::Receiver<u64>>,
}

impl LocalPeer {
    /// A peer over `db`.
    pub fn new(db: Arc<dyn Database>) -> Result<LocalPeer, SyncError> {
        let replica_id = db.info()?.replica_id;
        Ok(LocalPeer {
            db,
            replica_id,
            clock: Arc::new(Mutex::new(HlcClock::new(60_000))),
            revs_limit: Limits::default().revs_limit,
            wakeup: None,
        })
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

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&*db))
            .await
            .map_err(|error| SyncError::Task(error.to_string()))?
            .map_err(SyncError::from)
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
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
        let local = self.blocking(move |db| db.get_local(&id)).await?;
        Ok(local.and_then(|local| serde_json::from_value(Value::Object(local.body)).ok()))
    }

    async fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        let id = replication_id.to_owned();
        let Value::Object(body) = serde_json::to_value(checkpoint).expect("checkpoints serialize")
        else {
            unreachable!("a checkpoint serializes to an object")
        };
        self.blocking(move |db| {
            // Read and write under the store's own revision check; a concurrent writer of the
            // same checkpoint (two replications of one pair) makes this fail, and the retry of
            // the replication resolves it.
            let current = db.get_local(&id)?.map(|local| local.rev);
            db.put_local(&id, current, Some(body)).map(|_| ())
        })
        .await
    }

    async fn changes(
        &self,
        since: &Value,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        let since = seq_number(since)?;
        let filter = filter.clone();
        self.blocking(move |db| {
            let unfiltered = filter.is_empty();
            let chunk = if unfiltered { limit } else { SCAN_CHUNK };
            let bodies = filter.selector.is_some();
            let mut rows = Vec::new();
            let mut cursor = since;
            'scan: loop {
                let changes = db.changes(cursor, chunk, bodies)?;
                let exhausted = changes.len() < chunk;
                for change in changes {
                    cursor = change.seq;
                    if !filter.matches(&change.doc_id, change.deleted, change.body.as_ref()) {
                        continue;
                    }
                    rows.push(ChangeRow {
                        doc_id: change.doc_id,
                        seq: Value::from(change.seq),
                        revs: change.leaves.into_iter().map(|leaf| leaf.rev).collect(),
                        deleted: change.deleted,
                    });
                    if rows.len() >= limit {
                        break 'scan;
                    }
                }
                if exhausted {
                    break;
                }
            }
            let update_seq = db.info()?.update_seq;
            Ok(ChangesPage {
                rows,
                last_seq: Value::from(cursor),
                pending: Some(update_seq.saturating_sub(cursor)),
            })
        })
        .await
    }

    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        let answers = self.blocking(move |db| db.revs_diff(&revs)).await?;
        Ok(answers
            .into_iter()
            .filter(|(_, diff)| !diff.missing.is_empty())
            .map(|(doc_id, diff)| (doc_id, diff.missing))
            .collect())
    }

    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        let revs_limit = self.revs_limit;
        self.blocking(move |db| {
            let wanted: Vec<(String, Rev)> = wanted
                .into_iter()
                .flat_map(|(doc_id, revs)| revs.into_iter().map(move |rev| (doc_id.clone(), rev)))
                .collect();
            let stored = db.get_revisions(&wanted, revs_limit)?;
            let mut revisions = Vec::with_capacity(wanted.len());
            for ((doc_id, rev), stored) in wanted.iter().zip(stored) {
                match stored.and_then(|stored| stored.into_revision()) {
                    Some(revision) => revisions.push(revision),
                    None => {
                        tracing::warn!(%doc_id, %rev, "revision no longer available; skipped")
                    }
                }
            }
            Ok(revisions)
        })
        .await
    }

    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        let default_hlc = {
            let mut clock = self.clock.lock().unwrap_or_else(|error| error.into_inner());
            for hlc in revisions.iter().filter_map(|revision| revision.hlc) {
                // A clock too far ahead is not adopted; the revision keeps its own timestamp.
                let _ = clock.observe(hlc, wall_ms());
            }
            clock.now(wall_ms())
        };
        // A local store takes every valid revision; invalid ones fail the batch as a whole.
        self.blocking(move |db| {
            db.write_revisions(revisions, default_hlc)
                .map(|_| Vec::new())
        })
        .await
    }

    async fn wait_for_changes(&self, since: &Value, timeout: Duration) -> Result<bool, SyncError> {
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
