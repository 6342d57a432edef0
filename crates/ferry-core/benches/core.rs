//! Micro-benchmarks of the core hot paths: revision-tree insertion, winner selection,
//! canonical JSON and revision hashing, decoding a session frame and reading a replicated
//! document from it, and the three-way merge.
//!
//! `cargo bench -p ferry-core` (BENCHMARKS.md lists the figures).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ferry_core::couch::{revision_from_checked_text, revision_text};
use ferry_core::hlc::Timestamp;
use ferry_core::json::{RawJson, canonical_object};
use ferry_core::model::{Body, Limits, Revision, validate_document_text};
use ferry_core::protocol::{ClientFrame, Op};
use ferry_core::resolve::{Conflict, Policy, Version, resolve};
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use serde_json::json;

fn body(n: u64) -> Body {
    json!({
        "title": format!("Todo item {n}: buy milk, call the plumber, write the weekly report"),
        "done": n.is_multiple_of(3),
        "tags": ["home", "errand", format!("p{}", n % 5)],
        "n": n,
        "meta": {"owner": "ann", "list": "groceries", "order": n},
    })
    .as_object()
    .expect("an object")
    .clone()
}

/// A linear history of `depth` revisions with `branches` conflicting leaves on top.
fn tree(depth: u64, branches: u64) -> (RevTree, Vec<Rev>) {
    let mut tree = RevTree::new();
    let mut parent: Option<Rev> = None;
    for n in 0..depth {
        let rev = Rev::compute(parent.as_ref(), false, &canonical_object(&body(n))).unwrap();
        tree.add_child(parent.as_ref(), rev.clone(), false);
        parent = Some(rev);
    }
    let leaves = (0..branches)
        .map(|b| {
            let rev =
                Rev::compute(parent.as_ref(), false, &canonical_object(&body(1000 + b))).unwrap();
            tree.add_child(parent.as_ref(), rev.clone(), false);
            rev
        })
        .collect();
    (tree, leaves)
}

fn benches(c: &mut Criterion) {
    let (base, _) = tree(100, 0);
    let path: Vec<Rev> = {
        let (other, leaves) = tree(100, 1);
        other.ancestry(&leaves[0], usize::MAX)
    };
    c.bench_function(
        "tree: merge a 101-revision path into a 100-revision tree",
        |b| {
            b.iter(|| {
                let mut tree = base.clone();
                black_box(tree.merge_path(black_box(&path), false).expect("valid"))
            })
        },
    );
    let (conflicted, _) = tree(100, 8);
    c.bench_function("tree: winner among 8 leaves", |b| {
        b.iter(|| black_box(conflicted.winner()))
    });
    c.bench_function("tree: encode and decode 108 revisions", |b| {
        b.iter(|| RevTree::decode(&black_box(&conflicted).encode()).expect("valid"))
    });
    let document = body(7);
    c.bench_function(
        "json: canonical encoding and revision id of a 200-byte body",
        |b| {
            b.iter(|| {
                let canonical = canonical_object(black_box(&document));
                black_box(Rev::compute(None, false, &canonical).unwrap())
            })
        },
    );
    // A pushed revision as a session frame carries it, taken apart and checked as the
    // server does before storing it.
    let pushed = revision_text(
        &Revision {
            doc_id: "todos:7".into(),
            path: vec![Rev::compute(None, false, &canonical_object(&document)).unwrap()],
            deleted: false,
            body: RawJson::canonical_object(&document),
            hlc: Some(Timestamp::new(1_000, 0)),
        },
        true,
    );
    let limits = Limits::default();
    // A session's bulk_docs frame of 500 such documents, decoded as the server does.
    let frame = ClientFrame::Request {
        id: 7,
        op: Op::BulkDocs {
            docs: vec![pushed.clone(); 500],
        },
    }
    .encode();
    c.bench_function("protocol: decode a bulk_docs frame of 500 documents", |b| {
        b.iter(|| {
            black_box(ClientFrame::decode_within(
                black_box(frame.as_bytes()),
                66,
                1_000_000,
            ))
            .unwrap()
        })
    });
    c.bench_function(
        "couch: read and check a replicated document (200-byte body)",
        |b| {
            b.iter(|| {
                let revision = revision_from_checked_text(black_box(&pushed)).unwrap();
                validate_document_text(&revision.doc_id, &revision.body, &limits).unwrap();
                black_box(revision)
            })
        },
    );
    let versions: Vec<Version> = (0..3)
        .map(|n| {
            let mut changed = body(7);
            changed.insert("title".into(), json!(format!("edited by {n}")));
            changed.insert(format!("field{n}"), json!(n));
            Version {
                rev: Rev::compute(None, false, &canonical_object(&changed)).unwrap(),
                hlc: Timestamp::new(1000 + n, 0),
                body: changed,
            }
        })
        .collect();
    let conflict = Conflict {
        versions,
        ancestor: Some((Rev::compute(None, false, b"{}").unwrap(), Some(body(7)))),
    };
    c.bench_function("resolve: three-way merge of 3 versions", |b| {
        b.iter(|| black_box(resolve(Policy::Merge, black_box(&conflict))))
    });
}

criterion_group!(core, benches);
criterion_main!(core);
