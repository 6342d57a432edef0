//! The Ferry side of each workload. Every function starts what it needs (a `ferry serve`
//! process, replicas in a temporary directory), measures, and cleans up.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_client::{ConnectionState, Credentials, Ferry, SyncOptions};
use ferry_core::protocol::{ClientFrame, Hello, HelloAuth, ServerFrame, VERSIONS};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::process::{FerryServer, PASSWORD, USER, cpu_seconds, memory_mib, reset_peak};

/// A document of about 200 bytes, the same shape as the peer's.
pub fn todo(n: usize) -> Value {
    json!({
        "title": format!("Todo item {n}: buy milk, call the plumber, write the weekly report"),
        "done": n.is_multiple_of(3),
        "tags": ["home", "errand", format!("p{}", n % 5)],
        "n": n,
        "note": "offline-first sync baseline payload xxxxxxxx",
    })
}

/// Throughput of one replication, with the peak memory of both processes.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// Documents per second.
    pub docs_per_s: f64,
    /// Peak resident memory of the client (this process), MiB.
    pub client_peak_mib: f64,
    /// Peak resident memory of the server, MiB.
    pub server_peak_mib: f64,
    /// CPU time the client used (user + system), seconds.
    pub client_cpu_s: f64,
    /// CPU time the server used, seconds.
    pub server_cpu_s: f64,
}

fn options(server: &FerryServer, db: &str) -> SyncOptions {
    SyncOptions::new(format!("{}/{db}", server.url))
        .credentials(Credentials::password(USER, PASSWORD))
}

