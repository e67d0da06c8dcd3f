//! What an outside red team did to the listeners and the logs, replayed: floods of unfinished
//! messages and of streams, sockets that never speak, forged log lines, and a long run that
//! nobody scrapes. Each measures the sidecar's resident memory, or reads what it wrote.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use auth_sidecar::pb;
use bytes::Bytes;
use support::backends::Backend;
use support::{Deployment, Sidecar};

/// The sidecar's resident memory, in MiB.
fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024.0
}

/// 60 grpc.health.v1 requests on one ops connection, each announcing 4 MB and sending 1 MB of
/// it, none finished: the sidecar refuses each (RESOURCE_EXHAUSTED past the health request
/// limit, or a reset stream once the connection has too many) instead of buffering it, and
/// keeps serving.
#[tokio::test]
async fn unfinished_health_messages_are_not_buffered() {
    let node = Sidecar::start();
    let before = rss_mib(node.pid());
    let tcp = tokio::net::TcpStream::connect(node.ops).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut streams = Vec::new();
    for _ in 0..60 {
        let request =
            http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", node.ops))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
        client = client.ready().await.unwrap();
        let (response, mut send) = client.send_request(request, false).unwrap();
        let mut body = vec![0u8; 1 << 20];
        body[1..5].copy_from_slice(&(4_000_000u32).to_be_bytes());
        send.send_data(Bytes::from(body), false).unwrap();
        streams.push((response, send));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(node.pid());
    eprintln!("health flood: RSS {before:.1} MiB before, {after:.1} MiB under it");
    let mut exhausted = 0;
    for (i, (response, _send)) in streams.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), response).await {
            Ok(Ok(r)) => {
                let status = r.headers().get("grpc-status").map(|v| v.as_bytes());
                assert_eq!(status, Some(&b"8"[..]), "stream {i}: {r:?}");
                exhausted += 1;
            }
            Ok(Err(_)) => {} // reset, or the connection closed: refused too
            Err(_) => panic!("stream {i} left hanging"),
        }
    }
    assert!(exhausted > 0, "no request was refused as too large");
    assert!(
        after - before < 32.0,
        "RSS grew from {before:.0} MiB to {after:.0} MiB under 60 unfinished 4 MB messages"
    );
    assert_eq!(health(&node).await, 1, "a fresh client is still served");
}

async fn health(node: &Sidecar) -> i32 {
    node.ops_health()
        .await
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status
}

/// One HPACK literal header field without indexing (RFC 7541 section 6.2.2), short strings.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// 20,000 header-only streams on one API connection, written as raw frames by a client that
/// ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS: the sidecar refuses the streams past
/// its limit (or the connection), its memory stays flat, and other clients are served.
#[tokio::test]
async fn a_flood_of_streams_is_refused() {
    let node = Sidecar::start();
    let mut good = node.client().await;
    let token = good.issue("alice").await.token;
    let before = rss_mib(node.pid());
    let mut headers = Vec::new();
    literal(&mut headers, ":method", "POST");
    literal(&mut headers, ":scheme", "http");
    literal(
        &mut headers,
        ":path",
        "/authsidecar.v1.TokenService/Validate",
    );
    literal(&mut headers, ":authority", "localhost");
    literal(&mut headers, "content-type", "application/grpc");
    literal(&mut headers, "te", "trailers");
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut flood, 0x4, 0, 0, &[]);
    for i in 0..20_000u32 {
        frame(&mut flood, 0x1, 0x4, 2 * i + 1, &headers);
    }
    let mut tcp = TcpStream::connect(&node.api).unwrap();
    let mut reader = tcp.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let _ = tcp.write_all(&flood);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(node.pid());
    eprintln!("stream flood: RSS {before:.1} MiB before, {after:.1} MiB under it");
    good.assert_valid(&token).await;
    assert!(
        after - before < 32.0,
        "RSS grew from {before:.0} MiB to {after:.0} MiB under 20,000 streams"
    );
    drop(tcp);
    let _ = drain.join();
}

/// Sockets that connect and send nothing, or half a request line, are closed after the
/// handshake timeout on both listeners; while they are open, the connection caps keep them
/// from crowding out the API.
#[tokio::test]
async fn silent_sockets_are_closed_and_capped() {
    let node = Sidecar::builder()
        .arg("--handshake-timeout=1s")
        .arg("--ops-max-connections=32")
        .start();
    let mut sockets = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(node.ops).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        sockets.push(s);
    }
    for _ in 0..20 {
        sockets.push(TcpStream::connect(&node.api).unwrap());
    }
    // Past the ops cap, the API still answers.
    let mut c = node.client().await;
    let token = c.issue("alice").await.token;
    c.assert_valid(&token).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut open = sockets.len();
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for s in &mut sockets {
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                // A timeout: still open. Bytes: a 408 on its way, then the close.
                _ => open += 1,
            }
        }
    }
    assert_eq!(open, 0, "sockets still open after the handshake timeout");
    assert_eq!(health(&node).await, 1);
}

