//! `portcullis keys`: the master key ring. List keys and their use, rotate to a new key
//! (re-encrypting every row while gateways keep running), retire keys no row uses.

use anyhow::bail;
use clap::Subcommand;

use crate::clock::Clock;
use crate::config::Config;
use crate::keys::{Key, KeyRing, load_key_ring};
use crate::store::Store;
use crate::store::rotate::{key_usage, reencrypt};

/// `portcullis keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Show the ring's keys and how many encrypted rows use each.
    List,
    /// Add a new key to `{data_dir}/keys.json` without making it active, so every replica can
    /// hold it before anything is encrypted with it; then `keys rotate --to ID`.
    Add,
    /// Make a new key (or, with `--to`, a key already in the ring) active in
    /// `{data_dir}/keys.json`, then re-encrypt every row under it.
    Rotate {
        /// Activate this key of the ring (see `keys add`) instead of a new one.
        #[arg(long, conflicts_with = "reencrypt_only")]
        to: Option<String>,
        /// Change no key: re-encrypt every row under the ring's active key (after a rotation
        /// that stopped early, or when the keys come from the environment).
        #[arg(long)]
        reencrypt_only: bool,
        /// Rows per batch.
        #[arg(long, default_value_t = 100)]
        batch: u32,
    },
    /// Remove a key from `{data_dir}/keys.json`; refused while any row uses it.
    Retire {
        /// The key's id (see `keys list`).
        id: String,
    },
}

/// Runs one `keys` subcommand.
pub fn run(config: Config, cmd: KeysCmd) -> anyhow::Result<()> {
    if let KeysCmd::Add = cmd {
        return add(&config);
    }
    super::runtime()?.block_on(async move {
        let store = Store::connect(&config.store.url).await?;
        let done = match cmd {
            KeysCmd::List => list(&config, &store).await,
            KeysCmd::Add => add(&config),
            KeysCmd::Rotate { to, reencrypt_only, batch } => {
                rotate(&config, &store, to.as_deref(), reencrypt_only, batch).await
            }
            KeysCmd::Retire { id } => retire(&config, &store, &id).await,
        };
        store.close().await;
        done
    })
}

async fn list(config: &Config, store: &Store) -> anyhow::Result<()> {
    let ring = load_key_ring(&config.gateway.data_dir)?;
    let mut usage = key_usage(store).await?;
    println!("keys from {}", ring.source());
    println!("{:32}  {:6}  {:20}  ROWS", "ID", "ACTIVE", "CREATED");
    for k in ring.keys() {
        let active = if &k.id == ring.active_id() { "*" } else { "" };
        let created = k.created.map(crate::clock::rfc3339).unwrap_or_else(|| "-".to_owned());
        println!("{:32}  {active:6}  {created:20}  {}", k.id, usage.remove(k.id.as_str()).unwrap_or(0));
    }
    for (id, rows) in usage {
        eprintln!("warning: {rows} rows use key {id}, which is not in the ring");
    }
    Ok(())
}

fn now() -> i64 {
    i64::try_from(Clock::system().unix_secs()).unwrap_or(i64::MAX)
}

fn refuse_env(ring: &KeyRing) -> anyhow::Result<()> {
    if ring.source().is_env() {
        bail!(
            "the keys come from {}: change them there on every replica, then run \
             `portcullis keys rotate --reencrypt-only` (see docs/secrets.md)",
            ring.source()
        );
    }
    Ok(())
}

fn add(config: &Config) -> anyhow::Result<()> {
    let ring = load_key_ring(&config.gateway.data_dir)?;
    refuse_env(&ring)?;
    let key = Key::random();
    let id = key.fingerprint();
    let saved = ring.with_new_key(key, now())?.save(&config.gateway.data_dir)?;
    println!("added key {id} (not active) to {}", saved.source());
    println!("once every replica holds it, run `portcullis keys rotate --to {id}`");
    Ok(())
}

async fn rotate(
    config: &Config,
    store: &Store,
    to: Option<&str>,
    reencrypt_only: bool,
    batch: u32,
) -> anyhow::Result<()> {
    let data_dir = &config.gateway.data_dir;
    let mut ring = load_key_ring(data_dir)?;
    if !reencrypt_only {
        refuse_env(&ring)?;
        // Saved before any row uses it: a key must never encrypt a row before it is durable.
        ring = match to {
            Some(id) => ring.with_active(id)?,
            None => ring.with_new_active(Key::random(), now())?,
        }
        .save(data_dir)?;
        println!("active key {} saved to {}", ring.active_id(), ring.source());
    }
    let report = reencrypt(store, &ring, batch).await?;
    println!(
        "re-encrypted {} rows under key {} ({} changed meanwhile by other writers)",
        report.rows,
        ring.active_id(),
        report.raced
    );
    for f in &report.failed {
        eprintln!("cannot re-encrypt {} {:?}: {}", f.table, f.id, f.error);
    }
    if report.remaining > 0 {
        eprintln!(
            "{} rows still use other keys: once every replica has loaded the ring, run \
             `portcullis keys rotate --reencrypt-only`",
            report.remaining
        );
    }
    if !report.failed.is_empty() {
        bail!("{} rows could not be re-encrypted", report.failed.len());
    }
    Ok(())
}

async fn retire(config: &Config, store: &Store, id: &str) -> anyhow::Result<()> {
    let ring = load_key_ring(&config.gateway.data_dir)?;
    if ring.source().is_env() {
        bail!("the keys come from {}: remove key {id} there on every replica", ring.source());
    }
    let retired = ring.without(id)?;
    let rows = key_usage(store).await?.get(id).copied().unwrap_or(0);
    if rows > 0 {
        bail!("key {id} still encrypts {rows} rows; run `portcullis keys rotate --reencrypt-only` first");
    }
    let saved = retired.save(&config.gateway.data_dir)?;
    println!("retired key {id}; {} keys remain in {}", saved.keys().len(), saved.source());
    println!("sessions sealed with it have ended: their clients re-initialize");
    Ok(())
}
