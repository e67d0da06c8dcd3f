//! Signing keys in a PKCS#11 token (SoftHSM2, a throwaway token per test): every algorithm the
//! token supports issues tokens the sidecar and the JWKS verify, 64 concurrent Issues on one
//! key, the attributes of a generated key read back with OpenSC's pkcs11-tool, rotation from a
//! file key to an HSM key and back under load, a token that stops signing, a wrong PIN and a
//! missing label at start. (PyJWT verifies HSM-signed tokens in tests/interop/python.)

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use auth_sidecar::pb;
use support::hsm::{PIN, SoftHsm};
use support::{Client, Sidecar, SidecarBuilder};
use tempfile::TempDir;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_auth-sidecar");

/// A keys directory whose manifest is `entries`, replaced whole.
fn write_manifest(dir: &Path, entries: &[String]) {
    let tmp = dir.join(".keys.toml.tmp");
    std::fs::write(&tmp, entries.join("\n")).unwrap();
    std::fs::rename(tmp, dir.join("keys.toml")).unwrap();
}

/// A `keys generate` entry with its state set.
fn with_state(entry: &str, state: &str) -> String {
    entry.replace("state = \"verify\"", &format!("state = \"{state}\""))
}

/// `keys generate` of an ES256 file key into `dir`: its manifest entry (`verify`).
fn file_key(dir: &Path, kid: &str) -> String {
    let out = Command::new(BIN)
        .args(["keys", "generate", "--alg", "ES256", "--kid", kid, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn builder(hsm: &SoftHsm, keys: &Path) -> SidecarBuilder {
    hsm.env()
        .into_iter()
        .fold(Sidecar::builder().keys_dir(keys), |b, (k, v)| b.env(k, v))
        .arg("--backend-check-interval=200ms")
}

#[tokio::test]
async fn every_algorithm_softhsm_supports_signs_in_the_token() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    // SoftHSM2 2.6 signs all five: CKM_ECDSA (P-256, P-384), CKM_EDDSA (Ed25519),
    // CKM_SHA256_RSA_PKCS and CKM_SHA256_RSA_PKCS_PSS.
    let algs = ["ES256", "ES384", "EdDSA", "RS256", "PS256"];
    let entries: Vec<String> = algs
        .iter()
        .map(|alg| hsm.generate(alg, &format!("hsm-{alg}")))
        .collect();
    for (i, alg) in algs.iter().enumerate() {
        let manifest: Vec<String> = entries
            .iter()
            .enumerate()
            .map(|(j, e)| with_state(e, if i == j { "active" } else { "verify" }))
            .collect();
        write_manifest(keys.path(), &manifest);
        let node = builder(&hsm, keys.path()).start();
        let mut client = node.client().await;
        let issued = client.issue("alice").await;
        assert_eq!(issued.key_id, format!("hsm-{alg}"));
        let header = jsonwebtoken::decode_header(&issued.token).unwrap();
        assert_eq!(format!("{:?}", header.alg), *alg);
        client.assert_valid(&issued.token).await;
        support::verify_with_jwks(&issued.token, &support::jwks(&mut client).await.jwks_json);
        let log = node.logs().join("\n");
        assert!(!log.contains(PIN), "the PIN in the log");
    }
}

#[tokio::test]
async fn sixty_four_concurrent_issues_on_one_hsm_key_all_verify() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let entry = hsm.generate("ES256", "hsm-1");
    write_manifest(
        keys.path(),
        &[with_state(&entry, "active") + "sessions = 4\n"],
    );
    let node = builder(&hsm, keys.path()).start();
    let channel = node.channel().await;
    let calls = (0..64).map(|i| {
        let mut client = Client(pb::token_service_client::TokenServiceClient::new(
            channel.clone(),
        ));
        tokio::spawn(async move { client.issue(&format!("user-{i}")).await })
    });
    let issued: Vec<pb::IssueResponse> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut client = node.client().await;
    let jwks_json = support::jwks(&mut client).await.jwks_json;
    for token in &issued {
        assert_eq!(token.key_id, "hsm-1");
        client.assert_valid(&token.token).await;
        support::verify_with_jwks(&token.token, &jwks_json);
    }
}

#[test]
fn a_generated_key_is_sensitive_and_never_extractable() {
    let hsm = SoftHsm::new();
    let entry = hsm.generate("ES256", "made-here");
    assert!(entry.contains("source = \"pkcs11\"") && entry.contains("label = \"made-here\""));
    let listing = hsm.pkcs11_tool(&[
        "--list-objects",
        "--type",
        "privkey",
        "--label",
        "made-here",
    ]);
    let access = listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("Access:"))
        .unwrap_or_else(|| panic!("no Access line: {listing}"));
    for flag in ["sensitive", "always sensitive", "never extractable"] {
        assert!(access.contains(flag), "{flag} missing: {access}");
    }
    let usage = listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage:"))
        .unwrap_or_default();
    assert_eq!(usage.trim(), "sign", "a signing key only: {listing}");
    // A second key under the same label is refused, not made.
    let again = hsm.try_run(
        BIN,
        &[
            "keys",
            "generate",
            "--pkcs11",
            "--alg",
            "ES256",
            "--kid",
            "made-here",
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already"));
}

/// Issues and validates on `node` until told to stop; the rejected tokens and the kids seen.
fn load(
    node: &Sidecar,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, Vec<String>)> {
    let api = node.api.clone();
    tokio::spawn(async move {
        let channel = support::connect(&api).await;
        let mut client = Client(pb::token_service_client::TokenServiceClient::new(channel));
        let (mut rejected, mut kids) = (Vec::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let token = client.issue("alice").await;
            if kids.last() != Some(&token.key_id) {
                kids.push(token.key_id.clone());
            }
            let verdict = client.validate(&token.token).await.unwrap();
            if !verdict.valid {
                rejected.push(format!("{:?} by {}", verdict.reason(), token.key_id));
            }
        }
        (rejected, kids)
    })
}

/// The README's rotation from a file key to an HSM key and back, under constant load.
#[tokio::test]
async fn rotation_between_a_file_key_and_an_hsm_key_rejects_no_token() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let file_entry = file_key(keys.path(), "file-1");
    let hsm_entry = hsm.generate("ES256", "hsm-1");
    write_manifest(keys.path(), &[with_state(&file_entry, "active")]);
    let node = builder(&hsm, keys.path()).start();
    let mut watch = node.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = load(&node, stop.clone());
    let early = watch.issue("early").await;
    for (manifest, signer) in [
        (
            vec![
                with_state(&file_entry, "active"),
                with_state(&hsm_entry, "verify"),
            ],
            "file-1",
        ),
        (
            vec![
                with_state(&file_entry, "verify"),
                with_state(&hsm_entry, "active"),
            ],
            "hsm-1",
        ),
        (
            vec![
                with_state(&file_entry, "active"),
                with_state(&hsm_entry, "verify"),
            ],
            "file-1",
        ),
    ] {
        write_manifest(keys.path(), &manifest);
        support::wait_until("the key set changes", async || {
            let j = support::jwks(&mut watch).await;
            j.active_key_id == signer && j.jwks_json.contains("\"hsm-1\"")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (rejected, kids) = task.await.unwrap();
    assert!(
        rejected.is_empty(),
        "{} rejected: {:?}",
        rejected.len(),
        rejected.first()
    );
    assert_eq!(kids, ["file-1", "hsm-1", "file-1"], "the signers in turn");
    watch.assert_valid(&early.token).await;
}

/// A token that stops signing takes the node out of service, and Issue is UNAVAILABLE, never
/// a token signed by another key; when it signs again, so does the node.
#[tokio::test]
async fn a_token_that_stops_signing_makes_the_node_not_serving() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let pem = es256_pem(keys.path(), "imported.pem");
    hsm.import(&pem, "imported", "0a0b");
    let backup = keys.path().join("backup.pem");
    std::fs::rename(&pem, &backup).unwrap();
    // A file key that could sign, as `verify`: it must not stand in.
    let file_entry = file_key(keys.path(), "file-1");
    write_manifest(
        keys.path(),
        &[
            "[[key]]\nkid = \"hsm\"\nalg = \"ES256\"\nsource = \"pkcs11\"\nlabel = \"imported\"\nstate = \"active\"\n".to_owned(),
            file_entry,
        ],
    );
    let node = builder(&hsm, keys.path()).start();
    node.wait_ops_status(200, Duration::from_secs(5));
    let mut client = node.client().await;
    assert_eq!(client.issue("a").await.key_id, "hsm");

    hsm.delete_private("imported");
    node.wait_ops_status(503, Duration::from_secs(5));
    assert_issue_unavailable(&mut client).await;
    let healthz = support::http_get(node.ops, "/healthz");
    assert!(healthz.body.contains("does not sign"), "{}", healthz.body);
    let mut health = node.health().await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );

    hsm.import(&backup, "imported", "0a0b");
    node.wait_ops_status(200, Duration::from_secs(5));
    assert_eq!(client.issue("a").await.key_id, "hsm");
}

/// Each signature the token returns is checked with the public key published: a private key
/// swapped under the same label and id while the node serves mints nothing (a token nobody
/// could verify); Issue is UNAVAILABLE.
#[tokio::test]
async fn a_token_that_signs_with_another_key_mints_nothing() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let pem = |name: &str| es256_pem(keys.path(), name);
    let (first, second) = (pem("first.pem"), pem("second.pem"));
    hsm.import(&first, "swap", "0101");
    write_manifest(
        keys.path(),
        &["[[key]]\nkid = \"hsm\"\nalg = \"ES256\"\nsource = \"pkcs11\"\nlabel = \"swap\"\nid = \"0101\"\nstate = \"active\"\n".to_owned()],
    );
    let node = builder(&hsm, keys.path()).start();
    let mut client = node.client().await;
    client.issue("a").await;
    hsm.delete_private("swap");
    hsm.import(&second, "swap", "0101");
    assert_issue_unavailable(&mut client).await;
    node.wait_ops_status(503, Duration::from_secs(5));
    let healthz = support::http_get(node.ops, "/healthz");
    assert!(
        healthz.body.contains("signed with another key"),
        "{}",
        healthz.body
    );
}

/// A new ES256 key pair as PKCS#8 PEM at `dir/name`.
fn es256_pem(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        auth_sidecar::keys::generate(auth_sidecar::keys::Alg::ES256).unwrap(),
    )
    .unwrap();
    path
}

