//! Replication between real SQLite replicas, locally and through a real server on loopback:
//! convergence (invariant 4), resumption after a cut at any point and idempotence (invariant
//! 3), memory bounded by the batch (invariant 6), continuous and filtered replication.

use ferry_test_support::TestServer;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_core::model::{Body, Revision};
use ferry_core::replicate::Checkpoint;
use ferry_core::rev::Rev;
use ferry_store::sqlite::SqliteBackend;
use ferry_store::{Backend, Database, Durability, Edit, StoreConfig};
use ferry_sync::{
    ChangesFilter, ChangesPage, HttpPeer, LocalPeer, Peer, ReplicationOptions, SyncError,
    replicate, sync,
};
use serde_json::{Value, json};

struct Replicas {
    backend: SqliteBackend,
    _dir: tempfile::TempDir,
}

impl Replicas {
    fn new() -> Replicas {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            durability: Durability::Normal,
            ..StoreConfig::default()
        };
        Replicas {
            backend: SqliteBackend::open(dir.path(), config).unwrap(),
            _dir: dir,
        }
    }

    fn create(&self, name: &str) -> Arc<dyn Database> {
        self.backend.create_database(name).unwrap()
    }
}

fn body(value: Value) -> Body {
    value.as_object().unwrap().clone()
}

/// Writes documents `d000`, `d001`, ... with bodies `{"n": n}` in one batch.
fn write_numbered(db: &dyn Database, count: usize) {
    let edits: Vec<Edit> = (0..count)
        .map(|n| Edit::put(format!("d{n:03}"), None, body(json!({ "n": n }))))
        .collect();
    db.write_edits(edits).unwrap();
}

fn put(db: &dyn Database, doc_id: &str, value: Value) -> Rev {
    let base = db
        .get_document(doc_id)
        .unwrap()
        .filter(|document| !document.deleted)
        .map(|document| document.rev);
    db.write_edits(vec![Edit::put(doc_id, base, body(value))])
        .unwrap()
        .remove(0)
        .unwrap()
}

fn delete(db: &dyn Database, doc_id: &str) {
    let rev = db.get_document(doc_id).unwrap().unwrap().rev;
    db.write_edits(vec![Edit::delete(doc_id, rev)])
        .unwrap()
        .remove(0)
        .unwrap();
}

/// Everything that must be identical on converged replicas, per document.
fn digest(db: &dyn Database) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    for change in db.changes(0, 1_000_000, false).unwrap() {
        let document = db.get_document(&change.doc_id).unwrap().unwrap();
        let tree = db.get_tree(&change.doc_id).unwrap().unwrap();
        all.insert(
            change.doc_id.clone(),
            json!({
                "rev": document.rev.to_string(),
                "deleted": document.deleted,
                "body": document.body,
                "conflicts": document.conflicts.iter().map(Rev::to_string).collect::<Vec<_>>(),
                "tree": tree.encode(),
            }),
        );
    }
    all
}

fn options(batch_size: usize) -> ReplicationOptions {
    ReplicationOptions {
        batch_size,
        ..ReplicationOptions::default()
    }
}

async fn local(db: &Arc<dyn Database>) -> LocalPeer {
    LocalPeer::new(db.clone()).unwrap()
}

