//! Named crash points for the crash tests (`docs/testing.md`).
//!
//! A SIGKILL at a random moment rarely lands exactly between two steps that matter (a batch
//! committed but not yet acknowledged, an acknowledgement received but not yet recorded). The
//! code marks those places with [`reached`]; a test process started with
//! `FERRY_FAILPOINT=name` or `FERRY_FAILPOINT=name:n` freezes the n-th time (default: the first)
//! it reaches `name`, after printing `FERRY_FAILPOINT name reached` on standard error, and the
//! test then kills it with SIGKILL. Without the variable, [`reached`] costs one load of a
//! cached value.
//!
//! The points are listed here so tests and code agree on their names.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Server: a replicated batch is committed; its acknowledgement is not sent yet.
pub const AFTER_COMMIT_BEFORE_ACK: &str = "after_commit_before_ack";
/// Server: a checkpoint arrived for a batch already committed; it is not stored yet.
pub const BEFORE_CHECKPOINT: &str = "before_checkpoint";
/// After a batch of replicated revisions committed, before the conflicts it created are
/// resolved (a crash here leaves them for the start-up repair).
pub const BEFORE_RESOLVING: &str = "before_resolving";
/// Client: the server acknowledged a batch; the outbox does not record it yet.
pub const BEFORE_RECORDING_ACK: &str = "before_recording_ack";

/// The environment variable that arms a point.
pub const VARIABLE: &str = "FERRY_FAILPOINT";

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(VARIABLE).ok()?;
            let (name, at) = match value.split_once(':') {
                Some((name, at)) => (name.to_owned(), at.parse().ok()?),
                None => (value, 1),
            };
            Some(Armed {
                name,
                at,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks the point `name`: freezes the process here if a crash test armed it (see the module
/// documentation); does nothing otherwise.
pub fn reached(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name != name || armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.at {
        return;
    }
    eprintln!("FERRY_FAILPOINT {name} reached");
    // Wait for the SIGKILL. Only this thread stops: others may go on for the moment the
    // test takes to kill the process, as they would have before a real crash.
    loop {
        std::thread::park();
    }
}
