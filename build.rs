//! Compiles `proto/` with protox (pure Rust), so a build needs no system `protoc`, and picks
//! the descriptors of Envoy's ext_authz and rate limit services out of the `envoy-types` crate
//! for server reflection.

use std::collections::BTreeSet;
use std::path::PathBuf;

use prost::Message;
use prost_types::FileDescriptorSet;

/// The Envoy services the sidecar serves; reflection gets these files and what they import.
const ENVOY_SERVICES: [&str; 2] = [
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/ratelimit/v3/rls.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/authsidecar/v1/token_service.proto",
        "proto/authsidecar/v1/mfa_service.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // The commit, for the build-info metric; "unknown" outside a git checkout (an image build).
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=AUTH_SIDECAR_GIT_COMMIT={commit}");
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("authsidecar_descriptor.bin"),
        Message::encode_to_vec(&fds),
    )?;
    std::fs::write(
        out.join("envoy_descriptor.bin"),
        Message::encode_to_vec(&envoy_descriptors()?),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// The files of `ENVOY_SERVICES` and everything they import, from the descriptor set that
/// `envoy-types` ships beside its generated code (it does not export it, so it is read from the
/// crate's source in Cargo's registry), without source comments.
fn envoy_descriptors() -> Result<FileDescriptorSet, Box<dyn std::error::Error>> {
    let version = envoy_types_version()?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let crate_dir = format!("envoy-types-{version}");
    let bin = std::fs::read_dir(home.join("registry/src"))?
        .filter_map(|index| Some(index.ok()?.path().join(&crate_dir)))
        .map(|dir| dir.join("src/generated/types.bin"))
        .find(|bin| bin.is_file())
        .ok_or_else(|| format!("{crate_dir} is not in {}/registry/src", home.display()))?;
    println!("cargo:rerun-if-changed={}", bin.display());
    let all = FileDescriptorSet::decode(std::fs::read(&bin)?.as_slice())?;
    let mut wanted = BTreeSet::new();
    let mut pending: Vec<String> = ENVOY_SERVICES.iter().map(|f| f.to_string()).collect();
    while let Some(name) = pending.pop() {
        if wanted.insert(name.clone()) {
            let file = all.file.iter().find(|f| f.name() == name);
            let file = file.ok_or_else(|| format!("{} lacks {name}", bin.display()))?;
            pending.extend(file.dependency.iter().cloned());
        }
    }
    let file = all
        .file
        .into_iter()
        .filter(|f| wanted.contains(f.name()))
        .map(|mut f| {
            f.source_code_info = None;
            f
        })
        .collect();
    Ok(FileDescriptorSet { file })
}

/// The version of `envoy-types` that Cargo.lock pins.
fn envoy_types_version() -> Result<String, Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"envoy-types\"" {
            let version = lines.next().and_then(|l| l.strip_prefix("version = \""));
            return Ok(version
                .ok_or("Cargo.lock: no version after envoy-types")?
                .trim_end_matches('"')
                .to_owned());
        }
    }
    Err("Cargo.lock does not list envoy-types".into())
}
