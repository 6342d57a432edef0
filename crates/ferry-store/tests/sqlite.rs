//! The SQLite store: the conformance suite on real files, plus what only a file-backed store has
//! (reopening, durability settings, schema versions).

use std::sync::Arc;

use ferry_core::json::RawJson;
use ferry_store::sqlite::{SqliteBackend, SqliteDatabase};
use ferry_store::{Backend, Database, Durability, Edit, StoreConfig, StoreError};
use ferry_store::{PendingState, Replica};

/// A fresh backend in its own temporary directory, kept alive as long as the backend.
struct TempBackend {
    backend: SqliteBackend,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempBackend {
    type Target = dyn Backend;
    fn deref(&self) -> &(dyn Backend + 'static) {
        &self.backend
    }
}

fn fresh() -> TempBackend {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        durability: Durability::Normal,
        ..StoreConfig::default()
    };
    TempBackend {
        backend: SqliteBackend::open(dir.path(), config).expect("open backend"),
        _dir: dir,
    }
}

ferry_store::conformance_tests!(fresh);

/// A client replica in its own temporary file, kept alive as long as the replica.
struct TempReplica {
    db: SqliteDatabase,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempReplica {
    type Target = dyn Replica;
    fn deref(&self) -> &(dyn Replica + 'static) {
        &self.db
    }
}

fn fresh_replica() -> TempReplica {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        durability: Durability::Normal,
        track_pending: true,
        ..StoreConfig::default()
    };
    TempReplica {
        db: SqliteDatabase::open(&dir.path().join("replica.ferry"), "local", config)
            .expect("open replica"),
        _dir: dir,
    }
}

ferry_store::outbox_conformance_tests!(fresh_replica);

fn body(value: serde_json::Value) -> ferry_core::model::Body {
    value.as_object().unwrap().clone()
}

#[test]
fn data_and_replica_id_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (replica_id, rev) = {
        let backend = SqliteBackend::open(dir.path(), StoreConfig::default()).unwrap();
        let db = backend.create_database("keep").unwrap();
        let rev = db
            .write_edits(vec![Edit::put(
                "a",
                None,
                body(serde_json::json!({"v": 1})),
            )])
            .unwrap()
            .remove(0)
            .unwrap();
        (db.info().unwrap().replica_id, rev)
    };
    let backend = SqliteBackend::open(dir.path(), StoreConfig::default()).unwrap();
    let db = backend.open_database("keep").unwrap();
    assert_eq!(db.info().unwrap().replica_id, replica_id);
    assert_eq!(db.get_document("a").unwrap().unwrap().rev, rev);
    assert_eq!(backend.database_names().unwrap(), ["keep"]);
}

/// Open databases are a bounded cache: idle ones are closed past the limit and reopened on
/// demand (with what they hold), and when every open one is in use the next is refused
/// rather than opened past the limit. Creation is refused past the limit on databases.
#[test]
fn open_databases_are_bounded_and_creation_has_a_quota() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ferry_store::sqlite::BackendLimits {
        max_databases: 3,
        max_open: 2,
    };
    let backend = SqliteBackend::open(dir.path(), StoreConfig::default())
        .unwrap()
        .with_limits(limits);
    for name in ["a", "b", "c"] {
        let db = backend.create_database(name).unwrap();
        db.write_edits(vec![Edit::put(
            name,
            None,
            body(serde_json::json!({"v": name})),
        )])
        .unwrap();
    }
    assert!(matches!(
        backend.create_database("d"),
        Err(StoreError::TooManyDatabases { limit: 3 })
    ));
    assert_eq!(backend.database_names().unwrap(), ["a", "b", "c"]);
    // Round and round: each open closes the least recently used idle one.
    for _ in 0..3 {
        for name in ["a", "b", "c"] {
            let db = backend.open_database(name).unwrap();
            assert!(db.get_document(name).unwrap().is_some(), "{name}");
        }
    }
    let held_a = backend.open_database("a").unwrap();
    let held_b = backend.open_database("b").unwrap();
    assert!(matches!(
        backend.open_database("c"),
        Err(StoreError::TooManyOpen { limit: 2 })
    ));
    drop(held_b);
    assert!(
        backend
            .open_database("c")
            .unwrap()
            .get_document("c")
            .unwrap()
            .is_some()
    );
    assert!(held_a.get_document("a").unwrap().is_some());
}

