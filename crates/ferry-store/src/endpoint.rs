//! The replica endpoint: every step of replication a replica answers, written once.
//!
//! Whatever carries a request (the server's HTTP routes, its WebSocket sync session, the
//! client's `LocalPeer`, the deterministic simulator), the replica's side of it is one call
//! here: read or write a checkpoint, read a filtered page of changes, say which revisions are
//! missing, fetch revisions with their ancestry, store replicated revisions (validate each,
//! check and observe its clock, write, resolve by policy, announce), or apply local edits.
//! Transports only parse, call, and encode.
//!
//! The endpoint is synchronous, like [`Database`]: async callers run it on blocking threads.
//!
//! Rules every path shares (`docs/protocol.md`):
//! - A request whose body is not what the protocol says (not a document, a malformed
//!   revision) is refused as a whole by the transport before it gets here.
//! - A document that breaks a rule ([`ferry_core::model::validate_document`]: id, depth,
//!   reserved field, size; or a clock too far ahead, on replicas that refuse those) is refused
//!   alone, with its reason in its [`Ack`]; the rest of the batch is stored. One bad document
//!   never blocks a replication queue.
//! - A committed write is announced once, by the endpoint, through the replica's [`Fanout`]:
//!   no caller has to remember to.
//!
//! ```
//! use std::sync::Arc;
//! use ferry_core::filter::ChangesFilter;
//! use ferry_store::clock::{ReplicaClock, SystemClock};
//! use ferry_store::endpoint::{Endpoint, EndpointConfig, NoFanout};
//! use ferry_store::{Database, Edit, memory::MemoryDatabase, StoreConfig};
//!
//! let db = MemoryDatabase::new("notes", "replica-1", StoreConfig::default());
//! let config = EndpointConfig::default();
//! let clock = ReplicaClock::new(Arc::new(SystemClock), 60_000);
//! let endpoint = Endpoint::new(&db, &config, &clock, &NoFanout);
//! let body = serde_json::json!({"title": "milk"}).as_object().unwrap().clone();
//! endpoint.write_edits(vec![Edit::put("todos:1", None, body)])?;
//! let page = endpoint.changes(0, 10, &ChangesFilter::all(), false)?;
//! assert_eq!(page.changes[0].doc_id, "todos:1");
//! # Ok::<(), ferry_store::endpoint::EndpointError>(())
//! ```

use ferry_core::filter::ChangesFilter;
use ferry_core::hlc::ClockDrift;
use ferry_core::json::RawJson;
use ferry_core::model::{
    DocumentError, Limits, Revision, validate_document, validate_document_text,
};
use ferry_core::replicate::Checkpoint;
use ferry_core::resolve::{Policies, Resolution, ResolutionRecord};
use ferry_core::rev::{GenerationExhausted, Rev};
use ferry_core::tree::{EditError, RevsDiff};
use serde_json::Value;

use crate::clock::ReplicaClock;
use crate::{Change, Database, Edit, StoreError, StoredRevision, WriteReport, failpoint};

/// How many store rows one scan step reads while filtering changes: a filtered page holds
/// at most its limit of rows however many changes it scans.
pub const SCAN_CHUNK: usize = 500;

/// [`SCAN_CHUNK`] when the scan reads bodies (a selector filter, or bodies asked for): rows of
/// up to [`Limits::max_document_bytes`] each, so a scan step holds a few of them, not 500.
pub const BODY_SCAN_CHUNK: usize = 16;

/// What a replica's endpoint decides by, besides its database and clock.
#[derive(Clone, Debug, Default)]
pub struct EndpointConfig {
    /// The bounds documents and requests are checked against.
    pub limits: Limits,
    /// Refuse replicated revisions whose clock is further ahead of this replica's wall clock
    /// than its clock's drift allows. The server does (under last-write-wins such a revision
    /// would beat every write until real time caught up); a client takes what its server
    /// accepted.
    pub refuse_clocks_ahead: bool,
}

/// Where a replica announces its committed writes: the server wakes its feeds and sessions
/// (and, with several nodes, tells the others); the SDK wakes its watchers.
pub trait Fanout: Send + Sync {
    /// A write committed; `update_seq` is the database's latest sequence after it, and
    /// `doc_ids` the documents it changed.
    fn committed(&self, update_seq: u64, doc_ids: &[String]);
}

