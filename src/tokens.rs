//! Issuing, validating, revoking and refreshing tokens: the rules, apart from gRPC and from
//! the store.
//!
//! Validation decodes the token itself rather than trusting a library's claim checks, so that
//! the algorithm comes from the key, a claim of the wrong type is malformed rather than
//! absent, and every time check runs on the injected clock.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quick_cache::Weighter;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::clock::{
    Clock, MAX_UNIX_SECS, from_unix_millis as from_millis, from_unix_secs, unix_millis as millis,
    unix_secs,
};
use crate::config::Config;
pub use crate::ids::random_id;
use crate::keys::{KeyError, Keys, Reloaded};
use crate::store::{Family, Rotation, Store, StoreError, Successor, TokenCheck};

/// Longest token Validate and Revoke accept, and so the longest Issue produces.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Claims the sidecar sets itself; a caller may not set them through extra claims.
pub const RESERVED_CLAIMS: [&str; 11] = [
    "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "typ", "fam", "auth_ms",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Access,
    Refresh,
}

impl Kind {
    fn claim(self) -> &'static str {
        match self {
            Kind::Access => "access",
            Kind::Refresh => "refresh",
        }
    }

    fn from_claim(s: &str) -> Option<Kind> {
        match s {
            "access" => Some(Kind::Access),
            "refresh" => Some(Kind::Refresh),
            _ => None,
        }
    }
}

/// Why a token is not valid. An answer, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    Revoked,
    WrongAudience,
    WrongIssuer,
    UnknownKey,
    WrongKind,
}

impl Reason {
    /// The reason as a metric label or span attribute value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Revoked => "revoked",
            Reason::WrongAudience => "wrong_audience",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::UnknownKey => "unknown_key",
            Reason::WrongKind => "wrong_kind",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadSignature => "bad signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not yet valid",
            Reason::Revoked => "revoked",
            Reason::WrongAudience => "wrong audience",
            Reason::WrongIssuer => "wrong issuer",
            Reason::UnknownKey => "unknown key",
            Reason::WrongKind => "wrong kind",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be served as asked; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// What the request names does not exist (or no longer does).
    #[error("{0}")]
    NotFound(String),
    /// A refresh token that cannot be spent: invalid, revoked, reused or past its family's end.
    #[error("{0}")]
    Unauthenticated(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed: {0}")]
    Signing(String),
    /// The signing key's source (a PKCS#11 token, a KMS) did not sign; the detail is for the
    /// log.
    #[error("the signing key does not sign: {0}")]
    SignerUnavailable(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// What an app asks to be issued, already checked for shape by the caller.
#[derive(Debug, Clone, Default)]
pub struct IssueParams {
    pub subject: String,
    pub audience: Vec<String>,
    pub ttl: Option<Duration>,
    pub claims: Map<String, Value>,
    pub session_id: Option<String>,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub token_id: String,
    pub expires_at: SystemTime,
    pub key_id: String,
}

/// The claims of a token that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub subject: String,
    pub token_id: String,
    pub expires_at: SystemTime,
    pub session_id: Option<String>,
    pub kind: Kind,
    /// Every claim the sidecar did not set itself.
    pub claims: Map<String, Value>,
    pub issuer: String,
    pub audience: Vec<String>,
    /// `iat` and `nbf`, in seconds since the epoch, when the token has them.
    pub issued_at: Option<i64>,
    pub not_before: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum Verdict {
    Valid(Verified),
    Invalid(Reason),
}

#[derive(Debug, Clone)]
pub enum RevokeTarget {
    Token(String),
    TokenId(String),
    /// Every token of the subject issued before now, and its sessions.
    Subject(String),
}

/// What a Revoke did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    pub newly: bool,
    pub sessions_deleted: u32,
}

/// The two tokens a Refresh returns.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub access: Issued,
    pub refresh: Issued,
}

/// The settings the token rules depend on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub issuer: String,
    pub audience: Option<String>,
    pub access_ttl: Duration,
    pub max_ttl: Duration,
    pub leeway: Duration,
    /// Bytes of memory for remembering verified tokens; 0 turns the cache off.
    pub verify_cache: u64,
    /// How long a spent refresh token may be retried for the same successor.
    pub refresh_reuse_grace: Duration,
    /// The absolute lifetime of a refresh-token family.
    pub refresh_max_lifetime: Duration,
    /// How long a logout cutoff is kept: the longest any login it cuts off lives, a token
    /// (the maximum TTL) or an admin UI login (its session TTL), before the leeway.
    pub cutoff_lifetime: Duration,
}

impl From<&Config> for Settings {
    fn from(c: &Config) -> Settings {
        Settings {
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            access_ttl: c.access_ttl,
            max_ttl: c.max_ttl,
            leeway: c.leeway,
            verify_cache: c.verify_cache,
            refresh_reuse_grace: c.refresh_reuse_grace,
            refresh_max_lifetime: c.refresh_max_lifetime,
            cutoff_lifetime: c.max_ttl.max(c.admin.session_ttl),
        }
    }
}

