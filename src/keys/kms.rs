//! Signing keys in AWS KMS. The private key never leaves KMS: a token's signature is one KMS
//! `Sign` call over its signing input, or over the input's SHA-256 or SHA-384 digest when the
//! input is longer than the 4096 bytes KMS takes as a message. The public key comes from
//! `GetPublicKey` at load, is published in the JWKS like any other, and verifies in-process:
//! Validate never calls KMS.
//!
//! Credentials come from the AWS SDK's standard chain (the environment, a web identity token
//! such as EKS IRSA projects, EKS Pod Identity, an instance profile) and never from the
//! manifest or a flag; nothing here logs them. Calls are bounded: at most `max_in_flight`
//! `Sign` calls at once per key, and each signature has `timeout` for everything, waits for
//! a slot and retries included. A throttled or failed call is retried with full jitter while
//! the budget lasts; past it, Issue is UNAVAILABLE.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_lc_rs::digest;
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};

use super::{Alg, KeySource};

/// The source's name, in the manifest, metrics and logs.
const SOURCE: &str = "aws-kms";

/// `Sign` calls a key makes at once, unless its entry says `max_in_flight = N`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// Everything one signature may take, unless the entry says `timeout = "…"`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle node checks that the key still signs, unless the entry says
/// `probe_interval = "…"`. A node that signed successfully within it makes no extra call.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// The longest message KMS signs as it is (`MessageType=RAW`); a longer one is sent as its
/// digest.
const RAW_LIMIT: usize = 4096;

/// The first retry waits up to this long; each further one up to twice as long as the last.
const RETRY_BASE: Duration = Duration::from_millis(25);
/// The longest wait between two attempts.
const RETRY_CAP: Duration = Duration::from_millis(800);

/// What a manifest entry says about a KMS key.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// The key's region; unset, the SDK's chain (`AWS_REGION`, the profile) decides.
    pub region: Option<String>,
    /// Another endpoint than AWS's own: a VPC endpoint, FIPS, or an emulator.
    pub endpoint_url: Option<String>,
    pub max_in_flight: usize,
    pub timeout: Duration,
    pub probe_interval: Duration,
}

/// A key in AWS KMS, ready to sign.
pub struct KmsKey {
    client: Client,
    /// The key's ARN, as `GetPublicKey` resolved it: signatures name the key that was
    /// published, even if an alias is moved to another key later.
    arn: String,
    /// How the manifest named it.
    key_id: String,
    region: String,
    alg: Alg,
    permits: tokio::sync::Semaphore,
    max_in_flight: usize,
    timeout: Duration,
    probe_interval: Duration,
}

