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

pub mod apply;
mod closed;
pub mod expiry;
pub mod ids;
pub mod listing;
pub mod restart;

use crate::addr::{Family, V4, V6};
use crate::counters::{DropCounters, PerWorker};
use crate::flow::{FlowTable, ProviderKey};
use crate::snapshot::Addressed;
use crate::snapshot::{NetworkShared, Snapshot};
use crate::spec::Settings;
use crate::types::DropReason;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The engine. Share it with `Arc`; give each packet thread a
/// [`Worker`](crate::Worker) ([`Engine::worker`]).
#[derive(Debug)]
pub struct Engine {
    pub(crate) settings: Settings,
    pub(crate) snap: Arc<ArcSwap<Snapshot>>,
    pub(crate) flows: FlowTable,
    /// IPv6 flows: a table of their own (wider keys, 128-byte slots), made
    /// at the first apply with an IPv6 endpoint, so an IPv4-only daemon
    /// pays nothing for it. Not in shared memory: a hand-over or restart
    /// keeps IPv4 flows only (docs/IPV6.md).
    pub(crate) flows6: std::sync::OnceLock<FlowTable<V6>>,
    /// Live flows per network id (ids are never reused), against the
    /// snapshot's `flow_share`.
    pub(crate) net_flows: Box<[std::sync::atomic::AtomicU32]>,
    pub(crate) provider_drops: PerWorker<DropCounters>,
    pub(crate) apply_lock: Mutex<ApplyState>,
    /// NAT events for flow logs, when an exporter wants them.
    pub(crate) events: Option<crate::events::EventQueue>,
    /// Flow-log events of IPv6 flows: made with the IPv6 table, with the
    /// IPv4 queue's bound, when flow logs are on.
    pub(crate) events6: std::sync::OnceLock<crate::events::EventQueue<V6>>,
    /// PROXY header segments to send again, as flows: filled by the
    /// control thread's scan ([`Engine::queue_proxy_resends`]), emptied
    /// by whichever worker looks first.
    pub(crate) resends: crossbeam_queue::ArrayQueue<crate::flow::FlowView>,
    /// The same for IPv6 flows (to IPv6 or, translated, IPv4 backends).
    pub(crate) resends6: crossbeam_queue::ArrayQueue<crate::flow::FlowView<V6>>,
    /// A fleet host's lease guard ([`Engine::set_lease_deadline`]): past
    /// this second no new flow is made (`no_nat_ip`); `u32::MAX`: no guard.
    pub(crate) lease_deadline: std::sync::atomic::AtomicU32,
}

/// Flows whose PROXY header waits to be sent again, at most, per second.
pub const RESEND_QUEUE: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct ApplyState {
    /// Every id given out ([`ids`]).
    pub(crate) ids: ids::IdAllocator,
    /// Counts of endpoints, networks and pools that left the config, by
    /// their metric labels, taken up again by whatever comes back under the
    /// same labels: metric series stay monotonic.
    pub(crate) retired: crate::apply::Retired,
    /// (service, backend) a health probe took out of new flows.
    pub(crate) down: std::collections::HashSet<(String, std::net::IpAddr)>,
    /// The table holds flows of another process not yet adopted
    /// ([`Engine::adopt_flows`]): applying must not end any of them before
    /// their ports and counts are taken back.
    pub(crate) adopting: bool,
    /// Flows created per (service, backend), kept across reloads.
    pub(crate) backend_created: HashMap<(String, std::net::IpAddr), Arc<std::sync::atomic::AtomicU64>>,
}

impl Engine {
    /// The lease guard of a fleet host: after second `until` (the last
    /// renewal of its lease plus the lease's TTL) its NAT addresses may be
    /// someone else's, so new flows drop as `no_nat_ip` until the lease is
    /// confirmed again (`Some` later) or the guard is lifted (`None`: a
    /// single host, or etcd away long enough that nothing can have moved).
    /// Established flows are not affected. One relaxed load per new flow.
    pub fn set_lease_deadline(&self, until: Option<crate::Now>) {
        self.lease_deadline.store(until.map_or(u32::MAX, |n| n.0), Ordering::Relaxed);
    }