/// Signature-verified decodes, by the token's full text. Decoding is a pure function of the
/// token and the key set, so remembering it is safe; every time, issuer, audience, kind and
/// revocation check still runs on every call. Apps present the same bearer token on each
/// request of its life, and the decode (HMAC, base64, JSON) is most of Validate's own cost.
/// Only tokens whose signature verified are kept, so forgeries cannot fill it.
type VerifiedCache = quick_cache::sync::Cache<Box<str>, Arc<Decoded>, VerifiedWeight>;

/// Approximate bytes an entry holds: the token text, its decoded claims, and bookkeeping.
#[derive(Clone)]
struct VerifiedWeight;

impl Weighter<Box<str>, Arc<Decoded>> for VerifiedWeight {
    fn weight(&self, token: &Box<str>, _: &Arc<Decoded>) -> u64 {
        2 * token.len() as u64 + 256
    }
}

pub struct Tokens {
    settings: Settings,
    keys: Arc<Keys>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    verified: Option<VerifiedCache>,
}

impl Tokens {
    pub fn new(
        settings: Settings,
        keys: Arc<Keys>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Tokens {
        let verified = (settings.verify_cache > 0).then(|| {
            let typical_entry = 2 * 400 + 256;
            let entries = (settings.verify_cache / typical_entry).max(1) as usize;
            VerifiedCache::with_weighter(entries, settings.verify_cache, VerifiedWeight)
        });
        Tokens {
            settings,
            keys,
            store,
            clock,
            verified,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// Reads the keys directory again; on a change, forgets every remembered verification.
    pub async fn reload_keys(&self) -> Result<Reloaded, KeyError> {
        let reloaded = self.keys.reload().await?;
        if reloaded == Reloaded::Changed
            && let Some(cache) = &self.verified
        {
            cache.clear();
        }
        Ok(reloaded)
    }

    /// Signs a token. With a session id the session must be live; a refresh token starts a
    /// family, stored before the token is returned.
    pub async fn issue(&self, params: IssueParams) -> Result<Issued, Error> {
        let ttl = params.ttl.unwrap_or(self.settings.access_ttl);
        if ttl < Duration::from_secs(1) {
            return Err(Error::invalid("ttl", "must be at least 1s"));
        }
        if ttl > self.settings.max_ttl {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "must be at most the configured maximum {}",
                    humantime::format_duration(self.settings.max_ttl)
                ),
            ));
        }
        if let Some(name) = RESERVED_CLAIMS
            .iter()
            .find(|name| params.claims.contains_key(**name))
        {
            return Err(Error::invalid(
                "claims",
                format!("`{name}` is set by the sidecar and cannot be overridden"),
            ));
        }
        let now = self.clock.now();
        // A session binds tokens of its own subject only. Another subject's session answers
        // as a missing one does, so the answer tells nothing of other subjects' sessions.
        if let Some(sid) = &params.session_id
            && self
                .store
                .get_session(sid, now)
                .await?
                .is_none_or(|s| s.subject != params.subject)
        {
            return Err(Error::NotFound(format!(
                "session_id: no live session `{sid}` of this subject"
            )));
        }
        let audience = if params.audience.is_empty() {
            self.settings.audience.iter().cloned().collect()
        } else {
            params.audience
        };
        let mut body = Body {
            subject: params.subject,
            audience,
            extra: params.claims,
            session_id: params.session_id,
            family_id: None,
            login_ms: millis(now),
        };
        let token_id = random_id();
        let mut exp = now + ttl;
        if params.kind == Kind::Refresh {
            let family = Family {
                id: random_id(),
                subject: body.subject.clone(),
                expires_at: now + self.settings.refresh_max_lifetime,
                current: token_id.clone(),
            };
            exp = exp.min(family.expires_at);
            body.family_id = Some(family.id.clone());
            self.store.create_family(&family).await?;
        }
        self.mint(&body, params.kind, token_id, millis(now), exp)
            .await
    }

