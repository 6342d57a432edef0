//! The conformance suite: behaviour every [`Backend`] must have, written once.
//!
//! Each check takes a fresh, empty backend and panics (with a message saying what broke) when
//! the backend misbehaves. An implementation runs them all with [`conformance_tests!`], which
//! makes one `#[test]` per check:
//!
//! ```text
//! ferry_store::conformance_tests!(|| my_fresh_backend());
//! ```
//!
//! The checks are not behind `cfg(test)` so that store implementations in other crates (the
//! PostgreSQL one) run exactly the same code.

use ferry_core::hlc::Timestamp;
use ferry_core::json::RawJson;
use ferry_core::model::{Body, Revision};
use ferry_core::rev::Rev;
use ferry_core::selector::Selector;
use ferry_core::tree::EditError;
use serde_json::json;

use crate::{
    AllDocsQuery, Backend, Database, Edit, OutboxSummary, PendingState, Query, Replica, StoreError,
};

/// Generates one `#[test]` per conformance check, each on a backend made by `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            databases_are_created_listed_and_deleted,
            edits_create_update_delete_and_recreate,
            stale_edits_are_refused_and_change_nothing,
            identical_edits_return_the_existing_revision,
            concurrent_replicated_revisions_become_conflicts,
            writing_revisions_twice_changes_nothing,
            an_invalid_revision_rejects_the_whole_batch,
            changes_list_each_document_once_at_its_latest_sequence,
            local_documents_check_their_revision,
            all_docs_ranges_and_pages,
            queries_filter_sort_and_limit,
            history_is_stemmed_and_old_bodies_dropped,
            revisions_are_read_with_their_ancestry,
            conflicts_are_read_and_resolved_atomically,
        );
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let backend = ($make)();
                $crate::conformance::$check(&*backend);
            }
        )*
    };
}

/// Generates one `#[test]` per outbox check, each on a fresh client replica (an empty
/// database recording local edits) made by `$make`.
#[macro_export]
macro_rules! outbox_conformance_tests {
    ($make:expr) => {
        $crate::outbox_conformance_tests!(@each $make;
            a_local_edit_waits_until_a_push_acknowledges_its_sequence,
            a_pulled_revision_moves_a_pending_document_to_its_new_sequence,
            a_refused_edit_keeps_its_reason_until_the_next_local_edit,
            edits_stamped_ahead_get_new_clocks_and_wait_again,
        );
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let replica = ($make)();
                $crate::conformance::$check(&*replica);
            }
        )*
    };
}

fn body(value: serde_json::Value) -> Body {
    value.as_object().expect("test bodies are objects").clone()
}

fn rev(text: &str) -> Rev {
    text.parse().expect("test revisions are valid")
}

fn put(db: &dyn Database, doc_id: &str, base: Option<&Rev>, value: serde_json::Value) -> Rev {
    let results = db
        .write_edits(vec![Edit::put(doc_id, base.cloned(), body(value))])
        .expect("write_edits");
    results
        .into_iter()
        .next()
        .expect("one result")
        .expect("edit accepted")
}

fn replicated(doc_id: &str, path: &[&str], deleted: bool, value: serde_json::Value) -> Revision {
    Revision {
        doc_id: doc_id.to_owned(),
        path: path.iter().map(|text| rev(text)).collect(),
        deleted,
        body: RawJson::of(&value),
        hlc: Some(Timestamp::new(1_000, 0)),
    }
}

/// Databases can be created once, listed, opened, deleted; bad names are refused.
pub fn databases_are_created_listed_and_deleted(backend: &dyn Backend) {
    backend.create_database("b-db").expect("create b-db");
    backend.create_database("a_db").expect("create a_db");
    assert!(matches!(
        backend.create_database("a_db"),
        Err(StoreError::DatabaseExists(_))
    ));
    for bad in ["", "Upper", "1abc", "a/b", "a b", &"a".repeat(129)] {
        assert!(
            matches!(
                backend.create_database(bad),
                Err(StoreError::InvalidDatabaseName(_))
            ),
            "{bad:?} accepted"
        );
    }
    backend
        .create_database(&"a".repeat(128))
        .expect("a 128-character name is allowed");
    let names = backend.database_names().expect("names");
    assert_eq!(names, vec!["a_db".into(), "a".repeat(128), "b-db".into()]);
    let db = backend.open_database("a_db").expect("open");
    put(&*db, "x", None, json!({"v": 1}));
    backend.delete_database("a_db").expect("delete");
    assert!(matches!(
        backend.open_database("a_db"),
        Err(StoreError::NoSuchDatabase(_))
    ));
    assert!(matches!(
        backend.delete_database("a_db"),
        Err(StoreError::NoSuchDatabase(_))
    ));
    let again = backend.create_database("a_db").expect("recreate");
    assert_eq!(
        again.info().expect("info").doc_count,
        0,
        "recreated database is empty"
    );
}