/// Issue is refused with UNAVAILABLE: no token, and none signed by another key.
async fn assert_issue_unavailable(client: &mut Client) {
    let refused = client
        .issue_with(pb::IssueRequest {
            subject: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

/// `serve` with the keys directory, waited for: its exit code and its output.
fn serve_once(hsm_env: Vec<(&'static str, String)>, keys: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "off", "--keys-dir"])
        .arg(keys)
        .envs(hsm_env)
        .env_remove("AUTH_JWT_SECRET")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_wrong_pin_or_a_missing_label_stops_the_start_with_the_reason() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let entry = hsm.generate("ES256", "hsm-1");
    write_manifest(keys.path(), &[with_state(&entry, "active")]);
    let wrong = "wrong-pin-31337";
    let env: Vec<_> = hsm
        .env()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                if k == "PKCS11_PIN" {
                    wrong.to_owned()
                } else {
                    v
                },
            )
        })
        .collect();
    let (code, text) = serve_once(env, keys.path());
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("PIN is incorrect") && text.contains("hsm-1"),
        "{text}"
    );
    assert!(!text.contains(wrong), "the PIN echoed: {text}");

    write_manifest(
        keys.path(),
        &[with_state(&entry, "active").replace("label = \"hsm-1\"", "label = \"nowhere\"")],
    );
    let (code, text) = serve_once(hsm.env(), keys.path());
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("no private key with label `nowhere`"),
        "{text}"
    );
    // keys check says the same.
    let check = hsm.try_run(
        BIN,
        &[
            "keys",
            "check",
            "--keys-dir",
            &keys.path().display().to_string(),
        ],
    );
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("label `nowhere`"));

    // Without the module or the PIN, the setting is named.
    write_manifest(keys.path(), &[with_state(&entry, "active")]);
    let no_module: Vec<_> = hsm
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "CRYPTOKI_LIB")
        .collect();
    let (code, text) = serve_once(no_module, keys.path());
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("CRYPTOKI_LIB"), "{text}");
    let no_pin: Vec<_> = hsm
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "PKCS11_PIN")
        .collect();
    let (code, text) = serve_once(no_pin, keys.path());
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("PKCS11_PIN"), "{text}");
    // The PIN from a file (a mounted Secret).
    let pin_file = keys.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    let mut from_file: Vec<_> = hsm
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "PKCS11_PIN")
        .collect();
    from_file.push(("PKCS11_PIN_FILE", pin_file.display().to_string()));
    let check = Command::new(BIN)
        .args(["keys", "check", "--keys-dir"])
        .arg(keys.path())
        .envs(from_file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// A refresh whose successor cannot be signed (the token lost its key) answers UNAVAILABLE and
/// spends nothing, however often it is retried: once the key is back, the same refresh token
/// refreshes. (Before the successor was signed first, the retry found its token spent and
/// revoked the family.)
#[tokio::test]
async fn a_refresh_that_cannot_sign_spends_nothing_and_the_retry_refreshes() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let pem = es256_pem(keys.path(), "k.pem");
    hsm.import(&pem, "refresh", "0c0d");
    write_manifest(
        keys.path(),
        &["[[key]]\nkid = \"hsm\"\nalg = \"ES256\"\nsource = \"pkcs11\"\nlabel = \"refresh\"\nstate = \"active\"\n".to_owned()],
    );
    let node = builder(&hsm, keys.path()).start();
    let mut client = node.client().await;
    let refresh = client.issue_refresh("carol").await;

    hsm.delete_private("refresh");
    // However often the client retries during the outage.
    for _ in 0..3 {
        let refused = client.refresh(&refresh).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    }
    hsm.import(&pem, "refresh", "0c0d");
    let renewed = client.refresh(&refresh).await.expect("the retry refreshes");
    client.assert_valid(&renewed.access.unwrap().token).await;
    // And the family goes on: the new refresh token refreshes too.
    client
        .refresh(&renewed.refresh.unwrap().token)
        .await
        .unwrap();
}