/// How a replica settles the conflicts replicated revisions create, right after they are
/// stored: the server by its configured [`Policies`], the SDK by the application's policies
/// (custom closures included).
pub trait Resolver: Send + Sync {
    /// Resolves the conflict on `doc_id`, if there is one and the replica's policy for it
    /// resolves; the record of what was written.
    fn resolve(
        &self,
        db: &dyn Database,
        doc_id: &str,
    ) -> Result<Option<ResolutionRecord>, StoreError>;

    /// Whether it may resolve anything at all (when not, the endpoint skips asking).
    fn resolves_anything(&self) -> bool {
        true
    }
}

impl Resolver for Policies {
    fn resolve(
        &self,
        db: &dyn Database,
        doc_id: &str,
    ) -> Result<Option<ResolutionRecord>, StoreError> {
        crate::resolve_conflict(db, doc_id, self.for_doc(doc_id))
    }

    fn resolves_anything(&self) -> bool {
        self.any_automatic()
    }
}

/// A [`Resolver`] that keeps every conflict for the application.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeepConflicts;

impl Resolver for KeepConflicts {
    fn resolve(
        &self,
        _db: &dyn Database,
        _doc_id: &str,
    ) -> Result<Option<ResolutionRecord>, StoreError> {
        Ok(None)
    }

    fn resolves_anything(&self) -> bool {
        false
    }
}

/// A [`Fanout`] that tells nobody.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFanout;

impl Fanout for NoFanout {
    fn committed(&self, _update_seq: u64, _doc_ids: &[String]) {}
}

/// Why a single document of a request was refused (the rest of the request was not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The document breaks [`validate_document`]'s rules.
    #[error(transparent)]
    Invalid(#[from] DocumentError),
    /// The revision's clock is too far ahead of this replica's.
    #[error(
        "the revision's clock is {} s ahead of the server's (at most {} s allowed); correct the device's clock",
        .0.ahead_ms / 1000,
        .0.max_drift_ms / 1000
    )]
    ClockAhead(ClockDrift),
    /// A local edit's base revision is not a leaf of the document.
    #[error("document update conflict")]
    Conflict(EditError),
    /// A local edit's base revision is at the largest generation.
    #[error(transparent)]
    Exhausted(GenerationExhausted),
}

impl From<EditError> for Refusal {
    fn from(error: EditError) -> Refusal {
        match error {
            EditError::Exhausted(exhausted) => Refusal::Exhausted(exhausted),
            other => Refusal::Conflict(other),
        }
    }
}

impl Refusal {
    /// CouchDB's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(DocumentError::Id(_)) => "illegal_docid",
            Refusal::Invalid(DocumentError::TooLarge { .. }) => "document_too_large",
            Refusal::Invalid(_) | Refusal::Exhausted(_) => "bad_request",
            Refusal::ClockAhead(_) => "clock_ahead",
            Refusal::Conflict(_) => "conflict",
        }
    }
}

/// A request as a whole was refused, or storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// More items in one request than [`Limits::max_batch_docs`].
    #[error("{count} {what} in one request, at most {max} allowed")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// How many there were.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A checkpoint was refused.
    #[error("invalid checkpoint: {0}")]
    InvalidCheckpoint(String),
    /// A batch written [`Batch::AllOrNothing`] had a refused document; nothing was written.
    #[error("document {index} of the batch: {refusal}")]
    Refused {
        /// Its position in the batch.
        index: usize,
        /// Why.
        refusal: Refusal,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a batch of local edits treats a document that breaks a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// It is refused alone; the others are written.
    Each,
    /// Nothing is written ([`EndpointError::Refused`]): an application's batch insert.
    AllOrNothing,
}

/// One page of a replica's changes feed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangesPage {
    /// The changes that passed the filter, in sequence order.
    pub changes: Vec<Change>,
    /// The sequence to continue after (the last one scanned, which may be past the last row
    /// when the filter skipped changes).
    pub last_seq: u64,
    /// The database's latest sequence when the page was read.
    pub update_seq: u64,
}

impl ChangesPage {
    /// How many changes come after this page.
    pub fn pending(&self) -> u64 {
        self.update_seq.saturating_sub(self.last_seq)
    }
}

/// What storing one replicated revision came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The document.
    pub doc_id: String,
    /// The revision.
    pub rev: Rev,
    /// Why it was refused, or `None`: stored (or already present).
    pub refused: Option<Refusal>,
}

