//! Nodes that check each other. Every node on shared storage records itself in the store's
//! registry of live nodes (id, version, start) with a heartbeat and a time to live, and
//! publishes fingerprints of what every node must agree on: its keys, its rate-limit
//! policies, its issuer, audience and token lifetimes. At each heartbeat it compares itself
//! with every other live node and reports each disagreement once, naming the node and the
//! item: an error line in the log, `authsidecar_cluster_disagreements{item}`, the `/healthz`
//! detail; `check-config` makes the same comparison from a configuration.
//!
//! Nothing secret is published: an HMAC key is represented by a keyed fingerprint that only a
//! holder of the same secret can reproduce (`SigningKey::fingerprint`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::health::Health;
use crate::keys::{KeySet, KeyState, Keys};
use crate::mfa::seal::Sealer;
use crate::ratelimit::Policy;
use crate::rules::gcra::Gcra;
use crate::store::Store;

/// The items nodes compare, as the metric's `item` label names them.
pub const ITEMS: [&str; 8] = [
    "keys", "policies", "issuer", "audience", "ttl", "admin", "mfa", "node_id",
];

/// A node is live for this many heartbeats after its last.
pub const LIVE_HEARTBEATS: u32 = 3;

/// What a node publishes about itself. Unknown fields are ignored and missing ones take
/// their defaults, so that nodes of neighbouring versions can read each other.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Document {
    pub version: String,
    /// Milliseconds since the epoch.
    pub started_ms: i64,
    /// Random for each process: what its HMAC keys' fingerprints sign, and how a process
    /// tells that another has taken its node id.
    pub nonce: String,
    pub keys: Vec<KeyPrint>,
    pub issuer: String,
    pub audience: Option<String>,
    /// Each policy's spec, by name.
    pub policies: BTreeMap<String, String>,
    /// The token and session lifetimes, by setting name, in milliseconds.
    pub ttl: BTreeMap<String, u64>,
    /// A keyed fingerprint of the admin UI's user name and credential (see
    /// [`Local::admin_fingerprint`]); `None` when the UI has no password.
    pub admin: Option<String>,
    /// MFA's keys, the sealing one first: each kid with a fingerprint keyed by the key
    /// itself (see `Sealer::fingerprint`); `None` when MFA is off.
    pub mfa: Option<Vec<(String, String)>>,
}

/// One key as published: never the key itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyPrint {
    pub kid: String,
    pub alg: String,
    /// `active` or `verify`.
    pub state: String,
    pub fingerprint: String,
}

/// This node's side of the comparison: its settings, and its key set when compared.
#[derive(Debug, Clone)]
pub struct Local {
    nonce: [u8; 16],
    started_ms: i64,
    issuer: String,
    audience: Option<String>,
    policies: BTreeMap<String, String>,
    ttl: BTreeMap<String, u64>,
    admin: Option<(String, crate::config::AdminCredential)>,
    /// MFA's keys when MFA is on with keys every node must share.
    mfa: Option<Arc<Sealer>>,
}

impl Local {
    pub fn new(config: &Config) -> Local {
        let mut nonce = [0u8; 16];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system random source works");
        let ms = |d: Duration| d.as_millis() as u64;
        Local {
            nonce,
            started_ms: crate::clock::unix_millis(SystemTime::now()),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            policies: config
                .rate_limits
                .iter()
                .map(|p| (p.name.clone(), p.to_string()))
                .collect(),
            ttl: BTreeMap::from([
                ("access_ttl".to_owned(), ms(config.access_ttl)),
                ("max_ttl".to_owned(), ms(config.max_ttl)),
                ("leeway".to_owned(), ms(config.leeway)),
                ("session_ttl".to_owned(), ms(config.session_ttl)),
                (
                    "session_idle_timeout".to_owned(),
                    config.session_idle_timeout.map_or(0, ms),
                ),
                (
                    "refresh_max_lifetime".to_owned(),
                    ms(config.refresh_max_lifetime),
                ),
                (
                    "refresh_reuse_grace".to_owned(),
                    ms(config.refresh_reuse_grace),
                ),
            ]),
            admin: config
                .admin
                .credential
                .clone()
                .map(|c| (config.admin.username.clone(), c)),
            mfa: match &config.mfa.keys {
                crate::config::MfaKeys::Given(text) => {
                    Sealer::parse(text.expose_str()).ok().map(Arc::new)
                }
                _ => None,
            },
        }
    }

