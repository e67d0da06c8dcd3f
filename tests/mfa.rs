//! MfaService on every backend, over real gRPC: enrollment begun on one node and confirmed on
//! another, replayed codes refused across nodes, concurrent verifications and backup-code uses
//! of which exactly one wins, lockout seen on every node, nothing in clear in the store or the
//! logs, bad input named, and the start refused without a key. On the shared backends each
//! scenario runs on two nodes ("A" and "B"); on memory both are the same node. (pyotp, an
//! independent TOTP implementation, checks the codes and the URI in tests/interop.)

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_sidecar::mfa::totp;
use auth_sidecar::pb;
use auth_sidecar::pb::mfa_service_client::MfaServiceClient;
use pb::MfaInvalidReason as R;
use support::backends::{Backend, RedisServer, Storage, psql_on};
use support::{Deployment, Sidecar};
use tonic::Code;
use tonic::transport::Channel;

/// The MFA key every test node shares.
const KEY: &str = "test-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

type Mfa = MfaServiceClient<Channel>;

macro_rules! suite {
    ($name:ident, $backend:expr, $nodes:expr) => {
        mod $name {
            use super::*;

            fn start(args: &[&str]) -> Deployment {
                deploy(Storage::new($backend), $nodes, args)
            }

            #[tokio::test]
            async fn enrollment_crosses_nodes_and_codes_work_once() {
                super::enrollment_crosses_nodes_and_codes_work_once(&start(&[])).await
            }

            #[tokio::test]
            async fn concurrent_uses_of_one_code_accept_exactly_one() {
                super::concurrent_uses_of_one_code_accept_exactly_one(&start(&[])).await
            }

            #[tokio::test]
            async fn a_pending_enrollment_ends() {
                let d = start(&["--mfa-enrollment-ttl=1s"]);
                super::a_pending_enrollment_ends(&d).await
            }

            #[tokio::test]
            async fn lockout_holds_on_every_node() {
                let d = start(&["--mfa-verify-limit=3/1m:lockout=1m"]);
                super::lockout_holds_on_every_node(&d).await
            }
        }
    };
}

suite!(memory, Backend::Memory, 1);
suite!(redis, Backend::Redis, 2);
suite!(redis_cluster, Backend::RedisCluster, 2);
suite!(postgres, Backend::Postgres, 2);
suite!(pgbouncer, Backend::PgBouncer, 2);
suite!(tiered, Backend::Tiered, 2);

/// `n` nodes on `storage`, all with the test MFA key and room for the concurrent tests'
/// attempts unless `args` say otherwise.
fn deploy(mut storage: Storage, n: usize, args: &[&str]) -> Deployment {
    storage.env.push(("AUTH_MFA_KEY".into(), KEY.into()));
    let mut all = args.to_vec();
    if !args.iter().any(|a| a.starts_with("--mfa-verify-limit")) {
        all.push("--mfa-verify-limit=1000/1m");
    }
    Deployment::on(storage, n, &all)
}

async fn mfa(node: &Sidecar) -> Mfa {
    MfaServiceClient::new(node.channel().await)
}

/// Clients of the first and the last node.
async fn clients(d: &Deployment) -> (Mfa, Mfa) {
    (
        mfa(&d.nodes[0]).await,
        mfa(&d.nodes[d.nodes.len() - 1]).await,
    )
}

/// A unique subject.
fn subject(name: &str) -> String {
    format!(
        "{name}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn now_step() -> u64 {
    totp::step_at(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
}

/// The code of the base32 `secret` at time step `step`.
fn code(secret: &str, step: u64) -> String {
    let secret = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .expect("a base32 secret");
    totp::code(&secret, step)
}

async fn begin(c: &mut Mfa, subject: &str) -> pb::BeginTotpEnrollmentResponse {
    c.begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {
        subject: subject.into(),
        account_label: "user@example.com".into(),
    })
    .await
    .expect("begin")
    .into_inner()
}

async fn confirm(c: &mut Mfa, subject: &str, code: &str) -> Result<Vec<String>, tonic::Status> {
    c.confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
        subject: subject.into(),
        code: code.into(),
    })
    .await
    .map(|r| r.into_inner().backup_codes)
}

async fn verify(c: &mut Mfa, subject: &str, code: &str) -> Result<R, tonic::Status> {
    c.verify_totp(pb::VerifyTotpRequest {
        subject: subject.into(),
        code: code.into(),
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        assert_eq!(r.valid, r.reason() == R::Unspecified);
        r.reason()
    })
}

