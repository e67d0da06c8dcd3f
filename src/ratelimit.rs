//! Rate limits: named policies and the generic cell rate algorithm (GCRA), the algorithm of
//! redis-cell and the `governor` crate. A key's whole state is one instant, its theoretical
//! arrival time (TAT), plus a lockout deadline: O(1), smooth, with no double burst at a window
//! edge, and it expires by itself.
//!
//! The arithmetic is written here once, as [`gcra`]; the memory store runs it directly, and
//! the Redis script and the PostgreSQL function restate it where they must run atomically
//! (the tests hold all of them to the same behaviour).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use crate::rules::gcra::{Decision, Gcra, KeyState, gcra};
use crate::store::{Store, StoreError};

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// A named policy: `COUNT/PERIOD[:burst=B][:lockout=D]`, for example `login=5/1m:lockout=15m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Calls admitted per period, on average.
    pub count: u32,
    pub period: Duration,
    /// Calls admitted at once from a full allowance; `count` unless given.
    pub burst: u32,
    /// How long a key stays locked after its first denied call; zero for no lockout.
    pub lockout: Duration,
}

impl Policy {
    /// The time one unit of allowance takes to come back.
    pub fn emission_interval(&self) -> Duration {
        self.period / self.count
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(spec: &str) -> Result<Policy, String> {
        let bad = |why: &str| {
            format!("rate limit `{spec}`: {why} (form: NAME=COUNT/PERIOD[:burst=B][:lockout=D])")
        };
        let (name, rest) = spec.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad("the name must be letters, digits, `-`, `_` or `.`"));
        }
        let mut parts = rest.split(':');
        let rate = parts.next().unwrap_or_default();
        let (count, period) = rate.split_once('/').ok_or_else(|| bad("no COUNT/PERIOD"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad("COUNT must be a whole number"))?;
        let period = crate::units::parse_duration(period.trim()).map_err(|e| bad(&e))?;
        if count == 0 || period.is_zero() {
            return Err(bad("COUNT and PERIOD must be greater than zero"));
        }
        if period / count < Duration::from_micros(1) {
            return Err(bad("more than one call per microsecond cannot be counted"));
        }
        let mut policy = Policy {
            name: name.to_owned(),
            count,
            period,
            burst: count,
            lockout: Duration::ZERO,
        };
        for option in parts {
            match option.split_once('=') {
                Some(("burst", b)) => {
                    policy.burst = b
                        .parse()
                        .ok()
                        .filter(|b| *b > 0)
                        .ok_or_else(|| bad("burst must be a whole number above zero"))?;
                }
                Some(("lockout", d)) => {
                    policy.lockout = crate::units::parse_duration(d).map_err(|e| bad(&e))?;
                }
                _ => return Err(bad(&format!("unknown option `{option}`"))),
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}/{}:burst={}",
            self.name,
            self.count,
            humantime::format_duration(self.period),
            self.burst
        )?;
        if !self.lockout.is_zero() {
            write!(f, ":lockout={}", humantime::format_duration(self.lockout))?;
        }
        Ok(())
    }
}

