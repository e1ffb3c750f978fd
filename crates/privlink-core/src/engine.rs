//! The engine: what is configured (an immutable [`Snapshot`] swapped
//! atomically on reload), what is live (the [`FlowTable`]), and what was
//! counted.
//!
//! Workers read the snapshot through an `arc_swap::Cache`, which costs one
//! relaxed pointer load per packet and no shared write; a reload builds a new
//! snapshot beside the old one and swaps it in, so packet processing never
//! waits for configuration. State that must outlive a reload (an endpoint's
//! counters and connection state, a NAT IP's port pool) lives in `Arc`s that
//! the new snapshot takes over from the old one when the thing is unchanged.

use crate::error::CoreError;
use crate::flow::{FlowRecord, FlowTable, TcpPhase};
use crate::maglev::Maglev;
use crate::pool::PortPool;
use crate::types::{ConnectionState, DropReason, EndpointId, NetworkId, Now, PoolId, Protocol};
use crate::worker::Worker;
use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Idle timeouts in seconds (SPEC "Timeouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: u32,
    /// TCP opening or closing (SYN or one FIN seen).
    pub tcp_transitory: u32,
    /// After both FINs or a RST: how long the flow lingers before its port
    /// returns (without quarantine). A SYN for the same 5-tuple meanwhile
    /// reopens it with the same NAT port: 60 s covers Linux's TIME_WAIT, so
    /// a backend that closed first sees the reopened connection on the same
    /// 4-tuple, whose TCP timestamps keep increasing (Linux derives the
    /// timestamp offset from the 4-tuple). A new port could land on another
    /// consumer tuple's TIME_WAIT socket, whose PAWS check then refuses the
    /// SYN about half the time: a one-second stall for the client.
    pub tcp_closed: u32,
    pub udp: u32,
    pub icmp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { tcp_established: 7440, tcp_transitory: 240, tcp_closed: 60, udp: 300, icmp: 60 }
    }
}

/// Fixed for the engine's life.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Number of [`Worker`]s that will process packets (per-worker counters).
    pub workers: usize,
    pub max_flows: u32,
    pub timeouts: Timeouts,
    /// ICMP messages each worker may generate per second.
    pub icmp_rate: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { workers: 1, max_flows: 1 << 20, timeouts: Timeouts::default(), icmp_rate: 100 }
    }
}

/// A consumer network as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub id: NetworkId,
    pub name: String,
    pub mtu: u16,
}

/// One offered (protocol, port) and the backend port it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: u16,
    pub backend_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub nat_ips: Vec<Ipv4Addr>,
    pub nat_ports: RangeInclusive<u16>,
    pub backends: Vec<Ipv4Addr>,
    pub ports: Vec<PortRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    /// Index into [`Desired::networks`].
    pub network: usize,
    pub ip: Ipv4Addr,
    /// Index into [`Desired::services`].
    pub service: usize,
    /// The connection state to start with when the endpoint is new.
    pub state: ConnectionState,
}

/// The whole desired configuration, as given to [`Engine::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub provider_mtu: u16,
    pub networks: Vec<NetworkSpec>,
    pub services: Vec<ServiceSpec>,
    pub endpoints: Vec<EndpointSpec>,
}

/// Drop counters, one slot per reason.
#[derive(Debug, Default)]
pub struct DropCounters(pub [AtomicU64; DropReason::COUNT]);

/// An endpoint's traffic counters as written by one worker.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    pub bytes_in: AtomicU64,
    pub packets_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_out: AtomicU64,
}

impl EndpointCounters {
    /// Counts `packets` packets of `bytes` bytes; `inbound` is consumer ->
    /// service. Only the owning worker calls this (see [`bump`]).
    #[inline]
    pub(crate) fn add(&self, inbound: bool, bytes: usize, packets: u64) {
        let (b, p) = if inbound { (&self.bytes_in, &self.packets_in) } else { (&self.bytes_out, &self.packets_out) };
        bump(b, bytes as u64);
        bump(p, packets);
    }
}

/// Adds `n` to a counter that only one thread writes: a plain load and
/// store, no read-modify-write, so no cache line bounces between workers.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Per-worker counter slots; readers sum them.
#[derive(Debug)]
pub struct PerWorker<T>(Box<[CachePadded<T>]>);

impl<T: Default> PerWorker<T> {
    fn new(workers: usize) -> Self {
        PerWorker((0..workers.max(1)).map(|_| CachePadded::new(T::default())).collect())
    }
}