async fn backup(c: &mut Mfa, subject: &str, code: &str) -> (R, u32) {
    let r = c
        .verify_backup_code(pb::VerifyBackupCodeRequest {
            subject: subject.into(),
            code: code.into(),
        })
        .await
        .expect("verify backup code")
        .into_inner();
    assert_eq!(r.valid, r.reason() == R::Unspecified);
    (r.reason(), r.backup_codes_remaining)
}

async fn status(c: &mut Mfa, subject: &str) -> pb::GetMfaStatusResponse {
    c.get_mfa_status(pb::GetMfaStatusRequest {
        subject: subject.into(),
    })
    .await
    .expect("status")
    .into_inner()
}

/// Enrolls `subject` through `a` and `b`: the secret and the backup codes, with the step of
/// the confirming code spent.
async fn enroll(a: &mut Mfa, b: &mut Mfa, subject: &str) -> (String, Vec<String>, u64) {
    let begun = begin(a, subject).await;
    let step = now_step();
    let codes = confirm(b, subject, &code(&begun.secret, step))
        .await
        .expect("confirm on the other node");
    (begun.secret, codes, step)
}

async fn enrollment_crosses_nodes_and_codes_work_once(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let s = subject("alice");
    let begun = begin(&mut a, &s).await;
    assert_eq!(begun.secret.len(), 32, "160 bits in base32");
    assert!(
        begun
            .otpauth_uri
            .starts_with("otpauth://totp/auth-sidecar:user%40example.com?")
    );
    let pending = status(&mut b, &s).await;
    assert!(!pending.enrolled && pending.pending_expires_at.is_some());
    // Not enrolled yet: a code of the pending secret does not verify.
    let step = now_step();
    assert_eq!(
        verify(&mut b, &s, &code(&begun.secret, step))
            .await
            .unwrap(),
        R::NotEnrolled
    );
    // A wrong code does not confirm; the right one, on the other node, does.
    let wrong = format!(
        "{:06}",
        (code(&begun.secret, step).parse::<u32>().unwrap() + 1) % 1_000_000
    );
    let refused = confirm(&mut b, &s, &wrong).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let backup_codes = confirm(&mut b, &s, &code(&begun.secret, step))
        .await
        .unwrap();
    assert_eq!(backup_codes.len(), 10);
    // Confirmed once, on any node.
    let again = confirm(&mut a, &s, &code(&begun.secret, step))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let enrolled = status(&mut a, &s).await;
    assert!(enrolled.enrolled && enrolled.pending_expires_at.is_none());
    assert_eq!(enrolled.backup_codes_remaining, 10);

    // The confirming code is spent; the next step's code works once, on either node.
    assert_eq!(
        verify(&mut a, &s, &code(&begun.secret, step))
            .await
            .unwrap(),
        R::Replayed
    );
    let next = code(&begun.secret, step + 1);
    assert_eq!(verify(&mut a, &s, &next).await.unwrap(), R::Unspecified);
    assert_eq!(verify(&mut b, &s, &next).await.unwrap(), R::Replayed);
    assert_eq!(verify(&mut a, &s, &next).await.unwrap(), R::Replayed);
    assert_eq!(verify(&mut b, &s, &wrong).await.unwrap(), R::WrongCode);

    // Each backup code once, across nodes; case and dashes do not matter.
    assert_eq!(
        backup(&mut a, &s, &backup_codes[0].to_uppercase()).await,
        (R::Unspecified, 9)
    );
    assert_eq!(
        backup(&mut b, &s, &backup_codes[0]).await,
        (R::WrongCode, 9)
    );
    let undashed = backup_codes[1].replace('-', "");
    assert_eq!(backup(&mut b, &s, &undashed).await, (R::Unspecified, 8));
    // Another subject's code is not this one's.
    let other = subject("bob");
    let (_, bob_codes, _) = enroll(&mut a, &mut b, &other).await;
    assert_eq!(backup(&mut a, &s, &bob_codes[0]).await, (R::WrongCode, 8));

    // New codes replace the old ones.
    let fresh = a
        .regenerate_backup_codes(pb::RegenerateBackupCodesRequest { subject: s.clone() })
        .await
        .unwrap()
        .into_inner()
        .backup_codes;
    assert_eq!(fresh.len(), 10);
    assert_eq!(
        backup(&mut b, &s, &backup_codes[2]).await,
        (R::WrongCode, 10)
    );
    assert_eq!(backup(&mut b, &s, &fresh[0]).await, (R::Unspecified, 9));

    // Disabled on one node, gone on every node.
    let off = b
        .disable_mfa(pb::DisableMfaRequest { subject: s.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(off.disabled);
    assert!(!status(&mut a, &s).await.enrolled);
    let code_now = code(&begun.secret, now_step() + 1);
    assert_eq!(verify(&mut a, &s, &code_now).await.unwrap(), R::NotEnrolled);
    assert_eq!(backup(&mut a, &s, &fresh[1]).await, (R::NotEnrolled, 0));
    let regen = a
        .regenerate_backup_codes(pb::RegenerateBackupCodesRequest { subject: s.clone() })
        .await
        .unwrap_err();
    assert_eq!(regen.code(), Code::FailedPrecondition);
    let twice = b
        .disable_mfa(pb::DisableMfaRequest { subject: s })
        .await
        .unwrap();
    assert!(!twice.into_inner().disabled);
}

async fn concurrent_uses_of_one_code_accept_exactly_one(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let s = subject("carol");
    let (secret, backup_codes, step) = enroll(&mut a, &mut b, &s).await;

    // 20 verifications of one fresh code, half on each node, at once.
    let fresh = code(&secret, step + 1);
    let calls = (0..20).map(|i| {
        let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (s, fresh) = (s.clone(), fresh.clone());
        tokio::spawn(async move { verify(&mut c, &s, &fresh).await.unwrap() })
    });
    let verdicts: Vec<R> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let accepted = verdicts.iter().filter(|r| **r == R::Unspecified).count();
    assert_eq!(accepted, 1, "{verdicts:?}");
    assert!(
        verdicts
            .iter()
            .all(|r| matches!(r, R::Unspecified | R::Replayed))
    );

    // 20 uses of one backup code at once.
    let calls = (0..20).map(|i| {
        let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (s, code) = (s.clone(), backup_codes[3].clone());
        tokio::spawn(async move { backup(&mut c, &s, &code).await })
    });
    let spent: Vec<(R, u32)> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let valid = spent.iter().filter(|(r, _)| *r == R::Unspecified).count();
    assert_eq!(valid, 1, "{spent:?}");
    assert_eq!(status(&mut a, &s).await.backup_codes_remaining, 9);

    // Two confirms of one enrollment at once: one enrolls.
    let s = subject("dave");
    let begun = begin(&mut a, &s).await;
    let c = code(&begun.secret, now_step());
    let (x, y) = tokio::join!(confirm(&mut a, &s, &c), confirm(&mut b, &s, &c));
    assert!(x.is_ok() != y.is_ok(), "{x:?} {y:?}");
    let loser = x.err().or(y.err()).unwrap();
    assert_eq!(loser.code(), Code::FailedPrecondition, "{loser:?}");
}

async fn a_pending_enrollment_ends(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let s = subject("erin");
    let begun = begin(&mut a, &s).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(status(&mut b, &s).await.pending_expires_at.is_none());
    let late = confirm(&mut b, &s, &code(&begun.secret, now_step()))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(
        late.message().contains("no enrollment is pending"),
        "{late:?}"
    );
}

async fn lockout_holds_on_every_node(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let s = subject("frank");
    let (secret, _, step) = enroll(&mut a, &mut b, &s).await;
    let right = code(&secret, step + 1);
    let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
    // The confirm cleared the count: three wrong codes, across nodes, are answered.
    for mut c in [a.clone(), b.clone(), a.clone()] {
        assert_eq!(verify(&mut c, &s, &wrong).await.unwrap(), R::WrongCode);
    }
    // Then every attempt is refused, on both nodes, the right code too.
    for c in [&mut b, &mut a] {
        let locked = verify(c, &s, &right).await.unwrap_err();
        assert_eq!(locked.code(), Code::ResourceExhausted, "{locked:?}");
        let retry: u64 = locked
            .metadata()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
    }
    let locked = b
        .verify_backup_code(pb::VerifyBackupCodeRequest {
            subject: s.clone(),
            code: "aaaaa-aaaaa".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted);
    // Another subject is not locked.
    let other = subject("grace");
    assert_eq!(
        verify(&mut a, &other, &wrong).await.unwrap(),
        R::NotEnrolled
    );
}

/// The secrets and codes a store dump or a log must not hold: the secret in base32 and in the
/// other encodings a careless store could use, and the backup codes as shown and as typed.
fn secrets_of(secret: &str, backup_codes: &[String]) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let raw = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .unwrap();
    let mut all = vec![
        secret.to_owned(),
        secret.to_lowercase(),
        data_encoding::HEXLOWER.encode(&raw),
        STANDARD_NO_PAD.encode(&raw),
        URL_SAFE_NO_PAD.encode(&raw),
    ];
    for c in backup_codes {
        all.push(c.clone());
        all.push(c.replace('-', ""));
    }
    all
}

fn assert_holds_none(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "{what} holds {s} in clear");
    }
}

