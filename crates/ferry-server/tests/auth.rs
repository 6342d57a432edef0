//! Authentication over HTTP on loopback: basic auth, bearer access tokens from
//! `POST /_ferry/login`, CouchDB's `_session` cookie, what anonymous callers may reach, and who
//! may delete a database.

use std::time::Duration;

use ferry_server::ServerConfig;
use ferry_server::auth::AuthConfig;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};

use ferry_test_support::TestServer;

struct Server {
    url: String,
    client: reqwest::Client,
    server: TestServer,
}

async fn start(auth: AuthConfig) -> Server {
    let config = ServerConfig {
        auth,
        ..ServerConfig::default()
    };
    let users = [
        ("ann", "ann's password", false),
        ("root", "root's password", true),
    ];
    let server = TestServer::start(config, &users);
    Server {
        url: server.base_url(),
        client: reqwest::Client::new(),
        server,
    }
}

async fn answer(request: RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

impl Server {
    fn get(&self, path: &str) -> RequestBuilder {
        self.client.get(format!("{}{path}", self.url))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url))
    }
}

#[tokio::test]
async fn anonymous_callers_reach_only_the_public_routes() {
    let server = start(AuthConfig::default()).await;
    for path in ["/", "/health", "/_session"] {
        let (status, _) = answer(server.get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    for path in ["/_all_dbs", "/notes", "/notes/_changes", "/notes/doc"] {
        let (status, body) = answer(server.get(path)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body["error"], json!("unauthorized"), "{path}");
    }
    let (status, body) = answer(server.get("/_session")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["userCtx"]["name"], Value::Null);
    // Wrong credentials are refused even where anonymous callers are welcome.
    let (status, _) = answer(server.get("/").basic_auth("ann", Some("wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = answer(server.get("/").header("authorization", "Digest x")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn basic_auth_bearer_tokens_and_session_cookies_identify_the_caller() {
    let server = start(AuthConfig::default()).await;
    let (status, _) = answer(
        server
            .request(reqwest::Method::PUT, "/notes")
            .basic_auth("ann", Some("ann's password")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // Bearer token from /_ferry/login (JSON body).
    let (status, login) = answer(
        server
            .request(reqwest::Method::POST, "/_ferry/login")
            .json(&json!({"name": "ann", "password": "ann's password"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let token = login["access_token"].as_str().unwrap();
    assert!(login["expires_at"].as_u64().unwrap() > 0);
    let (status, info) = answer(server.get("/notes").bearer_auth(token)).await;
    assert_eq!(
        (status, info["db_name"].clone()),
        (StatusCode::OK, json!("notes"))
    );
    let (status, _) = answer(server.get("/notes").bearer_auth("fa_forged")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Cookie from POST /_session (form body, as curl and HTML forms send it).
    let response = server
        .request(reqwest::Method::POST, "/_session")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=ann&password=ann%27s+password")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    // Plain HTTP: a Secure cookie would never be sent back.
    assert!(!cookie.contains("Secure"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let (_, session) = answer(server.get("/_session").header("cookie", &cookie)).await;
    assert_eq!(session["userCtx"], json!({"name": "ann", "roles": []}));
    assert_eq!(session["info"]["authenticated"], json!("cookie"));
    let (status, _) = answer(server.get("/notes").header("cookie", &cookie)).await;
    assert_eq!(status, StatusCode::OK);
    // Logging out ends the cookie at once.
    let (status, _) = answer(
        server
            .request(reqwest::Method::DELETE, "/_session")
            .header("cookie", &cookie),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = answer(server.get("/notes").header("cookie", &cookie)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = answer(
        server
            .request(reqwest::Method::POST, "/_session")
            .json(&json!({"name": "ann", "password": "nope"})),
    )
    .await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::UNAUTHORIZED, json!("unauthorized"))
    );
}

#[tokio::test]
async fn only_administrators_delete_and_compact_databases() {
    let server = start(AuthConfig::default()).await;
    let ann = |request: RequestBuilder| request.basic_auth("ann", Some("ann's password"));
    let root = |request: RequestBuilder| request.basic_auth("root", Some("root's password"));
    answer(ann(server.request(reqwest::Method::PUT, "/shared"))).await;
    let (status, body) = answer(ann(server.request(reqwest::Method::DELETE, "/shared"))).await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("forbidden"))
    );
    let (status, _) = answer(ann(server.get("/shared"))).await;
    assert_eq!(status, StatusCode::OK, "still there");
    let (status, _) = answer(ann(
        server.request(reqwest::Method::POST, "/shared/_compact")
    ))
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = answer(root(
        server.request(reqwest::Method::POST, "/shared/_compact"),
    ))
    .await;
    assert_eq!(
        (status, body["ok"].clone()),
        (StatusCode::ACCEPTED, json!(true))
    );
    let (status, _) = answer(root(server.request(reqwest::Method::DELETE, "/shared"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn access_tokens_expire() {
    let server = start(AuthConfig {
        access_token_ttl: Duration::from_millis(200),
        ..AuthConfig::default()
    })
    .await;
    let (_, login) = answer(
        server
            .request(reqwest::Method::POST, "/_ferry/login")
            .json(&json!({"name": "ann", "password": "ann's password"})),
    )
    .await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let expires_at = login["expires_at"].as_u64().unwrap();
    let (status, _) = answer(server.get("/_all_dbs").bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::OK);
    ferry_test_support::wait_until_past(expires_at).await;
    let (status, _) = answer(server.get("/_all_dbs").bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_authentication_everyone_is_an_administrator() {
    let server = start(AuthConfig {
        required: false,
        ..AuthConfig::default()
    })
    .await;
    answer(server.request(reqwest::Method::PUT, "/open")).await;
    let (status, _) = answer(server.request(reqwest::Method::DELETE, "/open")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, session) = answer(server.get("/_session")).await;
    assert_eq!(session["userCtx"]["roles"], json!(["_admin"]));
}

#[tokio::test]
async fn a_new_password_ends_every_token_and_cookie_issued_before_it() {
    let server = start(AuthConfig::default()).await;
    let (_, login) = answer(
        server
            .request(reqwest::Method::POST, "/_ferry/login")
            .json(&json!({"name": "ann", "password": "ann's password"})),
    )
    .await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let response = server
        .request(reqwest::Method::POST, "/_session")
        .json(&json!({"name": "ann", "password": "ann's password"}))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let (status, _) = answer(server.get("/_all_dbs").bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::OK, "before the change");

    server
        .server
        .accounts()
        .set_user("ann", "ann's new password", false)
        .unwrap();
    let (status, body) = answer(server.get("/_all_dbs").bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (_, session) = answer(server.get("/_session").header("cookie", &cookie)).await;
    assert_eq!(session["userCtx"]["name"], Value::Null, "{session}");
    let (status, _) = answer(
        server
            .get("/_all_dbs")
            .basic_auth("ann", Some("ann's password")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the old password");
    let (status, _) = answer(
        server
            .get("/_all_dbs")
            .basic_auth("ann", Some("ann's new password")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the new password");
}

#[tokio::test]
async fn only_administrators_learn_how_many_databases_the_server_holds() {
    let server = start(AuthConfig::default()).await;
    let (status, _) = answer(
        server
            .request(reqwest::Method::PUT, "/private")
            .basic_auth("root", Some("root's password")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, anonymous) = answer(server.get("/health")).await;
    assert_eq!(
        (status, anonymous),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let (_, user) = answer(
        server
            .get("/health")
            .basic_auth("ann", Some("ann's password")),
    )
    .await;
    assert_eq!(user, json!({"status": "ok"}));
    let (_, admin) = answer(
        server
            .get("/health")
            .basic_auth("root", Some("root's password")),
    )
    .await;
    assert_eq!(admin, json!({"status": "ok", "databases": 1}));
}
