//! [`BlockingCalls`]: a replica's store calls from async code, on tokio's blocking threads, a
//! few at a time.
//!
//! Store calls block (SQLite, an fsync per commit), so async code must not make them on an
//! executor thread: they go to tokio's blocking pool. Unbounded, that pool grows a thread per
//! call waiting at once (up to 512 by default) and keeps each for ten idle seconds, and every
//! thread that touches the store keeps an allocator heap and buffers of its own: a long sync
//! ran on nine threads where a short one ran on six, and the replica's memory grew with the
//! backlog (`BENCHMARKS.md`, session 31). A replica's store has one writer and a few readers
//! anyway, so a few calls at once lose nothing. tokio's pool rather than threads of Ferry's
//! own: while a blocking task runs, a runtime on a paused clock does not jump ahead, so tests
//! on paused time see store calls take no time.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::SyncError;

type Call = Box<dyn FnOnce() + Send>;

/// How long a worker that made several calls waits for another before it ends, so that a
/// stream of calls (a sync's pages and acknowledgements) keeps its workers. Only then: while a
/// worker waits, a runtime on a paused clock stands still, and a lone call every 100 ms (the
/// cross-process poller) would make every paused second cost 20 ms.
const LINGER: Duration = Duration::from_millis(2);

/// At most a fixed number of store calls at once, each on one of tokio's blocking threads, in
/// the order they were asked for. Clones share the bound.
///
/// The calls wait in one queue, taken by at most that many workers: a worker is a blocking
/// task that makes calls while there are some and, after a stream of them, ends when none
/// came for 2 ms. So a stream of calls is made by the same few threads, where a blocking task per call made
/// tokio start a new thread whenever a call came while the thread of the last one was still
/// going idle (ten threads for four calls at once, `tests/blocking_calls.rs` in ferry-client).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let calls = ferry_sync::BlockingCalls::new(2).unwrap();
/// assert_eq!(calls.run(|| 6 * 7).await.unwrap(), 42);
/// # }
/// ```
#[derive(Clone)]
pub struct BlockingCalls {
    shared: Arc<Shared>,
}

struct Shared {
    max: usize,
    state: Mutex<Queue>,
    arrived: Condvar,
}

#[derive(Default)]
struct Queue {
    calls: VecDeque<Call>,
    workers: usize,
    /// Workers waiting for a call.
    idle: usize,
}

impl std::fmt::Debug for BlockingCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingCalls")
            .field("max", &self.shared.max)
            .finish_non_exhaustive()
    }
}

impl BlockingCalls {
    /// How many store calls of a replica run at once unless told otherwise: a write and a read
    /// beside it.
    pub const DEFAULT_MAX: usize = 2;
    /// The most a replica may be given: more would only wait for the store's one writer and
    /// four readers.
    pub const MAX: usize = 16;

    /// At most `max` calls at once (1 to [`BlockingCalls::MAX`]).
    pub fn new(max: usize) -> Result<BlockingCalls, SyncError> {
        if !(1..=Self::MAX).contains(&max) {
            return Err(SyncError::InvalidOptions(format!(
                "max_blocking_calls must be 1 to {}, not {max}",
                Self::MAX
            )));
        }
        Ok(BlockingCalls {
            shared: Arc::new(Shared {
                max,
                state: Mutex::new(Queue::default()),
                arrived: Condvar::new(),
            }),
        })
    }

    /// Runs `work` on a blocking thread once fewer than the bound run, and answers what it
    /// returns; a panic in `work` is an error here. Dropping the future does not cancel
    /// `work` once it was asked for.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SyncError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.spawn(move || {
            // The caller may have stopped waiting; the work is done all the same.
            let _ = answer.send(work());
        });
        answered
            .await
            .map_err(|_| SyncError::Task("a store call panicked".into()))
    }

    /// Runs `work` as [`BlockingCalls::run`] does, without waiting for it; outside a tokio
    /// runtime, at once on the caller's thread.
    pub fn spawn(&self, work: impl FnOnce() + Send + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            work();
            return;
        };
        let mut queue = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queue.calls.push_back(Box::new(work));
        if queue.idle > 0 {
            self.shared.arrived.notify_one();
        } else if queue.workers < self.shared.max {
            queue.workers += 1;
            drop(queue);
            let mut slot = WorkerSlot(Some(Arc::clone(&self.shared)));
            drop(runtime.spawn_blocking(move || {
                if let Some(shared) = slot.0.take() {
                    shared.work();
                }
            }));
        }
    }
}

