//! Reloading the policy folder when it changes, without a restart.
//!
//! Every `[policy] reload_interval` the folder's `.cedar` files are read and digested; when
//! the digest differs from the set in force, the files are loaded and validated as at start.
//! A valid set replaces the old one at once (a decision in progress finishes with the set it
//! started with). An invalid one is refused: the old set stays in force, the problems are
//! logged at `error`, `portcullis_policy_reload_errors_total` counts the refusal and
//! `portcullis_policy_valid` shows 0 until a valid set is loaded again. Reading the folder
//! every few seconds costs little: policy folders are small.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Current, Engine, read_dir};

/// Watches `current`'s folder every `interval` until `stop` is cancelled.
pub fn watch(current: Arc<Current>, interval: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    metrics::gauge!("portcullis_policy_valid").set(1.0);
    metrics::gauge!("portcullis_policy_count").set(current.get().count as f64);
    tokio::spawn(async move {
        // The digest of the last folder content refused, so that it is reported once.
        let mut refused: Option<[u8; 32]> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            let c = current.clone();
            let Ok(outcome) = tokio::task::spawn_blocking(move || check(&c, refused)).await else { continue };
            match outcome {
                Check::Unchanged => {}
                Check::Loaded(count) => {
                    refused = None;
                    metrics::counter!("portcullis_policy_reloads_total").increment(1);
                    metrics::gauge!("portcullis_policy_valid").set(1.0);
                    metrics::gauge!("portcullis_policy_count").set(count as f64);
                    tracing::info!(dir = %current.dir.display(), policies = count, "policies reloaded");
                }
                Check::Refused { digest, why } => {
                    refused = Some(digest);
                    metrics::counter!("portcullis_policy_reload_errors_total").increment(1);
                    metrics::gauge!("portcullis_policy_valid").set(0.0);
                    tracing::error!(
                        dir = %current.dir.display(),
                        error = %why,
                        "the changed policies were refused; the policies loaded before stay in force"
                    );
                }
            }
        }
    })
}

enum Check {
    Unchanged,
    Loaded(usize),
    Refused { digest: [u8; 32], why: String },
}

fn check(current: &Current, refused: Option<[u8; 32]>) -> Check {
    let files = match read_dir(&current.dir) {
        Ok(files) => files,
        Err(e) => {
            // A folder that cannot be read is a refused change too: it is reported once per
            // state (its digest is that of nothing).
            let digest = super::digest(&[]);
            return if refused == Some(digest) {
                Check::Unchanged
            } else {
                Check::Refused { digest, why: e.to_string() }
            };
        }
    };
    let digest = super::digest(&files);
    if digest == current.get().digest || refused == Some(digest) {
        return Check::Unchanged;
    }
    match Engine::load(&files, current.offset_minutes) {
        Ok(engine) => {
            let count = engine.count;
            current.replace(engine);
            Check::Loaded(count)
        }
        Err(e) => Check::Refused { digest, why: e.to_string() },
    }
}
