//! Signing keys that never leave a PKCS#11 token (an HSM, a cloud KMS's PKCS#11 library,
//! SoftHSM2). The module is `CRYPTOKI_LIB`, loaded and initialised once per process; the user
//! PIN is `PKCS11_PIN` or the file `PKCS11_PIN_FILE` (a mounted Secret), never logged. A key
//! signs on a small pool of logged-in sessions (a session is not shared between threads),
//! through `spawn_blocking`; a session that fails is dropped and a new one opened next time.
//! The public key is read from the token at load; as for every [`KeySource`], the caller
//! publishes it and verifies every signature with it before it is used, so a token that signs
//! with another key makes Issue fail rather than mint tokens nobody can verify. Here it also
//! tells a stale key handle. Verification stays in-process (aws-lc): no token round trip per
//! Validate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use aws_lc_rs::digest;
use aws_lc_rs::signature::ParsedPublicKey;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{Alg, KeySource};

/// The environment variable naming the PKCS#11 module.
pub const MODULE_ENV: &str = "CRYPTOKI_LIB";
/// The environment variables holding the user PIN, or naming a file that does.
pub const PIN_ENV: &str = "PKCS11_PIN";
pub const PIN_FILE_ENV: &str = "PKCS11_PIN_FILE";

/// Sessions a key signs on at once, unless its manifest entry says `sessions = N`.
pub const DEFAULT_SESSIONS: usize = 4;

/// Where a key is: its label or id, and optionally the label of the token holding it.
#[derive(Debug, Clone)]
pub struct Locator {
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
    pub token: Option<String>,
}

impl Locator {
    /// How the key is named in messages: `label "x"` or `id 0a0b`, and the token.
    pub fn describe(&self) -> String {
        let name = match (&self.label, &self.id) {
            (Some(label), _) => format!("label `{label}`"),
            (None, Some(id)) => format!("id `{}`", hex(id)),
            (None, None) => "no label or id".to_owned(),
        };
        match &self.token {
            Some(token) => format!("{name} in token `{token}`"),
            None => name,
        }
    }

    fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &self.label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }
}

/// A private key in a token, and the sessions it signs on.
pub struct HsmKey(Arc<Inner>);

struct Inner {
    pkcs11: Pkcs11,
    slot: Slot,
    locator: Locator,
    alg: Alg,
    pin: AuthPin,
    /// Idle logged-in sessions, with the private key's handle in each.
    idle: Mutex<Vec<(Session, ObjectHandle)>>,
    /// At most this many signatures at once.
    permits: tokio::sync::Semaphore,
    /// The public key, which tells a handle that signs with another key.
    public: ParsedPublicKey,
}

impl std::fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmKey")
            .field("key", &self.0.locator.describe())
            .field("alg", &self.0.alg)
            .finish_non_exhaustive()
    }
}

/// The module of `CRYPTOKI_LIB`, loaded and initialised once per process (a module must not
/// be initialised twice).
fn module() -> Result<Pkcs11, String> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let path = std::env::var_os(MODULE_ENV).filter(|p| !p.is_empty()).ok_or_else(|| {
        format!("a pkcs11 key needs {MODULE_ENV}, the path of the PKCS#11 module (such as /usr/lib/softhsm/libsofthsm2.so)")
    })?;
    let path = PathBuf::from(path);
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pkcs11) = modules.get(&path) {
        return Ok(pkcs11.clone());
    }
    let pkcs11 = Pkcs11::new(&path)
        .map_err(|e| format!("cannot load the PKCS#11 module {}: {e}", path.display()))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "cannot initialise the PKCS#11 module {}: {e}",
                path.display()
            ));
        }
    }
    modules.insert(path, pkcs11.clone());
    Ok(pkcs11)
}