    /// The admin credential's fingerprint under `nonce`, as `KID.TAG`: an HMAC, under a
    /// secret derived from the set's deriving key (`KeySet::deriving`, the one the admin
    /// cookie is keyed by) named by KID, of the user name, the credential and the nonce. Only
    /// a node with the same key can compute or test it, so even a weak password cannot be
    /// guessed from it offline by anyone who reads the registry. Empty when the UI has a
    /// password but no key derives (every key in a PKCS#11 token): nothing to compare then.
    fn admin_fingerprint(&self, keys: &KeySet, nonce: &[u8]) -> Option<String> {
        let (user, credential) = self.admin.as_ref()?;
        let Some(key) = keys.deriving() else {
            return Some(String::new());
        };
        let secret = key.derive("admin credential fingerprint")?;
        let (kind, value): (&[u8], &[u8]) = match credential {
            crate::config::AdminCredential::Password(p) => (b"password", p.expose()),
            crate::config::AdminCredential::Hash(h) => (b"argon2id", h.as_bytes()),
        };
        let mut message = Vec::new();
        for part in [user.as_bytes(), kind, value, nonce] {
            message.extend_from_slice(&(part.len() as u32).to_be_bytes());
            message.extend_from_slice(part);
        }
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret),
            &message,
        );
        Some(format!(
            "{}.{}",
            key.kid(),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// The document this node publishes with `keys`.
    pub fn document(&self, keys: &KeySet) -> Document {
        let mut prints: Vec<KeyPrint> = keys
            .keys()
            .map(|k| KeyPrint {
                kid: k.kid().to_owned(),
                alg: k.alg().to_string(),
                state: match k.state() {
                    KeyState::Active => "active",
                    KeyState::Verify => "verify",
                    KeyState::Retired => "retired",
                }
                .to_owned(),
                fingerprint: k.fingerprint(&self.nonce),
            })
            .collect();
        prints.sort_by(|a, b| a.kid.cmp(&b.kid));
        Document {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: self.started_ms,
            nonce: URL_SAFE_NO_PAD.encode(self.nonce),
            keys: prints,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            policies: self.policies.clone(),
            ttl: self.ttl.clone(),
            admin: self.admin_fingerprint(keys, &self.nonce),
            mfa: self.mfa.as_ref().map(|sealer| {
                sealer
                    .kids()
                    .map(|kid| {
                        let print = sealer.fingerprint(kid, &self.nonce).unwrap_or_default();
                        (kid.to_owned(), print)
                    })
                    .collect()
            }),
        }
    }
}

/// One thing another live node does not agree with this one on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Disagreement {
    pub node: String,
    /// One of [`ITEMS`].
    pub item: &'static str,
    pub detail: String,
}

