//! The commands on a local replica: `init`, `put`, `get`, `delete`, `collections`, `list`,
//! `conflicts` and `resolve`. Each opens the replica with the SDK (`ferry_client::Ferry`), the
//! one application layer over the store, so a replica written from the command line is one an
//! app could have written: the same document rules, the same clock, the same outbox.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use ferry_client::{Collection, Doc, Ferry, Resolve, Rev};
use serde_json::{Value, json};

use crate::print;

#[derive(Subcommand)]
pub(crate) enum ReplicaCommand {
    /// Create a local replica file (a SQLite database).
    Init {
        /// The replica file to create.
        replica: PathBuf,
    },
    /// Create or update a document in a local replica.
    Put {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id; omit (or `-`) to generate a UUIDv7.
        id: Option<String>,
        /// The document body as JSON; read from standard input when omitted.
        #[arg(long, short)]
        data: Option<String>,
        /// The revision to update; by default the current winner.
        #[arg(long)]
        rev: Option<String>,
    },
    /// Show a document of a local replica.
    Get {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
    },
    /// Delete a document of a local replica.
    Delete {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
    },
    /// List the collections of a local replica with their document counts.
    Collections {
        /// The replica file.
        replica: PathBuf,
    },
    /// List the documents of a collection, optionally filtered and sorted.
    List {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// A Mango selector, e.g. '{"done": false}'.
        #[arg(long = "where")]
        selector: Option<String>,
        /// Sort by this field (prefix with `-` for descending: `--sort -qty`).
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        /// At most this many documents.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List documents that are in conflict, with every conflicting version.
    Conflicts {
        /// The replica file.
        replica: PathBuf,
        /// Only this collection.
        collection: Option<String>,
    },
    /// Resolve a conflict: keep one version (or write a merged one) and delete the others.
    Resolve {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// The revision to keep; by default the current winner.
        #[arg(long)]
        keep: Option<String>,
        /// A merged body to write on top of the kept revision.
        #[arg(long, short)]
        data: Option<String>,
    },
}

pub(crate) fn run(command: ReplicaCommand, json: bool) -> Result<()> {
    match command {
        ReplicaCommand::Init { replica } => {
            if replica.exists() {
                bail!("{} already exists", replica.display());
            }
            let ferry = open_or_create(&replica)?;
            let replica_id = ferry.replica_id()?;
            print(
                json,
                json!({"replica": replica, "replica_id": replica_id}),
                || format!("created replica {} (id {replica_id})", replica.display()),
            );
        }
        ReplicaCommand::Put {
            replica,
            collection,
            id,
            data,
            rev,
        } => {
            let ferry = open(&replica)?;
            let value = json_argument(&ferry, data, "the document")?;
            let documents = ferry.collection::<Value>(&collection);
            let id = id.filter(|id| id != "-");
            let rev = rev
                .map(|rev| rev.parse::<Rev>())
                .transpose()
                .context("invalid --rev")?;
            let written = match (id, rev) {
                (None, Some(_)) => bail!("--rev needs the document's id"),
                (None, None) => documents.insert(&value)?,
                (Some(id), Some(rev)) => documents.replace_at(&id, &rev, &value)?,
                (Some(id), None) if documents.get(&id)?.is_some() => {
                    documents.replace(&id, &value)?
                }
                (Some(id), None) => documents.insert_with_id(&id, &value)?,
            };
            print(
                json,
                json!({"id": written.id, "collection": collection, "rev": written.rev.to_string()}),
                || format!("{collection}/{} {}", written.id, written.rev),
            );
        }
        ReplicaCommand::Get {
            replica,
            collection,
            id,
        } => {
            let document = open(&replica)?
                .collection::<Value>(&collection)
                .get(&id)?
                .with_context(|| format!("{collection}/{id} does not exist"))?;
            let value = document_value(&collection, &document);
            print(json, value.clone(), || {
                serde_json::to_string_pretty(&value).expect("JSON")
            });
        }
        ReplicaCommand::Delete {
            replica,
            collection,
            id,
        } => {
            if !open(&replica)?
                .collection::<Value>(&collection)
                .delete(&id)?
            {
                bail!("{collection}/{id} does not exist");
            }
            print(
                json,
                json!({"id": id, "collection": collection, "deleted": true}),
                || format!("deleted {collection}/{id}"),
            );
        }
        ReplicaCommand::Collections { replica } => {
            let collections = open(&replica)?.collections()?;
            let value: Value = collections
                .iter()
                .map(|(name, count)| json!({"collection": name, "documents": count}))
                .collect();
            print(json, value, || {
                collections
                    .iter()
                    .map(|(name, count)| {
                        let name = if name.is_empty() { "(default)" } else { name };
                        format!("{name}  {count}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ReplicaCommand::List {
            replica,
            collection,
            selector,
            sort,
            limit,
        } => {
            let mut query = open(&replica)?
                .collection::<Value>(&collection)
                .query()
                .limit(limit);
            if let Some(text) = selector {
                let selector: Value =
                    serde_json::from_str(&text).context("--where is not valid JSON")?;
                query = query.filter(&selector)?;
            }
            query = match sort
                .as_deref()
                .map(|field| field.strip_prefix('-').ok_or(field))
            {
                Some(Ok(descending)) => query.sort_desc(descending),
                Some(Err(ascending)) => query.sort(ascending),
                None => query,
            };
            let values: Vec<Value> = query
                .run()?
                .iter()
                .map(|document| document_value(&collection, document))
                .collect();
            print(json, Value::Array(values.clone()), || {
                values
                    .iter()
                    .map(|value| {
                        let mut line = value.clone();
                        let id = line["_id"].as_str().unwrap_or_default().to_owned();
                        let object = line.as_object_mut().expect("object");
                        object.retain(|key, _| !key.starts_with('_'));
                        let conflicts = if value.get("_conflicts").is_some() {
                            "  (in conflict)"
                        } else {
                            ""
                        };
                        format!("{id}  {line}{conflicts}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ReplicaCommand::Conflicts {
            replica,
            collection,
        } => {
            let ferry = open(&replica)?;
            let collections = match collection {
                Some(name) => vec![name],
                None => ferry
                    .collections()?
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect(),
            };
            let mut conflicts = Vec::new();
            for name in collections {
                conflicts.extend(collection_conflicts(&ferry.collection(&name))?);
            }
            print(json, Value::Array(conflicts.clone()), || {
                if conflicts.is_empty() {
                    return "no conflicts".to_owned();
                }
                let mut lines = Vec::new();
                for conflict in &conflicts {
                    let (collection, id) = (&conflict["collection"], &conflict["id"]);
                    lines.push(format!(
                        "{}/{}:",
                        collection.as_str().unwrap_or_default(),
                        id.as_str().unwrap_or_default()
                    ));
                    for version in conflict["versions"].as_array().into_iter().flatten() {
                        let role = if version["winner"] == json!(true) {
                            "winner  "
                        } else {
                            "conflict"
                        };
                        let rev = version["rev"].as_str().unwrap_or_default();
                        lines.push(format!("  {role} {rev} {}", version["body"]));
                    }
                }
                lines.join("\n")
            });
        }
        ReplicaCommand::Resolve {
            replica,
            collection,
            id,
            keep,
            data,
        } => {
            let ferry = open(&replica)?;
            let documents = ferry.collection::<Value>(&collection);
            let conflict = documents
                .conflict(&id)?
                .with_context(|| format!("{collection}/{id} is not in conflict"))?;
            let choice = match (data, keep) {
                (Some(text), _) => Resolve::Value(json_argument(&ferry, Some(text), "--data")?),
                (None, Some(rev)) => Resolve::Keep(rev.parse().context("invalid --keep")?),
                // The current winner comes first.
                (None, None) => Resolve::Keep(conflict.versions[0].rev.clone()),
            };
            // One transaction: the chosen or merged body on the winning version, a tombstone
            // on every other one, and a resolution record.
            let resolved = documents.resolve(&id, choice).with_context(|| {
                format!("resolving {collection}/{id} (run `ferry conflicts` again)")
            })?;
            print(
                json,
                json!({"id": id, "rev": resolved.rev.to_string(), "conflicts": resolved.conflicts.len()}),
                || format!("{collection}/{id} resolved at {}", resolved.rev),
            );
        }
    }
    Ok(())
}

/// Opens an existing replica file.
pub(crate) fn open(path: &Path) -> Result<Ferry> {
    if !path.exists() {
        bail!(
            "{} does not exist; create it with `ferry init {}`",
            path.display(),
            path.display()
        );
    }
    open_or_create(path)
}

fn open_or_create(path: &Path) -> Result<Ferry> {
    // The replica's user is only shown to the application; the system's user name serves.
    let user = std::env::var("USER").unwrap_or_else(|_| "ferry".to_owned());
    Ferry::initialize_offline(path, &user)
        .with_context(|| format!("opening replica {}", path.display()))
}

/// A document body given as an argument, or on standard input when it is missing, read by
/// the strict parser every document goes through (no duplicate keys, no integer beyond what a
/// JSON peer reads exactly, the replica's depth limit).
fn json_argument(ferry: &Ferry, text: Option<String>, what: &str) -> Result<Value> {
    let text = match text {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .with_context(|| format!("reading {what} from standard input"))?;
            text
        }
    };
    let body = ferry_core::json::parse_object(text.as_bytes(), ferry.limits().max_json_depth)
        .with_context(|| format!("{what} is not a valid JSON object"))?;
    Ok(Value::Object(body))
}

/// A document as the commands print it: its fields, with `_id`, `_collection`, `_rev` and, in
/// a conflict, `_conflicts`.
fn document_value(collection: &str, document: &Doc<Value>) -> Value {
    let mut value = json!({
        "_id": document.id,
        "_collection": collection,
        "_rev": document.rev.to_string(),
    });
    if !document.conflicts.is_empty() {
        value["_conflicts"] = document.conflicts.iter().map(ToString::to_string).collect();
    }
    if let Value::Object(fields) = &document.value {
        for (key, field) in fields {
            value[key] = field.clone();
        }
    }
    value
}

/// The conflicted documents of one collection, each with every live version (the winner
/// first).
fn collection_conflicts(documents: &Collection<Value>) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    for id in documents.conflicted()? {
        let Some(conflict) = documents.conflict(&id)? else {
            continue; // resolved meanwhile (by a sync in another process)
        };
        let versions: Vec<Value> = conflict
            .versions
            .iter()
            .enumerate()
            .map(|(index, version)| {
                json!({
                    "rev": version.rev.to_string(),
                    "winner": index == 0,
                    "hlc": version.hlc.to_string(),
                    "body": version.value,
                })
            })
            .collect();
        found.push(json!({"collection": documents.name(), "id": id, "versions": versions}));
    }
    Ok(found)
}
