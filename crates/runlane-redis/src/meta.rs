//! [`RedisMetaCache`]: the shared task metadata cache of the distributed shape (SPEC §4), the
//! second level behind each engine's in-process cache.
//!
//! Keys (under the deployment's hash tag, like the queue's; every key a script touches is in
//! `KEYS`):
//!
//! - `{p}:tm:cur:<env>` (hash): env-current. Field `#v` is the owner stamp (the version the
//!   entry belongs to; `#` is no task-name character), every other field a task name → its
//!   `TaskDef` as compact JSON. Replaced by one script at promotion (`DEL` + `HSET` + stamp +
//!   `PEXPIRE` safety TTL + `PUBLISH`); a back-fill writes it only while it has no stamp.
//! - `{p}:tm:v:<env>:<n>` (hash): by-version, same fields, immutable, sliding expiry (each read
//!   is a script that refreshes it).
//!
//! Promotions are announced on `{p}:meta` (`<origin>\t<env>\t<version>`), published by the
//! promotion script itself, so an announcement is never seen before the entry it announces.
//!
//! The connection is made at first use, not at open: a cache that is unreachable makes every
//! call fail fast with [`CacheError`] (the engine then reads the store), and a failed connect is
//! retried at most once per `retry_after`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use runlane_core::metacache::{CacheError, MetaAnnouncement, MetaListener, SharedMetaCache};
use runlane_core::{EnvName, TaskDef, VersionDef};
use tokio::sync::OnceCell;

use crate::queue::{lock, RedisOpenError};

/// The owner-stamp field of a cache hash.
pub const STAMP_FIELD: &str = "#v";

/// Replaces env-current (`KEYS[1]`), fills by-version (`KEYS[2]`) when missing, announces.
/// ARGV: version, env-current TTL ms, by-version TTL ms, channel, message, then field/value
/// pairs.
const PROMOTE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '#v', ARGV[1])
local fresh = redis.call('EXISTS', KEYS[2]) == 0
if fresh then redis.call('HSET', KEYS[2], '#v', ARGV[1]) end
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if fresh then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Back-fills env-current (`KEYS[1]`) only while no version owns it (compare-and-set on the
/// stamp); answers 1 when it wrote. ARGV: version, TTL ms, then field/value pairs.
const BACKFILL_CURRENT: &str = r"
if redis.call('HEXISTS', KEYS[1], '#v') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '#v', ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Back-fills by-version (`KEYS[1]`) when missing (immutable), refreshing its expiry.
/// ARGV: version, TTL ms, then field/value pairs.
const BACKFILL_VERSION: &str = r"
if redis.call('HEXISTS', KEYS[1], '#v') == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], '#v', ARGV[1])
  for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Reads by-version (`KEYS[1]`) and slides its expiry. ARGV: TTL ms.
const READ_VERSION: &str = r"
local all = redis.call('HGETALL', KEYS[1])
if #all > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return all
";

/// Settings of the shared task metadata cache.
#[derive(Clone, Debug)]
pub struct RedisMetaConfig {
    /// The cache's Redis (the distributed shape defaults it to the queue's).
    pub url: String,
    /// The deployment's key prefix (keys are `{prefix}:tm:…`, the channel `{prefix}:meta`).
    pub prefix: String,
    /// Safety TTL of an env-current entry (default 24 h): bounds how long a promotion whose
    /// cache write failed leaves the previous version in the cache.
    pub current_ttl: Duration,
    /// Sliding expiry of a by-version entry (default 30 days).
    pub version_ttl: Duration,
    /// A command without an answer after this long fails (default 250 ms); the trigger then
    /// reads the store.
    pub response_timeout: Duration,
    /// After a failed connect, calls fail at once for this long before the next attempt; also
    /// the announcement listener's reconnect delay (default 1 s).
    pub retry_after: Duration,
}

