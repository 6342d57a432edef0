//! What Ferry's integration tests share (a dev-dependency only): a real server on loopback,
//! running on a tokio runtime of its own so that stopping it drops every task and socket at
//! once, as a crash would, and restarting it serves the same data on the same address; and
//! waiting for a condition with a deadline.
//!
//! Tests of a `ferry serve` process (the binary) have their harness in `crates/ferry/tests`.
//!
//! ```
//! let server = ferry_test_support::TestServer::start(
//!     ferry_server::ServerConfig::default(),
//!     &[("ann", "ann's password", false)],
//! );
//! assert!(server.url("notes").starts_with("http://127.0.0.1:"));
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_server::ServerConfig;
use ferry_server::auth::{Auth, AuthConfig};
use ferry_store::{Backend, Database};

/// A server on a free loopback port with a data directory of its own; stopped when dropped.
pub struct TestServer {
    address: SocketAddr,
    data_dir: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
    config: ServerConfig,
}

impl TestServer {
    /// Starts a server with `config` (its data directory is the harness's) and these users, as
    /// (name, password, administrator). Callable from synchronous and async tests alike.
    pub fn start(config: ServerConfig, users: &[(&str, &str, bool)]) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let mut server = TestServer {
            address: listener.local_addr().expect("bound"),
            data_dir: tempfile::tempdir().expect("a temporary directory"),
            runtime: None,
            config,
        };
        let accounts = server.accounts();
        for (name, password, admin) in users {
            accounts.set_user(name, password, *admin).expect("add user");
        }
        server.run(listener);
        server
    }

    /// [`TestServer::start`] with authentication off, for tests of something else.
    pub fn without_auth(config: ServerConfig) -> TestServer {
        TestServer::start(
            ServerConfig {
                auth: AuthConfig {
                    required: false,
                    ..config.auth.clone()
                },
                ..config
            },
            &[],
        )
    }

    fn run(&mut self, listener: std::net::TcpListener) {
        let config = ServerConfig {
            data_dir: self.data_dir.path().to_owned(),
            ..self.config.clone()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the server");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            ferry_server::serve_on(listener, config, std::future::pending()).await
        });
        self.runtime = Some(runtime);
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT` (`https://` when the server terminates TLS).
    pub fn base_url(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.address)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.base_url())
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The server's users and tokens, opened beside the running server (SQLite WAL).
    pub fn accounts(&self) -> Auth {
        Auth::open(self.data_dir.path(), self.config.auth.clone()).expect("open accounts")
    }

    /// The server's database `db`, opened beside the running server (SQLite WAL).
    pub fn database(&self, db: &str) -> Arc<dyn Database> {
        ferry_store::sqlite::SqliteBackend::open(
            self.data_dir.path(),
            ferry_store::StoreConfig::default(),
        )
        .expect("open the server's storage")
        .open_database(db)
        .expect("open the database")
    }

    /// The latest sequence of database `db`, read from the server's own file: one per stored
    /// revision, so a revision stored twice would show.
    pub fn update_seq(&self, db: &str) -> u64 {
        self.database(db).info().expect("database info").update_seq
    }

    /// The resolutions the server wrote for `doc_id` in `db`.
    pub fn resolutions(
        &self,
        db: &str,
        doc_id: &str,
    ) -> Vec<ferry_core::resolve::ResolutionRecord> {
        self.database(db)
            .resolutions(doc_id)
            .expect("read resolutions")
    }

    /// Stops the server at once, as a crash would (what it committed stays).
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Stops the server and starts it again on the same address with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.address) {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "rebind {}: {error}",
                        self.address
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.run(listener);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `probe` holds, looking every 20 ms; fails the test after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for synchronous tests: looks every `poll`.
pub fn wait_until(timeout: Duration, poll: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(poll);
    }
}

/// Returns once the system's wall clock is past `epoch_ms` (an expiry a server reported).
pub async fn wait_until_past(epoch_ms: u64) {
    let now = || ferry_store::clock::WallClock::now_ms(&ferry_store::clock::SystemClock);
    eventually(Duration::from_secs(10), "the clock to move", || {
        now() > epoch_ms
    })
    .await;
}
