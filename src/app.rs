//! The application: turns `Settings` into running roles. It picks the backend of each seam
//! (embedded, or RabbitMQ and Redis when `[queue].url` / `[cache].url` are set), builds one
//! messenger per bot and the model client, binds the listeners (port 0 allowed, real port
//! readable, so tests run many instances side by side), and runs until the shutdown token
//! fires: first the ingress stops taking callbacks and drains, then the worker finishes
//! what it holds within the grace period (what it does not finish stays queued: in the
//! broker, or in the embedded queue's data directory), then the broker connection and the
//! admin listener close.

use crate::admin::{self, Readiness};
use anyhow::{Context, bail};
use ingress::{IngressState, StreamConnections};
use shared::cache::redis::RedisCache;
use shared::cache::{Cache, MemoryCache};
use shared::config::{BotSettings, ChannelSettings, QueueSettings, Settings};
use shared::job::Platform;
use shared::llm::{LlmClient, Upstreams};
use shared::platform::Messenger;
use shared::platform::dingtalk::client::DingTalkMessenger;
use shared::platform::robots::messenger::RobotMessenger;
use shared::platform::robots::ratelimit::WindowLimiter;
use shared::platform::token::TokenCache;
use shared::platform::wecom::client::WecomMessenger;
use shared::platform::wecom_aibot::client::AibotMessenger;
use shared::queue::amqp::AmqpQueue;
use shared::queue::{JobQueue, MemoryQueue};
use shared::store::{Snapshot, Store};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use worker::{ChatHandler, ChatSettings, Engine, EngineSettings, NoticeHandler};

/// Which roles a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Ingress and worker together (`parley serve`).
    Serve,
    /// The HTTP ingress only (`parley ingress`).
    Ingress,
    /// The worker only (`parley worker`).
    Worker,
}

impl Roles {
    fn ingress(self) -> bool {
        matches!(self, Roles::Serve | Roles::Ingress)
    }

    fn worker(self) -> bool {
        matches!(self, Roles::Serve | Roles::Worker)
    }
}

/// One job queue and the handles the lifecycle needs.
struct Lane {
    queue: Arc<dyn JobQueue>,
    /// Set for RabbitMQ: closed last, so unsettled deliveries return to the broker.
    amqp: Option<AmqpQueue>,
}

impl Lane {
    /// A lane on the configured backend; `prefix` names its broker queues, `name` labels
    /// the embedded queue's depth metric and its jobs in the data directory.
    fn build(
        name: &'static str,
        queue: &QueueSettings,
        prefix: String,
        roles: Roles,
        max_concurrency: usize,
        data: &mut Option<(Store, Snapshot)>,
    ) -> anyhow::Result<Self> {
        if queue.url.is_none() {
            let (store, snapshot) = data
                .as_mut()
                .expect("the embedded queue has its data directory");
            let jobs = snapshot.take_jobs(name);
            let q = MemoryQueue::durable(queue.capacity, name, store.clone(), jobs);
            return Ok(Self {
                queue: Arc::new(q),
                amqp: None,
            });
        }
        let settings = QueueSettings {
            prefix,
            ..queue.clone()
        };
        let tiers = &settings.retry_delays_secs;
        let prefetch = u16::try_from(worker::intake_limit(max_concurrency)).unwrap_or(u16::MAX);
        let q = if roles.worker() {
            AmqpQueue::start_with_tiers(&settings, prefetch, tiers)?
        } else {
            AmqpQueue::publisher(&settings, tiers)?
        };
        Ok(Self {
            queue: Arc::new(q.clone()),
            amqp: Some(q),
        })
    }
}

/// The queues and cache of a process: chat jobs, and notifications in a lane of their
/// own so a robot's rate limit never holds up chat answers.
struct Backends {
    chat: Lane,
    notify: Option<Lane>,
    cache: Arc<dyn Cache>,
}

