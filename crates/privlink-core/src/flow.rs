//! The flow table: every live translation, found from either direction.
//!
//! Shape: a fixed slab of [`FlowSlot`]s (allocated once) and two chained
//! hash indexes over it, one keyed by the consumer-side 5-tuple
//! ([`ConsumerKey`]) and one by the provider-side 5-tuple ([`ProviderKey`]).
//! Each index is an array of chain heads; the chain links live inside the
//! slots, so the indexes cost 4 bytes per bucket and never allocate.
//!
//! Concurrency: readers (the per-packet path of every worker) take no lock
//! and write nothing shared to look a flow up. Writers (flow setup and
//! teardown, rare next to packets) serialise per bucket on striped mutexes;
//! a key is inserted only if no live flow holds it under its stripe, which
//! keeps a burst of packets of one new flow from taking more than one port,
//! and a provider tuple from being live twice.
//!
//! A slot is reused for another flow once its flow ends, possibly while a
//! reader still stands on it. What keeps a reader from acting on a flow it
//! did not look up is the slot's *generation*, kept with the state bits in
//! one 32-bit `meta` word (20 bits of generation, 12 of state), used as a
//! seqlock (it was 24 bits of generation and 8 of state up to table format
//! 2; now 20 and 12):
//!
//! - Removal is one compare-and-swap on `meta` that clears `LIVE` and bumps
//!   the generation; only the thread whose swap succeeds frees the port and
//!   the slot, so a flow is ended once, with the pool and port it had.
//! - Keys and the endpoint are written only while the slot is not live, and
//!   after a release fence that follows (through the free list's mutex) the
//!   removal's swap; `LIVE` is then published with a release store.
//! - A reader loads `meta` (acquire) and skips the slot unless it is live,
//!   reads both keys, issues an acquire fence and loads `meta` again. If it
//!   read any key written for a later flow, the fence pairs with the
//!   writer's release fence, so the second load sees the bumped generation
//!   and the read is discarded. What a lookup returns ([`FlowView`]) is a
//!   consistent copy of one flow: both keys, the endpoint and the state, as
//!   they were at one instant while that flow was live. The packet is
//!   rewritten from that copy, never from the slot again.
//! - State bits are added by a compare-and-swap that checks the generation
//!   ([`FlowTable::add_state`]), so a packet of an ended flow can never set
//!   SYN/FIN/RST bits on the flow that reuses its slot.
//! - Written without that check: the idle timestamp and the byte counts
//!   (a late packet can at most refresh the idle time of, or add its bytes
//!   to, a flow that just took the slot), and TCP's per-side sequence words
//!   and a PROXY flow's recorded numbers. A late segment of an ended flow,
//!   read before the slot was reused (behind `REUSE_DELAY` later frees),
//!   can write these for the new flow: at worst its exact RST is not
//!   recognised (it then idles out) or its PROXY header segment carries
//!   wrong numbers (the backend drops it and it is sent again with the
//!   right ones from the flow's next segments). None of them decides where
//!   a packet goes.
//!
//! `flow/loom_model.rs` model-checks this protocol
//! (lookup racing removal and immediate reuse) with `loom`, and
//! `tests/stress.rs` drives it on real threads in a full table.
//!
//! Reuse policy: the slab holds `max_flows + REUSE_DELAY` slots while at most
//! `max_flows` flows are live, so a freed slot always waits in FIFO order
//! behind at least `REUSE_DELAY` later frees before it is handed out again,
//! full table or not. Correctness does not rest on that delay (the model
//! test runs with none); it makes the race above, and so a discarded read
//! (a miss, retried by the caller's next packet), rare.
//!
//! Memory: the fields a packet touches fill exactly one 64-byte cache line
//! ([`FlowSlot`]: both keys, both chain links, the idle time, `meta`, the
//! byte counts modulo 2^32 and, for TCP, how far each side's sequence
//! numbers got); what only setup, teardown, a close, a restart or the
//! listing reads (pool, creation time, the slot's check value, the byte
//! counts' carries, what a PROXY flow's header segment repeats) sits in a
//! parallel 40-byte array. With both indexes sized to the next power of two
//! of twice `max_flows`, the table costs 120 to 136 bytes per flow (a Linux
//! conntrack entry is about 300). Large tables ask the kernel for
//! transparent huge pages, which spares the page walks a random lookup
//! in a hundred megabytes would otherwise cost.

use crate::addr::fold;
pub use crate::addr::{ConsumerKey, Family, ProviderKey, V4, V6};
pub use crate::conntrack::{state, TcpPhase};
use crate::sync::{fence, AtomicU32, AtomicU64, Mutex, MutexGuard, Ordering};
use crate::types::{EndpointId, Now, PoolId, Protocol};
use mem::Arr;
use std::collections::VecDeque;

// Under loom the table lives on the heap only: the region code is idle.
#[cfg_attr(loom, allow(dead_code))]
mod mem;
pub use mem::{AttachError, Header, Layout, Region, HEADER_BYTES};

/// Longest chain a reader walks before calling it a miss. Chains average
/// under one entry; this only bounds a reader caught in a concurrent reuse.
const MAX_CHAIN: usize = 64;
/// Times a reader restarts a lookup whose read a concurrent reuse spoiled.
const MAX_RETRIES: usize = 4;
/// Writer lock stripes per index.
#[cfg(not(loom))]
const STRIPES: usize = 1024;
#[cfg(loom)]
const STRIPES: usize = 2;
/// Slots beyond `max_flows`: a freed slot waits behind this many later
/// frees before it is reused (see the module docs).
pub const REUSE_DELAY: u32 = 1024;

const NONE: u32 = 0;

/// Where the generation sits in `meta`.
const GEN_SHIFT: u32 = 12;
const GEN_ONE: u32 = 1 << GEN_SHIFT;

/// How far one TCP segment may move its side's tracked sequence number
/// ([`FlowTable::note_seq`]): 16 MiB, more than Linux's default largest
/// receive window (`tcp_rmem` 6 MiB) holds in flight, so a real sender
/// never outruns it.
pub const MAX_SEQ_ADVANCE: u32 = 1 << 24;

/// Endpoint ids must fit the 24 bits a slot keeps them in.
pub const MAX_ENDPOINT_ID: u32 = (1 << 24) - 1;

