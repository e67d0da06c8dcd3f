//! The client side of the one binary: `auth-sidecar health` (a grpc_health_probe equivalent for
//! exec probes), and `auth-sidecar token …` and `auth-sidecar mfa …` for operators, printing
//! JSON.

use std::io::Read;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::parse_duration;
use crate::grpc::{json_to_struct, struct_to_json};
use crate::pb;
use crate::pb::token_service_client::TokenServiceClient;

/// Exit codes of `health`, as grpc_health_probe uses them.
pub mod exit {
    pub const SERVING: i32 = 0;
    pub const BAD_ARGUMENTS: i32 = 1;
    pub const CONNECTION_FAILED: i32 = 2;
    pub const RPC_FAILED: i32 = 3;
    pub const NOT_SERVING: i32 = 4;
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Address to probe: HOST:PORT or unix:/path.sock.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Service name to ask about; empty means the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long (connecting and the call together).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Where the operator commands (`token`, `mfa`) reach a running sidecar.
#[derive(Debug, Args)]
pub struct ApiAddr {
    /// Address of the sidecar's token API: HOST:PORT or unix:/path.sock.
    #[arg(
        long,
        global = true,
        env = "AUTH_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: String,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub api: ApiAddr,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token and print it with its id and expiry.
    Issue {
        /// The `sub` claim.
        #[arg(long)]
        subject: String,
        /// An audience; repeat for several.
        #[arg(long)]
        audience: Vec<String>,
        /// Lifetime (15m, 1h…); the sidecar's default when unset.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Extra claims as a JSON object.
        #[arg(long)]
        claims: Option<String>,
        #[arg(long)]
        session_id: Option<String>,
        /// Issue a refresh token instead of an access token.
        #[arg(long)]
        refresh: bool,
    },
    /// Validate a token ("-" reads it from standard input). Exits 0 when valid, 1 when not.
    Validate {
        token: String,
        #[arg(long)]
        audience: Option<String>,
        /// Expect a refresh token.
        #[arg(long)]
        refresh: bool,
    },
    /// Revoke a token ("-" reads it from standard input), a token id, or every token of a
    /// subject (logout everywhere).
    #[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
    Revoke {
        #[arg(long, group = "target")]
        token: Option<String>,
        #[arg(long, group = "target")]
        token_id: Option<String>,
        #[arg(long, group = "target")]
        subject: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct MfaArgs {
    #[command(flatten)]
    pub api: ApiAddr,
    #[command(subcommand)]
    pub command: MfaCommand,
}

/// MfaService's calls, one subcommand each. A code given as "-" is read from standard input.
#[derive(Debug, Subcommand)]
pub enum MfaCommand {
    /// Begin a TOTP enrollment: print the secret, the otpauth:// URI and when it ends.
    Begin {
        #[arg(long)]
        subject: String,
        /// The account name authenticator apps show; the subject when unset.
        #[arg(long, default_value = "")]
        account_label: String,
    },
    /// Confirm the pending enrollment with a code from the app; print the backup codes.
    Confirm {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        code: String,
    },
    /// Check a TOTP code. Exits 0 when valid, 1 when not.
    Verify {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        code: String,
    },
    /// Spend a backup code. Exits 0 when valid, 1 when not.
    VerifyBackupCode {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        code: String,
    },
    /// Print whether the subject is enrolled, since when, and its backup codes left.
    Status {
        #[arg(long)]
        subject: String,
    },
    /// Remove the subject's secret, pending enrollment and backup codes.
    Disable {
        #[arg(long)]
        subject: String,
    },
    /// Replace the subject's backup codes; print the new ones.
    RegenerateBackupCodes {
        #[arg(long)]
        subject: String,
    },
    /// Print a new MFA key for AUTH_MFA_KEY (KID:BASE64 of 32 random bytes); no sidecar is
    /// called.
    GenerateKey {
        /// The key id; one derived from the date when unset.
        #[arg(long)]
        kid: Option<String>,
    },
}

/// Makes a channel from `HOST:PORT`, `http://HOST:PORT` or `unix:/path`.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    if addr.starts_with("unix:") || addr.contains("://") {
        Endpoint::from_shared(addr.to_owned())
    } else {
        Endpoint::from_shared(format!("http://{addr}"))
    }
}

/// Probes a server's health; returns the process exit code.
pub async fn health(args: HealthArgs) -> i32 {
    let endpoint = match endpoint(&args.addr) {
        Ok(e) => e.connect_timeout(args.timeout).timeout(args.timeout),
        Err(e) => {
            eprintln!("error: invalid --addr {}: {e}", args.addr);
            return exit::BAD_ARGUMENTS;
        }
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            eprintln!(
                "error: cannot connect to {}: {}",
                args.addr,
                source_chain(&e)
            );
            return exit::CONNECTION_FAILED;
        }
        Err(_) => {
            eprintln!("error: timed out connecting to {}", args.addr);
            return exit::CONNECTION_FAILED;
        }
    };
    let request = HealthCheckRequest {
        service: args.service.clone(),
    };
    let mut client = HealthClient::new(channel);
    match tokio::time::timeout_at(deadline, client.check(request)).await {
        Err(_) => {
            eprintln!("error: health check timed out");
            exit::CONNECTION_FAILED
        }
        Ok(Err(status)) if status.code() == Code::DeadlineExceeded => {
            eprintln!("error: health check timed out");
            exit::CONNECTION_FAILED
        }
        Ok(Err(status)) => {
            eprintln!(
                "error: health check failed: {}: {}",
                status.code(),
                status.message()
            );
            exit::RPC_FAILED
        }
        Ok(Ok(resp)) => {
            let status = resp.into_inner().status();
            println!("status: {}", status.as_str_name());
            if status == ServingStatus::Serving {
                exit::SERVING
            } else {
                exit::NOT_SERVING
            }
        }
    }
}

