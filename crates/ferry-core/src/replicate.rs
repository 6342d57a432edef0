//! One-way replication as a state machine with no I/O.
//!
//! This is the LoopBack replication algorithm in the CouchDB replication protocol's terms.
//! One iteration:
//!
//! 1. read the checkpoints stored on both sides and agree where to start;
//! 2. read a batch of changes from the source since that point;
//! 3. ask the target which of those revisions it lacks (revs-diff);
//! 4. fetch the missing revisions from the source, with their ancestry;
//! 5. write them to the target, which merges them into its trees and never overwrites;
//! 6. go on with the next batch; every [`ReplicationConfig::checkpoint_every`] batches, and
//!    once caught up, record the checkpoint on both sides first.
//!
//! The caller owns the transport: it asks [`Replication::next_action`] what to do, does it
//! against the two peers, and hands the result to [`Replication::handle`]. Only one batch is in
//! flight at a time, so memory is bounded by the batch size however many changes are pending
//! (invariant 6). Every step is idempotent on the target, and a checkpoint is only written after
//! the batch it covers was committed, so a replication cut at any point and restarted converges
//! to the same result (invariant 3).
//!
//! ```
//! use ferry_core::replicate::{Action, Replication, ReplicationConfig, Response, Seq};
//! let mut replication = Replication::new(ReplicationConfig::new("rep-1", "session-1"));
//! assert!(matches!(replication.next_action(), Action::ReadCheckpoints));
//! replication.handle(Response::Checkpoints { source: None, target: None }).unwrap();
//! let Action::ReadChanges { since, .. } = replication.next_action() else { panic!() };
//! assert_eq!(since, Seq::from(0));
//! replication.handle(Response::Changes { rows: vec![], last_seq: since, pending: Some(0) }).unwrap();
//! assert!(matches!(replication.next_action(), Action::Finished(_)));
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::Revision;
use crate::rev::Rev;

/// How many past sessions a checkpoint remembers, as PouchDB does.
const CHECKPOINT_HISTORY: usize = 5;

/// Settings of one replication.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// Names the checkpoint document (`_local/{replication_id}`) on both sides. The same
    /// source, target and filter must give the same id, so a restarted replication resumes.
    pub replication_id: String,
    /// A new id for every run, recorded in the checkpoint (see [`Checkpoint`]).
    pub session_id: String,
    /// How many changes one batch reads.
    pub batch_size: usize,
    /// The most bytes of revisions one write carries (bodies as encoded JSON, with ids and
    /// ancestry): a batch of large documents is written in several requests, so none exceeds
    /// the target's request or frame limit. A revision larger than this is written alone.
    pub max_write_bytes: usize,
    /// Whether to keep following the source once caught up.
    pub continuous: bool,
    /// How many full batches may be written between two checkpoints (at least 1; 1 is
    /// PouchDB's way). A checkpoint costs a durable write on each side, one after the other
    /// (measured: a fifth of the time a batch of 500 small documents takes to write); a
    /// replication cut between two checkpoints reads the batches since the last one again and
    /// finds them on the target. A replication that catches up always checkpoints.
    pub checkpoint_every: usize,
}

/// The default of [`ReplicationConfig::max_write_bytes`]: far below the server's default
/// request limit (32 MiB), and above its document limit (1 MiB), so the largest document
/// shares a write with others.
pub const DEFAULT_MAX_WRITE_BYTES: usize = 4 * 1024 * 1024;

/// The default of [`ReplicationConfig::checkpoint_every`]: with the SDK's batches of 500, a
/// checkpoint every 4,000 changes.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 8;

