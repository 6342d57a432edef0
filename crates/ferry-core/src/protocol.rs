//! The sync session's frames (`docs/protocol.md`, version 1) as types both ends use: the
//! client encodes [`ClientFrame`]s and decodes [`ServerFrame`]s, the server the other way
//! round, through the one decoder here (which the fuzz targets call too).
//!
//! Every frame is one JSON object with a `type`; a request also has an `op`. The server
//! decodes a client's frame in three passes over its text, none of which builds a JSON tree:
//! the strict checks (`crate::json::check_within`: duplicate keys refused, bounded depth and
//! count of values), the `type` and `op`, then the members of the one type they name.
//! Documents (`bulk_docs`, a `bulk_get` result) stay text ([`RawJson`]) inside the frame,
//! so a body read from the store reaches the wire without being parsed, and each document is
//! parsed once, where it is taken apart ([`crate::couch::revision_from_text`]).
//!
//! A family of frames added later (presence, activities, chat) is a new `type` beside these,
//! decoded the same way; a server that does not know a type refuses it with `bad_request`.
//!
//! ```
//! use ferry_core::protocol::{ClientFrame, Op};
//! let text = br#"{"type":"request","id":7,"op":"revs_diff","revs":{"a":["1-x"]}}"#;
//! let ClientFrame::Request { id, op } = ClientFrame::decode(text, 64).unwrap() else {
//!     panic!("a request")
//! };
//! assert_eq!(id, 7);
//! assert!(matches!(op, Op::RevsDiff { .. }));
//! ```

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use crate::couch::{ChangesRow, RevEntry};
use crate::json::{JsonError, RawJson, check_within};
use crate::replicate::Checkpoint;
use crate::rev::Rev;

/// The protocol versions this build speaks.
pub const VERSIONS: &[u64] = &[1];

/// The HTTP header with which a Ferry server tells, on every answer, the largest request body
/// it accepts (bytes), so that Ferry's HTTP clients size their writes below it instead of
/// sending what it would refuse (the session's `welcome` says it as `max_frame_bytes`).
/// CouchDB clients ignore it.
pub const MAX_REQUEST_BYTES_HEADER: &str = "ferry-max-request-bytes";

/// Frames nest one level deeper than a `_bulk_docs` body: `{"op", "docs": [document]}`.
pub const FRAME_ENVELOPE_DEPTH: usize = 2;

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not strict JSON, or nested too deeply.
    #[error("invalid frame: {0}")]
    Json(#[from] JsonError),
    /// Not an object with a known `type` (or `op`).
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A request (its id readable) whose op is unknown or whose members are wrong: the server
    /// answers that request with an error and the session goes on.
    #[error("request {id}: {detail}")]
    InvalidRequest {
        /// The request's id.
        id: u64,
        /// What is wrong.
        detail: String,
    },
    /// A known type whose members are wrong.
    #[error("invalid {what}: {detail}")]
    Members {
        /// The frame type (or op).
        what: String,
        /// What serde found wrong.
        detail: String,
    },
}

/// Credentials in a `hello`: a reconnect token, an access token, or a name and password.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAuth {
    /// A user name (with `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// An access token from `POST /_ferry/login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The token the previous `welcome` gave this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_token: Option<String>,
}

impl std::fmt::Debug for HelloAuth {
    /// Says which credentials are present, never what they are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloAuth")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field(
                "reconnect_token",
                &self.reconnect_token.as_ref().map(|_| "…"),
            )
            .finish()
    }
}

/// The first frame of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol versions the client speaks.
    #[serde(default)]
    pub versions: Vec<u64>,
    /// The database.
    pub db: String,
    /// Create the database if it does not exist.
    #[serde(default)]
    pub create: bool,
    /// The client replica's id (1 to 128 bytes).
    #[serde(default)]
    pub replica_id: String,
    /// The credentials, unless the upgrade request carried them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<HelloAuth>,
}

/// A revision asked for by `bulk_get`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevRef {
    /// The document.
    pub id: String,
    /// The revision.
    pub rev: Rev,
}

/// One request's operation and its members.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Read a replication checkpoint.
    GetCheckpoint {
        /// The replication id.
        checkpoint_id: String,
    },
    /// Write a replication checkpoint.
    PutCheckpoint {
        /// The replication id.
        checkpoint_id: String,
        /// The checkpoint.
        checkpoint: Checkpoint,
    },
    /// Read a page of changes.
    Changes {
        /// The sequence to read after.
        #[serde(default)]
        since: u64,
        /// The most rows (the server clamps it to its page limit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        /// Only these documents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        doc_ids: Option<Vec<String>>,
        /// Only documents whose winner matches this Mango selector.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selector: Option<Value>,
    },
    /// Which of these revisions the server lacks.
    RevsDiff {
        /// Document ids with the revisions asked about.
        revs: BTreeMap<String, Vec<Rev>>,
    },
    /// These revisions with their bodies and ancestry.
    BulkGet {
        /// The revisions.
        docs: Vec<RevRef>,
        /// Answer about this many bytes of bodies at most (and at least one revision),
        /// leaving the rest in [`BulkGetResult::unserved`] to be asked for again, so no answer
        /// outgrows a frame. Without it, every revision is answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
    },
    /// Store these replicated revisions (CouchDB documents with `_revisions` and `_ferry`).
    BulkDocs {
        /// The documents, as text ([`crate::couch::revision_from_text`] reads them).
        docs: Vec<RawJson>,
    },
}

