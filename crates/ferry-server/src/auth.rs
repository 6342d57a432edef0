//! Who is asking: users, passwords, access tokens and reconnect tokens.
//!
//! - Passwords are hashed with argon2id (a fresh random salt each), never stored or logged.
//! - Tokens are 32 random bytes, hex-encoded behind a prefix that says what they are (`fa_`
//!   access, `fr_` reconnect) so secret scanners and humans can tell them apart. The store
//!   keeps only their SHA-256.
//! - Access tokens (login, the `_session` cookie) expire after `AuthConfig::access_token_ttl`.
//! - Reconnect tokens are bound to one user and one client replica, rotated on every use (each
//!   resume returns the next one), keep the absolute expiry of the first one issued, and are
//!   revoked with `ferry users revoke`. The presented token stays valid until its successor is
//!   first used, so a client whose connection dropped before it received the successor can
//!   still resume.
//!
//! Checking a password costs tens of milliseconds by design; HTTP basic auth sends it with
//! every request, so a verified (user, password hash, password) triple is remembered in memory
//! (as a SHA-256, for a few minutes). Changing the password changes the stored hash and so
//! invalidates the memory at once.
//!
//! Every method here blocks (argon2, SQLite): call it from `spawn_blocking`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use ferry_store::StoreError;
use ferry_store::accounts::{Accounts, SqliteAccounts, TokenKind, TokenRecord, User};
use ferry_store::clock::{SystemClock, WallClock};
use sha2::{Digest, Sha256};

use crate::password_checks::{CheckError, PasswordChecks};

/// How long a verified basic-auth password is remembered.
const VERIFIED_PASSWORD_TTL: Duration = Duration::from_secs(300);
/// At most this many remembered passwords (the memory is cleared when full).
const VERIFIED_PASSWORD_CAPACITY: usize = 10_000;
/// User names: what CouchDB allows in a basic-auth header, kept short and printable.
const MAX_USER_NAME: usize = 64;
/// Passwords shorter than this are refused.
pub const MIN_PASSWORD_LENGTH: usize = 8;

const ACCESS_PREFIX: &str = "fa_";
const RECONNECT_PREFIX: &str = "fr_";

/// How the server authenticates.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// When false (`--insecure-no-auth`), every request acts as an administrator. For local
    /// development only.
    pub required: bool,
    /// How long a login's access token (and `_session` cookie) is valid.
    pub access_token_ttl: Duration,
    /// The absolute lifetime of a chain of reconnect tokens, from the login that started it.
    pub reconnect_token_ttl: Duration,
    /// The time tokens expire by (`ferry serve` sets the server's own clock here).
    pub clock: Arc<dyn WallClock>,
    /// The most password checks (argon2, about 19 MiB of memory and a core's full attention
    /// for tens of milliseconds each) running at once. By default half the machine's cores
    /// (1 to 8): a login flood then leaves the other half to everyone else.
    pub max_password_checks: usize,
    /// How long a password check waits for one of those before it is answered 503
    /// `too_many_logins`.
    pub password_check_wait: Duration,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            required: true,
            access_token_ttl: Duration::from_secs(3600),
            reconnect_token_ttl: Duration::from_secs(30 * 24 * 3600),
            clock: Arc::new(SystemClock),
            max_password_checks: default_password_checks(),
            password_check_wait: Duration::from_secs(2),
        }
    }
}

/// Half the cores this process may run on, from 1 to 8.
fn default_password_checks() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cores| cores.get() / 2)
        .clamp(1, 8)
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user name (`None` when authentication is off).
    pub user: Option<String>,
    /// Whether the caller may administer the server.
    pub admin: bool,
}

impl Identity {
    /// The caller when authentication is off: anyone, with every right.
    pub fn anonymous_admin() -> Identity {
        Identity {
            user: None,
            admin: true,
        }
    }

    fn of(user: &User) -> Identity {
        Identity {
            user: Some(user.name.clone()),
            admin: user.admin,
        }
    }

