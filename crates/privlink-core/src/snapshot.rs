//! The configuration as workers read it: an immutable [`Snapshot`] swapped
//! atomically on reload (see [`crate::apply`]), and the state that outlives
//! a snapshot while its thing is unchanged (an endpoint's counters and
//! connection state, a NAT IP's port pool), kept in `Arc`s.

use crate::addr::{Family, V4, V6};
use crate::counters::{DropCounters, EndpointCounters, PerWorker};
use crate::maglev::Maglev;
use crate::pool::PortPool;
use crate::spec::PortRule;
use crate::types::{ConnectionState, EndpointId, NetworkId, PoolId, Protocol};
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// State of an endpoint that survives reloads while the endpoint is
/// unchanged.
#[derive(Debug)]
pub struct EndpointShared {
    pub id: EndpointId,
    pub name: String,
    pub network_name: String,
    pub service_name: String,
    pub ip: IpAddr,
    pub(crate) conn: AtomicU8,
    pub counters: PerWorker<EndpointCounters>,
    /// Open flows: what `max_flows` bounds (a TCP flow that closed no
    /// longer counts, [`crate::conntrack`]).
    pub flows_active: AtomicU64,
    /// Flows that closed and still hold their NAT port for a while (RFC
    /// 7857 §2.2); the endpoint's ports in use are both counts.
    pub flows_closed: AtomicU64,
    pub flows_created: AtomicU64,
}

impl EndpointShared {
    /// NAT ports the endpoint's flows hold: its open flows and those that
    /// closed but have not been ended yet.
    pub fn ports_in_use(&self) -> u64 {
        self.open_flows() + self.closed_flows()
    }

    /// Open flows (what `max_flows` bounds); see [`crate::counters::count`].
    #[inline]
    pub fn open_flows(&self) -> u64 {
        crate::counters::count(&self.flows_active)
    }

    /// Flows that closed and still hold their port.
    #[inline]
    pub fn closed_flows(&self) -> u64 {
        crate::counters::count(&self.flows_closed)
    }
    pub fn state(&self) -> ConnectionState {
        ConnectionState::from_u8(self.conn.load(Ordering::Acquire))
    }
    #[inline]
    pub(crate) fn approved(&self) -> bool {
        self.conn.load(Ordering::Relaxed) == ConnectionState::Approved as u8
    }
    /// What the endpoint's metric series have counted: packets and bytes
    /// both ways and flows created. Carried over to the next endpoint with
    /// the same labels (name, network, service), so that a series never
    /// goes down when an endpoint leaves the config and comes back.
    pub fn tally(&self) -> Tally {
        let (bytes_in, packets_in, bytes_out, packets_out) = self.totals();
        Tally {
            bytes_in,
            packets_in,
            bytes_out,
            packets_out,
            flows_created: self.flows_created.load(Ordering::Relaxed),
        }
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

/// An endpoint's counts, as [`EndpointShared::tally`] reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub bytes_in: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub flows_created: u64,
}

/// An endpoint in a snapshot.
#[derive(Debug, Clone)]
pub struct EndpointView {
    pub shared: Arc<EndpointShared>,
    pub network: NetworkId,
    pub ip: IpAddr,
    /// Index into [`Snapshot::services`].
    pub service: usize,
    /// Most flows at once (`u32::MAX`: no bound of its own).
    pub max_flows: u32,
    /// Allowed consumer sources as (network, mask); empty: any.
    pub allow: Arc<[(u32, u32)]>,
    /// The same for an IPv6 endpoint (network, mask of 128 bits).
    pub allow6: Arc<[(u128, u128)]>,
    /// The connection's link id (PROXY v2 TLVs).
    pub link_id: u64,
    /// Its service's PROXY protocol setting (kept here too: the endpoint
    /// is what a packet already holds).
    pub proxy: Option<crate::spec::ProxyTlv>,
}

impl EndpointView {
    /// Whether consumer address `src` may use this endpoint.
    #[inline]
    pub fn allows(&self, src: u32) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|&(net, mask)| src & mask == net)
    }
}

/// A NAT port pool with what its metrics are labelled by.
#[derive(Debug)]
pub struct PoolEntry {
    pub id: PoolId,
    pub service: String,
    pub nat_ip: IpAddr,
    pub protocol: Protocol,
    pub range: RangeInclusive<u16>,
    pub pool: PortPool,
}