/// The life of one document through local edits, including deletion and recreation.
pub fn edits_create_update_delete_and_recreate(backend: &dyn Backend) {
    let db = backend.create_database("life").expect("create");
    let first = put(&*db, "todos:1", None, json!({"title": "milk"}));
    assert_eq!(first.generation(), 1);
    let second = put(&*db, "todos:1", Some(&first), json!({"title": "oat milk"}));
    let document = db.get_document("todos:1").expect("get").expect("exists");
    assert_eq!(document.rev, second);
    assert_eq!(document.body, body(json!({"title": "oat milk"})));
    assert!(!document.deleted);

    let deletion = db
        .write_edits(vec![Edit::delete("todos:1", second.clone())])
        .expect("delete")
        .remove(0)
        .expect("delete accepted");
    let tombstone = db.get_document("todos:1").expect("get").expect("tombstone");
    assert!(tombstone.deleted);
    assert_eq!(tombstone.rev, deletion);
    let info = db.info().expect("info");
    assert_eq!((info.doc_count, info.deleted_count), (0, 1));

    let recreated = put(&*db, "todos:1", None, json!({"title": "bread"}));
    assert_eq!(
        recreated.generation(),
        4,
        "recreation continues the tombstone branch"
    );
    let tree = db.get_tree("todos:1").expect("tree").expect("exists");
    assert!(
        tree.is_deleted(&deletion),
        "the old deletion stays in the history"
    );
    assert!(tree.is_ancestor_or_self(&first, &recreated));
    let info = db.info().expect("info");
    assert_eq!((info.doc_count, info.deleted_count), (1, 0));
    assert_eq!(info.update_seq, 4);
}

/// An edit on a stale or missing base is refused, alone, and changes nothing.
pub fn stale_edits_are_refused_and_change_nothing(backend: &dyn Backend) {
    let db = backend.create_database("stale").expect("create");
    let first = put(&*db, "a", None, json!({"v": 1}));
    put(&*db, "a", Some(&first), json!({"v": 2}));
    let before = db.info().expect("info");
    let results = db
        .write_edits(vec![
            Edit::put("a", Some(first.clone()), body(json!({"v": 3}))),
            Edit::put("a", None, body(json!({"v": 4}))),
            Edit::put("b", Some(rev("1-abc")), body(json!({"v": 5}))),
            Edit::put("c", None, body(json!({"v": 6}))),
        ])
        .expect("write_edits");
    assert_eq!(results[0], Err(EditError::StaleBase(first)));
    assert_eq!(results[1], Err(EditError::MissingBase));
    assert_eq!(results[2], Err(EditError::NoSuchDocument));
    assert!(results[3].is_ok(), "the valid edit of the batch is applied");
    let after = db.info().expect("info");
    assert_eq!(after.update_seq, before.update_seq + 1);
    assert_eq!(
        db.get_document("a").expect("get").expect("a").body,
        body(json!({"v": 2}))
    );
    assert!(db.get_document("b").expect("get").is_none());
}

/// Repeating an edit that is already stored returns its revision without a new change.
pub fn identical_edits_return_the_existing_revision(backend: &dyn Backend) {
    let db = backend.create_database("same").expect("create");
    let first = put(&*db, "a", None, json!({"v": 1}));
    let seq = db.info().expect("info").update_seq;
    // A deleted-then-recreated document with the same body gets a different revision, because
    // its parent differs; an edit identical in parent and body is the same revision.
    let twin = db
        .write_edits(vec![Edit::put("b", None, body(json!({"v": 1})))])
        .expect("write")
        .remove(0)
        .expect("accepted");
    assert_eq!(
        twin, first,
        "the same edit gives the same revision id on any document"
    );
    assert_eq!(db.info().expect("info").update_seq, seq + 1);
}

