//! Command-line dispatch. `parley serve` runs the gateway from a config file; `parley demo`
//! runs it on embedded defaults against the built-in fakes; `parley sim` runs the fakes
//! and the load generator; `parley check-config` validates a file and exits.

use crate::app::{Application, shutdown_on_signals};
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

/// The roles and tools of the binary.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ingress and worker in one process.
    Serve,
    /// A guided tour: the real serve path against the built-in fakes, then exit.
    Demo,
    /// Protocol fakes and the load generator.
    Sim {
        /// Which.
        #[command(subcommand)]
        command: crate::sim::SimCommand,
    },
    /// Validate the configuration and exit.
    CheckConfig,
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
        Command::Serve => {
            let settings = load(cli.config.as_deref())?;
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_on_signals()).await
        }
        Command::CheckConfig => {
            let s = load(cli.config.as_deref())?;
            println!("configuration is valid: {} bot(s)", s.bots.len());
            Ok(())
        }
        Command::Demo => crate::demo::run().await,
        Command::Sim { command } => crate::sim::run(command).await,
    }
}
