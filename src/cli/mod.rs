//! The `portcullis` command line: one file per subcommand group.

mod serve;

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
    },
    /// Apply pending store migrations and exit.
    Migrate,
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
        Command::CheckConfig { file } => {
            let path = file.unwrap_or(cli.config);
            let config = load(&path)?;
            println!("{}: ok ({} servers)", path.display(), config.servers.len());
            Ok(())
        }
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