impl RedisMetaConfig {
    /// Defaults for `url` and `prefix`.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        RedisMetaConfig {
            url: url.into(),
            prefix: prefix.into(),
            current_ttl: Duration::from_secs(24 * 3600),
            version_ttl: Duration::from_secs(30 * 24 * 3600),
            response_timeout: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The Redis task metadata cache (implements [`SharedMetaCache`]). See the module docs.
pub struct RedisMetaCache {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    down_until: Mutex<Option<Instant>>,
    config: RedisMetaConfig,
    base: String,
    channel: String,
    origin: String,
    promote: redis::Script,
    backfill_current: redis::Script,
    backfill_version: redis::Script,
    read_version: redis::Script,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for RedisMetaCache {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.listener).take() {
            task.abort();
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn err(e: impl std::fmt::Display) -> CacheError {
    CacheError(e.to_string())
}

/// Field/value pairs of a version: task name → compact JSON.
fn pairs(def: &VersionDef) -> Result<Vec<(String, String)>, CacheError> {
    def.tasks
        .iter()
        .map(|t| {
            Ok((
                t.name.as_str().to_string(),
                serde_json::to_string(t).map_err(err)?,
            ))
        })
        .collect()
}

/// A cache hash back into `(version, definitions)`; `None` when it has no stamp.
fn decode(fields: HashMap<String, String>) -> Result<Option<(u32, VersionDef)>, CacheError> {
    let Some(stamp) = fields.get(STAMP_FIELD) else {
        return Ok(None);
    };
    let version = stamp
        .parse::<u32>()
        .map_err(|_| CacheError(format!("malformed owner stamp {stamp:?}")))?;
    let mut tasks = Vec::with_capacity(fields.len().saturating_sub(1));
    for (field, value) in &fields {
        if field == STAMP_FIELD {
            continue;
        }
        let task: TaskDef = serde_json::from_str(value)
            .map_err(|e| CacheError(format!("malformed entry for task {field:?}: {e}")))?;
        tasks.push(task);
    }
    tasks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some((version, VersionDef { tasks })))
}

impl RedisMetaCache {
    /// A cache over the Redis at `config.url` (no connection yet: it is made at first use).
    pub fn new(config: RedisMetaConfig) -> Result<Self, RedisOpenError> {
        let prefix = &config.prefix;
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace())
        {
            return Err(RedisOpenError::Prefix(prefix.clone()));
        }
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| RedisOpenError::Unreachable {
                address: config.url.clone(),
                reason: e.to_string(),
            })?;
        let base = format!("{{{prefix}}}");
        let origin = format!(
            "{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        Ok(RedisMetaCache {
            client,
            conn: OnceCell::new(),
            down_until: Mutex::new(None),
            channel: format!("{base}:meta"),
            base,
            origin,
            config,
            promote: redis::Script::new(PROMOTE),
            backfill_current: redis::Script::new(BACKFILL_CURRENT),
            backfill_version: redis::Script::new(BACKFILL_VERSION),
            read_version: redis::Script::new(READ_VERSION),
            listener: Mutex::new(None),
        })
    }

    /// Uses `conn` (e.g. [`crate::RedisQueue::connection`], when the cache lives on the
    /// queue's Redis) instead of a connection of its own made at first use.
    pub fn with_connection(self, conn: ConnectionManager) -> Self {
        // A cache is new here: nothing has made its connection yet.
        let _ = self.conn.set(conn);
        self
    }

    /// The env-current key of `env`.
    pub fn current_key(&self, env: &EnvName) -> String {
        format!("{}:tm:cur:{}", self.base, env.as_str())
    }

    /// The by-version key of (`env`, `version`).
    pub fn version_key(&self, env: &EnvName, version: u32) -> String {
        format!("{}:tm:v:{}:{version}", self.base, env.as_str())
    }

    /// The announcement channel, `{prefix}:meta`.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The connection, made at first use; fails at once while a failed connect is recent.
    async fn conn(&self) -> Result<ConnectionManager, CacheError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        if let Some(until) = *lock(&self.down_until) {
            if Instant::now() < until {
                return Err(CacheError(format!(
                    "redis at {} was unreachable moments ago",
                    display_address(&self.config.url)
                )));
            }
        }
        let timeout = self.config.response_timeout;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_factor(50)
            .set_max_delay(1000);
        let made = self
            .conn
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), manager_config)
            })
            .await;
        match made {
            Ok(c) => Ok(c.clone()),
            Err(e) => {
                *lock(&self.down_until) = Some(Instant::now() + self.config.retry_after);
                Err(CacheError(format!(
                    "redis at {}: {e}",
                    display_address(&self.config.url)
                )))
            }
        }
    }

    /// Runs `script` on `keys` with `args` then the field/value `pairs`.
    async fn write(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
        pairs: &[(String, String)],
    ) -> Result<i64, CacheError> {
        let mut conn = self.conn().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        for (f, v) in pairs {
            inv.arg(f).arg(v);
        }
        inv.invoke_async::<i64>(&mut conn).await.map_err(err)
    }
}