/// A worker's place, given back if tokio drops the worker before it ran (its runtime shut
/// down): otherwise the place would stay taken, and once every place was, no call would run
/// again, whatever runtime asked.
struct WorkerSlot(Option<Arc<Shared>>);

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            let mut queue = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            queue.workers -= 1;
        }
    }
}

impl Shared {
    /// A worker: makes the queued calls until there are none (after several, until none came
    /// for [`LINGER`]).
    fn work(&self) {
        let lock = || self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut queue = lock();
        let mut made = 0_usize;
        loop {
            if let Some(call) = queue.calls.pop_front() {
                drop(queue);
                if std::panic::catch_unwind(AssertUnwindSafe(call)).is_err() {
                    tracing::error!("a store call panicked");
                }
                made += 1;
                queue = lock();
                continue;
            }
            if made < 2 {
                queue.workers -= 1;
                return;
            }
            queue.idle += 1;
            queue = self
                .arrived
                .wait_timeout_while(queue, LINGER, |queue| queue.calls.is_empty())
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            queue.idle -= 1;
            if queue.calls.is_empty() {
                queue.workers -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_bound_is_bounded() {
        assert!(BlockingCalls::new(0).is_err());
        assert!(BlockingCalls::new(1).is_ok());
        assert!(BlockingCalls::new(BlockingCalls::MAX).is_ok());
        assert!(BlockingCalls::new(BlockingCalls::MAX + 1).is_err());
    }

    #[tokio::test]
    async fn no_more_calls_run_at_once_than_the_bound() {
        let calls = BlockingCalls::new(2).unwrap();
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // Every call holds on until a third one has started: with a bound of two, the first
        // two wait for that in vain until the deadline (a window in which a third call must
        // not start), and every later call goes through at once.
        let started = Arc::new((Mutex::new(0_usize), Condvar::new()));
        let all = (0..12).map(|_| {
            let (running, most, started) = (running.clone(), most.clone(), started.clone());
            calls.run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let (count, changed) = &*started;
                let mut count = count.lock().unwrap();
                *count += 1;
                changed.notify_all();
                let _ = changed
                    .wait_timeout_while(count, Duration::from_millis(200), |count| *count < 3)
                    .unwrap();
                running.fetch_sub(1, Ordering::SeqCst);
            })
        });
        for result in futures_util::future::join_all(all).await {
            result.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "two calls ran at once, no more"
        );
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_frees_its_place() {
        let calls = BlockingCalls::new(1).unwrap();
        assert!(calls.run(|| panic!("boom")).await.is_err());
        assert_eq!(calls.run(|| 1).await.unwrap(), 1);
    }

    #[test]
    fn a_worker_its_runtime_dropped_before_it_ran_gives_its_place_back() {
        let calls = BlockingCalls::new(1).unwrap();
        // A call asked for through a runtime that has shut down: tokio drops its worker
        // without running it.
        let gone = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = gone.handle().clone();
        drop(gone);
        {
            let _inside = handle.enter();
            calls.spawn(|| {});
        }
        let next = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let answer = next.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), calls.run(|| 7)).await
        });
        assert_eq!(answer.expect("a call runs on the next runtime").unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_stands_still_while_a_call_runs() {
        let calls = BlockingCalls::new(1).unwrap();
        let start = tokio::time::Instant::now();
        // The call's own work is what blocks here (50 ms of it), not a wait for something.
        let slow = calls.run(|| std::thread::sleep(Duration::from_millis(50)));
        tokio::time::timeout(Duration::from_secs(60), slow)
            .await
            .expect("the call ended before the paused clock reached the timeout")
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}
