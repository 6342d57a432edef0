//! The sync connection's decisions, as a sans-IO state machine: when to open a session, how
//! long to wait after a failure, when to ask the application for credentials, and which
//! [`ConnectionState`] the application sees meanwhile.
//!
//! The machine opens nothing and reads no clock. Its driver (the SDK's sync loop over a
//! WebSocket, the simulator over its simulated network) tells it what happened as an
//! [`Event`] and does what the returned [`Command`] says: open a session, pause, wait for the
//! application to switch online, or ask for credentials. Randomness for the backoff's jitter
//! comes from a [`Jitter`] seeded by the driver, so a simulated run replays exactly.
//!
//! ```
//! use std::time::Duration;
//! use ferry_core::connection::{
//!     Command, Connection, ConnectionState, Event, FailureKind, Jitter, ReconnectPolicy,
//! };
//! let mut connection = Connection::new(ReconnectPolicy::default(), Jitter::seeded(7));
//! assert_eq!(connection.start(true).command, Command::Open);
//! assert_eq!(connection.handle(Event::Opened).command, Command::Await);
//! let step = connection.handle(Event::Failed {
//!     kind: FailureKind::Transient,
//!     reason: "connection reset".into(),
//! });
//! // Interrupted, then a pause of at most the first delay before attempt 1.
//! assert!(matches!(step.entered[0], ConnectionState::Interrupted { .. }));
//! let Command::Pause(delay) = step.command else { panic!() };
//! assert!(delay <= Duration::from_millis(200));
//! assert_eq!(connection.handle(Event::Elapsed).command, Command::Open);
//! ```

use std::time::Duration;

/// When and how fast to reconnect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnect by itself after an interruption (on by default). When off, an interruption
    /// ends in [`ConnectionState::Disconnected`] until the application switches online again.
    pub enabled: bool,
    /// The pause before the first retry; it doubles with each failure.
    pub initial_delay: Duration,
    /// The longest pause.
    pub max_delay: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Where a replica's connection to the server stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not syncing: no sync was started, it was stopped, or the application switched the
    /// replica offline.
    Offline,
    /// Opening the first session.
    Connecting,
    /// A session is open: changes flow both ways.
    Connected,
    /// The session broke (network cut, server gone, silence); reconnecting follows.
    Interrupted {
        /// What broke it.
        reason: String,
    },
    /// Waiting `delay` before attempt number `attempt` to open a session.
    Reconnecting {
        /// The attempt about to be made, from 1.
        attempt: u32,
        /// The pause before it.
        delay: Duration,
        /// Why the previous attempt or session ended.
        reason: String,
    },
    /// Stopped by an error retrying is unlikely to fix (a refused request), retried only every
    /// [`ReconnectPolicy::max_delay`]; or interrupted with reconnecting turned off, until the
    /// application switches online again.
    Disconnected {
        /// The error.
        reason: String,
    },
    /// The server refused every credential the replica had, and the application gave no new
    /// ones. Pending writes are kept.
    AuthenticationFailed {
        /// The server's reason.
        reason: String,
    },
    /// Another process on the same replica file runs the sync loop; this one follows its
    /// results and takes over if it stops. (Entered by the SDK, never by the machine.)
    SyncedByAnotherProcess,
}

/// How a session, or an attempt to open one, failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The server refused the credentials presented. `credentials_left`: the refused ones
    /// were a reconnect token and the application's own credentials are still to be tried.
    Unauthorized {
        /// Whether other credentials remain to be presented at once.
        credentials_left: bool,
    },
    /// A failure that may pass: the network, the server restarting or overloaded, silence.
    Transient,
    /// A failure retrying is unlikely to fix (a refused request, a local error).
    Permanent,
}

/// What happened, as the driver tells the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The application switched syncing on or off (a switch to the value it already had
    /// counts: switching online again retries at once).
    Online(bool),
    /// The session opened by [`Command::Open`] was accepted.
    Opened,
    /// The session was closed on purpose to be opened again (its pull filter changed).
    Restart,
    /// The session, or the attempt to open it, failed.
    Failed {
        /// How.
        kind: FailureKind,
        /// Why, as the application should see it.
        reason: String,
    },
    /// The application answered [`Command::AskCredentials`]: with new credentials (`true`),
    /// or with none.
    Credentials(bool),
    /// The pause of [`Command::Pause`] is over.
    Elapsed,
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open a session (closing any open one); report [`Event::Opened`] once it is accepted,
    /// and then [`Event::Failed`] or [`Event::Restart`] when it ends.
    Open,
    /// Keep the open session and report how it ends.
    Await,
    /// Wait this long, then report [`Event::Elapsed`]; a switch online or offline cuts it
    /// short.
    Pause(Duration),
    /// Wait for the application to switch online ([`Event::Online`]).
    AwaitOnline,
    /// Ask the application for new credentials, after `attempts` refusals in a row for
    /// `reason`; report the answer as [`Event::Credentials`].
    AskCredentials {
        /// The server's reason.
        reason: String,
        /// How many times in a row authentication failed.
        attempts: u32,
    },
}

