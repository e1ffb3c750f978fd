//! Reload: [`Engine::apply`] builds a new [`Snapshot`] beside the running
//! one from a [`Desired`], taking over the state of everything unchanged,
//! swaps it in, then ends the flows the new snapshot no longer allows.

use crate::counters::PerWorker;
use crate::engine::{ApplyState, Engine};
use crate::error::CoreError;
use crate::pool::PortPool;
use crate::snapshot::{EndpointShared, EndpointView, NetworkShared, Picker, PoolEntry, ServiceView, Snapshot, Tally};
use crate::spec::Desired;
use crate::types::DropReason;
use crate::types::{Now, Protocol};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::Arc;

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

/// What left the config, by metric labels (see `ApplyState::retired`).
/// Counts that reach the old objects after they were retired (a worker
/// finishing a packet on the previous snapshot) are not carried over: a
/// series may miss those, it never goes down.
#[derive(Debug, Default)]
pub(crate) struct Retired {
    /// (endpoint, network, service) -> counts.
    endpoints: HashMap<(String, String, String), Tally>,
    /// network -> drops by reason.
    networks: HashMap<String, [u64; DropReason::COUNT]>,
    /// (service, NAT IP, protocol) -> exhaustion count.
    pools: HashMap<(String, IpAddr, Protocol), u64>,
}

/// One backend's health, as the engine holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub service: String,
    pub backend: IpAddr,
    /// Takes new flows.
    pub up: bool,
    /// Flows created on it, ever.
    pub flows_created: u64,
}

