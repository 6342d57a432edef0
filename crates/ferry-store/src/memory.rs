//! An in-memory store with the same behaviour as the SQLite one (both pass the conformance
//! suite), for the deterministic simulator and for tests that need many replicas cheaply.
//!
//! Each database is one value behind a mutex. A write works on a copy of it and replaces the
//! original only when every step succeeded, which gives the all-or-nothing transactions the
//! `Database` contract asks for; copies are cheap at the sizes this store is meant for.
//! Nothing is ever written to disk: `durability()` reports `Normal`, and a "crash" of a replica
//! in the simulator keeps what a committed transaction left here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_core::hlc::Timestamp;
use ferry_core::json::{RawJson, canonical_object};
use ferry_core::model::{Body, Document, Revision};
use ferry_core::resolve::{Resolution, ResolutionRecord};
use ferry_core::rev::Rev;
use ferry_core::selector::collate;
use ferry_core::tree::{Applied, EditError, Leaf, RevTree, RevsDiff};

use crate::{
    AllDocsQuery, Backend, Change, Database, DatabaseInfo, Durability, Edit, LocalDoc,
    OutboxSummary, PendingState, Query, Replica, StoreConfig, StoreError, StoredRevision,
    WriteReport, merge_replicated, valid_database_name,
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Named in-memory databases.
pub struct MemoryBackend {
    config: StoreConfig,
    databases: Mutex<BTreeMap<String, Arc<MemoryDatabase>>>,
}

impl MemoryBackend {
    /// An empty backend whose databases use `config`.
    pub fn new(config: StoreConfig) -> MemoryBackend {
        MemoryBackend {
            config,
            databases: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Backend for MemoryBackend {
    fn create_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        if !valid_database_name(name) {
            return Err(StoreError::InvalidDatabaseName(
                name.chars().take(140).collect(),
            ));
        }
        let mut databases = lock(&self.databases);
        if databases.contains_key(name) {
            return Err(StoreError::DatabaseExists(name.to_owned()));
        }
        let database = Arc::new(MemoryDatabase::new(
            name,
            &format!("memory-{name}"),
            self.config.clone(),
        ));
        databases.insert(name.to_owned(), database.clone());
        Ok(database)
    }

    fn open_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        lock(&self.databases)
            .get(name)
            .map(|database| database.clone() as Arc<dyn Database>)
            .ok_or_else(|| StoreError::NoSuchDatabase(name.to_owned()))
    }

    fn delete_database(&self, name: &str) -> Result<(), StoreError> {
        lock(&self.databases)
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| StoreError::NoSuchDatabase(name.to_owned()))
    }

    fn database_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(lock(&self.databases).keys().cloned().collect())
    }
}

/// The stored state of one document.
#[derive(Clone, Debug)]
struct DocRow {
    seq: u64,
    tree: RevTree,
    winner: Leaf,
    hlc: Timestamp,
    body: Body,
}

/// A revision whose body is kept.
#[derive(Clone, Debug)]
struct RevRow {
    deleted: bool,
    hlc: Timestamp,
    body: Body,
}

#[derive(Clone, Debug, Default)]
struct State {
    docs: BTreeMap<String, DocRow>,
    by_seq: BTreeMap<u64, String>,
    revs: BTreeMap<(String, Rev), RevRow>,
    locals: BTreeMap<String, (u64, Body)>,
    resolutions: Vec<(String, ResolutionRecord)>,
    /// Local edits not acknowledged yet: document -> the document's sequence, and the server's
    /// reason if it refused the edit.
    outbox: BTreeMap<String, (u64, Option<String>)>,
    update_seq: u64,
    doc_count: u64,
    deleted_count: u64,
}

/// One in-memory database.
pub struct MemoryDatabase {
    name: String,
    replica_id: String,
    config: StoreConfig,
    state: Mutex<State>,
}

/// The new revision an update brings.
struct NewRevision<'a> {
    rev: &'a Rev,
    deleted: bool,
    body: &'a Body,
    hlc: Timestamp,
}

