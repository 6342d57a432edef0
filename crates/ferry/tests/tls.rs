//! TLS end to end: a real `ferry serve --tls-cert --tls-key` process with a self-signed
//! certificate made here, the CLI syncing over `https://` (with and without `--ca-file`), the
//! SDK syncing over `wss://`, plain HTTP at the TLS port, a client that never starts its
//! handshake, and the server refusing certificates it cannot serve.

mod support;
use support::serve_refused;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_client::{ClientError, ConnectionState, Credentials, Ferry, SyncOptions};
use ferry_sync::{SyncError, TlsProblem};
use serde_json::{Value, json};
use support::{ServerProcess, TEST_PASSWORD, TEST_USER, ferry, ferry_bin, ferry_json};

/// A self-signed certificate for the loopback address, in PEM files.
struct Certificate {
    dir: tempfile::TempDir,
}

impl Certificate {
    fn new() -> Certificate {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let made = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.path().join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), made.signing_key.serialize_pem()).unwrap();
        Certificate { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    fn cert_arg(&self) -> String {
        self.cert().to_str().unwrap().to_owned()
    }
}

/// `ferry serve` over TLS with `certificate`.
fn tls_server(certificate: &Certificate, extra: &[&str]) -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (certificate.cert(), certificate.key());
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = ServerProcess::start(dir.path(), &args);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    (dir, server)
}

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the `ferry` CLI with `--json` and `FERRY_CA_FILE` set, asserts success, parses stdout.
fn ferry_json_with_ca_env(ca_file: &Path, args: &[&str]) -> Value {
    let output = Command::new(ferry_bin())
        .arg("--json")
        .args(args)
        .env("FERRY_CA_FILE", ca_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn cli_replicas_push_and_pull_over_https_with_the_ca_file() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let work = tempfile::tempdir().unwrap();
    let (alice, bob) = (path(&work, "alice.ferry"), path(&work, "bob.ferry"));
    let url = format!("{}/groceries", server.url);
    let ca = certificate.cert_arg();
    ferry_json(&["init", &alice]);
    ferry_json(&["init", &bob]);
    ferry_json(&["put", &alice, "todos", "milk", "-d", r#"{"title": "milk"}"#]);

    let pushed = ferry_json(&["sync", &alice, &url, "--ca-file", &ca]);
    assert_eq!(pushed["push"]["docs_written"], json!(1), "{pushed}");
    // The same option from the environment.
    let pulled = ferry_json_with_ca_env(&certificate.cert(), &["sync", &bob, &url]);
    assert_eq!(pulled["pull"]["docs_written"], json!(1), "{pulled}");
    assert_eq!(
        ferry_json(&["get", &bob, "todos", "milk"])["title"],
        json!("milk")
    );

    // And back: bob's edit reaches alice through the server.
    ferry_json(&[
        "put",
        &bob,
        "todos",
        "milk",
        "-d",
        r#"{"title": "oat milk"}"#,
    ]);
    ferry_json(&["sync", &bob, &url, "--ca-file", &ca]);
    let pulled = ferry_json(&["sync", &alice, &url, "--ca-file", &ca]);
    assert_eq!(pulled["pull"]["docs_written"], json!(1), "{pulled}");
    assert_eq!(
        ferry_json(&["get", &alice, "todos", "milk"])["title"],
        json!("oat milk")
    );
}

#[test]
fn without_the_ca_file_the_cli_stops_at_once_saying_the_certificate_is_not_trusted() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let work = tempfile::tempdir().unwrap();
    let alice = path(&work, "alice.ferry");
    let url = format!("{}/groceries", server.url);
    ferry_json(&["init", &alice]);
    ferry_json(&["put", &alice, "todos", "milk", "-d", r#"{"title": "milk"}"#]);

    let output = ferry(&["sync", &alice, &url]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("not trusted"), "{message}");
    assert!(message.contains("--ca-file"), "{message}");

    // A live sync retries transient errors forever; this one is not transient, so it ends.
    let mut live = Command::new(ferry_bin())
        .args(["sync", "--live", &alice, &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = live.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = live.kill();
            panic!("ferry sync --live kept retrying an untrusted certificate");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut message = String::new();
    live.stderr
        .take()
        .unwrap()
        .read_to_string(&mut message)
        .unwrap();
    assert!(message.contains("not trusted"), "{message}");

    // Nothing went through.
    let ok = ferry_json(&["sync", &alice, &url, "--ca-file", &certificate.cert_arg()]);
    assert_eq!(ok["push"]["docs_written"], json!(1), "{ok}");
}

fn sdk_options(server: &ServerProcess, db: &str) -> SyncOptions {
    SyncOptions::new(format!("{}/{db}", server.bare_url))
        .credentials(Credentials::password(TEST_USER, TEST_PASSWORD))
}

fn titles(ferry: &Ferry) -> Vec<String> {
    let mut titles: Vec<String> = ferry
        .collection::<Value>("todos")
        .query()
        .run()
        .unwrap()
        .into_iter()
        .map(|doc| doc.value["title"].as_str().unwrap().to_owned())
        .collect();
    titles.sort();
    titles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_replicas_sync_over_wss_trusting_the_ca_file() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let dir = tempfile::tempdir().unwrap();
    let a = Ferry::initialize_offline(dir.path().join("a.ferry"), TEST_USER).unwrap();
    let b = Ferry::initialize_offline(dir.path().join("b.ferry"), TEST_USER).unwrap();
    let options = sdk_options(&server, "sdk").trust_ca_file(certificate.cert());
    let _sync_a = a.start_sync(options.clone()).unwrap();
    let _sync_b = b.start_sync(options).unwrap();

    a.collection::<Value>("todos")
        .insert_with_id("milk", &json!({"title": "milk"}))
        .unwrap();
    support::eventually(Duration::from_secs(30), "a's write to reach b", || {
        titles(&b) == ["milk"]
    })
    .await;
    b.collection::<Value>("todos")
        .insert_with_id("eggs", &json!({"title": "eggs"}))
        .unwrap();
    support::eventually(Duration::from_secs(30), "b's write to reach a", || {
        titles(&a) == ["eggs", "milk"]
    })
    .await;
    assert!(
        a.wait_for_acknowledgement(Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert_eq!(a.connection_state(), ConnectionState::Connected);
    assert_eq!(b.connection_state(), ConnectionState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_says_when_the_certificate_is_not_trusted_and_keeps_the_outbox() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let dir = tempfile::tempdir().unwrap();
    let a = Ferry::initialize_offline(dir.path().join("a.ferry"), TEST_USER).unwrap();
    a.collection::<Value>("todos")
        .insert_with_id("milk", &json!({"title": "milk"}))
        .unwrap();

    let error = a
        .sync_once(&sdk_options(&server, "sdk"))
        .await
        .expect_err("an untrusted certificate");
    assert!(
        matches!(
            &error,
            ClientError::Sync(SyncError::Tls {
                problem: TlsProblem::UntrustedCertificate { .. },
                ..
            })
        ),
        "{error:?}"
    );

    let _sync = a.start_sync(sdk_options(&server, "sdk")).unwrap();
    support::eventually(
        Duration::from_secs(30),
        "a connection state saying why",
        || {
            matches!(
                a.connection_state(),
                ConnectionState::Disconnected { reason } if reason.contains("not trusted")
            )
        },
    )
    .await;
    assert_eq!(a.status().unwrap().pending, 1);

    // A CA file that holds no certificate fails at once, not in the background.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let b = Ferry::initialize_offline(dir.path().join("b.ferry"), TEST_USER).unwrap();
    let error = b
        .start_sync(sdk_options(&server, "sdk").trust_ca_file(&empty))
        .err()
        .expect("refused");
    assert!(
        matches!(&error, ClientError::Sync(SyncError::InvalidTlsOptions(_))),
        "{error:?}"
    );
}

#[test]
fn the_session_cookie_is_secure_over_tls() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let pem = std::fs::read(certificate.cert()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookie = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        let response = client
            .post(format!("https://{}/_session", server.address))
            .json(&json!({"name": TEST_USER, "password": TEST_PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned()
    });
    for attribute in ["; Secure", "; HttpOnly", "; SameSite=Lax"] {
        assert!(cookie.contains(attribute), "{attribute}: {cookie}");
    }
}

#[test]
fn plain_http_at_the_tls_port_is_refused_clearly_and_the_server_goes_on() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &[]);
    let work = tempfile::tempdir().unwrap();
    let alice = path(&work, "alice.ferry");
    ferry_json(&["init", &alice]);
    ferry_json(&["put", &alice, "todos", "milk", "-d", r#"{"title": "milk"}"#]);

    // A plain HTTP request gets a plain HTTP answer that says what to do.
    let mut plain = TcpStream::connect(&server.address).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://"), "{answer}");

    // So does the CLI given an http:// URL.
    let http = format!(
        "http://{TEST_USER}:{TEST_PASSWORD}@{}/groceries",
        server.address
    );
    let output = ferry(&["sync", &alice, &http]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("https://"), "{}", stderr(&output));

    // Bytes that are neither TLS nor HTTP are dropped.
    let mut garbage = TcpStream::connect(&server.address).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    garbage.write_all(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    assert!(rest.is_empty());

    // The server goes on serving TLS clients.
    let url = format!("{}/groceries", server.url);
    let synced = ferry_json(&["sync", &alice, &url, "--ca-file", &certificate.cert_arg()]);
    assert_eq!(synced["push"]["docs_written"], json!(1), "{synced}");
}

#[test]
fn a_client_that_never_sends_its_client_hello_holds_up_nobody_and_is_dropped() {
    const TIMEOUT_SECS: u64 = 8;
    let certificate = Certificate::new();
    let timeout = TIMEOUT_SECS.to_string();
    let (_server_dir, server) =
        tls_server(&certificate, &["--tls-handshake-timeout", timeout.as_str()]);
    let work = tempfile::tempdir().unwrap();
    let alice = path(&work, "alice.ferry");
    ferry_json(&["init", &alice]);
    ferry_json(&["put", &alice, "todos", "milk", "-d", r#"{"title": "milk"}"#]);

    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    let opened = Instant::now();
    let url = format!("{}/groceries", server.url);
    let synced = ferry_json(&["sync", &alice, &url, "--ca-file", &certificate.cert_arg()]);
    assert_eq!(synced["push"]["docs_written"], json!(1), "{synced}");
    let synced_after = opened.elapsed();

    // Had the sync waited for the silent clients' handshakes to time out, the server would have
    // closed their connections by now.
    for stream in &silent {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let still_open = matches!(
            (&*stream).read(&mut byte),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
        );
        assert!(
            still_open,
            "the sync took {synced_after:?}, past the silent clients' handshake timeout"
        );
    }
    // They are dropped once the handshake timeout has passed.
    for stream in &silent {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(TIMEOUT_SECS + 20)))
            .unwrap();
        let mut byte = [0u8; 1];
        let closed = match (&*stream).read(&mut byte) {
            Ok(read) => read == 0,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "a silent client was not disconnected");
    }
    let dropped_after = opened.elapsed();
    assert!(
        dropped_after >= Duration::from_secs(TIMEOUT_SECS - 1),
        "dropped after {dropped_after:?}, before the handshake timeout"
    );
}

#[test]
fn the_server_refuses_to_start_with_tls_settings_it_cannot_use() {
    let certificate = Certificate::new();
    let (cert, key) = (certificate.cert(), certificate.key());
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());

    let message = serve_refused(&["--tls-cert", cert_arg], &[]);
    assert!(message.contains("--tls-key"), "{message}");
    let message = serve_refused(&[], &[("FERRY_TLS_KEY", &key)]);
    assert!(message.contains("--tls-cert"), "{message}");

    let garbage = certificate.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage_arg = garbage.to_str().unwrap();
    let message = serve_refused(&["--tls-cert", garbage_arg, "--tls-key", key_arg], &[]);
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains(garbage_arg), "{message}");
    let message = serve_refused(&["--tls-cert", cert_arg, "--tls-key", garbage_arg], &[]);
    assert!(message.contains("private key"), "{message}");

    // A key that is not the certificate's.
    let other = Certificate::new();
    let other_key = other.key();
    let message = serve_refused(
        &[
            "--tls-cert",
            cert_arg,
            "--tls-key",
            other_key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(message.contains("cannot be used"), "{message}");

    let missing = serve_refused(
        &["--tls-cert", "/nonexistent.pem", "--tls-key", key_arg],
        &[],
    );
    assert!(missing.contains("/nonexistent.pem"), "{missing}");
}

#[test]
fn a_flood_of_silent_connections_at_the_tls_port_makes_room_for_tls_clients() {
    let certificate = Certificate::new();
    let (_server_dir, server) = tls_server(&certificate, &["--max-connections", "10"]);
    let work = tempfile::tempdir().unwrap();
    let alice = path(&work, "alice.ferry");
    ferry_json(&["init", &alice]);
    ferry_json(&["put", &alice, "todos", "milk", "-d", r#"{"title": "milk"}"#]);
    // Four times the limit, none of them starting its handshake (which lasts 10 s by default).
    let silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&server.address).unwrap())
        .collect();
    let url = format!("{}/groceries", server.url);
    let synced = ferry_json(&["sync", &alice, &url, "--ca-file", &certificate.cert_arg()]);
    assert_eq!(synced["push"]["docs_written"], json!(1), "{synced}");
    let open = silent
        .iter()
        .filter(|stream| {
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            matches!(
                (&**stream).read(&mut byte),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
            )
        })
        .count();
    assert!(
        open <= 10,
        "{open} silent connections open past the limit of 10"
    );
}
