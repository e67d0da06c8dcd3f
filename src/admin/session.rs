//! The admin UI's login: a signed, expiring cookie that every node accepts, its CSRF token,
//! and its revocation on every node through the shared store. No admin-UI state lives in one
//! node's memory.
//!
//! The cookie is `KID.PAYLOAD.MAC`: PAYLOAD is base64url JSON (`sid`, `user`, `iat`, `exp`),
//! MAC an HMAC-SHA256 under a secret derived from the signing key `KID` names
//! (`SigningKey::derive`), so every node with the same keys accepts it, a key rotation keeps
//! it valid while the key verifies, and an app's token (signed by the key itself) is never
//! one. The MAC also covers the deployment the login belongs to ([`Binding`]: the issuer, the
//! user name and a digest of the credential), checked on every request: another deployment
//! that shares the keys refuses the cookie, and a new password or user name ends every
//! login. Logging out revokes `sid` in the store, as a token id is revoked; "end every admin
//! session" is a logout cutoff for the admin subject that lives as long as the longest login.

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

/// What a login belongs to, and is checked against on every request: the deployment's issuer,
/// the admin user name, and the credential (a password or its hash) as configured.
pub struct Binding<'a> {
    pub issuer: &'a str,
    pub user: &'a str,
    pub credential: &'a [u8],
}

impl Binding<'_> {
    /// What the MAC covers besides the cookie: each part length-prefixed, the credential as
    /// a SHA-256 (keyed by the MAC it goes into; nothing of it is in the cookie).
    fn context(&self, signed: &str) -> Vec<u8> {
        let credential = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.credential);
        let mut message = Vec::new();
        for part in [
            signed.as_bytes(),
            self.issuer.as_bytes(),
            self.user.as_bytes(),
            credential.as_ref(),
        ] {
            message.extend_from_slice(&(part.len() as u32).to_be_bytes());
            message.extend_from_slice(part);
        }
        message
    }
}

/// A new login of the binding's user for `ttl`, as a cookie value, MACed under a secret
/// derived from the set's deriving key (`KeySet::deriving`).
pub fn issue(
    keys: &KeySet,
    binding: &Binding<'_>,
    ttl: Duration,
    now: SystemTime,
) -> Option<String> {
    let login = Login {
        sid: crate::ids::random_id(),
        user: binding.user.to_owned(),
        iat: unix_millis(now),
        exp: unix_millis(now + ttl),
    };
    let key = keys.deriving()?;
    let secret = key.derive(COOKIE_PURPOSE)?;
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&login).ok()?);
    let signed = format!("{}.{payload}", key.kid());
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        &binding.context(&signed),
    );
    Some(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref())))
}

/// The login a cookie value carries, if its MAC checks under a key this node holds, for this
/// binding (the same issuer, user name and credential), and it has not expired. (Whether it
/// was revoked is [`revoked`]'s question.)
pub fn verify(keys: &KeySet, binding: &Binding<'_>, value: &str, now: SystemTime) -> Option<Login> {
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
        &binding.context(signed),
        &mac,
    )
    .ok()?;
    let login: Login = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    (login.exp > unix_millis(now) && login.user == binding.user).then_some(login)
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

/// Ends every admin login made up to `now`, on every node: a logout cutoff of the admin
/// subject, kept until the longest login made before it (`longest`) has expired.
pub async fn end_all(
    store: &dyn Store,
    now: SystemTime,
    longest: Duration,
) -> Result<(), StoreError> {
    let cutoff = crate::clock::from_unix_millis(unix_millis(now));
    store
        .revoke_subject(SUBJECT, cutoff, now + longest)
        .await
        .map(|_| ())
}

/// The CSRF token of a login: bound to its id, so it is useless with any other login. Made
/// under the same key the cookie is (`KeySet::deriving`); `None` when no key derives, and
/// then no form is accepted.
pub fn csrf(keys: &KeySet, login: &Login) -> Option<String> {
    let secret = keys.deriving()?.derive(CSRF_PURPOSE)?;
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        login.sid.as_bytes(),
    );
    Some(URL_SAFE_NO_PAD.encode(mac.as_ref()))
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

    const BOUND: Binding<'static> = Binding {
        issuer: "https://auth.example.com",
        user: "admin",
        credential: b"correct horse",
    };

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
        let cookie = issue(&keys, &BOUND, Duration::from_secs(60), now).unwrap();
        assert!(cookie.starts_with("jwt.2026.11."));
        assert_eq!(verify(&keys, &BOUND, &cookie, now).unwrap().user, "admin");
    }

    #[test]
    fn a_cookie_verifies_on_a_node_with_the_same_keys_only() {
        let now = SystemTime::now();
        let cookie = issue(&keys(A), &BOUND, Duration::from_secs(60), now).unwrap();
        let login = verify(&keys(A), &BOUND, &cookie, now).unwrap();
        assert_eq!(login.user, "admin");
        assert!(
            verify(
                &keys("another-secret-0123456789abcdefghijkl"),
                &BOUND,
                &cookie,
                now
            )
            .is_none()
        );
        assert!(verify(&keys(A), &BOUND, &cookie, now + Duration::from_secs(61)).is_none());
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
        assert!(verify(&keys(A), &BOUND, &parts.join("."), now).is_none());
        let token = csrf(&keys(A), &login).unwrap();
        assert!(csrf_matches(&keys(A), &login, &token));
        let other = Login {
            sid: "other".into(),
            ..login.clone()
        };
        assert!(!csrf_matches(&keys(A), &other, &token));
    }

    /// A cookie is good only for the deployment, user name and credential it was made for:
    /// another deployment sharing the keys refuses it, and a new password ends it.
    #[test]
    fn a_cookie_is_bound_to_the_issuer_the_user_and_the_credential() {
        let now = SystemTime::now();
        let cookie = issue(&keys(A), &BOUND, Duration::from_secs(60), now).unwrap();
        for other in [
            Binding {
                issuer: "https://other.example.com",
                ..BOUND
            },
            Binding {
                user: "root",
                ..BOUND
            },
            Binding {
                credential: b"new password",
                ..BOUND
            },
        ] {
            assert!(verify(&keys(A), &other, &cookie, now).is_none());
        }
        assert!(verify(&keys(A), &BOUND, &cookie, now).is_some());
    }
}
