//! Forward-auth: the proxy sends each request's headers to `GET /v1/authz` before passing it
//! on (NGINX `auth_request`, Caddy `forward_auth`, Traefik `ForwardAuth`). 200 lets it through
//! with `X-Auth-Subject` and the configured claim headers, which the proxy copies onto the
//! request; anything else is the answer the client gets, as ext_authz answers it.
//!
//! The route's settings are the auth URL's query (`?audience=…&required_claims=…&
//! rate_limit_policy=…`), so that each proxy location sets its own. An allowed request's
//! answer holds every configured claim header, empty for a claim the token lacks, so that no
//! proxy passes a client's own value on. The original method and
//! URI come from the headers the proxies send (`X-Forwarded-Method`, `X-Forwarded-Uri`;
//! `X-Original-Method`, `X-Original-URI` as NGINX examples set them); they are logged and
//! traced, the URI without its query, which may carry a token.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use tracing::Instrument;

use super::json;
use crate::authz::{Authorizer, Decision, Denial, Route, bearer};

pub async fn check(
    State(authorizer): State<Arc<Authorizer>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (method, path) = original(&headers);
    let span = tracing::info_span!(
        "forward_auth",
        http.request.method = method,
        url.path = path,
        outcome = tracing::field::Empty,
    );
    decide(&authorizer, query.as_deref().unwrap_or_default(), &headers)
        .instrument(span)
        .await
}

async fn decide(authorizer: &Authorizer, query: &str, headers: &HeaderMap) -> Response {
    let pairs: Vec<(Cow<str>, Cow<str>)> = form_urlencoded::parse(query.as_bytes()).collect();
    let route = match Route::parse(pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))) {
        Ok(route) => route,
        Err(e) => {
            // The proxy's configuration, not the client, is wrong: a server error, which
            // every proxy passes on as one.
            tracing::warn!(key = %e.key, why = e.why, "forward-auth: the auth URL's query is wrong");
            return server_error(&format!("the auth URL's query `{}`: {}", e.key, e.why));
        }
    };
    let values: Vec<Cow<str>> = headers
        .get_all(authorizer.token_header())
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    let decision = authorizer.decide(bearer(&values), &route).await;
    let outcome = match &decision {
        Ok(Decision::Allow(_)) => "allowed",
        Ok(Decision::Deny(denial)) => denial.error(),
        Err(_) => "failed",
    };
    tracing::Span::current().record("outcome", outcome);
    tracing::debug!(outcome, "forward-auth");
    match decision {
        Ok(Decision::Allow(allowed)) => {
            let mut headers = HeaderMap::new();
            // A claim header the token has no value for is sent empty rather than left out:
            // a proxy that copies only what the answer holds would otherwise pass the
            // client's own on (Caddy 2.6's copy_headers even sets its placeholder's name).
            let empty = allowed
                .remove
                .into_iter()
                .filter(|name| name != authorizer.token_header())
                .map(|name| (name, String::new()));
            for (name, value) in allowed.set.into_iter().chain(empty) {
                // Both were checked as header names and values when they were made.
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    headers.insert(name, value);
                }
            }
            json(StatusCode::OK, headers, String::new())
        }
        Ok(Decision::Deny(denial)) => deny(&denial),
        Err(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "forward-auth: the store did not answer");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                HeaderMap::new(),
                serde_json::json!({
                    "error": "temporarily_unavailable",
                    "error_description": "the store does not answer",
                })
                .to_string(),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "forward-auth: the route cannot be checked");
            server_error(&e.to_string())
        }
    }
}

/// The denial's status, `WWW-Authenticate`, `Retry-After` and body, as ext_authz sends them.
fn deny(denial: &Denial) -> Response {
    let mut headers = HeaderMap::new();
    if let Some(challenge) = denial.www_authenticate()
        && let Ok(value) = HeaderValue::from_str(&challenge)
    {
        headers.insert(axum::http::header::WWW_AUTHENTICATE, value);
    }
    if let Some(secs) = denial.retry_after() {
        headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let status = StatusCode::from_u16(denial.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
    json(status, headers, denial.body())
}

fn server_error(why: &str) -> Response {
    json(
        StatusCode::INTERNAL_SERVER_ERROR,
        HeaderMap::new(),
        serde_json::json!({ "error": "server_error", "error_description": why }).to_string(),
    )
}

/// The original request's method and path, from whichever header the proxy sent; `-` when it
/// sent none. The query is dropped: it may carry a token.
fn original(headers: &HeaderMap) -> (&str, &str) {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
            .unwrap_or("-")
    };
    let method = first(&["x-forwarded-method", "x-original-method"]);
    let uri = first(&["x-forwarded-uri", "x-original-uri"]);
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    (method, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_path_never_keeps_its_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(original(&headers), ("-", "-"));
        headers.insert(
            "x-original-uri",
            HeaderValue::from_static("/a?access_token=x"),
        );
        headers.insert("x-forwarded-method", HeaderValue::from_static("POST"));
        assert_eq!(original(&headers), ("POST", "/a"));
        headers.insert("x-forwarded-uri", HeaderValue::from_static("/b#frag"));
        assert_eq!(original(&headers), ("POST", "/b"));
    }
}
