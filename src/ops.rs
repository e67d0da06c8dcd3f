//! The ops listener: what the cluster may see (grpc.health.v1 and `GET /healthz`), on one
//! port that speaks HTTP/1.1 and HTTP/2. The token API is never served here.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::health::Health;

pub fn router(health: &Health) -> Router {
    let grpc = tonic::service::Routes::new(health.service()).into_axum_router();
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(health.clone())
        .merge(grpc)
}

async fn healthz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.serving() {
        (StatusCode::OK, "SERVING\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}
