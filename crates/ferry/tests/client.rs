//! SDK clients against a real `ferry serve` process that is killed with SIGKILL in the middle
//! of their sessions and restarted: they notice, reconnect by themselves, and finish with every
//! write acknowledged and present once on the server and on both clients.

mod support;

use std::time::Duration;

use ferry_client::{ConnectionState, Credentials, Ferry, ReconnectPolicy, SyncOptions};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{ServerProcess, TEST_PASSWORD, TEST_USER};

const WRITES: usize = 200;

fn options(server: &ServerProcess) -> SyncOptions {
    SyncOptions::new(format!("{}/crashy", server.bare_url))
        .credentials(Credentials::password(TEST_USER, TEST_PASSWORD))
        .reconnect(ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        })
}

fn ids(ferry: &Ferry) -> Vec<String> {
    ferry
        .collection::<Value>("todos")
        .query()
        .run()
        .unwrap()
        .into_iter()
        .map(|doc| doc.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_survive_a_sigkill_of_the_server_mid_session() {
    let server_dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(server_dir.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let a = Ferry::initialize_offline(dir.path().join("a.ferry"), TEST_USER).unwrap();
    let b = Ferry::initialize_offline(dir.path().join("b.ferry"), TEST_USER).unwrap();
    let mut a_events = Box::pin(a.connection_events());
    let _sync_a = a.start_sync(options(&server)).unwrap();
    let _sync_b = b.start_sync(options(&server)).unwrap();

    // a writes one document at a time, each pushed as it comes; the server is killed while
    // the first half is still being replicated, and the second half is written while it is
    // down.
    let todos = a.collection::<Value>("todos");
    let write = |range: std::ops::Range<usize>| {
        for n in range {
            todos
                .insert_with_id(&format!("t{n:04}"), &json!({"n": n}))
                .unwrap();
        }
    };
    write(0..WRITES / 2);
    support::eventually(Duration::from_secs(60), "some writes to reach b", || {
        ids(&b).len() >= WRITES / 4
    })
    .await;
    server.kill();
    let mut wait_for = async |what: &str, matches: fn(&ConnectionState) -> bool| {
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(state) = a_events.next().await {
                if matches(&state) {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "{what}");
    };
    wait_for("a noticed the server died", |state| {
        matches!(state, ConnectionState::Interrupted { .. })
    })
    .await;
    write(WRITES / 2..WRITES);
    wait_for(
        "a tried to reconnect and failed",
        |state| matches!(state, ConnectionState::Reconnecting { attempt, .. } if *attempt >= 2),
    )
    .await;
    server.restart();

    assert!(
        a.wait_for_acknowledgement(Duration::from_secs(60))
            .await
            .unwrap()
    );
    support::eventually(Duration::from_secs(60), "b to have every write", || {
        ids(&b).len() == WRITES
    })
    .await;
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(a.connection_state(), ConnectionState::Connected);

    // Present once on the server: one document and one revision per write.
    let info: Value = reqwest::Client::new()
        .get(format!("{}/crashy", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["doc_count"], json!(WRITES), "{info}");
    assert_eq!(info["update_seq"], json!(WRITES), "{info}");
}
