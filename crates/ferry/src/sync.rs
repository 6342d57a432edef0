//! `ferry sync`: replicate a local replica with a server database (push, then pull).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Arguments of `ferry sync`.
#[derive(Args)]
pub(crate) struct SyncArgs {
    /// The local replica file.
    replica: PathBuf,
    /// The server database, e.g. http://127.0.0.1:5984/notes.
    url: String,
}

pub(crate) fn run(args: SyncArgs, _json: bool) -> Result<()> {
    let _ = (args.replica, args.url);
    anyhow::bail!("sync is being written")
}
