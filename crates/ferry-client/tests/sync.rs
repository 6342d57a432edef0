//! Clients syncing through a real server on loopback: acknowledgements, live propagation,
//! offline edits drained after the server comes back, conflicts reported on every replica,
//! the connection state machine through a TCP proxy that cuts and stalls the network,
//! reconnect tokens, and the fallback authentication callback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_client::{
    ConnectionState, Credentials, DocumentStatus, ErrorKind, Ferry, OfflineSubscription,
    SyncOptions,
};
use ferry_store::accounts::TokenKind;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

mod support;
use support::{Server, USER, assert_acknowledged, client, eventually, options};

/// Records every connection state `ferry` goes through.
fn record_states(ferry: &Ferry) -> Arc<Mutex<Vec<ConnectionState>>> {
    let states = Arc::new(Mutex::new(vec![ferry.connection_state()]));
    let events = ferry.connection_events();
    let sink = states.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(state) = events.next().await {
            sink.lock().unwrap().push(state);
        }
    });
    states
}

/// Waits until `ferry` is in a state `matches` accepts.
async fn wait_for_state(ferry: &Ferry, what: &str, matches: impl Fn(&ConnectionState) -> bool) {
    eventually(what, || matches(&ferry.connection_state())).await;
}

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Keep connections open but forward nothing (packets lost in a dead network).
    Stall,
    /// Close every connection and refuse new ones.
    Cut,
}

/// A TCP proxy in front of the server that the test can cut or stall.
struct Proxy {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let modes = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *modes.borrow() == Mode::Cut {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, modes.subscribe()));
                tokio::spawn(pipe(server_read, client_write, modes.subscribe()));
            }
        });
        Proxy { address, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    fn url(&self, db: &str) -> String {
        format!("http://{}/{db}", self.address)
    }
}