/// What a committed batch of replicated revisions did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteOutcome {
    /// One per revision given, in order.
    pub acks: Vec<Ack>,
    /// New and already present revisions.
    pub report: WriteReport,
    /// The documents whose revisions were stored, sorted, each once.
    pub written: Vec<String>,
    /// The conflicts the batch created that the collections' policies resolved.
    pub resolved: Vec<(String, ResolutionRecord)>,
    /// The database's latest sequence after the batch and its resolutions.
    pub update_seq: u64,
}

/// One replica's side of replication: a database, the rules it applies, its clock, how it
/// resolves conflicts and where it announces writes. Cheap to build for each call.
pub struct Endpoint<'a> {
    db: &'a dyn Database,
    config: &'a EndpointConfig,
    clock: &'a ReplicaClock,
    fanout: &'a dyn Fanout,
    resolver: &'a dyn Resolver,
}

impl<'a> Endpoint<'a> {
    /// The endpoint of `db`, keeping every conflict (see [`Endpoint::resolving_by`]).
    pub fn new(
        db: &'a dyn Database,
        config: &'a EndpointConfig,
        clock: &'a ReplicaClock,
        fanout: &'a dyn Fanout,
    ) -> Endpoint<'a> {
        Endpoint {
            db,
            config,
            clock,
            fanout,
            resolver: &KeepConflicts,
        }
    }

    /// The same endpoint, resolving the conflicts replicated revisions create by `resolver`.
    #[must_use]
    pub fn resolving_by(mut self, resolver: &'a dyn Resolver) -> Endpoint<'a> {
        self.resolver = resolver;
        self
    }

    /// The database.
    pub fn database(&self) -> &'a dyn Database {
        self.db
    }

    /// The limits in force.
    pub fn limits(&self) -> &'a Limits {
        &self.config.limits
    }

    /// Refuses a request of more than [`Limits::max_batch_docs`] items.
    pub fn check_batch(&self, what: &'static str, count: usize) -> Result<(), EndpointError> {
        let max = self.config.limits.max_batch_docs;
        if count > max {
            return Err(EndpointError::TooMany { what, count, max });
        }
        Ok(())
    }

    /// The replication checkpoint `id` (a local document); `None` if there is none or it is
    /// not a Ferry checkpoint (the replication then compares from the start).
    pub fn checkpoint(&self, id: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .db
            .get_local(id)?
            .and_then(|local| serde_json::from_value(Value::Object(local.body)).ok()))
    }

    /// Stores the replication checkpoint `id`, whatever revision it had (two replications of
    /// one pair writing at once make this fail with [`StoreError::LocalConflict`], and the
    /// retry of the replication settles it).
    pub fn put_checkpoint(&self, id: &str, checkpoint: &Checkpoint) -> Result<(), EndpointError> {
        failpoint::reached(failpoint::BEFORE_CHECKPOINT);
        if id.is_empty() || id.len() > self.config.limits.max_doc_id_bytes {
            return Err(EndpointError::InvalidCheckpoint(format!(
                "its id must be 1 to {} bytes",
                self.config.limits.max_doc_id_bytes
            )));
        }
        let Ok(Value::Object(body)) = serde_json::to_value(checkpoint) else {
            unreachable!("a checkpoint serializes to an object")
        };
        let size = ferry_core::json::canonical_object(&body).len();
        if size > self.config.limits.max_document_bytes {
            return Err(EndpointError::InvalidCheckpoint(format!(
                "it is {size} bytes, more than the {} allowed",
                self.config.limits.max_document_bytes
            )));
        }
        let current = self.db.get_local(id)?.map(|local| local.rev);
        self.db.put_local(id, current, Some(body))?;
        Ok(())
    }

    /// Up to `limit` changes after `since` that pass `filter` (at least one row and at most
    /// [`Limits::max_page_rows`] are asked for, whatever `limit` says), with the winners'
    /// bodies when `include_bodies` is set.
    pub fn changes(
        &self,
        since: u64,
        limit: usize,
        filter: &ChangesFilter,
        include_bodies: bool,
    ) -> Result<ChangesPage, StoreError> {
        let limit = limit.clamp(1, self.config.limits.max_page_rows.max(1));
        let bodies = include_bodies || filter.needs_bodies();
        let chunk = match (filter.is_everything(), bodies) {
            (true, false) => limit,
            (true, true) => limit.min(BODY_SCAN_CHUNK),
            (false, false) => SCAN_CHUNK,
            (false, true) => BODY_SCAN_CHUNK,
        };
        let mut changes = Vec::new();
        let mut cursor = since;
        'scan: loop {
            let scanned = self.db.changes(cursor, chunk, bodies)?;
            let exhausted = scanned.len() < chunk;
            for mut change in scanned {
                cursor = change.seq;
                if !filter.matches(&change.doc_id, change.deleted, change.body.as_ref()) {
                    continue;
                }
                if !include_bodies {
                    change.body = None;
                }
                changes.push(change);
                if changes.len() >= limit {
                    break 'scan;
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(ChangesPage {
            changes,
            last_seq: cursor,
            update_seq: self.db.info()?.update_seq,
        })
    }

    /// For each document asked about, the revisions this replica lacks (documents lacking
    /// none are left out).
    pub fn revs_diff(
        &self,
        asked: &[(String, Vec<Rev>)],
    ) -> Result<Vec<(String, RevsDiff)>, EndpointError> {
        self.check_batch("documents", asked.len())?;
        Ok(self
            .db
            .revs_diff(asked)?
            .into_iter()
            .filter(|(_, diff)| !diff.missing.is_empty())
            .collect())
    }

    /// The asked revisions with their bodies and ancestry (up to the revs limit), in order;
    /// `None` for one this replica does not have or whose body it no longer keeps.
    pub fn fetch(
        &self,
        wanted: &[(String, Rev)],
    ) -> Result<Vec<Option<StoredRevision>>, EndpointError> {
        self.check_batch("revisions", wanted.len())?;
        let stored = self
            .db
            .get_revisions(wanted, self.config.limits.revs_limit)?;
        Ok(stored
            .into_iter()
            .map(|stored| stored.filter(|stored| stored.body.is_some()))
            .collect())
    }

    /// [`Endpoint::fetch`] of the longest prefix of `wanted` whose bodies come to at most
    /// `max_bytes` (as encoded JSON), and at least one revision: the answer's length says how
    /// many of `wanted` it covers. Revisions are read a few at a time, so memory is bounded by
    /// `max_bytes`, not by how many are wanted.
    pub fn fetch_within(
        &self,
        wanted: &[(String, Rev)],
        max_bytes: usize,
    ) -> Result<Vec<Option<StoredRevision>>, EndpointError> {
        const READ_AT_ONCE: usize = 16;
        self.check_batch("revisions", wanted.len())?;
        let mut answered = Vec::new();
        let mut bytes = 0usize;
        for chunk in wanted.chunks(READ_AT_ONCE) {
            let stored = self
                .db
                .get_revisions(chunk, self.config.limits.revs_limit)?;
            for stored in stored {
                let stored = stored.filter(|stored| stored.body.is_some());
                let size = stored
                    .as_ref()
                    .and_then(|stored| stored.body.as_ref())
                    .map_or(0, RawJson::len);
                bytes = bytes.saturating_add(size);
                if bytes > max_bytes && !answered.is_empty() {
                    return Ok(answered);
                }
                answered.push(stored);
            }
        }
        Ok(answered)
    }

    /// The revisions CouchDB's `open_revs` asks for: every leaf (`wanted: None`), or the
    /// listed ones, each replaced by the leaves descending from it when `latest` is set. A
    /// revision that cannot be returned with its body comes back as `Err(rev)`.
    pub fn open_revisions(
        &self,
        doc_id: &str,
        wanted: Option<Vec<Rev>>,
        latest: bool,
    ) -> Result<Vec<Result<StoredRevision, Rev>>, StoreError> {
        let tree = self.db.get_tree(doc_id)?.unwrap_or_default();
        let revs: Vec<Rev> = match wanted {
            None => tree.leaves().into_iter().map(|leaf| leaf.rev).collect(),
            Some(wanted) if latest => {
                let mut revs = Vec::new();
                for rev in wanted {
                    for leaf in tree.latest_leaves(&rev) {
                        if !revs.contains(&leaf) {
                            revs.push(leaf);
                        }
                    }
                }
                revs
            }
            Some(wanted) => wanted,
        };
        let wanted: Vec<(String, Rev)> = revs
            .into_iter()
            .map(|rev| (doc_id.to_owned(), rev))
            .collect();
        let stored = self
            .db
            .get_revisions(&wanted, self.config.limits.revs_limit)?;
        Ok(wanted
            .into_iter()
            .zip(stored)
            .map(|((_, rev), stored)| match stored {
                Some(revision) if revision.body.is_some() => Ok(revision),
                _ => Err(rev),
            })
            .collect())
    }

    /// Whether a received revision may be stored here.
    fn admit(&self, revision: &Revision) -> Result<(), Refusal> {
        validate_document_text(&revision.doc_id, &revision.body, &self.config.limits)?;
        if self.config.refuse_clocks_ahead
            && let Some(hlc) = revision.hlc
        {
            self.clock.check(hlc).map_err(Refusal::ClockAhead)?;
        }
        Ok(())
    }

    /// Stores replicated revisions (`new_edits=false`): each document is checked alone (see
    /// the module's rules); the admitted ones are merged into their trees in one transaction
    /// (a concurrent branch becomes a conflict, a repeated revision changes nothing), their
    /// clocks observed, the conflicts they created resolved by the collections' policies, and
    /// the write announced. Returns only after the transaction committed.
    ///
    /// The resolutions are written right after the batch's transaction: a crash in between
    /// leaves the conflict (nothing is lost) until the document is written to again.
    pub fn write_revisions(&self, revisions: Vec<Revision>) -> Result<WriteOutcome, EndpointError> {
        self.check_batch("documents", revisions.len())?;
        let mut acks = Vec::with_capacity(revisions.len());
        let mut admitted = Vec::with_capacity(revisions.len());
        for revision in revisions {
            let refused = self.admit(&revision).err();
            acks.push(Ack {
                doc_id: revision.doc_id.clone(),
                rev: revision.rev().clone(),
                refused: refused.clone(),
            });
            if refused.is_none() {
                admitted.push(revision);
            }
        }
        let mut outcome = WriteOutcome {
            acks,
            ..WriteOutcome::default()
        };
        if admitted.is_empty() {
            outcome.update_seq = self.db.info()?.update_seq;
            return Ok(outcome);
        }
        for hlc in admitted.iter().filter_map(|revision| revision.hlc) {
            if let Err(drift) = self.clock.observe(hlc) {
                // Kept with its own timestamp; only this replica's clock does not follow it.
                tracing::debug!(%drift, "not adopting a replicated clock");
            }
        }
        let mut written: Vec<String> = admitted.iter().map(|r| r.doc_id.clone()).collect();
        written.sort();
        written.dedup();
        outcome.report = self.db.write_revisions(admitted, self.clock.now())?;
        failpoint::reached(failpoint::BEFORE_RESOLVING);
        if self.resolver.resolves_anything() {
            for doc_id in &outcome.report.conflicted {
                if let Some(record) = self.resolver.resolve(self.db, doc_id)? {
                    tracing::debug!(%doc_id, resolved = %record.resolved, policy = %record.policy, "conflict resolved");
                    outcome.resolved.push((doc_id.clone(), record));
                }
            }
        }
        outcome.update_seq = self.db.info()?.update_seq;
        outcome.written = written;
        failpoint::reached(failpoint::AFTER_COMMIT_BEFORE_ACK);
        self.fanout.committed(outcome.update_seq, &outcome.written);
        Ok(outcome)
    }

    /// Applies local edits (an application's writes, CouchDB's `new_edits=true`) in one
    /// transaction, each stamped by this replica's clock. Each edit gets its own result: the
    /// new revision, or why it was refused (a refused edit changes nothing).
    pub fn write_edits(
        &self,
        edits: Vec<Edit>,
    ) -> Result<Vec<Result<Rev, Refusal>>, EndpointError> {
        self.write_edit_batch(edits, Batch::Each)
    }

    /// [`Endpoint::write_edits`], choosing what one invalid document does to the batch.
    pub fn write_edit_batch(
        &self,
        edits: Vec<Edit>,
        batch: Batch,
    ) -> Result<Vec<Result<Rev, Refusal>>, EndpointError> {
        self.check_batch("documents", edits.len())?;
        let mut results: Vec<Option<Result<Rev, Refusal>>> = Vec::with_capacity(edits.len());
        let mut admitted = Vec::with_capacity(edits.len());
        for edit in edits {
            match validate_document(&edit.doc_id, &edit.body, &self.config.limits) {
                Ok(()) => {
                    results.push(None);
                    admitted.push(edit.with_hlc(self.clock.now()));
                }
                Err(error) if batch == Batch::AllOrNothing => {
                    return Err(EndpointError::Refused {
                        index: results.len(),
                        refusal: Refusal::Invalid(error),
                    });
                }
                Err(error) => results.push(Some(Err(Refusal::Invalid(error)))),
            }
        }
        if admitted.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        let mut doc_ids: Vec<String> = admitted.iter().map(|e| e.doc_id.clone()).collect();
        let mut written = self.db.write_edits(admitted)?.into_iter();
        for slot in results.iter_mut().filter(|slot| slot.is_none()) {
            let result = written.next().expect("one result per edit written");
            *slot = Some(result.map_err(Refusal::from));
        }
        doc_ids.sort();
        doc_ids.dedup();
        let update_seq = self.db.info()?.update_seq;
        self.fanout.committed(update_seq, &doc_ids);
        Ok(results.into_iter().flatten().collect())
    }

    /// Writes a resolution an application chose (its body checked like any document's) and
    /// announces it. Returns the resolved revision, or `None` (writing nothing) if the
    /// document changed since its conflict was read.
    pub fn apply_resolution(
        &self,
        doc_id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Rev>, EndpointError> {
        validate_document(doc_id, &resolution.body, &self.config.limits).map_err(|error| {
            EndpointError::Refused {
                index: 0,
                refusal: Refusal::Invalid(error),
            }
        })?;
        let resolved = self.db.apply_resolution(doc_id, resolution)?;
        if resolved.is_some() {
            let update_seq = self.db.info()?.update_seq;
            self.fanout.committed(update_seq, &[doc_id.to_owned()]);
        }
        Ok(resolved)
    }

    /// Resolves, by the replica's resolver, the conflicts among the documents changed after
    /// sequence `since` (a replica opened again, a policy changed, a crash between a batch
    /// and its resolutions), scanning [`SCAN_CHUNK`] changes at a time. Returns the sequence
    /// it examined through (continue from there next time) and how many conflicts it
    /// resolved.
    pub fn settle_conflicts(&self, since: u64) -> Result<(u64, usize), EndpointError> {
        let mut cursor = since;
        let mut resolved = 0;
        if !self.resolver.resolves_anything() {
            return Ok((self.db.info()?.update_seq, 0));
        }
        loop {
            let changes = self.db.changes(cursor, SCAN_CHUNK, false)?;
            let Some(last) = changes.last().map(|change| change.seq) else {
                break;
            };
            for change in &changes {
                let live = change.leaves.iter().filter(|leaf| !leaf.deleted).count();
                if live >= 2 && self.resolver.resolve(self.db, &change.doc_id)?.is_some() {
                    resolved += 1;
                }
            }
            // Resolutions add changes past `last`; the next chunk examines them (settled).
            cursor = cursor.max(last);
            if changes.len() < SCAN_CHUNK {
                break;
            }
        }
        if resolved > 0 {
            let update_seq = self.db.info()?.update_seq;
            self.fanout.committed(update_seq, &[]);
        }
        Ok((cursor, resolved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Edit;
    use crate::StoreConfig;
    use crate::clock::{ReplicaClock, SystemClock};
    use crate::memory::MemoryDatabase;
    use std::sync::Arc;

    /// A fetch answer bounded by bytes covers the longest prefix within the bound, and at
    /// least one revision, however small the bound.
    #[test]
    fn a_fetch_within_a_byte_bound_answers_the_prefix_that_fits() {
        let db = MemoryDatabase::new("db", "replica", StoreConfig::default());
        let config = EndpointConfig::default();
        let clock = ReplicaClock::new(Arc::new(SystemClock), 60_000);
        let endpoint = Endpoint::new(&db, &config, &clock, &NoFanout);
        let body = serde_json::json!({"blob": "x".repeat(1000)});
        let body = body.as_object().expect("an object").clone();
        let size = ferry_core::json::encoded_len_object(&body);
        let edits = ["a", "b", "c"].map(|id| Edit::put(id, None, body.clone()));
        let wanted: Vec<(String, Rev)> = endpoint
            .write_edits(edits.into())
            .expect("written")
            .into_iter()
            .zip(["a", "b", "c"])
            .map(|(rev, id)| (id.to_owned(), rev.expect("stored")))
            .collect();
        let mut unknown = wanted.clone();
        unknown.insert(1, ("nobody".to_owned(), wanted[0].1.clone()));
        for (max_bytes, answered) in [(2 * size, 2), (2 * size - 1, 1), (0, 1), (usize::MAX, 3)] {
            let answer = endpoint.fetch_within(&wanted, max_bytes).expect("fetched");
            assert_eq!(answer.len(), answered, "within {max_bytes}");
            assert!(answer.iter().all(Option::is_some));
        }
        // A revision this replica lacks takes no room and is answered as lacking.
        let answer = endpoint.fetch_within(&unknown, 2 * size).expect("fetched");
        assert_eq!(answer.len(), 3);
        assert!(answer[1].is_none());
    }
}
