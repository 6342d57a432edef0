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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
///
/// A client replica re-bases it on its server's time at the start of each session
/// ([`ReplicaClock::rebase`]): a device whose clock is far off then stamps its edits with the
/// server's time instead of having them refused.
pub struct ReplicaClock {
    hlc: Mutex<HlcClock>,
    wall: std::sync::Arc<dyn WallClock>,
    max_drift_ms: u64,
    /// Added to the wall clock's time: the correction of the last re-base (0: none).
    correction_ms: AtomicI64,
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
            correction_ms: AtomicI64::new(0),
        }
    }

    /// The wall clock's time, corrected by the last re-base.
    pub fn wall_ms(&self) -> u64 {
        self.wall
            .now_ms()
            .saturating_add_signed(self.correction_ms.load(Ordering::SeqCst))
    }

    /// The bound past which a timestamp was stamped by a wall clock far ahead of this one:
    /// the time now plus half the allowed drift. After a re-base, the replica re-stamps its
    /// waiting edits stamped later than this ([`crate::Replica::restamp_outbox`]).
    pub fn far_ahead(&self) -> Timestamp {
        Timestamp::new(
            self.wall_ms().saturating_add(self.max_drift_ms / 2),
            u16::MAX,
        )
    }

    /// Re-bases the clock on a server whose time is `server_ms` now, so that what it stamps is
    /// what that server takes: when the wall clock is more than half the allowed drift off, it
    /// is corrected by the difference from now on (otherwise it is trusted again); timestamps
    /// issued beyond the server's time plus the drift are forgotten (the server refuses them,
    /// and every revision received from it is within them), so the next ones start there.
    /// Returns the correction now applied.
    ///
    /// The replica then gives its pending revisions stamped too far ahead new timestamps
    /// ([`ReplicaClock::far_ahead`], [`crate::Replica::restamp_outbox`]).
    pub fn rebase(&self, server_ms: u64) -> i64 {
        let wall = self.wall.now_ms();
        let off_ms = i128::from(server_ms) - i128::from(wall);
        let correction = if off_ms.unsigned_abs() > u128::from(self.max_drift_ms / 2) {
            i64::try_from(off_ms).unwrap_or(if off_ms < 0 { i64::MIN } else { i64::MAX })
        } else {
            0
        };
        self.correction_ms.store(correction, Ordering::SeqCst);
        let ceiling = Timestamp::new(server_ms.saturating_add(self.max_drift_ms), 0);
        self.lock().forget_after(ceiling);
        correction
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

    #[test]
    fn a_clock_re_based_on_a_server_stamps_what_the_server_takes() {
        let hour = 3_600_000;
        let wall = Arc::new(ManualClock::new(10 * hour));
        let clock = ReplicaClock::new(wall.clone(), 60_000);
        let ahead = clock.now();
        assert_eq!(clock.rebase(9 * hour), -3_600_000);
        assert_eq!(clock.wall_ms(), 9 * hour);
        assert!(
            ahead > clock.far_ahead(),
            "what the wall clock stamped is re-stamped"
        );
        let stamped = clock.now();
        assert!(stamped < ahead, "{stamped} still an hour ahead");
        assert!(stamped.wall_ms() <= 9 * hour + 60_000, "{stamped}");
        assert!(clock.now() > stamped, "monotonic after the re-base");
        assert!(clock.check(Timestamp::new(9 * hour + 60_000, 0)).is_ok());

        // Within half the drift the wall clock is trusted again.
        wall.set(9 * hour + 29_000);
        assert_eq!(clock.rebase(9 * hour), 0);
        assert_eq!(clock.wall_ms(), 9 * hour + 29_000);
        // A clock behind is corrected too (its edits would lose every last-write-wins).
        wall.set(8 * hour);
        assert_eq!(clock.rebase(9 * hour), 3_600_000);
        assert_eq!(clock.wall_ms(), 9 * hour);
    }
}
