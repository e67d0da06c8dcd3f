//! TOTP (RFC 6238) as authenticator apps compute it: HMAC-SHA-1 over the 30-second time step,
//! dynamic truncation (RFC 4226), six digits. The HMAC is aws-lc's, the crypto the rest of
//! the sidecar uses.

use aws_lc_rs::{constant_time, hmac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// What the URI escapes: everything but RFC 3986's unreserved characters.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Seconds per time step.
pub const PERIOD: u64 = 30;

/// Digits of a code.
pub const DIGITS: usize = 6;

/// Bytes of a new secret: 160 bits, as RFC 4226 recommends for HMAC-SHA-1.
pub const SECRET_LEN: usize = 20;

/// The code of `secret` for time step `step`.
pub fn code(secret: &[u8], step: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = (mac[mac.len() - 1] & 0x0f) as usize;
    let value = u32::from_be_bytes([
        mac[offset],
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]) & 0x7fff_ffff;
    format!(
        "{:0width$}",
        value % 10u32.pow(DIGITS as u32),
        width = DIGITS
    )
}

/// The time step of `unix_seconds`.
pub fn step_at(unix_seconds: u64) -> u64 {
    unix_seconds / PERIOD
}

/// The time step whose code `candidate` is, looking one step either side of `now_step` (a
/// clock that is a little off, a code typed as it changed); `None` when it is none of them.
/// Every candidate step is compared, in constant time, whatever matched.
pub fn matching_step(secret: &[u8], candidate: &str, now_step: u64) -> Option<u64> {
    let mut found = None;
    for step in [now_step.saturating_sub(1), now_step, now_step + 1] {
        let expected = code(secret, step);
        if constant_time::verify_slices_are_equal(expected.as_bytes(), candidate.as_bytes()).is_ok()
            && found.is_none()
        {
            found = Some(step);
        }
    }
    found
}

/// The secret as apps take it typed in: base32 without padding.
pub fn base32(secret: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(secret)
}

/// The `otpauth://` URI of a QR code (Google Authenticator's key URI format): label
/// `ISSUER:ACCOUNT`, and every parameter spelled out, so that apps that assume defaults and
/// apps that do not read the same.
pub fn uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let issuer = utf8_percent_encode(issuer, ESCAPED).to_string();
    let account = utf8_percent_encode(account, ESCAPED);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={PERIOD}",
        base32(secret)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows (the last six of the eight digits).
    #[test]
    fn codes_match_rfc_6238() {
        let secret = b"12345678901234567890";
        for (time, expected) in [
            (59, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
            (20000000000, "65353130"),
        ] {
            assert_eq!(code(secret, step_at(time)), expected[2..], "at {time}");
        }
    }

    #[test]
    fn a_code_matches_one_step_either_side_and_no_further() {
        let secret = b"12345678901234567890";
        let now = 1_000_000;
        for delta in [-1i64, 0, 1] {
            let step = (now as i64 + delta) as u64;
            assert_eq!(matching_step(secret, &code(secret, step), now), Some(step));
        }
        for far in [now - 2, now + 2] {
            let c = code(secret, far);
            let near: Vec<String> = (now - 1..=now + 1).map(|s| code(secret, s)).collect();
            if !near.contains(&c) {
                assert_eq!(matching_step(secret, &c, now), None);
            }
        }
    }

    #[test]
    fn the_uri_names_every_parameter() {
        let uri = uri("Acme Corp", "alice@example.com", b"12345678901234567890");
        assert_eq!(
            uri,
            "otpauth://totp/Acme%20Corp:alice%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Acme%20Corp&algorithm=SHA1&digits=6&period=30"
        );
    }
}