#[test]
fn full_durability_sets_synchronous_full_and_wal() {
    // SIGKILL cannot reveal a missing fsync, so the setting itself is asserted.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sqlite");
    let _db = SqliteDatabase::open(&path, "d", StoreConfig::default()).unwrap();
    let check = rusqlite::Connection::open(&path).unwrap();
    let mode: String = check
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // synchronous is per connection: read it through the database's own connection settings
    // by opening a second handle the same way the store does.
    let db2 = SqliteDatabase::open(&path, "d", StoreConfig::default()).unwrap();
    assert_eq!(db2.durability().unwrap(), Durability::Full);
    let normal = SqliteDatabase::open(
        &path,
        "d",
        StoreConfig {
            durability: Durability::Normal,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    assert_eq!(normal.durability().unwrap(), Durability::Normal);
}

#[test]
fn a_file_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.sqlite");
    drop(SqliteDatabase::open(&path, "future", StoreConfig::default()).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        SqliteDatabase::open(&path, "future", StoreConfig::default()),
        Err(StoreError::FutureSchema { found: 99, .. })
    ));
}

#[test]
fn concurrent_writers_on_one_database_serialize() {
    let backend = fresh();
    let db: Arc<dyn ferry_store::Database> = backend.create_database("busy").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let db = db.clone();
            std::thread::spawn(move || {
                for n in 0..50 {
                    db.write_edits(vec![Edit::put(
                        format!("t{thread}-{n}"),
                        None,
                        body(serde_json::json!({ "n": n })),
                    )])
                    .unwrap()
                    .remove(0)
                    .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let info = db.info().unwrap();
    assert_eq!((info.doc_count, info.update_seq), (200, 200));
    let seqs: Vec<u64> = db
        .changes(0, 1000, false)
        .unwrap()
        .iter()
        .map(|change| change.seq)
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

fn tracking(dir: &tempfile::TempDir) -> SqliteDatabase {
    let config = StoreConfig {
        durability: Durability::Normal,
        track_pending: true,
        ..StoreConfig::default()
    };
    SqliteDatabase::open(&dir.path().join("client.sqlite"), "client", config).unwrap()
}

#[test]
fn local_edits_stay_pending_until_acknowledged() {
    use ferry_store::Database;
    use ferry_store::OutboxSummary;
    let dir = tempfile::tempdir().unwrap();
    let db = tracking(&dir);
    let put = |doc_id: &str, base: Option<ferry_core::rev::Rev>| {
        db.write_edits(vec![Edit::put(
            doc_id,
            base,
            body(serde_json::json!({"at": doc_id})),
        )])
        .unwrap()
        .remove(0)
        .unwrap()
    };
    let a1 = put("a", None);
    put("b", None);
    // Revisions that arrive by replication are not local edits.
    db.write_revisions(
        vec![ferry_core::model::Revision {
            doc_id: "remote".into(),
            path: vec!["1-abc".parse().unwrap()],
            deleted: false,
            body: RawJson::empty_object(),
            hlc: None,
        }],
        ferry_core::hlc::Timestamp::ZERO,
    )
    .unwrap();
    assert_eq!(
        db.outbox().unwrap(),
        OutboxSummary {
            pending: 2,
            rejected: 0
        }
    );
    assert_eq!(db.outbox_state("remote").unwrap(), None);
    assert_eq!(
        db.outbox_state("a").unwrap(),
        Some(PendingState::Pending { seq: 1 })
    );

    // A push checkpointed through sequence 1 acknowledges a, not b.
    assert_eq!(db.acknowledge_through(1).unwrap(), 1);
    assert_eq!(db.outbox_state("a").unwrap(), None);
    // A new edit of a after that is pending again, at its new sequence.
    put("a", Some(a1));
    assert_eq!(
        db.outbox_state("a").unwrap(),
        Some(PendingState::Pending { seq: 4 })
    );
    assert_eq!(db.acknowledge_through(3).unwrap(), 1, "b (seq 2) only");
    assert_eq!(db.outbox().unwrap().pending, 1);

    // A refused edit is kept with its reason and not acknowledged by later pushes.
    db.reject("a", "forbidden").unwrap();
    assert_eq!(db.acknowledge_through(100).unwrap(), 0);
    assert_eq!(
        db.outbox_state("a").unwrap(),
        Some(PendingState::Rejected {
            reason: "forbidden".into()
        })
    );
    assert_eq!(
        db.outbox().unwrap(),
        OutboxSummary {
            pending: 0,
            rejected: 1
        }
    );
}

/// Found by the simulator (seed 427): a local edit waits at sequence 1; a pull then brings a
/// concurrent revision of the same document, which moves the document to a later sequence. A
/// push that committed a page ending before that sequence has not carried the edit, and must
/// not acknowledge it.
#[test]
fn a_pending_edit_moved_by_a_pull_waits_for_the_page_that_carries_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = tracking(&dir);
    db.write_edits(vec![Edit::put(
        "a",
        None,
        body(serde_json::json!({"mine": 1})),
    )])
    .unwrap();
    db.write_edits(vec![Edit::put(
        "b",
        None,
        body(serde_json::json!({"other": 1})),
    )])
    .unwrap();
    db.write_revisions(
        vec![replicated(
            "a",
            &["1-0000000000000000000000000000ffff"],
            5,
            serde_json::json!({"theirs": 1}),
        )],
        ferry_core::hlc::Timestamp::new(6, 0),
    )
    .unwrap();
    let moved_to = db.get_document("a").unwrap().unwrap().seq;
    assert_eq!(moved_to, 3);
    // A push whose page ended at b (sequence 2) did not carry a.
    db.acknowledge_through(2).unwrap();
    assert!(
        matches!(
            db.outbox_state("a").unwrap(),
            Some(PendingState::Pending { seq: 3 })
        ),
        "{:?}",
        db.outbox_state("a").unwrap()
    );
    assert_eq!(db.acknowledge_through(3).unwrap(), 1);
    assert_eq!(db.outbox_state("a").unwrap(), None);
}

/// The schema versions 1 to 3 wrote, as they wrote it (version 2 added `outbox`, version 3
/// `resolutions`), with document `a` at revision 1 and, from version 2, pending.
fn old_file(path: &std::path::Path, version: i64) -> ferry_core::rev::Rev {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE docs (doc_id TEXT PRIMARY KEY, collection TEXT NOT NULL,
                 seq INTEGER NOT NULL, rev TEXT NOT NULL, deleted INTEGER NOT NULL,
                 hlc INTEGER NOT NULL, body TEXT NOT NULL, leaves TEXT NOT NULL,
                 tree TEXT NOT NULL);
             CREATE UNIQUE INDEX docs_by_seq ON docs(seq);
             CREATE INDEX docs_by_collection ON docs(collection, deleted, doc_id);
             CREATE TABLE revs (doc_id TEXT NOT NULL, rev TEXT NOT NULL,
                 deleted INTEGER NOT NULL, hlc INTEGER NOT NULL, body TEXT NOT NULL,
                 PRIMARY KEY (doc_id, rev)) WITHOUT ROWID;
             CREATE TABLE local_docs (id TEXT PRIMARY KEY, rev INTEGER NOT NULL,
                 body TEXT NOT NULL) WITHOUT ROWID;
             INSERT INTO meta (key, value) VALUES ('replica_id', 'old-replica'),
                 ('update_seq', '1'), ('doc_count', '1'), ('deleted_count', '0');
             CREATE INDEX ix_old ON docs(collection, json_extract(body, '$.v')) WHERE deleted = 0;",
        )
        .unwrap();
    let body = r#"{"v":1}"#;
    let rev = ferry_core::rev::Rev::compute(None, false, body.as_bytes()).unwrap();
    let mut tree = ferry_core::tree::RevTree::new();
    tree.add_child(None, rev.clone(), false);
    let leaves = serde_json::json!([[rev.to_string(), false]]).to_string();
    connection
        .execute(
            "INSERT INTO docs VALUES ('a', '', 1, ?1, 0, 7, ?2, ?3, ?4)",
            rusqlite::params![rev.to_string(), body, leaves, tree.encode()],
        )
        .unwrap();
    connection
        .execute(
            "INSERT INTO revs VALUES ('a', ?1, 0, 7, ?2)",
            rusqlite::params![rev.to_string(), body],
        )
        .unwrap();
    if version >= 2 {
        connection
            .execute_batch(
                "CREATE TABLE outbox (doc_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, rejected TEXT)
                     WITHOUT ROWID;
                 CREATE INDEX outbox_by_seq ON outbox(seq);
                 INSERT INTO outbox VALUES ('a', 1, NULL);",
            )
            .unwrap();
    }
    if version >= 3 {
        connection
            .execute_batch(
                "CREATE TABLE resolutions (id INTEGER PRIMARY KEY AUTOINCREMENT,
                     doc_id TEXT NOT NULL, rev TEXT NOT NULL, record TEXT NOT NULL);
                 CREATE INDEX resolutions_by_doc ON resolutions(doc_id, id);",
            )
            .unwrap();
    }
    connection
        .pragma_update(None, "user_version", version)
        .unwrap();
    rev
}

#[test]
fn files_of_every_older_version_are_migrated_and_keep_their_data() {
    for version in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let rev = old_file(&path, version);
        let db = tracking_at(&path);
        let document = db.get_document("a").unwrap().unwrap();
        assert_eq!(
            (document.rev, document.seq),
            (rev.clone(), 1),
            "version {version}"
        );
        assert_eq!(document.body["v"], 1);
        let stored = db.get_revision("a", &rev, 1).unwrap().unwrap();
        assert_eq!(stored.parsed_body().unwrap().unwrap()["v"], 1);
        let pending = db.outbox_state("a").unwrap();
        if version >= 2 {
            assert_eq!(
                pending,
                Some(PendingState::Pending { seq: 1 }),
                "version {version}"
            );
        } else {
            assert_eq!(pending, None);
        }
        db.write_edits(vec![Edit::put("b", None, body(serde_json::json!({})))])
            .unwrap();
        let expected_pending = if version >= 2 { 2 } else { 1 };
        assert_eq!(db.outbox().unwrap().pending, expected_pending);
        assert_eq!(db.changes(0, 10, false).unwrap().len(), 2);
        assert!(db.resolutions("a").unwrap().is_empty());
        drop(db);
        let connection = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, 4);
        let query_index: i64 = connection
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'ix_old' AND tbl_name = 'docs'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(
            query_index, 1,
            "the query index is made again on the new table"
        );
        let integrity: String = connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }
}

