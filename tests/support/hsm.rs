//! A throwaway SoftHSM2 token: its own token directory and configuration file (found through
//! `SOFTHSM2_CONF`, which only the processes started with [`SoftHsm::env`] see), initialised
//! with `softhsm2-util`; keys made by the sidecar's own `keys generate --pkcs11`, imported
//! from PEM by `softhsm2-util --import`, deleted and listed by OpenSC's `pkcs11-tool`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Debian's SoftHSM2 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN: &str = "auth-sidecar-test";
pub const PIN: &str = "hsm-user-pin-4711";
const SO_PIN: &str = "hsm-so-pin-0815";

pub struct SoftHsm {
    dir: TempDir,
}

impl SoftHsm {
    /// A fresh token labelled [`TOKEN`] with user PIN [`PIN`].
    pub fn new() -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: scripts/test installs softhsm2"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { dir };
        hsm.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--so-pin",
                SO_PIN,
                "--pin",
                PIN,
            ],
        );
        hsm
    }

    /// What a process needs to use the token: the configuration, the module and the PIN.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOFTHSM2_CONF", self.conf().display().to_string()),
            ("CRYPTOKI_LIB", MODULE.to_owned()),
            ("PKCS11_PIN", PIN.to_owned()),
        ]
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// Runs a tool with the token's configuration; panics on failure.
    pub fn run(&self, tool: &str, args: &[&str]) -> String {
        let out = self.try_run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_run(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .envs(self.env())
            .output()
            .unwrap_or_else(|e| panic!("run {tool} (scripts/test installs it): {e}"))
    }

    /// `auth-sidecar keys generate --pkcs11`: the manifest entry it prints.
    pub fn generate(&self, alg: &str, kid: &str) -> String {
        self.run(
            env!("CARGO_BIN_EXE_auth-sidecar"),
            &["keys", "generate", "--pkcs11", "--alg", alg, "--kid", kid],
        )
    }

    /// Imports a PKCS#8 PEM key pair under `label` and `id` (hex).
    pub fn import(&self, pem: &Path, label: &str, id: &str) {
        let pem = pem.display().to_string();
        self.run(
            "softhsm2-util",
            &[
                "--import", &pem, "--token", TOKEN, "--label", label, "--id", id, "--pin", PIN,
            ],
        );
    }

    /// Deletes the private key labelled `label`.
    pub fn delete_private(&self, label: &str) {
        self.pkcs11_tool(&["--delete-object", "--type", "privkey", "--label", label]);
    }

    /// `pkcs11-tool` logged in to the token.
    pub fn pkcs11_tool(&self, args: &[&str]) -> String {
        let mut all = vec![
            "--module",
            MODULE,
            "--token-label",
            TOKEN,
            "--login",
            "--pin",
            PIN,
        ];
        all.extend_from_slice(args);
        self.run("pkcs11-tool", &all)
    }
}
