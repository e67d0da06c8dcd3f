//! Signing keys and the key set a node signs and verifies with. A key is bound to one
//! algorithm: a token is verified only with the key its `kid` names and only with that key's
//! algorithm, whatever its header claims.
//!
//! A key set comes from `AUTH_JWT_SECRET` (one HS256 key) or from a directory holding a
//! manifest (`keys.toml`) and one file per key, such as a mounted Kubernetes Secret, or keys
//! whose private part stays elsewhere: in a PKCS#11 token (`pkcs11`) or in AWS KMS
//! (`aws-kms`), each a [`KeySource`]. The directory can be re-read at any time; a key set
//! that does not load is refused as a whole and the one in use is kept.

pub mod kms;
pub mod pkcs11;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self as sig, KeyPair as _, ParsedPublicKey, VerificationAlgorithm};
use aws_lc_rs::{digest, hmac, rsa};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk;
use serde::Deserialize;

use crate::config::{MIN_SECRET_LEN, Secret};

/// The manifest's file name inside a keys directory.
pub const MANIFEST: &str = "keys.toml";

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// The algorithms a key may be bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    HS256,
    HS384,
    HS512,
    ES256,
    ES384,
    EdDSA,
    RS256,
    PS256,
}

impl Alg {
    pub const ALL: [Alg; 8] = [
        Alg::HS256,
        Alg::HS384,
        Alg::HS512,
        Alg::ES256,
        Alg::ES384,
        Alg::EdDSA,
        Alg::RS256,
        Alg::PS256,
    ];