    /// CouchDB's roles for the caller.
    pub fn roles(&self) -> Vec<&'static str> {
        if self.admin { vec!["_admin"] } else { vec![] }
    }
}

/// Authentication failed or could not be attempted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credentials are wrong, unknown, expired or revoked. Deliberately vague.
    #[error("{0}")]
    Rejected(&'static str),
    /// A user name or password is not acceptable (when creating a user).
    #[error("{0}")]
    Invalid(String),
    /// The accounts store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Too many password checks are running; retry shortly.
    #[error("too many logins at once; retry shortly")]
    Busy,
}

/// An issued token and when it expires.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token itself: shown to the client once, stored only as a hash.
    pub token: String,
    /// Expiry, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Users and tokens of one server.
pub struct Auth {
    accounts: Arc<dyn Accounts>,
    config: AuthConfig,
    verified_passwords: Mutex<HashMap<[u8; 32], Instant>>,
    /// Where argon2 checks run (at most `config.max_password_checks` at once).
    password_checks: PasswordChecks,
}

/// The accounts file inside a data directory.
pub fn accounts_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("_accounts.sqlite")
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    format!("{prefix}{}", hex(&bytes))
}

/// Hashes a password with argon2id and a fresh salt (a PHC string).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the operating system's random source works");
    let salt =
        SaltString::encode_b64(&salt).map_err(|error| AuthError::Invalid(error.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| AuthError::Invalid(error.to_string()))
}

fn password_matches(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// Checks a user name: 1 to 64 characters, no `:` (basic auth's separator), no control
/// characters, not starting with `_` (reserved, as in CouchDB).
pub fn validate_user_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_USER_NAME
        && !name.starts_with('_')
        && !name.chars().any(|c| c == ':' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "invalid user name {name:?}: 1 to {MAX_USER_NAME} characters, no ':' or control characters, not starting with '_'"
        )))
    }
}

const BAD_PASSWORD: &str = "Name or password is incorrect.";
const BAD_TOKEN: &str = "The token is unknown, expired or revoked.";

impl Auth {
    /// Users and tokens in `accounts`.
    pub fn new(accounts: Arc<dyn Accounts>, config: AuthConfig) -> Auth {
        Auth {
            accounts,
            verified_passwords: Mutex::new(HashMap::new()),
            password_checks: PasswordChecks::new(
                config.max_password_checks,
                config.password_check_wait,
            ),
            config,
        }
    }

    /// Whether `password` is the one `phc` was hashed from, checked on a password check thread.
    /// Each argon2 check holds its memory while it runs, so a login flood is bounded by
    /// `max_password_checks`, not by the number of requests.
    fn check_password(&self, password: &str, phc: &str) -> Result<bool, AuthError> {
        let (password, phc) = (password.to_owned(), phc.to_owned());
        match self
            .password_checks
            .run(move || password_matches(&password, &phc))
        {
            Ok(matches) => Ok(matches),
            Err(CheckError::Busy) => Err(AuthError::Busy),
            Err(CheckError::Panicked) => Ok(false),
        }
    }

    /// Opens the accounts file in `data_dir`.
    pub fn open(data_dir: &Path, config: AuthConfig) -> Result<Auth, StoreError> {
        let accounts = SqliteAccounts::open(&accounts_path(data_dir))?;
        Ok(Auth::new(Arc::new(accounts), config))
    }

    /// The settings in force.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The stored users and tokens.
    pub fn accounts(&self) -> &Arc<dyn Accounts> {
        &self.accounts
    }

    /// Creates a user or sets its password and role.
    pub fn set_user(&self, name: &str, password: &str, admin: bool) -> Result<(), AuthError> {
        validate_user_name(name)?;
        if password.chars().count() < MIN_PASSWORD_LENGTH {
            return Err(AuthError::Invalid(format!(
                "the password must have at least {MIN_PASSWORD_LENGTH} characters"
            )));
        }
        let password_hash = hash_password(password)?;
        self.accounts.put_user(&User {
            name: name.to_owned(),
            password_hash,
            admin,
        })?;
        Ok(())
    }

