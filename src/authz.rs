//! The one access decision every proxy protocol shares: Envoy's ext_authz (`grpc::envoy_authz`)
//! and HTTP forward-auth for NGINX, Caddy and Traefik (`http::forward`). A request's bearer
//! header and its route's settings go in; either the headers the proxy sets on the request it
//! passes upstream, or a denial with its RFC 6750 answer, comes out. Each protocol only parses
//! its wire form into [`Route`] and [`Credential`] and renders the [`Decision`] back, so the
//! same token on the same route gets the same answer whichever proxy asks.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::{Authz, SUBJECT_HEADER};
use crate::ratelimit::{self, RateLimiter};
use crate::telemetry;
use crate::tokens::{self, Kind, MAX_TOKEN_LEN, Tokens, Verdict, Verified};

pub struct Authorizer {
    tokens: Arc<Tokens>,
    limits: Arc<RateLimiter>,
    settings: Authz,
}

/// What stops the decision from being made: a store that does not answer, or a route that
/// names a policy this node does not have. Never a denial and never an allowance, so that the
/// proxy's own failure setting decides.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Tokens(#[from] tokens::Error),
    #[error(transparent)]
    Limits(#[from] ratelimit::Error),
}

impl Failure {
    /// Whether the backend failed, rather than the route's settings.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Failure::Tokens(tokens::Error::Store(_)) | Failure::Limits(ratelimit::Error::Store(_))
        )
    }
}

#[derive(Debug)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denial),
}

/// The request goes upstream with these headers set, replacing whatever the client sent under
/// those names, and these removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// Why a request stops at the proxy, and so its HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No bearer token: 401 with a bare challenge (RFC 6750 §3.1).
    Missing,
    /// The header is not one bearer token: 400 `invalid_request`.
    Malformed(&'static str),
    /// Forged, expired, revoked, for another audience…: 401 `invalid_token`.
    InvalidToken(&'static str),
    /// A valid token without a claim the route requires: 403 `insufficient_scope`.
    Insufficient(String),
    /// The subject's rate limit: 429 with `Retry-After`.
    RateLimited(Duration),
}

impl Denial {
    pub fn http_status(&self) -> u16 {
        match self {
            Denial::Missing | Denial::InvalidToken(_) => 401,
            Denial::Malformed(_) => 400,
            Denial::Insufficient(_) => 403,
            Denial::RateLimited(_) => 429,
        }
    }

    /// The RFC 6750 error code, for the challenge, the body, metrics and logs.
    pub fn error(&self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::Malformed(_) => "invalid_request",
            Denial::InvalidToken(_) => "invalid_token",
            Denial::Insufficient(_) => "insufficient_scope",
            Denial::RateLimited(_) => "rate_limited",
        }
    }

    /// The challenge with its error and description, for a denial that has them.
    fn challenge(&self) -> Option<String> {
        let why = self.description()?;
        // `why` is ours, never the client's: no quote or backslash to escape.
        Some(format!(
            "Bearer error=\"{}\", error_description=\"{why}\"",
            self.error()
        ))
    }

    /// `WWW-Authenticate`: bare for a missing token, with the error otherwise; none for a
    /// rate limit.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            Denial::Missing => Some("Bearer".to_owned()),
            Denial::RateLimited(_) => None,
            _ => self.challenge(),
        }
    }

    fn description(&self) -> Option<String> {
        match self {
            Denial::Missing | Denial::RateLimited(_) => None,
            Denial::Malformed(why) | Denial::InvalidToken(why) => Some((*why).to_owned()),
            Denial::Insufficient(why) => Some(why.clone()),
        }
    }

    /// `Retry-After` in whole seconds, rounded up, for a rate limit.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Denial::RateLimited(wait) => Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
            _ => None,
        }
    }

    /// The JSON body; empty for a missing token.
    pub fn body(&self) -> String {
        match self {
            Denial::Missing => String::new(),
            Denial::RateLimited(_) => "{\"error\":\"rate_limited\"}".to_owned(),
            _ => serde_json::json!({
                "error": self.error(),
                "error_description": self.description(),
            })
            .to_string(),
        }
    }
}