/// How `mine` (this node's document, made with `keys` by `local`) and the live node `node`'s
/// document differ, item by item.
pub fn compare(
    local: &Local,
    mine: &Document,
    keys: &KeySet,
    node: &str,
    theirs: &Document,
) -> Vec<Disagreement> {
    let mut found = Vec::new();
    let mut say = |item, detail: String| {
        found.push(Disagreement {
            node: node.to_owned(),
            item,
            detail,
        })
    };
    let nonce = URL_SAFE_NO_PAD.decode(&theirs.nonce).unwrap_or_default();
    for print in &theirs.keys {
        match keys.get(&print.kid) {
            None if print.state == "active" => say(
                "keys",
                format!(
                    "cannot verify kid {}, which node {node} signs with ({})",
                    print.kid, print.alg
                ),
            ),
            None => {}
            Some(key) if key.alg().to_string() != print.alg => say(
                "keys",
                format!(
                    "kid {} is {} here and {} on node {node}",
                    print.kid,
                    key.alg(),
                    print.alg
                ),
            ),
            Some(key) if !key.same_key_as(&nonce, &print.fingerprint) => say(
                "keys",
                format!(
                    "kid {} names a different key here than on node {node}",
                    print.kid
                ),
            ),
            Some(_) => {}
        }
    }
    let signing = keys.active().kid();
    if !theirs.keys.iter().any(|p| p.kid == signing) {
        say(
            "keys",
            format!("node {node} cannot verify kid {signing}, which this node signs with"),
        );
    }
    let names: BTreeSet<&String> = mine.policies.keys().chain(theirs.policies.keys()).collect();
    for name in names {
        let (here, there) = (mine.policies.get(name), theirs.policies.get(name));
        if !same_policy(here, there) {
            let show = |spec: Option<&String>| spec.map_or("not set".to_owned(), |s| s.clone());
            say(
                "policies",
                format!(
                    "rate-limit policy {name}: {} here, {} on node {node}",
                    show(here),
                    show(there)
                ),
            );
        }
    }
    // The admin fingerprints are keyed by the deriving key they name: comparable only when
    // both nodes derive with the same one (a different one is a disagreement on `keys`
    // already).
    let same_signer = theirs
        .keys
        .iter()
        .any(|p| p.state == "active" && p.kid == signing);
    match (&mine.admin, &theirs.admin) {
        (None, None) => {}
        (Some(_), None) => say(
            "admin",
            format!("the admin UI has a password here and none on node {node}"),
        ),
        (None, Some(_)) => say(
            "admin",
            format!("the admin UI has no password here and one on node {node}"),
        ),
        (Some(_), Some(fingerprint)) if admin_comparable(keys, fingerprint, same_signer) => {
            let mine = local.admin_fingerprint(keys, &nonce).unwrap_or_default();
            let tag = |print: &str| print.rsplit('.').next().unwrap_or_default().to_owned();
            if tag(&mine) != tag(fingerprint) {
                say(
                    "admin",
                    format!("the admin UI's user name or password differs on node {node}"),
                );
            }
        }
        (Some(_), Some(_)) => {}
    }
    match (&local.mfa, &theirs.mfa) {
        (None, None) => {}
        (Some(_), None) => say("mfa", format!("MFA is on here and off on node {node}")),
        (None, Some(_)) => say("mfa", format!("MFA is off here and on on node {node}")),
        (Some(sealer), Some(prints)) => {
            // Every key the other node holds that this one does too must be the same key; the
            // key it seals with must be one this node can open with, and the reverse.
            for (i, (kid, print)) in prints.iter().enumerate() {
                match sealer.same_key(kid, &nonce, print) {
                    Some(false) => say(
                        "mfa",
                        format!("MFA key {kid} is a different key here than on node {node}"),
                    ),
                    None if i == 0 => say(
                        "mfa",
                        format!(
                            "node {node} seals MFA secrets under key {kid}, which this node \
                             does not have"
                        ),
                    ),
                    _ => {}
                }
            }
            if let Some(sealing) = sealer.kids().next()
                && !prints.iter().any(|(kid, _)| kid == sealing)
            {
                say(
                    "mfa",
                    format!(
                        "node {node} does not have MFA key {sealing}, which this node seals \
                         MFA secrets under"
                    ),
                );
            }
        }
    }
    if mine.issuer != theirs.issuer {
        say(
            "issuer",
            format!(
                "issuer {:?} here, {:?} on node {node}",
                mine.issuer, theirs.issuer
            ),
        );
    }
    if mine.audience != theirs.audience {
        say(
            "audience",
            format!(
                "audience {:?} here, {:?} on node {node}",
                mine.audience, theirs.audience
            ),
        );
    }
    let differing: Vec<String> = mine
        .ttl
        .iter()
        .filter(|(name, ms)| theirs.ttl.get(*name).is_some_and(|t| t != *ms))
        .map(|(name, ms)| {
            let show = |ms: u64| humantime::format_duration(Duration::from_millis(ms)).to_string();
            format!(
                "{name} {} here, {} there",
                show(*ms),
                show(theirs.ttl[name])
            )
        })
        .collect();
    if !differing.is_empty() {
        say("ttl", format!("node {node}: {}", differing.join(", ")));
    }
    found
}