#[tokio::test]
async fn concurrent_edits_on_two_replicas_converge_through_a_hub() {
    let replicas = Replicas::new();
    let (a, b, hub) = (
        replicas.create("a"),
        replicas.create("b"),
        replicas.create("hub"),
    );
    for n in 0..20 {
        put(&*a, &format!("todos:{n}"), json!({"n": n, "by": "a"}));
    }
    let (peer_a, peer_b, peer_hub) = (local(&a).await, local(&b).await, local(&hub).await);
    sync(&peer_a, &peer_hub, &options(7)).await.unwrap();
    sync(&peer_b, &peer_hub, &options(7)).await.unwrap();
    // Offline, both edit the same documents differently, delete some, create others.
    for n in 0..10 {
        put(&*a, &format!("todos:{n}"), json!({"n": n, "edited": "a"}));
        put(&*b, &format!("todos:{n}"), json!({"n": n, "edited": "b"}));
    }
    delete(&*a, "todos:10");
    put(&*b, "todos:10", json!({"n": 10, "edited": "b"}));
    delete(&*b, "todos:11");
    put(&*a, "notes:a", json!({"text": "from a"}));
    put(&*b, "notes:b", json!({"text": "from b"}));
    // The same edit made independently on both replicas is one revision, not a conflict.
    put(&*a, "todos:12", json!({"same": true}));
    put(&*b, "todos:12", json!({"same": true}));

    sync(&peer_a, &peer_hub, &options(7)).await.unwrap();
    sync(&peer_b, &peer_hub, &options(7)).await.unwrap();
    sync(&peer_a, &peer_hub, &options(7)).await.unwrap();

    let expected = digest(&*hub);
    assert_eq!(digest(&*a), expected);
    assert_eq!(digest(&*b), expected);
    let conflicted = expected
        .values()
        .filter(|doc| !doc["conflicts"].as_array().unwrap().is_empty())
        .count();
    // todos:10 was deleted on one side and edited on the other: the live edit wins and the
    // tombstone stays as a deleted leaf, which (as in CouchDB) is not listed as a conflict.
    assert_eq!(conflicted, 10, "todos:0..9");
    assert!(
        expected["todos:12"]["conflicts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(expected["todos:11"]["deleted"], json!(true));
    assert_eq!(
        expected["todos:10"]["body"]["edited"],
        json!("b"),
        "a live edit beats a deletion"
    );
    assert_eq!(expected.len(), 22);
}

/// Waits until the source answered the fetch of the page after page `write` (page `write` was
/// the `write + 1`-th fetch; the next one is the read-ahead), 5 s at most; whether it did.
async fn next_page_fetched(fetches: &AtomicUsize, write: usize) -> bool {
    reached(fetches, write + 2).await
}

/// Waits until `counter` reaches `count`, 5 s at most; whether it did.
async fn reached(counter: &AtomicUsize, count: usize) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while counter.load(Ordering::SeqCst) < count {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Runs before the n-th write of revisions (counted from 0).
type BeforeWrite = Box<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A peer that fails the `fail_at`-th write (of revisions or checkpoints), and records the
/// largest batch it saw, where each changes read started and how many fetches it answered.
struct Flaky<P> {
    inner: P,
    writes: AtomicUsize,
    revision_writes: AtomicUsize,
    fail_at: usize,
    largest_batch: AtomicUsize,
    first_since: std::sync::Mutex<Vec<ferry_sync::Seq>>,
    changes_reads: Arc<AtomicUsize>,
    fetches: Arc<AtomicUsize>,
    before_write: Option<BeforeWrite>,
    /// Never says changes arrived: a lost notification, every time.
    deaf: bool,
    /// Writes of revisions being answered now, and the most there were at once.
    writing: AtomicUsize,
    most_writing: AtomicUsize,
    /// Writes of revisions answered.
    answered: Arc<AtomicUsize>,
    /// A revision nobody asked for, added to the answer of the fetch that asks for this
    /// document: a hostile source.
    slipped_in: Option<(String, Revision)>,
}

impl<P: Peer> Flaky<P> {
    fn new(inner: P, fail_at: usize) -> Flaky<P> {
        Flaky {
            inner,
            writes: AtomicUsize::new(0),
            fail_at,
            revision_writes: AtomicUsize::new(0),
            largest_batch: AtomicUsize::new(0),
            first_since: std::sync::Mutex::new(Vec::new()),
            changes_reads: Arc::new(AtomicUsize::new(0)),
            fetches: Arc::new(AtomicUsize::new(0)),
            before_write: None,
            deaf: false,
            writing: AtomicUsize::new(0),
            most_writing: AtomicUsize::new(0),
            answered: Arc::new(AtomicUsize::new(0)),
            slipped_in: None,
        }
    }

    /// Holds the write of page `n` (counted from 0, of `pages`) until the source answered the
    /// fetch of the page after it (`fetches`, the source's count), as a server's commit takes
    /// a while: the page read ahead is then ready to be written while this one is answered.
    fn holding_writes_until_the_next_page_is_fetched(
        mut self,
        fetches: Arc<AtomicUsize>,
        pages: usize,
    ) -> Flaky<P> {
        self.before_write = Some(Box::new(move |write| {
            let fetches = fetches.clone();
            Box::pin(async move {
                if write + 1 < pages {
                    next_page_fetched(&fetches, write).await;
                }
            })
        }));
        self
    }

    fn count_write(&self) -> Result<(), SyncError> {
        if self.writes.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(SyncError::Task("injected failure".into()));
        }
        Ok(())
    }
}

impl<P: Peer> Peer for Flaky<P> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn prepare(&self, create: bool) -> Result<(), SyncError> {
        self.inner.prepare(create).await
    }
    async fn get_checkpoint(&self, id: &str) -> Result<Option<Checkpoint>, SyncError> {
        self.inner.get_checkpoint(id).await
    }
    async fn put_checkpoint(&self, id: &str, checkpoint: &Checkpoint) -> Result<(), SyncError> {
        self.count_write()?;
        self.inner.put_checkpoint(id, checkpoint).await
    }
    async fn changes(
        &self,
        since: &ferry_sync::Seq,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        self.first_since.lock().unwrap().push(since.clone());
        self.changes_reads.fetch_add(1, Ordering::SeqCst);
        let page = self.inner.changes(since, limit, filter).await?;
        self.largest_batch
            .fetch_max(page.rows.len(), Ordering::SeqCst);
        Ok(page)
    }
    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        self.inner.revs_diff(revs).await
    }
    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        let slip = self
            .slipped_in
            .as_ref()
            .filter(|(doc_id, _)| wanted.iter().any(|(id, _)| id == doc_id));
        let mut revisions = self.inner.fetch_revisions(wanted).await?;
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if let Some((_, intruder)) = slip {
            revisions.push(intruder.clone());
        }
        Ok(revisions)
    }
    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<ferry_sync::RejectedRevision>, SyncError> {
        let write = self.revision_writes.fetch_add(1, Ordering::SeqCst);
        let writing = self.writing.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_writing.fetch_max(writing, Ordering::SeqCst);
        let answer = async {
            if let Some(before_write) = &self.before_write {
                before_write(write).await;
            }
            self.largest_batch
                .fetch_max(revisions.len(), Ordering::SeqCst);
            self.count_write()?;
            self.inner.write_revisions(revisions).await
        }
        .await;
        self.writing.fetch_sub(1, Ordering::SeqCst);
        self.answered.fetch_add(1, Ordering::SeqCst);
        answer
    }
    async fn wait_for_changes(
        &self,
        since: &ferry_sync::Seq,
        timeout: Duration,
    ) -> Result<bool, SyncError> {
        if self.deaf {
            tokio::time::sleep(timeout).await;
            return Ok(false);
        }
        self.inner.wait_for_changes(since, timeout).await
    }
}

