//! The HTTP protocols of the API listener, beside gRPC on the same port or socket: forward-auth
//! for NGINX `auth_request`, Caddy `forward_auth` and Traefik `ForwardAuth` (`forward`), and
//! OAuth 2.0 token introspection (RFC 7662) and revocation (RFC 7009) (`oauth`). Never served
//! on the ops port, which the cluster reaches.

pub mod forward;
pub mod oauth;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};

use crate::authz::Authorizer;

/// Forward-auth: any method, as NGINX's `auth_request` subrequest keeps the original one.
pub const FORWARD_AUTH_PATH: &str = "/v1/authz";
pub const INTROSPECT_PATH: &str = "/oauth2/introspect";
pub const REVOKE_PATH: &str = "/oauth2/revoke";

/// Largest request head read, in bytes of header names and values: what NGINX accepts by
/// default (`large_client_header_buffers 4 8k`) and so passes on to its auth subrequest. A
/// larger one is 431 before anything else is read. HTTP/2 callers are held to the API
/// listener's own, smaller header list limit.
pub const MAX_HEAD: usize = 32 * 1024;

/// Largest form body read, in bytes: a form holding the longest token this sidecar issues,
/// with room to spare. A larger one is 413.
pub const MAX_FORM: usize = 16 * 1024;

/// The HTTP routes of the API listener.
pub fn router(authorizer: Arc<Authorizer>, oauth: Arc<oauth::OAuth>) -> Router {
    let oauth = Router::new()
        .route(INTROSPECT_PATH, post(oauth::introspect))
        .route(REVOKE_PATH, post(oauth::revoke))
        .with_state(oauth)
        .layer(DefaultBodyLimit::max(MAX_FORM));
    Router::new()
        .route(FORWARD_AUTH_PATH, any(forward::check))
        .with_state(authorizer)
        .merge(oauth)
        .layer(axum::middleware::from_fn(bounded_head))
}

/// Refuses a request whose head is larger than [`MAX_HEAD`] with 431.
async fn bounded_head(request: Request, next: Next) -> Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if size > MAX_HEAD {
        return json(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeaderMap::new(),
            serde_json::json!({
                "error": "invalid_request",
                "error_description": format!("the request's headers exceed {MAX_HEAD} bytes"),
            })
            .to_string(),
        );
    }
    next.run(request).await
}

/// A JSON answer that no cache keeps.
fn json(status: StatusCode, mut headers: HeaderMap, body: String) -> Response {
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if body.is_empty() {
        return (status, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    (status, headers, body).into_response()
}
