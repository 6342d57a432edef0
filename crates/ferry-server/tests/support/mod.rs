//! Helpers shared by the server's integration tests: a server on loopback, waiting for the
//! clock.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use ferry_server::ServerConfig;
use ferry_server::auth::Auth;

/// A server on a free loopback port, with its own data directory; stopped when dropped.
pub struct TestServer {
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// Its data directory.
    pub data_dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestServer {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// Starts a server with `config` (in a fresh data directory) and these users, as
/// (name, password, administrator).
pub async fn serve(config: ServerConfig, users: &[(&str, &str, bool)]) -> TestServer {
    let data_dir = tempfile::tempdir().unwrap();
    let accounts = Auth::open(data_dir.path(), config.auth.clone()).unwrap();
    for (name, password, admin) in users {
        accounts.set_user(name, password, *admin).unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let config = ServerConfig {
        data_dir: data_dir.path().to_owned(),
        ..config
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ferry_server::serve_on(listener, config, async move {
        let _ = stopped.await;
    }));
    TestServer {
        address,
        data_dir,
        _stop: stop,
    }
}

/// Returns once the wall clock is past `epoch_ms` (an expiry the server reported).
pub async fn wait_until_past(epoch_ms: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ferry_store::clock::WallClock::now_ms(&ferry_store::clock::SystemClock) <= epoch_ms {
        assert!(Instant::now() < deadline, "the clock stands still");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
