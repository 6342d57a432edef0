//! Shared by the `ferry-todo` process tests: a real server on a runtime of its own, and
//! `ferry-todo live --json` processes driven through their standard input and output.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const USER: &str = "ann";
pub const PASSWORD: &str = "ann's password";

/// A server on a runtime of its own (`ferry_test_support`), for the whole test.
pub struct Server {
    /// The database's URL.
    pub url: String,
    /// The server's data directory.
    pub data_dir: std::path::PathBuf,
    _server: ferry_test_support::TestServer,
}

pub fn start_server() -> Server {
    let server = ferry_test_support::TestServer::start(
        ferry_server::ServerConfig::default(),
        &[(USER, PASSWORD, false)],
    );
    Server {
        url: server.url("todos"),
        data_dir: server.data_dir().to_owned(),
        _server: server,
    }
}

/// A running `ferry-todo live --json`, its input and its output lines.
pub struct TodoProcess {
    pub child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
    /// Fires when the process reports it froze at its armed failpoint.
    pub frozen: mpsc::Receiver<()>,
}

impl TodoProcess {
    pub fn start(replica: &std::path::Path, server: &str) -> TodoProcess {
        TodoProcess::start_armed(replica, server, None)
    }

    /// Starts it with `FERRY_FAILPOINT` set to `failpoint` (`docs/testing.md`).
    pub fn start_armed(
        replica: &std::path::Path,
        server: &str,
        failpoint: Option<&str>,
    ) -> TodoProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry-todo"));
        command
            .arg("--replica")
            .arg(replica)
            .args(["--server", server, "--user", USER, "--json", "live"])
            .env("FERRY_PASSWORD", PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(failpoint) = failpoint {
            command.env("FERRY_FAILPOINT", failpoint);
        }
        let mut child = command.spawn().expect("spawn ferry-todo");
        let stderr = child.stderr.take().unwrap();
        let (froze, frozen) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                if line.starts_with("FERRY_FAILPOINT ") {
                    let _ = froze.send(());
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            while matches!(stdout.read_line(&mut line), Ok(read) if read > 0) {
                // A last line without its newline was cut by a kill: not output to check.
                if !line.ends_with('\n') {
                    break;
                }
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("not a JSON line: {line}"));
                if sender.send(value).is_err() {
                    break;
                }
                line.clear();
            }
        });
        TodoProcess {
            stdin: child.stdin.take().unwrap(),
            child,
            lines,
            seen: Vec::new(),
            frozen,
        }
    }

    /// The output lines printed so far, without waiting.
    pub fn drain(&mut self) -> &[Value] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits (30 s at most) for an output line `matches` accepts, among those not yet seen.
    pub fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:?}", self.seen));
            self.seen.push(line.clone());
            if matches(&line) {
                return line;
            }
        }
    }

    pub fn expect_connection(&mut self, state: &str) {
        self.expect(state, |line| line["connection"] == state);
    }

    pub fn expect_todo(&mut self, title: &str) {
        self.expect(&format!("a list with {title:?}"), |line| {
            has_todo(line, title)
        });
    }

    /// Asks for the status until nothing is pending.
    pub fn expect_all_acknowledged(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.send("status");
            let status = self.expect("a status line", |line| line.get("pending").is_some());
            if status["pending"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "still pending: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TodoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn has_todo(line: &Value, title: &str) -> bool {
    line["todos"]
        .as_array()
        .is_some_and(|todos| todos.iter().any(|todo| todo["title"] == title))
}