/// Runs a token command; returns the process exit code (0 done or valid, 1 invalid token,
/// 2 cannot connect, 3 the call failed).
pub async fn token(args: TokenArgs) -> i32 {
    let channel = match connect(&args.api.addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    report(run_token(TokenServiceClient::new(channel), args.command).await)
}

/// Prints a command's answer as JSON, or its error; the exit code.
fn report(result: Result<(Value, i32), TokenCliError>) -> i32 {
    match result {
        Ok((json, code)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json).expect("json prints")
            );
            code
        }
        Err(TokenCliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            exit::BAD_ARGUMENTS
        }
        Err(TokenCliError::Rpc(status)) => {
            eprintln!("error: {}: {}", status.code(), status.message());
            exit::RPC_FAILED
        }
    }
}

/// Runs an MFA command; returns the process exit code (0 done or valid, 1 invalid code,
/// 2 cannot connect, 3 the call failed).
pub async fn mfa(args: MfaArgs) -> i32 {
    if let MfaCommand::GenerateKey { kid } = &args.command {
        return generate_mfa_key(kid.as_deref());
    }
    let channel = match connect(&args.api.addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = pb::mfa_service_client::MfaServiceClient::new(channel);
    report(run_mfa(client, args.command).await)
}

fn generate_mfa_key(kid: Option<&str>) -> i32 {
    use base64::Engine;
    let kid = kid.map_or_else(
        || {
            let today = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            format!("mfa-{}", &today[..10])
        },
        str::to_owned,
    );
    let bytes = crate::mfa::seal::random::<{ crate::mfa::seal::KEY_LEN }>();
    let entry = format!(
        "{kid}:{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    if let Err(e) = crate::mfa::seal::Sealer::parse(&entry) {
        eprintln!("error: --kid: {e}");
        return exit::BAD_ARGUMENTS;
    }
    println!("{entry}");
    0
}

/// A channel to `addr`, or the exit code that says why there is none.
async fn connect(addr: &str) -> Result<Channel, i32> {
    match endpoint(addr) {
        Ok(e) => match e.connect_timeout(Duration::from_secs(5)).connect().await {
            Ok(c) => Ok(c),
            Err(e) => {
                eprintln!("error: cannot connect to {addr}: {}", source_chain(&e));
                Err(exit::CONNECTION_FAILED)
            }
        },
        Err(e) => {
            eprintln!("error: invalid --addr {addr}: {e}");
            Err(exit::BAD_ARGUMENTS)
        }
    }
}

async fn run_mfa(
    mut client: pb::mfa_service_client::MfaServiceClient<Channel>,
    command: MfaCommand,
) -> Result<(Value, i32), TokenCliError> {
    let reason = |r: pb::MfaInvalidReason| {
        r.as_str_name()
            .trim_start_matches("MFA_INVALID_REASON_")
            .to_lowercase()
    };
    Ok(match command {
        MfaCommand::Begin {
            subject,
            account_label,
        } => {
            let r = client
                .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {
                    subject,
                    account_label,
                })
                .await?
                .into_inner();
            (
                json!({
                    "secret": r.secret,
                    "otpauth_uri": r.otpauth_uri,
                    "expires_at": rfc3339(r.expires_at),
                }),
                0,
            )
        }
        MfaCommand::Confirm { subject, code } => {
            let r = client
                .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
                    subject,
                    code: read_arg(code)?,
                })
                .await?
                .into_inner();
            (json!({ "backup_codes": r.backup_codes }), 0)
        }
        MfaCommand::Verify { subject, code } => {
            let r = client
                .verify_totp(pb::VerifyTotpRequest {
                    subject,
                    code: read_arg(code)?,
                })
                .await?
                .into_inner();
            let out = if r.valid {
                json!({ "valid": true })
            } else {
                json!({ "valid": false, "reason": reason(r.reason()) })
            };
            (out, if r.valid { 0 } else { 1 })
        }
        MfaCommand::VerifyBackupCode { subject, code } => {
            let r = client
                .verify_backup_code(pb::VerifyBackupCodeRequest {
                    subject,
                    code: read_arg(code)?,
                })
                .await?
                .into_inner();
            let mut out = json!({
                "valid": r.valid,
                "backup_codes_remaining": r.backup_codes_remaining,
            });
            if !r.valid {
                out["reason"] = reason(r.reason()).into();
            }
            (out, if r.valid { 0 } else { 1 })
        }
        MfaCommand::Status { subject } => {
            let r = client
                .get_mfa_status(pb::GetMfaStatusRequest { subject })
                .await?
                .into_inner();
            (
                json!({
                    "enrolled": r.enrolled,
                    "enrolled_at": rfc3339(r.enrolled_at),
                    "backup_codes_remaining": r.backup_codes_remaining,
                    "pending_expires_at": rfc3339(r.pending_expires_at),
                }),
                0,
            )
        }
        MfaCommand::Disable { subject } => {
            let r = client
                .disable_mfa(pb::DisableMfaRequest { subject })
                .await?
                .into_inner();
            (json!({ "disabled": r.disabled }), 0)
        }
        MfaCommand::RegenerateBackupCodes { subject } => {
            let r = client
                .regenerate_backup_codes(pb::RegenerateBackupCodesRequest { subject })
                .await?
                .into_inner();
            (json!({ "backup_codes": r.backup_codes }), 0)
        }
        MfaCommand::GenerateKey { .. } => unreachable!("handled without a sidecar"),
    })
}