impl std::fmt::Debug for KmsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKey")
            .field("arn", &self.arn)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl KmsKey {
    /// Asks KMS for the key's public key and checks that the key signs with `alg`: its usage
    /// `SIGN_VERIFY`, its spec the curve or an RSA size `alg` takes. Returns the key and its
    /// public key (SubjectPublicKeyInfo DER).
    pub async fn load(settings: Settings, alg: Alg) -> Result<(KmsKey, Vec<u8>), String> {
        let (expected_specs, signing) = algorithm(alg).ok_or_else(|| {
            format!("{alg} keys cannot be in AWS KMS: use ES256, ES384, RS256 or PS256")
        })?;
        if let Some(url) = &settings.endpoint_url {
            check_endpoint(url)?;
        }
        if !(1..=256).contains(&settings.max_in_flight) {
            return Err("`max_in_flight` must be 1 to 256".to_owned());
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            // The retries are ours (see `sign`): counted, and inside the signature's budget.
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(settings.timeout)
                    .operation_attempt_timeout(settings.timeout)
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        let region = config.region().map(ToString::to_string).ok_or_else(|| {
            "an aws-kms key needs `region` (or AWS_REGION in the environment)".to_owned()
        })?;
        let client = Client::new(&config);
        let described = format!("AWS KMS key `{}` in {region}", settings.key_id);
        let out = client
            .get_public_key()
            .key_id(&settings.key_id)
            .send()
            .await
            .map_err(|e| format!("GetPublicKey of {described} failed: {}", error_text(&e)))?;
        let usage = out.key_usage().cloned();
        if usage != Some(KeyUsageType::SignVerify) {
            return Err(format!(
                "{described} is not a signing key: its usage is {}, not SIGN_VERIFY",
                usage.map_or_else(|| "unknown".to_owned(), |u| u.as_str().to_owned())
            ));
        }
        // KeySpec, or the field it replaced (which older emulators alone fill in).
        #[allow(deprecated)]
        let spec = out.key_spec().cloned().or_else(|| {
            out.customer_master_key_spec()
                .map(|s| KeySpec::from(s.as_str()))
        });
        if !spec.as_ref().is_some_and(|s| expected_specs.contains(s)) {
            let names: Vec<_> = expected_specs.iter().map(KeySpec::as_str).collect();
            return Err(format!(
                "{described} is a {} key; {alg} needs {}",
                spec.as_ref().map_or("key of unknown spec", KeySpec::as_str),
                names.join(" or ")
            ));
        }
        if !out.signing_algorithms().is_empty() && !out.signing_algorithms().contains(&signing) {
            return Err(format!(
                "{described} does not sign with {}",
                signing.as_str()
            ));
        }
        let spki = out
            .public_key()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| format!("GetPublicKey of {described} returned no public key"))?;
        let arn = out.key_id().unwrap_or(&settings.key_id).to_owned();
        Ok((
            KmsKey {
                client,
                arn,
                key_id: settings.key_id,
                region,
                alg,
                permits: tokio::sync::Semaphore::new(settings.max_in_flight),
                max_in_flight: settings.max_in_flight,
                timeout: settings.timeout,
                probe_interval: settings.probe_interval,
            },
            spki,
        ))
    }

    /// One `Sign` call over `message`, which is of `kind` (RAW or DIGEST); the signature as
    /// KMS returns it (DER for ECDSA).
    async fn call(&self, message: &[u8], kind: MessageType) -> Result<Vec<u8>, Attempt> {
        let (_, signing) = algorithm(self.alg).expect("checked at load");
        // Counted when it ends, as an error if the budget or the caller cuts it off.
        let counted = crate::telemetry::SignerCall::start(SOURCE);
        let out = self
            .client
            .sign()
            .key_id(&self.arn)
            .message(Blob::new(message))
            .message_type(kind)
            .signing_algorithm(signing)
            .send()
            .await;
        match out {
            Ok(out) => {
                counted.finish("ok");
                out.signature()
                    .map(|s| s.as_ref().to_vec())
                    .ok_or_else(|| Attempt::Failed("KMS returned no signature".to_owned()))
            }
            Err(e) => {
                let throttled = e.code() == Some("ThrottlingException");
                counted.finish(if throttled { "throttled" } else { "error" });
                let text = error_text(&e);
                Err(if throttled || retryable(&e) {
                    Attempt::Retry { throttled, text }
                } else {
                    Attempt::Failed(text)
                })
            }
        }
    }
}

/// How one `Sign` call went wrong.
enum Attempt {
    /// Throttled, a KMS-side failure (5xx), or the request did not get through: worth another
    /// try while the budget lasts.
    Retry { throttled: bool, text: String },
    /// Refused for good (access denied, key disabled): no retry helps.
    Failed(String),
}