    /// The JOSE name, as in a token's `alg` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
            Alg::RS256 => "RS256",
            Alg::PS256 => "PS256",
        }
    }

    pub fn is_hmac(self) -> bool {
        self.hmac().is_some()
    }

    fn hmac(self) -> Option<hmac::Algorithm> {
        match self {
            Alg::HS256 => Some(hmac::HMAC_SHA256),
            Alg::HS384 => Some(hmac::HMAC_SHA384),
            Alg::HS512 => Some(hmac::HMAC_SHA512),
            _ => None,
        }
    }

    /// Shortest HMAC secret: as long as the hash's output (RFC 7518 section 3.2).
    pub fn min_secret_len(self) -> usize {
        match self {
            Alg::HS384 => 48,
            Alg::HS512 => 64,
            _ => MIN_SECRET_LEN,
        }
    }

    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            Alg::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
            Alg::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
            Alg::EdDSA => &sig::ED25519,
            Alg::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Alg::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
            Alg::HS256 | Alg::HS384 | Alg::HS512 => unreachable!("HMAC has no public key"),
        }
    }

    fn jwk(self) -> jwk::KeyAlgorithm {
        match self {
            Alg::HS256 => jwk::KeyAlgorithm::HS256,
            Alg::HS384 => jwk::KeyAlgorithm::HS384,
            Alg::HS512 => jwk::KeyAlgorithm::HS512,
            Alg::ES256 => jwk::KeyAlgorithm::ES256,
            Alg::ES384 => jwk::KeyAlgorithm::ES384,
            Alg::EdDSA => jwk::KeyAlgorithm::EdDSA,
            Alg::RS256 => jwk::KeyAlgorithm::RS256,
            Alg::PS256 => jwk::KeyAlgorithm::PS256,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = String;

    fn from_str(s: &str) -> Result<Alg, String> {
        Alg::ALL
            .into_iter()
            .find(|alg| alg.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Alg::ALL.iter().map(|a| a.as_str()).collect();
                format!(
                    "unknown algorithm `{s}`, expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Alg, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a key is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Signs new tokens and verifies; exactly one key is active.
    Active,
    /// Verifies only: a key being introduced, or one being phased out.
    Verify,
    /// Rejected: its tokens fail with an unknown key.
    Retired,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("an {alg} secret needs at least {min} bytes, got {got}")]
    ShortSecret { alg: Alg, min: usize, got: usize },
    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("key `{kid}` ({}): {reason}", path.display())]
    Key {
        kid: String,
        path: PathBuf,
        reason: String,
    },
}

/// What a key signs and verifies with, parsed once so that no call parses a key.
#[allow(clippy::large_enum_variant)] // one per key, behind an Arc: boxing buys nothing
enum Material {
    Hmac(hmac::Key),
    Private {
        signer: Signer,
        public: ParsedPublicKey,
    },
    Public(ParsedPublicKey),
    /// A private key that signs elsewhere; its public key read from there at load.
    Remote(Remote),
}

/// Where a key whose private part never enters this process signs: a PKCS#11 token, a cloud
/// KMS. A source is a module of `keys/` with a loader that returns it and its public key; it
/// signs and says what it is, and nothing else. The rest is the caller's, the same for every
/// source ([`SigningKey::remote`], [`SigningKey::sign_async`]): the public key published,
/// one signature verified at load, every signature verified with the published key before a
/// token is minted, the outcome logged when it changes, and the probe readiness follows.
/// GCP Cloud KMS (`AsymmetricSign` over a digest, DER ECDSA) and Vault Transit (`sign` with
/// `marshaling_algorithm=jws`) fit as they are.
#[async_trait]
pub trait KeySource: Send + Sync + fmt::Debug {
    /// The manifest's name of the source (`pkcs11`, `aws-kms`), as metrics and logs give it.
    fn kind(&self) -> &'static str;

    /// The key, for logs, `keys check` and `/healthz`: names and places, never a secret.
    fn describe(&self) -> String;

    /// How often an idle node checks that the key signs; `None`: as often as the backends are
    /// checked. A source that charges per call asks for less.
    fn probe_interval(&self) -> Option<Duration> {
        None
    }

    /// Signs a JWS signing input; the signature in JWS form (r‖s for ECDSA). Not yet
    /// trusted: the caller verifies it.
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// A key that signs in a [`KeySource`], with the public key that checks every signature.
struct Remote {
    source: Arc<dyn KeySource>,
    public: ParsedPublicKey,
    /// When the last signature was made or refused, and whether it was made.
    last: Mutex<Option<(Instant, bool)>>,
    /// Woken when the key stops signing, so that readiness follows at once.
    stopped: tokio::sync::Notify,
}

impl Remote {
    /// One signature, checked with the published public key; the outcome recorded.
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let result = match self.source.sign(message).await {
            Ok(signature) if self.public.verify_sig(message, &signature).is_ok() => Ok(signature),
            Ok(_) => Err(format!(
                "{} signed with another key than the one it published",
                self.source.describe()
            )),
            Err(e) => Err(e),
        };
        let ok = result.is_ok();
        let was = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((Instant::now(), ok))
            .is_none_or(|(_, was)| was);
        match &result {
            Ok(_) if !was => {
                tracing::info!(source = self.source.kind(), key = %self.source.describe(), "the signing key signs again");
            }
            Err(e) if was => {
                tracing::error!(source = self.source.kind(), key = %self.source.describe(), error = %e, "the signing key stopped signing");
                self.stopped.notify_one();
            }
            _ => {}
        }
        result
    }
}

/// Why a key did not sign.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("key `{0}` holds no private key")]
    CannotSign(String),
    /// The token did not sign (or signed with another key); the detail is for the log.
    #[error("{0}")]
    Unavailable(String),
}

enum Signer {
    Ecdsa(sig::EcdsaKeyPair),
    Ed25519(sig::Ed25519KeyPair),
    Rsa(sig::RsaKeyPair, &'static dyn sig::RsaEncoding),
}

/// One key, with what it signs and verifies with.
pub struct SigningKey {
    kid: String,
    alg: Alg,
    state: KeyState,
    material: Material,
    /// The token header this key signs under, base64url-encoded once.
    header: String,
    /// The public key as a JWK; none for HMAC.
    jwk: Option<jwk::Jwk>,
    /// What secrets for other purposes are derived from (see [`SigningKey::derive`]): the
    /// HMAC secret, or a digest of the private key; none for a public key.
    derivation: Option<hmac::Key>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The HS256 key of `AUTH_JWT_SECRET`. Its `kid` is derived from the secret (a truncated
    /// SHA-256 under a domain-separation prefix), so every node given the same secret names it
    /// the same way and the id reveals nothing usable about the secret.
    pub fn hs256(secret: &Secret) -> Result<SigningKey, KeyError> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"auth-sidecar kid v1\0");
        ctx.update(secret.expose());
        let kid = URL_SAFE_NO_PAD.encode(&ctx.finish().as_ref()[..12]);
        SigningKey::hmac(kid, Alg::HS256, KeyState::Active, secret.expose())
    }

    /// An HMAC key. The secret must be at least as long as the hash's output.
    pub fn hmac(
        kid: String,
        alg: Alg,
        state: KeyState,
        secret: &[u8],
    ) -> Result<SigningKey, KeyError> {
        let hmac_alg = alg.hmac().expect("an HMAC algorithm");
        if secret.len() < alg.min_secret_len() {
            return Err(KeyError::ShortSecret {
                alg,
                min: alg.min_secret_len(),
                got: secret.len(),
            });
        }
        let mut key = SigningKey::new(
            kid,
            alg,
            state,
            Material::Hmac(hmac::Key::new(hmac_alg, secret)),
            None,
        );
        key.derivation = Some(hmac::Key::new(hmac::HMAC_SHA256, secret));
        Ok(key)
    }

    /// A key from a PEM file: a private key (PKCS#8, or SEC1 for EC and PKCS#1 for RSA),
    /// which signs and verifies, or a public key (SubjectPublicKeyInfo, or PKCS#1 for RSA),
    /// which only verifies. The error never quotes the file.
    pub fn from_pem(
        kid: String,
        alg: Alg,
        state: KeyState,
        pem_text: &[u8],
    ) -> Result<SigningKey, String> {
        if alg.is_hmac() {
            return Err(format!("{alg} takes a secret, not a PEM key"));
        }
        let block = pem::parse(pem_text).map_err(|_| "not a PEM file".to_owned())?;
        let der = block.contents();
        let not_alg = |_: aws_lc_rs::error::KeyRejected| format!("not a valid {alg} key");
        let material = match block.tag() {
            "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
                let signer = match alg {
                    Alg::ES256 => Signer::Ecdsa(
                        sig::EcdsaKeyPair::from_private_key_der(
                            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                            der,
                        )
                        .map_err(not_alg)?,
                    ),
                    Alg::ES384 => Signer::Ecdsa(
                        sig::EcdsaKeyPair::from_private_key_der(
                            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                            der,
                        )
                        .map_err(not_alg)?,
                    ),
                    Alg::EdDSA => Signer::Ed25519(
                        sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(not_alg)?,
                    ),
                    Alg::RS256 | Alg::PS256 => {
                        let pair = sig::RsaKeyPair::from_pkcs8(der)
                            .or_else(|_| sig::RsaKeyPair::from_der(der))
                            .map_err(not_alg)?;
                        let encoding: &'static dyn sig::RsaEncoding = if alg == Alg::RS256 {
                            &sig::RSA_PKCS1_SHA256
                        } else {
                            &sig::RSA_PSS_SHA256
                        };
                        Signer::Rsa(pair, encoding)
                    }
                    Alg::HS256 | Alg::HS384 | Alg::HS512 => unreachable!("refused above"),
                };
                let spki = signer
                    .public_spki()
                    .map_err(|_| format!("not a valid {alg} key"))?;
                let public = ParsedPublicKey::new(alg.verification(), spki.as_ref())
                    .map_err(|_| format!("not a valid {alg} key"))?;
                Material::Private { signer, public }
            }
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {
                if state == KeyState::Active {
                    return Err(
                        "a public key cannot sign: an active key needs the private key".to_owned(),
                    );
                }
                Material::Public(
                    ParsedPublicKey::new(alg.verification(), der)
                        .map_err(|_| format!("not a valid {alg} key"))?,
                )
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err("encrypted private keys are not supported".to_owned());
            }
            other => return Err(format!("a PEM block of type `{other}` is not a key")),
        };
        let public = match &material {
            Material::Private { public, .. } | Material::Public(public) => public,
            Material::Hmac(_) | Material::Remote(_) => unreachable!("a PEM key"),
        };
        let jwk = public_key_jwk(&kid, alg, public)?;
        let private = matches!(material, Material::Private { .. });
        let mut key = SigningKey::new(kid, alg, state, material, Some(jwk));
        if private {
            let mut digest = digest::Context::new(&digest::SHA256);
            digest.update(b"auth-sidecar private key derivation v1\0");
            digest.update(der);
            key.derivation = Some(hmac::Key::new(hmac::HMAC_SHA256, digest.finish().as_ref()));
        }
        Ok(key)
    }

    /// A key that signs in `source`, whose public key (SubjectPublicKeyInfo DER) the source
    /// gave at load. One signature is made and verified now: the private and public keys are
    /// one pair, the key may sign, and the source knows the algorithm.
    pub async fn remote(
        kid: String,
        alg: Alg,
        state: KeyState,
        source: Arc<dyn KeySource>,
        spki: &[u8],
    ) -> Result<SigningKey, String> {
        let public = ParsedPublicKey::new(alg.verification(), spki).map_err(|_| {
            format!(
                "{}: its public key is not a valid {alg} key",
                source.describe()
            )
        })?;
        let jwk = public_key_jwk(&kid, alg, &public)?;
        let remote = Remote {
            source,
            public,
            last: Mutex::new(None),
            stopped: tokio::sync::Notify::new(),
        };
        remote
            .sign(b"auth-sidecar key check")
            .await
            .map_err(|e| format!("the key does not sign: {e}"))?;
        Ok(SigningKey::new(
            kid,
            alg,
            state,
            Material::Remote(remote),
            Some(jwk),
        ))
    }

    fn new(
        kid: String,
        alg: Alg,
        state: KeyState,
        material: Material,
        jwk: Option<jwk::Jwk>,
    ) -> SigningKey {
        let header = serde_json::json!({ "alg": alg.as_str(), "typ": "JWT", "kid": kid });
        SigningKey {
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
            kid,
            alg,
            state,
            material,
            jwk,
            derivation: None,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    pub fn state(&self) -> KeyState {
        self.state
    }

    /// The first segment of every token this key signs.
    pub fn encoded_header(&self) -> &str {
        &self.header
    }

    /// Signs `message` in-process; `None` for a key that holds no private part here (a
    /// public key, or a key that signs elsewhere: see [`SigningKey::sign_async`]).
    pub fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let signer = match &self.material {
            Material::Hmac(key) => return Some(hmac::sign(key, message).as_ref().to_vec()),
            Material::Private { signer, .. } => signer,
            Material::Public(_) | Material::Remote(_) => return None,
        };
        let rng = SystemRandom::new();
        match signer {
            Signer::Ecdsa(pair) => pair.sign(&rng, message).ok().map(|s| s.as_ref().to_vec()),
            Signer::Ed25519(pair) => Some(pair.sign(message).as_ref().to_vec()),
            Signer::Rsa(pair, encoding) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(*encoding, &rng, message, &mut signature)
                    .ok()
                    .map(|()| signature)
            }
        }
    }

    /// Signs `message`: in its source for a key that signs elsewhere, verified with the
    /// published public key before it is returned; in-process for any other.
    pub async fn sign_async(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.material {
            Material::Remote(remote) => remote.sign(message).await.map_err(SignError::Unavailable),
            _ => self
                .sign(message)
                .ok_or_else(|| SignError::CannotSign(self.kid.clone())),
        }
    }

    /// For a key that signs elsewhere, whether it still signs: a signature made within its
    /// probe interval ([`SigningKey::probe_interval`] of `default`) answers; otherwise one
    /// signature of a fixed message, verified. `None` for any other key.
    pub async fn probe(&self, default: Duration) -> Option<Result<(), String>> {
        let Material::Remote(remote) = &self.material else {
            return None;
        };
        let fresh = self.probe_interval(default);
        let last = *remote.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, true)) = last
            && at.elapsed() < fresh
        {
            return Some(Ok(()));
        }
        Some(remote.sign(b"auth-sidecar signing probe").await.map(drop))
    }

    /// How often the probe should run while the key signs: the source's own interval, or
    /// `default`.
    pub fn probe_interval(&self, default: Duration) -> Duration {
        match &self.material {
            Material::Remote(remote) => remote.source.probe_interval().unwrap_or(default),
            _ => default,
        }
    }

    /// Resolves when this key, signing elsewhere, stops signing; never for any other key.
    pub async fn stopped_signing(&self) {
        match &self.material {
            Material::Remote(remote) => remote.stopped.notified().await,
            _ => std::future::pending().await,
        }
    }

    /// Where the key signs, for one that signs elsewhere: its source's description.
    pub fn source(&self) -> Option<String> {
        match &self.material {
            Material::Remote(remote) => Some(remote.source.describe()),
            _ => None,
        }
    }

    /// Whether `signature` (the raw bytes of the third segment) signs `message` under this key
    /// and its algorithm. HMAC tags are compared in constant time.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Material::Private { public, .. } | Material::Public(public) => {
                public.verify_sig(message, signature).is_ok()
            }
            Material::Remote(remote) => remote.public.verify_sig(message, signature).is_ok(),
        }
    }

    /// The public key as a JWK; `None` for HMAC keys, whose secret is never published.
    pub fn jwk(&self) -> Option<&jwk::Jwk> {
        self.jwk.as_ref()
    }

    /// A 32-byte secret for `purpose` (the admin UI's cookies, say), derived from this key:
    /// every node holding the key derives the same one, and it reveals nothing of the key nor
    /// of another purpose's. `None` for a key that holds only a public key.
    pub fn derive(&self, purpose: &str) -> Option<[u8; 32]> {
        let key = self.derivation.as_ref()?;
        let mut message = b"auth-sidecar derived secret v1\0".to_vec();
        message.extend_from_slice(purpose.as_bytes());
        let tag = hmac::sign(key, &message);
        tag.as_ref().try_into().ok()
    }

    /// Whether [`SigningKey::derive`] gives secrets: false for a key that signs elsewhere.
    pub fn derives(&self) -> bool {
        self.derivation.is_some()
    }

    /// What another node compares its own key under this kid with, to learn whether the two
    /// are the same key and nothing else. A public key's is a SHA-256 of its JWK parameters.
    /// An HMAC key's is keyed: an HMAC, under the secret itself, of the kid and `nonce` (the
    /// publishing node's random value), so it is neither the secret nor a plain hash of it,
    /// and differs from node to node; only a holder of the same secret can reproduce it.
    pub fn fingerprint(&self, nonce: &[u8]) -> String {
        let bytes = match (&self.material, &self.jwk) {
            (Material::Hmac(key), _) => hmac::sign(key, &fingerprint_message(&self.kid, nonce))
                .as_ref()
                .to_vec(),
            (_, Some(jwk)) => {
                let parameters = serde_json::to_vec(&jwk.algorithm).unwrap_or_default();
                digest::digest(&digest::SHA256, &parameters)
                    .as_ref()
                    .to_vec()
            }
            // Every asymmetric key has its JWK; nothing to compare otherwise.
            (_, None) => Vec::new(),
        };
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Whether `fingerprint`, published with `nonce` by another node for this kid, is of this
    /// very key (in constant time for an HMAC key).
    pub fn same_key_as(&self, nonce: &[u8], fingerprint: &str) -> bool {
        let Ok(theirs) = URL_SAFE_NO_PAD.decode(fingerprint) else {
            return false;
        };
        match &self.material {
            Material::Hmac(key) => {
                hmac::verify(key, &fingerprint_message(&self.kid, nonce), &theirs).is_ok()
            }
            _ => URL_SAFE_NO_PAD.decode(self.fingerprint(nonce)).ok() == Some(theirs),
        }
    }
}

