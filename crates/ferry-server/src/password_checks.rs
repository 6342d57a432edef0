//! Where password checks (argon2) run: at most `max` at once, each on a thread of its own
//! kept at a lower CPU priority than the rest of the server.
//!
//! A check holds a core for tens of milliseconds by design, and an attacker can ask for as
//! many as the server answers. Bounding how many run at once bounds their memory and leaves
//! cores to everyone else; running them below the server's priority means a request that wakes
//! up while a check runs gets a core at once instead of waiting out the check's time slice (on
//! two cores a login flood otherwise multiplied the p99 of other requests by 7 to 14, see
//! BENCHMARKS.md). When the machine is otherwise idle a check runs as fast as before.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How much less CPU priority a password check gets than the rest of the server, as a Unix
/// nice increment. At 10 a check still gets about a tenth of a core against a busy thread
/// (so a login is slow, never starved, on a loaded server), while other requests preempt it.
pub const PASSWORD_CHECK_NICENESS: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// At most `max` password checks at once, each run on one of `max` low-priority threads.
pub(crate) struct PasswordChecks {
    max: usize,
    wait: Duration,
    running: Mutex<usize>,
    finished: Condvar,
    jobs: Mutex<Sender<Job>>,
}

/// Why a check did not answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CheckError {
    /// No check thread became free within the wait.
    Busy,
    /// The check panicked (a bug; the caller must fail closed).
    Panicked,
}

impl PasswordChecks {
    /// Starts `max` (at least 1) check threads; a check waits up to `wait` for one of them.
    /// The threads end when this is dropped.
    pub(crate) fn new(max: usize, wait: Duration) -> PasswordChecks {
        let max = max.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..max {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-password-check-{n}"))
                .spawn(move || run_checks(&queue));
            if let Err(error) = spawned {
                // Fewer threads only means checks queue for the ones there are.
                tracing::warn!(%error, "could not start a password check thread");
            }
        }
        PasswordChecks {
            max,
            wait,
            running: Mutex::new(0),
            finished: Condvar::new(),
            jobs: Mutex::new(jobs),
        }
    }

    /// Runs `check` on a check thread once one is free, blocking the caller until it is
    /// done.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CheckError> {
        let _slot = self.slot()?;
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = answer.send(check());
        });
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            // Only if no check thread could be started.
            .map_err(|_| CheckError::Busy)?;
        // The answer's sender is dropped unanswered only when the check panicked.
        answered.recv().map_err(|_| CheckError::Panicked)
    }

    /// Waits for one of the `max` slots; given back when the returned guard drops.
    fn slot(&self) -> Result<Slot<'_>, CheckError> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut running, _) = self
            .finished
            .wait_timeout_while(running, self.wait, |running| *running >= self.max)
            .unwrap_or_else(PoisonError::into_inner);
        if *running >= self.max {
            return Err(CheckError::Busy);
        }
        *running += 1;
        Ok(Slot(self))
    }
}

struct Slot<'a>(&'a PasswordChecks);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self
            .0
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) -= 1;
        self.0.finished.notify_one();
    }
}

fn run_checks(queue: &Mutex<Receiver<Job>>) {
    lower_this_threads_priority();
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => {
                // A panicking check must not take its thread (and so the login path) with it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            // The `PasswordChecks` is gone.
            Err(_) => return,
        }
    }
}

/// On Linux the nice value belongs to each thread, so this lowers only the calling one.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    let thread = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(thread).and_then(|nice| {
        rustix::process::setpriority_process(thread, nice + PASSWORD_CHECK_NICENESS)
    });
    if let Err(error) = lowered {
        // Checks still run, at the server's priority.
        tracing::warn!(%error, "could not lower a password check thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[cfg(target_os = "linux")]
    #[test]
    fn checks_run_below_the_callers_priority() {
        let checks = PasswordChecks::new(1, Duration::from_secs(5));
        let caller = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let check = checks
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .unwrap()
            .unwrap();
        // The ceiling is 19: a caller already at or above 10 sees 19.
        assert_eq!(check, (caller + PASSWORD_CHECK_NICENESS).min(19));
        assert!(
            check > caller,
            "a check ran at nice {check}, its caller at {caller}"
        );
    }

    #[test]
    fn at_most_max_checks_run_at_once_and_the_rest_wait_then_give_up() {
        let checks = Arc::new(PasswordChecks::new(2, Duration::from_millis(225)));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..6)
            .map(|_| {
                let (checks, running, most) = (checks.clone(), running.clone(), most.clone());
                std::thread::spawn(move || {
                    checks.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(150));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                })
            })
            .collect();
        let answers: Vec<Result<(), CheckError>> =
            callers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(most.load(Ordering::SeqCst), 2);
        // The first two run at once; the last two can start only after two rounds (300 ms),
        // past their 225 ms wait.
        let done = answers.iter().filter(|a| a.is_ok()).count();
        let busy = answers
            .iter()
            .filter(|a| **a == Err(CheckError::Busy))
            .count();
        assert!(done >= 2 && busy >= 2 && done + busy == 6, "{answers:?}");
    }

    #[test]
    fn a_check_that_panics_is_refused_and_its_thread_runs_the_next() {
        let checks = PasswordChecks::new(1, Duration::from_secs(5));
        assert_eq!(
            checks.run(|| panic!("a broken hash")),
            Err::<(), _>(CheckError::Panicked)
        );
        assert_eq!(checks.run(|| 7), Ok(7));
    }
}
