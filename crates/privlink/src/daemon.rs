//! `privlink run`: wires the config, the engine, the TUN devices, the packet
//! threads and the control plane (tokio: signals, expiry ticker, metrics).
//!
//! Reload (SIGHUP) validates the new file first; a bad file is refused with
//! its errors logged and the running config stays. Then devices of removed or
//! changed networks are taken out of the workers' set and closed, new ones
//! are created, the engine gets the new [`Desired`] (ending flows of removed
//! endpoints, keeping every flow of an unchanged one), and routes are brought
//! in line. Provider-side changes need a restart and are refused.

use crate::control::{reconcile, Control};
use crate::dataplane::{now_since, Dataplane, DeviceSet};
use crate::device::Device;
use crate::store::{StateLock, Store};
use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use privlink_config::{Config, Network};
use privlink_core::{
    ConnectionState, Desired, EndpointLimits, EndpointSpec, Engine, NetworkId, NetworkSpec, ServiceSpec, Settings,
};
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// What the daemon keeps between reloads.
struct Daemon {
    path: PathBuf,
    config: Config,
    engine: Arc<Engine>,
    workers: usize,
    devices: Arc<ArcSwap<DeviceSet>>,
    /// The config each live network device was made from.
    made_from: HashMap<String, (NetworkId, Network)>,
    next_network: u16,
    epoch: Instant,
    control: Arc<Control>,
    /// Held for the daemon's life: one daemon per state directory.
    _lock: StateLock,
    /// The backend health probes of the running config.
    prober: Option<crate::health::Prober>,
}

fn to_desired(
    config: &Config,
    ids: &HashMap<String, (NetworkId, Network)>,
    states: &HashMap<String, ConnectionState>,
) -> Desired {
    let networks: Vec<NetworkSpec> = config
        .networks
        .iter()
        .filter_map(|n| ids.get(&n.name).map(|(id, _)| NetworkSpec { id: *id, name: n.name.clone(), mtu: n.mtu }))
        .collect();
    let services: Vec<ServiceSpec> = config
        .services
        .iter()
        .map(|s| ServiceSpec {
            name: s.name.clone(),
            nat_ips: s.nat_ips.clone(),
            nat_ports: s.nat_ports.clone(),
            backends: s.backends.clone(),
            ports: s.ports.clone(),
        })
        .collect();
    let endpoints = config
        .endpoints
        .iter()
        .filter_map(|e| {
            Some(EndpointSpec {
                name: e.name.clone(),
                network: networks.iter().position(|n| n.name == e.network)?,
                ip: e.ip,
                service: services.iter().position(|s| s.name == e.service)?,
                state: states.get(&e.name).copied().unwrap_or(ConnectionState::Pending),
                limits: EndpointLimits {
                    max_flows: e.max_flows.or_else(|| config.service(&e.service)?.max_flows_per_endpoint),
                    allow_sources: e.allow_sources.clone(),
                },
            })
        })
        .collect();
    Desired { provider_mtu: config.provider.mtu, networks, services, endpoints }
}

impl Daemon {
    fn start(path: &Path) -> Result<Daemon> {
        let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let workers = match config.dataplane.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let engine = Engine::new(Settings {
            workers,
            max_flows: config.dataplane.max_flows,
            timeouts: config.dataplane.timeouts,
            icmp_rate: 100,
        });
        let lock = StateLock::acquire(&config.state_dir)?;
        let store = Store::open(&config.state_dir)?;
        let epoch = Instant::now();
        let control = Arc::new(Control {
            engine: engine.clone(),
            store,
            config: ArcSwap::from_pointee(config.clone()),
            started: epoch,
            epoch,
        });
        let p = &config.provider;
        let offload = config.dataplane.offload;
        let provider = Device::create(&p.tun, p.netns.as_deref(), p.mtu, None, workers, offload)?;
        let devices = Arc::new(ArcSwap::from_pointee(DeviceSet {
            provider: Some(provider),
            networks: Vec::new(),
            vnet_hdr: offload,
        }));
        let mut d = Daemon {
            path: path.to_path_buf(),
            config: config.clone(),
            engine,
            workers,
            devices,
            made_from: HashMap::new(),
            next_network: 0,
            epoch,
            control,
            _lock: lock,
            prober: None,
        };
        d.converge(&config)?;
        d.prober = crate::health::Prober::start(&d.engine, &config)?;
        Ok(d)
    }

