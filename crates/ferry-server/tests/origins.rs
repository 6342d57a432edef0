//! Web origins on loopback: a page from an origin the administrator did not allow gets 403 on
//! every route (the sync session's upgrade too) and no CORS answer; an allowed origin gets
//! CORS with credentials; the server's own origin and clients that send no `Origin` are
//! served as before.

use ferry_server::ServerConfig;
use ferry_test_support::TestServer;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "https://app.example.com";
const EVIL: &str = "https://evil.example.com";

fn server(allowed: &[&str]) -> TestServer {
    let config = ServerConfig {
        allowed_origins: allowed
            .iter()
            .map(|origin| origin.parse().unwrap())
            .collect(),
        ..ServerConfig::default()
    };
    TestServer::start(config, &[("ann", "ann's password", false)])
}

/// `GET /_session` with ann's cookie-less basic credentials from `origin`.
async fn from(server: &TestServer, origin: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("{}/_session", server.base_url()))
        .basic_auth("ann", Some("ann's password"));
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    request.send().await.unwrap()
}

fn allow_origin(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("access-control-allow-origin")
        .map(|value| value.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn pages_from_origins_not_allowed_are_refused_and_allowed_ones_get_cors() {
    let server = server(&[APP]);
    let refused = from(&server, Some(EVIL)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(allow_origin(&refused), None);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "forbidden", "{body}");
    assert!(body["reason"].as_str().unwrap().contains(EVIL), "{body}");
    for origin in [
        "null",
        "https://app.example.com.evil.example.com",
        "http://app.example.com",
    ] {
        assert_eq!(
            from(&server, Some(origin)).await.status(),
            StatusCode::FORBIDDEN,
            "{origin}"
        );
    }

    let allowed = from(&server, Some(APP)).await;
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(allow_origin(&allowed).as_deref(), Some(APP));
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let body: Value = allowed.json().await.unwrap();
    assert_eq!(body["userCtx"]["name"], "ann", "{body}");

    // The server's own origin, and clients that say nothing (not browsers).
    let own = format!("http://{}", server.address());
    assert_eq!(from(&server, Some(&own)).await.status(), StatusCode::OK);
    assert_eq!(from(&server, None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn preflights_name_only_allowed_origins() {
    let server = server(&[APP]);
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/notes/_bulk_docs", server.base_url()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, authorization",
            )
            .send()
    };
    let allowed = preflight(APP).await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allow_origin(&allowed).as_deref(), Some(APP));
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    let refused = preflight(EVIL).await.unwrap();
    assert_eq!(allow_origin(&refused), None);
}

#[tokio::test]
async fn by_default_no_other_origin_is_allowed() {
    let server = server(&[]);
    let refused = from(&server, Some(APP)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(allow_origin(&refused), None);
    assert_eq!(from(&server, None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_sync_session_upgrade_checks_the_origin() {
    let server = server(&[APP]);
    let upgrade = |origin: Option<&'static str>| {
        let url = format!("ws://{}/_ferry/sync", server.address());
        let mut request = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    match upgrade(Some(EVIL)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), StatusCode::FORBIDDEN.as_u16());
        }
        other => panic!(
            "an upgrade from another page was not refused: {:?}",
            other.map(|(_, response)| response.status())
        ),
    }
    for origin in [Some(APP), None] {
        let (socket, response) = upgrade(origin).await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            StatusCode::SWITCHING_PROTOCOLS.as_u16()
        );
        drop(socket);
    }
}
