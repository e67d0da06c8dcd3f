//! Spending a refresh token: the decision the memory store runs and the Redis script
//! (`store/redis/rotate.lua`) and the SQL function (`store/postgres/functions.sql`) restate.

use std::time::SystemTime;

/// The tokens that replace a spent refresh token, remembered so that a retry within the
/// reuse grace period gets the same ones (same ids and issue time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Successor {
    pub refresh_id: String,
    pub access_id: String,
    pub issued_at_ms: i64,
}

/// What spending a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// It was the family's current token: the successor is current now.
    Rotated { family_ends: SystemTime },
    /// It was the token spent last, presented again within the grace period: here is the
    /// successor it got then.
    Replay {
        successor: Successor,
        family_ends: SystemTime,
    },
    /// It was spent before: the family is revoked now.
    Reused,
    /// The family is revoked, expired or unknown.
    Gone,
}

/// A family's rotation state, as every backend keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyState {
    pub current: String,
    pub previous: Option<String>,
    pub replay_until_ms: i64,
    pub successor: Option<Successor>,
    /// The token spent last was presented again after its grace period, and got its
    /// successor: the one retry of a client whose answer was lost is used.
    pub retried: bool,
    pub revoked: bool,
    pub expires_ms: i64,
}

impl FamilyState {
    /// A family whose first refresh token is `current`.
    pub fn new(current: String, expires_ms: i64) -> FamilyState {
        FamilyState {
            current,
            previous: None,
            replay_until_ms: 0,
            successor: None,
            retried: false,
            revoked: false,
            expires_ms,
        }
    }

    /// Whether tokens of the family are still good at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        !self.revoked && self.expires_ms > now_ms
    }
}

/// Spends `presented`: the current token rotates; the token spent last replays its successor
/// before `replay_until_ms` of its spend, and once more after that (the retry of a client
/// whose answer was lost: its successor is still unspent, or the token would not be the one
/// spent last); anything else revokes the family. A revoked or ended family is gone. A token
/// that was revoked (`presented_revoked`) never rotates or replays: the current one is gone,
/// and a spent one is a reuse, which revokes the family, as for any spent token presented
/// again. `state` is updated in place.
pub fn step(
    state: &mut FamilyState,
    presented: &str,
    presented_revoked: bool,
    successor: &Successor,
    now_ms: i64,
    replay_until_ms: i64,
) -> Rotation {
    if !state.is_live(now_ms) {
        return Rotation::Gone;
    }
    let family_ends = super::from_millis(state.expires_ms);
    if presented_revoked {
        if presented == state.current {
            return Rotation::Gone;
        }
        state.revoked = true;
        return Rotation::Reused;
    }
    if presented == state.current {
        state.previous = Some(std::mem::replace(
            &mut state.current,
            successor.refresh_id.clone(),
        ));
        state.successor = Some(successor.clone());
        state.replay_until_ms = replay_until_ms;
        state.retried = false;
        return Rotation::Rotated { family_ends };
    }
    if state.previous.as_deref() == Some(presented)
        && let Some(s) = &state.successor
        && (now_ms < state.replay_until_ms || !std::mem::replace(&mut state.retried, true))
    {
        return Rotation::Replay {
            successor: s.clone(),
            family_ends,
        };
    }
    state.revoked = true;
    Rotation::Reused
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn successor(n: u32) -> Successor {
        Successor {
            refresh_id: format!("r{n}"),
            access_id: format!("a{n}"),
            issued_at_ms: n as i64,
        }
    }

    fn family() -> FamilyState {
        FamilyState::new("r0".into(), 10_000)
    }

    #[test]
    fn a_refresh_token_rotates_once_then_replays_within_grace_then_revokes() {
        let mut f = family();
        let ends = UNIX_EPOCH + Duration::from_millis(10_000);
        assert_eq!(
            step(&mut f, "r0", false, &successor(1), 100, 200),
            Rotation::Rotated { family_ends: ends }
        );
        assert_eq!(f.current, "r1");
        // The spent token again, within grace: the same successor, not a new one.
        assert_eq!(
            step(&mut f, "r0", false, &successor(9), 150, 250),
            Rotation::Replay {
                successor: successor(1),
                family_ends: ends
            }
        );
        assert_eq!(f.current, "r1");
        // After the grace period: one retry more, then a reuse, and the family is gone for
        // everyone.
        assert!(matches!(
            step(&mut f, "r0", false, &successor(9), 200, 300),
            Rotation::Replay { .. }
        ));
        assert_eq!(
            step(&mut f, "r0", false, &successor(9), 201, 301),
            Rotation::Reused
        );
        assert_eq!(
            step(&mut f, "r1", false, &successor(2), 202, 302),
            Rotation::Gone
        );
    }

    #[test]
    fn an_older_token_or_an_ended_family_is_never_spent() {
        let mut f = family();
        step(&mut f, "r0", false, &successor(1), 100, 100);
        step(&mut f, "r1", false, &successor(2), 101, 101);
        // Two generations back is a reuse even within a grace period.
        let mut g = f.clone();
        g.replay_until_ms = i64::MAX;
        assert_eq!(
            step(&mut g, "r0", false, &successor(9), 102, 102),
            Rotation::Reused
        );
        assert!(g.revoked);
        assert_eq!(
            step(&mut f, "r2", false, &successor(3), 10_000, 10_000),
            Rotation::Gone
        );
    }
}
