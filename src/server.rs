//! Composition and lifecycle: builds the services from the configuration, serves them on the
//! API and ops listeners, and drains on SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use futures_util::StreamExt;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;

use crate::authz::Authorizer;
use crate::clock::{Clock, SystemClock};
use crate::cluster::Cluster;
use crate::config::{Config, Listen, Storage};
use crate::conn::{self, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_HEADER_LIST};
use crate::grpc::{AuthorizationServer, EnvoyAuthz, EnvoyRls, MfaApi, TokenApi};
use crate::health::Health;
use crate::http::oauth::OAuth;
use crate::keys::{KeySet, Keys, Reloaded, SigningKey};
use crate::mfa::Mfa;
use crate::pb;
use crate::pb::mfa_service_server::MfaServiceServer;
use crate::pb::token_service_server::TokenServiceServer;
use crate::ratelimit::RateLimiter;
use crate::sessions::Sessions;
use crate::store;
use crate::telemetry;
use crate::tokens::{Settings, Tokens};

/// How often expired store records are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Largest TokenService (and reflection) request decoded, in bytes: the largest valid request
/// (an 8 KiB token, or an Issue whose claims make one, or 4 KiB of session metadata) with room
/// to spare. A larger one is refused before it is buffered.
const MAX_API_REQUEST: usize = 32 * 1024;

/// Largest MfaService request decoded, in bytes: larger than any valid one, so that an
/// oversized subject or label up to a mebibyte is refused by name (INVALID_ARGUMENT
/// `account_label`), not as a message; past it, RESOURCE_EXHAUSTED.
const MAX_MFA_REQUEST: usize = 1024 * 1024 + 64 * 1024;

/// Largest ext_authz or rate limit request decoded, in bytes: Envoy's CheckRequest carries
/// every request header, at most 60 KiB by Envoy's default (`max_request_headers_kb`). A
/// larger one (higher header limits, or a body Envoy was told to pass) fails with
/// RESOURCE_EXHAUSTED, so Envoy's `status_on_error` applies.
const MAX_ENVOY_REQUEST: usize = 128 * 1024;

/// Calls in flight at once on one ops connection: probes, scrapes and JWKS fetches are few.
const OPS_MAX_CONCURRENT_STREAMS: u32 = 16;

/// The state every service is built from.
pub struct App {
    pub tokens: Arc<Tokens>,
    pub limits: Arc<RateLimiter>,
    pub sessions: Arc<Sessions>,
    pub mfa: Arc<Mfa>,
    pub health: Health,
    /// This node in the registry of live nodes; `None` on memory storage.
    pub cluster: Option<Arc<Cluster>>,
    /// The access decision of ext_authz and forward-auth.
    pub authorizer: Arc<Authorizer>,
    /// Introspection and revocation.
    pub oauth: Arc<OAuth>,
}

impl App {
    /// Builds the state. `drained` is cancelled when the server stops taking calls.
    pub async fn build(
        config: &Config,
        clock: Arc<dyn Clock>,
        drained: CancellationToken,
    ) -> anyhow::Result<App> {
        // The recorder first, so that nothing recorded from here on is lost: a key source's
        // calls at load count too.
        telemetry::metrics();
        let keys = load_keys(config).await?;
        if config.keys_dir.is_none() && config.jwt_secret.is_none() {
            tracing::warn!(
                "neither AUTH_KEYS_DIR nor AUTH_JWT_SECRET is set: signing with a random \
                 key made at start; its tokens will not survive a restart or validate on \
                 another node"
            );
        }
        tracing::info!(keys = %keys.current().summary(), "key set loaded");
        telemetry::record_build_info();
        telemetry::record_keys_loaded(None, keys.current().active().kid());
        let store = store::open(&config.store()?, clock.clone())?;
        let limits = RateLimiter::new(&config.rate_limits, store.clone());
        let sessions = Sessions::new(config, store.clone(), clock.clone());
        let mfa = Mfa::new(
            store.clone(),
            mfa_sealer(&config.mfa.keys),
            config.mfa.settings.clone(),
            clock.clone(),
        );
        if let Some(reason) = mfa.off_reason() {
            tracing::info!("{reason}");
        }
        let keys = Arc::new(keys);
        let cluster = (config.storage != Storage::Memory)
            .then(|| Arc::new(Cluster::new(config, keys.clone(), store.clone())));
        let tokens = Arc::new(Tokens::new(Settings::from(config), keys, store, clock));
        let limits = Arc::new(limits);
        Ok(App {
            authorizer: Arc::new(Authorizer::new(
                tokens.clone(),
                limits.clone(),
                config.authz.clone(),
            )),
            oauth: Arc::new(OAuth::new(&config.oauth, tokens.clone())),
            tokens,
            limits,
            sessions: Arc::new(sessions),
            mfa: Arc::new(mfa),
            health: Health::new(drained, config.strict_cluster).await,
            cluster,
        })
    }

