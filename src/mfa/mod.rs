//! Second factors for the application's users: TOTP enrollment in two steps (begin, then
//! confirm with a code, on any nodes), replay-proof verification, and one-time backup codes.
//!
//! What is stored where (every backend the same; tiered keeps it in PostgreSQL):
//! - a pending enrollment: the secret sealed (`seal`), its end; gone when confirmed or ended;
//! - an enrolled secret, sealed, with when it was enrolled and the last time step accepted;
//! - backup codes as keyed hashes only.
//!
//! Each change is one atomic step of the store, so the nodes need no coordination: a code's
//! time step is accepted only if it is later than the last one accepted (RFC 6238 §5.2: a
//! code is used once), a pending enrollment is confirmed once, a backup code is spent once.
//! Confirm and verify attempts count per subject against `--mfa-verify-limit`, on the store.

pub mod seal;
pub mod totp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::ratelimit::{self, Policy, RateLimiter};
use crate::store::{MfaRecord, StepAccept, Store, StoreError};
use seal::{OpenError, Sealer};

/// Backup codes made at a time.
pub const BACKUP_CODES: usize = 10;

/// Characters of a backup code, without the dash: 50 random bits.
const BACKUP_CODE_LEN: usize = 10;

/// Crockford's base32 in lower case: no i, l, o or u to misread.
const BACKUP_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Longest subject, as for tokens.
const MAX_SUBJECT_LEN: usize = 1024;

/// Longest account label, in characters.
const MAX_LABEL_LEN: usize = 256;

/// The name MFA attempts are counted under: not a name a configured policy can have (`:`),
/// so no app can read or reset it through CheckRateLimit.
pub const VERIFY_POLICY: &str = "auth-sidecar:mfa-verify";

