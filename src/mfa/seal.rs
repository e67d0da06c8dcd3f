//! Encryption at rest for second factors. A TOTP secret is sealed with AES-256-GCM under the
//! current MFA key, with the subject as associated data (a sealed secret copied to another
//! subject's record does not open), as `KID.BASE64URL(nonce ‖ ciphertext ‖ tag)`; the key id
//! says which key opens it, so keys can be rotated: a new key first, the old ones after it
//! until nothing sealed under them is left. Backup codes are kept as HMAC-SHA-256 hashes under
//! a key derived from the same MFA key, so that a copy of the store cannot even try codes
//! without it.
//!
//! The keys come from `AUTH_MFA_KEY` or `mfa.keys` in the keys directory: entries separated
//! by commas or new lines, each `KID:BASE64` of 32 random bytes (`openssl rand -base64 32`),
//! or the base64 alone (its key id is then derived from it). The first entry seals.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

/// Bytes of an MFA key.
pub const KEY_LEN: usize = 32;

/// What binds a sealed secret to its use and subject.
const CONTEXT: &[u8] = b"auth-sidecar mfa totp secret\0";

/// What the backup-code key is derived under.
const BACKUP_CONTEXT: &[u8] = b"auth-sidecar mfa backup codes";

struct SealKey {
    kid: String,
    aead: LessSafeKey,
    backup: hmac::Key,
}

/// The MFA keys: the first seals, every one opens.
pub struct Sealer {
    keys: Vec<SealKey>,
}

/// Shows the key ids only.
impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a sealed value did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("sealed under MFA key `{0}`, which this node does not have")]
    UnknownKey(String),
    #[error("a sealed MFA secret does not open: another subject's, or altered")]
    Corrupt,
}

impl Sealer {
    /// Keys as `AUTH_MFA_KEY` gives them (see the module's header).
    pub fn parse(text: &str) -> Result<Sealer, String> {
        let mut keys: Vec<SealKey> = Vec::new();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (kid, material) = match entry.split_once(':') {
                Some((kid, material)) => (Some(kid.trim()), material.trim()),
                None => (None, entry),
            };
            let bytes = [STANDARD, URL_SAFE, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(material).ok())
                .ok_or("an entry is not base64 (give KID:BASE64 of 32 random bytes)")?;
            if bytes.len() != KEY_LEN {
                return Err(format!(
                    "an entry holds {} bytes; an MFA key is {KEY_LEN} random bytes",
                    bytes.len()
                ));
            }
            let kid = match kid {
                Some(kid) => {
                    if kid.is_empty()
                        || kid.len() > 32
                        || !kid
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(format!(
                            "key id `{kid}`: 1 to 32 letters, digits, `-` or `_`"
                        ));
                    }
                    kid.to_owned()
                }
                None => derived_kid(&bytes),
            };
            if keys.iter().any(|k| k.kid == kid) {
                return Err(format!("key id `{kid}` is given twice"));
            }
            keys.push(SealKey::new(kid, &bytes));
        }
        if keys.is_empty() {
            return Err("no key given".to_owned());
        }
        Ok(Sealer { keys })
    }

    /// A random key of this process alone: memory storage, whose records die with it.
    pub fn ephemeral() -> Sealer {
        let bytes = random::<KEY_LEN>();
        Sealer {
            keys: vec![SealKey::new("ephemeral".to_owned(), &bytes)],
        }
    }

    /// The key ids, the sealing one first.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// Seals `plain`, bound to `subject`, under the current key.
    pub fn seal(&self, subject: &str, plain: &[u8]) -> String {
        let key = &self.keys[0];
        let nonce = random::<NONCE_LEN>();
        let mut data = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(subject)),
                &mut data,
            )
            .expect("AES-GCM seals any length a secret has");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{}.{}", key.kid, URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens what [`Sealer::seal`] sealed for `subject`.
    pub fn open(&self, subject: &str, sealed: &str) -> Result<Vec<u8>, OpenError> {
        let (kid, body) = sealed.rsplit_once('.').ok_or(OpenError::Corrupt)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| OpenError::UnknownKey(kid.to_owned()))?;
        let mut data = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Corrupt)?;
        if data.len() < NONCE_LEN {
            return Err(OpenError::Corrupt);
        }
        let mut ciphertext = data.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&data).map_err(|_| OpenError::Corrupt)?;
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(aad(subject)), &mut ciphertext)
            .map_err(|_| OpenError::Corrupt)?;
        Ok(plain.to_vec())
    }

    /// Whether `sealed` was sealed under the current key.
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed
            .rsplit_once('.')
            .is_some_and(|(kid, _)| kid == self.keys[0].kid)
    }

    /// The hash a backup code of `subject` is stored as, under the current key.
    pub fn backup_hash(&self, subject: &str, code: &str) -> String {
        backup_hash(&self.keys[0], subject, code)
    }

    /// The hashes `code` may be stored under: one per key, so that codes made before a
    /// rotation still work.
    pub fn backup_candidates(&self, subject: &str, code: &str) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| backup_hash(k, subject, code))
            .collect()
    }
}