/// The message an HMAC key's fingerprint signs: a context no token can start with, the kid
/// and the nonce, each length-prefixed.
fn fingerprint_message(kid: &str, nonce: &[u8]) -> Vec<u8> {
    let mut message = b"auth-sidecar key fingerprint v1\0".to_vec();
    for part in [kid.as_bytes(), nonce] {
        message.extend_from_slice(&(part.len() as u32).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

impl Signer {
    fn public_spki(&self) -> Result<PublicKeyX509Der<'static>, aws_lc_rs::error::Unspecified> {
        match self {
            Signer::Ecdsa(pair) => pair.public_key().as_der(),
            Signer::Ed25519(pair) => pair.public_key().as_der(),
            Signer::Rsa(pair, _) => pair.public_key().as_der(),
        }
    }
}

/// The JWK of a public key, after the checks every public key gets (an RSA modulus long
/// enough).
fn public_key_jwk(kid: &str, alg: Alg, public: &ParsedPublicKey) -> Result<jwk::Jwk, String> {
    let spki = public
        .as_der()
        .map_err(|_| format!("not a valid {alg} key"))?;
    if matches!(alg, Alg::RS256 | Alg::PS256) {
        let bits = rsa::PublicKey::from_der(spki.as_ref())
            .map_err(|_| format!("not a valid {alg} key"))?
            .modulus_len()
            * 8;
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "an RSA key of {bits} bits is too short, use at least {MIN_RSA_BITS}"
            ));
        }
    }
    let params = public_jwk(alg, &spki).ok_or_else(|| format!("not a valid {alg} key"))?;
    Ok(jwk::Jwk {
        common: jwk::CommonParameters {
            public_key_use: Some(jwk::PublicKeyUse::Signature),
            key_algorithm: Some(alg.jwk()),
            key_id: Some(kid.to_owned()),
            ..Default::default()
        },
        algorithm: params,
    })
}