/// One flow: everything a packet of it reads or writes, in one cache line.
/// All fields are atomics: see the module docs for the protocol.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct FlowSlot<F: Family = V4> {
    ckey: F::Cell,
    /// The provider key and the endpoint id (24 bits,
    /// [`Family::join_provider`]).
    pkey: F::Cell,
    cnext: AtomicU32,
    pnext: AtomicU32,
    /// Last packet, in [`Now`] seconds.
    last_seen: AtomicU32,
    /// Generation (top 20 bits) and [`state`] bits (low 12).
    meta: AtomicU32,
    /// Bytes consumer -> provider and back, modulo 2^32 (the carries are
    /// in the cold half; written by whichever worker carries the direction;
    /// informational, for the flow listing).
    bytes_in: AtomicU32,
    bytes_out: AtomicU32,
    /// TCP: the sequence number right after the highest one the consumer
    /// (`next_c`) and the provider (`next_p`) sent: the exact value a RST
    /// from that side must carry to end the flow (RFC 5961 §3.2).
    next_c: AtomicU32,
    next_p: AtomicU32,
}

impl<F: Family> Default for FlowSlot<F> {
    fn default() -> Self {
        FlowSlot {
            ckey: F::Cell::default(),
            pkey: F::Cell::default(),
            cnext: AtomicU32::new(0),
            pnext: AtomicU32::new(0),
            last_seen: AtomicU32::new(0),
            meta: AtomicU32::new(0),
            bytes_in: AtomicU32::new(0),
            bytes_out: AtomicU32::new(0),
            next_c: AtomicU32::new(0),
            next_p: AtomicU32::new(0),
        }
    }
}

/// What only flow setup, teardown, listings and a restart read.
#[derive(Debug)]
#[repr(C)]
struct Cold {
    pool: AtomicU32,
    created: AtomicU32,
    /// A keyed hash of the flow's keys, endpoint, pool and creation time,
    /// written before the flow is published: a slot that was being written
    /// when the process died, or bytes that are not a slot, do not match it
    /// and are not forwarded after a restart.
    check: AtomicU64,
    /// PROXY protocol: the consumer's initial sequence number (its SYN's)
    /// and the acknowledgement number of its segment that completed the
    /// handshake (the backend's ISN + 1). See [`crate::proxy`].
    isn: AtomicU32,
    peer: AtomicU32,
    /// Times `bytes_in` (low 16 bits) and `bytes_out` (high 16) wrapped.
    carries: AtomicU32,
    /// PROXY protocol: what the header segment repeats of the consumer's
    /// segment that completed the handshake: its timestamps (value, echo)
    /// and its window (low 16 bits; bit 16: it had timestamps).
    ts_val: AtomicU32,
    ts_ecr: AtomicU32,
    window: AtomicU32,
}

impl Default for Cold {
    fn default() -> Self {
        Cold {
            pool: AtomicU32::new(0),
            created: AtomicU32::new(0),
            check: AtomicU64::new(0),
            isn: AtomicU32::new(0),
            peer: AtomicU32::new(0),
            carries: AtomicU32::new(0),
            ts_val: AtomicU32::new(0),
            ts_ecr: AtomicU32::new(0),
            window: AtomicU32::new(0),
        }
    }
}

#[inline]
fn same_gen(a: u32, b: u32) -> bool {
    (a ^ b) >> GEN_SHIFT == 0
}

/// A consistent copy of one live flow, as a lookup found it: both keys, the
/// endpoint and the state bits of one generation of one slot. Everything a
/// packet is rewritten with comes from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowView<F: Family = V4> {
    /// The slot index.
    pub slot: u32,
    /// The slot's generation when read: names this flow, not the slot.
    gen: u32,
    pub ckey: ConsumerKey<F>,
    pub pkey: ProviderKey<F>,
    pub endpoint: EndpointId,
    /// The [`state`] bits when read.
    pub state: u32,
}

impl<F: Family> FlowView<F> {
    /// The slot's generation this view was read at.
    #[inline]
    pub(crate) fn generation(&self) -> u32 {
        self.gen
    }
    #[inline]
    pub fn protocol(&self) -> Protocol {
        Protocol::from_number(self.ckey.proto()).unwrap_or(Protocol::Icmp)
    }
    #[inline]
    pub fn phase(&self) -> TcpPhase {
        TcpPhase::from_bits(self.state)
    }
}

/// A flow as the sweeper and listings see it: the view plus what only they
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord<F: Family = V4> {
    pub view: FlowView<F>,
    pub pool: PoolId,
    pub created: Now,
    pub last_seen: Now,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Why a flow could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// `max_flows` flows are live.
    Full,
    /// The setup callback refused (no NAT port).
    Refused,
    /// The endpoint holds its `max_flows` (decided before the table is
    /// asked).
    Limit,
    /// The service has no healthy backend.
    NoBackend,
    /// This host holds none of the service's NAT addresses.
    NoNatIp,
    /// The consumer's address is the endpoint's own (a LAND packet):
    /// refused before the table is asked.
    Land,
}

/// A flow's state bits before and after a change ([`FlowTable::add_state`],
/// [`FlowTable::reopen`], [`FlowTable::set_counted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub before: u32,
    pub after: u32,
}

impl Changed {
    /// This change took the flow off the open counts (it closed it).
    #[inline]
    pub fn counted_closed(&self) -> bool {
        self.after & state::COUNTED_CLOSED != 0 && self.before & state::COUNTED_CLOSED == 0
    }
    /// This change put a flow taken off the open counts back on them.
    #[inline]
    pub fn reopened(&self) -> bool {
        self.before & state::COUNTED_CLOSED != 0 && self.after & state::COUNTED_CLOSED == 0
    }
    /// This change set `bit`.
    #[inline]
    pub fn set(&self, bit: u32) -> bool {
        self.after & bit != 0 && self.before & bit == 0
    }
}

/// What [`FlowTable::insert`] found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted<F: Family = V4> {
    /// A concurrent packet of the same flow created it first.
    Existing(FlowView<F>),
    New(FlowView<F>),
}

impl<F: Family> Inserted<F> {
    pub fn view(&self) -> FlowView<F> {
        match *self {
            Inserted::Existing(v) | Inserted::New(v) => v,
        }
    }
}

#[derive(Debug)]
struct Index {
    heads: Arr<AtomicU32>,
    stripes: Box<[Mutex<()>]>,
    mask: usize,
}

