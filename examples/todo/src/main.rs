//! `ferry-todo`: a terminal todo list on a Ferry local replica, to watch offline edits and
//! live sync with your own eyes. Run it twice (two terminals, two replica files) against one
//! `ferry serve`, add and tick todos in both, switch one offline, edit both, bring it back.
//!
//! ```text
//! ferry-todo --replica a.ferry --server http://127.0.0.1:5984/todos --user alice
//! > add buy milk
//! > done 3f9a2c
//! > offline
//! > online
//! ```
//!
//! With `--json` every output line is a JSON object (`{"todos": [...]}` whenever the list
//! changes, `{"connection": "..."}` whenever the connection does), which the example's own
//! tests read.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferry_client::{ConnectionState, Credentials, Doc, DocumentStatus, Ferry, SyncOptions};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "ferry-todo",
    about = "A todo list that works offline and syncs live"
)]
struct Cli {
    /// The local replica file (created if missing).
    #[arg(long, env = "TODO_REPLICA", default_value = "todo.ferry")]
    replica: PathBuf,
    /// The server database to sync with, e.g. http://127.0.0.1:5984/todos.
    #[arg(long, env = "TODO_SERVER")]
    server: Option<String>,
    /// The user to sync as; the password is read from FERRY_PASSWORD.
    #[arg(long, env = "FERRY_USER")]
    user: Option<String>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Interactive: sync live, show the list whenever it changes, read commands from stdin
    /// (add TITLE, done ID, undo ID, rm ID, list, status, offline, online, quit). The default.
    Live,
    /// Add a todo.
    Add {
        /// The title.
        title: Vec<String>,
    },
    /// Tick a todo.
    Done {
        /// Its id (or the end of it).
        id: String,
    },
    /// Remove a todo.
    Rm {
        /// Its id (or the end of it).
        id: String,
    },
    /// Show the list.
    List,
    /// Push and pull once, then exit.
    Sync,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Todo {
    title: String,
    done: bool,
}

struct App {
    ferry: Ferry,
    json: bool,
}

impl App {
    fn todos(&self) -> ferry_client::Collection<Todo> {
        self.ferry.collection("todos")
    }

    /// The todo whose id is `id` or ends with it (ids are long; their ends are shown).
    fn find(&self, id: &str) -> Result<Doc<Todo>> {
        let matching: Vec<_> = self
            .todos()
            .query()
            .run()?
            .into_iter()
            .filter(|doc| doc.id.ends_with(id))
            .collect();
        match matching.len() {
            1 => Ok(matching.into_iter().next().expect("one")),
            0 => bail!("no todo {id}"),
            n => bail!("{id} matches {n} todos; give more of the id"),
        }
    }

