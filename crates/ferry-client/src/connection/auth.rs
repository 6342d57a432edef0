//! How a replica authenticates: the application's credentials, the reconnect token kept in
//! the replica, and the application's fallback when both are refused.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use ferry_core::protocol::HelloAuth;
use ferry_store::Replica;
use ferry_store::clock::ReplicaClock;
use ferry_sync::SessionCredentials;
use serde_json::{Value, json};

/// How a replica authenticates to the server.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// A user name and password (checked by the server with argon2; sent only inside the
    /// session's `hello`).
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// An access token from `POST /_ferry/login`.
    AccessToken(String),
}

impl Credentials {
    /// A user name and password.
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::Password {
            user: user.into(),
            password: password.into(),
        }
    }

    fn hello_auth(&self) -> HelloAuth {
        match self {
            Credentials::Password { user, password } => HelloAuth {
                name: Some(user.clone()),
                password: Some(password.clone()),
                ..HelloAuth::default()
            },
            Credentials::AccessToken(token) => HelloAuth {
                token: Some(token.clone()),
                ..HelloAuth::default()
            },
        }
    }
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { user, .. } => write!(f, "Password {{ user: {user:?}, .. }}"),
            Credentials::AccessToken(_) => write!(f, "AccessToken(..)"),
        }
    }
}

/// Why the server refused to authenticate the replica; given to the fallback callback.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthenticationFailure {
    /// The server's reason.
    pub reason: String,
    /// How many times in a row authentication failed.
    pub attempts: u32,
}

pub(crate) type FallbackFuture = Pin<Box<dyn Future<Output = Option<Credentials>> + Send>>;
pub(crate) type Fallback = Arc<dyn Fn(AuthenticationFailure) -> FallbackFuture + Send + Sync>;

/// The key of the local document holding the latest reconnect token.
pub(crate) const RECONNECT_TOKEN_DOC: &str = "ferry-reconnect-token";

/// Credentials as the sync loop tracks them: the application's, the latest reconnect token,
/// and which of the two the last `hello` presented.
pub(crate) struct ClientAuth {
    /// Reconnect tokens expire by it.
    clock: Arc<ReplicaClock>,
    state: Arc<Mutex<AuthState>>,
    /// Where the latest token is kept, written on blocking threads one at a time.
    keeper: Arc<TokenKeeper>,
    blocking: ferry_sync::BlockingCalls,
}

/// Keeps the latest reconnect token in the replica (a local document).
struct TokenKeeper {
    db: Arc<dyn Replica>,
    /// Tokens are per server: the session URL they were issued for.
    server: String,
    /// One write at a time (each reads the document's revision first).
    writing: Mutex<()>,
}

#[derive(Default)]
pub(crate) struct AuthState {
    credentials: Option<Credentials>,
    reconnect: Option<(String, u64)>,
    presented_reconnect_token: bool,
}

impl ClientAuth {
    pub(crate) fn new(
        db: Arc<dyn Replica>,
        clock: Arc<ReplicaClock>,
        blocking: ferry_sync::BlockingCalls,
        server: String,
        credentials: Option<Credentials>,
    ) -> ClientAuth {
        let reconnect = db
            .get_local(RECONNECT_TOKEN_DOC)
            .ok()
            .flatten()
            .filter(|doc| doc.body.get("server").and_then(Value::as_str) == Some(server.as_str()))
            .and_then(|doc| {
                let token = doc.body.get("token")?.as_str()?.to_owned();
                let expires = doc.body.get("expires_at")?.as_u64()?;
                Some((token, expires))
            });
        ClientAuth {
            clock,
            state: Arc::new(Mutex::new(AuthState {
                credentials,
                reconnect,
                presented_reconnect_token: false,
            })),
            keeper: Arc::new(TokenKeeper {
                db,
                server,
                writing: Mutex::new(()),
            }),
            blocking,
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        lock(&self.state)
    }

    /// Keeps the token the state holds when the write runs (on a blocking thread: this is
    /// called from the session's connection task), so writes that finish out of order still
    /// leave the latest token.
    pub(crate) fn persist(&self) {
        let (keeper, state) = (self.keeper.clone(), self.state.clone());
        self.blocking.spawn(move || {
            let _one_at_a_time = lock(&keeper.writing);
            let latest = lock(&state).reconnect.clone();
            keeper.keep(latest.as_ref());
        });
    }

    /// The server refused what the last `hello` presented. Returns whether something else is
    /// left to try before asking the application.
    pub(crate) fn rejected(&self) -> bool {
        let mut state = self.state();
        if state.presented_reconnect_token {
            state.reconnect = None;
            state.presented_reconnect_token = false;
            drop(state);
            self.persist();
            return true;
        }
        false
    }

    pub(crate) fn set_credentials(&self, credentials: Credentials) {
        self.state().credentials = Some(credentials);
    }
}

impl SessionCredentials for ClientAuth {
    fn hello_auth(&self) -> Option<HelloAuth> {
        let mut state = self.state();
        // The replica's wall clock, corrected by the last re-base: the token's expiry is the
        // server's time.
        let now = self.clock.wall_ms();
        if let Some((token, expires)) = &state.reconnect
            && *expires > now
        {
            let auth = HelloAuth {
                reconnect_token: Some(token.clone()),
                ..HelloAuth::default()
            };
            state.presented_reconnect_token = true;
            return Some(auth);
        }
        state.presented_reconnect_token = false;
        state.credentials.as_ref().map(Credentials::hello_auth)
    }

    fn reconnect_token_issued(&self, token: &str, expires_ms: u64) {
        self.state().reconnect = Some((token.to_owned(), expires_ms));
        self.persist();
    }
}

impl TokenKeeper {
    fn keep(&self, reconnect: Option<&(String, u64)>) {
        let body = reconnect.map(|(token, expires)| {
            json!({"server": self.server, "token": token, "expires_at": expires})
                .as_object()
                .cloned()
                .unwrap_or_default()
        });
        let current = self.db.get_local(RECONNECT_TOKEN_DOC).ok().flatten();
        if current.is_none() && body.is_none() {
            return;
        }
        if let Err(error) = self
            .db
            .put_local(RECONNECT_TOKEN_DOC, current.map(|doc| doc.rev), body)
        {
            tracing::warn!(%error, "could not keep the reconnect token");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