    /// The services of the token API listener: TokenService, MfaService, Envoy's ext_authz and
    /// rate limit service, grpc.health.v1 and reflection over gRPC, and forward-auth and OAuth
    /// over HTTP.
    pub fn api_routes(&self) -> anyhow::Result<Routes> {
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(pb::ENVOY_FILE_DESCRIPTOR_SET)
        };
        let routes = Routes::new(
            TokenServiceServer::new(TokenApi::new(
                self.tokens.clone(),
                self.limits.clone(),
                self.sessions.clone(),
            ))
            .max_decoding_message_size(MAX_API_REQUEST),
        )
        .add_service(
            MfaServiceServer::new(MfaApi::new(self.mfa.clone()))
                .max_decoding_message_size(MAX_MFA_REQUEST),
        )
        .add_service(AuthorizationServer::new(
            EnvoyAuthz::new(self.authorizer.clone()),
            MAX_ENVOY_REQUEST,
        ))
        .add_service(
            RateLimitServiceServer::new(EnvoyRls::new(self.limits.clone()))
                .max_decoding_message_size(MAX_ENVOY_REQUEST),
        )
        .add_service(self.health.service())
        .add_service(
            reflection()
                .build_v1()?
                .max_decoding_message_size(MAX_API_REQUEST),
        )
        .add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(MAX_API_REQUEST),
        );
        let http = crate::http::router(self.authorizer.clone(), self.oauth.clone());
        Ok(Routes::from(routes.into_axum_router().merge(http)))
    }
}

/// The key set the configuration names: the keys directory, the secret, or (memory storage
/// only) a random key.
pub async fn load_keys(config: &Config) -> anyhow::Result<Keys> {
    Ok(match (&config.keys_dir, &config.jwt_secret) {
        (Some(dir), _) => Keys::from_dir(dir.clone())
            .await
            .with_context(|| format!("cannot load --keys-dir {}", dir.display()))?,
        (None, Some(secret)) => Keys::fixed(KeySet::single(SigningKey::hs256(secret)?)),
        (None, None) => Keys::fixed(KeySet::ephemeral()),
    })
}

