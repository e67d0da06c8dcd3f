//! One table of traces for every atomic step that a backend restates (the GCRA step, a refresh
//! rotation, a session touch and end, a logout, MFA's enrollment, step and backup-code steps), with explicit times and expected answers. Each
//! trace runs against the pure rule in `src/rules/` and against every store: memory (which runs
//! the rule), Redis (the Lua scripts), PostgreSQL (the SQL functions) and tiered. So the
//! restatements answer the same, case by case, and cannot drift apart unnoticed.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_sidecar::clock::{Clock, ManualClock};
use auth_sidecar::config::Secret;
use auth_sidecar::rules::gcra::{Decision, Gcra, KeyState, gcra};
use auth_sidecar::rules::mfa::{self as mfa_rules, MfaState, StepAccept};
use auth_sidecar::rules::rotation::{self, FamilyState, Rotation, Successor};
use auth_sidecar::rules::session::{self, Cutoff, SessionTimes};
use auth_sidecar::store::{self, PostgresConfig, RedisConfig, Store, StoreConfig, TokenCheck};
use support::backends::{self, Storage};

/// Every trace starts here: late enough that no Redis key the traces write (expiring at
/// absolute instants after it) expires while the test runs.
const T: i64 = 4_000_000_000_000;

/// One step of a trace and the answer it must get. Times are milliseconds after [`T`].
#[derive(Debug, Clone)]
enum Step {
    /// A GCRA step at `at` ms with `cost`: (allowed, remaining, retry_after ms, reset_after ms).
    Rate {
        at: i64,
        cost: u32,
        expect: (bool, u32, i64, i64),
    },
    /// A family whose current token is `r0`, ending at `ends`.
    Family { ends: i64 },
    /// Spends refresh token `presented` (revoked by id when `revoked`) for successor `n` at
    /// `now`, replayable until `replay_until` (absolute: 0 is "no grace", as the domain passes
    /// it).
    Rotate {
        presented: &'static str,
        revoked: bool,
        n: u32,
        now: i64,
        replay_until: i64,
        expect: Expect,
    },
    /// A session of `subject` number `id`, created at 0, ending at `ends`, idle deadline `idle`.
    Session {
        id: usize,
        subject: &'static str,
        ends: i64,
        idle: Option<i64>,
    },
    /// Touches session `id` at `now`: the (last_seen, idle) it has then, or None.
    Touch {
        id: usize,
        now: i64,
        idle_until: Option<i64>,
        expect: Option<(i64, Option<i64>)>,
    },
    /// Ends session `id` at `now`: whether it was live.
    End { id: usize, now: i64, expect: bool },
    /// Whether session `id` is live at `now`.
    Live { id: usize, now: i64, expect: bool },
    /// Logs `subject` out at `cutoff`: how many live sessions ended.
    Logout {
        subject: &'static str,
        cutoff: i64,
        expect: u32,
    },
    /// Whether a token of `subject` issued at `issued` is cut off, asked at `now`.
    CutOff {
        subject: &'static str,
        issued: i64,
        now: i64,
        expect: bool,
    },
    /// Begins an MFA enrollment with sealed secret `sealed`, pending until `until`.
    MfaBegin { sealed: &'static str, until: i64 },
    /// Confirms the pending `sealed` at `now`, spending `step`, with backup code hashes
    /// `codes`, sealing it again as `reseal`: whether it enrolled.
    MfaConfirm {
        sealed: &'static str,
        reseal: Option<&'static str>,
        step: i64,
        codes: &'static [&'static str],
        now: i64,
        expect: bool,
    },
    /// Accepts time step `step` of the enrolled `sealed`, sealing it again as `reseal`.
    MfaAccept {
        sealed: &'static str,
        step: i64,
        reseal: Option<&'static str>,
        expect: StepAccept,
    },
    /// Spends one of `candidates`: the codes left, or none spent.
    MfaSpend {
        candidates: &'static [&'static str],
        expect: Option<u32>,
    },
    /// Replaces the backup codes: whether enrolled.
    MfaBackup {
        codes: &'static [&'static str],
        expect: bool,
    },
    /// Forgets everything at `now`: whether something live was there.
    MfaDisable { now: i64, expect: bool },
    /// What is kept at `now`: the pending sealed secret, and the enrolled one with its last
    /// step and codes left.
    MfaGet { now: i64, expect: MfaSeen },
}

/// An MFA record as the traces compare it.
type MfaSeen = (Option<&'static str>, Option<(&'static str, i64, u32)>);

/// A rotation's expected outcome, with family ends and successors by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Rotated,
    Replay(u32),
    Reused,
    Gone,
}

use Expect::*;
use Step::*;

/// The rate-limit policy of every rate trace: 100 ms per unit, a burst of 3 (or 2 with a 1 s
/// lockout for the lockout trace).
const SMOOTH: Gcra = Gcra {
    interval_us: 100_000,
    burst: 3,
    lockout_us: 0,
};
const LOCKING: Gcra = Gcra {
    interval_us: 100_000,
    burst: 2,
    lockout_us: 1_000_000,
};

