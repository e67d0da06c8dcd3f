//! The typed configuration: read once in `main` from flags, the environment and an optional
//! TOML file (in that order of precedence), validated, then passed down.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, FromArgMatches};

pub use crate::secret::Secret;
pub use crate::store::{PostgresConfig, RedisConfig, RedisTls, StoreConfig};
pub use crate::units::{parse_duration, parse_size};

/// Shortest HMAC secret accepted: 256 bits, the strength of HS256.
pub const MIN_SECRET_LEN: usize = 32;

/// What `serve --help` lists after the flags: settings read from the environment only (a PIN
/// has no flag, so that it never shows in the process list), named without their values.
pub const ENVIRONMENT_ONLY: &str = "\
Read from the environment only (no flag; never printed):
  CRYPTOKI_LIB                  The PKCS#11 module, for keys in an HSM (source = \"pkcs11\")
  PKCS11_PIN                    The HSM token's user PIN
  PKCS11_PIN_FILE               A file whose first line is the PIN (a mounted Secret)
  TOKIO_WORKER_THREADS          Worker threads [default: one per core]
  RUST_LOG                      Log filter, when --log-level is unset [default: info]
  OTEL_EXPORTER_OTLP_ENDPOINT   Export traces over OTLP/gRPC (with the other OTEL_* variables)";

