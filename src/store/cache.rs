//! The node-local revocation view: facts a Validate reads (a token id's revocation, a
//! subject's cutoff, a session's deadline, a family's state) and rate-limit denials, kept
//! coherent by a backend's change feed (`feed.rs`).
//!
//! The invariant: the view answers only while its feed is proven live. Every other moment
//! (not yet subscribed, reconnecting, a proof overdue) a lookup says [`Lookup::Bypass`] and
//! the caller reads the backend as if there were no view; when the feed is lost the view is
//! emptied, so it starts empty after a reconnect.
//!
//! The read/invalidate race is closed with placeholders, as the Redis client-side caching
//! reference describes: a miss leaves a placeholder with a fresh ticket before the backend
//! read, an invalidation removes whatever the key holds, and the read's value is kept only if
//! its own placeholder is still there when it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use quick_cache::Weighter;

use super::{StoreError, millis};
use crate::rules::gcra::{Decision, Gcra};

/// One fact, as a backend read it: `None` when the record is absent. What the number means is
/// the reader's business (a cutoff, a deadline, a flag); the view only stores it.
pub type Fact = Option<i64>;

/// What the view keeps of one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub fact: Fact,
    /// A second number some readers keep with the fact (a rate-limit denial's details).
    pub aux: i64,
    /// Until when the entry may be used, in milliseconds since the epoch on the caller's
    /// clock: for a fact, the token's acceptance (no entry outlives its use).
    pub until_ms: i64,
}

impl Entry {
    pub fn fact(fact: Fact, until_ms: i64) -> Entry {
        Entry {
            fact,
            aux: 0,
            until_ms,
        }
    }
}

/// What the view holds under a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// A read is under way (since `since_us`); only the read holding this ticket may fill
    /// the slot.
    Pending {
        ticket: u64,
        since_us: u64,
    },
    Ready(Entry),
}

/// The answer of [`View::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The view holds the entry.
    Hit(Entry),
    /// Read the backend, then [`View::fill`] with this ticket.
    Miss(Ticket),
    /// The feed is not proven live, or another read of the key is under way: read the
    /// backend, keep nothing.
    Bypass,
}

/// A read's claim on a placeholder.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Clone)]
struct SlotWeight;

impl Weighter<String, Slot> for SlotWeight {
    fn weight(&self, key: &String, _: &Slot) -> u64 {
        // The key's bytes, the slot, and the table's own bookkeeping per entry.
        key.len() as u64 + 64
    }
}

/// Why the view was emptied, for `authsidecar_revocation_cache_flushes_total{cause}`.
#[derive(Clone, Copy, Debug)]
pub enum FlushCause {
    /// The feed was lost or its proof of life was overdue.
    FeedDown,
    /// The backend said everything may have changed (FLUSHALL, FLUSHDB, TRUNCATE).
    Backend,
    /// The proofs of life stopped for longer than a proof lasts, then resumed.
    ProofGap,
}

impl FlushCause {
    fn label(self) -> &'static str {
        match self {
            FlushCause::FeedDown => "feed_down",
            FlushCause::Backend => "backend_flush",
            FlushCause::ProofGap => "proof_gap",
        }
    }
}

/// How often a feed proves itself, and how long one proof lasts: a feed that goes silent is
/// no longer trusted at most [`PROOF_WINDOW`] after the last proof was sent.
pub const PROOF_INTERVAL: Duration = Duration::from_millis(250);
pub const PROOF_WINDOW: Duration = Duration::from_secs(1);

/// A placeholder older than this belongs to a read that was abandoned (its request cancelled);
/// a new read may take it over.
const PENDING_STALE: Duration = Duration::from_secs(5);

/// The view of one backend. Cloning shares it.
#[derive(Clone)]
pub struct View {
    inner: Arc<Inner>,
}

struct Inner {
    backend: &'static str,
    /// Registered once: a lookup on the hot path only adds to an atomic.
    hits: metrics::Counter,
    misses: metrics::Counter,
    invalidations: metrics::Counter,
    slots: quick_cache::sync::Cache<String, Slot, SlotWeight>,
    next_ticket: AtomicU64,
    /// Until when the feed is proven live, in microseconds since `epoch`; 0 while it is not.
    live_until_us: AtomicU64,
    epoch: Instant,
}