/// Revisions replicated from two branches are both kept; the winner is CouchDB's.
pub fn concurrent_replicated_revisions_become_conflicts(backend: &dyn Backend) {
    let db = backend.create_database("conflicts").expect("create");
    let report = db
        .write_revisions(
            vec![
                replicated("d", &["1-a"], false, json!({"v": 0})),
                replicated("d", &["2-b", "1-a"], false, json!({"v": "b"})),
                replicated("d", &["2-c", "1-a"], false, json!({"v": "c"})),
                replicated("e", &["1-e"], false, json!({"v": "e"})),
            ],
            Timestamp::ZERO,
        )
        .expect("write_revisions");
    assert_eq!(report.added, 4);
    // The report names the documents left in conflict, once each, and only them.
    assert_eq!(report.conflicted, ["d"]);
    let document = db.get_document("d").expect("get").expect("d");
    assert_eq!(document.rev, rev("2-c"));
    assert_eq!(document.body, body(json!({"v": "c"})));
    assert_eq!(document.conflicts, vec![rev("2-b")]);
    // A tombstone on the winning branch hands the win to the other branch.
    let report = db
        .write_revisions(
            vec![replicated("d", &["3-d", "2-c", "1-a"], true, json!({}))],
            Timestamp::ZERO,
        )
        .expect("write tombstone");
    assert!(report.conflicted.is_empty(), "one live leaf is no conflict");
    let document = db.get_document("d").expect("get").expect("d");
    assert_eq!(document.rev, rev("2-b"));
    assert_eq!(document.body, body(json!({"v": "b"})));
    assert!(document.conflicts.is_empty());
    let changes = db.changes(0, 10, false).expect("changes");
    let change = changes
        .iter()
        .find(|change| change.doc_id == "d")
        .expect("d");
    assert_eq!(change.leaves.len(), 2, "style=all_docs sees both leaves");
    // A local edit may extend the losing branch (how an application resolves a conflict).
    let resolved = put(&*db, "d", Some(&rev("2-b")), json!({"v": "merged"}));
    assert_eq!(resolved.generation(), 3);
}

/// Invariant 3: the same batch applied twice changes nothing the second time.
pub fn writing_revisions_twice_changes_nothing(backend: &dyn Backend) {
    let db = backend.create_database("twice").expect("create");
    let batch = vec![
        replicated("a", &["2-b", "1-a"], false, json!({"v": 2})),
        replicated("b", &["1-x"], false, json!({"v": 1})),
    ];
    db.write_revisions(batch.clone(), Timestamp::ZERO)
        .expect("first write");
    let info = db.info().expect("info");
    let changes = db.changes(0, 100, true).expect("changes");
    let report = db
        .write_revisions(batch, Timestamp::ZERO)
        .expect("second write");
    assert_eq!((report.added, report.already_present), (0, 2));
    assert_eq!(db.info().expect("info"), info);
    assert_eq!(db.changes(0, 100, true).expect("changes"), changes);
}

/// A batch of revisions is atomic: one malformed revision and none is stored.
pub fn an_invalid_revision_rejects_the_whole_batch(backend: &dyn Backend) {
    let db = backend.create_database("atomic").expect("create");
    let result = db.write_revisions(
        vec![
            replicated("a", &["1-a"], false, json!({"v": 1})),
            replicated("b", &["3-c", "1-a"], false, json!({"v": 2})),
        ],
        Timestamp::ZERO,
    );
    assert!(matches!(result, Err(StoreError::InvalidRevision { .. })));
    assert!(db.get_document("a").expect("get").is_none());
    assert_eq!(db.info().expect("info").update_seq, 0);
}

