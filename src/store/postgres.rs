//! PostgreSQL: a bounded pool, embedded migrations, and expired rows purged in bounded batches
//! by the background task. The pool connects lazily, so a database that is down at start does
//! not stop the sidecar; calls fail with UNAVAILABLE until it answers.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Store, StoreError};
use crate::clock::Clock;
use crate::config::{Config, Secret};
use crate::ratelimit::{Decision, Gcra};

const BACKEND: &str = "postgres";

/// Rows deleted per purge statement, so a purge never holds locks for long.
const PURGE_BATCH: i64 = 1000;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long the background migration waits to connect before it tries again.
const MIGRATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the embedded migrations over a connection of their own. Not the serving pool: its
/// `statement_timeout` is the request path's (`--backend-timeout`), and a migration, or the
/// wait for another node's migration lock, may rightly take longer than a request may.
pub async fn migrate(database_url: &Secret, connect_timeout: Duration) -> Result<(), StoreError> {
    let options = PgConnectOptions::from_str(database_url.expose_str())
        .map_err(|_| unavailable("invalid DATABASE_URL"))?
        .application_name("auth-sidecar migrate");
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
    let result = MIGRATOR.run(&pool).await;
    pool.close().await;
    result.map_err(|e| unavailable(format!("migration failed: {e}")))
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    /// False until the schema is known to be in place.
    ready: Arc<AtomicBool>,
}

/// The serving pool: lazy (a database that is down does not stop the start), bounded, every
/// acquire and statement limited by `--backend-timeout`. (`auth-sidecar migrate` connects
/// eagerly with one connection and a long timeout instead.)
fn pool(config: &Config) -> Result<PgPool, StoreError> {
    let url = config
        .database_url
        .as_ref()
        .ok_or_else(|| unavailable("no DATABASE_URL"))?;
    let statement_timeout = config.backend_timeout.as_millis().to_string();
    let options = PgConnectOptions::from_str(url.expose_str())
        .map_err(|_| unavailable("invalid DATABASE_URL"))?
        .application_name("auth-sidecar")
        .options([("statement_timeout", statement_timeout.as_str())]);
    Ok(PgPoolOptions::new()
        .max_connections(config.db_max_connections)
        .acquire_timeout(config.backend_timeout)
        .connect_lazy_with(options))
}

impl PostgresStore {
    /// Returns at once; with `--migrate`, a background task applies the migrations, retrying
    /// with backoff until the database answers.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore {
            pool: pool(config)?,
            clock,
            timeout: config.backend_timeout,
            ready: Arc::new(AtomicBool::new(!config.migrate)),
        };
        if config.migrate {
            let ready = store.ready.clone();
            let url = config
                .database_url
                .clone()
                .ok_or_else(|| unavailable("no DATABASE_URL"))?;
            super::retry_in_background(
                BACKEND,
                "migrate",
                move || {
                    let url = url.clone();
                    async move { migrate(&url, MIGRATE_CONNECT_TIMEOUT).await }
                },
                move |()| ready.store(true, Ordering::SeqCst),
            );
        }
        Ok(store)
    }

    async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(unavailable("schema not migrated yet"));
        }
        super::bounded(BACKEND, op, self.timeout, f).await
    }

    /// Until when `token_id` is revoked, if it is.
    pub(super) async fn revoked_until(
        &self,
        token_id: &str,
    ) -> Result<Option<SystemTime>, StoreError> {
        let now = millis(self.clock.now());
        let row: Option<(i64,)> = self
            .call(
                "select",
                sqlx::query_as(
                    "SELECT (extract(epoch FROM expires_at) * 1000)::int8 FROM revoked_tokens \
                     WHERE token_id = $1 AND expires_at > to_timestamp($2 / 1000.0)",
                )
                .bind(token_id)
                .bind(now)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(row.map(|(t,)| from_millis(t)))
    }

    /// Every live revocation after `after` in token id order, at most `limit` of them.
    pub(super) async fn live_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let now = millis(self.clock.now());
        let rows: Vec<(String, i64)> = self
            .call(
                "select",
                sqlx::query_as(
                    "SELECT token_id, (extract(epoch FROM expires_at) * 1000)::int8 \
                     FROM revoked_tokens WHERE token_id > $1 AND expires_at > to_timestamp($2 / 1000.0) \
                     ORDER BY token_id LIMIT $3",
                )
                .bind(after)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, t)| (id, from_millis(t)))
            .collect())
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        // `xmax = 0` holds only for a row this statement inserted.
        let (inserted,): (bool,) = self
            .call(
                "insert",
                sqlx::query_as(
                    "INSERT INTO revoked_tokens (token_id, expires_at) \
                     VALUES ($1, to_timestamp($2 / 1000.0)) \
                     ON CONFLICT (token_id) DO UPDATE \
                     SET expires_at = GREATEST(revoked_tokens.expires_at, EXCLUDED.expires_at) \
                     RETURNING (xmax = 0)",
                )
                .bind(token_id)
                .bind(millis(until))
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(inserted)
    }

    async fn is_revoked(&self, token_id: &str) -> Result<bool, StoreError> {
        Ok(self.revoked_until(token_id).await?.is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .map(|_| ())
    }

    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        p: Gcra,
        cost: u32,
    ) -> Result<Decision, StoreError> {
        let (allowed, remaining, retry_us, reset_us): (bool, i64, i64, i64) = self
            .call(
                "rate_limit",
                sqlx::query_as("SELECT * FROM auth_sidecar_rate_limit($1, $2, $3, $4, $5, $6)")
                    .bind(policy)
                    .bind(key)
                    .bind(p.interval_us)
                    .bind(p.burst)
                    .bind(p.lockout_us)
                    .bind(cost as i64)
                    .fetch_one(&self.pool),
            )
            .await?;
        Ok(Decision::from_micros(
            allowed, p, remaining, retry_us, reset_us,
        ))
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        self.call(
            "delete",
            sqlx::query("DELETE FROM rate_limits WHERE policy = $1 AND key = $2")
                .bind(policy)
                .bind(key)
                .execute(&self.pool),
        )
        .await
        .map(|_| ())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = millis(self.clock.now());
        let mut total = 0;
        // Both tables, each in bounded batches by its expiry index.
        for sql in [
            "DELETE FROM revoked_tokens WHERE token_id IN \
             (SELECT token_id FROM revoked_tokens \
              WHERE expires_at <= to_timestamp($1 / 1000.0) LIMIT $2)",
            "DELETE FROM rate_limits WHERE (policy, key) IN \
             (SELECT policy, key FROM rate_limits \
              WHERE expires_at <= to_timestamp($1 / 1000.0) LIMIT $2)",
        ] {
            loop {
                let done = self
                    .call(
                        "purge",
                        sqlx::query(sql)
                            .bind(now)
                            .bind(PURGE_BATCH)
                            .execute(&self.pool),
                    )
                    .await?
                    .rows_affected() as usize;
                total += done;
                if done < PURGE_BATCH as usize {
                    break;
                }
            }
        }
        Ok(total)
    }
}

/// Milliseconds since the epoch: how instants cross into SQL (`to_timestamp($n / 1000.0)`).
fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn unavailable(detail: impl Into<String>) -> StoreError {
    StoreError {
        backend: BACKEND,
        detail: detail.into(),
    }
}
