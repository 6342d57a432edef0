//! The SDK's store calls during sync run on tokio's blocking threads, never on an executor
//! thread. This binary (no test harness) starts a server, then runs itself again as a child
//! process with the named failpoint `before_recording_ack` armed: the child's push freezes in
//! the middle of recording an acknowledgement, and its single-threaded runtime must go on
//! running its other tasks (it prints a tick every 100 ms). With the acknowledgement recorded
//! on the executor, the runtime froze with it and the ticks stopped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_client::Ferry;
use serde_json::json;

mod support;

/// Set in the child: the server's database URL.
const CHILD: &str = "FERRY_EXECUTOR_TEST_URL";

const TICKS: usize = 20;

fn main() {
    match std::env::var(CHILD) {
        Ok(url) => child(&url),
        Err(_) => parent(),
    }
}

fn parent() {
    let server = support::start();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, server.url("executor"))
        .env(
            ferry_store::failpoint::VARIABLE,
            ferry_store::failpoint::BEFORE_RECORDING_ACK,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let forward = |stream: Box<dyn std::io::Read + Send>, lines: mpsc::Sender<String>| {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        })
    };
    forward(Box::new(child.stdout.take().unwrap()), lines.clone());
    forward(Box::new(child.stderr.take().unwrap()), lines);
    let mut frozen = false;
    let mut ticks_after = 0;
    // One deadline for the whole wait: a child that ticks but never reaches the failpoint
    // must fail the test, not keep it waiting.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ticks_after < TICKS {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = seen.recv_timeout(left) else {
            break;
        };
        if line.contains("FERRY_FAILPOINT before_recording_ack reached") {
            frozen = true;
        } else if line.starts_with("tick") && frozen {
            ticks_after += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(frozen, "the push never reached before_recording_ack");
    assert_eq!(
        ticks_after, TICKS,
        "the executor stopped while the push was frozen recording its acknowledgement"
    );
    println!("ok: the executor ran {TICKS} ticks while the push was frozen");
}

fn child(url: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ferry = Ferry::temporary("ann").unwrap();
        ferry
            .collection::<serde_json::Value>("notes")
            .insert(&json!({"title": "milk"}))
            .unwrap();
        let syncing = tokio::spawn({
            let ferry = ferry.clone();
            let options = support::options(url);
            async move { ferry.sync_once(&options).await }
        });
        // Ticks until the parent has seen enough and kills this process.
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            println!("tick (push finished: {})", syncing.is_finished());
        }
    });
}