fn traces() -> Vec<(&'static str, Gcra, Vec<Step>)> {
    let rate = |at, cost, expect| Rate { at, cost, expect };
    let rotate = |presented, n, now, replay_until, expect| Rotate {
        presented,
        revoked: false,
        n,
        now,
        replay_until,
        expect,
    };
    let touch = |id, now, idle_until, expect| Touch {
        id,
        now,
        idle_until,
        expect,
    };
    let session = |id, subject, ends, idle| Session {
        id,
        subject,
        ends,
        idle,
    };
    let end = |id, now, expect| End { id, now, expect };
    let live = |id, now, expect| Live { id, now, expect };
    let logout = |subject, cutoff, expect| Logout {
        subject,
        cutoff,
        expect,
    };
    let cut_off = |subject, issued, now, expect| CutOff {
        subject,
        issued,
        now,
        expect,
    };
    let begin = |sealed, until| MfaBegin { sealed, until };
    let confirm = |sealed, step, codes, now, expect| MfaConfirm {
        sealed,
        reseal: None,
        step,
        codes,
        now,
        expect,
    };
    let accept = |sealed, step, expect| MfaAccept {
        sealed,
        step,
        reseal: None,
        expect,
    };
    let reseal = |sealed, step, new, expect| MfaAccept {
        sealed,
        step,
        reseal: Some(new),
        expect,
    };
    let spend = |candidates, expect| MfaSpend { candidates, expect };
    let seen = |now, pending, enrolled| MfaGet {
        now,
        expect: (pending, enrolled),
    };
    vec![
        (
            "mfa: the one pending enrollment is confirmed once, while live",
            SMOOTH,
            vec![
                seen(0, None, None),
                begin("p1", 1_000),
                seen(0, Some("p1"), None),
                confirm("p0", 5, &["h1", "h2"], 10, false),
                begin("p2", 1_000),
                confirm("p1", 5, &["h1", "h2"], 10, false),
                confirm("p2", 5, &["h1", "h2", "h3"], 10, true),
                confirm("p2", 6, &["h4"], 11, false),
                seen(10, None, Some(("p2", 5, 3))),
                begin("p3", 100),
                seen(99, Some("p3"), Some(("p2", 5, 3))),
                seen(100, None, Some(("p2", 5, 3))),
                confirm("p3", 9, &[], 100, false),
                seen(100, None, Some(("p2", 5, 3))),
            ],
        ),
        (
            "mfa: a time step is accepted once, only after the last, for the enrolled secret",
            SMOOTH,
            vec![
                accept("s", 1, StepAccept::NotEnrolled),
                begin("s", 1_000),
                accept("s", 1, StepAccept::NotEnrolled),
                confirm("s", 5, &["a", "b"], 0, true),
                accept("s", 5, StepAccept::Replayed),
                accept("s", 4, StepAccept::Replayed),
                accept("s", 6, StepAccept::Accepted),
                accept("s", 6, StepAccept::Replayed),
                accept("x", 7, StepAccept::NotEnrolled),
                accept("s", 8, StepAccept::Accepted),
                seen(0, None, Some(("s", 8, 2))),
            ],
        ),
        (
            "mfa: an accepted step seals the secret again; a refused one does not",
            SMOOTH,
            vec![
                begin("pend", 1_000),
                MfaConfirm {
                    sealed: "pend",
                    reseal: Some("x"),
                    step: 5,
                    codes: &["a"],
                    now: 1_000,
                    expect: false,
                },
                seen(0, Some("pend"), None),
                MfaConfirm {
                    sealed: "pend",
                    reseal: Some("fresh"),
                    step: 5,
                    codes: &["a"],
                    now: 0,
                    expect: true,
                },
                seen(0, None, Some(("fresh", 5, 1))),
                accept("pend", 6, StepAccept::NotEnrolled),
                MfaDisable {
                    now: 0,
                    expect: true,
                },
                begin("old", 1_000),
                confirm("old", 5, &["a"], 0, true),
                reseal("old", 5, "x", StepAccept::Replayed),
                seen(0, None, Some(("old", 5, 1))),
                reseal("old", 6, "new", StepAccept::Accepted),
                seen(0, None, Some(("new", 6, 1))),
                accept("old", 7, StepAccept::NotEnrolled),
                accept("new", 7, StepAccept::Accepted),
            ],
        ),
        (
            "mfa: a backup code is spent once; new codes replace the old; disable forgets",
            SMOOTH,
            vec![
                spend(&["a"], None),
                MfaBackup {
                    codes: &["z"],
                    expect: false,
                },
                begin("s", 1_000),
                confirm("s", 5, &["a", "b", "c"], 0, true),
                spend(&["x", "b"], Some(2)),
                spend(&["b"], None),
                spend(&["a"], Some(1)),
                MfaBackup {
                    codes: &["d", "e"],
                    expect: true,
                },
                spend(&["c"], None),
                spend(&["e"], Some(1)),
                seen(0, None, Some(("s", 5, 1))),
                MfaDisable {
                    now: 0,
                    expect: true,
                },
                seen(0, None, None),
                MfaDisable {
                    now: 0,
                    expect: false,
                },
                accept("s", 9, StepAccept::NotEnrolled),
                begin("q", 100),
                MfaDisable {
                    now: 100,
                    expect: false,
                },
                begin("q", 100),
                MfaDisable {
                    now: 99,
                    expect: true,
                },
            ],
        ),
        (
            "gcra: the burst, then one per interval, peeks, a cost above the burst",
            SMOOTH,
            vec![
                rate(0, 1, (true, 2, 0, 100)),
                rate(0, 1, (true, 1, 0, 200)),
                rate(0, 1, (true, 0, 0, 300)),
                rate(0, 1, (false, 0, 100, 300)),
                rate(50, 1, (false, 0, 50, 250)),
                rate(100, 1, (true, 0, 0, 300)),
                rate(350, 0, (true, 2, 0, 50)),
                rate(350, 2, (true, 0, 0, 250)),
                rate(350, 5, (false, 0, 450, 250)),
                rate(2_000, 0, (true, 3, 0, 0)),
            ],
        ),
        (
            "gcra: a lockout starts at the first costly denial, a peek never locks",
            LOCKING,
            vec![
                rate(0, 1, (true, 1, 0, 100)),
                rate(0, 1, (true, 0, 0, 200)),
                rate(0, 0, (false, 0, 100, 200)),
                rate(0, 1, (false, 0, 1_000, 1_000)),
                rate(500, 1, (false, 0, 500, 500)),
                rate(500, 0, (false, 0, 500, 500)),
                rate(1_000, 1, (true, 1, 0, 100)),
            ],
        ),
        (
            "rotation: rotates, replays within grace, once after it, then a reuse revokes the family",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                rotate("r0", 1, 100, T + 200, Rotated),
                rotate("r0", 9, 150, T + 250, Replay(1)),
                rotate("r0", 9, 160, T + 250, Replay(1)),
                rotate("r0", 9, 200, T + 300, Replay(1)),
                rotate("r0", 9, 201, T + 300, Reused),
                rotate("r1", 2, 202, T + 302, Gone),
            ],
        ),
        (
            "rotation: zero grace replays once (a lost answer), the next retry is a reuse",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                rotate("r0", 1, 100, 0, Rotated),
                rotate("r0", 9, 100, 0, Replay(1)),
                rotate("r0", 9, 100, 0, Reused),
                rotate("r1", 2, 101, 0, Gone),
            ],
        ),
        (
            "rotation: a rotation renews the one retry; a retry after the next spend is a reuse",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                rotate("r0", 1, 100, 0, Rotated),
                rotate("r0", 9, 101, 0, Replay(1)),
                rotate("r1", 2, 102, 0, Rotated),
                rotate("r1", 9, 103, 0, Replay(2)),
                rotate("r0", 9, 104, 0, Reused),
                rotate("r2", 3, 105, 0, Gone),
            ],
        ),
        (
            "rotation: a revoked token never rotates; spent and presented again, it is a reuse",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                Rotate {
                    presented: "r0",
                    revoked: true,
                    n: 1,
                    now: 100,
                    replay_until: T + 5_000,
                    expect: Gone,
                },
                rotate("r0", 1, 101, T + 5_000, Rotated),
                Rotate {
                    presented: "r0",
                    revoked: true,
                    n: 9,
                    now: 102,
                    replay_until: T + 5_000,
                    expect: Reused,
                },
                rotate("r1", 2, 103, T + 5_000, Gone),
            ],
        ),
        (
            "rotation: an expired family is gone, by the caller's time",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                rotate("r0", 1, 10_000, T + 20_000, Gone),
                rotate("r0", 1, 9_999, T + 20_000, Rotated),
                rotate("r1", 2, 10_001, T + 20_000, Gone),
            ],
        ),
        (
            "rotation: two generations back is a reuse even within grace; unknown tokens too",
            SMOOTH,
            vec![
                Family { ends: 10_000 },
                rotate("r0", 1, 100, T + 5_000, Rotated),
                rotate("r1", 2, 101, T + 5_000, Rotated),
                rotate("r0", 9, 102, T + 5_000, Reused),
                rotate("r2", 3, 103, T + 5_000, Gone),
            ],
        ),
        (
            "session: a touch moves the idle deadline, capped at the end, and keeps it without one",
            SMOOTH,
            vec![
                session(0, "s1", 1_000, Some(100)),
                touch(0, 50, Some(150), Some((50, Some(150)))),
                touch(0, 60, Some(5_000), Some((60, Some(1_000)))),
                touch(0, 70, None, Some((70, Some(1_000)))),
                live(0, 999, true),
                touch(0, 1_000, Some(1_100), None),
                end(0, 1_000, false),
            ],
        ),
        (
            "session: without an idle timeout a touch adds none; an end is final",
            SMOOTH,
            vec![
                session(0, "s2", 1_000, None),
                touch(0, 10, Some(20), Some((10, None))),
                live(0, 500, true),
                end(0, 20, true),
                end(0, 21, false),
                touch(0, 22, None, None),
                live(0, 23, false),
            ],
        ),
        (
            "session: past its idle deadline a session is not touched, and ending it counts nothing",
            SMOOTH,
            vec![
                session(0, "s3", 1_000, Some(100)),
                touch(0, 100, Some(200), None),
                end(0, 100, false),
            ],
        ),
        (
            "logout: ends and counts the live sessions, spares others', the cutoff only rises",
            SMOOTH,
            vec![
                session(0, "s4", 1_000, None),
                session(1, "s4", 1_000, Some(100)),
                session(2, "s5", 1_000, None),
                logout("s4", 150, 1),
                live(0, 151, false),
                live(2, 151, true),
                cut_off("s4", 149, 200, true),
                cut_off("s4", 150, 200, true),
                cut_off("s4", 151, 200, false),
                cut_off("s5", 149, 200, false),
                logout("s4", 100, 0),
                cut_off("s4", 149, 200, true),
            ],
        ),
    ]
}