#[tokio::test]
async fn a_replication_cut_at_every_write_resumes_and_converges_without_duplicates() {
    // One page ahead, the cuts fall at the same points of the state machine on every run;
    // three (the default), wherever the writes ahead are when they are cut.
    for read_ahead_pages in [1, 3] {
        let replicas = Replicas::new();
        let (source, target) = (replicas.create("source"), replicas.create("target"));
        for n in 0..300 {
            put(&*source, &format!("d{n:03}"), json!({ "n": n }));
        }
        let source_peer = local(&source).await;
        // Cut the first run at its 1st write, the next at its 2nd, and so on: every cut point
        // between a batch and its checkpoint (one per two batches) is hit once.
        let checkpointing_every_two = ReplicationOptions {
            checkpoint_every: 2,
            read_ahead_pages,
            ..options(40)
        };
        let mut attempts = 0;
        let mut resumed_from_checkpoint = false;
        for fail_at in 1.. {
            attempts += 1;
            let target_peer = Flaky::new(local(&target).await, fail_at);
            let watched_source = Flaky::new(source_peer.clone(), usize::MAX);
            match replicate(
                &watched_source,
                &target_peer,
                &checkpointing_every_two,
                |_| {},
            )
            .await
            {
                Ok(_) => break,
                Err(SyncError::Task(_)) => {
                    let starts = watched_source.first_since.lock().unwrap().clone();
                    resumed_from_checkpoint |= starts
                        .first()
                        .is_some_and(|since| since.number() != Some(0));
                }
                Err(other) => panic!("unexpected error {other}"),
            }
            assert!(attempts < 100, "never finished");
        }
        // Each run resumes where the last one was cut, so later runs have fewer writes left; the
        // schedule still cuts after a batch, before its checkpoint, and after the checkpoint.
        assert!(
            attempts >= 5,
            "the cuts were exercised ({attempts} attempts)"
        );
        // (Deeper, the writes ahead may each be cut before any checkpoint is: when they cut is
        // a matter of timing.)
        assert!(
            resumed_from_checkpoint || read_ahead_pages > 1,
            "a restarted run resumed from its checkpoint"
        );
        assert_eq!(digest(&*target), digest(&*source));
        // Re-applied batches changed nothing: one change per document, no sequence spent twice.
        let info = target.info().unwrap();
        assert_eq!(info.doc_count, 300);
        let seqs: Vec<u64> = target
            .changes(0, 1000, false)
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect();
        assert_eq!(seqs.len(), 300);
        assert_eq!(info.update_seq, 300, "every write landed exactly once");
    }
}

