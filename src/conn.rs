//! Limits every accepted connection lives under, on every listener: a cap on how many are
//! open, a deadline for a new connection's first bytes, and an idle deadline after that. A
//! peer that connects and sends nothing (slowloris), or stops answering, is dropped; a healthy
//! client is never idle that long, because the listeners send HTTP/2 keepalive pings that it
//! must answer. The HTTP listeners (ops, admin) also cap each peer address and count a
//! connection idle while it has no request open ([`Tracker`]), so that a peer holding
//! connections open with PINGs alone cannot keep a probe out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// How often a listener pings an HTTP/2 peer, and how long it waits for the answer before
/// dropping the connection as dead.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest request header list a listener accepts (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; past it, the listener stops accepting until one closes.
    pub max_connections: usize,
    /// How long a new connection may take to send its first bytes (an HTTP/1.1 request's
    /// headers are also bounded by it).
    pub handshake_timeout: Duration,
    /// How long an established connection may send nothing.
    pub idle_timeout: Duration,
}

/// A listener the limits can wrap.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept_io(&self) -> io::Result<TcpStream> {
        let (stream, _) = self.accept().await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;
    async fn accept_io(&self) -> io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// The connections `listener` accepts, each under `limits`. Accepting waits while the cap is
/// reached, so excess peers queue in the kernel's backlog rather than in this process. An
/// accept error (out of file descriptors, say) is logged and retried, never fatal.
pub fn incoming<L: Listener>(
    listener: L,
    limits: Limits,
) -> impl Stream<Item = io::Result<Guarded<L::Io>>> + Send + 'static {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold((listener, open), move |(listener, open)| async move {
        loop {
            let permit = open.clone().acquire_owned().await.expect("never closed");
            match listener.accept_io().await {
                Ok(io) => {
                    let conn = Guarded::new(io, Some(permit), limits);
                    return Some((Ok(conn), (listener, open)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A connection that holds its place under the cap and closes when its peer stays silent past
/// the deadline.
pub struct Guarded<IO> {
    io: IO,
    _permit: Option<OwnedSemaphorePermit>,
    deadline: Pin<Box<Sleep>>,
    idle_timeout: Duration,
}

impl<IO> Guarded<IO> {
    fn new(io: IO, permit: Option<OwnedSemaphorePermit>, limits: Limits) -> Guarded<IO> {
        Guarded {
            io,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            idle_timeout: limits.idle_timeout,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing within the deadline",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Refuses, on every transport but a Unix socket, a request whose `:authority` is not a URI
/// authority. The patched HTTP/2 server (vendor/h2/PATCHED.md) lets such a request through,
/// marked, so that grpcio, grpc-java and grpc-swift, which send the socket's path there, work
/// over the Unix socket; over TCP it is refused as unpatched h2 would, before any service sees
/// it. `refusal` makes the answer: a gRPC status on the API listener, a 400 on the ops one.
pub struct RefuseMalformedAuthority<S, B> {
    inner: S,
    refusal: fn() -> http::Response<B>,
}

impl<S: Clone, B> Clone for RefuseMalformedAuthority<S, B> {
    fn clone(&self) -> Self {
        RefuseMalformedAuthority {
            inner: self.inner.clone(),
            refusal: self.refusal,
        }
    }
}

impl<S, B> RefuseMalformedAuthority<S, B> {
    pub fn layer(
        refusal: fn() -> http::Response<B>,
    ) -> impl tower::Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(move |inner| RefuseMalformedAuthority { inner, refusal })
    }
}

impl<S, ReqBody, B> tower::Service<http::Request<ReqBody>> for RefuseMalformedAuthority<S, B>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<http::Response<B>, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        use futures_util::future::Either;
        let extensions = req.extensions();
        let malformed = extensions.get::<h2::ext::MalformedAuthority>().is_some();
        let unix = extensions
            .get::<tonic::transport::server::UdsConnectInfo>()
            .is_some();
        if malformed && !unix {
            return Either::Left(std::future::ready(Ok((self.refusal)())));
        }
        Either::Right(self.inner.call(req))
    }
}

/// The connections of one HTTP listener (ops or admin), by peer address, so that a probe gets
/// in while other peers hold connections open. A connection is idle while no request of its is
/// open: PINGs and SETTINGS are no activity. Past the per-peer cap, a new connection from that
/// peer closes the peer's own connection idle longest; past the listener's cap, it closes the
/// connection idle longest of the peer holding the most. Only when every connection it could
/// close has a request open is the new one refused (closed at once: it costs no slot). An
/// idle connection is closed after the idle timeout however many PINGs it answers.
pub struct Tracker {
    state: Mutex<TrackerState>,
    max: usize,
    per_peer: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct TrackerState {
    next_id: u64,
    open: HashMap<u64, Tracked>,
}

struct Tracked {
    peer: IpAddr,
    activity: Arc<Activity>,
    close: CancellationToken,
}

/// The connections one peer address may hold at once on an HTTP listener: an eighth of the
/// listener's cap, and at least 4.
pub fn per_peer_cap(max_connections: usize) -> usize {
    (max_connections / 8).max(4)
}

impl Tracker {
    pub fn new(limits: Limits) -> Arc<Tracker> {
        Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            max: limits.max_connections.max(1),
            per_peer: per_peer_cap(limits.max_connections),
            idle_timeout: limits.idle_timeout,
        })
    }

    /// Makes room for a connection from `peer` (see the type), or `None` when none can be made.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for c in state.open.values() {
            *held.entry(c.peer).or_default() += 1;
        }
        let mine = held.get(&peer).copied().unwrap_or(0);
        let full = mine >= self.per_peer || state.open.len() >= self.max;
        if full {
            // The peer's own idle connection when it is at its cap; else the idlest of the
            // peer holding the most.
            let victim = state
                .open
                .iter()
                .filter(|(_, c)| mine < self.per_peer || c.peer == peer)
                .filter_map(|(id, c)| Some((held[&c.peer], c.activity.idle_for(now)?, *id)))
                .max()
                .map(|(_, _, id)| id)?;
            if let Some(evicted) = state.open.remove(&victim) {
                evicted.close.cancel();
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let activity = Arc::new(Activity {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
        });
        let close = CancellationToken::new();
        state.open.insert(
            id,
            Tracked {
                peer,
                activity: activity.clone(),
                close: close.clone(),
            },
        );
        Some(Admitted {
            tracker: self.clone(),
            id,
            activity,
            close,
        })
    }
}

/// A connection's place in its [`Tracker`], given back when dropped.
pub struct Admitted {
    tracker: Arc<Tracker>,
    id: u64,
    pub activity: Arc<Activity>,
    close: CancellationToken,
}

impl Admitted {
    /// Completes when the connection is to close: evicted for a newcomer, or idle past the
    /// idle timeout.
    pub async fn closed(&self) {
        let idle_timeout = self.tracker.idle_timeout;
        let idle_out = async {
            loop {
                let wait = match self.activity.idle_for(Instant::now()) {
                    Some(idle) if idle >= idle_timeout => return,
                    Some(idle) => idle_timeout - idle,
                    None => idle_timeout,
                };
                tokio::time::sleep(wait).await;
            }
        };
        tokio::select! {
            () = self.close.cancelled() => {}
            () = idle_out => {}
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.tracker.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open.remove(&self.id);
    }
}

/// What a connection is doing: how many of its requests are open, and since when none is.
pub struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    /// How long no request has been open, or `None` while one is.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        (self.open.load(Ordering::SeqCst) == 0).then(|| now.saturating_duration_since(since))
    }

    /// A request opens; it is open until the guard is dropped (with the response's body).
    pub fn begin(self: &Arc<Self>) -> RequestOpen {
        self.open.fetch_add(1, Ordering::SeqCst);
        RequestOpen(self.clone())
    }
}

/// An open request of a connection (see [`Activity::begin`]).
pub struct RequestOpen(Arc<Activity>);

impl Drop for RequestOpen {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// The connections `listener` accepts, each under `limits`' deadlines but under no cap: the
/// caller's [`Tracker`] decides which stay.
pub fn accepted<L: Listener>(
    listener: L,
    limits: Limits,
) -> impl Stream<Item = Guarded<L::Io>> + Send + 'static {
    futures_util::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept_io().await {
                Ok(io) => return Some((Guarded::new(io, None, limits), listener)),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(max: usize) -> Arc<Tracker> {
        Tracker::new(Limits {
            max_connections: max,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_peer_at_its_cap_evicts_its_own_idlest_connection() {
        let t = tracker(64); // 8 per peer
        let held: Vec<Admitted> = (0..8).map(|_| t.admit(ip(2)).unwrap()).collect();
        let busy = held[0].activity.begin();
        let newcomer = t.admit(ip(2)).expect("room made");
        assert!(!held[0].close.is_cancelled(), "a busy connection stays");
        assert_eq!(held.iter().filter(|h| h.close.is_cancelled()).count(), 1);
        drop((busy, newcomer));
    }

    #[test]
    fn a_full_listener_evicts_from_the_peer_holding_the_most_and_never_a_busy_one() {
        let t = tracker(8); // 4 per peer
        let a: Vec<Admitted> = (0..4).map(|_| t.admit(ip(2)).unwrap()).collect();
        let b: Vec<Admitted> = (0..3).map(|_| t.admit(ip(3)).unwrap()).collect();
        let c = t.admit(ip(4)).unwrap();
        let probe = t.admit(ip(5)).expect("a probe always gets in");
        assert_eq!(a.iter().filter(|h| h.close.is_cancelled()).count(), 1);
        assert!(!b.iter().chain([&c, &probe]).any(|h| h.close.is_cancelled()));
        // Every connection busy: nothing can make room.
        let open: Vec<RequestOpen> = a
            .iter()
            .chain(&b)
            .chain([&c, &probe])
            .filter(|h| !h.close.is_cancelled())
            .map(|h| h.activity.begin())
            .collect();
        assert!(t.admit(ip(6)).is_none());
        drop(open);
    }
}
