//! Group commit. While a backend call of one kind is in flight, the calls of that kind that
//! arrive wait; when it returns, they go together, as one round trip, in the order they
//! arrived. A call that finds a lane free goes at once, so a lone caller waits for nothing
//! that it did not wait for before. This is how PostgreSQL's WAL flush and Kafka's producer
//! batch: under load the batches grow by themselves, and each round trip's fixed cost (a
//! system call on either side, a script's or a statement's start) is paid once per batch.
//!
//! The domain never sees a batch: a backend gathers below the `Store` trait, and each call
//! gets its own answer or the error of its batch. A backend's `run` must answer the steps of
//! a batch as if they had been sent one by one in the order given.
//!
//! What a caller that gives up (its deadline passes, or its request is dropped) leaves
//! behind: while it still waits, nothing (it is taken out, never sent); once its batch is
//! sent, the batch goes through, and its step may be counted though nobody hears the answer,
//! as a step sent alone and timed out may be.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::StoreError;

type Reply<A> = oneshot::Sender<Result<A, StoreError>>;

/// Gathers the calls of one kind (`op`) to one backend; cloning shares the gathering.
pub(crate) struct Batcher<R, A> {
    shared: Arc<Shared<R, A>>,
}

impl<R, A> Clone for Batcher<R, A> {
    fn clone(&self) -> Self {
        Batcher {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<R, A> {
    backend: &'static str,
    op: &'static str,
    /// Most calls in one batch.
    cap: usize,
    /// Most batches in flight at once.
    lanes: usize,
    state: Mutex<State<R, A>>,
}

struct State<R, A> {
    waiting: VecDeque<(R, Reply<A>)>,
    in_flight: usize,
}

impl<R: Send + 'static, A: Send + 'static> Batcher<R, A> {
    /// Up to `cap` calls in a batch (at least one), up to `lanes` batches in flight.
    pub fn new(backend: &'static str, op: &'static str, cap: usize, lanes: usize) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                backend,
                op,
                cap: cap.max(1),
                lanes: lanes.max(1),
                state: Mutex::new(State {
                    waiting: VecDeque::new(),
                    in_flight: 0,
                }),
            }),
        }
    }

    /// Sends `step` in the next batch, and waits at most `deadline` for its answer. `lane`
    /// makes the function that sends a batch: it gets the steps in arrival order and answers
    /// each, in that order. Only a call that finds a lane free makes one, and it finds the
    /// queue empty then (a lane gives itself back only when nothing waits), so its batch is
    /// itself alone: it carries that batch itself, with no hop to another task. The calls that
    /// gathered meanwhile are carried on by a task of its own, so that a caller that goes
    /// away, even mid-flight, never cancels the others' round trip.
    pub async fn submit<F, Fut>(
        &self,
        step: R,
        deadline: Duration,
        lane: impl FnOnce() -> F,
    ) -> Result<A, StoreError>
    where
        F: Fn(Vec<R>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<A, StoreError>>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut state = self.shared.lock();
            state.waiting.push_back((step, reply));
            (state.in_flight < self.shared.lanes).then(|| {
                state.in_flight += 1;
                self.shared.take(&mut state)
            })
        };
        let fail = |why: &str| StoreError {
            backend: self.shared.backend,
            detail: format!("{}: {why}", self.shared.op),
        };
        let work = async {
            if let Some(batch) = first {
                let mut lane = Lane::new(self.shared.clone(), lane());
                lane.carry(batch).await;
                lane.hand_off();
            }
            answer.await
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(fail("its batch ended without an answer")),
            Err(_) => Err(fail(&format!("timed out after {deadline:?}"))),
        }
    }
}

impl<R, A> Shared<R, A> {
    fn lock(&self) -> MutexGuard<'_, State<R, A>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch: the longest-waiting calls whose callers still wait, up to the cap.
    fn take(&self, state: &mut State<R, A>) -> Vec<(R, Reply<A>)> {
        let mut batch = Vec::with_capacity(self.cap.min(state.waiting.len()));
        while batch.len() < self.cap {
            match state.waiting.pop_front() {
                // Its caller gave up before it was sent: it is never counted.
                Some((_, reply)) if reply.is_closed() => {}
                Some(call) => batch.push(call),
                None => break,
            }
        }
        batch
    }
}

