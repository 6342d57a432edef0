//! Shared harness for end-to-end tests: a real `ferry serve` process on a free loopback port,
//! the `ferry` binary for CLI commands, and the Node packages of the PouchDB interop scripts.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The `ferry` binary built for these tests.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/ferry is two levels below the root")
        .to_owned()
}

#[allow(unused_imports)]
pub use ferry_test_support::{eventually, wait_until};

/// The user every test server has (an administrator).
pub const TEST_USER: &str = "tester";
/// Its password.
pub const TEST_PASSWORD: &str = "test-password";

/// A `ferry serve` child process, killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// `http://tester:test-password@127.0.0.1:PORT`: the server with the test user's
    /// credentials, which the CLI, reqwest and PouchDB send as HTTP basic auth (`https://`
    /// when the server was started with `--tls-cert`).
    pub url: String,
    /// `http://127.0.0.1:PORT`, without credentials.
    pub bare_url: String,
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
}

/// Starts `ferry serve`; with a `failpoint` (`docs/testing.md`), its standard error is read
/// here (and passed on) so the returned receiver fires when the server freezes there.
fn spawn_server(
    data_dir: &Path,
    listen: &str,
    extra_args: &[&str],
    failpoint: Option<&str>,
) -> (Child, mpsc::Receiver<()>) {
    let mut command = Command::new(ferry_bin());
    command
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", listen])
        .args(extra_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let (froze, frozen) = mpsc::channel();
    let Some(failpoint) = failpoint else {
        let child = command
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry serve");
        return (child, frozen);
    };
    let mut child = command
        .env(ferry_store::failpoint::VARIABLE, failpoint)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry serve");
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if line.starts_with("FERRY_FAILPOINT ") {
                let _ = froze.send(());
            }
        }
    });
    (child, frozen)
}

impl ServerProcess {
    /// Starts `ferry serve` on a free port with `data_dir` (authentication on, with the test
    /// user created), and waits until it answers.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> ServerProcess {
        let added = Command::new(ferry_bin())
            .args(["users", "add", TEST_USER, "--admin", "--data-dir"])
            .arg(data_dir)
            .env("FERRY_PASSWORD", TEST_PASSWORD)
            .output()
            .expect("run ferry users add");
        assert!(added.status.success(), "{added:?}");
        let listen = format!("127.0.0.1:{}", free_port());
        let scheme = if extra_args.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        let server = ServerProcess {
            child: spawn_server(data_dir, &listen, extra_args, None).0,
            url: format!("{scheme}://{TEST_USER}:{TEST_PASSWORD}@{listen}"),
            bare_url: format!("{scheme}://{listen}"),
            address: listen.clone(),
            data_dir: data_dir.to_owned(),
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        server.wait_until_up();
        server
    }

    /// Starts the server again on the same address and data (after [`ServerProcess::kill`]).
    pub fn restart(&mut self) {
        self.restart_armed(None);
    }

    /// Restarts it with `FERRY_FAILPOINT` set to `failpoint`; the receiver fires when the
    /// server has frozen there.
    pub fn restart_armed(&mut self, failpoint: Option<&str>) -> mpsc::Receiver<()> {
        self.kill();
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let (child, frozen) = spawn_server(&self.data_dir, &self.address, &extra, failpoint);
        self.child = child;
        self.wait_until_up();
        frozen
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.address).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ferry serve did not come up at {}", self.url);
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the server to shut down as Ctrl-C does (SIGINT).
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// How the server exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for ferry serve")
    }

    /// Kills the server with SIGKILL (no graceful shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Runs the `ferry` CLI with `args` and returns its output.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .output()
        .expect("run ferry")
}

/// Runs the `ferry` CLI with `--json`, asserts success, and parses standard output.
pub fn ferry_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = ferry(&all);
    assert!(
        output.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8 output");
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// The folder of the Node interop scripts, with their pinned packages installed.
///
/// The packages are installed on first use (`npm ci` from the committed lock file), so the
/// README's single test command works on a fresh machine. `OnceLock` makes concurrent tests in
/// this binary wait for one installation.
pub fn interop_dir() -> &'static Path {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY.get_or_init(|| {
        let dir = repo_root().join("tests").join("interop");
        if !dir.join("node_modules").join("pouchdb").exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .expect("run npm (Node.js 20 must be installed)");
            assert!(status.success(), "npm ci failed in {}", dir.display());
        }
        dir
    })
}

/// Runs one interop scenario with Node and returns its `RESULT` JSON.
pub fn run_interop(scenario: &str, url: &str, db: &str, extra: &[&str]) -> serde_json::Value {
    let dir = interop_dir();
    let output = Command::new("node")
        .arg("interop.js")
        .arg(scenario)
        .args(["--url", url, "--db", db])
        .args(["--user", TEST_USER, "--password", TEST_PASSWORD])
        .args(extra)
        .current_dir(dir)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "interop scenario {scenario} failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("scenario {scenario} printed no RESULT line:\n{stdout}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

/// Runs `ferry serve` with `args` (and a fresh data directory) expecting it to refuse to start;
/// returns its standard error.
pub fn serve_refused(args: &[&str], env: &[(&str, &Path)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(ferry_bin());
    command
        .args([
            "serve",
            "--insecure-no-auth",
            "--listen",
            &listen,
            "--data-dir",
        ])
        .arg(dir.path())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferry serve {args:?} started");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut message = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut message)
        .unwrap();
    message
}