/// A subject carrying a newline and terminal escapes reaches a warning line (a refresh-token
/// reuse) without forging a line or an escape in the text log.
#[tokio::test]
async fn caller_strings_cannot_forge_log_lines() {
    let node = Sidecar::start();
    let mut c = node.client().await;
    let subject = "mallory\n2099-01-01T00:00:00.000000Z  INFO forged: all clear\x1b[2J\x1b[31m";
    let refresh = c
        .issue_with(pb::IssueRequest {
            subject: subject.into(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    c.refresh(&refresh).await.unwrap();
    c.refresh(&refresh).await.unwrap(); // the one retry of a lost answer
    c.refresh(&refresh).await.unwrap_err(); // a reuse, logged with the subject
    let deadline = Instant::now() + Duration::from_secs(5);
    let logs = loop {
        let logs = node.logs();
        if logs.iter().any(|l| l.contains("refresh token reused")) {
            break logs;
        }
        assert!(Instant::now() < deadline, "no reuse warning logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for line in &logs {
        assert!(!line.starts_with("2099"), "forged line: {line:?}");
        assert!(!line.contains('\x1b'), "terminal escape: {line:?}");
    }
    let warning = logs
        .iter()
        .find(|l| l.contains("refresh token reused"))
        .unwrap();
    assert!(
        warning.contains(r"mallory\n2099") && warning.contains(r"\u{1b}[2J"),
        "{warning}"
    );
}

/// Calls counted after the warm-up: at the leak this test guards against (about 35 bytes a
/// call), 180,000 calls grow the resident memory past its 4 MiB band.
const SOAK_CALLS: u64 = 180_000;

/// The longest the counted part may take.
const SOAK_LIMIT: Duration = Duration::from_secs(300);

/// Thousands of calls a second, on Redis, for minutes, and nobody reads /metrics: after
/// warm-up the resident memory stays within a small band.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_flat_when_nobody_scrapes() {
    let d = Deployment::start(Backend::Redis, 1, &["--rate-limit=soak=1000000/1s"]);
    let pid = d.nodes[0].pid();
    let mut c = d.client().await;
    let token = c.issue("soak").await.token;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for task in 0..24u64 {
        let (mut c, token, stop, calls) = (c.clone(), token.clone(), stop.clone(), calls.clone());
        load.push(tokio::spawn(async move {
            let mut i = task;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match i % 3 {
                    0 => {
                        c.assert_valid(&token).await;
                    }
                    1 => {
                        c.issue("soak").await;
                    }
                    _ => {
                        c.0.check_rate_limit(pb::CheckRateLimitRequest {
                            policy: "soak".into(),
                            key: format!("k{}", i % 1000),
                            cost: None,
                        })
                        .await
                        .unwrap();
                    }
                }
                i += 1;
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(40)).await;
    let warm = rss_mib(pid);
    let warm_calls = calls.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut samples = vec![warm];
    // As many calls as it takes for the leak this guards against to show, however fast this
    // machine runs the debug build today: the run ends on a count, not a time.
    let counted = || calls.load(std::sync::atomic::Ordering::Relaxed) - warm_calls;
    while counted() < SOAK_CALLS && started.elapsed() < SOAK_LIMIT {
        tokio::time::sleep(Duration::from_secs(10)).await;
        samples.push(rss_mib(pid));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = counted();
    let peak = samples.iter().cloned().fold(f64::MIN, f64::max);
    eprintln!(
        "soak: {total} calls in {seconds:.0}s ({:.0}/s); RSS after warm-up {samples:.1?} MiB",
        total as f64 / seconds
    );
    assert!(
        total >= SOAK_CALLS,
        "only {total} calls in {seconds:.0}s: too few for a leak to show"
    );
    assert!(
        peak - warm < 4.0,
        "RSS grew from {warm:.1} to {peak:.1} MiB in {seconds:.0}s without a scrape"
    );
}

/// An HTTP/2 connection to `addr` from `127.0.0.<host>` that sends the preface and SETTINGS,
/// then only answers the server's PINGs: no stream, ever. Held while the handle lives.
async fn ping_only(addr: std::net::SocketAddr, host: u8) -> h2::client::SendRequest<Bytes> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
        .unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    send
}

/// The red team's starvation of the ops port: peers on the pod network fill the listener
/// with connections that only answer PINGs. The kubelet's probe, a fresh connection each
/// time, is still served within a second, over HTTP/1.1 and grpc.health alike: a connection
/// without an open request is idle whatever it answers, each peer address has a cap, and a
/// newcomer evicts the idlest connection of the peer holding the most. (Before, the probe
/// waited in the backlog for the hostile connections' idle deadline, 60 s and more.)
#[tokio::test]
async fn connections_that_only_answer_pings_cannot_keep_a_probe_out() {
    let node = Sidecar::builder()
        .args(["--ops-max-connections", "16"])
        .start();
    node.wait_ops_status(200, Duration::from_secs(5));
    // Four peers, each opening twice its cap of 4: the listener's 16 are all theirs.
    let mut held = Vec::new();
    for host in 2..=5 {
        for _ in 0..8 {
            held.push(ping_only(node.ops, host).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let ops = node.ops;
        let status = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::task::spawn_blocking(move || support::http_get(ops, "/healthz").status),
        )
        .await
        .expect("the HTTP probe was served within a second")
        .unwrap();
        assert_eq!(status, 200);
        let mut health = tokio::time::timeout(Duration::from_secs(1), node.ops_health())
            .await
            .expect("the gRPC probe connected within a second");
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            health.check(tonic_health::pb::HealthCheckRequest::default()),
        )
        .await
        .expect("the gRPC probe was answered within a second")
        .unwrap();
        assert_eq!(
            answer.into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // Meanwhile the hostile peers come back for more.
        for host in 2..=5 {
            held.push(ping_only(node.ops, host).await);
        }
    }
}

/// A request head is bounded by 16 KiB on HTTP/1.1 as on HTTP/2, on the ops port: a larger
/// one is 431. (HTTP/1.1 accepted a 200 KB header before.)
#[test]
fn an_http1_request_head_over_16_kib_is_refused() {
    let node = Sidecar::start();
    let send = |header_bytes: usize| {
        let mut stream = TcpStream::connect(node.ops).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The listener may answer 431 and close before the whole head is written: the write
        // then fails (EPIPE), and the answer is read all the same.
        let _ = write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(header_bytes)
        );
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    assert!(send(8 * 1024).starts_with("HTTP/1.1 200"));
    let refused = send(20 * 1024);
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused:?}");
}
