//! `portcullis user …` and `portcullis service-account …`.

use clap::Subcommand;

use crate::clock::{Clock, rfc3339};
use crate::config::Config;
use crate::store::Store;

/// Manage people (`user`) or headless agents (`service-account`).
#[derive(Debug, Subcommand)]
pub enum PrincipalCmd {
    /// Add one.
    Add {
        /// Unique name.
        name: String,
        /// Groups to join (they must exist); repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List them.
    List,
    /// Disable one: revokes all its grant tokens at once, and its upstream OAuth connections
    /// at their providers; the whole operation is audited.
    Disable {
        /// Name.
        name: String,
    },
    /// Enable a disabled one (revoked tokens stay revoked).
    Enable {
        /// Name.
        name: String,
    },
}

/// Runs a user (`service = false`) or service-account command.
pub fn run(cmd: PrincipalCmd, service: bool, config: &Config) -> anyhow::Result<()> {
    let what = if service { "service account" } else { "user" };
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let now = now();
        match cmd {
            PrincipalCmd::Add { name, groups } => {
                let p = store.principal_add(&name, service, &groups, now).await??;
                println!("added {what} {} (id {})", p.name, p.id);
            }
            PrincipalCmd::List => {
                let rows = store.principal_list(service).await?;
                println!("{:<24} {:<24} {:<21} DISABLED", "NAME", "GROUPS", "CREATED");
                for r in rows {
                    let disabled = r.disabled_at.map(rfc3339).unwrap_or_else(|| "-".to_owned());
                    let groups = if r.groups.is_empty() { "-".to_owned() } else { r.groups.join(",") };
                    println!("{:<24} {:<24} {:<21} {disabled}", r.name, groups, rfc3339(r.created_at));
                }
            }
            PrincipalCmd::Disable { name } => {
                let id = super::connection::principal_id(&store, &name).await?;
                let revoked = store.principal_disable(&name, now).await??;
                println!("disabled {what} {name}; revoked {revoked} grant tokens");
                let upstream = super::connection::revoke_all(config, &store, &id).await?;
                for (server, outcome) in &upstream {
                    println!("  {server}: {outcome}");
                }
                audit_disable(config, &store, &id, &name, service, revoked, &upstream).await;
            }
            PrincipalCmd::Enable { name } => {
                store.principal_enable(&name).await??;
                println!("enabled {what} {name}");
            }
        }
        store.close().await;
        Ok(())
    })
}

/// One audit record for the whole offboarding, its report in the arguments.
async fn audit_disable(
    config: &Config,
    store: &Store,
    id: &str,
    name: &str,
    service: bool,
    grants: u64,
    upstream: &[(String, String)],
) {
    use crate::audit::{Arguments, Decision, Record};
    let report = serde_json::json!({
        "grants_revoked": grants,
        "upstream": upstream.iter().map(|(s, o)| serde_json::json!({"server": s, "result": o})).collect::<Vec<_>>(),
    });
    let record = Record {
        principal_id: Some(id.to_owned()),
        principal_kind: Some(if service { "service" } else { "user" }.to_owned()),
        principal_name: Some(name.to_owned()),
        client_name: Some("portcullis-cli".to_owned()),
        arguments: Arguments::new(report),
        ..Record::new(
            Clock::system().unix_millis(),
            uuid::Uuid::now_v7().to_string(),
            "admin/user.disable",
            Decision::Allow,
        )
    };
    let writer = crate::audit::AuditWriter::start(store.clone(), &config.audit);
    if let Err(e) = writer.write(record).await {
        eprintln!("warning: the audit record of this operation could not be written: {e}");
    }
    writer.shutdown().await;
}

/// Now, in unix seconds, for the store.
pub(super) fn now() -> i64 {
    i64::try_from(Clock::system().unix_secs()).unwrap_or(i64::MAX)
}
