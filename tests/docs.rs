//! The documents agree with the binary, so that drift fails a test rather than a reader: the
//! README's settings table and `serve --help` name the same flags and variables; every README
//! anchor a document links to, and every README section `--help` quotes, exists; every label
//! value a metric emits is named in its HELP text.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use auth_sidecar::pb;
use auth_sidecar::pb::mfa_service_client::MfaServiceClient;
use support::Sidecar;
use support::backends::{Backend, Storage};

const BIN: &str = env!("CARGO_BIN_EXE_auth-sidecar");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The backticked words of `text` that `keep` accepts.
fn backticked(text: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| keep(w))
        .map(str::to_owned)
        .collect()
}

fn is_env_name(w: &str) -> bool {
    !w.is_empty()
        && w.starts_with(|c: char| c.is_ascii_uppercase())
        && w.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_flag(w: &str) -> bool {
    w.strip_prefix("--").is_some_and(|name| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    })
}

/// The flags and the environment variables of the README's settings table.
fn readme_settings() -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = read("README.md");
    let rows = readme
        .lines()
        .skip_while(|l| !l.starts_with("| Flag | Environment |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let (mut flags, mut envs) = (BTreeSet::new(), BTreeSet::new());
    for row in rows {
        let cols: Vec<&str> = row.split('|').collect();
        flags.extend(backticked(cols[1], is_flag));
        envs.extend(backticked(cols[2], is_env_name));
    }
    assert!(
        flags.len() > 40 && envs.len() > 40,
        "the table was not found"
    );
    (flags, envs)
}

/// The flags and the environment variables `serve --help` names.
fn help_settings() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = help(&["serve"]);
    let (mut flags, mut envs) = (BTreeSet::new(), BTreeSet::new());
    let mut environment_only = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let flag = trimmed
            .strip_prefix("-h, ")
            .or_else(|| trimmed.strip_prefix("-V, "))
            .unwrap_or(trimmed);
        if line.starts_with("  ") && flag.starts_with("--") {
            let name = flag.split([' ', '<', '=']).next().unwrap();
            if !["--help", "--version"].contains(&name) {
                flags.insert(name.to_owned());
            }
        }
        if let Some((_, rest)) = line.split_once("[env: ") {
            envs.insert(rest.split(['=', ']']).next().unwrap().to_owned());
        }
        if line.starts_with("Read from the environment only") {
            environment_only = true;
        } else if environment_only && let Some(name) = line.strip_prefix("  ") {
            envs.insert(name.split_whitespace().next().unwrap().to_owned());
        }
    }
    (flags, envs)
}

#[test]
fn the_readme_settings_table_and_serve_help_name_the_same_settings() {
    let (readme_flags, readme_envs) = readme_settings();
    let (help_flags, help_envs) = help_settings();
    let differ = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        a.symmetric_difference(b).cloned().collect()
    };
    assert_eq!(
        differ(&readme_flags, &help_flags),
        Vec::<String>::new(),
        "flags in only one of the README's table and `serve --help`"
    );
    assert_eq!(
        differ(&readme_envs, &help_envs),
        Vec::<String>::new(),
        "environment variables in only one of the README's table and `serve --help`"
    );
}

/// The README's headings, outside code blocks.
fn headings() -> Vec<String> {
    let mut fenced = false;
    read("README.md")
        .lines()
        .filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced && l.starts_with('#')
        })
        .map(|l| l.trim_start_matches('#').trim().to_owned())
        .collect()
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors after each `marker` in `text`.
fn anchors_after<'a>(text: &'a str, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.split(marker).skip(1).map(|rest| {
        rest.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
            .next()
            .unwrap()
    })
}

