//! OAuth 2.0 token introspection (RFC 7662, `POST /oauth2/introspect`) and revocation
//! (RFC 7009, `POST /oauth2/revoke`), for resource servers that speak OAuth rather than gRPC:
//! Spring Security's opaque tokens, `openid-client`, Kong's and APISIX's introspection.
//!
//! Callers authenticate with `client_secret_basic` as one of the configured clients. A failed
//! authentication is 401 `invalid_client` and counts against `--oauth-client-limit` on the
//! shared store, per client id; past it every call of that id is refused (429) on every node,
//! the right secret too. A secret that verified is remembered by this node as an HMAC under a
//! key of this process, so Argon2 runs once per client and secret, not once per call; before
//! it runs, the attempt is counted (and a right secret clears the count), so guesses sent at
//! once cannot run more Argon2 checks than the policy allows.
//!
//! Introspection answers `{"active": false}` for anything that is not a live access token of
//! this sidecar (or a live refresh token, to a caller whose `token_type_hint` is
//! `refresh_token`), never why: the reason goes to the debug log and to
//! `authsidecar_validations_total`. A revoked token is inactive on every node, through the same
//! revocation view as Validate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde_json::{Map, Value};

use super::json;
use crate::config::OAuth as Settings;
use crate::ratelimit::RateLimiter;
use crate::telemetry;
use crate::tokens::{self, Kind, MAX_TOKEN_LEN, Reason, Tokens, Verdict, Verified};

pub struct OAuth {
    tokens: Arc<Tokens>,
    /// Counts failed client authentications under `policy` only.
    failures: RateLimiter,
    policy: String,
    clients: HashMap<String, Client>,
    /// Keys the remembered secrets: a random key of this process.
    remember: aws_lc_rs::hmac::Key,
    /// Bounds the Argon2 checks running at once.
    argon2: tokio::sync::Semaphore,
}

/// Argon2 checks run at once: each holds 19 MiB (the default parameters) and a core for tens
/// of milliseconds.
const ARGON2_AT_ONCE: usize = 2;

struct Client {
    secret_hash: String,
    /// The HMAC of the secret that verified last, if any.
    verified: Mutex<Option<aws_lc_rs::hmac::Tag>>,
}

impl OAuth {
    pub fn new(settings: &Settings, tokens: Arc<Tokens>) -> OAuth {
        let failures = RateLimiter::new(
            std::slice::from_ref(&settings.client_limit),
            tokens.store().clone(),
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let remember = aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng)
            .expect("the system's random generator works");
        OAuth {
            tokens,
            failures,
            policy: settings.client_limit.name.clone(),
            clients: settings
                .clients
                .iter()
                .map(|c| {
                    let client = Client {
                        secret_hash: c.secret_hash.clone(),
                        verified: Mutex::new(None),
                    };
                    (c.id.clone(), client)
                })
                .collect(),
            remember,
            argon2: tokio::sync::Semaphore::new(ARGON2_AT_ONCE),
        }
    }