    /// Brings devices, engine and routes in line with `config`.
    fn converge(&mut self, config: &Config) -> Result<()> {
        // 1. Networks that went or changed: out of the workers' set, then closed.
        let cur = self.devices.load_full();
        let lost = |id: NetworkId| {
            cur.networks.get(usize::from(id.0)).and_then(Option::as_ref).is_some_and(|d| d.lost.load(Ordering::Acquire))
        };
        let stale: Vec<String> = self
            .made_from
            .iter()
            .filter(|(name, (id, n))| config.network(name) != Some(n) || lost(*id))
            .map(|(name, _)| name.clone())
            .collect();
        drop(cur);
        if !stale.is_empty() {
            let mut gone = Vec::new();
            for name in &stale {
                if let Some((id, _)) = self.made_from.remove(name) {
                    gone.push(id);
                }
            }
            let cur = self.devices.load_full();
            let mut networks = cur.networks.clone();
            let mut closing = Vec::new();
            for id in gone {
                if let Some(d) = networks.get_mut(usize::from(id.0)).and_then(Option::take) {
                    closing.push(d);
                }
            }
            self.devices.store(Arc::new(DeviceSet {
                provider: cur.provider.clone(),
                networks,
                vnet_hdr: cur.vnet_hdr,
            }));
            drop(cur);
            // Workers let go of the old set within one poll timeout.
            let deadline = Instant::now() + Duration::from_secs(2);
            while closing.iter().any(|d| Arc::strong_count(d) > 1) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            for d in &closing {
                tracing::info!(device = %d.name, "network device removed");
            }
        }
        // 2. New networks: create their devices.
        let mut created = Vec::new();
        for n in &config.networks {
            if self.made_from.contains_key(&n.name) {
                continue;
            }
            let dev = Device::create(
                &n.tun,
                n.netns.as_deref(),
                n.mtu,
                n.address,
                self.workers,
                self.config.dataplane.offload,
            )?;
            let id = NetworkId(self.next_network);
            self.next_network += 1;
            tracing::info!(network = %n.name, device = %n.tun, netns = n.netns.as_deref().unwrap_or("-"), "network attached");
            created.push((id, dev));
            self.made_from.insert(n.name.clone(), (id, n.clone()));
        }
        // 3. Connection states, then the engine.
        let states = reconcile(&self.control.store, config)?;
        let desired = to_desired(config, &self.made_from, &states);
        let now = now_since(self.epoch);
        let report = self.engine.apply(&desired, now).context("configuration refused by the engine")?;
        for e in &report.endpoints_added {
            if let Some(ep) = config.endpoints.iter().find(|x| &x.name == e) {
                let state = states.get(e).copied().unwrap_or(ConnectionState::Pending);
                tracing::info!(endpoint = %e, service = %ep.service, network = %ep.network, ip = %ep.ip, state = %state, "endpoint attached");
            }
        }
        // Kept endpoints whose state the reload changed (visibility edits).
        let snap = self.engine.snapshot();
        for e in &snap.endpoints {
            if let Some(&want) = states.get(&e.shared.name) {
                if e.shared.state() != want {
                    self.engine.set_connection_state(&e.shared.name, want, now);
                }
            }
        }
        for e in &report.endpoints_removed {
            tracing::info!(endpoint = %e, "endpoint detached");
        }
        if report.flows_ended > 0 {
            tracing::info!(flows = report.flows_ended, "flows ended by the new configuration");
        }
        // 4. Publish the device set, then routes (so traffic finds a worker).
        let cur = self.devices.load_full();
        let mut networks = cur.networks.clone();
        for (id, dev) in created {
            let i = usize::from(id.0);
            if networks.len() <= i {
                networks.resize(i + 1, None);
            }
            networks[i] = Some(dev);
        }
        let set = DeviceSet { provider: cur.provider.clone(), networks, vnet_hdr: cur.vnet_hdr };
        for n in &config.networks {
            let Some((id, _)) = self.made_from.get(&n.name) else { continue };
            let want: BTreeSet<Ipv4Addr> =
                config.endpoints.iter().filter(|e| e.network == n.name).map(|e| e.ip).collect();
            if let Some(Some(d)) = set.networks.get(usize::from(id.0)) {
                d.set_routes(&want)?;
            }
        }
        if let Some(p) = &set.provider {
            let nat: BTreeSet<Ipv4Addr> = config.services.iter().flat_map(|s| s.nat_ips.iter().copied()).collect();
            p.set_routes(&nat)?;
        }
        self.devices.store(Arc::new(set));
        self.config = config.clone();
        self.control.config.store(Arc::new(config.clone()));
        Ok(())
    }

    /// Recreates network devices someone deleted (the workers marked them
    /// lost), with their routes; flows of other networks are untouched.
    fn recreate_lost(&mut self) {
        let set = self.devices.load();
        if !set.networks.iter().flatten().any(|d| d.lost.load(Ordering::Acquire)) {
            return;
        }
        drop(set);
        let config = self.config.clone();
        match self.converge(&config) {
            Ok(()) => tracing::info!("lost devices recreated"),
            Err(e) => tracing::error!("cannot recreate a lost device (retrying in 1 s): {e:#}"),
        }
    }