#[tokio::test]
async fn replicating_again_writes_nothing() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    for n in 0..50 {
        put(&*source, &format!("d{n}"), json!({ "n": n }));
    }
    let (source_peer, target_peer) = (local(&source).await, local(&target).await);
    let first = replicate(&source_peer, &target_peer, &options(10), |_| {})
        .await
        .unwrap();
    assert_eq!(first.docs_written, 50);
    let seq = target.info().unwrap().update_seq;
    let second = replicate(&source_peer, &target_peer, &options(10), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (second.docs_read, second.docs_written),
        (0, 0),
        "resumed at the checkpoint"
    );
    // Even without a checkpoint (a new filter is a new replication), nothing is rewritten.
    let fresh = ReplicationOptions {
        filter: ChangesFilter::doc_ids((0..50).map(|n| format!("d{n}"))),
        ..options(10)
    };
    let third = replicate(&source_peer, &target_peer, &fresh, |_| {})
        .await
        .unwrap();
    assert_eq!((third.docs_read, third.docs_written), (50, 0));
    assert_eq!(target.info().unwrap().update_seq, seq);
}

#[tokio::test]
async fn batches_bound_what_is_held_in_memory() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    write_numbered(&*source, 5_000);
    let watched_source = Flaky::new(local(&source).await, usize::MAX);
    let watched_target = Flaky::new(local(&target).await, usize::MAX);
    let mut progress_calls = 0;
    let stats = replicate(&watched_source, &watched_target, &options(100), |_| {
        progress_calls += 1
    })
    .await
    .unwrap();
    assert_eq!(stats.docs_written, 5_000);
    assert_eq!(stats.batches, 50);
    assert_eq!(watched_source.largest_batch.load(Ordering::SeqCst), 100);
    assert_eq!(watched_target.largest_batch.load(Ordering::SeqCst), 100);
    assert!(progress_calls >= 50);
}

#[tokio::test]
async fn pages_read_ahead_and_edited_before_they_are_written_still_converge() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    for n in 0..300 {
        put(&*source, &format!("d{n:03}"), json!({ "n": n }));
    }
    let source_peer = Flaky::new(local(&source).await, usize::MAX);
    let mut target_peer = Flaky::new(local(&target).await, usize::MAX);
    // During each write, wait for the next page to be fetched from the source (read ahead),
    // then edit and delete documents of that page on the source, so the revisions read ahead
    // are stale by the time they are written.
    let fetches = source_peer.fetches.clone();
    let read_ahead_seen = Arc::new(AtomicUsize::new(0));
    let seen = read_ahead_seen.clone();
    let edited = source.clone();
    target_peer.before_write = Some(Box::new(move |write| {
        let (fetches, seen, source) = (fetches.clone(), seen.clone(), edited.clone());
        Box::pin(async move {
            let next_page = (write + 1) * 40;
            if next_page + 2 >= 300 {
                return;
            }
            if next_page_fetched(&fetches, write).await {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            put(
                &*source,
                &format!("d{next_page:03}"),
                json!({"edited": write}),
            );
            put(
                &*source,
                &format!("d{:03}", next_page + 1),
                json!({"edited": write}),
            );
            delete(&*source, &format!("d{:03}", next_page + 2));
        })
    }));
    // One page ahead, so that what each edit misses is known exactly (deeper, the last
    // pages are read before more of the edits are made).
    let one_ahead = ReplicationOptions {
        read_ahead_pages: 1,
        ..options(40)
    };
    let stats = replicate(&source_peer, &target_peer, &one_ahead, |_| {})
        .await
        .unwrap();
    // Pages 1 to 7 were fetched while the page before them was being written.
    assert_eq!(read_ahead_seen.load(Ordering::SeqCst), 7);
    // The stale revisions were written, and the edits made meanwhile came in later pages,
    // except those made while the last page (read ahead before them) was written: like any
    // change made after a one-shot replication read its last page, they wait for the next.
    assert!(stats.docs_written > 300, "{stats:?}");
    let next = replicate(&source_peer, &target_peer, &one_ahead, |_| {})
        .await
        .unwrap();
    assert_eq!(next.docs_written, 3, "{next:?}");
    assert_eq!(digest(&*target), digest(&*source));
    assert_eq!(target.info().unwrap().deleted_count, 7);
}