/// MFA's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The issuer authenticator apps show.
    pub issuer: String,
    pub enrollment_ttl: Duration,
    /// Confirm and verify attempts per subject, counted under [`VERIFY_POLICY`].
    pub verify_limit: Policy,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// MFA cannot be used on this node, or the subject is not in the state the call needs.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A code that does not match a pending enrollment.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("too many MFA attempts for this subject; retry after {}s", .0.as_secs().max(1))]
    Limited(Duration),
    /// A sealed secret that this node cannot open.
    #[error(transparent)]
    Sealed(#[from] OpenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ratelimit::Error> for Error {
    fn from(e: ratelimit::Error) -> Error {
        match e {
            ratelimit::Error::Store(e) => Error::Store(e),
            other => unreachable!("the MFA policy is configured and its key is short: {other}"),
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// A new pending enrollment, for the user's app.
#[derive(Debug)]
pub struct Begun {
    /// Base32, for typing in.
    pub secret: String,
    pub uri: String,
    pub expires_at: SystemTime,
}

/// What a code was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    WrongCode,
    Replayed,
    NotEnrolled,
}

/// A subject's second factor, as GetMfaStatus reports it.
#[derive(Debug, Default)]
pub struct Status {
    pub enrolled_at: Option<SystemTime>,
    pub backup_codes: u32,
    pub pending_until: Option<SystemTime>,
}

pub struct Mfa {
    store: Arc<dyn Store>,
    /// `Err`: MFA is off on this node, for this reason.
    sealer: Result<Sealer, String>,
    settings: Settings,
    attempts: RateLimiter,
    clock: Arc<dyn Clock>,
}

impl Mfa {
    pub fn new(
        store: Arc<dyn Store>,
        sealer: Result<Sealer, String>,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Mfa {
        Mfa {
            attempts: RateLimiter::new(std::slice::from_ref(&settings.verify_limit), store.clone()),
            store,
            sealer,
            settings,
            clock,
        }
    }

    /// Why MFA is off on this node, if it is.
    pub fn off_reason(&self) -> Option<&str> {
        self.sealer.as_ref().err().map(String::as_str)
    }

    fn sealer(&self) -> Result<&Sealer, Error> {
        self.sealer
            .as_ref()
            .map_err(|reason| Error::FailedPrecondition(reason.clone()))
    }

    pub async fn begin(&self, subject: &str, account_label: &str) -> Result<Begun, Error> {
        let sealer = self.sealer()?;
        check_subject(subject)?;
        let account = account(subject, account_label)?;
        let secret = seal::random::<{ totp::SECRET_LEN }>();
        let expires_at = self.clock.now() + self.settings.enrollment_ttl;
        self.store
            .mfa_begin(subject, &sealer.seal(subject, &secret), expires_at)
            .await?;
        Ok(Begun {
            secret: totp::base32(&secret),
            uri: totp::uri(&self.settings.issuer, account, &secret),
            expires_at,
        })
    }

    /// Enrolls the pending secret if `code` is its code now; the new backup codes.
    pub async fn confirm(&self, subject: &str, code: &str) -> Result<Vec<String>, Error> {
        let sealer = self.sealer()?;
        check_subject(subject)?;
        check_totp(code)?;
        let now = self.clock.now();
        let record = self.counted_read(subject, now).await?;
        let Some((pending, _)) = record.pending else {
            return Err(Error::FailedPrecondition(
                "no enrollment is pending for this subject (none begun, ended after \
                 --mfa-enrollment-ttl, or confirmed already): begin one"
                    .to_owned(),
            ));
        };
        let secret = sealer.open(subject, &pending)?;
        let Some(step) = totp::matching_step(&secret, code, step_at(now)) else {
            return Err(Error::Unauthenticated(
                "code: not the pending secret's code at this time".to_owned(),
            ));
        };
        let (codes, hashes) = backup_codes(sealer, subject);
        // Confirming accepts a code: a secret sealed under an older MFA key (the enrollment
        // began on a node that had not yet rotated) is sealed again now, as `verify` does.
        let reseal = (!sealer.is_current(&pending)).then(|| sealer.seal(subject, &secret));
        if !self
            .store
            .mfa_confirm(
                subject,
                &pending,
                reseal.as_deref(),
                step as i64,
                &hashes,
                now,
            )
            .await?
        {
            return Err(Error::FailedPrecondition(
                "the pending enrollment was confirmed, replaced or ended meanwhile".to_owned(),
            ));
        }
        self.clear_attempts(subject).await;
        Ok(codes)
    }

    pub async fn verify(&self, subject: &str, code: &str) -> Result<Verdict, Error> {
        let sealer = self.sealer()?;
        check_subject(subject)?;
        check_totp(code)?;
        let now = self.clock.now();
        let Some(enrolled) = self.counted_read(subject, now).await?.enrolled else {
            return Ok(Verdict::NotEnrolled);
        };
        let secret = sealer.open(subject, &enrolled.secret)?;
        let Some(step) = totp::matching_step(&secret, code, step_at(now)) else {
            return Ok(Verdict::WrongCode);
        };
        // A secret sealed under an older MFA key is sealed again under the current one by
        // the step that accepts its code, so that the old key can go once users have signed in.
        let reseal = (!sealer.is_current(&enrolled.secret)).then(|| sealer.seal(subject, &secret));
        // The store alone judges a replay, in one atomic step: a check here, before it,
        // would only race with the other nodes.
        Ok(
            match self
                .store
                .mfa_accept(subject, &enrolled.secret, step as i64, reseal.as_deref())
                .await?
            {
                StepAccept::Accepted => {
                    self.clear_attempts(subject).await;
                    Verdict::Valid
                }
                StepAccept::Replayed => Verdict::Replayed,
                StepAccept::NotEnrolled => Verdict::NotEnrolled,
            },
        )
    }

    /// Spends a backup code: the verdict and how many are left.
    pub async fn verify_backup(&self, subject: &str, code: &str) -> Result<(Verdict, u32), Error> {
        let sealer = self.sealer()?;
        check_subject(subject)?;
        let code = normalize_backup(code)?;
        self.attempt(subject).await?;
        let candidates = sealer.backup_candidates(subject, &code);
        if let Some(left) = self.store.mfa_spend_backup(subject, &candidates).await? {
            self.clear_attempts(subject).await;
            return Ok((Verdict::Valid, left));
        }
        let record = self.store.mfa_get(subject, self.clock.now()).await?;
        Ok(match record.enrolled {
            Some(e) => (Verdict::WrongCode, e.backup_codes),
            None => (Verdict::NotEnrolled, 0),
        })
    }

    pub async fn status(&self, subject: &str) -> Result<Status, Error> {
        self.sealer()?;
        check_subject(subject)?;
        let record = self.store.mfa_get(subject, self.clock.now()).await?;
        Ok(Status {
            enrolled_at: record.enrolled.as_ref().map(|e| e.enrolled_at),
            backup_codes: record.enrolled.map_or(0, |e| e.backup_codes),
            pending_until: record.pending.map(|(_, until)| until),
        })
    }

    /// Whether there was anything to remove.
    pub async fn disable(&self, subject: &str) -> Result<bool, Error> {
        self.sealer()?;
        check_subject(subject)?;
        Ok(self.store.mfa_disable(subject, self.clock.now()).await?)
    }

    pub async fn regenerate_backup_codes(&self, subject: &str) -> Result<Vec<String>, Error> {
        let sealer = self.sealer()?;
        check_subject(subject)?;
        let (codes, hashes) = backup_codes(sealer, subject);
        if !self.store.mfa_set_backup(subject, &hashes).await? {
            return Err(Error::FailedPrecondition(
                "the subject has no enrolled secret: enroll first".to_owned(),
            ));
        }
        Ok(codes)
    }

    /// Counts an attempt and reads the record, together (both go out before either answer
    /// comes back); the code is looked at only once the attempt is admitted.
    async fn counted_read(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, Error> {
        let (attempt, record) =
            tokio::join!(self.attempt(subject), self.store.mfa_get(subject, now));
        attempt?;
        Ok(record?)
    }

    /// Counts an attempt of `subject`, before its code is looked at: past the policy's
    /// allowance every attempt fails, right or wrong, on every node.
    async fn attempt(&self, subject: &str) -> Result<(), Error> {
        let decision = self
            .attempts
            .check(VERIFY_POLICY, &attempt_key(subject), 1)
            .await?;
        if decision.allowed {
            Ok(())
        } else {
            crate::telemetry::record_lockout("mfa_verify");
            Err(Error::Limited(decision.retry_after))
        }
    }

    /// A code was right: the count starts again. A failure here must not undo the answer
    /// (the code is spent), so it is only logged.
    async fn clear_attempts(&self, subject: &str) {
        if let Err(e) = self
            .attempts
            .reset(VERIFY_POLICY, &attempt_key(subject))
            .await
        {
            tracing::warn!(error = %e, "MFA: clearing the attempt count failed");
        }
    }
}

/// The rate-limit key of a subject's attempts: a digest, as a subject may be longer than a
/// key may be.
fn attempt_key(subject: &str) -> String {
    use base64::Engine;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, subject.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

fn step_at(now: SystemTime) -> u64 {
    totp::step_at(
        now.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
}

fn check_subject(subject: &str) -> Result<(), Error> {
    if subject.is_empty() {
        return Err(invalid("subject", "is required"));
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(invalid(
            "subject",
            format!(
                "is {} bytes, over the {MAX_SUBJECT_LEN}-byte limit",
                subject.len()
            ),
        ));
    }
    if subject.contains('\0') {
        return Err(invalid("subject", "must not contain NUL (U+0000)"));
    }
    Ok(())
}

/// The account name the app shows: the label, or the subject when none is given.
/// The Unicode bidirectional formatting characters (UAX #9): embeddings, overrides,
/// isolates and marks. Each can make a label show as another.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

fn account<'a>(subject: &'a str, label: &'a str) -> Result<&'a str, Error> {
    let (field, name) = if label.is_empty() {
        ("subject", subject)
    } else {
        ("account_label", label)
    };
    if name.chars().count() > MAX_LABEL_LEN {
        let reason = if label.is_empty() {
            format!(
                "is longer than an account label may be ({MAX_LABEL_LEN} characters): give an \
                 account_label"
            )
        } else {
            format!("must be at most {MAX_LABEL_LEN} characters")
        };
        return Err(invalid(field, reason));
    }
    if name.contains(':') || name.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        let reason = if label.is_empty() {
            "holds `:`, a control character or a bidirectional control, which an otpauth \
             label cannot: give an account_label"
                .to_owned()
        } else {
            "must not contain `:` (the otpauth label's separator), control characters, or \
             bidirectional controls (U+202E and its kin reorder what an authenticator shows)"
                .to_owned()
        };
        return Err(invalid(field, reason));
    }
    Ok(name)
}

fn check_totp(code: &str) -> Result<(), Error> {
    if code.len() != totp::DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("code", format!("must be {} digits", totp::DIGITS)));
    }
    Ok(())
}

/// A backup code as typed, made canonical: lower case, without spaces and dashes.
fn normalize_backup(code: &str) -> Result<String, Error> {
    let bad = || {
        invalid(
            "code",
            format!("must be a backup code: {BACKUP_CODE_LEN} letters and digits, as xxxxx-xxxxx"),
        )
    };
    if code.len() > 64 {
        return Err(bad());
    }
    let code: String = code
        .chars()
        .filter(|c| *c != '-' && *c != ' ')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if code.len() != BACKUP_CODE_LEN || !code.bytes().all(|b| BACKUP_ALPHABET.contains(&b)) {
        return Err(bad());
    }
    Ok(code)
}

/// New backup codes, as shown (xxxxx-xxxxx), and their hashes, as stored.
fn backup_codes(sealer: &Sealer, subject: &str) -> (Vec<String>, Vec<String>) {
    (0..BACKUP_CODES)
        .map(|_| {
            let raw: String = seal::random::<BACKUP_CODE_LEN>()
                .iter()
                .map(|b| BACKUP_ALPHABET[(b & 31) as usize] as char)
                .collect();
            let hash = sealer.backup_hash(subject, &raw);
            (format!("{}-{}", &raw[..5], &raw[5..]), hash)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_codes_are_normalized_and_checked() {
        assert_eq!(normalize_backup("AB12C-DE34F").unwrap(), "ab12cde34f");
        assert_eq!(normalize_backup(" ab12c de34f ").unwrap(), "ab12cde34f");
        for bad in [
            "",
            "ab12c-de34",
            "ab12c-de34fg",
            "ab12c-de34i",
            "ab12c-dé34f",
        ] {
            assert!(normalize_backup(bad).is_err(), "{bad:?}");
        }
        let sealer = Sealer::ephemeral();
        let (codes, hashes) = backup_codes(&sealer, "alice");
        assert_eq!(codes.len(), BACKUP_CODES);
        for (code, hash) in codes.iter().zip(&hashes) {
            let canonical = normalize_backup(code).unwrap();
            assert_eq!(&sealer.backup_hash("alice", &canonical), hash);
            assert!(!hash.contains(&canonical));
        }
    }

    #[test]
    fn totp_codes_are_six_digits() {
        assert!(check_totp("012345").is_ok());
        for bad in ["", "12345", "1234567", "12345a", "١٢٣٤٥٦"] {
            assert!(check_totp(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_account_label_cannot_break_the_uri() {
        assert_eq!(account("alice", "").unwrap(), "alice");
        assert_eq!(account("u:1", "alice@x").unwrap(), "alice@x");
        assert!(matches!(
            account("u:1", ""),
            Err(Error::InvalidArgument {
                field: "subject",
                ..
            })
        ));
        assert!(matches!(
            account("u", "a:b"),
            Err(Error::InvalidArgument {
                field: "account_label",
                ..
            })
        ));
        assert!(account("u", &"x".repeat(257)).is_err());
        // A right-to-left override (U+202E) would make the label show reordered.
        for bidi in ['\u{202E}', '\u{2066}', '\u{200F}', '\u{061C}'] {
            assert!(account("u", &format!("alice{bidi}x")).is_err(), "{bidi:?}");
        }
    }
}