/// A key whose private object was replaced by another key's (`--set-id`), and then put back,
/// signs again at the next probe: the handle that signed with the other key is looked up
/// again rather than kept.
#[tokio::test]
async fn an_hsm_key_whose_object_was_swapped_and_restored_serves_again_at_once() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let pem = |name: &str| es256_pem(keys.path(), name);
    let (first, second) = (pem("f1.pem"), pem("f2.pem"));
    hsm.import(&first, "k1", "f1");
    hsm.import(&second, "k2", "f2");
    write_manifest(
        keys.path(),
        &["[[key]]\nkid = \"hsm\"\nalg = \"ES256\"\nsource = \"pkcs11\"\nid = \"f1\"\nstate = \"active\"\n".to_owned()],
    );
    let node = builder(&hsm, keys.path()).start();
    node.wait_ops_status(200, Duration::from_secs(5));
    let mut client = node.client().await;
    client.issue("a").await;

    hsm.pkcs11_tool(&["--delete-object", "--type", "privkey", "--id", "f1"]);
    hsm.pkcs11_tool(&["--set-id", "f1", "--type", "privkey", "--id", "f2"]);
    assert_issue_unavailable(&mut client).await;
    node.wait_ops_status(503, Duration::from_secs(5));

    hsm.pkcs11_tool(&["--set-id", "f2", "--type", "privkey", "--id", "f1"]);
    hsm.pkcs11_tool(&["--delete-object", "--type", "pubkey", "--id", "f1"]);
    hsm.import(&first, "k1", "f1");
    node.wait_ops_status(200, Duration::from_secs(2));
    assert_eq!(client.issue("a").await.key_id, "hsm");
}

