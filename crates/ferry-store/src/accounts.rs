//! Server accounts: users and the tokens issued to them.
//!
//! The store keeps what authentication needs and nothing it could leak: password *hashes*
//! (argon2 PHC strings computed by the server) and the SHA-256 of every token, never a token
//! itself. Deciding whether a password or a token is valid is the server's job
//! (`ferry_server::auth`); this module only stores and finds records, atomically.
//!
//! [`SqliteAccounts`] keeps them in one SQLite file beside the databases (`_accounts.sqlite`,
//! a name no database can have).
//!
//! ```
//! use ferry_store::accounts::{Accounts, SqliteAccounts, User};
//! let dir = tempfile::tempdir().unwrap();
//! let accounts = SqliteAccounts::open(&dir.path().join("_accounts.sqlite")).unwrap();
//! accounts.put_user(&User { name: "ann".into(), password_hash: "$argon2id$…".into(), admin: false }).unwrap();
//! assert_eq!(accounts.get_user("ann").unwrap().unwrap().name, "ann");
//! ```

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::StoreError;

/// A user of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The password's hash as a PHC string (never the password).
    pub password_hash: String,
    /// Administrators may delete databases and manage users over HTTP.
    pub admin: bool,
}

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Short-lived bearer token returned by login (also the `_session` cookie).
    Access,
    /// Long-lived token a client replica resumes its sync session with.
    Reconnect,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Access => "access",
            TokenKind::Reconnect => "reconnect",
        }
    }

    /// A stored kind. An unknown one is damage, not an access token: reading it as one would
    /// let whatever wrote it grant access.
    fn parse(text: &str) -> Option<TokenKind> {
        match text {
            "access" => Some(TokenKind::Access),
            "reconnect" => Some(TokenKind::Reconnect),
            _ => None,
        }
    }
}

/// A stored token: its hash and what it grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// SHA-256 of the token, in hex.
    pub hash: String,
    /// What the token is for.
    pub kind: TokenKind,
    /// Whose token it is.
    pub user: String,
    /// The client replica a reconnect token is bound to.
    pub replica: Option<String>,
    /// When the token stops working, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Storage for users and tokens. Implementations must make every method atomic.
pub trait Accounts: Send + Sync {
    /// Creates the user, or replaces its password and role. A new password revokes every
    /// token issued to the user, in the same transaction: a token is worth no more than the
    /// password it was issued for.
    fn put_user(&self, user: &User) -> Result<(), StoreError>;
    /// The user called `name`.
    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError>;
    /// Every user, by name.
    fn list_users(&self) -> Result<Vec<User>, StoreError>;
    /// Deletes the user and every token issued to it; whether it existed.
    fn delete_user(&self, name: &str) -> Result<bool, StoreError>;
    /// Stores a new token.
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// The token with this hash, if it has not expired at `now_ms`.
    fn find_token(&self, hash: &str, now_ms: u64) -> Result<Option<TokenRecord>, StoreError>;
    /// Deletes one token; whether it existed.
    fn delete_token(&self, hash: &str) -> Result<bool, StoreError>;
    /// Rotates a reconnect token in one transaction: stores `next` and deletes every other
    /// reconnect token of the same user and replica except `presented`, which stays valid until
    /// `next` is first used (so a client that never received `next` can still resume).
    fn rotate_reconnect_token(&self, presented: &str, next: &TokenRecord)
    -> Result<(), StoreError>;
    /// Deletes tokens of `user` (of one kind, or all); how many.
    fn revoke_tokens(&self, user: &str, kind: Option<TokenKind>) -> Result<u64, StoreError>;
    /// Deletes tokens that expired before `now_ms`; how many.
    fn purge_expired(&self, now_ms: u64) -> Result<u64, StoreError>;
}

/// [`Accounts`] in one SQLite file.
pub struct SqliteAccounts {
    connection: Mutex<Connection>,
}

/// The schema, one step per version (`PRAGMA user_version` records how many ran). Files
/// made before versions were recorded are at 0 and hold version 1's tables already, hence its
/// `IF NOT EXISTS`.
const MIGRATIONS: &[&str] = &["
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    replica TEXT,
    expires_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens(user, kind, replica);
"];

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqliteAccounts {
    /// Opens (creating if needed) the accounts file at `path`. Writes are durable
    /// (`synchronous=FULL`): a revoked token must stay revoked after a crash.
    pub fn open(path: &Path) -> Result<SqliteAccounts, StoreError> {
        let mut connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut connection)?;
        Ok(SqliteAccounts {
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Brings the file to the latest schema version, in one transaction; refuses a file from a
/// newer Ferry.
fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let latest = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let done = crate::schema_version(&transaction, latest, "accounts schema version")?;
    for migration in &MIGRATIONS[done..] {
        transaction.execute_batch(migration)?;
    }
    transaction.pragma_update(None, "user_version", latest)?;
    transaction.commit()?;
    Ok(())
}

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        name: row.get(0)?,
        password_hash: row.get(1)?,
        admin: row.get::<_, i64>(2)? != 0,
    })
}

