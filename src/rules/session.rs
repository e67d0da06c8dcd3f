//! The atomic steps of a session's life that backends restate: touch, end, and the logout of
//! its subject. Times are milliseconds since the epoch.

/// The times of a session that its steps read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimes {
    /// The absolute end; no step moves it.
    pub expires_ms: i64,
    pub last_seen_ms: i64,
    /// With an idle timeout: the end unless touched before. Never after `expires_ms`.
    pub idle_ms: Option<i64>,
}

impl SessionTimes {
    /// When the session stops counting: its idle deadline or its absolute end.
    pub fn live_until_ms(&self) -> i64 {
        self.idle_ms
            .map_or(self.expires_ms, |idle| idle.min(self.expires_ms))
    }

    pub fn is_live(&self, now_ms: i64) -> bool {
        self.live_until_ms() > now_ms
    }
}

/// A touch at `now_ms`: `None` when the session is not live then. Otherwise `last_seen` is
/// `now_ms` and, for a session that has an idle deadline and a touch that brings one, the
/// deadline moves to `idle_until_ms`, capped at the session's end. A session without an idle
/// deadline never gains one, and a touch without one keeps the deadline it has.
pub fn touch(s: SessionTimes, now_ms: i64, idle_until_ms: Option<i64>) -> Option<SessionTimes> {
    if !s.is_live(now_ms) {
        return None;
    }
    let idle_ms = match (s.idle_ms, idle_until_ms) {
        (Some(_), Some(until)) => Some(until.min(s.expires_ms)),
        (idle, _) => idle,
    };
    Some(SessionTimes {
        last_seen_ms: now_ms,
        idle_ms,
        ..s
    })
}

/// Ending a session at `now_ms` removes it whatever its state; the answer is whether it was
/// live, so that ending it a second time, or ending an expired one, answers false.
pub fn end(s: Option<SessionTimes>, now_ms: i64) -> bool {
    s.is_some_and(|s| s.is_live(now_ms))
}

/// A subject's logout cutoff as stored: tokens issued before `cutoff_ms` are revoked; the
/// record may go at `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoff {
    pub cutoff_ms: i64,
    pub until_ms: i64,
}

/// Whether a logout at `cutoff_ms` revokes a token whose login instant is `login_ms`: every
/// token of a login at or before the cutoff, so that one in the cutoff's own millisecond is
/// revoked too. (The logout returns only after its millisecond has passed, so a login after
/// it returns is later than the cutoff.)
pub fn cuts_off(cutoff_ms: i64, login_ms: i64) -> bool {
    cutoff_ms >= login_ms
}

/// A logout: the stored cutoff only rises and its record only lives longer, so a logout and
/// a copy of an older one, in either order, end at the newer.
pub fn raise(old: Option<Cutoff>, new: Cutoff) -> Cutoff {
    match old {
        None => new,
        Some(old) => Cutoff {
            cutoff_ms: old.cutoff_ms.max(new.cutoff_ms),
            until_ms: old.until_ms.max(new.until_ms),
        },
    }
}

/// How many of a subject's sessions a logout at `now_ms` ends: the live ones. (Every session
/// of the subject is removed; those already over are not counted.)
pub fn ended_by_logout(sessions: impl IntoIterator<Item = SessionTimes>, now_ms: i64) -> u32 {
    sessions.into_iter().filter(|s| s.is_live(now_ms)).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: SessionTimes = SessionTimes {
        expires_ms: 1_000,
        last_seen_ms: 0,
        idle_ms: Some(100),
    };

    #[test]
    fn a_touch_moves_the_idle_deadline_but_never_past_the_end() {
        let t = touch(IDLE, 50, Some(150)).unwrap();
        assert_eq!((t.last_seen_ms, t.idle_ms), (50, Some(150)));
        assert_eq!(touch(t, 60, Some(5_000)).unwrap().idle_ms, Some(1_000));
        assert_eq!(touch(t, 60, None).unwrap().idle_ms, Some(150), "kept");
        assert_eq!(touch(IDLE, 100, Some(200)), None, "idle deadline passed");
    }

    #[test]
    fn without_an_idle_deadline_a_touch_adds_none() {
        let s = SessionTimes {
            idle_ms: None,
            ..IDLE
        };
        assert_eq!(touch(s, 10, Some(20)).unwrap().idle_ms, None);
        assert_eq!(touch(s, 1_000, None), None, "past its end");
    }

    #[test]
    fn a_cutoff_only_rises() {
        let a = Cutoff {
            cutoff_ms: 10,
            until_ms: 100,
        };
        let b = Cutoff {
            cutoff_ms: 5,
            until_ms: 200,
        };
        assert_eq!(
            raise(Some(a), b),
            Cutoff {
                cutoff_ms: 10,
                until_ms: 200
            }
        );
        assert_eq!(raise(Some(b), a), raise(Some(a), b));
    }
}