    /// Signs one token of `body`.
    async fn mint(
        &self,
        body: &Body,
        kind: Kind,
        token_id: String,
        issued_at_ms: i64,
        expires_at: SystemTime,
    ) -> Result<Issued, Error> {
        let exp = unix_secs(expires_at);
        let mut claims = body.extra.clone();
        claims.insert("iss".into(), self.settings.issuer.clone().into());
        claims.insert("sub".into(), body.subject.clone().into());
        match body.audience.as_slice() {
            [] => {}
            [one] => {
                claims.insert("aud".into(), one.clone().into());
            }
            many => {
                claims.insert("aud".into(), many.to_vec().into());
            }
        }
        // Whole seconds, as every JWT library reads a NumericDate. What a logout compares,
        // to the millisecond, is the login instant in `auth_ms`.
        claims.insert("iat".into(), issued_at_ms.div_euclid(1000).into());
        claims.insert("auth_ms".into(), body.login_ms.into());
        claims.insert("exp".into(), exp.into());
        claims.insert("jti".into(), token_id.clone().into());
        if let Some(sid) = &body.session_id {
            claims.insert("sid".into(), sid.clone().into());
        }
        if let Some(fam) = &body.family_id {
            claims.insert("fam".into(), fam.clone().into());
        }
        claims.insert("typ".into(), kind.claim().into());

        let keys = self.keys.snapshot();
        let key = keys.active();
        let payload = serde_json::to_vec(&claims).map_err(|e| Error::Signing(e.to_string()))?;
        let mut token = String::with_capacity(MAX_TOKEN_LEN.min(2 * payload.len() + 512));
        token.push_str(key.encoded_header());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        // A key in a PKCS#11 token or a KMS signs there, off the async workers; a token it does not
        // sign is UNAVAILABLE, never a token signed by another key.
        let signature = key
            .sign_async(token.as_bytes())
            .await
            .map_err(|e| match e {
                crate::keys::SignError::CannotSign(_) => Error::Signing(e.to_string()),
                crate::keys::SignError::Unavailable(detail) => Error::SignerUnavailable(detail),
            })?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(
                "claims",
                format!(
                    "the token would be {} bytes, over the {MAX_TOKEN_LEN}-byte limit",
                    token.len()
                ),
            ));
        }
        Ok(Issued {
            token,
            token_id,
            expires_at: from_unix_secs(exp),
            key_id: key.kid().to_owned(),
        })
    }

    /// Spends a refresh token for a new access token and a new refresh token of its family.
    /// A retry of the token spent last, within the grace period or once after it, gets the
    /// same two tokens again (same ids and claims); any other reuse revokes the family.
    pub async fn refresh(&self, token: &str) -> Result<Refreshed, Error> {
        let rejected =
            |reason: Reason| Error::Unauthenticated(format!("refresh_token: {}", reason.as_str()));
        let decoded = self.decode_cached(token).map_err(rejected)?;
        self.check(&decoded, None, Kind::Refresh)
            .map_err(rejected)?;
        let Some(family_id) = decoded.family_id.as_deref() else {
            return Err(Error::Unauthenticated(
                "refresh_token: not of a refresh-token family".into(),
            ));
        };
        let now = self.clock.now();
        let successor = Successor {
            refresh_id: random_id(),
            access_id: random_id(),
            issued_at_ms: millis(now),
        };
        if self
            .store
            .is_revoked(&TokenCheck {
                // A rotation follows on the strength of this answer: read the backend.
                fresh: true,
                ..decoded.store_check(now, self.settings.leeway)
            })
            .await?
        {
            // A revoked token never rotates; but one that was spent before is presented again
            // all the same, a reuse, and its family goes.
            let step = self
                .store
                .rotate(
                    family_id,
                    &decoded.token_id,
                    true,
                    &successor,
                    now,
                    std::time::UNIX_EPOCH,
                )
                .await?;
            if step == Rotation::Reused {
                tracing::warn!(
                    family = family_id,
                    subject = %decoded.subject,
                    "revoked refresh token reused: family revoked"
                );
                return Err(Error::Unauthenticated(
                    "refresh_token: revoked, and spent before: its family is now revoked".into(),
                ));
            }
            return Err(rejected(Reason::Revoked));
        }
        // Without a grace period nothing replays within it, not even a call whose clock read
        // an instant before the rotating call's did.
        let grace = self.settings.refresh_reuse_grace;
        let replay_until = if grace.is_zero() {
            std::time::UNIX_EPOCH
        } else {
            now + grace
        };
        // The successor is signed before the rotation commits, so that a key that cannot sign
        // (an HSM away) answers UNAVAILABLE with nothing spent, and the client may retry. Its
        // lifetime is bounded by the family's end, which the store answers; the family
        // started at the login and lives `--refresh-max-lifetime`, so that is the guess, and
        // a family whose end differs (the setting changed since) is signed again below.
        let guessed_end = from_millis(decoded.login_ms())
            .checked_add(self.settings.refresh_max_lifetime)
            .unwrap_or(from_millis(i64::MAX));
        let signed = self.mint_pair(&decoded, &successor, guessed_end).await?;
        match self
            .store
            .rotate(
                family_id,
                &decoded.token_id,
                false,
                &successor,
                now,
                replay_until,
            )
            .await?
        {
            Rotation::Rotated { family_ends }
                if self.pair_ends(&decoded, &successor, family_ends)
                    == self.pair_ends(&decoded, &successor, guessed_end) =>
            {
                Ok(signed)
            }
            Rotation::Rotated { family_ends } => {
                self.mint_pair(&decoded, &successor, family_ends).await
            }
            // The token spent last, retried (within the grace, or the one retry after it):
            // the same two tokens again, as functions of the stored successor.
            Rotation::Replay {
                successor,
                family_ends,
            } => self.mint_pair(&decoded, &successor, family_ends).await,
            Rotation::Reused => {
                tracing::warn!(
                    family = family_id,
                    subject = %decoded.subject,
                    "refresh token reused: family revoked"
                );
                Err(Error::Unauthenticated(
                    "refresh_token: already spent; its family is now revoked".into(),
                ))
            }
            Rotation::Gone => Err(Error::Unauthenticated(
                "refresh_token: its family is revoked or has ended".into(),
            )),
        }
    }

    /// When the access and refresh tokens that succeed `spent` as `successor` expire, in a
    /// family that ends at `family_ends`.
    fn pair_ends(
        &self,
        spent: &Decoded,
        successor: &Successor,
        family_ends: SystemTime,
    ) -> (SystemTime, SystemTime) {
        let issued = from_millis(successor.issued_at_ms);
        let lifetime = Duration::from_secs(
            spent
                .exp
                .saturating_sub(spent.iat.unwrap_or(spent.exp))
                .max(1) as u64,
        );
        (
            (issued + self.settings.access_ttl).min(family_ends),
            (issued + lifetime).min(family_ends),
        )
    }

    /// Signs the access and refresh tokens that succeed `spent`: a function of the spent
    /// token, the successor and the family's end, so that a replay mints the same claims.
    async fn mint_pair(
        &self,
        spent: &Decoded,
        successor: &Successor,
        family_ends: SystemTime,
    ) -> Result<Refreshed, Error> {
        let body = Body {
            subject: spent.subject.clone(),
            audience: spent.audience.clone(),
            extra: spent.extra.clone(),
            session_id: spent.session_id.clone(),
            family_id: spent.family_id.clone(),
            // The family's login: a logout after it ends the whole chain, however often it
            // is refreshed.
            login_ms: spent.login_ms(),
        };
        let (access_exp, refresh_exp) = self.pair_ends(spent, successor, family_ends);
        Ok(Refreshed {
            access: self
                .mint(
                    &body,
                    Kind::Access,
                    successor.access_id.clone(),
                    successor.issued_at_ms,
                    access_exp,
                )
                .await?,
            refresh: self
                .mint(
                    &body,
                    Kind::Refresh,
                    successor.refresh_id.clone(),
                    successor.issued_at_ms,
                    refresh_exp,
                )
                .await?,
        })
    }

    /// Checks a token. `audience` overrides the configured expected audience.
    pub async fn validate(
        &self,
        token: &str,
        audience: Option<&str>,
        kind: Kind,
    ) -> Result<Verdict, Error> {
        let decoded = match self.decode_cached(token) {
            Ok(d) => d,
            Err(reason) => return Ok(Verdict::Invalid(reason)),
        };
        if let Err(reason) = self.check(&decoded, audience, kind) {
            return Ok(Verdict::Invalid(reason));
        }
        if self
            .store
            .is_revoked(&decoded.store_check(self.clock.now(), self.settings.leeway))
            .await?
        {
            return Ok(Verdict::Invalid(Reason::Revoked));
        }
        Ok(Verdict::Valid(Verified {
            subject: decoded.subject.clone(),
            token_id: decoded.token_id.clone(),
            expires_at: from_unix_secs(decoded.exp),
            session_id: decoded.session_id.clone(),
            kind: decoded.kind,
            claims: decoded.extra.clone(),
            issuer: decoded.issuer.clone(),
            audience: decoded.audience.clone(),
            issued_at: decoded.iat,
            not_before: decoded.nbf,
        }))
    }

    /// Revokes a token. By token, its signature is verified first, so nobody can fill the
    /// store with made-up ids; the record lives until the token would have expired. By id,
    /// it lives for the longest lifetime a token can have.
    pub async fn revoke(&self, target: RevokeTarget) -> Result<Revoked, Error> {
        let leeway = self.settings.leeway;
        let now = self.clock.now();
        let (token_id, until) = match target {
            RevokeTarget::Subject(subject) => {
                // Every token of the subject has expired by `until`: none, a refresh token
                // included, lives longer than the maximum TTL (nor an admin UI login longer
                // than its session TTL).
                let until = now + self.settings.cutoff_lifetime + leeway;
                let cutoff = from_millis(millis(now));
                let sessions_deleted = self.store.revoke_subject(&subject, cutoff, until).await?;
                self.wait_past(cutoff).await;
                return Ok(Revoked {
                    newly: true,
                    sessions_deleted,
                });
            }
            RevokeTarget::Token(token) => {
                let decoded = self
                    .decode_cached(&token)
                    .and_then(|d| self.within_longest_life(&d, unix_secs(now)).map(|()| d))
                    .map_err(|reason| {
                        Error::invalid(
                            "token",
                            format!("not a token of this sidecar: {}", reason.as_str()),
                        )
                    })?;
                (
                    decoded.token_id.clone(),
                    from_unix_secs(decoded.exp) + leeway,
                )
            }
            RevokeTarget::TokenId(id) => (id, now + self.settings.max_ttl + leeway),
        };
        if until <= now {
            // Already rejected as expired by every node: nothing to store.
            return Ok(Revoked {
                newly: false,
                sessions_deleted: 0,
            });
        }
        Ok(Revoked {
            newly: self.store.revoke(&token_id, until).await?,
            sessions_deleted: 0,
        })
    }

    /// Revokes a presented token as RFC 7009 asks: one that is not a token of this sidecar,
    /// or that has expired, is left alone (`Ok(false)`), and a refresh token takes its family
    /// with it, so that the tokens a Refresh gave from that family are rejected too.
    pub async fn revoke_presented(&self, token: &str) -> Result<bool, Error> {
        let now = self.clock.now();
        let Ok(decoded) = self
            .decode_cached(token)
            .and_then(|d| self.within_longest_life(&d, unix_secs(now)).map(|()| d))
        else {
            return Ok(false);
        };
        let until = from_unix_secs(decoded.exp) + self.settings.leeway;
        if until <= now {
            return Ok(false);
        }
        let newly = self.store.revoke(&decoded.token_id, until).await?;
        if let (Kind::Refresh, Some(family)) = (decoded.kind, decoded.family_id.as_deref()) {
            // The rotation rule's reuse (`rules::rotation::step`): an id the family never
            // held, presented as revoked, revokes the family, atomically on every backend.
            let none = Successor {
                refresh_id: String::new(),
                access_id: String::new(),
                issued_at_ms: 0,
            };
            self.store.rotate(family, "", true, &none, now, now).await?;
            tracing::info!(family, "refresh token revoked: family revoked");
        }
        Ok(newly)
    }

    /// Returns once this node's clock reads a later millisecond than `instant`, so that any
    /// login after a logout returns is later than its cutoff (which revokes logins in its own
    /// millisecond). At most a millisecond.
    async fn wait_past(&self, instant: SystemTime) {
        let next = from_millis(millis(instant) + 1);
        if let Ok(wait) = next.duration_since(self.clock.now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// [`Tokens::decode`], remembered for tokens that verified.
    /// An entry decoded under an older key set is decoded again: its key may be retired now.
    fn decode_cached(&self, token: &str) -> Result<Arc<Decoded>, Reason> {
        let Some(cache) = &self.verified else {
            return self.decode(token).map(Arc::new);
        };
        if let Some(hit) = cache.get(token)
            && hit.generation == self.keys.generation()
        {
            return Ok(hit);
        }
        let decoded = Arc::new(self.decode(token)?);
        cache.insert(token.into(), decoded.clone());
        Ok(decoded)
    }

    /// Decodes a token and verifies its signature with the key its `kid` names, using that
    /// key's algorithm only.
    fn decode(&self, token: &str) -> Result<Decoded, Reason> {
        // The generation is read before the set, so a swap in between marks the entry stale
        // rather than fresh.
        let generation = self.keys.generation();
        let keys = self.keys.current();
        let (message, signature) = token.rsplit_once('.').ok_or(Reason::Malformed)?;
        let (header, payload) = message.split_once('.').ok_or(Reason::Malformed)?;
        let header = unbase64(header)?;
        let header: RawHeader = serde_json::from_slice(&header).map_err(|_| Reason::Malformed)?;
        if header.crit.is_some() {
            return Err(Reason::Malformed);
        }
        let payload = unbase64(payload)?;
        let claims: RawClaims = serde_json::from_slice(&payload).map_err(|_| Reason::Malformed)?;
        let mut sig = [0u8; MAX_SIGNATURE_LEN];
        let sig_len = URL_SAFE_NO_PAD
            .decode_slice(signature, &mut sig)
            .map_err(|_| Reason::Malformed)?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| keys.get(kid))
            .ok_or(Reason::UnknownKey)?;
        if header.alg != key.alg().as_str() {
            return Err(Reason::BadSignature);
        }
        if !key.verify(message.as_bytes(), &sig[..sig_len]) {
            return Err(Reason::BadSignature);
        }
        Decoded::from_claims(claims, generation)
    }

    /// No token of this sidecar lives longer than the maximum TTL, and no revocation record
    /// outlives that plus the leeway: an `exp` further from `now` was not issued here as it
    /// stands, and the token is malformed.
    fn within_longest_life(&self, token: &Decoded, now: i64) -> Result<(), Reason> {
        let longest = (self.settings.max_ttl + self.settings.leeway).as_secs() as i64;
        if token.exp > now.saturating_add(longest) {
            return Err(Reason::Malformed);
        }
        Ok(())
    }

    fn check(&self, token: &Decoded, audience: Option<&str>, kind: Kind) -> Result<(), Reason> {
        let now = unix_secs(self.clock.now());
        let leeway = self.settings.leeway.as_secs() as i64;
        if now >= token.exp.saturating_add(leeway) {
            return Err(Reason::Expired);
        }
        self.within_longest_life(token, now)?;
        let not_before = token.nbf.into_iter().chain(token.iat).max();
        if not_before.is_some_and(|t| t > now.saturating_add(leeway)) {
            return Err(Reason::NotYetValid);
        }
        if token.issuer != self.settings.issuer {
            return Err(Reason::WrongIssuer);
        }
        if let Some(expected) = audience.or(self.settings.audience.as_deref())
            && !token.audience.iter().any(|a| a == expected)
        {
            return Err(Reason::WrongAudience);
        }
        if token.kind != kind {
            return Err(Reason::WrongKind);
        }
        Ok(())
    }
}

