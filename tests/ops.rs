//! What the cluster sees: grpc.health.v1 on both listeners, `/healthz`, reflection, the drain
//! on SIGTERM, the `health` subcommand's exit codes, and start-up errors.

mod support;

use std::process::Command;
use std::time::Duration;

use support::Sidecar;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use auth_sidecar::pb;

const TOKEN_SERVICE: &str = "authsidecar.v1.TokenService";

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
}

/// Runs `auth-sidecar health --addr ADDR` and returns its exit code.
fn health_cli(addr: &str, extra: &[&str]) -> i32 {
    bin()
        .args(["health", "--addr", addr, "--timeout", "2s"])
        .args(extra)
        .output()
        .expect("run health")
        .status
        .code()
        .expect("exit code")
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_token_service() {
    let sidecar = Sidecar::start();
    for mut client in [sidecar.health().await, sidecar.ops_health().await] {
        for service in ["", TOKEN_SERVICE] {
            let status = client.check(check(service)).await.unwrap().into_inner();
            assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
        }
        let unknown = client.check(check("no.such.Service")).await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
    }
    assert_eq!(sidecar.ops_get("/healthz"), 200);
}

/// The probes of the Helm chart, as the kubelet and `auth-sidecar health` make them: with its
/// backend down, a sidecar is not ready but alive, so Kubernetes takes it out of endpoints
/// and does not restart it; once the backend answers, it is ready again.
#[tokio::test]
async fn liveness_stays_serving_while_a_backend_is_down_and_readiness_does_not() {
    let port = support::backends::free_port();
    let sidecar = Sidecar::builder()
        .arg("--storage=redis")
        .arg("--backend-check-interval=100ms")
        .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
        .start();
    let ops = sidecar.ops.to_string();
    for addr in [ops.as_str(), sidecar.api.as_str()] {
        assert_eq!(health_cli(addr, &["--service", "liveness"]), 0);
        assert_eq!(health_cli(addr, &["--service", "readiness"]), 4);
    }
    assert_eq!(sidecar.ops_get("/livez"), 200);
    assert_eq!(sidecar.ops_get("/readyz"), 503);

    let _redis = support::backends::RedisServer::on_port(port);
    sidecar.wait_ops_status(200, Duration::from_secs(15));
    for addr in [ops.as_str(), sidecar.api.as_str()] {
        assert_eq!(health_cli(addr, &["--service", "readiness"]), 0);
        assert_eq!(health_cli(addr, &["--service", "liveness"]), 0);
    }
    assert_eq!(sidecar.ops_get("/readyz"), 200);
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_then_drains_and_exits_zero() {
    let mut sidecar = Sidecar::builder().arg("--shutdown-delay=2s").start();
    let mut api_watch = sidecar
        .health()
        .await
        .watch(check(""))
        .await
        .unwrap()
        .into_inner();
    let mut ops_watch = sidecar
        .ops_health()
        .await
        .watch(check(TOKEN_SERVICE))
        .await
        .unwrap()
        .into_inner();
    for watch in [&mut api_watch, &mut ops_watch] {
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
    }

    sidecar.terminate();
    for watch in [&mut api_watch, &mut ops_watch] {
        let next = watch.next().await.unwrap().unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
    }
    // During the shutdown delay the listeners still answer, and say NOT_SERVING.
    let status = sidecar.health().await.check(check("")).await.unwrap();
    assert_eq!(status.into_inner().status(), ServingStatus::NotServing);
    assert_eq!(sidecar.ops_get("/healthz"), 503);
    assert_eq!(health_cli(&sidecar.api, &[]), 4, "NOT_SERVING exits 4");
    let mut tokens = sidecar.client().await;
    tokens.issue("still-answering").await;

    // Watch streams end when draining starts, so they do not hold the exit up.
    let ended = tokio::time::timeout(Duration::from_secs(5), api_watch.next()).await;
    assert!(
        matches!(ended, Ok(None | Some(Err(_)))),
        "watch did not end: {ended:?}"
    );
    let status = sidecar.wait(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit code");
}

#[tokio::test]
async fn the_ops_listener_does_not_serve_the_token_api() {
    let sidecar = Sidecar::start();
    let channel = support::connect(&sidecar.ops.to_string()).await;
    let mut client = pb::token_service_client::TokenServiceClient::new(channel);
    let err = client
        .issue(pb::IssueRequest {
            subject: "mallory".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(sidecar.ops_get("/no-such-page"), 404);
}

#[tokio::test]
async fn reflection_lists_the_token_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let sidecar = Sidecar::start();

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(sidecar.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == TOKEN_SERVICE), "{names:?}");
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(sidecar.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                TOKEN_SERVICE.into(),
            ),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(
            response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );
}

#[tokio::test]
async fn health_subcommand_exit_codes() {
    let sidecar = Sidecar::start();
    assert_eq!(health_cli(&sidecar.api, &[]), 0);
    assert_eq!(
        health_cli(&sidecar.ops.to_string(), &["--service", TOKEN_SERVICE]),
        0
    );
    assert_eq!(
        health_cli(&sidecar.api, &["--service", "no.such.Service"]),
        3
    );
    // A port nobody listens on: bind one, note it, let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(health_cli(&free.to_string(), &[]), 2);
    assert_eq!(health_cli("unix:/nonexistent/socket", &[]), 2);
    assert_eq!(health_cli(&sidecar.api, &["--no-such-flag"]), 1);
}

#[test]
fn invalid_settings_exit_2_with_one_line_naming_the_setting() {
    /// Flags, environment, and the setting the error must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 11] = [
        (&["--max-ttl", "5x"], &[], "--max-ttl"),
        (
            &["--storage", "postgres", "--db-transaction-pooling"],
            &[
                ("DATABASE_URL", "postgres://auth@127.0.0.1:6432/auth"),
                ("AUTH_JWT_SECRET", "config-test-secret-0123456789abcdefghij"),
            ],
            "--db-transaction-pooling",
        ),
        (
            &["--public-url", "ftp://auth.example.com"],
            &[],
            "--public-url",
        ),
        (
            &["--public-url", "https://auth.example.com/?a=b"],
            &[],
            "--public-url",
        ),
        (&["--access-ttl", "2d"], &[], "--access-ttl"),
        (&["--listen", "nowhere"], &[], "--listen"),
        (&[], &[("AUTH_JWT_SECRET", "hunter2")], "AUTH_JWT_SECRET"),
        (
            &["--authz-claim-header", "tenant"],
            &[],
            "--authz-claim-header",
        ),
        (
            &["--authz-claim-header", "t=x-auth-subject"],
            &[],
            "--authz-claim-header",
        ),
        (
            &["--authz-token-header", "x-auth-subject"],
            &[],
            "--authz-token-header",
        ),
        (
            &[],
            &[("AUTH_AUTHZ_CLAIM_HEADERS", "a=bad header")],
            "--authz-claim-header",
        ),
    ];
    for (args, env, setting) in cases {
        let out = bin()
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
        assert!(!stderr.contains("hunter2"), "secret printed: {stderr}");
    }
}

#[test]
fn help_documents_every_setting_and_never_prints_the_secret() {
    let secret = "do-not-print-this-secret-0123456789abcdef";
    let out = bin()
        .args(["serve", "--help"])
        .env("AUTH_JWT_SECRET", secret)
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for env in [
        "AUTH_LISTEN",
        "AUTH_OPS_LISTEN",
        "AUTH_STORAGE",
        "AUTH_JWT_SECRET",
        "AUTH_ISSUER",
        "AUTH_AUDIENCE",
        "AUTH_ACCESS_TTL",
        "AUTH_MAX_TTL",
        "AUTH_LEEWAY",
        "AUTH_SHUTDOWN_GRACE",
        "AUTH_CONFIG",
    ] {
        assert!(help.contains(env), "{env} missing from --help");
    }
    assert!(
        help.contains("127.0.0.1:50051") && help.contains("15m"),
        "defaults missing"
    );
    assert!(!help.contains(secret), "--help printed the secret");
}
