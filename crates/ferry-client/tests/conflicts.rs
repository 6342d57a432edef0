//! The seeds' LoopBack scenario under every policy, against a real server on loopback: client 1
//! goes offline, user 1 changes a document, user 2 changes the same document on client 2,
//! client 1 comes back. The exact outcome is asserted on both clients and on the server.

use std::time::Duration;

use ferry_client::{ConflictEvent, ConflictPolicy, Ferry, Resolve};
use ferry_core::resolve::{Policies, Policy};
use futures_util::StreamExt;
use serde_json::{Value, json};

mod support;
use support::{Server, client, options};

const DB: &str = "loopback";

/// What every replica must end with.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    value: Value,
    conflicts: usize,
}

fn outcome(ferry: &Ferry) -> (String, Outcome) {
    let doc = ferry
        .collection::<Value>("todos")
        .get("x")
        .unwrap()
        .expect("the document exists");
    (
        doc.rev.to_string(),
        Outcome {
            value: doc.value,
            conflicts: doc.conflicts.len(),
        },
    )
}

/// Runs the scenario; `prepare` configures the clients. Returns both clients after they
/// converged, and the server's view (read by a third client).
async fn loopback_scenario(
    server: &Server,
    dir: &std::path::Path,
    prepare: impl Fn(&Ferry),
) -> [Ferry; 3] {
    let (one, two) = (client(dir, "client-1"), client(dir, "client-2"));
    prepare(&one);
    prepare(&two);
    let sync = options(&server.url(DB));
    one.collection::<Value>("todos")
        .insert_with_id("x", &json!({"title": "milk", "done": false, "qty": 1}))
        .unwrap();
    one.sync_once(&sync).await.unwrap();
    two.sync_once(&sync).await.unwrap();

    // Client 1 is offline; user 1 edits the title and the quantity.
    one.collection::<Value>("todos")
        .patch("x", &json!({"title": "oat milk", "qty": 3}))
        .unwrap();
    // Later (by the clock, so user 2's write carries the later timestamp), user 2 edits done
    // and the quantity on client 2, which is online.
    wait_for_the_next_millisecond().await;
    two.collection::<Value>("todos")
        .patch("x", &json!({"done": true, "qty": 2}))
        .unwrap();
    two.sync_once(&sync).await.unwrap();

    // Client 1 comes back: push, pull; then everyone syncs until nothing moves.
    for ferry in [&one, &two, &one, &two] {
        ferry.sync_once(&sync).await.unwrap();
    }
    let observer = client(dir, "server-view");
    observer.sync_once(&sync).await.unwrap();
    [one, two, observer]
}

/// Returns once the wall clock shows a later millisecond than when it was called.
async fn wait_for_the_next_millisecond() {
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let start = now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while now_ms() <= start {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::task::yield_now().await;
    }
}

fn assert_same_everywhere(replicas: &[Ferry; 3], expected: &Outcome) {
    let first = outcome(&replicas[0]);
    assert_eq!(&first.1, expected);
    for replica in &replicas[1..] {
        assert_eq!(
            outcome(replica),
            first,
            "same revision and content everywhere"
        );
    }
}

