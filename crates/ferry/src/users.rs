//! `ferry users`: manage the server's users and their tokens, directly in its data directory
//! (the accounts file is SQLite in WAL mode, so this works while the server runs).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ferry_server::auth::{Auth, AuthConfig};
use ferry_store::accounts::TokenKind;
use serde_json::json;

use crate::print;

#[derive(Args)]
pub(crate) struct UsersArgs {
    /// The server's data directory.
    #[arg(
        long,
        env = "FERRY_DATA_DIR",
        default_value = "ferry-data",
        global = true
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: UsersCommand,
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a user, or set an existing user's password. The password is read from the
    /// FERRY_PASSWORD environment variable, or else from the first line of standard input.
    Add {
        /// The user name.
        name: String,
        /// Make the user an administrator (may delete databases).
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
    /// Delete a user and every token issued to it.
    Delete {
        /// The user name.
        name: String,
    },
    /// Revoke a user's tokens: its replicas must authenticate again to reconnect.
    Revoke {
        /// The user name.
        name: String,
        /// Only reconnect tokens (access tokens and session cookies keep working).
        #[arg(long)]
        reconnect_only: bool,
    },
}

fn read_password() -> Result<String> {
    if let Ok(password) = std::env::var("FERRY_PASSWORD") {
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password: set FERRY_PASSWORD or write it on standard input");
    }
    Ok(password)
}

pub(crate) fn run(args: UsersArgs, json: bool) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let auth = Auth::open(&args.data_dir, AuthConfig::default())
        .with_context(|| format!("opening the accounts in {}", args.data_dir.display()))?;
    match args.command {
        UsersCommand::Add { name, admin } => {
            let password = read_password()?;
            let existed = auth.accounts().get_user(&name)?.is_some();
            auth.set_user(&name, &password, admin)?;
            print(
                json,
                json!({"user": name, "admin": admin, "created": !existed}),
                || {
                    let role = if admin { " (administrator)" } else { "" };
                    let verb = if existed { "updated" } else { "created" };
                    format!("{verb} user {name}{role}")
                },
            );
        }
        UsersCommand::List => {
            let users = auth.accounts().list_users()?;
            let value: serde_json::Value = users
                .iter()
                .map(|user| json!({"user": user.name, "admin": user.admin}))
                .collect();
            print(json, value, || {
                users
                    .iter()
                    .map(|user| {
                        let role = if user.admin { "  admin" } else { "" };
                        format!("{}{role}", user.name)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        UsersCommand::Delete { name } => {
            if !auth.accounts().delete_user(&name)? {
                bail!("there is no user {name:?}");
            }
            print(json, json!({"user": name, "deleted": true}), || {
                format!("deleted user {name} and its tokens")
            });
        }
        UsersCommand::Revoke {
            name,
            reconnect_only,
        } => {
            if auth.accounts().get_user(&name)?.is_none() {
                bail!("there is no user {name:?}");
            }
            let kind = reconnect_only.then_some(TokenKind::Reconnect);
            let revoked = auth.accounts().revoke_tokens(&name, kind)?;
            print(json, json!({"user": name, "revoked": revoked}), || {
                format!("revoked {revoked} tokens of {name}")
            });
        }
    }
    Ok(())
}
