//! The flow table: every live translation, found from either direction.
//!
//! Shape: a fixed slab of [`FlowSlot`]s (bounded by `max_flows`, allocated
//! once) and two chained hash indexes over it, one keyed by the consumer-side
//! 5-tuple ([`ConsumerKey`]) and one by the provider-side 5-tuple
//! ([`ProviderKey`]). Each index is an array of chain heads; the chain links
//! live inside the slots, so the indexes cost 4 bytes per bucket and never
//! allocate.
//!
//! Concurrency: readers (the per-packet path of every worker) take no lock and
//! write nothing shared: a lookup is an acquire load of a chain head, then
//! loads of slot keys and links. Writers (flow setup and teardown, rare next
//! to packets) serialise per bucket on striped mutexes; a key is inserted only
//! if absent under its stripe, which is what keeps a burst of packets of one
//! new flow from taking more than one port, and a provider tuple from being
//! live twice. Unlinking leaves the removed slot's own link intact, so a
//! reader standing on it walks on correctly; freed slots are reused in FIFO
//! order, long after any reader could still stand on them. Every field is an
//! atomic, so even that unlikely race is a miss, never undefined behaviour.
//!
//! Memory: the fields a packet touches fill exactly one 64-byte cache line
//! ([`FlowSlot`]); what only setup and teardown read (pool, creation time)
//! sits in a parallel 8-byte array. With both indexes sized to the next power
//! of two of twice `max_flows`, the table costs 88 to 104 bytes per flow (a Linux
//! conntrack entry is about 300). Large tables ask the kernel for
//! transparent huge pages, which spares the page walks a random lookup in a
//! hundred megabytes would otherwise cost.

use crate::types::{EndpointId, Now, PoolId, Protocol};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Longest chain a reader walks before calling it a miss. Chains average
/// under one entry; this only bounds a reader caught in a concurrent reuse.
const MAX_CHAIN: usize = 64;
/// Writer lock stripes per index.
const STRIPES: usize = 1024;
/// Freed slots wait in FIFO order; fresh slots are used while fewer than this
/// many are waiting, so a freed slot is never reused right away.
const REUSE_DELAY: usize = 1024;

const NONE: u32 = 0;

/// The consumer-side identity of a flow: network, protocol, consumer
/// address/port, endpoint address/port (for ICMP echo: identifier, 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerKey(pub u128);

impl ConsumerKey {
    pub fn new(network: u16, proto: u8, src: u32, sport: u16, dst: u32, dport: u16) -> Self {
        ConsumerKey(
            (u128::from(network) << 104)
                | (u128::from(proto) << 96)
                | (u128::from(src) << 64)
                | (u128::from(sport) << 48)
                | (u128::from(dst) << 16)
                | u128::from(dport),
        )
    }
    pub fn network(self) -> u16 {
        (self.0 >> 104) as u16
    }
    pub fn proto(self) -> u8 {
        (self.0 >> 96) as u8
    }
    pub fn consumer_addr(self) -> u32 {
        (self.0 >> 64) as u32
    }
    pub fn consumer_port(self) -> u16 {
        (self.0 >> 48) as u16
    }
    pub fn endpoint_addr(self) -> u32 {
        (self.0 >> 16) as u32
    }
    pub fn endpoint_port(self) -> u16 {
        self.0 as u16
    }
}

/// The provider-side identity of a flow: protocol, NAT address/port, backend
/// address/port (for ICMP echo: NAT identifier, 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProviderKey(pub u128);

impl ProviderKey {
    pub fn new(proto: u8, nat: u32, nport: u16, backend: u32, bport: u16) -> Self {
        ProviderKey(
            (u128::from(proto) << 96)
                | (u128::from(nat) << 64)
                | (u128::from(nport) << 48)
                | (u128::from(backend) << 16)
                | u128::from(bport),
        )
    }
    pub fn nat_addr(self) -> u32 {
        (self.0 >> 64) as u32
    }
    pub fn nat_port(self) -> u16 {
        (self.0 >> 48) as u16
    }
    pub fn backend_addr(self) -> u32 {
        (self.0 >> 16) as u32
    }
    pub fn backend_port(self) -> u16 {
        self.0 as u16
    }
}

