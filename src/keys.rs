//! Signing keys. A key is bound to one algorithm: a token is verified only with the key its
//! `kid` names and only with that key's algorithm, whatever its header claims.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aws_lc_rs::{digest, hmac};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::config::{MIN_SECRET_LEN, Secret};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("an HMAC secret needs at least {MIN_SECRET_LEN} bytes, got {0}")]
    ShortSecret(usize),
}

/// One key, with what it signs and verifies with.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The HMAC key schedule, computed once rather than per verification.
    hmac: Option<hmac::Key>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// An HS256 key. Its `kid` is derived from the secret (a truncated SHA-256 under a
    /// domain-separation prefix), so every node given the same secret names it the same way
    /// and the id reveals nothing usable about the secret.
    pub fn hs256(secret: &Secret) -> Result<SigningKey, KeyError> {
        let bytes = secret.expose();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(KeyError::ShortSecret(bytes.len()));
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"auth-sidecar kid v1\0");
        ctx.update(secret.expose());
        let kid = URL_SAFE_NO_PAD.encode(&ctx.finish().as_ref()[..12]);
        // Only an empty secret is refused by these, and it was refused above.
        let encoding = EncodingKey::from_secret(bytes).expect("secret is not empty");
        let decoding = DecodingKey::from_secret(bytes).expect("secret is not empty");
        Ok(SigningKey {
            kid,
            alg: Algorithm::HS256,
            encoding,
            decoding,
            hmac: Some(hmac::Key::new(hmac::HMAC_SHA256, bytes)),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn encoding(&self) -> &EncodingKey {
        &self.encoding
    }

    /// Whether `signature` (the raw bytes of the third segment) signs `message` under this key
    /// and its algorithm. HMAC tags are compared in constant time.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.hmac {
            Some(key) => hmac::verify(key, message, signature).is_ok(),
            None => {
                let encoded = URL_SAFE_NO_PAD.encode(signature);
                jsonwebtoken::crypto::verify(&encoded, message, &self.decoding, self.alg)
                    .unwrap_or(false)
            }
        }
    }
}

/// The keys a node signs and verifies with.
#[derive(Debug, Clone)]
pub struct KeySet {
    active: Arc<SigningKey>,
    by_kid: HashMap<String, Arc<SigningKey>>,
}

impl KeySet {
    pub fn single(key: SigningKey) -> KeySet {
        let key = Arc::new(key);
        KeySet {
            by_kid: HashMap::from([(key.kid.clone(), key.clone())]),
            active: key,
        }
    }

    /// A random HS256 key, good for this process only.
    pub fn ephemeral() -> KeySet {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
        KeySet::single(SigningKey::hs256(&Secret::new(bytes.to_vec())).expect("32 bytes suffice"))
    }

    /// The key that signs new tokens.
    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    /// The key a token's `kid` names, if this node knows it.
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        self.by_kid.get(kid).map(|k| &**k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_is_stable_per_secret_and_differs_between_secrets() {
        let a = Secret::from("a-secret-of-at-least-thirty-two-bytes!");
        let b = Secret::from("another-secret-of-at-least-32-bytes!!!");
        assert_eq!(
            SigningKey::hs256(&a).unwrap().kid(),
            SigningKey::hs256(&a).unwrap().kid()
        );
        assert_ne!(
            SigningKey::hs256(&a).unwrap().kid(),
            SigningKey::hs256(&b).unwrap().kid()
        );
        assert_eq!(SigningKey::hs256(&a).unwrap().kid().len(), 16);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key =
            SigningKey::hs256(&Secret::from("a-secret-of-at-least-thirty-two-bytes!")).unwrap();
        let text = format!("{key:?}");
        assert!(!text.contains("a-secret"), "{text}");
    }
}