/// The JWK parameters of a public key, from its SubjectPublicKeyInfo as aws-lc writes it (an
/// EC point uncompressed, at the end; an Ed25519 key as the last 32 bytes).
fn public_jwk(alg: Alg, spki: &PublicKeyX509Der<'_>) -> Option<jwk::AlgorithmParameters> {
    let der = spki.as_ref();
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let ec = |coordinate: usize, curve| {
        let point = der.get(der.len().checked_sub(2 * coordinate + 1)?..)?;
        (point[0] == 0x04).then(|| {
            jwk::AlgorithmParameters::EllipticCurve(jwk::EllipticCurveKeyParameters {
                key_type: jwk::EllipticCurveKeyType::EC,
                curve,
                x: b64(&point[1..=coordinate]),
                y: b64(&point[coordinate + 1..]),
            })
        })
    };
    match alg {
        Alg::ES256 => ec(32, jwk::EllipticCurve::P256),
        Alg::ES384 => ec(48, jwk::EllipticCurve::P384),
        Alg::EdDSA => Some(jwk::AlgorithmParameters::OctetKeyPair(
            jwk::OctetKeyPairParameters {
                key_type: jwk::OctetKeyPairType::OctetKeyPair,
                curve: jwk::EllipticCurve::Ed25519,
                x: b64(der.get(der.len().checked_sub(32)?..)?),
            },
        )),
        Alg::RS256 | Alg::PS256 => {
            let key = rsa::PublicKey::from_der(der).ok()?;
            Some(jwk::AlgorithmParameters::RSA(jwk::RSAKeyParameters {
                key_type: jwk::RSAKeyType::RSA,
                n: b64(key.modulus().big_endian_without_leading_zero()),
                e: b64(key.exponent().big_endian_without_leading_zero()),
            }))
        }
        Alg::HS256 | Alg::HS384 | Alg::HS512 => None,
    }
}

/// Whether a manifest entry would load: its kid and file name, and the key file's text.
pub fn check_entry(kid: &str, file: &str, alg: Alg, text: &[u8]) -> Result<(), KeyError> {
    let error = |reason: String| KeyError::Key {
        kid: kid.to_owned(),
        path: file.into(),
        reason,
    };
    check_kid(kid).map_err(error)?;
    check_file_name(file).map_err(error)?;
    load_key(kid, alg, KeyState::Verify, text)
        .map(drop)
        .map_err(error)
}

/// A key file's text as a key.
fn load_key(kid: &str, alg: Alg, state: KeyState, text: &[u8]) -> Result<SigningKey, String> {
    if alg.is_hmac() {
        let secret = trim_line_end(text);
        if secret.starts_with(b"-----BEGIN") {
            return Err("an HMAC secret must not be a PEM key".to_owned());
        }
        SigningKey::hmac(kid.to_owned(), alg, state, secret).map_err(|e| e.to_string())
    } else {
        SigningKey::from_pem(kid.to_owned(), alg, state, text)
    }
}

/// The keys a node signs and verifies with at one moment.
#[derive(Debug)]
pub struct KeySet {
    active: Arc<SigningKey>,
    /// Active and verify keys; retired ones are left out, so their tokens name an unknown key.
    by_kid: HashMap<String, Arc<SigningKey>>,
    retired: BTreeSet<String>,
    /// Public keys of the active and verify keys, as served at `/.well-known/jwks.json`.
    jwks: String,
    /// A digest of the manifest and every key file, to tell a real change from a touch.
    fingerprint: Option<digest::Digest>,
}