/// The user PIN: `PKCS11_PIN`, or the first line of the file `PKCS11_PIN_FILE` names.
fn pin() -> Result<AuthPin, String> {
    if let Some(path) = std::env::var_os(PIN_FILE_ENV).filter(|p| !p.is_empty()) {
        let text = std::fs::read_to_string(Path::new(&path)).map_err(|e| {
            format!(
                "cannot read {PIN_FILE_ENV} {}: {e}",
                Path::new(&path).display()
            )
        })?;
        return Ok(AuthPin::from(
            text.lines().next().unwrap_or_default().to_owned(),
        ));
    }
    match std::env::var(PIN_ENV) {
        Ok(pin) if !pin.is_empty() => Ok(AuthPin::from(pin)),
        _ => Err(format!(
            "a pkcs11 key needs the token's user PIN in {PIN_ENV} or in a file named by {PIN_FILE_ENV}"
        )),
    }
}

/// The slot of the token labelled `token`, or the one token there is.
fn find_slot(pkcs11: &Pkcs11, token: Option<&str>) -> Result<Slot, String> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| format!("cannot list the PKCS#11 slots: {e}"))?;
    let mut labelled = Vec::new();
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| format!("cannot read a PKCS#11 token's information: {e}"))?;
        if !info.token_initialized() {
            continue;
        }
        labelled.push((slot, info.label().trim_end().to_owned()));
    }
    match token {
        Some(token) => labelled
            .iter()
            .find(|(_, label)| label == token)
            .map(|(slot, _)| *slot)
            .ok_or_else(|| {
                let names: Vec<_> = labelled.iter().map(|(_, l)| format!("`{l}`")).collect();
                format!(
                    "no PKCS#11 token labelled `{token}` (tokens: {})",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            }),
        None => match labelled.as_slice() {
            [(slot, _)] => Ok(*slot),
            [] => Err("the PKCS#11 module has no initialised token".to_owned()),
            several => Err(format!(
                "the PKCS#11 module has {} tokens: name one with `token = \"...\"`",
                several.len()
            )),
        },
    }
}

/// Opens a session on `slot` and logs the user in; a module that says the user is logged in
/// already (another session of this process did it) is fine. Signing sessions are read-only:
/// only `generate` writes to the token.
fn open_session(
    pkcs11: &Pkcs11,
    slot: Slot,
    pin: &AuthPin,
    writes: bool,
) -> Result<Session, String> {
    let session = if writes {
        pkcs11.open_rw_session(slot)
    } else {
        pkcs11.open_ro_session(slot)
    }
    .map_err(|e| format!("cannot open a PKCS#11 session: {e}"))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            Err("PKCS#11 login failed: the PIN is incorrect (CKR_PIN_INCORRECT)".to_owned())
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            Err("PKCS#11 login failed: the PIN is locked (CKR_PIN_LOCKED)".to_owned())
        }
        Err(e) => Err(format!("PKCS#11 login failed: {e}")),
    }
}

/// The one object of `class` the locator names.
fn find_one(
    session: &Session,
    locator: &Locator,
    class: ObjectClass,
) -> Result<ObjectHandle, String> {
    let what = if class == ObjectClass::PRIVATE_KEY {
        "private"
    } else {
        "public"
    };
    let found = session
        .find_objects(&locator.template(class))
        .map_err(|e| format!("cannot search the PKCS#11 token: {e}"))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "no {what} key with {} in the PKCS#11 token",
            locator.describe()
        )),
        many => Err(format!(
            "{} {what} keys with {}: give an `id` too",
            many.len(),
            locator.describe()
        )),
    }
}

