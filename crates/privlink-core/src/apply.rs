//! Reload: [`Engine::apply`] builds a new [`Snapshot`] beside the running
//! one from a [`Desired`], taking over the state of everything unchanged,
//! swaps it in, then ends the flows the new snapshot no longer allows.

use crate::counters::PerWorker;
use crate::engine::{ApplyState, Engine};
use crate::error::CoreError;
use crate::maglev::Maglev;
use crate::pool::PortPool;
use crate::snapshot::{EndpointShared, EndpointView, NetworkShared, PoolEntry, ServiceView, Snapshot};
use crate::spec::Desired;
use crate::types::{EndpointId, Now, PoolId, Protocol};
use std::collections::HashMap;
use std::net::Ipv4Addr;
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

impl Engine {
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
        if s.nat_ips.is_empty() || s.nat_ips.len() > crate::spec::MAX_NAT_IPS {
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