impl View {
    /// A view holding about `budget` bytes of keys and facts.
    pub fn new(backend: &'static str, budget: u64) -> View {
        let slots = quick_cache::sync::Cache::with_weighter(
            (budget / 128).max(16) as usize,
            budget.max(1024),
            SlotWeight,
        );
        record_feed_up(backend, false);
        View {
            inner: Arc::new(Inner {
                backend,
                hits: metrics::counter!("authsidecar_revocation_cache_hits_total", "backend" => backend),
                misses: metrics::counter!("authsidecar_revocation_cache_misses_total", "backend" => backend),
                invalidations: metrics::counter!("authsidecar_revocation_cache_invalidations_total", "backend" => backend),
                slots,
                next_ticket: AtomicU64::new(1),
                live_until_us: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Whether the feed is proven live now.
    pub fn live(&self) -> bool {
        self.micros(Instant::now()) < self.inner.live_until_us.load(Ordering::Acquire)
    }

    /// The fact under `key` while the feed is proven live at `now_ms` (the caller's clock,
    /// against which entries expire).
    pub fn lookup(&self, key: &str, now_ms: i64) -> Lookup {
        if !self.live() {
            return Lookup::Bypass;
        }
        let now_us = self.micros(Instant::now());
        match self.inner.slots.get(key) {
            Some(Slot::Ready(entry)) if now_ms < entry.until_ms => {
                self.inner.hits.increment(1);
                return Lookup::Hit(entry);
            }
            // The first reader fills the slot; the others read without keeping, so that a
            // stream of misses on one key cannot keep replacing each other's placeholders.
            Some(Slot::Pending { since_us, .. })
                if now_us.saturating_sub(since_us) < PENDING_STALE.as_micros() as u64 =>
            {
                self.count_miss();
                return Lookup::Bypass;
            }
            _ => {}
        }
        self.count_miss();
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.inner.slots.insert(
            key.to_owned(),
            Slot::Pending {
                ticket,
                since_us: now_us,
            },
        );
        Lookup::Miss(Ticket(ticket))
    }

    fn count_miss(&self) {
        self.inner.misses.increment(1);
    }

    /// Keeps a fact read after a [`Lookup::Miss`], unless the key was invalidated (or the view
    /// emptied) since: then the placeholder is gone and the fact may be older than the change.
    pub fn fill(&self, key: &str, ticket: Ticket, entry: Entry) {
        let _ = self
            .inner
            .slots
            .entry(key, Some(Duration::ZERO), |_, slot| {
                if matches!(slot, Slot::Pending { ticket: t, .. } if *t == ticket.0) {
                    *slot = Slot::Ready(entry);
                }
                quick_cache::sync::EntryAction::Retain(())
            });
    }

    /// Forgets a read that found nothing worth keeping.
    pub fn abandon(&self, key: &str, ticket: Ticket) {
        self.inner.slots.remove_if(
            key,
            |slot| matches!(slot, Slot::Pending { ticket: t, .. } if *t == ticket.0),
        );
    }

    /// A key changed in the backend.
    pub fn invalidate(&self, key: &str) {
        self.inner.invalidations.increment(1);
        self.inner.slots.remove(key);
    }

    /// This node wrote the key: drop what the view holds of it, before the feed says so.
    pub fn forget(&self, key: &str) {
        self.inner.slots.remove(key);
    }

    /// Empties the view.
    pub fn flush(&self, cause: FlushCause) {
        metrics::counter!(
            "authsidecar_revocation_cache_flushes_total",
            "backend" => self.inner.backend,
            "cause" => cause.label(),
        )
        .increment(1);
        self.inner.slots.clear();
    }

    /// The feed proved itself with a probe sent at `sent`: the view may answer until
    /// `sent + PROOF_WINDOW`. Never moves the deadline back. After a gap in the proofs the
    /// view starts empty, as after a reconnect: while it could not answer, nodes read the
    /// backend, and an entry older than what they read must not be answered again.
    pub fn proven(&self, sent: Instant) {
        let until = self.micros(sent + PROOF_WINDOW);
        // (0: never live, or lost, and emptied then.)
        let held = self.inner.live_until_us.load(Ordering::Acquire);
        if held != 0 && held <= self.micros(Instant::now()) {
            self.flush(FlushCause::ProofGap);
        }
        let before = self.inner.live_until_us.fetch_max(until, Ordering::AcqRel);
        if before <= self.micros(Instant::now()) {
            record_feed_up(self.inner.backend, true);
            tracing::info!(backend = self.inner.backend, "revocation cache feed live");
        }
    }

    /// The feed is lost: stop answering at once, and empty the view so that it starts empty
    /// when the feed is back.
    pub fn lost(&self, why: &str) {
        self.inner.live_until_us.store(0, Ordering::Release);
        self.flush(FlushCause::FeedDown);
        record_feed_up(self.inner.backend, false);
        tracing::debug!(
            backend = self.inner.backend,
            reason = why,
            "revocation view emptied"
        );
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.inner.epoch).as_micros() as u64
    }
}

fn record_feed_up(backend: &'static str, up: bool) {
    metrics::gauge!("authsidecar_revocation_cache_feed_up", "backend" => backend).set(if up {
        1.0
    } else {
        0.0
    });
}

/// A rate-limit denial as the revocation view keeps it: the fact is when the key is back to
/// its full allowance, `aux` packs the remaining allowance and the cost denied, and the entry
/// ends when a call of that cost would pass.
pub(super) struct Denial;

impl Denial {
    fn entry(sent_ms: i64, cost: u32, remaining: i64, retry_us: i64, reset_us: i64) -> Entry {
        // Counted from when the call was sent, not answered: the entry ends no later than
        // the denial does.
        Entry {
            fact: Some(sent_ms + reset_us / 1000),
            aux: (remaining.clamp(0, u32::MAX as i64) << 32) | i64::from(cost.max(1)),
            until_ms: sent_ms + retry_us / 1000,
        }
    }

    /// A rate-limit step through the view: the denial `name` holds answered again while it
    /// covers this call, or else `step` (allowed, remaining, retry_after_us, reset_after_us)
    /// run, and kept when it denies. A denial holds until its retry_after on every node, for
    /// its cost and any higher (the state only moves forward until a reset, whose write the
    /// feed brings as `name`), so the view may answer it again; except a peek's denial under a
    /// lockout, which a counted call would turn into the lockout. `view` is `None` for no view,
    /// or for calls at a given instant (the conformance traces).
    pub async fn through(
        view: Option<&View>,
        name: &str,
        p: Gcra,
        cost: u32,
        step: impl Future<Output = Result<(bool, i64, i64, i64), StoreError>>,
    ) -> Result<Decision, StoreError> {
        let mut claim = None;
        if let Some(view) = view {
            let now_ms = millis(SystemTime::now());
            match view.lookup(name, now_ms) {
                Lookup::Hit(held) => {
                    if let Some(decision) = Denial::answer(held, p, cost, now_ms) {
                        return Ok(decision);
                    }
                }
                Lookup::Miss(ticket) => claim = Some((view, ticket)),
                Lookup::Bypass => {}
            }
        }
        let sent_ms = millis(SystemTime::now());
        let answer = step.await;
        // A peek's denial is not kept under a policy with a lockout: a counted call denied
        // after it engages the lockout, a write the view must not answer in its place.
        let keep = cost > 0 || p.lockout_us == 0;
        if let Some((view, ticket)) = claim {
            match &answer {
                Ok((false, remaining, retry_us, reset_us)) if keep => view.fill(
                    name,
                    ticket,
                    Denial::entry(sent_ms, cost, *remaining, *retry_us, *reset_us),
                ),
                _ => view.abandon(name, ticket),
            }
        }
        let (allowed, remaining, retry_us, reset_us) = answer?;
        Ok(Decision::from_micros(
            allowed, p, remaining, retry_us, reset_us,
        ))
    }

    /// The decision again, for a call of `cost` at `now_ms`, if the denial covers it.
    fn answer(held: Entry, p: Gcra, cost: u32, now_ms: i64) -> Option<Decision> {
        let denied_cost = held.aux & 0xffff_ffff;
        (i64::from(cost.max(1)) >= denied_cost).then(|| {
            Decision::from_micros(
                false,
                p,
                held.aux >> 32,
                (held.until_ms - now_ms) * 1000,
                (held.fact.unwrap_or(now_ms) - now_ms) * 1000,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_view() -> View {
        let view = View::new("test", 1 << 20);
        view.proven(Instant::now());
        view
    }

    fn miss(view: &View, key: &str) -> Ticket {
        match view.lookup(key, 0) {
            Lookup::Miss(t) => t,
            other => panic!("expected a miss, got {other:?}"),
        }
    }

    #[test]
    fn answers_only_while_proven_live() {
        let view = View::new("test", 1 << 20);
        assert_eq!(view.lookup("k", 0), Lookup::Bypass);
        view.proven(Instant::now());
        let t = miss(&view, "k");
        view.fill("k", t, Entry::fact(Some(7), 10));
        assert_eq!(view.lookup("k", 0), Lookup::Hit(Entry::fact(Some(7), 10)));
        view.lost("test");
        assert_eq!(view.lookup("k", 0), Lookup::Bypass);
        view.proven(Instant::now());
        assert!(
            matches!(view.lookup("k", 0), Lookup::Miss(_)),
            "starts empty"
        );
        // A proof sent longer ago than the window proves nothing now.
        let view = View::new("test", 1 << 20);
        view.proven(Instant::now() - PROOF_WINDOW);
        assert_eq!(view.lookup("k", 0), Lookup::Bypass);
        // After a gap in the proofs, the view starts empty.
        let view = View::new("test", 1 << 20);
        view.proven(Instant::now() - PROOF_WINDOW + Duration::from_millis(100));
        let t = miss(&view, "k");
        view.fill("k", t, Entry::fact(None, 10));
        assert_eq!(view.lookup("k", 0), Lookup::Hit(Entry::fact(None, 10)));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(view.lookup("k", 0), Lookup::Bypass);
        view.proven(Instant::now());
        assert!(
            matches!(view.lookup("k", 0), Lookup::Miss(_)),
            "emptied after the gap"
        );
    }

    #[test]
    fn an_invalidation_during_a_read_keeps_the_read_out() {
        let view = live_view();
        let t = miss(&view, "k");
        view.invalidate("k");
        view.fill("k", t, Entry::fact(None, 10));
        // Not kept: the next lookup misses (and leaves its own placeholder).
        let t = miss(&view, "k");
        // Likewise a flush.
        view.flush(FlushCause::Backend);
        view.fill("k", t, Entry::fact(None, 10));
        let first = miss(&view, "k");
        // A read that began before an invalidation cannot fill the placeholder of a read that
        // began after it.
        let before = miss(&view, "j");
        view.invalidate("j");
        let after = miss(&view, "j");
        view.fill("j", before, Entry::fact(Some(1), 10));
        assert_eq!(
            view.lookup("j", 0),
            Lookup::Bypass,
            "still the later read's placeholder"
        );
        view.fill("j", after, Entry::fact(Some(2), 10));
        assert_eq!(view.lookup("j", 0), Lookup::Hit(Entry::fact(Some(2), 10)));
        // A second reader while the first is under way reads without keeping.
        assert_eq!(view.lookup("k", 0), Lookup::Bypass);
        view.fill("k", first, Entry::fact(Some(1), 10));
        assert_eq!(view.lookup("k", 0), Lookup::Hit(Entry::fact(Some(1), 10)));
    }

    #[test]
    fn an_entry_ends_with_its_token() {
        let view = live_view();
        let t = miss(&view, "k");
        view.fill("k", t, Entry::fact(None, 10));
        assert_eq!(view.lookup("k", 9), Lookup::Hit(Entry::fact(None, 10)));
        assert!(matches!(view.lookup("k", 10), Lookup::Miss(_)));
    }

    #[test]
    fn the_budget_bounds_the_entries() {
        let view = View::new("test", 64 << 10);
        view.proven(Instant::now());
        for i in 0..10_000 {
            let key = format!("revoked:{i:040}");
            let t = miss(&view, &key);
            view.fill(&key, t, Entry::fact(None, i64::MAX));
        }
        assert!(view.inner.slots.weight() <= 64 << 10);
        assert!(view.inner.slots.len() < 10_000);
    }
}