/// The whole stored state, in a canonical order: two databases with the same contents print
/// the same (the simulator fingerprints states with it).
impl std::fmt::Debug for MemoryDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.name, *lock(&self.state))
    }
}

impl MemoryDatabase {
    /// An empty database.
    pub fn new(name: &str, replica_id: &str, config: StoreConfig) -> MemoryDatabase {
        MemoryDatabase {
            name: name.to_owned(),
            replica_id: replica_id.to_owned(),
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// An independent copy of this database as it is now.
    pub fn snapshot(&self) -> MemoryDatabase {
        MemoryDatabase {
            name: self.name.clone(),
            replica_id: self.replica_id.clone(),
            config: self.config.clone(),
            state: Mutex::new(lock(&self.state).clone()),
        }
    }

    /// Runs `work` on a copy of the state and keeps the copy only if it succeeded.
    fn transaction<T>(
        &self,
        work: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let outcome = work(&mut next)?;
        *state = next;
        Ok(outcome)
    }

    fn store_update(
        &self,
        state: &mut State,
        doc_id: &str,
        before: Option<&RevTree>,
        mut tree: RevTree,
        new: NewRevision<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let limits = &self.config.limits;
        state
            .revs
            .entry((doc_id.to_owned(), new.rev.clone()))
            .or_insert_with(|| RevRow {
                deleted: new.deleted,
                hlc: new.hlc,
                body: new.body.clone(),
            });
        let unkept = crate::bodies_to_drop(limits, before, &mut tree, new.rev);
        for rev in unkept {
            state.revs.remove(&(doc_id.to_owned(), rev));
        }
        let leaves = tree.leaves();
        let winner = tree
            .winner()
            .expect("a tree with a new revision has a winner");
        let (body, hlc) = if &winner.rev == new.rev {
            (new.body.clone(), new.hlc)
        } else {
            let row = state
                .revs
                .get(&(doc_id.to_owned(), winner.rev.clone()))
                .ok_or_else(|| StoreError::Corrupt {
                    what: "revs",
                    detail: format!("no body for winning leaf {doc_id} {}", winner.rev),
                })?;
            (row.body.clone(), row.hlc)
        };
        let was_deleted = before.map(|before| before.winner().is_some_and(|leaf| leaf.deleted));
        let leaves_changed = before.is_none_or(|before| before.leaves() != leaves);
        let mut seq = None;
        let old_seq = state.docs.get(doc_id).map(|row| row.seq);
        if leaves_changed {
            state.update_seq += 1;
            seq = Some(state.update_seq);
            if let Some(old) = old_seq {
                state.by_seq.remove(&old);
            }
            state.by_seq.insert(state.update_seq, doc_id.to_owned());
        }
        let deleted = winner.deleted;
        state.docs.insert(
            doc_id.to_owned(),
            DocRow {
                seq: seq.or(old_seq).unwrap_or_default(),
                tree,
                winner,
                hlc,
                body,
            },
        );
        let (live_delta, deleted_delta) = crate::count_change(was_deleted, deleted);
        state.doc_count = state.doc_count.saturating_add_signed(live_delta);
        state.deleted_count = state.deleted_count.saturating_add_signed(deleted_delta);
        Ok(seq)
    }

    /// Adds a local child revision; its id and, unless it was there already, its new sequence
    /// (`Some(None)`: added without a new sequence).
    fn add_child(
        &self,
        state: &mut State,
        doc_id: &str,
        parent: Option<&Rev>,
        deleted: bool,
        body: &Body,
        hlc: Timestamp,
    ) -> Result<(Rev, Option<Option<u64>>), StoreError> {
        let rev = crate::edit_rev(doc_id, parent, deleted, &canonical_object(body))?;
        let before = state.docs.get(doc_id).map(|row| row.tree.clone());
        let mut tree = before.clone().unwrap_or_default();
        if tree.add_child(parent, rev.clone(), deleted) != Applied::Added {
            return Ok((rev, None));
        }
        let new = NewRevision {
            rev: &rev,
            deleted,
            body,
            hlc,
        };
        let seq = self.store_update(state, doc_id, before.as_ref(), tree, new)?;
        Ok((rev, Some(seq)))
    }

    fn record_pending(&self, state: &mut State, doc_id: &str, seq: u64) {
        if self.config.track_pending {
            state.outbox.insert(doc_id.to_owned(), (seq, None));
        }
    }
}

fn document(doc_id: &str, row: &DocRow, with_body: bool) -> Document {
    let conflicts = if row.winner.deleted {
        Vec::new()
    } else {
        row.tree.conflicts()
    };
    Document {
        doc_id: doc_id.to_owned(),
        rev: row.winner.rev.clone(),
        deleted: row.winner.deleted,
        body: if with_body {
            row.body.clone()
        } else {
            Body::new()
        },
        hlc: row.hlc,
        seq: row.seq,
        conflicts,
    }
}

impl Replica for MemoryDatabase {
    fn outbox(&self) -> Result<OutboxSummary, StoreError> {
        let state = lock(&self.state);
        let rejected = state
            .outbox
            .values()
            .filter(|(_, refused)| refused.is_some());
        let rejected = rejected.count() as u64;
        Ok(OutboxSummary {
            pending: state.outbox.len() as u64 - rejected,
            rejected,
        })
    }

    fn outbox_state(&self, doc_id: &str) -> Result<Option<PendingState>, StoreError> {
        Ok(lock(&self.state)
            .outbox
            .get(doc_id)
            .map(|(seq, refused)| match refused {
                Some(reason) => PendingState::Rejected {
                    reason: reason.clone(),
                },
                None => PendingState::Pending { seq: *seq },
            }))
    }

    fn pending(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut pending: Vec<(String, u64)> = lock(&self.state)
            .outbox
            .iter()
            .filter(|(_, (_, refused))| refused.is_none())
            .map(|(doc_id, (seq, _))| (doc_id.clone(), *seq))
            .collect();
        pending.sort_by_key(|(_, seq)| *seq);
        Ok(pending)
    }

    fn acknowledge_through(&self, seq: u64) -> Result<u64, StoreError> {
        let mut state = lock(&self.state);
        let before = state.outbox.len();
        state
            .outbox
            .retain(|_, (pending, refused)| *pending > seq || refused.is_some());
        Ok((before - state.outbox.len()) as u64)
    }

    fn reject(&self, doc_id: &str, reason: &str) -> Result<(), StoreError> {
        if let Some((_, refused)) = lock(&self.state).outbox.get_mut(doc_id) {
            *refused = Some(reason.to_owned());
        }
        Ok(())
    }

    fn restamp_outbox(
        &self,
        later_than: Timestamp,
        stamp: &mut dyn FnMut() -> Timestamp,
    ) -> Result<u64, StoreError> {
        self.transaction(|state| {
            let mut waiting: Vec<(u64, String)> = state
                .outbox
                .iter()
                .map(|(doc_id, (seq, _))| (*seq, doc_id.clone()))
                .collect();
            waiting.sort();
            let mut restamped = 0;
            for (_, doc_id) in waiting {
                let Some(row) = state.docs.get_mut(&doc_id) else {
                    continue;
                };
                let mut changed = false;
                for leaf in row.tree.leaves() {
                    let key = (doc_id.clone(), leaf.rev.clone());
                    let is_winner = leaf.rev == row.winner.rev;
                    let clock = if is_winner {
                        Some(row.hlc)
                    } else {
                        state.revs.get(&key).map(|kept| kept.hlc)
                    };
                    if clock.is_none_or(|clock| clock <= later_than) {
                        continue;
                    }
                    let new = stamp();
                    if let Some(kept) = state.revs.get_mut(&key) {
                        kept.hlc = new;
                    }
                    if is_winner {
                        row.hlc = new;
                    }
                    changed = true;
                }
                if changed {
                    state.update_seq += 1;
                    let new_seq = state.update_seq;
                    state.by_seq.remove(&row.seq);
                    row.seq = new_seq;
                    state.by_seq.insert(new_seq, doc_id.clone());
                    state.outbox.insert(doc_id, (new_seq, None));
                    restamped += 1;
                }
            }
            Ok(restamped)
        })
    }
}

impl Database for MemoryDatabase {
    fn durability(&self) -> Result<Durability, StoreError> {
        Ok(Durability::Normal)
    }

    fn info(&self) -> Result<DatabaseInfo, StoreError> {
        let state = lock(&self.state);
        Ok(DatabaseInfo {
            name: self.name.clone(),
            replica_id: self.replica_id.clone(),
            doc_count: state.doc_count,
            deleted_count: state.deleted_count,
            update_seq: state.update_seq,
        })
    }

    fn write_edits(&self, edits: Vec<Edit>) -> Result<Vec<Result<Rev, EditError>>, StoreError> {
        self.transaction(|state| {
            let mut results = Vec::with_capacity(edits.len());
            for edit in edits {
                let before = state.docs.get(&edit.doc_id).map(|row| row.tree.clone());
                let parent = match before
                    .as_ref()
                    .unwrap_or(&RevTree::new())
                    .edit_parent(edit.base.as_ref())
                {
                    Ok(parent) => parent,
                    Err(error) => {
                        results.push(Err(error));
                        continue;
                    }
                };
                let (rev, added) = self.add_child(
                    state,
                    &edit.doc_id,
                    parent.as_ref(),
                    edit.deleted,
                    &edit.body,
                    edit.hlc,
                )?;
                if let Some(Some(seq)) = added {
                    self.record_pending(state, &edit.doc_id, seq);
                }
                results.push(Ok(rev));
            }
            Ok(results)
        })
    }

    fn write_revisions(
        &self,
        revisions: Vec<Revision>,
        default_hlc: Timestamp,
    ) -> Result<WriteReport, StoreError> {
        self.transaction(|state| {
            let mut report = WriteReport::default();
            for revision in revisions {
                let before = state.docs.get(&revision.doc_id).map(|row| row.tree.clone());
                let Some(tree) = merge_replicated(before.as_ref(), &revision, &mut report)? else {
                    continue;
                };
                // Kept parsed here (queries read it); SQLite keeps the text as it came.
                let body = revision
                    .parse_body()
                    .map_err(|error| StoreError::InvalidRevision {
                        doc_id: revision.doc_id.clone(),
                        reason: error.to_string(),
                    })?;
                let new = NewRevision {
                    rev: &revision.path[0],
                    deleted: revision.deleted,
                    body: &body,
                    hlc: revision.hlc.unwrap_or(default_hlc),
                };
                let seq = self.store_update(state, &revision.doc_id, before.as_ref(), tree, new)?;
                // A pending edit now goes out with the page that holds the new sequence.
                if let (Some(seq), Some(pending)) = (seq, state.outbox.get_mut(&revision.doc_id)) {
                    pending.0 = seq;
                }
            }
            Ok(report)
        })
    }

    fn get_document(&self, doc_id: &str) -> Result<Option<Document>, StoreError> {
        let state = lock(&self.state);
        Ok(state
            .docs
            .get(doc_id)
            .map(|row| document(doc_id, row, true)))
    }

    fn get_tree(&self, doc_id: &str) -> Result<Option<RevTree>, StoreError> {
        Ok(lock(&self.state)
            .docs
            .get(doc_id)
            .map(|row| row.tree.clone()))
    }

    fn apply_resolution(
        &self,
        doc_id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Rev>, StoreError> {
        self.transaction(|state| {
            if !state
                .docs
                .get(doc_id)
                .is_some_and(|row| resolution.applies_to(&row.tree))
            {
                return Ok(None);
            }
            let mut last_seq = None;
            for (parent, deleted, body) in resolution.children(&Body::new()) {
                let (_, added) =
                    self.add_child(state, doc_id, Some(parent), deleted, body, resolution.hlc)?;
                if let Some(seq) = added {
                    last_seq = seq.or(last_seq);
                }
            }
            if let Some(seq) = last_seq {
                self.record_pending(state, doc_id, seq);
            }
            state
                .resolutions
                .push((doc_id.to_owned(), resolution.record.clone()));
            Ok(Some(resolution.rev()))
        })
    }

    fn compact(&self) -> Result<u64, StoreError> {
        let depth = self.config.limits.ancestor_bodies;
        self.transaction(|state| {
            let keep: BTreeMap<&String, BTreeSet<Rev>> = state
                .docs
                .iter()
                .map(|(doc_id, row)| (doc_id, row.tree.compaction_window(depth)))
                .collect();
            let before = state.revs.len();
            let kept: BTreeMap<(String, Rev), RevRow> = state
                .revs
                .iter()
                .filter(|((doc_id, rev), _)| keep.get(doc_id).is_some_and(|set| set.contains(rev)))
                .map(|(key, row)| (key.clone(), row.clone()))
                .collect();
            state.revs = kept;
            Ok((before - state.revs.len()) as u64)
        })
    }

    fn resolutions(&self, doc_id: &str) -> Result<Vec<ResolutionRecord>, StoreError> {
        Ok(lock(&self.state)
            .resolutions
            .iter()
            .filter(|(id, _)| id == doc_id)
            .map(|(_, record)| record.clone())
            .collect())
    }

    fn get_revision(
        &self,
        doc_id: &str,
        rev: &Rev,
        max_path: usize,
    ) -> Result<Option<StoredRevision>, StoreError> {
        let state = lock(&self.state);
        let Some(row) = state.docs.get(doc_id) else {
            return Ok(None);
        };
        if !row.tree.contains(rev) {
            return Ok(None);
        }
        let stored = state.revs.get(&(doc_id.to_owned(), rev.clone()));
        Ok(Some(StoredRevision {
            doc_id: doc_id.to_owned(),
            path: row.tree.ancestry(rev, max_path.max(1)),
            deleted: stored.map_or_else(|| row.tree.is_deleted(rev), |stored| stored.deleted),
            body: stored.map(|stored| RawJson::canonical_object(&stored.body)),
            hlc: stored.map_or(Timestamp::ZERO, |stored| stored.hlc),
        }))
    }

    fn changes(
        &self,
        since: u64,
        limit: usize,
        include_bodies: bool,
    ) -> Result<Vec<Change>, StoreError> {
        let state = lock(&self.state);
        Ok(state
            .by_seq
            .range(since.saturating_add(1)..)
            .take(limit)
            .map(|(seq, doc_id)| {
                let row = &state.docs[doc_id];
                Change {
                    seq: *seq,
                    doc_id: doc_id.clone(),
                    rev: row.winner.rev.clone(),
                    deleted: row.winner.deleted,
                    leaves: row.tree.leaves(),
                    body: include_bodies.then(|| row.body.clone()),
                }
            })
            .collect())
    }

    fn revs_diff(
        &self,
        revs: &[(String, Vec<Rev>)],
    ) -> Result<Vec<(String, RevsDiff)>, StoreError> {
        let state = lock(&self.state);
        let empty = RevTree::new();
        Ok(revs
            .iter()
            .map(|(doc_id, asked)| {
                let tree = state.docs.get(doc_id).map_or(&empty, |row| &row.tree);
                (doc_id.clone(), tree.revs_diff(asked))
            })
            .collect())
    }

    fn get_local(&self, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        let id = id
            .strip_prefix(ferry_core::model::LOCAL_PREFIX)
            .unwrap_or(id);
        Ok(lock(&self.state)
            .locals
            .get(id)
            .map(|(rev, body)| LocalDoc {
                id: id.to_owned(),
                rev: *rev,
                body: body.clone(),
            }))
    }

    fn put_local(
        &self,
        id: &str,
        expected_rev: Option<u64>,
        body: Option<Body>,
    ) -> Result<u64, StoreError> {
        let id = id
            .strip_prefix(ferry_core::model::LOCAL_PREFIX)
            .unwrap_or(id);
        self.transaction(|state| {
            let current = state.locals.get(id).map(|(rev, _)| *rev);
            if current != expected_rev {
                return Err(StoreError::LocalConflict);
            }
            let next = expected_rev.unwrap_or(0) + 1;
            match body {
                Some(body) => {
                    state.locals.insert(id.to_owned(), (next, body));
                }
                None => {
                    state.locals.remove(id);
                }
            }
            Ok(next)
        })
    }

    fn all_docs(&self, query: &AllDocsQuery) -> Result<Vec<Document>, StoreError> {
        let state = lock(&self.state);
        let (low, high) = if query.descending {
            (&query.end_key, &query.start_key)
        } else {
            (&query.start_key, &query.end_key)
        };
        let above_low = |id: &str| match low {
            None => true,
            Some(low) if query.descending && !query.inclusive_end => id > low.as_str(),
            Some(low) => id >= low.as_str(),
        };
        let below_high = |id: &str| match high {
            None => true,
            Some(high) if !query.descending && !query.inclusive_end => id < high.as_str(),
            Some(high) => id <= high.as_str(),
        };
        let matching = state
            .docs
            .iter()
            .filter(|(id, row)| !row.winner.deleted && above_low(id) && below_high(id));
        let rows: Vec<Document> = if query.descending {
            matching
                .rev()
                .skip(query.skip)
                .take(query.limit)
                .map(|(id, row)| document(id, row, query.include_bodies))
                .collect()
        } else {
            matching
                .skip(query.skip)
                .take(query.limit)
                .map(|(id, row)| document(id, row, query.include_bodies))
                .collect()
        };
        Ok(rows)
    }

    fn collections(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let state = lock(&self.state);
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (doc_id, row) in &state.docs {
            if !row.winner.deleted {
                *counts
                    .entry(ferry_core::model::collection_of(doc_id).to_owned())
                    .or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    fn query(&self, query: &Query) -> Result<Vec<Document>, StoreError> {
        for (field, _) in &query.sort {
            if field.is_empty() || field.split('.').any(str::is_empty) {
                return Err(StoreError::InvalidQuery(format!(
                    "cannot sort on field {field:?}"
                )));
            }
        }
        let state = lock(&self.state);
        let mut matched: Vec<Document> = state
            .docs
            .iter()
            .filter(|(doc_id, row)| {
                !row.winner.deleted
                    && ferry_core::model::collection_of(doc_id) == query.collection
                    && query
                        .selector
                        .matches(&serde_json::Value::Object(row.body.clone()))
            })
            .map(|(doc_id, row)| document(doc_id, row, true))
            .collect();
        let field = |document: &Document, path: &str| -> serde_json::Value {
            let mut value = serde_json::Value::Object(document.body.clone());
            for part in path.split('.') {
                value = value.get(part).cloned().unwrap_or(serde_json::Value::Null);
            }
            value
        };
        // Stable sort: documents already in id order keep it among equal keys.
        matched.sort_by(|a, b| {
            for (path, descending) in &query.sort {
                let order = collate(&field(a, path), &field(b, path));
                let order = if *descending { order.reverse() } else { order };
                if order.is_ne() {
                    return order;
                }
            }
            std::cmp::Ordering::Equal
        });
        Ok(matched
            .into_iter()
            .skip(query.skip)
            .take(query.limit)
            .collect())
    }

    fn ensure_index(&self, _collection: &str, field: &str) -> Result<(), StoreError> {
        let valid = !field.is_empty()
            && field.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
            });
        if valid {
            Ok(())
        } else {
            Err(StoreError::InvalidQuery(format!(
                "cannot index field {field:?}"
            )))
        }
    }
}