/// A transition: the states entered on the way, in order (the application sees each), and
/// what to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Step {
    /// The states entered, oldest first; empty when the state did not change.
    pub entered: Vec<ConnectionState>,
    /// What the driver does next.
    pub command: Command,
}

/// A small pseudo-random source for backoff jitter (SplitMix64), seeded by the driver: from
/// the operating system's randomness in the SDK, from the seed in the simulator. Not for
/// anything secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jitter(u64);

impl Jitter {
    /// A source starting at `seed`.
    pub fn seeded(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// The next value, uniform over `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The pause after `failures` failures in a row: `initial` doubling with each failure, capped
/// at `cap`, less up to half of it at random, so clients that lost the server together do not
/// all come back at the same instant.
pub fn backoff_delay(
    failures: u32,
    initial: Duration,
    cap: Duration,
    jitter: &mut Jitter,
) -> Duration {
    let base = initial
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(cap);
    let fraction = (jitter.next_u64() % 1000) as f64 / 2000.0;
    base - base.mul_f64(fraction)
}

/// The sync connection's state machine (module documentation).
#[derive(Clone, Debug)]
pub struct Connection {
    policy: ReconnectPolicy,
    jitter: Jitter,
    online: bool,
    state: ConnectionState,
    /// Whether the current session was accepted.
    opened: bool,
    /// Transient failures since the last accepted session.
    failures: u32,
    /// Refused authentications since the last accepted session.
    auth_failures: u32,
    /// The reason of the refusal the application is being asked about.
    refused: Option<String>,
}

impl Connection {
    /// A machine that reconnects by `policy`, jittering with `jitter`. It is
    /// [`ConnectionState::Offline`] until [`Connection::start`].
    pub fn new(policy: ReconnectPolicy, jitter: Jitter) -> Connection {
        Connection {
            policy,
            jitter,
            online: false,
            state: ConnectionState::Offline,
            opened: false,
            failures: 0,
            auth_failures: 0,
            refused: None,
        }
    }

    /// The state the application sees now.
    pub fn state(&self) -> &ConnectionState {
        &self.state
    }

    /// Starts syncing, the application's switch at `online`.
    pub fn start(&mut self, online: bool) -> Step {
        self.handle(Event::Online(online))
    }

    /// Moves on after `event`.
    pub fn handle(&mut self, event: Event) -> Step {
        let mut entered = Vec::new();
        let command = match event {
            Event::Online(online) => {
                self.online = online;
                self.refused = None;
                self.next_attempt(&mut entered)
            }
            Event::Opened => {
                self.opened = true;
                self.enter(ConnectionState::Connected, &mut entered);
                Command::Await
            }
            Event::Restart | Event::Elapsed => self.next_attempt(&mut entered),
            Event::Failed { kind, reason } => self.failed(kind, reason, &mut entered),
            Event::Credentials(given) => match self.refused.take() {
                Some(_) if given => self.next_attempt(&mut entered),
                Some(reason) => {
                    self.enter(
                        ConnectionState::AuthenticationFailed { reason },
                        &mut entered,
                    );
                    Command::AwaitOnline
                }
                // Nobody was asked: the answer is stale.
                None => self.next_attempt(&mut entered),
            },
        };
        Step { entered, command }
    }

    /// Opens a session if the application wants to be online.
    fn next_attempt(&mut self, entered: &mut Vec<ConnectionState>) -> Command {
        self.opened = false;
        if !self.online {
            self.enter(ConnectionState::Offline, entered);
            return Command::AwaitOnline;
        }
        if self.failures == 0 {
            self.enter(ConnectionState::Connecting, entered);
        }
        Command::Open
    }

    fn failed(
        &mut self,
        kind: FailureKind,
        reason: String,
        entered: &mut Vec<ConnectionState>,
    ) -> Command {
        let connected = std::mem::take(&mut self.opened);
        if connected {
            self.failures = 0;
            self.auth_failures = 0;
        }
        match kind {
            FailureKind::Unauthorized { credentials_left } => {
                self.auth_failures = self.auth_failures.saturating_add(1);
                if credentials_left {
                    return self.next_attempt(entered);
                }
                self.refused = Some(reason.clone());
                Command::AskCredentials {
                    reason,
                    attempts: self.auth_failures,
                }
            }
            FailureKind::Transient | FailureKind::Permanent => {
                if connected {
                    let reason = reason.clone();
                    self.enter(ConnectionState::Interrupted { reason }, entered);
                }
                if !self.policy.enabled {
                    self.failures = 0;
                    self.enter(ConnectionState::Disconnected { reason }, entered);
                    return Command::AwaitOnline;
                }
                if kind == FailureKind::Permanent {
                    // Most likely a bug or a server-side condition someone must fix: say so,
                    // and still try again now and then, so a fixed server drains the outbox
                    // without the application having to notice.
                    self.enter(ConnectionState::Disconnected { reason }, entered);
                    return Command::Pause(self.policy.max_delay);
                }
                self.failures = self.failures.saturating_add(1);
                let delay = backoff_delay(
                    self.failures,
                    self.policy.initial_delay,
                    self.policy.max_delay,
                    &mut self.jitter,
                );
                let attempt = self.failures;
                let state = ConnectionState::Reconnecting {
                    attempt,
                    delay,
                    reason,
                };
                self.enter(state, entered);
                Command::Pause(delay)
            }
        }
    }

    fn enter(&mut self, state: ConnectionState, entered: &mut Vec<ConnectionState>) {
        if self.state != state {
            self.state = state.clone();
            entered.push(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(reason: &str) -> Event {
        Event::Failed {
            kind: FailureKind::Transient,
            reason: reason.into(),
        }
    }

    fn connected() -> Connection {
        let mut connection = Connection::new(ReconnectPolicy::default(), Jitter::seeded(1));
        assert_eq!(connection.start(true).command, Command::Open);
        assert_eq!(connection.handle(Event::Opened).command, Command::Await);
        connection
    }

    fn delay_of(step: &Step) -> Duration {
        match step.command {
            Command::Pause(delay) => delay,
            ref other => panic!("expected a pause, got {other:?}"),
        }
    }

    #[test]
    fn the_first_session_is_announced_as_connecting_then_connected() {
        let mut connection = Connection::new(ReconnectPolicy::default(), Jitter::seeded(1));
        assert_eq!(connection.state(), &ConnectionState::Offline);
        let step = connection.start(true);
        assert_eq!(step.entered, vec![ConnectionState::Connecting]);
        let step = connection.handle(Event::Opened);
        assert_eq!(step.entered, vec![ConnectionState::Connected]);
    }

    #[test]
    fn starting_offline_waits_for_the_application() {
        let mut connection = Connection::new(ReconnectPolicy::default(), Jitter::seeded(1));
        let step = connection.start(false);
        assert_eq!(step.command, Command::AwaitOnline);
        assert_eq!(connection.state(), &ConnectionState::Offline);
        assert_eq!(
            connection.handle(Event::Online(true)).command,
            Command::Open
        );
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap_with_jitter_below_half() {
        let policy = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
            ..ReconnectPolicy::default()
        };
        let mut connection = Connection::new(policy, Jitter::seeded(9));
        let _ = connection.start(true);
        let mut attempts = Vec::new();
        for failure in 1..=8u32 {
            let step = connection.handle(transient("refused"));
            let delay = delay_of(&step);
            let base = Duration::from_millis((100u64 << (failure - 1)).min(1_000));
            assert!(
                delay <= base && delay > base / 2,
                "{failure}: {delay:?} for {base:?}"
            );
            let ConnectionState::Reconnecting { attempt, .. } = connection.state() else {
                panic!("{:?}", connection.state());
            };
            attempts.push(*attempt);
            // An attempt that fails before being accepted keeps the count going.
            assert_eq!(connection.handle(Event::Elapsed).command, Command::Open);
        }
        assert_eq!(attempts, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn an_accepted_session_starts_the_count_again() {
        let mut connection = connected();
        let step = connection.handle(transient("reset"));
        assert_eq!(
            step.entered[0],
            ConnectionState::Interrupted {
                reason: "reset".into()
            }
        );
        let _ = connection.handle(Event::Elapsed);
        let _ = connection.handle(transient("reset"));
        assert!(matches!(
            connection.state(),
            ConnectionState::Reconnecting { attempt: 2, .. }
        ));
        let _ = connection.handle(Event::Elapsed);
        let _ = connection.handle(Event::Opened);
        let _ = connection.handle(transient("reset"));
        assert!(matches!(
            connection.state(),
            ConnectionState::Reconnecting { attempt: 1, .. }
        ));
    }

    #[test]
    fn jitter_spreads_clients_that_failed_together() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut connection =
                    Connection::new(ReconnectPolicy::default(), Jitter::seeded(seed));
                let _ = connection.start(true);
                delay_of(&connection.handle(transient("gone")))
            })
            .collect();
        assert!(delays.len() > 15, "{delays:?}");
    }

    #[test]
    fn a_permanent_failure_disconnects_and_retries_at_the_longest_pause() {
        let mut connection = connected();
        let step = connection.handle(Event::Failed {
            kind: FailureKind::Permanent,
            reason: "bad request".into(),
        });
        assert_eq!(step.command, Command::Pause(Duration::from_secs(30)));
        assert_eq!(
            connection.state(),
            &ConnectionState::Disconnected {
                reason: "bad request".into()
            }
        );
        assert_eq!(connection.handle(Event::Elapsed).command, Command::Open);
    }

    #[test]
    fn with_reconnecting_off_an_interruption_waits_for_the_application() {
        let policy = ReconnectPolicy {
            enabled: false,
            ..ReconnectPolicy::default()
        };
        let mut connection = Connection::new(policy, Jitter::seeded(1));
        let _ = connection.start(true);
        let _ = connection.handle(Event::Opened);
        let step = connection.handle(transient("reset"));
        assert_eq!(step.command, Command::AwaitOnline);
        assert_eq!(step.entered.len(), 2, "{:?}", step.entered);
        let step = connection.handle(Event::Online(true));
        assert_eq!(step.command, Command::Open);
        assert_eq!(step.entered, vec![ConnectionState::Connecting]);
    }

    #[test]
    fn a_refused_token_falls_back_to_the_credentials_at_once() {
        let mut connection = connected();
        let _ = connection.handle(transient("reset"));
        let _ = connection.handle(Event::Elapsed);
        let step = connection.handle(Event::Failed {
            kind: FailureKind::Unauthorized {
                credentials_left: true,
            },
            reason: "token expired".into(),
        });
        assert_eq!(step.command, Command::Open);
    }

    #[test]
    fn refused_credentials_ask_the_application_and_count_the_attempts() {
        let mut connection = connected();
        let refused = |reason: &str| Event::Failed {
            kind: FailureKind::Unauthorized {
                credentials_left: false,
            },
            reason: reason.into(),
        };
        let step = connection.handle(refused("wrong password"));
        assert_eq!(
            step.command,
            Command::AskCredentials {
                reason: "wrong password".into(),
                attempts: 1
            }
        );
        assert_eq!(
            connection.handle(Event::Credentials(true)).command,
            Command::Open
        );
        let step = connection.handle(refused("still wrong"));
        assert_eq!(
            step.command,
            Command::AskCredentials {
                reason: "still wrong".into(),
                attempts: 2
            }
        );
        let step = connection.handle(Event::Credentials(false));
        assert_eq!(step.command, Command::AwaitOnline);
        assert_eq!(
            connection.state(),
            &ConnectionState::AuthenticationFailed {
                reason: "still wrong".into()
            }
        );
        // Switching online again retries.
        assert_eq!(
            connection.handle(Event::Online(true)).command,
            Command::Open
        );
    }

    #[test]
    fn going_offline_closes_and_coming_back_reconnects_at_once() {
        let mut connection = connected();
        let step = connection.handle(Event::Online(false));
        assert_eq!(step.command, Command::AwaitOnline);
        assert_eq!(step.entered, vec![ConnectionState::Offline]);
        let step = connection.handle(Event::Online(true));
        assert_eq!(step.command, Command::Open);
        assert_eq!(step.entered, vec![ConnectionState::Connecting]);
        // Also in the middle of a pause.
        let _ = connection.handle(Event::Opened);
        let _ = connection.handle(transient("reset"));
        assert_eq!(
            connection.handle(Event::Online(true)).command,
            Command::Open
        );
    }

    #[test]
    fn a_restart_opens_again_without_a_pause() {
        let mut connection = connected();
        assert_eq!(connection.handle(Event::Restart).command, Command::Open);
    }
}
