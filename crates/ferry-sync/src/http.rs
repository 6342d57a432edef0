//! A peer on a server, over the CouchDB replication protocol (a Ferry server, CouchDB, or
//! pouchdb-server).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_core::couch::{
    BulkDocsRequest, BulkDocsRow, BulkGetAnswer, BulkGetItem, BulkGetRequest, ChangesAnswer,
    ChangesFilterBody, ChangesRow, RevsDiffAnswer, revision_from_text, revision_text,
};
use ferry_core::json::PARSER_HARD_DEPTH_LIMIT;
use ferry_core::model::Revision;
use ferry_core::replicate::{Checkpoint, Seq};
use ferry_core::rev::Rev;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::tls::{TlsOptions, default_client_config, tls_problem};
use crate::{
    ChangesFilter, ChangesPage, FETCH_ANSWER_BYTES, Peer, RejectedRevision, ServerTime, SyncError,
};

/// Requests other than waits for changes give up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A replication peer on a server database, such as `http://127.0.0.1:5984/notes`.
///
/// Credentials in the URL (`http://user:password@host/db`) are sent with HTTP basic
/// authentication and never appear in [`Peer::describe`], errors or logs. An `https://` URL
/// is reached over TLS, trusting the web's certificate authorities and any added with
/// [`HttpPeer::with_tls`].
#[derive(Clone)]
pub struct HttpPeer {
    client: reqwest::Client,
    /// The database URL without credentials, ending in `/`.
    base: Url,
    credentials: Option<(String, String)>,
    send_ferry_meta: bool,
    /// The server's clock, from the `Date` of its latest answer (to the second).
    server_time: Arc<ServerTime>,
    /// The request limit the server told (`MAX_REQUEST_BYTES_HEADER`); 0 until it does.
    max_request_bytes: Arc<AtomicUsize>,
}

/// An answer's body as JSON (`null` when empty: longpoll answers may start with heartbeat
/// newlines, which JSON allows as whitespace).
fn json_of(url: &Url, bytes: &[u8]) -> Result<Value, SyncError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|error| SyncError::InvalidResponse {
        url: url.to_string(),
        detail: format!("not JSON ({error})"),
    })
}

impl HttpPeer {
    /// A peer on the database at `url`.
    pub fn new(url: &str) -> Result<HttpPeer, SyncError> {
        let mut base = Url::parse(url).map_err(|_| SyncError::InvalidUrl(url.to_owned()))?;
        if !matches!(base.scheme(), "http" | "https")
            || base.host_str().is_none()
            || base.path().trim_matches('/').is_empty()
        {
            return Err(SyncError::InvalidUrl(url.to_owned()));
        }
        let credentials = crate::take_url_credentials(&mut base);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = http_client(&base, default_client_config())?;
        Ok(HttpPeer {
            client,
            base,
            credentials,
            send_ferry_meta: true,
            server_time: Arc::default(),
            max_request_bytes: Arc::default(),
        })
    }

    /// Trusts the certificates `tls` names, in addition to the web's authorities, when the
    /// URL is `https://` (a server with a self-signed certificate or a private authority).
    pub fn with_tls(mut self, tls: &TlsOptions) -> Result<HttpPeer, SyncError> {
        self.client = http_client(&self.base, tls.client_config()?)?;
        Ok(self)
    }

    /// Whether to exchange Ferry's revision clocks (`_ferry`) with the server. On by default;
    /// turn it off for servers that refuse unknown `_` members (CouchDB, pouchdb-server).
    pub fn with_ferry_meta(mut self, enabled: bool) -> HttpPeer {
        self.send_ferry_meta = enabled;
        self
    }

    fn url(&self, path: &str) -> Url {
        // Paths here are fixed endpoint names or percent-encoded ids; join cannot fail.
        self.base.join(path).expect("valid relative path")
    }