/// Longest signature decoded: RSA-4096 (512 bytes) with room to spare.
const MAX_SIGNATURE_LEN: usize = 1024;

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow)]
    kid: Option<Cow<'a, str>>,
    /// Extensions the token says a verifier must understand (RFC 7515 section 4.1.11). This
    /// sidecar understands none, so a token that names any is refused as malformed.
    #[serde(borrow)]
    crit: Option<&'a RawValue>,
}

/// The claims of a payload, left unparsed until asked for: Validate parses only the registered
/// claims, and the others only when the token has any. A name given twice is malformed, so
/// that no two readers of a token can disagree on its claims.
struct RawClaims<'a>(BTreeMap<Cow<'a, str>, &'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for RawClaims<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ClaimsVisitor;
        impl<'de> Visitor<'de> for ClaimsVisitor {
            type Value = RawClaims<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of claims")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut claims = BTreeMap::new();
                while let Some(name) = map.next_key::<ClaimName<'de>>()? {
                    let value: &RawValue = map.next_value()?;
                    if claims.insert(name.0, value).is_some() {
                        return Err(de::Error::custom("duplicate claim"));
                    }
                }
                Ok(RawClaims(claims))
            }
        }
        deserializer.deserialize_map(ClaimsVisitor)
    }
}