    pub fn new(settings: Settings) -> Arc<Engine> {
        let flows = match settings.seed {
            0 => FlowTable::new(settings.max_flows),
            n => FlowTable::with_keys(settings.max_flows, [n, n.rotate_left(32) ^ 0x5bd1_e995]),
        };
        Engine::build(settings, flows)
    }

    pub(crate) fn build(settings: Settings, flows: FlowTable) -> Arc<Engine> {
        let empty = Snapshot {
            generation: 0,
            provider_mtu: 1500,
            flow_share: settings.max_flows,
            by_addr: HashMap::default(),
            by_addr6: HashMap::default(),
            by_name: HashMap::default(),
            endpoints: Vec::new(),
            by_id: Vec::new(),
            services: Vec::new(),
            networks: Vec::new(),
            pools: HashMap::new(),
        };
        Arc::new(Engine {
            lease_deadline: std::sync::atomic::AtomicU32::new(u32::MAX),
            flows,
            flows6: std::sync::OnceLock::new(),
            net_flows: (0..=u16::MAX).map(|_| std::sync::atomic::AtomicU32::new(0)).collect(),
            provider_drops: PerWorker::new(settings.workers),
            snap: Arc::new(ArcSwap::from_pointee(empty)),
            apply_lock: Mutex::new(ApplyState::default()),
            events: (settings.event_queue > 0).then(|| crate::events::EventQueue::new(settings.event_queue)),
            events6: std::sync::OnceLock::new(),
            resends: crossbeam_queue::ArrayQueue::new(RESEND_QUEUE),
            resends6: crossbeam_queue::ArrayQueue::new(RESEND_QUEUE),
            settings,
        })
    }

    /// The id of a network attached under `name` (see [`ids`]): the id it
    /// had in the process before when seeded so, else one never given out.
    pub fn network_id(&self, name: &str) -> Result<crate::types::NetworkId, crate::CoreError> {
        self.apply_lock.lock().unwrap_or_else(|e| e.into_inner()).ids.network(name)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The current configuration snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// Whether endpoint `name`'s connection is approved now (false for an
    /// endpoint the running configuration does not have). Reads through
    /// arc-swap's guard, without touching the snapshot's reference count:
    /// for readers that ask per request (a network's resolver, per query).
    pub fn connection_approved(&self, name: &str) -> bool {
        self.snap.load().endpoint_by_name(name).is_some_and(|e| e.shared.approved())
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// The NAT event queue (when `Settings::event_queue` > 0).
    pub fn events(&self) -> Option<&crate::events::EventQueue> {
        self.events.as_ref()
    }

    /// The IPv6 flows' event queue, when flow logs are on.
    pub fn events6(&self) -> Option<&crate::events::EventQueue<V6>> {
        self.events6.get()
    }

    /// Provider-side drops by reason.
    pub fn provider_drops(&self) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|r| self.provider_drops.sum(|c| c.0[r].load(Ordering::Relaxed)))
    }

    /// Consumer-side drops of one network by reason.
    pub fn network_drops(net: &NetworkShared) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|r| net.drops.sum(|c| c.0[r].load(Ordering::Relaxed)))
    }
}

/// The engine's flow table of a family: what code generic over the family
/// ([`crate::translate`], the sweep, the listing) reads flows through.
pub trait Tables: Addressed {
    /// The table, `None` for IPv6 before any IPv6 endpoint was applied.
    fn table(e: &Engine) -> Option<&FlowTable<Self>>;
    /// Queues a flow log event about flow `v`, in its family's queue.
    fn nat_event(
        e: &Engine,
        kind: crate::events::NatEventKind,
        ckey: crate::flow::ConsumerKey<Self>,
        pkey: crate::flow::ProviderKey<Self>,
        endpoint: crate::types::EndpointId,
    );
}

