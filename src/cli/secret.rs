//! `portcullis secret`: static upstream credentials, stored encrypted. Values go in through
//! stdin and never come out of the CLI.

use std::io::{IsTerminal, Read};

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::clock::rfc3339;
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;

use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::store::secrets::{MAX_SECRET_BYTES, check_secret_name};

/// `portcullis secret …`
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a secret, replacing any earlier value. The value is read from stdin (one trailing
    /// newline is dropped), e.g. `portcullis secret set github-pat < token.txt`.
    Set {
        /// The name server configs refer to (`A-Z a-z 0-9 . _ -`).
        name: String,
    },
    /// List secret names and when they were set (never values).
    List,
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
    },
}

/// Runs one `secret` subcommand.
pub fn run(config: Config, cmd: SecretCmd) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        match cmd {
            SecretCmd::Set { name } => set(&config, &name).await,
            SecretCmd::List => list(&config).await,
            SecretCmd::Delete { name } => {
                let store = Store::connect(&config.store.url).await?;
                let deleted = store.secret_delete(&name).await?;
                store.close().await;
                if !deleted {
                    bail!("no secret named {name}");
                }
                println!("deleted secret {name}");
                Ok(())
            }
        }
    })
}

async fn set(config: &Config, name: &str) -> anyhow::Result<()> {
    check_secret_name(name)?;
    let stdin = std::io::stdin().lock();
    let terminal = stdin.is_terminal();
    let value = read_value(stdin, terminal)?;
    let ring = crate::keys::load_key_ring(&config.gateway.data_dir)?;
    let store = Store::connect(&config.store.url).await?;
    let now = i64::try_from(Clock::system().unix_secs()).unwrap_or(i64::MAX);
    store.secret_set(name, &value, &ring, now).await?;
    store.close().await;
    println!("stored secret {name} (key {})", ring.active_id());
    Ok(())
}

async fn list(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.store.url).await?;
    let secrets = store.secret_list().await?;
    store.close().await;
    let width = secrets.iter().map(|s| s.name.len()).max().unwrap_or(0).max(4);
    println!("{:width$}  {:20}  UPDATED", "NAME", "CREATED");
    for s in secrets {
        println!("{:width$}  {:20}  {}", s.name, rfc3339(s.created_at), rfc3339(s.updated_at));
    }
    Ok(())
}

/// Reads a secret value: at most [`MAX_SECRET_BYTES`], UTF-8, one trailing newline (`\n` or
/// `\r\n`) dropped, not empty. Refuses a terminal, which would echo what is typed.
fn read_value(input: impl Read, terminal: bool) -> anyhow::Result<SecretString> {
    if terminal {
        bail!(
            "stdin is a terminal, which would show the value as it is typed; pipe it in instead, e.g. \
             `portcullis secret set NAME < file` or `read -rs V && printf %s \"$V\" | portcullis secret set NAME`"
        );
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(256));
    let limit = u64::try_from(MAX_SECRET_BYTES + 2).unwrap_or(u64::MAX);
    input.take(limit + 1).read_to_end(&mut bytes).context("reading the value from stdin")?;
    for ending in [&b"\r\n"[..], b"\n"] {
        if bytes.ends_with(ending) {
            let len = bytes.len() - ending.len();
            bytes.truncate(len);
            break;
        }
    }
    if bytes.is_empty() {
        bail!("the value read from stdin is empty");
    }
    if bytes.len() > MAX_SECRET_BYTES {
        bail!("the value is longer than {MAX_SECRET_BYTES} bytes");
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow::anyhow!("the value is not UTF-8"))?;
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn piped(bytes: &[u8]) -> anyhow::Result<SecretString> {
        read_value(bytes, false)
    }

    #[test]
    fn secret_value_reading_trims_one_newline_and_refuses_empty() {
        assert_eq!(piped(b"abc\n").expect("ok").expose_secret(), "abc");
        assert_eq!(piped(b"abc\r\n").expect("ok").expose_secret(), "abc");
        assert_eq!(piped(b"abc\n\n").expect("ok").expose_secret(), "abc\n");
        assert_eq!(piped(b" a b ").expect("ok").expose_secret(), " a b ");
        assert!(piped(b"\n").is_err());
        assert!(piped(b"").is_err());
        assert!(piped(b"\xff\xfe").is_err());
        assert!(read_value(&b"x"[..], true).is_err(), "a terminal is refused");
        let err = piped(b"\xffhunter2").expect_err("not UTF-8").to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
