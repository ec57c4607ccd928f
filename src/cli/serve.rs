//! `portcullis serve`.

use crate::app::Gateway;
use crate::config::Config;

/// Runs the gateway until SIGINT or SIGTERM, then shuts down gracefully.
pub fn run(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(&config.log);
    super::runtime()?.block_on(async {
        let gateway = Gateway::start(config).await?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        gateway.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
