//! Logging: a tracing subscriber writing text or JSON lines to stderr,
//! filtered by `RUST_LOG` (default `info`). Lines are written by a thread
//! of their own from a bounded queue: a slow terminal or pipe never blocks
//! a worker. Should the queue fill ([`QUEUE`] messages behind: a line, or
//! a batch of access-log lines of up to 8 KiB, so at most 32 MiB), they
//! are dropped, not waited for, and counted
//! (`bearer_proxy_log_dropped_lines_total`, one per message).

use std::io::IsTerminal;

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Messages the log's queue holds before it drops more.
const QUEUE: usize = 4096;

/// The writer's count of lines dropped, once logging is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer, once logging is installed: the access log writes its
/// batches of lines through it, so that one thread writes all of stderr.
static WRITER: OnceLock<NonBlocking> = OnceLock::new();

/// The log's writer, for whole lines written in batches; `None` until
/// [`init`] (as in tests that run the proxy in their own process).
pub fn writer() -> Option<NonBlocking> {
    WRITER.get().cloned()
}

/// Log lines dropped because the writer fell behind.
pub fn dropped_lines() -> usize {
    DROPPED.get().map_or(0, ErrorCounter::dropped_lines)
}

/// Installs the global subscriber; a second call is a no-op. Keep the
/// guard until the process ends: dropping it writes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE)
        .thread_name("bearer-proxy-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let _ = WRITER.set(writer.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

/// `at` in RFC 3339 to the second, or a note when the clock is outside
/// what RFC 3339 can say (before 1970, after 9999), where humantime would
/// panic.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) if since.as_secs() < 253_402_300_800 => {
            humantime::format_rfc3339_seconds(at).to_string()
        }
        _ => "(the clock is out of range)".to_owned(),
    }
}