/// What a step answered, in one comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Rate(bool, u32, i64, i64),
    Rotation(Expect),
    Session(Option<(i64, Option<i64>)>),
    Bool(bool),
    Count(u32),
    Accept(StepAccept),
    Spent(Option<u32>),
    Mfa(Option<String>, Option<(String, i64, u32)>),
    Done,
}

fn expected(step: &Step) -> Answer {
    match step {
        Rate { expect: e, .. } => Answer::Rate(e.0, e.1, e.2, e.3),
        Rotate { expect, .. } => Answer::Rotation(*expect),
        Touch { expect, .. } => Answer::Session(*expect),
        End { expect, .. }
        | Live { expect, .. }
        | CutOff { expect, .. }
        | MfaConfirm { expect, .. }
        | MfaBackup { expect, .. }
        | MfaDisable { expect, .. } => Answer::Bool(*expect),
        Logout { expect, .. } => Answer::Count(*expect),
        MfaAccept { expect, .. } => Answer::Accept(*expect),
        MfaSpend { expect, .. } => Answer::Spent(*expect),
        MfaGet { expect, .. } => Answer::Mfa(
            expect.0.map(str::to_owned),
            expect.1.map(|(s, step, n)| (s.to_owned(), step, n)),
        ),
        Family { .. } | Session { .. } | MfaBegin { .. } => Answer::Done,
    }
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis((T + ms) as u64)
}