    /// Checks a name and password.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<Identity, AuthError> {
        let Some(user) = self.accounts.get_user(name)? else {
            // Spend the time a real check takes, so timing does not reveal which names exist.
            let _ = self.check_password(password, DUMMY_HASH)?;
            return Err(AuthError::Rejected(BAD_PASSWORD));
        };
        let key = sha256(&[
            user.name.as_bytes(),
            user.password_hash.as_bytes(),
            password.as_bytes(),
        ]);
        {
            let remembered = self
                .verified_passwords
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if remembered
                .get(&key)
                .is_some_and(|at| at.elapsed() < VERIFIED_PASSWORD_TTL)
            {
                return Ok(Identity::of(&user));
            }
        }
        if !self.check_password(password, &user.password_hash)? {
            return Err(AuthError::Rejected(BAD_PASSWORD));
        }
        let mut remembered = self
            .verified_passwords
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if remembered.len() >= VERIFIED_PASSWORD_CAPACITY {
            remembered.clear();
        }
        remembered.insert(key, Instant::now());
        Ok(Identity::of(&user))
    }

    /// Checks a name and password and issues an access token.
    pub fn login(&self, name: &str, password: &str) -> Result<(Identity, IssuedToken), AuthError> {
        let identity = self.verify_password(name, password)?;
        let issued = self.issue(TokenKind::Access, name, None)?;
        Ok((identity, issued))
    }

    /// Stores a new token of `kind` for `user` (and `replica`), valid for the kind's lifetime.
    fn issue(
        &self,
        kind: TokenKind,
        user: &str,
        replica: Option<&str>,
    ) -> Result<IssuedToken, AuthError> {
        let (prefix, ttl) = match kind {
            TokenKind::Access => (ACCESS_PREFIX, self.config.access_token_ttl),
            TokenKind::Reconnect => (RECONNECT_PREFIX, self.config.reconnect_token_ttl),
        };
        let token = new_token(prefix);
        let expires_ms = self.config.clock.now_ms().saturating_add(millis(ttl));
        self.accounts.insert_token(&TokenRecord {
            hash: token_hash(&token),
            kind,
            user: user.to_owned(),
            replica: replica.map(str::to_owned),
            expires_ms,
        })?;
        Ok(IssuedToken { token, expires_ms })
    }

    /// Checks an access token.
    pub fn verify_access_token(&self, token: &str) -> Result<Identity, AuthError> {
        let record = self
            .accounts
            .find_token(&token_hash(token), self.config.clock.now_ms())?
            .filter(|record| record.kind == TokenKind::Access)
            .ok_or(AuthError::Rejected(BAD_TOKEN))?;
        self.identity_of(&record.user)
    }

    /// Ends an access token's validity (logout).
    pub fn revoke_access_token(&self, token: &str) -> Result<(), AuthError> {
        self.accounts.delete_token(&token_hash(token))?;
        Ok(())
    }

    /// Issues the first reconnect token of a chain for `user` on `replica`.
    pub fn issue_reconnect_token(
        &self,
        user: &str,
        replica: &str,
    ) -> Result<IssuedToken, AuthError> {
        self.issue(TokenKind::Reconnect, user, Some(replica))
    }

    /// Resumes with a reconnect token presented by `replica`: the caller's identity and the
    /// next token of the chain (same absolute expiry).
    pub fn resume(&self, token: &str, replica: &str) -> Result<(Identity, IssuedToken), AuthError> {
        let presented = token_hash(token);
        let record = self
            .accounts
            .find_token(&presented, self.config.clock.now_ms())?
            .filter(|record| {
                record.kind == TokenKind::Reconnect && record.replica.as_deref() == Some(replica)
            })
            .ok_or(AuthError::Rejected(BAD_TOKEN))?;
        let identity = self.identity_of(&record.user)?;
        let next = new_token(RECONNECT_PREFIX);
        self.accounts.rotate_reconnect_token(
            &presented,
            &TokenRecord {
                hash: token_hash(&next),
                kind: TokenKind::Reconnect,
                user: record.user,
                replica: record.replica,
                expires_ms: record.expires_ms,
            },
        )?;
        Ok((
            identity,
            IssuedToken {
                token: next,
                expires_ms: record.expires_ms,
            },
        ))
    }

    fn identity_of(&self, name: &str) -> Result<Identity, AuthError> {
        let user = self
            .accounts
            .get_user(name)?
            .ok_or(AuthError::Rejected(BAD_TOKEN))?;
        Ok(Identity::of(&user))
    }
}

