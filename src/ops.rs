//! The ops listener: what the cluster may see (grpc.health.v1, `/healthz` and its alias
//! `/health`, `/livez`, `/readyz`, `/metrics` and the public keys at `/.well-known/jwks.json`), on one port that
//! speaks HTTP/1.1 and HTTP/2. The token API is never served here.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::server::NamedService;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::health::{DrainingHealth, Health};
use crate::keys::Keys;

pub const JWKS_PATH: &str = "/.well-known/jwks.json";

#[derive(Clone)]
struct Ops {
    health: Health,
    keys: Arc<Keys>,
    cluster: Option<Arc<Cluster>>,
    /// The discovery document, made once from the settings; `None` without `--public-url`.
    discovery: Option<Arc<str>>,
    jwks_max_age: Duration,
}

/// The ops routes over the node's health and key set.
pub fn router(
    health: &Health,
    keys: &Arc<Keys>,
    cluster: Option<Arc<Cluster>>,
    config: &Config,
) -> Router {
    let grpc_health = format!(
        "/{}/{{*method}}",
        <tonic_health::pb::health_server::HealthServer<DrainingHealth> as NamedService>::NAME
    );
    let state = Ops {
        health: health.clone(),
        keys: keys.clone(),
        cluster,
        discovery: config.public_url.as_ref().map(|url| {
            let mut document = serde_json::json!({
                "issuer": config.issuer,
                "jwks_uri": format!("{url}{JWKS_PATH}"),
            });
            // The OAuth endpoints are on the API listener, the pod's own: listed only where
            // the operator says callers reach them, and only when a client may call them.
            if let Some(oauth) = &config.oauth.public_url
                && !config.oauth.clients.is_empty()
            {
                let basic = serde_json::json!(["client_secret_basic"]);
                document["introspection_endpoint"] =
                    format!("{oauth}{}", crate::http::INTROSPECT_PATH).into();
                document["introspection_endpoint_auth_methods_supported"] = basic.clone();
                document["revocation_endpoint"] =
                    format!("{oauth}{}", crate::http::REVOKE_PATH).into();
                document["revocation_endpoint_auth_methods_supported"] = basic;
            }
            document.to_string().into()
        }),
        jwks_max_age: config.jwks_max_age,
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/health", get(healthz))
        .route("/readyz", get(healthz))
        .route("/livez", get(livez))
        .route(JWKS_PATH, get(jwks))
        .route("/metrics", get(metrics))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .with_state(state)
        .route_service(
            &grpc_health,
            tower::Layer::layer(
                &tower::util::MapResponseLayer::new(crate::grpc::request_errors),
                health.service(),
            ),
        )
        .fallback(not_found)
}

/// The serving state on the first line, which probes read; then what an operator needs to
/// know: why a backend is down, a refused key set, the live nodes and what they disagree on.
async fn healthz(State(ops): State<Ops>) -> (StatusCode, String) {
    let (status, word) = if ops.health.serving() {
        (StatusCode::OK, "SERVING")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING")
    };
    let mut body = format!(
        "{word}\n{}\n{}\n",
        ops.health.backend_detail(),
        ops.keys.health_detail()
    );
    if let Some(reason) = ops.health.signer_failure() {
        body.push_str(&format!("signing key does not sign: {reason}\n"));
    }
    if let Some(cluster) = &ops.cluster {
        body.push_str(&cluster.health_detail());
        body.push('\n');
    }
    (status, body)
}

/// The process answers: that is all liveness asks.
async fn livez() -> &'static str {
    "SERVING\n"
}

/// Prometheus text exposition of every metric this process records.
async fn metrics() -> Response {
    let handle = crate::telemetry::metrics();
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

async fn jwks(State(ops): State<Ops>) -> Response {
    let document = ops.keys.current().jwks().to_owned();
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={}", ops.jwks_max_age.as_secs()),
            ),
        ],
        document,
    )
        .into_response()
}

/// OpenID Connect discovery, enough for verifiers that find the JWKS from the issuer: made
/// from `--public-url`, never from the request, and not served without it.
async fn openid_configuration(State(ops): State<Ops>) -> Response {
    let Some(document) = ops.discovery else {
        return (
            StatusCode::NOT_FOUND,
            "not served: --public-url is not set\n",
        )
            .into_response();
    };
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={}", ops.jwks_max_age.as_secs()),
            ),
        ],
        document.to_string(),
    )
        .into_response()
}

/// UNIMPLEMENTED for a gRPC call (the token API among them), 404 for anything else.
async fn not_found(request: Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("not served on the ops listener").into_http::<Body>()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}
