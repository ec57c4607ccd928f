//! `portcullis policy …`: validate a folder, print the schema, explain a decision.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::authn::{Principal, PrincipalKind};
use crate::policy::{Act, Args, Ask, Engine};
use crate::store::Store;

/// Cedar policies.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate the `.cedar` files of a folder against the schema (docs/policy.md); prints
    /// every problem with its file and policy, and fails if there is one.
    Check {
        /// The folder.
        dir: PathBuf,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Decide one request as the gateway would and print the decision with the policies that
    /// made it: `policy explain --user alice --server github --tool create_issue --args '{"repo":"acme/x"}'`.
    Explain {
        /// The user (or, with `--service`, service account) asking; their groups are read from
        /// the store.
        #[arg(long)]
        user: String,
        /// `--user` names a service account.
        #[arg(long)]
        service: bool,
        /// The server.
        #[arg(long)]
        server: String,
        /// A tool call (with `--args`).
        #[arg(long, conflicts_with_all = ["prompt", "resource"])]
        tool: Option<String>,
        /// A prompt (with `--args`).
        #[arg(long, conflicts_with = "resource")]
        prompt: Option<String>,
        /// A resource read, by URI.
        #[arg(long)]
        resource: Option<String>,
        /// The arguments, a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// The time of the request (RFC 3339); now when not given.
        #[arg(long)]
        at: Option<String>,
        /// The folder of policies; `[policy] dir` of the configuration when not given.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Runs a policy command; `config` is the configuration file (read only when needed).
pub fn run(cmd: PolicyCmd, config: &Path) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Check { dir } => {
            let engine = Engine::load_dir(&dir, 0)?;
            println!("{}: ok ({} policies)", dir.display(), engine.count);
            Ok(())
        }
        PolicyCmd::Schema => {
            print!("{}", crate::policy::SCHEMA);
            Ok(())
        }
        PolicyCmd::Explain { user, service, server, tool, prompt, resource, args, at, dir } => {
            let config = super::load(config)?;
            let (dir, offset) = match (dir, &config.policy) {
                (Some(d), p) => (d, p.as_ref().map_or(0, |p| p.utc_offset_minutes)),
                (None, Some(p)) => (p.dir.clone(), p.utc_offset_minutes),
                (None, None) => anyhow::bail!("no [policy] in the configuration: give --dir"),
            };
            let engine = Engine::load_dir(&dir, offset)?;
            let args: serde_json::Value =
                serde_json::from_str(&args).map_err(|e| anyhow::anyhow!("--args is not JSON: {e}"))?;
            let now_ms = match at {
                Some(t) => crate::audit::time::parse_ms(&t)?,
                None => crate::clock::Clock::system().unix_millis(),
            };
            let row = super::runtime()?.block_on(async {
                let store = Store::connect(&config.store.url).await?;
                let rows = store.principal_list(service).await?;
                store.close().await;
                anyhow::Ok(rows.into_iter().find(|r| r.name == user))
            })?;
            let row = row.ok_or_else(|| {
                anyhow::anyhow!("no {} named {user:?}", if service { "service account" } else { "user" })
            })?;
            let principal = Principal {
                id: row.id,
                name: row.name,
                kind: if service { PrincipalKind::Service } else { PrincipalKind::User },
                groups: row.groups,
                token_id: None,
                servers: None,
            };
            let trusted = config.servers.iter().find(|s| s.name == server).is_some_and(|s| s.trusted);
            let servers: Vec<String> = config.servers.iter().map(|s| s.name.clone()).collect();
            let act = match (&tool, &prompt, &resource) {
                (Some(t), _, _) => Act::CallTool { name: t, args: Args::Known(Some(&args)), annotations: None },
                (_, Some(p), _) => Act::GetPrompt { name: p, args: Args::Known(Some(&args)) },
                (_, _, Some(uri)) => Act::ReadResource { uri },
                _ => Act::Connect,
            };
            let ask =
                Ask { principal: &principal, server: &server, trusted, act, client: None, servers: &servers, now_ms };
            let decision = engine.decide(&ask);
            println!("decision: {}", if decision.allowed { "allow" } else { "deny" });
            println!(
                "policies: {}",
                if decision.policies.is_empty() { "(none)".to_owned() } else { decision.policies.join(", ") }
            );
            for e in &decision.errors {
                println!("error: {e}");
            }
            if !decision.allowed && decision.policies.is_empty() && decision.errors.is_empty() {
                println!("(no policy permits it: denied by default)");
            }
            Ok(())
        }
    }
}
