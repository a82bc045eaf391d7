//! The application: turns `Settings` into running roles. It picks the backend of each seam
//! (embedded now; brokers when `[queue].url` / `[cache].url` are set), builds one messenger
//! per bot and the model client, binds the listeners (port 0 allowed, real port readable,
//! so tests run many instances side by side), and runs until the shutdown token fires:
//! first the ingress stops taking callbacks and drains, then the worker finishes what was
//! accepted, then the admin listener closes.

use crate::admin::{self, Readiness};
use anyhow::{Context, bail};
use ingress::IngressState;
use shared::cache::{Cache, MemoryCache};
use shared::config::{BotSettings, Platform, Settings};
use shared::dingtalk::client::DingTalkMessenger;
use shared::llm::{LlmClient, OpenAiClient};
use shared::messenger::Messenger;
use shared::queue::{JobQueue, MemoryQueue};
use shared::token::TokenCache;
use shared::wecom::client::WecomMessenger;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use worker::{Worker, WorkerSettings};

/// How long in-flight jobs may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A built, bound, not yet running Parley.
pub struct Application {
    listener: TcpListener,
    admin_listener: TcpListener,
    ingress: IngressState,
    worker: Worker,
    queue: Arc<dyn JobQueue>,
    memory_queue: Option<MemoryQueue>,
    cache: Arc<dyn Cache>,
}

impl fmt::Debug for Application {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listener.local_addr().ok())
            .field("admin", &self.admin_listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Builds every part and binds both listeners.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let (queue, memory_queue): (Arc<dyn JobQueue>, Option<MemoryQueue>) = match &settings
            .queue
            .url
        {
            None => {
                let q = MemoryQueue::new(settings.queue.capacity);
                (Arc::new(q.clone()), Some(q))
            }
            Some(_) => bail!(
                "config: queue.url: the RabbitMQ backend is not part of this build yet; remove the key to use the embedded queue"
            ),
        };
        let cache: Arc<dyn Cache> = match &settings.cache.url {
            None => Arc::new(MemoryCache::new()),
            Some(_) => bail!(
                "config: cache.url: the Redis backend is not part of this build yet; remove the key to use the embedded cache"
            ),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        let tokens = Arc::new(TokenCache::new(cache.clone()));
        let mut messengers: HashMap<(Platform, String), Arc<dyn Messenger>> = HashMap::new();
        for bot in &settings.bots {
            let m: Arc<dyn Messenger> = match bot {
                BotSettings::DingTalk(b) => Arc::new(DingTalkMessenger::new(
                    http.clone(),
                    b.clone(),
                    tokens.clone(),
                )),
                BotSettings::Wecom(b) => {
                    Arc::new(WecomMessenger::new(http.clone(), b.clone(), tokens.clone()))
                }
            };
            messengers.insert((bot.platform(), bot.id().to_string()), m);
        }
        let llm: Arc<dyn LlmClient> =
            Arc::new(OpenAiClient::new(&settings.llm).context("building the model client")?);
        let worker = Worker::new(
            WorkerSettings::from_settings(&settings),
            queue.clone(),
            cache.clone(),
            llm,
            messengers,
        );
        let ingress = IngressState::new(&settings, queue.clone(), cache.clone());
        let listener = bind(settings.server.listen, "server.listen").await?;
        let admin_listener = bind(settings.server.admin_listen, "server.admin_listen").await?;
        Ok(Self {
            listener,
            admin_listener,
            ingress,
            worker,
            queue,
            memory_queue,
            cache,
        })
    }

    /// The public listener's address.
    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The admin listener's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Runs ingress, worker and admin until `shutdown` fires, then stops in order.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stopping = shutdown.clone();
        let (queue, cache) = (self.queue.clone(), self.cache.clone());
        let readiness = Readiness::default()
            .with("shutting_down", Arc::new(move || !stopping.is_cancelled()))
            .with("queue", Arc::new(move || queue.is_ready()))
            .with("cache", Arc::new(move || cache.is_ready()));
        let admin_stop = CancellationToken::new();
        let admin = tokio::spawn(
            axum::serve(self.admin_listener, admin::router(readiness))
                .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
                .into_future(),
        );
        let worker_stop = CancellationToken::new();
        let worker = tokio::spawn(
            self.worker
                .run_until_stopped(worker_stop.clone(), SHUTDOWN_GRACE),
        );
        tracing::info!(listen = %self.listener.local_addr()?, "parley is serving");
        let served = axum::serve(self.listener, ingress::router(self.ingress))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        tracing::info!("ingress stopped; letting the worker finish accepted jobs");
        if let Some(q) = &self.memory_queue {
            // Embedded queue: what it holds exists nowhere else, so work it off first.
            let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
            while q.depth() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if q.depth() > 0 {
                tracing::error!(
                    left = q.depth(),
                    "shutdown grace over with jobs still queued"
                );
            }
        }
        worker_stop.cancel();
        let _ = worker.await;
        admin_stop.cancel();
        let _ = admin.await;
        served.context("ingress server failed")
    }
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("config: {key}: cannot listen on {addr}"))
}

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM (Kubernetes stopping the pod).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}