    fn reload(&mut self) {
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                for line in e.lines() {
                    tracing::error!("reload refused: {line}");
                }
                return;
            }
        };
        if new.provider != self.config.provider {
            tracing::error!("reload refused: [provider] changed; that needs a restart");
            return;
        }
        if new.dataplane != self.config.dataplane || new.metrics_listen != self.config.metrics_listen {
            tracing::warn!("[dataplane] and [metrics] changes take effect at the next restart");
        }
        if let Err(e) = self.precheck(&new) {
            tracing::error!("reload refused: {e:#}; the running configuration stays");
            return;
        }
        match self.converge(&new) {
            Ok(()) => {
                // Probes follow the new config (their backends' states carry over).
                self.prober = None;
                match crate::health::Prober::start(&self.engine, &new) {
                    Ok(p) => self.prober = p,
                    Err(e) => tracing::error!("health probes not running: {e:#}"),
                }
                tracing::info!(generation = self.engine.snapshot().generation, "configuration reloaded")
            }
            Err(e) => {
                // Something the check could not foresee (the kernel refused a
                // device or a route): go back to the running configuration.
                let old = self.config.clone();
                match self.converge(&old) {
                    Ok(()) => tracing::error!("reload refused: {e:#}; the running configuration was restored"),
                    Err(e2) => {
                        tracing::error!("reload refused: {e:#}; restoring the running configuration failed too: {e2:#}")
                    }
                }
            }
        }
    }

    /// What a reload needs from the host, checked before anything changes:
    /// each namespace of a network to create exists, and its device name
    /// is free there (or is the device of the network it replaces).
    fn precheck(&self, config: &Config) -> Result<()> {
        for n in &config.networks {
            let old = self.made_from.get(&n.name).map(|(_, o)| o);
            if old == Some(n) {
                continue;
            }
            if let Some(ns) = &n.netns {
                if !crate::netns::netns_path(ns).exists() {
                    bail!("network {}: namespace `{ns}` does not exist (create it with `ip netns add {ns}`)", n.name);
                }
            }
            let ours = self.made_from.values().any(|(_, o)| o.netns == n.netns && o.tun == n.tun);
            if !ours && crate::device::name_taken(n.netns.as_deref(), &n.tun)? {
                bail!(
                    "network {}: device `{}` already exists in namespace `{}`",
                    n.name,
                    n.tun,
                    n.netns.as_deref().unwrap_or("(the daemon's own)")
                );
            }
        }
        Ok(())
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(path: &Path) -> Result<()> {
    if !crate::netns::is_root() {
        bail!("privlink run needs root (or CAP_NET_ADMIN) to create TUN devices");
    }
    let daemon = Daemon::start(path)?;
    let handle = crate::metrics::install()?;
    let dataplane = Dataplane::start(&daemon.engine, &daemon.devices, daemon.epoch).context("cannot start workers")?;
    tracing::info!(workers = daemon.workers, config = %path.display(), "privlink running");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")?;
    let io = dataplane.errors.clone();
    let (engine, control) = (daemon.engine.clone(), daemon.control.clone());
    let (listen, socket) = (daemon.config.metrics_listen, daemon.config.control_socket.clone());
    // The reconfiguration thread owns the daemon: reloads (which create
    // devices and wait for workers), lost-device recreation and expiry run
    // there, never on the runtime that serves /metrics and the API.
    let (tx, rx) = std::sync::mpsc::channel::<Cmd>();
    let ctl = std::thread::Builder::new()
        .name("privlink-ctl".into())
        .spawn(move || reconfigure(daemon, rx))
        .context("cannot start the reconfiguration thread")?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen for metrics on {listen}"))?;
        tracing::info!(listen = %listen, "serving /metrics");
        let server = tokio::spawn(crate::metrics::serve(listener, handle, engine, io));
        let (api_listener, control_socket) = crate::control::bind(&socket)?;
        tracing::info!(socket = %socket.display(), "serving the control API");
        let api = tokio::spawn(crate::control::serve(api_listener, crate::control::router(control)));
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => { let _ = tx.send(Cmd::Reload); }
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            }
        }
        server.abort();
        api.abort();
        control_socket.remove();
        anyhow::Ok(())
    });
    drop(tx);
    let daemon = ctl.join().map_err(|_| anyhow::anyhow!("the reconfiguration thread panicked"))?;
    dataplane.stop();
    // Dropping the devices closes every queue: the kernel removes the
    // devices, their addresses and routes.
    drop(daemon);
    tracing::info!("stopped");
    result
}

/// What the runtime asks of the reconfiguration thread.
enum Cmd {
    Reload,
}

/// The reconfiguration thread: reloads on request, and once a second
/// expires flows and recreates lost devices. Returns the daemon when the
/// runtime hangs up (stop).
fn reconfigure(mut daemon: Daemon, rx: std::sync::mpsc::Receiver<Cmd>) -> Daemon {
    use std::sync::mpsc::RecvTimeoutError;
    let mut next_tick = Instant::now();
    loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Cmd::Reload) => {
                tracing::info!("SIGHUP: reloading {}", daemon.path.display());
                daemon.reload();
            }
            Err(RecvTimeoutError::Timeout) => {
                next_tick += Duration::from_secs(1);
                let ended = daemon.engine.expire(now_since(daemon.epoch));
                if ended > 0 {
                    tracing::debug!(flows = ended, "expired");
                }
                daemon.recreate_lost();
            }
            Err(RecvTimeoutError::Disconnected) => return daemon,
        }
    }
}