/// The changes feed has one row per document, at its latest sequence, in order, and pages.
pub fn changes_list_each_document_once_at_its_latest_sequence(backend: &dyn Backend) {
    let db = backend.create_database("feed").expect("create");
    let a1 = put(&*db, "a", None, json!({"v": 1}));
    put(&*db, "b", None, json!({"v": 1}));
    put(&*db, "a", Some(&a1), json!({"v": 2}));
    put(&*db, "c", None, json!({"v": 1}));
    let changes = db.changes(0, 100, true).expect("changes");
    let summary: Vec<(u64, &str)> = changes
        .iter()
        .map(|change| (change.seq, change.doc_id.as_str()))
        .collect();
    assert_eq!(summary, vec![(2, "b"), (3, "a"), (4, "c")]);
    assert_eq!(changes[1].body, Some(body(json!({"v": 2}))));
    let page = db.changes(2, 1, false).expect("page");
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].seq, page[0].body.is_none()), (3, true));
    assert!(db.changes(4, 10, false).expect("end").is_empty());
}

/// Local documents are versioned `0-N`, checked on write, and not in the changes feed.
pub fn local_documents_check_their_revision(backend: &dyn Backend) {
    let db = backend.create_database("local").expect("create");
    assert!(db.get_local("cp").expect("get").is_none());
    assert_eq!(
        db.put_local("cp", None, Some(body(json!({"seq": 1}))))
            .expect("create"),
        1
    );
    assert!(matches!(
        db.put_local("cp", None, Some(body(json!({"seq": 2})))),
        Err(StoreError::LocalConflict)
    ));
    assert_eq!(
        db.put_local("_local/cp", Some(1), Some(body(json!({"seq": 2}))))
            .expect("update"),
        2
    );
    let stored = db.get_local("cp").expect("get").expect("exists");
    assert_eq!((stored.rev, stored.body), (2, body(json!({"seq": 2}))));
    assert!(db.changes(0, 10, false).expect("changes").is_empty());
    db.put_local("cp", Some(2), None).expect("delete");
    assert!(db.get_local("cp").expect("get").is_none());
}

/// `_all_docs` returns live documents by id, with ranges, direction, skip and limit.
pub fn all_docs_ranges_and_pages(backend: &dyn Backend) {
    let db = backend.create_database("all").expect("create");
    for id in ["a", "b", "c", "d"] {
        put(&*db, id, None, json!({ "id": id }));
    }
    let deleted = put(&*db, "bb", None, json!({}));
    db.write_edits(vec![Edit::delete("bb", deleted)])
        .expect("delete");
    let ids = |query: AllDocsQuery| -> Vec<String> {
        db.all_docs(&query)
            .expect("all_docs")
            .into_iter()
            .map(|document| document.doc_id)
            .collect()
    };
    let everything = AllDocsQuery {
        limit: 100,
        inclusive_end: true,
        ..AllDocsQuery::default()
    };
    assert_eq!(ids(everything.clone()), ["a", "b", "c", "d"]);
    let range = AllDocsQuery {
        start_key: Some("b".into()),
        end_key: Some("c".into()),
        ..everything.clone()
    };
    assert_eq!(ids(range.clone()), ["b", "c"]);
    assert_eq!(
        ids(AllDocsQuery {
            inclusive_end: false,
            ..range
        }),
        ["b"]
    );
    assert_eq!(
        ids(AllDocsQuery {
            descending: true,
            start_key: Some("c".into()),
            skip: 1,
            limit: 1,
            ..everything.clone()
        }),
        ["b"]
    );
    let with_bodies = db
        .all_docs(&AllDocsQuery {
            include_bodies: true,
            limit: 1,
            ..everything
        })
        .expect("bodies");
    assert_eq!(with_bodies[0].body, body(json!({"id": "a"})));
}

