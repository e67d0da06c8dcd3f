//! Key sets from a keys directory: every algorithm, a token checked only with the key its
//! `kid` names, the JWKS, rotation across two nodes with no valid token rejected, and a broken
//! key file that does not take a node down.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use auth_sidecar::keys::{Alg, KeyState, SigningKey};
use auth_sidecar::pb;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pb::InvalidReason as R;
use serde_json::{Value, json};
use support::backends::{Backend, Storage};
use support::{Client, Sidecar, http_get, http_get_as, now, parts};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_auth-sidecar");

/// A keys directory, changed the way an operator would: key files made by
/// `auth-sidecar keys generate`, and a manifest replaced whole.
struct KeysDir {
    dir: TempDir,
    /// kid -> (alg, file, state), in manifest order.
    entries: Vec<(String, Alg, String, &'static str)>,
}

impl KeysDir {
    fn new() -> KeysDir {
        KeysDir {
            dir: tempfile::tempdir().unwrap(),
            entries: Vec::new(),
        }
    }

    /// A directory with one active key of `alg`.
    fn with_active(alg: Alg, kid: &str) -> KeysDir {
        let mut keys = KeysDir::new();
        keys.generate(alg, kid);
        keys.set(kid, "active");
        keys
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `keys generate`; the key is in no manifest until [`KeysDir::set`].
    fn generate(&mut self, alg: Alg, kid: &str) {
        let out = Command::new(BIN)
            .args([
                "keys",
                "generate",
                "--alg",
                alg.as_str(),
                "--kid",
                kid,
                "--dir",
            ])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entry = String::from_utf8(out.stdout).unwrap();
        assert!(entry.contains(&format!("kid = \"{kid}\"")), "{entry}");
        let file = format!("{kid}.{}", if alg.is_hmac() { "secret" } else { "pem" });
        self.entries.push((kid.to_owned(), alg, file, "unlisted"));
    }

    fn text(&self, kid: &str) -> String {
        let (_, _, file, _) = self.entries.iter().find(|e| e.0 == kid).unwrap();
        std::fs::read_to_string(self.path().join(file)).unwrap()
    }

    /// Sets a key's state and replaces the manifest atomically.
    fn set(&mut self, kid: &str, state: &'static str) {
        self.update(&[(kid, state)]);
    }

    /// Sets several keys' states in one replacement of the manifest.
    fn update(&mut self, changes: &[(&str, &'static str)]) {
        for (kid, state) in changes {
            self.entries.iter_mut().find(|e| e.0 == *kid).unwrap().3 = state;
        }
        let mut manifest = String::new();
        for (kid, alg, file, state) in &self.entries {
            if *state != "unlisted" {
                manifest += &format!(
                    "[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\nfile = \"{file}\"\nstate = \"{state}\"\n\n"
                );
            }
        }
        let tmp = self.path().join(".keys.toml.tmp");
        std::fs::write(&tmp, manifest).unwrap();
        std::fs::rename(tmp, self.path().join("keys.toml")).unwrap();
    }

    /// The key as this test's own signer, to forge tokens with.
    fn signer(&self, kid: &str) -> SigningKey {
        let (_, alg, _, _) = self.entries.iter().find(|e| e.0 == kid).unwrap();
        let text = self.text(kid);
        if alg.is_hmac() {
            SigningKey::hmac(
                kid.into(),
                *alg,
                KeyState::Active,
                text.trim_end().as_bytes(),
            )
            .unwrap()
        } else {
            SigningKey::from_pem(kid.into(), *alg, KeyState::Active, text.as_bytes()).unwrap()
        }
    }
}

fn start(keys: &KeysDir) -> Sidecar {
    Sidecar::builder().keys_dir(keys.path()).start()
}

/// A token of `claims` under `header`, signed by `key`.
fn sign(key: &SigningKey, header: &Value, claims: &Value) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(message.as_bytes()).unwrap();
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Claims the sidecar would accept for another minute.
fn fresh_claims() -> Value {
    json!({
        "iss": "auth-sidecar", "sub": "mallory", "iat": now(), "exp": now() + 60,
        "jti": auth_sidecar::tokens::random_id(), "typ": "access",
    })
}

#[tokio::test]
async fn every_algorithm_issues_tokens_that_it_and_the_jwks_verify() {
    for alg in Alg::ALL {
        let keys = KeysDir::with_active(alg, &format!("{alg}-1"));
        let sidecar = start(&keys);
        let mut client = sidecar.client().await;
        let issued = client.issue("alice").await;
        let (header, _) = parts(&issued.token);
        assert_eq!(header["alg"], alg.as_str());
        assert_eq!(header["kid"], format!("{alg}-1"));
        assert_eq!(issued.key_id, format!("{alg}-1"));
        assert_eq!(client.assert_valid(&issued.token).await.subject, "alice");

        let jwks = support::jwks(&mut client).await;
        assert_eq!(jwks.active_key_id, format!("{alg}-1"));
        let http = http_get(sidecar.ops, "/.well-known/jwks.json");
        assert_eq!(http.status, 200);
        assert_eq!(http.body, jwks.jwks_json);
        if alg.is_hmac() {
            assert_eq!(
                jwks.jwks_json, r#"{"keys":[]}"#,
                "an HMAC secret is never published"
            );
        } else {
            assert_eq!(
                support::verify_with_jwks(&issued.token, &jwks.jwks_json)["sub"],
                "alice"
            );
        }
    }
}

#[tokio::test]
async fn a_token_is_checked_only_with_the_key_its_kid_names_and_that_keys_algorithm() {
    let mut keys = KeysDir::with_active(Alg::ES256, "es-a");
    keys.generate(Alg::ES256, "es-b");
    keys.set("es-b", "verify");
    keys.generate(Alg::RS256, "rsa");
    keys.set("rsa", "verify");
    let sidecar = start(&keys);
    let mut client = sidecar.client().await;

    // Signed by one key, naming another of the same algorithm.
    let es_a = keys.signer("es-a");
    let swapped = sign(
        &es_a,
        &json!({"alg": "ES256", "kid": "es-b"}),
        &fresh_claims(),
    );
    client.assert_rejected(&swapped, R::BadSignature).await;
    let honest = sign(
        &es_a,
        &json!({"alg": "ES256", "kid": "es-a"}),
        &fresh_claims(),
    );
    client.assert_valid(&honest).await;

    // The header names another algorithm than the key's.
    let es384 = sign(
        &es_a,
        &json!({"alg": "ES384", "kid": "es-a"}),
        &fresh_claims(),
    );
    client.assert_rejected(&es384, R::BadSignature).await;
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "es-a"}).to_string()),
        URL_SAFE_NO_PAD.encode(fresh_claims().to_string())
    );
    client.assert_rejected(&none, R::BadSignature).await;

