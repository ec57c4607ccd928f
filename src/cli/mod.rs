//! The `portcullis` command line: one file per subcommand group.

mod audit;
mod connection;
mod group;
mod keys;
mod policy;
mod secret;
mod serve;
mod token;
mod user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Portcullis, an MCP gateway.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG", default_value = "portcullis.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Validate a configuration file without starting anything.
    CheckConfig {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
        /// Fail on warnings too (settings that are valid but will not work as written).
        #[arg(long)]
        strict: bool,
    },
    /// Apply pending store migrations and exit.
    Migrate,
    /// Inspect the audit log: verify, tail, search, export.
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: user::PrincipalCmd,
    },
    /// Manage service accounts (principals for headless agents and scheduled jobs).
    ServiceAccount {
        #[command(subcommand)]
        cmd: user::PrincipalCmd,
    },
    /// Manage groups.
    Group {
        #[command(subcommand)]
        cmd: group::GroupCmd,
    },
    /// Manage grant tokens.
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
    /// Manage static upstream credentials (stored encrypted; values are read from stdin).
    Secret {
        #[command(subcommand)]
        cmd: secret::SecretCmd,
    },
    /// Print a single-use link that connects an upstream OAuth account (alone on the last line).
    Connect {
        /// The server (one with `auth = { type = "oauth" }`).
        server: String,
        /// The person (or service account) whose account it is; omit for a shared connection.
        #[arg(long)]
        user: Option<String>,
    },
    /// Upstream OAuth connections: list, revoke.
    Connection {
        #[command(subcommand)]
        cmd: connection::ConnectionCmd,
    },
    /// Manage the master key ring: list, rotate, retire.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// Cedar policies: validate a folder against the gateway's schema.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => serve::run(load(&cli.config)?),
        Command::CheckConfig { file, strict } => {
            let path = file.unwrap_or(cli.config);
            let config = load(&path)?;
            let mut warnings = config.warnings.clone();
            warnings.extend(crate::net::config_warnings(&config));
            warnings.extend(crate::policy::config_warnings(&config));
            for warning in &warnings {
                eprintln!("{}: warning: {warning}", path.display());
            }
            if strict && !warnings.is_empty() {
                let n = warnings.len();
                anyhow::bail!("--strict: {n} warning{} above", if n == 1 { "" } else { "s" });
            }
            println!("{}: ok ({} servers)", path.display(), config.servers.len());
            Ok(())
        }
        Command::User { cmd } => user::run(cmd, false, &load(&cli.config)?),
        Command::ServiceAccount { cmd } => user::run(cmd, true, &load(&cli.config)?),
        Command::Group { cmd } => group::run(cmd, &load(&cli.config)?),
        Command::Token { cmd } => token::run(cmd, &load(&cli.config)?),
        Command::Secret { cmd } => secret::run(load(&cli.config)?, cmd),
        Command::Keys { cmd } => keys::run(load(&cli.config)?, cmd),
        Command::Connect { server, user } => connection::connect(&load(&cli.config)?, &server, user.as_deref()),
        Command::Connection { cmd } => connection::run(cmd, &load(&cli.config)?),
        Command::Audit { cmd } => audit::run(cmd, &load(&cli.config)?),
        Command::Policy { cmd } => policy::run(cmd, &cli.config),
        Command::Migrate => {
            let config = load(&cli.config)?;
            runtime()?.block_on(async {
                crate::store::Store::connect(&config.store.url).await?;
                println!("migrations applied to {}", crate::store::redact_url(&config.store.url));
                Ok(())
            })
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
