//! Clients syncing through a real server on loopback: acknowledgements, live propagation,
//! offline edits drained after the server comes back, conflicts reported on every replica.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_client::{DocumentStatus, Ferry};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// A server on its own runtime, so that stopping it drops every task and socket at once, as a
/// crash would; it can be started again on the same address with the same data.
struct Server {
    address: SocketAddr,
    data_dir: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    async fn start() -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = Server {
            address: listener.local_addr().unwrap(),
            data_dir: tempfile::tempdir().unwrap(),
            runtime: None,
        };
        server.run(listener);
        server
    }

    fn run(&mut self, listener: std::net::TcpListener) {
        let config = ferry_server::ServerConfig {
            data_dir: self.data_dir.path().to_owned(),
            auth: ferry_server::auth::AuthConfig {
                required: false,
                ..ferry_server::auth::AuthConfig::default()
            },
            ..ferry_server::ServerConfig::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            ferry_server::serve_on(listener, config, std::future::pending()).await
        });
        self.runtime = Some(runtime);
    }

    fn url(&self, db: &str) -> String {
        format!("http://{}/{db}", self.address)
    }

    fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    async fn restart(&mut self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.address) {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(tokio::time::Instant::now() < deadline, "rebind: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.run(listener);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client(dir: &Path, name: &str) -> Ferry {
    Ferry::initialize_offline(dir.join(format!("{name}.ferry")), name).unwrap()
}

/// Waits until `probe` holds, checking whenever `ferry` changes (and at least every 100 ms).
async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !probe() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    let mut server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = server.url("shared");
    let _sync_a = a.start_sync(&url).unwrap();
    let _sync_b = b.start_sync(&url).unwrap();

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
    assert!(
        a.wait_for_acknowledgement(Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert_eq!(
        a.document_status("todos", "first").unwrap(),
        Some(DocumentStatus::Acknowledged)
    );

    // The server goes away. a keeps working offline: creates, updates, deletes.
    server.stop();
    let unreachable = is_unreachable(server.address).await;
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
    let mut server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (client(dir.path(), "a"), client(dir.path(), "b"));
    let url = server.url("conflicts");
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
