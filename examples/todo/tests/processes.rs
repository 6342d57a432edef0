//! Two `ferry-todo` processes on one replica file, syncing with a real server on loopback:
//! exactly one runs the sync loop, the other sees its writes and those from the server, its
//! own writes are synced by the leader, and it takes over when the leader is killed
//! (SIGKILL). Also the README's "run it twice" scenario with two replicas.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_client::{Credentials, Ferry, SyncOptions};
use ferry_server::auth::{Auth, AuthConfig};
use serde_json::Value;

const USER: &str = "ann";
const PASSWORD: &str = "ann's password";

/// A server on a runtime of its own, for the whole test.
struct Server {
    url: String,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    Auth::open(dir.path(), AuthConfig::default())
        .unwrap()
        .set_user(USER, PASSWORD, false)
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/todos", listener.local_addr().unwrap());
    let config = ferry_server::ServerConfig {
        data_dir: dir.path().to_owned(),
        ..ferry_server::ServerConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        ferry_server::serve_on(listener, config, std::future::pending()).await
    });
    Server {
        url,
        _dir: dir,
        _runtime: runtime,
    }
}

/// A running `ferry-todo live --json`, its input and its output lines.
struct TodoProcess {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl TodoProcess {
    fn start(replica: &std::path::Path, server: &str) -> TodoProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-todo"))
            .arg("--replica")
            .arg(replica)
            .args(["--server", server, "--user", USER, "--json", "live"])
            .env("FERRY_PASSWORD", PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry-todo");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("not a JSON line: {line}"));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        TodoProcess {
            stdin: child.stdin.take().unwrap(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits (30 s at most) for an output line `matches` accepts, among those not yet seen.
    fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
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

    fn expect_connection(&mut self, state: &str) {
        self.expect(state, |line| line["connection"] == state);
    }

    fn expect_todo(&mut self, title: &str) {
        self.expect(&format!("a list with {title:?}"), |line| {
            has_todo(line, title)
        });
    }

    /// Asks for the status until nothing is pending.
    fn expect_all_acknowledged(&mut self) {
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

fn has_todo(line: &Value, title: &str) -> bool {
    line["todos"]
        .as_array()
        .is_some_and(|todos| todos.iter().any(|todo| todo["title"] == title))
}

/// The titles on the server, read by a fresh replica.
fn server_titles(server: &Server, dir: &std::path::Path, name: &str) -> Vec<String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let reader = Ferry::initialize_offline(dir.join(format!("{name}.ferry")), USER).unwrap();
        let options =
            SyncOptions::new(&server.url).credentials(Credentials::password(USER, PASSWORD));
        reader.sync_once(&options).await.unwrap();
        let mut titles: Vec<String> = reader
            .collection::<Value>("todos")
            .query()
            .run()
            .unwrap()
            .into_iter()
            .map(|doc| doc.value["title"].as_str().unwrap().to_owned())
            .collect();
        titles.sort();
        titles
    })
}

/// Writes a todo on the server through another replica.
fn write_on_server(server: &Server, dir: &std::path::Path, title: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let writer = Ferry::initialize_offline(dir.join("writer.ferry"), USER).unwrap();
        writer
            .collection::<Value>("todos")
            .insert(&serde_json::json!({"title": title, "done": false}))
            .unwrap();
        let options =
            SyncOptions::new(&server.url).credentials(Credentials::password(USER, PASSWORD));
        writer.sync_once(&options).await.unwrap();
    });
}

#[test]
fn two_processes_share_a_replica_with_one_sync_loop_and_take_over() {
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("shared.ferry");

    let mut leader = TodoProcess::start(&replica, &server.url);
    leader.expect_connection("connected");
    let mut follower = TodoProcess::start(&replica, &server.url);
    follower.expect_connection("synced by another process");

    // The follower writes; the leader's watcher sees it and its loop pushes it.
    follower.send("add written by the follower");
    leader.expect_todo("written by the follower");
    follower.expect_all_acknowledged();
    assert_eq!(
        server_titles(&server, dir.path(), "check1"),
        ["written by the follower"]
    );

    // A change from the server is pulled by the leader and seen by both.
    write_on_server(&server, dir.path(), "written on the server");
    leader.expect_todo("written on the server");
    follower.expect_todo("written on the server");

    // The leader dies; the follower takes over the sync loop.
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    follower.expect_connection("connected");
    follower.send("add after the takeover");
    follower.expect_all_acknowledged();
    write_on_server(&server, dir.path(), "second from the server");
    follower.expect_todo("second from the server");
    assert_eq!(
        server_titles(&server, dir.path(), "check2"),
        [
            "after the takeover",
            "second from the server",
            "written by the follower",
            "written on the server"
        ]
    );
    follower.send("quit");
    assert!(follower.child.wait().unwrap().success());
}

#[test]
fn two_replicas_edit_offline_and_converge_live() {
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let mut a = TodoProcess::start(&dir.path().join("a.ferry"), &server.url);
    let mut b = TodoProcess::start(&dir.path().join("b.ferry"), &server.url);
    a.expect_connection("connected");
    b.expect_connection("connected");
    a.send("add buy milk");
    b.expect_todo("buy milk");

    b.send("offline");
    b.expect_connection("offline");
    b.send("add call the plumber");
    a.send("add water the plants");
    b.expect_todo("call the plumber");
    b.send("online");
    a.expect_todo("call the plumber");
    b.expect_todo("water the plants");
    a.expect_all_acknowledged();
    b.expect_all_acknowledged();
}