/// Flags of `auth-sidecar serve`. Every field also has an environment name and may be set in
/// the `--config` file under its flag name with `_` for `-` (`max_ttl = "12h"`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with settings; flags and the environment take precedence over it.
    #[arg(long, env = "AUTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address of the token API: HOST:PORT, or unix:/path.sock for a Unix socket. Keep it on
    /// loopback: anything that can reach it can mint tokens.
    #[arg(long, env = "AUTH_LISTEN", default_value = "127.0.0.1:50051", value_parser = parse_listen)]
    pub listen: Listen,

    /// Address of the ops listener (grpc.health.v1 and GET /healthz, for the kubelet). The
    /// token API is never served there.
    #[arg(long, env = "AUTH_OPS_LISTEN", default_value = "0.0.0.0:8081")]
    pub ops_listen: SocketAddr,

    /// Where state shared by replicas lives: memory (one node only), redis, postgres, or
    /// tiered (Redis in front of PostgreSQL).
    #[arg(long, env = "AUTH_STORAGE", default_value = "memory", value_enum)]
    pub storage: Storage,

    /// Redis URL (redis:// or rediss:// for TLS); with --redis-cluster, one or more
    /// comma-separated seed node URLs.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_name = "URL")]
    pub redis_url: Option<Secret>,

    /// A Redis replica of --redis-url (or a Service over several) that carries this node's
    /// revocation feed instead of the primary, so that the fan-out of invalidations to many
    /// nodes is the replicas' work. Probes written to the primary prove that the replica keeps
    /// up; one that lags past the view's bound is distrusted. Not with --redis-cluster.
    #[arg(
        long,
        env = "REDIS_FEED_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub redis_feed_url: Option<Secret>,

    /// Treat --redis-url as the seed nodes of a Redis Cluster.
    #[arg(long, env = "AUTH_REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub redis_cluster: bool,

    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "AUTH_REDIS_PREFIX", default_value = "authsidecar:")]
    pub redis_prefix: String,

    /// PEM file of the certificate authorities to trust for rediss:// instead of the public
    /// roots (a private CA: cert-manager, a cloud provider's managed Redis).
    #[arg(long, env = "AUTH_REDIS_CA_FILE", value_name = "FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of the client certificate (chain) this node presents to a rediss:// server
    /// that asks for one (Redis's `tls-auth-clients yes`); needs --redis-client-key.
    #[arg(long, env = "AUTH_REDIS_CLIENT_CERT", value_name = "FILE")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key.
    #[arg(long, env = "AUTH_REDIS_CLIENT_KEY", value_name = "FILE")]
    pub redis_client_key: Option<PathBuf>,

    /// PostgreSQL URL (postgres://user:password@host/db). For TLS, add
    /// `?sslmode=verify-full&sslrootcert=/path/ca.crt` (and `sslcert`, `sslkey` for a client
    /// certificate).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<Secret>,

    /// A direct connection to PostgreSQL, not through a pooler, for what needs a session of its
    /// own: the migrations (a session-level lock), and the revocation view's LISTEN feed when
    /// not through a pooler (through one, the view reads the change log through the pool).
    /// Unset: DATABASE_URL.
    #[arg(
        long,
        env = "DATABASE_MIGRATE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_migrate_url: Option<Secret>,

    /// DATABASE_URL goes through a pooler in transaction mode (PgBouncer's `pool_mode =
    /// transaction`): no prepared-statement cache and no session settings at connect. The
    /// migrations and the revocation view's feed then need --database-migrate-url.
    #[arg(long, env = "AUTH_DB_TRANSACTION_POOLING", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub db_transaction_pooling: bool,

    /// Connections in this node's PostgreSQL pool. Keep max × nodes under the server's
    /// max_connections.
    #[arg(long, env = "AUTH_DB_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// Run the embedded PostgreSQL migrations at start (turn off when a job runs
    /// `auth-sidecar migrate`).
    #[arg(long, env = "AUTH_MIGRATE", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub migrate: bool,

    /// Most calls of one kind (rate-limit steps) that go to Redis or PostgreSQL together, as one
    /// round trip, while another such round trip is in flight; a call that finds none in
    /// flight goes at once. 0 turns the gathering off: each call goes alone.
    #[arg(long, env = "AUTH_STORE_BATCH", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub store_batch: u32,

    /// Longest a backend call may take before the call fails with UNAVAILABLE.
    #[arg(long, env = "AUTH_BACKEND_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub backend_timeout: Duration,

    /// How often every backend is pinged to decide health.
    #[arg(long, env = "AUTH_BACKEND_CHECK_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub backend_check_interval: Duration,

    /// This node's name in the registry of live nodes that shared storage keeps (its pod name,
    /// say). Unset: the host name and a random suffix.
    #[arg(long, env = "AUTH_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// How often a node on shared storage records itself as live and compares its settings
    /// with the other live nodes'; a node is live for three heartbeats after its last.
    #[arg(long, env = "AUTH_CLUSTER_HEARTBEAT", default_value = "5s", value_parser = parse_duration)]
    pub cluster_heartbeat: Duration,

    /// Report NOT_SERVING while another live node disagrees on keys, policies or token
    /// settings. Off by default: the disagreeing node may be the odd one out, and taking this
    /// one out of service would not fix it (see README, "Running several replicas: the
    /// checklist").
    #[arg(long, env = "AUTH_STRICT_CLUSTER", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub strict_cluster: bool,

    /// HS256 signing secret, at least 32 bytes. Without it (memory storage only) a random key
    /// is made at start. Prefer the environment: a flag shows in the process list.
    #[arg(
        long,
        env = "AUTH_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub jwt_secret: Option<Secret>,

    /// A directory of signing keys (a mounted Kubernetes Secret, say): a `keys.toml` manifest
    /// naming each key's kid, algorithm, file and state, and one file per key. Re-read when it
    /// changes and on SIGHUP. Replaces AUTH_JWT_SECRET.
    #[arg(long, env = "AUTH_KEYS_DIR", value_name = "DIR")]
    pub keys_dir: Option<PathBuf>,

    /// How long verifiers may cache the JWKS (`Cache-Control: max-age`). A new key must be
    /// published as `verify` for at least this long before it becomes active.
    #[arg(long, env = "AUTH_JWKS_MAX_AGE", default_value = "5m", value_parser = parse_duration)]
    pub jwks_max_age: Duration,

    /// The `iss` claim of issued tokens, and the only issuer accepted.
    #[arg(long, env = "AUTH_ISSUER", default_value = "auth-sidecar")]
    pub issuer: String,

    /// Audience given to tokens issued without one, and expected by Validate calls that name
    /// none. Unset: tokens get no `aud` unless the caller names one.
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub audience: Option<String>,

    /// Lifetime of a token issued without a ttl.
    #[arg(long, env = "AUTH_ACCESS_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_ttl: Duration,

    /// Longest lifetime a caller may ask for.
    #[arg(long, env = "AUTH_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Clock skew tolerated when checking exp, nbf and iat.
    #[arg(long, env = "AUTH_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub leeway: Duration,

    /// A rate-limit policy NAME=COUNT/PERIOD[:burst=B][:lockout=D], such as
    /// login=5/1m:lockout=15m or api=100/1s:burst=20. Repeat the flag, or separate them with
    /// commas in the environment; a [rate_limits] table in the file.
    #[arg(
        long = "rate-limit",
        env = "AUTH_RATE_LIMITS",
        value_delimiter = ',',
        value_name = "SPEC"
    )]
    pub rate_limits: Vec<crate::ratelimit::Policy>,

    /// The address verifiers reach the ops listener at from outside, such as
    /// https://auth.example.com: `/.well-known/openid-configuration` gives its JWKS there.
    /// Unset, that document is not served (a request's Host header never makes it).
    #[arg(long, env = "AUTH_PUBLIC_URL", value_name = "URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// An OAuth 2.0 client that may call token introspection (RFC 7662) and revocation
    /// (RFC 7009) on the API listener, authenticating with client_secret_basic: ID:PHC, the
    /// secret's Argon2id hash from `auth-sidecar hash-password`. Repeat the flag, or separate
    /// them with spaces in the environment. None: those endpoints answer 401 to everyone.
    #[arg(
        long = "oauth-client",
        env = "AUTH_OAUTH_CLIENTS",
        value_delimiter = ' ',
        hide_env_values = true,
        value_name = "ID:PHC"
    )]
    pub oauth_clients: Vec<String>,

    /// Failed OAuth client authentications allowed per client id, on the shared store, as
    /// COUNT/PERIOD[:burst=B][:lockout=D]. Past it every call of that client id is refused
    /// with 429 on every node, the right secret too, until the lockout ends.
    #[arg(
        long,
        env = "AUTH_OAUTH_CLIENT_LIMIT",
        default_value = "10/15m:lockout=15m"
    )]
    pub oauth_client_limit: String,

    /// The address OAuth resource servers reach this sidecar's `/oauth2/` endpoints at, such
    /// as https://auth.example.com (a route of your proxy to the API listener). The discovery
    /// document lists introspection_endpoint and revocation_endpoint there; unset, it lists
    /// neither, as the API listener is the pod's own and the document is read from outside.
    #[arg(long, env = "AUTH_OAUTH_PUBLIC_URL", value_name = "URL", value_parser = parse_public_url)]
    pub oauth_public_url: Option<String>,

    /// Address of the admin web UI (reach it with `kubectl port-forward`). Never the ops port.
    /// `off` serves no admin UI.
    #[arg(long, env = "AUTH_ADMIN_LISTEN", default_value = "127.0.0.1:8082", value_parser = parse_admin_listen)]
    pub admin_listen: AdminListen,

    /// The admin UI's user name.
    #[arg(long, env = "ADMIN_GUI_USERNAME", default_value = "admin")]
    pub admin_username: String,

    /// The admin UI's password, the same on every node. Unset (and no hash): the UI refuses
    /// every login with 403. Prefer ADMIN_GUI_PASSWORD_HASH, so the password need not be
    /// stored.
    #[arg(
        long,
        env = "ADMIN_GUI_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub admin_password: Option<Secret>,

    /// The admin UI's password as an Argon2id PHC string (`$argon2id$v=19$...`).
    #[arg(
        long,
        env = "ADMIN_GUI_PASSWORD_HASH",
        hide_env_values = true,
        value_name = "PHC"
    )]
    pub admin_password_hash: Option<String>,

    /// Mark the admin UI's cookie `Secure`: set it when the UI is reached over TLS (a proxy
    /// that terminates it).
    #[arg(long, env = "AUTH_ADMIN_SECURE_COOKIE", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub admin_secure_cookie: bool,

    /// How long an admin UI login lasts.
    #[arg(long, env = "AUTH_ADMIN_SESSION_TTL", default_value = "8h", value_parser = parse_duration)]
    pub admin_session_ttl: Duration,

    /// Admin login attempts allowed, per user name and per client address, on the shared
    /// store, as COUNT/PERIOD[:burst=B][:lockout=D]; a successful login clears the count.
    #[arg(
        long,
        env = "AUTH_ADMIN_LOGIN_LIMIT",
        default_value = "5/15m:lockout=15m"
    )]
    pub admin_login_limit: String,

    /// MfaService: `auto` serves it when an MFA key is given, or on memory storage (with a
    /// random key then); `on` refuses to start on shared storage without a key; `off`
    /// answers every call with FAILED_PRECONDITION.
    #[arg(long, env = "AUTH_MFA", value_enum, default_value = "auto")]
    pub mfa: MfaMode,

    /// The keys that encrypt MFA secrets at rest: KID:BASE64 of 32 random bytes, several
    /// separated by commas to rotate (the first encrypts, all decrypt). The same on every
    /// node. Or the file `mfa.keys` in --keys-dir. Prefer the environment: a flag shows in
    /// the process list.
    #[arg(
        long,
        env = "AUTH_MFA_KEY",
        hide_env_values = true,
        value_name = "KEYS"
    )]
    pub mfa_key: Option<Secret>,

    /// The issuer authenticator apps show beside a TOTP account. Unset: --issuer's host when
    /// it is a URL, else --issuer.
    #[arg(long, env = "AUTH_MFA_ISSUER")]
    pub mfa_issuer: Option<String>,

    /// How long a begun TOTP enrollment waits to be confirmed.
    #[arg(long, env = "AUTH_MFA_ENROLLMENT_TTL", default_value = "10m", value_parser = parse_duration)]
    pub mfa_enrollment_ttl: Duration,

    /// MFA attempts (confirm, verify, backup code) allowed per subject, on the shared store,
    /// as COUNT/PERIOD[:burst=B][:lockout=D]; a right code clears the count.
    #[arg(long, env = "AUTH_MFA_VERIFY_LIMIT", default_value = "5/1m:lockout=5m")]
    pub mfa_verify_limit: String,

    /// The request header Envoy's ext_authz Check reads the bearer token from.
    #[arg(long, env = "AUTH_AUTHZ_TOKEN_HEADER", default_value = "authorization", value_parser = parse_header_name)]
    pub authz_token_header: String,

    /// A claim that Envoy's ext_authz Check passes upstream as a request header, CLAIM=HEADER
    /// such as tenant=x-auth-tenant (the subject always goes in x-auth-subject). Repeat the
    /// flag, or separate them with commas in the environment. The header is overwritten when
    /// the token has the claim and removed when it has not, so a client cannot set it.
    #[arg(
        long = "authz-claim-header",
        env = "AUTH_AUTHZ_CLAIM_HEADERS",
        value_delimiter = ',',
        value_name = "CLAIM=HEADER",
        value_parser = parse_claim_header
    )]
    pub authz_claim_headers: Vec<(String, String)>,

    /// Remove the token header from a request that Envoy's ext_authz Check lets through, so
    /// the upstream never sees the token.
    #[arg(long, env = "AUTH_AUTHZ_STRIP_TOKEN", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub authz_strip_token: bool,

    /// Memory for remembering tokens whose signature verified, so that a token presented
    /// again is not decoded again (every other check still runs): a size such as 8MiB, or 0
    /// to turn it off.
    #[arg(long, env = "AUTH_VERIFY_CACHE", default_value = "8MiB", value_parser = parse_size)]
    pub verify_cache: u64,

    /// Memory for the node-local revocation view of redis, tiered and postgres storage: facts
    /// Validate reads and rate-limit denials, answered locally only while the backend's change
    /// feed is proven live (see the README). A size such as 64MiB, or 0 to turn it off.
    #[arg(long, env = "AUTH_REVOCATION_CACHE", default_value = "64MiB", value_parser = parse_size)]
    pub revocation_cache: u64,

    /// Lifetime of a session created without a ttl, and the longest one may have.
    #[arg(long, env = "AUTH_SESSION_TTL", default_value = "24h", value_parser = parse_duration)]
    pub session_ttl: Duration,

    /// End a session not touched (TouchSession) for this long; 0s turns it off.
    #[arg(long, env = "AUTH_SESSION_IDLE_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub session_idle_timeout: Duration,

    /// How long a spent refresh token may be retried and get the same new tokens, for a
    /// client whose answer was lost; after it, one retry more gets them, and a further reuse
    /// revokes the family. At most 60s.
    #[arg(long, env = "AUTH_REFRESH_REUSE_GRACE", default_value = "0s", value_parser = parse_duration)]
    pub refresh_reuse_grace: Duration,

    /// Absolute lifetime of a refresh-token family, from the first refresh token.
    #[arg(long, env = "AUTH_REFRESH_MAX_LIFETIME", default_value = "30d", value_parser = parse_duration)]
    pub refresh_max_lifetime: Duration,

    /// After SIGTERM, how long to keep answering (while health says NOT_SERVING) before
    /// draining, so that callers and load balancers can move away first.
    #[arg(long, env = "AUTH_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// How long in-flight calls may take to finish once draining starts.
    #[arg(long, env = "AUTH_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Connections the token API listener keeps open at once; past it, it stops accepting until
    /// one closes.
    #[arg(long, env = "AUTH_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Connections the ops listener (and the admin UI's) keeps open at once, an eighth of them
    /// (at least 4) per peer address. Past either cap a newcomer closes the connection idle
    /// longest (no request open, whatever PINGs it answers) of the peer holding the most.
    #[arg(long, env = "AUTH_OPS_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ops_max_connections: u32,

    /// Calls in flight at once on one connection to the token API (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); a client's further calls wait for a free stream.
    #[arg(long, env = "AUTH_MAX_CONCURRENT_STREAMS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub max_concurrent_streams: u32,

    /// How long a new connection, on either listener, may take to send its first bytes (and an
    /// HTTP/1.1 request its headers) before it is closed.
    #[arg(long, env = "AUTH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// How long a connection may send nothing before it is closed. Clients answer the
    /// listeners' keepalive pings (every 20s), so only dead or stalled peers reach it; at
    /// least 30s.
    #[arg(long, env = "AUTH_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(long, env = "AUTH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,

    /// Log filter, such as info or auth_sidecar=debug; overrides RUST_LOG.
    #[arg(long, env = "AUTH_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// Where the token API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MfaMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    Memory,
    Redis,
    Postgres,
    Tiered,
}

