//! The SQLite implementation of the store: one file per database, WAL mode.
//!
//! Schema (version 4, recorded in `PRAGMA user_version`; `MIGRATIONS` upgrades older files):
//!
//! - `docs`: one row per document, keyed by the sequence of its latest change (so the changes
//!   feed reads the table in order): its id and collection, the winner (revision, deleted
//!   flag, clock, body), its leaves (`NULL` when the winner is the only one, as it is without
//!   conflicts) and the encoded revision tree (`NULL` when it is the winner alone). The
//!   winner's body lives only here, so reads, `_all_docs` and queries never parse trees, and
//!   writing a new document writes its body once.
//!
//!   Bodies (here and in `revs`) are JSON text: an edit's canonical encoding (what its
//!   revision id hashes), a replicated revision's text as its sender wrote it, so that
//!   replicating it onward sends the same bytes and neither direction parses it.
//! - `revs`: bodies of the other kept revisions: leaves and recent ancestors
//!   (`Limits::ancestor_bodies` levels above each leaf), with their deleted flag and clock. It
//!   may also hold the winner's body (a revision that won later); readers look in `docs` first.
//! - `local_docs`: checkpoints and other local documents, never replicated.
//! - `meta`: the replica id, the last sequence and document counters.
//! - `outbox` (version 2, keyed by sequence since version 4): on client replicas, the sequence
//!   of every document with a local edit no push has acknowledged yet, or why the server
//!   refused it. A pending document's row moves with its `docs` row when its sequence changes,
//!   so its edit waits for the page that carries the document as it is now; an acknowledgement
//!   deletes a range of these small rows.
//! - `resolutions` (version 3): the record of every conflict resolution this replica wrote.
//!
//! Durability: with [`Durability::Full`] every commit runs `fsync` on the WAL before it
//! returns (`synchronous=FULL`), so a write acknowledged over HTTP survives power loss; a
//! SIGKILL at any moment leaves the last committed transaction intact (SQLite's WAL recovery).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use ferry_core::hlc::Timestamp;
use ferry_core::model::{Body, COLLECTION_SEPARATOR, Document, LOCAL_PREFIX, Revision};
use ferry_core::resolve::{Resolution, ResolutionRecord};
use ferry_core::rev::Rev;
use ferry_core::tree::{EditError, RevTree, RevsDiff};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::{
    AllDocsQuery, Change, Database, DatabaseInfo, Durability, Edit, LocalDoc, Query, StoreConfig,
    StoreError, StoredRevision, WriteReport, merge_replicated,
};

mod backend;
mod encoding;
mod outbox;
mod query;
mod schema;
mod write;

pub use backend::{BackendLimits, SqliteBackend};
use encoding::*;
use query::*;
use schema::*;

/// How many read connections a database keeps open (WAL lets them read while one writes).
const READERS: usize = 4;

/// One database in one SQLite file.
pub struct SqliteDatabase {
    name: String,
    config: StoreConfig,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    replica_id: String,
}

impl SqliteDatabase {
    /// Opens (creating and migrating if needed) the database file at `path`.
    pub fn open(
        path: &Path,
        name: &str,
        config: StoreConfig,
    ) -> Result<SqliteDatabase, StoreError> {
        config.page_cache.check()?;
        let mut writer = connect(path, &config, false)?;
        migrate(&mut writer)?;
        let replica_id = writer.query_row(
            "SELECT value FROM meta WHERE key = 'replica_id'",
            [],
            |row| row.get::<_, String>(0),
        )?;
        Ok(SqliteDatabase {
            name: name.to_owned(),
            config,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            path: path.to_owned(),
            replica_id,
        })
    }