fn successor(n: u32) -> Successor {
    Successor {
        refresh_id: format!("r{n}"),
        access_id: format!("a{n}"),
        issued_at_ms: T + n as i64,
    }
}

fn decision(d: Decision) -> Answer {
    Answer::Rate(
        d.allowed,
        d.remaining,
        d.retry_after.as_millis() as i64,
        d.reset_after.as_millis() as i64,
    )
}

fn rotation_answer(r: Rotation, ends: i64) -> Answer {
    Answer::Rotation(match r {
        Rotation::Rotated { family_ends } => {
            assert_eq!(family_ends, at(ends));
            Rotated
        }
        Rotation::Replay {
            successor: s,
            family_ends,
        } => {
            assert_eq!(family_ends, at(ends));
            let n: u32 = s.refresh_id[1..].parse().unwrap();
            assert_eq!(s, successor(n));
            Replay(n)
        }
        Rotation::Reused => Reused,
        Rotation::Gone => Gone,
    })
}

/// The names one run of a trace uses, unique to that run.
struct Names {
    run: String,
    sessions: Vec<String>,
    family_ends: i64,
}

impl Names {
    fn new() -> Names {
        Names {
            run: format!("{}", support::now_nanos()),
            sessions: Vec::new(),
            family_ends: 0,
        }
    }

    fn subject(&self, s: &str) -> String {
        format!("{s}-{}", self.run)
    }
}

/// The pure rules, run directly: the specification itself.
#[derive(Default)]
struct Model {
    rate: KeyState,
    family: Option<FamilyState>,
    sessions: HashMap<usize, (String, SessionTimes)>,
    cutoffs: HashMap<&'static str, Cutoff>,
    mfa: MfaState,
}