impl Storage {
    pub fn uses_redis(self) -> bool {
        matches!(self, Storage::Redis | Storage::Tiered)
    }

    pub fn uses_postgres(self) -> bool {
        matches!(self, Storage::Postgres | Storage::Tiered)
    }
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub ops_listen: SocketAddr,
    pub storage: Storage,
    pub redis_url: Option<Secret>,
    pub redis_feed_url: Option<Secret>,
    pub redis_cluster: bool,
    pub redis_prefix: String,
    pub redis_tls: RedisTls,
    pub database_url: Option<Secret>,
    pub database_migrate_url: Option<Secret>,
    pub db_transaction_pooling: bool,
    pub db_max_connections: u32,
    pub migrate: bool,
    pub backend_timeout: Duration,
    pub store_batch: u32,
    pub backend_check_interval: Duration,
    pub jwt_secret: Option<Secret>,
    pub keys_dir: Option<PathBuf>,
    pub node_id: String,
    pub cluster_heartbeat: Duration,
    pub strict_cluster: bool,
    pub jwks_max_age: Duration,
    pub issuer: String,
    pub audience: Option<String>,
    pub access_ttl: Duration,
    pub max_ttl: Duration,
    pub leeway: Duration,
    pub verify_cache: u64,
    pub revocation_cache: u64,
    pub session_ttl: Duration,
    pub session_idle_timeout: Option<Duration>,
    pub refresh_reuse_grace: Duration,
    pub refresh_max_lifetime: Duration,
    pub rate_limits: Vec<crate::ratelimit::Policy>,
    pub authz: Authz,
    /// Where verifiers reach the ops listener, without a trailing slash.
    pub public_url: Option<String>,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    pub log_format: crate::telemetry::LogFormat,
    pub log_level: Option<String>,
    /// Limits of the token API listener's connections.
    pub api_connections: crate::conn::Limits,
    /// Limits of the ops listener's connections.
    pub ops_connections: crate::conn::Limits,
    pub max_concurrent_streams: u32,
    pub admin: Admin,
    pub mfa: Mfa,
    pub oauth: OAuth,
}