impl Index {
    fn new(heads: Arr<AtomicU32>) -> Index {
        let mask = heads.len() - 1;
        Index { heads, stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(), mask }
    }
    fn lock(&self, bucket: usize) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a poisoned stripe is still consistent.
        self.stripes[bucket % STRIPES].lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct FreeSlots {
    /// Slots `0..fresh` have been handed out at least once.
    fresh: u32,
    freed: VecDeque<u32>,
}

/// The concurrent flow table. See the module docs.
#[derive(Debug)]
pub struct FlowTable<F: Family = V4> {
    slots: Arr<FlowSlot<F>>,
    cold: Arr<Cold>,
    cidx: Index,
    pidx: Index,
    free: Mutex<FreeSlots>,
    max_flows: u32,
    reuse_delay: u32,
    /// Slots ever handed out: the sweeper scans `0..high_water`. In a
    /// region it lives in the header page, so a restart scans no further.
    high_water: Arr<AtomicU32>,
    live: AtomicU32,
    /// The index hash's keys (random per table, kept in a region's header).
    keys: [u64; 2],
    /// Set while this process hands the table to another: no flow is
    /// created or removed here (checked under the insert's stripe lock).
    frozen: AtomicU32,
}

/// Where the high-water mark sits in a region's header page (after the
/// checksummed [`Header`]).
#[cfg_attr(loom, allow(dead_code))]
const HIGH_WATER_AT: usize = 2048;

/// What attaching a region found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attached {
    /// Live flows taken over.
    pub flows: u32,
    /// Slots that claimed to be live but did not validate (a write cut short
    /// by a crash, a duplicate key): ended, never forwarded.
    pub torn: u32,
}

/// How [`FlowTable::attach`] treats the region's indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// The process that wrote the region died: its indexes may be cut
    /// short mid-update, so they are rebuilt from the slots that validate.
    Recover,
    /// The process that wrote the region is alive, has stopped writing
    /// ([`FlowTable::freeze`]) and still reads: the indexes are used as
    /// they are.
    Share,
}

impl<F: Family> FlowTable<F> {
    /// A table for at most `max_flows` flows (at least 1, at most 2^31).
    pub fn new(max_flows: u32) -> Self {
        Self::with_reuse_delay(max_flows, REUSE_DELAY)
    }

    /// As [`new`](Self::new), with the index hash's keys given (a fixed
    /// [`Settings::seed`](crate::Settings::seed)).
    pub fn with_keys(max_flows: u32, keys: [u64; 2]) -> Self {
        let mut t = Self::new(max_flows);
        t.keys = keys;
        t
    }

    /// As [`new`](Self::new), with `reuse_delay` spare slots (0: a freed
    /// slot may be reused by the very next insert; the model test uses it).
    pub fn with_reuse_delay(max_flows: u32, reuse_delay: u32) -> Self {
        let l = Layout::of::<F>(max_flows, reuse_delay);
        #[cfg(not(loom))]
        let keys = [rand::random::<u64>(), rand::random::<u64>()];
        // loom replays executions: the layout must not change between them.
        #[cfg(loom)]
        let keys = [1, 2];
        Self::assemble(
            l,
            Arr::heap(huge_array(l.slots)),
            Arr::heap(huge_array(l.slots)),
            Arr::heap(huge_array(l.buckets)),
            Arr::heap(huge_array(l.buckets)),
            Arr::heap(huge_array(1)),
            keys,
        )
    }

    fn assemble(
        l: Layout,
        slots: Arr<FlowSlot<F>>,
        cold: Arr<Cold>,
        cheads: Arr<AtomicU32>,
        pheads: Arr<AtomicU32>,
        high_water: Arr<AtomicU32>,
        keys: [u64; 2],
    ) -> Self {
        FlowTable {
            slots,
            cold,
            cidx: Index::new(cheads),
            pidx: Index::new(pheads),
            free: Mutex::new(FreeSlots { fresh: 0, freed: VecDeque::new() }),
            max_flows: l.max_flows,
            reuse_delay: l.reuse_delay,
            high_water,
            live: AtomicU32::new(0),
            keys,
            frozen: AtomicU32::new(0),
        }
    }

    /// The table's arrays in `region`, laid out by `l`.
    #[cfg(not(loom))]
    fn in_region(region: &std::sync::Arc<dyn Region>, l: Layout, keys: [u64; 2]) -> Self {
        // SAFETY: `Layout` places each array inside `l.bytes()` (checked by
        // the callers against the region's length), 64-byte aligned from a
        // page-aligned base; every type is atomics only, valid when zeroed.
        unsafe {
            Self::assemble(
                l,
                Arr::in_region(region, l.slots_at(), l.slots),
                Arr::in_region(region, l.cold_at(), l.slots),
                Arr::in_region(region, l.cidx_at(), l.buckets),
                Arr::in_region(region, l.pidx_at(), l.buckets),
                Arr::in_region(region, HIGH_WATER_AT, 1),
                keys,
            )
        }
    }

    /// A new, empty table in `region` (zeroed, at least
    /// `Layout::new(max_flows, REUSE_DELAY).bytes()` long): writes the
    /// header.
    #[cfg(not(loom))]
    pub fn create_in(region: std::sync::Arc<dyn Region>, max_flows: u32) -> Result<Self, AttachError> {
        let l = Layout::of::<F>(max_flows, REUSE_DELAY);
        if region.len() < l.bytes() {
            return Err(AttachError::Size { have: region.len(), need: l.bytes() });
        }
        let keys = [rand::random::<u64>(), rand::random::<u64>()];
        let h = l.header(keys);
        // SAFETY: the region is at least a header page long and page-aligned.
        unsafe { std::ptr::write_volatile(region.base() as *mut Header, h) };
        Ok(Self::in_region(&region, l, keys))
    }

    /// The table another process left in `region`, for `max_flows` flows:
    /// the header must match this build and layout. Live slots are checked
    /// (see [`Cold::check`]) and the free list rebuilt from them; `mode`
    /// says what to do with the indexes. The caller then gives the flows'
    /// ports and counts back to its pools ([`Engine::adopt_flows`](crate::Engine::adopt_flows)).
    #[cfg(not(loom))]
    pub fn attach(
        region: std::sync::Arc<dyn Region>,
        max_flows: u32,
        mode: AttachMode,
    ) -> Result<(Self, Attached), AttachError> {
        let l = Layout::of::<F>(max_flows, REUSE_DELAY);
        if region.len() < HEADER_BYTES {
            return Err(AttachError::Size { have: region.len(), need: l.bytes() });
        }
        // SAFETY: the region holds at least a header page; any bytes are a
        // valid `Header` (plain integers).
        let h: Header = unsafe { std::ptr::read_volatile(region.base() as *const Header) };
        if h.magic != mem::MAGIC || h.check != h.sum() {
            return Err(AttachError::NotATable);
        }
        // Format 3 held IPv4 flows only, in slots laid out as format 4's
        // IPv4 slots: an IPv4 table takes it over as it is (the header is
        // left as written, so the build before can still take it back).
        let ipv4_only = h.version == mem::VERSION_IPV4_ONLY && F::VERSION == 4;
        if h.version != mem::VERSION && !ipv4_only {
            return Err(AttachError::Version(h.version));
        }
        if !ipv4_only && h.family != u32::from(F::VERSION) {
            return Err(AttachError::Family { have: h.family, want: F::VERSION });
        }
        let want = if ipv4_only { l.header_ipv4_only(h.keys) } else { l.header(h.keys) };
        if h != want {
            return Err(AttachError::Layout { have: h.max_flows, slot: h.slot_size, want: l.max_flows });
        }
        if region.len() < l.bytes() {
            return Err(AttachError::Size { have: region.len(), need: l.bytes() });
        }
        let t = Self::in_region(&region, l, h.keys);
        let found = t.rebuild(mode);
        Ok((t, found))
    }