impl Model {
    fn apply(&mut self, p: Gcra, step: &Step) -> Answer {
        match *step {
            Rate { at: t, cost, .. } => {
                let (d, new) = gcra(self.rate, (T + t) * 1000, p, cost as i64);
                if let Some(new) = new {
                    self.rate = new;
                }
                decision(d)
            }
            Family { ends } => {
                self.family = Some(FamilyState::new("r0".into(), T + ends));
                Answer::Done
            }
            Rotate {
                presented,
                revoked,
                n,
                now,
                replay_until,
                ..
            } => {
                let f = self.family.as_mut().unwrap();
                let ends = f.expires_ms - T;
                let r = rotation::step(f, presented, revoked, &successor(n), T + now, replay_until);
                rotation_answer(r, ends)
            }
            Session {
                id,
                subject,
                ends,
                idle,
            } => {
                let times = SessionTimes {
                    expires_ms: T + ends,
                    last_seen_ms: T,
                    idle_ms: idle.map(|i| T + i),
                };
                self.sessions.insert(id, (subject.to_owned(), times));
                Answer::Done
            }
            Touch {
                id,
                now,
                idle_until,
                ..
            } => {
                let Some((_, s)) = self.sessions.get_mut(&id) else {
                    return Answer::Session(None);
                };
                let touched = session::touch(*s, T + now, idle_until.map(|i| T + i));
                if let Some(t) = touched {
                    *s = t;
                }
                Answer::Session(touched.map(|t| (t.last_seen_ms - T, t.idle_ms.map(|i| i - T))))
            }
            End { id, now, .. } => Answer::Bool(session::end(
                self.sessions.remove(&id).map(|(_, s)| s),
                T + now,
            )),
            Live { id, now, .. } => Answer::Bool(
                self.sessions
                    .get(&id)
                    .is_some_and(|(_, s)| s.is_live(T + now)),
            ),
            Logout {
                subject, cutoff, ..
            } => {
                let old = self.cutoffs.get(subject).copied();
                let new = Cutoff {
                    cutoff_ms: T + cutoff,
                    until_ms: T + 100_000,
                };
                self.cutoffs.insert(subject, session::raise(old, new));
                let ended: Vec<SessionTimes> = self
                    .sessions
                    .iter()
                    .filter(|(_, (s, _))| s == subject)
                    .map(|(_, (_, t))| *t)
                    .collect();
                self.sessions.retain(|_, (s, _)| s != subject);
                Answer::Count(session::ended_by_logout(ended, T + cutoff))
            }
            CutOff {
                subject,
                issued,
                now,
                ..
            } => Answer::Bool(self.cutoffs.get(subject).is_some_and(|c| {
                c.until_ms > T + now && session::cuts_off(c.cutoff_ms, T + issued)
            })),
            MfaBegin { sealed, until } => {
                mfa_rules::begin(&mut self.mfa, sealed, T + until);
                Answer::Done
            }
            MfaConfirm {
                sealed,
                reseal,
                step,
                codes,
                now,
                ..
            } => Answer::Bool(mfa_rules::confirm(
                &mut self.mfa,
                sealed,
                reseal,
                step,
                &owned(codes),
                T + now,
            )),
            MfaAccept {
                sealed,
                step,
                reseal,
                ..
            } => Answer::Accept(mfa_rules::accept(&mut self.mfa, sealed, step, reseal)),
            MfaSpend { candidates, .. } => {
                Answer::Spent(mfa_rules::spend(&mut self.mfa, &owned(candidates)))
            }
            MfaBackup { codes, .. } => {
                Answer::Bool(mfa_rules::set_backup(&mut self.mfa, &owned(codes)))
            }
            MfaDisable { now, .. } => Answer::Bool(mfa_rules::disable(&mut self.mfa, T + now)),
            MfaGet { now, .. } => Answer::Mfa(
                self.mfa.pending_at(T + now).map(|(p, _)| p.clone()),
                self.mfa
                    .enrolled
                    .as_ref()
                    .map(|e| (e.secret.clone(), e.last_step, e.backup.len() as u32)),
            ),
        }
    }
}

fn owned(codes: &[&str]) -> Vec<String> {
    codes.iter().map(|c| c.to_string()).collect()
}

/// Runs one step against a store, through the `Store` trait the domain uses.
async fn apply(store: &dyn Store, names: &mut Names, p: Gcra, step: &Step) -> Answer {
    let family = format!("fam-{}", names.run);
    let mfa = names.subject("mfa");
    match *step {
        Rate { at: t, cost, .. } => decision(
            store
                .rate_limit("conformance", &names.run, p, cost, Some(at(t)))
                .await
                .unwrap(),
        ),
        Family { ends } => {
            names.family_ends = ends;
            store
                .create_family(&store::Family {
                    id: family,
                    subject: names.subject("f"),
                    expires_at: at(ends),
                    current: "r0".into(),
                })
                .await
                .unwrap();
            Answer::Done
        }
        Rotate {
            presented,
            revoked,
            n,
            now,
            replay_until,
            ..
        } => {
            let replay_until = UNIX_EPOCH + Duration::from_millis(replay_until as u64);
            let r = store
                .rotate(
                    &family,
                    presented,
                    revoked,
                    &successor(n),
                    at(now),
                    replay_until,
                )
                .await
                .unwrap();
            rotation_answer(r, names.family_ends)
        }
        Session {
            id,
            subject,
            ends,
            idle,
        } => {
            let subject = names.subject(subject);
            let sid = store::new_session_id(&subject);
            assert_eq!(names.sessions.len(), id);
            names.sessions.push(sid.clone());
            store
                .create_session(&store::Session {
                    id: sid,
                    subject,
                    created_at: at(0),
                    expires_at: at(ends),
                    last_seen_at: at(0),
                    idle_expires_at: idle.map(at),
                    metadata: Default::default(),
                })
                .await
                .unwrap();
            Answer::Done
        }
        Touch {
            id,
            now,
            idle_until,
            ..
        } => {
            let touched = store
                .touch_session(&names.sessions[id], at(now), idle_until.map(at))
                .await
                .unwrap();
            let ms = |t: SystemTime| t.duration_since(at(0)).unwrap().as_millis() as i64;
            Answer::Session(touched.map(|s| (ms(s.last_seen_at), s.idle_expires_at.map(ms))))
        }
        End { id, now, .. } => Answer::Bool(
            store
                .delete_session(&names.sessions[id], at(now))
                .await
                .unwrap(),
        ),
        Live { id, now, .. } => {
            // Asked the way Validate asks, and the way GetSession does: they must agree.
            let check = TokenCheck {
                token_id: "none",
                subject: "nobody",
                issued_at_ms: T,
                session_id: Some(&names.sessions[id]),
                family_id: None,
                now: at(now),
                accepted_until_ms: i64::MAX,
                fresh: false,
            };
            let revoked = store.is_revoked(&check).await.unwrap();
            let got = store
                .get_session(&names.sessions[id], at(now))
                .await
                .unwrap();
            assert_eq!(got.is_some(), !revoked, "GetSession and Validate disagree");
            Answer::Bool(!revoked)
        }
        Logout {
            subject, cutoff, ..
        } => Answer::Count(
            store
                .revoke_subject(&names.subject(subject), at(cutoff), at(100_000))
                .await
                .unwrap(),
        ),
        CutOff {
            subject,
            issued,
            now,
            ..
        } => {
            let subject = names.subject(subject);
            let check = TokenCheck {
                token_id: "none",
                subject: &subject,
                issued_at_ms: T + issued,
                session_id: None,
                family_id: None,
                now: at(now),
                accepted_until_ms: i64::MAX,
                fresh: false,
            };
            Answer::Bool(store.is_revoked(&check).await.unwrap())
        }
        MfaBegin { sealed, until } => {
            store.mfa_begin(&mfa, sealed, at(until)).await.unwrap();
            Answer::Done
        }
        MfaConfirm {
            sealed,
            reseal,
            step,
            codes,
            now,
            ..
        } => Answer::Bool(
            store
                .mfa_confirm(&mfa, sealed, reseal, step, &owned(codes), at(now))
                .await
                .unwrap(),
        ),
        MfaAccept {
            sealed,
            step,
            reseal,
            ..
        } => Answer::Accept(store.mfa_accept(&mfa, sealed, step, reseal).await.unwrap()),
        MfaSpend { candidates, .. } => Answer::Spent(
            store
                .mfa_spend_backup(&mfa, &owned(candidates))
                .await
                .unwrap(),
        ),
        MfaBackup { codes, .. } => {
            Answer::Bool(store.mfa_set_backup(&mfa, &owned(codes)).await.unwrap())
        }
        MfaDisable { now, .. } => Answer::Bool(store.mfa_disable(&mfa, at(now)).await.unwrap()),
        MfaGet { now, .. } => {
            let r = store.mfa_get(&mfa, at(now)).await.unwrap();
            if let Some((_, until)) = &r.pending {
                assert!(*until > at(now), "a pending enrollment past its end");
            }
            Answer::Mfa(
                r.pending.map(|(p, _)| p),
                r.enrolled.map(|e| (e.secret, e.last_step, e.backup_codes)),
            )
        }
    }
}