/// Queries over a collection filter, sort and limit, with and without an index.
pub fn queries_filter_sort_and_limit(backend: &dyn Backend) {
    let db = backend.create_database("query").expect("create");
    let mut edits = Vec::new();
    for n in 0..30 {
        edits.push(Edit::put(
            format!("todos:{n:02}"),
            None,
            body(json!({"n": n, "done": n % 3 == 0, "tag": format!("t{}", n % 4)})),
        ));
    }
    edits.push(Edit::put("notes:1", None, body(json!({"n": 5}))));
    edits.push(Edit::put("todos:odd", None, body(json!({"n": "seven"}))));
    db.write_edits(edits).expect("write");
    let deleted = put(db.as_ref(), "gone:1", None, json!({}));
    db.write_edits(vec![Edit::delete("gone:1", deleted)])
        .expect("delete");
    assert_eq!(
        db.collections().expect("collections"),
        vec![("notes".to_owned(), 1), ("todos".to_owned(), 31)],
        "collections count live documents only"
    );
    let run = |selector: serde_json::Value, sort: Vec<(&str, bool)>, limit: usize| -> Vec<String> {
        db.query(&Query {
            collection: "todos".into(),
            selector: Selector::parse(&selector).expect("selector"),
            sort: sort
                .into_iter()
                .map(|(field, descending)| (field.to_owned(), descending))
                .collect(),
            skip: 0,
            limit,
        })
        .expect("query")
        .into_iter()
        .map(|document| document.doc_id)
        .collect()
    };
    // The same answers without an index (a scan) and with indexes on the filtered fields.
    for indexed in [false, true] {
        if indexed {
            db.ensure_index("todos", "n").expect("index n");
            db.ensure_index("todos", "tag").expect("index tag");
            db.ensure_index("todos", "n")
                .expect("ensure_index is idempotent");
        }
        assert_eq!(
            run(json!({"n": {"$gte": 25}}), vec![("n", true)], 3),
            ["todos:29", "todos:28", "todos:27"]
        );
        assert_eq!(run(json!({"n": 5}), vec![], 10), ["todos:05"]);
        assert_eq!(
            run(
                json!({"n": {"$lt": 9}, "done": true}),
                vec![("n", false)],
                10
            ),
            ["todos:00", "todos:03", "todos:06"]
        );
        assert_eq!(
            run(json!({"n": {"$type": "string"}}), vec![], 10),
            ["todos:odd"]
        );
        assert_eq!(
            run(json!({"tag": "t1", "n": {"$gt": 20}}), vec![], 10),
            ["todos:21", "todos:25", "todos:29"]
        );
    }
    assert!(matches!(
        db.ensure_index("todos", "n'); DROP TABLE docs; --"),
        Err(StoreError::InvalidQuery(_))
    ));
}

/// The revs limit bounds history without dropping leaves; old ancestors lose their bodies.
pub fn history_is_stemmed_and_old_bodies_dropped(backend: &dyn Backend) {
    let db = backend.create_database("stem").expect("create");
    let mut current = put(&*db, "a", None, json!({"v": 0}));
    let first = current.clone();
    for v in 1..1_010 {
        current = put(&*db, "a", Some(&current), json!({ "v": v }));
    }
    let tree = db.get_tree("a").expect("tree").expect("a");
    let limits = ferry_core::model::Limits::default();
    assert_eq!(tree.len(), limits.revs_limit);
    assert!(!tree.contains(&first));
    let parent = tree.parent(&current).expect("parent").clone();
    let kept = db
        .get_revision("a", &parent, 10)
        .expect("get")
        .expect("parent known");
    assert_eq!(
        kept.body,
        Some(RawJson::canonical_object(&body(json!({"v": 1_008})))),
        "recent ancestors keep bodies, as canonical text"
    );
    let old = tree
        .ancestry(&current, limits.ancestor_bodies + 2)
        .pop()
        .expect("old");
    let old = db
        .get_revision("a", &old, 1)
        .expect("get")
        .expect("old known");
    assert_eq!(
        old.body, None,
        "ancestors beyond the window lose their bodies"
    );
}

/// A revision reads back with its body, deleted flag, clock and ancestry.
pub fn revisions_are_read_with_their_ancestry(backend: &dyn Backend) {
    let db = backend.create_database("read").expect("create");
    db.write_revisions(
        vec![replicated(
            "a",
            &["3-c", "2-b", "1-a"],
            false,
            json!({"v": 3}),
        )],
        Timestamp::ZERO,
    )
    .expect("write");
    let stored = db
        .get_revision("a", &rev("3-c"), 2)
        .expect("get")
        .expect("present");
    assert_eq!(stored.path, vec![rev("3-c"), rev("2-b")]);
    assert_eq!(
        stored.body,
        Some(RawJson::canonical_object(&body(json!({"v": 3}))))
    );
    assert_eq!(stored.hlc, Timestamp::new(1_000, 0));
    let ancestor = db
        .get_revision("a", &rev("1-a"), 5)
        .expect("get")
        .expect("ancestor is in the tree");
    assert_eq!(ancestor.body, None, "ancestors received by id have no body");
    assert!(db.get_revision("a", &rev("9-z"), 5).expect("get").is_none());
    let diff = db
        .revs_diff(&[
            ("a".into(), vec![rev("2-b"), rev("4-d")]),
            ("zz".into(), vec![rev("1-q")]),
        ])
        .expect("revs_diff");
    assert_eq!(diff[0].1.missing, vec![rev("4-d")]);
    assert_eq!(diff[0].1.possible_ancestors, vec![rev("3-c")]);
    assert_eq!(diff[1].1.missing, vec![rev("1-q")]);
}