#[async_trait]
impl KeySource for KmsKey {
    fn kind(&self) -> &'static str {
        SOURCE
    }

    fn describe(&self) -> String {
        if self.key_id == self.arn {
            format!("AWS KMS key {} ({})", self.arn, self.region)
        } else {
            format!(
                "AWS KMS key {} = {} ({})",
                self.key_id, self.arn, self.region
            )
        }
    }

    fn probe_interval(&self) -> Option<Duration> {
        Some(self.probe_interval)
    }

    /// Signs within `timeout`: a slot among `max_in_flight`, then `Sign`, retried with full
    /// jitter (a random wait up to 25 ms, 50 ms, … 800 ms) after a throttle or a transient
    /// failure, as long as the wait ends before the budget does.
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.timeout;
        let hash = match self.alg {
            Alg::ES384 => &digest::SHA384,
            _ => &digest::SHA256,
        };
        let digest;
        let (message, kind) = if message.len() <= RAW_LIMIT {
            (message, MessageType::Raw)
        } else {
            digest = digest::digest(hash, message);
            (digest.as_ref(), MessageType::Digest)
        };
        let mut ceiling = RETRY_BASE;
        let mut throttles = 0u32;
        loop {
            let attempt = {
                let permit = tokio::time::timeout_at(deadline.into(), self.permits.acquire())
                    .await
                    .map_err(|_| {
                        format!(
                            "no KMS signing slot within {:?}: {} signatures were in flight",
                            self.timeout, self.max_in_flight
                        )
                    })?
                    .map_err(|_| "the KMS key is closed".to_owned())?;
                // The attempt ends with the budget, whatever its own timeout: dropping it
                // cancels the request.
                let attempt =
                    tokio::time::timeout_at(deadline.into(), self.call(message, kind.clone()))
                        .await
                        .map_err(|_| format!("KMS did not sign within {:?}", self.timeout))?;
                drop(permit);
                attempt
            };
            let text = match attempt {
                Ok(signature) => return self.jose(signature),
                Err(Attempt::Failed(text)) => return Err(format!("KMS Sign failed: {text}")),
                Err(Attempt::Retry { throttled, text }) => {
                    throttles += u32::from(throttled);
                    text
                }
            };
            let wait = ceiling.mul_f64(crate::ids::random_fraction());
            if Instant::now() + wait >= deadline {
                return Err(if throttles > 0 {
                    format!(
                        "KMS throttled Sign {throttles} times within {:?}: {text}",
                        self.timeout
                    )
                } else {
                    format!("KMS Sign failed within {:?}: {text}", self.timeout)
                });
            }
            tokio::time::sleep(wait).await;
            ceiling = (ceiling * 2).min(RETRY_CAP);
        }
    }
}

impl KmsKey {
    /// The signature in JWS form: ECDSA's DER `SEQUENCE { r, s }` as r‖s of the curve's size.
    fn jose(&self, signature: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.alg {
            Alg::ES256 => der_to_fixed(&signature, 32),
            Alg::ES384 => der_to_fixed(&signature, 48),
            _ => Some(signature),
        }
        .ok_or_else(|| "KMS returned a malformed ECDSA signature".to_owned())
    }
}

/// The key specs `alg` signs with, and KMS's name for the algorithm.
fn algorithm(alg: Alg) -> Option<(&'static [KeySpec], SigningAlgorithmSpec)> {
    const RSA: &[KeySpec] = &[KeySpec::Rsa2048, KeySpec::Rsa3072, KeySpec::Rsa4096];
    Some(match alg {
        Alg::ES256 => (&[KeySpec::EccNistP256], SigningAlgorithmSpec::EcdsaSha256),
        Alg::ES384 => (&[KeySpec::EccNistP384], SigningAlgorithmSpec::EcdsaSha384),
        Alg::RS256 => (RSA, SigningAlgorithmSpec::RsassaPkcs1V15Sha256),
        Alg::PS256 => (RSA, SigningAlgorithmSpec::RsassaPssSha256),
        _ => return None,
    })
}

/// Whether a failed call may succeed if tried again: a KMS-side failure, or a request that
/// did not get an answer (a refused or reset connection, a timed-out attempt).
fn retryable<E, R>(error: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => true,
        SdkError::ServiceError(_) => matches!(
            error.code(),
            Some("KMSInternalException" | "DependencyTimeoutException" | "InternalFailure")
        ),
        _ => false,
    }
}

