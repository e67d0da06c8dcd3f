//! Signing keys and the key set a node signs and verifies with. A key is bound to one
//! algorithm: a token is verified only with the key its `kid` names and only with that key's
//! algorithm, whatever its header claims.
//!
//! A key set comes from `AUTH_JWT_SECRET` (one HS256 key) or from a directory holding a
//! manifest (`keys.toml`) and one file per key, such as a mounted Kubernetes Secret, or keys
//! that stay in a PKCS#11 token (`pkcs11`). The directory can be re-read at any time; a key
//! set that does not load is refused as a whole and the one in use is kept.

pub mod pkcs11;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
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
    /// A private key in a PKCS#11 token; its public key read from the token at load.
    Hsm {
        key: Arc<pkcs11::HsmKey>,
        public: Arc<ParsedPublicKey>,
    },
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
            Material::Hmac(_) | Material::Hsm { .. } => unreachable!("a PEM key"),
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

    /// A key in a PKCS#11 token: it signs there; its public key, read from the token,
    /// verifies here.
    pub fn hsm(
        kid: String,
        alg: Alg,
        state: KeyState,
        loaded: pkcs11::Loaded,
    ) -> Result<SigningKey, String> {
        let public = ParsedPublicKey::new(alg.verification(), &loaded.spki)
            .map_err(|_| format!("the token's public key is not a valid {alg} key"))?;
        let jwk = public_key_jwk(&kid, alg, &public)?;
        let material = Material::Hsm {
            key: loaded.key,
            public: Arc::new(public),
        };
        Ok(SigningKey::new(kid, alg, state, material, Some(jwk)))
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
    /// public key, or a key in a PKCS#11 token: see [`SigningKey::sign_async`]).
    pub fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let signer = match &self.material {
            Material::Hmac(key) => return Some(hmac::sign(key, message).as_ref().to_vec()),
            Material::Private { signer, .. } => signer,
            Material::Public(_) | Material::Hsm { .. } => return None,
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

    /// Signs `message`, in the token for a PKCS#11 key (off the async workers), in-process
    /// for any other.
    pub async fn sign_async(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.material {
            Material::Hsm { key, public } => key
                .sign(message.to_vec(), public.clone())
                .await
                .map_err(SignError::Unavailable),
            _ => self
                .sign(message)
                .ok_or_else(|| SignError::CannotSign(self.kid.clone())),
        }
    }

    /// For a key in a PKCS#11 token, whether it still signs: one signature of a fixed
    /// message, verified. `None` for any other key.
    pub async fn probe(&self) -> Option<Result<(), String>> {
        let Material::Hsm { key, public } = &self.material else {
            return None;
        };
        let probe = b"auth-sidecar signing probe".to_vec();
        Some(key.sign(probe, public.clone()).await.map(drop))
    }

    /// Whether this key is in a PKCS#11 token.
    pub fn in_token(&self) -> bool {
        matches!(self.material, Material::Hsm { .. })
    }

    /// Whether `signature` (the raw bytes of the third segment) signs `message` under this key
    /// and its algorithm. HMAC tags are compared in constant time.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Material::Private { public, .. } | Material::Public(public) => {
                public.verify_sig(message, signature).is_ok()
            }
            Material::Hsm { public, .. } => public.verify_sig(message, signature).is_ok(),
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

    /// Whether [`SigningKey::derive`] gives secrets: false for a key in a PKCS#11 token.
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

    /// Reads a keys directory: its manifest and the files it names.
    pub fn load_dir(dir: &Path) -> Result<KeySet, KeyError> {
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
        for entry in manifest.keys {
            // A key in a token is named in the manifest.
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
            if entry.source == Source::Pkcs11 {
                keys.push(load_hsm_key(&entry).map_err(key_error)?);
                continue;
            }
            if entry.label.is_some() || entry.id.is_some() || entry.token.is_some() {
                return Err(key_error(
                    "`label`, `id` and `token` are for `source = \"pkcs11\"`".to_owned(),
                ));
            }
            let file = entry
                .file
                .as_deref()
                .ok_or_else(|| key_error("`file` is required".to_owned()))?;
            check_file_name(file).map_err(key_error)?;
            let bytes = std::fs::read(&path).map_err(|e| key_error(e.to_string()))?;
            fingerprint.update(&(bytes.len() as u64).to_be_bytes());
            fingerprint.update(&bytes);
            keys.push(load_key(&entry.kid, entry.alg, entry.state, &bytes).map_err(key_error)?);
        }
        KeySet::build(keys, Some(fingerprint.finish())).map_err(manifest_error)
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
    /// A file of the directory; not with `source = "pkcs11"`.
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
}

/// Where a key's private part is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Source {
    #[default]
    File,
    Pkcs11,
}