/// A page read ahead is written while the page before it is still being answered (two
/// writes in flight, never more), and the replica converges with every page written once.
#[tokio::test]
async fn the_page_read_ahead_is_written_while_the_one_before_is_answered() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    write_numbered(&*source, 400);
    let source_peer = Flaky::new(local(&source).await, usize::MAX);
    let target_peer = Flaky::new(local(&target).await, usize::MAX)
        .holding_writes_until_the_next_page_is_fetched(source_peer.fetches.clone(), 10);
    let stats = replicate(&source_peer, &target_peer, &options(40), |_| {})
        .await
        .unwrap();
    assert_eq!((stats.docs_written, stats.batches), (400, 10), "{stats:?}");
    assert_eq!(target_peer.most_writing.load(Ordering::SeqCst), 2);
    assert_eq!(
        target_peer.revision_writes.load(Ordering::SeqCst),
        10,
        "no page written twice"
    );
    assert_eq!(digest(&*target), digest(&*source));
}

/// While the first page is written, the `read_ahead_pages` pages after it are read and
/// fetched (each page's changes asked for as soon as the page before it arrived full), and
/// not one more.
#[tokio::test]
async fn pages_are_read_ahead_as_deep_as_configured_and_no_deeper() {
    for depth in [0, 1, 2, 3] {
        let replicas = Replicas::new();
        let (source, target) = (replicas.create("source"), replicas.create("target"));
        write_numbered(&*source, 400);
        let source_peer = Flaky::new(local(&source).await, usize::MAX);
        let mut target_peer = Flaky::new(local(&target).await, usize::MAX);
        let reads_during_first_write = Arc::new(AtomicUsize::new(usize::MAX));
        let (fetches, reads, seen) = (
            source_peer.fetches.clone(),
            source_peer.changes_reads.clone(),
            reads_during_first_write.clone(),
        );
        target_peer.before_write = Some(Box::new(move |write| {
            let (fetches, reads, seen) = (fetches.clone(), reads.clone(), seen.clone());
            Box::pin(async move {
                // The first page and those read ahead of it, fetched: a read beyond them
                // would have been asked for when the last of them arrived.
                if write == 0 && reached(&fetches, 1 + depth).await {
                    seen.store(reads.load(Ordering::SeqCst), Ordering::SeqCst);
                }
            })
        }));
        let options = ReplicationOptions {
            read_ahead_pages: depth,
            ..options(40)
        };
        let stats = replicate(&source_peer, &target_peer, &options, |_| {})
            .await
            .unwrap();
        assert_eq!((stats.docs_written, stats.batches), (400, 10), "{stats:?}");
        assert_eq!(
            reads_during_first_write.load(Ordering::SeqCst),
            1 + depth,
            "pages read while the first was written, {depth} ahead"
        );
        assert!(target_peer.most_writing.load(Ordering::SeqCst) <= 2);
        assert_eq!(digest(&*target), digest(&*source));
    }
}

/// A source that slips a revision nobody asked for into a page read ahead gets nothing of
/// that page written ahead: the replication fails as the state machine finds it, and neither
/// the intruder nor that page is on the target.
#[tokio::test]
async fn a_revision_slipped_into_a_page_read_ahead_is_not_written_ahead() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    write_numbered(&*source, 120);
    let mut source_peer = Flaky::new(local(&source).await, usize::MAX);
    let intruder = Revision {
        doc_id: "intruder".into(),
        path: vec!["1-abc".parse().unwrap()],
        deleted: false,
        body: ferry_core::json::RawJson::of(&json!({"planted": true})),
        hlc: None,
    };
    // Into the first page read ahead.
    source_peer.slipped_in = Some(("d040".to_owned(), intruder));
    // The first page's write is answered once another write was: the pages read ahead are
    // fetched meanwhile, and the first of them that is written ahead is.
    let mut target_peer = Flaky::new(local(&target).await, usize::MAX);
    let answered = target_peer.answered.clone();
    target_peer.before_write = Some(Box::new(move |write| {
        let answered = answered.clone();
        Box::pin(async move {
            if write == 0 {
                reached(&answered, 1).await;
            }
        })
    }));
    let error = replicate(&source_peer, &target_peer, &options(40), |_| {})
        .await
        .unwrap_err();
    assert!(error.to_string().contains("intruder"), "{error}");
    assert!(target.get_document("intruder").unwrap().is_none());
    let written = |n: usize| target.get_document(&format!("d{n:03}")).unwrap().is_some();
    assert!((0..40).all(written), "the first page");
    assert!(
        !(40..80).any(written),
        "nothing of the page with the intruder"
    );
    assert!(
        (80..120).all(written),
        "the clean page after it, written ahead"
    );
}