fn server_with(policy: Policy) -> ferry_server::ServerConfig {
    ferry_server::ServerConfig {
        conflict_policies: Policies::default().with("todos", policy),
        ..ferry_server::ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_exposes_both_versions_on_every_replica() {
    let server = support::start_with(server_with(Policy::Keep));
    let dir = tempfile::tempdir().unwrap();
    let replicas = loopback_scenario(&server, dir.path(), |_| {}).await;
    let (_, seen) = outcome(&replicas[0]);
    assert_eq!(seen.conflicts, 1);
    let winner = seen.value.clone();
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: winner,
            conflicts: 1,
        },
    );

    let conflict = replicas[0]
        .collection::<Value>("todos")
        .conflict("x")
        .unwrap()
        .expect("in conflict");
    let mut values: Vec<Value> = conflict.versions.iter().map(|v| v.value.clone()).collect();
    values.sort_by_key(|value| value["qty"].as_u64());
    assert_eq!(
        values,
        [
            json!({"title": "milk", "done": true, "qty": 2}),
            json!({"title": "oat milk", "done": false, "qty": 3}),
        ]
    );
    let ancestor = conflict.ancestor.expect("a common ancestor");
    assert_eq!(
        ancestor.value,
        Some(json!({"title": "milk", "done": false, "qty": 1}))
    );
    assert_eq!(
        replicas[1]
            .collection::<Value>("todos")
            .conflicted()
            .unwrap(),
        ["x"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_write_wins_keeps_user_two_s_later_version_everywhere() {
    let server = support::start_with(server_with(Policy::LastWriteWins));
    let dir = tempfile::tempdir().unwrap();
    let replicas = loopback_scenario(&server, dir.path(), |_| {}).await;
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: json!({"title": "milk", "done": true, "qty": 2}),
            conflicts: 0,
        },
    );
    // One resolution, and it says which version lost.
    let records = server.resolutions(DB, "todos:x");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].overridden.len(), 1);
    assert_eq!(records[0].overridden[0].field, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_keeps_both_users_fields_and_the_later_quantity() {
    let server = support::start_with(server_with(Policy::Merge));
    let dir = tempfile::tempdir().unwrap();
    let replicas = loopback_scenario(&server, dir.path(), |_| {}).await;
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: json!({"title": "oat milk", "done": true, "qty": 2}),
            conflicts: 0,
        },
    );
    // The record names the one value not kept: user 1's quantity.
    let records = server.resolutions(DB, "todos:x");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].overridden.len(), 1);
    assert_eq!(records[0].overridden[0].field, "qty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resolving_on_their_own_write_the_same_revisions() {
    // The server keeps conflicts; each client merges the conflict when it pulls it, on its own.
    let server = support::start_with(server_with(Policy::Keep));
    let dir = tempfile::tempdir().unwrap();
    let replicas = loopback_scenario(&server, dir.path(), |ferry| {
        ferry
            .set_conflict_policy("todos", ConflictPolicy::Merge)
            .unwrap();
    })
    .await;
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: json!({"title": "oat milk", "done": true, "qty": 2}),
            conflicts: 0,
        },
    );
    // Both clients resolved independently and wrote the very same revision, so pushing both
    // made no new conflict on the server.
    let one = replicas[0]
        .collection::<Value>("todos")
        .resolutions("x")
        .unwrap();
    let two = replicas[1]
        .collection::<Value>("todos")
        .resolutions("x")
        .unwrap();
    assert_eq!((one.len(), two.len()), (1, 1), "{one:?} {two:?}");
    assert_eq!(one[0].resolved, two[0].resolved);
    assert!(server.resolutions(DB, "todos:x").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_resolver_on_the_clients_adds_the_quantities() {
    let server = support::start_with(server_with(Policy::Keep));
    let dir = tempfile::tempdir().unwrap();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let replicas = loopback_scenario(&server, dir.path(), |ferry| {
        let stream = ferry.conflict_events();
        let sink = events.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                sink.lock().unwrap().push(event);
            }
        });
        ferry
            .set_conflict_policy(
                "todos",
                ConflictPolicy::custom(|conflict| {
                    let latest = conflict.versions.iter().max_by_key(|v| v.hlc)?;
                    let mut value = latest.value.clone();
                    let total: u64 = conflict
                        .versions
                        .iter()
                        .filter_map(|v| v.value["qty"].as_u64())
                        .sum();
                    value["qty"] = json!(total);
                    Some(value)
                }),
            )
            .unwrap();
    })
    .await;
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: json!({"title": "milk", "done": true, "qty": 5}),
            conflicts: 0,
        },
    );
    let resolved_events = events
        .lock()
        .unwrap()
        .iter()
        .filter(|event| matches!(event, ConflictEvent::Resolved { policy, id, .. } if policy == "custom" && id == "x"))
        .count();
    assert!(resolved_events >= 1, "{:?}", events.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_resolves_by_hand_and_hears_about_it() {
    let server = support::start_with(server_with(Policy::Keep));
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (client(dir.path(), "one"), client(dir.path(), "two"));
    let mut events = Box::pin(one.conflict_events());
    let sync = options(&server.url("by-hand"));
    let todos = one.collection::<Value>("todos");
    todos.insert_with_id("x", &json!({"n": 0})).unwrap();
    one.sync_once(&sync).await.unwrap();
    two.sync_once(&sync).await.unwrap();
    todos.patch("x", &json!({"n": 1})).unwrap();
    two.collection::<Value>("todos")
        .patch("x", &json!({"n": 2}))
        .unwrap();
    two.sync_once(&sync).await.unwrap();
    one.sync_once(&sync).await.unwrap();

    let appeared = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&appeared, ConflictEvent::Appeared { id, versions, .. } if id == "x" && versions.len() == 2),
        "{appeared:?}"
    );
    let resolved = todos.resolve("x", Resolve::Value(json!({"n": 3}))).unwrap();
    assert_eq!(resolved.value, json!({"n": 3}));
    assert!(resolved.conflicts.is_empty());
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, ConflictEvent::Resolved { policy, resolved: rev, .. } if policy == "application" && *rev == resolved.rev),
        "{event:?}"
    );
    // A stale choice is refused: the versions it names are gone.
    assert!(todos.resolve("x", Resolve::Value(json!({"n": 4}))).is_err());

    one.sync_once(&sync).await.unwrap();
    two.sync_once(&sync).await.unwrap();
    let on_two = two.collection::<Value>("todos").get("x").unwrap().unwrap();
    assert_eq!((on_two.value, on_two.conflicts.len()), (json!({"n": 3}), 0));
}