/// Bits of [`FlowSlot::state`] (kept in the top byte of the slot's `meta`
/// word, beside the 24-bit endpoint id).
pub mod state {
    /// The slot holds a flow fully set up (set last, cleared first).
    pub const LIVE: u32 = 1 << 0;
    /// TCP SYN seen from the consumer.
    pub const C_SYN: u32 = 1 << 1;
    /// TCP SYN (SYN-ACK, or simultaneous open) seen from the provider.
    pub const P_SYN: u32 = 1 << 2;
    /// TCP FIN seen from the consumer / the provider.
    pub const C_FIN: u32 = 1 << 3;
    pub const P_FIN: u32 = 1 << 4;
    /// TCP RST seen from either side.
    pub const RST: u32 = 1 << 5;
    /// An ACK from the consumer after the provider's SYN: established.
    pub const ESTABLISHED: u32 = 1 << 6;
    /// Where the state bits sit in `meta`.
    pub(crate) const SHIFT: u32 = 24;
}

/// Endpoint ids must fit the low 24 bits of a slot's `meta`.
pub const MAX_ENDPOINT_ID: u32 = (1 << state::SHIFT) - 1;

/// TCP state of a flow, as the timeouts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpPhase {
    /// SYN seen, handshake not finished: transitory timeout.
    Opening,
    Established,
    /// One FIN seen: transitory timeout.
    Closing,
    /// Both FINs or a RST: short linger, port back without quarantine.
    Closed,
}

impl TcpPhase {
    pub fn from_bits(s: u32) -> TcpPhase {
        if s & state::RST != 0 || (s & state::C_FIN != 0 && s & state::P_FIN != 0) {
            TcpPhase::Closed
        } else if s & (state::C_FIN | state::P_FIN) != 0 {
            TcpPhase::Closing
        } else if s & state::ESTABLISHED != 0 {
            TcpPhase::Established
        } else {
            TcpPhase::Opening
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TcpPhase::Opening => "opening",
            TcpPhase::Established => "established",
            TcpPhase::Closing => "closing",
            TcpPhase::Closed => "closed",
        }
    }
}

/// One flow: everything a packet of it reads or writes, in one cache line.
/// All fields are atomics: see the module docs for why.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct FlowSlot {
    ckey: [AtomicU64; 2],
    pkey: [AtomicU64; 2],
    cnext: AtomicU32,
    pnext: AtomicU32,
    /// Last packet, in [`Now`] seconds.
    last_seen: AtomicU32,
    /// Endpoint id (low 24 bits) and [`state`] bits (top 8).
    meta: AtomicU32,
    /// Bytes consumer -> provider and back (written by whichever worker
    /// carries the direction; informational, for the flow listing).
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// What only flow setup, teardown and listings read.
#[derive(Debug, Default)]
struct Cold {
    pool: AtomicU32,
    created: AtomicU32,
}

fn store128(a: &[AtomicU64; 2], v: u128) {
    a[0].store((v >> 64) as u64, Ordering::Relaxed);
    a[1].store(v as u64, Ordering::Relaxed);
}

fn load128(a: &[AtomicU64; 2]) -> u128 {
    (u128::from(a[0].load(Ordering::Relaxed)) << 64) | u128::from(a[1].load(Ordering::Relaxed))
}

impl FlowSlot {
    #[inline]
    pub fn consumer_key(&self) -> ConsumerKey {
        ConsumerKey(load128(&self.ckey))
    }
    #[inline]
    pub fn provider_key(&self) -> ProviderKey {
        ProviderKey(load128(&self.pkey))
    }
    #[inline]
    pub fn endpoint(&self) -> EndpointId {
        EndpointId(self.meta.load(Ordering::Relaxed) & MAX_ENDPOINT_ID)
    }
    /// The [`state`] bits.
    #[inline]
    pub fn state(&self) -> u32 {
        self.meta.load(Ordering::Acquire) >> state::SHIFT
    }
    #[inline]
    pub fn is_live(&self) -> bool {
        self.state() & state::LIVE != 0
    }
    #[inline]
    pub fn protocol(&self) -> Protocol {
        Protocol::from_number(self.consumer_key().proto()).unwrap_or(Protocol::Icmp)
    }
    #[inline]
    pub fn last_seen(&self) -> Now {
        Now(self.last_seen.load(Ordering::Relaxed))
    }
    /// Refreshes the idle timer; writes only when the second changed.
    #[inline]
    pub fn touch(&self, now: Now) {
        if self.last_seen.load(Ordering::Relaxed) != now.0 {
            self.last_seen.store(now.0, Ordering::Relaxed);
        }
    }
    /// Adds TCP state bits (only for packets carrying SYN/FIN/RST).
    #[inline]
    pub fn add_state(&self, bits: u32) {
        if (self.meta.load(Ordering::Relaxed) >> state::SHIFT) & bits != bits {
            self.meta.fetch_or(bits << state::SHIFT, Ordering::AcqRel);
        }
    }
    /// Starts a closed TCP flow over when its consumer sends a new SYN on the
    /// same 5-tuple. A flow being removed stays removed.
    pub fn reopen(&self) {
        let live = state::LIVE << state::SHIFT;
        let mut cur = self.meta.load(Ordering::Acquire);
        while cur & live != 0 {
            let fresh = (cur & MAX_ENDPOINT_ID) | ((state::LIVE | state::C_SYN) << state::SHIFT);
            match self.meta.compare_exchange(cur, fresh, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(v) => cur = v,
            }
        }
    }
    #[inline]
    pub fn add_bytes(&self, inbound: bool, n: u64) {
        let c = if inbound { &self.bytes_in } else { &self.bytes_out };
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_in.load(Ordering::Relaxed), self.bytes_out.load(Ordering::Relaxed))
    }
}

