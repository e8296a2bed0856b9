//! `listen = "unix:/path"`: the socket's mode from the first instant, stale
//! sockets replaced, live ones and other files left alone, removed at exit.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use bearer_proxy::config::{Config, Flags};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn temp_dir(name: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("bearer-proxy-unix-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn the_proxy_serves_on_a_unix_socket_with_its_mode_and_removes_it() -> TestResult {
    let dir = temp_dir("serve")?;
    let path = dir.join("proxy.sock");
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let listen = format!("unix:{}", path.display());
    let env = env_for(
        &token,
        &upstream.url(),
        &[
            ("BEARER_PROXY_LISTEN", &listen),
            ("BEARER_PROXY_SOCKET_MODE", "0660"),
            ("BEARER_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
    );
    let config = Config::load(&Flags::default(), &env)?;
    let listeners = bearer_proxy::Listeners::bind(&config).await?;
    let meta = std::fs::symlink_metadata(&path)?;
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "no private directory left behind: {leftovers:?}"
    );

    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(bearer_proxy::run(config, listeners, shutdown.clone()));
    until(|| token.count() == 1, "the first token").await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut stream = tokio::net::UnixStream::connect(&path).await?;
    stream
        .write_all(b"GET /over/unix HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    assert_eq!(RawResponse::parse(&answer)?.status, 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer token-1")
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await???;
    assert!(!path.exists(), "the socket is removed on shutdown");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn only_a_stale_socket_is_replaced() -> TestResult {
    let dir = temp_dir("replace")?;
    // A stale socket: its listener is gone, the file remains.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale)?);
    assert!(stale.exists());
    let socket = bearer_proxy::listen::bind_unix(&stale, 0o600)?;
    assert_eq!(
        std::fs::metadata(&stale)?.permissions().mode() & 0o777,
        0o600
    );
    drop(socket);
    assert!(!stale.exists());

    // A live socket: left alone.
    let live = dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live)?;
    let error = bearer_proxy::listen::bind_unix(&live, 0o600)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("another process is listening"), "{error}");
    assert!(live.exists());

    // A regular file: left alone.
    let file = dir.join("data.txt");
    std::fs::write(&file, "keep me")?;
    let error = bearer_proxy::listen::bind_unix(&file, 0o600)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file)?, "keep me");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