/// Last-write-wins needs an edit to order after the revision it was based on. A revision made
/// on a device whose clock runs ahead (within the server's drift) is pulled, then edited here
/// at once: the edit's clock must still be later than the pulled one's, or a later edit would
/// lose to an earlier one.
#[tokio::test]
async fn an_edit_of_a_pulled_revision_from_a_clock_ahead_orders_after_it() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let ferry = client(dir.path(), "client-1");
    let sync = options(&server.url(DB));
    ferry.sync_once(&sync).await.unwrap(); // creates the database

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ahead = ferry_core::hlc::Timestamp::new(u64::try_from(now).unwrap() + 30_000, 0);
    let body = json!({"title": "from a fast clock"});
    server
        .database(DB)
        .write_edits(vec![
            ferry_store::Edit::put("todos:x", None, body.as_object().unwrap().clone())
                .with_hlc(ahead),
        ])
        .unwrap();
    ferry.sync_once(&sync).await.unwrap();
    let todos = ferry.collection::<Value>("todos");
    assert_eq!(todos.get("x").unwrap().unwrap().value, body, "pulled");

    todos.patch("x", &json!({"done": true})).unwrap();
    ferry.sync_once(&sync).await.unwrap();
    let edited = server
        .database(DB)
        .get_document("todos:x")
        .unwrap()
        .unwrap();
    assert_eq!(
        edited.body["done"],
        json!(true),
        "the edit reached the server"
    );
    assert!(
        edited.hlc > ahead,
        "the edit's clock {} is not after its parent's {ahead}",
        edited.hlc
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_kept_in_the_replica_resolves_what_another_handle_pulls() {
    // The server keeps conflicts. Each client's policy is set through a second handle on its
    // replica file (as the application's UI process and the process that syncs would), and
    // the syncing handle, opened before, resolves by it.
    let server = support::start_with(server_with(Policy::Keep));
    let dir = tempfile::tempdir().unwrap();
    let replicas = loopback_scenario(&server, dir.path(), |ferry| {
        Ferry::initialize_offline(ferry.path(), ferry.user())
            .unwrap()
            .set_conflict_policy("todos", ConflictPolicy::Merge)
            .unwrap();
    })
    .await;
    assert_same_everywhere(
        &replicas,
        &Outcome {
            value: json!({"title": "oat milk", "done": true, "qty": 2}),
            conflicts: 0,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_wall_clock_stamps_the_replica_s_edits() {
    // Client 1's clock runs 10 s ahead (within the server's drift), so under last-write-wins
    // its edit wins although client 2 wrote later.
    let server = support::start_with(server_with(Policy::LastWriteWins));
    let dir = tempfile::tempdir().unwrap();
    let now_ms = ferry_client::WallClock::now_ms(&ferry_client::SystemClock);
    let ahead = std::sync::Arc::new(ferry_client::ManualClock::new(now_ms + 10_000));
    let one = Ferry::builder("client-1")
        .wall_clock(ahead)
        .open(dir.path().join("one.ferry"))
        .unwrap();
    let two = support::client(dir.path(), "client-2");
    let sync = options(&server.url(DB));
    two.collection::<Value>("todos")
        .insert_with_id("x", &json!({"by": "nobody"}))
        .unwrap();
    two.sync_once(&sync).await.unwrap();
    one.sync_once(&sync).await.unwrap();
    one.collection::<Value>("todos")
        .patch("x", &json!({"by": "one"}))
        .unwrap();
    wait_for_the_next_millisecond().await;
    two.collection::<Value>("todos")
        .patch("x", &json!({"by": "two"}))
        .unwrap();
    for ferry in [&two, &one, &two] {
        ferry.sync_once(&sync).await.unwrap();
    }
    for ferry in [&one, &two] {
        let doc = ferry
            .collection::<Value>("todos")
            .get("x")
            .unwrap()
            .unwrap();
        assert_eq!(doc.value, json!({"by": "one"}));
        assert!(doc.conflicts.is_empty());
    }
}