impl ReplicationConfig {
    /// A one-shot replication with batches of 100.
    pub fn new(replication_id: impl Into<String>, session_id: impl Into<String>) -> Self {
        ReplicationConfig {
            replication_id: replication_id.into(),
            session_id: session_id.into(),
            batch_size: 100,
            max_write_bytes: DEFAULT_MAX_WRITE_BYTES,
            continuous: false,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }
}

/// A position in a source's changes feed, as the source gave it: Ferry's and PouchDB's are
/// integers, CouchDB's (since 2.0) opaque strings. Replication only compares sequences for
/// equality and hands them back to the source that made them; a local store reads its own
/// numbers from them ([`Seq::number`]). Serialized as the source wrote it (a number or a
/// string), so checkpoints keep CouchDB's format.
///
/// ```
/// use ferry_core::replicate::Seq;
/// assert_eq!(Seq::from(42).number(), Some(42));
/// assert_eq!(Seq::default(), Seq::from(0));
/// let couch: Seq = serde_json::from_str(r#""12-g1AAAAE""#).unwrap();
/// assert_eq!(couch.number(), None);
/// assert_eq!(couch.to_string(), "12-g1AAAAE");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Seq {
    /// An integer sequence (Ferry, PouchDB, CouchDB 1.x).
    Number(u64),
    /// An opaque sequence (CouchDB 2 and later), or another JSON value's text.
    Opaque(String),
}

impl Seq {
    /// The sequence as an integer, when it is one (a number, or a string of digits).
    pub fn number(&self) -> Option<u64> {
        match self {
            Seq::Number(number) => Some(*number),
            Seq::Opaque(text) => text.parse().ok(),
        }
    }

    /// A sequence from a changes feed's JSON: a number or a string as it is, anything else
    /// (old BigCouch arrays) kept as its JSON text. `None` for what no feed sends (null,
    /// negative or fractional numbers).
    pub fn from_json(value: &Value) -> Option<Seq> {
        match value {
            Value::Number(number) => number.as_u64().map(Seq::Number),
            Value::String(text) => Some(Seq::Opaque(text.clone())),
            Value::Array(_) | Value::Object(_) => Some(Seq::Opaque(value.to_string())),
            Value::Null | Value::Bool(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Seq {
    /// As [`Seq::from_json`] reads it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Seq, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Seq::from_json(&value).ok_or_else(|| {
            serde::de::Error::custom(format!("{value} is not a changes-feed sequence"))
        })
    }
}

impl Default for Seq {
    /// The start of every feed.
    fn default() -> Seq {
        Seq::Number(0)
    }
}

impl From<u64> for Seq {
    fn from(number: u64) -> Seq {
        Seq::Number(number)
    }
}

impl std::fmt::Display for Seq {
    /// As a `since` query parameter carries it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seq::Number(number) => write!(f, "{number}"),
            Seq::Opaque(text) => f.write_str(text),
        }
    }
}

/// A replication checkpoint, stored as a local document on both sides.
///
/// The `last_seq` of a checkpoint is trusted only if the source and the target hold the same
/// session's checkpoint; otherwise (one side was restored from a backup, or a write of the
/// checkpoint failed on one side) the newest session both histories share is used, and failing
/// that the replication starts over, which is safe because every step is idempotent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The session that wrote this checkpoint.
    pub session_id: String,
    /// The last source sequence whose changes are all on the target.
    pub last_seq: Seq,
    /// Earlier sessions, newest first.
    #[serde(default)]
    pub history: Vec<CheckpointEntry>,
}

/// A past session in a checkpoint's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    /// The session.
    pub session_id: String,
    /// Its last sequence.
    pub last_seq: Seq,
}

/// One row of a source's changes feed: a document and its current leaves.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeRow {
    /// The document id.
    pub doc_id: String,
    /// The sequence of the document's latest change.
    pub seq: Seq,
    /// The document's leaf revisions.
    pub revs: Vec<Rev>,
    /// Whether the winner is deleted.
    pub deleted: bool,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Read the checkpoint document `_local/{replication_id}` from both sides; answer with
    /// [`Response::Checkpoints`].
    ReadCheckpoints,
    /// Read at most `limit` changes from the source after `since`; answer with
    /// [`Response::Changes`].
    ReadChanges {
        /// The sequence to read after.
        since: Seq,
        /// The most rows to return.
        limit: usize,
    },
    /// Ask the target which of these revisions it lacks; answer with [`Response::Missing`].
    RevsDiff {
        /// Document ids with the revisions to ask about.
        revs: Vec<(String, Vec<Rev>)>,
    },
    /// Read these revisions from the source with their bodies and ancestry; answer with
    /// [`Response::Revisions`].
    FetchRevisions {
        /// Document ids with the revisions wanted.
        wanted: Vec<(String, Vec<Rev>)>,
    },
    /// Write these revisions to the target as they are (`new_edits=false`), atomically or at
    /// least each revision idempotently; answer with [`Response::Written`].
    WriteRevisions {
        /// The revisions, with their ancestry.
        revisions: Vec<Revision>,
    },
    /// Store this checkpoint on the target and then on the source; answer with
    /// [`Response::CheckpointWritten`].
    WriteCheckpoint {
        /// The checkpoint.
        checkpoint: Checkpoint,
    },
    /// Caught up: wait until the source has changes after `since`; answer with
    /// [`Response::ChangesAvailable`]. Only in continuous mode.
    WaitForChanges {
        /// The sequence the target has everything up to.
        since: Seq,
    },
    /// Done (one-shot mode, caught up).
    Finished(Stats),
}