fn display_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once('@').map_or(rest, |(_, r)| r).to_string()
}

#[async_trait]
impl SharedMetaCache for RedisMetaCache {
    async fn current(&self, env: &EnvName) -> Result<Option<(u32, VersionDef)>, CacheError> {
        let mut conn = self.conn().await?;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.current_key(env))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        decode(fields)
    }

    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, CacheError> {
        let mut conn = self.conn().await?;
        let flat: Vec<String> = self
            .read_version
            .key(self.version_key(env, version))
            .arg(ms(self.config.version_ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        let mut fields = HashMap::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            fields.insert(f, v);
        }
        Ok(decode(fields)?.map(|(_, def)| def))
    }

    async fn promote(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<(), CacheError> {
        let message = format!("{}\t{}\t{version}", self.origin, env.as_str());
        let keys = [self.current_key(env), self.version_key(env, version)];
        let args = [
            version.to_string(),
            ms(self.config.current_ttl).to_string(),
            ms(self.config.version_ttl).to_string(),
            self.channel.clone(),
            message,
        ];
        self.write(&self.promote, &keys, &args, &pairs(def)?)
            .await
            .map(|_| ())
    }

    async fn backfill_current(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<bool, CacheError> {
        let keys = [self.current_key(env)];
        let args = [version.to_string(), ms(self.config.current_ttl).to_string()];
        let wrote = self
            .write(&self.backfill_current, &keys, &args, &pairs(def)?)
            .await?;
        Ok(wrote == 1)
    }

    async fn backfill_version(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<(), CacheError> {
        let keys = [self.version_key(env, version)];
        let args = [version.to_string(), ms(self.config.version_ttl).to_string()];
        self.write(&self.backfill_version, &keys, &args, &pairs(def)?)
            .await
            .map(|_| ())
    }

    fn listen(&self, listener: MetaListener) {
        let client = self.client.clone();
        let channel = self.channel.clone();
        let origin = self.origin.clone();
        let retry_after = self.config.retry_after;
        let task = tokio::spawn(async move {
            loop {
                if let Ok(mut pubsub) = client.get_async_pubsub().await {
                    if pubsub.subscribe(&channel).await.is_ok() {
                        if !listener(MetaAnnouncement::Subscribed) {
                            return;
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            let Some(announcement) = parse_announcement(&payload, &origin) else {
                                continue;
                            };
                            if !listener(announcement) {
                                return;
                            }
                        }
                    }
                }
                tokio::time::sleep(retry_after).await;
            }
        });
        if let Some(old) = lock(&self.listener).replace(task) {
            old.abort();
        }
    }
}

/// `<origin>\t<env>\t<version>`; `None` for this process's own and malformed messages.
fn parse_announcement(payload: &str, own: &str) -> Option<MetaAnnouncement> {
    let mut parts = payload.split('\t');
    if parts.next()? == own {
        return None;
    }
    let env = EnvName::new(parts.next()?).ok()?;
    let version = parts.next()?.parse().ok()?;
    Some(MetaAnnouncement::Promoted { env, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_of_this_process_and_malformed_ones_are_skipped() {
        assert_eq!(parse_announcement("me\tdefault\t3", "me"), None);
        assert_eq!(parse_announcement("other\tbad env\t3", "me"), None);
        assert_eq!(parse_announcement("other\tdefault\tx", "me"), None);
        assert_eq!(
            parse_announcement("other\tdefault\t3", "me"),
            Some(MetaAnnouncement::Promoted {
                env: EnvName::new("default").expect("env"),
                version: 3
            })
        );
    }

    #[test]
    fn an_entry_decodes_whole_and_only_with_its_stamp() {
        let def = VersionDef {
            tasks: vec![
                TaskDef::new(runlane_core::TaskName::new("b").expect("task")),
                TaskDef::new(runlane_core::TaskName::new("a").expect("task")),
            ],
        };
        let mut fields: HashMap<String, String> = pairs(&def).expect("pairs").into_iter().collect();
        assert_eq!(decode(fields.clone()).expect("decode"), None, "no stamp");
        fields.insert(STAMP_FIELD.to_string(), "7".to_string());
        let (version, back) = decode(fields.clone()).expect("decode").expect("entry");
        assert_eq!(version, 7);
        let mut sorted = def.tasks.clone();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back.tasks, sorted);
        fields.insert("a".to_string(), "{".to_string());
        assert!(decode(fields).is_err(), "a malformed entry is an error");
    }
}