    /// Takes over the slots of a region: checks each live one, relinks it
    /// (in [`AttachMode::Recover`]), and rebuilds the free list.
    #[cfg(not(loom))]
    fn rebuild(&self, mode: AttachMode) -> Attached {
        let hw = (self.high_water[0].load(Ordering::Acquire) as usize).min(self.slots.len());
        if mode == AttachMode::Recover {
            for h in self.cidx.heads.iter().chain(self.pidx.heads.iter()) {
                h.store(NONE, Ordering::Relaxed);
            }
        }
        let mut found = Attached::default();
        let mut live = vec![false; hw];
        for (i, is_live) in live.iter_mut().enumerate() {
            let s = &self.slots[i];
            let m = s.meta.load(Ordering::Acquire);
            if m & state::LIVE == 0 {
                continue;
            }
            let (ck, pw) = (F::load(&s.ckey), F::load(&s.pkey));
            let pk = F::split_provider(pw).0;
            let c = &self.cold[i];
            let sum = self.slot_sum(ck, pw, c.pool.load(Ordering::Relaxed), c.created.load(Ordering::Relaxed));
            let mut ok = c.check.load(Ordering::Relaxed) == sum;
            if ok && mode == AttachMode::Recover {
                // A duplicate key can only come from corruption: the first
                // slot keeps it.
                ok = self.find_consumer(ConsumerKey(ck)).is_none()
                    && !self.provider_linked(self.bucket(pk, &self.pidx), ProviderKey(pk));
                if ok {
                    let (cb, pb) = (self.bucket(ck, &self.cidx), self.bucket(pk, &self.pidx));
                    s.cnext.store(self.cidx.heads[cb].load(Ordering::Relaxed), Ordering::Relaxed);
                    s.pnext.store(self.pidx.heads[pb].load(Ordering::Relaxed), Ordering::Relaxed);
                    self.cidx.heads[cb].store(i as u32 + 1, Ordering::Release);
                    self.pidx.heads[pb].store(i as u32 + 1, Ordering::Release);
                }
            }
            if !ok {
                found.torn += 1;
                if mode == AttachMode::Recover {
                    s.meta.store((m & !state::MASK).wrapping_add(GEN_ONE), Ordering::Release);
                }
                continue;
            }
            *is_live = true;
            found.flows += 1;
        }
        let fresh = live.iter().rposition(|&l| l).map_or(0, |i| i + 1);
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        f.fresh = fresh as u32;
        f.freed = (0..fresh as u32).filter(|&i| !live[i as usize]).collect();
        self.high_water[0].store(hw.max(fresh) as u32, Ordering::Release);
        self.live.store(found.flows, Ordering::Relaxed);
        found
    }

    /// The check value of a slot (see [`Cold::check`]).
    fn slot_sum(&self, ck: F::Word, pw: F::Word, pool: u32, created: u32) -> u64 {
        let a = F::key_hash(&self.keys, ck);
        let b = F::key_hash(&self.keys, F::mix(pw, u64::from(pool) << 32 | u64::from(created)));
        fold(a ^ 0x5bd1_e995, b | 1)
    }