impl KeySet {
    pub fn single(key: SigningKey) -> KeySet {
        KeySet::build(vec![key], None).expect("one active key is a valid key set")
    }

    /// A random HS256 key, good for this process only.
    pub fn ephemeral() -> KeySet {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
        KeySet::single(SigningKey::hs256(&Secret::new(bytes.to_vec())).expect("32 bytes suffice"))
    }

    fn build(keys: Vec<SigningKey>, fingerprint: Option<digest::Digest>) -> Result<KeySet, String> {
        let mut active = None;
        let mut by_kid = HashMap::new();
        let mut retired = BTreeSet::new();
        let mut public = Vec::new();
        for key in keys {
            let key = Arc::new(key);
            match key.state {
                KeyState::Retired => {
                    retired.insert(key.kid.clone());
                    continue;
                }
                KeyState::Active if active.is_some() => {
                    return Err("more than one key is active; exactly one signs".to_owned());
                }
                KeyState::Active => active = Some(key.clone()),
                KeyState::Verify => {}
            }
            if let Some(jwk) = key.jwk() {
                public.push(jwk.clone());
            }
            by_kid.insert(key.kid.clone(), key);
        }
        let active = active.ok_or("no key is active; exactly one signs")?;
        let jwks =
            serde_json::to_string(&jwk::JwkSet { keys: public }).expect("a JWK set serializes");
        Ok(KeySet {
            active,
            by_kid,
            retired,
            jwks,
            fingerprint,
        })
    }

    /// Reads a keys directory: its manifest and the files it names, and asks the sources
    /// of keys that sign elsewhere for their public keys.
    pub async fn load_dir(dir: &Path) -> Result<KeySet, KeyError> {
        let manifest_path = dir.join(MANIFEST);
        let manifest_error = |reason: String| KeyError::Manifest {
            path: manifest_path.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|e| manifest_error(e.to_string()))?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| manifest_error(e.message().to_owned()))?;
        let mut fingerprint = digest::Context::new(&digest::SHA256);
        fingerprint.update(text.as_bytes());
        let mut kids = BTreeSet::new();
        let mut keys = Vec::with_capacity(manifest.keys.len());
        // A retired key that signs elsewhere is not asked for: it may be disabled already.
        let mut retired_elsewhere = BTreeSet::new();
        for entry in manifest.keys {
            // A key that signs elsewhere is named in the manifest.
            let path = match &entry.file {
                Some(file) => dir.join(file),
                None => manifest_path.clone(),
            };
            let key_error = |reason: String| KeyError::Key {
                kid: entry.kid.clone(),
                path: path.clone(),
                reason,
            };
            check_kid(&entry.kid).map_err(&manifest_error)?;
            if !kids.insert(entry.kid.clone()) {
                return Err(manifest_error(format!(
                    "kid `{}` is given twice",
                    entry.kid
                )));
            }
            entry.check_fields().map_err(key_error)?;
            if entry.source != Source::File && entry.state == KeyState::Retired {
                retired_elsewhere.insert(entry.kid.clone());
                continue;
            }
            if entry.source != Source::File {
                let key = load_remote_key(&entry).await.map_err(key_error)?;
                // The public key joins the fingerprint: a key moved under the same name (an
                // alias pointed elsewhere, a token key made again) is a change.
                fingerprint.update(key.fingerprint(&[]).as_bytes());
                keys.push(key);
                continue;
            }
            let file = entry.file.as_deref().expect("checked by check_fields");
            check_file_name(file).map_err(key_error)?;
            let bytes = std::fs::read(&path).map_err(|e| key_error(e.to_string()))?;
            fingerprint.update(&(bytes.len() as u64).to_be_bytes());
            fingerprint.update(&bytes);
            keys.push(load_key(&entry.kid, entry.alg, entry.state, &bytes).map_err(key_error)?);
        }
        let mut set = KeySet::build(keys, Some(fingerprint.finish())).map_err(manifest_error)?;
        set.retired.extend(retired_elsewhere);
        Ok(set)
    }

    /// The key that signs new tokens.
    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    /// The key a token's `kid` names, if this node accepts it.
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        self.by_kid.get(kid).map(|k| &**k)
    }

    /// The key that derives this node's secrets (the admin UI's cookie and CSRF keys, the
    /// admin credential's fingerprint): the active key, or, when it derives nothing (a key in
    /// a PKCS#11 token), the first other key by kid that does. Every node with the same set
    /// picks the same one. `None` when no key derives.
    pub fn deriving(&self) -> Option<&SigningKey> {
        if self.active.derives() {
            return Some(&self.active);
        }
        let mut others: Vec<&SigningKey> = self
            .keys()
            .filter(|k| k.kid() != self.active.kid() && k.derives())
            .collect();
        others.sort_by_key(|k| k.kid());
        others.first().copied()
    }

    /// The active and verify keys, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        self.by_kid.values().map(|k| &**k)
    }

    /// The public keys, as a JWK Set document.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// One line for logs and `/healthz`, naming every key but no key material.
    pub fn summary(&self) -> String {
        let mut verify: Vec<_> = self
            .by_kid
            .values()
            .filter(|k| k.state == KeyState::Verify)
            .map(|k| k.kid.as_str())
            .collect();
        verify.sort_unstable();
        let list = |kids: Vec<&str>| {
            if kids.is_empty() {
                "none".to_owned()
            } else {
                kids.join(",")
            }
        };
        format!(
            "active={} ({}) verify={} retired={}",
            self.active.kid,
            self.active.alg,
            list(verify),
            list(self.retired.iter().map(String::as_str).collect()),
        )
    }

    /// One line per active or verify key, by kid: its algorithm and state, and where it signs
    /// when that is not here (what `keys check` and `check-config` show).
    pub fn report(&self) -> Vec<String> {
        let mut keys: Vec<&SigningKey> = self.keys().collect();
        keys.sort_by_key(|k| k.kid());
        keys.iter()
            .map(|k| {
                let state = match k.state {
                    KeyState::Active => "active",
                    KeyState::Verify => "verify",
                    KeyState::Retired => "retired",
                };
                let place = k.source().unwrap_or_else(|| "file".to_owned());
                format!("{} {} {state}: {place}", k.kid, k.alg)
            })
            .collect()
    }

    fn same_files(&self, other: &KeySet) -> bool {
        match (&self.fingerprint, &other.fingerprint) {
            (Some(a), Some(b)) => a.as_ref() == b.as_ref(),
            _ => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(rename = "key", default)]
    keys: Vec<ManifestKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestKey {
    kid: String,
    alg: Alg,
    /// A file of the directory, for `source = "file"` only.
    file: Option<String>,
    state: KeyState,
    #[serde(default)]
    source: Source,
    /// Where a pkcs11 key is: its label and/or id (hex), and the token's label.
    label: Option<String>,
    id: Option<String>,
    token: Option<String>,
    /// Sessions a pkcs11 key signs on at once.
    sessions: Option<usize>,
    /// Which aws-kms key: its id, ARN or alias; its region and, optionally, another endpoint.
    key_id: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    /// `Sign` calls an aws-kms key makes at once.
    max_in_flight: Option<usize>,
    /// Everything one aws-kms signature may take, retries included (`2s`).
    #[serde(default, with = "humantime_serde_opt")]
    timeout: Option<Duration>,
    /// How often an idle node checks that an aws-kms key signs (`60s`).
    #[serde(default, with = "humantime_serde_opt")]
    probe_interval: Option<Duration>,
}

impl ManifestKey {
    /// The fields the entry's source needs are there, and no other source's are.
    fn check_fields(&self) -> Result<(), String> {
        let given = [
            ("file", self.file.is_some(), Source::File),
            ("label", self.label.is_some(), Source::Pkcs11),
            ("id", self.id.is_some(), Source::Pkcs11),
            ("token", self.token.is_some(), Source::Pkcs11),
            ("sessions", self.sessions.is_some(), Source::Pkcs11),
            ("key_id", self.key_id.is_some(), Source::AwsKms),
            ("region", self.region.is_some(), Source::AwsKms),
            ("endpoint_url", self.endpoint_url.is_some(), Source::AwsKms),
            (
                "max_in_flight",
                self.max_in_flight.is_some(),
                Source::AwsKms,
            ),
            ("timeout", self.timeout.is_some(), Source::AwsKms),
            (
                "probe_interval",
                self.probe_interval.is_some(),
                Source::AwsKms,
            ),
        ];
        if let Some((field, _, owner)) = given
            .iter()
            .find(|(_, set, owner)| *set && *owner != self.source)
        {
            return Err(format!(
                "`{field}` is for `source = \"{}\"`, and this key's source is `{}`",
                owner.name(),
                self.source.name()
            ));
        }
        match self.source {
            Source::File if self.file.is_none() => Err("`file` is required".to_owned()),
            Source::Pkcs11 if self.label.is_none() && self.id.is_none() => {
                Err("a pkcs11 key needs `label` or `id`".to_owned())
            }
            Source::AwsKms if self.key_id.is_none() => {
                Err("an aws-kms key needs `key_id` (a key id, key ARN or `alias/...`)".to_owned())
            }
            _ => Ok(()),
        }
    }
}

/// `humantime` durations (`"2s"`, `"500ms"`) for optional manifest fields.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(serde::de::Error::custom)?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom("must be greater than zero"));
        }
        Ok(Some(duration))
    }
}