impl Backends {
    fn build(settings: &Settings, roles: Roles) -> anyhow::Result<Self> {
        if roles != Roles::Serve && (settings.queue.url.is_none() || settings.cache.url.is_none()) {
            bail!(
                "config: queue.url and cache.url: `parley ingress` and `parley worker` run apart and need RabbitMQ and Redis; use `parley serve` for the embedded ones"
            );
        }
        let q = &settings.queue;
        // The embedded backends keep what must outlive a crash in the data directory.
        let mut data = match q.url.is_none() || settings.cache.url.is_none() {
            true => Some(Store::open(&q.path, q.fsync).context("config: queue.path")?),
            false => None,
        };
        let chat = Lane::build(
            "chat",
            q,
            q.prefix.clone(),
            roles,
            settings.llm.max_concurrency,
            &mut data,
        )?;
        let notify = if settings.channels.is_empty() {
            None
        } else {
            let prefix = format!("{}.notify", q.prefix);
            Some(Lane::build(
                "notify",
                q,
                prefix,
                roles,
                settings.notify.max_concurrency,
                &mut data,
            )?)
        };
        let cache: Arc<dyn Cache> = match &settings.cache.url {
            Some(_) => Arc::new(RedisCache::start(&settings.cache)?),
            None => {
                let (store, snapshot) = data.expect("the embedded cache has its data directory");
                Arc::new(MemoryCache::durable(store, snapshot.values))
            }
        };
        Ok(Self {
            chat,
            notify,
            cache,
        })
    }

    fn lanes(&self) -> impl Iterator<Item = &Lane> {
        std::iter::once(&self.chat).chain(self.notify.as_ref())
    }
}

/// A built, bound, not yet running Parley.
pub struct Application {
    roles: Roles,
    listener: Option<TcpListener>,
    admin_listener: TcpListener,
    ingress: Option<IngressState>,
    /// The chat lane's engine and, with channels, the notification lane's.
    workers: Vec<Engine>,
    backends: Backends,
    /// `[server] shutdown_grace_secs`.
    grace: Duration,
    /// The public listener's limits.
    limits: ingress::server::Limits,
}

/// After SIGTERM, how long callbacks already being received may take to finish before their
/// connections are closed (a callback is answered in milliseconds; this bounds slow clients).
const CONNECTION_DRAIN: Duration = Duration::from_secs(5);

impl fmt::Debug for Application {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Application")
            .field("roles", &self.roles)
            .field(
                "listen",
                &self.listener.as_ref().and_then(|l| l.local_addr().ok()),
            )
            .field("admin", &self.admin_listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Builds ingress and worker in one process (`parley serve`).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_roles(settings, Roles::Serve).await
    }

    /// Builds the given roles and binds their listeners.
    pub async fn build_roles(settings: Settings, roles: Roles) -> anyhow::Result<Self> {
        let backends = Backends::build(&settings, roles)?;
        let workers = if roles.worker() {
            build_workers(&settings, &backends)?
        } else {
            Vec::new()
        };
        let (ingress, listener) = if roles.ingress() {
            let mut state = IngressState::new(
                &settings,
                backends.chat.queue.clone(),
                backends.cache.clone(),
            );
            if let Some(lane) = &backends.notify {
                let template = match &settings.notify.alertmanager_template {
                    Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                        format!("config: notify.alertmanager_template: cannot read {path}")
                    })?),
                    None => None,
                };
                state = state.with_notify(lane.queue.clone(), template);
            }
            (
                Some(state),
                Some(bind(settings.server.listen, "server.listen").await?),
            )
        } else {
            (None, None)
        };
        let admin_listener = bind(settings.server.admin_listen, "server.admin_listen").await?;
        Ok(Self {
            roles,
            listener,
            admin_listener,
            ingress,
            workers,
            backends,
            grace: Duration::from_secs(settings.server.shutdown_grace_secs),
            limits: ingress::server::Limits::from_settings(&settings.server),
        })
    }

    /// The public listener's address (`None` for a worker-only process).
    pub fn address(&self) -> SocketAddr {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .expect("this role has a public listener")
    }

    /// The admin listener's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Runs the roles until `shutdown` fires, then stops them in order.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stopping = shutdown.clone();
        let queues: Vec<_> = self.backends.lanes().map(|l| l.queue.clone()).collect();
        let cache = self.backends.cache.clone();
        let mut readiness = Readiness::default()
            .with("shutting_down", Arc::new(move || !stopping.is_cancelled()))
            .with(
                "queue",
                Arc::new(move || queues.iter().all(|q| q.is_ready())),
            );
        // Stream bots dial out as soon as the process runs.
        let streams = self
            .ingress
            .as_ref()
            .map(|state| StreamConnections::start(state, shutdown.clone()));
        if let Some(streams) = &streams {
            readiness = readiness.with("dingtalk_stream", streams.readiness());
        }
        // A chat callback needs only the queue: an ingress stays in its Service while the
        // cache is down (a notification then gets its own 503), so chat keeps flowing.
        if self.roles.worker() {
            readiness = readiness.with("cache", Arc::new(move || cache.is_ready()));
        }
        let admin_stop = CancellationToken::new();
        let admin = tokio::spawn(
            axum::serve(self.admin_listener, admin::router(readiness))
                .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
                .into_future(),
        );
        let worker_stop = CancellationToken::new();
        let grace = self.grace;
        let running: Vec<_> = self
            .workers
            .into_iter()
            .map(|w| tokio::spawn(w.run_until_stopped(worker_stop.clone(), grace)))
            .collect();
        tracing::info!(roles = ?self.roles, "parley is running");
        let served = match (self.listener, self.ingress) {
            (Some(listener), Some(state)) => {
                ingress::server::serve(
                    listener,
                    ingress::router(state),
                    self.limits.clone(),
                    shutdown.clone(),
                    CONNECTION_DRAIN,
                )
                .await;
                // The Stream connections stop on the same signal, acknowledging what they
                // queued; before the worker drains, so it drains those jobs too.
                if let Some(streams) = streams {
                    streams.join().await;
                }
                tracing::info!("ingress stopped taking callbacks");
                Ok(())
            }
            _ => {
                shutdown.cancelled().await;
                Ok(())
            }
        };
        worker_stop.cancel();
        for w in running {
            let _ = w.await;
        }
        for lane in self.backends.lanes() {
            if let Some(amqp) = &lane.amqp {
                amqp.close().await;
            }
        }
        admin_stop.cancel();
        let _ = admin.await;
        served
    }
}