    fn run_command(&self, line: &str) -> Result<()> {
        let (verb, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        match verb {
            "add" if !rest.is_empty() => {
                self.todos().insert(&Todo {
                    title: rest.to_owned(),
                    done: false,
                })?;
            }
            "done" | "undo" => {
                let todo = self.find(rest)?;
                self.todos()
                    .patch(&todo.id, &json!({"done": verb == "done"}))?;
            }
            "rm" => {
                let todo = self.find(rest)?;
                self.todos().delete(&todo.id)?;
            }
            "list" => self.print_list(&self.todos().query().sort("title").run()?)?,
            "status" => {
                let counts = self.ferry.status()?;
                self.say(
                    json!({"pending": counts.pending, "rejected": counts.rejected}),
                    format!(
                        "{} change(s) waiting for the server, {} refused",
                        counts.pending, counts.rejected
                    ),
                );
            }
            "offline" => self.ferry.set_online(false),
            "online" => self.ferry.set_online(true),
            "" => {}
            _ => bail!(
                "commands: add TITLE, done ID, undo ID, rm ID, list, status, offline, online, quit"
            ),
        }
        Ok(())
    }

    fn say(&self, value: serde_json::Value, text: String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }

    fn print_list(&self, todos: &[Doc<Todo>]) -> Result<()> {
        let mut rows = Vec::new();
        let mut lines = vec![format!("── {} todo(s) ──", todos.len())];
        for todo in todos {
            let status = match self.ferry.document_status("todos", &todo.id)? {
                Some(DocumentStatus::Pending) => "pending",
                Some(DocumentStatus::Conflicted) => "conflicted",
                Some(DocumentStatus::Rejected { .. }) => "rejected",
                _ => "synced",
            };
            let short = &todo.id[todo.id.len().saturating_sub(6)..];
            let tick = if todo.value.done { "x" } else { " " };
            let marker = if status == "synced" {
                String::new()
            } else {
                format!("  ({status})")
            };
            lines.push(format!("[{tick}] {short}  {}{marker}", todo.value.title));
            rows.push(json!({
                "id": todo.id, "title": todo.value.title, "done": todo.value.done, "status": status,
            }));
        }
        self.say(json!({ "todos": rows }), lines.join("\n"));
        Ok(())
    }
}

fn connection_name(state: &ConnectionState) -> String {
    match state {
        ConnectionState::Offline => "offline".into(),
        ConnectionState::Connecting => "connecting".into(),
        ConnectionState::Connected => "connected".into(),
        ConnectionState::Interrupted { reason } => format!("interrupted: {reason}"),
        ConnectionState::Reconnecting { attempt, delay, .. } => {
            format!(
                "reconnecting (attempt {attempt} in {} ms)",
                delay.as_millis()
            )
        }
        ConnectionState::Disconnected { reason } => format!("disconnected: {reason}"),
        ConnectionState::AuthenticationFailed { reason } => {
            format!("authentication failed: {reason}")
        }
        ConnectionState::SyncedByAnotherProcess => "synced by another process".into(),
        _ => format!("{state:?}"),
    }
}

fn sync_options(cli: &Cli) -> Result<Option<SyncOptions>> {
    let Some(server) = &cli.server else {
        return Ok(None);
    };
    let mut options = SyncOptions::new(server);
    if let Some(user) = &cli.user {
        let password = std::env::var("FERRY_PASSWORD")
            .context("--user needs the password in FERRY_PASSWORD")?;
        options = options.credentials(Credentials::password(user, password));
    }
    Ok(Some(options.on_authentication_failure(
        |failure| async move {
            eprintln!("the server refused the credentials: {}", failure.reason);
            None
        },
    )))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let user = cli.user.clone().unwrap_or_else(|| "me".into());
    let ferry = Ferry::initialize_offline(&cli.replica, &user)
        .with_context(|| format!("opening {}", cli.replica.display()))?;
    let app = App {
        ferry,
        json: cli.json,
    };
    let sync = sync_options(&cli)?;
    match cli.command.as_ref().unwrap_or(&Command::Live) {
        Command::Add { title } => app.run_command(&format!("add {}", title.join(" "))),
        Command::Done { id } => app.run_command(&format!("done {id}")),
        Command::Rm { id } => app.run_command(&format!("rm {id}")),
        Command::List => app.run_command("list"),
        Command::Sync => {
            let options = sync.context("sync needs --server")?;
            let stats = app.ferry.sync_once(&options).await?;
            app.say(
                json!({"pushed": stats.push.docs_written, "pulled": stats.pull.docs_written}),
                format!(
                    "pushed {} and pulled {} change(s)",
                    stats.push.docs_written, stats.pull.docs_written
                ),
            );
            Ok(())
        }
        Command::Live => live(app, sync).await,
    }
}

async fn live(app: App, sync: Option<SyncOptions>) -> Result<()> {
    let app = std::sync::Arc::new(app);
    let events = app.ferry.connection_events();
    let printer = app.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(state) = events.next().await {
            let name = connection_name(&state);
            printer.say(json!({ "connection": name }), format!("· {name}"));
        }
    });
    let _sync = sync
        .map(|options| app.ferry.start_sync(options))
        .transpose()?;
    let list = app.todos().query().sort("title").watch();
    let printer = app.clone();
    tokio::spawn(async move {
        let mut list = std::pin::pin!(list);
        while let Some(todos) = list.next().await {
            match todos {
                Ok(todos) => {
                    if let Err(error) = printer.print_list(&todos) {
                        eprintln!("error: {error}");
                    }
                }
                Err(error) => eprintln!("error: {error}"),
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if matches!(line.trim(), "quit" | "exit") {
            break;
        }
        if let Err(error) = app.run_command(&line) {
            app.say(
                json!({"error": error.to_string()}),
                format!("error: {error}"),
            );
        }
    }
    // Give the last local writes a moment to reach the server before leaving.
    if app.ferry.is_online() {
        let _ = app
            .ferry
            .wait_for_acknowledgement(Duration::from_secs(2))
            .await;
    }
    Ok(())
}
