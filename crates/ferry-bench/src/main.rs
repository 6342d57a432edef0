//! `ferry-bench`: runs each workload against Ferry and against the PouchDB peer
//! (pouchdb-server 4.2 and PouchDB 9, driven by `bench/peer/bench_pouch.js`) in one run, and
//! prints one table with both figures, their ratio, the target, and peak memory.
//!
//! ```text
//! cargo build --release -p ferry -p ferry-bench
//! target/release/ferry-bench              # default sizes (see BENCHMARKS.md)
//! target/release/ferry-bench --quick      # a smoke run with small sizes, as CI does
//! ```
//!
//! Only ratios measured in the same run mean anything: absolute figures on a shared machine
//! are noise.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use serde_json::{Value, json};

mod process;
mod workloads;

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    about = "Ferry and the PouchDB peer, side by side"
)]
struct Cli {
    /// Small sizes, for a smoke run (CI checks that it runs, not the figures).
    #[arg(long)]
    quick: bool,
    /// Documents pushed and pulled (default 100,000; 2,000 with --quick).
    #[arg(long)]
    n: Option<usize>,
    /// Documents written one at a time in the live workload (default 1,000; 100 with --quick).
    #[arg(long)]
    live_docs: Option<usize>,
    /// Skip the PouchDB peer (Ferry's figures only, no ratios).
    #[arg(long)]
    no_peer: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One line of the table.
struct Row {
    workload: String,
    ferry: f64,
    peer: Option<f64>,
    /// Whether a higher figure is better (throughput) or lower (latency, memory).
    higher_is_better: bool,
    target: Option<Target>,
}

/// What a row must reach.
enum Target {
    /// Ferry at least this many times better than the baseline in the same row.
    TimesBetter(f64),
    /// Ferry's figure at most this.
    AtMost(f64),
}

impl Row {
    /// How many times better Ferry is than the baseline (over 1 is better).
    fn ratio(&self) -> Option<f64> {
        let peer = self.peer?;
        Some(if self.higher_is_better {
            self.ferry / peer
        } else {
            peer / self.ferry
        })
    }

    fn verdict(&self) -> &'static str {
        let met = match &self.target {
            None => return "",
            Some(Target::TimesBetter(times)) => match self.ratio() {
                Some(ratio) => ratio >= *times,
                None => return "n/a",
            },
            Some(Target::AtMost(limit)) => self.ferry <= *limit,
        };
        if met { "met" } else { "MISSED" }
    }

    fn target_text(&self) -> String {
        match &self.target {
            None => String::new(),
            Some(Target::TimesBetter(times)) => format!(">= {times}x"),
            Some(Target::AtMost(limit)) => format!("<= {limit}"),
        }
    }

    fn json(&self) -> Value {
        json!({
            "workload": self.workload, "ferry": self.ferry, "baseline": self.peer,
            "ratio": self.ratio(), "target": self.target_text(), "verdict": self.verdict(),
        })
    }
}

fn figure(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<44} {:>12} {:>12} {:>9} {:>9}",
        "workload", "ferry", "baseline", "ratio", "target"
    );
    for row in rows {
        println!(
            "{:<44} {:>12} {:>12} {:>9} {:>9}  {}",
            row.workload,
            figure(row.ferry),
            row.peer.map(figure).unwrap_or_else(|| "-".into()),
            row.ratio()
                .map(|r| format!("{r:.1}x"))
                .unwrap_or_else(|| "-".into()),
            row.target_text(),
            row.verdict(),
        );
    }
}