    // The classic confusion: HS256 keyed with the RSA public key, in every form a verifier
    // could be tricked into using as the secret.
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(
        pem::parse(keys.text("rsa")).unwrap().contents(),
    )
    .unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()));
    for secret in [public_pem.as_bytes(), spki.as_ref()] {
        let hmac = SigningKey::hmac("rsa".into(), Alg::HS256, KeyState::Active, secret).unwrap();
        let forged = sign(
            &hmac,
            &json!({"alg": "HS256", "kid": "rsa"}),
            &fresh_claims(),
        );
        client.assert_rejected(&forged, R::BadSignature).await;
    }

    let unknown = sign(
        &es_a,
        &json!({"alg": "ES256", "kid": "es-z"}),
        &fresh_claims(),
    );
    client.assert_rejected(&unknown, R::UnknownKey).await;
    let no_kid = sign(&es_a, &json!({"alg": "ES256"}), &fresh_claims());
    client.assert_rejected(&no_kid, R::UnknownKey).await;
}

#[tokio::test]
async fn jwks_is_cacheable_and_discoverable() {
    let mut keys = KeysDir::with_active(Alg::EdDSA, "ed");
    keys.generate(Alg::HS512, "hs");
    keys.set("hs", "verify");
    keys.generate(Alg::PS256, "ps");
    keys.set("ps", "retired");
    let sidecar = Sidecar::builder()
        .keys_dir(keys.path())
        .arg("--jwks-max-age=90s")
        .arg("--public-url=https://auth.example.com/")
        .start();
    let http = http_get(sidecar.ops, "/.well-known/jwks.json");
    assert_eq!(http.header("cache-control"), Some("public, max-age=90"));
    assert_eq!(http.header("content-type"), Some("application/json"));
    let set: Value = serde_json::from_str(&http.body).unwrap();
    let kids: Vec<_> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["kid"])
        .collect();
    assert_eq!(
        kids,
        [&json!("ed")],
        "no HMAC secret, no retired key: {set}"
    );
    assert_eq!(set["keys"][0]["kty"], "OKP");
    assert_eq!(set["keys"][0]["use"], "sig");

    // Discovery is made from --public-url; the Host a caller sends never appears.
    let discovery = http_get_as(
        sidecar.ops,
        "/.well-known/openid-configuration",
        "evil.example",
    );
    let doc: Value = serde_json::from_str(&discovery.body).unwrap();
    assert_eq!(doc["issuer"], "auth-sidecar");
    assert_eq!(
        doc["jwks_uri"],
        "https://auth.example.com/.well-known/jwks.json"
    );
    for path in ["/.well-known/jwks.json", "/healthz", "/health", "/metrics"] {
        let http = http_get_as(sidecar.ops, path, "evil.example");
        assert!(!http.body.contains("evil.example"), "{path}: {}", http.body);
        assert!(
            http.headers
                .iter()
                .all(|(_, v)| !v.contains("evil.example")),
            "{path}"
        );
    }
    // Without --public-url it is not served at all.
    let plain = Sidecar::start();
    assert_eq!(plain.ops_get("/.well-known/openid-configuration"), 404);
    assert_eq!(plain.ops_get("/health"), 200);
    // The token API is not on the ops listener.
    assert_eq!(sidecar.ops_get("/authsidecar.v1.TokenService/GetJwks"), 404);
}

