//! Small forward proxies for the tests of users who reach their model only through one:
//! [`FakeProxy::http`] speaks HTTP proxying (absolute-form requests for `http://` targets,
//! `CONNECT` tunnels for `https://`), [`FakeProxy::socks5`] SOCKS5 (RFC 1928, no
//! authentication, `CONNECT` to IPv4, IPv6 or a domain name). Each counts the connections it
//! carried and the targets they went to, and refuses what it does not speak.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Which protocol a [`FakeProxy`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Socks5,
}

/// A forward proxy on loopback; cheap to clone.
#[derive(Clone, Debug)]
pub struct FakeProxy {
    addr: SocketAddr,
    kind: Kind,
    targets: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl FakeProxy {
    /// An HTTP proxy on `addr` (port 0 allowed).
    pub async fn http(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start(addr, Kind::Http).await
    }

    /// A SOCKS5 proxy on `addr` (port 0 allowed).
    pub async fn socks5(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start(addr, Kind::Socks5).await
    }

    async fn start(addr: SocketAddr, kind: Kind) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let proxy = Self {
            addr: listener.local_addr()?,
            kind,
            targets: Arc::default(),
            stop: CancellationToken::new(),
        };
        let me = proxy.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = me.stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                let me = me.clone();
                tokio::spawn(async move {
                    let carried = match me.kind {
                        Kind::Http => me.carry_http(client).await,
                        Kind::Socks5 => me.carry_socks5(client).await,
                    };
                    if let Err(e) = carried {
                        tracing::debug!(error = %e, "fake proxy connection ended");
                    }
                });
            }
        });
        Ok(proxy)
    }

    /// The proxy's URL: `http://127.0.0.1:PORT` or `socks5://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::Http => "http",
            Kind::Socks5 => "socks5",
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The `host:port` of every connection carried so far, in order.
    pub fn targets(&self) -> Vec<String> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops accepting connections.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    fn record(&self, target: &str) {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target.to_owned());
    }

    async fn carry_http(&self, client: TcpStream) -> std::io::Result<()> {
        let mut client = BufReader::new(client);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if client.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let end = line == "\r\n";
            head.push_str(&line);
            if end {
                break;
            }
            if head.len() > 64 * 1024 {
                return client
                    .get_mut()
                    .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                    .await;
            }
        }
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        let mut parts = request_line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method == "CONNECT" {
            let mut upstream = TcpStream::connect(target).await?;
            self.record(target);
            client
                .get_mut()
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?;
            tokio::io::copy_bidirectional(client.get_mut(), &mut upstream).await?;
            return Ok(());
        }
        // Absolute form: `POST http://host:port/path HTTP/1.1`.
        let Some(rest) = target.strip_prefix("http://") else {
            return client
                .get_mut()
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let mut upstream = TcpStream::connect(&host).await?;
        self.record(&host);
        let version = parts.next().unwrap_or("HTTP/1.1");
        let rewritten = head.replacen(&request_line, &format!("{method} {path} {version}"), 1);
        upstream.write_all(rewritten.as_bytes()).await?;
        // Whatever the client sent beyond the head is already buffered: pass it on.
        let buffered = client.buffer().to_vec();
        upstream.write_all(&buffered).await?;
        let mut client = client.into_inner();
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok(())
    }

    async fn carry_socks5(&self, mut client: TcpStream) -> std::io::Result<()> {
        let refuse = || std::io::Error::other("not a SOCKS5 no-auth CONNECT");
        let mut greeting = [0u8; 2];
        client.read_exact(&mut greeting).await?;
        let mut methods = vec![0u8; usize::from(greeting[1])];
        client.read_exact(&mut methods).await?;
        if greeting[0] != 5 || !methods.contains(&0) {
            client.write_all(&[5, 0xff]).await?;
            return Err(refuse());
        }
        client.write_all(&[5, 0]).await?;
        let mut request = [0u8; 4];
        client.read_exact(&mut request).await?;
        if request[0] != 5 || request[1] != 1 {
            // Command not supported.
            client.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            return Err(refuse());
        }
        let host = match request[3] {
            1 => {
                let mut ip = [0u8; 4];
                client.read_exact(&mut ip).await?;
                std::net::Ipv4Addr::from(ip).to_string()
            }
            4 => {
                let mut ip = [0u8; 16];
                client.read_exact(&mut ip).await?;
                format!("[{}]", std::net::Ipv6Addr::from(ip))
            }
            3 => {
                let len = client.read_u8().await?;
                let mut name = vec![0u8; usize::from(len)];
                client.read_exact(&mut name).await?;
                String::from_utf8_lossy(&name).into_owned()
            }
            _ => {
                client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                return Err(refuse());
            }
        };
        let port = client.read_u16().await?;
        let target = format!("{host}:{port}");
        let mut upstream = match TcpStream::connect(&target).await {
            Ok(s) => s,
            Err(e) => {
                // Connection refused.
                client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                return Err(e);
            }
        };
        self.record(&target);
        client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok(())
    }
}