/// A lane in flight, and the function that sends its batches. Dropped while it holds the lane
/// (its caller went away mid-flight, or `run` panicked), it still hands the lane on, so that a
/// lane is never lost and no call is left waiting for one.
struct Lane<R, A, F>
where
    R: Send + 'static,
    A: Send + 'static,
    F: LaneFn<R, A>,
{
    shared: Arc<Shared<R, A>>,
    run: Option<F>,
    held: bool,
}

/// What sends a batch: its steps in, one answer per step out, in order.
trait LaneFn<R, A>: Send + 'static {
    type Fut: Future<Output = Vec<Result<A, StoreError>>> + Send + 'static;
    fn send(&self, steps: Vec<R>) -> Self::Fut;
}

impl<R, A, F, Fut> LaneFn<R, A> for F
where
    F: Fn(Vec<R>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<Result<A, StoreError>>> + Send + 'static,
{
    type Fut = Fut;
    fn send(&self, steps: Vec<R>) -> Fut {
        self(steps)
    }
}

impl<R: Send + 'static, A: Send + 'static, F: LaneFn<R, A>> Lane<R, A, F> {
    fn new(shared: Arc<Shared<R, A>>, run: F) -> Self {
        Lane {
            shared,
            run: Some(run),
            held: true,
        }
    }

    /// Sends one batch and hands each caller its answer.
    async fn carry(&mut self, batch: Vec<(R, Reply<A>)>) {
        let Some(run) = &self.run else { return };
        if batch.is_empty() {
            return;
        }
        let (backend, op) = (self.shared.backend, self.shared.op);
        crate::telemetry::record_batch(backend, op, batch.len());
        let (steps, replies): (Vec<R>, Vec<Reply<A>>) = batch.into_iter().unzip();
        let sent = replies.len();
        let mut answers = run.send(steps).await.into_iter();
        for reply in replies {
            let answer = answers.next().unwrap_or_else(|| {
                Err(StoreError {
                    backend,
                    detail: format!("{op}: a batch of {sent} got fewer answers"),
                })
            });
            let _ = reply.send(answer);
        }
    }

    /// Under the lock: the next batch, or, when nothing waits, `None` with the lane given
    /// back (so that a call arriving after this finds it free).
    fn next(&mut self) -> Option<Vec<(R, Reply<A>)>> {
        let mut state = self.shared.lock();
        if state.waiting.is_empty() {
            state.in_flight -= 1;
            self.held = false;
            return None;
        }
        Some(self.shared.take(&mut state))
    }

    /// Gives the lane back, or passes it, with the calls that gathered, to a task of its own.
    fn hand_off(&mut self) {
        let Some(batch) = self.next() else { return };
        let Some(run) = self.run.take() else { return };
        self.held = false;
        let mut lane = Lane::new(self.shared.clone(), run);
        tokio::spawn(async move {
            let mut batch = Some(batch);
            while let Some(next) = batch {
                lane.carry(next).await;
                batch = lane.next();
            }
        });
    }
}

impl<R: Send + 'static, A: Send + 'static, F: LaneFn<R, A>> Drop for Lane<R, A, F> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() && self.run.is_some() {
            self.hand_off();
        } else {
            self.shared.lock().in_flight -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The batches a test backend got, in the order it got them.
    type Seen = Arc<Mutex<Vec<Vec<u32>>>>;
    type Answers = std::pin::Pin<Box<dyn Future<Output = Vec<Result<u32, StoreError>>> + Send>>;

    /// A backend that holds each batch for `hold`, records the batches it got, and answers each
    /// step with itself.
    fn recording(hold: Duration) -> (Seen, impl Fn(Vec<u32>) -> Answers + Send + Clone + 'static) {
        let seen = Seen::default();
        let log = seen.clone();
        let run = move |steps: Vec<u32>| {
            let log = log.clone();
            Box::pin(async move {
                log.lock().unwrap().push(steps.clone());
                tokio::time::sleep(hold).await;
                steps.into_iter().map(Ok).collect()
            }) as Answers
        };
        (seen, run)
    }

    const LONG: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn calls_that_arrive_during_a_round_trip_go_together_in_arrival_order() {
        let (seen, run) = recording(Duration::from_millis(50));
        let batcher = Batcher::new("test", "step", 64, 1);
        let calls = (0..10).map(|i| batcher.submit(i, LONG, || run.clone()));
        let answers: Vec<u32> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            answers,
            (0..10).collect::<Vec<_>>(),
            "each call its own answer"
        );
        // The first found the lane free and went alone; the rest gathered behind it.
        assert_eq!(*seen.lock().unwrap(), vec![vec![0], (1..10).collect()]);
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_the_cap_and_lanes_run_side_by_side() {
        let (seen, run) = recording(Duration::from_millis(50));
        let batcher = Batcher::new("test", "step", 3, 2);
        let calls = (0..10).map(|i| batcher.submit(i, LONG, || run.clone()));
        futures_util::future::join_all(calls).await;
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![vec![0], vec![1], vec![2, 3, 4], vec![5, 6, 7], vec![8, 9]]
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_call_in_it_and_the_next_batch_still_runs() {
        let batches = Arc::new(AtomicUsize::new(0));
        let count = batches.clone();
        let run = move |steps: Vec<u32>| {
            let n = count.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                steps
                    .iter()
                    .map(|&s| {
                        if n == 1 {
                            Err(StoreError {
                                backend: "test",
                                detail: "down".into(),
                            })
                        } else {
                            Ok(s)
                        }
                    })
                    .collect::<Vec<_>>()
            }
        };
        let batcher = Batcher::new("test", "step", 64, 1);
        let first =
            futures_util::future::join_all((0..5).map(|i| batcher.submit(i, LONG, || run.clone())));
        let answers = first.await;
        assert!(answers[0].is_ok());
        assert!(answers[1..].iter().all(Result::is_err), "{answers:?}");
        assert_eq!(batcher.submit(7, LONG, || run).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_batch_with_too_few_answers_fails_the_calls_left_over() {
        let run = |steps: Vec<u32>| async move { steps.into_iter().skip(1).map(Ok).collect() };
        let batcher = Batcher::new("test", "step", 64, 1);
        assert!(batcher.submit(1, LONG, || run).await.is_err());
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_mid_flight_still_hands_its_lane_on() {
        let (seen, run) = recording(Duration::from_millis(100));
        let batcher = Batcher::new("test", "step", 64, 1);
        let leader = tokio::spawn({
            let (b, run) = (batcher.clone(), run.clone());
            async move { b.submit(0, LONG, || run).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn({
            let (b, run) = (batcher.clone(), run.clone());
            async move { b.submit(1, LONG, || run).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let answer = tokio::time::timeout(Duration::from_secs(2), follower).await;
        assert_eq!(
            answer.expect("the follower was carried").unwrap().unwrap(),
            1
        );
        assert_eq!(batcher.submit(2, LONG, || run).await.unwrap(), 2);
        assert_eq!(*seen.lock().unwrap(), vec![vec![0], vec![1], vec![2]]);
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_before_its_batch_went_is_never_sent() {
        let (seen, run) = recording(Duration::from_millis(100));
        let batcher = Batcher::new("test", "step", 64, 1);
        let first = tokio::spawn({
            let (b, run) = (batcher.clone(), run.clone());
            async move { b.submit(0, LONG, || run).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = batcher
            .submit(1, Duration::from_millis(10), || run.clone())
            .await;
        assert!(late.unwrap_err().detail.contains("timed out"));
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(batcher.submit(2, LONG, || run).await.unwrap(), 2);
        assert_eq!(*seen.lock().unwrap(), vec![vec![0], vec![2]]);
    }
}
