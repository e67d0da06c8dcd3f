//! The admin UI's login: a signed, expiring cookie that every node accepts, its CSRF token,
//! and its revocation on every node through the shared store. No admin-UI state lives in one
//! node's memory.
//!
//! The cookie is `KID.PAYLOAD.MAC`: PAYLOAD is base64url JSON (`sid`, `user`, `iat`, `exp`),
//! MAC an HMAC-SHA256 under a secret derived from the signing key `KID` names
//! (`SigningKey::derive`), so every node with the same keys accepts it, a key rotation keeps
//! it valid while the key verifies, and an app's token (signed by the key itself) is never
//! one. Logging out revokes `sid` in the store, as a token id is revoked.

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::clock::unix_millis;
use crate::keys::KeySet;
use crate::store::{Store, StoreError, TokenCheck};

/// What the cookie's MAC key is derived for; the CSRF token's is another.
const COOKIE_PURPOSE: &str = "admin-ui cookie";
const CSRF_PURPOSE: &str = "admin-ui csrf";

/// The subject the store files admin logins under, for the revocation check.
const SUBJECT: &str = "auth-sidecar:admin-ui";

/// Longest cookie value read.
const MAX_COOKIE: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    pub sid: String,
    pub user: String,
    /// Unix milliseconds.
    pub iat: i64,
    pub exp: i64,
}

/// A new login of `user` for `ttl`, as a cookie value, MACed under a secret derived from the
/// active key (or, when that key is in a PKCS#11 token, from another key of the set).
pub fn issue(keys: &KeySet, user: &str, ttl: Duration, now: SystemTime) -> Option<String> {
    let login = Login {
        sid: crate::ids::random_id(),
        user: user.to_owned(),
        iat: unix_millis(now),
        exp: unix_millis(now + ttl),
    };
    // The active key, or (one in a PKCS#11 token derives nothing) the first other key, by
    // kid, that does: every node picks the same one.
    let mut others: Vec<_> = keys
        .keys()
        .filter(|k| k.kid() != keys.active().kid())
        .collect();
    others.sort_by_key(|k| k.kid());
    let (key, secret) = std::iter::once(keys.active())
        .chain(others)
        .find_map(|k| Some((k, k.derive(COOKIE_PURPOSE)?)))?;
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&login).ok()?);
    let signed = format!("{}.{payload}", key.kid());
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        signed.as_bytes(),
    );
    Some(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref())))
}

/// The login a cookie value carries, if its MAC checks under a key this node holds and it has
/// not expired. (Whether it was revoked is [`revoked`]'s question.)
pub fn verify(keys: &KeySet, value: &str, now: SystemTime) -> Option<Login> {
    if value.len() > MAX_COOKIE {
        return None;
    }
    // The kid may hold dots; the payload and the MAC (base64url) cannot.
    let (signed, mac) = value.rsplit_once('.')?;
    let (kid, payload) = signed.rsplit_once('.')?;
    let secret = keys.get(kid)?.derive(COOKIE_PURPOSE)?;
    let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        signed.as_bytes(),
        &mac,
    )
    .ok()?;
    let login: Login = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    (login.exp > unix_millis(now)).then_some(login)
}

/// Whether the login was logged out, on any node.
pub async fn revoked(
    store: &dyn Store,
    login: &Login,
    now: SystemTime,
) -> Result<bool, StoreError> {
    store
        .is_revoked(&TokenCheck {
            token_id: &login.sid,
            subject: SUBJECT,
            issued_at_ms: login.iat,
            session_id: None,
            family_id: None,
            now,
            accepted_until_ms: login.exp,
            fresh: false,
        })
        .await
}

/// Logs the login out on every node: its id is revoked until it would have expired.
pub async fn revoke(store: &dyn Store, login: &Login) -> Result<(), StoreError> {
    let until = crate::clock::from_unix_millis(login.exp);
    store.revoke(&login.sid, until).await.map(|_| ())
}

/// The CSRF token of a login: bound to its id, so it is useless with any other login.
pub fn csrf(keys: &KeySet, login: &Login) -> String {
    let secret = keys.active().derive(CSRF_PURPOSE).unwrap_or_default();
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        login.sid.as_bytes(),
    );
    URL_SAFE_NO_PAD.encode(mac.as_ref())
}

/// Whether `token` is the login's CSRF token, under any key that verifies (in constant
/// time), so that a key rotation does not break a form already on the screen.
pub fn csrf_matches(keys: &KeySet, login: &Login, token: &str) -> bool {
    let Ok(token) = URL_SAFE_NO_PAD.decode(token) else {
        return false;
    };
    keys.keys().any(|key| {
        key.derive(CSRF_PURPOSE).is_some_and(|secret| {
            hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, &secret),
                login.sid.as_bytes(),
                &token,
            )
            .is_ok()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::keys::SigningKey;

    fn keys(secret: &str) -> KeySet {
        KeySet::single(SigningKey::hs256(&Secret::from(secret)).unwrap())
    }

    const A: &str = "admin-cookie-test-secret-0123456789abcdef";

    #[test]
    fn a_kid_with_dots_is_read_whole() {
        let keys = KeySet::single(
            SigningKey::hmac(
                "jwt.2026.11".to_owned(),
                crate::keys::Alg::HS256,
                crate::keys::KeyState::Active,
                A.as_bytes(),
            )
            .unwrap(),
        );
        let now = SystemTime::now();
        let cookie = issue(&keys, "admin", Duration::from_secs(60), now).unwrap();
        assert!(cookie.starts_with("jwt.2026.11."));
        assert_eq!(verify(&keys, &cookie, now).unwrap().user, "admin");
    }

    #[test]
    fn a_cookie_verifies_on_a_node_with_the_same_keys_only() {
        let now = SystemTime::now();
        let cookie = issue(&keys(A), "admin", Duration::from_secs(60), now).unwrap();
        let login = verify(&keys(A), &cookie, now).unwrap();
        assert_eq!(login.user, "admin");
        assert!(verify(&keys("another-secret-0123456789abcdefghijkl"), &cookie, now).is_none());
        assert!(verify(&keys(A), &cookie, now + Duration::from_secs(61)).is_none());
        // Any change to the payload breaks the MAC.
        let mut parts: Vec<&str> = cookie.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Login {
                user: "root".into(),
                ..login.clone()
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert!(verify(&keys(A), &parts.join("."), now).is_none());
        assert!(csrf_matches(&keys(A), &login, &csrf(&keys(A), &login)));
        let other = Login {
            sid: "other".into(),
            ..login.clone()
        };
        assert!(!csrf_matches(&keys(A), &other, &csrf(&keys(A), &login)));
    }
}
