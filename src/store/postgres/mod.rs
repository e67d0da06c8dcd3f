//! PostgreSQL: a bounded pool, embedded migrations, and expired rows purged in bounded batches
//! by the background task. The pool connects lazily, so a database that is down at start does
//! not stop the sidecar; calls fail with UNAVAILABLE until it answers.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::batch::Batcher;
use super::cache::{Denial, Entry, Fact, Lookup, Ticket, View};
use super::{
    Beat, Facts, Family, MfaEnrolled, MfaRecord, Registry, Rotation, Session, StepAccept, Store,
    StoreError, Successor, TokenCheck, from_millis, millis,
};
use crate::clock::Clock;
use crate::rules::gcra::{Decision, Gcra};
use crate::secret::Secret;

const BACKEND: &str = "postgres";

/// The columns a [`SessionRow`] reads, as a literal for `concat!`.
macro_rules! session_columns {
    () => {
        "id, subject, created_ms, expires_ms, last_seen_ms, idle_expires_ms, metadata"
    };
}

/// Rows deleted per purge statement, so a purge never holds locks for long.
const PURGE_BATCH: i64 = 1000;

/// The settings of a PostgreSQL store, built by `config`.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: Secret,
    /// A direct connection for the migrations (and the LISTEN feed without a pooler); `None`:
    /// `url`.
    pub direct_url: Option<Secret>,
    /// `url` goes through a pooler in transaction mode.
    pub transaction_pooling: bool,
    pub max_connections: u32,
    /// Apply the migrations and functions at start, in the background.
    pub migrate: bool,
    /// Longest a call may take (also the serving pool's `statement_timeout`).
    pub timeout: Duration,
    /// Memory for the revocation view; 0 for none.
    pub cache: u64,
    /// Most calls of one kind gathered into one round trip while another is in flight (see
    /// `store::batch`); 0 or 1: each call goes alone.
    pub batch: usize,
}

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The functions that restate `rules/`, replaced at every start (see the file's header).
const FUNCTIONS: &str = include_str!("functions.sql");

/// How long the background migration waits to connect before it tries again.
const MIGRATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the embedded migrations over a connection of their own. Not the serving pool: its
/// `statement_timeout` is the request path's (`--backend-timeout`), and a migration, or the
/// wait for another node's migration lock, may rightly take longer than a request may.
pub async fn migrate(database_url: &Secret, connect_timeout: Duration) -> Result<(), StoreError> {
    let options = PgConnectOptions::from_str(database_url.expose_str())
        .map_err(|_| unavailable("invalid DATABASE_URL"))?
        .application_name("auth-sidecar migrate");
    // One attempt first: a pool retries a refused connection until its timeout and then
    // reports only that it timed out, not why.
    let _ = sqlx::Connection::close(connect_once(&options, connect_timeout).await?).await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
    let result = match MIGRATOR.run(&pool).await {
        Ok(()) => apply_functions(&pool).await,
        Err(e) => Err(unavailable(format!("migration failed: {e}"))),
    };
    pool.close().await;
    result
}

/// One connection attempt, its failure in the server's or the network's words.
async fn connect_once(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<sqlx::PgConnection, StoreError> {
    use sqlx::ConnectOptions;
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unavailable(format!("cannot connect: {e}"))),
        Err(_) => Err(unavailable(format!(
            "cannot connect: timed out after {timeout:?}"
        ))),
    }
}

/// Replaces the functions in one transaction, under an advisory lock so that nodes starting
/// together do not trip over each other's `CREATE OR REPLACE`.
async fn apply_functions(pool: &PgPool) -> Result<(), StoreError> {
    let failed = |e: sqlx::Error| unavailable(format!("applying functions failed: {e}"));
    let mut tx = pool.begin().await.map_err(failed)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('auth_sidecar_functions'))")
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    sqlx::raw_sql(FUNCTIONS)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    /// False until the schema is known to be in place.
    ready: Arc<AtomicBool>,
    /// Why `ready` is not set yet.
    pending: super::Pending,
    /// How the pool connects, for a ping that has to say why it cannot.
    options: PgConnectOptions,
    /// The revocation view, kept by a LISTEN connection (none when off).
    view: Option<View>,
    /// Whether statements are prepared by name and kept: not through a transaction pooler,
    /// where the next statement may run on another server connection.
    persistent: bool,
    /// The snapshot horizon the previous purge saw (0 before the first): the change log rows
    /// of transactions before it were committed, and so read by every node's feed, at least
    /// one purge interval ago.
    purged_horizon: Arc<AtomicU64>,
    /// Gathers rate-limit steps (`store::batch`); `None`: each goes alone.
    rate_steps: Option<Batcher<RateStep, RateAnswer>>,
}

/// The change feed's name for a reset of the rate-limit state of (policy, key), under which
/// the revocation view keeps a denial of it. Length-prefixed, so no pair names another's.
fn reset_fact(policy: &str, key: &str) -> String {
    format!("l:{}:{policy}:{key}", policy.len())
}

/// Rate-limit batches in flight at once (each one transaction on a connection of its own).
const RATE_LANES: usize = 2;

/// One rate-limit step as a batch carries it.
struct RateStep {
    policy: String,
    key: String,
    gcra: Gcra,
    cost: u32,
    /// Microseconds since the epoch; `None`: the database's clock.
    at: Option<i64>,
}

/// allowed, remaining, retry_after_us and reset_after_us, as the functions answer.
type RateAnswer = (bool, i64, i64, i64);

/// The serving pool: lazy (a database that is down does not stop the start), bounded, every
/// acquire and statement limited by `--backend-timeout`. (`auth-sidecar migrate` connects
/// eagerly with one connection and a long timeout instead.)
fn pool(config: &PostgresConfig) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.timeout)
        .connect_lazy_with(connect_options(config)?))
}