/// Opens a store on the given settings and waits until it answers (connected, migrated).
async fn ready(config: StoreConfig) -> Arc<dyn Store> {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_unix((T / 1000) as u64));
    let store = store::open(&config, clock).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "store never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store
}

/// Rate-limit steps gathered into batches of up to this many (`--store-batch`), or 0 for none.
const BATCHED: usize = 64;
const ALONE: usize = 0;

fn redis_config(batch: usize) -> RedisConfig {
    RedisConfig {
        url: Secret::from(backends::shared_redis()),
        feed_url: None,
        cluster: false,
        prefix: format!("conformance{}:", support::now_nanos()),
        timeout: Duration::from_secs(5),
        // The traces hold the backends' restatements to the rules; the view above them is
        // tested in tests/revocation_cache.rs.
        cache: 0,
        batch,
        tls: Default::default(),
    }
}

fn postgres_config(storage: &Storage, batch: usize) -> PostgresConfig {
    PostgresConfig {
        url: Secret::from(storage.database_url().as_str()),
        direct_url: None,
        transaction_pooling: false,
        max_connections: 4,
        migrate: true,
        timeout: Duration::from_secs(5),
        // The traces hold the backends' restatements to the rules; the view above them is
        // tested in tests/revocation_cache.rs.
        cache: 0,
        batch,
    }
}

/// Runs every trace against `store`, and against the rules themselves, and checks every
/// answer against the table.
async fn conforms(name: &str, store: &dyn Store) {
    for (trace, policy, steps) in traces() {
        let mut model = Model::default();
        let mut names = Names::new();
        for (i, step) in steps.iter().enumerate() {
            let want = expected(step);
            assert_eq!(
                model.apply(policy, step),
                want,
                "the rule itself, {trace}, step {i}: {step:?}"
            );
            assert_eq!(
                apply(store, &mut names, policy, step).await,
                want,
                "{name}, {trace}, step {i}: {step:?}"
            );
        }
    }
}

#[tokio::test]
async fn memory_conforms() {
    conforms("memory", ready(StoreConfig::Memory).await.as_ref()).await;
}

#[tokio::test]
async fn redis_scripts_conform() {
    for batch in [ALONE, BATCHED] {
        let store = ready(StoreConfig::Redis(redis_config(batch))).await;
        conforms(&format!("redis, batch {batch}"), store.as_ref()).await;
    }
}

#[tokio::test]
async fn postgres_functions_conform() {
    let storage = Storage::new(backends::Backend::Postgres);
    for batch in [ALONE, BATCHED] {
        let store = ready(StoreConfig::Postgres(postgres_config(&storage, batch))).await;
        conforms(&format!("postgres, batch {batch}"), store.as_ref()).await;
    }
}

#[tokio::test]
async fn tiered_conforms() {
    let storage = Storage::new(backends::Backend::Postgres);
    for batch in [ALONE, BATCHED] {
        let store = ready(StoreConfig::Tiered(
            redis_config(batch),
            postgres_config(&storage, batch),
        ))
        .await;
        conforms(&format!("tiered, batch {batch}"), store.as_ref()).await;
    }
}