fn tracking_at(path: &std::path::Path) -> SqliteDatabase {
    let config = StoreConfig {
        track_pending: true,
        ..StoreConfig::default()
    };
    SqliteDatabase::open(path, "old", config).unwrap()
}

fn replicated(
    doc_id: &str,
    path: &[&str],
    hlc: u64,
    value: serde_json::Value,
) -> ferry_core::model::Revision {
    ferry_core::model::Revision {
        doc_id: doc_id.to_owned(),
        path: path.iter().map(|rev| rev.parse().unwrap()).collect(),
        deleted: false,
        body: RawJson::of(&value),
        hlc: Some(ferry_core::hlc::Timestamp::new(hlc, 0)),
    }
}

#[test]
fn compaction_drops_superseded_and_old_bodies_and_merges_fall_back_to_last_write_wins() {
    use ferry_core::resolve::{Method, Policy};
    use ferry_store::Database;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compact.sqlite");
    let db = SqliteDatabase::open(&path, "compact", StoreConfig::default()).unwrap();
    db.write_revisions(
        vec![
            replicated("d", &["1-a"], 1, serde_json::json!({"v": 0})),
            replicated("d", &["2-b", "1-a"], 2, serde_json::json!({"v": "b"})),
            replicated("d", &["2-c", "1-a"], 3, serde_json::json!({"v": "c"})),
        ],
        ferry_core::hlc::Timestamp::ZERO,
    )
    .unwrap();
    let record = ferry_store::resolve_conflict(&db, "d", Policy::LastWriteWins)
        .unwrap()
        .unwrap();
    let loser: ferry_core::rev::Rev = "2-b".parse().unwrap();
    assert_eq!(record.overridden[0].rev, loser);
    // Superseded, still readable until compaction.
    assert!(
        db.get_revision("d", &loser, 1)
            .unwrap()
            .unwrap()
            .body
            .is_some()
    );
    assert!(db.compact().unwrap() >= 1);
    let after = db.get_revision("d", &loser, 5).unwrap().unwrap();
    assert_eq!(after.body, None, "dropped by compaction");
    assert_eq!(after.path.len(), 2, "its history is still known");
    drop(db);

    // With no ancestor bodies kept, a new conflict has no base to merge against.
    let config = StoreConfig {
        limits: ferry_core::model::Limits {
            ancestor_bodies: 0,
            ..ferry_core::model::Limits::default()
        },
        ..StoreConfig::default()
    };
    let db = SqliteDatabase::open(&path, "compact", config).unwrap();
    db.compact().unwrap();
    let resolved = record.resolved.to_string();
    db.write_revisions(
        vec![
            replicated(
                "d",
                &["4-d", &resolved],
                10,
                serde_json::json!({"v": "d", "w": 1}),
            ),
            replicated(
                "d",
                &["4-e", &resolved],
                11,
                serde_json::json!({"v": "c", "w": 2}),
            ),
        ],
        ferry_core::hlc::Timestamp::ZERO,
    )
    .unwrap();
    let conflict = db.conflict("d").unwrap().unwrap();
    assert_eq!(conflict.ancestor.as_ref().unwrap().1, None);
    let record = ferry_store::resolve_conflict(&db, "d", Policy::Merge)
        .unwrap()
        .unwrap();
    assert!(
        matches!(record.method, Method::LastWriteWinsWithoutAncestor { .. }),
        "{record:?}"
    );
    let document = db.get_document("d").unwrap().unwrap();
    assert_eq!(document.body, body(serde_json::json!({"v": "c", "w": 2})));
    // Leaves can still be read whole for replication.
    let leaf = db.get_revision("d", &document.rev, 100).unwrap().unwrap();
    assert!(leaf.into_revision().is_some());
}

