//! The `auth-sidecar` binary: `serve`, `health` and `token`.

use std::process::ExitCode;

use anyhow::Context;
use auth_sidecar::client::{self, HealthArgs, TokenArgs};
use auth_sidecar::config::{self, Config, ServeArgs};
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
    Serve(ServeArgs),
    /// Probe a sidecar's grpc.health.v1 (exit 0 SERVING, 1 bad arguments, 2 cannot connect or
    /// timed out, 3 the call failed, 4 not SERVING).
    Health(HealthArgs),
    /// Issue, validate or revoke tokens through a running sidecar.
    Token(TokenArgs),
    /// Apply the embedded PostgreSQL migrations and exit (for a Kubernetes Job or an init
    /// container; run `serve` with --migrate=false then).
    Migrate(MigrateArgs),
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
            // Parsed again on its own, so that --config can supply defaults.
            let config = match Config::load(std::env::args_os().skip(1)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(USAGE);
                }
            };
            init_logging();
            match runtime
                .block_on(auth_sidecar::server::run(config))
                .context("serve")
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health(args) => ExitCode::from(runtime.block_on(client::health(args)) as u8),
        Command::Token(args) => ExitCode::from(runtime.block_on(client::token(args)) as u8),
        Command::Migrate(args) => {
            init_logging();
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

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    auth_sidecar::store::postgres::migrate(&args.database_url, args.timeout).await?;
    tracing::info!("migrations applied");
    Ok(())
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