/// A frame a client sends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Opens the session.
    Hello(Hello),
    /// A request, answered by a [`ServerFrame::Response`] with the same id.
    Request {
        /// Chosen by the client, unique among its unanswered requests.
        id: u64,
        /// What to do.
        #[serde(flatten)]
        op: Op,
    },
    /// Be told when the database's sequence moves past `since`.
    Subscribe {
        /// The sequence the client has.
        #[serde(default)]
        since: u64,
    },
    /// Stop being told.
    Unsubscribe,
    /// Answered by [`ServerFrame::Pong`].
    Ping,
}

/// An error as the session carries it: CouchDB's `error` and `reason`, and the HTTP status the
/// same failure has (a client retries 5xx and treats 4xx as a refusal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// CouchDB's error code.
    pub error: String,
    /// A sentence for humans.
    #[serde(default)]
    pub reason: String,
    /// The HTTP status.
    #[serde(default = "bad_request_status")]
    pub status: u16,
}

fn bad_request_status() -> u16 {
    400
}

/// The session's acceptance of a `hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version chosen.
    pub version: u64,
    /// The server's uuid.
    pub server: String,
    /// The database's latest sequence.
    pub update_seq: u64,
    /// Who the client is (`None` when authentication is off).
    #[serde(default)]
    pub user: Option<String>,
    /// The token to resume the next session with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_token: Option<String>,
    /// When the reconnect token chain expires (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_expires_at: Option<u64>,
    /// The largest frame the session takes (`--max-request-bytes`): a client keeps each
    /// request below it (a larger one ends the session with 1009).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    /// How long the session may stay silent before it is closed (`--session-idle-timeout`), in
    /// milliseconds: a client pings well within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// The server's clock when it sent the welcome (ms since the epoch): a client whose clock
    /// is far off re-bases its replica's clock on it, so its edits carry clocks the server
    /// takes (`--max-clock-drift`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time_ms: Option<u64>,
}

/// A frame the server sends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The session is open.
    Welcome(Welcome),
    /// The answer to a request: its result (shaped by its op) or an error.
    Response {
        /// The request's id.
        id: u64,
        /// The result, on success, as text (see [`result_as`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<RawJson>,
        /// The error, on failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<WireError>,
    },
    /// The database's sequence moved.
    Changed {
        /// Its latest sequence.
        seq: u64,
    },
    /// The answer to a ping.
    Pong,
    /// The session is refused or ended; a close follows.
    Error(WireError),
}

/// The result of `changes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesResult {
    /// The rows, in sequence order.
    pub results: Vec<ChangesRow>,
    /// The sequence to continue after.
    pub last_seq: u64,
    /// How many changes remain.
    #[serde(default)]
    pub pending: u64,
}

/// The result of `bulk_get`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkGetResult {
    /// The revisions found, as the text of CouchDB documents with `_revisions` and `_ferry`
    /// ([`crate::couch::revision_from_text`] reads them).
    pub docs: Vec<RawJson>,
    /// Those the server does not have (or no longer keeps the body of).
    #[serde(default)]
    pub missing: Vec<RevRef>,
    /// Those left out to keep the answer within the request's `max_bytes`, in request
    /// order: ask for them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unserved: Vec<RevRef>,
}

/// What storing one revision of a `bulk_docs` came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The document.
    pub id: String,
    /// The revision.
    pub rev: Rev,
    /// Stored (or already present).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ok: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The refusal's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The result of `bulk_docs`: one ack per revision, in request order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkDocsResult {
    /// The acks.
    pub acks: Vec<Ack>,
}

/// Reads the frame's members as `T` (members `T` does not name, such as `type`, are skipped).
fn members<'a, T: Deserialize<'a>>(what: &str, text: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(text).map_err(|error| FrameError::Members {
        what: what.to_owned(),
        detail: error.to_string(),
    })
}

/// The members that tell frames apart, kept as text until read.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
}

