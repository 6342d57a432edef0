//! A directory of databases, one SQLite file each, and the bounded cache of open ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Backend, Database, StoreConfig, StoreError, valid_database_name};

use super::{SqliteDatabase, lock};

/// Databases stored as SQLite files in one directory: `{dir}/{name}.sqlite`.
///
/// Open databases are a bounded cache (each holds a few file descriptors): past
/// [`BackendLimits::max_open`], the least recently used one that nobody holds is closed, to
/// be opened again on demand.
pub struct SqliteBackend {
    dir: PathBuf,
    config: StoreConfig,
    limits: BackendLimits,
    open: Mutex<OpenDatabases>,
}

/// How many databases a backend holds and keeps open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLimits {
    /// The most databases (files); creating one more is refused.
    pub max_databases: usize,
    /// The most databases open at once (each keeps up to six file descriptors: the file, its
    /// WAL and shared memory, and its connections).
    pub max_open: usize,
}

impl Default for BackendLimits {
    fn default() -> BackendLimits {
        BackendLimits {
            max_databases: 10_000,
            max_open: 100,
        }
    }
}

/// The open databases, each with when it was last handed out.
#[derive(Default)]
pub(super) struct OpenDatabases {
    pub(super) databases: HashMap<String, (Arc<SqliteDatabase>, u64)>,
    pub(super) uses: u64,
}

impl OpenDatabases {
    pub(super) fn get(&mut self, name: &str) -> Option<Arc<SqliteDatabase>> {
        self.uses += 1;
        let (database, used) = self.databases.get_mut(name)?;
        *used = self.uses;
        Some(database.clone())
    }

    /// Makes room for one more under `max_open`, closing the least recently used databases
    /// only the cache holds.
    pub(super) fn make_room(&mut self, max_open: usize) -> Result<(), StoreError> {
        while self.databases.len() >= max_open.max(1) {
            let idle = self
                .databases
                .iter()
                .filter(|(_, (database, _))| Arc::strong_count(database) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            let Some(idle) = idle else {
                return Err(StoreError::TooManyOpen { limit: max_open });
            };
            self.databases.remove(&idle);
        }
        Ok(())
    }

    pub(super) fn insert(&mut self, name: &str, database: Arc<SqliteDatabase>) {
        self.uses += 1;
        self.databases
            .insert(name.to_owned(), (database, self.uses));
    }
}

impl SqliteBackend {
    /// Uses (and creates if needed) `dir` for database files.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<SqliteBackend, StoreError> {
        config.page_cache.check()?;
        std::fs::create_dir_all(dir)?;
        Ok(SqliteBackend {
            dir: dir.to_owned(),
            config,
            limits: BackendLimits::default(),
            open: Mutex::new(OpenDatabases::default()),
        })
    }

    /// The same backend with other limits on databases.
    #[must_use]
    pub fn with_limits(mut self, limits: BackendLimits) -> SqliteBackend {
        self.limits = limits;
        self
    }

    pub(super) fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sqlite"))
    }

    pub(super) fn check_name(name: &str) -> Result<(), StoreError> {
        if valid_database_name(name) {
            Ok(())
        } else {
            Err(StoreError::InvalidDatabaseName(
                name.chars().take(140).collect(),
            ))
        }
    }
}

impl Backend for SqliteBackend {
    fn create_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        Self::check_name(name)?;
        let mut open = lock(&self.open);
        let path = self.path_of(name);
        if open.databases.contains_key(name) || path.exists() {
            return Err(StoreError::DatabaseExists(name.to_owned()));
        }
        if self.database_names()?.len() >= self.limits.max_databases {
            return Err(StoreError::TooManyDatabases {
                limit: self.limits.max_databases,
            });
        }
        open.make_room(self.limits.max_open)?;
        let database = Arc::new(SqliteDatabase::open(&path, name, self.config.clone())?);
        open.insert(name, database.clone());
        Ok(database)
    }

    fn open_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        Self::check_name(name).map_err(|_| StoreError::NoSuchDatabase(name.to_owned()))?;
        let mut open = lock(&self.open);
        if let Some(database) = open.get(name) {
            return Ok(database);
        }
        let path = self.path_of(name);
        if !path.exists() {
            return Err(StoreError::NoSuchDatabase(name.to_owned()));
        }
        open.make_room(self.limits.max_open)?;
        let database = Arc::new(SqliteDatabase::open(&path, name, self.config.clone())?);
        open.insert(name, database.clone());
        Ok(database)
    }

    fn delete_database(&self, name: &str) -> Result<(), StoreError> {
        Self::check_name(name).map_err(|_| StoreError::NoSuchDatabase(name.to_owned()))?;
        let mut open = lock(&self.open);
        let path = self.path_of(name);
        if !path.exists() {
            return Err(StoreError::NoSuchDatabase(name.to_owned()));
        }
        open.databases.remove(name);
        std::fs::remove_file(&path)?;
        for suffix in ["-wal", "-shm"] {
            let mut extra = path.clone().into_os_string();
            extra.push(suffix);
            match std::fs::remove_file(PathBuf::from(extra)) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn database_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let file_name = entry?.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".sqlite")) else {
                continue;
            };
            if valid_database_name(name) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}
