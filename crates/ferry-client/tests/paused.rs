//! The SDK's sync loop on tokio's paused clock. The loop waits only where the connection
//! machine tells it to, so a reconnect schedule that spans minutes runs in a moment, and each
//! attempt can be checked against the pause the machine announced for it.

use std::time::Duration;

use ferry_client::{ConnectionState, Ferry, ReconnectPolicy, SyncOptions};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;

/// A loopback port nothing listens on: every attempt to open a session there fails at once.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The next state `events` reports, before `deadline` on the paused clock.
async fn next_state(
    events: &mut (impl Stream<Item = ConnectionState> + Unpin),
    deadline: Instant,
    what: &str,
) -> ConnectionState {
    tokio::time::timeout_at(deadline, events.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} by the deadline"))
        .expect("connection events go on while the replica is open")
}

#[tokio::test(start_paused = true)]
async fn reconnect_attempts_wait_the_machine_s_backoff_and_stop_while_offline() {
    let dir = tempfile::tempdir().unwrap();
    let ferry = Ferry::initialize_offline(dir.path().join("paused.ferry"), "alice").unwrap();
    let policy = ReconnectPolicy {
        enabled: true,
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(8),
    };
    let mut events = Box::pin(ferry.connection_events());
    let url = format!("http://127.0.0.1:{}/db", closed_port());
    let _sync = ferry
        .start_sync(SyncOptions::new(url).reconnect(policy))
        .unwrap();
    let start = Instant::now();
    // Seven attempts pause at most 1 + 2 + 4 + 8 + 8 + 8 s in all.
    let deadline = start + Duration::from_secs(60);
    // Each `Reconnecting` is entered when a failed attempt starts its pause.
    let mut announced: Vec<(Duration, u32, Duration)> = Vec::new();
    while announced.len() < 7 {
        let state = next_state(&mut events, deadline, "seventh attempt").await;
        if let ConnectionState::Reconnecting { attempt, delay, .. } = state {
            announced.push((start.elapsed(), attempt, delay));
        }
    }
    for (n, &(_, attempt, delay)) in (1u32..).zip(&announced) {
        assert_eq!(attempt, n);
        // 1 s doubling to the 8 s cap, less up to half of it.
        let base = Duration::from_secs(1 << (n - 1).min(3));
        assert!(
            delay > base / 2 && delay <= base,
            "attempt {attempt}: a pause of {delay:?} for a base of {base:?}"
        );
    }
    for pair in announced.windows(2) {
        let ((at, attempt, delay), (next_at, ..)) = (pair[0], pair[1]);
        let waited = next_at - at;
        // The next attempt came after the whole pause, and right after it: a refused
        // connection fails without waiting for anything.
        assert!(
            waited >= delay && waited < delay + Duration::from_millis(100),
            "after attempt {attempt} the loop waited {waited:?} for a pause of {delay:?}"
        );
    }

    // Offline: no attempt at all, however long.
    ferry.set_online(false);
    let deadline = Instant::now() + Duration::from_secs(1);
    while next_state(&mut events, deadline, "offline state").await != ConnectionState::Offline {}
    // A window in which nothing may happen, not a wait for something: ten minutes of the
    // paused clock, far past the longest pause (8 s), gone by in a moment.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let mut while_offline = Vec::new();
    while let Some(Some(state)) = events.next().now_or_never() {
        while_offline.push(state);
    }
    assert_eq!(while_offline, [], "nothing happens while offline");

    // Online again: the next attempt is made at once, not after a pause.
    let back = Instant::now();
    ferry.set_online(true);
    let deadline = back + Duration::from_secs(1);
    while !matches!(
        next_state(&mut events, deadline, "attempt after going online").await,
        ConnectionState::Reconnecting { .. }
    ) {}
    assert!(
        back.elapsed() < Duration::from_millis(100),
        "the first attempt after going online failed {:?} later",
        back.elapsed()
    );
}