    /// The file this database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_reader<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let reader = lock(&self.readers).pop();
        let reader = match reader {
            Some(reader) => reader,
            None => connect(&self.path, &self.config, true)?,
        };
        let result = read(&reader);
        let mut readers = lock(&self.readers);
        if readers.len() < READERS {
            readers.push(reader);
        }
        result
    }

    fn with_write_transaction<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut writer = lock(&self.writer);
        // IMMEDIATE takes the write lock up front, so a second process writing the same file
        // waits (busy_timeout) instead of failing halfway through a read-then-write.
        let transaction = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = write(&transaction)?;
        transaction.commit()?;
        Ok(result)
    }

    /// A transaction of local edits (see [`SqliteDatabase::with_counted_transaction`]): on
    /// client replicas every document it gives a sequence waits in the outbox at that sequence.
    /// The sequences it gave are those past the last one before it, so one statement at the end
    /// records them all.
    fn with_local_edits<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>, &mut Counters) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_counted_transaction(|transaction, counters| {
            let first = to_i64(counters.update_seq + 1);
            let result = write(transaction, counters)?;
            if self.config.track_pending {
                transaction
                    .prepare_cached(
                        "INSERT OR REPLACE INTO outbox (seq, rejected) \
                         SELECT seq, NULL FROM docs WHERE seq >= ?1",
                    )?
                    .execute(params![first])?;
            }
            Ok(result)
        })
    }

    /// A write transaction that changes documents: the counters come loaded and are saved.
    fn with_counted_transaction<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>, &mut Counters) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_write_transaction(|transaction| {
            let mut counters = Counters::load(transaction)?;
            let result = write(transaction, &mut counters)?;
            counters.save(transaction)?;
            Ok(result)
        })
    }
}

/// The sequence and document counters, read once per writing transaction and written back at
/// its end (instead of a read and a write per document).
struct Counters {
    update_seq: u64,
    doc_count: u64,
    deleted_count: u64,
    changed: bool,
}

