//! Layering, checked rather than hoped for (rust-analyzer's `tidy.rs` does the same): each rule
//! below names a part of `src/` and what it must never name. A `use` or a path in the code
//! counts; comments do not.

use std::path::{Path, PathBuf};

/// (files under this path, names they must not mention, why).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "src/store",
        &[
            "crate::tokens",
            "crate::grpc",
            "crate::pb",
            "crate::sessions",
            "crate::ratelimit",
            "crate::mfa",
            "crate::config",
            "envoy_types",
        ],
        "the store sits below the domain, the wire and the settings: each backend defines its own settings type, and config builds it",
    ),
    (
        "src/mfa",
        &[
            "crate::pb",
            "crate::grpc",
            "crate::server",
            "crate::config",
            "envoy_types",
        ],
        "MFA is domain: it gets its settings and the store, and never knows the wire",
    ),
    (
        "src/keys",
        &[
            "crate::pb",
            "crate::grpc",
            "crate::server",
            "crate::store",
            "envoy_types",
        ],
        "keys sit below the domain: they sign and verify, whatever calls them",
    ),
    (
        "src/rules",
        &[
            "crate::",
            "tokio",
            "sqlx",
            "redis::",
            "std::fs",
            "std::net",
            "SystemTime::now",
        ],
        "the rules are pure specifications: no I/O, no clock, nothing else of the crate",
    ),
    (
        "src/tokens.rs",
        &["crate::pb", "crate::grpc", "envoy_types"],
        "only the gRPC layer knows the wire types",
    ),
    (
        "src/sessions.rs",
        &["crate::pb", "crate::grpc", "envoy_types"],
        "only the gRPC layer knows the wire types",
    ),
    (
        "src/ratelimit.rs",
        &["crate::config", "crate::pb", "crate::grpc", "envoy_types"],
        "config depends on ratelimit's policies, never the reverse",
    ),
    (
        "src/authz.rs",
        &[
            "crate::pb",
            "crate::grpc",
            "crate::http",
            "envoy_types",
            "axum",
            "tonic",
        ],
        "the access decision is domain: each protocol renders it, and it knows none of them",
    ),
    (
        "src/http",
        &[
            "crate::pb",
            "crate::grpc",
            "crate::server",
            "envoy_types",
            "tonic",
        ],
        "the HTTP protocols act through the domain, as the gRPC ones do, never through them",
    ),
    (
        "src/ops.rs",
        &["crate::server"],
        "server composes ops, never the reverse",
    ),
    (
        "src/admin",
        &["crate::pb", "crate::grpc", "crate::server", "envoy_types"],
        "the admin UI acts through the domain, as the gRPC API does, never through the wire",
    ),
    (
        "src/cluster.rs",
        &["crate::pb", "crate::grpc", "crate::server", "envoy_types"],
        "the registry is domain: it reads keys, settings and the store, never the wire",
    ),
    (
        "src/config.rs",
        &["crate::server", "crate::tokens", "crate::cluster"],
        "settings are read before anything is built from them; config names the store's settings types, never the reverse",
    ),
];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The lines of `text` that are code: comment lines and trailing comments dropped.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let code = line.split("//").next().unwrap_or("").trim();
        (!code.is_empty()).then_some((i + 1, code))
    })
}

/// Every breach of `RULES` in the tree at `root`, one line each.
fn breaches(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for (part, banned, why) in RULES {
        let files = rust_files(&root.join(part));
        assert!(!files.is_empty(), "{part}: no files; update the tidy rules");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in code_lines(&text) {
                for name in banned.iter().filter(|name| line.contains(*name)) {
                    found.push(format!(
                        "{}:{n}: names `{name}` ({why})",
                        file.strip_prefix(root).unwrap().display()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn layers_point_one_way() {
    let found = breaches(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn a_back_edge_is_caught() {
    let root = tempfile::tempdir().unwrap();
    for (part, ..) in RULES {
        let path = root.path().join(part);
        if part.ends_with(".rs") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "// crate::server in a comment is fine\n").unwrap();
        } else {
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("mod.rs"), "fn f() {}\n").unwrap();
        }
    }
    assert!(breaches(root.path()).is_empty());
    std::fs::write(
        root.path().join("src/store/redis.rs"),
        "use crate::tokens::random_id; // a back-edge\n",
    )
    .unwrap();
    let found = breaches(root.path());
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/store/redis.rs:1: names `crate::tokens`"));
}
