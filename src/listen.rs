//! The listeners: TCP, or a unix socket created with its final mode from the
//! first instant (bound inside a private directory, then moved into place).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::either::Either;

use crate::config::{Config, ListenAddr};

/// A connection accepted by either kind of listener.
pub type Connection = Either<TcpStream, UnixStream>;

/// Where clients connect.
#[derive(Debug)]
pub enum ProxyListener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix socket, removed when the listener is dropped at shutdown.
    Unix(UnixSocket),
}

impl From<TcpListener> for ProxyListener {
    fn from(listener: TcpListener) -> Self {
        ProxyListener::Tcp(listener)
    }
}

impl ProxyListener {
    /// The next connection (TCP ones with `TCP_NODELAY`).
    pub async fn accept(&self) -> io::Result<Connection> {
        match self {
            ProxyListener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Either::Left(stream))
            }
            ProxyListener::Unix(socket) => Ok(Either::Right(socket.listener.accept().await?.0)),
        }
    }

    /// The TCP address, if it is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            ProxyListener::Tcp(listener) => listener.local_addr().ok(),
            ProxyListener::Unix(_) => None,
        }
    }

    /// What to print: the address or `unix:/path`.
    pub fn describe(&self) -> String {
        match self {
            ProxyListener::Tcp(listener) => listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            ProxyListener::Unix(socket) => format!("unix:{}", socket.path.display()),
        }
    }
}

/// A bound unix socket that removes its file when dropped, if the file is
/// still this socket (not one another process has put there since).
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if identity(&self.path).is_some_and(|id| id == self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device and inode of what `path` names (not following links).
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// Binds a unix socket at `path` with `mode`, never more open than that: it
/// is bound inside a fresh directory only the owner can enter, given its
/// mode there, then renamed into place. An existing `path` is replaced only
/// if it is a socket on which nothing answers.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixSocket> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: remove it or choose another path",
                    path.display()
                ),
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            // Only "refused" proves nothing listens: "permission denied"
            // may well be another user's live socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process is listening on {}", path.display()),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a socket that may be in use ({e}): remove it if it is stale",
                        path.display()
                    ),
                ));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(
        ".bearer-proxy-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let staged = private.join("socket");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        // A hard link fails if the path appeared meanwhile (another instance
        // starting at the same moment), where a rename would replace it.
        std::fs::hard_link(&staged, path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot place the socket at {}: {e}", path.display()),
            )
        })?;
        let identity = identity(path).ok_or_else(|| io::Error::other("the socket vanished"))?;
        Ok(UnixSocket {
            listener,
            path: path.to_owned(),
            identity,
        })
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// The two listeners, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Where clients send requests.
    pub proxy: ProxyListener,
    /// Where `/healthz`, `/readyz` and `/status` are served.
    pub admin: TcpListener,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    /// The config key of the address.
    pub key: &'static str,
    /// The address.
    pub addr: String,
    /// Why.
    pub source: io::Error,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> Result<Self, BindError> {
        let proxy = match &config.listen {
            ListenAddr::Tcp(addr) => ProxyListener::Tcp(bind_tcp(*addr, "listen").await?),
            ListenAddr::Unix(path) => {
                ProxyListener::Unix(bind_unix(path, config.socket_mode).map_err(|source| {
                    BindError {
                        key: "listen",
                        addr: config.listen.to_string(),
                        source,
                    }
                })?)
            }
        };
        Ok(Self {
            proxy,
            admin: bind_tcp(config.admin_listen, "admin_listen").await?,
        })
    }
}

async fn bind_tcp(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        key,
        addr: addr.to_string(),
        source,
    })
}