impl Tables for V4 {
    #[inline(always)]
    fn table(e: &Engine) -> Option<&FlowTable<V4>> {
        Some(&e.flows)
    }
    /// Inlined so that without a flow log the keys are never copied into
    /// a call (measured: 19 instructions per event call otherwise).
    #[inline(always)]
    fn nat_event(
        e: &Engine,
        kind: crate::events::NatEventKind,
        ckey: crate::flow::ConsumerKey,
        pkey: crate::flow::ProviderKey,
        endpoint: crate::types::EndpointId,
    ) {
        if let Some(q) = &e.events {
            push_event(q, crate::events::NatEvent { kind, ckey, pkey, endpoint });
        }
    }
}

/// The queueing itself, out of line (flow logs on).
#[inline(never)]
fn push_event<F: Family>(q: &crate::events::EventQueue<F>, ev: crate::events::NatEvent<F>) {
    q.push(ev);
}

impl Tables for V6 {
    #[inline(always)]
    fn table(e: &Engine) -> Option<&FlowTable<V6>> {
        e.flows6.get()
    }
    #[inline(always)]
    fn nat_event(
        e: &Engine,
        kind: crate::events::NatEventKind,
        ckey: crate::flow::ConsumerKey<V6>,
        pkey: crate::flow::ProviderKey<V6>,
        endpoint: crate::types::EndpointId,
    ) {
        if let Some(q) = e.events6.get() {
            push_event(q, crate::events::NatEvent { kind, ckey, pkey, endpoint });
        }
    }
}

impl Engine {
    /// The IPv6 flow table, made on first use with the IPv4 table's
    /// bound (and keys derived from a fixed seed, as that one's).
    pub(crate) fn flows6_init(&self) -> &FlowTable<V6> {
        self.events6_init();
        self.flows6.get_or_init(|| match self.settings.seed {
            0 => FlowTable::new(self.settings.max_flows),
            n => FlowTable::with_keys(self.settings.max_flows, [n ^ 6, n.rotate_left(32) ^ 0x5bd1_e995]),
        })
    }

    /// The IPv6 flows' event queue, made with their table when flow logs
    /// are on.
    pub(crate) fn events6_init(&self) {
        if self.settings.event_queue > 0 {
            self.events6.get_or_init(|| crate::events::EventQueue::new(self.settings.event_queue));
        }
    }

    /// The IPv6 flow table, if one was made.
    pub fn flows6(&self) -> Option<&FlowTable<V6>> {
        self.flows6.get()
    }

    /// Whether the *other* family's table holds the NAT tuple (protocol,
    /// `nat:port` to `backend:bport`) a flow of table `F` is about to
    /// claim. An IPv4 pool gives its ports to IPv4 flows and to IPv6
    /// flows translated to its service (RFC 6146), which live in two
    /// tables; each claim checks only its own table, so without this a
    /// port overloaded when the pool runs out (or the hint of a reclaimed
    /// one) could give two flows one tuple. Called inside the pool's
    /// allocation, under its mutex, which every claim of the pool's ports
    /// takes: the check and the claim are one step (the other table's
    /// check counts a flow still being set up, whose key is linked under
    /// that mutex before it is live). Nothing to check
    /// without an IPv6 table, or for an IPv6 service's addresses.
    #[inline(never)]
    pub(crate) fn held_across<F: Family>(
        &self,
        proto: u8,
        nat: F::Addr,
        port: u16,
        backend: F::Addr,
        bport: u16,
    ) -> bool {
        use std::net::IpAddr;
        let Some(t6) = self.flows6() else { return false };
        match (F::ip(nat), F::ip(backend)) {
            (IpAddr::V4(n), IpAddr::V4(b)) => {
                let (n, b) = (crate::wire::nat64::mapped(n.into()), crate::wire::nat64::mapped(b.into()));
                t6.provider_held(ProviderKey::<V6>::of(proto, n, port, b, bport))
            }
            (IpAddr::V6(n), IpAddr::V6(b)) => match (n.to_ipv4_mapped(), b.to_ipv4_mapped()) {
                (Some(n), Some(b)) => {
                    self.flows.provider_held(ProviderKey::<V4>::of(proto, n.into(), port, b.into(), bport))
                }
                _ => false,
            },
            _ => false,
        }
    }
}