impl From<&Policy> for Gcra {
    fn from(p: &Policy) -> Gcra {
        Gcra {
            interval_us: p.emission_interval().as_micros() as i64,
            burst: p.burst as i64,
            lockout_us: p.lockout.as_micros() as i64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("policy: no policy named `{0}`")]
    UnknownPolicy(String),
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The configured policies over the store.
pub struct RateLimiter {
    policies: HashMap<String, (Policy, Gcra)>,
    store: Arc<dyn Store>,
}

impl RateLimiter {
    pub fn new(policies: &[Policy], store: Arc<dyn Store>) -> RateLimiter {
        RateLimiter {
            policies: policies
                .iter()
                .map(|p| (p.name.clone(), (p.clone(), Gcra::from(p))))
                .collect(),
            store,
        }
    }

    fn policy(&self, name: &str, key: &str) -> Result<&(Policy, Gcra), Error> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidArgument {
                field: "key",
                reason: format!("must be 1 to {MAX_KEY_LEN} bytes"),
            });
        }
        self.policies
            .get(name)
            .ok_or_else(|| Error::UnknownPolicy(name.to_owned()))
    }

    /// The policy a call of `cost` units against `key` under `policy` is counted by, or why
    /// it cannot be counted; nothing is counted.
    pub fn admit(&self, policy: &str, key: &str, cost: u32) -> Result<&Policy, Error> {
        Ok(&self.admitted(policy, key, cost)?.0)
    }

    fn admitted(&self, policy: &str, key: &str, cost: u32) -> Result<&(Policy, Gcra), Error> {
        let admitted = self.policy(policy, key)?;
        let p = &admitted.0;
        if cost > p.burst {
            return Err(Error::InvalidArgument {
                field: "cost",
                reason: format!(
                    "{cost} is more than policy `{}` admits at once (burst {}), so it could never pass",
                    p.name, p.burst
                ),
            });
        }
        Ok(admitted)
    }

    /// Counts a call of `cost` units (0 peeks) against `key` under `policy`.
    pub async fn check(&self, policy: &str, key: &str, cost: u32) -> Result<Decision, Error> {
        let (p, gcra) = self.admitted(policy, key, cost)?;
        Ok(self
            .store
            .rate_limit(&p.name, key, *gcra, cost, None)
            .await?)
    }

    /// Clears `key` under `policy`: full allowance, no lockout.
    pub async fn reset(&self, policy: &str, key: &str) -> Result<(), Error> {
        let (p, _) = self.policy(policy, key)?;
        Ok(self.store.reset_rate_limit(&p.name, key).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> Gcra {
        Gcra::from(&spec.parse::<Policy>().unwrap())
    }

    /// Runs `cost` at `now` (seconds), keeping state like a store would.
    fn step(state: &mut KeyState, p: Gcra, now_s: f64, cost: i64) -> Decision {
        let (d, new) = gcra(*state, (now_s * 1e6) as i64, p, cost);
        if let Some(new) = new {
            *state = new;
        }
        d
    }

    #[test]
    fn admits_the_burst_then_one_per_interval_and_not_before() {
        let p = policy("api=10/1s");
        let mut s = KeyState::default();
        let t0 = 1_000.0;
        for i in 0..10 {
            let d = step(&mut s, p, t0, 1);
            assert!(d.allowed, "call {i}");
            assert_eq!(d.remaining, 9 - i);
        }
        let denied = step(&mut s, p, t0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert!(
            !step(&mut s, p, t0 + 0.099, 1).allowed,
            "before PERIOD/COUNT"
        );
        assert!(step(&mut s, p, t0 + 0.100, 1).allowed, "at PERIOD/COUNT");
        assert!(!step(&mut s, p, t0 + 0.100, 1).allowed);
        // No double burst at a window edge: a full period later, exactly the burst again.
        let later = t0 + 2.0;
        let allowed = (0..30)
            .filter(|_| step(&mut s, p, later, 1).allowed)
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn cost_zero_peeks_without_consuming() {
        let p = policy("api=2/1s");
        let mut s = KeyState::default();
        for _ in 0..5 {
            assert!(step(&mut s, p, 10.0, 0).allowed);
        }
        assert_eq!(s, KeyState::default());
        assert!(step(&mut s, p, 10.0, 1).allowed);
        assert!(step(&mut s, p, 10.0, 1).allowed);
        assert!(
            !step(&mut s, p, 10.0, 0).allowed,
            "peek says the next call would fail"
        );
    }

    #[test]
    fn lockout_starts_at_the_first_denial_and_ends_after_its_duration() {
        let p = policy("login=2/1m:lockout=15m");
        let mut s = KeyState::default();
        assert!(step(&mut s, p, 0.0, 1).allowed);
        assert!(step(&mut s, p, 0.0, 1).allowed);
        let denied = step(&mut s, p, 0.0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(15 * 60));
        // Well after the rate would have let a call through, the lockout still holds.
        let still = step(&mut s, p, 600.0, 1);
        assert!(!still.allowed);
        assert_eq!(still.retry_after, Duration::from_secs(300));
        assert!(step(&mut s, p, 900.0, 1).allowed);
    }

    #[test]
    fn policies_parse_and_bad_ones_are_named() {
        let p: Policy = "api=100/1s:burst=20".parse().unwrap();
        assert_eq!(
            (p.count, p.burst, p.period),
            (100, 20, Duration::from_secs(1))
        );
        let p: Policy = "login=5/1m:lockout=15m".parse().unwrap();
        assert_eq!(p.lockout, Duration::from_secs(900));
        for bad in [
            "login",
            "login=5",
            "login=0/1m",
            "login=5/1x",
            "login=5/1m:burst=0",
            "x y=1/1s",
            "a=1/1s:foo=1",
        ] {
            let err = bad.parse::<Policy>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
