//! A subject's second factor, step by step: the decisions the memory store runs and the Redis
//! script (`store/redis/mfa.lua`) and the SQL statements (`store/postgres/mod.rs`, `mfa_*`)
//! restate. Secrets arrive sealed and backup codes hashed: nothing here sees either in clear.
//! Times are milliseconds since the epoch on the caller's clock.

/// What every backend keeps for one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MfaState {
    /// A pending enrollment: its sealed secret and end.
    pub pending: Option<(String, i64)>,
    pub enrolled: Option<Enrolled>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub secret: String,
    pub enrolled_ms: i64,
    /// The last TOTP time step accepted.
    pub last_step: i64,
    /// Hashes of the backup codes left.
    pub backup: Vec<String>,
}

/// The answer of [`accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAccept {
    Accepted,
    /// The step, or a later one, was accepted before.
    Replayed,
    /// The secret checked is not (or no longer) the enrolled one.
    NotEnrolled,
}

impl MfaState {
    /// The pending enrollment, if it is live at `now_ms`.
    pub fn pending_at(&self, now_ms: i64) -> Option<&(String, i64)> {
        self.pending.as_ref().filter(|(_, until)| *until > now_ms)
    }

    /// Whether anything is left at `now_ms`: a record without it can be dropped.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.enrolled.is_some() || self.pending_at(now_ms).is_some()
    }
}

/// A new pending enrollment replaces a pending one; an enrolled secret stays in force.
pub fn begin(state: &mut MfaState, sealed: &str, until_ms: i64) {
    state.pending = Some((sealed.to_owned(), until_ms));
}

/// Only the pending enrollment holding `sealed`, live at `now_ms`, is enrolled: with `step`
/// accepted and `backup` as its codes. Whether it was. As [`accept`] does, the step that
/// accepts a code may store `reseal`, the same secret sealed under the current MFA key.
pub fn confirm(
    state: &mut MfaState,
    sealed: &str,
    reseal: Option<&str>,
    step: i64,
    backup: &[String],
    now_ms: i64,
) -> bool {
    if state.pending_at(now_ms).is_none_or(|(p, _)| p != sealed) {
        return false;
    }
    state.pending = None;
    state.enrolled = Some(Enrolled {
        secret: reseal.unwrap_or(sealed).to_owned(),
        enrolled_ms: now_ms,
        last_step: step,
        backup: backup.to_vec(),
    });
    true
}

/// A time step of the enrolled secret `sealed` is accepted once, and only after every step
/// accepted before (RFC 6238 §5.2). An accepted step may also replace the sealed secret with
/// `reseal`, the same secret sealed under the current MFA key.
pub fn accept(state: &mut MfaState, sealed: &str, step: i64, reseal: Option<&str>) -> StepAccept {
    match &mut state.enrolled {
        Some(e) if e.secret == sealed => {
            if step <= e.last_step {
                StepAccept::Replayed
            } else {
                e.last_step = step;
                if let Some(new) = reseal {
                    e.secret = new.to_owned();
                }
                StepAccept::Accepted
            }
        }
        _ => StepAccept::NotEnrolled,
    }
}

/// Spends whichever of `candidates` (one code's hashes) the enrolled subject holds: how many
/// are left, or `None` when it held none of them.
pub fn spend(state: &mut MfaState, candidates: &[String]) -> Option<u32> {
    let e = state.enrolled.as_mut()?;
    let before = e.backup.len();
    e.backup.retain(|c| !candidates.contains(c));
    (e.backup.len() < before).then_some(e.backup.len() as u32)
}

/// Replaces an enrolled subject's backup codes; false when none is enrolled.
pub fn set_backup(state: &mut MfaState, backup: &[String]) -> bool {
    match &mut state.enrolled {
        Some(e) => {
            e.backup = backup.to_vec();
            true
        }
        None => false,
    }
}

/// Forgets everything; whether anything live at `now_ms` was there.
pub fn disable(state: &mut MfaState, now_ms: i64) -> bool {
    let live = state.is_live(now_ms);
    *state = MfaState::default();
    live
}
