//! The async drivers of the replication state machine: [`replicate`] (one way, once or
//! continuously, reading pages ahead) and [`sync`] (push, then pull).

use std::sync::Arc;
use std::time::Duration;

use ferry_core::replicate::{Action, Replication, ReplicationConfig, Response};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{ChangesFilter, Peer, RejectedRevision, Stats, SyncError, read_ahead};

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
    /// How many full batches may go by between two checkpoints (see
    /// [`ReplicationConfig::checkpoint_every`]).
    pub checkpoint_every: usize,
    /// How many pages of changes (of `batch_size`) may be read and fetched ahead of the one
    /// being written, in the background; memory use is proportional to it too. 0 reads one
    /// page at a time.
    pub read_ahead_pages: usize,
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
            checkpoint_every: ferry_core::replicate::DEFAULT_CHECKPOINT_EVERY,
            read_ahead_pages: DEFAULT_READ_AHEAD_PAGES,
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
    let mut progress = progress;
    replicate_reporting(source, target, options, |event| match event {
        ReplicationEvent::Committed(stats) => progress(stats),
        ReplicationEvent::Refused(rejected) => {
            tracing::warn!(doc_id = %rejected.doc_id, rev = %rejected.rev, reason = %rejected.reason, "the target refused a revision");
        }
    })
    .await
}

/// What a replication reports as it goes, in the order it happens.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum ReplicationEvent<'a> {
    /// The target refused this revision on its own; the rest of its batch is being stored.
    /// (Reported before the batch's [`ReplicationEvent::Committed`].)
    Refused(&'a RejectedRevision),
    /// A batch is committed on the target (or, in continuous mode, the replication caught
    /// up): every change of the source up to `last_seq` of these counters is on the target,
    /// except the revisions refused before. (It is checkpointed with the next checkpoint: see
    /// [`ReplicationOptions::checkpoint_every`].)
    Committed(&'a Stats),
}

/// [`replicate`], reporting each [`ReplicationEvent`] to `on_event`: a client acknowledges its
/// outbox up to each committed batch and marks refused documents rejected (in that order, which
/// is the order the events come in; the replication goes on without what was refused).
pub async fn replicate_reporting<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    options: &ReplicationOptions,
    mut on_event: impl FnMut(ReplicationEvent<'_>) + Send,
) -> Result<Stats, SyncError> {
    let mut failures = 0u32;
    let mut jitter = ferry_core::connection::Jitter::seeded(uuid::Uuid::new_v4().as_u64_pair().0);
    loop {
        match replicate_once(source, target, options, &mut on_event).await {
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

/// Pages read ahead by default: one page's round trips (changes, revs_diff, fetch) take
/// longer than writing one. Paired runs of 100,000 documents (BENCHMARKS.md, session 27):
/// pull 52,000 docs/s with one page ahead, 73,000 with two, 77,000 with three, 79,000 with
/// four.
const DEFAULT_READ_AHEAD_PAGES: usize = 3;

/// The first pause after a transient failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

async fn replicate_once<S: Peer, T: Peer>(
    source: &S,
    target: &T,
    options: &ReplicationOptions,
    on_event: &mut (impl FnMut(ReplicationEvent<'_>) + Send),
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
        checkpoint_every: options.checkpoint_every,
    });
    // The pages after the current one, read (and their first writes sent) while the current
    // one is written.
    let writes = Arc::new(Semaphore::new(read_ahead::WRITES_IN_FLIGHT));
    let ahead_writes = writes.clone();
    let limit = options.batch_size.max(1);
    let mut ahead = read_ahead::ReadAhead::new(options.read_ahead_pages, limit, |since, slot| {
        read_ahead::prepare_and_write(
            (source, target),
            &options.filter,
            (since, limit),
            max_write_bytes,
            ahead_writes.clone(),
            slot,
        )
    });
    let mut prepared: Option<read_ahead::Prepared> = None;
    // The current page's first write, when it was sent ahead.
    let mut written_ahead: Option<read_ahead::WrittenAhead<_>> = None;
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
                let (mut next, written) = match ahead.finish(&since, limit).await {
                    Some((next, written)) => (next?, written),
                    None => {
                        let next =
                            read_ahead::prepare(source, target, &options.filter, since, limit)
                                .await?;
                        if next.page.rows.len() >= limit {
                            ahead.start_after(next.page.last_seq.clone(), limit);
                        }
                        (next, None)
                    }
                };
                written_ahead = written;
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
                let rejected = match written_ahead.take() {
                    Some(written) if written.wrote(&revisions) => {
                        drop(revisions);
                        read_ahead::alongside(written.answer(), &mut ahead).await?
                    }
                    _ => {
                        let write = async {
                            let _in_flight = writes
                                .acquire()
                                .await
                                .expect("the semaphore is never closed");
                            target.write_revisions(revisions).await
                        };
                        read_ahead::alongside(write, &mut ahead).await?
                    }
                };
                for refused in &rejected {
                    on_event(ReplicationEvent::Refused(refused));
                }
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
                // Caught up: everything up to the checkpoint is on the target.
                on_event(ReplicationEvent::Committed(replication.stats()));
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
        let batches = replication.stats().batches;
        replication.handle(response)?;
        if replication.stats().batches > batches {
            on_event(ReplicationEvent::Committed(replication.stats()));
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