impl Counters {
    const KEYS: [&'static str; 3] = ["update_seq", "doc_count", "deleted_count"];

    fn load(connection: &Connection) -> Result<Counters, StoreError> {
        Ok(Counters {
            update_seq: read_meta(connection, "update_seq")?,
            doc_count: read_meta(connection, "doc_count")?,
            deleted_count: read_meta(connection, "deleted_count")?,
            changed: false,
        })
    }

    fn save(&self, connection: &Connection) -> Result<(), StoreError> {
        if self.changed {
            let values = [self.update_seq, self.doc_count, self.deleted_count];
            for (key, value) in Self::KEYS.into_iter().zip(values) {
                write_meta(connection, key, value)?;
            }
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        self.update_seq += 1;
        self.changed = true;
        self.update_seq
    }

    fn adjust(&mut self, live_delta: i64, deleted_delta: i64) {
        self.doc_count = self.doc_count.saturating_add_signed(live_delta);
        self.deleted_count = self.deleted_count.saturating_add_signed(deleted_delta);
        self.changed = true;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable: SQLite rolls back the
    // transaction that was open when the guard's owner unwound.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Database for SqliteDatabase {
    fn durability(&self) -> Result<Durability, StoreError> {
        let synchronous: i64 =
            lock(&self.writer).query_row("PRAGMA synchronous", [], |row| row.get(0))?;
        match synchronous {
            2 => Ok(Durability::Full),
            1 => Ok(Durability::Normal),
            other => Err(StoreError::Corrupt {
                what: "connection settings",
                detail: format!("synchronous is {other}, neither FULL nor NORMAL"),
            }),
        }
    }

    fn info(&self) -> Result<DatabaseInfo, StoreError> {
        self.with_reader(|connection| {
            Ok(DatabaseInfo {
                name: self.name.clone(),
                replica_id: self.replica_id.clone(),
                doc_count: read_meta(connection, "doc_count")?,
                deleted_count: read_meta(connection, "deleted_count")?,
                update_seq: read_meta(connection, "update_seq")?,
            })
        })
    }

    fn write_edits(&self, edits: Vec<Edit>) -> Result<Vec<Result<Rev, EditError>>, StoreError> {
        self.with_local_edits(|transaction, counters| {
            let mut results = Vec::with_capacity(edits.len());
            let doc_ids: Vec<&str> = edits.iter().map(|edit| edit.doc_id.as_str()).collect();
            let mut docs = BatchDocs::load(transaction, &doc_ids)?;
            for edit in &edits {
                let before = docs.take(transaction, &edit.doc_id)?;
                let parent = match before
                    .as_ref()
                    .map_or(&RevTree::new(), |current| &current.tree)
                    .edit_parent(edit.base.as_ref())
                {
                    Ok(parent) => parent,
                    Err(err) => {
                        results.push(Err(err));
                        continue;
                    }
                };
                let child = Child {
                    parent: parent.as_ref(),
                    deleted: edit.deleted,
                    body: &edit.body,
                    hlc: edit.hlc,
                };
                let (rev, _) =
                    self.add_child(transaction, counters, &edit.doc_id, before.as_ref(), child)?;
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
        self.with_counted_transaction(|transaction, counters| {
            let mut report = WriteReport::default();
            let doc_ids: Vec<&str> = revisions
                .iter()
                .map(|revision| revision.doc_id.as_str())
                .collect();
            let mut docs = BatchDocs::load(transaction, &doc_ids)?;
            for revision in &revisions {
                let before = docs.take(transaction, &revision.doc_id)?;
                let before_tree = before.as_ref().map(|current| &current.tree);
                let Some(tree) = merge_replicated(before_tree, revision, &mut report)? else {
                    continue;
                };
                self.store_update(
                    transaction,
                    counters,
                    &revision.doc_id,
                    before.as_ref(),
                    tree,
                    NewRevision {
                        rev: &revision.path[0],
                        deleted: revision.deleted,
                        body: revision.body.get().to_owned(),
                        hlc: revision.hlc.unwrap_or(default_hlc),
                        local: false,
                    },
                )?;
            }
            Ok(report)
        })
    }

    fn apply_resolution(
        &self,
        doc_id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Rev>, StoreError> {
        self.with_local_edits(|transaction, counters| {
            let Some(mut current) = load_current(transaction, doc_id)? else {
                return Ok(None);
            };
            if !resolution.applies_to(&current.tree) {
                return Ok(None);
            }
            for (parent, deleted, body) in resolution.children(&Body::new()) {
                let child = Child {
                    parent: Some(parent),
                    deleted,
                    body,
                    hlc: resolution.hlc,
                };
                let (_, added) =
                    self.add_child(transaction, counters, doc_id, Some(&current), child)?;
                if added {
                    current =
                        load_current(transaction, doc_id)?.ok_or_else(|| StoreError::Corrupt {
                            what: "docs",
                            detail: format!("{doc_id} vanished while being resolved"),
                        })?;
                }
            }
            let record = serde_json::to_string(&resolution.record).expect("records serialize");
            transaction
                .prepare_cached(
                    "INSERT INTO resolutions (doc_id, rev, record) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![doc_id, resolution.rev().to_string(), record])?;
            Ok(Some(resolution.rev()))
        })
    }

    fn compact(&self) -> Result<u64, StoreError> {
        const CHUNK: i64 = 500;
        let depth = self.config.limits.ancestor_bodies;
        let mut dropped = 0;
        let mut after = String::new();
        loop {
            // One short transaction per chunk of documents, so writers are not held up.
            let (count, last) = self.with_write_transaction(|transaction| {
                let documents: Vec<(String, RevTree)> = transaction
                    .prepare_cached(
                        "SELECT doc_id, tree, rev, deleted FROM docs WHERE doc_id > ?1 \
                         ORDER BY doc_id LIMIT ?2",
                    )?
                    .query_and_then(params![after, CHUNK], |row| {
                        Ok::<_, StoreError>((row.get(0)?, tree_from_row(row, 1)?))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut count = 0u64;
                for (doc_id, tree) in &documents {
                    let keep = tree.compaction_window(depth);
                    let stored: Vec<String> = transaction
                        .prepare_cached("SELECT rev FROM revs WHERE doc_id = ?1")?
                        .query_map(params![doc_id], |row| row.get(0))?
                        .collect::<Result<_, _>>()?;
                    let mut delete = transaction
                        .prepare_cached("DELETE FROM revs WHERE doc_id = ?1 AND rev = ?2")?;
                    for rev in stored {
                        if !keep.contains(&parse_rev(&rev)?) {
                            delete.execute(params![doc_id, rev])?;
                            count += 1;
                        }
                    }
                }
                Ok((count, documents.last().map(|(doc_id, ..)| doc_id.clone())))
            })?;
            dropped += count;
            match last {
                Some(last) => after = last,
                None => return Ok(dropped),
            }
        }
    }

    fn resolutions(&self, doc_id: &str) -> Result<Vec<ResolutionRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT record FROM resolutions WHERE doc_id = ?1 ORDER BY id")?;
            let texts = statement
                .query_map(params![doc_id], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            texts
                .iter()
                .map(|text| {
                    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
                        what: "resolutions",
                        detail: error.to_string(),
                    })
                })
                .collect()
        })
    }

    fn get_document(&self, doc_id: &str) -> Result<Option<Document>, StoreError> {
        self.with_reader(|connection| {
            let row = connection
                .prepare_cached(
                    "SELECT rev, deleted, body, hlc, seq, leaves FROM docs WHERE doc_id = ?1",
                )?
                .query_row(params![doc_id], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, bool>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, Option<String>>(5)?,
                    ))
                })
                .optional()?;
            row.map(|(rev, deleted, body, hlc, seq, leaves)| {
                document_from_row(
                    doc_id.to_owned(),
                    &rev,
                    deleted,
                    &body,
                    hlc,
                    seq,
                    leaves.as_deref(),
                )
            })
            .transpose()
        })
    }

    fn get_tree(&self, doc_id: &str) -> Result<Option<RevTree>, StoreError> {
        self.with_reader(|connection| load_tree(connection, doc_id))
    }

    fn get_revision(
        &self,
        doc_id: &str,
        rev: &Rev,
        max_path: usize,
    ) -> Result<Option<StoredRevision>, StoreError> {
        self.with_reader(|connection| {
            let Some(current) = load_current(connection, doc_id)? else {
                return Ok(None);
            };
            stored_revision(connection, doc_id, &current, rev, max_path)
        })
    }

    fn get_revisions(
        &self,
        wanted: &[(String, Rev)],
        max_path: usize,
    ) -> Result<Vec<Option<StoredRevision>>, StoreError> {
        self.with_reader(|connection| {
            let doc_ids: Vec<&str> = wanted.iter().map(|(doc_id, _)| doc_id.as_str()).collect();
            let docs = BatchDocs::load(connection, &doc_ids)?;
            wanted
                .iter()
                .map(|(doc_id, rev)| match docs.0.get(doc_id) {
                    Some(Some(current)) => {
                        stored_revision(connection, doc_id, current, rev, max_path)
                    }
                    _ => Ok(None),
                })
                .collect()
        })
    }

    fn changes(
        &self,
        since: u64,
        limit: usize,
        include_bodies: bool,
    ) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT seq, doc_id, rev, deleted, leaves, CASE WHEN ?3 THEN body END \
                 FROM docs WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut changes = Vec::new();
            let mut cursor = since;
            // Rows that cannot be decoded are left out, so the scan goes on until `limit`
            // readable ones or the end: callers take a short page for the end of the feed.
            loop {
                let wanted = limit - changes.len();
                let mut rows = statement.query(params![
                    to_i64(cursor),
                    i64::try_from(wanted).unwrap_or(i64::MAX),
                    include_bodies
                ])?;
                let mut scanned = 0;
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    cursor = to_u64(row.get(0)?);
                    let doc_id: String = row.get(1)?;
                    let decoded = (|| {
                        let body: Option<String> = row.get(5)?;
                        let rev = parse_rev(&row.get::<_, String>(2)?)?;
                        let deleted = row.get(3)?;
                        let leaves: Option<String> = row.get(4)?;
                        Ok(Change {
                            seq: cursor,
                            doc_id: doc_id.clone(),
                            leaves: decode_leaves(leaves.as_deref(), &rev, deleted)?,
                            rev,
                            deleted,
                            body: body.as_deref().map(parse_body).transpose()?,
                        })
                    })();
                    changes.extend(readable(&doc_id, decoded)?);
                }
                if scanned < wanted || changes.len() >= limit {
                    return Ok(changes);
                }
            }
        })
    }

    fn revs_diff(
        &self,
        revs: &[(String, Vec<Rev>)],
    ) -> Result<Vec<(String, RevsDiff)>, StoreError> {
        self.with_reader(|connection| {
            let doc_ids: Vec<&str> = revs.iter().map(|(doc_id, _)| doc_id.as_str()).collect();
            let mut trees = HashMap::with_capacity(revs.len());
            select_by_ids(
                connection,
                "SELECT doc_id, tree, rev, deleted FROM docs WHERE doc_id IN ({ids})",
                &doc_ids,
                |row| {
                    trees.insert(row.get::<_, String>(0)?, tree_from_row(row, 1)?);
                    Ok(())
                },
            )?;
            let empty = RevTree::new();
            Ok(revs
                .iter()
                .map(|(doc_id, asked)| {
                    let tree = trees.get(doc_id).unwrap_or(&empty);
                    (doc_id.clone(), tree.revs_diff(asked))
                })
                .collect())
        })
    }

    fn get_local(&self, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        let id = id.strip_prefix(LOCAL_PREFIX).unwrap_or(id);
        self.with_reader(|connection| {
            let row = connection
                .prepare_cached("SELECT rev, body FROM local_docs WHERE id = ?1")?
                .query_row(params![id], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .optional()?;
            row.map(|(rev, body)| {
                Ok(LocalDoc {
                    id: id.to_owned(),
                    rev: to_u64(rev),
                    body: parse_body(&body)?,
                })
            })
            .transpose()
        })
    }

    fn put_local(
        &self,
        id: &str,
        expected_rev: Option<u64>,
        body: Option<Body>,
    ) -> Result<u64, StoreError> {
        let id = id.strip_prefix(LOCAL_PREFIX).unwrap_or(id);
        self.with_write_transaction(|transaction| {
            let current: Option<i64> = transaction
                .prepare_cached("SELECT rev FROM local_docs WHERE id = ?1")?
                .query_row(params![id], |row| row.get(0))
                .optional()?;
            if current.map(to_u64) != expected_rev {
                return Err(StoreError::LocalConflict);
            }
            let next = expected_rev.unwrap_or(0) + 1;
            match body {
                Some(body) => {
                    transaction
                        .prepare_cached(
                            "INSERT INTO local_docs (id, rev, body) VALUES (?1, ?2, ?3) \
                             ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, body = excluded.body",
                        )?
                        .execute(params![id, to_i64(next), body_text(&body)])?;
                }
                None => {
                    transaction
                        .prepare_cached("DELETE FROM local_docs WHERE id = ?1")?
                        .execute(params![id])?;
                }
            }
            Ok(next)
        })
    }

    fn all_docs(&self, query: &AllDocsQuery) -> Result<Vec<Document>, StoreError> {
        let (low, high) = if query.descending {
            (&query.end_key, &query.start_key)
        } else {
            (&query.start_key, &query.end_key)
        };
        // Which bound the inclusive_end flag applies to depends on the direction.
        let (low_op, high_op) = match (query.descending, query.inclusive_end) {
            (false, true) | (true, true) => (">=", "<="),
            (false, false) => (">=", "<"),
            (true, false) => (">", "<="),
        };
        let sql = format!(
            "SELECT doc_id, rev, deleted, {body}, hlc, seq, leaves FROM docs \
             WHERE deleted = 0 AND (?1 IS NULL OR doc_id {low_op} ?1) AND (?2 IS NULL OR doc_id {high_op} ?2) \
             ORDER BY doc_id {order} LIMIT ?3 OFFSET ?4",
            body = if query.include_bodies { "body" } else { "'{}'" },
            order = if query.descending { "DESC" } else { "ASC" },
        );
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&sql)?;
            let rows = statement.query(params![
                low,
                high,
                i64::try_from(query.limit).unwrap_or(i64::MAX),
                i64::try_from(query.skip).unwrap_or(i64::MAX)
            ])?;
            documents_from_rows(rows)
        })
    }

    fn collections(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT collection, COUNT(*) FROM docs WHERE deleted = 0 \
                 GROUP BY collection ORDER BY collection",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, to_u64(row.get(1)?)))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn query(&self, query: &Query) -> Result<Vec<Document>, StoreError> {
        let mut order = String::new();
        for (field, descending) in &query.sort {
            let path = json_path(field).ok_or_else(|| {
                StoreError::InvalidQuery(format!("cannot sort on field {field:?}"))
            })?;
            order.push_str(&format!(
                "json_extract(body, '{path}') {}, ",
                if *descending { "DESC" } else { "ASC" }
            ));
        }
        order.push_str("doc_id ASC");
        let (mut prefilter, mut values) = sql_prefilter(&query.selector);
        values.insert(0, rusqlite::types::Value::Text(query.collection.clone()));
        if !query.collection.is_empty() {
            // A collection's documents are the ids between `name:` and `name;` (the next
            // character), so the id index finds them.
            let low = format!("{}{COLLECTION_SEPARATOR}", query.collection);
            let after_separator = char::from_u32(u32::from(COLLECTION_SEPARATOR) + 1)
                .expect("the separator is ASCII");
            let high = format!("{}{after_separator}", query.collection);
            prefilter.push_str(&format!(
                " AND doc_id >= ?{} AND doc_id < ?{}",
                values.len() + 1,
                values.len() + 2
            ));
            values.push(rusqlite::types::Value::Text(low));
            values.push(rusqlite::types::Value::Text(high));
        }
        let sql = format!(
            "SELECT doc_id, rev, deleted, body, hlc, seq, leaves FROM docs \
             WHERE collection = ?1 AND deleted = 0{prefilter} ORDER BY {order}"
        );
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(values))?;
            // Rows are filtered here rather than in SQL so that every selector operator has
            // exactly the semantics of `ferry_core::selector`; the scan stops at the limit, so
            // memory stays bounded by the page size.
            let mut matched = Vec::new();
            let mut skipped = 0;
            while let Some(row) = rows.next()? {
                let document = document_from_sql_row(row)?;
                if !query
                    .selector
                    .matches(&serde_json::Value::Object(document.body.clone()))
                {
                    continue;
                }
                if skipped < query.skip {
                    skipped += 1;
                    continue;
                }
                matched.push(document);
                if matched.len() >= query.limit {
                    break;
                }
            }
            Ok(matched)
        })
    }

    fn ensure_index(&self, collection: &str, field: &str) -> Result<(), StoreError> {
        let path = json_path(field)
            .ok_or_else(|| StoreError::InvalidQuery(format!("cannot index field {field:?}")))?;
        let digest = ferry_core::rev::Rev::compute(
            None,
            false,
            format!("{collection}\u{0}{field}").as_bytes(),
        )
        .expect("a revision without a parent always has an id");
        let name = format!("ix_{}", digest.hash());
        self.with_write_transaction(|transaction| {
            transaction.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {name} ON docs(collection, json_extract(body, '{path}')) \
                 WHERE deleted = 0"
            ))?;
            Ok(())
        })
    }
}