impl HsmKey {
    /// Finds the key the locator names, checks that it is of `alg`'s type, and reads its
    /// public key (SubjectPublicKeyInfo DER): what `serve` and `keys check` do at load.
    pub fn load(locator: Locator, alg: Alg, sessions: usize) -> Result<(HsmKey, Vec<u8>), String> {
        if alg.is_hmac() {
            return Err(format!(
                "{alg} keys cannot be in a PKCS#11 token here: an HMAC secret verifies too, and \
                 Validate would need a token round trip per call; use ES256, ES384, EdDSA, RS256 \
                 or PS256"
            ));
        }
        let pkcs11 = module()?;
        let slot = find_slot(&pkcs11, locator.token.as_deref())?;
        let pin = pin()?;
        let session = open_session(&pkcs11, slot, &pin, false)?;
        let private = find_one(&session, &locator, ObjectClass::PRIVATE_KEY)?;
        let public = find_one(&session, &locator, ObjectClass::PUBLIC_KEY)?;
        let key_type = match session.get_attributes(private, &[AttributeType::KeyType]) {
            Ok(attrs) => attrs.into_iter().find_map(|a| match a {
                Attribute::KeyType(t) => Some(t),
                _ => None,
            }),
            Err(e) => return Err(format!("cannot read the key's type: {e}")),
        };
        let expected = match alg {
            Alg::ES256 | Alg::ES384 => KeyType::EC,
            Alg::EdDSA => KeyType::EC_EDWARDS,
            _ => KeyType::RSA,
        };
        if key_type != Some(expected) {
            return Err(format!(
                "the key with {} is not an {alg} key (its type is {})",
                locator.describe(),
                key_type.map_or_else(|| "unknown".to_owned(), |t| t.to_string())
            ));
        }
        let spki = public_spki(&session, public, alg)?;
        let public = ParsedPublicKey::new(alg.verification(), &spki)
            .map_err(|_| format!("the token's public key is not a valid {alg} key"))?;
        let key = Inner {
            pkcs11,
            slot,
            locator,
            alg,
            pin,
            idle: Mutex::new(vec![(session, private)]),
            permits: tokio::sync::Semaphore::new(sessions.max(1)),
            public,
        };
        Ok((HsmKey(Arc::new(key)), spki))
    }
}

impl Inner {
    /// One signature on an idle session, or on a new one, returned only when it verifies with
    /// `public`. A session that fails is dropped (closed), so the next call opens a fresh one.
    /// A key handle is trusted only while its signatures verify: a handle that is stale, or
    /// that now names another key (an object deleted, restored or given another id), is
    /// looked up again by the locator at once, and only a pair whose signature verified goes
    /// back to the pool. So the key signs again as soon as the token holds it again.
    fn sign_blocking(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let public = &self.public;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let (session, cached) = match idle {
            Some((session, handle)) => (session, Some(handle)),
            None => (
                open_session(&self.pkcs11, self.slot, &self.pin, false)?,
                None,
            ),
        };
        let (mechanism, data) = self.mechanism(message);
        let failed = |e: CkError| format!("PKCS#11 signing failed: {e}");
        let verifies = |signature: &[u8]| public.verify_sig(message, signature).is_ok();
        if let Some(handle) = cached {
            match session.sign(&mechanism, handle, &data) {
                Ok(signature) if verifies(&signature) => {
                    self.keep(session, handle);
                    return Ok(signature);
                }
                Ok(_)
                | Err(CkError::Pkcs11(
                    RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                    _,
                )) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        let handle = find_one(&session, &self.locator, ObjectClass::PRIVATE_KEY)?;
        let signature = session.sign(&mechanism, handle, &data).map_err(failed)?;
        if !verifies(&signature) {
            return Err(
                "the PKCS#11 token signed with another key than the one it published".to_owned(),
            );
        }
        self.keep(session, handle);
        Ok(signature)
    }

    /// Returns a session whose key handle just made a good signature to the pool.
    fn keep(&self, session: Session, handle: ObjectHandle) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((session, handle));
    }

    /// The mechanism and what it signs: ECDSA over the digest (CKM_ECDSA, whose r‖s output
    /// is JWS's form already), EdDSA and the RSA mechanisms over the message itself.
    fn mechanism(&self, message: &[u8]) -> (Mechanism<'static>, Vec<u8>) {
        match self.alg {
            Alg::ES256 => (
                Mechanism::Ecdsa,
                digest::digest(&digest::SHA256, message).as_ref().to_vec(),
            ),
            Alg::ES384 => (
                Mechanism::Ecdsa,
                digest::digest(&digest::SHA384, message).as_ref().to_vec(),
            ),
            Alg::EdDSA => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                message.to_vec(),
            ),
            Alg::PS256 => (
                Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                message.to_vec(),
            ),
            _ => (Mechanism::Sha256RsaPkcs, message.to_vec()),
        }
    }
}