/// Where a key's private part is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Source {
    #[default]
    File,
    Pkcs11,
    AwsKms,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Pkcs11 => "pkcs11",
            Source::AwsKms => "aws-kms",
        }
    }
}

/// A key that signs elsewhere, as a manifest entry names it: its source loaded, and the key
/// checked as every such key is ([`SigningKey::remote`]).
async fn load_remote_key(entry: &ManifestKey) -> Result<SigningKey, String> {
    let (source, spki): (Arc<dyn KeySource>, Vec<u8>) = match entry.source {
        Source::Pkcs11 => {
            let locator = pkcs11::Locator {
                label: entry.label.clone(),
                id: entry.id.as_deref().map(pkcs11::parse_id).transpose()?,
                token: entry.token.clone(),
            };
            let sessions = entry.sessions.unwrap_or(pkcs11::DEFAULT_SESSIONS);
            if !(1..=64).contains(&sessions) {
                return Err("`sessions` must be 1 to 64".to_owned());
            }
            let alg = entry.alg;
            let (key, spki) =
                tokio::task::spawn_blocking(move || pkcs11::HsmKey::load(locator, alg, sessions))
                    .await
                    .map_err(|e| format!("loading the PKCS#11 key failed: {e}"))??;
            (Arc::new(key), spki)
        }
        Source::AwsKms => {
            let settings = kms::Settings {
                key_id: entry.key_id.clone().expect("checked by check_fields"),
                region: entry.region.clone(),
                endpoint_url: entry.endpoint_url.clone(),
                max_in_flight: entry.max_in_flight.unwrap_or(kms::DEFAULT_MAX_IN_FLIGHT),
                timeout: entry.timeout.unwrap_or(kms::DEFAULT_TIMEOUT),
                probe_interval: entry.probe_interval.unwrap_or(kms::DEFAULT_PROBE_INTERVAL),
            };
            let (key, spki) = kms::KmsKey::load(settings, entry.alg).await?;
            (Arc::new(key), spki)
        }
        Source::File => unreachable!("a file key is read, not loaded"),
    };
    SigningKey::remote(entry.kid.clone(), entry.alg, entry.state, source, &spki).await
}