impl Accounts for SqliteAccounts {
    fn put_user(&self, user: &User) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        let previous: Option<String> = transaction
            .query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [&user.name],
                |row| row.get(0),
            )
            .optional()?;
        if previous.is_some_and(|previous| previous != user.password_hash) {
            transaction.execute("DELETE FROM tokens WHERE user = ?1", [&user.name])?;
        }
        transaction.execute(
            "INSERT INTO users (name, password_hash, admin) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET password_hash = ?2, admin = ?3",
            params![user.name, user.password_hash, i64::from(user.admin)],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .connection()
            .prepare_cached("SELECT name, password_hash, admin FROM users WHERE name = ?1")?
            .query_row([name], user_from_row)
            .optional()?)
    }

    fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let connection = self.connection();
        let mut statement =
            connection.prepare("SELECT name, password_hash, admin FROM users ORDER BY name")?;
        let users = statement
            .query_map([], user_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(users)
    }

    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        // Tokens go with the user (ON DELETE CASCADE).
        Ok(self
            .connection()
            .execute("DELETE FROM users WHERE name = ?1", [name])?
            > 0)
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.connection().execute(
            "INSERT INTO tokens (hash, kind, user, replica, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                token.hash,
                token.kind.as_str(),
                token.user,
                token.replica,
                to_i64(token.expires_ms)
            ],
        )?;
        Ok(())
    }

    fn find_token(&self, hash: &str, now_ms: u64) -> Result<Option<TokenRecord>, StoreError> {
        self.connection()
            .prepare_cached(
                "SELECT hash, kind, user, replica, expires_ms FROM tokens
                 WHERE hash = ?1 AND expires_ms > ?2",
            )?
            .query_row(params![hash, to_i64(now_ms)], |row| {
                Ok((
                    TokenRecord {
                        hash: row.get(0)?,
                        kind: TokenKind::Access,
                        user: row.get(2)?,
                        replica: row.get(3)?,
                        expires_ms: to_u64(row.get(4)?),
                    },
                    row.get::<_, String>(1)?,
                ))
            })
            .optional()?
            .map(|(record, kind)| match TokenKind::parse(&kind) {
                Some(kind) => Ok(TokenRecord { kind, ..record }),
                None => Err(StoreError::Corrupt {
                    what: "token kind",
                    detail: kind,
                }),
            })
            .transpose()
    }

    fn delete_token(&self, hash: &str) -> Result<bool, StoreError> {
        Ok(self
            .connection()
            .execute("DELETE FROM tokens WHERE hash = ?1", [hash])?
            > 0)
    }

    fn rotate_reconnect_token(
        &self,
        presented: &str,
        next: &TokenRecord,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        transaction.execute(
            "DELETE FROM tokens WHERE kind = 'reconnect' AND user = ?1 AND replica IS ?2
             AND hash <> ?3",
            params![next.user, next.replica, presented],
        )?;
        transaction.execute(
            "INSERT INTO tokens (hash, kind, user, replica, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                next.hash,
                next.kind.as_str(),
                next.user,
                next.replica,
                to_i64(next.expires_ms)
            ],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn revoke_tokens(&self, user: &str, kind: Option<TokenKind>) -> Result<u64, StoreError> {
        let deleted = match kind {
            Some(kind) => self.connection().execute(
                "DELETE FROM tokens WHERE user = ?1 AND kind = ?2",
                params![user, kind.as_str()],
            )?,
            None => self
                .connection()
                .execute("DELETE FROM tokens WHERE user = ?1", [user])?,
        };
        Ok(deleted as u64)
    }

    fn purge_expired(&self, now_ms: u64) -> Result<u64, StoreError> {
        let deleted = self.connection().execute(
            "DELETE FROM tokens WHERE expires_ms <= ?1",
            [to_i64(now_ms)],
        )?;
        Ok(deleted as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(hash: &str, replica: &str, expires_ms: u64) -> TokenRecord {
        TokenRecord {
            hash: hash.into(),
            kind: TokenKind::Reconnect,
            user: "ann".into(),
            replica: Some(replica.into()),
            expires_ms,
        }
    }

    fn accounts() -> (tempfile::TempDir, SqliteAccounts) {
        let dir = tempfile::tempdir().unwrap();
        let accounts = SqliteAccounts::open(&dir.path().join("_accounts.sqlite")).unwrap();
        accounts
            .put_user(&User {
                name: "ann".into(),
                password_hash: "h".into(),
                admin: false,
            })
            .unwrap();
        (dir, accounts)
    }

    #[test]
    fn rotation_keeps_the_presented_token_and_the_next_one_only() {
        let (_dir, accounts) = accounts();
        accounts.insert_token(&token("t1", "r1", 100)).unwrap();
        accounts.insert_token(&token("other", "r2", 100)).unwrap();
        accounts
            .rotate_reconnect_token("t1", &token("t2", "r1", 100))
            .unwrap();
        assert!(accounts.find_token("t1", 0).unwrap().is_some());
        assert!(accounts.find_token("t2", 0).unwrap().is_some());
        // Using t2 retires t1; the other replica's token is untouched.
        accounts
            .rotate_reconnect_token("t2", &token("t3", "r1", 100))
            .unwrap();
        assert!(accounts.find_token("t1", 0).unwrap().is_none());
        assert!(accounts.find_token("t2", 0).unwrap().is_some());
        assert!(accounts.find_token("other", 0).unwrap().is_some());
        // Presenting t2 again (t3 never arrived) retires t3.
        accounts
            .rotate_reconnect_token("t2", &token("t4", "r1", 100))
            .unwrap();
        assert!(accounts.find_token("t3", 0).unwrap().is_none());
    }

    #[test]
    fn a_new_password_revokes_the_user_s_tokens_and_a_new_role_does_not() {
        let (_dir, accounts) = accounts();
        let ann = |password_hash: &str, admin| User {
            name: "ann".into(),
            password_hash: password_hash.into(),
            admin,
        };
        accounts.insert_token(&token("t1", "r1", 100)).unwrap();
        accounts.put_user(&ann("h", true)).unwrap();
        assert!(
            accounts.find_token("t1", 0).unwrap().is_some(),
            "same password"
        );
        accounts.put_user(&ann("other", true)).unwrap();
        assert!(
            accounts.find_token("t1", 0).unwrap().is_none(),
            "new password"
        );
    }

    #[test]
    fn a_token_of_an_unknown_kind_is_damage_not_access() {
        let (_dir, accounts) = accounts();
        accounts.insert_token(&token("t1", "r1", 100)).unwrap();
        accounts
            .connection()
            .execute("UPDATE tokens SET kind = 'admin' WHERE hash = 't1'", [])
            .unwrap();
        let found = accounts.find_token("t1", 0);
        assert!(
            matches!(
                found,
                Err(StoreError::Corrupt {
                    what: "token kind",
                    ..
                })
            ),
            "{found:?}"
        );
    }

    #[test]
    fn the_schema_version_is_recorded_and_a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("_accounts.sqlite");
        // A file from before versions were recorded: version 1's tables, user_version 0.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        old.execute(
            "INSERT INTO users (name, password_hash, admin) VALUES ('ann', 'h', 0)",
            [],
        )
        .unwrap();
        drop(old);
        let accounts = SqliteAccounts::open(&path).unwrap();
        assert_eq!(
            accounts.get_user("ann").unwrap().unwrap().password_hash,
            "h"
        );
        let version: i64 = accounts
            .connection()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        accounts
            .connection()
            .pragma_update(None, "user_version", version + 1)
            .unwrap();
        drop(accounts);
        assert!(matches!(
            SqliteAccounts::open(&path),
            Err(StoreError::FutureSchema { .. })
        ));
    }

    #[test]
    fn expired_tokens_are_not_found_and_deleting_a_user_revokes_its_tokens() {
        let (_dir, accounts) = accounts();
        accounts.insert_token(&token("t1", "r1", 100)).unwrap();
        assert!(accounts.find_token("t1", 99).unwrap().is_some());
        assert!(accounts.find_token("t1", 100).unwrap().is_none());
        assert_eq!(accounts.purge_expired(100).unwrap(), 1);
        accounts.insert_token(&token("t2", "r1", 100)).unwrap();
        assert!(accounts.delete_user("ann").unwrap());
        assert!(accounts.find_token("t2", 0).unwrap().is_none());
    }
}