#[tokio::test]
async fn redis_and_the_logs_hold_no_secret_in_clear() {
    let server = RedisServer::start();
    let d = deploy(Storage::on_redis(&server), 2, &[]);
    let (mut a, mut b) = clients(&d).await;
    let s = subject("heidi");
    let (secret, backup_codes, _) = enroll(&mut a, &mut b, &s).await;
    let pending = subject("ivan");
    let pending_secret = begin(&mut b, &pending).await.secret;
    let mut dump = String::new();
    let keys = server.cli(&["--scan", "--pattern", "*"]);
    for key in keys.lines() {
        let kind = server.cli(&["type", key]);
        let value = match kind.as_str() {
            "hash" => server.cli(&["hgetall", key]),
            "string" => server.cli(&["get", key]),
            _ => String::new(),
        };
        dump.push_str(&format!("{key} {value}\n"));
    }
    assert!(
        dump.contains("mfa:"),
        "the dump holds the MFA records: {dump}"
    );
    let mut secrets = secrets_of(&secret, &backup_codes);
    secrets.push(pending_secret.clone());
    assert_holds_none("Redis", &dump, &secrets);
    for node in &d.nodes {
        assert_holds_none("a node's log", &node.logs().join("\n"), &secrets);
    }
}

#[tokio::test]
async fn postgres_holds_no_secret_in_clear() {
    let d = deploy(Storage::new(Backend::Postgres), 2, &[]);
    let (mut a, mut b) = clients(&d).await;
    let s = subject("judy");
    let (secret, backup_codes, _) = enroll(&mut a, &mut b, &s).await;
    let pending_secret = begin(&mut b, &subject("ken")).await.secret;
    let rows = psql_on(&d.storage.database_url(), "SELECT * FROM mfa");
    assert!(rows.contains(&s), "the rows hold the MFA records: {rows}");
    let mut secrets = secrets_of(&secret, &backup_codes);
    secrets.push(pending_secret);
    assert_holds_none("PostgreSQL", &rows, &secrets);
    for node in &d.nodes {
        assert_holds_none("a node's log", &node.logs().join("\n"), &secrets);
    }
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let d = deploy(Storage::new(Backend::Memory), 1, &[]);
    let mut c = mfa(&d.nodes[0]).await;
    let s = subject("leo");
    let invalid = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{status:?}"
        );
    };
    let begin_with = |subject: String, account_label: String| pb::BeginTotpEnrollmentRequest {
        subject,
        account_label,
    };
    invalid(
        c.begin_totp_enrollment(begin_with(String::new(), String::new()))
            .await
            .unwrap_err(),
        "subject",
    );
    invalid(
        c.begin_totp_enrollment(begin_with("x".repeat(1 << 20), String::new()))
            .await
            .unwrap_err(),
        "subject",
    );
    invalid(
        c.begin_totp_enrollment(begin_with(s.clone(), "y".repeat(1 << 20)))
            .await
            .unwrap_err(),
        "account_label",
    );
    invalid(
        c.begin_totp_enrollment(begin_with(s.clone(), "a:b".into()))
            .await
            .unwrap_err(),
        "account_label",
    );
    invalid(
        c.begin_totp_enrollment(begin_with("tenant:7".into(), String::new()))
            .await
            .unwrap_err(),
        "subject",
    );
    for code in ["12345", "1234567", "12a456", "", "１２３４５６"] {
        invalid(verify(&mut c, &s, code).await.unwrap_err(), "code");
        invalid(confirm(&mut c, &s, code).await.unwrap_err(), "code");
    }
    invalid(verify(&mut c, "", "123456").await.unwrap_err(), "subject");
    let bad_backup = c
        .verify_backup_code(pb::VerifyBackupCodeRequest {
            subject: s.clone(),
            code: "not-a-code!".into(),
        })
        .await
        .unwrap_err();
    invalid(bad_backup, "code");
    let oversized = c
        .get_mfa_status(pb::GetMfaStatusRequest {
            subject: "z".repeat(2 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::ResourceExhausted, "{oversized:?}");
    // The node still serves.
    assert!(!status(&mut c, &s).await.enrolled);
}

#[tokio::test]
async fn shared_storage_without_a_key_leaves_mfa_off_or_refuses_to_start() {
    let server = RedisServer::start();
    let storage = Storage::on_redis(&server);
    // auto: the node serves tokens; MFA says what is missing.
    let d = Deployment::on(storage, 1, &[]);
    let mut c = mfa(&d.nodes[0]).await;
    let off = c
        .get_mfa_status(pb::GetMfaStatusRequest {
            subject: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(off.code(), Code::FailedPrecondition);
    assert!(off.message().contains("AUTH_MFA_KEY"), "{off:?}");
    // on: the start is refused, with the reason.
    let (code, text) = Sidecar::builder()
        .storage(&d.storage)
        .arg("--mfa=on")
        .check_config();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("AUTH_MFA_KEY") && text.contains("same key"),
        "{text}"
    );
    // A key that does not parse: refused, and not echoed.
    let (code, text) = Sidecar::builder()
        .storage(&d.storage)
        .env("AUTH_MFA_KEY", "k1:c2VjcmV0LXNob3J0")
        .check_config();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("AUTH_MFA_KEY") && text.contains("32 random bytes"),
        "{text}"
    );
    assert!(!text.contains("c2VjcmV0LXNob3J0"), "{text}");
}

/// Two MFA keys, for rotations.
const OLD_KEY: &str = "old:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const NEW_KEY: &str = "new:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// One node on `server` with `AUTH_MFA_KEY=keys`.
fn with_mfa_keys(server: &RedisServer, keys: String) -> Deployment {
    let mut storage = Storage::on_redis(server);
    storage.env.push(("AUTH_MFA_KEY".into(), keys));
    Deployment::on(storage, 1, &[])
}

/// Keys rotate: a secret sealed under the old key still verifies once the new key leads, and
/// is sealed again under the new one when its code is accepted; a node without the old key
/// says which key it lacks for a secret nobody used meanwhile.
#[tokio::test]
async fn mfa_keys_rotate() {
    let server = RedisServer::start();
    let (old, new) = (OLD_KEY, NEW_KEY);
    let start = |keys: String| with_mfa_keys(&server, keys);
    let (s, t) = (subject("mallory"), subject("trent"));
    let ((secret, backup_codes, step), (t_secret, _, t_step)) = {
        let d = start(old.to_owned());
        let (mut a, mut b) = clients(&d).await;
        (
            enroll(&mut a, &mut b, &s).await,
            enroll(&mut a, &mut b, &t).await,
        )
    };
    {
        let d = start(format!("{new},{old}"));
        let mut c = mfa(&d.nodes[0]).await;
        // Accepted, and sealed again under `new` by the same step.
        assert_eq!(
            verify(&mut c, &s, &code(&secret, step + 1)).await.unwrap(),
            R::Unspecified
        );
        assert_eq!(
            backup(&mut c, &s, &backup_codes[0]).await,
            (R::Unspecified, 9)
        );
    }
    let d = start(new.to_owned());
    let mut c = mfa(&d.nodes[0]).await;
    // The resealed secret opens under `new` alone (its code was spent: a replay, not a
    // missing key); the one nobody used during the rotation names the key it lacks.
    assert_eq!(
        verify(&mut c, &s, &code(&secret, step + 1)).await.unwrap(),
        R::Replayed
    );
    let lacking = verify(&mut c, &t, &code(&t_secret, t_step + 1))
        .await
        .unwrap_err();
    assert_eq!(lacking.code(), Code::FailedPrecondition);
    assert!(lacking.message().contains("`old`"), "{lacking:?}");
    // Backup codes made under `old` go with it: regenerate them before removing it.
    assert_eq!(
        backup(&mut c, &s, &backup_codes[1]).await,
        (R::WrongCode, 9)
    );
}

/// An enrollment begun under the old key and confirmed during the rotation is sealed again
/// under the new key by the confirming step: a node with only the new key verifies it. (It
/// stayed sealed under the old key before, and such a node answered FAILED_PRECONDITION.)
#[tokio::test]
async fn an_enrollment_confirmed_during_a_rotation_is_sealed_under_the_new_key() {
    let server = RedisServer::start();
    let (old, new) = (OLD_KEY, NEW_KEY);
    let start = |keys: String| with_mfa_keys(&server, keys);
    let s = subject("victor");
    let begun = {
        let d = start(old.to_owned());
        begin(&mut mfa(&d.nodes[0]).await, &s).await
    };
    let step = now_step();
    {
        let d = start(format!("{new},{old}"));
        confirm(&mut mfa(&d.nodes[0]).await, &s, &code(&begun.secret, step))
            .await
            .expect("confirmed");
    }
    let records = server.cli(&["--scan", "--pattern", &format!("*mfa:{{*}}:{s}")]);
    let key = records.lines().next().expect("the MFA record");
    assert!(
        server.cli(&["HGET", key, "s"]).starts_with("new."),
        "still sealed under the old key"
    );
    let d = start(new.to_owned());
    assert_eq!(
        verify(
            &mut mfa(&d.nodes[0]).await,
            &s,
            &code(&begun.secret, step + 1)
        )
        .await
        .unwrap(),
        R::Unspecified
    );
}

/// `auth-sidecar mfa` drives the same calls for an operator.
#[tokio::test]
async fn the_mfa_cli_mirrors_the_rpcs() {
    let d = deploy(Storage::new(Backend::Memory), 1, &[]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
            .arg("mfa")
            .args(args)
            .args(["--addr", &d.nodes[0].api])
            .output()
            .unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let s = subject("nina");
    let (rc, begun, _) = run(&["begin", "--subject", &s]);
    assert_eq!(rc, 0);
    let secret = begun["secret"].as_str().unwrap().to_owned();
    let step = now_step();
    let (rc, confirmed, _) = run(&["confirm", "--subject", &s, "--code", &code(&secret, step)]);
    assert_eq!(rc, 0);
    assert_eq!(confirmed["backup_codes"].as_array().unwrap().len(), 10);
    let (rc, verified, _) = run(&["verify", "--subject", &s, "--code", &code(&secret, step)]);
    assert_eq!((rc, verified["reason"].as_str()), (1, Some("replayed")));
    let (rc, verified, _) = run(&[
        "verify",
        "--subject",
        &s,
        "--code",
        &code(&secret, step + 1),
    ]);
    assert_eq!((rc, verified["valid"].as_bool()), (0, Some(true)));
    let (rc, st, _) = run(&["status", "--subject", &s]);
    assert_eq!((rc, st["enrolled"].as_bool()), (0, Some(true)));
    let (rc, _, err) = run(&["verify", "--subject", &s, "--code", "12"]);
    assert_eq!(rc, 3);
    assert!(err.contains("code: must be 6 digits"), "{err}");
    let (rc, off, _) = run(&["disable", "--subject", &s]);
    assert_eq!((rc, off["disabled"].as_bool()), (0, Some(true)));
    let key = std::process::Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
        .args(["mfa", "generate-key", "--kid", "k9"])
        .output()
        .unwrap();
    let key = String::from_utf8(key.stdout).unwrap();
    assert!(
        auth_sidecar::mfa::seal::Sealer::parse(key.trim()).is_ok(),
        "{key}"
    );
    assert!(key.starts_with("k9:"));
}

/// Nodes with different MFA keys report each other (a secret one seals, the other cannot
/// open), in the metric and the log, and the keys are in neither.
#[tokio::test]
async fn nodes_with_different_mfa_keys_report_each_other() {
    let storage = Storage::new(Backend::Redis);
    let other = "test-2:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let start = |id: &str, key: &str| {
        Sidecar::builder()
            .storage(&storage)
            .args([
                format!("--node-id={id}"),
                "--cluster-heartbeat=300ms".into(),
            ])
            .env("AUTH_MFA_KEY", key)
            .start()
    };
    let a = start("mfa-a", KEY);
    let b = start("mfa-b", other);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.metric("authsidecar_cluster_disagreements", &["item=\"mfa\""]) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no mfa disagreement reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = a.logs().join("\n");
    assert!(log.contains("under key test-2"), "{log}");
    for node in [&a, &b] {
        let text = node.logs().join("\n");
        assert!(
            !text.contains("AAECAwQF") && !text.contains("ICEiIyQl"),
            "a key in a log"
        );
    }
}