/// What a route sets; any other key is refused, so that a typo never silently drops a
/// requirement.
#[derive(Debug, Default)]
pub struct Route<'a> {
    /// `audience`: the audience the token must have, as Validate's `audience`.
    pub audience: Option<&'a str>,
    /// `rate_limit_policy`: a policy counted once per allowed request, keyed by subject.
    pub rate_limit_policy: Option<&'a str>,
    /// `required_claims`: comma-separated `claim` (present) or `claim=value` (equal, or an
    /// element of an array claim).
    pub required_claims: Vec<Required<'a>>,
}

/// A route setting that cannot be used: the key, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct RouteError {
    pub key: String,
    pub why: &'static str,
}

impl<'a> Route<'a> {
    /// The route from its settings as (key, value) pairs; a key given twice is refused.
    pub fn parse(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Route<'a>, RouteError> {
        let mut route = Route::default();
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in pairs {
            let invalid = |why: &'static str| RouteError {
                key: key.to_owned(),
                why,
            };
            if value.is_empty() {
                return Err(invalid("empty"));
            }
            if seen.contains(&key) {
                return Err(invalid("given more than once"));
            }
            seen.push(key);
            match key {
                "audience" => route.audience = Some(value),
                "rate_limit_policy" => route.rate_limit_policy = Some(value),
                "required_claims" => {
                    for item in value.split(',').map(str::trim) {
                        let required = match item.split_once('=') {
                            Some((claim, value)) => Required::Equals(claim.trim(), value.trim()),
                            None => Required::Present(item),
                        };
                        if required.claim().is_empty() {
                            return Err(invalid("a claim name is empty"));
                        }
                        route.required_claims.push(required);
                    }
                }
                _ => {
                    return Err(invalid(
                        "unknown; the keys are audience, rate_limit_policy and required_claims",
                    ));
                }
            }
        }
        Ok(route)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required<'a> {
    Present(&'a str),
    Equals(&'a str, &'a str),
}

impl Required<'_> {
    fn claim(&self) -> &str {
        match self {
            Required::Present(claim) | Required::Equals(claim, _) => claim,
        }
    }

    fn met_by(&self, verified: &Verified) -> bool {
        let Some(value) = claim_value(verified, self.claim()) else {
            return false;
        };
        match self {
            // Present and holding something: `false`, `""`, `[]` and `{}` say "none" as
            // clearly as an absent claim does.
            Required::Present(_) => match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Array(items) => !items.is_empty(),
                Value::Object(fields) => !fields.is_empty(),
                Value::Bool(true) | Value::Number(_) => true,
            },
            Required::Equals(_, wanted) => match &value {
                Value::Array(items) => items.iter().any(|v| scalar_is(v, wanted)),
                v => scalar_is(v, wanted),
            },
        }
    }

    fn unmet(&self) -> Denial {
        Denial::Insufficient(match self {
            Required::Present(claim) => format!("the token has no `{claim}` claim"),
            Required::Equals(claim, value) => format!("the token's `{claim}` is not `{value}`"),
        })
    }
}

fn scalar_is(value: &Value, wanted: &str) -> bool {
    match value {
        Value::String(s) => s == wanted,
        Value::Number(_) | Value::Bool(_) => {
            serde_json::from_str::<Value>(wanted).is_ok_and(|w| w == *value)
        }
        _ => false,
    }
}

/// A claim of a verified token: one the caller set at Issue, or `sub`, `jti` or `sid`.
fn claim_value(verified: &Verified, claim: &str) -> Option<Value> {
    match claim {
        "sub" => Some(Value::String(verified.subject.clone())),
        "jti" => Some(Value::String(verified.token_id.clone())),
        "sid" => verified.session_id.clone().map(Value::String),
        _ => verified.claims.get(claim).cloned(),
    }
}

