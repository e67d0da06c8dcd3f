//! Nodes that check each other. Every node on shared storage records itself in the store's
//! registry of live nodes (id, version, start) with a heartbeat and a time to live, and
//! publishes fingerprints of what every node must agree on: its keys, its rate-limit
//! policies, its issuer, audience and token lifetimes, and a digest of them that agreeing
//! nodes share. A heartbeat reads back only how many live nodes publish each digest, so that
//! it costs the same at any fleet size; when another digest is live, the node reads the
//! documents of the nodes that publish it, compares itself with each, and reports each
//! disagreement once, naming the node and the item: an error line in the log,
//! `authsidecar_cluster_disagreements{item}`, the `/healthz` detail; `check-config` makes the
//! same comparison from a configuration.
//!
//! Nothing secret is published: an HMAC key is represented by a keyed fingerprint that only a
//! holder of the same secret can reproduce (`SigningKey::fingerprint`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::store::{Beat, Registry, Store};

/// The items nodes compare, as the metric's `item` label names them.
pub const ITEMS: [&str; 9] = [
    "keys", "policies", "issuer", "audience", "ttl", "admin", "mfa", "oauth", "node_id",
];

/// The nonce every node makes its digest's fingerprints under (see [`Local::digest`]).
const DIGEST_NONCE: &[u8] = b"auth-sidecar cluster digest v1";

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
    /// The OAuth clients: each id with a digest of its secret's Argon2id hash under the
    /// nonce (see [`oauth_print`]).
    pub oauth: BTreeMap<String, String>,
}

