//! The local database with no server: typed and raw collections, bad input, durability across
//! reopening, queries, and watch streams.

use std::time::Duration;

use ferry_client::{ClientError, DocumentStatus, ErrorKind, Ferry};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Todo {
    title: String,
    done: bool,
}

fn todo(title: &str) -> Todo {
    Todo {
        title: title.into(),
        done: false,
    }
}

fn open(dir: &tempfile::TempDir) -> Ferry {
    Ferry::initialize_offline(dir.path().join("app.ferry"), "ann").unwrap()
}

#[test]
fn typed_documents_are_created_changed_and_deleted_offline() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    let todos = ferry.collection::<Todo>("todos");
    let milk = todos.insert(&todo("milk")).unwrap();
    assert_eq!(milk.id.len(), 32, "a UUIDv7 in simple form");
    assert_eq!(todos.get(&milk.id).unwrap().unwrap().value, todo("milk"));

    let replaced = todos.replace(&milk.id, &todo("oat milk")).unwrap();
    assert_eq!(replaced.rev.generation(), 2);
    let patched = todos.patch(&milk.id, &json!({"done": true})).unwrap();
    assert!(patched.value.done && patched.value.title == "oat milk");

    // Optimistic concurrency: writing on an old revision is refused.
    let stale = todos.replace_at(&milk.id, &milk.rev, &todo("x"));
    assert!(
        matches!(stale, Err(ClientError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(stale.unwrap_err().kind(), ErrorKind::Conflict);
    let taken = todos.insert_with_id(&milk.id, &todo("again"));
    assert!(matches!(taken, Err(ClientError::AlreadyExists { .. })));
    assert_eq!(taken.unwrap_err().kind(), ErrorKind::AlreadyExists);
    // A patch that breaks the type is refused before anything is stored.
    let broken = todos.patch(&milk.id, &json!({"done": "maybe"}));
    assert!(matches!(broken, Err(ClientError::Serde(_))));
    assert_eq!(broken.unwrap_err().kind(), ErrorKind::InvalidDocument);
    assert_eq!(todos.get(&milk.id).unwrap().unwrap().rev, patched.rev);

    assert!(todos.delete(&milk.id).unwrap());
    assert!(todos.get(&milk.id).unwrap().is_none());
    assert!(!todos.delete(&milk.id).unwrap());

    // Recreating the id makes a new document whose history follows the deletion.
    let recreated = todos.insert_with_id(&milk.id, &todo("bread")).unwrap();
    assert_eq!(recreated.rev.generation(), patched.rev.generation() + 2);
    assert_eq!(todos.get(&milk.id).unwrap().unwrap().value, todo("bread"));
    assert_eq!(
        ferry.document_status("todos", &milk.id).unwrap(),
        Some(DocumentStatus::Pending)
    );
    assert_eq!(ferry.status().unwrap().pending, 1);
}

#[test]
fn documents_that_cannot_be_stored_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    let numbers = ferry.collection::<i32>("numbers");
    assert!(matches!(
        numbers.insert(&5),
        Err(ClientError::InvalidDocument(_))
    ));
    let raw = ferry.collection::<Value>("raw");
    assert!(matches!(
        raw.insert(&json!({"_secret": 1})),
        Err(ClientError::InvalidDocument(_))
    ));
    let mut deep = json!({});
    for _ in 0..ferry.limits().max_json_depth {
        deep = json!({ "a": deep });
    }
    assert!(matches!(
        raw.insert(&deep),
        Err(ClientError::InvalidDocument(_))
    ));
    let big = json!({"text": "x".repeat(ferry.limits().max_document_bytes)});
    let too_big = raw.insert(&big);
    assert!(matches!(too_big, Err(ClientError::InvalidDocument(_))));
    assert_eq!(too_big.unwrap_err().kind(), ErrorKind::InvalidDocument);
    let long_id = "x".repeat(ferry.limits().max_doc_id_bytes);
    assert!(matches!(
        raw.insert_with_id(&long_id, &json!({})),
        Err(ClientError::InvalidDocument(_))
    ));
    assert_eq!(ferry.status().unwrap().pending, 0, "nothing was stored");
}

#[test]
fn writes_are_durable_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let ferry = open(&dir);
        ferry
            .collection::<Todo>("todos")
            .insert(&todo("keep"))
            .unwrap()
            .id
    };
    let ferry = open(&dir);
    assert_eq!(
        ferry
            .collection::<Todo>("todos")
            .get(&id)
            .unwrap()
            .unwrap()
            .value,
        todo("keep")
    );
    assert_eq!(
        ferry.status().unwrap().pending,
        1,
        "still waiting for a server"
    );
}