#[test]
fn a_replicated_body_is_stored_and_served_as_its_sender_wrote_it() {
    use ferry_store::Database;
    let dir = tempfile::tempdir().unwrap();
    let db = tracking(&dir);
    // Not canonical: spaces, keys out of order, an escape canonical JSON would not write.
    let winner_text = r#"{ "b" : 1, "a": [1, 2], "c": "\u0041" }"#;
    let loser_text = r#"{"z":  null}"#;
    let revision = |rev: &str, text: &str| ferry_core::model::Revision {
        doc_id: "d".to_owned(),
        path: vec![rev.parse().unwrap(), "1-aa".parse().unwrap()],
        deleted: false,
        body: RawJson::from_text(text.to_owned()).unwrap(),
        hlc: Some(ferry_core::hlc::Timestamp::new(1_000, 0)),
    };
    db.write_revisions(
        vec![revision("2-ff", winner_text), revision("2-bb", loser_text)],
        ferry_core::hlc::Timestamp::ZERO,
    )
    .unwrap();
    // Both the winner (kept in `docs`) and the losing leaf (kept in `revs`) come back byte
    // for byte, so that replicating them onward sends what was received.
    for (rev, text) in [("2-ff", winner_text), ("2-bb", loser_text)] {
        let stored = db.get_revision("d", &rev.parse().unwrap(), 10).unwrap();
        let body = stored.and_then(|stored| stored.body).expect("a kept body");
        assert_eq!(body.get(), text, "{rev}");
    }
    // Read as a document, the text is parsed as any other.
    let document = db.get_document("d").unwrap().unwrap();
    assert_eq!(document.rev.to_string(), "2-ff");
    assert_eq!(
        document.body,
        body(serde_json::json!({"a": [1, 2], "b": 1, "c": "A"}))
    );
}
