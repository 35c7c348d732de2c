//! Stopping on SIGINT or SIGTERM: the signal cancels a token that the
//! process's loops watch, so each can finish its step and stop cleanly.

use tokio_util::sync::CancellationToken;

/// Resolves `grace` after `token` is cancelled: the point past which a
/// process stops waiting for its loops (say, on a Redis that is down) and
/// exits anyway. Race the process's work against it.
pub async fn deadline(token: CancellationToken, grace: std::time::Duration) {
    token.cancelled().await;
    tokio::time::sleep(grace).await;
    tracing::warn!(?grace, "shutdown deadline passed; exiting without waiting any longer");
}

/// A token cancelled when the process receives SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    token
}