impl<T> PerWorker<T> {
    #[inline]
    pub(crate) fn get(&self, worker: usize) -> &T {
        &self.0[worker % self.0.len()]
    }
    pub fn sum(&self, f: impl Fn(&T) -> u64) -> u64 {
        self.0.iter().map(|c| f(c)).fold(0, u64::wrapping_add)
    }
}

/// State of an endpoint that survives reloads while the endpoint is
/// unchanged.
#[derive(Debug)]
pub struct EndpointShared {
    pub id: EndpointId,
    pub name: String,
    pub network_name: String,
    pub service_name: String,
    pub ip: Ipv4Addr,
    conn: AtomicU8,
    pub counters: PerWorker<EndpointCounters>,
    pub flows_active: AtomicU64,
    pub flows_created: AtomicU64,
}

impl EndpointShared {
    pub fn state(&self) -> ConnectionState {
        ConnectionState::from_u8(self.conn.load(Ordering::Acquire))
    }
    #[inline]
    pub(crate) fn approved(&self) -> bool {
        self.conn.load(Ordering::Relaxed) == ConnectionState::Approved as u8
    }
    /// (bytes in, packets in, bytes out, packets out), summed over workers.
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        let c = &self.counters;
        (
            c.sum(|w| w.bytes_in.load(Ordering::Relaxed)),
            c.sum(|w| w.packets_in.load(Ordering::Relaxed)),
            c.sum(|w| w.bytes_out.load(Ordering::Relaxed)),
            c.sum(|w| w.packets_out.load(Ordering::Relaxed)),
        )
    }
}

/// An endpoint in a snapshot.
#[derive(Debug, Clone)]
pub struct EndpointView {
    pub shared: Arc<EndpointShared>,
    pub network: NetworkId,
    pub ip: u32,
    /// Index into [`Snapshot::services`].
    pub service: usize,
}

/// A NAT port pool with what its metrics are labelled by.
#[derive(Debug)]
pub struct PoolEntry {
    pub id: PoolId,
    pub service: String,
    pub nat_ip: Ipv4Addr,
    pub protocol: Protocol,
    pub range: RangeInclusive<u16>,
    pub pool: PortPool,
}

/// A service in a snapshot.
#[derive(Debug)]
pub struct ServiceView {
    pub name: String,
    pub nat_ips: Vec<u32>,
    pub backends: Vec<u32>,
    pub maglev: Maglev,
    pub rules: Vec<PortRule>,
    /// `pools[nat ip index][protocol index]`.
    pub pools: Vec<[Arc<PoolEntry>; 3]>,
}

impl ServiceView {
    #[inline]
    pub fn rule(&self, proto: Protocol, port: u16) -> Option<&PortRule> {
        self.rules.iter().find(|r| r.protocol == proto && r.port == port)
    }
}

/// A consumer network in a snapshot.
#[derive(Debug)]
pub struct NetworkShared {
    pub id: NetworkId,
    pub name: String,
    pub drops: PerWorker<DropCounters>,
}

/// Everything configured, immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub provider_mtu: u16,
    pub(crate) by_addr: HashMap<(u16, u32), usize, ahash::RandomState>,
    pub endpoints: Vec<EndpointView>,
    /// `EndpointId` -> index into `endpoints` + 1 (0: gone).
    pub(crate) by_id: Vec<u32>,
    pub services: Vec<ServiceView>,
    /// Indexed by `NetworkId`.
    pub(crate) networks: Vec<Option<(Arc<NetworkShared>, u16)>>,
    pub pools: HashMap<PoolId, Arc<PoolEntry>>,
}

impl Snapshot {
    #[inline]
    pub(crate) fn endpoint_at(&self, network: u16, ip: u32) -> Option<&EndpointView> {
        self.by_addr.get(&(network, ip)).map(|&i| &self.endpoints[i])
    }
    #[inline]
    pub fn endpoint_by_id(&self, id: EndpointId) -> Option<&EndpointView> {
        match self.by_id.get(id.0 as usize) {
            Some(&i) if i != 0 => Some(&self.endpoints[(i - 1) as usize]),
            _ => None,
        }
    }
    pub fn endpoint_by_name(&self, name: &str) -> Option<&EndpointView> {
        self.endpoints.iter().find(|e| e.shared.name == name)
    }
    #[inline]
    pub(crate) fn network(&self, id: NetworkId) -> Option<&(Arc<NetworkShared>, u16)> {
        self.networks.get(usize::from(id.0)).and_then(Option::as_ref)
    }
    pub fn network_list(&self) -> impl Iterator<Item = &Arc<NetworkShared>> {
        self.networks.iter().flatten().map(|(n, _)| n)
    }
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub generation: u64,
    pub endpoints_added: Vec<String>,
    pub endpoints_removed: Vec<String>,
    pub endpoints_kept: Vec<String>,
    /// Live flows ended because their endpoint, port, backend or pool went.
    pub flows_ended: usize,
}

