//! Time, injected: the wall clock a replica reads, and the replica's one hybrid logical clock.
//!
//! Nothing in Ferry reads the system time except [`SystemClock`]: the server, the SDK, the
//! CLI and the sync driver are handed a [`WallClock`], so tests and the simulator run them on
//! time they control ([`ManualClock`]).
//!
//! A replica has exactly one [`ReplicaClock`]: its local edits are stamped by it and every
//! revision it receives is observed by it, so an edit always orders after what the replica
//! had seen when it was made (last-write-wins depends on it).
//!
//! ```
//! use std::sync::Arc;
//! use ferry_core::hlc::Timestamp;
//! use ferry_store::clock::{ManualClock, ReplicaClock};
//! let wall = Arc::new(ManualClock::new(1_000));
//! let clock = ReplicaClock::new(wall.clone(), 60_000);
//! clock.observe(Timestamp::new(5_000, 0)); // a revision from a device 4 s ahead
//! assert!(clock.now() > Timestamp::new(5_000, 0));
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_core::hlc::{ClockDrift, HlcClock, Timestamp};

/// Milliseconds since the Unix epoch.
pub trait WallClock: Send + Sync {
    /// The current time.
    fn now_ms(&self) -> u64;
}

impl std::fmt::Debug for dyn WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WallClock({} ms)", self.now_ms())
    }
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            })
    }
}

/// A clock that moves only when told: for tests and the simulator.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `ms`.
    pub fn new(ms: u64) -> ManualClock {
        ManualClock(AtomicU64::new(ms))
    }

    /// Shows `ms` from now on (it may go backwards, as real clocks do).
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ms| {
                Some(ms.saturating_add(by))
            })
            .ok();
    }
}

impl WallClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A replica's hybrid logical clock over a wall clock. Shared (behind an `Arc`) by everything
/// that writes to the replica.
pub struct ReplicaClock {
    hlc: Mutex<HlcClock>,
    wall: std::sync::Arc<dyn WallClock>,
    max_drift_ms: u64,
}

impl std::fmt::Debug for ReplicaClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClock")
            .field("last", &self.last())
            .field("max_drift_ms", &self.max_drift_ms)
            .finish()
    }
}

impl ReplicaClock {
    /// A clock over `wall` that does not adopt timestamps more than `max_drift_ms` ahead of
    /// it.
    pub fn new(wall: std::sync::Arc<dyn WallClock>, max_drift_ms: u64) -> ReplicaClock {
        ReplicaClock::resumed(wall, max_drift_ms, Timestamp::ZERO)
    }

    /// A clock that continues after `last` (the newest timestamp the replica stored), so
    /// timestamps keep increasing across restarts even when the wall clock went back.
    pub fn resumed(
        wall: std::sync::Arc<dyn WallClock>,
        max_drift_ms: u64,
        last: Timestamp,
    ) -> ReplicaClock {
        let mut hlc = HlcClock::new(max_drift_ms);
        // Observed with no drift limit: the replica itself wrote it.
        let _ = hlc.observe(last, u64::MAX);
        ReplicaClock {
            hlc: Mutex::new(hlc),
            wall,
            max_drift_ms,
        }
    }

    /// The wall clock's time.
    pub fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }

    /// The wall clock itself, for code that needs the time but not the clock.
    pub fn wall(&self) -> &std::sync::Arc<dyn WallClock> {
        &self.wall
    }

    /// The most a received clock may be ahead of the wall clock and still be adopted.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HlcClock> {
        self.hlc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A timestamp for an event now, later than every one issued or observed before.
    pub fn now(&self) -> Timestamp {
        let wall = self.wall_ms();
        self.lock().now(wall)
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.lock().last()
    }

    /// Takes a received timestamp into account, so later local events order after it. One
    /// further ahead than the drift allows is not adopted (one device with a clock far in the
    /// future must not drag every replica along); the error says by how much.
    pub fn observe(&self, remote: Timestamp) -> Result<(), ClockDrift> {
        let wall = self.wall_ms();
        self.lock().observe(remote, wall)
    }

    /// Whether `remote` is within the allowed drift of the wall clock, without observing it.
    pub fn check(&self, remote: Timestamp) -> Result<(), ClockDrift> {
        let ahead_ms = remote.wall_ms().saturating_sub(self.wall_ms());
        if ahead_ms > self.max_drift_ms {
            return Err(ClockDrift {
                ahead_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_resumed_clock_continues_after_the_stored_time_even_if_the_wall_went_back() {
        let wall = Arc::new(ManualClock::new(500));
        let clock = ReplicaClock::resumed(wall.clone(), 1_000, Timestamp::new(9_000, 3));
        assert!(clock.now() > Timestamp::new(9_000, 3));
        assert!(
            clock.observe(Timestamp::new(2_000, 0)).is_err(),
            "1.5 s ahead"
        );
        wall.advance(Duration::from_secs(1));
        assert!(clock.check(Timestamp::new(2_000, 0)).is_ok());
    }
}
