//! What a restarted or succeeding process needs from the engine to carry
//! on the flows of the one before it (see docs/OPERATIONS.md).
//!
//! The flow table itself can live in a shared mapping
//! ([`FlowTable::create_in`](crate::flow::FlowTable::create_in),
//! [`attach`](crate::flow::FlowTable::attach)); its slots name endpoints and
//! pools by id. [`Ids`] is the dictionary from those ids to what they stand
//! for; the daemon keeps it beside the mapping, and a new engine seeded with
//! it ([`Engine::seed_ids`]) gives the same things the same ids, so the
//! slots mean the same to both processes. What is process-local (the pools'
//! free lists, per-endpoint and per-network flow counts) is rebuilt from the
//! slots by [`Engine::adopt_flows`], which then ends whatever the new
//! configuration no longer allows.

use crate::addr::{V4, V6};
use crate::engine::{Engine, Tables};
use crate::flow::FlowTable;
use crate::spec::Settings;
use crate::types::{EndpointId, Now, PoolId, Protocol};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An endpoint id and what it was given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointIdEntry {
    pub id: EndpointId,
    pub name: String,
    pub network: String,
    pub ip: IpAddr,
    pub service: String,
}

/// A pool id and what it was given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolIdEntry {
    pub id: PoolId,
    pub service: String,
    pub nat_ip: IpAddr,
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// The ids a running engine has given out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    /// Ids at or above these were never given out.
    pub next_endpoint: u32,
    pub next_pool: u32,
    pub next_network: u32,
    pub endpoints: Vec<EndpointIdEntry>,
    pub pools: Vec<PoolIdEntry>,
    /// Network names and their ids.
    pub networks: Vec<(String, u16)>,
}

/// Key of a seeded endpoint id: name, network, address, service.
pub(crate) type EndpointSeedKey = (String, String, IpAddr, String);
/// Key of a seeded pool id: service, NAT IP, protocol, port range.
pub(crate) type PoolSeedKey = (String, IpAddr, Protocol, u16, u16);

/// What [`Engine::adopt_flows`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Flows carried on.
    pub flows: usize,
    /// Flows the new configuration does not allow, ended.
    pub ended: usize,
}

impl Engine {
    /// An engine over an existing flow table (one in a shared mapping).
    /// Its flows are not ended by configuration until
    /// [`adopt_flows`](Engine::adopt_flows) has counted them.
    pub fn with_flows(settings: Settings, flows: FlowTable) -> Arc<Engine> {
        Engine::with_tables(settings, flows, None)
    }

    /// [`with_flows`](Engine::with_flows) with an IPv6 table too (one in
    /// a shared mapping of its own), used instead of one made on the heap
    /// at the first IPv6 endpoint.
    pub fn with_tables(settings: Settings, flows: FlowTable, flows6: Option<FlowTable<V6>>) -> Arc<Engine> {
        let adopting = !flows.is_empty() || flows6.as_ref().is_some_and(|t| !t.is_empty());
        let e = Engine::build(settings, flows);
        if let Some(t) = flows6 {
            e.events6_init();
            let _ = e.flows6.set(t);
        }
        e.apply_lock.lock().unwrap_or_else(|e| e.into_inner()).adopting = adopting;
        e
    }

    /// The ids this engine has given out.
    pub fn ids(&self) -> Ids {
        let st = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let snap = self.snap.load();
        let mut ids = Ids {
            next_endpoint: st.ids.next_endpoint,
            next_pool: st.ids.next_pool,
            next_network: st.ids.next_network,
            networks: snap.networks_by_id().map(|(id, n)| (n.name.clone(), id.0)).collect(),
            ..Ids::default()
        };
        for e in &snap.endpoints {
            let s = &e.shared;
            ids.endpoints.push(EndpointIdEntry {
                id: s.id,
                name: s.name.clone(),
                network: s.network_name.clone(),
                ip: s.ip,
                service: s.service_name.clone(),
            });
        }
        for p in snap.pools.values() {
            ids.pools.push(PoolIdEntry {
                id: p.id,
                service: p.service.clone(),
                nat_ip: p.nat_ip,
                protocol: p.protocol,
                first: *p.range.start(),
                last: *p.range.end(),
            });
        }
        ids.pools.sort_by_key(|p| p.id.0);
        ids
    }

    /// Before the first [`apply`](Engine::apply): give the things of `ids`
    /// the same ids when they are configured again unchanged, and never
    /// give out an id `ids` may still name.
    pub fn seed_ids(&self, ids: &Ids) {
        self.apply_lock.lock().unwrap_or_else(|e| e.into_inner()).ids.seed(ids);
    }

    /// After the first [`apply`](Engine::apply) over an attached table:
    /// counts every live flow against its endpoint and network, takes its
    /// port out of its pool, then ends the flows the configuration does not
    /// allow (their endpoint, pool, port rule or backend went).
    pub fn adopt_flows(&self, now: Now) -> Adopted {
        let mut st = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !std::mem::take(&mut st.adopting) {
            return Adopted::default();
        }
        drop(st);
        let snap = self.snap.load_full();
        let mut ports: HashMap<PoolId, Vec<u16>> = HashMap::new();
        let mut flows = 0;
        let mut closed = Vec::new();
        self.adopt_table::<V4>(&snap, &mut ports, &mut closed, &mut flows);
        self.adopt_table::<V6>(&snap, &mut ports, &mut closed, &mut flows);
        for (id, ports) in &ports {
            snap.pools[id].pool.adopt(ports);
        }
        // Closed flows queue for reclaim, the longest quiet first (a pool
        // holds flows of one family: an IPv6 flow translated to an IPv4
        // service takes its port from the IPv4 pool, and its closed-flow
        // entry names its slot in the IPv6 table, which reclaim checks).
        closed.sort_unstable();
        for (at, pool, slot, gen, v6) in closed {
            if let Some(p) = snap.pools.get(&pool) {
                p.pool.note_closed(crate::pool::ClosedFlow { slot, gen, at, v6 });
            }
        }
        let ended = self.sweep(now, false);
        Adopted { flows: flows - ended, ended }
    }
}

impl Engine {
    /// [`adopt_flows`](Engine::adopt_flows)'s count over one family's
    /// table: each live flow counted against its endpoint and network,
    /// its port noted for its pool, a closed one noted for reclaim.
    fn adopt_table<F: Tables>(
        &self,
        snap: &crate::snapshot::Snapshot,
        ports: &mut HashMap<PoolId, Vec<u16>>,
        closed: &mut Vec<(Now, PoolId, u32, u32, bool)>,
        flows: &mut usize,
    ) {
        let Some(t) = F::table(self) else { return };
        t.for_each_live(|r| {
            *flows += 1;
            // Counted as the bits say; the sweep brings any bit that is
            // out of step with its phase in step.
            let e = snap.endpoint_by_id(r.view.endpoint);
            if r.view.state & crate::flow::state::COUNTED_CLOSED != 0 {
                if let Some(e) = e {
                    e.shared.flows_closed.fetch_add(1, Ordering::Relaxed);
                }
                closed.push((r.last_seen, r.pool, r.view.slot, r.view.generation(), F::VERSION == 6));
            } else {
                self.net_flows[usize::from(r.view.ckey.network())].fetch_add(1, Ordering::Relaxed);
                if let Some(e) = e {
                    e.shared.flows_active.fetch_add(1, Ordering::Relaxed);
                }
            }
            if snap.pools.contains_key(&r.pool) {
                ports.entry(r.pool).or_default().push(r.view.pkey.nat_port());
            }
        });
    }
}
