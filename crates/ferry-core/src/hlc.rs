//! Hybrid logical clock timestamps, for last-write-wins decisions.
//!
//! A timestamp packs wall-clock milliseconds (upper 48 bits) and a logical counter (lower 16
//! bits) into a `u64`, so timestamps compare as integers and store in one column. The clock never
//! reads the system time itself: every call takes `wall_ms`, which keeps the core deterministic
//! and lets simulations drive time. This is why Ferry does not use the `uhlc` crate, whose clock
//! source is a global function pointer rather than an argument.

use std::fmt;

/// A hybrid logical clock timestamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
const MAX_WALL_MS: u64 = (1 << (64 - COUNTER_BITS)) - 1;

impl Timestamp {
    /// The smallest timestamp.
    pub const ZERO: Timestamp = Timestamp(0);

    /// Builds a timestamp from wall-clock milliseconds and a logical counter.
    pub fn new(wall_ms: u64, counter: u16) -> Timestamp {
        Timestamp((wall_ms.min(MAX_WALL_MS) << COUNTER_BITS) | u64::from(counter))
    }

    /// The packed value, for storage.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds a timestamp from its packed value.
    pub fn from_u64(packed: u64) -> Timestamp {
        Timestamp(packed)
    }

    /// The wall-clock part, in milliseconds since the Unix epoch.
    pub fn wall_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// The logical counter.
    pub fn counter(self) -> u16 {
        u16::try_from(self.0 & COUNTER_MASK).expect("masked to 16 bits")
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.wall_ms(), self.counter())
    }
}

/// A remote timestamp was too far ahead of this replica's wall clock to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("remote clock is {ahead_ms} ms ahead, more than the {max_drift_ms} ms allowed")]
pub struct ClockDrift {
    /// How far ahead the remote timestamp was.
    pub ahead_ms: u64,
    /// The configured bound.
    pub max_drift_ms: u64,
}

/// A replica's hybrid logical clock.
///
/// ```
/// use ferry_core::hlc::HlcClock;
/// let mut clock = HlcClock::new(60_000);
/// let first = clock.now(1_000);
/// let second = clock.now(1_000); // same millisecond: the counter moves
/// assert!(second > first);
/// let behind = clock.now(999); // the wall clock went backwards: still monotonic
/// assert!(behind > second);
/// ```
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: Timestamp,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock that refuses remote timestamps more than `max_drift_ms` ahead of its wall clock.
    pub fn new(max_drift_ms: u64) -> HlcClock {
        HlcClock {
            last: Timestamp::ZERO,
            max_drift_ms,
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// Issues a timestamp for a local event at wall-clock time `wall_ms`, greater than every
    /// timestamp issued or observed before.
    pub fn now(&mut self, wall_ms: u64) -> Timestamp {
        let wall_ms = wall_ms.min(MAX_WALL_MS);
        self.last = if wall_ms > self.last.wall_ms() {
            Timestamp::new(wall_ms, 0)
        } else {
            self.successor(self.last)
        };
        self.last
    }

    /// Takes a remote timestamp into account, so later local timestamps order after it. A
    /// remote timestamp more than the allowed drift ahead is refused and not observed, so one
    /// replica with a clock far in the future cannot drag every other replica along with it.
    pub fn observe(&mut self, remote: Timestamp, wall_ms: u64) -> Result<(), ClockDrift> {
        let ahead_ms = remote.wall_ms().saturating_sub(wall_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(ClockDrift {
                ahead_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }

    /// Forgets every timestamp issued or observed after `ceiling`, so the next ones start
    /// from there (or from the wall clock, if it is later). Only for re-basing a clock that
    /// ran ahead: the timestamps it issued beyond `ceiling` were refused by everyone else, and
    /// the replica gives its revisions stamped with them new ones.
    pub fn forget_after(&mut self, ceiling: Timestamp) {
        self.last = self.last.min(ceiling);
    }

    fn successor(&self, timestamp: Timestamp) -> Timestamp {
        if timestamp.counter() == u16::MAX {
            // The counter overflowed within one millisecond: borrow the next millisecond.
            Timestamp::new(timestamp.wall_ms() + 1, 0)
        } else {
            Timestamp(timestamp.0 + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_remote_time_orders_later_local_events_after_it() {
        let mut clock = HlcClock::new(1_000);
        clock.now(100);
        clock.observe(Timestamp::new(900, 7), 100).unwrap();
        let local = clock.now(100);
        assert!(local > Timestamp::new(900, 7));
        assert_eq!(local, Timestamp::new(900, 8));
    }

    #[test]
    fn drift_beyond_the_bound_is_refused_and_ignored() {
        let mut clock = HlcClock::new(1_000);
        let before = clock.now(100);
        assert_eq!(
            clock.observe(Timestamp::new(1_101, 0), 100),
            Err(ClockDrift {
                ahead_ms: 1_001,
                max_drift_ms: 1_000
            })
        );
        assert_eq!(clock.last(), before);
        assert!(clock.observe(Timestamp::new(1_100, 0), 100).is_ok());
    }

    #[test]
    fn a_clock_that_forgets_later_timestamps_issues_from_the_ceiling() {
        let mut clock = HlcClock::new(1_000);
        clock.now(90_000); // a wall clock far ahead
        clock.forget_after(Timestamp::new(2_000, 3));
        assert_eq!(clock.now(1_000), Timestamp::new(2_000, 4));
        clock.forget_after(Timestamp::new(9_000, 0)); // never moves a clock forward
        assert_eq!(clock.last(), Timestamp::new(2_000, 4));
    }

    #[test]
    fn counter_overflow_moves_to_the_next_millisecond() {
        let mut clock = HlcClock::new(0);
        clock.observe(Timestamp::new(5, u16::MAX), 5).unwrap();
        assert_eq!(clock.now(5), Timestamp::new(6, 0));
    }
}
