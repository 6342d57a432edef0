//! Reading the next batch while the current one is written.
//!
//! The replication state machine is sequential: read changes, ask the target what it lacks,
//! fetch those revisions, write them, checkpoint. Done one step at a time, only one side
//! works at any moment: during a push the client waits while the server writes, then the
//! server waits while the client reads the next batch. Everything before the write only
//! reads, so the driver may do it early: as soon as a full page of changes arrives, it starts
//! reading the page after it (changes, revs_diff, fetch) in the background, and answers the
//! state machine's next requests from that work when they match it exactly. Reading early is
//! safe: a change made meanwhile comes in a later page, a revision the target gains meanwhile
//! is written again (writes are idempotent), and nothing is checkpointed that was not written.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use ferry_core::model::Revision;
use ferry_core::rev::Rev;
use futures_util::future::{MaybeDone, maybe_done};

use crate::{ChangesFilter, ChangesPage, Peer, Seq, SyncError};

/// Document ids with revisions, as the revs_diff and fetch steps take and give them.
type DocRevs = Vec<(String, Vec<Rev>)>;

/// A batch read ahead of the state machine.
pub(crate) struct Prepared {
    pub(crate) page: ChangesPage,
    /// The revs_diff request that `missing` answers (the page's rows).
    asked: DocRevs,
    missing: Option<DocRevs>,
    /// The fetch request that `revisions` answers (the missing revisions).
    wanted: DocRevs,
    revisions: Option<Vec<Revision>>,
}

impl Prepared {
    /// The target's answer to `revs`, when it is the question asked ahead.
    pub(crate) fn take_missing(&mut self, revs: &DocRevs) -> Option<DocRevs> {
        if *revs == self.asked {
            self.missing.take()
        } else {
            None
        }
    }

    /// The source's revisions for `wanted`, when they are the ones fetched ahead.
    pub(crate) fn take_revisions(&mut self, wanted: &DocRevs) -> Option<Vec<Revision>> {
        if *wanted == self.wanted {
            self.revisions.take()
        } else {
            None
        }
    }
}

/// Reads the page of changes after `since` and prepares its write, as the state machine would.
pub(crate) async fn prepare<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    filter: &ChangesFilter,
    since: Seq,
    limit: usize,
) -> Result<Prepared, SyncError> {
    let page = source.changes(&since, limit, filter).await?;
    let asked: DocRevs = page
        .rows
        .iter()
        .map(|row| (row.doc_id.clone(), row.revs.clone()))
        .collect();
    let mut prepared = Prepared {
        page,
        asked,
        missing: None,
        wanted: Vec::new(),
        revisions: None,
    };
    if prepared.asked.is_empty() {
        return Ok(prepared);
    }
    let missing = target.revs_diff(prepared.asked.clone()).await?;
    prepared.wanted = missing
        .iter()
        .filter(|(_, revs)| !revs.is_empty())
        .cloned()
        .collect();
    prepared.missing = Some(missing);
    if !prepared.wanted.is_empty() {
        prepared.revisions = Some(source.fetch_revisions(prepared.wanted.clone()).await?);
    }
    Ok(prepared)
}

/// The next page being prepared, and where it starts.
pub(crate) struct ReadAhead<F: Future> {
    since: Seq,
    limit: usize,
    work: Pin<Box<MaybeDone<F>>>,
}

impl<F: Future<Output = Result<Prepared, SyncError>>> ReadAhead<F> {
    pub(crate) fn start(since: Seq, limit: usize, work: F) -> ReadAhead<F> {
        ReadAhead {
            since,
            limit,
            work: Box::pin(maybe_done(work)),
        }
    }

    /// The prepared page, when it is the one asked for (`None` otherwise: the caller reads it
    /// itself).
    pub(crate) async fn finish(
        mut self,
        since: &Seq,
        limit: usize,
    ) -> Option<Result<Prepared, SyncError>> {
        if self.since != *since || self.limit != limit {
            return None;
        }
        self.work.as_mut().await;
        self.work.as_mut().take_output()
    }
}

/// Runs `work`, letting the read-ahead (if any) progress meanwhile.
pub(crate) async fn alongside<T, F: Future>(
    work: impl Future<Output = T>,
    ahead: &mut Option<ReadAhead<F>>,
) -> T {
    let background = std::future::poll_fn(|cx| {
        if let Some(ahead) = ahead.as_mut() {
            // Once done, it keeps its output until `finish` takes it.
            let _ = ahead.work.as_mut().poll(cx);
        }
        Poll::<()>::Pending
    });
    tokio::select! {
        biased;
        output = work => output,
        () = background => unreachable!("the background poller never finishes"),
    }
}
