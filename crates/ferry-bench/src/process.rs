//! Processes the bench measures: a `ferry serve` it starts, and peak resident memory of any
//! process (Linux `/proc`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The user the bench creates on its servers.
pub const USER: &str = "bench";
/// Its password.
pub const PASSWORD: &str = "bench password";

/// Peak and current resident memory of `pid`, in MiB.
pub fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the memory of process {pid}"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

/// CPU time `pid` has used so far (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading the CPU time of process {pid}"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where utime and stime are the 12th and 13th.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<f64>().ok())
        .sum();
    // Linux reports them in USER_HZ, 100 on every architecture it exports to user space.
    Ok(ticks / 100.0)
}

/// Resets the peak of `pid` to its current resident memory (Linux ≥ 4.0), so a workload's peak
/// is its own.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A `ferry serve` process on a free loopback port, killed when dropped.
pub struct FerryServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _data: tempfile::TempDir,
}

/// The `ferry` binary built beside this one (`cargo build [--release] -p ferry -p ferry-bench`).
pub fn ferry_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("ferry");
    if !path.exists() {
        bail!(
            "{} is missing: build it with the bench (cargo build --release -p ferry -p ferry-bench)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl FerryServer {
    /// Starts a server with a fresh data directory and the bench user.
    pub fn start(extra_args: &[&str]) -> Result<FerryServer> {
        FerryServer::start_with_open_files(extra_args, None)
    }

    /// [`FerryServer::start`] with its open files limit (`ulimit -n`) lowered to `open_files`,
    /// as on many hosts (1,024), for the floods that try to exhaust it.
    pub fn start_with_open_files(
        extra_args: &[&str],
        open_files: Option<u64>,
    ) -> Result<FerryServer> {
        let binary = ferry_binary()?;
        let data = tempfile::tempdir()?;
        let added = Command::new(&binary)
            .args(["users", "add", USER, "--data-dir"])
            .arg(data.path())
            .env("FERRY_PASSWORD", PASSWORD)
            .output()?;
        if !added.status.success() {
            bail!(
                "ferry users add failed: {}",
                String::from_utf8_lossy(&added.stderr)
            );
        }
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut command = match open_files {
            // The shell lowers the limit and becomes the server (same process id).
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&binary);
                shell
            }
            None => Command::new(&binary),
        };
        let child = command
            .args(["serve", "--listen", &listen, "--data-dir"])
            .arg(data.path())
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting ferry serve")?;
        let server = FerryServer {
            child,
            url: format!("http://{listen}"),
            _data: data,
        };
        wait_until_listening(&listen)?;
        Ok(server)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FerryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until_listening(address: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(address).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the server at {address} did not come up")
}

/// The repository root (the bench runs from anywhere inside it).
pub fn repo_root() -> Result<PathBuf> {
    let mut dir = std::env::current_dir()?;
    loop {
        if dir.join("bench/peer/bench_pouch.js").exists() {
            return Ok(dir);
        }
        if !dir.pop() {
            bail!("run the bench inside the Ferry repository (bench/peer/ not found)");
        }
    }
}

/// The PouchDB peer's folder, with its pinned packages installed on first use.
pub fn peer_dir() -> Result<PathBuf> {
    let dir = repo_root()?.join("bench/peer");
    if !dir.join("node_modules/pouchdb-server").exists() {
        eprintln!("installing the PouchDB peer (npm ci in {})…", dir.display());
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("running npm (Node.js 20 is needed for the PouchDB peer)")?;
        if !status.success() {
            bail!("npm ci failed in {}", dir.display());
        }
    }
    Ok(dir)
}

/// Runs the peer's own benchmark script with `args` and returns its JSON results.
pub fn run_peer(dir: &Path, args: &[String]) -> Result<serde_json::Value> {
    let out = tempfile::NamedTempFile::new()?;
    let output = Command::new("node")
        .arg("bench_pouch.js")
        .arg("all")
        .args(args)
        .arg("--out")
        .arg(out.path())
        .env("PEER_DATA", std::env::temp_dir().join("ferry-bench-peer"))
        .current_dir(dir)
        .output()
        .context("running the PouchDB peer")?;
    if !output.status.success() {
        bail!(
            "the PouchDB peer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(out.path())?;
    Ok(serde_json::from_str(&text)?)
}