/// A key of a PKCS#11 token, as a manifest entry names it.
fn load_hsm_key(entry: &ManifestKey) -> Result<SigningKey, String> {
    if entry.file.is_some() {
        return Err("a pkcs11 key has no `file`: name it with `label` or `id`".to_owned());
    }
    if entry.label.is_none() && entry.id.is_none() {
        return Err("a pkcs11 key needs `label` or `id`".to_owned());
    }
    let locator = pkcs11::Locator {
        label: entry.label.clone(),
        id: entry.id.as_deref().map(pkcs11::parse_id).transpose()?,
        token: entry.token.clone(),
    };
    let sessions = entry.sessions.unwrap_or(pkcs11::DEFAULT_SESSIONS);
    if !(1..=64).contains(&sessions) {
        return Err("`sessions` must be 1 to 64".to_owned());
    }
    let loaded = pkcs11::HsmKey::load(locator, entry.alg, sessions)?;
    SigningKey::hsm(entry.kid.clone(), entry.alg, entry.state, loaded)
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
    pub fn from_dir(dir: PathBuf) -> Result<Keys, KeyError> {
        Ok(Keys::new(KeySet::load_dir(&dir)?, Some(dir)))
    }

    fn new(set: KeySet, dir: Option<PathBuf>) -> Keys {
        Keys {
            current: ArcSwap::from_pointee(set),
            dir,
            generation: AtomicU64::new(0),
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

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the directory again and swaps the new set in. A set that does not load is
    /// refused: the one in use stays, and the error is kept for [`Keys::health_detail`].
    pub fn reload(&self) -> Result<Reloaded, KeyError> {
        let Some(dir) = &self.dir else {
            return Ok(Reloaded::Unchanged);
        };
        let loaded = KeySet::load_dir(dir);
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

    fn load_error(manifest: &str, files: &[(&str, &str)]) -> String {
        let dir = write_dir(manifest, files);
        KeySet::load_dir(dir.path()).unwrap_err().to_string()
    }

    const SECRET_FILE: &str = "0123456789abcdef0123456789abcdef\n";

    #[test]
    fn a_keys_directory_loads_and_its_errors_say_what_is_wrong() {
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
        let set = KeySet::load_dir(dir.path()).unwrap();
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
        ] {
            let err = load_error(&manifest, files);
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(!err.contains("0123456789abcdef"), "{err}");
        }
    }

    #[test]
    fn a_refused_reload_keeps_the_key_set_in_use() {
        let dir = write_dir(
            "[[key]]\nkid = \"a\"\nalg = \"HS256\"\nfile = \"s\"\nstate = \"active\"\n",
            &[("s", SECRET_FILE)],
        );
        let keys = Keys::from_dir(dir.path().to_owned()).unwrap();
        assert_eq!(keys.reload().unwrap(), Reloaded::Unchanged);
        std::fs::write(dir.path().join("s"), "short").unwrap();
        assert!(keys.reload().is_err());
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
        assert_eq!(keys.reload().unwrap(), Reloaded::Changed);
        assert_eq!(keys.generation(), 1);
        assert!(!keys.health_detail().contains("refused"));
    }
}