/// A `kid` goes into every token header and into logs: keep it short and plain.
fn check_kid(kid: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if kid.is_empty() || kid.len() > 64 || !kid.chars().all(plain) {
        return Err(format!(
            "kid `{kid}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Key files sit in the keys directory itself: no paths, no hidden files.
fn check_file_name(file: &str) -> Result<(), String> {
    if file.is_empty() || file.contains('/') || file.starts_with('.') {
        return Err("`file` must name a file inside the keys directory".to_owned());
    }
    Ok(())
}

/// A secret file written by `echo` ends with a newline that is not part of the secret.
fn trim_line_end(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// The key set in use, swapped whole when the keys directory changes: a call sees the old
/// set or the new one, never a mix, and never none.
pub struct Keys {
    current: ArcSwap<KeySet>,
    dir: Option<PathBuf>,
    /// Bumped at every swap, so that anything derived from an older set can tell.
    generation: AtomicU64,
    /// Wakes whoever waits on a swap (the signer probe, which waits on the active key).
    swapped: tokio::sync::Notify,
    status: Mutex<ReloadStatus>,
}

#[derive(Debug, Clone, Default)]
struct ReloadStatus {
    last_error: Option<(SystemTime, String)>,
    /// When the set in use was loaded.
    loaded_at: Option<SystemTime>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Changed,
}

impl Keys {
    /// A key set that never changes.
    pub fn fixed(set: KeySet) -> Keys {
        Keys::new(set, None)
    }

    /// The key set of a directory, which [`Keys::reload`] reads again.
    pub async fn from_dir(dir: PathBuf) -> Result<Keys, KeyError> {
        Ok(Keys::new(KeySet::load_dir(&dir).await?, Some(dir)))
    }

    fn new(set: KeySet, dir: Option<PathBuf>) -> Keys {
        Keys {
            current: ArcSwap::from_pointee(set),
            dir,
            generation: AtomicU64::new(0),
            swapped: tokio::sync::Notify::new(),
            status: Mutex::new(ReloadStatus {
                last_error: None,
                loaded_at: Some(SystemTime::now()),
            }),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// The set in use, to hold across an await (a signature in a PKCS#11 token).
    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// Resolves at the next swap of the key set.
    pub async fn swapped(&self) {
        self.swapped.notified().await;
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the directory again and swaps the new set in. A set that does not load is
    /// refused: the one in use stays, and the error is kept for [`Keys::health_detail`].
    pub async fn reload(&self) -> Result<Reloaded, KeyError> {
        let Some(dir) = &self.dir else {
            return Ok(Reloaded::Unchanged);
        };
        let loaded = KeySet::load_dir(dir).await;
        let mut status = self.status.lock().expect("not poisoned");
        match loaded {
            Ok(set) => {
                status.last_error = None;
                if set.same_files(&self.current.load()) {
                    return Ok(Reloaded::Unchanged);
                }
                self.current.store(Arc::new(set));
                status.loaded_at = Some(SystemTime::now());
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.swapped.notify_waiters();
                Ok(Reloaded::Changed)
            }
            Err(e) => {
                status.last_error = Some((SystemTime::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// The key set in use and, when the last reload failed, why.
    /// When the key set in use was loaded (at start, or by the last reload that changed it).
    pub fn loaded_at(&self) -> Option<SystemTime> {
        self.status.lock().expect("not poisoned").loaded_at
    }

    pub fn health_detail(&self) -> String {
        let set = self.current();
        match &self.status.lock().expect("not poisoned").last_error {
            None => format!("keys: {}", set.summary()),
            Some((at, error)) => format!(
                "keys: {} (the last reload, at {}, was refused: {error})",
                set.summary(),
                humantime::format_rfc3339_seconds(*at)
            ),
        }
    }
}

/// A new private key, or HMAC secret, for `alg`, as the text of its file: PKCS#8 PEM, or for
/// HMAC a base64url string whose bytes are the secret.
pub fn generate(alg: Alg) -> Result<String, aws_lc_rs::error::Unspecified> {
    let pkcs8 = |der: &[u8]| pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec()));
    Ok(match alg {
        Alg::HS256 | Alg::HS384 | Alg::HS512 => {
            let mut bytes = vec![0u8; alg.min_secret_len()];
            aws_lc_rs::rand::fill(&mut bytes)?;
            format!("{}\n", URL_SAFE_NO_PAD.encode(bytes))
        }
        Alg::ES256 => pkcs8(
            sig::EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)?
                .to_pkcs8v1()?
                .as_ref(),
        ),
        Alg::ES384 => pkcs8(
            sig::EcdsaKeyPair::generate(&sig::ECDSA_P384_SHA384_FIXED_SIGNING)?
                .to_pkcs8v1()?
                .as_ref(),
        ),
        Alg::EdDSA => pkcs8(sig::Ed25519KeyPair::generate()?.to_pkcs8v1()?.as_ref()),
        Alg::RS256 | Alg::PS256 => {
            let pair = sig::RsaKeyPair::generate(rsa::KeySize::Rsa2048)?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = pair.as_der()?;
            pkcs8(der.as_ref())
        }
    })
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

    #[test]
    fn every_algorithm_signs_what_it_verifies_and_nothing_else() {
        for alg in Alg::ALL {
            let file = generate(alg).unwrap();
            let key = if alg.is_hmac() {
                SigningKey::hmac(
                    "k".into(),
                    alg,
                    KeyState::Active,
                    trim_line_end(file.as_bytes()),
                )
            } else {
                SigningKey::from_pem("k".into(), alg, KeyState::Active, file.as_bytes())
                    .map_err(|e| panic!("{alg}: {e}"))
            }
            .unwrap();
            let signature = key.sign(b"message").unwrap();
            assert!(key.verify(b"message", &signature), "{alg}");
            assert!(!key.verify(b"messagf", &signature), "{alg}");
            assert_eq!(key.jwk().is_some(), !alg.is_hmac(), "{alg}");
        }
    }

    #[test]
    fn a_key_file_of_another_algorithm_is_refused() {
        let es256 = generate(Alg::ES256).unwrap();
        for alg in [Alg::ES384, Alg::EdDSA, Alg::RS256, Alg::PS256, Alg::HS256] {
            let err = SigningKey::from_pem("k".into(), alg, KeyState::Verify, es256.as_bytes())
                .unwrap_err();
            assert!(err.contains(alg.as_str()), "{alg}: {err}");
            assert!(!err.contains("BEGIN"), "{err}");
        }
    }

    #[test]
    fn a_public_key_verifies_but_cannot_be_active() {
        let private = generate(Alg::EdDSA).unwrap();
        let signer =
            SigningKey::from_pem("k".into(), Alg::EdDSA, KeyState::Active, private.as_bytes())
                .unwrap();
        let Material::Private { public, .. } = &signer.material else {
            panic!("a private key")
        };
        let spki = public.as_der().unwrap();
        let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()));
        let err = SigningKey::from_pem(
            "k".into(),
            Alg::EdDSA,
            KeyState::Active,
            public_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("cannot sign"), "{err}");
        let verifier = SigningKey::from_pem(
            "k".into(),
            Alg::EdDSA,
            KeyState::Verify,
            public_pem.as_bytes(),
        )
        .unwrap();
        let signature = signer.sign(b"m").unwrap();
        assert!(verifier.verify(b"m", &signature));
        assert!(verifier.sign(b"m").is_none());
        assert_eq!(verifier.jwk(), signer.jwk());
    }

    fn write_dir(manifest: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), manifest).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    async fn load_error(manifest: &str, files: &[(&str, &str)]) -> String {
        let dir = write_dir(manifest, files);
        KeySet::load_dir(dir.path()).await.unwrap_err().to_string()
    }

    const SECRET_FILE: &str = "0123456789abcdef0123456789abcdef\n";

    #[tokio::test]
    async fn a_keys_directory_loads_and_its_errors_say_what_is_wrong() {
        let es = generate(Alg::ES256).unwrap();
        let dir = write_dir(
            r#"
            [[key]]
            kid = "new"
            alg = "ES256"
            file = "new.pem"
            state = "active"

            [[key]]
            kid = "old"
            alg = "HS256"
            file = "old.secret"
            state = "verify"

            [[key]]
            kid = "gone"
            alg = "HS256"
            file = "old.secret"
            state = "retired"
            "#,
            &[("new.pem", &es), ("old.secret", SECRET_FILE)],
        );
        let set = KeySet::load_dir(dir.path()).await.unwrap();
        assert_eq!(set.active().kid(), "new");
        assert!(set.get("old").is_some());
        assert!(set.get("gone").is_none(), "a retired key verifies nothing");
        assert_eq!(set.summary(), "active=new (ES256) verify=old retired=gone");
        let jwks: serde_json::Value = serde_json::from_str(set.jwks()).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");
        assert_eq!(jwks["keys"][0]["kid"], "new");

        let entry = |kid: &str, alg: &str, file: &str, state: &str| {
            format!(
                "[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\nfile = \"{file}\"\nstate = \"{state}\"\n"
            )
        };
        let secret = [("s", SECRET_FILE)];
        // No network: each of these is refused before KMS is asked.
        let kms = |kid: &str, alg: &str, state: &str| {
            format!(
                "[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\nsource = \"aws-kms\"\nkey_id = \"alias/x\"\nregion = \"eu-west-1\"\nstate = \"{state}\"\n"
            )
        };
        for (manifest, files, expected) in [
            (
                entry("a", "HS256", "s", "verify"),
                &secret[..],
                "no key is active",
            ),
            (
                entry("a", "HS256", "s", "active") + &entry("b", "HS256", "s", "active"),
                &secret[..],
                "more than one key is active",
            ),
            (
                entry("a", "HS256", "s", "active") + &entry("a", "HS256", "s", "verify"),
                &secret[..],
                "kid `a` is given twice",
            ),
            (
                entry("a", "HS999", "s", "active"),
                &secret[..],
                "unknown algorithm `HS999`",
            ),
            (
                entry("a b", "HS256", "s", "active"),
                &secret[..],
                "kid `a b` must be",
            ),
            (
                entry("a", "HS256", "../s", "active"),
                &secret[..],
                "inside the keys directory",
            ),
            (
                entry("a", "HS256", "missing", "active"),
                &secret[..],
                "key `a`",
            ),
            (
                entry("a", "HS512", "s", "active"),
                &secret[..],
                "HS512 secret needs at least 64",
            ),
            (
                entry("a", "HS256", "s", "paused"),
                &secret[..],
                "unknown variant `paused`",
            ),
            (
                entry("a", "HS256", "p", "active"),
                &[("p", es.as_str())][..],
                "must not be a PEM key",
            ),
            (
                entry("a", "ES256", "s", "active"),
                &secret[..],
                "not a PEM file",
            ),
            (
                entry("a", "ES256", "s", "active") + "label = \"x\"\n",
                &secret[..],
                "`label` is for `source = \"pkcs11\"`, and this key's source is `file`",
            ),
            (
                kms("a", "ES256", "active") + "file = \"s\"\n",
                &secret[..],
                "`file` is for `source = \"file\"`, and this key's source is `aws-kms`",
            ),
            (
                kms("a", "ES256", "active") + "sessions = 2\n",
                &secret[..],
                "`sessions` is for `source = \"pkcs11\"`",
            ),
            (
                kms("a", "ES256", "active").replace("key_id = \"alias/x\"\n", ""),
                &secret[..],
                "an aws-kms key needs `key_id`",
            ),
            (
                kms("a", "EdDSA", "active"),
                &secret[..],
                "EdDSA keys cannot be in AWS KMS",
            ),
            (
                kms("a", "HS256", "active"),
                &secret[..],
                "HS256 keys cannot be in AWS KMS",
            ),
            (
                kms("a", "ES256", "active") + "endpoint_url = \"http://AKIA:pw@h\"\n",
                &secret[..],
                "must not hold a user or password",
            ),
            (
                kms("a", "ES256", "active") + "timeout = \"0s\"\n",
                &secret[..],
                "must be greater than zero",
            ),
            (
                kms("a", "ES256", "active") + "max_in_flight = 0\n",
                &secret[..],
                "`max_in_flight` must be 1 to 256",
            ),
        ] {
            let err = load_error(&manifest, files).await;
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(!err.contains("0123456789abcdef"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_refused_reload_keeps_the_key_set_in_use() {
        let dir = write_dir(
            "[[key]]\nkid = \"a\"\nalg = \"HS256\"\nfile = \"s\"\nstate = \"active\"\n",
            &[("s", SECRET_FILE)],
        );
        let keys = Keys::from_dir(dir.path().to_owned()).await.unwrap();
        assert_eq!(keys.reload().await.unwrap(), Reloaded::Unchanged);
        std::fs::write(dir.path().join("s"), "short").unwrap();
        assert!(keys.reload().await.is_err());
        assert_eq!(keys.current().active().kid(), "a");
        assert!(
            keys.health_detail().contains("was refused"),
            "{}",
            keys.health_detail()
        );
        assert_eq!(keys.generation(), 0);
        std::fs::write(
            dir.path().join("s"),
            "a-new-secret-that-is-long-enough-for-hs256",
        )
        .unwrap();
        assert_eq!(keys.reload().await.unwrap(), Reloaded::Changed);
        assert_eq!(keys.generation(), 1);
        assert!(!keys.health_detail().contains("refused"));
    }
}