/// One live flow, for listings (`privlink flows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub protocol: Protocol,
    pub endpoint: String,
    pub network: NetworkId,
    pub consumer: (Ipv4Addr, u16),
    pub endpoint_addr: (Ipv4Addr, u16),
    pub nat: (Ipv4Addr, u16),
    pub backend: (Ipv4Addr, u16),
    pub state: &'static str,
    pub age: u32,
    pub idle: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The engine. Share it with `Arc`; give each packet thread a [`Worker`].
#[derive(Debug)]
pub struct Engine {
    pub(crate) settings: Settings,
    pub(crate) snap: Arc<ArcSwap<Snapshot>>,
    pub(crate) flows: FlowTable,
    pub(crate) provider_drops: PerWorker<DropCounters>,
    apply_lock: Mutex<ApplyState>,
}

#[derive(Debug, Default)]
struct ApplyState {
    next_endpoint: u32,
    next_pool: u32,
}

impl Engine {
    pub fn new(settings: Settings) -> Arc<Engine> {
        let empty = Snapshot {
            generation: 0,
            provider_mtu: 1500,
            by_addr: HashMap::default(),
            endpoints: Vec::new(),
            by_id: Vec::new(),
            services: Vec::new(),
            networks: Vec::new(),
            pools: HashMap::new(),
        };
        Arc::new(Engine {
            flows: FlowTable::new(settings.max_flows),
            provider_drops: PerWorker::new(settings.workers),
            snap: Arc::new(ArcSwap::from_pointee(empty)),
            apply_lock: Mutex::new(ApplyState::default()),
            settings,
        })
    }

