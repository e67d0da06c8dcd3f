//! Conversions between wire types and domain types, side by side: `TryFrom` for requests (a
//! failure names the field), `From` for replies.

use std::time::{Duration, SystemTime};

use prost_types::value::Kind as ValueKind;
use serde_json::{Map, Number, Value};

use crate::pb;
use crate::ratelimit::Decision;
use crate::store::Session;
use crate::tokens::{
    Error, IssueParams, Issued, Kind, MAX_TOKEN_LEN, Reason, Refreshed, RevokeTarget, Verdict,
};

/// Longest subject, audience, session id or token id accepted.
const MAX_ID_LEN: usize = 1024;

pub struct ValidateParams {
    pub token: String,
    pub audience: Option<String>,
    pub kind: Kind,
}

impl TryFrom<pb::IssueRequest> for IssueParams {
    type Error = Error;

    fn try_from(req: pb::IssueRequest) -> Result<Self, Error> {
        let subject = new_subject(req.subject)?;
        for aud in &req.audience {
            if aud.is_empty() || aud.len() > MAX_ID_LEN {
                return Err(Error::invalid(
                    "audience",
                    format!("each entry must be 1 to {MAX_ID_LEN} bytes"),
                ));
            }
            storable("audience", aud)?;
        }
        let ttl = req.ttl.map(|d| duration("ttl", d)).transpose()?;
        let claims = match req.claims {
            Some(s) => struct_to_json(s).map_err(|reason| Error::invalid("claims", reason))?,
            None => Map::new(),
        };
        let session_id = optional("session_id", req.session_id)?;
        Ok(IssueParams {
            subject,
            audience: req.audience,
            ttl,
            claims,
            session_id,
            kind: kind("kind", req.kind)?,
        })
    }
}

impl TryFrom<pb::ValidateRequest> for ValidateParams {
    type Error = Error;

    fn try_from(req: pb::ValidateRequest) -> Result<Self, Error> {
        Ok(ValidateParams {
            token: token("token", req.token)?,
            audience: optional("audience", req.audience)?,
            kind: kind("kind", req.kind)?,
        })
    }
}

impl TryFrom<pb::RevokeRequest> for RevokeTarget {
    type Error = Error;

    fn try_from(req: pb::RevokeRequest) -> Result<Self, Error> {
        use pb::revoke_request::Target;
        match req.target {
            Some(Target::Token(t)) => Ok(RevokeTarget::Token(token("token", t)?)),
            Some(Target::TokenId(id)) => Ok(RevokeTarget::TokenId(required("token_id", id)?)),
            Some(Target::Subject(s)) => Ok(RevokeTarget::Subject(required("subject", s)?)),
            None => Err(Error::invalid("target", "set token, token_id or subject")),
        }
    }
}

impl From<Issued> for pb::IssueResponse {
    fn from(i: Issued) -> Self {
        pb::IssueResponse {
            token: i.token,
            token_id: i.token_id,
            expires_at: Some(timestamp(i.expires_at)),
            key_id: i.key_id,
        }
    }
}

/// What CreateSession asks for, checked for shape.
pub struct CreateSessionParams {
    pub subject: String,
    pub ttl: Option<Duration>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl TryFrom<pb::CreateSessionRequest> for CreateSessionParams {
    type Error = Error;

    fn try_from(req: pb::CreateSessionRequest) -> Result<Self, Error> {
        for (k, v) in &req.metadata {
            storable("metadata", k)?;
            storable("metadata", v)?;
        }
        Ok(CreateSessionParams {
            subject: new_subject(req.subject)?,
            ttl: req.ttl.map(|d| duration("ttl", d)).transpose()?,
            metadata: req.metadata.into_iter().collect(),
        })
    }
}

/// A session id from a request: required, and of a sane length.
pub fn session_id(value: String) -> Result<String, Error> {
    required("session_id", value)
}

/// A subject from a request.
pub fn subject(value: String) -> Result<String, Error> {
    required("subject", value)
}

/// The subject of a new token or session: also without leading or trailing white space,
/// which an HTTP parser would trim from the `x-auth-subject` header, so that `" admin"`
/// never reaches an app behind a proxy as `admin`.
fn new_subject(value: String) -> Result<String, Error> {
    let subject = required("subject", value)?;
    if subject.trim() != subject {
        return Err(Error::invalid(
            "subject",
            "has leading or trailing white space, which HTTP headers do not keep",
        ));
    }
    Ok(subject)
}

/// A refresh token from a request.
pub fn refresh_token(value: String) -> Result<String, Error> {
    token("refresh_token", value)
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        pb::Session {
            id: s.id,
            subject: s.subject,
            created_at: Some(timestamp(s.created_at)),
            expires_at: Some(timestamp(s.expires_at)),
            last_seen_at: Some(timestamp(s.last_seen_at)),
            idle_expires_at: s.idle_expires_at.map(timestamp),
            metadata: s.metadata.into_iter().collect(),
        }
    }
}

impl From<Refreshed> for pb::RefreshResponse {
    fn from(r: Refreshed) -> Self {
        pb::RefreshResponse {
            access: Some(r.access.into()),
            refresh: Some(r.refresh.into()),
        }
    }
}

impl From<Verdict> for pb::ValidateResponse {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Valid(v) => pb::ValidateResponse {
                valid: true,
                reason: pb::InvalidReason::Unspecified.into(),
                subject: v.subject,
                token_id: v.token_id,
                expires_at: Some(timestamp(v.expires_at)),
                claims: Some(json_to_struct(v.claims)),
                session_id: v.session_id.unwrap_or_default(),
                kind: pb::TokenKind::from(v.kind).into(),
            },
            Verdict::Invalid(reason) => pb::ValidateResponse {
                valid: false,
                reason: pb::InvalidReason::from(reason).into(),
                ..Default::default()
            },
        }
    }
}