/// Calls on other keys sent ahead of a trace: more than any store has lanes, so that every
/// lane is busy and the trace's steps gather behind them into one batch.
const AHEAD: usize = 8;

/// Each rate-limit trace sent at once, every step in flight together: the steps gather into
/// one batch (the test's runtime runs nothing else until all have been sent), which must
/// apply them in the order sent and give each its own answer, the table's.
async fn rate_traces_conform_in_one_batch(name: &str, store: &dyn Store) {
    for (trace, policy, steps) in traces() {
        if !steps.iter().all(|s| matches!(s, Rate { .. })) {
            continue;
        }
        let run = format!("batch{}", support::now_nanos());
        let ahead = (0..AHEAD).map(|i| {
            let key = format!("{run}-ahead{i}");
            async move { store.rate_limit("ahead", &key, policy, 1, None).await }
        });
        let trace_steps = steps.iter().map(|step| {
            let Rate { at: t, cost, .. } = *step else {
                unreachable!("only rate traces")
            };
            store.rate_limit("conformance", &run, policy, cost, Some(at(t)))
        });
        let (ahead, answers) = tokio::join!(
            futures_util::future::join_all(ahead),
            futures_util::future::join_all(trace_steps)
        );
        assert!(ahead.iter().all(Result::is_ok), "{name}: {ahead:?}");
        for (i, (step, answer)) in steps.iter().zip(answers).enumerate() {
            assert_eq!(
                decision(answer.unwrap()),
                expected(step),
                "{name}, {trace} as one batch, step {i}: {step:?}"
            );
        }
    }
}

#[tokio::test]
async fn redis_answers_a_batch_in_order() {
    let store = ready(StoreConfig::Redis(redis_config(BATCHED))).await;
    rate_traces_conform_in_one_batch("redis", store.as_ref()).await;
}

