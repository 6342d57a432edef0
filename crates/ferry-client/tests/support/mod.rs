//! Shared harness of the SDK tests: a real server on loopback (on a runtime of its own, so it
//! can be stopped like a crash and restarted), clients, sync options, waiting.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_client::{Credentials, Ferry, ReconnectPolicy, SyncOptions};
use ferry_server::ServerConfig;
use ferry_server::auth::{Auth, AuthConfig};
use ferry_store::Backend;

pub const USER: &str = "ann";
pub const PASSWORD: &str = "ann's password";

/// A server on its own runtime, so that stopping it drops every task and socket at once, as a
/// crash would; it can be started again on the same address with the same data.
pub struct Server {
    pub address: SocketAddr,
    data_dir: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
    settings: ServerConfig,
}

impl Server {
    /// A server with default settings (authentication on, the test user created).
    pub async fn start() -> Server {
        Server::start_with(ServerConfig::default()).await
    }

    /// A server with `settings` (its data directory and address are the harness's).
    pub async fn start_with(settings: ServerConfig) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = Server {
            address: listener.local_addr().unwrap(),
            data_dir: tempfile::tempdir().unwrap(),
            runtime: None,
            settings,
        };
        server.accounts().set_user(USER, PASSWORD, false).unwrap();
        server.run(listener);
        server
    }

    fn run(&mut self, listener: std::net::TcpListener) {
        let config = ServerConfig {
            data_dir: self.data_dir.path().to_owned(),
            ..self.settings.clone()
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

    pub fn url(&self, db: &str) -> String {
        format!("http://{}/{db}", self.address)
    }

    /// The server's users and tokens, opened beside the running server (SQLite WAL).
    pub fn accounts(&self) -> Auth {
        Auth::open(self.data_dir.path(), AuthConfig::default()).unwrap()
    }

    /// The server's database `db`, opened beside the running server (SQLite WAL).
    pub fn database(&self, db: &str) -> std::sync::Arc<dyn ferry_store::Database> {
        ferry_store::sqlite::SqliteBackend::open(
            self.data_dir.path(),
            ferry_store::StoreConfig::default(),
        )
        .unwrap()
        .open_database(db)
        .unwrap()
    }

    /// The latest sequence of database `db`, read from the server's own file: one per stored
    /// revision, so a revision stored twice would show.
    pub fn update_seq(&self, db: &str) -> u64 {
        self.database(db).info().unwrap().update_seq
    }

    /// The resolutions the server wrote for `doc_id` in `db`.
    pub fn resolutions(
        &self,
        db: &str,
        doc_id: &str,
    ) -> Vec<ferry_core::resolve::ResolutionRecord> {
        self.database(db).resolutions(doc_id).unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    pub async fn restart(&mut self) {
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

pub fn client(dir: &Path, name: &str) -> Ferry {
    Ferry::initialize_offline(dir.join(format!("{name}.ferry")), name).unwrap()
}

/// Sync options for `url` with the test user's password, quick reconnects, and a heartbeat
/// that notices a server gone without closing its sockets within 2 s.
pub fn options(url: &str) -> SyncOptions {
    SyncOptions::new(url)
        .credentials(Credentials::password(USER, PASSWORD))
        .heartbeat(Duration::from_millis(200), Duration::from_secs(2))
        .reconnect(ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        })
}

/// Waits until `probe` holds, checking whenever `ferry` changes (and at least every 100 ms).
pub async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !probe() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that the server acknowledges every pending change of `ferry` within 30 s.
pub async fn assert_acknowledged(ferry: &Ferry) {
    assert!(
        ferry
            .wait_for_acknowledgement(Duration::from_secs(30))
            .await
            .unwrap(),
        "{:?} still pending",
        ferry.status().unwrap()
    );
}
