//! The `auth-sidecar` binary: `serve`, `check-config`, `health`, `token`, `mfa`, `keys` and
//! `migrate`.

use std::process::ExitCode;

use std::path::PathBuf;

use anyhow::Context;
use auth_sidecar::client::{self, HealthArgs, MfaArgs, TokenArgs};
use auth_sidecar::config::{self, Config, ServeArgs};
use auth_sidecar::keys::{self, Alg, KeySet};
use auth_sidecar::telemetry::{self, LogFormat};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "auth-sidecar", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing buys nothing
enum Command {
    /// Run the sidecar.
    #[command(after_long_help = config::ENVIRONMENT_ONLY)]
    Serve(ServeArgs),
    /// Check a configuration as `serve` would load it, against its backends and the live
    /// nodes: print the multi-node checklist (✓, ⚠ or ✗ with the reason) and exit 0 when
    /// nothing is ✗, 1 otherwise, 2 for a setting that does not load. For an init container
    /// or CI; writes nothing to the backends.
    #[command(after_long_help = config::ENVIRONMENT_ONLY)]
    CheckConfig(ServeArgs),
    /// Probe a sidecar's grpc.health.v1 (exit 0 SERVING, 1 bad arguments, 2 cannot connect or
    /// timed out, 3 the call failed, 4 not SERVING).
    Health(HealthArgs),
    /// Issue, validate or revoke tokens through a running sidecar.
    Token(TokenArgs),
    /// Enroll, verify and manage second factors (MfaService) through a running sidecar.
    Mfa(MfaArgs),
    /// Apply the embedded PostgreSQL migrations and exit (for a Kubernetes Job or an init
    /// container; run `serve` with --migrate=false then).
    Migrate(MigrateArgs),
    /// Read a password on stdin (one line) and print its Argon2id PHC string, for
    /// ADMIN_GUI_PASSWORD_HASH.
    HashPassword,
    /// Make and check signing keys for --keys-dir.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Write a new private key (PKCS#8 PEM) or HMAC secret to DIR/KID.pem or DIR/KID.secret,
    /// readable by its owner only, and print the manifest entry that adds it as `verify`.
    /// With --pkcs11: make the key pair in the PKCS#11 token instead (CRYPTOKI_LIB, and the
    /// PIN in PKCS11_PIN or PKCS11_PIN_FILE), its private key non-extractable and sensitive.
    Generate {
        #[arg(long, value_parser = clap::value_parser!(Alg))]
        alg: Alg,
        #[arg(long)]
        kid: String,
        /// The keys directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Make the key in the PKCS#11 token of CRYPTOKI_LIB.
        #[arg(long)]
        pkcs11: bool,
        /// With --pkcs11: the key's label in the token; the kid when unset.
        #[arg(long, requires = "pkcs11")]
        label: Option<String>,
        /// With --pkcs11: the label of the token to make it in, when the module has several.
        #[arg(long, requires = "pkcs11")]
        token: Option<String>,
    },
    /// Load a keys directory as `serve` would, and print its key set or what is wrong with it.
    Check {
        #[arg(long, env = "AUTH_KEYS_DIR")]
        keys_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: config::Secret,
    /// Give up connecting after this long.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    timeout: std::time::Duration,
}

// glibc's malloc showed as the largest single cost under load (h2 buffers, small messages).
// Built with `no_thp`: transparent huge pages would back mimalloc's eagerly committed first
// arena with 2 MiB pages, some 10 MiB resident in every idle pod that it never uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid setting or command line.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("error: {}", config::one_line(&e));
            let health = std::env::args().nth(1).as_deref() == Some("health");
            return ExitCode::from(if health {
                client::exit::BAD_ARGUMENTS as u8
            } else {
                USAGE
            });
        }
    };
    let cli = Cli::from_arg_matches(&matches).expect("matches come from this parser");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match cli.command {
        Command::Serve(_) => {
            let Some(config) = load_config() else {
                return ExitCode::from(USAGE);
            };
            // Inside the runtime: the trace exporter's channel needs one.
            let telemetry = runtime.block_on(async {
                telemetry::init(config.log_format, config.log_level.as_deref())
            });
            let _telemetry = match telemetry {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: cannot set up logging or tracing: {e:#}");
                    return ExitCode::from(USAGE);
                }
            };
            match runtime
                .block_on(auth_sidecar::server::run(config))
                .context("serve")
            {
                Ok(()) => ExitCode::SUCCESS,
                // Keys that do not load (a broken file, a wrong PKCS#11 PIN, a missing label)
                // are a setting to fix, as an invalid flag is.
                Err(e) if e.downcast_ref::<keys::KeyError>().is_some() => {
                    tracing::error!("{e:#}");
                    ExitCode::from(USAGE)
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig(_) => {
            let Some(config) = load_config() else {
                return ExitCode::from(USAGE);
            };
            let rows = runtime.block_on(auth_sidecar::check::run(&config));
            print!("{}", auth_sidecar::check::render(&rows));
            ExitCode::from(auth_sidecar::check::exit_code(&rows))
        }
        Command::HashPassword => match hash_password() {
            Ok(phc) => {
                println!("{phc}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Health(args) => ExitCode::from(runtime.block_on(client::health(args)) as u8),
        Command::Token(args) => ExitCode::from(runtime.block_on(client::token(args)) as u8),
        Command::Mfa(args) => ExitCode::from(runtime.block_on(client::mfa(args)) as u8),
        Command::Keys(command) => match runtime.block_on(keys_command(command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Migrate(args) => {
            let _telemetry = telemetry::init(LogFormat::Text, None);
            match runtime.block_on(migrate(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The Argon2id PHC string of the first line on stdin, with a random salt and the crate's
/// default (OWASP-recommended) cost.
fn hash_password() -> anyhow::Result<String> {
    use argon2::PasswordHasher;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "an empty password");
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("no random source"))?;
    let salt =
        argon2::password_hash::SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string())
}

/// The settings of `serve` or `check-config`, parsed again on their own so that --config can
/// supply defaults; `None` after saying what is wrong.
fn load_config() -> Option<Config> {
    Config::load(std::env::args_os().skip(1))
        .map_err(|e| eprintln!("error: {e}"))
        .ok()
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    auth_sidecar::store::postgres::migrate(&args.database_url, args.timeout).await?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate {
            alg,
            kid,
            pkcs11: true,
            label,
            token,
            ..
        } => {
            let label = label.unwrap_or_else(|| kid.clone());
            let id = keys::pkcs11::generate(alg, &label, token.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("made a non-extractable {alg} key pair labelled `{label}` in the token");
            let token = token.map_or_else(String::new, |t| format!("token = \"{t}\"\n"));
            println!(
                "[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\nsource = \"pkcs11\"\nlabel = \"{label}\"\nid = \"{id}\"\n{token}state = \"verify\""
            );
            Ok(())
        }
        KeysCommand::Generate { alg, kid, dir, .. } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let file = format!("{kid}.{}", if alg.is_hmac() { "secret" } else { "pem" });
            let text = keys::generate(alg).context("generating the key")?;
            // Checked by loading it as the sidecar would, before anything is written.
            keys::check_entry(&kid, &file, alg, text.as_bytes())?;
            let path = dir.join(&file);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}; add it to {}:", path.display(), keys::MANIFEST);
            println!(
                "[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\nfile = \"{file}\"\nstate = \"verify\""
            );
            Ok(())
        }
        KeysCommand::Check { keys_dir } => {
            let set = KeySet::load_dir(&keys_dir).await?;
            println!("{}", set.summary());
            for line in set.report() {
                println!("  {line}");
            }
            Ok(())
        }
    }
}