/// Probes the active key, when it signs elsewhere (a PKCS#11 token, a KMS), now and then
/// every `interval` or its source's own interval, so that readiness says whether this node
/// can issue. A signature an Issue made within the interval answers for the probe, and a
/// failed one wakes it at once. While the key does not sign, the probe runs again after
/// 250 ms, then twice as long each time up to the interval, each wait jittered, so that a
/// fleet facing a KMS that throttles does not add to it in step. Keys in a file need no
/// probe.
async fn watch_signer(tokens: Arc<Tokens>, health: Health, interval: Duration) {
    let probe = async move |tokens: &Tokens, health: &Health| {
        let set = tokens.keys().snapshot();
        if let Some(result) = set.active().probe(interval).await {
            health.set_signer(result).await;
        } else {
            health.set_signer(Ok(())).await;
        }
    };
    probe(&tokens, &health).await;
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            let set = tokens.keys().snapshot();
            let every = set.active().probe_interval(interval);
            let wait = if health.signer_failure().is_some() {
                let wait = backoff.min(every);
                backoff = (backoff * 2).min(every);
                wait.mul_f64(0.5 + crate::ids::random_fraction() / 2.0)
            } else {
                backoff = Duration::from_millis(250);
                every
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = set.active().stopped_signing() => {}
                // A new active key is waited on from now.
                () = tokens.keys().swapped() => {}
            }
            probe(&tokens, &health).await;
        }
    });
}

