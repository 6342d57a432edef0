//! The route table: which handler serves which CouchDB endpoint.

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;

pub(crate) mod auth;
pub(crate) mod body;
mod changes;
mod database;
mod documents;
mod replication;
mod server;
pub(crate) mod sync_session;

/// Every route. Static segments (`_changes`, `_local`) take precedence over the document
/// wildcard, so document ids such as `_design/x` or `a/b` still reach the document handlers.
pub(crate) fn routes() -> Router<AppState> {
    let database = get(database::info)
        .head(database::info)
        .put(database::create)
        .delete(database::delete)
        .post(documents::post_document);
    Router::new()
        .route("/", get(server::welcome))
        .route("/health", get(server::health))
        .route("/_up", get(server::health))
        .route("/_all_dbs", get(server::all_dbs))
        .route("/_uuids", get(server::uuids))
        .route(
            "/_session",
            get(auth::get_session)
                .post(auth::post_session)
                .delete(auth::delete_session),
        )
        .route("/_ferry/login", post(auth::login))
        .route("/_ferry/sync", get(sync_session::upgrade))
        // PouchDB asks for `/{db}/` with the slash; both forms are the database.
        .route("/{db}", database.clone())
        .route("/{db}/", database)
        .route("/{db}/_compact", post(database::compact))
        .route(
            "/{db}/_ensure_full_commit",
            post(database::ensure_full_commit),
        )
        .route(
            "/{db}/_changes",
            get(changes::get_changes).post(changes::post_changes),
        )
        .route("/{db}/_revs_diff", post(replication::revs_diff))
        .route("/{db}/_bulk_get", post(replication::bulk_get))
        .route("/{db}/_bulk_docs", post(replication::bulk_docs))
        .route(
            "/{db}/_all_docs",
            get(documents::get_all_docs).post(documents::post_all_docs),
        )
        .route(
            "/{db}/_ferry/resolutions/{*doc_id}",
            get(documents::get_resolutions),
        )
        .route(
            "/{db}/_local/{*id}",
            get(documents::get_local)
                .put(documents::put_local)
                .delete(documents::delete_local),
        )
        .route(
            "/{db}/{*doc_id}",
            get(documents::get_document)
                .head(documents::get_document)
                .put(documents::put_document)
                .delete(documents::delete_document),
        )
}

/// A JSON response whose body is the chunks a task sends on `receiver`, written as the client
/// reads them (the task waits while the channel is full); it ends when the sender is dropped.
pub(crate) fn json_stream(
    receiver: tokio::sync::mpsc::Receiver<axum::body::Bytes>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), receiver))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
