//! The SQLite store keeps the winner's body only in `docs` and the outbox as a flag on the
//! document row, which makes its bookkeeping differ from the in-memory store's. Random
//! sequences of local edits, replicated branches, resolutions, compactions and
//! acknowledgements, applied to both, must leave them answering every read identically.

use ferry_core::hlc::Timestamp;
use ferry_core::json::RawJson;
use ferry_core::model::{Body, Limits, Revision};
use ferry_core::resolve::Policy;
use ferry_core::rev::Rev;
use ferry_store::memory::MemoryDatabase;
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, Edit, StoreConfig};
use ferry_store::{PendingState, Replica};
use proptest::prelude::*;

const DOCS: [&str; 3] = ["todos:a", "todos:b", "notes:c"];

#[derive(Clone, Debug)]
enum Op {
    /// A local edit of the winner (or a creation), or its deletion; `twice`: the same edit
    /// again in the same batch (refused, as its base is no longer a leaf).
    Edit {
        doc: usize,
        value: u8,
        delete: bool,
        twice: bool,
    },
    /// A local edit of any leaf, by index (a conflict's losing side too).
    EditLeaf {
        doc: usize,
        leaf: usize,
        value: u8,
    },
    /// Revisions from another replica: `length` new revisions on top of any revision of the
    /// tree (by index), the last one possibly a tombstone; `extended`: in the same batch, the
    /// same branch one revision longer.
    Branch {
        doc: usize,
        from: usize,
        length: usize,
        value: u8,
        delete: bool,
        extended: bool,
    },
    Resolve {
        doc: usize,
        merge: bool,
    },
    Compact,
    /// The server has everything up to the sequence at this fraction of the current one.
    Acknowledge {
        eighths: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let doc = 0..DOCS.len();
    prop_oneof![
        4 => (doc.clone(), any::<u8>(), proptest::bool::weighted(0.2), proptest::bool::weighted(0.2))
            .prop_map(|(doc, value, delete, twice)| Op::Edit { doc, value, delete, twice }),
        1 => (doc.clone(), 0..4usize, any::<u8>())
            .prop_map(|(doc, leaf, value)| Op::EditLeaf { doc, leaf, value }),
        3 => (doc.clone(), 0..16usize, 1..4usize, any::<u8>(), proptest::bool::weighted(0.2), proptest::bool::weighted(0.2))
            .prop_map(|(doc, from, length, value, delete, extended)| Op::Branch { doc, from, length, value, delete, extended }),
        1 => (doc.clone(), any::<bool>()).prop_map(|(doc, merge)| Op::Resolve { doc, merge }),
        1 => Just(Op::Compact),
        1 => (0..=8u64).prop_map(|eighths| Op::Acknowledge { eighths }),
    ]
}

fn body(value: u8, n: usize) -> Body {
    match serde_json::json!({"value": value, "n": n, "tag": format!("t{}", value % 3)}) {
        serde_json::Value::Object(map) => map,
        _ => unreachable!(),
    }
}

struct Pair {
    sqlite: SqliteDatabase,
    memory: MemoryDatabase,
    _dir: tempfile::TempDir,
    clock: u64,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            // Small limits, so that stemming and the body window come into play.
            limits: Limits {
                revs_limit: 6,
                ancestor_bodies: 2,
                ..Limits::default()
            },
            durability: ferry_store::Durability::Normal,
            track_pending: true,
            ..StoreConfig::default()
        };
        Pair {
            sqlite: SqliteDatabase::open(&dir.path().join("db.sqlite"), "db", config.clone())
                .unwrap(),
            memory: MemoryDatabase::new("db", "replica", config),
            _dir: dir,
            clock: 1,
        }
    }

    fn stores(&self) -> [&dyn Database; 2] {
        [&self.sqlite, &self.memory]
    }

    fn tick(&mut self) -> Timestamp {
        self.clock += 1;
        Timestamp::from_u64(self.clock << 16)
    }

    fn apply(&mut self, op: &Op, step: usize) {
        match *op {
            Op::Edit {
                doc,
                value,
                delete,
                twice,
            } => {
                let hlc = self.tick();
                let doc_id = DOCS[doc];
                let current = self.sqlite.get_document(doc_id).unwrap();
                let edit = match current {
                    Some(document) if delete && !document.deleted => {
                        Edit::delete(doc_id, document.rev)
                    }
                    Some(document) if !document.deleted => {
                        Edit::put(doc_id, Some(document.rev), body(value, step))
                    }
                    _ => Edit::put(doc_id, None, body(value, step)),
                }
                .with_hlc(hlc);
                let copies = if twice { 2 } else { 1 };
                self.write_edits(vec![edit; copies]);
            }
            Op::EditLeaf { doc, leaf, value } => {
                let hlc = self.tick();
                let doc_id = DOCS[doc];
                let Some(tree) = self.sqlite.get_tree(doc_id).unwrap() else {
                    return;
                };
                let leaves = tree.leaves();
                let leaf = &leaves[leaf % leaves.len()];
                let edit = if leaf.deleted {
                    Edit::put(doc_id, None, body(value, step))
                } else {
                    Edit::put(doc_id, Some(leaf.rev.clone()), body(value, step))
                };
                self.write_edits(vec![edit.with_hlc(hlc)]);
            }
            Op::Branch {
                doc,
                from,
                length,
                value,
                delete,
                extended,
            } => {
                let hlc = self.tick();
                let doc_id = DOCS[doc];
                let tree = self.sqlite.get_tree(doc_id).unwrap();
                let mut path: Vec<Rev> = match &tree {
                    Some(tree) => {
                        let revs: Vec<&Rev> = tree.revs().collect();
                        let base = revs[from % revs.len()];
                        tree.ancestry(base, 10)
                    }
                    None => Vec::new(),
                };
                for level in 0..length {
                    let deleted = delete && level + 1 == length;
                    let salt = format!("{step}-{level}-{value}");
                    let rev = Rev::compute(path.first(), deleted, salt.as_bytes()).unwrap();
                    path.insert(0, rev);
                }
                let revision = Revision {
                    doc_id: doc_id.to_owned(),
                    path,
                    deleted: delete,
                    body: if delete {
                        RawJson::empty_object()
                    } else {
                        RawJson::canonical_object(&body(value, step))
                    },
                    hlc: Some(hlc),
                };
                let mut batch = vec![revision.clone()];
                if extended {
                    let mut longer = revision;
                    let next = Rev::compute(longer.path.first(), false, b"extended").unwrap();
                    longer.path.insert(0, next);
                    longer.deleted = false;
                    longer.body = RawJson::canonical_object(&body(value.wrapping_add(1), step));
                    batch.push(longer);
                }
                let reports = self
                    .stores()
                    .map(|db| db.write_revisions(batch.clone(), hlc).unwrap());
                assert_eq!(reports[0], reports[1], "write report of {op:?}");
            }
            Op::Resolve { doc, merge } => {
                let policy = if merge {
                    Policy::Merge
                } else {
                    Policy::LastWriteWins
                };
                let records = self
                    .stores()
                    .map(|db| ferry_store::resolve_conflict(db, DOCS[doc], policy).unwrap());
                assert_eq!(records[0], records[1], "resolution of {op:?}");
            }
            Op::Compact => {
                let dropped = self.stores().map(|db| db.compact().unwrap());
                assert_eq!(dropped[0], dropped[1], "bodies compacted");
            }
            Op::Acknowledge { eighths } => {
                let seq = self.sqlite.info().unwrap().update_seq * eighths / 8;
                let sqlite = self.sqlite.acknowledge_through(seq).unwrap();
                let memory = self.memory.acknowledge_through(seq).unwrap();
                assert_eq!(sqlite, memory, "acknowledged through {seq}");
            }
        }
    }

    fn write_edits(&self, edits: Vec<Edit>) {
        let results = self
            .stores()
            .map(|db| db.write_edits(edits.clone()).unwrap());
        assert_eq!(results[0], results[1], "edits {edits:?}");
    }

    fn assert_same(&self, after: &Op) {
        let [sqlite, memory] = self.stores();
        let counts = |db: &dyn Database| {
            let info = db.info().unwrap();
            (info.doc_count, info.deleted_count, info.update_seq)
        };
        assert_eq!(counts(sqlite), counts(memory), "counts after {after:?}");
        assert_eq!(
            sqlite.changes(0, 100, true).unwrap(),
            memory.changes(0, 100, true).unwrap(),
            "changes after {after:?}"
        );
        for doc_id in DOCS {
            assert_eq!(
                sqlite.get_document(doc_id).unwrap(),
                memory.get_document(doc_id).unwrap(),
                "{doc_id} after {after:?}"
            );
            let tree = sqlite.get_tree(doc_id).unwrap();
            assert_eq!(tree, memory.get_tree(doc_id).unwrap(), "{doc_id} tree");
            for rev in tree.iter().flat_map(|tree| tree.revs()) {
                assert_eq!(
                    sqlite.get_revision(doc_id, rev, 10).unwrap(),
                    memory.get_revision(doc_id, rev, 10).unwrap(),
                    "{doc_id} {rev} after {after:?}"
                );
            }
            assert_eq!(
                sqlite.conflict(doc_id).unwrap(),
                memory.conflict(doc_id).unwrap(),
                "{doc_id} conflict after {after:?}"
            );
        }
        let mut wanted: Vec<(String, Rev)> = Vec::new();
        for doc_id in DOCS.iter().chain(&["todos:missing"]) {
            let tree = sqlite.get_tree(doc_id).unwrap().unwrap_or_default();
            wanted.extend(tree.revs().map(|rev| ((*doc_id).to_owned(), rev.clone())));
            wanted.push((
                (*doc_id).to_owned(),
                Rev::compute(None, false, b"never written").unwrap(),
            ));
        }
        let batched = sqlite.get_revisions(&wanted, 10).unwrap();
        assert_eq!(batched, memory.get_revisions(&wanted, 10).unwrap());
        let one_by_one: Vec<_> = wanted
            .iter()
            .map(|(doc_id, rev)| sqlite.get_revision(doc_id, rev, 10).unwrap())
            .collect();
        assert_eq!(batched, one_by_one, "get_revisions after {after:?}");
        // The outbox, through the `Replica` contract both implement.
        let pending = self.sqlite.pending().unwrap();
        assert_eq!(
            pending,
            self.memory.pending().unwrap(),
            "outbox after {after:?}"
        );
        assert_eq!(
            self.sqlite.outbox().unwrap(),
            self.memory.outbox().unwrap(),
            "outbox counts after {after:?}"
        );
        for doc_id in DOCS {
            let state = self.sqlite.outbox_state(doc_id).unwrap();
            assert_eq!(state, self.memory.outbox_state(doc_id).unwrap(), "{doc_id}");
            let listed = pending.iter().find(|(pending, _)| pending == doc_id);
            let waiting = match state {
                Some(PendingState::Pending { seq }) => Some(seq),
                _ => None,
            };
            assert_eq!(
                waiting,
                listed.map(|(_, seq)| *seq),
                "{doc_id}: listed as pending at its state's sequence"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_and_memory_stores_answer_alike(ops in proptest::collection::vec(op(), 1..60)) {
        let mut pair = Pair::new();
        for (step, op) in ops.iter().enumerate() {
            pair.apply(op, step);
            pair.assert_same(op);
        }
    }
}