impl<'a> Head<'a> {
    /// The head of a frame, which must be a JSON object.
    fn of(text: &'a [u8]) -> Result<Head<'a>, FrameError> {
        if text.trim_ascii_start().first() != Some(&b'{') {
            return Err(FrameError::UnknownType("(not an object)".into()));
        }
        serde_json::from_slice(text)
            .map_err(|error| FrameError::Json(JsonError::Syntax(error.to_string())))
    }

    fn kind(&self) -> Result<String, FrameError> {
        self.kind
            .and_then(|kind| serde_json::from_str::<String>(kind.get()).ok())
            .ok_or_else(|| FrameError::UnknownType("(none)".into()))
    }
}

impl Op {
    /// The op's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::GetCheckpoint { .. } => "get_checkpoint",
            Op::PutCheckpoint { .. } => "put_checkpoint",
            Op::Changes { .. } => "changes",
            Op::RevsDiff { .. } => "revs_diff",
            Op::BulkGet { .. } => "bulk_get",
            Op::BulkDocs { .. } => "bulk_docs",
        }
    }

    fn decode(name: &str, text: &[u8]) -> Result<Op, FrameError> {
        #[derive(Deserialize)]
        struct CheckpointId {
            checkpoint_id: String,
        }
        #[derive(Deserialize)]
        struct PutCheckpoint {
            checkpoint_id: String,
            checkpoint: Checkpoint,
        }
        #[derive(Deserialize)]
        struct Changes {
            #[serde(default)]
            since: u64,
            #[serde(default)]
            limit: Option<u64>,
            #[serde(default)]
            doc_ids: Option<Vec<String>>,
            #[serde(default)]
            selector: Option<Value>,
        }
        #[derive(Deserialize)]
        struct RevsDiff {
            revs: BTreeMap<String, Vec<Rev>>,
        }
        #[derive(Deserialize)]
        struct BulkGet {
            docs: Vec<RevRef>,
            #[serde(default)]
            max_bytes: Option<u64>,
        }
        #[derive(Deserialize)]
        struct BulkDocs {
            docs: Vec<RawJson>,
        }
        Ok(match name {
            "get_checkpoint" => {
                let CheckpointId { checkpoint_id } = members(name, text)?;
                Op::GetCheckpoint { checkpoint_id }
            }
            "put_checkpoint" => {
                let PutCheckpoint {
                    checkpoint_id,
                    checkpoint,
                } = members(name, text)?;
                Op::PutCheckpoint {
                    checkpoint_id,
                    checkpoint,
                }
            }
            "changes" => {
                let Changes {
                    since,
                    limit,
                    doc_ids,
                    selector,
                } = members(name, text)?;
                Op::Changes {
                    since,
                    limit,
                    doc_ids,
                    selector,
                }
            }
            "revs_diff" => {
                let RevsDiff { revs } = members(name, text)?;
                Op::RevsDiff { revs }
            }
            "bulk_get" => {
                let BulkGet { docs, max_bytes } = members(name, text)?;
                Op::BulkGet { docs, max_bytes }
            }
            "bulk_docs" => {
                let BulkDocs { docs } = members(name, text)?;
                Op::BulkDocs { docs }
            }
            other => return Err(FrameError::UnknownType(format!("op {other}"))),
        })
    }
}

impl ClientFrame {
    /// Decodes a frame as the server receives it: strict JSON no deeper than `max_depth`,
    /// then the members of its type.
    pub fn decode(text: &[u8], max_depth: usize) -> Result<ClientFrame, FrameError> {
        ClientFrame::decode_within(text, max_depth, usize::MAX)
    }

    /// [`ClientFrame::decode`] of a frame of at most `max_values` JSON values (see
    /// [`crate::json::parse_within`]).
    pub fn decode_within(
        text: &[u8],
        max_depth: usize,
        max_values: usize,
    ) -> Result<ClientFrame, FrameError> {
        check_within(text, max_depth, max_values)?;
        let head = Head::of(text)?;
        Ok(match head.kind()?.as_str() {
            "hello" => ClientFrame::Hello(members("hello", text)?),
            "request" => {
                let id = head
                    .id
                    .and_then(|id| serde_json::from_str::<u64>(id.get()).ok())
                    .ok_or_else(|| FrameError::Members {
                        what: "request".into(),
                        detail: "id must be a non-negative integer".into(),
                    })?;
                let name = head
                    .op
                    .and_then(|op| serde_json::from_str::<String>(op.get()).ok())
                    .unwrap_or_default();
                let op = Op::decode(&name, text).map_err(|error| FrameError::InvalidRequest {
                    id,
                    detail: match error {
                        FrameError::UnknownType(_) => format!("unknown op {name:?}"),
                        other => other.to_string(),
                    },
                })?;
                ClientFrame::Request { id, op }
            }
            "subscribe" => {
                #[derive(Deserialize)]
                struct Subscribe {
                    #[serde(default)]
                    since: u64,
                }
                let Subscribe { since } = members("subscribe", text)?;
                ClientFrame::Subscribe { since }
            }
            "unsubscribe" => ClientFrame::Unsubscribe,
            "ping" => ClientFrame::Ping,
            other => return Err(FrameError::UnknownType(other.to_owned())),
        })
    }

