//! `bearer-proxy healthcheck`: GET the admin `/healthz` and say whether it
//! answered 200, for a container HEALTHCHECK where no curl exists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The address to probe: a wildcard listen address is reached on loopback.
pub fn probe_address(admin_listen: SocketAddr) -> SocketAddr {
    let ip = match admin_listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, admin_listen.port())
}

/// `Ok` when `/healthz` at `admin_listen` answers 200 within `timeout`.
pub async fn run(admin_listen: SocketAddr, timeout: Duration) -> Result<(), String> {
    let addr = probe_address(admin_listen);
    match tokio::time::timeout(timeout, probe(addr)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "http://{addr}/healthz did not answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn probe(addr: SocketAddr) -> Result<(), String> {
    let url = format!("http://{addr}/healthz");
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() {
        match stream.read(&mut head[len..]).await {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(format!("{url}: {e}")),
        }
        if head[..len].contains(&b'\n') {
            break;
        }
    }
    let status_line = String::from_utf8_lossy(&head[..len]);
    let status_line = status_line.lines().next().unwrap_or_default();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("{url} answered HTTP {code}")),
        None => Err(format!("{url} did not answer with HTTP")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_probed_on_loopback() {
        let probe = |s: &str| {
            s.parse()
                .map(probe_address)
                .map(|a| a.to_string())
                .unwrap_or_default()
        };
        assert_eq!(probe("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(probe("[::]:9090"), "[::1]:9090");
        assert_eq!(probe("10.1.2.3:9090"), "10.1.2.3:9090");
    }
}
