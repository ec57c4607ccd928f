//! `portcullis connect` and `portcullis connection …`: upstream OAuth connections kept in the
//! vault, and the upstream half of offboarding (`user disable`).

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::clock::rfc3339;
use crate::config::Config;
use crate::keys::SharedKeyRing;
use crate::store::Store;
use crate::vault::Vault;

/// `portcullis connection …`
#[derive(Debug, Subcommand)]
pub enum ConnectionCmd {
    /// List connections (never tokens): server, whose, scopes, expiry, last refresh, status.
    List {
        /// Only this user's (or service account's).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a connection at the provider (RFC 7009, where offered) and delete it.
    Revoke {
        /// The server.
        server: String,
        /// Whose connection (omit for a shared connection).
        #[arg(long)]
        user: Option<String>,
    },
}

/// The vault for `config`, or an error naming why there is none.
async fn vault(config: &Config, store: &Store) -> anyhow::Result<Arc<Vault>> {
    let ring = crate::keys::load_key_ring(&config.gateway.data_dir)?;
    let keys = SharedKeyRing::new(ring, Some(config.gateway.data_dir.clone()));
    let public_url = match &config.gateway.public_url {
        Some(u) => u.clone(),
        None => url::Url::parse(&format!("http://{}", config.gateway.listen))?,
    };
    Vault::from_config(config, store.clone(), keys, &public_url)
        .context("no server in this configuration uses upstream OAuth (auth = { type = \"oauth\" })")
}

/// The id of the user or service account named `name`.
pub(super) async fn principal_id(store: &Store, name: &str) -> anyhow::Result<String> {
    for service in [false, true] {
        if let Some(p) = store.principal_list(service).await?.into_iter().find(|p| p.name == name) {
            return Ok(p.id);
        }
    }
    bail!("no user or service account named {name}")
}

/// `portcullis connect SERVER [--user NAME]`: prints a single-use connect link, alone on its
/// last line.
pub fn connect(config: &Config, server: &str, user: Option<&str>) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let vault = vault(config, &store).await?;
        if !config.servers.iter().any(|s| s.name == server) {
            bail!("no server named {server}");
        }
        let subject = match (vault.is_shared(server), user) {
            (true, None) => String::new(),
            (true, Some(_)) => bail!("'{server}' uses one shared connection; omit --user"),
            (false, None) => bail!("'{server}' connects each person's own account: name them with --user"),
            (false, Some(name)) => principal_id(&store, name).await?,
        };
        let link = vault.link(server, &subject, None, &[]).await?;
        store.close().await;
        use secrecy::ExposeSecret;
        println!(
            "open this link in a browser to connect {}{server}; it works once, until {}:",
            user.map(|u| format!("{u}'s account at ")).unwrap_or_default(),
            rfc3339(link.expires_at)
        );
        println!("{}", link.url.expose_secret());
        Ok(())
    })
}

/// Runs one `connection` subcommand.
pub fn run(cmd: ConnectionCmd, config: &Config) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let vault = vault(config, &store).await?;
        match cmd {
            ConnectionCmd::List { user } => {
                let subject = match &user {
                    Some(name) => Some(principal_id(&store, name).await?),
                    None => None,
                };
                let names = names(&store).await?;
                let rows = vault.connections(subject.as_deref()).await?;
                println!(
                    "{:<16} {:<16} {:<10} {:<21} {:<21} {:<24} LAST ERROR",
                    "SERVER", "WHOSE", "STATUS", "EXPIRES", "REFRESHED", "SCOPES"
                );
                for r in rows {
                    let whose = if r.subject.is_empty() {
                        "(shared)".to_owned()
                    } else {
                        names
                            .iter()
                            .find(|(id, _)| *id == r.subject)
                            .map(|(_, n)| n.clone())
                            .unwrap_or(r.subject.clone())
                    };
                    let time = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "-".to_owned());
                    let scopes = if r.scopes.is_empty() { "-".to_owned() } else { r.scopes.clone() };
                    println!(
                        "{:<16} {:<16} {:<10} {:<21} {:<21} {:<24} {}",
                        r.server,
                        whose,
                        r.status,
                        time(r.expires_at),
                        time(r.refreshed_at),
                        scopes,
                        r.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
            ConnectionCmd::Revoke { server, user } => {
                let subject = match &user {
                    Some(name) => principal_id(&store, name).await?,
                    None => String::new(),
                };
                match vault.revoke(&server, &subject).await? {
                    Some(outcome) => println!("revoked the connection to {server}: {outcome}"),
                    None => bail!("no connection to {server} for {}", user.as_deref().unwrap_or("the shared account")),
                }
            }
        }
        store.close().await;
        Ok(())
    })
}

async fn names(store: &Store) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for service in [false, true] {
        out.extend(store.principal_list(service).await?.into_iter().map(|p| (p.id, p.name)));
    }
    Ok(out)
}

/// The upstream half of offboarding: revokes every connection of `subject` at its provider
/// and deletes it. Returns `(server, outcome)` pairs; empty without a vault.
pub(super) async fn revoke_all(config: &Config, store: &Store, subject: &str) -> anyhow::Result<Vec<(String, String)>> {
    let Ok(vault) = vault(config, store).await else { return Ok(Vec::new()) };
    store.vault_forget_subject(subject).await?;
    let mut report = Vec::new();
    for c in vault.connections(Some(subject)).await? {
        let mut outcome = match vault.revoke(&c.server, subject).await {
            Ok(Some(o)) => o,
            Ok(None) => "already gone".to_owned(),
            Err(e) => format!("not revoked: {e}"),
        };
        let stdio = config
            .servers
            .iter()
            .any(|s| s.name == c.server && matches!(s.transport, crate::config::ServerTransport::Stdio { .. }));
        if stdio {
            outcome.push_str("; running gateways stop this person's process");
        }
        report.push((c.server, outcome));
    }
    Ok(report)
}