/// An access token for the bench user (sessions opened with it skip the password check).
async fn access_token(server: &FerryServer) -> Result<String> {
    let login: Value = reqwest::Client::new()
        .post(format!("{}/_ferry/login", server.url))
        .json(&json!({"name": USER, "password": PASSWORD}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    login["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("login without a token")
}

type Session =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `count` authenticated sync sessions on `db`, each subscribed to its changes, that
/// then stay idle (they never read, as a backgrounded app would not).
async fn idle_sessions_on(server: &FerryServer, db: &str, count: usize) -> Result<Vec<Session>> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let token = access_token(server).await?;
    let url = format!("{}/_ferry/sync", server.url.replacen("http://", "ws://", 1));
    let mut sessions = Vec::with_capacity(count);
    for n in 0..count {
        // Small buffers, as an idle client would want: 10,000 sessions in this process must
        // not cost gigabytes here.
        let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        config.read_buffer_size = 4096;
        config.write_buffer_size = 4096;
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true).await?;
        let hello = ClientFrame::Hello(Hello {
            versions: VERSIONS.to_vec(),
            db: db.to_owned(),
            create: true,
            replica_id: format!("idle-{n}"),
            auth: Some(HelloAuth {
                token: Some(token.clone()),
                ..HelloAuth::default()
            }),
        });
        socket.send(Message::Text(hello.encode().into())).await?;
        let welcome = socket.next().await.context("no welcome")??;
        let decode = |frame: &Message| -> Result<ServerFrame> {
            Ok(ServerFrame::decode(frame.to_text()?.as_bytes())?)
        };
        if !matches!(decode(&welcome)?, ServerFrame::Welcome(_)) {
            bail!("session refused: {welcome}");
        }
        // The pong proves the server has taken the subscription in (frames are handled in
        // order), so the session is fully set up when this returns.
        for frame in [ClientFrame::Subscribe { since: 0 }, ClientFrame::Ping] {
            socket.send(Message::Text(frame.encode().into())).await?;
        }
        loop {
            let frame = socket.next().await.context("closed before the pong")??;
            if matches!(decode(&frame)?, ServerFrame::Pong) {
                break;
            }
        }
        sessions.push(socket);
    }
    Ok(sessions)
}

/// Workload 6: what idle sessions cost the server.
#[derive(Clone, Debug)]
pub struct IdleSessions {
    /// Sessions held.
    pub count: usize,
    /// Server resident memory with no session, MiB.
    pub server_rss_before_mib: f64,
    /// With all of them, MiB.
    pub server_rss_after_mib: f64,
}

impl IdleSessions {
    /// Resident memory per 1,000 sessions, MiB.
    pub fn per_thousand_mib(&self) -> f64 {
        (self.server_rss_after_mib - self.server_rss_before_mib) * 1000.0 / self.count as f64
    }
}

/// Opens `count` authenticated, subscribed, idle sessions on one server.
pub async fn idle_sessions(count: usize) -> Result<IdleSessions> {
    let server = FerryServer::start(&[])?;
    // A first session opens the database, so its cost is not counted per session.
    let warm_up = idle_sessions_on(&server, "idle", 1).await?;
    let server_rss_before_mib = memory_mib(server.pid())?.1;
    let sessions = idle_sessions_on(&server, "idle", count).await?;
    let server_rss_after_mib = memory_mib(server.pid())?.1;
    drop((sessions, warm_up));
    Ok(IdleSessions {
        count,
        server_rss_before_mib,
        server_rss_after_mib,
    })
}

/// Writes documents `todo(n)` for every `n` of `range` to `ferry` offline, in batches of 1,000
/// (one transaction each).
pub fn fill(ferry: &Ferry, range: std::ops::Range<usize>) -> Result<()> {
    let todos = ferry.collection::<Value>("todos");
    for start in range.clone().step_by(1000) {
        let batch: Vec<Value> = (start..(start + 1000).min(range.end)).map(todo).collect();
        todos.insert_many(&batch)?;
    }
    Ok(())
}

/// Workloads 1 and 2: `n` documents created offline pushed to an empty server database, then
/// pulled into an empty replica.
pub async fn push_and_pull(n: usize) -> Result<(Transfer, Transfer)> {
    let server = FerryServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let db = format!("push-{n}");
    let pusher = Ferry::initialize_offline(dir.path().join("push.ferry"), USER)?;
    fill(&pusher, 0..n)?;

    // One way each, as the peer's `replicate.to` and `replicate.from`.
    let (push, pushed) =
        measure_transfer(&server, n, pusher.push_once(&options(&server, &db))).await?;
    if usize::try_from(pushed.docs_written)? != n {
        bail!("pushed {} documents, not {n}", pushed.docs_written);
    }
    drop(pusher);

    let puller = Ferry::initialize_offline(dir.path().join("pull.ferry"), USER)?;
    let (pull, pulled) =
        measure_transfer(&server, n, puller.pull_once(&options(&server, &db))).await?;
    if usize::try_from(pulled.docs_written)? != n {
        bail!("pulled {} documents, not {n}", pulled.docs_written);
    }
    Ok((push, pull))
}

/// Runs one replication of `n` documents, with its rate, both processes' peak memory and CPU.
async fn measure_transfer<T, E: Into<anyhow::Error>>(
    server: &FerryServer,
    n: usize,
    replication: impl Future<Output = Result<T, E>>,
) -> Result<(Transfer, T)> {
    let me = std::process::id();
    reset_peak(me);
    reset_peak(server.pid());
    let cpu_before = (cpu_seconds(me)?, cpu_seconds(server.pid())?);
    let started = Instant::now();
    let outcome = replication.await.map_err(Into::into)?;
    let elapsed = started.elapsed();
    let transfer = Transfer {
        docs_per_s: n as f64 / elapsed.as_secs_f64(),
        client_peak_mib: memory_mib(me)?.0,
        server_peak_mib: memory_mib(server.pid())?.0,
        client_cpu_s: cpu_seconds(me)? - cpu_before.0,
        server_cpu_s: cpu_seconds(server.pid())? - cpu_before.1,
    };
    Ok((transfer, outcome))
}

/// Workload 4: a reconnecting client with a backlog.
#[derive(Clone, Debug)]
pub struct Backlog {
    /// Pending changes.
    pub pending: usize,
    /// Seconds until the server acknowledged all of them.
    pub seconds: f64,
    /// Peak resident memory of the client (this process) meanwhile, MiB.
    pub client_peak_mib: f64,
    /// Peak resident memory of the server meanwhile, MiB.
    pub server_peak_mib: f64,
}

/// Workload 4: `pending` changes written offline; the client then starts syncing and waits
/// until every one is acknowledged.
pub async fn backlog(pending: usize) -> Result<Backlog> {
    let server = FerryServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let client = Ferry::initialize_offline(dir.path().join("backlog.ferry"), USER)?;
    fill(&client, 0..pending)?;
    if usize::try_from(client.status()?.pending)? != pending {
        bail!("the backlog is not {pending} pending changes");
    }
    let me = std::process::id();
    reset_peak(me);
    reset_peak(server.pid());
    let started = Instant::now();
    let _sync = client.start_sync(options(&server, "backlog"))?;
    if !client
        .wait_for_acknowledgement(Duration::from_secs(3600))
        .await?
    {
        bail!("the backlog of {pending} was not acknowledged");
    }
    Ok(Backlog {
        pending,
        seconds: started.elapsed().as_secs_f64(),
        client_peak_mib: memory_mib(me)?.0,
        server_peak_mib: memory_mib(server.pid())?.0,
    })
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// The nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], percent: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (percent * (sorted.len() - 1) + 50) / 100;
    sorted[rank.min(sorted.len() - 1)]
}

async fn wait_connected(ferry: &Ferry) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ferry.connection_state() != ConnectionState::Connected {
        if Instant::now() > deadline {
            bail!("a client did not connect: {:?}", ferry.connection_state());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Workload 3: client A writes `docs` documents one at a time; the time until each is visible
/// in client B's local replica, while `idle` other clients are connected and subscribed to
/// the same database (each is told about every change).
pub async fn live(docs: usize, idle: usize) -> Result<Latency> {
    let server = FerryServer::start(&[])?;
    let _idle = idle_sessions_on(&server, "live", idle).await?;
    let dir = tempfile::tempdir()?;
    let a = Ferry::initialize_offline(dir.path().join("a.ferry"), USER)?;
    let b = Ferry::initialize_offline(dir.path().join("b.ferry"), USER)?;
    let _sync_a = a.start_sync(options(&server, "live"))?;
    let _sync_b = b.start_sync(options(&server, "live"))?;
    wait_connected(&a).await?;
    wait_connected(&b).await?;
    let (writer, reader) = (
        a.collection::<Value>("todos"),
        b.collection::<Value>("todos"),
    );
    let mut latencies = Vec::with_capacity(docs);
    for n in 0..docs {
        let id = format!("live-{n:06}");
        let mut seen = Box::pin(reader.watch(&id));
        seen.next().await.context("watch ended")??;
        let started = Instant::now();
        writer.insert_with_id(&id, &todo(n))?;
        loop {
            let current = tokio::time::timeout(Duration::from_secs(30), seen.next())
                .await
                .context("a document never reached the other client")?
                .context("watch ended")??;
            if current.is_some() {
                break;
            }
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Latency {
        p50_ms: percentile(&latencies, 50),
        p99_ms: percentile(&latencies, 99),
    })
}

/// Workload 5: durable local writes per second, one per transaction and in batches, for Ferry
/// and for raw `rusqlite` with the same durability (WAL, `synchronous=FULL`).
#[derive(Clone, Debug)]
pub struct LocalWrites {
    /// Ferry, one insert per call.
    pub ferry_single: f64,
    /// rusqlite, one insert per transaction.
    pub raw_single: f64,
    /// Ferry, `insert_many` of 1,000.
    pub ferry_batched: f64,
    /// rusqlite, 1,000 inserts per transaction.
    pub raw_batched: f64,
}

/// How many rounds workload 5 alternates Ferry and raw SQLite in: both see the same moments
/// of a shared machine, so their ratio is steadier than two runs one after the other.
const LOCAL_WRITE_ROUNDS: usize = 5;

/// Runs workload 5 with `single` one-by-one writes and `batched` writes in batches of 1,000,
/// in rounds that alternate Ferry and raw SQLite.
pub fn local_writes(single: usize, batched: usize) -> Result<LocalWrites> {
    let dir = tempfile::tempdir()?;
    let ferry = Ferry::initialize_offline(dir.path().join("local.ferry"), USER)?;
    let todos = ferry.collection::<Value>("todos");
    let mut raw = rusqlite::Connection::open(dir.path().join("raw.sqlite"))?;
    raw.pragma_update(None, "journal_mode", "WAL")?;
    raw.pragma_update(None, "synchronous", "FULL")?;
    raw.execute_batch("CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT NOT NULL)")?;

    let mut elapsed = [std::time::Duration::ZERO; 4];
    let single_round = single.div_ceil(LOCAL_WRITE_ROUNDS);
    let batched_round = batched.div_ceil(LOCAL_WRITE_ROUNDS);
    for round in 0..LOCAL_WRITE_ROUNDS {
        let singles = (round * single_round)..((round + 1) * single_round).min(single);
        let batches = (round * batched_round)..((round + 1) * batched_round).min(batched);

        let started = Instant::now();
        for n in singles.clone() {
            todos.insert(&todo(n))?;
        }
        elapsed[0] += started.elapsed();
        let started = Instant::now();
        for n in singles {
            raw.execute(
                "INSERT INTO docs (id, body) VALUES (?1, ?2)",
                (format!("single-{n}"), todo(n).to_string()),
            )?;
        }
        elapsed[1] += started.elapsed();

        let started = Instant::now();
        fill(&ferry, batches.clone())?;
        elapsed[2] += started.elapsed();
        let started = Instant::now();
        for chunk in batches.clone().step_by(1000) {
            let transaction = raw.transaction()?;
            {
                let mut insert =
                    transaction.prepare_cached("INSERT INTO docs (id, body) VALUES (?1, ?2)")?;
                for n in chunk..(chunk + 1000).min(batches.end) {
                    insert.execute((format!("batch-{n}"), todo(n).to_string()))?;
                }
            }
            transaction.commit()?;
        }
        elapsed[3] += started.elapsed();
    }
    let rate = |count: usize, time: std::time::Duration| count as f64 / time.as_secs_f64();
    Ok(LocalWrites {
        ferry_single: rate(single, elapsed[0]),
        raw_single: rate(single, elapsed[1]),
        ferry_batched: rate(batched, elapsed[2]),
        raw_batched: rate(batched, elapsed[3]),
    })
}