    /// The id of the client the request authenticates as, or the answer that refuses it.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, Response> {
        let (id, secret) = basic(headers)
            .ok_or_else(|| invalid_client("authenticate with HTTP Basic (client_secret_basic)"))?;
        // Counted by id as sent (an unknown id too), bounded so a caller cannot mint long keys.
        let key = format!("client:{}", id.chars().take(64).collect::<String>());
        // A peek, which writes nothing: a client that authenticates costs one read. Past the
        // allowance the attempt is counted as well, so that the policy's lockout engages
        // and holds on every node, whatever the secret.
        let mut answer = self.failures.check(&self.policy, &key, 0).await;
        if matches!(&answer, Ok(peek) if !peek.allowed) {
            answer = self.failures.check(&self.policy, &key, 1).await;
        }
        if let Some(refusal) = refused(&key, answer) {
            return Err(refusal);
        }
        if self.remembered(&id, &secret) {
            return Ok(id);
        }
        // An Argon2 check ahead: counted first, as an admin login is, so that guesses sent
        // at once are bounded by the policy's allowance rather than run side by side.
        let counted = self.failures.check(&self.policy, &key, 1).await;
        if let Some(refusal) = refused(&key, counted) {
            return Err(refusal);
        }
        if self.verify(&id, secret).await {
            // A right secret clears the count, as a right admin password does; this runs once
            // per secret and node, as the secret is remembered from now on.
            if let Err(e) = self.failures.reset(&self.policy, &key).await {
                tracing::warn!(error = %e, "oauth: the store did not answer");
                return Err(unavailable());
            }
            return Ok(id);
        }
        telemetry::record_oauth_client_failure();
        tracing::warn!(client = %key, "oauth: a client authentication failed");
        Err(invalid_client("unknown client or wrong secret"))
    }

    /// Whether `secret` is the one client `id` authenticated with last on this node.
    fn remembered(&self, id: &str, secret: &str) -> bool {
        let Some(client) = self.clients.get(id) else {
            return false;
        };
        let remembered = *client.verified.lock().expect("not poisoned");
        remembered.is_some_and(|tag| {
            aws_lc_rs::hmac::verify(&self.remember, secret.as_bytes(), tag.as_ref()).is_ok()
        })
    }

    /// Whether `secret` is client `id`'s, by its Argon2id hash; remembered when it is. At most
    /// [`ARGON2_AT_ONCE`] run at once, each holding 19 MiB.
    async fn verify(&self, id: &str, secret: String) -> bool {
        let Some(client) = self.clients.get(id) else {
            return false;
        };
        let Ok(_permit) = self.argon2.acquire().await else {
            return false;
        };
        let phc = client.secret_hash.clone();
        let candidate = secret.clone();
        let ok = tokio::task::spawn_blocking(move || {
            use argon2::PasswordVerifier;
            argon2::PasswordHash::new(&phc).is_ok_and(|hash| {
                argon2::Argon2::default()
                    .verify_password(candidate.as_bytes(), &hash)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        if ok {
            let tag = aws_lc_rs::hmac::sign(&self.remember, secret.as_bytes());
            *client.verified.lock().expect("not poisoned") = Some(tag);
        }
        ok
    }

    /// The introspection answer for `token`; `refresh_hint`: the caller's `token_type_hint`
    /// is `refresh_token`.
    async fn introspect(&self, token: &str, refresh_hint: bool) -> Result<Value, tokens::Error> {
        let inactive = |reason: Reason| {
            telemetry::record_validation(reason.label());
            tracing::debug!(
                reason = reason.label(),
                "oauth: introspected an inactive token"
            );
            serde_json::json!({ "active": false })
        };
        if token.len() > MAX_TOKEN_LEN {
            return Ok(inactive(Reason::Malformed));
        }
        // A refresh token is active only to a caller that asks about refresh tokens: a
        // resource server that checks `active` alone must never accept one as a bearer token.
        let first = if refresh_hint {
            Kind::Refresh
        } else {
            Kind::Access
        };
        let mut verdict = self.tokens.validate(token, None, first).await?;
        if refresh_hint && let Verdict::Invalid(Reason::WrongKind) = verdict {
            verdict = self.tokens.validate(token, None, Kind::Access).await?;
        }
        Ok(match verdict {
            Verdict::Valid(verified) => {
                telemetry::record_validation("valid");
                active(&verified)
            }
            Verdict::Invalid(reason) => inactive(reason),
        })
    }
}

/// An active token's answer: its other claims, then the registered ones, which replace any of
/// the same name.
fn active(verified: &Verified) -> Value {
    let mut out: Map<String, Value> = verified.claims.clone();
    out.insert("active".into(), true.into());
    out.insert("sub".into(), verified.subject.clone().into());
    out.insert("jti".into(), verified.token_id.clone().into());
    out.insert("iss".into(), verified.issuer.clone().into());
    out.insert(
        "exp".into(),
        crate::clock::unix_secs(verified.expires_at).into(),
    );
    if let Some(iat) = verified.issued_at {
        out.insert("iat".into(), iat.into());
    }
    if let Some(nbf) = verified.not_before {
        out.insert("nbf".into(), nbf.into());
    }
    match verified.audience.as_slice() {
        [] => {}
        [one] => {
            out.insert("aud".into(), one.clone().into());
        }
        many => {
            out.insert("aud".into(), many.to_vec().into());
        }
    }
    if let Some(sid) = &verified.session_id {
        out.insert("sid".into(), sid.clone().into());
    }
    let token_type = match verified.kind {
        Kind::Access => "Bearer",
        Kind::Refresh => "refresh_token",
    };
    out.insert("token_type".into(), token_type.into());
    // RFC 7662's `scope` is one space-separated string; a token may hold it as an array.
    match out.get("scope") {
        Some(Value::Array(items)) => {
            let scopes: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            let joined = scopes.join(" ");
            out.insert("scope".into(), joined.into());
        }
        Some(Value::String(_)) | None => {}
        Some(_) => {
            out.remove("scope");
        }
    }
    Value::Object(out)
}

pub async fn introspect(
    State(oauth): State<Arc<OAuth>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = match oauth.authenticate(&headers).await {
        Ok(client) => client,
        Err(refused) => return refused,
    };
    let (token, hint) = match token_of(&headers, &body) {
        Ok(form) => form,
        Err(why) => return invalid_request(&why),
    };
    match oauth
        .introspect(&token, hint.as_deref() == Some("refresh_token"))
        .await
    {
        Ok(answer) => {
            tracing::debug!(
                client,
                active = answer["active"] == true,
                "oauth: introspection"
            );
            json(StatusCode::OK, HeaderMap::new(), answer.to_string())
        }
        Err(e) => {
            tracing::warn!(error = %e, "oauth: introspection failed");
            unavailable()
        }
    }
}

pub async fn revoke(State(oauth): State<Arc<OAuth>>, headers: HeaderMap, body: Bytes) -> Response {
    let client = match oauth.authenticate(&headers).await {
        Ok(client) => client,
        Err(refused) => return refused,
    };
    let (token, _) = match token_of(&headers, &body) {
        Ok(form) => form,
        Err(why) => return invalid_request(&why),
    };
    if token.len() > MAX_TOKEN_LEN {
        // Not a token of this sidecar: nothing to revoke, and RFC 7009 answers 200.
        return json(StatusCode::OK, HeaderMap::new(), String::new());
    }
    match oauth.tokens.revoke_presented(&token).await {
        Ok(newly) => {
            tracing::info!(client, newly, "oauth: revocation");
            json(StatusCode::OK, HeaderMap::new(), String::new())
        }
        Err(e) => {
            tracing::warn!(error = %e, "oauth: revocation failed");
            unavailable()
        }
    }
}

/// The `token` and `token_type_hint` parameters of a form request. The hint may be anything:
/// RFC 7009 has the server search every type it has when the hint does not find the token,
/// and a token of this sidecar says its own type. Introspection reads one hint only,
/// `refresh_token`; revocation none.
fn token_of(headers: &HeaderMap, body: &[u8]) -> Result<(String, Option<String>), String> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err("the body must be application/x-www-form-urlencoded".into());
    }
    let mut form = parse_form(body)?;
    match form.remove("token") {
        Some(token) if !token.is_empty() => Ok((token, form.remove("token_type_hint"))),
        _ => Err("the `token` parameter is required".into()),
    }
}

/// An `application/x-www-form-urlencoded` body, strictly: ASCII, `%` followed by two hex
/// digits, UTF-8 once decoded, and no parameter twice (RFC 6749 §3.2).
fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, String> {
    let text = std::str::from_utf8(body)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or("the form is not percent-encoded ASCII")?;
    let mut form = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).ok_or("the form's encoding is malformed")?;
        let value = decode(value).ok_or("the form's encoding is malformed")?;
        if form.contains_key(&name) {
            return Err(format!("the parameter `{name}` is given more than once"));
        }
        form.insert(name, value);
    }
    Ok(form)
}