    async fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), SyncError> {
        let (status, bytes) = self
            .request_text(method, url.clone(), body, timeout)
            .await?;
        Ok((status, json_of(&url, &bytes)?))
    }

    /// One request, its answer's status and body as they came.
    async fn request_text<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>), SyncError> {
        let mut request = self
            .client
            .request(method, url.clone())
            .timeout(timeout)
            .header("accept", "application/json");
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |error| transport_error(&url, error);
        let response = request.send().await.map_err(transport)?;
        if let Some(date) = response.headers().get(reqwest::header::DATE)
            && let Some(server_ms) = date
                .to_str()
                .ok()
                .and_then(|date| httpdate::parse_http_date(date).ok())
                .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        {
            self.server_time
                .record(u64::try_from(server_ms.as_millis()).unwrap_or(u64::MAX));
        }
        if let Some(limit) = response
            .headers()
            .get(ferry_core::protocol::MAX_REQUEST_BYTES_HEADER)
            .and_then(|value| value.to_str().ok()?.parse::<usize>().ok())
        {
            self.max_request_bytes.store(limit, Ordering::SeqCst);
        }
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?;
        Ok((status, bytes.into()))
    }

    /// A request whose successful answer is read as `T` straight from its text.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, SyncError> {
        let url = self.url(path);
        let (status, bytes) = self
            .request_text(method, url.clone(), body, REQUEST_TIMEOUT)
            .await?;
        if !status.is_success() {
            return Err(http_error(&url, status, &json_of(&url, &bytes)?));
        }
        serde_json::from_slice(&bytes).map_err(|error| self.invalid(path, error.to_string()))
    }

    fn invalid(&self, path: &str, detail: impl Into<String>) -> SyncError {
        SyncError::InvalidResponse {
            url: self.url(path).to_string(),
            detail: detail.into(),
        }
    }

    /// One `_bulk_docs` request with `new_edits=false`: the revisions the server refused.
    async fn write_batch(
        &self,
        revisions: &[Revision],
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        let request = BulkDocsRequest {
            new_edits: false,
            docs: revisions
                .iter()
                .map(|revision| revision_text(revision, self.send_ferry_meta))
                .collect(),
        };
        // With new_edits=false a server answers [] or only the documents it refused (as
        // CouchDB's replicator, count them as failures and go on).
        let rows: Vec<BulkDocsRow> = self
            .call(Method::POST, "_bulk_docs", Some(&request))
            .await?;
        let rejected = rows
            .into_iter()
            .filter(|row| row.error.is_some())
            .map(|row| {
                let doc_id = row.id;
                let rev = row
                    .rev
                    .as_deref()
                    .and_then(|rev| rev.parse().ok())
                    .or_else(|| {
                        revisions
                            .iter()
                            .find(|revision| revision.doc_id == doc_id)
                            .map(|revision| revision.rev().clone())
                    })
                    .ok_or_else(|| SyncError::InvalidResponse {
                        url: self.url("_bulk_docs").to_string(),
                        detail: format!("a refusal of an unknown document {doc_id:?}"),
                    })?;
                Ok(RejectedRevision {
                    doc_id,
                    rev,
                    error: row.error.unwrap_or_default(),
                    reason: row.reason.unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, SyncError>>()?;
        Ok(rejected)
    }
}

fn http_client(
    base: &Url,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<reqwest::Client, SyncError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .build()
        .map_err(|error| transport_error(base, error))
}

/// A failed request: a TLS problem when TLS is what failed (retrying cannot help), a
/// transport error (transient) otherwise.
fn transport_error(url: &Url, error: reqwest::Error) -> SyncError {
    match tls_problem(&error) {
        Some(problem) => SyncError::Tls {
            url: url.to_string(),
            problem,
        },
        None => SyncError::Transport {
            url: url.to_string(),
            source: Box::new(error),
        },
    }
}

fn http_error(url: &Url, status: StatusCode, body: &Value) -> SyncError {
    SyncError::Http {
        url: url.to_string(),
        status: status.as_u16(),
        error: body["error"].as_str().unwrap_or("unknown").to_owned(),
        reason: body["reason"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Percent-encodes a document id for a URL path segment.
fn encode_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A sequence as a query parameter: numbers and strings as they are, anything else as JSON.
fn local_path(replication_id: &str) -> String {
    format!("_local/{}", encode_segment(replication_id))
}

impl Peer for HttpPeer {
    fn describe(&self) -> String {
        self.base.to_string()
    }

    fn max_request_bytes(&self) -> Option<usize> {
        match self.max_request_bytes.load(Ordering::SeqCst) {
            0 => None,
            bytes => Some(bytes),
        }
    }

    fn server_time_ms(&self) -> Option<u64> {
        self.server_time.now_ms()
    }

    async fn prepare(&self, create: bool) -> Result<(), SyncError> {
        let url = self.url("");
        let (status, body) = self
            .request(Method::GET, url.clone(), None, REQUEST_TIMEOUT)
            .await?;
        match status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND if create => {
                let (status, body) = self
                    .request(Method::PUT, url.clone(), None, REQUEST_TIMEOUT)
                    .await?;
                // 412: created meanwhile by someone else, which is just as good.
                if status.is_success() || status == StatusCode::PRECONDITION_FAILED {
                    Ok(())
                } else {
                    Err(http_error(&url, status, &body))
                }
            }
            status => Err(http_error(&url, status, &body)),
        }
    }

    async fn get_checkpoint(&self, replication_id: &str) -> Result<Option<Checkpoint>, SyncError> {
        let url = self.url(&local_path(replication_id));
        let (status, body) = self
            .request(Method::GET, url.clone(), None, REQUEST_TIMEOUT)
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            // A checkpoint in another format (another replicator's) means starting over.
            status if status.is_success() => Ok(serde_json::from_value(body).ok()),
            status => Err(http_error(&url, status, &body)),
        }
    }

    async fn put_checkpoint(
        &self,
        replication_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), SyncError> {
        let path = local_path(replication_id);
        let url = self.url(&path);
        // Two attempts: a 409 means the stored revision moved; read it again and retry once.
        for attempt in 0..2 {
            let (status, current) = self
                .request(Method::GET, url.clone(), None, REQUEST_TIMEOUT)
                .await?;
            let mut body = serde_json::to_value(checkpoint).expect("checkpoints serialize");
            if status.is_success()
                && let Some(rev) = current.get("_rev")
            {
                body["_rev"] = rev.clone();
            }
            let (status, answer) = self
                .request(Method::PUT, url.clone(), Some(&body), REQUEST_TIMEOUT)
                .await?;
            if status.is_success() {
                return Ok(());
            }
            if status != StatusCode::CONFLICT || attempt == 1 {
                return Err(http_error(&url, status, &answer));
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    async fn changes(
        &self,
        since: &Seq,
        limit: usize,
        filter: &ChangesFilter,
    ) -> Result<ChangesPage, SyncError> {
        let mut path = format!(
            "_changes?style=all_docs&since={}&limit={limit}",
            encode_segment(&since.to_string())
        );
        let mut body = ChangesFilterBody::default();
        if let Some(doc_ids) = filter.ids() {
            path.push_str("&filter=_doc_ids");
            body.doc_ids = Some(doc_ids.iter().cloned().collect());
        } else if let Some(selector) = filter.selector_json() {
            path.push_str("&filter=_selector");
            body.selector = Some(selector.clone());
        }
        let answer: ChangesAnswer = if body == ChangesFilterBody::default() {
            self.call(Method::GET, &path, None::<&()>).await?
        } else {
            self.call(Method::POST, &path, Some(&body)).await?
        };
        let last_seq = match answer.last_seq {
            Some(last_seq) => last_seq,
            None => answer
                .results
                .last()
                .map_or_else(|| since.clone(), |row| row.seq.clone()),
        };
        Ok(ChangesPage {
            rows: answer
                .results
                .into_iter()
                .map(ChangesRow::into_change_row)
                .collect(),
            last_seq,
            pending: answer.pending,
        })
    }

    async fn revs_diff(
        &self,
        revs: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<(String, Vec<Rev>)>, SyncError> {
        let asked: BTreeMap<String, Vec<Rev>> = revs.into_iter().collect();
        let answers: BTreeMap<String, RevsDiffAnswer> =
            self.call(Method::POST, "_revs_diff", Some(&asked)).await?;
        Ok(answers
            .into_iter()
            .map(|(doc_id, answer)| (doc_id, answer.missing))
            .collect())
    }

    async fn fetch_revisions(
        &self,
        wanted: Vec<(String, Vec<Rev>)>,
    ) -> Result<Vec<Revision>, SyncError> {
        // A Ferry server answers up to `max_bytes` and lists the rest as `unserved`, asked for
        // again; CouchDB ignores the parameter and answers everything at once.
        let path = if self.send_ferry_meta {
            format!("_bulk_get?revs=true&ferry=true&max_bytes={FETCH_ANSWER_BYTES}")
        } else {
            "_bulk_get?revs=true".to_owned()
        };
        let mut request = BulkGetRequest {
            docs: wanted
                .into_iter()
                .flat_map(|(id, revs)| {
                    revs.into_iter().map(move |rev| BulkGetItem {
                        id: id.clone(),
                        rev: Some(rev),
                    })
                })
                .collect(),
        };
        let mut revisions = Vec::with_capacity(request.docs.len());
        while !request.docs.is_empty() {
            let asked = request.docs.len();
            let answer: BulkGetAnswer = self.call(Method::POST, &path, Some(&request)).await?;
            for doc in answer.results.into_iter().flat_map(|result| result.docs) {
                match (doc.ok, doc.error) {
                    (Some(ok), _) => {
                        let revision = revision_from_text(&ok, PARSER_HARD_DEPTH_LIMIT)
                            .map_err(|error| self.invalid(&path, error.to_string()))?;
                        revisions.push(revision);
                    }
                    (None, error) => {
                        tracing::warn!(?error, "revision not available on the server; skipped");
                    }
                }
            }
            request.docs = answer.unserved;
            // Each answer serves at least one revision, so this ends.
            if request.docs.len() >= asked {
                return Err(
                    self.invalid(&path, "the server answered none of the revisions asked for")
                );
            }
        }
        Ok(revisions)
    }

    async fn write_revisions(
        &self,
        revisions: Vec<Revision>,
    ) -> Result<Vec<RejectedRevision>, SyncError> {
        // A server whose request limit is below this batch answers 413 for all of it: the
        // batch is written in halves until each fits, and a revision that is too large on its
        // own is refused alone, so the rest still goes.
        let mut batches = vec![revisions];
        let mut rejected = Vec::new();
        while let Some(mut batch) = batches.pop() {
            match self.write_batch(&batch).await {
                Ok(mut refused) => rejected.append(&mut refused),
                Err(SyncError::Http {
                    status: 413,
                    error,
                    reason,
                    ..
                }) if !batch.is_empty() => {
                    if batch.len() == 1 {
                        let revision = &batch[0];
                        rejected.push(RejectedRevision {
                            doc_id: revision.doc_id.clone(),
                            rev: revision.rev().clone(),
                            error,
                            reason,
                        });
                    } else {
                        let second = batch.split_off(batch.len() / 2);
                        batches.push(second);
                        batches.push(batch);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(rejected)
    }

    async fn wait_for_changes(&self, since: &Seq, timeout: Duration) -> Result<bool, SyncError> {
        let path = format!(
            "_changes?feed=longpoll&limit=1&heartbeat=10000&since={}&timeout={}",
            encode_segment(&since.to_string()),
            timeout.as_millis()
        );
        let url = self.url(&path);
        let (status, response) = self
            .request(Method::GET, url.clone(), None, timeout + REQUEST_TIMEOUT)
            .await?;
        if !status.is_success() {
            return Err(http_error(&url, status, &response));
        }
        // An answer that is not a changes answer (an empty body) says nothing: read again.
        let Ok(answer) = serde_json::from_value::<ChangesAnswer>(response) else {
            return Ok(true);
        };
        Ok(!answer.results.is_empty() || answer.last_seq.as_ref() != Some(since))
    }
}
