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

mod flood;
mod process;
mod workloads;

// The bench's client side is an app embedding the SDK, with the allocator BENCHMARKS.md
// recommends to apps (the `ferry` binary uses the same).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run only workload 7 (a legitimate client under floods).
    #[arg(long)]
    floods_only: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run one client workload in this process and print its result, so that the
    /// client's peak memory is its own (the parent process has run other workloads).
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// Workload 7's rows: each flood against the quiet figures of the same server (latency within
/// 5x, memory under 512 MiB).
fn flood_rows(floods: &flood::Floods) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(Row {
        workload: "7. legitimate read/write p99 (ms), quiet".into(),
        ferry: floods.quiet_p99_ms,
        peer: None,
        higher_is_better: false,
        target: None,
    });
    for flood in &floods.floods {
        rows.push(Row {
            workload: format!(
                "7. p99 (ms) during a {} flood vs quiet ({} failed)",
                flood.name, flood.failures
            ),
            ferry: flood.p99_ms,
            peer: Some(floods.quiet_p99_ms),
            higher_is_better: false,
            target: Some(Target::AtMostTimesBaseline(5.0)),
        });
        rows.push(Row {
            workload: format!("   server peak RSS (MiB), {} flood", flood.name),
            ferry: flood.server_peak_mib,
            peer: Some(floods.quiet_peak_mib),
            higher_is_better: false,
            target: Some(Target::AtMost(512.0)),
        });
    }
    rows
}

/// Runs a client workload in a fresh process of this binary.
fn in_child(kind: &str, n: usize, env: &[(&str, &str)]) -> Result<Value> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .args(["--child", kind, "--n", &n.to_string()])
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(output.status.success(), "the {kind} workload failed");
    let text = String::from_utf8(output.stdout)?;
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("the {kind} workload printed no result"))?;
    Ok(serde_json::from_str(line)?)
}

fn transfer_json(transfer: &workloads::Transfer) -> Value {
    json!({
        "docs_per_s": transfer.docs_per_s,
        "client_peak_mib": transfer.client_peak_mib,
        "server_peak_mib": transfer.server_peak_mib,
        "client_cpu_s": transfer.client_cpu_s,
        "server_cpu_s": transfer.server_cpu_s,
    })
}

fn transfer_from(value: &Value) -> workloads::Transfer {
    workloads::Transfer {
        docs_per_s: value["docs_per_s"].as_f64().unwrap_or(f64::NAN),
        client_peak_mib: value["client_peak_mib"].as_f64().unwrap_or(f64::NAN),
        server_peak_mib: value["server_peak_mib"].as_f64().unwrap_or(f64::NAN),
        client_cpu_s: value["client_cpu_s"].as_f64().unwrap_or(f64::NAN),
        server_cpu_s: value["server_cpu_s"].as_f64().unwrap_or(f64::NAN),
    }
}

async fn run_child(kind: &str, n: usize) -> Result<()> {
    let result = match kind {
        "push-pull" => {
            let (push, pull) = workloads::push_and_pull(n).await?;
            json!({"push": transfer_json(&push), "pull": transfer_json(&pull)})
        }
        "backlog" => {
            let backlog = workloads::backlog(n).await?;
            json!({
                "pending": backlog.pending, "seconds": backlog.seconds,
                "client_peak_mib": backlog.client_peak_mib,
                "server_peak_mib": backlog.server_peak_mib,
            })
        }
        // Not used by the table: workload 5 alone, for profiling (`--child local-writes --n N`
        // writes N documents in batches and N / 10 one by one).
        "local-writes" => {
            let local = workloads::local_writes(n / 10, n)?;
            json!({
                "ferry_single": local.ferry_single, "raw_single": local.raw_single,
                "ferry_batched": local.ferry_batched, "raw_batched": local.raw_batched,
            })
        }
        // Not a workload: a CPU-bound neighbour for workload 3c, spinning until it is killed.
        "burn" => {
            let mut state = 0x9E37_79B9_7F4A_7C15_u64;
            loop {
                for _ in 0..1_000_000 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                }
                std::hint::black_box(state);
            }
        }
        other => anyhow::bail!("unknown child workload {other}"),
    };
    println!("RESULT {result}");
    Ok(())
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
    /// Ferry's figure at most this many times the baseline's (memory growth).
    AtMostTimesBaseline(f64),
}