    /// The frame as text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }
}

impl ServerFrame {
    /// Decodes a frame as a client receives it. A response's result stays text, read by
    /// [`result_as`] as the type its op answers with, and the documents in it stay text too.
    pub fn decode(text: &[u8]) -> Result<ServerFrame, FrameError> {
        let head = Head::of(text)?;
        Ok(match head.kind()?.as_str() {
            "welcome" => ServerFrame::Welcome(members("welcome", text)?),
            "response" => {
                #[derive(Deserialize)]
                struct Response {
                    id: u64,
                    #[serde(default)]
                    result: Option<RawJson>,
                    #[serde(default)]
                    error: Option<WireError>,
                }
                let Response { id, result, error } = members("response", text)?;
                ServerFrame::Response { id, result, error }
            }
            "changed" => {
                #[derive(Deserialize)]
                struct Changed {
                    seq: u64,
                }
                let Changed { seq } = members("changed", text)?;
                ServerFrame::Changed { seq }
            }
            "pong" => ServerFrame::Pong,
            "error" => ServerFrame::Error(members("error", text)?),
            other => return Err(FrameError::UnknownType(other.to_owned())),
        })
    }

    /// The frame as text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }
}

/// A request's result as the type its op answers with.
pub fn result_as<T: DeserializeOwned>(what: &str, result: &RawJson) -> Result<T, FrameError> {
    serde_json::from_str(result.get()).map_err(|error| FrameError::Members {
        what: format!("{what} result"),
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &ClientFrame) {
        let text = frame.encode();
        assert_eq!(
            &ClientFrame::decode(text.as_bytes(), 64).unwrap(),
            frame,
            "{text}"
        );
    }

    #[test]
    fn every_client_frame_survives_encoding_and_decoding() {
        let rev: Rev = "1-abc".parse().unwrap();
        round_trip(&ClientFrame::Hello(Hello {
            versions: VERSIONS.to_vec(),
            db: "notes".into(),
            create: true,
            replica_id: "r".into(),
            auth: Some(HelloAuth {
                reconnect_token: Some("fr_x".into()),
                ..HelloAuth::default()
            }),
        }));
        for op in [
            Op::GetCheckpoint {
                checkpoint_id: "c".into(),
            },
            Op::Changes {
                since: 4,
                limit: Some(10),
                doc_ids: None,
                selector: Some(serde_json::json!({"a": 1})),
            },
            Op::RevsDiff {
                revs: BTreeMap::from([("a".to_owned(), vec![rev.clone()])]),
            },
            Op::BulkGet {
                max_bytes: Some(4096),
                docs: vec![RevRef {
                    id: "a".into(),
                    rev: rev.clone(),
                }],
            },
            Op::BulkDocs {
                docs: vec![RawJson::of(
                    &serde_json::json!({"_id": "a", "_rev": "1-abc"}),
                )],
            },
        ] {
            round_trip(&ClientFrame::Request { id: 3, op });
        }
        round_trip(&ClientFrame::Subscribe { since: 9 });
        round_trip(&ClientFrame::Unsubscribe);
        round_trip(&ClientFrame::Ping);
    }

    #[test]
    fn frames_that_are_not_the_protocol_are_refused_with_what_is_wrong() {
        let decode = |text: &str| ClientFrame::decode(text.as_bytes(), 64).unwrap_err();
        assert!(matches!(decode("[1]"), FrameError::UnknownType(_)));
        assert!(matches!(
            decode(r#"{"type":"hello","type":"ping"}"#),
            FrameError::Json(_)
        ));
        assert!(matches!(
            decode(r#"{"type":"gossip"}"#),
            FrameError::UnknownType(_)
        ));
        assert!(matches!(
            decode(r#"{"type":"request","id":-1,"op":"changes"}"#),
            FrameError::Members { .. }
        ));
        assert_eq!(
            decode(r#"{"type":"request","id":1,"op":"frobnicate"}"#),
            FrameError::InvalidRequest {
                id: 1,
                detail: "unknown op \"frobnicate\"".into()
            }
        );
        assert!(matches!(
            decode(r#"{"type":"request","id":2,"op":"revs_diff","revs":{"a":["nope"]}}"#),
            FrameError::InvalidRequest { id: 2, .. }
        ));
        assert!(matches!(
            decode(r#"{"type":"hello"}"#),
            FrameError::Members { .. }
        ));
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let auth = HelloAuth {
            name: Some("ann".into()),
            password: Some("secret".into()),
            ..HelloAuth::default()
        };
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("ann") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