    /// Stops flow creation and removal here (another process is taking the
    /// table over): an insert in progress finishes first, later ones fail
    /// as `Full`. Lookups and state bits go on.
    pub fn freeze(&self) {
        self.frozen.store(1, Ordering::SeqCst);
        // Every insert checks the flag under its consumer stripe: once each
        // stripe has been taken after the store, none is half done.
        for s in self.cidx.stripes.iter() {
            drop(s.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Undoes [`freeze`](Self::freeze) (the hand-over failed).
    pub fn thaw(&self) {
        self.frozen.store(0, Ordering::SeqCst);
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed) != 0
    }

    pub fn capacity(&self) -> u32 {
        self.max_flows
    }

    /// Live flows.
    pub fn len(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of table payload per flow: the slots (with the reuse spares),
    /// their cold halves and the two indexes, over `max_flows`.
    pub fn bytes_per_flow(&self) -> usize {
        let idx = 2 * self.cidx.heads.len() * std::mem::size_of::<AtomicU32>();
        let per_slot = std::mem::size_of::<FlowSlot<F>>() + std::mem::size_of::<Cold>();
        (per_slot * self.slots.len() + idx) / self.max_flows as usize
    }

    /// A stable hash of a consumer key for per-flow choices (backend).
    #[inline]
    pub fn flow_hash(&self, k: ConsumerKey<F>) -> u64 {
        F::key_hash(&self.keys, k.0)
    }

    #[inline(always)]
    fn bucket(&self, k: F::Word, idx: &Index) -> usize {
        (F::key_hash(&self.keys, k) as usize) & idx.mask
    }

    /// Completes the read of slot `i`, whose `meta` was `m1` (live) and
    /// whose keys were `ck` and `pw` as read after it: validated against a
    /// concurrent removal or reuse (see the module docs).
    #[inline(always)]
    fn validate(&self, i: u32, m1: u32, ck: F::Word, pw: F::Word) -> Option<FlowView<F>> {
        fence(Ordering::Acquire);
        let m2 = self.slots[i as usize].meta.load(Ordering::Relaxed);
        if !same_gen(m1, m2) || m2 & state::LIVE == 0 {
            return None;
        }
        let (pk, ep) = F::split_provider(pw);
        Some(FlowView {
            slot: i,
            gen: m2 >> GEN_SHIFT,
            ckey: ConsumerKey(ck),
            pkey: ProviderKey(pk),
            endpoint: EndpointId(ep),
            state: m2 & state::MASK,
        })
    }

    /// Reads slot `i` as a [`FlowView`] if it holds a live flow.
    #[inline]
    fn read(&self, i: u32, m1: u32) -> Option<FlowView<F>> {
        let s = &self.slots[i as usize];
        self.validate(i, m1, F::load(&s.ckey), F::load(&s.pkey))
    }

    /// Walks one chain for a live slot whose consumer (or provider) key is
    /// `k`. `Err` when a concurrent reuse spoiled the read.
    #[inline(always)]
    fn walk(&self, head: &AtomicU32, k: F::Word, consumer: bool) -> Result<Option<FlowView<F>>, ()> {
        let mut cur = head.load(Ordering::Acquire);
        for _ in 0..MAX_CHAIN {
            if cur == NONE {
                return Ok(None);
            }
            let i = cur - 1;
            let s = &self.slots[i as usize];
            let m1 = s.meta.load(Ordering::Acquire);
            if m1 & state::LIVE != 0 {
                let (ck, pw) = if consumer {
                    let ck = F::load(&s.ckey);
                    if ck != k {
                        cur = s.cnext.load(Ordering::Acquire);
                        continue;
                    }
                    (ck, F::load(&s.pkey))
                } else {
                    let pw = F::load(&s.pkey);
                    if F::split_provider(pw).0 != k {
                        cur = s.pnext.load(Ordering::Acquire);
                        continue;
                    }
                    (F::load(&s.ckey), pw)
                };
                // Both keys were read after `m1`; the validation covers them.
                return self.validate(i, m1, ck, pw).map(Some).ok_or(());
            }
            cur = if consumer { s.cnext.load(Ordering::Acquire) } else { s.pnext.load(Ordering::Acquire) };
        }
        Err(())
    }

    /// The live flow with this consumer key.
    #[inline(always)]
    pub fn find_consumer(&self, k: ConsumerKey<F>) -> Option<FlowView<F>> {
        let head = &self.cidx.heads[self.bucket(k.0, &self.cidx)];
        for _ in 0..MAX_RETRIES {
            if let Ok(found) = self.walk(head, k.0, true) {
                return found;
            }
        }
        None
    }

    /// The live flow with this provider key.
    #[inline(always)]
    pub fn find_provider(&self, k: ProviderKey<F>) -> Option<FlowView<F>> {
        let head = &self.pidx.heads[self.bucket(k.0, &self.pidx)];
        for _ in 0..MAX_RETRIES {
            if let Ok(found) = self.walk(head, k.0, false) {
                return found;
            }
        }
        None
    }

    /// Whether any slot holds provider key `k`, a live flow or one being
    /// set up (linked, not yet live), read under `k`'s provider stripe:
    /// for a claim in another table that must not take the same NAT tuple
    /// (an IPv4 pool serves the IPv4 table and the IPv6 one; its mutex,
    /// held across both claims, orders them).
    pub fn provider_held(&self, k: ProviderKey<F>) -> bool {
        let pb = self.bucket(k.0, &self.pidx);
        let _g = self.pidx.lock(pb);
        self.provider_linked(pb, k)
    }

    /// Under the provider stripe of `k`: whether any linked slot (live or
    /// being set up) holds `k`.
    fn provider_linked(&self, bucket: usize, k: ProviderKey<F>) -> bool {
        let mut cur = self.pidx.heads[bucket].load(Ordering::Acquire);
        while cur != NONE {
            let s = &self.slots[(cur - 1) as usize];
            if F::split_provider(F::load(&s.pkey)).0 == k.0 {
                return true;
            }
            cur = s.pnext.load(Ordering::Acquire);
        }
        false
    }

    fn take_slot(&self) -> Option<u32> {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let in_use = f.fresh - f.freed.len() as u32;
        if in_use >= self.max_flows {
            return None;
        }
        // With `max_flows + reuse_delay` slots and fewer than `max_flows`
        // in use, more than `reuse_delay` wait once the fresh ones are gone.
        if f.freed.len() as u32 > self.reuse_delay || f.fresh as usize == self.slots.len() {
            return f.freed.pop_front();
        }
        let i = f.fresh;
        f.fresh += 1;
        self.high_water[0].fetch_max(f.fresh, Ordering::Release);
        Some(i)
    }

    fn give_slot(&self, i: u32) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).freed.push_back(i);
    }

    /// Creates the flow `ck` of endpoint `ep` unless it exists. Under the
    /// consumer key's stripe, `setup(claim)` picks the provider side; it
    /// must call `claim(pkey)` (possibly several times) until one returns
    /// true, which links the slot under that provider key if no flow holds
    /// it. `setup` returns `(pool, state bits)` or `None` to give up.
    pub fn insert(
        &self,
        ck: ConsumerKey<F>,
        ep: EndpointId,
        now: Now,
        setup: impl FnOnce(&mut dyn FnMut(ProviderKey<F>) -> bool) -> Option<(PoolId, u32)>,
    ) -> Result<Inserted<F>, InsertError> {
        let cb = self.bucket(ck.0, &self.cidx);
        let _g = self.cidx.lock(cb);
        if let Some(v) = self.find_consumer(ck) {
            return Ok(Inserted::Existing(v));
        }
        if self.frozen.load(Ordering::Relaxed) != 0 {
            return Err(InsertError::Full);
        }
        let Some(i) = self.take_slot() else { return Err(InsertError::Full) };
        // Pairs with a reader's acquire fence: a reader that sees any key
        // written below also sees the removal that bumped the generation.
        fence(Ordering::Release);
        let slot = &self.slots[i as usize];
        let ep = EndpointId(ep.0 & MAX_ENDPOINT_ID);
        let mut linked = false;
        let mut claim = |pk: ProviderKey<F>| -> bool {
            if linked {
                return false;
            }
            linked = self.link_provider(i, pk, ep);
            linked
        };
        let Some((pool, bits)) = setup(&mut claim) else {
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
        F::store(&slot.ckey, ck.0);
        let cold = &self.cold[i as usize];
        cold.pool.store(pool.0, Ordering::Relaxed);
        cold.created.store(now.0, Ordering::Relaxed);
        cold.check.store(self.slot_sum(ck.0, F::load(&slot.pkey), pool.0, now.0), Ordering::Relaxed);
        slot.last_seen.store(now.0, Ordering::Relaxed);
        slot.bytes_in.store(0, Ordering::Relaxed);
        slot.bytes_out.store(0, Ordering::Relaxed);
        slot.next_c.store(0, Ordering::Relaxed);
        slot.next_p.store(0, Ordering::Relaxed);
        cold.carries.store(0, Ordering::Relaxed);
        cold.window.store(0, Ordering::Relaxed);
        slot.cnext.store(self.cidx.heads[cb].load(Ordering::Relaxed), Ordering::Relaxed);
        let gen = slot.meta.load(Ordering::Relaxed) & !state::MASK;
        let bits = (bits | state::LIVE) & state::MASK;
        slot.meta.store(gen | bits, Ordering::Release);
        self.cidx.heads[cb].store(i + 1, Ordering::Release);
        self.live.fetch_add(1, Ordering::Relaxed);
        let pk = F::split_provider(F::load(&slot.pkey)).0;
        Ok(Inserted::New(FlowView {
            slot: i,
            gen: gen >> GEN_SHIFT,
            ckey: ck,
            pkey: ProviderKey(pk),
            endpoint: ep,
            state: bits,
        }))
    }

    fn link_provider(&self, i: u32, pk: ProviderKey<F>, ep: EndpointId) -> bool {
        let pb = self.bucket(pk.0, &self.pidx);
        let _g = self.pidx.lock(pb);
        if self.provider_linked(pb, pk) {
            return false;
        }
        let slot = &self.slots[i as usize];
        F::store(&slot.pkey, F::join_provider(pk.0, ep.0));
        slot.pnext.store(self.pidx.heads[pb].load(Ordering::Relaxed), Ordering::Relaxed);
        self.pidx.heads[pb].store(i + 1, Ordering::Release);
        true
    }

    fn unlink(idx: &Index, bucket: usize, i: u32, next: impl Fn(&FlowSlot<F>) -> &AtomicU32, slots: &[FlowSlot<F>]) {
        let mut link = &idx.heads[bucket];
        loop {
            let cur = link.load(Ordering::Relaxed);
            if cur == NONE {
                return;
            }
            if cur == i + 1 {
                // The removed slot keeps its own link, so a reader standing
                // on it walks on.
                let after = next(&slots[i as usize]).load(Ordering::Relaxed);
                link.store(after, Ordering::Release);
                return;
            }
            link = next(&slots[(cur - 1) as usize]);
        }
    }

    fn unlink_provider(&self, i: u32) {
        let pk = F::split_provider(F::load(&self.slots[i as usize].pkey)).0;
        let pb = self.bucket(pk, &self.pidx);
        let _g = self.pidx.lock(pb);
        Self::unlink(&self.pidx, pb, i, |s| &s.pnext, &self.slots);
    }

    /// Changes the state bits of flow `v` by `f` (old bits -> new bits,
    /// `LIVE` kept), unless it has ended (its slot may be another flow's by
    /// now). Keeps [`state::COUNTED_CLOSED`] in step with the result: set
    /// when the new bits close a TCP flow, cleared when they open it again,
    /// except in a frozen table, whose counts another process owns (that
    /// process's sweep brings the bit in step, [`FlowTable::set_counted`]).
    /// Returns the bits before and after, or `None` when the flow ended.
    #[inline]
    fn change_state(&self, v: &FlowView<F>, f: impl Fn(u32) -> u32) -> Option<Changed> {
        let meta = &self.slots[v.slot as usize].meta;
        let mut cur = meta.load(Ordering::Relaxed);
        loop {
            if cur >> GEN_SHIFT != v.gen || cur & state::LIVE == 0 {
                return None;
            }
            let before = cur & state::MASK;
            let mut after = (f(before) | state::LIVE) & state::MASK;
            if !self.is_frozen() {
                after &= !state::COUNTED_CLOSED;
                if v.ckey.proto() == Protocol::Tcp.number() && TcpPhase::from_bits(after) == TcpPhase::Closed {
                    after |= state::COUNTED_CLOSED;
                }
            }
            if after == before {
                return Some(Changed { before, after });
            }
            match meta.compare_exchange_weak(cur, (cur & !state::MASK) | after, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Changed { before, after }),
                Err(now) => cur = now,
            }
        }
    }

    /// Adds TCP state bits to the flow `v` (see `change_state`: the one
    /// call whose bits close the flow is told so by
    /// [`Changed::counted_closed`], and only it takes the flow off the open
    /// counts).
    #[inline]
    pub fn add_state(&self, v: &FlowView<F>, bits: u32) -> Option<Changed> {
        self.change_state(v, |b| b | bits)
    }

    /// Starts the closed TCP flow `v` over (its consumer sent a new SYN on
    /// the same 5-tuple): state back to "consumer SYN seen". A flow that has
    /// ended stays ended. [`Changed::reopened`] tells the one call that must
    /// count the flow as open again.
    pub fn reopen(&self, v: &FlowView<F>) -> Option<Changed> {
        self.change_state(v, |b| state::C_SYN | (b & state::COUNTED_CLOSED))
    }

    /// Brings flow `v`'s [`state::COUNTED_CLOSED`] in step with its TCP
    /// phase (after another process changed its state during a hand-over);
    /// the caller adjusts the counts by what [`Changed`] says.
    pub fn set_counted(&self, v: &FlowView<F>) -> Option<Changed> {
        self.change_state(v, |b| b)
    }

    /// Counts a packet of `n` bytes of flow `v` (`inbound`: consumer ->
    /// provider) and refreshes its idle timer, which is written only when
    /// the second changed.
    #[inline(always)]
    pub fn note_packet(&self, v: &FlowView<F>, now: Now, inbound: bool, n: u64) {
        let s = &self.slots[v.slot as usize];
        if s.last_seen.load(Ordering::Relaxed) != now.0 {
            s.last_seen.store(now.0, Ordering::Relaxed);
        }
        let c = if inbound { &s.bytes_in } else { &s.bytes_out };
        let (old, add) = (c.load(Ordering::Relaxed), n as u32);
        let new = old.wrapping_add(add);
        c.store(new, Ordering::Relaxed);
        if new < old || n > u64::from(u32::MAX) {
            let carry = if inbound { 1 } else { 1 << 16 };
            self.cold[v.slot as usize].carries.fetch_add(carry, Ordering::Relaxed);
        }
    }

    /// TCP: notes that the consumer (`inbound`) or the provider sent up to
    /// sequence number `end` (exclusive): what a RST from that side must
    /// carry to end the flow. A SYN sets it; anything else raises it only
    /// (RFC 1982 serial order), so a retransmission or a reordered segment
    /// leaves it.
    ///
    /// A segment moves it at most [`MAX_SEQ_ADVANCE`] ahead: a blind
    /// attacker who forges a segment to move it, then a RST at the number
    /// it moved to, must land inside that span, as RFC 5961 makes an
    /// in-window RST land inside the receive window.
    #[inline(always)]
    pub fn note_seq(&self, v: &FlowView<F>, inbound: bool, end: u32, syn: bool) {
        let s = &self.slots[v.slot as usize];
        let c = if inbound { &s.next_c } else { &s.next_p };
        let ahead = end.wrapping_sub(c.load(Ordering::Relaxed));
        if syn || (ahead as i32 > 0 && ahead <= MAX_SEQ_ADVANCE) {
            c.store(end, Ordering::Relaxed);
        }
    }

    /// TCP: the sequence numbers right after the highest each side sent
    /// (consumer, provider), as [`note_seq`](Self::note_seq) recorded them.
    #[inline]
    pub fn next_seqs(&self, v: &FlowView<F>) -> (u32, u32) {
        let s = &self.slots[v.slot as usize];
        (s.next_c.load(Ordering::Relaxed), s.next_p.load(Ordering::Relaxed))
    }

    /// Ends the flow `v` if it is still live; returns its final state bits,
    /// or `None` when it had already ended (another caller removed it).
    /// Exactly one caller gets `Some` for a flow, so exactly one frees its
    /// port.
    pub fn remove(&self, v: &FlowView<F>) -> Option<u32> {
        self.remove_if(v, |_| true)
    }

    /// As [`remove`](Self::remove), only while `ok` holds for the flow's
    /// state bits, checked in the removing compare-and-swap (a closed flow
    /// reclaimed for a new one must not be one that opened again
    /// meanwhile).
    pub fn remove_if(&self, v: &FlowView<F>, ok: impl Fn(u32) -> bool) -> Option<u32> {
        let i = v.slot;
        let slot = &self.slots[i as usize];
        let mut cur = slot.meta.load(Ordering::Acquire);
        loop {
            if cur >> GEN_SHIFT != v.gen || cur & state::LIVE == 0 || !ok(cur & state::MASK) {
                return None;
            }
            let ended = (cur & !state::MASK).wrapping_add(GEN_ONE);
            match slot.meta.compare_exchange(cur, ended, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        // The keys cannot change now: only the inserter that takes this slot
        // from the free list writes them, after the unlinks below.
        let cb = self.bucket(v.ckey.0, &self.cidx);
        {
            let _g = self.cidx.lock(cb);
            Self::unlink(&self.cidx, cb, i, |s| &s.cnext, &self.slots);
        }
        self.unlink_provider(i);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.give_slot(i);
        Some(cur & state::MASK)
    }

    /// The live flow in slot `slot` at generation `gen`, if it still is.
    pub fn record_at(&self, slot: u32, gen: u32) -> Option<FlowRecord<F>> {
        self.record(slot).filter(|r| r.view.gen == gen)
    }

    /// PROXY protocol: the consumer's initial sequence number of flow `v`,
    /// as recorded.
    #[inline]
    pub fn proxy_isn(&self, v: &FlowView<F>) -> u32 {
        self.cold[v.slot as usize].isn.load(Ordering::Relaxed)
    }

    /// The pool flow `v`'s port came from.
    #[inline]
    pub fn pool_of(&self, v: &FlowView<F>) -> PoolId {
        PoolId(self.cold[v.slot as usize].pool.load(Ordering::Relaxed))
    }

    /// Records the consumer's initial sequence number of flow `v` (its SYN).
    #[inline]
    pub fn set_proxy_isn(&self, v: &FlowView<F>, isn: u32) {
        self.cold[v.slot as usize].isn.store(isn, Ordering::Relaxed);
    }

    /// Records what the PROXY header segment of flow `v` repeats of the
    /// consumer's segment that completed the handshake: its acknowledgement
    /// (the backend's ISN + 1), its window and its timestamps, if any.
    #[inline]
    pub fn set_proxy_ack(&self, v: &FlowView<F>, peer: u32, window: u16, ts: Option<(u32, u32)>) {
        let c = &self.cold[v.slot as usize];
        c.peer.store(peer, Ordering::Relaxed);
        let (val, ecr) = ts.unwrap_or((0, 0));
        c.ts_val.store(val, Ordering::Relaxed);
        c.ts_ecr.store(ecr, Ordering::Relaxed);
        c.window.store(u32::from(window) | u32::from(ts.is_some()) << 16, Ordering::Relaxed);
    }

    /// What [`set_proxy_ack`](Self::set_proxy_ack) recorded: the
    /// acknowledgement, the window and the timestamps.
    #[inline]
    pub fn proxy_ack(&self, v: &FlowView<F>) -> (u32, u16, Option<(u32, u32)>) {
        let c = &self.cold[v.slot as usize];
        let w = c.window.load(Ordering::Relaxed);
        let ts = (w >> 16 & 1 != 0).then(|| (c.ts_val.load(Ordering::Relaxed), c.ts_ecr.load(Ordering::Relaxed)));
        (c.peer.load(Ordering::Relaxed), w as u16, ts)
    }

    /// Slot `i` as a [`FlowRecord`], if it holds a live flow.
    pub fn record(&self, i: u32) -> Option<FlowRecord<F>> {
        let s = self.slots.get(i as usize)?;
        let m1 = s.meta.load(Ordering::Acquire);
        if m1 & state::LIVE == 0 {
            return None;
        }
        let c = &self.cold[i as usize];
        let (pool, created) = (c.pool.load(Ordering::Relaxed), c.created.load(Ordering::Relaxed));
        let carries = c.carries.load(Ordering::Relaxed);
        let view = self.read(i, m1)?;
        Some(FlowRecord {
            view,
            pool: PoolId(pool),
            created: Now(created),
            last_seen: Now(s.last_seen.load(Ordering::Relaxed)),
            bytes_in: u64::from(carries & 0xffff) << 32 | u64::from(s.bytes_in.load(Ordering::Relaxed)),
            bytes_out: u64::from(carries >> 16) << 32 | u64::from(s.bytes_out.load(Ordering::Relaxed)),
        })
    }

    /// Calls `f` with every live flow.
    pub fn for_each_live(&self, mut f: impl FnMut(&FlowRecord<F>)) {
        let hw = self.high_water[0].load(Ordering::Relaxed);
        for i in 0..hw {
            if let Some(r) = self.record(i) {
                f(&r);
            }
        }
    }
}

#[cfg(loom)]
fn huge_array<T: Default>(n: usize) -> Box<[T]> {
    (0..n).map(|_| T::default()).collect()
}

/// A zeroed array of `n` atomics-only values (all-zero is their default),
/// backed by transparent huge pages when it is large.
#[cfg(not(loom))]
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

#[cfg(all(test, loom))]
mod loom_model;

#[cfg(all(test, not(loom)))]
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
        t.insert(c, EndpointId(1), Now(0), |claim| claim(p).then_some((PoolId(2), 0)))
    }

    fn slot_of(r: Result<Inserted, InsertError>) -> FlowView {
        match r {
            Ok(Inserted::New(v)) => v,
            other => panic!("expected a new flow, got {other:?}"),
        }
    }

    #[test]
    fn insert_find_remove_both_directions() {
        let t = FlowTable::new(100);
        let v = slot_of(add(&t, ck(1000), pk(2000)));
        assert_eq!(t.find_consumer(ck(1000)), Some(v));
        assert_eq!(t.find_provider(pk(2000)), Some(v));
        assert_eq!(v.endpoint, EndpointId(1));
        assert_eq!((v.ckey, v.pkey), (ck(1000), pk(2000)));
        assert_eq!(v.protocol(), Protocol::Tcp);
        assert_eq!(t.record(v.slot).map(|r| r.pool), Some(PoolId(2)));
        assert_eq!(add(&t, ck(1000), pk(2001)), Ok(Inserted::Existing(v)));
        assert_eq!(t.len(), 1);
        assert!(t.remove(&v).is_some());
        assert!(t.remove(&v).is_none(), "second remove is a no-op");
        assert_eq!(t.find_consumer(ck(1000)), None);
        assert_eq!(t.find_provider(pk(2000)), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_stale_view_cannot_touch_the_flow_that_reuses_its_slot() {
        let t = FlowTable::with_reuse_delay(1, 0);
        let old = slot_of(add(&t, ck(1), pk(1)));
        assert!(t.remove(&old).is_some());
        let new = slot_of(add(&t, ck(2), pk(2)));
        assert_eq!(old.slot, new.slot, "the only slot is reused at once");
        assert!(t.add_state(&old, state::RST).is_none(), "a stale view sets no state");
        assert!(t.reopen(&old).is_none());
        assert!(t.remove(&old).is_none(), "a stale view removes nothing");
        assert_eq!(t.find_consumer(ck(2)).map(|v| v.state), Some(state::LIVE));
        assert!(t.add_state(&new, state::C_FIN).is_some());
        assert_eq!(t.find_consumer(ck(2)).map(|v| v.state), Some(state::LIVE | state::C_FIN));
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
        let v = t.find_consumer(ck(1)).expect("live");
        t.remove(&v);
        assert!(matches!(add(&t, ck(3), pk(3)), Ok(Inserted::New(_))));
        assert_eq!(add(&t, ck(4), pk(4)), Err(InsertError::Full));
    }

    #[test]
    fn a_full_table_reuses_a_slot_only_after_reuse_delay_later_frees() {
        // As the module docs say: full or not, a freed slot waits behind
        // REUSE_DELAY later frees.
        let t = FlowTable::with_reuse_delay(4, 3);
        let mut live: Vec<FlowView> = (0..4).map(|p| slot_of(add(&t, ck(p), pk(p)))).collect();
        let mut freed_at: std::collections::HashMap<u32, usize> = Default::default();
        let mut frees = 0usize;
        for p in 4..200u16 {
            let v = live.remove(0);
            t.remove(&v);
            freed_at.insert(v.slot, frees);
            frees += 1;
            let n = slot_of(add(&t, ck(p), pk(p)));
            if let Some(&at) = freed_at.get(&n.slot) {
                assert!(frees - at > 3, "slot {} reused after {} later frees", n.slot, frees - at - 1);
            }
            live.push(n);
        }
    }

    #[test]
    fn many_flows_with_collisions_stay_findable() {
        let t = FlowTable::new(20_000);
        let mut views = Vec::new();
        for p in 0..20_000u16 {
            views.push(slot_of(add(&t, ck(p), pk(p))));
        }
        for p in (0..20_000u16).step_by(2) {
            assert!(t.remove(&views[usize::from(p)]).is_some());
        }
        for p in 0..20_000u16 {
            let want = (p % 2 == 1).then_some(views[usize::from(p)]);
            assert_eq!(t.find_consumer(ck(p)), want);
            assert_eq!(t.find_provider(pk(p)), want);
        }
        let mut n = 0;
        t.for_each_live(|_| n += 1);
        assert_eq!(n, 10_000);
    }

    #[test]
    fn slot_size_within_budget() {
        assert_eq!(std::mem::size_of::<FlowSlot>(), 64);
        assert_eq!(std::mem::align_of::<FlowSlot>(), 64);
        assert_eq!(std::mem::size_of::<Cold>(), 40);
        let t = <FlowTable>::new(1 << 16);
        assert!(t.bytes_per_flow() <= 128, "{}", t.bytes_per_flow());
        // IPv6 keys are wider: their own table, two lines a slot; the IPv4
        // slot does not grow.
        assert_eq!(std::mem::size_of::<FlowSlot<V6>>(), 128);
    }

    #[test]
    fn an_ipv6_table_finds_its_flows_from_both_sides() {
        let t = FlowTable::<V6>::new(100);
        let (a, b, nat, be) =
            (0xfd00_u128 << 112 | 0x10, 0xfd00_u128 << 112 | 0x5, 0x2001_0db8_u128 << 96, 0xfd01_u128 << 112);
        let ck = |port| ConsumerKey::<V6>::of(1, 6, a, port, b, 443);
        let pk = |port| ProviderKey::<V6>::of(6, nat, port, be, 8443);
        for i in 0..50u16 {
            let r = t.insert(ck(1000 + i), EndpointId(0xab_cdef), Now(1), |claim| {
                assert!(claim(pk(2000 + i)));
                Some((PoolId(1), state::C_SYN))
            });
            assert!(matches!(r, Ok(Inserted::New(_))));
        }
        // Keys differing in the high words only are different flows.
        let other = ConsumerKey::<V6>::of(1, 6, a | 1 << 100, 1000, b, 443);
        assert!(t.find_consumer(other).is_none());
        for i in 0..50u16 {
            let v = t.find_consumer(ck(1000 + i)).expect("consumer side");
            assert_eq!((v.pkey, v.endpoint), (pk(2000 + i), EndpointId(0xab_cdef)));
            assert_eq!(t.find_provider(pk(2000 + i)).map(|p| p.slot), Some(v.slot));
            assert_eq!(v.protocol(), Protocol::Tcp);
        }
        let v = t.find_consumer(ck(1000)).expect("there");
        assert!(t.remove(&v).is_some());
        assert!(t.find_consumer(ck(1000)).is_none() && t.find_provider(pk(2000)).is_none());
        assert_eq!(t.len(), 49);
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
                        if let Ok(Inserted::New(v)) = add(&t, ck(p), pk(p.wrapping_mul(4) + w)) {
                            news.push(v.slot);
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