/// An SDK error with its causes, on one line: each cause's message, not its debug form (which
/// holds whole responses). No credential is in it: the SDK's errors name the chain's
/// providers and the service's message, never a key or token.
fn error_text<E, R>(error: &SdkError<E, R>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug + 'static,
{
    let mut parts = Vec::new();
    if let Some(service) = error.as_service_error() {
        parts.push(match (service.code(), service.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => service.to_string(),
        });
    } else {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            let text = e.to_string();
            if !text.is_empty() && parts.last() != Some(&text) {
                parts.push(text);
            }
            cause = e.source();
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// An endpoint must be an http(s) URL without a user or password in it: credentials come
/// from the chain, never from the manifest.
fn check_endpoint(url: &str) -> Result<(), String> {
    if url.contains('@') {
        return Err(
            "`endpoint_url` must not hold a user or password: credentials come from the AWS \
             chain"
                .to_owned(),
        );
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("`endpoint_url` `{url}` is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "`endpoint_url` `{url}` must be an http:// or https:// URL"
        ));
    }
    Ok(())
}

/// An ECDSA signature from its DER form (`SEQUENCE { INTEGER r, INTEGER s }`, as KMS and
/// X.509 give it) to JWS's r‖s, each left-padded to `size` bytes. `None` for anything else.
pub fn der_to_fixed(der: &[u8], size: usize) -> Option<Vec<u8>> {
    let (body, rest) = der_element(der, 0x30)?;
    if !rest.is_empty() {
        return None;
    }
    let (r, body) = der_element(body, 0x02)?;
    let (s, body) = der_element(body, 0x02)?;
    if !body.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(2 * size);
    for n in [r, s] {
        // A DER INTEGER is minimal and positive: one leading zero only before a high bit.
        let n = match n {
            [0, next, ..] if next & 0x80 != 0 => &n[1..],
            [first, ..] if first & 0x80 == 0 && (n.len() == 1 || *first != 0) => n,
            _ => return None,
        };
        if n.len() > size {
            return None;
        }
        out.resize(out.len() + size - n.len(), 0);
        out.extend_from_slice(n);
    }
    Some(out)
}

/// The body of the DER element of `tag` at the start of `input`, and what follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, input) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, input) = input.split_first()?;
    let (len, input) = match len {
        0..=0x7f => (len as usize, input),
        0x81 => {
            let (&len, input) = input.split_first()?;
            if len < 0x80 {
                return None;
            }
            (len as usize, input)
        }
        _ => return None,
    };
    (input.len() >= len).then(|| input.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self as sig, KeyPair as _};

    #[test]
    fn der_signatures_become_fixed_size_ones_that_verify() {
        let rng = SystemRandom::new();
        for (signing, fixed, size) in [
            (
                &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                &sig::ECDSA_P256_SHA256_FIXED,
                32,
            ),
            (
                &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
                &sig::ECDSA_P384_SHA384_FIXED,
                48,
            ),
        ] {
            let pair = sig::EcdsaKeyPair::generate(signing).unwrap();
            // Enough signatures that some r or s is short or has its high bit set.
            for i in 0..64u8 {
                let message = [i; 40];
                let der = pair.sign(&rng, &message).unwrap();
                let jose = der_to_fixed(der.as_ref(), size).unwrap();
                assert_eq!(jose.len(), 2 * size);
                sig::UnparsedPublicKey::new(fixed, pair.public_key().as_ref())
                    .verify(&message, &jose)
                    .unwrap();
            }
        }
    }

    #[test]
    fn malformed_der_signatures_are_refused() {
        let good = [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02];
        let mut expected = vec![0u8; 64];
        expected[31] = 1;
        expected[63] = 2;
        assert_eq!(der_to_fixed(&good, 32).unwrap(), expected);
        for bad in [
            &[][..],
            &[0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02],
            &[0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02],
            &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02, 0x00],
            &[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x02], // a needless zero
            &[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x02],       // negative
            &[0x30, 0x03, 0x02, 0x01, 0x01],                         // no s
        ] {
            assert_eq!(der_to_fixed(bad, 32), None, "{bad:02x?}");
        }
        let mut long = vec![0x30, 0x46, 0x02, 0x21, 0x01];
        long.extend([0u8; 32]);
        long.extend([0x02, 0x21, 0x01]);
        long.extend([0u8; 32]);
        assert_eq!(der_to_fixed(&long, 32), None, "33-byte r for P-256");
    }

    #[test]
    fn endpoints_hold_no_credentials() {
        assert!(check_endpoint("http://127.0.0.1:4566").is_ok());
        assert!(check_endpoint("https://kms.eu-west-1.amazonaws.com").is_ok());
        for bad in [
            "ftp://x",
            "kms.eu-west-1.amazonaws.com",
            "http://AKIA:secret@host",
        ] {
            let err = check_endpoint(bad).unwrap_err();
            assert!(!err.contains("secret"), "{err}");
        }
    }
}
