//! API keys: random `rl_` keys stored only as SHA-256 hashes, with a role and the envs they
//! name, in memory, in SQLite (the embedded data dir) or in PostgreSQL (the distributed
//! schema).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, in every env.
    Admin,
    /// Triggers, runs, events and queues of its envs; reads its envs' settings.
    Env,
    /// Only the worker protocol, for its envs.
    Worker,
}

impl Role {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Env => "env",
            Role::Worker => "worker",
        }
    }

    fn parse(s: &str) -> Result<Self, KeyStoreError> {
        match s {
            "admin" => Ok(Role::Admin),
            "env" => Ok(Role::Env),
            "worker" => Ok(Role::Worker),
            other => Err(KeyStoreError::Corrupt(format!("unknown role {other:?}"))),
        }
    }
}

/// A stored key (its hash, never the key itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's public id (`key_…`).
    pub id: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    /// Its role.
    pub role: Role,
    /// The envs it names (empty for admin keys).
    pub envs: Vec<String>,
    /// A free label.
    pub label: Option<String>,
    /// When it was created (ms since the epoch).
    pub created_at_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<u64>,
}

impl KeyRecord {
    /// Whether the key names `env`.
    pub fn names(&self, env: &str) -> bool {
        self.envs.iter().any(|e| e == env)
    }
}

/// Why a key store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyStoreError {
    /// The backing database failed.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be read.
    #[error("key store holds a bad row: {0}")]
    Corrupt(String),
}

/// Where keys live.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key.
    async fn insert(&self, key: &KeyRecord) -> Result<(), KeyStoreError>;
    /// Every key, oldest first.
    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError>;
    /// One key by id.
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError>;
    /// One key by the hash of its secret.
    async fn by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, KeyStoreError>;
    /// Marks a key revoked at `at_ms` (keeps an earlier revocation); answers the key.
    async fn revoke(&self, id: &str, at_ms: u64) -> Result<Option<KeyRecord>, KeyStoreError>;
}

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A new random key: `rl_` + 32 bytes base64url.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("rl_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A new key id: `key_` + 9 random bytes base64url.
pub fn generate_id() -> String {
    let mut bytes = [0u8; 9];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("key_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Keys in memory (the `--memory` server and tests).
#[derive(Default)]
pub struct MemoryKeyStore {
    keys: Mutex<Vec<KeyRecord>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<KeyRecord>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn insert(&self, key: &KeyRecord) -> Result<(), KeyStoreError> {
        self.lock().push(key.clone());
        Ok(())
    }
    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        Ok(self.lock().clone())
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.lock().iter().find(|k| k.id == id).cloned())
    }
    async fn by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.lock().iter().find(|k| k.hash == hash).cloned())
    }
    async fn revoke(&self, id: &str, at_ms: u64) -> Result<Option<KeyRecord>, KeyStoreError> {
        let mut keys = self.lock();
        let Some(key) = keys.iter_mut().find(|k| k.id == id) else {
            return Ok(None);
        };
        key.revoked_at_ms.get_or_insert(at_ms);
        Ok(Some(key.clone()))
    }
}

/// Keys in a SQLite file (`keys.db` in the embedded data dir).
pub struct SqliteKeyStore {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    envs TEXT NOT NULL,
    label TEXT,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
)";

const COLUMNS: &str = "id, hash, role, envs, label, created_at_ms, revoked_at_ms";

type Row = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
);

fn from_row(row: Row) -> Result<KeyRecord, KeyStoreError> {
    let (id, hash, role, envs, label, created, revoked) = row;
    let envs: Vec<String> =
        serde_json::from_str(&envs).map_err(|e| KeyStoreError::Corrupt(e.to_string()))?;
    Ok(KeyRecord {
        id,
        hash,
        role: Role::parse(&role)?,
        envs,
        label,
        created_at_ms: u64::try_from(created).unwrap_or(0),
        revoked_at_ms: revoked.map(|r| u64::try_from(r).unwrap_or(0)),
    })
}

fn envs_json(envs: &[String]) -> String {
    serde_json::Value::from(envs.to_vec()).to_string()
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl SqliteKeyStore {
    /// Opens (creating) the key file at `path`.
    pub fn open(path: &Path) -> Result<Self, KeyStoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| KeyStoreError::Unavailable(e.to_string()))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(sqlite_err)?;
        conn.execute_batch(SQLITE_SCHEMA).map_err(sqlite_err)?;
        Ok(SqliteKeyStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<R, KeyStoreError> + Send + 'static,
    ) -> Result<R, KeyStoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| KeyStoreError::Unavailable(e.to_string()))?
    }

    async fn query(
        &self,
        filter: &'static str,
        arg: String,
    ) -> Result<Vec<KeyRecord>, KeyStoreError> {
        self.with(move |conn| {
            let sql = format!("SELECT {COLUMNS} FROM api_keys {filter} ORDER BY created_at_ms, id");
            let mut stmt = conn.prepare(&sql).map_err(sqlite_err)?;
            let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            };
            let rows = if filter.is_empty() {
                stmt.query_map([], read)
                    .map_err(sqlite_err)?
                    .collect::<Result<Vec<_>, _>>()
            } else {
                stmt.query_map([arg], read)
                    .map_err(sqlite_err)?
                    .collect::<Result<Vec<_>, _>>()
            };
            rows.map_err(sqlite_err)?
                .into_iter()
                .map(from_row)
                .collect()
        })
        .await
    }
}