/// A claim name, borrowed from the payload unless it holds escapes.
struct ClaimName<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for ClaimName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = ClaimName<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a claim name")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ClaimName(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ClaimName(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl RawClaims<'_> {
    fn take<'s, T: Deserialize<'s>>(&'s mut self, name: &str) -> Result<Option<T>, Reason> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| Reason::Malformed),
        }
    }

    fn take_string(&mut self, name: &str) -> Result<Option<String>, Reason> {
        self.take::<String>(name)
    }

    /// A NumericDate in milliseconds, fractions of a second kept.
    fn take_time_ms(&mut self, name: &str) -> Result<Option<i64>, Reason> {
        let Some(n) = self.take::<serde_json::Number>(name)? else {
            return Ok(None);
        };
        let ms = match n.as_i64() {
            Some(s) => s.checked_mul(1000),
            None => n.as_f64().map(|f| (f * 1000.0).round() as i64),
        };
        ms.filter(|ms| (0..=MAX_UNIX_SECS * 1000).contains(ms))
            .map(Some)
            .ok_or(Reason::Malformed)
    }

    /// A NumericDate: seconds since the epoch, possibly fractional (RFC 7519 section 2). One
    /// before the epoch or after year 9999 makes the token malformed, so no time arithmetic
    /// on a token's claims can overflow.
    fn take_time(&mut self, name: &str) -> Result<Option<i64>, Reason> {
        let Some(n) = self.take::<serde_json::Number>(name)? else {
            return Ok(None);
        };
        n.as_i64()
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
            .filter(|s| (0..=MAX_UNIX_SECS).contains(s))
            .map(Some)
            .ok_or(Reason::Malformed)
    }

    /// Every claim not taken yet, parsed.
    fn rest(self) -> Result<Map<String, Value>, Reason> {
        self.0
            .into_iter()
            .map(|(name, raw)| {
                let value = serde_json::from_str(raw.get()).map_err(|_| Reason::Malformed)?;
                Ok((name.into_owned(), value))
            })
            .collect()
    }
}