/// Why a flow could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// `max_flows` flows are live.
    Full,
    /// The setup callback refused (no NAT port).
    Refused,
}

/// What [`FlowTable::insert`] found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A concurrent packet of the same flow created it first.
    Existing(u32),
    New(u32),
}

#[derive(Debug)]
struct Index {
    heads: Box<[AtomicU32]>,
    stripes: Box<[Mutex<()>]>,
    mask: usize,
}

impl Index {
    fn new(buckets: usize) -> Index {
        Index { heads: huge_array(buckets), stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(), mask: buckets - 1 }
    }
    fn lock(&self, bucket: usize) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a poisoned stripe is still consistent.
        self.stripes[bucket % STRIPES].lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct FreeSlots {
    fresh: u32,
    freed: VecDeque<u32>,
}

/// The concurrent flow table. See the module docs.
#[derive(Debug)]
pub struct FlowTable {
    slots: Box<[FlowSlot]>,
    cold: Box<[Cold]>,
    cidx: Index,
    pidx: Index,
    free: Mutex<FreeSlots>,
    /// Slots ever handed out: the sweeper scans `0..high_water`.
    high_water: AtomicU32,
    live: AtomicU32,
    hasher: ahash::RandomState,
}

impl FlowTable {
    /// A table for at most `max_flows` flows (at least 1, at most 2^31).
    pub fn new(max_flows: u32) -> FlowTable {
        let max_flows = max_flows.clamp(1, 1 << 31);
        // Twice as many buckets as flows: chains stay short (a hit visits 1.25
        // slots on average), and every extra slot visited is a cache miss.
        let buckets = (max_flows as usize).next_power_of_two().max(16) * 2;
        FlowTable {
            slots: huge_array(max_flows as usize),
            cold: huge_array(max_flows as usize),
            cidx: Index::new(buckets),
            pidx: Index::new(buckets),
            free: Mutex::new(FreeSlots { fresh: 0, freed: VecDeque::new() }),
            high_water: AtomicU32::new(0),
            live: AtomicU32::new(0),
            hasher: ahash::RandomState::new(),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Live flows.
    pub fn len(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of table payload per flow slot: the slot plus its two index
    /// buckets (at the power-of-two size actually allocated).
    pub fn bytes_per_flow(&self) -> usize {
        let idx = 2 * self.cidx.heads.len() * std::mem::size_of::<AtomicU32>();
        std::mem::size_of::<FlowSlot>() + std::mem::size_of::<Cold>() + idx / self.slots.len()
    }

    /// The pool the flow in slot `i` took its port from.
    pub fn pool_of(&self, i: u32) -> PoolId {
        PoolId(self.cold[i as usize].pool.load(Ordering::Relaxed))
    }

    /// When the flow in slot `i` was created.
    pub fn created_of(&self, i: u32) -> Now {
        Now(self.cold[i as usize].created.load(Ordering::Relaxed))
    }

    #[inline]
    pub fn slot(&self, i: u32) -> &FlowSlot {
        &self.slots[i as usize]
    }

    /// A stable hash of a consumer key for per-flow choices (backend).
    #[inline]
    pub fn flow_hash(&self, k: ConsumerKey) -> u64 {
        self.hasher.hash_one(k.0)
    }

    #[inline]
    fn bucket(&self, k: u128, idx: &Index) -> usize {
        (self.hasher.hash_one(k) as usize) & idx.mask
    }

    /// The slot of the flow with this consumer key.
    #[inline]
    pub fn find_consumer(&self, k: ConsumerKey) -> Option<u32> {
        let b = self.bucket(k.0, &self.cidx);
        let mut cur = self.cidx.heads[b].load(Ordering::Acquire);
        for _ in 0..MAX_CHAIN {
            if cur == NONE {
                return None;
            }
            let s = &self.slots[(cur - 1) as usize];
            if load128(&s.ckey) == k.0 {
                return Some(cur - 1);
            }
            cur = s.cnext.load(Ordering::Acquire);
        }
        None
    }

    /// The slot of the flow with this provider key.
    #[inline]
    pub fn find_provider(&self, k: ProviderKey) -> Option<u32> {
        let b = self.bucket(k.0, &self.pidx);
        let mut cur = self.pidx.heads[b].load(Ordering::Acquire);
        for _ in 0..MAX_CHAIN {
            if cur == NONE {
                return None;
            }
            let s = &self.slots[(cur - 1) as usize];
            if load128(&s.pkey) == k.0 {
                return Some(cur - 1);
            }
            cur = s.pnext.load(Ordering::Acquire);
        }
        None
    }

    fn take_slot(&self) -> Option<u32> {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if (f.freed.len() < REUSE_DELAY || f.fresh == 0) && (f.fresh as usize) < self.slots.len() {
            let i = f.fresh;
            f.fresh += 1;
            self.high_water.fetch_max(f.fresh, Ordering::Relaxed);
            return Some(i);
        }
        f.freed.pop_front()
    }

    fn give_slot(&self, i: u32) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).freed.push_back(i);
    }

    /// Creates the flow `ck` unless it exists. Under the consumer key's
    /// stripe, `setup(slot, claim)` picks the provider side; it must call
    /// `claim(pkey)` (possibly several times) until one returns true, which
    /// links the slot under that provider key if no live flow holds it.
    /// `setup` returns `(endpoint, pool, state bits)` or `None` to give up.
    pub fn insert(
        &self,
        ck: ConsumerKey,
        now: Now,
        setup: impl FnOnce(&mut dyn FnMut(ProviderKey) -> bool) -> Option<(EndpointId, PoolId, u32)>,
    ) -> Result<Inserted, InsertError> {
        let cb = self.bucket(ck.0, &self.cidx);
        let _g = self.cidx.lock(cb);
        if let Some(i) = self.find_consumer(ck) {
            return Ok(Inserted::Existing(i));
        }
        let Some(i) = self.take_slot() else { return Err(InsertError::Full) };
        let slot = &self.slots[i as usize];
        let mut linked = false;
        let mut claim = |pk: ProviderKey| -> bool {
            if linked {
                return false;
            }
            linked = self.link_provider(i, pk);
            linked
        };
        let Some((ep, pool, bits)) = setup(&mut claim) else {
            if linked {
                self.unlink_provider(i);
            }
            self.give_slot(i);
            return Err(InsertError::Refused);
        };
        if !linked {
            self.give_slot(i);
            return Err(InsertError::Refused);
        }
        store128(&slot.ckey, ck.0);
        let cold = &self.cold[i as usize];
        cold.pool.store(pool.0, Ordering::Relaxed);
        cold.created.store(now.0, Ordering::Relaxed);
        slot.last_seen.store(now.0, Ordering::Relaxed);
        slot.bytes_in.store(0, Ordering::Relaxed);
        slot.bytes_out.store(0, Ordering::Relaxed);
        slot.cnext.store(self.cidx.heads[cb].load(Ordering::Relaxed), Ordering::Relaxed);
        let meta = (ep.0 & MAX_ENDPOINT_ID) | ((bits | state::LIVE) << state::SHIFT);
        slot.meta.store(meta, Ordering::Release);
        self.cidx.heads[cb].store(i + 1, Ordering::Release);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(Inserted::New(i))
    }

    fn link_provider(&self, i: u32, pk: ProviderKey) -> bool {
        let pb = self.bucket(pk.0, &self.pidx);
        let _g = self.pidx.lock(pb);
        if self.find_provider(pk).is_some() {
            return false;
        }
        let slot = &self.slots[i as usize];
        store128(&slot.pkey, pk.0);
        slot.pnext.store(self.pidx.heads[pb].load(Ordering::Relaxed), Ordering::Relaxed);
        self.pidx.heads[pb].store(i + 1, Ordering::Release);
        true
    }

    fn unlink(idx: &Index, bucket: usize, i: u32, next: impl Fn(&FlowSlot) -> &AtomicU32, slots: &[FlowSlot]) {
        let mut link = &idx.heads[bucket];
        loop {
            let cur = link.load(Ordering::Relaxed);
            if cur == NONE {
                return;
            }
            if cur == i + 1 {
                let after = next(&slots[i as usize]).load(Ordering::Relaxed);
                link.store(after, Ordering::Release);
                return;
            }
            link = next(&slots[(cur - 1) as usize]);
        }
    }

    fn unlink_provider(&self, i: u32) {
        let pk = load128(&self.slots[i as usize].pkey);
        let pb = self.bucket(pk, &self.pidx);
        let _g = self.pidx.lock(pb);
        Self::unlink(&self.pidx, pb, i, |s| &s.pnext, &self.slots);
    }

    /// Removes the flow in slot `i` if it is live; returns its final state
    /// bits, or `None` when another caller removed it first.
    pub fn remove(&self, i: u32) -> Option<u32> {
        let slot = &self.slots[i as usize];
        let live = state::LIVE << state::SHIFT;
        let mut cur = slot.meta.load(Ordering::Acquire);
        loop {
            if cur & live == 0 {
                return None;
            }
            match slot.meta.compare_exchange(cur, cur & !live, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        let ck = load128(&slot.ckey);
        let cb = self.bucket(ck, &self.cidx);
        {
            let _g = self.cidx.lock(cb);
            Self::unlink(&self.cidx, cb, i, |s| &s.cnext, &self.slots);
        }
        self.unlink_provider(i);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.give_slot(i);
        Some(cur >> state::SHIFT)
    }

    /// Calls `f(slot index, slot)` for every live flow.
    pub fn for_each_live(&self, mut f: impl FnMut(u32, &FlowSlot)) {
        let hw = self.high_water.load(Ordering::Relaxed) as usize;
        for (i, s) in self.slots[..hw].iter().enumerate() {
            if s.is_live() {
                f(i as u32, s);
            }
        }
    }
}

/// A zeroed array of `n` atomics-only values (all-zero is their default),
/// backed by transparent huge pages when it is large.
fn huge_array<T: Default>(n: usize) -> Box<[T]> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let bytes = n * std::mem::size_of::<T>();
    const HUGE: usize = 2 << 20;
    if bytes >= 4 * HUGE {
        // Advise before the first touch so the faults take huge pages; the
        // range is trimmed to whole 2 MiB pages inside the allocation.
        let start = v.as_mut_ptr() as usize;
        let first = (start + HUGE - 1) & !(HUGE - 1);
        let end = (start + bytes) & !(HUGE - 1);
        if end > first {
            // SAFETY: madvise only hints at how to back memory that this
            // Vec owns; it does not change its contents or validity.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v.extend((0..n).map(|_| T::default()));
    v.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    fn ck(port: u16) -> ConsumerKey {
        ConsumerKey::new(1, 6, 0x0a00_0001, port, 0x0a01_0005, 80)
    }
    fn pk(port: u16) -> ProviderKey {
        ProviderKey::new(6, 0xc0a8_6404, port, 0xc0a8_320a, 80)
    }

    fn add(t: &FlowTable, c: ConsumerKey, p: ProviderKey) -> Result<Inserted, InsertError> {
        t.insert(c, Now(0), |claim| claim(p).then_some((EndpointId(1), PoolId(2), 0)))
    }

    #[test]
    fn keys_round_trip() {
        let k = ConsumerKey::new(7, 17, 0x0102_0304, 5353, 0x0a0b_0c0d, 53);
        assert_eq!(
            (k.network(), k.proto(), k.consumer_addr(), k.consumer_port(), k.endpoint_addr(), k.endpoint_port()),
            (7, 17, 0x0102_0304, 5353, 0x0a0b_0c0d, 53)
        );
        let p = ProviderKey::new(6, 0xc0a8_6404, 40000, 0xc0a8_320a, 5432);
        assert_eq!(
            (p.nat_addr(), p.nat_port(), p.backend_addr(), p.backend_port()),
            (0xc0a8_6404, 40000, 0xc0a8_320a, 5432)
        );
    }

    #[test]
    fn insert_find_remove_both_directions() {
        let t = FlowTable::new(100);
        let Ok(Inserted::New(i)) = add(&t, ck(1000), pk(2000)) else { panic!("insert") };
        assert_eq!(t.find_consumer(ck(1000)), Some(i));
        assert_eq!(t.find_provider(pk(2000)), Some(i));
        assert_eq!(t.slot(i).endpoint(), EndpointId(1));
        assert_eq!(t.pool_of(i), PoolId(2));
        assert_eq!(t.slot(i).protocol(), Protocol::Tcp);
        assert_eq!(add(&t, ck(1000), pk(2001)), Ok(Inserted::Existing(i)));
        assert_eq!(t.len(), 1);
        assert!(t.remove(i).is_some());
        assert!(t.remove(i).is_none(), "second remove is a no-op");
        assert_eq!(t.find_consumer(ck(1000)), None);
        assert_eq!(t.find_provider(pk(2000)), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn provider_tuple_is_never_live_twice() {
        let t = FlowTable::new(100);
        assert!(matches!(add(&t, ck(1), pk(9)), Ok(Inserted::New(_))));
        assert_eq!(add(&t, ck(2), pk(9)), Err(InsertError::Refused));
        assert_eq!(t.len(), 1);
        assert!(matches!(add(&t, ck(2), pk(10)), Ok(Inserted::New(_))));
    }

    #[test]
    fn bounded_by_max_flows() {
        let t = FlowTable::new(3);
        for p in 0..3 {
            assert!(matches!(add(&t, ck(p), pk(p)), Ok(Inserted::New(_))));
        }
        assert_eq!(add(&t, ck(3), pk(3)), Err(InsertError::Full));
        let i = t.find_consumer(ck(1)).expect("live");
        t.remove(i);
        assert!(matches!(add(&t, ck(3), pk(3)), Ok(Inserted::New(_))));
    }

    #[test]
    fn many_flows_with_collisions_stay_findable() {
        let t = FlowTable::new(20_000);
        let mut slots = Vec::new();
        for p in 0..20_000u16 {
            let Ok(Inserted::New(i)) = add(&t, ck(p), pk(p)) else { panic!("insert {p}") };
            slots.push(i);
        }
        for p in (0..20_000u16).step_by(2) {
            assert!(t.remove(slots[usize::from(p)]).is_some());
        }
        for p in 0..20_000u16 {
            let want = (p % 2 == 1).then_some(slots[usize::from(p)]);
            assert_eq!(t.find_consumer(ck(p)), want);
            assert_eq!(t.find_provider(pk(p)), want);
        }
        let mut n = 0;
        t.for_each_live(|_, _| n += 1);
        assert_eq!(n, 10_000);
    }

    #[test]
    fn slot_size_within_budget() {
        assert_eq!(std::mem::size_of::<FlowSlot>(), 64);
        assert_eq!(std::mem::align_of::<FlowSlot>(), 64);
        let t = FlowTable::new(1 << 16);
        assert!(t.bytes_per_flow() <= 128, "{}", t.bytes_per_flow());
    }

    #[test]
    fn tcp_phases() {
        use state::*;
        assert_eq!(TcpPhase::from_bits(C_SYN), TcpPhase::Opening);
        assert_eq!(TcpPhase::from_bits(C_SYN | P_SYN | ESTABLISHED), TcpPhase::Established);
        assert_eq!(TcpPhase::from_bits(ESTABLISHED | C_FIN), TcpPhase::Closing);
        assert_eq!(TcpPhase::from_bits(ESTABLISHED | C_FIN | P_FIN), TcpPhase::Closed);
        assert_eq!(TcpPhase::from_bits(C_SYN | RST), TcpPhase::Closed);
    }

    #[test]
    fn concurrent_inserts_of_one_key_make_one_flow() {
        let t = Arc::new(FlowTable::new(10_000));
        let made: Vec<_> = (0..4)
            .map(|w| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut news = Vec::new();
                    for p in 0..2_000u16 {
                        // Every thread races on the same keys; provider ports
                        // differ per thread so only the consumer lock decides.
                        if let Ok(Inserted::New(i)) = add(&t, ck(p), pk(p.wrapping_mul(4) + w)) {
                            news.push(i);
                        }
                    }
                    news
                })
            })
            .collect();
        let all: Vec<u32> = made.into_iter().flat_map(|h| h.join().expect("thread")).collect();
        assert_eq!(all.len(), 2_000);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), 2_000);
        assert_eq!(t.len(), 2_000);
    }
}