    /// A packet-processing handle for worker number `index`
    /// (`0..settings.workers`).
    pub fn worker(self: &Arc<Self>, index: usize) -> Worker {
        Worker::new(self.clone(), index)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The current configuration snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Provider-side drops by reason.
    pub fn provider_drops(&self) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|r| self.provider_drops.sum(|c| c.0[r].load(Ordering::Relaxed)))
    }

    /// Consumer-side drops of one network by reason.
    pub fn network_drops(net: &NetworkShared) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|r| net.drops.sum(|c| c.0[r].load(Ordering::Relaxed)))
    }

    /// Validates `desired` and makes it the running configuration: new
    /// endpoints and services attach, removed ones detach and their flows end
    /// (ports returned), and flows of unchanged endpoints are untouched.
    pub fn apply(&self, desired: &Desired, now: Now) -> Result<ApplyReport, CoreError> {
        validate(desired)?;
        let mut st = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snap.load_full();
        let mut report = ApplyReport { generation: old.generation + 1, ..ApplyReport::default() };

        // Networks: keep counters of networks whose id and name are unchanged.
        let mut networks: Vec<Option<(Arc<NetworkShared>, u16)>> = Vec::new();
        for n in &desired.networks {
            let idx = usize::from(n.id.0);
            if networks.len() <= idx {
                networks.resize(idx + 1, None);
            }
            let shared = match old.network(n.id) {
                Some((s, _)) if s.name == n.name => s.clone(),
                _ => Arc::new(NetworkShared {
                    id: n.id,
                    name: n.name.clone(),
                    drops: PerWorker::new(self.settings.workers),
                }),
            };
            networks[idx] = Some((shared, n.mtu));
        }

        // Services: pools survive when (service, NAT IP, protocol, range) do.
        let mut old_pools: HashMap<(String, Ipv4Addr, Protocol), Arc<PoolEntry>> = HashMap::new();
        for p in old.pools.values() {
            old_pools.insert((p.service.clone(), p.nat_ip, p.protocol), p.clone());
        }
        let mut pools = HashMap::new();
        let mut services = Vec::with_capacity(desired.services.len());
        for s in &desired.services {
            let mut per_ip = Vec::with_capacity(s.nat_ips.len());
            for &ip in &s.nat_ips {
                let entry = |proto: Protocol, st: &mut ApplyState| -> Arc<PoolEntry> {
                    match old_pools.get(&(s.name.clone(), ip, proto)) {
                        Some(p) if p.range == s.nat_ports => p.clone(),
                        _ => {
                            st.next_pool += 1;
                            let id = PoolId(st.next_pool);
                            let seed = rand::random::<u64>();
                            Arc::new(PoolEntry {
                                id,
                                service: s.name.clone(),
                                nat_ip: ip,
                                protocol: proto,
                                range: s.nat_ports.clone(),
                                pool: PortPool::new(s.nat_ports.clone(), seed),
                            })
                        }
                    }
                };
                let trio =
                    [entry(Protocol::Tcp, &mut st), entry(Protocol::Udp, &mut st), entry(Protocol::Icmp, &mut st)];
                for p in &trio {
                    pools.insert(p.id, p.clone());
                }
                per_ip.push(trio);
            }
            services.push(ServiceView {
                name: s.name.clone(),
                nat_ips: s.nat_ips.iter().map(|&a| u32::from(a)).collect(),
                backends: s.backends.iter().map(|&a| u32::from(a)).collect(),
                maglev: Maglev::new(&s.backends),
                rules: s.ports.clone(),
                pools: per_ip,
            });
        }

        // Endpoints: kept when name, network, address and service name match.
        let mut endpoints = Vec::with_capacity(desired.endpoints.len());
        let mut by_addr = HashMap::default();
        for e in &desired.endpoints {
            let net = &desired.networks[e.network];
            let svc = &desired.services[e.service];
            let kept = old.endpoint_by_name(&e.name).filter(|o| {
                o.shared.network_name == net.name && o.shared.ip == e.ip && o.shared.service_name == svc.name
            });
            let shared = match kept {
                Some(o) => {
                    report.endpoints_kept.push(e.name.clone());
                    o.shared.clone()
                }
                None => {
                    if st.next_endpoint > crate::flow::MAX_ENDPOINT_ID {
                        return Err(CoreError::TooManyEndpoints);
                    }
                    report.endpoints_added.push(e.name.clone());
                    let id = EndpointId(st.next_endpoint);
                    st.next_endpoint += 1;
                    Arc::new(EndpointShared {
                        id,
                        name: e.name.clone(),
                        network_name: net.name.clone(),
                        service_name: svc.name.clone(),
                        ip: e.ip,
                        conn: AtomicU8::new(e.state as u8),
                        counters: PerWorker::new(self.settings.workers),
                        flows_active: AtomicU64::new(0),
                        flows_created: AtomicU64::new(0),
                    })
                }
            };
            by_addr.insert((net.id.0, u32::from(e.ip)), endpoints.len());
            endpoints.push(EndpointView { shared, network: net.id, ip: u32::from(e.ip), service: e.service });
        }
        for o in &old.endpoints {
            if !endpoints.iter().any(|n| Arc::ptr_eq(&n.shared, &o.shared)) {
                report.endpoints_removed.push(o.shared.name.clone());
            }
        }
        let mut by_id = vec![0u32; st.next_endpoint as usize];
        for (i, e) in endpoints.iter().enumerate() {
            by_id[e.shared.id.0 as usize] = i as u32 + 1;
        }
        let snap = Snapshot {
            generation: report.generation,
            provider_mtu: desired.provider_mtu,
            by_addr,
            endpoints,
            by_id,
            services,
            networks,
            pools,
        };
        self.snap.store(Arc::new(snap));
        drop(st);
        report.flows_ended = self.sweep(now, false);
        Ok(report)
    }

    /// Sets an endpoint's connection state; a state other than approved ends
    /// its live flows. Returns false when no such endpoint is configured.
    pub fn set_connection_state(&self, endpoint: &str, state: ConnectionState, now: Now) -> bool {
        let snap = self.snap.load();
        let Some(e) = snap.endpoint_by_name(endpoint) else { return false };
        e.shared.conn.store(state as u8, Ordering::Release);
        if state != ConnectionState::Approved {
            self.sweep(now, false);
        }
        true
    }

    /// Ends idle flows and returns their ports; call about once a second.
    /// Returns how many flows ended.
    pub fn expire(&self, now: Now) -> usize {
        self.sweep(now, true)
    }

    /// Ends every flow that is no longer allowed by the snapshot and, when
    /// `idle` is set, every flow past its timeout.
    fn sweep(&self, now: Now, idle: bool) -> usize {
        let snap = self.snap.load_full();
        let t = self.settings.timeouts;
        let mut ended = 0;
        self.flows.for_each_live(|r| {
            let v = &r.view;
            let phase = v.phase();
            let timeout = match v.protocol() {
                Protocol::Tcp => match phase {
                    TcpPhase::Established => t.tcp_established,
                    TcpPhase::Closed => t.tcp_closed,
                    TcpPhase::Opening | TcpPhase::Closing => t.tcp_transitory,
                },
                Protocol::Udp => t.udp,
                Protocol::Icmp => t.icmp,
            };
            let expired = idle && now.0.saturating_sub(r.last_seen.0) >= timeout;
            if expired || !allowed(&snap, r) {
                let closed = v.protocol() == Protocol::Tcp && phase == TcpPhase::Closed;
                if self.end_flow(&snap, r, now, closed) {
                    ended += 1;
                }
            }
        });
        for p in snap.pools.values() {
            p.pool.release_quarantine(now);
        }
        ended
    }

    /// Ends the flow `r` (if no one else ended it first) and returns its
    /// port to the pool it came from.
    fn end_flow(&self, snap: &Snapshot, r: &FlowRecord, now: Now, closed: bool) -> bool {
        if self.flows.remove(&r.view).is_none() {
            return false;
        }
        if let Some(p) = snap.pools.get(&r.pool) {
            p.pool.free(r.view.pkey.nat_port(), now, closed);
        }
        if let Some(e) = snap.endpoint_by_id(r.view.endpoint) {
            e.shared.flows_active.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }

    /// The live flows, optionally of one endpoint only.
    pub fn flow_list(&self, endpoint: Option<&str>, now: Now) -> Vec<FlowInfo> {
        let snap = self.snap.load_full();
        let mut out = Vec::new();
        self.flows.for_each_live(|r| {
            let v = &r.view;
            let Some(e) = snap.endpoint_by_id(v.endpoint) else { return };
            if endpoint.is_some_and(|n| n != e.shared.name) {
                return;
            }
            let (c, p) = (v.ckey, v.pkey);
            let protocol = v.protocol();
            out.push(FlowInfo {
                protocol,
                endpoint: e.shared.name.clone(),
                network: NetworkId(c.network()),
                consumer: (Ipv4Addr::from(c.consumer_addr()), c.consumer_port()),
                endpoint_addr: (Ipv4Addr::from(c.endpoint_addr()), c.endpoint_port()),
                nat: (Ipv4Addr::from(p.nat_addr()), p.nat_port()),
                backend: (Ipv4Addr::from(p.backend_addr()), p.backend_port()),
                state: if protocol == Protocol::Tcp { v.phase().as_str() } else { "active" },
                age: now.0.saturating_sub(r.created.0),
                idle: now.0.saturating_sub(r.last_seen.0),
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
            });
        });
        out
    }
}