/// The peer's result for `phase` (and `n`, when given).
fn peer_result<'a>(peer: &'a Value, phase: &str, n: Option<usize>) -> Option<&'a Value> {
    peer["results"]
        .as_array()?
        .iter()
        .find(|result| result["phase"] == phase && n.is_none_or(|n| result["n"] == json!(n)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let n = cli.n.unwrap_or(if cli.quick { 2_000 } else { 100_000 });
    let live_docs = cli.live_docs.unwrap_or(if cli.quick { 100 } else { 1_000 });
    let (single, batched) = if cli.quick {
        (200, 5_000)
    } else {
        (2_000, 100_000)
    };
    let (crowd, sessions) = if cli.quick {
        (100, 500)
    } else {
        (1_000, 10_000)
    };

    let peer = if cli.no_peer {
        None
    } else {
        eprintln!("PouchDB peer: push and pull {n}, live {live_docs}…");
        let dir = process::peer_dir()?;
        Some(process::run_peer(
            &dir,
            &[
                "--n".into(),
                n.to_string(),
                "--phases".into(),
                "push,pull,live".into(),
                "--live-docs".into(),
                live_docs.to_string(),
                "--live-gap-ms".into(),
                "0".into(),
            ],
        )?)
    };
    let peer_value = |phase: &str, n: Option<usize>, key: &[&str]| -> Option<f64> {
        let mut value = peer_result(peer.as_ref()?, phase, n)?;
        for part in key {
            value = value.get(part)?;
        }
        value.as_f64()
    };

    eprintln!("Ferry: push and pull {n}…");
    let (push, pull) = workloads::push_and_pull(n).await?;
    eprintln!("Ferry: live {live_docs}…");
    let live = workloads::live(live_docs, 0).await?;
    eprintln!("Ferry: live {live_docs} with {crowd} idle clients…");
    let crowded = workloads::live(live_docs, crowd).await?;
    eprintln!("Ferry: {sessions} idle sessions…");
    let idle = workloads::idle_sessions(sessions).await?;
    eprintln!("Ferry: local writes…");
    let local = workloads::local_writes(single, batched)?;

    let live_key = ["latency_ms_A_write_to_B_visible"];
    let rows = vec![
        Row {
            workload: format!("1. push {n} docs (docs/s)"),
            ferry: push.docs_per_s,
            peer: peer_value("push", Some(n), &["docs_per_s"]),
            higher_is_better: true,
            target: Some(Target::TimesBetter(10.0)),
        },
        Row {
            workload: "   push: client peak RSS (MiB)".into(),
            ferry: push.client_peak_mib,
            peer: peer_value("push", Some(n), &["client_peak_rss_mb"]),
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: "   push: server peak RSS (MiB)".into(),
            ferry: push.server_peak_mib,
            peer: peer_value("push", Some(n), &["server_peak_rss_mb"]),
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: format!("2. pull {n} docs (docs/s)"),
            ferry: pull.docs_per_s,
            peer: peer_value("pull", Some(n), &["docs_per_s"]),
            higher_is_better: true,
            target: Some(Target::TimesBetter(10.0)),
        },
        Row {
            workload: "   pull: client peak RSS (MiB)".into(),
            ferry: pull.client_peak_mib,
            peer: peer_value("pull", Some(n), &["client_peak_rss_mb"]),
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: "   pull: server peak RSS (MiB)".into(),
            ferry: pull.server_peak_mib,
            peer: peer_value("pull", Some(n), &["server_peak_rss_mb"]),
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: format!("3. live, {live_docs} writes, p50 (ms)"),
            ferry: live.p50_ms,
            peer: peer_value("live", None, &[live_key[0], "p50"]),
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: format!("3. live, {live_docs} writes, p99 (ms)"),
            ferry: live.p99_ms,
            peer: peer_value("live", None, &[live_key[0], "p99"]),
            higher_is_better: false,
            target: Some(Target::AtMost(10.0)),
        },
        Row {
            workload: format!("3. live p99 (ms), {crowd} idle clients connected"),
            ferry: crowded.p99_ms,
            peer: None,
            higher_is_better: false,
            target: Some(Target::AtMost(10.0)),
        },
        Row {
            workload: "5. single durable writes/s (vs raw SQLite)".into(),
            ferry: local.ferry_single,
            peer: Some(local.raw_single),
            higher_is_better: true,
            target: None,
        },
        Row {
            workload: "5. batched writes/s, 1,000 per tx (vs raw)".into(),
            ferry: local.ferry_batched,
            peer: Some(local.raw_batched),
            higher_is_better: true,
            target: Some(Target::TimesBetter(0.5)),
        },
        Row {
            workload: format!("6. {} idle sessions: server RSS (MiB)", idle.count),
            ferry: idle.server_rss_after_mib,
            peer: None,
            higher_is_better: false,
            target: (idle.count >= 10_000).then_some(Target::AtMost(1024.0)),
        },
        Row {
            workload: "6. server RSS per 1,000 idle sessions (MiB)".into(),
            ferry: idle.per_thousand_mib(),
            peer: None,
            higher_is_better: false,
            target: None,
        },
    ];
    println!();
    println!("baseline: the PouchDB peer, except rows 5 (raw rusqlite, same durability)");
    print_table(&rows);
    if let Some(path) = cli.out {
        let results: Vec<Value> = rows.iter().map(Row::json).collect();
        let document = json!({"quick": cli.quick, "n": n, "rows": results, "peer": peer});
        std::fs::write(&path, serde_json::to_string_pretty(&document)?)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}