/// A service in a snapshot.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub name: String,
    pub nat_ips: Vec<u32>,
    /// Every configured backend (flows on any of them stay allowed).
    pub backends: Vec<u32>,
    /// The NAT IPs and backends as IPv6 flows key them: an IPv6
    /// service's own (then the two above are empty), or an IPv4
    /// service's IPv4-mapped (`::ffff:a.b.c.d`), for IPv6 endpoints
    /// translated to it (RFC 6146).
    pub nat_ips6: Vec<u128>,
    pub backends6: Vec<u128>,
    /// Where new flows go: the healthy backends. A probe's verdict swaps
    /// in a snapshot with a new picker (no reload), so a new flow reads it
    /// through the snapshot the worker already holds.
    pub picker: Arc<Picker>,
    /// Flows created per backend (index as in `backends`), carried across
    /// reloads by (service, backend).
    pub created: Vec<Arc<AtomicU64>>,
    pub rules: Vec<PortRule>,
    /// PROXY protocol v2 on its TCP flows, with this TLV.
    pub proxy: Option<crate::spec::ProxyTlv>,
    /// `pools[nat ip index][protocol index]`.
    pub pools: Vec<[Arc<PoolEntry>; 3]>,
}

/// Maglev over a service's healthy backends. Existing flows never consult
/// it: the flow table pins their backend.
#[derive(Debug)]
pub struct Picker {
    /// Indexes into [`ServiceView::backends`] of the healthy backends.
    healthy: Vec<usize>,
    maglev: Option<Maglev>,
}

impl Picker {
    /// A picker over the backends of `all` for which `up` holds.
    pub fn new(all: &[IpAddr], up: impl Fn(IpAddr) -> bool) -> Picker {
        let healthy: Vec<usize> = (0..all.len()).filter(|&i| up(all[i])).collect();
        let addrs: Vec<IpAddr> = healthy.iter().map(|&i| all[i]).collect();
        let maglev = (!addrs.is_empty()).then(|| Maglev::new(&addrs));
        Picker { healthy, maglev }
    }

    /// The backend (index into [`ServiceView::backends`]) for a new flow
    /// with this hash; `None` when no backend is healthy.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<usize> {
        Some(self.healthy[self.maglev.as_ref()?.lookup(flow_hash)])
    }

    /// Whether the backend at index `i` takes new flows.
    pub fn is_up(&self, i: usize) -> bool {
        self.healthy.contains(&i)
    }
}

impl ServiceView {
    /// Every configured backend, of whichever family the service is.
    pub fn all_backends(&self) -> Vec<IpAddr> {
        if !self.backends.is_empty() {
            return self.backends.iter().map(|&b| IpAddr::from(std::net::Ipv4Addr::from(b))).collect();
        }
        self.backends6.iter().map(|&b| IpAddr::from(std::net::Ipv6Addr::from(b))).collect()
    }

    #[inline]
    pub fn rule(&self, proto: Protocol, port: u16) -> Option<&PortRule> {
        self.rules.iter().find(|r| r.protocol == proto && r.port == port)
    }
}

/// A consumer network in a snapshot.
#[derive(Debug)]
pub struct NetworkShared {
    pub name: String,
    pub drops: PerWorker<DropCounters>,
}

/// Everything configured, immutable once built (a health change builds a
/// copy with one service's [`Picker`] replaced).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub provider_mtu: u16,
    /// Most flows one network may hold: `max_flows` less a reserve of
    /// `max_flows / (2 x networks)` kept for each other network, so that no
    /// tenant can take the whole table (docs/NAT-BEHAVIOUR.md).
    pub flow_share: u32,
    pub(crate) by_addr: HashMap<(u16, u32), usize, ahash::RandomState>,
    /// The same for IPv6 endpoints.
    pub(crate) by_addr6: HashMap<(u16, u128), usize, ahash::RandomState>,
    /// Endpoint name -> index into `endpoints`.
    pub(crate) by_name: HashMap<String, usize, ahash::RandomState>,
    pub endpoints: Vec<EndpointView>,
    /// `EndpointId` -> index into `endpoints` + 1 (0: gone).
    pub(crate) by_id: Vec<u32>,
    pub services: Vec<ServiceView>,
    /// Indexed by `NetworkId`.
    pub(crate) networks: Vec<Option<(Arc<NetworkShared>, u16)>>,
    pub pools: HashMap<PoolId, Arc<PoolEntry>>,
}