/// A conflict is read with its versions and common ancestor; a resolution writes the resolved
/// body and the tombstones in one step, records what it did, keeps the losing version readable,
/// and refuses to apply to a document that changed since.
pub fn conflicts_are_read_and_resolved_atomically(backend: &dyn Backend) {
    use ferry_core::resolve::{Policy, resolve};
    let db = backend.create_database("resolve").expect("create");
    assert!(db.conflict("d").expect("conflict").is_none());
    db.write_revisions(
        vec![
            replicated(
                "d",
                &["1-a"],
                false,
                json!({"title": "milk", "done": false}),
            ),
            replicated(
                "d",
                &["2-b", "1-a"],
                false,
                json!({"title": "oat milk", "done": false}),
            ),
            replicated(
                "d",
                &["2-c", "1-a"],
                false,
                json!({"title": "milk", "done": true}),
            ),
        ],
        Timestamp::ZERO,
    )
    .expect("write_revisions");
    let conflict = db.conflict("d").expect("conflict").expect("in conflict");
    assert_eq!(conflict.versions.len(), 2);
    let (ancestor, ancestor_body) = conflict.ancestor.clone().expect("an ancestor");
    assert_eq!(ancestor, rev("1-a"));
    assert_eq!(
        ancestor_body,
        Some(body(json!({"title": "milk", "done": false})))
    );

    let resolution = resolve(Policy::Merge, &conflict).expect("a resolution");
    let before = db.info().expect("info").update_seq;
    let resolved = db
        .apply_resolution("d", &resolution)
        .expect("apply")
        .expect("not stale");
    let document = db.get_document("d").expect("get").expect("d");
    assert_eq!(document.rev, resolved);
    assert_eq!(
        document.body,
        body(json!({"title": "oat milk", "done": true}))
    );
    assert!(document.conflicts.is_empty());
    assert!(db.info().expect("info").update_seq > before);
    // The superseded version is still readable, below its tombstone.
    let loser = db
        .get_revision("d", &rev("2-b"), 1)
        .expect("get_revision")
        .expect("kept");
    assert_eq!(
        loser.body,
        Some(RawJson::canonical_object(&body(
            json!({"title": "oat milk", "done": false})
        )))
    );
    let records = db.resolutions("d").expect("resolutions");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].resolved, resolved);
    assert_eq!(records[0].policy, "merge");
    // Applying it again: the leaves it expects are gone, so nothing is written.
    assert_eq!(db.apply_resolution("d", &resolution).expect("apply"), None);
    assert_eq!(db.resolutions("d").expect("resolutions").len(), 1);
}

fn pending_of(replica: &dyn Replica) -> Vec<(String, u64)> {
    replica.pending().expect("pending")
}

/// Invariant 1 and 5: a local edit stays pending, at its document's sequence, until a push
/// acknowledges that sequence; an acknowledgement below it changes nothing.
pub fn a_local_edit_waits_until_a_push_acknowledges_its_sequence(replica: &dyn Replica) {
    let first = put(replica, "a", None, json!({"v": 1}));
    put(replica, "b", None, json!({"v": 1}));
    put(replica, "a", Some(&first), json!({"v": 2}));
    // `a` was edited again: one entry, at its latest sequence (3), after `b`'s (2).
    assert_eq!(
        pending_of(replica),
        vec![("b".to_owned(), 2), ("a".to_owned(), 3)]
    );
    assert_eq!(
        replica.outbox().expect("outbox"),
        OutboxSummary {
            pending: 2,
            rejected: 0
        }
    );
    assert_eq!(
        replica.outbox_state("a").expect("state"),
        Some(PendingState::Pending { seq: 3 })
    );
    assert_eq!(replica.acknowledge_through(1).expect("ack"), 0);
    assert_eq!(replica.acknowledge_through(2).expect("ack"), 1, "b only");
    assert_eq!(pending_of(replica), vec![("a".to_owned(), 3)]);
    assert_eq!(replica.acknowledge_through(3).expect("ack"), 1);
    assert_eq!(replica.outbox_state("a").expect("state"), None);
    assert_eq!(replica.outbox().expect("outbox"), OutboxSummary::default());
}