/// Whether a live flow is still allowed: its endpoint is configured and
/// approved, its service still offers the port, has the backend and the pool.
fn allowed(snap: &Snapshot, r: &FlowRecord) -> bool {
    let v = &r.view;
    let Some(e) = snap.endpoint_by_id(v.endpoint) else { return false };
    if !e.shared.approved() || !snap.pools.contains_key(&r.pool) {
        return false;
    }
    let svc = &snap.services[e.service];
    let proto = v.protocol();
    let rule_ok = proto == Protocol::Icmp || svc.rule(proto, v.ckey.endpoint_port()).is_some();
    rule_ok && svc.backends.contains(&v.pkey.backend_addr())
}

/// Checks what the engine itself relies on; the config crate reports the
/// same problems with file positions before anything reaches here.
fn validate(d: &Desired) -> Result<(), CoreError> {
    let mut seen_ids = std::collections::HashSet::new();
    for n in &d.networks {
        if !seen_ids.insert(n.id) {
            return Err(CoreError::DuplicateNetwork(n.name.clone()));
        }
    }
    for s in &d.services {
        if s.backends.is_empty() {
            return Err(CoreError::NoBackends(s.name.clone()));
        }
        if s.nat_ips.is_empty() || s.nat_ips.len() > crate::MAX_NAT_IPS {
            return Err(CoreError::NatIpCount(s.name.clone(), s.nat_ips.len()));
        }
        if s.nat_ports.start() > s.nat_ports.end() || *s.nat_ports.start() == 0 {
            return Err(CoreError::PortRange(s.name.clone()));
        }
    }
    let mut addrs = std::collections::HashSet::new();
    for e in &d.endpoints {
        let (Some(net), Some(_)) = (d.networks.get(e.network), d.services.get(e.service)) else {
            return Err(CoreError::DanglingEndpoint(e.name.clone()));
        };
        if !addrs.insert((net.id, e.ip)) {
            return Err(CoreError::DuplicateEndpointAddress(e.name.clone(), e.ip));
        }
    }
    Ok(())
}

/// How many seconds `now` is past `epoch`, as the engine's clock.
pub fn now_since(epoch: std::time::Instant) -> Now {
    Now(u32::try_from(epoch.elapsed().as_secs()).unwrap_or(u32::MAX))
}
