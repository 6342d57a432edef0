//! Workload 7: a legitimate client's reads and writes while anonymous clients flood the server
//! on its defaults: with idle connections, with bodies sent a byte at a time, and with wrong
//! passwords. Each flood is bounded in time and runs on loopback only.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::process::{FerryServer, PASSWORD, USER, memory_mib, reset_peak};
use crate::workloads::percentile;

/// What one flood did to the legitimate client and to the server.
#[derive(Clone, Debug)]
pub struct Flood {
    /// The flood's name.
    pub name: &'static str,
    /// The legitimate client's p99 over its reads and writes during the flood, in ms.
    pub p99_ms: f64,
    /// How many of its requests failed during the flood (a refusal is a failure too).
    pub failures: usize,
    /// The server's peak resident memory during the flood, in MiB.
    pub server_peak_mib: f64,
}

/// The legitimate client's figures without a flood, and with each flood.
#[derive(Clone, Debug)]
pub struct Floods {
    /// The quiet p99, in ms.
    pub quiet_p99_ms: f64,
    /// The server's peak resident memory while quiet, in MiB.
    pub quiet_peak_mib: f64,
    /// Each flood.
    pub floods: Vec<Flood>,
}

const DB: &str = "flood";
/// Connections the connection flood keeps open (more than the common 1,024 descriptors).
const FLOOD_CONNECTIONS: usize = 1_100;
/// Tasks opening the flood's connections, so they are all open within a moment.
const FLOODERS: usize = 50;
/// Connections sending their bodies a byte at a time.
const SLOW_BODIES: usize = 200;
/// Concurrent wrong-password logins.
const LOGINS: usize = 64;

/// A client with a token (as the SDK has), so its requests cost no password check; a failed or
/// timed-out request counts its time (up to 10 s) and as a failure.
struct Legitimate {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Legitimate {
    async fn login(server: &FerryServer) -> Result<Legitimate> {
        // A new connection per request, as new users arrive: a flood that exhausts the
        // server's connections shows, which a kept-alive connection would not see.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()?;
        let answer: Value = client
            .post(format!("{}/_ferry/login", server.url))
            .json(&json!({"name": USER, "password": PASSWORD}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = answer["access_token"]
            .as_str()
            .context("the login answered no access token")?
            .to_owned();
        let legit = Legitimate {
            client,
            url: format!("{}/{DB}", server.url),
            token,
        };
        let created = legit
            .client
            .put(&legit.url)
            .bearer_auth(&legit.token)
            .send()
            .await?;
        if !created.status().is_success() {
            bail!("creating {DB}: {}", created.status());
        }
        Ok(legit)
    }

    /// Writes then reads documents, one request at a time, for `duration`: the latency of
    /// each request (ms, sorted) and how many failed.
    async fn measure(&self, duration: Duration, round: &str) -> (Vec<f64>, usize) {
        let mut latencies = Vec::new();
        let mut failures = 0;
        let end = Instant::now() + duration;
        let mut n = 0;
        while Instant::now() < end {
            let id = format!("todos:{round}-{n}");
            n += 1;
            let started = Instant::now();
            let written = self
                .client
                .put(format!("{}/{id}", self.url))
                .bearer_auth(&self.token)
                .json(&json!({"title": id, "done": false}))
                .send()
                .await;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            failures += usize::from(!written.is_ok_and(|answer| answer.status().is_success()));
            let started = Instant::now();
            let read = self
                .client
                .get(format!("{}/{id}", self.url))
                .bearer_auth(&self.token)
                .send()
                .await;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            failures += usize::from(!read.is_ok_and(|answer| answer.status().is_success()));
        }
        latencies.sort_by(f64::total_cmp);
        (latencies, failures)
    }
}

/// Connections that connect and never send a byte, replaced as the server closes them; one
/// of `FLOODERS` tasks holding its share.
async fn hold_connections(address: String) {
    let share = FLOOD_CONNECTIONS / FLOODERS;
    let mut open: std::collections::VecDeque<TcpStream> = std::collections::VecDeque::new();
    loop {
        match TcpStream::connect(&address).await {
            Ok(stream) => {
                if open.len() >= share {
                    open.pop_front();
                }
                open.push_back(stream);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A request announcing a large body and sending it a byte at a time, again and again.
async fn slow_body(address: String) {
    let head = format!(
        "POST /{DB}/_bulk_docs HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n"
    );
    loop {
        let Ok(mut stream) = TcpStream::connect(&address).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        while stream.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Wrong passwords, as fast as the server answers them.
async fn wrong_logins(url: String) {
    let client = reqwest::Client::new();
    loop {
        let _ = client
            .post(format!("{url}/_session"))
            .json(&json!({"name": USER, "password": "not the password"}))
            .send()
            .await;
    }
}

/// Runs each flood for `duration` beside the legitimate client.
pub async fn floods(duration: Duration) -> Result<Floods> {
    // The defaults, with the open files limit many hosts have: the connection flood holds
    // more connections than it.
    let server = FerryServer::start_with_open_files(&[], Some(1_024))?;
    let address = server.url.trim_start_matches("http://").to_owned();
    let legit = Legitimate::login(&server).await?;
    // Warm up, then the quiet figures.
    legit.measure(Duration::from_millis(500), "warm").await;
    reset_peak(server.pid());
    let (quiet, _) = legit.measure(duration, "quiet").await;
    let quiet_peak_mib = memory_mib(server.pid())?.0;
    let mut floods = Vec::new();
    for name in ["connections", "slow bodies", "logins"] {
        reset_peak(server.pid());
        let attackers: Vec<tokio::task::JoinHandle<()>> = match name {
            "connections" => (0..FLOODERS)
                .map(|_| tokio::spawn(hold_connections(address.clone())))
                .collect(),
            "slow bodies" => (0..SLOW_BODIES)
                .map(|_| tokio::spawn(slow_body(address.clone())))
                .collect(),
            _ => (0..LOGINS)
                .map(|_| tokio::spawn(wrong_logins(server.url.clone())))
                .collect(),
        };
        // Let the flood build up before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (latencies, failures) = legit.measure(duration, name).await;
        let server_peak_mib = memory_mib(server.pid())?.0;
        for attacker in &attackers {
            attacker.abort();
        }
        floods.push(Flood {
            name,
            p99_ms: percentile(&latencies, 99),
            failures,
            server_peak_mib,
        });
        // The aborted attackers' sockets close; give the server a moment to see it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Floods {
        quiet_p99_ms: percentile(&quiet, 99),
        quiet_peak_mib,
        floods,
    })
}