#[test]
fn queries_filter_sort_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    let items = ferry.collection::<Value>("items");
    items.ensure_index("n").unwrap();
    for n in 0..20 {
        items
            .insert_with_id(&format!("{n:02}"), &json!({"n": n, "even": n % 2 == 0}))
            .unwrap();
    }
    ferry
        .collection::<Value>("other")
        .insert(&json!({"n": 100}))
        .unwrap();
    let found = items
        .query()
        .filter(&json!({"even": true}))
        .unwrap()
        .filter(&json!({"n": {"$gte": 10}}))
        .unwrap()
        .sort_desc("n")
        .limit(3)
        .run()
        .unwrap();
    let ids: Vec<&str> = found.iter().map(|doc| doc.id.as_str()).collect();
    assert_eq!(ids, ["18", "16", "14"]);
    assert_eq!(
        items.query().run().unwrap().len(),
        20,
        "other collections are not included"
    );
    assert!(
        items
            .query()
            .filter(&json!({"n": {"$regex": "x"}}))
            .is_err()
    );
}

async fn next<S: futures_util::Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream emitted in time")
        .expect("the stream is open")
}

#[tokio::test]
async fn watching_a_document_sees_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    let todos = ferry.collection::<Todo>("todos");
    let mut watch = Box::pin(todos.watch("a"));
    assert_eq!(next(&mut watch).await.unwrap(), None);
    todos.insert_with_id("a", &todo("first")).unwrap();
    assert_eq!(
        next(&mut watch).await.unwrap().unwrap().value,
        todo("first")
    );
    // A change to another document does not wake this watcher with a duplicate.
    todos.insert_with_id("b", &todo("other")).unwrap();
    todos.replace("a", &todo("second")).unwrap();
    assert_eq!(
        next(&mut watch).await.unwrap().unwrap().value,
        todo("second")
    );
    todos.delete("a").unwrap();
    assert_eq!(next(&mut watch).await.unwrap(), None);
}

#[tokio::test]
async fn live_queries_follow_writes_from_another_handle_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    // A second handle on the same file stands for another process: it shares nothing in
    // memory, so its writes are seen only through the file.
    let other = open(&dir);
    let todos = ferry.collection::<Todo>("todos");
    let mut open_todos = Box::pin(
        todos
            .query()
            .filter(&json!({"done": false}))
            .unwrap()
            .watch(),
    );
    assert!(next(&mut open_todos).await.unwrap().is_empty());
    other
        .collection::<Todo>("todos")
        .insert_with_id("x", &todo("from elsewhere"))
        .unwrap();
    let results = next(&mut open_todos).await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].value.title, "from elsewhere");
    todos.patch("x", &json!({"done": true})).unwrap();
    assert!(next(&mut open_todos).await.unwrap().is_empty());
}

/// Sync runs on a tokio runtime; asking for it outside one is a clear error, not a panic.
#[test]
fn starting_sync_outside_a_runtime_is_a_clear_error() {
    let ferry = Ferry::temporary("ann").unwrap();
    let started = ferry.start_sync(ferry_client::SyncOptions::new("http://127.0.0.1:9/db"));
    assert!(
        matches!(started, Err(ClientError::NoRuntime)),
        "{:?}",
        started.err()
    );
    assert_eq!(started.err().unwrap().kind(), ErrorKind::Usage);
}

/// A watch stream built before any runtime exists (in setup code) still hears the writes
/// another process makes on the same replica once it is polled inside one.
#[test]
fn a_watch_made_outside_a_runtime_still_sees_another_process_write() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = open(&dir);
    let watch = ferry.collection::<Todo>("todos").watch("a");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut watch = std::pin::pin!(watch);
        let first = watch.next().await.unwrap().unwrap();
        assert!(first.is_none(), "nothing yet");
        // Another handle on the same file: its writes wake only its own watchers, so the
        // first one hears of them by polling the file, as it would another process's.
        let other = open(&dir);
        other
            .collection::<Todo>("todos")
            .insert_with_id("a", &todo("from elsewhere"))
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the other writer's document was noticed")
            .unwrap()
            .unwrap();
        assert_eq!(seen.unwrap().value, todo("from elsewhere"));
    });
}

#[test]
fn the_builder_s_limits_are_enforced_at_the_limit_and_one_past() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ferry_client::Limits {
        max_document_bytes: 100,
        ..ferry_client::Limits::default()
    };
    let ferry = Ferry::builder("ann")
        .limits(limits)
        .open(dir.path().join("small.ferry"))
        .unwrap();
    assert_eq!(ferry.limits().max_document_bytes, 100);
    // {"t":"…"} is 8 bytes of JSON around the string.
    let notes = ferry.collection::<Value>("notes");
    notes
        .insert_with_id("fits", &json!({"t": "x".repeat(92)}))
        .unwrap();
    let error = notes
        .insert_with_id("too-big", &json!({"t": "x".repeat(93)}))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidDocument, "{error}");
    assert!(notes.get("too-big").unwrap().is_none());
    assert_eq!(ferry.status().unwrap().pending, 1);
}

#[test]
fn a_limit_of_zero_is_refused_when_opening() {
    let dir = tempfile::tempdir().unwrap();
    let error = Ferry::builder("ann")
        .limits(ferry_client::Limits {
            max_doc_id_bytes: 0,
            ..ferry_client::Limits::default()
        })
        .open(dir.path().join("never.ferry"))
        .expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Usage);
    assert!(error.to_string().contains("max_doc_id_bytes"), "{error}");
    assert!(!dir.path().join("never.ferry").exists());
}
