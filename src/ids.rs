//! Identifiers the sidecar makes: token ids, session ids, family ids, refill tickets; and
//! the random fractions that jitter its waits.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Random bytes in an identifier.
const ID_BYTES: usize = 16;

/// An identifier of 128 random bits, base64url without padding (22 characters).
pub fn random_id() -> String {
    let mut bytes = [0u8; ID_BYTES];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    URL_SAFE_NO_PAD.encode(bytes)
}
/// A random fraction in [0, 1), to jitter a wait.
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// What a node id may be (`--node-id` is held to it, and a registry entry not of it is no
/// node): 1 to 128 characters, without control characters or `|`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(|c| c.is_control() || c == '|')
}