/// MFA's settings.
#[derive(Debug, Clone)]
pub struct Mfa {
    pub keys: MfaKeys,
    pub settings: crate::mfa::Settings,
}

/// Where MFA's keys come from, checked.
#[derive(Debug, Clone)]
pub enum MfaKeys {
    /// AUTH_MFA_KEY or the keys directory's `mfa.keys`: entries that parse.
    Given(Secret),
    /// Memory storage without a key: one made at start.
    Ephemeral,
    /// MFA is off, for this reason.
    Off(String),
}

/// The file of the keys directory that holds MFA keys.
pub const MFA_KEYS_FILE: &str = "mfa.keys";

/// The OAuth 2.0 endpoints' settings.
#[derive(Debug, Clone)]
pub struct OAuth {
    pub clients: Vec<OAuthClient>,
    /// Failed client authentications, counted per client id.
    pub client_limit: crate::ratelimit::Policy,
    /// Where the discovery document says the endpoints are; `None` lists none.
    pub public_url: Option<String>,
}

/// A client of the OAuth endpoints: its id and its secret's Argon2id PHC string.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub id: String,
    pub secret_hash: String,
}

/// The policy that counts failed OAuth client authentications.
pub const OAUTH_CLIENT_POLICY: &str = "auth-sidecar:oauth-client";

/// The admin web UI's settings.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `None`: no admin UI.
    pub listen: Option<SocketAddr>,
    pub username: String,
    /// `None`: every login is refused with 403.
    pub credential: Option<AdminCredential>,
    pub secure_cookie: bool,
    pub session_ttl: Duration,
    /// Login attempts, counted per user name and per client address.
    pub login_limit: crate::ratelimit::Policy,
}

/// How the admin password is checked.
#[derive(Debug, Clone)]
pub enum AdminCredential {
    Password(Secret),
    /// An Argon2id PHC string, checked as parsed at start.
    Hash(String),
}

/// The name the admin UI's login attempts are counted under: not a name a configured policy
/// can have (`:`), so no app can read or reset it through CheckRateLimit.
pub const ADMIN_LOGIN_POLICY: &str = "auth-sidecar:admin-login";

/// What Envoy's ext_authz Check reads and writes; header names are lower case.
#[derive(Debug, Clone)]
pub struct Authz {
    pub token_header: String,
    /// (claim, header) pairs, in the order given.
    pub claim_headers: Vec<(String, String)>,
    pub strip_token: bool,
}

/// The header ext_authz always sets to the token's subject.
pub const SUBJECT_HEADER: &str = "x-auth-subject";

