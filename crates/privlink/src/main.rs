//! `privlink`: one binary for the daemon and its tools. See `privlink --help`.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
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
        /// Take over from the daemon running on the same state directory
        /// without a gap in forwarding (see docs/OPERATIONS.md); SIGUSR2
        /// to the running daemon does this with its own binary.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file; print every error as FILE:LINE:COL: message.
    Check {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Build throwaway namespaces, run the daemon, push traffic, show metrics.
    Demo,
    /// List, approve or reject endpoints' connections (via the control API).
    Connections {
        #[command(subcommand)]
        action: Option<ConnAction>,
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// The daemon's status and each backend's health (via the control API).
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a single-host config into the fleet's etcd store and back.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Print the man page (roff), generated from these definitions.
    #[command(hide = true)]
    Man,
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Dump the live flow table (like `conntrack -L`).
    Flows {
        /// Only the flows of this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConnAction {
    /// List every connection and its state (the default).
    List,
    /// Approve an endpoint's connection: its traffic flows within a second.
    Approve {
        endpoint: String,
        /// A message kept with the decision and in the audit trail.
        #[arg(long)]
        message: Option<String>,
    },
    /// Reject an endpoint's connection: its live flows end, new ones are dropped.
    Reject {
        endpoint: String,
        /// A message kept with the decision and in the audit trail.
        #[arg(long)]
        message: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum StoreAction {
    /// Write FILE's services, networks and endpoints into etcd as host
    /// NAME's (its networks and endpoints no longer in FILE are deleted).
    Load {
        /// A single-host config (validated first). Its [store] names etcd
        /// and the prefix, unless --etcd is given.
        #[arg(long, short)]
        config: PathBuf,
        /// The host the networks and endpoints are for.
        #[arg(long)]
        host: String,
        /// etcd client URL (http://HOST:PORT), instead of FILE's [store].
        #[arg(long)]
        etcd: Option<String>,
    },
    /// Print the services and this host's networks and endpoints held in
    /// etcd, as TOML that `store load` reads.
    Dump {
        /// A config with [store] (the daemon's).
        #[arg(long, short)]
        config: PathBuf,
        /// Another host than the config's own.
        #[arg(long)]
        host: Option<String>,
    },
}

/// `privlink check`: the file; with `[store]`, validated with this host's
/// documents in etcd, as `run` would.
fn check(path: &std::path::Path) -> Result<privlink_config::Config, privlink_config::Error> {
    let c = privlink_config::Config::load(path)?;
    let Some(store) = c.store.clone() else { return Ok(c) };
    let fail = |message: String| {
        privlink_config::Error::Invalid(vec![privlink_config::ConfigError {
            file: path.display().to_string(),
            line: 1,
            col: 1,
            message,
        }])
    };
    let docs = privlink::store::etcd::Etcd::connect(&store)
        .and_then(|e| e.read())
        .map_err(|e| fail(format!("cannot read the store at {}: {e}", store.etcd.join(", "))))?
        .0;
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    privlink_config::Config::parse_with_store(&text, &path.display().to_string(), &docs)
}

/// `privlink store load|dump`.
fn store(action: StoreAction) -> anyhow::Result<()> {
    use privlink::store::etcd::{dump, Etcd};
    let load =
        |path: &PathBuf| privlink_config::Config::load(path).map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n")));
    match action {
        StoreAction::Load { config, host, etcd } => {
            let c = load(&config)?;
            let mut store = match (c.store.clone(), etcd) {
                (Some(mut s), Some(url)) => {
                    s.etcd = vec![url];
                    s
                }
                (Some(s), None) => s,
                (None, Some(url)) => privlink_config::Store {
                    etcd: vec![url],
                    prefix: "/privlink".into(),
                    host: host.clone(),
                    lease_ttl: std::time::Duration::from_secs(5),
                },
                (None, None) => {
                    anyhow::bail!("{}: no [store] table; say where etcd is with --etcd URL", config.display())
                }
            };
            // The host name is checked as a config would check it.
            let probe = format!("[store]\netcd = [\"http://x:1\"]\nhost = {host:?}\n[provider]\ntun = \"x\"\n");
            privlink_config::Config::parse(&probe, "--host")
                .map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n")))?;
            store.host = host;
            let urls = store.etcd.join(", ");
            let unreachable = |e: privlink::store::StoreError| {
                anyhow::anyhow!("{e}\n(etcd at {urls} did not answer: nothing was written)")
            };
            let e = Etcd::connect(&store).map_err(unreachable)?;
            let text = std::fs::read_to_string(&config)?;
            let docs = privlink_config::documents(&text, &e.layout).map_err(|m| anyhow::anyhow!("{m}"))?;
            // Services are shared by every host: say which this load changes.
            let (before, _) = e.read().map_err(unreachable)?;
            for d in docs.iter().filter(|d| d.kind == privlink_config::DocKind::Service) {
                match before.iter().find(|b| b.key == d.key) {
                    Some(b) if b.text != d.text => {
                        println!("service {} changed (it is shared: every host serving it follows)", d.name)
                    }
                    None => println!("service {} added", d.name),
                    Some(_) => {}
                }
            }
            let ops = e.load(&docs).map_err(unreachable)?;
            println!(
                "{}: {} services, {} networks, {} endpoints loaded for host {} under {} ({ops} operations)",
                config.display(),
                c.services.len(),
                c.networks.len(),
                c.endpoints.len(),
                e.layout.host,
                e.layout.prefix
            );
            Ok(())
        }
        StoreAction::Dump { config, host } => {
            let c = load(&config)?;
            let Some(mut store) = c.store else {
                anyhow::bail!("{}: no [store] table", config.display());
            };
            if let Some(h) = host {
                store.host = h;
            }
            let urls = store.etcd.join(", ");
            let unreachable = |e: privlink::store::StoreError| anyhow::anyhow!("{e}\n(etcd at {urls} did not answer)");
            let e = Etcd::connect(&store).map_err(unreachable)?;
            let (docs, revision) = e.read().map_err(unreachable)?;
            // The local file first, then the documents: a whole single-host
            // config, which `store load --config` reads back.
            let local = std::fs::read_to_string(&config)?;
            print!(
                "{}\n\n# privlink store dump: host {}, prefix {}, revision {revision}\n\n{}",
                local.trim_end(),
                store.host,
                store.prefix,
                dump(&docs)
            );
            Ok(())
        }
    }
}

/// Where to find the daemon's control socket.
#[derive(clap::Args, Debug)]
struct Target {
    /// The daemon's config file (its [control] socket is used).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The control socket itself [default: /run/privlink/control.sock].
    #[arg(long, global = true, conflicts_with = "config")]
    socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        match &self.config {
            Some(c) => privlink_config::Config::load(c)
                .map(|c| c.control_socket)
                .map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n"))),
            None => Ok(PathBuf::from(privlink_config::DEFAULT_CONTROL_SOCKET)),
        }
    }
}

fn connections(action: Option<ConnAction>, target: &Target, json: bool) -> anyhow::Result<()> {
    use privlink::client;
    let socket = target.socket()?;
    let (out, one) = match action.unwrap_or(ConnAction::List) {
        ConnAction::List => (client::call(&socket, "GET", "/v1/connections", None)?, false),
        ConnAction::Approve { endpoint, message } => (decide(&socket, "approve", &endpoint, message)?, true),
        ConnAction::Reject { endpoint, message } => (decide(&socket, "reject", &endpoint, message)?, true),
    };
    if json {
        println!("{out}");
    } else if one {
        println!("{}", client::connection_line(&out)?);
    } else {
        println!("{}", client::connections_table(&out)?);
    }
    Ok(())
}

fn decide(socket: &std::path::Path, verb: &str, endpoint: &str, message: Option<String>) -> anyhow::Result<String> {
    use privlink::client;
    let body = serde_json::json!({ "message": message }).to_string();
    let path = format!("/v1/connections/{}/{verb}", client::encode(endpoint));
    client::call(socket, "POST", &path, Some(&body))
}

fn flows(endpoint: Option<String>, target: &Target, json: bool) -> anyhow::Result<()> {
    use privlink::client;
    let socket = target.socket()?;
    let path = match endpoint {
        Some(e) => format!("/v1/flows?endpoint={}", client::encode(&e)),
        None => "/v1/flows".to_string(),
    };
    let out = client::call(&socket, "GET", &path, None)?;
    if json {
        println!("{out}");
    } else {
        println!("{}", client::flows_table(&out)?);
    }
    Ok(())
}

fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let out = privlink::client::call(&target.socket()?, "GET", "/v1/status", None)?;
    if json {
        println!("{out}");
    } else {
        println!("{}", privlink::client::status_table(&out)?);
    }
    Ok(())
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
        Command::Run { config, takeover } => privlink::daemon::run(&config, takeover),
        Command::Check { config } => match check(&config) {
            Ok(c) => {
                let n = |k: usize, one: &str| format!("{k} {one}{}", if k == 1 { "" } else { "s" });
                println!(
                    "{}: ok ({}, {}, {}{})",
                    config.display(),
                    n(c.networks.len(), "network"),
                    n(c.services.len(), "service"),
                    n(c.endpoints.len(), "endpoint"),
                    match c.networks.iter().filter(|x| x.dns.is_some()).count() {
                        0 => String::new(),
                        k => format!(", {}", n(k, "DNS resolver")),
                    }
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
        Command::Connections { action, target, json } => connections(action, &target, json),
        Command::Flows { endpoint, target, json } => flows(endpoint, &target, json),
        Command::Status { target, json } => status(&target, json),
        Command::Store { action } => store(action),
        Command::Man => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&out).map_err(Into::into)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "privlink", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("privlink: {e:#}");
            ExitCode::from(1)
        }
    }
}
