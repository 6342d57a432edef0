//! Shared harness of the SDK tests: a real server on loopback (`ferry_test_support`, on a
//! runtime of its own, so it can be stopped like a crash and restarted) with the test user,
//! clients, sync options, waiting.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use ferry_client::{Credentials, Ferry, ReconnectPolicy, SyncOptions};
use ferry_server::ServerConfig;

pub const USER: &str = "ann";
pub const PASSWORD: &str = "ann's password";

/// A real server on loopback, on a runtime of its own (`ferry_test_support`).
pub use ferry_test_support::TestServer as Server;

/// A server with default settings (authentication on, the test user created).
pub fn start() -> Server {
    start_with(ServerConfig::default())
}

/// A server with `settings`, the test user created.
pub fn start_with(settings: ServerConfig) -> Server {
    Server::start(settings, &[(USER, PASSWORD, false)])
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

/// Waits until `probe` holds (30 s at most).
pub async fn eventually(what: &str, probe: impl FnMut() -> bool) {
    ferry_test_support::eventually(Duration::from_secs(30), what, probe).await;
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
