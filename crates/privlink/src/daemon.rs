//! `privlink run`: wires the config, the engine, the TUN devices, the packet
//! threads and the control plane (tokio: signals, expiry ticker, metrics).
//!
//! Reload (SIGHUP) validates the new file first; a bad file is refused with
//! its errors logged and the running config stays. Then devices of removed or
//! changed networks are taken out of the workers' set and closed, new ones
//! are created, the engine gets the new [`Desired`] (ending flows of removed
//! endpoints, keeping every flow of an unchanged one), and routes are brought
//! in line. Provider-side changes need a restart and are refused.
//!
//! Restart and hand-over (docs/OPERATIONS.md): the flow table lives in a
//! shared mapping ([`crate::state`]), devices are persistent, and a daemon
//! starting where another ran carries on its flows: after a crash by
//! attaching and checking the table, during a hand-over
//! ([`crate::handover`]) by sharing it with the running daemon.

use crate::control::Control;
use crate::dataplane::{now_since, Dataplane, DeviceSet};
use crate::device::{Addresses, Device};
use crate::handover::{Predecessor, Successor};
use crate::state::StateLock;
use crate::state::{DeviceRec, Manifest, Opened, RunDir, Sidecar};
use crate::store::etcd::Etcd;
use crate::store::lease::{Held, Owner, Serving};
use crate::store::RedbStore;
use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use privlink_config::{Config, Network};
use privlink_core::flow::AttachMode;
use privlink_core::{
    ConnectionState, Desired, EndpointLimits, EndpointSpec, Engine, NetworkId, NetworkSpec, ServiceSpec, Settings,
};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
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
    epoch: Instant,
    /// `epoch` as a `CLOCK_MONOTONIC` reading (kept in the sidecar).
    epoch_mono: u64,
    control: Arc<Control>,
    /// Held for the daemon's life: one daemon per state directory.
    lock: StateLock,
    /// The backend health probes of the running config.
    prober: Option<crate::health::Prober>,
    /// The networks' DNS resolvers (made when a network first has `dns`).
    resolvers: Option<crate::dns::server::Resolvers>,
    /// The IPFIX exporter of NAT events (`[flow_logs] collector`).
    flow_log: Option<crate::flowlog::Exporter>,
    /// Where the flow table and its sidecar live.
    run_dir: RunDir,
    /// Persistent devices this daemon (or the one before it) made.
    manifest: Manifest,
    /// Whether the sidecar and manifest are this daemon's to write (not
    /// yet during a hand-over: the old daemon may still carry on).
    owns_state: bool,
    /// With `[store]`: the etcd cluster the networks, services and
    /// endpoints are read from.
    etcd: Option<Arc<Etcd>>,
    /// With `[store]`: the NAT addresses this host holds by lease, per
    /// service (only those are used), and what it serves (for the claims).
    held: Option<Arc<std::sync::Mutex<Held>>>,
    serving: Serving,
    /// The lease, until `run` hands it to the claiming thread.
    owner: Option<Owner>,
    /// The last generation of `held` applied to the engine and routes (the
    /// lease thread frees given-back addresses in etcd only after it).
    nat_applied: Arc<std::sync::atomic::AtomicU64>,
    /// The store revision the running configuration was read at (0:
    /// none, or from the copy in the state directory).
    store_revision: i64,
}

/// Where a host keeps the last store documents it applied, for a start
/// while etcd cannot be reached.
const STORE_COPY: &str = "store-documents.json";

/// Reads the config: the file, and with `[store]` this host's documents
/// from etcd, validated together (`Config::parse_with_store`). At start
/// (`at_start`), when etcd cannot be reached, the copy of the documents
/// last applied (in the state directory) stands in; on a reload the
/// running configuration stays instead. Returns the store revision read
/// (0 without a store; the copy's own when started from it) and whether
/// it came from etcd itself.
fn read_config(path: &Path, etcd: &mut Option<Arc<Etcd>>, at_start: bool) -> Result<(Config, i64, bool)> {
    let file = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(store) = file.store.clone() else { return Ok((file, 0, false)) };
    let e = match etcd {
        Some(e) => e,
        None => etcd.insert(Arc::new(Etcd::connect(&store)?)),
    };
    let copy = file.state_dir.join(STORE_COPY);
    let (docs, revision) = match e.read() {
        Ok((docs, revision)) => {
            metrics::gauge!("privlink_store_up").set(1.0);
            (docs, revision)
        }
        Err(err) if at_start => {
            metrics::gauge!("privlink_store_up").set(0.0);
            let (docs, revision) = read_copy(&copy, &e.layout)
                .with_context(|| format!("{err}, and no copy of the last store documents to start from"))?;
            tracing::warn!(
                revision,
                "{err}: starting from the copy of the documents last applied ({})",
                copy.display()
            );
            // The watch resumes from the copy's revision once etcd is back.
            return finish(path, docs).map(|c| (c, revision, false));
        }
        Err(err) => {
            metrics::gauge!("privlink_store_up").set(0.0);
            return Err(err.into());
        }
    };
    let c = match finish(path, docs.clone()) {
        Ok(c) => c,
        // At start, documents etcd holds now that do not validate: run on
        // the last ones applied, as a running daemon would have (and say
        // which keys to fix); the watch applies the fix when it comes.
        Err(err) if at_start => {
            let Ok((good, at)) = read_copy(&copy, &e.layout) else { return Err(err) };
            let Ok(c) = finish(path, good) else { return Err(err) };
            metrics::gauge!("privlink_store_refused").set(1.0);
            for line in format!("{err:#}").lines() {
                tracing::error!("store documents refused: {line}");
            }
            tracing::warn!(
                revision = at,
                "starting from the copy of the documents last applied ({}); fix or delete the keys above",
                copy.display()
            );
            return Ok((c, at, true));
        }
        Err(err) => {
            metrics::gauge!("privlink_store_refused").set(1.0);
            return Err(err);
        }
    };
    metrics::gauge!("privlink_store_refused").set(0.0);
    if let Err(err) = write_copy(&copy, &docs, revision) {
        tracing::warn!("cannot keep a copy of the store documents in {}: {err:#}", copy.display());
    }
    Ok((c, revision, true))
}