impl Sealer {
    /// What another node compares its own key `kid` with, to learn whether the two are the
    /// same key and nothing else: an HMAC, under a key derived from this one, of a context and
    /// the publishing node's `nonce`. `None` for a kid this node does not have.
    pub fn fingerprint(&self, kid: &str, nonce: &[u8]) -> Option<String> {
        let key = self.keys.iter().find(|k| k.kid == kid)?;
        let mut ctx = hmac::Context::with_key(&key.backup);
        ctx.update(b"auth-sidecar mfa key fingerprint\0");
        ctx.update(nonce);
        Some(URL_SAFE_NO_PAD.encode(ctx.sign()))
    }

    /// Whether `fingerprint`, published with `nonce` by another node for `kid`, is of this
    /// node's key `kid` (in constant time); `None` when this node has no such key.
    pub fn same_key(&self, kid: &str, nonce: &[u8], fingerprint: &str) -> Option<bool> {
        let mine = self.fingerprint(kid, nonce)?;
        Some(
            aws_lc_rs::constant_time::verify_slices_are_equal(
                mine.as_bytes(),
                fingerprint.as_bytes(),
            )
            .is_ok(),
        )
    }
}

impl SealKey {
    fn new(kid: String, bytes: &[u8]) -> SealKey {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, bytes), BACKUP_CONTEXT);
        SealKey {
            kid,
            aead: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"),
            ),
            backup: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }
}

fn backup_hash(key: &SealKey, subject: &str, code: &str) -> String {
    let mut ctx = hmac::Context::with_key(&key.backup);
    ctx.update(&(subject.len() as u64).to_be_bytes());
    ctx.update(subject.as_bytes());
    ctx.update(code.as_bytes());
    format!("{}.{}", key.kid, URL_SAFE_NO_PAD.encode(ctx.sign()))
}

fn aad(subject: &str) -> Vec<u8> {
    [CONTEXT, subject.as_bytes()].concat()
}

/// A key id derived from the key: eight hex digits of a SHA-256 of it, which says nothing
/// useful about the key.
fn derived_kid(bytes: &[u8]) -> String {
    let d = digest::digest(
        &digest::SHA256,
        &[b"auth-sidecar mfa kid\0", bytes].concat(),
    );
    d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Random bytes from the system's source.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes).expect("the system random source works");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    #[test]
    fn a_sealed_secret_opens_for_its_subject_only() {
        let s = Sealer::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed = s.seal("alice", b"secret");
        assert!(sealed.starts_with("k1."));
        assert!(!sealed.contains("secret"));
        assert_eq!(s.open("alice", &sealed).unwrap(), b"secret");
        assert_eq!(s.open("bob", &sealed), Err(OpenError::Corrupt));
        let mut altered = sealed.clone();
        altered.pop();
        altered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(s.open("alice", &altered), Err(OpenError::Corrupt));
        assert_ne!(
            s.seal("alice", b"secret"),
            sealed,
            "a fresh nonce each time"
        );
    }

    #[test]
    fn keys_rotate_by_id() {
        let old = Sealer::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed = old.seal("alice", b"secret");
        let both = Sealer::parse(&format!("k2:{},k1:{}", key(2), key(1))).unwrap();
        assert_eq!(both.open("alice", &sealed).unwrap(), b"secret");
        assert!(both.seal("alice", b"x").starts_with("k2."));
        let new = Sealer::parse(&format!("k2:{}", key(2))).unwrap();
        assert_eq!(
            new.open("alice", &sealed),
            Err(OpenError::UnknownKey("k1".into()))
        );
        assert_eq!(
            both.backup_candidates("alice", "abc")[1],
            old.backup_hash("alice", "abc")
        );
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert!(Sealer::parse("").unwrap_err().contains("no key"));
        assert!(
            Sealer::parse("k:not base64!")
                .unwrap_err()
                .contains("base64")
        );
        assert!(
            Sealer::parse(&STANDARD.encode([1u8; 16]))
                .unwrap_err()
                .contains("16 bytes")
        );
        assert!(
            Sealer::parse(&format!("a.b:{}", key(1)))
                .unwrap_err()
                .contains("key id")
        );
        let twice = format!("k:{},k:{}", key(1), key(2));
        assert!(Sealer::parse(&twice).unwrap_err().contains("twice"));
        let bare = Sealer::parse(&key(3)).unwrap();
        assert_eq!(bare.kids().next().unwrap().len(), 8);
    }
}