/// A token whose signature verified, with its registered claims typed.
struct Decoded {
    issuer: String,
    subject: String,
    audience: Vec<String>,
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
    /// `iat` in milliseconds, fractions kept (tokens of earlier versions carry them).
    iat_ms: Option<i64>,
    /// `auth_ms`: the login instant a logout compares.
    auth_ms: Option<i64>,
    family_id: Option<String>,
    token_id: String,
    session_id: Option<String>,
    kind: Kind,
    extra: Map<String, Value>,
    /// The key set generation it was verified under.
    generation: u64,
}

impl Decoded {
    /// The login instant a logout compares: `auth_ms`; for a token of an earlier version, its
    /// `iat`; without either, the start of time, so that any logout cuts it off.
    fn login_ms(&self) -> i64 {
        self.auth_ms.or(self.iat_ms).unwrap_or(i64::MIN)
    }

    /// What the store is asked about this token at every use.
    fn store_check(&self, now: SystemTime, leeway: Duration) -> TokenCheck<'_> {
        TokenCheck {
            accepted_until_ms: self
                .exp
                .saturating_add(leeway.as_secs() as i64)
                .saturating_mul(1000),
            fresh: false,
            token_id: &self.token_id,
            subject: &self.subject,
            issued_at_ms: self.login_ms(),
            session_id: self.session_id.as_deref(),
            family_id: self.family_id.as_deref(),
            now,
        }
    }
}

/// What a token says, apart from its times, id and kind.
struct Body {
    subject: String,
    audience: Vec<String>,
    extra: Map<String, Value>,
    session_id: Option<String>,
    family_id: Option<String>,
    /// When the login it descends from happened (`auth_ms`), in milliseconds.
    login_ms: i64,
}

/// `aud`: one string or an array of strings (RFC 7519 section 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Decoded {
    /// Takes the registered claims out of `claims`; a claim of the wrong JSON type makes the
    /// token malformed rather than counting as absent.
    fn from_claims(mut claims: RawClaims<'_>, generation: u64) -> Result<Decoded, Reason> {
        let issuer = claims.take_string("iss")?.ok_or(Reason::Malformed)?;
        let subject = claims.take_string("sub")?.ok_or(Reason::Malformed)?;
        let audience = match claims.take::<Audience>("aud")? {
            None => Vec::new(),
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(a)) => a,
        };
        let exp = claims.take_time("exp")?.ok_or(Reason::Malformed)?;
        let nbf = claims.take_time("nbf")?;
        let iat_ms = claims.take_time_ms("iat")?;
        let iat = iat_ms.map(|ms| ms.div_euclid(1000));
        let auth_ms = claims
            .take::<i64>("auth_ms")?
            .map(|ms| {
                Some(ms)
                    .filter(|ms| (0..=MAX_UNIX_SECS * 1000).contains(ms))
                    .ok_or(Reason::Malformed)
            })
            .transpose()?;
        let token_id = claims
            .take_string("jti")?
            .filter(|j| !j.is_empty())
            .ok_or(Reason::Malformed)?;
        let session_id = claims.take_string("sid")?;
        let family_id = claims.take_string("fam")?;
        let kind = claims
            .take_string("typ")?
            .as_deref()
            .and_then(Kind::from_claim)
            .ok_or(Reason::Malformed)?;
        Ok(Decoded {
            issuer,
            subject,
            audience,
            exp,
            nbf,
            iat,
            iat_ms,
            auth_ms,
            family_id,
            token_id,
            session_id,
            kind,
            extra: claims.rest()?,
            generation,
        })
    }
}