/// A 1024-bit RSA key in the token is refused at start as too small, naming the minimum, not
/// as a pair that does not verify.
#[test]
fn a_small_rsa_key_is_refused_as_too_small() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    hsm.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "rsa:1024",
        "--label",
        "small",
        "--id",
        "5a",
    ]);
    write_manifest(
        keys.path(),
        &["[[key]]\nkid = \"small\"\nalg = \"RS256\"\nsource = \"pkcs11\"\nlabel = \"small\"\nstate = \"active\"\n".to_owned()],
    );
    let (code, text) = serve_once(hsm.env(), keys.path());
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("1024 bits, too small") && text.contains("at least 2048 bits"),
        "{text}"
    );
}

/// Two nodes whose active key is in the token, with a file key beside it, compare their admin
/// credentials under the file key (the one the admin cookie uses): different passwords are a
/// disagreement, the same ones are not. (With an HSM key active, nodes published no
/// fingerprint, so different passwords passed as "every live node agrees", and a file-active
/// node saw "no password" on them.)
#[test]
fn hsm_active_nodes_compare_their_admin_passwords() {
    let hsm = SoftHsm::new();
    let keys = TempDir::new().unwrap();
    let hsm_entry = with_state(&hsm.generate("ES256", "hsm-admin"), "active");
    let file_entry = file_key(keys.path(), "file-admin");
    write_manifest(keys.path(), &[hsm_entry, file_entry]);
    let storage = support::backends::Storage::new(support::backends::Backend::Redis);
    let node = |id: &str, password: &str| {
        builder(&hsm, keys.path())
            .storage(&storage)
            .args(["--node-id", id, "--cluster-heartbeat", "200ms"])
            .env("ADMIN_GUI_PASSWORD", password)
            .start()
    };
    let (a, b) = (node("a", "one password"), node("b", "another password"));
    let wait_for = |n: &Sidecar, text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let body = support::http_get(n.ops, "/healthz").body;
            if body.contains(text) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{text} never shown: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let body = wait_for(&a, "user name or password differs on node b");
    assert!(!body.contains("no password"), "{body}");
    drop(b);
    let _c = node("c", "one password");
    wait_for(&a, "every live node agrees");
}