/// The seed-427 rule: a pulled revision that moves a pending document to a later sequence
/// moves its entry too, so a push page that ended before the new sequence does not
/// acknowledge an edit it never carried. A resolution is a local edit.
pub fn a_pulled_revision_moves_a_pending_document_to_its_new_sequence(replica: &dyn Replica) {
    let base = put(replica, "d", None, json!({"v": 0}));
    assert_eq!(replica.acknowledge_through(1).expect("ack"), 1);
    put(replica, "d", Some(&base), json!({"v": "local"}));
    assert_eq!(pending_of(replica), vec![("d".to_owned(), 2)]);
    // A concurrent edit made elsewhere arrives: the document moves to a later sequence.
    let base = base.to_string();
    replica
        .write_revisions(
            vec![replicated("d", &["2-b", &base], false, json!({"v": "b"}))],
            Timestamp::ZERO,
        )
        .expect("pull");
    let seq = replica.get_document("d").expect("get").expect("d").seq;
    assert!(seq > 2);
    assert_eq!(pending_of(replica), vec![("d".to_owned(), seq)]);
    assert_eq!(replica.acknowledge_through(seq - 1).expect("ack"), 0);
    // A pulled document with no local edit is not pending.
    replica
        .write_revisions(
            vec![replicated("e", &["1-e"], false, json!({}))],
            Timestamp::ZERO,
        )
        .expect("pull");
    assert_eq!(replica.outbox_state("e").expect("state"), None);
    assert_eq!(replica.acknowledge_through(u64::MAX).expect("ack"), 1);
    // Resolving the conflict is a local edit: pending again, at the resolution's sequence.
    let resolution =
        crate::resolve_conflict(replica, "d", ferry_core::resolve::Policy::LastWriteWins)
            .expect("resolve")
            .expect("a conflict to resolve");
    let resolved = replica.get_document("d").expect("get").expect("d");
    assert_eq!(resolved.rev, resolution.resolved);
    assert_eq!(pending_of(replica), vec![("d".to_owned(), resolved.seq)]);
}

/// A refusal is kept with its reason (not retried blindly, not lost) through any
/// acknowledgement, until the application edits the document again.
pub fn a_refused_edit_keeps_its_reason_until_the_next_local_edit(replica: &dyn Replica) {
    let refused = put(replica, "r", None, json!({"v": 1}));
    put(replica, "ok", None, json!({"v": 1}));
    replica.reject("r", "forbidden: no").expect("reject");
    assert_eq!(
        replica.outbox_state("r").expect("state"),
        Some(PendingState::Rejected {
            reason: "forbidden: no".to_owned()
        })
    );
    assert_eq!(
        replica.outbox().expect("outbox"),
        OutboxSummary {
            pending: 1,
            rejected: 1
        }
    );
    assert_eq!(pending_of(replica), vec![("ok".to_owned(), 2)]);
    assert_eq!(
        replica.acknowledge_through(u64::MAX).expect("ack"),
        1,
        "ok only"
    );
    assert!(matches!(
        replica.outbox_state("r").expect("state"),
        Some(PendingState::Rejected { .. })
    ));
    put(replica, "r", Some(&refused), json!({"v": 2}));
    let seq = replica.get_document("r").expect("get").expect("r").seq;
    assert_eq!(
        replica.outbox_state("r").expect("state"),
        Some(PendingState::Pending { seq })
    );
    // Rejecting a document with nothing pending changes nothing.
    replica.acknowledge_through(u64::MAX).expect("ack");
    replica.reject("r", "late").expect("reject");
    assert_eq!(replica.outbox().expect("outbox"), OutboxSummary::default());
}

