//! The GCRA step: the specification the memory store runs and the Redis script
//! (`store/redis/rate_limit.lua`) and the SQL function (`store/postgres/functions.sql`)
//! restate. A key's whole state is one instant, its theoretical arrival time (TAT), plus a
//! lockout deadline. Pure: time is an argument.

use std::time::Duration;

/// The parameters a store needs, in microseconds (the unit the Redis and SQL versions use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval: microseconds per unit.
    pub interval_us: i64,
    /// Burst: units admitted at once.
    pub burst: i64,
    pub lockout_us: i64,
}

/// A key's state: its theoretical arrival time and lockout deadline, in microseconds since
/// the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyState {
    pub tat_us: i64,
    pub locked_until_us: i64,
}

impl KeyState {
    /// When the state no longer matters (the allowance is full and no lockout is on).
    pub fn expires_us(&self) -> i64 {
        self.tat_us.max(self.locked_until_us)
    }
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// When denied: until a call of this cost would pass.
    pub retry_after: Duration,
    /// Until the key is back to its full allowance.
    pub reset_after: Duration,
}

impl Decision {
    /// A decision as the Redis script and the SQL function return it: microseconds.
    pub fn from_micros(
        allowed: bool,
        p: Gcra,
        remaining: i64,
        retry_us: i64,
        reset_us: i64,
    ) -> Decision {
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Decision {
            allowed,
            limit: p.burst as u32,
            remaining: remaining.clamp(0, p.burst) as u32,
            retry_after: us(retry_us),
            reset_after: us(reset_us),
        }
    }
}

/// One GCRA step. `cost == 0` peeks: it answers whether a call of cost 1 would pass and
/// changes nothing. Returns the decision and the state to store (None: leave it as it was).
pub fn gcra(state: KeyState, now_us: i64, p: Gcra, cost: i64) -> (Decision, Option<KeyState>) {
    let capacity_us = p.burst * p.interval_us;
    let tat = state.tat_us.max(now_us);
    let limit = p.burst as u32;
    let remaining_at =
        |tat_us: i64| ((now_us + capacity_us - tat_us) / p.interval_us).clamp(0, p.burst) as u32;
    let us = |v: i64| Duration::from_micros(v.max(0) as u64);
    if state.locked_until_us > now_us {
        let decision = Decision {
            allowed: false,
            limit,
            remaining: 0,
            retry_after: us(state.locked_until_us - now_us),
            reset_after: us(state.expires_us() - now_us),
        };
        return (decision, None);
    }
    let probe = cost.max(1);
    let new_tat = tat + probe * p.interval_us;
    let allow_at = new_tat - capacity_us;
    if now_us < allow_at {
        let locked_until = if p.lockout_us > 0 && cost > 0 {
            now_us + p.lockout_us
        } else {
            0
        };
        let retry_after = if locked_until > 0 {
            locked_until - now_us
        } else {
            allow_at - now_us
        };
        let stored = (locked_until > 0).then_some(KeyState {
            tat_us: state.tat_us,
            locked_until_us: locked_until,
        });
        let decision = Decision {
            allowed: false,
            limit,
            remaining: remaining_at(tat),
            retry_after: us(retry_after),
            reset_after: us(tat.max(locked_until) - now_us),
        };
        return (decision, stored);
    }
    if cost == 0 {
        let decision = Decision {
            allowed: true,
            limit,
            remaining: remaining_at(tat),
            retry_after: Duration::ZERO,
            reset_after: us(tat - now_us),
        };
        return (decision, None);
    }
    let decision = Decision {
        allowed: true,
        limit,
        remaining: remaining_at(new_tat),
        retry_after: Duration::ZERO,
        reset_after: us(new_tat - now_us),
    };
    (
        decision,
        Some(KeyState {
            tat_us: new_tat,
            locked_until_us: 0,
        }),
    )
}