fn sqlite_err(e: rusqlite::Error) -> KeyStoreError {
    KeyStoreError::Unavailable(e.to_string())
}

#[async_trait]
impl KeyStore for SqliteKeyStore {
    async fn insert(&self, key: &KeyRecord) -> Result<(), KeyStoreError> {
        let key = key.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO api_keys (id, hash, role, envs, label, created_at_ms, revoked_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![
                    key.id,
                    key.hash,
                    key.role.as_str(),
                    envs_json(&key.envs),
                    key.label,
                    ms_i64(key.created_at_ms),
                    key.revoked_at_ms.map(ms_i64),
                ],
            )
            .map_err(sqlite_err)?;
            Ok(())
        })
        .await
    }
    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        self.query("", String::new()).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.query("WHERE id = ?1", id.to_string()).await?.pop())
    }
    async fn by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.query("WHERE hash = ?1", hash.to_string()).await?.pop())
    }
    async fn revoke(&self, id: &str, at_ms: u64) -> Result<Option<KeyRecord>, KeyStoreError> {
        let owned = id.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
                rusqlite::params![owned, ms_i64(at_ms)],
            )
            .map_err(sqlite_err)?;
            Ok(())
        })
        .await?;
        self.get(id).await
    }
}

/// Keys in PostgreSQL (table `api_keys` in the distributed schema).
pub struct PostgresKeyStore {
    pool: sqlx::PgPool,
    table: String,
}

impl PostgresKeyStore {
    /// Connects and creates the table in `schema` if missing.
    pub async fn open(url: &str, schema: &str) -> Result<Self, KeyStoreError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(KeyStoreError::Unavailable(format!(
                "bad schema name {schema:?}"
            )));
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await
            .map_err(pg_err)?;
        let table = format!("\"{schema}\".api_keys");
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&pool)
            .await
            .map_err(pg_err)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id TEXT PRIMARY KEY,
                hash TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL,
                envs TEXT NOT NULL,
                label TEXT,
                created_at_ms BIGINT NOT NULL,
                revoked_at_ms BIGINT
            )"
        ))
        .execute(&pool)
        .await
        .map_err(pg_err)?;
        Ok(PostgresKeyStore { pool, table })
    }

    async fn query(
        &self,
        filter: &str,
        arg: Option<&str>,
    ) -> Result<Vec<KeyRecord>, KeyStoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} {filter} ORDER BY created_at_ms, id",
            self.table
        );
        let mut q = sqlx::query_as::<_, Row>(&sql);
        if let Some(arg) = arg {
            q = q.bind(arg.to_string());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(pg_err)?;
        rows.into_iter().map(from_row).collect()
    }
}

fn pg_err(e: sqlx::Error) -> KeyStoreError {
    KeyStoreError::Unavailable(e.to_string())
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn insert(&self, key: &KeyRecord) -> Result<(), KeyStoreError> {
        sqlx::query(&format!(
            "INSERT INTO {} ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            self.table
        ))
        .bind(&key.id)
        .bind(&key.hash)
        .bind(key.role.as_str())
        .bind(envs_json(&key.envs))
        .bind(&key.label)
        .bind(ms_i64(key.created_at_ms))
        .bind(key.revoked_at_ms.map(ms_i64))
        .execute(&self.pool)
        .await
        .map_err(pg_err)?;
        Ok(())
    }
    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        self.query("", None).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.query("WHERE id = $1", Some(id)).await?.pop())
    }
    async fn by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self.query("WHERE hash = $1", Some(hash)).await?.pop())
    }
    async fn revoke(&self, id: &str, at_ms: u64) -> Result<Option<KeyRecord>, KeyStoreError> {
        sqlx::query(&format!(
            "UPDATE {} SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1",
            self.table
        ))
        .bind(id)
        .bind(ms_i64(at_ms))
        .execute(&self.pool)
        .await
        .map_err(pg_err)?;
        self.get(id).await
    }
}

/// Verified keys by hash, so a request costs no store read (revocations through this process
/// evict at once; others are seen after [`KeyCache::TTL`]).
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (KeyRecord, std::time::Instant)>>,
}

impl KeyCache {
    /// How long a cached key is trusted without a store read.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(5);

    /// A fresh cached key.
    pub fn get(&self, hash: &str) -> Option<KeyRecord> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(k, _)| k.clone())
    }

    /// Caches a verified key.
    pub fn put(&self, key: KeyRecord) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() > 10_000 {
            entries.clear();
        }
        entries.insert(key.hash.clone(), (key, std::time::Instant::now()));
    }

    /// Forgets a key (revoked).
    pub fn evict(&self, hash: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(hash);
    }
}