/// The result of an [`Action`].
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    /// Answers [`Action::ReadCheckpoints`].
    Checkpoints {
        /// The source's checkpoint, if it has one.
        source: Option<Checkpoint>,
        /// The target's checkpoint, if it has one.
        target: Option<Checkpoint>,
    },
    /// Answers [`Action::ReadChanges`].
    Changes {
        /// The rows, in sequence order.
        rows: Vec<ChangeRow>,
        /// The sequence to continue after (may be past the last row when rows were filtered).
        last_seq: Seq,
        /// How many changes remain after this batch, when the source says.
        pending: Option<u64>,
    },
    /// Answers [`Action::RevsDiff`]: the revisions the target lacks.
    Missing(Vec<(String, Vec<Rev>)>),
    /// Answers [`Action::FetchRevisions`].
    Revisions(Vec<Revision>),
    /// Answers [`Action::WriteRevisions`]: the batch is stored, except `rejected` revisions
    /// the target refused individually (they are not retried: the source's owner is told).
    Written {
        /// How many revisions of the batch the target refused.
        rejected: u64,
    },
    /// Answers [`Action::WriteCheckpoint`].
    CheckpointWritten,
    /// Answers [`Action::WaitForChanges`].
    ChangesAvailable,
}

/// Counters of a replication so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Change rows read from the source.
    pub docs_read: u64,
    /// Revisions the target lacked.
    pub missing_revs: u64,
    /// Revisions written to the target.
    pub docs_written: u64,
    /// Revisions the target refused one by one (too large, invalid); the batch went on.
    pub doc_write_failures: u64,
    /// Batches written (see [`ReplicationConfig::checkpoint_every`] for their checkpoints).
    pub batches: u64,
    /// Changes the source reported still pending after the last batch, if it said.
    pub pending: Option<u64>,
    /// Everything up to this source sequence is on the target (it is checkpointed at the
    /// next checkpoint).
    pub last_seq: Seq,
}

/// A response that does not fit the action that was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The response answers a different action.
    #[error("unexpected response while {0}")]
    UnexpectedResponse(&'static str),
    /// The source returned a revision that was not asked for.
    #[error("the source returned {doc_id} {rev}, which was not requested")]
    UnrequestedRevision {
        /// The document.
        doc_id: String,
        /// The revision.
        rev: String,
    },
    /// The source returned a revision without a path.
    #[error("the source returned a revision of {0} without a revision id")]
    EmptyPath(String),
}

#[derive(Clone, Debug)]
enum State {
    Start,
    AwaitCheckpoints,
    ReadChanges,
    AwaitChanges,
    RevsDiff,
    AwaitMissing,
    Fetch,
    AwaitRevisions,
    /// The fetched revisions not written yet, in order.
    Write(Vec<Revision>),
    /// How many revisions are being written, and those to write after them.
    AwaitWritten(u64, Vec<Revision>),
    Checkpoint,
    AwaitCheckpointWritten,
    Wait,
    AwaitChangesAvailable,
    Finished,
}

/// The replication state machine (see the module documentation).
#[derive(Clone, Debug)]
pub struct Replication {
    config: ReplicationConfig,
    state: State,
    /// The sequence everything before which is on the target.
    since: Seq,
    /// Earlier sessions, for the checkpoint history.
    history: Vec<CheckpointEntry>,
    /// The batch in flight.
    batch: Vec<ChangeRow>,
    batch_last_seq: Seq,
    batch_was_full: bool,
    /// Batches written since the last checkpoint.
    unchecked_batches: usize,
    missing: Vec<(String, Vec<Rev>)>,
    stats: Stats,
}