impl From<Decision> for pb::CheckRateLimitResponse {
    fn from(d: Decision) -> Self {
        pb::CheckRateLimitResponse {
            allowed: d.allowed,
            limit: d.limit,
            remaining: d.remaining,
            retry_after: Some(d.retry_after.try_into().unwrap_or_default()),
            reset_after: Some(d.reset_after.try_into().unwrap_or_default()),
        }
    }
}

impl From<Reason> for pb::InvalidReason {
    fn from(r: Reason) -> Self {
        match r {
            Reason::Malformed => pb::InvalidReason::Malformed,
            Reason::BadSignature => pb::InvalidReason::BadSignature,
            Reason::Expired => pb::InvalidReason::Expired,
            Reason::NotYetValid => pb::InvalidReason::NotYetValid,
            Reason::Revoked => pb::InvalidReason::Revoked,
            Reason::WrongAudience => pb::InvalidReason::WrongAudience,
            Reason::WrongIssuer => pb::InvalidReason::WrongIssuer,
            Reason::UnknownKey => pb::InvalidReason::UnknownKey,
            Reason::WrongKind => pb::InvalidReason::WrongKind,
        }
    }
}

impl From<Kind> for pb::TokenKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Access => pb::TokenKind::Access,
            Kind::Refresh => pb::TokenKind::Refresh,
        }
    }
}

fn kind(field: &'static str, raw: i32) -> Result<Kind, Error> {
    match pb::TokenKind::try_from(raw) {
        Ok(pb::TokenKind::Unspecified | pb::TokenKind::Access) => Ok(Kind::Access),
        Ok(pb::TokenKind::Refresh) => Ok(Kind::Refresh),
        Err(_) => Err(Error::invalid(field, format!("unknown token kind {raw}"))),
    }
}

fn required(field: &'static str, value: String) -> Result<String, Error> {
    optional(field, value)?.ok_or_else(|| Error::invalid(field, "is required"))
}

fn optional(field: &'static str, value: String) -> Result<Option<String>, Error> {
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, over the {MAX_ID_LEN}-byte limit", value.len()),
        ));
    }
    storable(field, &value)?;
    Ok(Some(value).filter(|v| !v.is_empty()))
}

/// Refuses text that some backend cannot store (PostgreSQL's text and JSONB refuse U+0000),
/// so that every backend answers alike, before any of them is asked.
fn storable(field: &'static str, value: &str) -> Result<(), Error> {
    if value.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL (U+0000)"));
    }
    Ok(())
}

/// A rate-limit policy name and key from a request. (Their lengths are the limiter's rule.)
pub fn rate_limit_key(policy: String, key: String) -> Result<(String, String), Error> {
    storable("policy", &policy)?;
    storable("key", &key)?;
    Ok((policy, key))
}

fn token(field: &'static str, value: String) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes, over the {MAX_TOKEN_LEN}-byte limit",
                value.len()
            ),
        ));
    }
    Ok(value)
}

fn duration(field: &'static str, d: prost_types::Duration) -> Result<Duration, Error> {
    Duration::try_from(d).map_err(|_| Error::invalid(field, "must be a positive duration"))
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Converts a protobuf `Struct` to JSON; refuses NaN and infinities, which JSON cannot carry.
pub fn struct_to_json(s: prost_types::Struct) -> Result<Map<String, Value>, String> {
    s.fields
        .into_iter()
        .map(|(k, v)| Ok((k, value_to_json(v)?)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> Result<Value, String> {
    Ok(match v.kind {
        None | Some(ValueKind::NullValue(_)) => Value::Null,
        Some(ValueKind::BoolValue(b)) => Value::Bool(b),
        Some(ValueKind::NumberValue(n)) => {
            // Whole numbers stay integers in the token, as a JSON client would write them.
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Value::Number(Number::from_f64(n).ok_or("numbers must be finite")?)
            }
        }
        Some(ValueKind::StringValue(s)) => Value::String(s),
        Some(ValueKind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .map(value_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Some(ValueKind::StructValue(s)) => Value::Object(struct_to_json(s)?),
    })
}

pub fn json_to_struct(map: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => ValueKind::NullValue(0),
        Value::Bool(b) => ValueKind::BoolValue(b),
        Value::Number(n) => ValueKind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => ValueKind::StringValue(s),
        Value::Array(a) => ValueKind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => ValueKind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_struct_round_trip() {
        let json: Value = serde_json::json!({
            "n": 3, "f": 1.5, "s": "x", "b": true, "z": null, "l": [1, "a"], "o": {"k": [false]}
        });
        let Value::Object(map) = json.clone() else {
            unreachable!()
        };
        let back = struct_to_json(json_to_struct(map)).unwrap();
        assert_eq!(Value::Object(back), json);
    }

    #[test]
    fn request_errors_name_the_field() {
        let err = IssueParams::try_from(pb::IssueRequest::default()).unwrap_err();
        assert_eq!(err.to_string(), "subject: is required");
        let err = ValidateParams::try_from(pb::ValidateRequest {
            token: "x".repeat(MAX_TOKEN_LEN + 1),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().starts_with("token: "), "{err}");
        let err = RevokeTarget::try_from(pb::RevokeRequest::default()).unwrap_err();
        assert!(err.to_string().starts_with("target: "), "{err}");
        let err = IssueParams::try_from(pb::IssueRequest {
            subject: "a".into(),
            ttl: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("ttl: "), "{err}");
    }
}