/// How the serving pool connects. Through a pooler in transaction mode, each statement may
/// run on another server connection: no named prepared statements (the statement cache) and
/// no session settings at connect (a `statement_timeout`, `extra_float_digits`), which the
/// pooler would refuse or leak; the call's own deadline (`bounded`) still holds.
fn connect_options(config: &PostgresConfig) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(config.url.expose_str())
        .map_err(|_| unavailable("invalid DATABASE_URL"))?
        .application_name("auth-sidecar");
    Ok(match config.transaction_pooling {
        true => options.statement_cache_capacity(0).extra_float_digits(None),
        false => with_statement_timeout(options, config.timeout),
    })
}

/// How the change feed connects: directly (LISTEN holds a session), with the serving pool's
/// statement timeout.
fn direct_options(config: &PostgresConfig) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(direct_url(config).expose_str())
        .map_err(|_| unavailable("invalid DATABASE_MIGRATE_URL"))?
        .application_name("auth-sidecar");
    Ok(with_statement_timeout(options, config.timeout))
}

fn with_statement_timeout(options: PgConnectOptions, timeout: Duration) -> PgConnectOptions {
    let statement_timeout = timeout.as_millis().to_string();
    options.options([("statement_timeout", statement_timeout.as_str())])
}

/// The connection for what needs a session of its own.
fn direct_url(config: &PostgresConfig) -> &Secret {
    config.direct_url.as_ref().unwrap_or(&config.url)
}

/// The server the settings name, with how TLS is set up (see [`super::Endpoint`]).
pub(super) fn endpoints(config: &PostgresConfig) -> Vec<super::Endpoint> {
    use sqlx::postgres::PgSslMode;
    let Ok(options) = PgConnectOptions::from_str(config.url.expose_str()) else {
        return Vec::new();
    };
    let host = options.get_socket().map_or_else(
        || options.get_host().to_owned(),
        |s| s.display().to_string(),
    );
    // `prefer` and `allow` may end up in clear text, so they count as not encrypted.
    let (mode, encrypted, verified) = match options.get_ssl_mode() {
        PgSslMode::Disable => ("disable", false, false),
        PgSslMode::Allow => ("allow", false, false),
        PgSslMode::Prefer => ("prefer", false, false),
        PgSslMode::Require => ("require", true, false),
        PgSslMode::VerifyCa => ("verify-ca", true, true),
        PgSslMode::VerifyFull => ("verify-full", true, true),
    };
    vec![super::Endpoint {
        backend: BACKEND,
        address: if host.starts_with('/') {
            host.clone()
        } else {
            format!("{host}:{}", options.get_port())
        },
        local: super::is_local(&host),
        encrypted,
        verified,
        tls: format!("sslmode={mode}"),
    }]
}

/// The server's connection limits, read over a direct connection: `max_connections`, and the
/// connections kept from ordinary roles (`superuser_reserved_connections`, and
/// `reserved_connections` from PostgreSQL 16).
pub async fn server_limits(
    config: &PostgresConfig,
    timeout: Duration,
) -> Result<(i64, i64), StoreError> {
    read_direct(config, timeout, "limits", async |conn| {
        let (max, superuser, reserved): (String, String, Option<String>) = sqlx::query_as(
            "SELECT current_setting('max_connections'), \
             current_setting('superuser_reserved_connections'), \
             current_setting('reserved_connections', true)",
        )
        .fetch_one(conn)
        .await?;
        let number = |s: &str| s.parse::<i64>().unwrap_or(0);
        Ok((
            number(&max),
            number(&superuser) + reserved.as_deref().map_or(0, number),
        ))
    })
    .await
}

/// Whether the migrations that hold the node registry were applied: a database no node has
/// started on yet has no tables, which is no fault.
pub async fn schema_applied(
    config: &PostgresConfig,
    timeout: Duration,
) -> Result<bool, StoreError> {
    read_direct(config, timeout, "schema", async |conn| {
        sqlx::query_scalar("SELECT to_regclass('nodes') IS NOT NULL")
            .fetch_one(conn)
            .await
    })
    .await
}

