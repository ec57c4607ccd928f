//! `portcullis token …`: grant tokens for users and service accounts.

use clap::{ArgGroup, Subcommand};

use crate::authn::token::NewToken;
use crate::clock::rfc3339;
use crate::config::{Config, parse_duration};
use crate::store::Store;

/// Manage grant tokens.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token; it is printed once, alone on the last line.
    #[command(group(ArgGroup::new("owner").required(true).args(["user", "service_account"])))]
    Create {
        /// For this user.
        #[arg(long)]
        user: Option<String>,
        /// For this service account.
        #[arg(long)]
        service_account: Option<String>,
        /// A name to recognise it by (`laptop`, `ci`).
        #[arg(long)]
        name: String,
        /// Lifetime such as `90d`, `12h`; default: no expiry.
        #[arg(long)]
        expires: Option<String>,
        /// Limit it to these servers (repeatable); default: every server.
        #[arg(long = "server")]
        servers: Vec<String>,
    },
    /// List tokens (never their values).
    List {
        /// Only this user's or service account's tokens.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id.
    Revoke {
        /// Token id (from `token list`).
        id: String,
    },
}

/// Runs a token command.
pub fn run(cmd: TokenCmd, config: &Config) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let now = super::user::now();
        match cmd {
            TokenCmd::Create { user, service_account, name, expires, servers } => {
                let owner = user.or(service_account).unwrap_or_default();
                let expires_at = match expires {
                    None => None,
                    Some(text) => {
                        let d = parse_duration(&text)
                            .ok_or_else(|| anyhow::anyhow!("--expires {text:?} is not a duration like 90d or 12h"))?;
                        Some(now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
                    }
                };
                for s in &servers {
                    if !config.servers.iter().any(|c| &c.name == s) {
                        anyhow::bail!("--server {s:?} is not a configured server");
                    }
                }
                let servers = (!servers.is_empty()).then_some(servers);
                let token = NewToken::generate();
                let id = store.token_create(&owner, &name, &token.hash(), &servers, expires_at, now).await??;
                let expiry = expires_at.map(rfc3339).unwrap_or_else(|| "never".to_owned());
                let scope = servers.map(|s| s.join(",")).unwrap_or_else(|| "all servers".to_owned());
                println!("created token {id} for {owner} ({name}); servers: {scope}; expires: {expiry}");
                println!("it is shown only now; store it like a password:");
                println!("{}", token.expose());
            }
            TokenCmd::List { user } => {
                let rows = store.token_list(user.as_deref()).await?;
                println!(
                    "{:<37} {:<16} {:<12} {:<16} {:<21} {:<21} {:<21} STATUS",
                    "ID", "OWNER", "NAME", "SERVERS", "CREATED", "EXPIRES", "LAST USED"
                );
                for r in rows {
                    let servers = r.servers.map(|s| s.join(",")).unwrap_or_else(|| "*".to_owned());
                    let status = match (r.revoked_at, r.expires_at) {
                        (Some(_), _) => "revoked",
                        (None, Some(e)) if e <= now => "expired",
                        _ => "active",
                    };
                    println!(
                        "{:<37} {:<16} {:<12} {:<16} {:<21} {:<21} {:<21} {status}",
                        r.id,
                        r.owner,
                        r.name,
                        servers,
                        rfc3339(r.created_at),
                        r.expires_at.map(rfc3339).unwrap_or_else(|| "never".to_owned()),
                        r.last_used_at.map(rfc3339).unwrap_or_else(|| "-".to_owned()),
                    );
                }
            }
            TokenCmd::Revoke { id } => {
                if !store.token_revoke(&id, now).await? {
                    anyhow::bail!("no token {id}");
                }
                println!("revoked token {id}");
            }
        }
        store.close().await;
        Ok(())
    })
}