enum TokenCliError {
    Usage(String),
    Rpc(tonic::Status),
}

impl From<tonic::Status> for TokenCliError {
    fn from(s: tonic::Status) -> Self {
        TokenCliError::Rpc(s)
    }
}

async fn run_token(
    mut client: TokenServiceClient<Channel>,
    command: TokenCommand,
) -> Result<(Value, i32), TokenCliError> {
    match command {
        TokenCommand::Issue {
            subject,
            audience,
            ttl,
            claims,
            session_id,
            refresh,
        } => {
            let claims = match claims {
                None => None,
                Some(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(map)) => Some(json_to_struct(map)),
                    _ => {
                        return Err(TokenCliError::Usage(
                            "--claims must be a JSON object".into(),
                        ));
                    }
                },
            };
            let resp = client
                .issue(pb::IssueRequest {
                    subject,
                    audience,
                    ttl: ttl.map(|d| d.try_into().expect("a parsed duration fits")),
                    claims,
                    session_id: session_id.unwrap_or_default(),
                    kind: kind(refresh).into(),
                })
                .await?
                .into_inner();
            Ok((
                json!({
                    "token": resp.token,
                    "token_id": resp.token_id,
                    "expires_at": rfc3339(resp.expires_at),
                    "key_id": resp.key_id,
                }),
                0,
            ))
        }
        TokenCommand::Validate {
            token,
            audience,
            refresh,
        } => {
            let resp = client
                .validate(pb::ValidateRequest {
                    token: read_arg(token)?,
                    audience: audience.unwrap_or_default(),
                    kind: kind(refresh).into(),
                })
                .await?
                .into_inner();
            let out = if resp.valid {
                json!({
                    "valid": true,
                    "subject": resp.subject,
                    "token_id": resp.token_id,
                    "expires_at": rfc3339(resp.expires_at),
                    "session_id": resp.session_id,
                    "kind": resp.kind().as_str_name(),
                    "claims": resp.claims.and_then(|c| struct_to_json(c).ok()).unwrap_or_default(),
                })
            } else {
                json!({ "valid": false, "reason": resp.reason().as_str_name() })
            };
            Ok((out, if resp.valid { 0 } else { 1 }))
        }
        TokenCommand::Revoke {
            token,
            token_id,
            subject,
            reason,
        } => {
            use pb::revoke_request::Target;
            let target = match (token, token_id, subject) {
                (Some(t), _, _) => Target::Token(read_arg(t)?),
                (None, Some(id), _) => Target::TokenId(id),
                (None, None, Some(s)) => Target::Subject(s),
                (None, None, None) => {
                    return Err(TokenCliError::Usage(
                        "give --token, --token-id or --subject".into(),
                    ));
                }
            };
            let resp = client
                .revoke(pb::RevokeRequest {
                    target: Some(target),
                    reason,
                })
                .await?
                .into_inner();
            Ok((
                json!({
                    "newly_revoked": resp.newly_revoked,
                    "sessions_deleted": resp.sessions_deleted,
                }),
                0,
            ))
        }
    }
}

fn kind(refresh: bool) -> pb::TokenKind {
    if refresh {
        pb::TokenKind::Refresh
    } else {
        pb::TokenKind::Access
    }
}

/// The argument itself, or standard input when it is "-" (keeps tokens out of `ps`).
fn read_arg(arg: String) -> Result<String, TokenCliError> {
    if arg != "-" {
        return Ok(arg);
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| TokenCliError::Usage(format!("cannot read standard input: {e}")))?;
    Ok(text.trim().to_owned())
}

fn rfc3339(t: Option<prost_types::Timestamp>) -> Value {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string().into())
        .unwrap_or(Value::Null)
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