impl Row {
    /// Against a target relative to the baseline (the same server in another condition),
    /// Ferry's figure over the baseline's, to read beside the target; otherwise how many times
    /// better Ferry is than the baseline (over 1 is better).
    fn ratio(&self) -> Option<f64> {
        let peer = self.peer?;
        if let Some(Target::AtMostTimesBaseline(_)) = self.target {
            return Some(self.ferry / peer);
        }
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
            Some(Target::AtMostTimesBaseline(times)) => match self.peer {
                Some(baseline) => self.ferry <= baseline * times,
                None => return "n/a",
            },
        };
        if met { "met" } else { "MISSED" }
    }

    fn target_text(&self) -> String {
        match &self.target {
            None => String::new(),
            Some(Target::TimesBetter(times)) => format!(">= {times}x"),
            Some(Target::AtMost(limit)) => format!("<= {limit}"),
            Some(Target::AtMostTimesBaseline(times)) => format!("<= {times}x base"),
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
    if let Some(kind) = &cli.child {
        return run_child(kind, cli.n.unwrap_or(1_000)).await;
    }
    let flood_seconds = if cli.quick { 3 } else { 20 };
    if cli.floods_only {
        let floods = flood::floods(std::time::Duration::from_secs(flood_seconds)).await?;
        print_table(&flood_rows(&floods));
        return Ok(());
    }
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
    let backlogs: &[usize] = if cli.quick {
        &[1_000, 10_000]
    } else {
        &[10_000, 100_000, 1_000_000]
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
    let transfers = in_child("push-pull", n, &[])?;
    let (push, pull) = (
        transfer_from(&transfers["push"]),
        transfer_from(&transfers["pull"]),
    );
    eprintln!("Ferry: live {live_docs}…");
    let live = workloads::live(live_docs, 0).await?;
    eprintln!("Ferry: live {live_docs} with {crowd} idle clients…");
    let crowded = workloads::live(live_docs, crowd).await?;
    eprintln!("Ferry: live {live_docs} beside a CPU-bound process…");
    let loaded = {
        let mut neighbour = std::process::Command::new(std::env::current_exe()?)
            .args(["--child", "burn"])
            .spawn()?;
        let loaded = workloads::live(live_docs, 0).await;
        let _ = neighbour.kill();
        let _ = neighbour.wait();
        loaded?
    };
    eprintln!("Ferry: {sessions} idle sessions…");
    let idle = workloads::idle_sessions(sessions).await?;
    // Peak RSS varies by a fifth from one process to the next (allocator arenas), so each
    // size runs several times and every figure is the median. mimalloc (in the client and in
    // the server it starts) returns freed pages at once there instead of after a second: RSS
    // then shows what each side holds, where by default it grows with how long the sync ran
    // (the smallest backlog syncs in a fifth of a second, before the allocator's retention
    // settles). BENCHMARKS.md, session 31, has both.
    let backlog_runs = if cli.quick { 1 } else { 3 };
    let mut backlog_results = Vec::new();
    for &pending in backlogs {
        eprintln!("Ferry: reconnect with {pending} pending (median of {backlog_runs})…");
        let runs = (0..backlog_runs)
            .map(|_| in_child("backlog", pending, &[("MIMALLOC_PURGE_DELAY", "0")]))
            .collect::<Result<Vec<_>>>()?;
        let median = |field: &str| {
            let mut values: Vec<f64> = runs
                .iter()
                .map(|run| run[field].as_f64().unwrap_or(f64::NAN))
                .collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        backlog_results.push(workloads::Backlog {
            pending,
            seconds: median("seconds"),
            client_peak_mib: median("client_peak_mib"),
            server_peak_mib: median("server_peak_mib"),
        });
    }
    eprintln!("Ferry: local writes…");
    let local = workloads::local_writes(single, batched)?;
    eprintln!("Ferry: a legitimate client under floods ({flood_seconds} s each)…");
    let floods = flood::floods(std::time::Duration::from_secs(flood_seconds)).await?;

    let live_key = ["latency_ms_A_write_to_B_visible"];
    let mut rows = vec![
        Row {
            workload: format!("1. push {n} docs (docs/s)"),
            ferry: push.docs_per_s,
            peer: peer_value("push", Some(n), &["docs_per_s"]),
            higher_is_better: true,
            target: Some(Target::TimesBetter(20.0)),
        },
        Row {
            workload: "   push vs raw SQLite batched inserts (docs/s)".into(),
            ferry: push.docs_per_s,
            peer: Some(local.raw_batched),
            higher_is_better: true,
            target: Some(Target::TimesBetter(0.25)),
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
            workload: "   push: client CPU (s)".into(),
            ferry: push.client_cpu_s,
            peer: None,
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: "   push: server CPU (s)".into(),
            ferry: push.server_cpu_s,
            peer: None,
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: format!("2. pull {n} docs (docs/s)"),
            ferry: pull.docs_per_s,
            peer: peer_value("pull", Some(n), &["docs_per_s"]),
            higher_is_better: true,
            target: Some(Target::TimesBetter(20.0)),
        },
        Row {
            workload: "   pull vs raw SQLite batched inserts (docs/s)".into(),
            ferry: pull.docs_per_s,
            peer: Some(local.raw_batched),
            higher_is_better: true,
            target: Some(Target::TimesBetter(0.25)),
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
            workload: "   pull: client CPU (s)".into(),
            ferry: pull.client_cpu_s,
            peer: None,
            higher_is_better: false,
            target: None,
        },
        Row {
            workload: "   pull: server CPU (s)".into(),
            ferry: pull.server_cpu_s,
            peer: None,
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
            workload: "3c. live p99 (ms) beside a CPU-bound process".into(),
            ferry: loaded.p99_ms,
            peer: None,
            higher_is_better: false,
            target: Some(Target::AtMost(20.0)),
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
    rows.extend(flood_rows(&floods));
    // Memory must not grow with the backlog: each size against the smallest, at most 1.2x.
    let smallest = backlog_results.first().cloned();
    for result in &backlog_results {
        let Some(smallest) = &smallest else { break };
        rows.push(Row {
            workload: format!("4. reconnect, {} pending: seconds", result.pending),
            ferry: result.seconds,
            peer: None,
            higher_is_better: false,
            target: None,
        });
        for (side, ferry, baseline) in [
            ("client", result.client_peak_mib, smallest.client_peak_mib),
            ("server", result.server_peak_mib, smallest.server_peak_mib),
        ] {
            rows.push(Row {
                workload: format!(
                    "   {side} peak RSS (MiB, freed pages returned at once) vs {} pending",
                    smallest.pending
                ),
                ferry,
                peer: Some(baseline),
                higher_is_better: false,
                target: Some(Target::AtMostTimesBaseline(1.2)),
            });
        }
    }
    println!();
    println!(
        "baseline: the PouchDB peer; rows 4: the smallest backlog; rows 5: raw rusqlite with the same durability; rows 7: the same server, quiet"
    );
    print_table(&rows);
    if let Some(path) = cli.out {
        let results: Vec<Value> = rows.iter().map(Row::json).collect();
        let document = json!({"quick": cli.quick, "n": n, "rows": results, "peer": peer});
        std::fs::write(&path, serde_json::to_string_pretty(&document)?)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ferry: f64, peer: f64, higher_is_better: bool, target: Option<Target>) -> Row {
        Row {
            workload: "w".into(),
            ferry,
            peer: Some(peer),
            higher_is_better,
            target,
        }
    }

    #[test]
    fn a_ratio_reads_the_way_its_target_does() {
        // Against the same server in another condition: Ferry's figure over the baseline.
        let grown = row(111.0, 91.0, false, Some(Target::AtMostTimesBaseline(1.2)));
        assert!((grown.ratio().unwrap() - 111.0 / 91.0).abs() < 1e-9);
        assert_eq!(grown.verdict(), "MISSED");
        assert_eq!(
            row(100.0, 91.0, false, Some(Target::AtMostTimesBaseline(1.2))).verdict(),
            "met"
        );
        // Against the peer: how many times better Ferry is, whichever way the figure goes.
        let faster = row(60.0, 3.0, true, Some(Target::TimesBetter(20.0)));
        assert!((faster.ratio().unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(faster.verdict(), "met");
        let quicker = row(5.0, 500.0, false, None);
        assert!((quicker.ratio().unwrap() - 100.0).abs() < 1e-9);
    }
}