/// Whether two policy specs admit the same calls: equal rates written differently (10/1s,
/// 600/1m) agree.
fn same_policy(a: Option<&String>, b: Option<&String>) -> bool {
    let parse = |spec: Option<&String>| {
        spec.and_then(|s| s.parse::<Policy>().ok())
            .map(|p| Gcra::from(&p))
    };
    match (a, b) {
        (Some(_), Some(_)) => match (parse(a), parse(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
        (None, None) => true,
        _ => false,
    }
}

/// A live node as the registry lists it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    /// `None` when its document does not parse (a node of a far newer version).
    pub document: Option<Document>,
}

impl Node {
    /// One line about the node: its version and how long it has run.
    pub fn describe(&self, now: SystemTime) -> String {
        match &self.document {
            Some(d) => {
                let up = crate::clock::unix_millis(now)
                    .saturating_sub(d.started_ms)
                    .max(0);
                format!(
                    "{} (v{}, up {})",
                    self.id,
                    d.version,
                    humantime::format_duration(Duration::from_secs(up as u64 / 1000))
                )
            }
            None => format!("{} (unreadable document)", self.id),
        }
    }
}

/// Every live node of the registry, from what the store returned.
pub fn parse_nodes(entries: Vec<(String, String)>) -> Vec<Node> {
    let mut nodes: Vec<Node> = entries
        .into_iter()
        // An id no node can have was written by hand: not a node.
        .filter(|(id, _)| crate::ids::valid_node_id(id))
        .map(|(id, document)| Node {
            id,
            document: serde_json::from_str(&document).ok(),
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes
}

/// Every disagreement between `mine` and the live `nodes` other than `me`; a node that took
/// `me`'s id (a document with another nonce) is one too.
pub fn disagreements(
    me: &str,
    local: &Local,
    mine: &Document,
    keys: &KeySet,
    nodes: &[Node],
) -> BTreeSet<Disagreement> {
    let mut all = BTreeSet::new();
    for node in nodes {
        let Some(theirs) = &node.document else {
            continue;
        };
        if node.id == me {
            if theirs.nonce != mine.nonce {
                all.insert(Disagreement {
                    node: node.id.clone(),
                    item: "node_id",
                    detail: format!("another process registers under this node's id {me}"),
                });
            }
            continue;
        }
        all.extend(compare(local, mine, keys, &node.id, theirs));
    }
    all
}

/// The disagreements by node and item, with their details.
fn by_pair(all: &BTreeSet<Disagreement>) -> BTreeMap<(&str, &'static str), Vec<&str>> {
    let mut pairs: BTreeMap<(&str, &'static str), Vec<&str>> = BTreeMap::new();
    for d in all {
        pairs
            .entry((d.node.as_str(), d.item))
            .or_default()
            .push(d.detail.as_str());
    }
    pairs
}

/// What this node last learned of the cluster, for `/healthz` and readiness.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The live nodes at the last heartbeat that reached the store.
    pub nodes: Vec<String>,
    pub disagreements: BTreeSet<Disagreement>,
    /// Why the last heartbeat failed, if it did.
    pub error: Option<String>,
}

/// This node's membership: its heartbeat, and what it found at the last one.
pub struct Cluster {
    id: String,
    local: Local,
    keys: Arc<Keys>,
    store: Arc<dyn Store>,
    heartbeat: Duration,
    view: Mutex<View>,
}

impl Cluster {
    pub fn new(config: &Config, keys: Arc<Keys>, store: Arc<dyn Store>) -> Cluster {
        Cluster {
            id: config.node_id.clone(),
            local: Local::new(config),
            keys,
            store,
            heartbeat: config.cluster_heartbeat,
            view: Mutex::new(View::default()),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long a node stays live after its last heartbeat.
    pub fn ttl(&self) -> Duration {
        self.heartbeat * LIVE_HEARTBEATS
    }

    /// One heartbeat: records this node, reads the others, compares, and reports what
    /// changed. Returns whether every live node agrees with this one (true when the store
    /// could not be read: that is the backends' health to report, not a disagreement).
    pub async fn beat(&self) -> bool {
        let keys: Arc<KeySet> = Arc::clone(&self.keys.current());
        let mine = self.local.document(&keys);
        let published = serde_json::to_string(&mine).expect("a document serializes");
        let entries = self
            .store
            .heartbeat(Some((&self.id, &published)), self.ttl())
            .await;
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!(error = %e, "cluster heartbeat failed");
                view.error = Some(e.to_string());
                return view.disagreements.is_empty();
            }
        };
        let nodes = parse_nodes(entries);
        let now = disagreements(&self.id, &self.local, &mine, &keys, &nodes);
        // One line per node and item, with every detail, when the pair appears or goes.
        let (before, after) = (by_pair(&view.disagreements), by_pair(&now));
        for ((node, item), details) in &after {
            if !before.contains_key(&(*node, *item)) {
                tracing::error!(
                    node = %node,
                    item = *item,
                    detail = %details.join("; "),
                    "cluster disagreement: node {node} does not agree on {item}"
                );
            }
        }
        for (node, item) in before.keys() {
            if !after.contains_key(&(*node, *item)) {
                tracing::info!(node = %node, item = *item, "cluster disagreement cleared");
            }
        }
        for item in ITEMS {
            let count = after.keys().filter(|(_, i)| *i == item).count();
            crate::telemetry::record_cluster_disagreements(item, count);
        }
        crate::telemetry::record_cluster_nodes(nodes.len());
        *view = View {
            nodes: nodes.iter().map(|n| n.id.clone()).collect(),
            disagreements: now,
            error: None,
        };
        view.disagreements.is_empty()
    }

    /// Takes this node out of the registry, so that the others stop comparing with it at
    /// once rather than when its entry expires.
    pub async fn leave(&self) {
        if let Err(e) = self.store.leave(&self.id).await {
            tracing::debug!(error = %e, "leaving the cluster registry failed");
        }
    }

    /// Heartbeats every interval for as long as the process runs, telling `health` whether
    /// every live node agrees (which counts with `--strict-cluster`).
    pub fn spawn(self: &Arc<Self>, health: Health) {
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                health.set_cluster_agrees(cluster.beat().await).await;
                tokio::time::sleep(cluster.heartbeat).await;
            }
        });
    }

    /// Lines for `/healthz`: the live nodes and each disagreement.
    /// What `/healthz` and the admin UI show. What peers published (ids, versions, kids,
    /// issuers) has its control characters escaped: a line never starts inside one.
    pub fn health_detail(&self) -> String {
        let view = self.view();
        let mut out = format!(
            "cluster: node {}; {} live node(s): {}",
            self.id,
            view.nodes.len(),
            printable(&view.nodes.join(", "))
        );
        if let Some(error) = &view.error {
            let error = printable(error);
            out.push_str(&format!("\ncluster: last heartbeat failed: {error}"));
        }
        if view.disagreements.is_empty() {
            out.push_str("\ncluster: every live node agrees");
        }
        for d in &view.disagreements {
            out.push_str(&format!(
                "\ncluster: disagreement with node {} on {}: {}",
                printable(&d.node),
                d.item,
                printable(&d.detail)
            ));
        }
        out
    }
}