/// What `restamp_outbox` re-stamps: each leaf of a waiting document (refused or not) stamped
/// after the bound, the local leaf of a conflict included, with a new sequence and a pending
/// entry; acknowledged documents, pulled revisions and clocks within the bound keep theirs;
/// revision ids stay.
pub fn edits_stamped_ahead_get_new_clocks_and_wait_again(replica: &dyn Replica) {
    let ahead = Timestamp::new(90_000, 0);
    let bound = Timestamp::new(60_000, 0);
    let write = |doc_id: &str, hlc: Timestamp| {
        replica
            .write_edits(vec![
                Edit::put(doc_id, None, body(json!({"v": doc_id}))).with_hlc(hlc),
            ])
            .expect("write_edits")
            .remove(0)
            .expect("edit accepted")
    };
    write("acked", ahead);
    assert_eq!(replica.acknowledge_through(1).expect("ack"), 1);
    write("within", Timestamp::new(50_000, 0));
    let ahead_rev = write("ahead", ahead);
    write("refused", ahead);
    replica
        .reject("refused", "clock_ahead: too far")
        .expect("reject");
    let local_leaf = write("conflicted", ahead);
    replica
        .write_revisions(
            vec![replicated(
                "conflicted",
                &["1-ffffffffffffffffffffffffffffffff"],
                false,
                json!({"v": "pulled"}),
            )],
            Timestamp::ZERO,
        )
        .expect("pull");
    let conflicted = replica
        .get_document("conflicted")
        .expect("get")
        .expect("conflicted");
    assert_eq!(
        conflicted.conflicts,
        vec![local_leaf.clone()],
        "the pull wins"
    );
    let seq_before = replica.info().expect("info").update_seq;

    let mut next = 55_000;
    let mut stamp = || {
        next += 1;
        Timestamp::new(next, 0)
    };
    assert_eq!(
        replica.restamp_outbox(bound, &mut stamp).expect("restamp"),
        3
    );

    let clock_of = |doc_id: &str, rev: &Rev| {
        replica
            .get_revision(doc_id, rev, 1)
            .expect("get_revision")
            .expect("kept")
            .hlc
    };
    let ahead_doc = replica.get_document("ahead").expect("get").expect("ahead");
    assert_eq!(ahead_doc.rev, ahead_rev, "the same revision");
    assert_eq!(ahead_doc.hlc, Timestamp::new(55_001, 0));
    assert_eq!(clock_of("ahead", &ahead_rev), Timestamp::new(55_001, 0));
    assert_eq!(
        replica
            .get_document("refused")
            .expect("get")
            .expect("refused")
            .hlc,
        Timestamp::new(55_002, 0)
    );
    assert_eq!(
        clock_of("conflicted", &local_leaf),
        Timestamp::new(55_003, 0)
    );
    assert_eq!(
        clock_of("conflicted", &conflicted.rev),
        Timestamp::new(1_000, 0),
        "the pulled leaf keeps its clock"
    );
    let unchanged = |doc_id: &str| {
        replica
            .get_document(doc_id)
            .expect("get")
            .expect(doc_id)
            .hlc
    };
    assert_eq!(
        unchanged("acked"),
        ahead,
        "acknowledged: the server took it"
    );
    assert_eq!(unchanged("within"), Timestamp::new(50_000, 0));

    // Each re-stamped document waits again at a new sequence, in the order they had.
    let pending = pending_of(replica);
    let ids: Vec<&str> = pending.iter().map(|(doc_id, _)| doc_id.as_str()).collect();
    assert_eq!(ids, ["within", "ahead", "refused", "conflicted"]);
    assert_eq!(
        pending[1..].iter().map(|(_, seq)| *seq).collect::<Vec<_>>(),
        [seq_before + 1, seq_before + 2, seq_before + 3]
    );
    assert_eq!(replica.info().expect("info").update_seq, seq_before + 3);
    let changes = replica.changes(seq_before, 10, false).expect("changes");
    assert_eq!(
        changes.len(),
        3,
        "the feed lists them at their new sequences"
    );
    assert_eq!(
        replica.restamp_outbox(bound, &mut stamp).expect("again"),
        0,
        "nothing left ahead"
    );
}