#[test]
fn every_readme_anchor_and_every_section_help_quotes_exists() {
    let headings = headings();
    let slugs: BTreeSet<String> = headings.iter().map(|h| slug(h)).collect();
    let mut links = Vec::new();
    let readme = read("README.md");
    links.extend(anchors_after(&readme, "](#").map(|a| ("README.md", a.to_owned())));
    for doc in ["ARCHITECTURE.md", "charts/auth-sidecar/values.yaml"] {
        let text = read(doc);
        links.extend(anchors_after(&text, "README.md#").map(|a| (doc, a.to_owned())));
    }
    assert!(links.len() > 5, "no links found: {links:?}");
    for (doc, anchor) in &links {
        assert!(
            slugs.contains(anchor),
            "{doc} links to README #{anchor}, which no heading makes"
        );
    }

    // `--help` quotes sections as README, "Heading".
    let mut quoted = Vec::new();
    for args in [
        &[][..],
        &["serve"],
        &["check-config"],
        &["health"],
        &["token"],
        &["mfa"],
        &["migrate"],
        &["keys"],
        &["hash-password"],
    ] {
        let text = help(args).split_whitespace().collect::<Vec<_>>().join(" ");
        for rest in text.split("README").skip(1) {
            if let Some(section) = rest
                .strip_prefix(", \"")
                .or_else(|| rest.strip_prefix("'s \""))
                .or_else(|| rest.strip_prefix(": \""))
                .and_then(|r| r.split('"').next())
            {
                quoted.push((args.first().copied().unwrap_or(""), section.to_owned()));
            }
        }
    }
    assert!(!quoted.is_empty(), "no --help quotes a README section");
    for (command, section) in &quoted {
        assert!(
            headings.contains(section),
            "`{command} --help` names README section \"{section}\", which does not exist"
        );
    }
}

/// Labels whose values are open-ended (names the operator or the code chooses), and so are
/// not listed in a HELP text.
const OPEN_LABELS: &[(&str, &str)] = &[
    ("authsidecar_rpc_requests_total", "method"),
    ("authsidecar_rpc_requests_total", "code"),
    ("authsidecar_rpc_duration_seconds", "method"),
    ("authsidecar_rate_limit_decisions_total", "policy"),
    ("authsidecar_keys_active", "kid"),
    ("authsidecar_build_info", "version"),
    ("authsidecar_build_info", "git_commit"),
];

/// Every metric a busy node on shared storage emits has a HELP text, and every value of its
/// closed labels is named there.
#[tokio::test]
async fn every_label_value_a_metric_emits_is_in_its_help() {
    let storage = Storage::new(Backend::Redis);
    let node = Sidecar::builder()
        .storage(&storage)
        .env(
            "AUTH_MFA_KEY",
            "docs:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .args(["--rate-limit", "t=1/1m", "--cluster-heartbeat", "200ms"])
        .start();
    // The start line's words are bare, as the README quotes them (`mfa=off`).
    let start = node
        .logs()
        .into_iter()
        .find(|l| l.contains(" api="))
        .unwrap();
    assert!(
        start.contains(" mfa=on ") && start.contains(" health="),
        "{start}"
    );
    assert!(!start.contains("mfa=\""), "{start}");
    let mut client = node.client().await;
    let token = client.issue("ida").await;
    client.assert_valid(&token.token).await;
    client.validate("not-a-token").await.unwrap();
    for _ in 0..2 {
        client
            .0
            .check_rate_limit(pb::CheckRateLimitRequest {
                policy: "t".into(),
                key: "ida".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut mfa = MfaServiceClient::new(node.channel().await);
    mfa.verify_totp(pb::VerifyTotpRequest {
        subject: "ida".into(),
        code: "123456".into(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = support::http_get(node.ops, "/metrics").body;
        if text.contains("authsidecar_cluster_disagreements{") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let helps: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split_once(' '))
        .collect();
    let mut checked = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels)) = line.split_once('{') else {
            continue;
        };
        let metric = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|m| helps.contains_key(m)))
            .unwrap_or(name);
        let help = helps
            .get(metric)
            .unwrap_or_else(|| panic!("{metric} has no HELP text"));
        let labels = labels.rsplit_once('}').unwrap().0;
        for pair in labels.split(',') {
            let (label, value) = pair.split_once('=').unwrap();
            let value = value.trim_matches('"');
            if label == "le" || OPEN_LABELS.contains(&(metric, label)) || label == "op" {
                continue;
            }
            assert!(
                help.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .any(|w| w == value),
                "{metric}{{{label}=\"{value}\"}}: the value is not in its HELP text: {help}"
            );
            checked += 1;
        }
    }
    for must in ["item=\"mfa\"", "item=\"admin\"", "result=\"malformed\""] {
        assert!(text.contains(must), "{must} not emitted:\n{text}");
    }
    assert!(checked > 10, "{checked} label values checked");
}
