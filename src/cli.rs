//! Command-line dispatch. `parley serve` runs the gateway from a config file (`ingress` and
//! `worker` run its two roles apart); `parley demo` runs it on embedded defaults against
//! the built-in fakes; `parley sim` runs the fakes and the load generator; `parley dlq`
//! inspects and replays dead letters; `parley check-config` validates a file and exits.

use crate::app::{Application, Roles, shutdown_on_signals};
use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::config::Settings;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Parley: DingTalk and WeCom chat bots answered by an OpenAI-compatible model.
#[derive(Parser, Debug)]
#[command(name = "parley", version, about)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, env = "PARLEY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Listener overrides, so several processes can share one host.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ListenArgs {
    /// Public listener, overriding `[server].listen`.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Admin listener, overriding `[server].admin_listen`.
    #[arg(long)]
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// What `parley dlq` does.
#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters: id, attempts, reason, time.
    List,
    /// Put dead letters back on the job queue.
    Replay {
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// The job id to replay.
        id: Option<String>,
    },
}

/// The roles and tools of the binary.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ingress and worker in one process.
    Serve(ListenArgs),
    /// The HTTP ingress alone (needs RabbitMQ and Redis).
    Ingress(ListenArgs),
    /// The worker alone (needs RabbitMQ and Redis).
    Worker(ListenArgs),
    /// Inspect and replay dead letters (RabbitMQ's; or the data directory's, while no
    /// `parley serve` uses it).
    Dlq {
        /// Which.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// A guided tour: the real serve path against the built-in fakes, then exit.
    Demo,
    /// Protocol fakes and the load generator.
    Sim {
        /// Which (boxed: the load generator's many options would make every command large).
        #[command(subcommand)]
        command: Box<sim::SimCommand>,
    },
    /// Validate the configuration and exit.
    CheckConfig,
    /// Send one message to a group robot channel now (for scripts and cron).
    Notify {
        /// The channel id (`[[channels]].id`).
        #[arg(long)]
        channel: String,
        /// Send as markdown.
        #[arg(long)]
        markdown: bool,
        /// Markdown title (DingTalk shows it in notifications).
        #[arg(long)]
        title: Option<String>,
        /// The message.
        text: String,
    },
}

/// Parses arguments, runs the command, and maps errors to one line and exit code 1.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo => "warn",
        _ => "info",
    };
    crate::telemetry::init(cli.log_json, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
    let path = path.context("no configuration: pass --config FILE or set PARLEY_CONFIG")?;
    Ok(Settings::load(path)?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(l) => run_role(cli.config.as_deref(), l, Roles::Serve).await,
        Command::Ingress(l) => run_role(cli.config.as_deref(), l, Roles::Ingress).await,
        Command::Worker(l) => run_role(cli.config.as_deref(), l, Roles::Worker).await,
        Command::Dlq { command } => dlq(load(cli.config.as_deref())?, command).await,
        Command::CheckConfig => {
            let s = load(cli.config.as_deref())?;
            println!("configuration is valid: {} bot(s)", s.bots.len());
            Ok(())
        }
        Command::Demo => crate::demo::run().await,
        Command::Notify {
            channel,
            markdown,
            title,
            text,
        } => {
            notify(
                load(cli.config.as_deref())?,
                &channel,
                markdown,
                title,
                text,
            )
            .await
        }
        Command::Sim { command } => sim::run(*command).await,
    }
}

async fn run_role(config: Option<&Path>, listen: ListenArgs, roles: Roles) -> anyhow::Result<()> {
    let mut settings = load(config)?;
    if let Some(a) = listen.listen {
        settings.server.listen = a;
    }
    if let Some(a) = listen.admin_listen {
        settings.server.admin_listen = a;
    }
    let app = Application::build_roles(settings, roles).await?;
    app.run_until_stopped(shutdown_on_signals()).await
}

async fn dlq(settings: Settings, command: DlqCommand) -> anyhow::Result<()> {
    use shared::queue::JobQueue;
    let q = &settings.queue;
    // Broker: its dead-letter queue. Embedded: the data directory, while no process uses it.
    let (queues, amqp): (Vec<Box<dyn JobQueue>>, _) = match &q.url {
        Some(_) => {
            let queue = shared::queue::amqp::AmqpQueue::publisher(q, &q.retry_delays_secs)?;
            anyhow::ensure!(
                queue.wait_ready(std::time::Duration::from_secs(10)).await,
                "RabbitMQ not reachable within 10 s"
            );
            (vec![Box::new(queue.clone())], Some(queue))
        }
        None => {
            let (store, mut snapshot) = shared::store::Store::open(&q.path, q.fsync).context(
                "config: queue.path (stop `parley serve` first: it holds the directory)",
            )?;
            let lanes = ["chat", "notify"].map(|lane| {
                let jobs = snapshot.take_jobs(lane);
                Box::new(shared::queue::MemoryQueue::durable(
                    q.capacity,
                    lane,
                    store.clone(),
                    jobs,
                )) as Box<dyn JobQueue>
            });
            (lanes.into(), None)
        }
    };
    let result = async {
        match command {
            DlqCommand::List => {
                let mut dead = Vec::new();
                for queue in &queues {
                    dead.extend(queue.dead_letters().await?);
                }
                for d in &dead {
                    println!(
                        "{}\t{} attempt(s)\t{}\t{}",
                        d.job.id, d.attempts, d.at_ms, d.reason
                    );
                }
                println!("{} dead letter(s)", dead.len());
            }
            DlqCommand::Replay { all, id } => {
                anyhow::ensure!(all || id.is_some(), "say --all or give a job id");
                let mut n = 0;
                for queue in &queues {
                    n += queue.replay_dead_letters(id.as_deref()).await?;
                }
                println!("replayed {n} dead letter(s)");
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(queue) = amqp {
        queue.close().await;
    }
    result
}

/// Sends straight to the robot, through the workers' delivery code and under the same
/// cluster-wide rate limit as the workers when `[cache].url` points at the shared Redis.
async fn notify(
    settings: Settings,
    channel_id: &str,
    markdown: bool,
    title: Option<String>,
    text: String,
) -> anyhow::Result<()> {
    let channel = settings
        .channels
        .iter()
        .find(|c| c.id == channel_id)
        .with_context(|| format!("no [[channels]] entry with id {channel_id:?}"))?
        .clone();
    let cache: std::sync::Arc<dyn shared::cache::Cache> = match &settings.cache.url {
        Some(_) => std::sync::Arc::new(shared::cache::redis::RedisCache::start(&settings.cache)?),
        None => std::sync::Arc::new(shared::cache::MemoryCache::new()),
    };
    let limiter = crate::app::robot_limiter(&settings, cache, &channel);
    let body = match markdown {
        true => serde_json::json!({"markdown": {"title": title, "text": text}}),
        false => serde_json::json!({"text": text}),
    };
    let job = shared::notify::request::to_job(
        &channel,
        body.to_string().as_bytes(),
        None,
        shared::notify::request::job_id(channel_id, None),
        shared::now_ms(),
    )?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let robot = shared::platform::robots::messenger::RobotMessenger::new(http, channel, limiter);
    let answer = worker::NoticeHandler::render(&job).context("not a notification")?;
    let count = worker::deliver_answer(&job, &robot, &answer).await?;
    println!("sent to {channel_id} ({count} message(s))");
    Ok(())
}
