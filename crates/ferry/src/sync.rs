//! `ferry sync`: replicate a local replica with a server database, push first, then pull.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_client::{ClientError, Ferry, HttpPeer, Peer, ReplicationOptions, Stats, TlsOptions};
use ferry_sync::{SyncError, TlsProblem};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::print;

/// Arguments of `ferry sync`.
#[derive(Args)]
pub(crate) struct SyncArgs {
    /// The local replica file.
    replica: PathBuf,
    /// The server database, e.g. http://127.0.0.1:5984/notes or https://… (created if
    /// missing).
    url: String,
    /// Trust the certificate authority (or self-signed certificate) in this PEM file for an
    /// https:// server, in addition to the web's authorities.
    #[arg(long, env = "FERRY_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Keep following changes in both directions until interrupted.
    #[arg(long)]
    live: bool,
    /// Changes per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// The most bytes one write request carries (a batch of large documents is written in
    /// several); keep it below the server's --max-request-bytes.
    #[arg(long, default_value_t = ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES)]
    max_write_bytes: usize,
    /// Only push local changes.
    #[arg(long, conflicts_with = "pull_only")]
    push_only: bool,
    /// Only pull remote changes.
    #[arg(long)]
    pull_only: bool,
}

pub(crate) fn run(args: SyncArgs, json: bool) -> Result<()> {
    let ferry = crate::replica::open(&args.replica)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut remote =
            HttpPeer::new(&args.url).with_context(|| format!("invalid URL {}", args.url))?;
        if let Some(ca_file) = &args.ca_file {
            let tls = TlsOptions::trusting_ca_file(ca_file).context("--ca-file")?;
            remote = remote.with_tls(&tls).context("--ca-file")?;
        }
        let options = ReplicationOptions {
            batch_size: args.batch_size.max(1),
            max_write_bytes: args.max_write_bytes,
            create_target: true,
            ..ReplicationOptions::default()
        };
        if args.live {
            return live(&ferry, &remote, &options, json).await;
        }
        let mut report = serde_json::Map::new();
        let mut lines = Vec::new();
        let mut record = |direction: &str, stats: Stats| {
            lines.push(format!(
                "{direction}: {} changes read, {} revisions written",
                stats.docs_read, stats.docs_written
            ));
            report.insert(direction.into(), json!(stats));
        };
        if !args.pull_only {
            record(
                "push",
                one_way(Push, &ferry, &remote, &options, json).await?,
            );
        }
        if !args.push_only {
            record(
                "pull",
                one_way(Pull, &ferry, &remote, &options, json).await?,
            );
        }
        print(json, serde_json::Value::Object(report), || lines.join("\n"));
        Ok(())
    })
}

/// Which way a replication goes.
#[derive(Clone, Copy)]
enum Direction {
    Push,
    Pull,
}
use Direction::{Pull, Push};

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Push => "push",
            Pull => "pull",
        }
    }
}

/// Replicates one way until caught up, with a progress bar; pushed batches are acknowledged in
/// the replica's outbox (the SDK's push).
async fn one_way(
    direction: Direction,
    ferry: &Ferry,
    remote: &HttpPeer,
    options: &ReplicationOptions,
    json: bool,
) -> Result<Stats> {
    let bar = progress_bar(direction.name(), json);
    let progress = |stats: &Stats| {
        if let Some(bar) = &bar {
            if let Some(pending) = stats.pending {
                bar.set_length(stats.docs_read + pending);
            }
            bar.set_position(stats.docs_read);
        }
    };
    let stats = match direction {
        Push => ferry.push_to(remote, options, progress).await,
        Pull => ferry.pull_from(remote, options, progress).await,
    }
    .map_err(explain)
    .with_context(|| format!("{} failed", direction.name()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(stats)
}

/// A progress bar on standard error, unless output is for scripts.
fn progress_bar(direction: &str, json: bool) -> Option<ProgressBar> {
    if json {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} changes ({per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(direction.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

async fn live(
    ferry: &Ferry,
    remote: &HttpPeer,
    options: &ReplicationOptions,
    json: bool,
) -> Result<()> {
    let options = ReplicationOptions {
        continuous: true,
        ..options.clone()
    };
    if !json {
        eprintln!("syncing continuously; press Ctrl-C to stop");
    }
    // The pull reads the remote database: it must exist before both directions start.
    remote
        .prepare(options.create_target)
        .await
        .map_err(|error| explain(error.into()))
        .context("live sync failed")?;
    let both_ways = async {
        tokio::try_join!(
            ferry.push_to(remote, &options, |_| {}),
            ferry.pull_from(remote, &options, |_| {}),
        )
    };
    tokio::select! {
        result = both_ways => {
            result.map_err(explain).context("live sync failed")?;
        }
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// A sync error, with what to do about it when that is a matter of `ferry sync`'s arguments.
fn explain(error: ClientError) -> anyhow::Error {
    let untrusted = matches!(
        &error,
        ClientError::Sync(SyncError::Tls {
            problem: TlsProblem::UntrustedCertificate { .. },
            ..
        })
    );
    let error = anyhow::Error::new(error);
    if untrusted {
        error.context(
            "the server's TLS certificate is not trusted; if the server uses a self-signed \
             certificate or a private certificate authority, pass that certificate with \
             --ca-file PATH (or FERRY_CA_FILE)",
        )
    } else {
        error
    }
}