/// A client's fingerprint under `nonce`: SHA-256 of the nonce and its Argon2id PHC string.
/// The PHC string is salted and slow to test a guess against; its digest reveals less.
fn oauth_print(nonce: &[u8], phc: &str) -> String {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(&(nonce.len() as u32).to_be_bytes());
    digest.update(nonce);
    digest.update(phc.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.finish().as_ref())
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
    /// The OAuth clients' PHC strings, by id.
    oauth: BTreeMap<String, String>,
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
            oauth: config
                .oauth
                .clients
                .iter()
                .map(|c| (c.id.clone(), c.secret_hash.clone()))
                .collect(),
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
        self.document_under(keys, &self.nonce)
    }

    /// The digest of what every node must agree on, as this node holds it with `keys`: the
    /// agreeing items of a document made under a nonce every node uses for it, hashed. Nodes
    /// with the same digest agree; nodes whose digests differ compare their documents. Keyed
    /// as the document's fingerprints are, so it reveals no more than they do.
    pub fn digest(&self, keys: &KeySet) -> String {
        let d = self.document_under(keys, DIGEST_NONCE);
        let agreed = serde_json::to_vec(&(
            &d.keys,
            &d.issuer,
            &d.audience,
            &d.policies,
            &d.ttl,
            &d.admin,
            &d.mfa,
        ))
        .expect("a document serializes");
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &agreed);
        URL_SAFE_NO_PAD.encode(&hash.as_ref()[..18])
    }

    fn document_under(&self, keys: &KeySet, nonce: &[u8]) -> Document {
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
                fingerprint: k.fingerprint(nonce),
            })
            .collect();
        prints.sort_by(|a, b| a.kid.cmp(&b.kid));
        Document {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: self.started_ms,
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            keys: prints,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            policies: self.policies.clone(),
            ttl: self.ttl.clone(),
            admin: self.admin_fingerprint(keys, nonce),
            mfa: self.mfa.as_ref().map(|sealer| {
                sealer
                    .kids()
                    .map(|kid| {
                        let print = sealer.fingerprint(kid, nonce).unwrap_or_default();
                        (kid.to_owned(), print)
                    })
                    .collect()
            }),
            oauth: self
                .oauth
                .iter()
                .map(|(id, phc)| (id.clone(), oauth_print(nonce, phc)))
                .collect(),
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
    let ids: BTreeSet<&String> = mine.oauth.keys().chain(theirs.oauth.keys()).collect();
    for id in ids {
        match (local.oauth.get(id), theirs.oauth.get(id)) {
            (Some(_), None) => say(
                "oauth",
                format!("OAuth client {id} is configured here and not on node {node}"),
            ),
            (None, Some(_)) => say(
                "oauth",
                format!("OAuth client {id} is configured on node {node} and not here"),
            ),
            (Some(phc), Some(print)) if oauth_print(&nonce, phc) != *print => say(
                "oauth",
                format!("OAuth client {id} has another secret hash here than on node {node}"),
            ),
            _ => {}
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
    /// How many nodes were live at the last heartbeat that reached the store, this one
    /// included.
    pub live: usize,
    /// Their ids, when there were at most [`Registry::LISTED`] of them.
    pub ids: Vec<String>,
    pub disagreements: BTreeSet<Disagreement>,
    /// Why the last heartbeat failed, if it did.
    pub error: Option<String>,
}

/// What the documents were last read against: the registry's generation and digests, and
/// this node's digest. While all three stay, the documents say the same.
type Basis = (u64, Vec<(String, usize)>, String);

/// This node's membership: its heartbeat, and what it found at the last one.
pub struct Cluster {
    id: String,
    local: Local,
    keys: Arc<Keys>,
    store: Arc<dyn Store>,
    heartbeat: Duration,
    view: Mutex<View>,
    /// Set once the documents were read and compared; cleared while every node agrees.
    compared: Mutex<Option<Basis>>,
    /// Whether a heartbeat of this process reached the store: until then, a live entry under
    /// its id with another nonce is most likely its own predecessor's (a restart), not
    /// another process's.
    beaten: AtomicBool,
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
            compared: Mutex::new(None),
            beaten: AtomicBool::new(false),
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

    /// One heartbeat: records this node with the digest of what must agree, and learns how
    /// many live nodes publish each digest. Only when a digest differs from this node's does
    /// it read the documents of the nodes that publish it, and then again only once the
    /// registry changes, so that a heartbeat costs the backend the same at any fleet size.
    /// Reports what changed. Returns whether every live node agrees with this one (true when
    /// the store could not be read: that is the backends' health to report, not a
    /// disagreement).
    pub async fn beat(&self) -> bool {
        let keys: Arc<KeySet> = Arc::clone(&self.keys.current());
        let mine = self.local.document(&keys);
        let published = serde_json::to_string(&mine).expect("a document serializes");
        let digest = self.local.digest(&keys);
        let me = Beat {
            id: &self.id,
            nonce: &mine.nonce,
            digest: &digest,
            document: &published,
        };
        let found = match self.store.heartbeat(me, self.ttl()).await {
            Ok(registry) => self.compare(registry, &digest, &mine, &keys).await,
            Err(e) => Err(e),
        };
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let (registry, now) = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, "cluster heartbeat failed");
                view.error = Some(e.to_string());
                return view.disagreements.is_empty();
            }
        };
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
        crate::telemetry::record_cluster_nodes(registry.live);
        *view = View {
            live: registry.live,
            ids: registry.ids,
            disagreements: now,
            error: None,
        };
        view.disagreements.is_empty()
    }

    /// The disagreements the heartbeat's `registry` shows, reading the documents only when a
    /// digest other than this node's (`digest`) is live and the registry moved since they
    /// were last read.
    async fn compare(
        &self,
        registry: Registry,
        digest: &str,
        mine: &Document,
        keys: &KeySet,
    ) -> Result<(Registry, BTreeSet<Disagreement>), crate::store::StoreError> {
        let agreed = registry.undigested == 0 && registry.digests.iter().all(|(d, _)| d == digest);
        let basis: Basis = (
            registry.generation,
            registry.digests.clone(),
            digest.to_owned(),
        );
        let mut found = if agreed {
            *self.compared.lock().unwrap_or_else(|e| e.into_inner()) = None;
            BTreeSet::new()
        } else if registry.undigested == 0
            && self
                .compared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                == Some(&basis)
        {
            let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
            view.disagreements
                .iter()
                .filter(|d| d.item != "node_id")
                .cloned()
                .collect()
        } else {
            let entries = self.store.nodes(self.ttl(), Some(digest)).await?;
            *self.compared.lock().unwrap_or_else(|e| e.into_inner()) = Some(basis);
            disagreements(&self.id, &self.local, mine, keys, &parse_nodes(entries))
        };
        if registry.taken && self.beaten.load(Ordering::Relaxed) {
            found.insert(Disagreement {
                node: self.id.clone(),
                item: "node_id",
                detail: format!("another process registers under this node's id {}", self.id),
            });
        }
        self.beaten.store(true, Ordering::Relaxed);
        Ok((registry, found))
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
        let mut out = format!("cluster: node {}; {} live node(s)", self.id, view.live);
        if !view.ids.is_empty() {
            out.push_str(&format!(": {}", printable(&view.ids.join(", "))));
        }
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
    fn oauth_clients_compare_by_id_and_hash_without_publishing_it() {
        let phc = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let other = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXJzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let with = |clients: &[String]| {
            let mut args = vec!["serve".to_owned()];
            args.extend(clients.iter().map(|c| format!("--oauth-client={c}")));
            Local::new(&Config::load(args).unwrap())
        };
        let keys = set(A);
        let here = with(&[format!("rs:{phc}")]);
        let mine = here.document(&keys);
        let same = with(&[format!("rs:{phc}")]).document(&keys);
        assert!(compare(&here, &mine, &keys, "b", &same).is_empty());
        for theirs in [
            with(&[]),
            with(&[format!("rs:{other}")]),
            with(&[format!("rs:{phc}"), format!("kong:{phc}")]),
        ] {
            let found = compare(&here, &mine, &keys, "b", &theirs.document(&keys));
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].item, "oauth");
        }
        let published = serde_json::to_string(&mine).unwrap();
        assert!(!published.contains("c2FsdHNhbHRzYWx0"), "{published}");
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