/// A setting that cannot be used, named as on the command line. `setting` is empty when the
/// reason, as clap words it, names the setting itself.
#[derive(Debug)]
pub struct ConfigError {
    pub setting: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.setting.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "invalid setting {}: {}", self.setting, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(setting: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.to_owned(),
            reason: reason.into(),
        }
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        if let Some(secret) = &args.jwt_secret
            && secret.expose().len() < MIN_SECRET_LEN
        {
            return Err(ConfigError::new(
                "AUTH_JWT_SECRET",
                format!(
                    "{} bytes is too short, use at least {MIN_SECRET_LEN} random bytes",
                    secret.expose().len()
                ),
            ));
        }
        if args.keys_dir.is_some() && args.jwt_secret.is_some() {
            return Err(ConfigError::new(
                "AUTH_KEYS_DIR and AUTH_JWT_SECRET",
                "give one of them: put the secret in the keys directory as an HS256 key",
            ));
        }
        if args.storage != Storage::Memory && args.jwt_secret.is_none() && args.keys_dir.is_none() {
            return Err(ConfigError::new(
                "AUTH_KEYS_DIR or AUTH_JWT_SECRET",
                format!(
                    "required with --storage {:?}: without keys every node signs with its own \
                     random key, so a token issued on one node fails validation on the others; \
                     give every node the same keys",
                    args.storage
                )
                .to_lowercase(),
            ));
        }
        if args.storage.uses_redis() && args.redis_url.is_none() {
            return Err(ConfigError::new("REDIS_URL", "required by this --storage"));
        }
        if let Some(feed) = &args.redis_feed_url {
            if !args.storage.uses_redis() {
                return Err(ConfigError::new(
                    "REDIS_FEED_URL",
                    "applies to --storage redis and tiered only",
                ));
            }
            if args.redis_cluster {
                return Err(ConfigError::new(
                    "REDIS_FEED_URL",
                    "not with --redis-cluster: a cluster's feed follows its masters",
                ));
            }
            let url = feed.expose_str();
            if url.contains(',') || !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_FEED_URL",
                    "one redis:// or rediss:// URL",
                ));
            }
        }
        if args.storage.uses_postgres() && args.database_url.is_none() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "required by this --storage",
            ));
        }
        if args.db_transaction_pooling
            && args.storage.uses_postgres()
            && args.migrate
            && args.database_migrate_url.is_none()
        {
            return Err(ConfigError::new(
                "--db-transaction-pooling",
                "the migrations hold a session-level lock, which a transaction pooler cannot \
                 keep: give --database-migrate-url (a direct connection) or --migrate=false",
            ));
        }
        let redis_tls = redis_tls(&args)?;
        let admin = admin(&args)?;
        let mfa = mfa(&args)?;
        let oauth = oauth(&args)?;
        if args.cluster_heartbeat < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "--cluster-heartbeat",
                "must be at least 100ms",
            ));
        }
        if args
            .node_id
            .as_deref()
            .is_some_and(|id| !crate::ids::valid_node_id(id))
        {
            return Err(ConfigError::new(
                "AUTH_NODE_ID",
                "must be 1 to 128 characters, without control characters or `|`",
            ));
        }
        if args.backend_timeout.is_zero() || args.backend_check_interval.is_zero() {
            return Err(ConfigError::new(
                "--backend-timeout and --backend-check-interval",
                "must be greater than zero",
            ));
        }
        let mut names = BTreeSet::new();
        for policy in &args.rate_limits {
            if !names.insert(policy.name.as_str()) {
                return Err(ConfigError::new(
                    "--rate-limit",
                    format!("policy `{}` is given twice", policy.name),
                ));
            }
        }
        if args.authz_token_header == SUBJECT_HEADER {
            return Err(ConfigError::new(
                "--authz-token-header",
                format!("`{SUBJECT_HEADER}` is the header ext_authz sets"),
            ));
        }
        let mut headers = BTreeSet::from([SUBJECT_HEADER, args.authz_token_header.as_str()]);
        for (claim, header) in &args.authz_claim_headers {
            if !headers.insert(header.as_str()) {
                return Err(ConfigError::new(
                    "--authz-claim-header",
                    format!("{claim}={header}: header `{header}` is already in use"),
                ));
            }
        }
        if args.issuer.is_empty() {
            return Err(ConfigError::new("--issuer", "must not be empty"));
        }
        if args.audience.as_deref() == Some("") {
            return Err(ConfigError::new("--audience", "must not be empty when set"));
        }
        if args.refresh_reuse_grace > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "--refresh-reuse-grace",
                "must be at most 60s: a longer window lets a stolen refresh token be replayed",
            ));
        }
        for (name, value) in [
            ("--access-ttl", args.access_ttl),
            ("--max-ttl", args.max_ttl),
            ("--session-ttl", args.session_ttl),
            ("--refresh-max-lifetime", args.refresh_max_lifetime),
            ("--shutdown-grace", args.shutdown_grace),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(name, "must be greater than zero"));
            }
        }
        if args.handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "--handshake-timeout",
                "must be greater than zero",
            ));
        }
        if args.idle_timeout < Duration::from_secs(30) {
            return Err(ConfigError::new(
                "--idle-timeout",
                "must be at least 30s: healthy clients answer a keepalive ping every 20s",
            ));
        }
        if args.access_ttl > args.max_ttl {
            return Err(ConfigError::new(
                "--access-ttl",
                format!(
                    "{} is longer than --max-ttl {}",
                    humantime::format_duration(args.access_ttl),
                    humantime::format_duration(args.max_ttl)
                ),
            ));
        }
        Ok(Config {
            listen: args.listen,
            ops_listen: args.ops_listen,
            storage: args.storage,
            redis_url: args.redis_url,
            redis_feed_url: args.redis_feed_url,
            redis_cluster: args.redis_cluster,
            redis_prefix: args.redis_prefix,
            redis_tls,
            database_url: args.database_url,
            database_migrate_url: args.database_migrate_url,
            db_transaction_pooling: args.db_transaction_pooling,
            db_max_connections: args.db_max_connections,
            migrate: args.migrate,
            backend_timeout: args.backend_timeout,
            store_batch: args.store_batch,
            backend_check_interval: args.backend_check_interval,
            jwt_secret: args.jwt_secret,
            keys_dir: args.keys_dir,
            node_id: args.node_id.unwrap_or_else(default_node_id),
            cluster_heartbeat: args.cluster_heartbeat,
            strict_cluster: args.strict_cluster,
            jwks_max_age: args.jwks_max_age,
            issuer: args.issuer,
            audience: args.audience,
            access_ttl: args.access_ttl,
            max_ttl: args.max_ttl,
            leeway: args.leeway,
            verify_cache: args.verify_cache,
            revocation_cache: args.revocation_cache,
            session_ttl: args.session_ttl,
            session_idle_timeout: (!args.session_idle_timeout.is_zero())
                .then_some(args.session_idle_timeout),
            refresh_reuse_grace: args.refresh_reuse_grace,
            refresh_max_lifetime: args.refresh_max_lifetime,
            rate_limits: args.rate_limits,
            authz: Authz {
                token_header: args.authz_token_header,
                claim_headers: args.authz_claim_headers,
                strip_token: args.authz_strip_token,
            },
            public_url: args.public_url,
            shutdown_delay: args.shutdown_delay,
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
            log_level: args.log_level,
            api_connections: crate::conn::Limits {
                max_connections: args.max_connections as usize,
                handshake_timeout: args.handshake_timeout,
                idle_timeout: args.idle_timeout,
            },
            ops_connections: crate::conn::Limits {
                max_connections: args.ops_max_connections as usize,
                handshake_timeout: args.handshake_timeout,
                idle_timeout: args.idle_timeout,
            },
            max_concurrent_streams: args.max_concurrent_streams,
            admin,
            oauth,
            mfa,
        })
    }
}

impl Config {
    /// Parses the arguments of `serve` (`argv[0]` is the command name), with the environment
    /// and the `--config` file: a value in the file becomes its setting's default, so flags
    /// and environment still win, and one parser words every error.
    pub fn load<I, T>(argv: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv: Vec<T> = argv.into_iter().collect();
        let mut command = serve_command();
        let mut matches = command
            .clone()
            .try_get_matches_from(argv.clone())
            .map_err(clap_error)?;
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            for (key, value) in read_file(path)? {
                command = command.mut_arg(key, |arg| arg.default_value(value));
            }
            matches = command.try_get_matches_from(argv).map_err(clap_error)?;
        }
        let args = ServeArgs::from_arg_matches(&matches).map_err(clap_error)?;
        Config::try_from(args)
    }

    /// The store's part of the settings.
    pub fn store(&self) -> Result<StoreConfig, ConfigError> {
        let redis = || {
            Ok(RedisConfig {
                url: self
                    .redis_url
                    .clone()
                    .ok_or_else(|| ConfigError::new("REDIS_URL", "required by this --storage"))?,
                feed_url: self.redis_feed_url.clone(),
                cluster: self.redis_cluster,
                prefix: self.redis_prefix.clone(),
                timeout: self.backend_timeout,
                cache: self.revocation_cache,
                batch: self.store_batch as usize,
                tls: self.redis_tls.clone(),
            })
        };
        let postgres = |cache| {
            Ok(PostgresConfig {
                url: self.database_url.clone().ok_or_else(|| {
                    ConfigError::new("DATABASE_URL", "required by this --storage")
                })?,
                direct_url: self.database_migrate_url.clone(),
                transaction_pooling: self.db_transaction_pooling,
                max_connections: self.db_max_connections,
                migrate: self.migrate,
                timeout: self.backend_timeout,
                cache,
                batch: self.store_batch as usize,
            })
        };
        Ok(match self.storage {
            Storage::Memory => StoreConfig::Memory,
            Storage::Redis => StoreConfig::Redis(redis()?),
            Storage::Postgres => StoreConfig::Postgres(postgres(self.revocation_cache)?),
            // Validate reads PostgreSQL only while Redis cannot vouch for itself: the view
            // is Redis's.
            Storage::Tiered => StoreConfig::Tiered(redis()?, postgres(0)?),
        })
    }

    /// A configuration with every default, for tests.
    pub fn defaults() -> Config {
        Config::load(["serve"]).expect("defaults are valid")
    }
}

