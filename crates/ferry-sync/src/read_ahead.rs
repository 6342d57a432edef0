//! Reading the next batch while the current one is written, and writing it early.
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
//!
//! The page read ahead is also written ahead: once fetched, its first write (what the state
//! machine will ask for: [`write_len`] of it, and only revisions it asked for) is sent while
//! the current write is still being answered, so the target decodes one batch while it
//! commits the other. At most two writes are in flight. Writing early is safe for the same
//! reasons: the target merges revisions in any order, and the checkpoint still follows the
//! state machine, which sees each write's answer in order.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use ferry_core::model::Revision;
use ferry_core::replicate::{check_requested, write_len};
use ferry_core::rev::Rev;
use futures_util::future::{MaybeDone, maybe_done};

use crate::{ChangesFilter, ChangesPage, Peer, RejectedRevision, Seq, SyncError};

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
    /// The revisions written ahead (their ids, in order), if any.
    written_ahead: Vec<(String, Rev)>,
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
        written_ahead: Vec::new(),
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

/// Where [`prepare_and_write`] leaves the prepared page for [`ReadAhead::finish`], before its
/// write is answered.
type Slot = Arc<Mutex<Option<Result<Prepared, SyncError>>>>;

/// An empty slot for [`prepare_and_write`].
pub(crate) fn slot() -> Slot {
    Arc::new(Mutex::new(None))
}

/// [`prepare`], then the page's first write: `slot` gets the prepared page as soon as it is
/// fetched; the future's own output is the write's answer (none if nothing was written).
pub(crate) async fn prepare_and_write<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    filter: &ChangesFilter,
    (since, limit): (Seq, usize),
    max_write_bytes: usize,
    slot: Slot,
) -> Result<Vec<RejectedRevision>, SyncError> {
    let mut prepared = match prepare(source, target, filter, since, limit).await {
        Ok(prepared) => prepared,
        Err(error) => {
            *slot.lock().expect("the slot is never poisoned") = Some(Err(error));
            return Ok(Vec::new());
        }
    };
    // Only what the state machine will ask for: revisions it requested, as many as it writes.
    let ahead = match &prepared.revisions {
        Some(revisions)
            if !revisions.is_empty() && check_requested(&prepared.wanted, revisions).is_ok() =>
        {
            revisions[..write_len(revisions, max_write_bytes)].to_vec()
        }
        _ => Vec::new(),
    };
    prepared.written_ahead = ahead
        .iter()
        .map(|revision| (revision.doc_id.clone(), revision.rev().clone()))
        .collect();
    *slot.lock().expect("the slot is never poisoned") = Some(Ok(prepared));
    if ahead.is_empty() {
        return Ok(Vec::new());
    }
    target.write_revisions(ahead).await
}

/// The next page being prepared, and where it starts.
pub(crate) struct ReadAhead<F: Future> {
    since: Seq,
    limit: usize,
    slot: Slot,
    work: Pin<Box<MaybeDone<F>>>,
}

impl<F: Future<Output = Result<Vec<RejectedRevision>, SyncError>>> ReadAhead<F> {
    /// Starts `work` ([`prepare_and_write`] filling `slot`), for the page after `since`.
    pub(crate) fn start(since: Seq, limit: usize, slot: Slot, work: F) -> ReadAhead<F> {
        ReadAhead {
            since,
            limit,
            slot,
            work: Box::pin(maybe_done(work)),
        }
    }

    /// The prepared page, when it is the one asked for (`None` otherwise: the caller reads it
    /// itself), and its write if one was started ahead.
    pub(crate) async fn finish(
        mut self,
        since: &Seq,
        limit: usize,
    ) -> Option<(Result<Prepared, SyncError>, Option<WrittenAhead<F>>)> {
        if self.since != *since || self.limit != limit {
            return None;
        }
        let slot = self.slot.clone();
        let filled = || slot.lock().expect("the slot is never poisoned").is_some();
        std::future::poll_fn(|cx| {
            let finished = self.work.as_mut().poll(cx).is_ready();
            if finished || filled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let prepared = slot.lock().expect("the slot is never poisoned").take()?;
        let written = match &prepared {
            Ok(prepared) if !prepared.written_ahead.is_empty() => Some(WrittenAhead {
                revisions: prepared.written_ahead.clone(),
                work: self.work,
            }),
            _ => None,
        };
        Some((prepared, written))
    }
}

/// A write started ahead of the state machine.
pub(crate) struct WrittenAhead<F: Future> {
    revisions: Vec<(String, Rev)>,
    work: Pin<Box<MaybeDone<F>>>,
}

impl<F: Future<Output = Result<Vec<RejectedRevision>, SyncError>>> WrittenAhead<F> {
    /// Whether it wrote exactly `revisions`, the write the state machine asks for.
    pub(crate) fn wrote(&self, revisions: &[Revision]) -> bool {
        self.revisions.len() == revisions.len()
            && self
                .revisions
                .iter()
                .zip(revisions)
                .all(|((doc_id, rev), revision)| {
                    *doc_id == revision.doc_id && rev == revision.rev()
                })
    }

    /// The write's answer.
    pub(crate) async fn answer(mut self) -> Result<Vec<RejectedRevision>, SyncError> {
        self.work.as_mut().await;
        self.work
            .as_mut()
            .take_output()
            .expect("a finished write has its answer")
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