/// A valid argon2id hash of a random password, checked against when the user does not exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Qm9ndXNIYXNoQm9ndXNIYXNoQm9ndXNIYXNoQm9ndXM";

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(config: AuthConfig) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::open(dir.path(), config).unwrap();
        auth.set_user("ann", "correct horse", false).unwrap();
        (dir, auth)
    }

    #[test]
    fn passwords_are_hashed_and_checked() {
        let (_dir, auth) = auth(AuthConfig::default());
        let stored = auth.accounts().get_user("ann").unwrap().unwrap();
        assert!(stored.password_hash.starts_with("$argon2id$"));
        assert!(!stored.password_hash.contains("correct horse"));
        assert!(auth.verify_password("ann", "correct horse").is_ok());
        // Twice: the second answer comes from memory and must agree.
        assert!(auth.verify_password("ann", "correct horse").is_ok());
        assert!(matches!(
            auth.verify_password("ann", "wrong horse"),
            Err(AuthError::Rejected(_))
        ));
        assert!(matches!(
            auth.verify_password("bob", "correct horse"),
            Err(AuthError::Rejected(_))
        ));
        // A new password invalidates the remembered one immediately.
        auth.set_user("ann", "battery staple", false).unwrap();
        assert!(auth.verify_password("ann", "correct horse").is_err());
        assert!(matches!(
            auth.set_user("bob", "short", false),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.set_user("a:b", "long enough", false),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn reconnect_tokens_rotate_are_bound_to_their_replica_and_expire() {
        let (_dir, auth) = auth(AuthConfig::default());
        let first = auth.issue_reconnect_token("ann", "replica-1").unwrap();
        assert!(first.token.starts_with(RECONNECT_PREFIX));
        assert!(
            auth.resume(&first.token, "replica-2").is_err(),
            "bound to its replica"
        );
        let (identity, second) = auth.resume(&first.token, "replica-1").unwrap();
        assert_eq!(identity.user.as_deref(), Some("ann"));
        assert_ne!(second.token, first.token);
        assert_eq!(second.expires_ms, first.expires_ms, "absolute expiry");
        let (_, third) = auth.resume(&second.token, "replica-1").unwrap();
        assert!(
            auth.resume(&first.token, "replica-1").is_err(),
            "retired once rotated twice"
        );
        assert!(
            auth.verify_access_token(&third.token).is_err(),
            "not an access token"
        );
        auth.accounts().revoke_tokens("ann", None).unwrap();
        assert!(auth.resume(&third.token, "replica-1").is_err(), "revoked");

        // On a clock the test moves: expiry without waiting for real time.
        let clock = Arc::new(ferry_store::clock::ManualClock::new(1_000_000));
        let (_dir, short) = self::auth(AuthConfig {
            reconnect_token_ttl: Duration::from_millis(1),
            clock: clock.clone(),
            ..AuthConfig::default()
        });
        let token = short.issue_reconnect_token("ann", "r").unwrap();
        clock.set(token.expires_ms + 1);
        assert!(short.resume(&token.token, "r").is_err(), "expired");
    }

    #[test]
    fn access_tokens_work_until_revoked() {
        let (_dir, auth) = auth(AuthConfig::default());
        let (_, issued) = auth.login("ann", "correct horse").unwrap();
        assert!(auth.verify_access_token(&issued.token).is_ok());
        auth.revoke_access_token(&issued.token).unwrap();
        assert!(auth.verify_access_token(&issued.token).is_err());
        assert!(auth.login("ann", "wrong").is_err());
    }
}