/// One form-encoded component: `+` is a space, `%XX` a byte; `None` for a `%` without two hex
/// digits or bytes that are not UTF-8.
fn decode(component: &str) -> Option<String> {
    let bytes = component.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    let spaced = component.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The client id and secret of one `Authorization: Basic` header, each form-decoded as
/// RFC 6749 §2.3.1 has them encoded.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((decode(id)?, decode(secret)?))
}

fn error_body(error: &str, why: &str) -> String {
    serde_json::json!({ "error": error, "error_description": why }).to_string()
}

fn invalid_client(why: &str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"auth-sidecar\""),
    );
    json(
        StatusCode::UNAUTHORIZED,
        headers,
        error_body("invalid_client", why),
    )
}

/// The answer that refuses a client whose failure count `answer` says is past the allowance
/// (429), or that the store could not count (503); `None` lets it go on.
fn refused(
    key: &str,
    answer: Result<crate::ratelimit::Decision, crate::ratelimit::Error>,
) -> Option<Response> {
    match answer {
        Ok(decision) if !decision.allowed => {
            tracing::warn!(client = %key, "oauth: a locked-out client called");
            Some(locked(decision.retry_after))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "oauth: the store did not answer");
            Some(unavailable())
        }
    }
}

/// 429: past the failure policy's allowance, whatever the secret.
fn locked(retry_after: std::time::Duration) -> Response {
    telemetry::record_lockout("oauth_client");
    let mut headers = HeaderMap::new();
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    json(
        StatusCode::TOO_MANY_REQUESTS,
        headers,
        error_body(
            "invalid_client",
            "too many failed client authentications: locked out",
        ),
    )
}

fn invalid_request(why: &str) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        HeaderMap::new(),
        error_body("invalid_request", why),
    )
}

fn unavailable() -> Response {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        HeaderMap::new(),
        error_body("temporarily_unavailable", "the store does not answer"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_is_read_strictly() {
        let form = parse_form(b"token=a.b%2Dc&token_type_hint=x+y").unwrap();
        assert_eq!(form["token"], "a.b-c");
        assert_eq!(form["token_type_hint"], "x y");
        assert!(
            parse_form(b"token=a&token=b")
                .unwrap_err()
                .contains("`token`")
        );
        for bad in [&b"token=%ZZ"[..], b"token=%4", b"token=%FF", b"token=\xff"] {
            assert!(parse_form(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let header = |raw: &str| {
            let mut h = HeaderMap::new();
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
            );
            h
        };
        assert_eq!(
            basic(&header("rs%3A1:s%20e+c")),
            Some(("rs:1".into(), "s e c".into()))
        );
        assert_eq!(basic(&header("no-colon")), None);
        let mut two = header("a:b");
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert_eq!(basic(&two), None);
    }
}