impl Snapshot {
    #[inline(always)]
    pub(crate) fn endpoint_at(&self, network: u16, ip: u32) -> Option<&EndpointView> {
        self.by_addr.get(&(network, ip)).map(|&i| &self.endpoints[i])
    }
    #[inline(always)]
    pub fn endpoint_by_id(&self, id: EndpointId) -> Option<&EndpointView> {
        match self.by_id.get(id.0 as usize) {
            Some(&i) if i != 0 => Some(&self.endpoints[(i - 1) as usize]),
            _ => None,
        }
    }
    pub fn endpoint_by_name(&self, name: &str) -> Option<&EndpointView> {
        self.by_name.get(name).map(|&i| &self.endpoints[i])
    }
    #[inline]
    pub(crate) fn network(&self, id: NetworkId) -> Option<&(Arc<NetworkShared>, u16)> {
        self.networks.get(usize::from(id.0)).and_then(Option::as_ref)
    }
    /// Every network with the id the daemon gave it.
    pub fn networks_by_id(&self) -> impl Iterator<Item = (NetworkId, &Arc<NetworkShared>)> {
        self.networks.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|(n, _)| (NetworkId(i as u16), n)))
    }
    pub fn network_list(&self) -> impl Iterator<Item = &Arc<NetworkShared>> {
        self.networks.iter().flatten().map(|(n, _)| n)
    }
}

/// What the packet path reads of the snapshot per IP family: a service's
/// NAT IPs and backends, a network's endpoint at an address, an
/// endpoint's source rules. Implemented by [`V4`] and [`V6`]; the
/// translation is generic over it, so each family's code is its own
/// monomorphised copy (IPv4's reads the same fields it always did).
pub trait Addressed: Family {
    /// The service's NAT IPs of this family (empty for the other's).
    fn nat_ips(s: &ServiceView) -> &[Self::Addr];
    /// The service's backends of this family (empty for the other's).
    fn backends(s: &ServiceView) -> &[Self::Addr];
    /// The endpoint at `ip` in network `network`.
    fn endpoint_at(snap: &Snapshot, network: u16, ip: Self::Addr) -> Option<&EndpointView>;
    /// Whether consumer address `src` may use endpoint `ep`.
    fn allows(ep: &EndpointView, src: Self::Addr) -> bool;
    /// Whether `ip` is of this family.
    fn holds(ip: IpAddr) -> bool;
}

impl Addressed for V4 {
    #[inline(always)]
    fn nat_ips(s: &ServiceView) -> &[u32] {
        &s.nat_ips
    }
    #[inline(always)]
    fn backends(s: &ServiceView) -> &[u32] {
        &s.backends
    }
    #[inline(always)]
    fn endpoint_at(snap: &Snapshot, network: u16, ip: u32) -> Option<&EndpointView> {
        snap.endpoint_at(network, ip)
    }
    #[inline(always)]
    fn allows(ep: &EndpointView, src: u32) -> bool {
        ep.allows(src)
    }
    fn holds(ip: IpAddr) -> bool {
        ip.is_ipv4()
    }
}

impl Addressed for V6 {
    #[inline(always)]
    fn nat_ips(s: &ServiceView) -> &[u128] {
        &s.nat_ips6
    }
    #[inline(always)]
    fn backends(s: &ServiceView) -> &[u128] {
        &s.backends6
    }
    #[inline(always)]
    fn endpoint_at(snap: &Snapshot, network: u16, ip: u128) -> Option<&EndpointView> {
        snap.by_addr6.get(&(network, ip)).map(|&i| &snap.endpoints[i])
    }
    #[inline(always)]
    fn allows(ep: &EndpointView, src: u128) -> bool {
        ep.allow6.is_empty() || ep.allow6.iter().any(|&(net, mask)| src & mask == net)
    }
    fn holds(ip: IpAddr) -> bool {
        ip.is_ipv6()
    }
}