impl Engine {
    /// Marks a backend of a service up or down for new flows (a health
    /// probe's verdict). Flows already on it keep it. Returns whether that
    /// changed anything; kept across reloads.
    pub fn set_backend_up(&self, service: &str, backend: IpAddr, up: bool) -> bool {
        let mut st = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_string(), backend);
        let changed = if up { st.down.remove(&key) } else { st.down.insert(key) };
        if changed {
            let old = self.snap.load_full();
            if let Some(i) = old.services.iter().position(|s| s.name == service) {
                let mut snap = Snapshot::clone(&old);
                let all = snap.services[i].all_backends();
                snap.services[i].picker = Arc::new(Picker::new(&all, |b| !st.down.contains(&(service.to_string(), b))));
                self.snap.store(Arc::new(snap));
            }
        }
        changed
    }

    /// Every configured backend with its health and flow count.
    pub fn backends(&self) -> Vec<BackendState> {
        let snap = self.snap.load();
        let mut out = Vec::new();
        for s in &snap.services {
            let picker = &s.picker;
            for (i, b) in s.all_backends().into_iter().enumerate() {
                out.push(BackendState {
                    service: s.name.clone(),
                    backend: b,
                    up: picker.is_up(i),
                    flows_created: s.created[i].load(std::sync::atomic::Ordering::Relaxed),
                });
            }
        }
        out
    }

    /// Counts of endpoints that left the config and have not come back:
    /// ((endpoint, network, service), counts). Sums over a service (its
    /// bytes metric) include them, so they never go down.
    pub fn retired_endpoints(&self) -> Vec<((String, String, String), Tally)> {
        let st = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        st.retired.endpoints.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Validates `desired` and makes it the running configuration: new
    /// endpoints and services attach, removed ones detach and their flows end
    /// (ports returned), and flows of unchanged endpoints are untouched.
    pub fn apply(&self, desired: &Desired, now: Now) -> Result<ApplyReport, CoreError> {
        validate(desired)?;
        if desired.endpoints.iter().any(|e| e.ip.is_ipv6()) {
            self.flows6_init();
        }
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
            let shared = match old.network_list().find(|s| s.name == n.name) {
                Some(s) => s.clone(),
                None => {
                    let drops = PerWorker::<crate::counters::DropCounters>::new(self.settings.workers);
                    if let Some(base) = st.retired.networks.remove(&n.name) {
                        for (r, v) in base.iter().enumerate() {
                            crate::counters::bump(&drops.get(0).0[r], *v);
                        }
                    }
                    Arc::new(NetworkShared { name: n.name.clone(), drops })
                }
            };
            networks[idx] = Some((shared, n.mtu));
        }
        for gone in old.network_list() {
            if !networks.iter().flatten().any(|(s, _)| Arc::ptr_eq(s, gone)) {
                st.retired.networks.insert(gone.name.clone(), Engine::network_drops(gone));
            }
        }

        // Services: pools survive when (service, NAT IP, protocol, range) do.
        let mut old_pools: HashMap<(String, IpAddr, Protocol), Arc<PoolEntry>> = HashMap::new();
        for p in old.pools.values() {
            old_pools.insert((p.service.clone(), p.nat_ip, p.protocol), p.clone());
        }
        let mut pools = HashMap::new();
        let mut services = Vec::with_capacity(desired.services.len());
        for s in &desired.services {
            let mut per_ip = Vec::with_capacity(s.nat_ips.len());
            for &ip in &s.nat_ips {
                let entry = |proto: Protocol, st: &mut ApplyState| -> Arc<PoolEntry> {
                    let key = (s.name.clone(), ip, proto);
                    match old_pools.get(&key) {
                        Some(p) if p.range == s.nat_ports => p.clone(),
                        replaced => {
                            let id = st.ids.pool((s.name.clone(), ip, proto, *s.nat_ports.start(), *s.nat_ports.end()));
                            let seed = match self.settings.seed {
                                0 => rand::random::<u64>(),
                                n => n ^ u64::from(id.0).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                            };
                            let pool = PortPool::new(s.nat_ports.clone(), seed);
                            // The exhaustion series goes on from the pool this
                            // one replaces, or from one that left earlier.
                            let base = replaced.map(|p| p.pool.exhausted()).or_else(|| st.retired.pools.remove(&key));
                            pool.count_exhausted(base.unwrap_or(0));
                            Arc::new(PoolEntry {
                                id,
                                service: s.name.clone(),
                                nat_ip: ip,
                                protocol: proto,
                                range: s.nat_ports.clone(),
                                pool,
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
                nat_ips: s.nat_ips.iter().filter_map(|&a| v4(a)).collect(),
                backends: s.backends.iter().filter_map(|&a| v4(a)).collect(),
                nat_ips6: s.nat_ips.iter().map(|&a| v6_or_mapped(a)).collect(),
                backends6: s.backends.iter().map(|&a| v6_or_mapped(a)).collect(),
                picker: Arc::new(Picker::new(&s.backends, |b| !st.down.contains(&(s.name.clone(), b)))),
                created: s
                    .backends
                    .iter()
                    .map(|&b| st.backend_created.entry((s.name.clone(), b)).or_default().clone())
                    .collect(),
                rules: s.ports.clone(),
                proxy: s.proxy,
                pools: per_ip,
            });
        }

        for (key, p) in &old_pools {
            if !pools.values().any(|n: &Arc<PoolEntry>| (&n.service, n.nat_ip, n.protocol) == (&key.0, key.1, key.2)) {
                st.retired.pools.insert(key.clone(), p.pool.exhausted());
            }
        }

        // Endpoints: kept when name, network, address and service name match.
        let mut endpoints = Vec::with_capacity(desired.endpoints.len());
        let mut by_addr = HashMap::default();
        let mut by_addr6 = HashMap::default();
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
                    let id = st.ids.endpoint((e.name.clone(), net.name.clone(), e.ip, svc.name.clone()))?;
                    report.endpoints_added.push(e.name.clone());
                    // The series of these labels go on: from the endpoint
                    // this one replaces (another address), or from one that
                    // left the config earlier.
                    let labels = (e.name.clone(), net.name.clone(), svc.name.clone());
                    let base = old
                        .endpoint_by_name(&e.name)
                        .filter(|o| o.shared.network_name == net.name && o.shared.service_name == svc.name)
                        .map(|o| o.shared.tally())
                        .or_else(|| st.retired.endpoints.remove(&labels))
                        .unwrap_or_default();
                    let counters = PerWorker::<crate::counters::EndpointCounters>::new(self.settings.workers);
                    counters.get(0).add(true, base.bytes_in as usize, base.packets_in);
                    counters.get(0).add(false, base.bytes_out as usize, base.packets_out);
                    Arc::new(EndpointShared {
                        id,
                        name: e.name.clone(),
                        network_name: net.name.clone(),
                        service_name: svc.name.clone(),
                        ip: e.ip,
                        conn: AtomicU8::new(e.state as u8),
                        counters,
                        flows_active: AtomicU64::new(0),
                        flows_closed: AtomicU64::new(0),
                        flows_created: AtomicU64::new(base.flows_created),
                    })
                }
            };
            match e.ip {
                IpAddr::V4(a) => by_addr.insert((net.id.0, u32::from(a)), endpoints.len()),
                IpAddr::V6(a) => by_addr6.insert((net.id.0, u128::from(a)), endpoints.len()),
            };
            let allow: Arc<[(u32, u32)]> = e
                .limits
                .allow_sources
                .iter()
                .filter_map(|&(a, len)| {
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
                    Some((v4(a)? & mask, mask))
                })
                .collect();
            let allow6: Arc<[(u128, u128)]> = e
                .limits
                .allow_sources
                .iter()
                .filter_map(|&(a, len)| {
                    let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
                    a.is_ipv6().then(|| (v6_or_mapped(a) & mask, mask))
                })
                .collect();
            endpoints.push(EndpointView {
                shared,
                network: net.id,
                ip: e.ip,
                service: e.service,
                max_flows: e.limits.max_flows.unwrap_or(u32::MAX),
                allow,
                allow6,
                link_id: e.link_id,
                proxy: svc.proxy,
            });
        }
        let live: std::collections::HashSet<*const EndpointShared> =
            endpoints.iter().map(|n| Arc::as_ptr(&n.shared)).collect();
        let labelled: std::collections::HashSet<(&str, &str, &str)> = endpoints
            .iter()
            .map(|n| (n.shared.name.as_str(), n.shared.network_name.as_str(), n.shared.service_name.as_str()))
            .collect();
        for o in &old.endpoints {
            if !live.contains(&Arc::as_ptr(&o.shared)) {
                report.endpoints_removed.push(o.shared.name.clone());
                let o = &o.shared;
                if !labelled.contains(&(o.name.as_str(), o.network_name.as_str(), o.service_name.as_str())) {
                    let labels = (o.name.clone(), o.network_name.clone(), o.service_name.clone());
                    st.retired.endpoints.insert(labels, o.tally());
                }
            }
        }
        let mut by_id = vec![0u32; st.ids.next_endpoint as usize];
        for (i, e) in endpoints.iter().enumerate() {
            by_id[e.shared.id.0 as usize] = i as u32 + 1;
        }
        let snap = Snapshot {
            generation: report.generation,
            provider_mtu: desired.provider_mtu,
            flow_share: flow_share(self.settings.max_flows, desired.networks.len()),
            by_addr,
            by_addr6,
            by_name: endpoints.iter().enumerate().map(|(i, e)| (e.shared.name.clone(), i)).collect(),
            endpoints,
            by_id,
            services,
            networks,
            pools,
        };
        self.snap.store(Arc::new(snap));
        let adopting = st.adopting;
        drop(st);
        if !adopting {
            report.flows_ended = self.sweep(now, false);
        }
        Ok(report)
    }
}