/// `text` with its control characters escaped, so that it stays within its line.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Whether a peer's admin fingerprint can be compared with this node's: it is keyed by the
/// key this node derives with. A fingerprint without a kid is an older node's, keyed by its
/// active key; an empty one has no key to compare under.
fn admin_comparable(keys: &KeySet, theirs: &str, same_signer: bool) -> bool {
    match theirs.rsplit_once('.') {
        Some((kid, _)) => keys.deriving().is_some_and(|k| k.kid() == kid),
        None => {
            !theirs.is_empty()
                && same_signer
                && keys.deriving().map(|k| k.kid()) == Some(keys.active().kid())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::keys::SigningKey;

    fn set(secret: &str) -> KeySet {
        KeySet::single(SigningKey::hs256(&Secret::from(secret)).unwrap())
    }

    const A: &str = "a-secret-that-is-at-least-32-bytes-long";
    const B: &str = "b-secret-that-is-at-least-32-bytes-long";

    #[test]
    fn the_same_secret_agrees_and_another_does_not() {
        let config = Config::defaults();
        let (here, there) = (Local::new(&config), Local::new(&config));
        let (keys_a, keys_b) = (set(A), set(A));
        let theirs = there.document(&keys_b);
        assert_ne!(
            here.document(&keys_a).keys[0].fingerprint,
            theirs.keys[0].fingerprint
        );
        assert!(compare(&here, &here.document(&keys_a), &keys_a, "b", &theirs).is_empty());

        let other = there.document(&set(B));
        let found = compare(&here, &here.document(&keys_a), &keys_a, "b", &other);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|d| d.item == "keys"));
        let text = format!("{found:?}{}", serde_json::to_string(&other).unwrap());
        assert!(!text.contains(A) && !text.contains(B), "{text}");
    }

    #[test]
    fn a_different_key_under_the_same_kid_is_named() {
        let key = |secret: &str| {
            KeySet::single(
                SigningKey::hmac(
                    "k1".to_owned(),
                    crate::keys::Alg::HS256,
                    KeyState::Active,
                    secret.as_bytes(),
                )
                .unwrap(),
            )
        };
        let config = Config::defaults();
        let local = Local::new(&config);
        let (mine, theirs) = (key(A), key(B));
        let found = compare(
            &local,
            &local.document(&mine),
            &mine,
            "b",
            &local.document(&theirs),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].detail.contains("different key"), "{found:?}");
    }

    #[test]
    fn admin_logins_compare_without_revealing_the_password() {
        let with = |password: &str| {
            Local::new(&Config::load(["serve", "--admin-password", password]).unwrap())
        };
        let keys = set(A);
        let (here, same, other) = (with("pw-one"), with("pw-one"), with("pw-two"));
        let mine = here.document(&keys);
        assert!(compare(&here, &mine, &keys, "b", &same.document(&keys)).is_empty());
        let found = compare(&here, &mine, &keys, "b", &other.document(&keys));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].item, "admin");
        let none = Local::new(&Config::defaults()).document(&keys);
        assert_eq!(compare(&here, &mine, &keys, "b", &none)[0].item, "admin");
        let published = serde_json::to_string(&mine).unwrap();
        assert!(!published.contains("pw-one"), "{published}");
    }

    #[test]
    fn mfa_keys_compare_without_revealing_them() {
        let k1 = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let k1_other = "k1:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
        let k2 = "k2:QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
        let with = |keys: &str| Local::new(&Config::load(["serve", "--mfa-key", keys]).unwrap());
        let keys = set(A);
        let here = with(k1);
        let mine = here.document(&keys);
        let items = |theirs: &Local| {
            compare(&here, &mine, &keys, "b", &theirs.document(&keys))
                .into_iter()
                .map(|d| d.detail)
                .collect::<Vec<_>>()
        };
        assert!(items(&with(k1)).is_empty());
        // Rotating: the other node seals with k2 and still opens k1; this one cannot open k2.
        let rotated = items(&with(&format!("{k2},{k1}")));
        assert_eq!(rotated.len(), 1, "{rotated:?}");
        assert!(rotated[0].contains("under key k2"), "{rotated:?}");
        assert!(items(&with(k1_other))[0].contains("different key"));
        let off = Local::new(&Config::defaults()).document(&keys);
        assert_eq!(compare(&here, &mine, &keys, "b", &off)[0].item, "mfa");
        let published = serde_json::to_string(&mine).unwrap();
        assert!(!published.contains("AAECAwQF"), "{published}");
    }

    #[test]
    fn policies_compare_by_what_they_admit() {
        let ten_per_second = "api=10/1s".to_owned();
        assert!(same_policy(
            Some(&ten_per_second),
            Some(&"api=600/1m:burst=10".to_owned())
        ));
        assert!(!same_policy(
            Some(&ten_per_second),
            Some(&"api=20/1s".to_owned())
        ));
        assert!(!same_policy(Some(&ten_per_second), None));
    }
}