/// A step whose key holds something else (a string written by hand) fails alone: the other
/// steps of its batch, on other keys, are answered and counted as ever.
#[tokio::test]
async fn redis_fails_only_the_step_whose_key_holds_another_type() {
    let config = redis_config(BATCHED);
    let client = redis::Client::open(backends::shared_redis()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let bad = format!(
        "{}rl:{}:{}:{}",
        config.prefix,
        "mixed".len(),
        "mixed",
        "bad"
    );
    redis::cmd("SET")
        .arg(&bad)
        .arg("not a state")
        .exec_async(&mut conn)
        .await
        .unwrap();
    let store = ready(StoreConfig::Redis(config)).await;
    let ahead = (0..AHEAD).map(|i| {
        let key = format!("ahead{i}");
        let store = store.clone();
        async move { store.rate_limit("mixed", &key, SMOOTH, 1, None).await }
    });
    let batch = ["good", "bad", "good", "good"].map(|key| {
        let store = store.clone();
        async move { store.rate_limit("mixed", key, SMOOTH, 1, Some(at(0))).await }
    });
    let (_, answers) = tokio::join!(
        futures_util::future::join_all(ahead),
        futures_util::future::join_all(batch)
    );
    assert!(answers[1].is_err(), "{answers:?}");
    let remaining: Vec<u32> = [0, 2, 3]
        .map(|i| answers[i].as_ref().unwrap().remaining)
        .to_vec();
    assert_eq!(
        remaining,
        [2, 1, 0],
        "the good key's steps, counted in order"
    );
}

#[tokio::test]
async fn postgres_answers_a_batch_in_order() {
    let storage = Storage::new(backends::Backend::Postgres);
    let store = ready(StoreConfig::Postgres(postgres_config(&storage, BATCHED))).await;
    rate_traces_conform_in_one_batch("postgres", store.as_ref()).await;
}

/// Two nodes' batches meeting on keys that do not exist yet, on rows the other is changing,
/// and on rows a reset deletes: every step answered. (A lock taken through a join skipped a
/// row that another transaction had deleted meanwhile, and failed the batch.)
#[tokio::test]
async fn postgres_batches_of_two_nodes_meet_on_new_keys() {
    let storage = Storage::new(backends::Backend::Postgres);
    let nodes = [
        ready(StoreConfig::Postgres(postgres_config(&storage, BATCHED))).await,
        ready(StoreConfig::Postgres(postgres_config(&storage, BATCHED))).await,
    ];
    // Every step allowed, so every batch changes the rows the other node's batch waits for.
    let wide = Gcra {
        interval_us: 1_000,
        burst: 1_000_000,
        lockout_us: 0,
    };
    for round in 0..10 {
        let calls = (0..120).map(|i| {
            let store = nodes[i % 2].clone();
            let key = format!("new{round}-{}", i % 3);
            async move {
                if i % 10 == 9 {
                    // A reset deletes the row under the batches' feet (MFA resets its
                    // attempt count at each accepted code).
                    store.reset_rate_limit("meet", &key).await.map(|()| true)
                } else {
                    let d = store.rate_limit("meet", &key, wide, 1, None).await;
                    d.map(|d| d.allowed)
                }
            }
        });
        let answers = futures_util::future::join_all(calls).await;
        let allowed = answers
            .into_iter()
            .collect::<Result<Vec<bool>, _>>()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(allowed.into_iter().all(|a| a), "round {round}");
    }
}

#[tokio::test]
async fn pgbouncer_answers_a_batch_in_order() {
    let storage = Storage::new(backends::Backend::PgBouncer);
    let env = |name: &str| {
        let (_, value) = storage.env.iter().find(|(k, _)| k == name).unwrap();
        Secret::from(value.as_str())
    };
    let mut config = postgres_config(&storage, BATCHED);
    config.transaction_pooling = true;
    config.direct_url = Some(env("DATABASE_MIGRATE_URL"));
    let store = ready(StoreConfig::Postgres(config)).await;
    rate_traces_conform_in_one_batch("pgbouncer", store.as_ref()).await;
}

/// The registry's summary, the same on every store: how many live nodes publish each digest,
/// a generation that moves only when a node joins, leaves or changes its digest, the ids only
/// for a small fleet, the documents only of nodes with another digest, and a process that
/// writes under another's id.
async fn registry_conforms(name: &str, store: &dyn Store) {
    let ttl = Duration::from_secs(60);
    let beat = async |id: &str, nonce: &str, digest: &str| {
        let document = format!("{{\"version\":\"{id}\"}}");
        let me = store::Beat {
            id,
            nonce,
            digest,
            document: &document,
        };
        store.heartbeat(me, ttl).await.unwrap()
    };
    let ids: Vec<String> = (0..20).map(|i| format!("node-{i:02}")).collect();
    for id in &ids[..3] {
        beat(id, id, "same").await;
    }
    let small = beat(&ids[0], &ids[0], "same").await;
    assert_eq!(small.live, 3, "{name}");
    assert_eq!(small.ids, &ids[..3], "{name}: a small fleet is listed");
    for id in &ids[3..] {
        beat(id, id, "same").await;
    }
    let first = beat(&ids[0], &ids[0], "same").await;
    let again = beat(&ids[1], &ids[1], "same").await;
    assert_eq!(first.live, 20, "{name}");
    assert_eq!(first.digests, vec![("same".to_owned(), 20)], "{name}");
    assert!(first.ids.is_empty(), "{name}: a large fleet is not listed");
    assert_eq!((first.undigested, first.taken), (0, false), "{name}");
    assert_eq!(
        first.generation, again.generation,
        "{name}: nothing changed, and the generation moved"
    );

    let odd = beat(&ids[7], &ids[7], "other").await;
    assert_ne!(odd.generation, again.generation, "{name}");
    assert_eq!(
        odd.digests,
        vec![("other".to_owned(), 1), ("same".to_owned(), 19)],
        "{name}"
    );
    let unlike = store.nodes(ttl, Some("same")).await.unwrap();
    assert_eq!(
        unlike,
        vec![(ids[7].clone(), format!("{{\"version\":\"{}\"}}", ids[7]))],
        "{name}: only the odd node's document"
    );
    assert_eq!(store.nodes(ttl, None).await.unwrap().len(), 20, "{name}");

    store.leave(&ids[7]).await.unwrap();
    let left = beat(&ids[0], &ids[0], "same").await;
    assert_eq!(left.live, 19, "{name}");
    assert_eq!(left.digests, vec![("same".to_owned(), 19)], "{name}");
    assert_ne!(left.generation, odd.generation, "{name}");

    // Another process under node-00's id: each sees the other's nonce.
    assert!(beat(&ids[0], "an impostor", "same").await.taken, "{name}");
    assert!(beat(&ids[0], &ids[0], "same").await.taken, "{name}");
    assert!(!beat(&ids[0], &ids[0], "same").await.taken, "{name}");
}

#[tokio::test]
async fn memory_registry_conforms() {
    registry_conforms("memory", ready(StoreConfig::Memory).await.as_ref()).await;
}

#[tokio::test]
async fn redis_registry_conforms() {
    let store = ready(StoreConfig::Redis(redis_config(BATCHED))).await;
    registry_conforms("redis", store.as_ref()).await;
}

#[tokio::test]
async fn postgres_registry_conforms() {
    let storage = Storage::new(backends::Backend::Postgres);
    let store = ready(StoreConfig::Postgres(postgres_config(&storage, BATCHED))).await;
    registry_conforms("postgres", store.as_ref()).await;
}

/// The change log keeps a row until every node has read it: a row that a transaction wrote
/// twenty minutes ago and commits only now (it stayed open that long) survives the next
/// purge, and goes at a later one, once its transaction is behind a purge's horizon. (By age
/// alone, it went before any node could read it.)
#[tokio::test]
async fn the_change_log_keeps_a_late_commit_until_it_was_read() {
    let storage = Storage::new(backends::Backend::Postgres);
    let store = ready(StoreConfig::Postgres(postgres_config(&storage, BATCHED))).await;
    let url = storage.database_url();
    store.purge_expired().await.unwrap();
    backends::psql_on(
        &url,
        "INSERT INTO change_log (fact, at) VALUES ('r:late', now() - interval '20 minutes')",
    );
    let count = || {
        backends::psql_on(
            &url,
            "SELECT count(*) FROM change_log WHERE fact = 'r:late'",
        )
    };
    store.purge_expired().await.unwrap();
    assert_eq!(count(), "1", "purged before any node could read it");
    // It goes at the next purge, unless a transaction elsewhere on the server (the other
    // tests') held that purge's horizon back: then at one of the next few.
    for _ in 0..20 {
        store.purge_expired().await.unwrap();
        if count() == "0" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("kept for good");
}