/// Issues on `from` and validates each token on `to` at once, until told to stop.
fn cross_load(
    mut from: Client,
    mut to: Client,
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(Vec<String>, BTreeMap<String, u64>)> {
    tokio::spawn(async move {
        let mut rejected = Vec::new();
        let mut by_kid = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let token = from.issue("alice").await;
            *by_kid.entry(token.key_id.clone()).or_default() += 1;
            issued.fetch_add(1, Ordering::Relaxed);
            let verdict = to.validate(&token.token).await.expect("validate");
            if !verdict.valid {
                rejected.push(format!(
                    "{} signed by {}",
                    verdict.reason().as_str_name(),
                    token.key_id
                ));
            }
        }
        (rejected, by_kid)
    })
}

/// The README's rotation, walked through file changes on two nodes that each have their own
/// copy of the keys directory and see each step at a different moment.
#[tokio::test]
async fn rotation_rejects_no_valid_token_and_retires_the_old_key() {
    const MAX_TTL: u64 = 2;
    let storage = Storage::new(Backend::Redis);
    let mut dirs = [KeysDir::with_active(Alg::ES256, "k1"), KeysDir::new()];
    let k1_text = dirs[0].text("k1");
    std::fs::write(dirs[1].path().join("k1.pem"), &k1_text).unwrap();
    dirs[1]
        .entries
        .push(("k1".into(), Alg::ES256, "k1.pem".into(), "unlisted"));
    dirs[1].set("k1", "active");
    let k2_pkcs8 = auth_sidecar::keys::generate(Alg::EdDSA).unwrap();
    for dir in &mut dirs {
        std::fs::write(dir.path().join("k2.pem"), &k2_pkcs8).unwrap();
        dir.entries
            .push(("k2".into(), Alg::EdDSA, "k2.pem".into(), "unlisted"));
    }
    let nodes: Vec<Sidecar> = dirs
        .iter()
        .map(|dir| {
            Sidecar::builder()
                .storage(&storage)
                .keys_dir(dir.path())
                .arg(format!("--max-ttl={MAX_TTL}s"))
                .arg(format!("--access-ttl={MAX_TTL}s"))
                .arg("--leeway=1s")
                .start()
        })
        .collect();
    let mut watch = [nodes[0].client().await, nodes[1].client().await];
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let load = [
        cross_load(
            nodes[0].client().await,
            nodes[1].client().await,
            stop.clone(),
            issued.clone(),
        ),
        cross_load(
            nodes[1].client().await,
            nodes[0].client().await,
            stop.clone(),
            issued.clone(),
        ),
    ];
    let k1 = dirs[0].signer("k1");
    // A token k1 signs now, its `exp` within the nodes' --max-ttl (a later one is malformed
    // whatever the key): made when it is checked, so that a slow machine does not see it
    // expire first.
    let k1_forge = || {
        let mut claims = fresh_claims();
        claims["exp"] = json!(now() + MAX_TTL as i64);
        sign(&k1, &json!({"alg": "ES256", "kid": "k1"}), &claims)
    };
    let early = watch[0].issue("early").await;
    assert_eq!(early.key_id, "k1");
    let let_load_run = || tokio::time::sleep(Duration::from_millis(300));

    // 1. The new key as `verify` on every node.
    for (dir, client) in dirs.iter_mut().zip(&mut watch) {
        dir.set("k2", "verify");
        support::wait_until("k2 is published", async || {
            support::jwks(client)
                .await
                .jwks_json
                .contains(r#""kid":"k2""#)
        })
        .await;
        let_load_run().await;
    }
    // 2. The new key active, the old one verify-only: one node switches before the other.
    for (dir, client) in dirs.iter_mut().zip(&mut watch) {
        dir.update(&[("k2", "active"), ("k1", "verify")]);
        support::wait_until("k2 signs", async || {
            support::jwks(client).await.active_key_id == "k2"
        })
        .await;
        let_load_run().await;
    }
    for client in &mut watch {
        client.assert_valid(&k1_forge()).await;
    }
    // 3. After the longest token lifetime and the leeway, the old key retired.
    tokio::time::sleep(Duration::from_secs(MAX_TTL + 1)).await;
    for (dir, client) in dirs.iter_mut().zip(&mut watch) {
        dir.set("k1", "retired");
        support::wait_until("k1 is withdrawn", async || {
            !support::jwks(client)
                .await
                .jwks_json
                .contains(r#""kid":"k1""#)
        })
        .await;
        let_load_run().await;
    }

    stop.store(true, Ordering::Relaxed);
    let mut signed_by = BTreeMap::new();
    for task in load {
        let (rejected, by_kid) = task.await.unwrap();
        assert!(
            rejected.is_empty(),
            "{} valid tokens rejected; the first: {:?}",
            rejected.len(),
            rejected.first()
        );
        for (kid, n) in by_kid {
            *signed_by.entry(kid).or_insert(0) += n;
        }
    }
    assert!(
        signed_by.get("k1").is_some_and(|n| *n > 20),
        "{signed_by:?}"
    );
    assert!(
        signed_by.get("k2").is_some_and(|n| *n > 20),
        "{signed_by:?}"
    );
    for client in &mut watch {
        client.assert_rejected(&k1_forge(), R::UnknownKey).await;
        client.assert_rejected(&early.token, R::UnknownKey).await;
        assert_eq!(client.issue("late").await.key_id, "k2");
    }
    for node in &nodes {
        let log = node.logs().join("\n");
        assert!(log.contains("key set changed"), "{log}");
        assert!(!log.contains("BEGIN"), "key material in the log: {log}");
    }
}

#[tokio::test]
async fn a_broken_key_file_is_refused_and_the_node_keeps_serving() {
    let mut keys = KeysDir::with_active(Alg::ES256, "good");
    let sidecar = start(&keys);
    let mut client = sidecar.client().await;
    let before = client.issue("alice").await;

    std::fs::write(
        keys.path().join("bad.pem"),
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    keys.entries
        .push(("bad".into(), Alg::ES256, "bad.pem".into(), "unlisted"));
    keys.update(&[("bad", "active"), ("good", "verify")]);
    support::wait_until("the reload is refused", async || {
        http_get(sidecar.ops, "/healthz")
            .body
            .contains("was refused")
    })
    .await;
    let health = http_get(sidecar.ops, "/healthz");
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(health.body.starts_with("SERVING\n"), "{}", health.body);
    // On the third line, as the README says: after the status and the backends.
    let third = health.body.lines().nth(2).unwrap_or_default();
    assert!(
        third.contains("was refused") && third.contains("key `bad`"),
        "{}",
        health.body
    );
    let after = client.issue("bob").await;
    assert_eq!(after.key_id, "good", "the old key set is still in use");
    client.assert_valid(&before.token).await;
    client.assert_valid(&after.token).await;
    let log = sidecar.logs().join("\n");
    assert!(log.contains("new key set refused"), "{log}");
    assert!(
        !log.contains("c2VjcmV0"),
        "key file content in the log: {log}"
    );

    // Fixed: the next change is taken.
    keys.generate(Alg::ES256, "fixed");
    keys.entries.retain(|e| e.0 != "bad");
    keys.set("fixed", "active");
    support::wait_until("the fixed key set is taken", async || {
        client.issue("carol").await.key_id == "fixed"
    })
    .await;
    assert!(!http_get(sidecar.ops, "/healthz").body.contains("refused"));
    client.assert_valid(&before.token).await;
}

#[tokio::test]
async fn sighup_rereads_the_keys_and_never_stops_the_process() {
    let keys = KeysDir::with_active(Alg::HS256, "h");
    let with_dir = start(&keys);
    let without = Sidecar::start();
    for node in [&with_dir, &without] {
        // SAFETY: kill(2) with a pid we own.
        assert_eq!(unsafe { libc::kill(node.pid(), libc::SIGHUP) }, 0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in [&with_dir, &without] {
        node.client().await.issue("alice").await;
    }
    assert!(
        with_dir
            .logs()
            .iter()
            .any(|l| l.contains("SIGHUP: reading the keys directory"))
    );
    assert!(
        without
            .logs()
            .iter()
            .any(|l| l.contains("SIGHUP: no keys directory"))
    );
}

#[test]
fn a_node_does_not_start_on_a_broken_keys_directory() {
    let keys = KeysDir::new();
    std::fs::write(
        keys.path().join("keys.toml"),
        "[[key]]\nkid = \"k\"\nalg = \"HS256\"\nfile = \"k.secret\"\nstate = \"active\"\n",
    )
    .unwrap();
    std::fs::write(keys.path().join("k.secret"), "short-secret-xyzzy").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--keys-dir",
        ])
        .arg(keys.path())
        .env_remove("AUTH_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("key `k`") && stderr.contains("at least 32 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("xyzzy"), "the secret leaked: {stderr}");

    // `keys check` says the same, and `keys generate` never overwrites a key.
    let check = Command::new(BIN)
        .args(["keys", "check", "--keys-dir"])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("at least 32 bytes"));
    let again = Command::new(BIN)
        .args(["keys", "generate", "--alg", "HS256", "--kid", "k", "--dir"])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(keys.path().join("k.secret")).unwrap(),
        "short-secret-xyzzy"
    );
}