/// Most flows one of `networks` networks may hold (see
/// [`Snapshot::flow_share`]).
pub fn flow_share(max_flows: u32, networks: usize) -> u32 {
    let n = networks.max(1) as u64;
    let reserve = u64::from(max_flows) / (2 * n);
    (u64::from(max_flows) - (n - 1) * reserve) as u32
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
        if s.backends.len() > crate::spec::MAX_BACKENDS {
            return Err(CoreError::TooManyBackends(s.name.clone(), s.backends.len()));
        }
        // None: this host holds none of the service's addresses (a fleet
        // host); new flows then drop as `no_nat_ip`.
        if s.nat_ips.len() > crate::spec::MAX_NAT_IPS_STORE {
            return Err(CoreError::NatIpCount(s.name.clone(), s.nat_ips.len()));
        }
        if s.nat_ports.start() > s.nat_ports.end() || *s.nat_ports.start() == 0 {
            return Err(CoreError::PortRange(s.name.clone()));
        }
        let v6 = s.backends[0].is_ipv6();
        if s.backends.iter().chain(&s.nat_ips).any(|a| a.is_ipv6() != v6) {
            return Err(CoreError::MixedFamilies(s.name.clone()));
        }
    }
    let mut addrs = std::collections::HashSet::new();
    for e in &d.endpoints {
        let (Some(net), Some(svc)) = (d.networks.get(e.network), d.services.get(e.service)) else {
            return Err(CoreError::DanglingEndpoint(e.name.clone()));
        };
        // An IPv6 endpoint reaches either family (IPv4 translated per
        // flow, RFC 6146); an IPv4 endpoint only IPv4 (as GCP's Private
        // Service Connect: nothing maps an IPv4 consumer into IPv6).
        if e.ip.is_ipv4() && svc.backends.first().is_some_and(|b| b.is_ipv6()) {
            return Err(CoreError::FamilyMismatch(e.name.clone()));
        }
        if !addrs.insert((net.id, e.ip)) {
            return Err(CoreError::DuplicateEndpointAddress(e.name.clone(), e.ip));
        }
    }
    Ok(())
}

/// `a` as a 32-bit number if it is IPv4.
fn v4(a: IpAddr) -> Option<u32> {
    match a {
        IpAddr::V4(a) => Some(a.into()),
        IpAddr::V6(_) => None,
    }
}

/// `a` as a 128-bit number: an IPv6 address as it is, an IPv4 one
/// IPv4-mapped (how an IPv4 service's addresses sit in the keys of the
/// IPv6 flows translated to it, [`crate::wire::nat64::mapped`]).
fn v6_or_mapped(a: IpAddr) -> u128 {
    match a {
        IpAddr::V6(a) => a.into(),
        IpAddr::V4(a) => crate::wire::nat64::mapped(a.into()),
    }
}
