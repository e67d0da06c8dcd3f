//! The specifications that backends restate. Each atomic step of shared state (a GCRA step, a
//! refresh rotation, a session touch or end, a logout, an MFA step) is written here once as a pure function
//! with explicit time; the memory store runs these functions, the Redis scripts and the SQL
//! functions restate them, and `tests/conformance.rs` holds every restatement to the same
//! trace table. Leaf modules: no I/O, no clock, nothing else of the crate.

pub mod gcra;
pub mod mfa;
pub mod rotation;
pub mod session;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The instant `ms` milliseconds after the epoch (the epoch itself for a negative value).
fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}