#[async_trait]
impl KeySource for HsmKey {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn describe(&self) -> String {
        format!("PKCS#11 key with {}", self.0.locator.describe())
    }

    /// Signs in the token, off the async workers, on at most `sessions` sessions at once.
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let _permit = self
            .0
            .permits
            .acquire()
            .await
            .map_err(|_| "the PKCS#11 key is closed".to_owned())?;
        let (inner, message) = (self.0.clone(), message.to_vec());
        tokio::task::spawn_blocking(move || inner.sign_blocking(&message))
            .await
            .unwrap_or_else(|e| Err(format!("the PKCS#11 signing task failed: {e}")))
    }
}

/// The public key object's key as SubjectPublicKeyInfo DER: from `CKA_EC_POINT` (and the
/// curve of `CKA_EC_PARAMS`) or the RSA modulus and exponent.
fn public_spki(session: &Session, public: ObjectHandle, alg: Alg) -> Result<Vec<u8>, String> {
    let read = |types: &[AttributeType]| {
        session
            .get_attributes(public, types)
            .map_err(|e| format!("cannot read the public key from the token: {e}"))
    };
    match alg {
        Alg::ES256 | Alg::ES384 | Alg::EdDSA => {
            let attrs = read(&[AttributeType::EcParams, AttributeType::EcPoint])?;
            let (mut params, mut point) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::EcParams(p) => params = p,
                    Attribute::EcPoint(p) => point = p,
                    _ => {}
                }
            }
            // CKA_EC_POINT is a DER OCTET STRING holding the point (some modules give the
            // point bare).
            let point = match point.as_slice() {
                [0x04, len, rest @ ..] if *len as usize == rest.len() => rest.to_vec(),
                [0x04, 0x81, len, rest @ ..] if *len as usize == rest.len() => rest.to_vec(),
                _ => point,
            };
            let (prefix, curve_oid, size): (&[u8], &[u8], usize) = match alg {
                Alg::ES256 => (P256_SPKI, P256_OID, 65),
                Alg::ES384 => (P384_SPKI, P384_OID, 97),
                _ => (ED25519_SPKI, ED25519_OID, 32),
            };
            let curve_ok =
                params == curve_oid || (alg == Alg::EdDSA && params.starts_with(&[0x13])); // PrintableString "edwards25519"
            if !curve_ok || point.len() != size {
                return Err(format!(
                    "the public key is not on {alg}'s curve ({} bytes of point)",
                    point.len()
                ));
            }
            Ok([prefix, &point].concat())
        }
        _ => {
            let attrs = read(&[AttributeType::Modulus, AttributeType::PublicExponent])?;
            let (mut n, mut e) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => n = m,
                    Attribute::PublicExponent(x) => e = x,
                    _ => {}
                }
            }
            // aws-lc verifies RS256 and PS256 with keys of 2048 to 8192 bits only; a smaller key
            // would otherwise fail the load check as a pair that does not verify.
            let bits = rsa_bits(&n);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA key is {bits} bits, too small: {alg} keys need at least \
                     {MIN_RSA_BITS} bits"
                ));
            }
            let rsa_key = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
            let algorithm = hex_bytes("300d06092a864886f70d0101010500");
            let bits = der(0x03, &[&[0u8][..], &rsa_key].concat());
            Ok(der(0x30, &[algorithm, bits].concat()))
        }
    }
}