/// The TLS files of Redis, read and checked: each must hold what its setting names, a client
/// certificate needs its key, and none of them applies to a plain redis:// URL.
fn redis_tls(args: &ServeArgs) -> Result<RedisTls, ConfigError> {
    let read = |setting: &str, path: &Option<PathBuf>, wanted: &[&str]| {
        let Some(path) = path else { return Ok(None) };
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::new(setting, format!("cannot read {}: {e}", path.display()))
        })?;
        let blocks = pem::parse_many(&bytes).unwrap_or_default();
        if blocks.is_empty() || !blocks.iter().all(|b| wanted.contains(&b.tag())) {
            return Err(ConfigError::new(
                setting,
                format!("{} is not PEM of {}", path.display(), wanted.join(" or ")),
            ));
        }
        Ok(Some(bytes))
    };
    let ca = read("AUTH_REDIS_CA_FILE", &args.redis_ca_file, &["CERTIFICATE"])?;
    let cert = read(
        "AUTH_REDIS_CLIENT_CERT",
        &args.redis_client_cert,
        &["CERTIFICATE"],
    )?;
    let key = read(
        "AUTH_REDIS_CLIENT_KEY",
        &args.redis_client_key,
        &["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"],
    )?;
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, Secret::new(key))),
        (None, None) => None,
        _ => {
            return Err(ConfigError::new(
                "AUTH_REDIS_CLIENT_CERT and AUTH_REDIS_CLIENT_KEY",
                "give both or neither",
            ));
        }
    };
    let tls = RedisTls { ca, client };
    let plain = args.redis_url.as_ref().is_some_and(|urls| {
        urls.expose_str()
            .split(',')
            .any(|u| !u.trim().starts_with("rediss://"))
    });
    if (tls.ca.is_some() || tls.client.is_some()) && plain {
        return Err(ConfigError::new(
            "AUTH_REDIS_CA_FILE, AUTH_REDIS_CLIENT_CERT and AUTH_REDIS_CLIENT_KEY",
            "apply to TLS only: use rediss:// URLs",
        ));
    }
    Ok(tls)
}

/// The admin UI's settings, checked: one credential at most, a hash that is Argon2id.
fn admin(args: &ServeArgs) -> Result<Admin, ConfigError> {
    let credential = match (&args.admin_password, &args.admin_password_hash) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "ADMIN_GUI_PASSWORD and ADMIN_GUI_PASSWORD_HASH",
                "give one of them",
            ));
        }
        (Some(p), None) if p.expose().is_empty() => None,
        (Some(p), None) => Some(AdminCredential::Password(p.clone())),
        (None, Some(h)) if h.is_empty() => None,
        (None, Some(h)) => {
            let parsed = argon2::PasswordHash::new(h).map_err(|e| {
                ConfigError::new("ADMIN_GUI_PASSWORD_HASH", format!("not a PHC string: {e}"))
            })?;
            if parsed.algorithm.as_str() != "argon2id" {
                return Err(ConfigError::new(
                    "ADMIN_GUI_PASSWORD_HASH",
                    format!("must be argon2id, not {}", parsed.algorithm),
                ));
            }
            Some(AdminCredential::Hash(h.clone()))
        }
        (None, None) => None,
    };
    if args.admin_username.is_empty() || args.admin_username.len() > 64 {
        return Err(ConfigError::new(
            "ADMIN_GUI_USERNAME",
            "must be 1 to 64 characters",
        ));
    }
    if args.admin_session_ttl.is_zero() {
        return Err(ConfigError::new(
            "--admin-session-ttl",
            "must be greater than zero",
        ));
    }
    let login_limit = internal_policy(
        "--admin-login-limit",
        ADMIN_LOGIN_POLICY,
        &args.admin_login_limit,
    )?;
    Ok(Admin {
        listen: args.admin_listen.0,
        username: args.admin_username.clone(),
        credential,
        secure_cookie: args.admin_secure_cookie,
        session_ttl: args.admin_session_ttl,
        login_limit,
    })
}

/// The OAuth endpoints' settings, checked: each client `ID:PHC`, its id given once. Checked
/// here rather than by clap, whose error would repeat the value: a secret given by mistake
/// for its hash must not reach the log.
fn oauth(args: &ServeArgs) -> Result<OAuth, ConfigError> {
    let mut clients: Vec<OAuthClient> = Vec::new();
    for text in args.oauth_clients.iter().filter(|t| !t.is_empty()) {
        let client = parse_oauth_client(text)
            .map_err(|reason| ConfigError::new("--oauth-client", reason))?;
        if clients.iter().any(|c| c.id == client.id) {
            return Err(ConfigError::new(
                "--oauth-client",
                format!("client `{}` is given more than once", client.id),
            ));
        }
        clients.push(client);
    }
    Ok(OAuth {
        clients,
        client_limit: internal_policy(
            "--oauth-client-limit",
            OAUTH_CLIENT_POLICY,
            &args.oauth_client_limit,
        )?,
        public_url: args.oauth_public_url.clone(),
    })
}

