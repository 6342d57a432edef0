//! Both transports over TLS against a real server that terminates TLS itself
//! (`ServerConfig::tls`), with certificates made here by a private authority: trusted through
//! `TlsOptions`, and every way TLS fails typed, clear and not transient.

use ferry_test_support::TestServer;
use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_store::sqlite::SqliteBackend;
use ferry_store::{Backend, Database, Edit, StoreConfig};
use ferry_sync::{
    HttpPeer, LocalPeer, Peer, ReplicationOptions, SyncError, TlsOptions, TlsProblem, WsPeer,
    replicate,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;

/// A private certificate authority.
struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Authority {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names`, valid from `not_before` to `not_after` (years).
    fn issue(&self, names: &[&str], years: (i32, i32)) -> ferry_server::TlsConfig {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        ferry_server::TlsConfig::from_pem(
            certificate.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .unwrap()
    }
}

const VALID: (i32, i32) = (2020, 2100);

/// A server on loopback (authentication off: TLS is under test here), over TLS when `tls` is
/// given, and its base URL (`https://` or `http://`).
fn start_server(tls: Option<ferry_server::TlsConfig>) -> (String, TestServer) {
    let server = TestServer::without_auth(ferry_server::ServerConfig {
        tls,
        ..ferry_server::ServerConfig::default()
    });
    (server.base_url(), server)
}

struct Replicas {
    _dir: tempfile::TempDir,
    backend: SqliteBackend,
}

impl Replicas {
    fn new() -> Replicas {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open(dir.path(), StoreConfig::default()).unwrap();
        Replicas { _dir: dir, backend }
    }

    fn create(&self, name: &str) -> Arc<dyn Database> {
        self.backend.create_database(name).unwrap()
    }
}

fn put(db: &dyn Database, doc_id: &str) {
    let body = json!({"title": doc_id}).as_object().unwrap().clone();
    db.write_edits(vec![Edit::put(doc_id, None, body)])
        .unwrap()
        .remove(0)
        .unwrap();
}

fn ids(db: &dyn Database) -> BTreeMap<String, ()> {
    db.changes(0, 1000, false)
        .unwrap()
        .into_iter()
        .map(|change| (change.doc_id, ()))
        .collect()
}

fn create() -> ReplicationOptions {
    ReplicationOptions {
        create_target: true,
        ..ReplicationOptions::default()
    }
}

/// Replicates `db` to `remote`, returning the error.
async fn push_error(db: &Arc<dyn Database>, remote: &impl Peer) -> SyncError {
    let local = LocalPeer::new(db.clone()).unwrap();
    replicate(&local, remote, &create(), |_| {})
        .await
        .unwrap_err()
}

#[tokio::test]
async fn both_transports_reach_a_tls_server_whose_authority_is_trusted() {
    let authority = Authority::new("Ferry test CA");
    let (url, _server) = start_server(Some(authority.issue(&["127.0.0.1", "localhost"], VALID)));
    let trusted = TlsOptions::trusting_ca_pem(authority.pem.as_bytes());
    let replicas = Replicas::new();
    let (a, b) = (replicas.create("a"), replicas.create("b"));
    put(&*a, "todos:1");
    put(&*a, "todos:2");

    // a pushes over HTTPS, b pulls over a WSS session.
    let db_url = format!("{url}/secure");
    let https = HttpPeer::new(&db_url).unwrap().with_tls(&trusted).unwrap();
    let a_local = LocalPeer::new(a.clone()).unwrap();
    let pushed = replicate(&a_local, &https, &create(), |_| {})
        .await
        .unwrap();
    assert_eq!(pushed.docs_written, 2);
    let wss = WsPeer::new(&db_url, "b")
        .unwrap()
        .with_tls(&trusted)
        .unwrap();
    let b_local = LocalPeer::new(b.clone()).unwrap();
    let pulled = replicate(&wss, &b_local, &create(), |_| {}).await.unwrap();
    assert_eq!(pulled.docs_written, 2);
    assert_eq!(ids(&*a), ids(&*b));

    // A wss:// database URL names the same database as its https:// URL (same checkpoints),
    // and b's edit goes back over it.
    let direct = format!("{}/secure", url.replace("https://", "wss://"));
    let wss = WsPeer::new(&direct, "b")
        .unwrap()
        .with_tls(&trusted)
        .unwrap();
    assert_eq!(wss.describe(), https.describe());
    put(&*b, "todos:3");
    replicate(&b_local, &wss, &create(), |_| {}).await.unwrap();
    replicate(&https, &a_local, &create(), |_| {})
        .await
        .unwrap();
    assert_eq!(ids(&*a), ids(&*b));
    assert_eq!(ids(&*a).len(), 3);
}

/// The problem of a TLS error, after checking it is one and is not retried.
fn problem(error: &SyncError) -> TlsProblem {
    assert!(!error.is_transient(), "{error}");
    match error {
        SyncError::Tls { problem, .. } => problem.clone(),
        other => panic!("not a TLS error: {other:?}"),
    }
}

#[tokio::test]
async fn a_certificate_nobody_vouches_for_is_reported_as_untrusted_on_both_transports() {
    let authority = Authority::new("Ferry test CA");
    let (url, _server) = start_server(Some(authority.issue(&["127.0.0.1"], VALID)));
    let db_url = format!("{url}/secure");
    let replicas = Replicas::new();
    let a = replicas.create("a");
    put(&*a, "todos:1");
    let stranger = TlsOptions::trusting_ca_pem(Authority::new("Another CA").pem.as_bytes());

    for tls in [TlsOptions::default(), stranger] {
        let https = HttpPeer::new(&db_url).unwrap().with_tls(&tls).unwrap();
        let error = push_error(&a, &https).await;
        assert!(
            matches!(problem(&error), TlsProblem::UntrustedCertificate { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not trusted"), "{error}");
        let wss = WsPeer::new(&db_url, "a").unwrap().with_tls(&tls).unwrap();
        let error = push_error(&a, &wss).await;
        assert!(
            matches!(problem(&error), TlsProblem::UntrustedCertificate { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not trusted"), "{error}");
    }
}

#[tokio::test]
async fn wrong_names_expired_or_ca_certificates_and_plain_servers_are_told_apart() {
    let authority = Authority::new("Ferry test CA");
    let trusted = TlsOptions::trusting_ca_pem(authority.pem.as_bytes());
    let replicas = Replicas::new();
    let a = replicas.create("a");
    put(&*a, "todos:1");

    // A certificate for another address than the one connected to.
    let (url, _server) = start_server(Some(authority.issue(&["127.0.0.2"], VALID)));
    let https = HttpPeer::new(&format!("{url}/db"))
        .unwrap()
        .with_tls(&trusted)
        .unwrap();
    let error = push_error(&a, &https).await;
    assert!(
        matches!(problem(&error), TlsProblem::WrongHostName { .. }),
        "{error}"
    );

    // An expired certificate.
    let (url, _server) = start_server(Some(authority.issue(&["127.0.0.1"], (2001, 2002))));
    let wss = WsPeer::new(&format!("{url}/db"), "a")
        .unwrap()
        .with_tls(&trusted)
        .unwrap();
    let error = push_error(&a, &wss).await;
    assert!(
        matches!(problem(&error), TlsProblem::Expired { .. }),
        "{error}"
    );

    // A certificate authority's certificate (CA:TRUE, as `openssl req -x509` makes) served as
    // the server's own, trusted.
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    let tls = ferry_server::TlsConfig::from_pem(
        certificate.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let (url, _server) = start_server(Some(tls));
    let https = HttpPeer::new(&format!("{url}/db"))
        .unwrap()
        .with_tls(&TlsOptions::trusting_ca_pem(certificate.pem()))
        .unwrap();
    let error = push_error(&a, &https).await;
    assert!(
        matches!(
            problem(&error),
            TlsProblem::CaCertificateAsServerCertificate { .. }
        ),
        "{error}"
    );

    // https:// to a server speaking plain HTTP.
    let (plain, _server) = start_server(None);
    let https = HttpPeer::new(&format!("{}/db", plain.replace("http://", "https://"))).unwrap();
    let error = push_error(&a, &https).await;
    assert!(
        matches!(problem(&error), TlsProblem::NotTls { .. }),
        "{error}"
    );

    // http:// to a TLS server: it answers plainly that it wants TLS.
    let (url, _server) = start_server(Some(authority.issue(&["127.0.0.1"], VALID)));
    let http = HttpPeer::new(&format!("{}/db", url.replace("https://", "http://"))).unwrap();
    let error = push_error(&a, &http).await;
    assert!(
        matches!(&error, SyncError::Http { status: 400, reason, .. } if reason.contains("https://")),
        "{error}"
    );
}

#[test]
fn unusable_ca_certificates_are_refused_when_the_peer_is_built() {
    for pem in [&b"not a certificate"[..], b""] {
        let tls = TlsOptions::trusting_ca_pem(pem);
        let error = HttpPeer::new("https://127.0.0.1:1/db")
            .unwrap()
            .with_tls(&tls)
            .err()
            .expect("refused");
        assert!(matches!(error, SyncError::InvalidTlsOptions(_)), "{error}");
        let error = WsPeer::new("https://127.0.0.1:1/db", "a")
            .unwrap()
            .with_tls(&tls)
            .err()
            .expect("refused");
        assert!(matches!(error, SyncError::InvalidTlsOptions(_)), "{error}");
    }
    let missing = TlsOptions::trusting_ca_file("/nonexistent/ca.pem").expect_err("refused");
    assert!(
        missing.to_string().contains("/nonexistent/ca.pem"),
        "{missing}"
    );
}