/// A claim as a header value: a string as it is, anything else as compact JSON; `None` when
/// the result would not reach the app as it is: not a valid header value (a control
/// character, say), or with leading or trailing white space, which HTTP parsers trim.
fn header_value(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    http::HeaderValue::from_str(&text).ok()?;
    (text.trim_matches([' ', '\t']) == text).then_some(text)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No token header, or one of another scheme (Basic, say).
    Missing,
    /// A Bearer header that does not hold exactly one token.
    Malformed(&'static str),
    Token(&'a str),
}

/// RFC 6750 §2.1: one header, `Bearer` (any case), one or more spaces, one token68. `values`
/// are the request's values of the token header, each as received; bytes that are not UTF-8
/// are replacement characters, which no token holds.
pub fn bearer<'a>(values: &'a [Cow<'_, str>]) -> Credential<'a> {
    let value = match values {
        [] => return Credential::Missing,
        [value] => value.as_ref(),
        _ => return Credential::Malformed("more than one authorization header"),
    };
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() {
        return Credential::Malformed("the authorization header is empty");
    }
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Credential::Missing;
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Credential::Malformed("no token after Bearer");
    }
    let token68 = token.trim_end_matches('=');
    let is_token68 = !token68.is_empty()
        && token68
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !is_token68 {
        return Credential::Malformed("not exactly one token after Bearer");
    }
    Credential::Token(token)
}

impl Authorizer {
    pub fn new(tokens: Arc<Tokens>, limits: Arc<RateLimiter>, settings: Authz) -> Authorizer {
        Authorizer {
            tokens,
            limits,
            settings,
        }
    }

    /// The header the token is read from (lower case).
    pub fn token_header(&self) -> &str {
        &self.settings.token_header
    }

    /// The decision for a request whose token header held `credential`, on `route`.
    pub async fn decide(
        &self,
        credential: Credential<'_>,
        route: &Route<'_>,
    ) -> Result<Decision, Failure> {
        let token = match credential {
            Credential::Missing => return Ok(Decision::Deny(Denial::Missing)),
            Credential::Malformed(why) => return Ok(Decision::Deny(Denial::Malformed(why))),
            Credential::Token(token) => token,
        };
        if token.len() > MAX_TOKEN_LEN {
            return Ok(Decision::Deny(Denial::InvalidToken(
                "longer than any token this service issues",
            )));
        }
        let verdict = self
            .tokens
            .validate(token, route.audience, Kind::Access)
            .await?;
        telemetry::record_validation(match &verdict {
            Verdict::Valid(_) => "valid",
            Verdict::Invalid(reason) => reason.label(),
        });
        let verified = match verdict {
            Verdict::Valid(verified) => verified,
            Verdict::Invalid(reason) => {
                return Ok(Decision::Deny(Denial::InvalidToken(reason.as_str())));
            }
        };
        if let Some(unmet) = route.required_claims.iter().find(|r| !r.met_by(&verified)) {
            return Ok(Decision::Deny(unmet.unmet()));
        }
        if let Some(policy) = route.rate_limit_policy {
            let decision = self.limits.check(policy, &verified.subject, 1).await?;
            telemetry::record_rate_limit(policy, decision.allowed);
            if !decision.allowed {
                return Ok(Decision::Deny(Denial::RateLimited(decision.retry_after)));
            }
        }
        Ok(self.allow(&verified))
    }

    /// The subject and the configured claims as headers that replace whatever the client sent
    /// under those names; a claim the token lacks removes its header, and the token header is
    /// removed when asked.
    fn allow(&self, verified: &Verified) -> Decision {
        let Some(subject) = header_value(&Value::String(verified.subject.clone())) else {
            return Decision::Deny(Denial::InvalidToken(
                "the subject cannot be sent as a header",
            ));
        };
        let mut allowed = Allowed {
            set: vec![(SUBJECT_HEADER.to_owned(), subject)],
            remove: Vec::new(),
        };
        for (claim, header) in &self.settings.claim_headers {
            match claim_value(verified, claim).as_ref().and_then(header_value) {
                Some(value) => allowed.set.push((header.clone(), value)),
                None => allowed.remove.push(header.clone()),
            }
        }
        if self.settings.strip_token {
            allowed.remove.push(self.settings.token_header.clone());
        }
        Decision::Allow(allowed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What `bearer` makes of one header value: the token, "missing" or "malformed".
    fn parse(value: &str) -> String {
        match bearer(&[Cow::Borrowed(value)]) {
            Credential::Token(token) => token.to_owned(),
            Credential::Missing => "missing".to_owned(),
            Credential::Malformed(_) => "malformed".to_owned(),
        }
    }

    #[test]
    fn a_bare_required_claim_needs_a_value_that_holds_something() {
        let with = |value: Value| Verified {
            subject: "s".into(),
            token_id: "t".into(),
            expires_at: std::time::UNIX_EPOCH,
            session_id: None,
            kind: crate::tokens::Kind::Access,
            claims: [("c".to_owned(), value)].into_iter().collect(),
            issuer: "i".into(),
            audience: Vec::new(),
            issued_at: None,
            not_before: None,
        };
        let present = Required::Present("c");
        for empty in [
            Value::Null,
            Value::Bool(false),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(!present.met_by(&with(empty.clone())), "{empty}");
        }
        for full in [
            json!(true),
            json!(0),
            json!("x"),
            json!(["a"]),
            json!({"a": 1}),
        ] {
            assert!(present.met_by(&with(full.clone())), "{full}");
        }
    }

    #[test]
    fn claim_headers_never_carry_what_http_would_trim() {
        assert_eq!(header_value(&json!(" admin")), None);
        assert_eq!(header_value(&json!("admin\t")), None);
        assert_eq!(header_value(&json!("ad min")).as_deref(), Some("ad min"));
    }

    #[test]
    fn a_bearer_header_holds_exactly_one_token() {
        assert_eq!(parse("Bearer abc.def-_~+/=="), "abc.def-_~+/==");
        assert_eq!(parse("bearer   abc"), "abc");
        assert_eq!(bearer(&[]), Credential::Missing);
        assert_eq!(parse("Basic dXNlcjpwYXNz"), "missing");
        for malformed in [
            "",
            "   ",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a,Bearer b",
            "Bearer a, Bearer b",
            "Bearer ===",
            "Bearer a\"b",
            "Bearer \u{fffd}",
        ] {
            assert_eq!(parse(malformed), "malformed", "{malformed:?}");
        }
        let two = [Cow::Borrowed("Bearer a"), Cow::Borrowed("Bearer b")];
        assert!(matches!(bearer(&two), Credential::Malformed(_)));
    }

    #[test]
    fn a_route_refuses_keys_it_does_not_know_or_gets_twice() {
        let err = Route::parse([("required_claim", "role")]).unwrap_err();
        assert_eq!(err.key, "required_claim");
        assert!(Route::parse([("audience", "")]).is_err());
        assert!(Route::parse([("required_claims", "role,,tenant")]).is_err());
        let twice = Route::parse([("audience", "a"), ("audience", "b")]).unwrap_err();
        assert_eq!(twice.why, "given more than once");
        let route = Route::parse([("required_claims", "role=admin, tenant")]).unwrap();
        assert_eq!(
            route.required_claims,
            [
                Required::Equals("role", "admin"),
                Required::Present("tenant")
            ]
        );
    }

    #[test]
    fn every_denial_answers_as_rfc_6750_says() {
        let cases = [
            (Denial::Missing, 401, Some("Bearer"), None),
            (
                Denial::Malformed("x"),
                400,
                Some("Bearer error=\"invalid_request\", error_description=\"x\""),
                None,
            ),
            (
                Denial::InvalidToken("expired"),
                401,
                Some("Bearer error=\"invalid_token\", error_description=\"expired\""),
                None,
            ),
            (
                Denial::Insufficient("no".into()),
                403,
                Some("Bearer error=\"insufficient_scope\", error_description=\"no\""),
                None,
            ),
            (
                Denial::RateLimited(Duration::from_millis(1500)),
                429,
                None,
                Some(2),
            ),
        ];
        for (denial, status, challenge, retry) in cases {
            assert_eq!(denial.http_status(), status, "{denial:?}");
            assert_eq!(
                denial.www_authenticate().as_deref(),
                challenge,
                "{denial:?}"
            );
            assert_eq!(denial.retry_after(), retry, "{denial:?}");
        }
    }
}