/// MFA's settings, checked: keys that parse, from one place; an issuer an otpauth label
/// can hold.
fn mfa(args: &ServeArgs) -> Result<Mfa, ConfigError> {
    let file = args.keys_dir.as_ref().map(|dir| dir.join(MFA_KEYS_FILE));
    let file_keys = match &file {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => Some(Secret::new(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ConfigError::new(
                    "--keys-dir",
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        },
        None => None,
    };
    let (setting, keys) = match (&args.mfa_key, file_keys) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "AUTH_MFA_KEY",
                format!("give it or {MFA_KEYS_FILE} in --keys-dir, not both"),
            ));
        }
        (Some(k), None) => ("AUTH_MFA_KEY", Some(k.clone())),
        (None, Some(k)) => (MFA_KEYS_FILE, Some(k)),
        (None, None) => ("AUTH_MFA_KEY", None),
    };
    if let Some(k) = &keys {
        let text = std::str::from_utf8(k.expose())
            .map_err(|_| ConfigError::new(setting, "is not UTF-8 text"))?;
        crate::mfa::seal::Sealer::parse(text).map_err(|e| ConfigError::new(setting, e))?;
    }
    let keys = match (args.mfa, keys) {
        (MfaMode::Off, _) => MfaKeys::Off("MFA is off on this sidecar (--mfa off)".to_owned()),
        (_, Some(k)) => MfaKeys::Given(k),
        (_, None) if args.storage == Storage::Memory => MfaKeys::Ephemeral,
        (MfaMode::On, None) => {
            return Err(ConfigError::new(
                "AUTH_MFA_KEY",
                format!(
                    "required by --mfa on with --storage {}: every node must encrypt and \
                     decrypt MFA secrets with the same key (or put {MFA_KEYS_FILE} in \
                     --keys-dir)",
                    format!("{:?}", args.storage).to_lowercase()
                ),
            ));
        }
        (_, None) => MfaKeys::Off(
            "MFA is off: shared storage needs AUTH_MFA_KEY (the same on every node) to \
             encrypt MFA secrets"
                .to_owned(),
        ),
    };
    let issuer = match &args.mfa_issuer {
        Some(issuer) => issuer.clone(),
        None => default_mfa_issuer(&args.issuer),
    };
    if issuer.is_empty()
        || issuer.chars().count() > 256
        || issuer.contains(':')
        || issuer.chars().any(char::is_control)
    {
        return Err(ConfigError::new(
            "--mfa-issuer",
            "must be 1 to 256 characters, without `:` (the otpauth label's separator) or \
             control characters",
        ));
    }
    if args.mfa_enrollment_ttl < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "--mfa-enrollment-ttl",
            "must be at least 1s",
        ));
    }
    let verify_limit = internal_policy(
        "--mfa-verify-limit",
        crate::mfa::VERIFY_POLICY,
        &args.mfa_verify_limit,
    )?;
    Ok(Mfa {
        keys,
        settings: crate::mfa::Settings {
            issuer,
            enrollment_ttl: args.mfa_enrollment_ttl,
            verify_limit,
        },
    })
}

/// A policy the sidecar counts under its own `name` (one no configured policy can have),
/// from the COUNT/PERIOD[:burst=B][:lockout=D] spec of `setting`.
fn internal_policy(
    setting: &str,
    name: &str,
    spec: &str,
) -> Result<crate::ratelimit::Policy, ConfigError> {
    let policy = format!("internal={spec}")
        .parse::<crate::ratelimit::Policy>()
        .map_err(|e| ConfigError::new(setting, e))?;
    Ok(crate::ratelimit::Policy {
        name: name.to_owned(),
        ..policy
    })
}

/// The issuer apps show when none is set: a URL's host, else the issuer with `:` dropped.
/// The issuer authenticator apps show when `--mfa-issuer` is unset: the host of a URL issuer
/// (`https://auth.example.com:8443/` gives `auth.example.com`), or the issuer itself with each
/// `:` as `-` (`urn:example:auth` gives `urn-example-auth`), as an otpauth issuer holds no `:`.
/// An IPv6 address is nothing a user recognises, and holds `:`: `auth-sidecar` then.
fn default_mfa_issuer(issuer: &str) -> String {
    let host = issuer.split_once("://").map(|(_, rest)| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit('@').next().unwrap_or(authority);
        if host.starts_with('[') {
            return "";
        }
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    });
    let name = match host {
        Some(host) => host.replace(':', "-"),
        None => issuer.replace(':', "-"),
    };
    if name.is_empty() {
        "auth-sidecar".to_owned()
    } else {
        name
    }
}

/// This node's default name in the registry: the host name (a pod's name) and a random
/// suffix, so that several processes on one host are told apart.
fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty() && !h.contains('|'))
        .unwrap_or_else(|| "node".to_owned());
    let mut suffix = [0u8; 3];
    aws_lc_rs::rand::fill(&mut suffix).expect("the system random source works");
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}-{suffix}")
}

/// ID:PHC: a client id of 1 to 64 printable ASCII characters other than `:`, and an Argon2id
/// PHC string. The error names the client id, never the rest.
fn parse_oauth_client(s: &str) -> Result<OAuthClient, String> {
    let (id, phc) = s
        .split_once(':')
        .ok_or("not ID:PHC (the PHC from `auth-sidecar hash-password`)")?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the client id must be 1 to 64 printable ASCII characters".into());
    }
    let parsed = argon2::PasswordHash::new(phc).map_err(|_| {
        format!("client `{id}`: not a PHC string (make one with `auth-sidecar hash-password`)")
    })?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "client `{id}`: must be argon2id, not {}",
            parsed.algorithm
        ));
    }
    Ok(OAuthClient {
        id: id.to_owned(),
        secret_hash: phc.to_owned(),
    })
}

