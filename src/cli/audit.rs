//! `portcullis audit …`: verify the hash chain, tail, search and export the audit log.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};

use crate::audit::storage::AuditQuery;
use crate::audit::{Entry, Verification, hex, time};
use crate::config::Config;
use crate::store::Store;

/// How often `tail --follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Records per query when streaming the whole log.
const PAGE: i64 = 1000;

/// Inspect the audit log.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain from the first record; exits non-zero naming the first bad seq.
    Verify {
        /// Also check the log against this checkpoint file (`[audit] checkpoint_file`): fails
        /// when the log was cut or rolled back behind a checkpoint, or a line does not verify
        /// under the key ring.
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
    /// Print the newest records, oldest first.
    Tail {
        /// How many.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        lines: i64,
        /// Keep printing records as they are written (until Ctrl-C).
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// Print the newest records matching every given filter, oldest first.
    Search {
        /// Principal name or id.
        #[arg(long)]
        user: Option<String>,
        /// Upstream server name.
        #[arg(long)]
        server: Option<String>,
        /// Tool name.
        #[arg(long)]
        tool: Option<String>,
        /// From this time on: RFC 3339, a date, or Unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// Before this time: RFC 3339, a date, or Unix seconds.
        #[arg(long)]
        until: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// Write every record, oldest first, with its seq and hashes.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write to this file (created with mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// Runs an audit command.
pub fn run(cmd: AuditCmd, config: &Config) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        let result = match cmd {
            AuditCmd::Verify { checkpoints } => verify(&store, checkpoints.as_deref(), config).await,
            AuditCmd::Tail { lines, follow, json } => tail(&store, lines, follow, json).await,
            AuditCmd::Search { user, server, tool, since, until, limit, json } => {
                let query = AuditQuery {
                    user,
                    server,
                    tool,
                    since_ms: since.as_deref().map(time::parse_ms).transpose()?,
                    until_ms: until.as_deref().map(time::parse_ms).transpose()?,
                    after_seq: None,
                    limit,
                };
                let mut out = std::io::stdout().lock();
                for e in store.audit_search(&query).await? {
                    print_entry(&mut out, &e, json)?;
                }
                Ok(())
            }
            AuditCmd::Export { format: ExportFormat::Jsonl, out } => export(&store, out).await,
        };
        store.close().await;
        result
    })
}

async fn verify(store: &Store, checkpoints: Option<&std::path::Path>, config: &Config) -> anyhow::Result<()> {
    let (anchors, summary) = match checkpoints {
        None => (crate::audit::Anchors::new(), String::new()),
        Some(path) => read_checkpoints(path, config)?,
    };
    match crate::audit::verify_anchored(store, &anchors).await? {
        Verification::Intact { records, head: None } => println!("ok: {records} records{summary}"),
        Verification::Intact { records, head: Some((seq, hash)) } => {
            println!("ok: {records} records; head seq {seq} hash {}{summary}", hex(&hash));
        }
        Verification::Broken(b) => anyhow::bail!("{b}"),
    }
    Ok(())
}

/// The authentic checkpoints of `path` as anchors, and a summary for the `ok` line. Fails on
/// any line that does not verify: a forged or damaged checkpoint is itself a finding.
fn read_checkpoints(path: &std::path::Path, config: &Config) -> anyhow::Result<(crate::audit::Anchors, String)> {
    use crate::audit::checkpoint::{PURPOSE, check_file};
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let ring = crate::keys::load_key_ring(&config.gateway.data_dir)?;
    let checked = check_file(&text, &ring);
    if let Some((line, why)) = checked.bad.first() {
        anyhow::bail!(
            "checkpoint file {} line {line}: {why} ({} bad line(s); `{PURPOSE}` keys come from the master key ring)",
            path.display(),
            checked.bad.len()
        );
    }
    if let Some(line) = checked.unknown_key.first() {
        anyhow::bail!(
            "checkpoint file {} line {line}: signed with a key that is not in the key ring ({} such line(s)); \
             verify with the ring that wrote them, or archive the file once verified before retiring a key",
            path.display(),
            checked.unknown_key.len()
        );
    }
    let anchors = checked
        .anchors
        .iter()
        .map(|(&seq, (hash, line, time_ms))| {
            (seq, (hash.clone(), format!("the checkpoint of {} (line {line})", time::format_ms(*time_ms))))
        })
        .collect();
    let summary = match checked.anchors.last_key_value() {
        Some((seq, (_, line, time_ms))) => format!(
            "; {} checkpoint(s) agree, the newest at seq {seq} ({}, line {line})",
            checked.count,
            time::format_ms(*time_ms)
        ),
        None => "; no checkpoints in the file yet".to_owned(),
    };
    Ok((anchors, summary))
}

async fn tail(store: &Store, lines: i64, follow: bool, json: bool) -> anyhow::Result<()> {
    // At least one record is read so that `-n 0 --follow` starts from the current head.
    let newest = store.audit_search(&AuditQuery { limit: lines.max(1), ..AuditQuery::default() }).await?;
    let mut after = newest.last().map_or(0, |e| e.seq);
    {
        let mut out = std::io::stdout().lock();
        let skip = newest.len().saturating_sub(usize::try_from(lines.max(0)).unwrap_or(0));
        for e in &newest[skip..] {
            print_entry(&mut out, e, json)?;
        }
    }
    if !follow {
        return Ok(());
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let page = store.audit_after(after, PAGE).await?;
        if let Some(e) = page.last() {
            after = e.seq;
        }
        let mut out = std::io::stdout().lock();
        for e in &page {
            print_entry(&mut out, e, json)?;
        }
        out.flush()?;
        drop(out);
        if page.len() < PAGE as usize {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }
}

async fn export(store: &Store, path: Option<PathBuf>) -> anyhow::Result<()> {
    let sink: Box<dyn Write> = match &path {
        Some(p) => Box::new(create_private(p)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(sink);
    let (mut after, mut count) = (0, 0u64);
    loop {
        let page = store.audit_after(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            serde_json::to_writer(&mut out, e)?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    out.flush()?;
    if let Some(p) = path {
        eprintln!("exported {count} records to {}", p.display());
    }
    Ok(())
}

/// A new file readable only by its owner: the log names people and what they did.
fn create_private(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

fn print_entry(out: &mut impl Write, e: &Entry, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, e)?;
        writeln!(out)?;
        return Ok(());
    }
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
    let who = match (&e.principal_name, &e.principal_kind) {
        (Some(n), Some(k)) => format!("{n}({k})"),
        (n, _) => dash(n),
    };
    let client = match (&e.client_name, &e.client_version) {
        (Some(n), Some(v)) => format!("{n}/{v}"),
        (n, _) => dash(n),
    };
    let status = e.upstream_status.map_or_else(|| "-".to_owned(), |s| s.to_string());
    writeln!(
        out,
        "{}  #{}  {}  {}  {}  {}  {} {}  {}  {}us  in={} out={}  token={}  req={}  {}",
        time::format_ms(e.time_ms),
        e.seq,
        e.decision,
        who,
        client,
        dash(&e.server),
        e.method,
        dash(&e.tool),
        status,
        e.latency_us,
        e.bytes_in,
        e.bytes_out,
        dash(&e.token_id),
        e.request_id,
        e.arguments,
    )?;
    Ok(())
}
