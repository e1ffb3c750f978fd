//! `privlink`: one binary for the daemon and its tools. See `privlink --help`.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "privlink", version, about = "A userspace private-link dataplane over TUN devices")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: create the TUN devices, forward, serve metrics.
    Run {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file; print every error as FILE:LINE:COL: message.
    Check {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Build throwaway namespaces, run the daemon, push traffic, show metrics.
    Demo,
}

fn init_logs(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Run { config } => privlink::daemon::run(&config),
        Command::Check { config } => match privlink_config::Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} networks, {} services, {} endpoints)",
                    config.display(),
                    c.networks.len(),
                    c.services.len(),
                    c.endpoints.len()
                );
                Ok(())
            }
            Err(e) => {
                for line in e.lines() {
                    eprintln!("{line}");
                }
                return ExitCode::from(1);
            }
        },
        Command::Demo => privlink::demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("privlink: {e:#}");
            ExitCode::from(1)
        }
    }
}