/// The smallest RSA modulus that signs here (RFC 7518 §3.3 asks for 2048 bits too).
const MIN_RSA_BITS: usize = 2048;

/// The size of a big-endian modulus in bits.
fn rsa_bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    n.first()
        .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize)
}

/// SubjectPublicKeyInfo prefixes, the point following.
const P256_SPKI: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];
const ED25519_SPKI: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// CKA_EC_PARAMS of each curve: the DER of its OID.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// A DER element of `tag` around `body`.
fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER of the unsigned big-endian `value`.
fn der_uint(value: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = value.iter().copied().skip_while(|b| *b == 0).collect();
    let mut body = if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        vec![0]
    } else {
        Vec::new()
    };
    body.extend(if trimmed.is_empty() { vec![0] } else { trimmed });
    der(0x02, &body)
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("a hex constant"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses an `id` as the manifest gives it: hex digits.
pub fn parse_id(text: &str) -> Result<Vec<u8>, String> {
    if text.is_empty()
        || !text.len().is_multiple_of(2)
        || !text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(format!("id `{text}` must be an even number of hex digits"));
    }
    Ok(hex_bytes(text))
}

/// Makes a key pair of `alg` in the token, the private key non-extractable and sensitive,
/// both labelled `label` with a random id; returns the id.
pub fn generate(alg: Alg, label: &str, token: Option<&str>) -> Result<Vec<u8>, String> {
    let pkcs11 = module()?;
    let slot = find_slot(&pkcs11, token)?;
    let session = open_session(&pkcs11, slot, &pin()?, true)?;
    let locator = Locator {
        label: Some(label.to_owned()),
        id: None,
        token: token.map(str::to_owned),
    };
    let existing = session
        .find_objects(&locator.template(ObjectClass::PRIVATE_KEY))
        .map_err(|e| format!("cannot search the PKCS#11 token: {e}"))?;
    if !existing.is_empty() {
        return Err(format!("the token holds a key labelled `{label}` already"));
    }
    let mut id = [0u8; 8];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| "no random source".to_owned())?;
    let common = |private: bool| {
        vec![
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Private(private),
        ]
    };
    // A signing key and nothing else: no decrypting, unwrapping or deriving with it.
    let mut public = common(false);
    public.extend([
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ]);
    let mut private = common(true);
    private.extend([
        Attribute::Sign(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    let mechanism = match alg {
        Alg::ES256 | Alg::ES384 => {
            public.push(Attribute::EcParams(
                if alg == Alg::ES256 {
                    P256_OID
                } else {
                    P384_OID
                }
                .to_vec(),
            ));
            Mechanism::EccKeyPairGen
        }
        Alg::EdDSA => {
            public.push(Attribute::EcParams(ED25519_OID.to_vec()));
            Mechanism::EccEdwardsKeyPairGen
        }
        Alg::RS256 | Alg::PS256 => {
            public.push(Attribute::ModulusBits(2048.into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            Mechanism::RsaPkcsKeyPairGen
        }
        _ => return Err(format!("{alg} keys are not made in a PKCS#11 token")),
    };
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(|e| format!("the token did not make the key pair: {e}"))?;
    Ok(id.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(
            der_uint(&[0x00, 0x01, 0x00, 0x01]),
            vec![0x02, 0x03, 0x01, 0x00, 0x01]
        );
        assert_eq!(der_uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_uint(&[]), vec![0x02, 0x01, 0x00]);
        let long = der(0x30, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x30, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn rsa_sizes_count_bits_not_bytes() {
        assert_eq!(rsa_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(rsa_bits(&[0x01, 0xff]), 9);
        assert_eq!(rsa_bits(&[0u8; 4]), 0);
        assert_eq!(rsa_bits(&[0xc0; 128]), 1024);
    }

    #[test]
    fn ids_are_hex() {
        assert_eq!(parse_id("0a0B").unwrap(), vec![0x0a, 0x0b]);
        for bad in ["", "abc", "zz"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