fn build_workers(settings: &Settings, backends: &Backends) -> anyhow::Result<Vec<Engine>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let tokens = Arc::new(TokenCache::new(backends.cache.clone()));
    let mut messengers: HashMap<(Platform, String), Arc<dyn Messenger>> = HashMap::new();
    for bot in &settings.bots {
        let m: Arc<dyn Messenger> = match bot {
            BotSettings::DingTalk(b) => Arc::new(DingTalkMessenger::new(
                http.clone(),
                b.clone(),
                tokens.clone(),
                backends.cache.clone(),
            )),
            BotSettings::Wecom(b) => Arc::new(WecomMessenger::new(
                http.clone(),
                b.clone(),
                tokens.clone(),
                backends.cache.clone(),
            )),
            BotSettings::WecomAibot(b) => Arc::new(AibotMessenger::new(
                http.clone(),
                b.clone(),
                backends.cache.clone(),
            )),
        };
        messengers.insert((bot.platform(), bot.id().to_string()), m);
    }
    let llm: Arc<dyn LlmClient> =
        Arc::new(Upstreams::new(&settings.llm).context("building the model client")?);
    let chat = Engine::new(
        EngineSettings::chat(settings),
        backends.chat.queue.clone(),
        backends.cache.clone(),
        Arc::new(ChatHandler::new(
            ChatSettings::from_settings(settings),
            backends.cache.clone(),
            llm,
        )),
        messengers,
    );
    let mut workers = vec![chat];
    if let Some(lane) = &backends.notify {
        let robots: HashMap<(Platform, String), Arc<dyn Messenger>> = settings
            .channels
            .iter()
            .map(|c| {
                let m: Arc<dyn Messenger> = Arc::new(RobotMessenger::new(
                    http.clone(),
                    c.clone(),
                    robot_limiter(settings, backends.cache.clone(), c),
                ));
                ((c.kind.platform(), c.id.clone()), m)
            })
            .collect();
        // Notices need no model: this lane's engine has no model client or limiter.
        workers.push(Engine::new(
            EngineSettings::notify(settings),
            lane.queue.clone(),
            backends.cache.clone(),
            Arc::new(NoticeHandler),
            robots,
        ));
    }
    Ok(workers)
}

/// The cluster-wide send budget of one robot channel, over `[notify] window_secs`.
pub(crate) fn robot_limiter(
    settings: &Settings,
    cache: Arc<dyn Cache>,
    channel: &ChannelSettings,
) -> Arc<WindowLimiter> {
    Arc::new(WindowLimiter::with_window(
        cache,
        channel.messages_per_minute,
        settings.notify.window(),
    ))
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