#[tokio::test]
async fn continuous_replication_picks_up_later_changes() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    let (source_peer, target_peer) = (local(&source).await, local(&target).await);
    let live = ReplicationOptions {
        continuous: true,
        wait_timeout: Duration::from_millis(500),
        ..options(10)
    };
    let task =
        tokio::spawn(async move { replicate(&source_peer, &target_peer, &live, |_| {}).await });
    put(&*source, "late", json!({"v": 1}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while target.get_document("late").unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !task.is_finished(),
        "a continuous replication keeps running"
    );
    task.abort();
}

/// A live replication whose source never says that changes arrived (a notification lost, a
/// longpoll cut by a proxy) still reads them: after each quiet wait it reads the source again.
#[tokio::test]
async fn a_live_replication_reads_again_after_a_quiet_wait_without_any_notification() {
    let replicas = Replicas::new();
    let (source, target) = (replicas.create("source"), replicas.create("target"));
    let deaf_source = Flaky {
        deaf: true,
        ..Flaky::new(local(&source).await, usize::MAX)
    };
    let target_peer = local(&target).await;
    let live = ReplicationOptions {
        continuous: true,
        wait_timeout: Duration::from_millis(100),
        ..options(10)
    };
    put(&*source, "early", json!({"v": 1}));
    let task =
        tokio::spawn(async move { replicate(&deaf_source, &target_peer, &live, |_| {}).await });
    let arrived = |doc_id: &str| target.get_document(doc_id).unwrap().is_some();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !arrived("early") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first pass never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Caught up and waiting: the next change is announced to nobody.
    put(&*source, "late", json!({"v": 2}));
    while !arrived("late") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a change without a notification never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test]