fn unbase64(segment: &str) -> Result<Vec<u8>, Reason> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| Reason::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Secret;
    use crate::keys::{KeySet, SigningKey};
    use crate::store::MemoryStore;

    const SECRET: &str = "unit-test-secret-unit-test-secret-0123";

    struct Fixture {
        tokens: Tokens,
        clock: ManualClock,
    }

    const T0: u64 = 1_800_000_000;

    fn fixture() -> Fixture {
        fixture_at(T0)
    }

    fn fixture_at(unix: u64) -> Fixture {
        let clock = ManualClock::at_unix(unix);
        let arc_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let settings = Settings::from(&Config::defaults());
        let keys = Arc::new(Keys::fixed(KeySet::single(
            SigningKey::hs256(&Secret::from(SECRET)).unwrap(),
        )));
        let store = Arc::new(MemoryStore::new(arc_clock.clone()));
        Fixture {
            tokens: Tokens::new(settings, keys, store, arc_clock),
            clock,
        }
    }

    impl Fixture {
        async fn issue(&self, params: IssueParams) -> Issued {
            self.tokens.issue(params).await.expect("issue")
        }

        async fn issue_for(&self, subject: &str) -> Issued {
            self.issue(IssueParams {
                subject: subject.into(),
                ..Default::default()
            })
            .await
        }

        async fn verdict(&self, token: &str) -> Verdict {
            self.tokens
                .validate(token, None, Kind::Access)
                .await
                .expect("validate")
        }

        async fn assert_rejected(&self, token: &str, reason: Reason) {
            match self.verdict(token).await {
                Verdict::Invalid(r) => assert_eq!(r, reason),
                Verdict::Valid(v) => panic!("accepted {v:?}, expected {reason:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_fresh_token_is_valid_until_exp_plus_leeway() {
        let f = fixture();
        let issued = f.issue_for("alice").await;
        assert_eq!(issued.token_id.len(), 22);
        let Verdict::Valid(v) = f.verdict(&issued.token).await else {
            panic!("fresh token rejected")
        };
        assert_eq!(v.subject, "alice");
        assert_eq!(v.token_id, issued.token_id);

        f.clock.advance(Duration::from_secs(15 * 60 + 29));
        assert!(matches!(f.verdict(&issued.token).await, Verdict::Valid(_)));
        f.clock.advance(Duration::from_secs(1));
        f.assert_rejected(&issued.token, Reason::Expired).await;
    }

    #[tokio::test]
    async fn a_token_from_the_future_is_not_yet_valid() {
        let f = fixture();
        let issued = f.issue_for("alice").await;
        // A node whose clock is behind by more than the leeway (30 s).
        let behind = fixture_at(T0 - 31);
        behind
            .assert_rejected(&issued.token, Reason::NotYetValid)
            .await;
        let within = fixture_at(T0 - 30);
        assert!(matches!(
            within.verdict(&issued.token).await,
            Verdict::Valid(_)
        ));
    }

    #[tokio::test]
    async fn revocation_by_id_and_by_token() {
        let f = fixture();
        let a = f.issue_for("alice").await;
        let b = f.issue_for("bob").await;
        assert!(
            f.tokens
                .revoke(RevokeTarget::TokenId(a.token_id.clone()))
                .await
                .unwrap()
                .newly
        );
        assert!(
            !f.tokens
                .revoke(RevokeTarget::TokenId(a.token_id))
                .await
                .unwrap()
                .newly
        );
        f.assert_rejected(&a.token, Reason::Revoked).await;
        assert!(
            f.tokens
                .revoke(RevokeTarget::Token(b.token.clone()))
                .await
                .unwrap()
                .newly
        );
        f.assert_rejected(&b.token, Reason::Revoked).await;

        let forged = format!("{}x", b.token);
        let err = f
            .tokens
            .revoke(RevokeTarget::Token(forged))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { field: "token", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn revoking_an_expired_token_stores_nothing() {
        let f = fixture();
        let a = f.issue_for("alice").await;
        f.clock.advance(Duration::from_secs(3600));
        assert!(
            !f.tokens
                .revoke(RevokeTarget::Token(a.token))
                .await
                .unwrap()
                .newly
        );
    }

    #[tokio::test]
    async fn kind_and_audience_are_enforced() {
        let f = fixture();
        let refresh = f
            .issue(IssueParams {
                subject: "alice".into(),
                kind: Kind::Refresh,
                audience: vec!["billing".into(), "shop".into()],
                ..Default::default()
            })
            .await;
        f.assert_rejected(&refresh.token, Reason::WrongKind).await;
        let ok = f
            .tokens
            .validate(&refresh.token, Some("shop"), Kind::Refresh)
            .await
            .unwrap();
        assert!(matches!(ok, Verdict::Valid(_)));
        let wrong = f
            .tokens
            .validate(&refresh.token, Some("blog"), Kind::Refresh)
            .await
            .unwrap();
        assert!(matches!(wrong, Verdict::Invalid(Reason::WrongAudience)));
    }

    #[tokio::test]
    async fn issue_refuses_reserved_claims_and_bad_ttls() {
        let f = fixture();
        for name in RESERVED_CLAIMS {
            let mut claims = Map::new();
            claims.insert(name.into(), "x".into());
            let err = f
                .tokens
                .issue(IssueParams {
                    subject: "a".into(),
                    claims,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        field: "claims",
                        ..
                    }
                ),
                "{name}"
            );
        }
        for ttl in [Duration::from_millis(10), Duration::from_secs(25 * 3600)] {
            let err = f
                .tokens
                .issue(IssueParams {
                    subject: "a".into(),
                    ttl: Some(ttl),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { field: "ttl", .. }));
        }
    }

    #[tokio::test]
    async fn issue_refuses_tokens_validate_would_refuse_for_size() {
        let f = fixture();
        let mut claims = Map::new();
        claims.insert("blob".into(), "x".repeat(MAX_TOKEN_LEN).into());
        let err = f
            .tokens
            .issue(IssueParams {
                subject: "a".into(),
                claims,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidArgument {
                field: "claims",
                ..
            }
        ));
    }
}

/// Whatever a signed token's header and claims hold, every entry point answers and none
/// panics: the decoder reads untrusted JSON and does arithmetic on its times.
#[cfg(test)]
mod decoder_properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Secret;
    use crate::keys::{KeySet, SigningKey};
    use crate::store::MemoryStore;

    /// A JSON number a hostile signer might put in a time claim.
    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            Just(json!(1e300)),
            Just(json!(-1e300)),
            Just(json!(18446744073709551615u64)),
            (1_700_000_000i64..1_900_000_000).prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            number(),
            ".{0,12}".prop_map(Value::from),
            Just(Value::Null),
            Just(json!(true)),
            Just(json!(["a", 1])),
            Just(json!({"k": {"k": [1e300]}})),
        ]
    }

    fn claims() -> impl Strategy<Value = Map<String, Value>> {
        let names = prop_oneof![
            Just("iss"),
            Just("sub"),
            Just("aud"),
            Just("exp"),
            Just("nbf"),
            Just("iat"),
            Just("jti"),
            Just("sid"),
            Just("typ"),
            Just("fam"),
            Just("x"),
        ];
        proptest::collection::vec((names, value()), 0..12).prop_map(|pairs| {
            // Mostly well-formed, so the checks past the decoder run too.
            let mut m = base_claims();
            for (name, v) in pairs {
                m.insert(name.to_owned(), v);
            }
            m
        })
    }

    fn header() -> impl Strategy<Value = Map<String, Value>> {
        (
            prop_oneof![Just(json!("HS256")), Just(json!("none")), value()],
            prop_oneof![Just(json!("default")), value()],
            proptest::option::of(value()),
        )
            .prop_map(|(alg, kid, crit)| {
                let mut m = Map::new();
                m.insert("alg".into(), alg);
                m.insert("kid".into(), kid);
                if let Some(crit) = crit {
                    m.insert("crit".into(), crit);
                }
                m
            })
    }

    /// Signs `header.claims` with a valid key (the key's kid unless `header` names "default"
    /// for another) and feeds it to Validate, Revoke and Refresh.
    fn answer_all(mut header: Map<String, Value>, claims: Map<String, Value>) {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_unix(1_800_000_000));
        let key =
            SigningKey::hs256(&Secret::from("unit-test-secret-unit-test-secret-0123")).unwrap();
        if header.get("kid") == Some(&json!("default")) {
            header.insert("kid".into(), key.kid().into());
        }
        let keys = Arc::new(Keys::fixed(KeySet::single(key)));
        let store = Arc::new(MemoryStore::new(clock.clone()));
        let tokens = Tokens::new(Settings::from(&Config::defaults()), keys, store, clock);
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        let signature = tokens
            .keys
            .current()
            .active()
            .sign(message.as_bytes())
            .unwrap();
        let token = format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for kind in [Kind::Access, Kind::Refresh] {
                tokens.validate(&token, None, kind).await.unwrap();
            }
            let _ = tokens.revoke(RevokeTarget::Token(token.clone())).await;
            let _ = tokens.refresh(&token).await;
        });
    }

    fn base_claims() -> Map<String, Value> {
        let Value::Object(m) = json!({
            "iss": "auth-sidecar", "sub": "alice", "jti": "j", "typ": "refresh",
            "fam": "f", "exp": 1_800_000_600i64, "iat": 1_800_000_000i64
        }) else {
            unreachable!()
        };
        m
    }

    #[test]
    fn absurd_times_are_answered() {
        let header = || {
            let Value::Object(h) = json!({"alg": "HS256", "kid": "default"}) else {
                unreachable!()
            };
            h
        };
        for name in ["exp", "iat", "nbf"] {
            for v in [
                json!(1e300),
                json!(-1e300),
                json!(18446744073709551615u64),
                json!(i64::MAX),
                json!(i64::MIN),
                json!(-1),
            ] {
                let mut claims = base_claims();
                claims.insert(name.into(), v);
                answer_all(header(), claims);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn every_signed_token_gets_an_answer(header in header(), claims in claims()) {
            answer_all(header, claims);
        }
    }
}