/// One read of `check-config` over a direct connection of its own, closed after it.
async fn read_direct<T>(
    config: &PostgresConfig,
    timeout: Duration,
    what: &'static str,
    read: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, StoreError> {
    let options = PgConnectOptions::from_str(direct_url(config).expose_str())
        .map_err(|_| unavailable("invalid DATABASE_URL"))?
        .application_name("auth-sidecar check-config");
    let mut conn = connect_once(&options, timeout).await?;
    let answer = super::bounded(BACKEND, what, timeout, read(&mut conn)).await;
    let _ = sqlx::Connection::close(conn).await;
    answer
}

/// The connection of one call (see `PostgresStore::conn`).
enum Conn {
    Pooled(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Pinned(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Conn {
    /// Ends the call: commits a pinning transaction when its statements succeeded (it is rolled
    /// back when dropped otherwise).
    async fn finish<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match self {
            Conn::Pooled(_) => result,
            Conn::Pinned(tx) => {
                let value = result?;
                tx.commit().await?;
                Ok(value)
            }
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        match self {
            Conn::Pooled(c) => c,
            Conn::Pinned(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        match self {
            Conn::Pooled(c) => c,
            Conn::Pinned(tx) => tx,
        }
    }
}

impl PostgresStore {
    /// Returns at once; with `--migrate`, a background task applies the migrations, retrying
    /// with backoff until the database answers.
    pub fn open(
        config: &PostgresConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore {
            pool: pool(config)?,
            clock,
            timeout: config.timeout,
            ready: Arc::new(AtomicBool::new(!config.migrate)),
            pending: super::Pending::default(),
            options: connect_options(config)?,
            view: (config.cache > 0).then(|| View::new(BACKEND, config.cache)),
            persistent: !config.transaction_pooling,
            purged_horizon: Arc::new(AtomicU64::new(0)),
            // Batches in flight at once: each takes a connection of the pool for one
            // transaction; the others are for everything else.
            rate_steps: (config.batch > 1).then(|| {
                Batcher::new(
                    BACKEND,
                    "rate_limit",
                    config.batch,
                    RATE_LANES.min(config.max_connections as usize),
                )
            }),
        };
        // A transaction pooler gives no session to LISTEN on: the view then reads the change
        // log through the pool.
        match &store.view {
            Some(view) if config.transaction_pooling => {
                super::feed::spawn_postgres_log(store.pool.clone(), config.timeout, view.clone());
            }
            Some(view) => {
                super::feed::spawn_postgres(direct_options(config)?, config.timeout, view.clone());
            }
            None => {}
        }
        if config.migrate {
            let ready = store.ready.clone();
            let url = direct_url(config).clone();
            super::retry_in_background(
                BACKEND,
                "migrate",
                store.pending.clone(),
                move || {
                    let url = url.clone();
                    async move { migrate(&url, MIGRATE_CONNECT_TIMEOUT).await }
                },
                move |()| ready.store(true, Ordering::SeqCst),
            );
        }
        Ok(store)
    }

    /// A connection for one call's statements: from the pool or, through a transaction
    /// pooler, inside a transaction. sqlx sends a statement as two round trips (Parse and
    /// Describe, then Bind and Execute, each ending in Sync), and between them a pooler in
    /// transaction mode may give the server connection to another client, whose own unnamed
    /// statement then replaces this one; a transaction keeps one server connection.
    async fn conn(&self) -> Result<Conn, sqlx::Error> {
        Ok(match self.persistent {
            true => Conn::Pooled(self.pool.acquire().await?),
            false => Conn::Pinned(self.pool.begin().await?),
        })
    }

    /// Runs one call's statements on one connection (see `conn`), bounded by the timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(unavailable(self.pending.refusal("schema not migrated")));
        }
        let statements = async {
            let mut conn = self.conn().await?;
            let result = f(&mut conn).await;
            conn.finish(result).await
        };
        super::bounded(BACKEND, op, self.timeout, statements).await
    }

    /// One step alone, in one call of the single step's function.
    async fn rate_limit_one(&self, step: &RateStep) -> Result<RateAnswer, StoreError> {
        self.call("rate_limit", async |conn| {
            sqlx::query_as("SELECT * FROM auth_sidecar_rate_limit($1, $2, $3, $4, $5, $6, $7)")
                .persistent(self.persistent)
                .bind(&step.policy)
                .bind(&step.key)
                .bind(step.gcra.interval_us)
                .bind(step.gcra.burst)
                .bind(step.gcra.lockout_us)
                .bind(i64::from(step.cost))
                .bind(step.at)
                .fetch_one(conn)
                .await
        })
        .await
    }

    /// The steps of a batch in one statement, in the order given (see
    /// `auth_sidecar_rate_limit_many`). A statement that fails fails each step.
    async fn rate_limit_many(&self, steps: Vec<RateStep>) -> Vec<Result<RateAnswer, StoreError>> {
        if let [step] = &steps[..] {
            // A step alone takes the single step's function, which costs the database less.
            return vec![self.rate_limit_one(step).await];
        }
        let n = steps.len();
        let column = |f: fn(&RateStep) -> i64| steps.iter().map(f).collect::<Vec<i64>>();
        let policies: Vec<&str> = steps.iter().map(|s| s.policy.as_str()).collect();
        let keys: Vec<&str> = steps.iter().map(|s| s.key.as_str()).collect();
        let at: Vec<Option<i64>> = steps.iter().map(|s| s.at).collect();
        let rows: Result<Vec<RateAnswer>, StoreError> = self
            .call("rate_limit", async |conn| {
                sqlx::query_as(
                    "SELECT * FROM auth_sidecar_rate_limit_many($1, $2, $3, $4, $5, $6, $7)",
                )
                .persistent(self.persistent)
                .bind(&policies)
                .bind(&keys)
                .bind(column(|s| s.gcra.interval_us))
                .bind(column(|s| s.gcra.burst))
                .bind(column(|s| s.gcra.lockout_us))
                .bind(column(|s| i64::from(s.cost)))
                .bind(&at)
                .fetch_all(conn)
                .await
            })
            .await;
        match rows {
            Ok(rows) if rows.len() == n => rows.into_iter().map(Ok).collect(),
            Ok(rows) => {
                let e = unavailable(format!("rate_limit: {} rows for {n} steps", rows.len()));
                vec![Err(e); n]
            }
            Err(e) => vec![Err(e); n],
        }
    }

    /// Runs a statement that writes the fact `name` (as the change feed names it), then drops
    /// this node's view of it, so that a Validate on this node after the write returns sees
    /// the write without waiting for the notification.
    async fn call_writing<T>(
        &self,
        op: &'static str,
        name: String,
        f: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        let result = self.call(op, f).await;
        if let Some(view) = &self.view {
            view.forget(&name);
        }
        result
    }

    /// Deletes the change log's rows that every node's feed has read: older than ten minutes,
    /// and of a transaction before the horizon the previous purge saw. Age alone would not
    /// do: a transaction that stayed open for longer than that commits rows that are old on
    /// arrival, and they must still be read once. Returns how many rows went.
    async fn purge_change_log(&self) -> Result<usize, StoreError> {
        let before = self.purged_horizon.load(Ordering::Relaxed);
        let mut total = 0;
        loop {
            let (done, horizon): (i64, String) = self
                .call("purge", async |conn| {
                    sqlx::query_as(
                        "WITH gone AS (DELETE FROM change_log WHERE ctid IN \
                         (SELECT ctid FROM change_log WHERE xid < $1::text::xid8 \
                          AND at <= now() - interval '10 minutes' LIMIT $2) RETURNING 1) \
                         SELECT (SELECT count(*) FROM gone), \
                         pg_snapshot_xmin(pg_current_snapshot())::text",
                    )
                    .persistent(self.persistent)
                    .bind(before.to_string())
                    .bind(PURGE_BATCH)
                    .fetch_one(conn)
                    .await
                })
                .await?;
            total += done as usize;
            if done < PURGE_BATCH {
                if let Ok(horizon) = horizon.parse() {
                    self.purged_horizon.store(horizon, Ordering::Relaxed);
                }
                return Ok(total);
            }
        }
    }

    /// Every live session after `after` in id order, at most `limit` of them (tiered refill).
    /// The time on this store's clock.
    pub(super) fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Sessions ended before their absolute end (ids after `after`), with that end: what a
    /// refill copies as tombstones.
    pub(super) async fn session_ends_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let rows: Vec<(String, i64)> = self
            .call("select", async |conn| {
                sqlx::query_as(
                    "SELECT id, expires_ms FROM session_ends WHERE id > $1 AND expires_ms > $2 \
                     ORDER BY id LIMIT $3",
                )
                .persistent(self.persistent)
                .bind(after)
                .bind(millis(self.clock.now()))
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, ends)| (id, from_millis(ends)))
            .collect())
    }

    pub(super) async fn live_sessions_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Session>, StoreError> {
        let rows: Vec<SessionRow> = self
            .call("select", async |conn| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id > $1 AND live_until_ms > $2 \
                     ORDER BY id LIMIT $3"
                ))
                .persistent(self.persistent)
                .bind(after)
                .bind(millis(self.clock.now()))
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(Session::from).collect())
    }

    /// Every live cutoff after `after` in subject order: (subject, cutoff, until).
    pub(super) async fn live_cutoffs_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, SystemTime, SystemTime)>, StoreError> {
        let rows: Vec<(String, i64, i64)> = self
            .call("select", async |conn| {
                sqlx::query_as(
                    "SELECT subject, cutoff_ms, expires_ms FROM subject_cutoffs \
                     WHERE subject > $1 AND expires_ms > $2 ORDER BY subject LIMIT $3",
                )
                .persistent(self.persistent)
                .bind(after)
                .bind(millis(self.clock.now()))
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(s, c, u)| (s, from_millis(c), from_millis(u)))
            .collect())
    }

    /// Every live family after `after` in id order, with whether it is revoked.
    pub(super) async fn live_families_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(Family, bool)>, StoreError> {
        let rows: Vec<FamilyRow> = self
            .call("select", async |conn| {
                sqlx::query_as(
                    "SELECT id, subject, expires_ms, current_id, revoked FROM token_families \
                     WHERE id > $1 AND expires_ms > $2 ORDER BY id LIMIT $3",
                )
                .persistent(self.persistent)
                .bind(after)
                .bind(millis(self.clock.now()))
                .bind(limit)
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(FamilyRow::into_parts).collect())
    }

    /// A family's subject, end and whether it is revoked, as the row holds them.
    pub(super) async fn family(&self, id: &str) -> Result<Option<(Family, bool)>, StoreError> {
        let row: Option<FamilyRow> = self
            .call("select", async |conn| {
                sqlx::query_as(
                    "SELECT id, subject, expires_ms, current_id, revoked FROM token_families \
                     WHERE id = $1",
                )
                .persistent(self.persistent)
                .bind(id)
                .fetch_optional(conn)
                .await
            })
            .await?;
        Ok(row.map(FamilyRow::into_parts))
    }

    /// Ends a session: whether it was live, and its absolute end if there was one.
    pub(super) async fn end_session(
        &self,
        id: &str,
        now: SystemTime,
    ) -> Result<(bool, Option<SystemTime>), StoreError> {
        let (live, ends): (bool, Option<i64>) = self
            .call_writing("end_session", format!("s:{id}"), async |conn| {
                sqlx::query_as("SELECT * FROM auth_sidecar_end_session($1, $2)")
                    .persistent(self.persistent)
                    .bind(id)
                    .bind(millis(now))
                    .fetch_one(conn)
                    .await
            })
            .await?;
        Ok((live, ends.map(from_millis)))
    }

    /// Logout everywhere at `cutoff`: the sessions it ended.
    pub(super) async fn logout(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<Vec<EndedSession>, StoreError> {
        let rows: Vec<(String, i64, bool)> = self
            .call_writing("logout", format!("c:{subject}"), async |conn| {
                sqlx::query_as("SELECT * FROM auth_sidecar_logout($1, $2, $3, $4)")
                    .persistent(self.persistent)
                    .bind(subject)
                    .bind(millis(cutoff))
                    .bind(millis(until))
                    .bind(millis(cutoff))
                    .fetch_all(conn)
                    .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, expires_ms, live)| EndedSession {
                id,
                expires_at: from_millis(expires_ms),
                live,
            })
            .collect())
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
                async |conn| sqlx::query_as(
                    "SELECT token_id, (extract(epoch FROM expires_at) * 1000)::int8 \
                     FROM revoked_tokens WHERE token_id > $1 AND expires_at > to_timestamp($2 / 1000.0) \
                     ORDER BY token_id LIMIT $3",
                )
.persistent(self.persistent)
                .bind(after)
                .bind(now)
                .bind(limit)
                .fetch_all(conn).await,
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
            .call_writing("insert", format!("r:{token_id}"), async |conn| {
                sqlx::query_as(
                    "INSERT INTO revoked_tokens (token_id, expires_at) \
                     VALUES ($1, to_timestamp($2 / 1000.0)) \
                     ON CONFLICT (token_id) DO UPDATE \
                     SET expires_at = GREATEST(revoked_tokens.expires_at, EXCLUDED.expires_at) \
                     RETURNING (xmax = 0)",
                )
                .persistent(self.persistent)
                .bind(token_id)
                .bind(millis(until))
                .fetch_one(conn)
                .await
            })
            .await?;
        Ok(inserted)
    }

    async fn is_revoked(&self, t: &TokenCheck<'_>) -> Result<bool, StoreError> {
        // The facts by their names in the change feed (the `change_feed` migration).
        let names = [
            Some(format!("r:{}", t.token_id)),
            Some(format!("c:{}", t.subject)),
            t.session_id.map(|id| format!("s:{id}")),
            t.family_id.map(|id| format!("f:{id}")),
        ];
        let now_ms = millis(t.now);
        let mut facts: [Fact; 4] = [None; 4];
        let mut tickets: [Option<Ticket>; 4] = Default::default();
        let mut held = [false; 4];
        let mut read = false;
        for (i, name) in names.iter().enumerate() {
            let Some(name) = name else { continue };
            match self
                .view
                .as_ref()
                .filter(|_| !t.fresh)
                .map(|v| v.lookup(name, now_ms))
            {
                Some(Lookup::Hit(entry)) => (facts[i], held[i]) = (entry.fact, true),
                Some(Lookup::Miss(ticket)) => (tickets[i], read) = (Some(ticket), true),
                Some(Lookup::Bypass) | None => read = true,
            }
        }
        if read {
            // Every fact in one round trip, as they stand (expiry is judged below, against
            // the caller's clock, so that a kept fact still ends on time).
            let row: Result<(Fact, Fact, Fact, Fact), _> = self
                .call("check", async |conn| {
                    sqlx::query_as(
                        "SELECT \
                         (SELECT (extract(epoch FROM expires_at) * 1000)::bigint \
                          FROM revoked_tokens WHERE token_id = $1), \
                         (SELECT cutoff_ms FROM subject_cutoffs WHERE subject = $2 \
                          AND expires_ms > $5), \
                         (SELECT live_until_ms FROM sessions WHERE id = $3), \
                         (SELECT CASE WHEN revoked THEN -1 ELSE expires_ms END \
                          FROM token_families WHERE id = $4)",
                    )
                    .persistent(self.persistent)
                    .bind(t.token_id)
                    .bind(t.subject)
                    .bind(t.session_id)
                    .bind(t.family_id)
                    .bind(now_ms)
                    .fetch_one(conn)
                    .await
                })
                .await;
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    for (name, ticket) in names.iter().zip(tickets) {
                        if let (Some(view), Some(name), Some(ticket)) = (&self.view, name, ticket) {
                            view.abandon(name, ticket);
                        }
                    }
                    return Err(e);
                }
            };
            let fresh = [row.0, row.1, row.2, row.3];
            for i in 0..4 {
                if names[i].is_none() {
                    continue;
                }
                if let (Some(view), Some(name), Some(ticket)) =
                    (&self.view, &names[i], tickets[i].take())
                {
                    view.fill(name, ticket, Entry::fact(fresh[i], t.accepted_until_ms));
                }
                // The statement reads every fact, so a fact the view held is read again, later
                // than the view's copy: if they differ the copy is stale (its notification is
                // on its way), and the next call must not answer it after this one answered
                // the newer.
                if let (Some(view), Some(name), true) = (&self.view, &names[i], held[i])
                    && facts[i] != fresh[i]
                {
                    view.forget(name);
                }
                facts[i] = fresh[i];
            }
        }
        let [revoked, cutoff, session, family] = facts;
        let facts = Facts {
            revoked,
            cutoff,
            session,
            family,
        };
        Ok(facts.revoke(t) || facts.missing(t))
    }

    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError> {
        let ended = self.logout(subject, cutoff, until).await?;
        Ok(ended.iter().filter(|e| e.live).count() as u32)
    }

    async fn create_session(&self, s: &Session) -> Result<(), StoreError> {
        self.call_writing("insert", format!("s:{}", s.id), async |conn| {
            sqlx::query(
                "INSERT INTO sessions (id, subject, created_ms, expires_ms, last_seen_ms, \
                 idle_expires_ms, live_until_ms, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .persistent(self.persistent)
            .bind(&s.id)
            .bind(&s.subject)
            .bind(millis(s.created_at))
            .bind(millis(s.expires_at))
            .bind(millis(s.last_seen_at))
            .bind(s.idle_expires_at.map(millis))
            .bind(millis(s.live_until()))
            .bind(sqlx::types::Json(&s.metadata))
            .execute(conn)
            .await
        })
        .await
        .map(drop)
    }

    async fn get_session(&self, id: &str, now: SystemTime) -> Result<Option<Session>, StoreError> {
        let row: Option<SessionRow> = self
            .call("select", async |conn| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id = $1 AND live_until_ms > $2"
                ))
                .persistent(self.persistent)
                .bind(id)
                .bind(millis(now))
                .fetch_optional(conn)
                .await
            })
            .await?;
        Ok(row.map(Session::from))
    }

    async fn touch_session(
        &self,
        id: &str,
        now: SystemTime,
        idle_until: Option<SystemTime>,
    ) -> Result<Option<Session>, StoreError> {
        let row: Option<SessionRow> = self
            .call_writing("touch_session", format!("s:{id}"), async |conn| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM auth_sidecar_touch_session($1, $2, $3)"
                ))
                .persistent(self.persistent)
                .bind(id)
                .bind(millis(now))
                .bind(idle_until.map(millis))
                .fetch_optional(conn)
                .await
            })
            .await?;
        Ok(row.map(Session::from))
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        Ok(self.end_session(id, now).await?.0)
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: SystemTime,
    ) -> Result<Vec<Session>, StoreError> {
        let rows: Vec<SessionRow> = self
            .call("select", async |conn| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions \
                     WHERE subject = $1 AND live_until_ms > $2 ORDER BY created_ms, id"
                ))
                .persistent(self.persistent)
                .bind(subject)
                .bind(millis(now))
                .fetch_all(conn)
                .await
            })
            .await?;
        Ok(rows.into_iter().map(Session::from).collect())
    }

    async fn create_family(&self, f: &Family) -> Result<(), StoreError> {
        self.call_writing("insert", format!("f:{}", f.id), async |conn| {
            sqlx::query(
                "INSERT INTO token_families (id, subject, expires_ms, current_id) \
                 VALUES ($1, $2, $3, $4)",
            )
            .persistent(self.persistent)
            .bind(&f.id)
            .bind(&f.subject)
            .bind(millis(f.expires_at))
            .bind(&f.current)
            .execute(conn)
            .await
        })
        .await
        .map(drop)
    }

    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        presented_revoked: bool,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        let (outcome, ends, refresh, access, iat): Rotated = self
            .call_writing("rotate", format!("f:{family_id}"), async |conn| {
                sqlx::query_as("SELECT * FROM auth_sidecar_rotate($1, $2, $3, $4, $5, $6, $7, $8)")
                    .persistent(self.persistent)
                    .bind(family_id)
                    .bind(presented)
                    .bind(&successor.refresh_id)
                    .bind(&successor.access_id)
                    .bind(successor.issued_at_ms)
                    .bind(millis(now))
                    .bind(millis(replay_until))
                    .bind(presented_revoked)
                    .fetch_one(conn)
                    .await
            })
            .await?;
        let family_ends = from_millis(ends.unwrap_or(0));
        Ok(match (outcome.as_str(), refresh, access, iat) {
            ("rotated", ..) => Rotation::Rotated { family_ends },
            ("replay", Some(refresh_id), Some(access_id), Some(issued_at_ms)) => Rotation::Replay {
                successor: Successor {
                    refresh_id,
                    access_id,
                    issued_at_ms,
                },
                family_ends,
            },
            ("reused", ..) => Rotation::Reused,
            _ => Rotation::Gone,
        })
    }

    async fn heartbeat(&self, me: Beat<'_>, ttl: Duration) -> Result<Registry, StoreError> {
        let persistent = self.persistent;
        let ttl_ms = ttl.as_millis() as i64;
        self.call("heartbeat", async |conn| {
            // The nonce under this id before this write, if it was live.
            let (before,): (Option<String>,) = sqlx::query_as(
                "WITH before AS (SELECT nonce FROM nodes WHERE id = $1 AND live_until > now()) \
                 INSERT INTO nodes (id, document, live_until, digest, nonce) \
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond', $4, $5) \
                 ON CONFLICT (id) DO UPDATE \
                 SET document = EXCLUDED.document, live_until = EXCLUDED.live_until, \
                 digest = EXCLUDED.digest, nonce = EXCLUDED.nonce \
                 RETURNING (SELECT nonce FROM before)",
            )
            .persistent(persistent)
            .bind(me.id)
            .bind(me.document)
            .bind(ttl_ms)
            .bind(me.digest)
            .bind(me.nonce)
            .fetch_one(&mut *conn)
            .await?;
            // A deadline further than `ttl` ahead was not written by a heartbeat: one forged
            // row must not stay for good. Both ends are on the index.
            sqlx::query(
                "DELETE FROM nodes WHERE live_until <= now() \
                 OR live_until > now() + $1 * interval '1 millisecond'",
            )
            .persistent(persistent)
            .bind(ttl_ms)
            .execute(&mut *conn)
            .await?;
            // One row per digest (NULL for rows without one), with a sum over the ids that
            // moves when a node joins or leaves, and the first ids.
            let groups: Vec<(Option<String>, i64, i64, Vec<String>)> = sqlx::query_as(
                "SELECT digest, count(*), coalesce(sum(hashtext(id)), 0)::bigint, \
                 (array_agg(id ORDER BY id))[1:$2] \
                 FROM nodes WHERE live_until > now() \
                 AND live_until <= now() + $1 * interval '1 millisecond' GROUP BY digest",
            )
            .persistent(persistent)
            .bind(ttl_ms)
            .bind(Registry::LISTED as i32 + 1)
            .fetch_all(&mut *conn)
            .await?;
            Ok((before, groups))
        })
        .await
        .map(|(before, mut groups)| {
            // In one order, so that the generation moves only with what it sums up.
            groups.sort();
            let mut registry = Registry {
                taken: before.is_some_and(|b| b != me.nonce),
                ..Registry::default()
            };
            let mut generation = std::hash::DefaultHasher::new();
            for (digest, count, ids_sum, ids) in groups {
                std::hash::Hash::hash(&(&digest, count, ids_sum), &mut generation);
                registry.live += count as usize;
                registry.ids.extend(ids);
                match digest {
                    Some(digest) => registry.digests.push((digest, count as usize)),
                    None => registry.undigested += count as usize,
                }
            }
            registry.digests.sort();
            registry.generation = std::hash::Hasher::finish(&generation);
            registry.ids.sort();
            if registry.live > Registry::LISTED {
                registry.ids.clear();
            }
            registry
        })
    }

    async fn nodes(
        &self,
        ttl: Duration,
        unlike: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let persistent = self.persistent;
        self.call("nodes", async |conn| {
            sqlx::query_as(
                "SELECT id, document FROM nodes WHERE live_until > now() \
                 AND live_until <= now() + $1 * interval '1 millisecond' \
                 AND ($2::text IS NULL OR digest IS DISTINCT FROM $2) ORDER BY id",
            )
            .persistent(persistent)
            .bind(ttl.as_millis() as i64)
            .bind(unlike)
            .fetch_all(&mut *conn)
            .await
        })
        .await
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        self.call("leave", async |conn| {
            sqlx::query("DELETE FROM nodes WHERE id = $1")
                .persistent(self.persistent)
                .bind(node)
                .execute(conn)
                .await
        })
        .await
        .map(|_| ())
    }

    async fn mfa_begin(
        &self,
        subject: &str,
        sealed: &str,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        self.call("mfa_begin", async |conn| {
            sqlx::query(
                "INSERT INTO mfa (subject, pending, pending_until_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (subject) DO UPDATE \
                 SET pending = EXCLUDED.pending, pending_until_ms = EXCLUDED.pending_until_ms",
            )
            .persistent(self.persistent)
            .bind(subject)
            .bind(sealed)
            .bind(millis(until))
            .execute(conn)
            .await
        })
        .await
        .map(|_| ())
    }

    async fn mfa_get(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, StoreError> {
        type Row = (
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<i64>,
            i64,
            i32,
        );
        let row: Option<Row> = self
            .call("mfa_get", async |conn| {
                sqlx::query_as(
                    "SELECT pending, pending_until_ms, secret, enrolled_ms, last_step, \
                     cardinality(backup_codes) FROM mfa WHERE subject = $1",
                )
                .persistent(self.persistent)
                .bind(subject)
                .fetch_optional(conn)
                .await
            })
            .await?;
        let Some((pending, until, secret, enrolled_ms, last_step, codes)) = row else {
            return Ok(MfaRecord::default());
        };
        Ok(MfaRecord {
            pending: pending
                .zip(until)
                .filter(|(_, until)| *until > millis(now))
                .map(|(p, until)| (p, from_millis(until))),
            enrolled: secret.map(|secret| MfaEnrolled {
                secret,
                enrolled_at: from_millis(enrolled_ms.unwrap_or(0)),
                last_step,
                backup_codes: codes.max(0) as u32,
            }),
        })
    }

    async fn mfa_confirm(
        &self,
        subject: &str,
        sealed: &str,
        reseal: Option<&str>,
        step: i64,
        backup: &[String],
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        // Under the row's lock; a second confirm waiting on it re-reads the row, finds no
        // pending enrollment, and changes nothing.
        let done = self
            .call("mfa_confirm", async |conn| {
                sqlx::query(
                    "UPDATE mfa SET secret = coalesce($6, pending), enrolled_ms = $3, \
                     last_step = $4, backup_codes = $5, pending = NULL, pending_until_ms = NULL \
                     WHERE subject = $1 AND pending = $2 AND pending_until_ms > $3",
                )
                .persistent(self.persistent)
                .bind(subject)
                .bind(sealed)
                .bind(millis(now))
                .bind(step)
                .bind(backup)
                .bind(reseal)
                .execute(conn)
                .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mfa_accept(
        &self,
        subject: &str,
        sealed: &str,
        step: i64,
        reseal: Option<&str>,
    ) -> Result<StepAccept, StoreError> {
        let (accepted, enrolled): (i64, Option<bool>) = self
            .call("mfa_accept", async |conn| {
                sqlx::query_as(
                    "WITH accepted AS (UPDATE mfa SET last_step = $3, \
                       secret = coalesce($4, secret) \
                       WHERE subject = $1 AND secret = $2 AND last_step < $3 RETURNING 1) \
                     SELECT (SELECT count(*) FROM accepted), \
                       (SELECT secret = $2 FROM mfa WHERE subject = $1)",
                )
                .persistent(self.persistent)
                .bind(subject)
                .bind(sealed)
                .bind(step)
                .bind(reseal)
                .fetch_one(conn)
                .await
            })
            .await?;
        Ok(match (accepted, enrolled) {
            (1, _) => StepAccept::Accepted,
            (_, Some(true)) => StepAccept::Replayed,
            _ => StepAccept::NotEnrolled,
        })
    }

    async fn mfa_spend_backup(
        &self,
        subject: &str,
        candidates: &[String],
    ) -> Result<Option<u32>, StoreError> {
        let left: Option<i32> = self
            .call("mfa_spend_backup", async |conn| {
                sqlx::query_scalar(
                    "UPDATE mfa SET backup_codes = \
                       array(SELECT c FROM unnest(backup_codes) AS c WHERE c <> ALL($2)) \
                     WHERE subject = $1 AND secret IS NOT NULL AND backup_codes && $2 \
                     RETURNING cardinality(backup_codes)",
                )
                .persistent(self.persistent)
                .bind(subject)
                .bind(candidates)
                .fetch_optional(conn)
                .await
            })
            .await?;
        Ok(left.map(|n| n.max(0) as u32))
    }

    async fn mfa_set_backup(&self, subject: &str, backup: &[String]) -> Result<bool, StoreError> {
        let done = self
            .call("mfa_set_backup", async |conn| {
                sqlx::query(
                    "UPDATE mfa SET backup_codes = $2 WHERE subject = $1 AND secret IS NOT NULL",
                )
                .persistent(self.persistent)
                .bind(subject)
                .bind(backup)
                .execute(conn)
                .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mfa_disable(&self, subject: &str, now: SystemTime) -> Result<bool, StoreError> {
        let live: Option<bool> = self
            .call("mfa_disable", async |conn| {
                sqlx::query_scalar(
                    "DELETE FROM mfa WHERE subject = $1 \
                     RETURNING secret IS NOT NULL OR pending_until_ms > $2",
                )
                .persistent(self.persistent)
                .bind(subject)
                .bind(millis(now))
                .fetch_optional(conn)
                .await
            })
            .await?;
        Ok(live == Some(true))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let result = self
            .call("ping", async |conn| {
                sqlx::query("SELECT 1")
                    .persistent(self.persistent)
                    .execute(conn)
                    .await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // The pool says only that no connection came in time: one attempt of its own
            // says why (refused, a password, a certificate), for the log and `/healthz`.
            Err(e) if e.detail.contains("pool timed out") => {
                match connect_once(&self.options, self.timeout).await {
                    Ok(conn) => {
                        let _ = sqlx::Connection::close(conn).await;
                        Err(e)
                    }
                    Err(why) => Err(unavailable(format!("ping: {}", why.detail))),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        p: Gcra,
        cost: u32,
        at: Option<SystemTime>,
    ) -> Result<Decision, StoreError> {
        let step = RateStep {
            policy: policy.to_owned(),
            key: key.to_owned(),
            gcra: p,
            cost,
            at: at.map(super::micros),
        };
        let answer = async {
            match &self.rate_steps {
                Some(batcher) => {
                    let lane = || {
                        let store = self.clone();
                        move |steps| {
                            let store = store.clone();
                            async move { store.rate_limit_many(steps).await }
                        }
                    };
                    batcher.submit(step, self.timeout, lane).await
                }
                None => self.rate_limit_one(&step).await,
            }
        };
        let denials = self.view.as_ref().filter(|_| at.is_none());
        Denial::through(denials, &reset_fact(policy, key), p, cost, answer).await
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        let fact = reset_fact(policy, key);
        self.call_writing("reset_rate_limit", fact.clone(), async |conn| {
            sqlx::query("SELECT auth_sidecar_reset_rate_limit($1, $2, $3)")
                .persistent(self.persistent)
                .bind(policy)
                .bind(key)
                .bind(&fact)
                .execute(conn)
                .await
        })
        .await
        .map(|_| ())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = millis(self.clock.now());
        let mut total = 0;
        // Every table, each in bounded batches by its expiry index.
        for sql in [
            "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions \
             WHERE live_until_ms <= $1 LIMIT $2)",
            "DELETE FROM session_ends WHERE id IN (SELECT id FROM session_ends \
             WHERE expires_ms <= $1 LIMIT $2)",
            "DELETE FROM subject_cutoffs WHERE subject IN (SELECT subject FROM subject_cutoffs \
             WHERE expires_ms <= $1 LIMIT $2)",
            "DELETE FROM token_families WHERE id IN (SELECT id FROM token_families \
             WHERE expires_ms <= $1 LIMIT $2)",
            "DELETE FROM revoked_tokens WHERE token_id IN \
             (SELECT token_id FROM revoked_tokens \
              WHERE expires_at <= to_timestamp($1 / 1000.0) LIMIT $2)",
            "DELETE FROM rate_limits WHERE (policy, key) IN \
             (SELECT policy, key FROM rate_limits \
              WHERE expires_at <= to_timestamp($1 / 1000.0) LIMIT $2)",
            "DELETE FROM mfa WHERE subject IN (SELECT subject FROM mfa \
             WHERE secret IS NULL AND pending_until_ms <= $1 LIMIT $2)",
        ] {
            loop {
                let done = self
                    .call("purge", async |conn| {
                        sqlx::query(sql)
                            .persistent(self.persistent)
                            .bind(now)
                            .bind(PURGE_BATCH)
                            .execute(conn)
                            .await
                    })
                    .await?
                    .rows_affected() as usize;
                total += done;
                if done < PURGE_BATCH as usize {
                    break;
                }
            }
        }
        total += self.purge_change_log().await?;
        Ok(total)
    }
}

/// A session a logout ended.
pub(super) struct EndedSession {
    pub id: String,
    /// Its absolute end: how long its tombstone must live.
    pub expires_at: SystemTime,
    /// Whether it was live at the logout (`rules::session::ended_by_logout` counts those).
    pub live: bool,
}

/// The answer of `auth_sidecar_rotate`: outcome, family end, and the successor on a replay.
type Rotated = (
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// A family as Validate needs it (for a tiered mirror), and whether it is revoked.
#[derive(sqlx::FromRow)]
struct FamilyRow {
    id: String,
    subject: String,
    expires_ms: i64,
    current_id: String,
    revoked: bool,
}

impl FamilyRow {
    fn into_parts(self) -> (Family, bool) {
        let family = Family {
            id: self.id,
            subject: self.subject,
            expires_at: from_millis(self.expires_ms),
            current: self.current_id,
        };
        (family, self.revoked)
    }
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    subject: String,
    created_ms: i64,
    expires_ms: i64,
    last_seen_ms: i64,
    idle_expires_ms: Option<i64>,
    metadata: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
}

impl From<SessionRow> for Session {
    fn from(r: SessionRow) -> Session {
        Session {
            id: r.id,
            subject: r.subject,
            created_at: from_millis(r.created_ms),
            expires_at: from_millis(r.expires_ms),
            last_seen_at: from_millis(r.last_seen_ms),
            idle_expires_at: r.idle_expires_ms.map(from_millis),
            metadata: r.metadata.0,
        }
    }
}

fn unavailable(detail: impl Into<String>) -> StoreError {
    StoreError {
        backend: BACKEND,
        detail: detail.into(),
    }
}
