//! The public listener, made safe to face the internet: every connection has a time limit on
//! its request head (which also bounds how long a kept-alive HTTP/1 connection may wait for
//! its next request), an inactivity limit, and a cap on its head's size (431); bodies have a
//! read deadline (408, in `read_body`); connections are capped, and at the cap the one idle
//! longest is closed to make room, so a crowd of idle or slow sockets cannot keep valid
//! callbacks out. HTTP/1.1 and cleartext HTTP/2 (prior knowledge) are served, HTTP/2 with a
//! stream cap and keep-alive pings. Shutdown is bounded: the listener closes, connections
//! finish their requests within the drain time, and whatever is still open then is closed.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use shared::config::ServerSettings;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The listener's limits, from `[server]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time for a request head, and for a kept-alive connection's next request.
    pub header_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Connections open at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub http2_max_streams: u32,
}

impl Limits {
    /// The limits `[server]` sets.
    pub fn from_settings(s: &ServerSettings) -> Self {
        Self {
            header_timeout: Duration::from_secs(s.header_timeout_secs),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs),
            max_header_bytes: s.max_header_bytes,
            max_connections: s.max_connections,
            http2_max_streams: s.http2_max_streams,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then lets open requests finish for
/// up to `drain` and closes every connection still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(128))
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let registry = Registry::default();
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: the condition passes, the loop must not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if registry.len() >= limits.max_connections {
            registry.shed();
        }
        let conn = registry.add();
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity: conn.activity.clone(),
        });
        let service = TowerToHyperService::new(router.clone().into_service::<Incoming>());
        let (builder, registry, closing, idle, first_byte) = (
            builder.clone(),
            registry.clone(),
            closing.clone(),
            limits.idle_timeout,
            limits.header_timeout,
        );
        connections.spawn(async move {
            let served = builder.serve_connection(io, service);
            tokio::pin!(served);
            let mut draining = false;
            let first = tokio::time::sleep(first_byte);
            tokio::pin!(first);
            let mut first_checked = false;
            loop {
                tokio::select! {
                    _ = &mut served => break,
                    _ = conn.close.notified() => break,
                    _ = closing.cancelled(), if !draining => {
                        // Finish the request in flight, take no new one.
                        served.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    _ = conn.idle_for(idle) => {
                        tracing::debug!("idle connection closed");
                        break;
                    }
                    // Until its first byte the protocol is not known and hyper's header
                    // timer has not started: a socket that sends nothing gets the same time.
                    _ = &mut first, if !first_checked => {
                        first_checked = true;
                        if !conn.activity.ever() {
                            tracing::debug!("connection sent nothing: closed");
                            break;
                        }
                    }
                }
            }
            registry.remove(conn.id);
        });
    }
    drop(listener);
    closing.cancel();
    let deadline = tokio::time::Instant::now() + drain;
    while !connections.is_empty() {
        match tokio::time::timeout_at(deadline, connections.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    open = connections.len(),
                    "connections still open after the drain time: closed"
                );
                connections.abort_all();
                while connections.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// The open connections, for shedding at the cap.
#[derive(Clone, Default)]
struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Default)]
struct RegistryInner {
    next: u64,
    open: HashMap<u64, Arc<Conn>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().open.len()
    }

    fn add(&self) -> Arc<Conn> {
        let mut r = self.lock();
        r.next += 1;
        let conn = Arc::new(Conn {
            id: r.next,
            activity: Arc::new(Activity::new()),
            close: Notify::new(),
            shed: AtomicBool::new(false),
        });
        r.open.insert(conn.id, conn.clone());
        shared::metrics::get()
            .connections_open
            .set(r.open.len() as i64);
        conn
    }

    fn remove(&self, id: u64) {
        let mut r = self.lock();
        r.open.remove(&id);
        shared::metrics::get()
            .connections_open
            .set(r.open.len() as i64);
    }

    /// Closes the connection that has been quiet the longest (a kept-alive or slow client;
    /// a request being answered is rarely the quietest).
    fn shed(&self) {
        let quietest = self
            .lock()
            .open
            .values()
            .filter(|c| !c.shed.load(Ordering::Relaxed))
            .max_by_key(|c| c.activity.quiet_ms())
            .cloned();
        if let Some(c) = quietest {
            c.shed.store(true, Ordering::Relaxed);
            c.close.notify_one();
            shared::metrics::get()
                .connections_shed
                .with_label_values(&[] as &[&str])
                .inc();
        }
    }
}

/// One open connection.
struct Conn {
    id: u64,
    activity: Arc<Activity>,
    /// Told to close (shed at the cap).
    close: Notify,
    shed: AtomicBool,
}

impl Conn {
    /// Resolves once nothing was read or written for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let quiet = Duration::from_millis(self.activity.quiet_ms());
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        // Never 0, so 0 can mean "nothing yet".
        let ms = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether a byte was ever read or written.
    fn ever(&self) -> bool {
        self.last_ms.load(Ordering::Relaxed) != 0
    }

    fn quiet_ms(&self) -> u64 {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream that records when it last moved a byte.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
