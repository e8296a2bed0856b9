//! SIGINT and SIGTERM → one cancellation token that every task watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGINT or SIGTERM.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down: draining in-flight requests");
        cancel.cancel();
    });
    Ok(token)
}
