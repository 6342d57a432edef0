//! Replicating with a server once or over any peer: `sync_once`, `push_to`, `pull_from`, and
//! the push and pull every sync is made of (acknowledging the outbox, recording refusals,
//! re-basing the clock).

use ferry_sync::{
    LocalPeer, Peer, RejectedRevision, ReplicationEvent, ReplicationOptions, Seq, SyncError, WsPeer,
};

use crate::connection::{PullFilter, SyncOptions};
use crate::{ClientError, Ferry};

impl Ferry {
    /// Pushes local changes to the server, then pulls remote ones, once, over a WebSocket
    /// session. Each pushed batch acknowledges the local changes it carried as soon as the
    /// server committed it.
    pub async fn sync_once(
        &self,
        options: &SyncOptions,
    ) -> Result<ferry_sync::SyncStats, ClientError> {
        let once = self.open_once(options).await?;
        let push = self
            .push(&once.local, &once.remote, &once.replication, |_| {})
            .await?;
        let pull = self
            .pull(
                &once.local,
                &once.remote,
                &once.replication,
                &once.pull_filter,
            )
            .await?;
        Ok(ferry_sync::SyncStats { push, pull })
    }

    /// The push half of [`Ferry::sync_once`]: local changes go to the server once, over a
    /// WebSocket session, and nothing is pulled (as before logging out, or to measure an
    /// upload). Each batch acknowledges the local changes it carried once the server committed
    /// it.
    ///
    /// ```no_run
    /// # async fn run(ferry: ferry_client::Ferry) -> Result<(), ferry_client::ClientError> {
    /// use ferry_client::SyncOptions;
    /// let pushed = ferry.push_once(&SyncOptions::new("http://127.0.0.1:5984/notes")).await?;
    /// println!("{} documents up", pushed.docs_written);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push_once(&self, options: &SyncOptions) -> Result<crate::Stats, ClientError> {
        let once = self.open_once(options).await?;
        Ok(self
            .push(&once.local, &once.remote, &once.replication, |_| {})
            .await?)
    }

    /// The pull half of [`Ferry::sync_once`]: the server's changes (those the subscriptions
    /// select) come into this replica once, and nothing is pushed; pulled conflicts are
    /// resolved by the collections' policies and watchers are woken.
    pub async fn pull_once(&self, options: &SyncOptions) -> Result<crate::Stats, ClientError> {
        let once = self.open_once(options).await?;
        Ok(self
            .pull(
                &once.local,
                &once.remote,
                &once.replication,
                &once.pull_filter,
            )
            .await?)
    }

    /// A session for one sync: the server's database made sure of, the clock re-based on it.
    async fn open_once(&self, options: &SyncOptions) -> Result<OnceSession, ClientError> {
        let (local, remote, pull_filter) = self
            .blocking({
                let options = options.clone();
                move |ferry| {
                    let (remote, _) = ferry.session_peer(&options)?;
                    let pull_filter = ferry.pull_filter(&options)?;
                    Ok::<_, ClientError>((ferry.local_peer()?, remote, pull_filter))
                }
            })
            .await??;
        remote.prepare(true).await?;
        self.rebase_clock(&remote).await?;
        let replication = ReplicationOptions {
            create_target: true,
            batch_size: options.batch_size,
            max_write_bytes: options.max_write_bytes,
            ..ReplicationOptions::default()
        };
        Ok(OnceSession {
            local,
            remote,
            pull_filter,
            replication,
        })
    }

    /// Re-bases the replica's clock on the server's time (from the session's welcome, or an
    /// HTTP server's `Date`) and gives the waiting edits it stamped too far ahead for the
    /// server new clocks, before anything is pushed: a device whose clock is far off would
    /// otherwise have every edit refused as `clock_ahead`. The correction lasts while the replica is open; after it is opened again,
    /// the next session corrects edits made meanwhile.
    pub(crate) async fn rebase_clock(&self, remote: &impl Peer) -> Result<(), SyncError> {
        let Some(server_ms) = remote.server_time_ms() else {
            return Ok(());
        };
        self.blocking(move |ferry| {
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
        .await?
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
        let local = self.blocking(|ferry| ferry.local_peer()).await??;
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
        let local = self.blocking(|ferry| ferry.local_peer()).await??;
        let stats = ferry_sync::replicate(remote, &local, options, progress).await?;
        self.blocking(|ferry| ferry.notify_changed()).await?;
        Ok(stats)
    }

    /// Replicates local changes to `remote`, acknowledging each batch it commits.
    pub(crate) async fn push(
        &self,
        local: &LocalPeer,
        remote: &impl Peer,
        replication: &ReplicationOptions,
        mut progress: impl FnMut(&ferry_sync::Stats) + Send,
    ) -> Result<ferry_core::replicate::Stats, SyncError> {
        let (record, recorder) = self.outbox_recorder();
        let result =
            ferry_sync::replicate_reporting(local, remote, replication, |event| match event {
                ReplicationEvent::Committed(stats) => {
                    let _ = record.send(OutboxRecord::AcknowledgeThrough(stats.last_seq.clone()));
                    progress(stats);
                }
                ReplicationEvent::Refused(rejected) => {
                    let _ = record.send(OutboxRecord::Reject(rejected.clone()));
                }
                _ => {}
            })
            .await;
        if let Ok(stats) = &result {
            let _ = record.send(OutboxRecord::AcknowledgeThrough(stats.last_seq.clone()));
        }
        // Whatever ended the push, what the server committed is recorded before it returns.
        drop(record);
        recorder
            .await
            .map_err(|error| SyncError::Task(error.to_string()))?;
        result
    }

    /// A task that records in the outbox, in order, what a push reports, on the replica's
    /// store threads: a refusal must be recorded before the acknowledgement of its batch,
    /// which would otherwise drop the refused document's entry. What arrived while the last
    /// records were written goes in one store call. Closing the sender ends it.
    fn outbox_recorder(
        &self,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<OutboxRecord>,
        tokio::task::JoinHandle<()>,
    ) {
        let (record, mut records) = tokio::sync::mpsc::unbounded_channel();
        let ferry = self.clone();
        let recorder = tokio::spawn(async move {
            while let Some(first) = records.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = records.try_recv() {
                    batch.push(next);
                }
                let written = ferry.blocking(move |ferry| {
                    for record in batch {
                        match record {
                            OutboxRecord::AcknowledgeThrough(seq) => ferry.acknowledge(&seq),
                            OutboxRecord::Reject(rejected) => ferry.reject(&rejected),
                        }
                    }
                });
                if let Err(error) = written.await {
                    tracing::warn!(%error, "could not record what a push reported");
                }
            }
        });
        (record, recorder)
    }

    /// Marks a document the server refused as rejected in the outbox, unless it was edited
    /// again since the refused revision was read (the new edit deserves its own try).
    pub(crate) fn reject(&self, rejected: &ferry_sync::RejectedRevision) {
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
    pub(crate) async fn pull(
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
        self.blocking(|ferry| ferry.notify_changed()).await?;
        Ok(stats)
    }
}

/// What a push records in the outbox, in the order the replication reported it.
enum OutboxRecord {
    /// Everything up to this source sequence is on the server.
    AcknowledgeThrough(Seq),
    /// The server refused this revision.
    Reject(RejectedRevision),
}

/// What [`Ferry::sync_once`] and its halves replicate with.
struct OnceSession {
    local: LocalPeer,
    remote: WsPeer,
    pull_filter: PullFilter,
    replication: ReplicationOptions,
}