/// The MFA keys the configuration names; `Err` says why MFA is off.
fn mfa_sealer(keys: &crate::config::MfaKeys) -> Result<crate::mfa::seal::Sealer, String> {
    use crate::config::MfaKeys;
    use crate::mfa::seal::Sealer;
    match keys {
        MfaKeys::Given(text) => Sealer::parse(text.expose_str()),
        MfaKeys::Ephemeral => Ok(Sealer::ephemeral()),
        MfaKeys::Off(reason) => Err(reason.clone()),
    }
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before anything is served, so that an early SIGTERM drains rather than kills.
    let shutdown = shutdown_signal()?;
    let drained = CancellationToken::new();
    let app = App::build(&config, Arc::new(SystemClock), drained.clone()).await?;
    let routes = app.api_routes()?;

    let ops = TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("cannot bind --ops-listen {}", config.ops_listen))?;
    let ops_addr = ops.local_addr()?;
    let ops_task = tokio::spawn(serve_ops(
        ops,
        crate::ops::router(&app.health, app.tokens.keys(), app.cluster.clone(), &config).layer(
            conn::RefuseMalformedAuthority::layer(|| {
                let mut refused = axum::response::Response::default();
                *refused.status_mut() = http::StatusCode::BAD_REQUEST;
                refused
            }),
        ),
        config.ops_connections,
        drained.clone(),
    ));

    let server = Server::builder()
        // Forward-auth and OAuth callers (NGINX, Caddy, Traefik, resource servers) speak
        // HTTP/1.1; gRPC keeps HTTP/2, on the same port or socket.
        .accept_http1(true)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .layer(conn::RefuseMalformedAuthority::layer(|| {
            tonic::Status::invalid_argument(":authority: not a URI authority").into_http()
        }))
        .layer(telemetry::RpcLayer)
        .layer(tower::util::MapResponseLayer::new(
            crate::grpc::request_errors,
        ))
        .add_routes(routes);
    let stop = drained.clone().cancelled_owned();
    let limits = config.api_connections;
    let (api_addr, api_task) = match &config.listen {
        Listen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind --listen {addr}"))?;
            let bound = Listen::Tcp(listener.local_addr()?);
            let incoming = conn::incoming(listener, limits);
            let task = tokio::spawn(server.serve_with_incoming_shutdown(incoming, stop));
            (bound, task)
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = UnixListener::bind(path)
                .with_context(|| format!("cannot bind --listen unix:{}", path.display()))?;
            let incoming = conn::incoming(listener, limits);
            let task = tokio::spawn(server.serve_with_incoming_shutdown(incoming, stop));
            (config.listen.clone(), task)
        }
    };

    // The admin UI: its own listener, never the ops port. A port already taken (a second
    // sidecar on one host) leaves the UI off rather than the sidecar down.
    let admin_listener = match config.admin.listen {
        Some(addr) => Some(TcpListener::bind(addr).await),
        None => None,
    };
    let admin_addr = match admin_listener {
        None => None,
        Some(Ok(listener)) => {
            let addr = listener.local_addr()?;
            let ui = crate::admin::AdminUi::new(
                &config,
                app.tokens.clone(),
                app.sessions.clone(),
                app.limits.clone(),
                app.health.clone(),
                app.cluster.clone(),
            );
            tokio::spawn(serve_ops(
                listener,
                ui.router(),
                config.ops_connections,
                drained.clone(),
            ));
            Some(addr)
        }
        Some(Err(e)) => {
            tracing::warn!(
                address = ?config.admin.listen,
                error = %e,
                "admin UI not served: cannot bind --admin-listen"
            );
            None
        }
    };

    watch_keys(app.tokens.clone())?;
    telemetry::spawn_upkeep();
    // aws-lc seeds its random generator from CPU jitter at first use, which takes tens of
    // milliseconds: pay it now, beside the start, rather than in the first Issue.
    tokio::task::spawn_blocking(|| aws_lc_rs::rand::fill(&mut [0u8; 1]));
    app.health
        .watch_backends(app.tokens.store().clone(), config.backend_check_interval)
        .await;
    watch_signer(
        app.tokens.clone(),
        app.health.clone(),
        config.backend_check_interval,
    )
    .await;
    let store = app.tokens.store().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PURGE_INTERVAL).await;
            if let Err(e) = store.purge_expired().await {
                tracing::warn!(error = %e, "purging expired records failed");
            }
        }
    });

    if let Some(cluster) = &app.cluster {
        cluster.spawn(app.health.clone());
    }

    // Serving or not, the start is logged once, with what an operator needs to connect; a
    // node that cannot serve yet says so, and why.
    let not_serving = (!app.health.serving()).then(|| {
        app.health
            .backend_failure()
            .map(|(reason, _)| reason)
            .or_else(|| app.health.signer_failure())
            .unwrap_or_else(|| "starting".to_owned())
    });
    tracing::info!(
        api = %api_addr,
        ops = %ops_addr,
        admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        node = app.cluster.as_ref().map(|c| c.id()),
        mfa = %if app.mfa.off_reason().is_some() { "off" } else { "on" },
        health = %if not_serving.is_some() { "NOT_SERVING" } else { "SERVING" },
        reason = not_serving.as_deref(),
        storage = %app.tokens.store().backend(),
        rate_limits = config.rate_limits.len(),
        issuer = %config.issuer,
        access_ttl = %humantime::format_duration(config.access_ttl),
        max_ttl = %humantime::format_duration(config.max_ttl),
        backend_timeout = %humantime::format_duration(config.backend_timeout),
        tracing = if telemetry::tracing_enabled() { "otlp" } else { "off" },
        version = env!("CARGO_PKG_VERSION"),
        "{}",
        if not_serving.is_some() {
            "listening, not yet serving: a backend or the signing key's token does not answer"
        } else {
            "serving"
        }
    );

    shutdown.await;
    tracing::info!(
        delay = %humantime::format_duration(config.shutdown_delay),
        "shutting down: health is NOT_SERVING"
    );
    app.health.set_shutting_down().await;
    if let Some(cluster) = &app.cluster {
        cluster.leave().await;
    }
    tokio::time::sleep(config.shutdown_delay).await;
    drained.cancel();

    let drain = async {
        let api = async {
            let result = api_task.await;
            tracing::info!("api listener drained");
            result
        };
        let ops = async {
            let result = ops_task.await;
            tracing::info!("ops listener drained");
            result
        };
        let (api, ops) = tokio::join!(api, ops);
        api??;
        ops??;
        anyhow::Ok(())
    };
    match tokio::time::timeout(config.shutdown_grace, drain).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("calls still in flight after the shutdown grace period"),
    }
    if let Listen::Unix(path) = &config.listen {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Serves the ops router (HTTP/1.1 and HTTP/2 on one port) under the connection limits, until
/// `drained` is cancelled; then lets open requests finish.
async fn serve_ops(
    listener: TcpListener,
    router: axum::Router,
    limits: conn::Limits,
    drained: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        // The request head's bound, as HTTP/2's header list: a larger one is 431.
        .max_buf_size(MAX_HEADER_LIST as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(OPS_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let tracker = conn::Tracker::new(limits);
    let mut incoming = std::pin::pin!(conn::accepted(listener, limits));
    loop {
        let io = tokio::select! {
            next = incoming.next() => match next {
                Some(io) => io,
                None => break,
            },
            () = drained.cancelled() => break,
        };
        // The peer's address, for the per-peer cap and for what counts by client (the admin
        // UI's login attempts).
        let peer = tonic::transport::server::Connected::connect_info(&io).remote_addr();
        let peer_ip = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.ip());
        let Some(admitted) = tracker.admit(peer_ip) else {
            // Every connection that could make room has a request open: this one closes at
            // once rather than wait.
            continue;
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let router = match peer {
            Some(peer) => router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
            None => router.clone(),
        };
        let activity = admitted.activity.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |request: http::Request<hyper::body::Incoming>| {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                // Open until the response's body is done: a Watch stream counts as activity.
                let open = activity.begin();
                let call = router.clone().oneshot(request);
                async move {
                    let response = call.await?;
                    Ok::<_, std::convert::Infallible>(response.map(|body| {
                        axum::body::Body::new(body.map_frame(move |frame| {
                            let _open = &open;
                            frame
                        }))
                    }))
                }
            },
        ));
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::select! {
                _ = watcher.watch(conn.into_owned()) => {}
                // Evicted for a newcomer, or idle too long: dropping the connection closes it.
                () = admitted.closed() => {}
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// How long a burst of file events (a Kubernetes secret swap is several) settles before the
/// keys directory is read.
const KEYS_SETTLE: Duration = Duration::from_millis(200);

/// Re-reads the keys directory when it changes and on SIGHUP. Without a directory, SIGHUP is
/// logged and otherwise ignored rather than ending the process.
fn watch_keys(tokens: Arc<Tokens>) -> anyhow::Result<()> {
    use notify::Watcher;
    use tokio::signal::unix::{SignalKind, signal};
    let (changed, mut events) = tokio::sync::mpsc::channel::<()>(1);
    let mut hangup = signal(SignalKind::hangup())?;
    let Some(dir) = tokens.keys().dir() else {
        tokio::spawn(async move {
            while let Some(()) = hangup.recv().await {
                tracing::info!("SIGHUP: no keys directory to read");
            }
        });
        return Ok(());
    };
    let notify_changed = changed.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = notify_changed.try_send(());
        }
    })?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch --keys-dir {}", dir.display()))?;
    tokio::spawn(async move {
        while let Some(()) = hangup.recv().await {
            tracing::info!("SIGHUP: reading the keys directory");
            let _ = changed.send(()).await;
        }
    });
    tokio::spawn(async move {
        let _watcher = watcher;
        while events.recv().await.is_some() {
            tokio::time::sleep(KEYS_SETTLE).await;
            while events.try_recv().is_ok() {}
            let before = tokens.keys().current().active().kid().to_owned();
            match tokens.reload_keys().await {
                Ok(Reloaded::Unchanged) => {}
                Ok(Reloaded::Changed) => {
                    let keys = tokens.keys().current();
                    tracing::info!(keys = %keys.summary(), "key set changed");
                    telemetry::record_keys_loaded(Some(&before), keys.active().kid());
                }
                Err(e) => {
                    tracing::error!(error = %e, "new key set refused; the one in use is kept");
                    telemetry::record_keys_reload_failure();
                }
            }
        }
    });
    Ok(())
}

/// Removes a socket file left by a previous run; refuses to touch anything else.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(std::fs::remove_file(path)?),
        Ok(_) => anyhow::bail!(
            "--listen unix:{} exists and is not a socket",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// Listens for SIGTERM and SIGINT from now on; the future completes at the first one.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