/// An absolute http or https URL without query or fragment, its trailing slash dropped.
fn parse_public_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|_| format!("`{s}` is not a URL"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok
        || uri.host().is_none_or(str::is_empty)
        || uri.query().is_some()
        || s.contains('#')
    {
        return Err(format!("`{s}` is not an http or https URL without query"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// A request header name, lower-cased; `host` (and any pseudo-header, not being a name) is
/// refused.
fn parse_header_name(s: &str) -> Result<String, String> {
    let name = http::HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("`{s}` is not a header name"))?;
    if name == http::header::HOST {
        return Err("`host` cannot be used".to_owned());
    }
    Ok(name.as_str().to_owned())
}

/// CLAIM=HEADER for --authz-claim-header.
fn parse_claim_header(s: &str) -> Result<(String, String), String> {
    let (claim, header) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not CLAIM=HEADER"))?;
    if claim.is_empty() {
        return Err(format!("`{s}`: the claim is empty"));
    }
    Ok((claim.to_owned(), parse_header_name(header)?))
}

/// Reads the `--config` file into (setting id, value) pairs, refusing unknown settings.
fn read_file(path: &std::path::Path) -> Result<Vec<(String, String)>, ConfigError> {
    let in_file =
        |reason: String| ConfigError::new("--config", format!("{}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| in_file(format!("cannot read: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| in_file(e.message().trim().to_owned()))?;
    let command = serve_command();
    let known: BTreeSet<&str> = command
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| *id != "config")
        .collect();
    table
        .into_iter()
        .map(|(key, value)| {
            if !known.contains(key.as_str()) {
                return Err(in_file(format!("unknown setting `{key}`")));
            }
            let value = match value {
                // [rate_limits] name = "COUNT/PERIOD..." becomes the list the flag takes.
                toml::Value::Table(t) if key == "rate_limits" => t
                    .into_iter()
                    .map(|(name, spec)| match spec {
                        toml::Value::String(spec) => Ok(format!("{name}={spec}")),
                        _ => Err(in_file(format!("rate_limits.{name} must be a string"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(in_file(format!(
                        "`{key}` must be a string, number or boolean"
                    )));
                }
            };
            Ok((key, value))
        })
        .collect()
}

/// Turns a clap error into one line that names the setting.
fn clap_error(err: clap::Error) -> ConfigError {
    ConfigError::new("", one_line(&err))
}

/// The first line of a clap error, without its `error: ` prefix: it names the flag and why.
pub fn one_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or("invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Where the admin UI listens; `None` for `off`.
#[derive(Debug, Clone, Copy)]
pub struct AdminListen(pub Option<SocketAddr>);

fn parse_admin_listen(s: &str) -> Result<AdminListen, String> {
    if s == "off" {
        return Ok(AdminListen(None));
    }
    s.parse()
        .map(|a| AdminListen(Some(a)))
        .map_err(|_| format!("`{s}` is not HOST:PORT or `off`"))
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("unix: needs a path, as in unix:/run/auth-sidecar.sock".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>()
        .map(Listen::Tcp)
        .map_err(|_| "expected HOST:PORT (127.0.0.1:50051) or unix:/path.sock".into())
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret::from(s))
    }
}

/// The `serve` arguments as a command of their own, for parsing file values and for tests.
pub fn serve_command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("serve"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        Config::load(std::iter::once("serve").chain(argv.iter().copied()))
    }

    #[test]
    fn an_oauth_client_error_names_the_client_and_never_its_secret() {
        let phc = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let c = parse(&[&format!("--oauth-client=rs:{phc}")]).unwrap();
        assert_eq!(c.oauth.clients[0].id, "rs");
        for (args, says) in [
            (
                vec!["--oauth-client=rs:hunter2-secret".to_owned()],
                "client `rs`",
            ),
            (
                vec!["--oauth-client=hunter2-secret".to_owned()],
                "not ID:PHC",
            ),
            (
                vec![
                    format!("--oauth-client=rs:{phc}"),
                    format!("--oauth-client=rs:{phc}"),
                ],
                "more than once",
            ),
        ] {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let err = parse(&refs).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn the_default_mfa_issuer_is_a_name_a_user_recognises() {
        for (issuer, expected) in [
            ("https://auth.example.com:8443/realm", "auth.example.com"),
            ("https://admin@auth.example.com", "auth.example.com"),
            ("auth-sidecar", "auth-sidecar"),
            ("urn:example:auth", "urn-example-auth"),
            ("https://[::1]:8443/", "auth-sidecar"),
            ("http://127.0.0.1:8080", "127.0.0.1"),
        ] {
            assert_eq!(default_mfa_issuer(issuer), expected, "{issuer}");
        }
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::defaults();
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:50051".parse().unwrap()));
        assert_eq!(c.ops_listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(c.access_ttl, Duration::from_secs(15 * 60));
        assert_eq!(c.max_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.leeway, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.issuer, "auth-sidecar");
        assert_eq!(c.verify_cache, 8 << 20);
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("8MB").is_err());
        assert!(c.jwt_secret.is_none());
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let dir = std::env::temp_dir().join(format!("auth-sidecar-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "issuer = \"from-file\"\nmax_ttl = \"2h\"\n").unwrap();
        let c = parse(&["--config", file.to_str().unwrap(), "--max-ttl", "3h"]).unwrap();
        assert_eq!(c.issuer, "from-file");
        assert_eq!(c.max_ttl, Duration::from_secs(3 * 3600));

        std::fs::write(
            &file,
            "[rate_limits]\nlogin = \"5/1m:lockout=15m\"\napi = \"100/1s:burst=20\"\n",
        )
        .unwrap();
        let c = parse(&["--config", file.to_str().unwrap()]).unwrap();
        let names: Vec<_> = c.rate_limits.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["api", "login"]);
        let err = parse(&["--rate-limit", "login=5/1m", "--rate-limit", "login=1/1s"]).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = parse(&["--rate-limit", "login=5/1x"]).unwrap_err();
        assert!(err.to_string().contains("login=5/1x"), "{err}");

        std::fs::write(&file, "bogus = 1\n").unwrap();
        let err = parse(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("unknown setting `bogus`"), "{err}");

        std::fs::write(&file, "leeway = \"soon\"\n").unwrap();
        let err = parse(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("--leeway"), "{err}");
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let err = parse(&["--jwt-secret", "hunter2"]).unwrap_err();
        assert_eq!(err.setting, "AUTH_JWT_SECRET");
        assert!(
            !err.to_string().contains("hunter2"),
            "the secret leaked: {err}"
        );
        let err = parse(&["--access-ttl", "2d", "--max-ttl", "1d"]).unwrap_err();
        assert_eq!(err.setting, "--access-ttl");
        let err = parse(&["--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        assert_eq!(
            parse(&["--listen", "unix:/tmp/x.sock"]).unwrap().listen,
            Listen::Unix("/tmp/x.sock".into())
        );
        let err = parse(&["--storage", "redis", "--redis-url", "redis://:pw@h"]).unwrap_err();
        assert_eq!(err.setting, "AUTH_KEYS_DIR or AUTH_JWT_SECRET");
        assert!(err.reason.contains("random key"), "{err}");
        let secret = "s".repeat(32);
        let err = parse(&["--keys-dir", "/keys", "--jwt-secret", &secret]).unwrap_err();
        assert_eq!(err.setting, "AUTH_KEYS_DIR and AUTH_JWT_SECRET");
        let secret = "s".repeat(32);
        let err = parse(&[
            "--storage",
            "tiered",
            "--jwt-secret",
            &secret,
            "--redis-url",
            "redis://h",
        ])
        .unwrap_err();
        assert_eq!(err.setting, "DATABASE_URL");
    }
}