impl Replication {
    /// A replication that has not started.
    pub fn new(config: ReplicationConfig) -> Replication {
        Replication {
            config,
            state: State::Start,
            since: Seq::from(0),
            history: Vec::new(),
            batch: Vec::new(),
            batch_last_seq: Seq::from(0),
            batch_was_full: false,
            unchecked_batches: 0,
            missing: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    /// The counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The source sequence the target holds everything up to (checkpointed or not yet).
    pub fn seq_on_target(&self) -> &Seq {
        &self.since
    }

    /// What to do next. Each action is handed out once; when carrying it out fails, the caller
    /// drops this replication and starts a new one, which resumes from the last checkpoint.
    pub fn next_action(&mut self) -> Action {
        match &self.state {
            State::Start | State::AwaitCheckpoints => {
                self.state = State::AwaitCheckpoints;
                Action::ReadCheckpoints
            }
            State::ReadChanges | State::AwaitChanges => {
                self.state = State::AwaitChanges;
                Action::ReadChanges {
                    since: self.since.clone(),
                    limit: self.config.batch_size.max(1),
                }
            }
            State::RevsDiff | State::AwaitMissing => {
                self.state = State::AwaitMissing;
                Action::RevsDiff {
                    revs: self
                        .batch
                        .iter()
                        .map(|row| (row.doc_id.clone(), row.revs.clone()))
                        .collect(),
                }
            }
            State::Fetch | State::AwaitRevisions => {
                self.state = State::AwaitRevisions;
                Action::FetchRevisions {
                    wanted: self.missing.clone(),
                }
            }
            State::Write(_) => {
                let State::Write(mut revisions) =
                    std::mem::replace(&mut self.state, State::AwaitWritten(0, Vec::new()))
                else {
                    unreachable!("matched above")
                };
                let rest = revisions.split_off(write_len(&revisions, self.config.max_write_bytes));
                self.state = State::AwaitWritten(revisions.len() as u64, rest);
                Action::WriteRevisions { revisions }
            }
            // The revisions moved to the caller with the first request; nothing is left to
            // hand out until the write is answered.
            State::AwaitWritten(..) => Action::WriteRevisions {
                revisions: Vec::new(),
            },
            State::Checkpoint | State::AwaitCheckpointWritten => {
                self.state = State::AwaitCheckpointWritten;
                Action::WriteCheckpoint {
                    checkpoint: self.checkpoint_for(self.since.clone()),
                }
            }
            State::Wait | State::AwaitChangesAvailable => {
                self.state = State::AwaitChangesAvailable;
                Action::WaitForChanges {
                    since: self.since.clone(),
                }
            }
            State::Finished => Action::Finished(self.stats.clone()),
        }
    }

    /// Hands the result of the last action to the state machine.
    pub fn handle(&mut self, response: Response) -> Result<(), ReplicationError> {
        if let (State::AwaitWritten(count, _), Response::Written { rejected }) =
            (&mut self.state, &response)
        {
            let rejected = (*rejected).min(*count);
            self.stats.docs_written += *count - rejected;
            self.stats.doc_write_failures += rejected;
            let State::AwaitWritten(_, rest) =
                std::mem::replace(&mut self.state, State::Checkpoint)
            else {
                unreachable!("matched above")
            };
            self.state = if rest.is_empty() {
                self.batch_written()
            } else {
                // The rest of the batch, in further writes.
                State::Write(rest)
            };
            return Ok(());
        }
        match (&self.state, response) {
            (State::AwaitCheckpoints, Response::Checkpoints { source, target }) => {
                let (since, history) = agree_on_start(source.as_ref(), target.as_ref());
                self.stats.last_seq = since.clone();
                self.since = since;
                self.history = history;
                self.state = State::ReadChanges;
            }
            (
                State::AwaitChanges,
                Response::Changes {
                    rows,
                    last_seq,
                    pending,
                },
            ) => {
                self.stats.docs_read += rows.len() as u64;
                self.stats.pending = pending;
                self.batch_was_full = rows.len() >= self.config.batch_size.max(1);
                self.batch_last_seq = last_seq;
                self.batch = rows;
                self.state = if !self.batch.is_empty() {
                    State::RevsDiff
                } else if self.batch_last_seq != self.since {
                    // Every row was filtered out, but the source moved on: remember that.
                    self.batch_written()
                } else if self.unchecked_batches > 0 {
                    State::Checkpoint
                } else {
                    self.caught_up()
                };
            }
            (State::AwaitMissing, Response::Missing(missing)) => {
                let missing: Vec<(String, Vec<Rev>)> = missing
                    .into_iter()
                    .filter(|(_, revs)| !revs.is_empty())
                    .collect();
                self.stats.missing_revs += missing
                    .iter()
                    .map(|(_, revs)| revs.len() as u64)
                    .sum::<u64>();
                self.missing = missing;
                self.state = if self.missing.is_empty() {
                    self.batch_written()
                } else {
                    State::Fetch
                };
            }
            (State::AwaitRevisions, Response::Revisions(revisions)) => {
                self.check_requested(&revisions)?;
                self.state = if revisions.is_empty() {
                    self.batch_written()
                } else {
                    State::Write(revisions)
                };
            }
            (State::AwaitCheckpointWritten, Response::CheckpointWritten) => {
                self.unchecked_batches = 0;
                self.state = if self.batch_was_full {
                    State::ReadChanges
                } else {
                    self.caught_up()
                };
            }
            (State::AwaitChangesAvailable, Response::ChangesAvailable) => {
                self.state = State::ReadChanges;
            }
            (state, _) => return Err(ReplicationError::UnexpectedResponse(describe(state))),
        }
        Ok(())
    }

    /// The batch in flight is on the target: the next batch follows, after a checkpoint when
    /// enough batches went by unchecked or the source has nothing more.
    fn batch_written(&mut self) -> State {
        self.stats.batches += 1;
        self.since = self.batch_last_seq.clone();
        self.stats.last_seq = self.since.clone();
        self.batch.clear();
        self.missing.clear();
        self.unchecked_batches += 1;
        if self.batch_was_full && self.unchecked_batches < self.config.checkpoint_every.max(1) {
            State::ReadChanges
        } else {
            State::Checkpoint
        }
    }

    fn caught_up(&self) -> State {
        if self.config.continuous {
            State::Wait
        } else {
            State::Finished
        }
    }

    fn check_requested(&self, revisions: &[Revision]) -> Result<(), ReplicationError> {
        check_requested(&self.missing, revisions)
    }

    fn checkpoint_for(&self, last_seq: Seq) -> Checkpoint {
        let mut history = vec![CheckpointEntry {
            session_id: self.config.session_id.clone(),
            last_seq: last_seq.clone(),
        }];
        history.extend(
            self.history
                .iter()
                .filter(|entry| entry.session_id != self.config.session_id)
                .take(CHECKPOINT_HISTORY - 1)
                .cloned(),
        );
        Checkpoint {
            session_id: self.config.session_id.clone(),
            last_seq,
            history,
        }
    }
}

fn describe(state: &State) -> &'static str {
    match state {
        State::Start | State::AwaitCheckpoints => "reading checkpoints",
        State::ReadChanges | State::AwaitChanges => "reading changes",
        State::RevsDiff | State::AwaitMissing => "asking for missing revisions",
        State::Fetch | State::AwaitRevisions => "fetching revisions",
        State::Write(_) | State::AwaitWritten(..) => "writing revisions",
        State::Checkpoint | State::AwaitCheckpointWritten => "writing the checkpoint",
        State::Wait | State::AwaitChangesAvailable => "waiting for changes",
        State::Finished => "finished",
    }
}

/// Where a replication starts, given the checkpoints of both sides, and the history to carry on.
fn agree_on_start(
    source: Option<&Checkpoint>,
    target: Option<&Checkpoint>,
) -> (Seq, Vec<CheckpointEntry>) {
    let (Some(source), Some(target)) = (source, target) else {
        return (Seq::default(), Vec::new());
    };
    if source.session_id == target.session_id && source.last_seq == target.last_seq {
        return (source.last_seq.clone(), source.history.clone());
    }
    // The newest session both sides remember, at the lower of the two sequences recorded.
    for entry in &source.history {
        if let Some(other) = target
            .history
            .iter()
            .find(|other| other.session_id == entry.session_id)
        {
            let seq = if other.last_seq == entry.last_seq {
                entry.last_seq.clone()
            } else {
                // Sequences are opaque in general; when they differ, trust neither.
                continue;
            };
            return (seq, source.history.clone());
        }
    }
    (Seq::default(), Vec::new())
}

/// That every revision fetched is one of `wanted` (a source may not slip in documents it was
/// not asked for, such as ones a filter leaves out).
pub fn check_requested(
    wanted: &[(String, Vec<Rev>)],
    revisions: &[Revision],
) -> Result<(), ReplicationError> {
    let requested: BTreeMap<&str, BTreeSet<&Rev>> = wanted
        .iter()
        .map(|(doc_id, revs)| (doc_id.as_str(), revs.iter().collect()))
        .collect();
    for revision in revisions {
        let Some(rev) = revision.path.first() else {
            return Err(ReplicationError::EmptyPath(revision.doc_id.clone()));
        };
        let asked = requested
            .get(revision.doc_id.as_str())
            .is_some_and(|revs| revs.contains(rev));
        if !asked {
            return Err(ReplicationError::UnrequestedRevision {
                doc_id: revision.doc_id.clone(),
                rev: rev.to_string(),
            });
        }
    }
    Ok(())
}

/// How many of `revisions` (at least one) the next write carries: as many as fit in
/// `max_bytes` (a driver writing a batch ahead of the state machine writes as many).
pub fn write_len(revisions: &[Revision], max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    for (index, revision) in revisions.iter().enumerate() {
        bytes = bytes.saturating_add(revision_bytes(revision));
        if bytes > max_bytes {
            return index.max(1);
        }
    }
    revisions.len()
}

/// About what a revision takes on the wire: its body's JSON, its id, and its ancestry.
fn revision_bytes(revision: &Revision) -> usize {
    let body = revision.body.len();
    let path: usize = revision.path.iter().map(|rev| rev.hash().len() + 3).sum();
    body + revision.doc_id.len() + path + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::RawJson;
    use serde_json::json;

    fn rev(text: &str) -> Rev {
        text.parse().unwrap()
    }

    fn row(doc_id: &str, seq: u64, revs: &[&str]) -> ChangeRow {
        ChangeRow {
            doc_id: doc_id.into(),
            seq: Seq::from(seq),
            revs: revs.iter().map(|text| rev(text)).collect(),
            deleted: false,
        }
    }

    fn revision(doc_id: &str, rev_text: &str) -> Revision {
        Revision {
            doc_id: doc_id.into(),
            path: vec![rev(rev_text)],
            deleted: false,
            body: RawJson::empty_object(),
            hlc: None,
        }
    }

    fn config(batch_size: usize, continuous: bool) -> ReplicationConfig {
        ReplicationConfig {
            batch_size,
            continuous,
            ..ReplicationConfig::new("rep", "s2")
        }
    }

    /// A replication past reading the checkpoints, of which neither side had one.
    fn started(config: ReplicationConfig) -> Replication {
        let mut replication = Replication::new(config);
        assert_eq!(replication.next_action(), Action::ReadCheckpoints);
        replication
            .handle(Response::Checkpoints {
                source: None,
                target: None,
            })
            .unwrap();
        replication
    }

    /// 40 documents of 900 KB each fit the document limit but not one request: before, the
    /// batch went out as one 36 MB write, refused every time, and nothing ever synced.
    #[test]
    fn a_batch_of_large_documents_is_written_in_requests_bounded_by_bytes() {
        let mut replication = started(ReplicationConfig {
            max_write_bytes: 4_000_000,
            ..config(100, false)
        });
        replication.next_action();
        let ids: Vec<String> = (0..40).map(|n| format!("doc{n:02}")).collect();
        let rows = ids
            .iter()
            .enumerate()
            .map(|(n, id)| row(id, n as u64 + 1, &["1-a"]));
        replication
            .handle(Response::Changes {
                rows: rows.collect(),
                last_seq: Seq::from(40),
                pending: Some(0),
            })
            .unwrap();
        replication.next_action();
        let wanted: Vec<(String, Vec<Rev>)> = ids
            .iter()
            .map(|id| (id.clone(), vec![rev("1-a")]))
            .collect();
        replication.handle(Response::Missing(wanted)).unwrap();
        replication.next_action();
        let large = |id: &String| Revision {
            body: RawJson::of(&json!({"blob": "x".repeat(900_000)})),
            ..revision(id, "1-a")
        };
        let mut fetched: Vec<Revision> = ids.iter().map(large).collect();
        // One larger than a whole write goes alone.
        fetched[10].body = RawJson::of(&json!({"blob": "y".repeat(5_000_000)}));
        replication.handle(Response::Revisions(fetched)).unwrap();
        let mut written = Vec::new();
        let mut sizes = Vec::new();
        loop {
            match replication.next_action() {
                Action::WriteRevisions { revisions } => {
                    sizes.push(revisions.len());
                    written.extend(revisions.into_iter().map(|revision| revision.doc_id));
                    replication
                        .handle(Response::Written { rejected: 1 })
                        .unwrap();
                }
                Action::WriteCheckpoint { checkpoint } => {
                    assert_eq!(checkpoint.last_seq, Seq::from(40));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(written, ids, "every revision once, in order");
        assert_eq!(sizes, [4, 4, 2, 1, 4, 4, 4, 4, 4, 4, 4, 1]);
        assert_eq!(replication.stats().docs_written, 40 - sizes.len() as u64);
        assert_eq!(replication.stats().doc_write_failures, sizes.len() as u64);
    }

    #[test]
    fn a_batch_goes_through_diff_fetch_write_and_checkpoint() {
        let mut replication = started(ReplicationConfig {
            checkpoint_every: 1,
            ..config(2, false)
        });
        assert_eq!(
            replication.next_action(),
            Action::ReadChanges {
                since: Seq::from(0),
                limit: 2
            }
        );
        replication
            .handle(Response::Changes {
                rows: vec![row("a", 1, &["1-a"]), row("b", 2, &["1-b"])],
                last_seq: Seq::from(2),
                pending: Some(0),
            })
            .unwrap();
        assert!(matches!(replication.next_action(), Action::RevsDiff { revs } if revs.len() == 2));
        replication
            .handle(Response::Missing(vec![
                ("a".into(), vec![rev("1-a")]),
                ("b".into(), vec![]),
            ]))
            .unwrap();
        assert_eq!(
            replication.next_action(),
            Action::FetchRevisions {
                wanted: vec![("a".into(), vec![rev("1-a")])]
            }
        );
        let unrequested = replication.handle(Response::Revisions(vec![revision("b", "1-b")]));
        assert!(matches!(
            unrequested,
            Err(ReplicationError::UnrequestedRevision { .. })
        ));
        replication
            .handle(Response::Revisions(vec![revision("a", "1-a")]))
            .unwrap();
        assert!(matches!(
            replication.next_action(),
            Action::WriteRevisions { revisions } if revisions.len() == 1
        ));
        replication
            .handle(Response::Written { rejected: 0 })
            .unwrap();
        let Action::WriteCheckpoint { checkpoint } = replication.next_action() else {
            panic!("expected a checkpoint");
        };
        assert_eq!(checkpoint.last_seq, Seq::from(2));
        assert_eq!(checkpoint.session_id, "s2");
        replication.handle(Response::CheckpointWritten).unwrap();
        // The batch was full, so another read follows.
        assert_eq!(
            replication.next_action(),
            Action::ReadChanges {
                since: Seq::from(2),
                limit: 2
            }
        );
        replication
            .handle(Response::Changes {
                rows: vec![],
                last_seq: Seq::from(2),
                pending: Some(0),
            })
            .unwrap();
        let Action::Finished(stats) = replication.next_action() else {
            panic!("expected the end");
        };
        assert_eq!(stats.docs_read, 2);
        assert_eq!(stats.missing_revs, 1);
        assert_eq!(stats.docs_written, 1);
        assert_eq!(stats.batches, 1);
    }

    /// Full batches go on without a checkpoint until `checkpoint_every` of them are written;
    /// catching up checkpoints what is left, and the counters say what is on the target.
    #[test]
    fn full_batches_are_checkpointed_every_few_and_on_catching_up() {
        let mut replication = started(ReplicationConfig {
            checkpoint_every: 3,
            ..config(1, false)
        });
        let mut checkpoints = Vec::new();
        let mut read_from = Vec::new();
        for seq in 1..=5u64 {
            loop {
                match replication.next_action() {
                    Action::ReadChanges { since, .. } => {
                        read_from.push(since.number().unwrap());
                        break;
                    }
                    Action::WriteCheckpoint { checkpoint } => {
                        checkpoints.push(checkpoint.last_seq.number().unwrap());
                        replication.handle(Response::CheckpointWritten).unwrap();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let rows = if seq < 5 {
                vec![row(&format!("d{seq}"), seq, &["1-a"])]
            } else {
                vec![]
            };
            let last_seq = Seq::from(seq.min(4));
            replication
                .handle(Response::Changes {
                    rows: rows.clone(),
                    last_seq,
                    pending: None,
                })
                .unwrap();
            if !rows.is_empty() {
                assert!(matches!(replication.next_action(), Action::RevsDiff { .. }));
                // The target has it already: the batch is done without a write.
                replication.handle(Response::Missing(vec![])).unwrap();
                assert_eq!(replication.stats().last_seq, Seq::from(seq));
            }
        }
        let Action::WriteCheckpoint { checkpoint } = replication.next_action() else {
            panic!("catching up checkpoints the batch written since the last checkpoint");
        };
        checkpoints.push(checkpoint.last_seq.number().unwrap());
        replication.handle(Response::CheckpointWritten).unwrap();
        assert_eq!(read_from, [0, 1, 2, 3, 4]);
        assert_eq!(checkpoints, [3, 4]);
        let Action::Finished(stats) = replication.next_action() else {
            panic!("expected the end");
        };
        assert_eq!(stats.batches, 4);
        assert_eq!(*replication.seq_on_target(), Seq::from(4));
    }

    #[test]
    fn a_matching_checkpoint_resumes_and_a_mismatched_one_restarts() {
        let checkpoint = |session: &str, seq: u64| Checkpoint {
            session_id: session.into(),
            last_seq: Seq::from(seq),
            history: vec![CheckpointEntry {
                session_id: session.into(),
                last_seq: Seq::from(seq),
            }],
        };
        let start = |source: Option<Checkpoint>, target: Option<Checkpoint>| {
            let mut replication = Replication::new(config(10, false));
            replication.next_action();
            replication
                .handle(Response::Checkpoints { source, target })
                .unwrap();
            replication.next_action()
        };
        let resumed = start(Some(checkpoint("s1", 7)), Some(checkpoint("s1", 7)));
        assert_eq!(
            resumed,
            Action::ReadChanges {
                since: Seq::from(7),
                limit: 10
            }
        );
        let restarted = start(Some(checkpoint("s1", 7)), Some(checkpoint("s0", 3)));
        assert_eq!(
            restarted,
            Action::ReadChanges {
                since: Seq::from(0),
                limit: 10
            }
        );
        let one_sided = start(Some(checkpoint("s1", 7)), None);
        assert_eq!(
            one_sided,
            Action::ReadChanges {
                since: Seq::from(0),
                limit: 10
            }
        );
        // The target missed the last checkpoint write: fall back to the shared history.
        let mut newer = checkpoint("s2", 9);
        newer.history.push(CheckpointEntry {
            session_id: "s1".into(),
            last_seq: Seq::from(7),
        });
        let fallback = start(Some(newer), Some(checkpoint("s1", 7)));
        assert_eq!(
            fallback,
            Action::ReadChanges {
                since: Seq::from(7),
                limit: 10
            }
        );
    }

    #[test]
    fn filtered_batches_still_advance_the_checkpoint_and_continuous_mode_waits() {
        let mut replication = started(config(10, true));
        replication.next_action();
        replication
            .handle(Response::Changes {
                rows: vec![],
                last_seq: Seq::from(40),
                pending: None,
            })
            .unwrap();
        assert!(matches!(
            replication.next_action(),
            Action::WriteCheckpoint { checkpoint } if checkpoint.last_seq == Seq::from(40)
        ));
        replication.handle(Response::CheckpointWritten).unwrap();
        assert_eq!(
            replication.next_action(),
            Action::WaitForChanges {
                since: Seq::from(40)
            }
        );
        assert!(
            replication
                .handle(Response::Written { rejected: 0 })
                .is_err()
        );
        replication.handle(Response::ChangesAvailable).unwrap();
        assert_eq!(
            replication.next_action(),
            Action::ReadChanges {
                since: Seq::from(40),
                limit: 10
            }
        );
    }
}
