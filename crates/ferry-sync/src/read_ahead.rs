//! Reading the next pages while the current one is written, and writing them early.
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
//! Up to [`ReplicationOptions::read_ahead_pages`](crate::ReplicationOptions) pages are read
//! ahead, each one's changes requested as soon as the page before it arrived full: one page's
//! round trips (changes, then revs_diff, then fetch) take longer than writing a page, so with
//! a single page ahead the writer waited for them; with two, the source answers one page's
//! changes while it serves the fetch of the page before.
//!
//! A page read ahead is also written ahead: once fetched, its first write (what the state
//! machine will ask for: [`write_len`] of it, and only revisions it asked for) is sent while
//! the writes before it are still being answered, so the target decodes one batch while it
//! commits another. At most [`WRITES_IN_FLIGHT`] writes are in flight, counting the state
//! machine's own. Writing early is safe for the same reasons: the target merges revisions in
//! any order, and the checkpoint still follows the state machine, which sees each write's
//! answer in order.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ferry_core::model::Revision;
use ferry_core::replicate::{check_requested, write_len};
use ferry_core::rev::Rev;
use futures_util::future::{MaybeDone, maybe_done};
use tokio::sync::Semaphore;

use crate::{ChangesFilter, ChangesPage, Peer, RejectedRevision, Seq, SyncError};

/// The most writes of revisions in flight to the target at once, the state machine's own
/// included: one being committed while the next is decoded.
pub(crate) const WRITES_IN_FLIGHT: usize = 2;

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
    prepare_page(source, target, page).await
}

/// Asks the target which revisions of `page` it lacks, and fetches them from the source.
async fn prepare_page<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    page: ChangesPage,
) -> Result<Prepared, SyncError> {
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

/// What a page read ahead tells as it goes: where the page after it starts, as soon as its
/// changes arrived (a full page only), and then the page prepared, before its write is
/// answered.
#[derive(Default)]
pub(crate) struct Progress {
    next: Option<Seq>,
    prepared: Option<Result<Prepared, SyncError>>,
}

/// Where [`prepare_and_write`] reports its [`Progress`].
pub(crate) type Slot = Arc<Mutex<Progress>>;

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Progress> {
    slot.lock().expect("the slot is never poisoned")
}

/// The page after `since` read and prepared, then its first write sent (holding one of the
/// `writes` permits while it is answered), reporting to `slot` as it goes; the future's own
/// output is the write's answer (none if nothing was written).
pub(crate) async fn prepare_and_write<S: Peer, T: Peer>(
    (source, target): (&S, &T),
    filter: &ChangesFilter,
    (since, limit): (Seq, usize),
    max_write_bytes: usize,
    writes: Arc<Semaphore>,
    slot: Slot,
) -> Result<Vec<RejectedRevision>, SyncError> {
    let prepared = async {
        let page = source.changes(&since, limit, filter).await?;
        if page.rows.len() >= limit {
            lock(&slot).next = Some(page.last_seq.clone());
        }
        prepare_page(source, target, page).await
    };
    let mut prepared = match prepared.await {
        Ok(prepared) => prepared,
        Err(error) => {
            lock(&slot).prepared = Some(Err(error));
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
    lock(&slot).prepared = Some(Ok(prepared));
    if ahead.is_empty() {
        return Ok(Vec::new());
    }
    let _in_flight = writes
        .acquire()
        .await
        .expect("the semaphore is never closed");
    target.write_revisions(ahead).await
}

/// One page being read ahead, and where it starts.
struct Page<F: Future> {
    since: Seq,
    slot: Slot,
    work: Pin<Box<MaybeDone<F>>>,
}

/// The pages read ahead of the state machine, oldest first, at most `depth` of them; `start`
/// makes the work of one ([`prepare_and_write`] reporting to the slot it is given).
pub(crate) struct ReadAhead<F: Future, G> {
    depth: usize,
    limit: usize,
    start: G,
    pages: VecDeque<Page<F>>,
}

impl<F, G> ReadAhead<F, G>
where
    F: Future<Output = Result<Vec<RejectedRevision>, SyncError>>,
    G: FnMut(Seq, Slot) -> F,
{
    /// Nothing read ahead yet; pages of `limit` changes, at most `depth` ahead (0: none).
    pub(crate) fn new(depth: usize, limit: usize, start: G) -> ReadAhead<F, G> {
        ReadAhead {
            depth,
            limit,
            start,
            pages: VecDeque::new(),
        }
    }

    /// Starts reading ahead after the page that ends at `since` (a full page of `limit`
    /// changes), unless it already does.
    pub(crate) fn start_after(&mut self, since: Seq, limit: usize) {
        if self.pages.is_empty() && self.depth > 0 && limit == self.limit {
            self.push(since);
        }
    }

    fn push(&mut self, since: Seq) {
        let slot = Slot::default();
        let work = (self.start)(since.clone(), slot.clone());
        self.pages.push_back(Page {
            since,
            slot,
            work: Box::pin(maybe_done(work)),
        });
    }

    /// Lets every page's work progress, and starts the next page as soon as the last one
    /// says where it starts, while fewer than `depth` are read ahead.
    fn poll_pages(&mut self, cx: &mut Context<'_>) {
        loop {
            for page in &mut self.pages {
                // Once done, it keeps its output until `WrittenAhead::answer` takes it.
                let _ = page.work.as_mut().poll(cx);
            }
            if self.pages.len() >= self.depth {
                return;
            }
            match self
                .pages
                .back()
                .and_then(|last| lock(&last.slot).next.take())
            {
                Some(since) => self.push(since),
                None => return,
            }
        }
    }

    /// The prepared page after `since`, when it is the next one read ahead (`None`
    /// otherwise: the caller reads it itself, and what was read ahead is dropped), and its
    /// write if one was started ahead.
    pub(crate) async fn finish(
        &mut self,
        since: &Seq,
        limit: usize,
    ) -> Option<(Result<Prepared, SyncError>, Option<WrittenAhead<F>>)> {
        if limit != self.limit || self.pages.front().is_none_or(|page| page.since != *since) {
            self.pages.clear();
            return None;
        }
        std::future::poll_fn(|cx| {
            self.poll_pages(cx);
            let page = self.pages.front_mut().expect("the page asked for is read");
            let finished = page.work.as_mut().output_mut().is_some();
            if finished || lock(&page.slot).prepared.is_some() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let page = self.pages.pop_front()?;
        if self.pages.is_empty()
            && let Some(next) = lock(&page.slot).next.take()
        {
            // It was the only page ahead: the next one starts now.
            self.push(next);
        }
        let prepared = lock(&page.slot).prepared.take()?;
        let written = match &prepared {
            Ok(prepared) if !prepared.written_ahead.is_empty() => Some(WrittenAhead {
                revisions: prepared.written_ahead.clone(),
                work: page.work,
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

/// Runs `work`, letting the pages read ahead progress meanwhile.
pub(crate) async fn alongside<T, F, G>(
    work: impl Future<Output = T>,
    ahead: &mut ReadAhead<F, G>,
) -> T
where
    F: Future<Output = Result<Vec<RejectedRevision>, SyncError>>,
    G: FnMut(Seq, Slot) -> F,
{
    let background = std::future::poll_fn(|cx| {
        ahead.poll_pages(cx);
        Poll::<()>::Pending
    });
    tokio::select! {
        biased;
        output = work => output,
        () = background => unreachable!("the background poller never finishes"),
    }
}