async fn filtered_replication_moves_only_matching_documents() {
    let replicas = Replicas::new();
    let source = replicas.create("source");
    for n in 0..30 {
        put(&*source, &format!("d{n:02}"), json!({ "n": n }));
    }
    let source_peer = local(&source).await;
    let by_ids = replicas.create("by-ids");
    let stats = replicate(
        &source_peer,
        &local(&by_ids).await,
        &ReplicationOptions {
            filter: ChangesFilter::doc_ids(["d03".into(), "d17".into()]),
            ..options(5)
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(stats.docs_written, 2);
    assert_eq!(by_ids.info().unwrap().doc_count, 2);
    let by_selector = replicas.create("by-selector");
    let selector = json!({"n": {"$gte": 25}});
    replicate(
        &source_peer,
        &local(&by_selector).await,
        &ReplicationOptions {
            filter: ChangesFilter::selector(selector.clone()).unwrap(),
            ..options(5)
        },
        |_| {},
    )
    .await
    .unwrap();
    let ids: Vec<String> = by_selector
        .changes(0, 100, false)
        .unwrap()
        .into_iter()
        .map(|change| change.doc_id)
        .collect();
    assert_eq!(ids, ["d25", "d26", "d27", "d28", "d29"]);
}

/// A server on loopback with authentication off (replication is under test here;
/// authentication has its own tests), and its base URL.
fn start_server() -> (String, TestServer) {
    start_server_with(|_| {})
}

fn start_server_with(
    configure: impl FnOnce(&mut ferry_server::ServerConfig),
) -> (String, TestServer) {
    let mut config = ferry_server::ServerConfig::default();
    configure(&mut config);
    let server = TestServer::without_auth(config);
    (server.base_url(), server)
}

/// Replicas a and b share 40 documents through the server (each through its own remote), edit
/// five of them concurrently, b deletes one, and they sync until they agree: the five are in
/// conflict, with the same winner on both. Returns a's `todos:0`.
async fn edit_concurrently_and_converge(
    a: &Arc<dyn Database>,
    b: &Arc<dyn Database>,
    remote_a: &impl ferry_sync::Peer,
    remote_b: &impl ferry_sync::Peer,
) -> ferry_core::model::Document {
    let create = ReplicationOptions {
        create_target: true,
        ..options(16)
    };
    for n in 0..40 {
        put(&**a, &format!("todos:{n}"), json!({ "n": n }));
    }
    let (peer_a, peer_b) = (local(a).await, local(b).await);
    sync(&peer_a, remote_a, &create).await.unwrap();
    sync(&peer_b, remote_b, &create).await.unwrap();
    for n in 0..5 {
        put(&**a, &format!("todos:{n}"), json!({"n": n, "by": "a"}));
        put(&**b, &format!("todos:{n}"), json!({"n": n, "by": "b"}));
    }
    delete(&**b, "todos:39");
    sync(&peer_a, remote_a, &create).await.unwrap();
    sync(&peer_b, remote_b, &create).await.unwrap();
    sync(&peer_a, remote_a, &create).await.unwrap();
    assert_eq!(digest(&**a), digest(&**b));
    let document = a.get_document("todos:0").unwrap().unwrap();
    assert_eq!(document.conflicts.len(), 1);
    document
}

#[tokio::test]
async fn two_replicas_converge_through_a_real_server_with_their_clocks() {
    let (url, _server) = start_server();
    let replicas = Replicas::new();
    let (a, b) = (replicas.create("a"), replicas.create("b"));
    let remote = HttpPeer::new(&format!("{url}/shared")).unwrap();
    let document = edit_concurrently_and_converge(&a, &b, &remote, &remote).await;
    // Clocks travel with revisions: the revision made on b has b's timestamp on a.
    let from_b = b.get_document("todos:1").unwrap().unwrap();
    let on_b = b.get_revision("todos:1", &from_b.rev, 1).unwrap().unwrap();
    let on_a = a.get_revision("todos:1", &from_b.rev, 1).unwrap().unwrap();
    assert_eq!(on_a.hlc, on_b.hlc);
    // The server is a replica like the others.
    let client = reqwest::Client::new();
    let on_server: Value = client
        .get(format!("{url}/shared/todos:0?conflicts=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(on_server["_rev"], json!(document.rev.to_string()));
    assert_eq!(
        on_server["_conflicts"],
        json!([document.conflicts[0].to_string()])
    );
}

#[tokio::test]
async fn errors_from_the_server_are_typed() {
    let (url, _server) = start_server();
    let replicas = Replicas::new();
    let a = replicas.create("a");
    let missing = HttpPeer::new(&format!("{url}/missing")).unwrap();
    let error = replicate(&local(&a).await, &missing, &options(10), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SyncError::Http { status: 404, error, .. } if error == "not_found"),
        "{error}"
    );
    assert!(!error.is_transient());
    let closed = HttpPeer::new("http://127.0.0.1:9/db").unwrap();
    let error = replicate(&local(&a).await, &closed, &options(10), |_| {})
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(matches!(
        HttpPeer::new("ftp://x/db"),
        Err(SyncError::InvalidUrl(_))
    ));
    assert!(matches!(
        HttpPeer::new("http://127.0.0.1:5984/"),
        Err(SyncError::InvalidUrl(_))
    ));
    let with_password = HttpPeer::new("http://user:secret@127.0.0.1:5984/db").unwrap();
    assert!(!with_password.describe().contains("secret"));
}

#[tokio::test]
async fn replicas_converge_over_websocket_sessions_and_live_pulls_are_woken_by_the_server() {
    use ferry_sync::WsPeer;
    let (url, _server) = start_server();
    let replicas = Replicas::new();
    let (a, b) = (replicas.create("a"), replicas.create("b"));
    let db_url = format!("{url}/ws-shared");
    let remote_a = WsPeer::new(&db_url, "a").unwrap();
    let remote_b = WsPeer::new(&db_url, "b").unwrap();
    assert_eq!(
        remote_a.describe(),
        HttpPeer::new(&db_url).unwrap().describe(),
        "switching transport keeps checkpoints"
    );
    edit_concurrently_and_converge(&a, &b, &remote_a, &remote_b).await;
    let (peer_a, peer_b) = (local(&a).await, local(&b).await);
    let create = ReplicationOptions {
        create_target: true,
        ..options(16)
    };

    // A continuous pull over the session: a change pushed by a reaches b without polling.
    let live = ReplicationOptions {
        continuous: true,
        wait_timeout: Duration::from_secs(20),
        ..options(16)
    };
    let b_for_task = peer_b.clone();
    let pull = tokio::spawn(async move {
        let remote = WsPeer::new(&db_url, "b").unwrap();
        replicate(&remote, &b_for_task, &live, |_| {}).await
    });
    put(&*a, "todos:live", json!({"live": true}));
    sync(&peer_a, &remote_a, &create).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.get_document("todos:live").unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pull.abort();
}

#[tokio::test]
async fn websocket_session_errors_are_typed() {
    use ferry_sync::WsPeer;
    let (url, _server) = start_server();
    let replicas = Replicas::new();
    let a = replicas.create("a");
    let missing = WsPeer::new(&format!("{url}/missing"), "a").unwrap();
    let error = replicate(&local(&a).await, &missing, &options(10), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SyncError::Http { status: 404, error, .. } if error == "not_found"),
        "{error}"
    );
    let closed = WsPeer::new("http://127.0.0.1:9/db", "a").unwrap();
    let error = replicate(&local(&a).await, &closed, &options(10), |_| {})
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(matches!(
        WsPeer::new("http://127.0.0.1:1/a/b", "a"),
        Err(SyncError::InvalidUrl(_))
    ));
}

/// Counts the sessions a `WsPeer` opens: each `hello` asks its credentials once.
#[derive(Default)]
struct CountedSessions(AtomicUsize);

impl ferry_sync::SessionCredentials for CountedSessions {
    fn hello_auth(&self) -> Option<ferry_core::protocol::HelloAuth> {
        self.0.fetch_add(1, Ordering::SeqCst);
        None
    }

    fn reconnect_token_issued(&self, _token: &str, _expires_ms: u64) {}
}

/// The server's session idle timeout comes in `welcome`: a client set to ping every 15 s
/// pings within the server's 1 s instead, and its one session outlives a session opened after
/// it that says nothing (before, the server closed it after 1 s and the next request opened
/// another).
#[tokio::test]
async fn a_session_pings_within_the_servers_idle_timeout() {
    use ferry_sync::WsPeer;
    let (url, _server) = start_server_with(|config| {
        config.session_idle_timeout = Duration::from_secs(1);
    });
    let sessions = Arc::new(CountedSessions::default());
    let remote = WsPeer::new(&format!("{url}/idle"), "quiet")
        .unwrap()
        .with_heartbeat(Duration::from_secs(15), Duration::from_secs(30))
        .with_credentials(sessions.clone());
    remote.prepare(true).await.unwrap();
    // Silence from the application until the server has closed a silent session opened later.
    silent_session_closed(&url, "idle").await;
    assert_eq!(remote.get_checkpoint("nothing").await.unwrap(), None);
    assert_eq!(
        sessions.0.load(Ordering::SeqCst),
        1,
        "the session was closed"
    );
}

/// Opens a session on `db` that sends nothing after its `hello`, and waits (up to 10 s) for
/// the server to close it.
async fn silent_session_closed(url: &str, db: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let session_url = format!("{}/_ferry/sync", url.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(session_url).await.unwrap();
    let hello = json!({"type": "hello", "versions": [1], "db": db, "replica_id": "silent"});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut welcomed = false;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the server closes a silent session");
        match message {
            Some(Ok(Message::Text(text))) => welcomed |= text.contains("\"welcome\""),
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    assert!(welcomed, "the silent session was not opened");
}

/// A server whose request limit is below the client's write batches (2 MB here, against
/// batches of up to 4 MiB): over the session the client keeps each write below the limit the
/// `welcome` states, over HTTP it halves a batch answered 413, and every document arrives.
/// Before, every write was refused (413, or the session closed with 1009) and nothing synced.
#[tokio::test]
async fn writes_stay_below_a_servers_lowered_request_limit_on_both_transports() {
    use ferry_sync::WsPeer;
    let (url, _server) = start_server_with(|config| {
        config.limits.max_request_bytes = 2_000_000;
    });
    let replicas = Replicas::new();
    let source = replicas.create("large");
    for n in 0..10 {
        put(
            &*source,
            &format!("scans:{n}"),
            json!({"n": n, "blob": "x".repeat(900_000)}),
        );
    }
    let source_peer = local(&source).await;
    let create = ReplicationOptions {
        create_target: true,
        ..options(100)
    };
    let over_session = WsPeer::new(&format!("{url}/by-session"), "large").unwrap();
    let stats = replicate(&source_peer, &over_session, &create, |_| {})
        .await
        .unwrap();
    assert_eq!(stats.docs_written, 10, "{stats:?}");
    let over_http = HttpPeer::new(&format!("{url}/by-http")).unwrap();
    let stats = replicate(&source_peer, &over_http, &create, |_| {})
        .await
        .unwrap();
    assert_eq!(stats.docs_written, 10, "{stats:?}");
    assert_eq!(stats.doc_write_failures, 0, "{stats:?}");
    // And back: every document pulled from each.
    for (name, remote) in [("by-session", 0), ("by-http", 1)] {
        let target = replicas.create(&format!("pulled-{name}"));
        let target_peer = local(&target).await;
        let stats = if remote == 0 {
            replicate(&over_session, &target_peer, &options(100), |_| {}).await
        } else {
            replicate(&over_http, &target_peer, &options(100), |_| {}).await
        }
        .unwrap();
        assert_eq!(stats.docs_written, 10, "{name}: {stats:?}");
    }
}