/// Returns once the proxy is cut.
async fn cut(mode: &mut watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Cut {
            return;
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut cut_watch = mode.clone();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = cut(&mut cut_watch) => return,
        };
        let Ok(n @ 1..) = read else { return };
        // While stalled, hold the bytes (and read nothing more) until forwarding resumes.
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Forward => break,
                Mode::Cut => return,
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Whether nothing accepts connections at `address` any more, waiting up to 10 s for a
/// stopping server to let go of its socket (a background shutdown does not wait).
async fn is_unreachable(address: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(address).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn contents(ferry: &Ferry) -> Vec<(String, Value)> {
    ferry
        .collection::<Value>("todos")
        .query()
        .sort("n")
        .run()
        .unwrap()
        .into_iter()
        .map(|doc| (doc.id, doc.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_reach_the_other_client_after_the_server_comes_back() {
    let mut server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = server.url("shared");
    let _sync_a = a.start_sync(options(&url)).unwrap();
    let _sync_b = b.start_sync(options(&url)).unwrap();
    assert!(matches!(
        a.clone().start_sync(options(&url)),
        Err(ferry_client::ClientError::AlreadySyncing)
    ));

    let todos_a = a.collection::<Value>("todos");
    let mut seen_by_b = Box::pin(b.collection::<Value>("todos").watch("first"));
    assert_eq!(seen_by_b.next().await.unwrap().unwrap(), None);
    todos_a
        .insert_with_id("first", &json!({"n": 1, "title": "milk"}))
        .unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(30), seen_by_b.next())
        .await
        .expect("the change reached b")
        .unwrap()
        .unwrap()
        .expect("present");
    assert_eq!(arrived.value["title"], json!("milk"));
    assert_acknowledged(&a).await;
    assert_eq!(
        a.document_status("todos", "first").unwrap(),
        Some(DocumentStatus::Acknowledged)
    );

    // The server goes away. a keeps working offline: creates, updates, deletes.
    server.stop();
    let unreachable = is_unreachable(server.address()).await;
    assert!(unreachable, "the server is really gone");
    todos_a
        .insert_with_id("second", &json!({"n": 2, "title": "bread"}))
        .unwrap();
    todos_a
        .patch("first", &json!({"title": "oat milk"}))
        .unwrap();
    todos_a.insert_with_id("third", &json!({"n": 3})).unwrap();
    todos_a.delete("third").unwrap();
    assert_eq!(a.status().unwrap().pending, 3);
    // Nothing can acknowledge them while the server is gone.
    assert!(
        !a.wait_for_acknowledgement(Duration::from_millis(500))
            .await
            .unwrap()
    );
    assert_eq!(a.status().unwrap().pending, 3);
    assert_eq!(
        a.document_status("todos", "second").unwrap(),
        Some(DocumentStatus::Pending)
    );

    // It comes back: everything pending drains and reaches b, nothing lost or doubled.
    server.restart().await;
    assert!(
        a.wait_for_acknowledgement(Duration::from_secs(60))
            .await
            .unwrap()
    );
    eventually("b to converge", || contents(&b) == contents(&a)).await;
    let on_b = contents(&b);
    assert_eq!(on_b.len(), 2);
    assert_eq!(on_b[0].1["title"], json!("oat milk"));
    assert!(
        b.collection::<Value>("todos")
            .get("third")
            .unwrap()
            .is_none()
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_are_reported_as_conflicts_on_both_clients() {
    let mut server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = options(&server.url("conflicts"));
    a.collection::<Value>("todos")
        .insert_with_id("x", &json!({"n": 0}))
        .unwrap();
    a.sync_once(&url).await.unwrap();
    b.sync_once(&url).await.unwrap();
    a.collection::<Value>("todos")
        .patch("x", &json!({"by": "a"}))
        .unwrap();
    b.collection::<Value>("todos")
        .patch("x", &json!({"by": "b"}))
        .unwrap();
    a.sync_once(&url).await.unwrap();
    b.sync_once(&url).await.unwrap();
    a.sync_once(&url).await.unwrap();
    for ferry in [&a, &b] {
        assert_eq!(
            ferry.document_status("todos", "x").unwrap(),
            Some(DocumentStatus::Conflicted)
        );
        assert_eq!(
            ferry.status().unwrap().pending,
            0,
            "both edits were acknowledged"
        );
    }
    let on_a = a.collection::<Value>("todos").get("x").unwrap().unwrap();
    let on_b = b.collection::<Value>("todos").get("x").unwrap().unwrap();
    assert_eq!(
        (on_a.rev.clone(), on_a.conflicts.clone()),
        (on_b.rev, on_b.conflicts)
    );
    assert_eq!(on_a.conflicts.len(), 1);
    server.stop();
}

/// `push_once` sends the outbox and pulls nothing; `pull_once` brings the server's changes
/// and pushes nothing; `sync_once` does both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_once_only_pushes_and_pull_once_only_pulls() {
    let mut server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = options(&server.url("halves"));
    write_batch(&a, "a", 3);
    write_batch(&b, "b", 2);
    let pushed = a.push_once(&url).await.unwrap();
    assert_eq!(pushed.docs_written, 3);
    assert_eq!(a.status().unwrap().pending, 0, "acknowledged");
    b.push_once(&url).await.unwrap();
    // a pushed only: b's documents, on the server now, are not on a.
    assert_eq!(contents(&a).len(), 3, "{:?}", contents(&a));
    // b pulls a's documents, and a later edit of b's stays pending: a pull pushes nothing.
    b.collection::<Value>("todos")
        .insert_with_id("late", &json!({"n": 9}))
        .unwrap();
    let pulled = b.pull_once(&url).await.unwrap();
    assert_eq!(pulled.docs_written, 3);
    assert_eq!(contents(&b).len(), 6);
    assert_eq!(b.status().unwrap().pending, 1);
    a.pull_once(&url).await.unwrap();
    assert_eq!(contents(&a).len(), 5, "b's late edit never left b");
    server.stop();
}

/// Writes `count` documents `{prefix}-{i}` to `todos`.
fn write_batch(ferry: &Ferry, prefix: &str, count: usize) {
    let todos = ferry.collection::<Value>("todos");
    for i in 0..count {
        todos
            .insert_with_id(
                &format!("{prefix}-{i:03}"),
                &json!({"n": i, "batch": prefix}),
            )
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_and_a_stalled_network_are_survived_with_the_reconnect_token() {
    let server = support::start();
    let proxy = Proxy::start(server.address()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = client(dir.path(), "a");
    let states = record_states(&a);
    let (_, access) = server.accounts().login(USER, support::PASSWORD).unwrap();
    let sync = options(&proxy.url("resilient"))
        .credentials(Credentials::AccessToken(access.token))
        .heartbeat(Duration::from_millis(100), Duration::from_millis(600));
    let _sync = a.start_sync(sync).unwrap();
    wait_for_state(&a, "connected", |s| *s == ConnectionState::Connected).await;
    write_batch(&a, "before", 20);
    assert_acknowledged(&a).await;

    // From now on the access token no longer works: only the reconnect token can get back
    // in. (A new password would end the reconnect token too.)
    server
        .accounts()
        .accounts()
        .revoke_tokens(USER, Some(TokenKind::Access))
        .unwrap();

    // Cut: every connection closed, new ones refused for a while. Writes go on offline.
    proxy.set(Mode::Cut);
    write_batch(&a, "cut", 20);
    wait_for_state(
        &a,
        "reconnecting",
        |s| matches!(s, ConnectionState::Reconnecting { attempt, .. } if *attempt >= 2),
    )
    .await;
    assert_eq!(a.status().unwrap().pending, 20);
    proxy.set(Mode::Forward);
    assert_acknowledged(&a).await;
    wait_for_state(&a, "connected again", |s| *s == ConnectionState::Connected).await;

    // Stall: the connection stays open but nothing moves; only the heartbeat notices.
    let interruptions_before = count_interruptions(&states);
    proxy.set(Mode::Stall);
    write_batch(&a, "stall", 20);
    eventually("the stall to be noticed", || {
        count_interruptions(&states) > interruptions_before
    })
    .await;
    proxy.set(Mode::Forward);
    assert_acknowledged(&a).await;

    // Nothing lost, nothing stored twice: 60 documents, 60 revisions on the server.
    assert_eq!(server.update_seq("resilient"), 60);
    let b = client(dir.path(), "b");
    let pulled = b
        .sync_once(&options(&server.url("resilient")))
        .await
        .unwrap();
    assert_eq!(pulled.pull.docs_written, 60);
    assert_eq!(contents(&b), contents(&a));

    let states = states.lock().unwrap().clone();
    assert!(
        !states
            .iter()
            .any(|s| matches!(s, ConnectionState::AuthenticationFailed { .. })),
        "the reconnect token was enough: {states:?}"
    );
    let first_connected = states.iter().position(|s| *s == ConnectionState::Connected);
    let first_interrupted = states
        .iter()
        .position(|s| matches!(s, ConnectionState::Interrupted { .. }));
    assert!(
        matches!((first_connected, first_interrupted), (Some(c), Some(i)) if c < i),
        "{states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&ConnectionState::Connected),
        "{states:?}"
    );
}

fn count_interruptions(states: &Mutex<Vec<ConnectionState>>) -> usize {
    states
        .lock()
        .unwrap()
        .iter()
        .filter(|s| matches!(s, ConnectionState::Interrupted { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_ask_the_fallback_and_the_outbox_drains() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("fallback");

    // Connect once: the replica now holds a reconnect token.
    let a = client(dir.path(), "a");
    let first = a.start_sync(options(&url)).unwrap();
    wait_for_state(&a, "connected", |s| *s == ConnectionState::Connected).await;
    drop(first);

    // Offline, the server revokes the tokens and the password changes.
    write_batch(&a, "offline", 5);
    server
        .accounts()
        .accounts()
        .revoke_tokens(USER, None)
        .unwrap();
    server
        .accounts()
        .set_user(USER, "the new password", false)
        .unwrap();

    // Token refused, then the old password refused: the callback supplies the new one.
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let sync = options(&url).on_authentication_failure(move |failure| {
        counted.fetch_add(1, Ordering::SeqCst);
        assert!(failure.reason.contains("unauthorized"), "{failure:?}");
        async { Some(Credentials::password(USER, "the new password")) }
    });
    let _sync = a.start_sync(sync).unwrap();
    assert_acknowledged(&a).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(server.update_seq("fallback"), 5);

    // A callback with nothing to offer: authentication failed, and the outbox is kept.
    let c = client(dir.path(), "c");
    write_batch(&c, "kept", 3);
    let refused = SyncOptions::new(&url)
        .credentials(Credentials::password(USER, "wrong"))
        .on_authentication_failure(|_| async { None });
    let _refused = c.start_sync(refused).unwrap();
    wait_for_state(&c, "authentication failed", |s| {
        matches!(s, ConnectionState::AuthenticationFailed { .. })
    })
    .await;
    assert_eq!(c.status().unwrap().pending, 3);
    assert_eq!(contents(&c).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_switched_offline_converges_with_the_other_when_back_online() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = server.url("switch");
    let _sync_a = a.start_sync(options(&url)).unwrap();
    let _sync_b = b.start_sync(options(&url)).unwrap();
    write_batch(&a, "shared", 10);
    eventually("b to receive the first batch", || contents(&b).len() == 10).await;
    assert_acknowledged(&a).await;

    a.set_online(false);
    wait_for_state(&a, "offline", |s| *s == ConnectionState::Offline).await;
    // Offline on a: creates, updates, deletes, on documents nobody has open, and a deleted
    // id created again. Meanwhile b edits other documents.
    let todos = a.collection::<Value>("todos");
    write_batch(&a, "offline", 5);
    todos
        .patch("shared-001", &json!({"title": "patched offline"}))
        .unwrap();
    todos.delete("shared-002").unwrap();
    todos.delete("shared-003").unwrap();
    todos
        .insert_with_id("shared-003", &json!({"n": 3, "title": "recreated"}))
        .unwrap();
    b.collection::<Value>("todos")
        .patch("shared-009", &json!({"title": "edited by b"}))
        .unwrap();
    // b's edit makes a full round trip through the server while a is offline.
    assert_acknowledged(&b).await;
    // Eight documents changed on a (five new, one patched, one deleted, one recreated).
    assert_eq!(
        a.status().unwrap().pending,
        8,
        "a's edits wait for it to come online"
    );
    assert_eq!(
        b.collection::<Value>("todos").get("offline-000").unwrap(),
        None,
        "nothing leaves a while it is offline"
    );

    a.set_online(true);
    assert_acknowledged(&a).await;
    assert_acknowledged(&b).await;
    eventually("both replicas to converge", || {
        full_state(&a) == full_state(&b) && full_state(&a).len() == 14
    })
    .await;
    // Stored once each on the server: one sequence per document update received. 10 creates,
    // then from a's offline batch 5 creates, 1 patch, 1 deletion and 1 deletion + recreation
    // (one path), and b's patch.
    assert_eq!(server.update_seq("switch"), 19);
    let on_b = b.collection::<Value>("todos");
    assert_eq!(on_b.get("shared-002").unwrap(), None);
    let recreated = on_b.get("shared-003").unwrap().unwrap();
    assert_eq!(recreated.value["title"], json!("recreated"));
    assert_eq!(
        on_b.get("shared-001").unwrap().unwrap().value["title"],
        json!("patched offline")
    );
    assert_eq!(
        a.collection::<Value>("todos")
            .get("shared-009")
            .unwrap()
            .unwrap()
            .value["title"],
        json!("edited by b")
    );
}

/// Every live document with its winning revision and conflicts.
fn full_state(ferry: &Ferry) -> Vec<(String, String, Vec<String>, Value)> {
    ferry
        .collection::<Value>("todos")
        .query()
        .run()
        .unwrap()
        .into_iter()
        .map(|doc| {
            let conflicts = doc.conflicts.iter().map(ToString::to_string).collect();
            (doc.id, doc.rev.to_string(), conflicts, doc.value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_subscriptions_download_documents_that_stay_readable_without_the_server() {
    let mut server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("subscribed");
    let writer = client(dir.path(), "writer");
    write_batch(&writer, "todo", 5);
    let notes = writer.collection::<Value>("notes");
    notes
        .insert_with_id("pinned", &json!({"pinned": true}))
        .unwrap();
    notes
        .insert_with_id("loose", &json!({"pinned": false}))
        .unwrap();
    writer.sync_once(&options(&url)).await.unwrap();

    let reader = client(dir.path(), "reader");
    let _sync = reader.start_sync(options(&url).only_subscribed()).unwrap();
    wait_for_state(&reader, "connected", |s| *s == ConnectionState::Connected).await;
    let count = |collection: &str| {
        reader
            .collection::<Value>(collection)
            .query()
            .run()
            .unwrap()
            .len()
    };
    assert!(
        reader
            .subscribe_offline(OfflineSubscription::collection("todos"))
            .unwrap()
    );
    eventually("the todos to be downloaded", || count("todos") == 5).await;
    assert_eq!(count("notes"), 0, "only what is subscribed");

    // Kept current while connected: an update and a deletion made elsewhere arrive.
    let todos = writer.collection::<Value>("todos");
    todos
        .patch("todo-000", &json!({"title": "changed"}))
        .unwrap();
    todos.delete("todo-001").unwrap();
    writer.sync_once(&options(&url)).await.unwrap();
    eventually("the update and the deletion", || {
        count("todos") == 4
            && reader
                .collection::<Value>("todos")
                .get("todo-000")
                .unwrap()
                .unwrap()
                .value["title"]
                == json!("changed")
    })
    .await;

    // A query subscription: only matching notes.
    let pinned = OfflineSubscription::query("notes", json!({"pinned": true})).unwrap();
    reader.subscribe_offline(pinned.clone()).unwrap();
    eventually("the pinned note", || count("notes") == 1).await;
    assert!(
        reader
            .collection::<Value>("notes")
            .get("loose")
            .unwrap()
            .is_none()
    );
    assert_eq!(
        reader.offline_subscriptions().unwrap(),
        [OfflineSubscription::collection("todos"), pinned]
    );

    // Unsubscribed: new todos stop coming, while pinned notes still do. The session starts
    // again with the new filter before anything more is written.
    let mut states = Box::pin(reader.connection_events());
    assert!(
        reader
            .unsubscribe_offline(&OfflineSubscription::collection("todos"))
            .unwrap()
    );
    let resubscribed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut restarted = false;
        while let Some(state) = states.next().await {
            restarted |= state == ConnectionState::Connecting;
            if restarted && state == ConnectionState::Connected {
                return;
            }
        }
    })
    .await;
    assert!(
        resubscribed.is_ok(),
        "the session restarted with the new filter"
    );
    todos.insert_with_id("todo-new", &json!({"n": 99})).unwrap();
    notes
        .insert_with_id("pinned-2", &json!({"pinned": true}))
        .unwrap();
    writer.sync_once(&options(&url)).await.unwrap();
    eventually("the second pinned note", || count("notes") == 2).await;
    assert!(
        reader
            .collection::<Value>("todos")
            .get("todo-new")
            .unwrap()
            .is_none()
    );

    // The server goes away: everything downloaded is readable.
    server.stop();
    assert!(is_unreachable(server.address()).await);
    assert_eq!(count("todos"), 4);
    assert_eq!(count("notes"), 2);
    assert_eq!(
        reader
            .collection::<Value>("todos")
            .get("todo-004")
            .unwrap()
            .unwrap()
            .value["n"],
        json!(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_and_recreated_document_is_not_confused_with_the_old_one() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = options(&server.url("recreate"));
    a.collection::<Value>("todos")
        .insert_with_id("x", &json!({"title": "old", "owner": "a"}))
        .unwrap();
    a.sync_once(&url).await.unwrap();
    b.sync_once(&url).await.unwrap();

    // Offline, b edits the old document while a deletes it and creates a new one, same id.
    b.collection::<Value>("todos")
        .patch("x", &json!({"note": "edited by b"}))
        .unwrap();
    let todos_a = a.collection::<Value>("todos");
    todos_a.delete("x").unwrap();
    let recreated = todos_a
        .insert_with_id("x", &json!({"title": "new"}))
        .unwrap();
    let old = b.collection::<Value>("todos").get("x").unwrap().unwrap();
    assert!(
        recreated.rev.generation() > old.rev.generation(),
        "the new document continues after the tombstone"
    );

    for ferry in [&a, &b, &a] {
        ferry.sync_once(&url).await.unwrap();
    }
    // Both agree; the new document wins and b's edit of the old one was not applied to it,
    // nor lost: it is a conflicting version the application can see.
    for ferry in [&a, &b] {
        let x = ferry
            .collection::<Value>("todos")
            .get("x")
            .unwrap()
            .unwrap();
        assert_eq!(x.rev, recreated.rev);
        assert_eq!(x.value, json!({"title": "new"}));
        assert_eq!(x.conflicts.len(), 1, "b's edit of the old document is kept");
        assert_eq!(
            ferry.document_status("todos", "x").unwrap(),
            Some(DocumentStatus::Conflicted)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_the_server_refuses_is_marked_rejected_and_the_rest_still_syncs() {
    let server = support::start_with(ferry_server::ServerConfig {
        limits: ferry_core::model::Limits {
            max_document_bytes: 200,
            ..ferry_core::model::Limits::default()
        },
        ..ferry_server::ServerConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let a = client(dir.path(), "a");
    let todos = a.collection::<Value>("todos");
    todos.insert_with_id("small-1", &json!({"n": 1})).unwrap();
    todos
        .insert_with_id("huge", &json!({"text": "x".repeat(500)}))
        .unwrap();
    todos.insert_with_id("small-2", &json!({"n": 2})).unwrap();
    let _sync = a.start_sync(options(&server.url("refusing"))).unwrap();

    assert_acknowledged(&a).await;
    assert_eq!(
        a.status().unwrap(),
        ferry_client::SyncCounts {
            pending: 0,
            rejected: 1
        }
    );
    match a.document_status("todos", "huge").unwrap() {
        Some(DocumentStatus::Rejected { reason }) => {
            assert!(reason.contains("document_too_large"), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        a.document_status("todos", "small-2").unwrap(),
        Some(DocumentStatus::Acknowledged)
    );
    assert_eq!(
        server.update_seq("refusing"),
        2,
        "the two small documents, stored once"
    );
    assert_eq!(
        a.connection_state(),
        ConnectionState::Connected,
        "one refusal stops nothing"
    );

    // Fixed by the application: pending again, then acknowledged.
    todos
        .replace("huge", &json!({"text": "short now"}))
        .unwrap();
    assert_acknowledged(&a).await;
    assert_eq!(
        a.status().unwrap(),
        ferry_client::SyncCounts {
            pending: 0,
            rejected: 0
        }
    );
    assert_eq!(server.update_seq("refusing"), 3);
}

/// A failed sync says what kind of failure it is: refused credentials ask for a new login, an
/// unreachable server is worth retrying later, a server that refuses the request is neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_says_what_kind_of_failure_it_is() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();
    let a = client(dir.path(), "a");
    write_batch(&a, "kinds", 1);
    let wrong_password = SyncOptions::new(server.url("kinds"))
        .credentials(Credentials::password(USER, "not the password"));
    let refused = a.sync_once(&wrong_password).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused}");
    // Nothing listens on a port just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = free.local_addr().unwrap();
    drop(free);
    let unreachable = a
        .sync_once(&options(&format!("http://{address}/kinds")))
        .await
        .unwrap_err();
    assert_eq!(unreachable.kind(), ErrorKind::Unavailable, "{unreachable}");
    let bad_name = a
        .sync_once(&options(&server.url("Invalid")))
        .await
        .unwrap_err();
    assert_eq!(bad_name.kind(), ErrorKind::Sync, "{bad_name}");
    assert_eq!(a.status().unwrap().pending, 1, "the outbox is kept");
}

/// The server's clock, an hour behind this machine's: to that server, a client here is a device
/// whose clock runs an hour ahead (the server allows 60 s).
struct AnHourBehind;

const HOUR_MS: u64 = 3_600_000;

impl ferry_store::clock::WallClock for AnHourBehind {
    fn now_ms(&self) -> u64 {
        ferry_store::clock::SystemClock.now_ms() - HOUR_MS
    }
}

async fn a_server_an_hour_behind() -> Server {
    support::start_with(ferry_server::ServerConfig {
        wall_clock: Arc::new(AnHourBehind),
        ..ferry_server::ServerConfig::default()
    })
}

/// A device whose clock runs far ahead is not refused forever: each session (`sync_once` or
/// the background one) re-bases the replica's clock on the server's, so an edit made before the
/// first session, one made during a session and one made offline after the replica was opened
/// again all reach the server with clocks it takes, each ordered after its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_clock_runs_far_ahead_re_bases_on_the_server_and_its_edits_sync() {
    use ferry_store::clock::WallClock;
    let server = a_server_an_hour_behind().await;
    let dir = tempfile::tempdir().unwrap();
    let sync = options(&server.url("ahead"));
    let on_server = |n: u64| {
        let document = server
            .database("ahead")
            .get_document("todos:t")
            .unwrap()
            .expect("on the server");
        assert_eq!(document.body["n"], json!(n), "the edit reached the server");
        assert!(
            document.hlc.wall_ms() <= AnHourBehind.now_ms() + 60_000,
            "{} is beyond what the server takes",
            document.hlc
        );
        document.hlc
    };
    let synced = ferry_client::SyncCounts {
        pending: 0,
        rejected: 0,
    };
    let second = {
        let a = client(dir.path(), "a");
        let todos = a.collection::<Value>("todos");
        todos.insert_with_id("t", &json!({"n": 1})).unwrap();
        a.sync_once(&sync).await.unwrap();
        assert_eq!(a.status().unwrap(), synced, "refused as clock_ahead?");
        let first = on_server(1);

        let _sync = a.start_sync(sync.clone()).unwrap();
        wait_for_state(&a, "connected", |state| {
            *state == ConnectionState::Connected
        })
        .await;
        todos.patch("t", &json!({"n": 2})).unwrap();
        assert_acknowledged(&a).await;
        assert_eq!(a.status().unwrap(), synced);
        let second = on_server(2);
        assert!(second > first, "{second} does not order after {first}");
        second
    };

    // Opened again, the replica's clock runs ahead until a session (here a background one)
    // re-bases it.
    let a = client(dir.path(), "a");
    a.collection::<Value>("todos")
        .patch("t", &json!({"n": 3}))
        .unwrap();
    let _sync = a.start_sync(sync).unwrap();
    assert_acknowledged(&a).await;
    assert_eq!(a.status().unwrap(), synced);
    let third = on_server(3);
    assert!(third > second, "{third} does not order after {second}");
}

/// The same over HTTP (`Ferry::push_to`, as `ferry sync` pushes): the server's `Date` re-bases
/// the replica's clock, to the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_http_re_bases_a_clock_that_runs_far_ahead_too() {
    use ferry_store::clock::WallClock;
    let server = a_server_an_hour_behind().await;
    let dir = tempfile::tempdir().unwrap();
    let a = client(dir.path(), "a");
    a.collection::<Value>("todos")
        .insert_with_id("t", &json!({"n": 1}))
        .unwrap();
    let url = server
        .url("ahead")
        .replacen("http://", "http://ann:ann%27s%20password@", 1);
    let http = ferry_client::HttpPeer::new(&url).unwrap();
    let options = ferry_client::ReplicationOptions {
        create_target: true,
        ..ferry_client::ReplicationOptions::default()
    };
    let pushed = a.push_to(&http, &options, |_| {}).await.unwrap();
    assert_eq!(pushed.docs_written, 1);
    assert_eq!(
        a.status().unwrap(),
        ferry_client::SyncCounts {
            pending: 0,
            rejected: 0
        },
        "refused as clock_ahead?"
    );
    let stored = server
        .database("ahead")
        .get_document("todos:t")
        .unwrap()
        .expect("on the server");
    assert!(stored.hlc.wall_ms() <= AnHourBehind.now_ms() + 60_000);
}
