//! Traces: a real OTLP/gRPC collector inside the test receives the spans of a Validate call
//! whose client sent a W3C `traceparent`, and the sidecar's spans continue that trace. And
//! logs: JSON lines when asked.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auth_sidecar::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use support::backends::{Backend, Storage};
use support::{Sidecar, struct_of};
use tonic::metadata::MetadataValue;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

/// A span as received, with its resource's attributes.
type Received = (Vec<KeyValue>, Span);

/// An OTLP trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((resource.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns its OTLP endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// Waits until a span of `trace_id` named `name` has arrived.
    async fn span(&self, trace_id: &[u8], name: &str) -> Received {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(found) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| s.trace_id == trace_id && s.name == name)
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no span {name} of the trace arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_validate_call_continues_the_callers_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let storage = Storage::new(Backend::Redis);
    let sidecar = Sidecar::builder()
        .storage(&storage)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", "sidecar-under-test")
        .start();
    let mut client = sidecar.client().await;
    let issued = client
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            claims: Some(struct_of(json!({"role": "admin-of-secret-things"}))),
            ..Default::default()
        })
        .await
        .unwrap();

    let trace_id: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
    let parent_id: [u8; 8] = *b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7";
    let mut request = tonic::Request::new(pb::ValidateRequest {
        token: issued.token.clone(),
        ..Default::default()
    });
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&parent_id));
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
    assert!(client.0.validate(request).await.unwrap().into_inner().valid);

    let (resource, rpc) = collector
        .span(&trace_id, "authsidecar.v1.TokenService/Validate")
        .await;
    assert_eq!(
        rpc.parent_span_id, parent_id,
        "the caller's span is the parent"
    );
    assert_eq!(
        attribute(&resource, "service.name").as_deref(),
        Some("sidecar-under-test")
    );
    assert_eq!(
        attribute(&rpc.attributes, "rpc.method").as_deref(),
        Some("Validate")
    );
    assert_eq!(
        attribute(&rpc.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        attribute(&rpc.attributes, "outcome").as_deref(),
        Some("valid")
    );
    assert_eq!(
        attribute(&rpc.attributes, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    // The store call is a child of the RPC's span, with its backend.
    let (_, store) = collector.span(&trace_id, "check").await;
    assert_eq!(store.parent_span_id, rpc.span_id);
    assert_eq!(
        attribute(&store.attributes, "backend").as_deref(),
        Some("redis")
    );

    // Nothing a span carries is a token, a part of one, a claim value or the secret.
    let spans = collector.spans.lock().unwrap().clone();
    let signature = issued.token.rsplit('.').next().unwrap();
    for (_, span) in &spans {
        for kv in &span.attributes {
            let value = format!("{:?}", kv.value);
            for forbidden in [
                issued.token.as_str(),
                signature,
                "admin-of-secret-things",
                support::SECRET,
                &issued.token_id,
            ] {
                assert!(!value.contains(forbidden), "{} = {value}", kv.key);
            }
        }
    }
}

/// MfaService calls are spans like any other, named by method, and no span carries the
/// secret or a backup code.
#[tokio::test]
async fn mfa_spans_carry_no_secret_or_code() {
    use auth_sidecar::pb::mfa_service_client::MfaServiceClient;
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let sidecar = Sidecar::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let mut mfa = MfaServiceClient::new(sidecar.channel().await);
    let begun = mfa
        .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {
            subject: "span-user".into(),
            account_label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = data_encoding::BASE32_NOPAD
        .decode(begun.secret.as_bytes())
        .unwrap();
    let step = auth_sidecar::mfa::totp::step_at(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let code = auth_sidecar::mfa::totp::code(&secret, step);
    let backup = mfa
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            subject: "span-user".into(),
            code: code.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backup_codes;
    let next = auth_sidecar::mfa::totp::code(&secret, step + 1);
    let verified = mfa
        .verify_totp(pb::VerifyTotpRequest {
            subject: "span-user".into(),
            code: next.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.valid);
    let deadline = Instant::now() + Duration::from_secs(15);
    let verify_span = loop {
        let found = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| s.name == "authsidecar.v1.MfaService/VerifyTotp")
            .cloned();
        if let Some((_, span)) = found {
            break span;
        }
        assert!(Instant::now() < deadline, "no VerifyTotp span arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        attribute(&verify_span.attributes, "outcome").as_deref(),
        Some("valid")
    );
    let spans = collector.spans.lock().unwrap().clone();
    for (_, span) in &spans {
        for kv in &span.attributes {
            let value = format!("{:?}", kv.value);
            // (The six-digit codes could appear by chance in a number such as a duration;
            // the handlers record none, by construction: see `telemetry::record_mfa`.)
            let mut forbidden = vec![begun.secret.clone()];
            forbidden.extend(backup.iter().cloned());
            for f in &forbidden {
                assert!(!value.contains(f.as_str()), "{} = {value}", kv.key);
            }
        }
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let sidecar = Sidecar::builder().arg("--log-format=json").start();
    sidecar.client().await.issue("alice").await;
    let logs = sidecar.logs();
    let serving = logs
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
        .find(|v| v["message"] == "serving")
        .expect("the start line");
    assert_eq!(serving["level"], "INFO");
    assert!(serving["api"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(serving["storage"], "memory");
}