/// The file at `path` validated with `docs`.
fn finish(path: &Path, docs: Vec<privlink_config::Doc>) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut c =
        Config::parse_with_store(&text, &path.display().to_string(), &docs).map_err(|e| anyhow::anyhow!("{e}"))?;
    c.path = path.to_path_buf();
    Ok(c)
}

/// Where a host keeps the NAT addresses it last held (a start while etcd
/// cannot be reached uses them: no lease expires without etcd's leader).
const HELD_COPY: &str = "store-held.json";

fn write_held(state_dir: &Path, held: &Held) -> Result<()> {
    crate::state::write_atomic(&state_dir.join(HELD_COPY), &serde_json::to_vec(held)?)
}

fn read_held(state_dir: &Path) -> Held {
    std::fs::read(state_dir.join(HELD_COPY)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The services this host serves (those its endpoints front), with their
/// configured NAT addresses.
fn served(config: &Config) -> std::collections::BTreeMap<String, Vec<IpAddr>> {
    config
        .services
        .iter()
        .filter(|s| config.endpoints.iter().any(|e| e.service == s.name))
        .map(|s| (s.name.clone(), s.nat_ips.clone()))
        .collect()
}

fn write_copy(path: &Path, docs: &[privlink_config::Doc], revision: i64) -> Result<()> {
    let list: Vec<serde_json::Value> =
        docs.iter().map(|d| serde_json::json!({ "key": d.key, "text": d.text })).collect();
    let list = serde_json::json!({ "revision": revision, "documents": list });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::state::write_atomic(path, &serde_json::to_vec(&list)?)
}

fn read_copy(path: &Path, layout: &privlink_config::Layout) -> Result<(Vec<privlink_config::Doc>, i64)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).context("not a copy of store documents")?;
    let revision = v["revision"].as_i64().unwrap_or(0);
    let list = v["documents"].as_array().context("not a copy of store documents")?;
    let docs = list
        .iter()
        .map(|v| {
            let key = v["key"].as_str().context("a document without a key")?;
            let text = v["text"].as_str().context("a document without a text")?;
            let (kind, name) = layout.parse_key(key).with_context(|| format!("`{key}` is not this host's key"))?;
            Ok(privlink_config::Doc { key: key.to_string(), kind, name, text: text.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((docs, revision))
}

/// What a device is made from: a device found with another recipe is made
/// again.
fn recipe(netns: Option<&str>, mtu: u16, a: Addresses) -> String {
    let (address, address6) = (a.v4, a.v6);
    // Without `address6`, the recipe an IPv4-only build wrote: a successor
    // attaches to its predecessor's devices.
    match address6 {
        None => format!("netns={netns:?} mtu={mtu} address={address:?}"),
        Some(a6) => format!("netns={netns:?} mtu={mtu} address={address:?} address6={a6:?}"),
    }
}

/// A network's device addresses.
fn addresses(n: &privlink_config::Network) -> Addresses {
    Addresses { v4: n.address, v6: n.address6 }
}

/// What one device is: name, namespace, MTU, address.
struct DeviceDef<'a> {
    name: &'a str,
    netns: Option<&'a str>,
    mtu: u16,
    address: Addresses,
}

/// Opens a device: attaches to the one a previous daemon left when the
/// manifest says it is ours and made from the same recipe; a left-over
/// device of another recipe is deleted and made again (refused while
/// `sharing` with a running daemon, which still uses it).
fn open_device(
    manifest: &Manifest,
    d: DeviceDef<'_>,
    queues: usize,
    offload: bool,
    sharing: bool,
) -> Result<Arc<Device>> {
    let DeviceDef { name, netns, mtu, address } = d;
    let want = recipe(netns, mtu, address);
    let rec = manifest.devices.iter().find(|d| d.name == name && d.netns.as_deref() == netns);
    let present = crate::device::ifindex_of(netns, name)?;
    if let Some(r) = rec.filter(|r| present == Some(r.ifindex) && r.recipe != want) {
        if sharing {
            bail!("device `{name}` of the running daemon was made from another definition; hand over with the same definition, then reload");
        }
        tracing::info!(device = %name, "left-over device made from another definition: making it again");
        Device::delete_left_over(name, netns, offload)?;
        crate::device::wait_gone(netns, name, r.ifindex)?;
    }
    let ours = |idx: u32| rec.is_some_and(|r| r.ifindex == idx && r.recipe == want);
    let (dev, attached) = Device::open(name, netns, mtu, address, queues, offload, &ours)?;
    if attached {
        tracing::info!(device = %name, netns = netns.unwrap_or("-"), "device re-attached");
    }
    Ok(dev)
}

pub(crate) fn to_desired(
    config: &Config,
    ids: &HashMap<String, (NetworkId, Network)>,
    states: &HashMap<String, ConnectionState>,
    links: &HashMap<String, u64>,
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
            proxy: s.proxy,
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
                link_id: links.get(&e.name).copied().unwrap_or(0),
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
    /// Starts on `path`'s config: fresh, after a crash (carrying on what
    /// the table and devices hold), or taking over from a running daemon.
    fn start(path: &Path, takeover: bool) -> Result<(Daemon, Option<Successor>)> {
        let mut etcd = None;
        let (config, revision, live) = read_config(path, &mut etcd, true)?;
        let (mut owner, mut held) = (None, None);
        if let (Some(e), Some(store)) = (&etcd, &config.store) {
            tracing::info!(host = %e.layout.host, prefix = %e.layout.prefix, revision, "configuration read from the store");
            // The lease and a first round of claims before anything is
            // applied, so the first flows find their addresses.
            let first = Owner::start(e.clone(), store.lease_ttl, &config.state_dir).and_then(|mut o| {
                o.round(&served(&config), true)?;
                Ok(o)
            });
            let h = match first {
                Ok(o) => {
                    let h = o.held().clone();
                    if let Err(e) = write_held(&config.state_dir, &h) {
                        tracing::warn!("cannot keep the NAT addresses held: {e:#}");
                    }
                    owner = Some(o);
                    h
                }
                Err(err) => {
                    let h = read_held(&config.state_dir);
                    tracing::warn!("{err}: using the NAT addresses held last ({h:?}) until etcd answers");
                    h
                }
            };
            held = Some(Arc::new(std::sync::Mutex::new(h)));
        }
        let workers = match config.dataplane.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let settings = Settings {
            workers,
            max_flows: config.dataplane.max_flows,
            timeouts: config.dataplane.timeouts,
            icmp_rate: 100,
            event_queue: if config.flow_logs.collector.is_some() { config.flow_logs.queue } else { 0 },
            seed: 0,
        };
        let (lock, successor) = if takeover {
            let (s, fd) = Successor::request(&config.state_dir)?;
            tracing::info!("the running daemon froze its flow table and passed its state lock");
            (StateLock::adopt(fd)?, Some(s))
        } else {
            (StateLock::acquire(&config.state_dir)?, None)
        };
        let local = Arc::new(RedbStore::open(&config.state_dir)?);
        let store: Arc<dyn crate::store::ConnectionStore> = match &etcd {
            Some(e) => Arc::new(crate::store::EtcdStore::open(e.clone(), local, &config.state_dir)?),
            None => local,
        };
        let run_dir = RunDir::for_state_dir(&config.state_dir)?;
        let sidecar = run_dir.read_sidecar();
        let mode = if takeover { AttachMode::Share } else { AttachMode::Recover };
        let (table, opened) =
            run_dir.open_table(config.dataplane.max_flows, sidecar.as_ref().map_err(String::as_str), mode)?;
        // A start that fails takes back what it made: a fresh table, new devices.
        let fresh = matches!(opened, Opened::Fresh);
        let sidecar = match opened {
            Opened::Attached(found) => {
                tracing::info!(
                    flows = found.flows,
                    torn = found.torn,
                    table = %run_dir.flows_path().display(),
                    "flow table taken over{}",
                    if takeover { " (shared with the running daemon)" } else { "" }
                );
                sidecar.ok()
            }
            Opened::Fresh => None,
        };
        // The IPv6 table, in shared memory too, when the configuration has
        // an IPv6 endpoint or the last process left one (an IPv6 endpoint
        // added later by a reload gets a table in process memory until the
        // next restart: docs/IPV6.md).
        let want6 = config.endpoints.iter().any(|e| e.ip.is_ipv6()) || run_dir.flows6_path().exists();
        let table6 = if want6 {
            let sc = sidecar.as_ref().ok_or("the IPv4 table was made afresh");
            let (t, opened6) = run_dir.open_table6(config.dataplane.max_flows, sc, mode)?;
            if let Opened::Attached(found) = opened6 {
                tracing::info!(flows = found.flows, torn = found.torn, table = %run_dir.flows6_path().display(), "IPv6 flow table taken over");
            }
            Some(t)
        } else {
            None
        };
        let epoch_mono = sidecar.as_ref().map_or_else(crate::state::mono_ns, |s| s.epoch_mono_ns);
        let epoch = crate::state::instant_of(epoch_mono);
        let engine = Engine::with_tables(settings, table, table6);
        if let Some(s) = &sidecar {
            engine.seed_ids(&s.ids());
        }
        let manifest = Manifest::read(&config.state_dir);
        let previous = manifest.clone();
        let control = Arc::new(Control {
            engine: engine.clone(),
            store,
            events_file: std::sync::Mutex::new(config.flow_logs.events_file.clone()),
            decisions: std::sync::Mutex::new(()),
            config: ArcSwap::from_pointee(config.clone()),
            started: Instant::now(),
            epoch,
            fleet: std::sync::Mutex::new(config.store.as_ref().map(|st| crate::control::FleetStatus {
                host: st.host.clone(),
                up: live,
                since: crate::store::unix_now(),
                held: held.as_ref().map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default(),
            })),
        });
        let p = &config.provider;
        let offload = config.dataplane.offload;
        let def = DeviceDef { name: &p.tun, netns: p.netns.as_deref(), mtu: p.mtu, address: Addresses::default() };
        let provider = match open_device(&manifest, def, workers, offload, takeover) {
            Ok(p) => p,
            Err(e) => {
                if fresh {
                    run_dir.discard_table();
                }
                return Err(e);
            }
        };
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
            epoch,
            epoch_mono,
            control,
            lock,
            prober: None,
            resolvers: None,
            flow_log: None,
            run_dir,
            manifest,
            owns_state: !takeover,
            etcd,
            held,
            serving: Serving::default(),
            owner,
            nat_applied: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            store_revision: revision,
        };
        if let Err(e) = d.converge(&config) {
            d.undo_start(&previous, fresh);
            return Err(e);
        }
        let adopted = d.engine.adopt_flows(now_since(epoch));
        if adopted.flows + adopted.ended > 0 {
            tracing::info!(
                flows = adopted.flows,
                ended = adopted.ended,
                "flows carried over (ended: no longer allowed by the configuration)"
            );
        }
        d.delete_left_overs(&previous);
        if d.owns_state {
            d.persist_state();
        }
        d.prober = crate::health::Prober::start(&d.engine, &config)?;
        if let Some(c) = config.flow_logs.collector {
            d.flow_log = Some(crate::flowlog::Exporter::start(&d.engine, c)?);
        }
        Ok((d, successor))
    }

    /// A start that failed: devices it made (not in the manifest it found)
    /// are deleted as their queues close, and a table it made is removed.
    fn undo_start(&self, previous: &Manifest, fresh: bool) {
        let set = self.devices.load();
        for d in set.provider.iter().chain(set.networks.iter().flatten()) {
            if !previous.owns(d.netns.as_deref(), &d.name, d.ifindex) {
                d.unpersist();
            }
        }
        if fresh {
            self.run_dir.discard_table();
        }
    }

    /// Devices of the manifest this daemon did not open: their networks
    /// left the config while no daemon ran (or during a hand-over).
    fn delete_left_overs(&mut self, previous: &Manifest) {
        let set = self.devices.load();
        let open: Vec<(String, Option<String>)> = set
            .provider
            .iter()
            .chain(set.networks.iter().flatten())
            .map(|d| (d.name.clone(), d.netns.clone()))
            .collect();
        for r in &previous.devices {
            if open.contains(&(r.name.clone(), r.netns.clone())) {
                continue;
            }
            if let Ok(Some(idx)) = crate::device::ifindex_of(r.netns.as_deref(), &r.name) {
                if idx == r.ifindex {
                    match Device::delete_left_over(&r.name, r.netns.as_deref(), self.config.dataplane.offload) {
                        Ok(()) => tracing::info!(device = %r.name, "left-over device of a removed network deleted"),
                        Err(e) => tracing::warn!(device = %r.name, "cannot delete a left-over device: {e:#}"),
                    }
                }
            }
        }
    }

    /// Writes what a successor needs: the device manifest and the flow
    /// table's sidecar.
    fn persist_state(&mut self) {
        let set = self.devices.load_full();
        let mut devices = Vec::new();
        if let Some(p) = &set.provider {
            let c = &self.config.provider;
            devices.push(DeviceRec {
                name: p.name.clone(),
                netns: p.netns.clone(),
                ifindex: p.ifindex,
                recipe: recipe(c.netns.as_deref(), c.mtu, Addresses::default()),
            });
        }
        for (id, n) in self.made_from.values() {
            if let Some(Some(d)) = set.networks.get(usize::from(id.0)) {
                devices.push(DeviceRec {
                    name: d.name.clone(),
                    netns: d.netns.clone(),
                    ifindex: d.ifindex,
                    recipe: recipe(n.netns.as_deref(), n.mtu, addresses(n)),
                });
            }
        }
        self.manifest = Manifest { devices };
        if let Err(e) = self.manifest.write(&self.config.state_dir) {
            tracing::error!("cannot write the device manifest: {e:#}");
        }
        let sc = Sidecar::new(self.epoch_mono, self.config.dataplane.max_flows, &self.engine.ids());
        if let Err(e) = self.run_dir.write_sidecar(&sc) {
            tracing::error!("cannot write the flow table's sidecar: {e:#}");
        }
    }

    /// A clean stop: devices deleted, the flow table and its sidecar
    /// removed; nothing is left behind.
    fn clean_up(self) {
        let set = self.devices.load_full();
        for d in set.provider.iter().chain(set.networks.iter().flatten()) {
            d.unpersist();
        }
        self.run_dir.remove();
        let _ = std::fs::remove_file(self.config.state_dir.join("devices.json"));
    }

    /// PROXY headers a backend has not acknowledged and said nothing about
    /// since (see `privlink_core::proxy`): queued once a second for the
    /// workers, which send them through their outboxes like any packet.
    fn resend_proxy_headers(&self) {
        let n = self.engine.queue_proxy_resends();
        if n > 0 {
            tracing::debug!(headers = n, "PROXY headers to send again");
        }
    }

    /// Answers a successor: freeze, pass the lock, wait until it forwards.
    fn hand_over(&mut self, stream: std::os::unix::net::UnixStream) -> Result<Predecessor> {
        let mut p = Predecessor::accept(stream)?;
        self.engine.flows().freeze();
        if let Some(t) = self.engine.flows6() {
            t.freeze();
        }
        self.control.store.release();
        self.persist_state();
        let r = p.frozen(self.lock.fd()).and_then(|()| p.wait_forwarding());
        if let Err(e) = r {
            self.engine.flows().thaw();
            if let Some(t) = self.engine.flows6() {
                t.thaw();
            }
            if let Err(e2) = self.control.store.resume() {
                tracing::error!("{e2:#}; approvals cannot change until a restart");
            }
            return Err(e);
        }
        // The successor forwards: hand it the traffic at once.
        let set = self.devices.load_full();
        for d in set.provider.iter().chain(set.networks.iter().flatten()) {
            d.detach_queues();
        }
        Ok(p)
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
            .filter(|(name, (id, n))| !config.network(name).is_some_and(|c| c.same_device(n)) || lost(*id))
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
                d.unpersist();
                tracing::info!(device = %d.name, "network device removed");
            }
        }
        // 2. New networks: create their devices.
        let mut created: Vec<(NetworkId, Arc<Device>)> = Vec::new();
        for n in &config.networks {
            if let Some((_, made)) = self.made_from.get_mut(&n.name) {
                // Same device; a changed `dns` is the resolvers' business.
                *made = n.clone();
                continue;
            }
            let def = DeviceDef { name: &n.tun, netns: n.netns.as_deref(), mtu: n.mtu, address: addresses(n) };
            let dev =
                match open_device(&self.manifest, def, self.workers, self.config.dataplane.offload, !self.owns_state) {
                    Ok(d) => d,
                    Err(e) => {
                        // Devices this call made go when their queues close.
                        for (_, d) in &created {
                            if !self.manifest.owns(d.netns.as_deref(), &d.name, d.ifindex) {
                                d.unpersist();
                            }
                        }
                        return Err(e);
                    }
                };
            let id = match self.engine.network_id(&n.name) {
                Ok(id) => id,
                Err(e) => {
                    for d in created.iter().map(|(_, d)| d).chain([&dev]) {
                        if !self.manifest.owns(d.netns.as_deref(), &d.name, d.ifindex) {
                            d.unpersist();
                        }
                    }
                    return Err(e.into());
                }
            };
            tracing::info!(network = %n.name, device = %n.tun, netns = n.netns.as_deref().unwrap_or("-"), "network attached");
            created.push((id, dev));
            self.made_from.insert(n.name.clone(), (id, n.clone()));
        }
        // 3. Connection states, then the engine.
        let control = self.control.clone();
        let _decisions = control.decisions.lock().unwrap_or_else(|e| e.into_inner());
        let states = self.control.reconcile(config)?;
        let links = self.control.link_ids()?;
        let held_config;
        let eff = match &self.held {
            None => config,
            Some(h) => {
                // A fleet host uses only the addresses it holds.
                let h = h.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut c = config.clone();
                for s in &mut c.services {
                    s.nat_ips = crate::store::lease::usable(&h, &s.name, &s.nat_ips);
                }
                held_config = c;
                &held_config
            }
        };
        let desired = to_desired(eff, &self.made_from, &states, &links);
        let now = now_since(self.epoch);
        let report = self.engine.apply(&desired, now).context("configuration refused by the engine")?;
        for e in &report.endpoints_added {
            if let Some(ep) = config.endpoints.iter().find(|x| &x.name == e) {
                let state = states.get(e).copied().unwrap_or(ConnectionState::Pending);
                tracing::info!(endpoint = %e, service = %ep.service, network = %ep.network, ip = %ep.ip, state = %state, "endpoint attached");
            }
        }
        // Kept endpoints whose state the reload changed (visibility edits).
        self.control.set_states(&states, now);
        drop(_decisions);
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
            let want: BTreeSet<IpAddr> =
                config.endpoints.iter().filter(|e| e.network == n.name).map(|e| e.ip).collect();
            if let Some(Some(d)) = set.networks.get(usize::from(id.0)) {
                d.set_routes(&want)?;
            }
        }
        if let Some(p) = &set.provider {
            // (A fleet host: only the addresses it holds. A replace moves
            // a route another host's device had; a delete takes only this
            // device's own.)
            let nat: BTreeSet<IpAddr> = eff.services.iter().flat_map(|s| s.nat_ips.iter().copied()).collect();
            p.set_routes(&nat)?;
        }
        self.dns(config, &set);
        self.devices.store(Arc::new(set));
        if self.held.is_some() {
            // What the lease thread claims for: set once this config runs
            // (a converge that fails must not give addresses back).
            *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = served(config);
        }
        self.config = config.clone();
        self.control.config.store(Arc::new(config.clone()));
        if self.owns_state {
            self.persist_state();
        }
        Ok(())
    }

    /// Brings the networks' resolvers in line with `config` (devices from
    /// `set`). A resolver that cannot start is logged; the data path and
    /// the other resolvers go on (docs/DNS.md).
    fn dns(&mut self, config: &Config, set: &DeviceSet) {
        if self.resolvers.is_none() {
            if config.networks.iter().all(|n| n.dns.is_none()) {
                return;
            }
            match crate::dns::server::Resolvers::new(self.engine.clone()) {
                Ok(r) => self.resolvers = Some(r),
                Err(e) => return tracing::error!("dns resolvers not running: {e:#}"),
            }
        }
        let devices: HashMap<String, (Option<String>, u32)> = config
            .networks
            .iter()
            .filter_map(|n| {
                let (id, _) = self.made_from.get(&n.name)?;
                let d = set.networks.get(usize::from(id.0))?.as_ref()?;
                Some((n.name.clone(), (d.netns.clone(), d.ifindex)))
            })
            .collect();
        if let Some(r) = &mut self.resolvers {
            if let Err(e) = r.update(config, &devices) {
                tracing::error!("dns resolver not running: {e:#}");
            }
        }
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

    /// Applies the NAT addresses held (generation `pending`), and says so
    /// to the lease thread; left pending (tried again on the next tick)
    /// when the kernel or the engine refuses.
    fn apply_nat(&mut self, pending: &mut Option<u64>) {
        let Some(generation) = *pending else { return };
        let config = self.config.clone();
        match self.converge(&config) {
            Ok(()) => {
                self.nat_applied.store(generation, Ordering::Release);
                *pending = None;
            }
            Err(e) => tracing::error!("cannot apply the NAT addresses held (retrying in 1 s): {e:#}"),
        }
    }

    fn reload(&mut self) {
        let (new, revision, _) = match read_config(&self.path, &mut self.etcd, false) {
            Ok(c) => c,
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    tracing::error!("reload refused: {line}");
                }
                return;
            }
        };
        if new.store != self.config.store {
            tracing::error!("reload refused: [store] changed; that needs a restart");
            return;
        }
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
                if revision > 0 {
                    self.store_revision = revision;
                }
                tracing::info!(
                    generation = self.engine.snapshot().generation,
                    store_revision = self.store_revision,
                    "configuration reloaded"
                )
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
            if old.is_some_and(|o| o.same_device(n)) {
                continue;
            }
            if let Some(ns) = &n.netns {
                if !crate::netns::netns_path(ns).exists() {
                    bail!("network {}: namespace `{ns}` does not exist (create it with `ip netns add {ns}`)", n.name);
                }
            }
            let ours = self.made_from.values().any(|(_, o)| o.netns == n.netns && o.tun == n.tun);
            if !ours && crate::device::ifindex_of(n.netns.as_deref(), &n.tun)?.is_some() {
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

/// Runs the daemon until SIGTERM or SIGINT (a clean stop: devices and
/// state removed), or until a successor took over (SIGUSR2 starts one).
pub fn run(path: &Path, takeover: bool) -> Result<()> {
    if !crate::netns::is_root() {
        bail!("privlink run needs root (or CAP_NET_ADMIN) to create TUN devices");
    }
    let exec = *crate::dataplane::STARTED.get_or_init(Instant::now);
    // The recorder first: threads started with the daemon (the flow log
    // exporter) take their counter handles from it.
    let handle = crate::metrics::install()?;
    let (mut daemon, successor) = Daemon::start(path, takeover)?;
    let dataplane = Dataplane::start(&daemon.engine, &daemon.devices, daemon.epoch, daemon.config.dataplane.busy_poll)
        .context("cannot start workers")?;
    if let Some(s) = successor {
        // Both daemons forward now; the old one lets go. systemd (with
        // NotifyAccess=all) follows this process from here on.
        tracing::info!(after_ms = exec.elapsed().as_millis() as u64, "forwarding; the previous daemon is letting go");
        crate::sdnotify::notify(&format!("MAINPID={}", std::process::id()));
        s.forwarding()?;
        daemon.owns_state = true;
        daemon.persist_state();
        tracing::info!(after_ms = exec.elapsed().as_millis() as u64, "hand-over complete");
    }
    tracing::info!(workers = daemon.workers, config = %path.display(), "privlink running");
    crate::sdnotify::notify("READY=1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")?;
    let io = dataplane.errors.clone();
    let (engine, control) = (daemon.engine.clone(), daemon.control.clone());
    let (listen, socket) = (daemon.config.metrics_listen, daemon.config.control_socket.clone());
    let state_dir = daemon.config.state_dir.clone();
    // The reconfiguration thread owns the daemon: reloads (which create
    // devices and wait for workers), lost-device recreation, expiry and
    // hand-overs run there, never on the runtime that serves /metrics and
    // the API.
    let (tx, rx) = std::sync::mpsc::channel::<Cmd>();
    let handed = Arc::new(tokio::sync::Notify::new());
    let tx2 = std::sync::Mutex::new(tx.clone());
    crate::handover::listen(&state_dir, move |s| {
        let _ = tx2.lock().unwrap_or_else(|e| e.into_inner()).send(Cmd::HandOver(s));
    })?;
    if let Some(e) = &daemon.etcd {
        // Present from the start, at 0, for alert rules.
        metrics::counter!("privlink_store_resyncs_total").increment(0);
        let tx3 = std::sync::Mutex::new(tx.clone());
        let control = daemon.control.clone();
        e.watch(daemon.store_revision, move |c| {
            use crate::store::etcd::Change;
            match c {
                Change::Up => {
                    metrics::gauge!("privlink_store_up").set(1.0);
                    control.set_store_up(true);
                }
                Change::Down => {
                    metrics::gauge!("privlink_store_up").set(0.0);
                    control.set_store_up(false);
                    tracing::warn!("store: the watch broke; keeping the last state applied, retrying");
                }
                Change::Resync => {
                    metrics::counter!("privlink_store_resyncs_total").increment(1);
                    let _ = tx3.lock().unwrap_or_else(|e| e.into_inner()).send(Cmd::StoreChanged);
                }
                Change::Documents => {
                    let _ = tx3.lock().unwrap_or_else(|e| e.into_inner()).send(Cmd::StoreChanged);
                }
            }
        });
    }
    let claims = start_claims(&mut daemon, tx.clone())?;
    let h2 = handed.clone();
    let ctl = std::thread::Builder::new()
        .name("privlink-ctl".into())
        .spawn(move || reconfigure(daemon, rx, h2))
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
        let mut usr2 = signal(SignalKind::user_defined2())?;
        loop {
            tokio::select! {
                _ = hup.recv() => { let _ = tx.send(Cmd::Reload); }
                _ = usr2.recv() => spawn_successor(),
                _ = handed.notified() => { tracing::info!("handed over: letting go"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            }
        }
        server.abort();
        api.abort();
        control_socket.remove();
        anyhow::Ok(())
    });
    // (The hand-over listener holds a sender too: say it.)
    let _ = tx.send(Cmd::Stop);
    drop(tx);
    // Closes the metrics listener (and whatever else the runtime held).
    drop(rt);
    let (daemon, predecessor) = ctl.join().map_err(|_| anyhow::anyhow!("the reconfiguration thread panicked"))?;
    dataplane.stop();
    if let Some((stop, t)) = claims {
        // A clean stop gives the addresses back at once; a hand-over keeps
        // the lease for the successor (it resumes it from the state dir).
        stop.store(if predecessor.is_some() { 1 } else { 2 }, Ordering::Release);
        let _ = t.join();
    }
    match predecessor {
        Some(p) => {
            // The successor forwards and owns the devices and the table:
            // closing our queues leaves both as they are.
            drop(daemon);
            p.bye();
            tracing::info!("stopped after the hand-over");
        }
        None => {
            daemon.clean_up();
            tracing::info!("stopped");
        }
    }
    result
}

/// How often a fleet host renews its lease and revisits its claims.
const CLAIM_ROUND: Duration = Duration::from_secs(1);
/// After `lease_ttl` without a renewal a fleet host makes no new flow until
/// etcd confirms its lease, says it expired, or stays unreachable this
/// much longer (then it carries on with the addresses it holds).
const UNREACHABLE_GRACE: Duration = Duration::from_secs(3);

/// With `[store]`: the thread that keeps the host's lease and claims its
/// share of NAT addresses (`crate::store::lease`), telling the
/// reconfiguration thread when what it holds changed. Stopped through the
/// returned flag: 1 keeps the lease (a hand-over), 2 revokes it.
#[allow(clippy::type_complexity)]
fn start_claims(
    daemon: &mut Daemon,
    tx: std::sync::mpsc::Sender<Cmd>,
) -> Result<Option<(Arc<std::sync::atomic::AtomicU8>, std::thread::JoinHandle<()>)>> {
    let (Some(held), Some(etcd), Some(store)) = (daemon.held.clone(), daemon.etcd.clone(), daemon.config.store.clone())
    else {
        return Ok(None);
    };
    let mut owner = daemon.owner.take();
    let (engine, epoch, control) = (daemon.engine.clone(), daemon.epoch, daemon.control.clone());
    let ttl = store.lease_ttl;
    // The last engine second in which a new flow may start: the whole
    // seconds before the lease's earliest expiry (renewal + TTL).
    let deadline = move |renewed: Instant| {
        let expiry = renewed.saturating_duration_since(epoch) + ttl;
        Some(privlink_core::Now((expiry.as_secs() as u32).saturating_sub(1)))
    };
    if let Some(o) = &owner {
        engine.set_lease_deadline(deadline(o.renewed_at()));
    }
    let serving = daemon.serving.clone();
    let applied = daemon.nat_applied.clone();
    let state_dir = daemon.config.state_dir.clone();
    let stop = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let stop2 = stop.clone();
    let t = std::thread::Builder::new()
        .name("privlink-lease".into())
        .spawn(move || {
            let mut was_down = false;
            let mut last_ok = Instant::now();
            // Generations of `held` handed to the reconfiguration thread;
            // `applied` is the last one it applied.
            let mut reported = applied.load(Ordering::Acquire);
            while stop2.load(Ordering::Acquire) == 0 {
                if owner.is_none() {
                    owner = Owner::start(etcd.clone(), ttl, &state_dir).ok();
                }
                if let Some(o) = owner.as_mut() {
                    let want = serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let in_use = applied.load(Ordering::Acquire) >= reported;
                    match o.round(&want, in_use) {
                        Ok(changed) => {
                            last_ok = Instant::now();
                            if was_down {
                                tracing::info!("store: lease renewed again");
                                was_down = false;
                            }
                            if changed {
                                control.set_held(o.held());
                                *held.lock().unwrap_or_else(|e| e.into_inner()) = o.held().clone();
                                if let Err(e) = write_held(&state_dir, o.held()) {
                                    tracing::warn!("cannot keep the NAT addresses held: {e:#}");
                                }
                                reported += 1;
                                let _ = tx.send(Cmd::NatChanged(reported));
                            }
                            // New flows only on what the engine was told and
                            // the lease now covers: until the reconfiguration
                            // thread applied the change, the deadline stays
                            // (after a lost lease it has passed already).
                            if applied.load(Ordering::Acquire) >= reported {
                                engine.set_lease_deadline(deadline(o.renewed_at()));
                            }
                        }
                        Err(e) if !was_down => {
                            tracing::warn!("store: {e}; keeping the NAT addresses held");
                            was_down = true;
                        }
                        Err(_) => {}
                    }
                }
                // etcd away past the TTL and a grace: as the fleet's design
                // (issue 23, item 3) has it, a host then carries on with the
                // addresses it holds (etcd expires no lease without a
                // leader). A host cut off from a healthy etcd is the risk
                // this takes: docs/OPERATIONS.md, "Fleet".
                if last_ok.elapsed() > ttl + UNREACHABLE_GRACE && was_down {
                    engine.set_lease_deadline(None);
                }
                std::thread::sleep(CLAIM_ROUND);
            }
            if stop2.load(Ordering::Acquire) == 2 {
                if let Some(o) = owner {
                    o.revoke();
                }
            }
        })
        .context("cannot start the lease thread")?;
    Ok(Some((stop, t)))
}

/// SIGUSR2: starts this binary again (the file at its path now: a newer
/// one after an upgrade) with the same arguments and `--takeover`.
fn spawn_successor() {
    let exe = match std::env::current_exe() {
        Ok(p) => {
            // After an upgrade replaced the file, /proc/self/exe reads
            // "<path> (deleted)": the path holds the new binary.
            let s = p.to_string_lossy().to_string();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
        }
        Err(e) => {
            tracing::error!("SIGUSR2: cannot find this binary: {e}");
            return;
        }
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    match std::process::Command::new(&exe).args(&args).spawn() {
        Ok(c) => tracing::info!(pid = c.id(), exe = %exe.display(), "SIGUSR2: successor started"),
        Err(e) => tracing::error!("SIGUSR2: cannot start {}: {e}", exe.display()),
    }
}

/// What the runtime asks of the reconfiguration thread.
enum Cmd {
    Reload,
    /// The store's documents changed (or may have: a resync).
    StoreChanged,
    /// The NAT addresses this host holds changed (their generation).
    NatChanged(u64),
    HandOver(std::os::unix::net::UnixStream),
    Stop,
}

/// The reconfiguration thread: reloads on request, and once a second
/// expires flows and recreates lost devices. Returns the daemon when the
/// runtime hangs up (stop), or when a successor has taken over (with the
/// hand-over to finish).
fn reconfigure(
    mut daemon: Daemon,
    rx: std::sync::mpsc::Receiver<Cmd>,
    handed: Arc<tokio::sync::Notify>,
) -> (Daemon, Option<Predecessor>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut next_tick = Instant::now();
    let mut nat_pending: Option<u64> = None;
    loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Cmd::Reload) => {
                tracing::info!("SIGHUP: reloading {}", daemon.path.display());
                daemon.reload();
            }
            Ok(Cmd::NatChanged(generation)) => {
                let held = daemon.held.as_ref().map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone());
                tracing::info!(held = ?held.unwrap_or_default(), "NAT addresses held changed: applying");
                nat_pending = Some(generation);
                daemon.apply_nat(&mut nat_pending);
            }
            Ok(Cmd::StoreChanged) => {
                tracing::info!("store changed: reloading");
                daemon.reload();
            }
            Ok(Cmd::HandOver(stream)) => {
                tracing::info!("a successor asks to take over");
                match daemon.hand_over(stream) {
                    Ok(p) => {
                        handed.notify_one();
                        return (daemon, Some(p));
                    }
                    Err(e) => tracing::error!("hand-over abandoned, carrying on: {e:#}"),
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                next_tick += Duration::from_secs(1);
                let ended = daemon.engine.expire(now_since(daemon.epoch));
                if ended > 0 {
                    tracing::debug!(flows = ended, "expired");
                }
                daemon.recreate_lost();
                daemon.resend_proxy_headers();
                // A change of the addresses held that could not be applied
                // is tried again each second.
                daemon.apply_nat(&mut nat_pending);
            }
            Ok(Cmd::Stop) | Err(RecvTimeoutError::Disconnected) => return (daemon, None),
        }
    }
}
