//! Virtual reassembly of IPv4 fragments: enough to translate every fragment
//! of a datagram consistently, without reassembling it.
//!
//! Only the first fragment carries the transport header, so only it can be
//! matched to a flow. When it is translated, its new addresses are
//! remembered under (network, source, destination, protocol, IP id) of the
//! datagram as it arrived; later fragments look that up and get the same
//! addresses (their payload holds no ports or checksum to touch). Later
//! fragments that arrive before the first are held, copied into a fixed
//! arena, and released once the first comes. Everything is bounded: 64
//! datagrams and 64 KiB held per worker, 30 s per datagram (as Linux's
//! `ipfrag_time`); fragments given up on are counted as
//! `reassembly_timeout` drops.
//!
//! Tables are per worker: the kernel's TUN queue choice hashes a fragment by
//! its addresses only, so all fragments of a datagram reach one queue.

use crate::addr::{Family, V4};
use crate::types::{Egress, EndpointId, Now};

/// How long a datagram's fragments are waited for.
pub const REASSEMBLY_SECS: u32 = 30;
const MAX_DATAGRAMS: usize = 64;
const ARENA: usize = 64 * 1024;
const MAX_HELD: usize = 8;
/// Fragments of one IPv6 datagram whose byte ranges are remembered for
/// the overlap check (a 64 KiB datagram at the 1,280-byte minimum MTU is
/// 52 fragments).
const MAX_SPANS: usize = 56;

/// A datagram, as it arrived: network (`u16::MAX` for the provider side),
/// source, destination, protocol, IP identification (16 bits in IPv4's
/// header, 32 in IPv6's Fragment header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragKey<F: Family = V4> {
    pub net: u16,
    pub src: F::Addr,
    pub dst: F::Addr,
    pub proto: u8,
    pub id: u32,
}

/// What the first fragment was translated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping<F: Family = V4> {
    pub src: F::Addr,
    pub dst: F::Addr,
    pub egress: Egress,
    pub mtu: u16,
    pub endpoint: EndpointId,
}

#[derive(Debug)]
struct Entry<F: Family> {
    key: FragKey<F>,
    expires: Now,
    mapping: Option<Mapping<F>>,
    held: [(u32, u32); MAX_HELD],
    n_held: usize,
    /// Byte ranges of the datagram seen so far (IPv6: [`Fragments::span`]).
    spans: [(u16, u16); MAX_SPANS],
    n_spans: u8,
    /// An overlap was seen: every fragment of it is refused (RFC 5722).
    refused: bool,
}

/// A held fragment released for sending: where it goes and its bytes in
/// the arena.
#[derive(Debug, Clone, Copy)]
pub struct Ready<F: Family = V4> {
    /// The network the fragment came from (`u16::MAX`: the provider).
    pub net: u16,
    pub mapping: Mapping<F>,
    start: u32,
    len: u32,
}

/// Per-worker fragment state.
#[derive(Debug)]
pub struct Fragments<F: Family = V4> {
    entries: Vec<Entry<F>>,
    arena: Box<[u8]>,
    used: usize,
    ready: Vec<Ready<F>>,
    /// Fragments given up on since the last [`take_dropped`](Self::take_dropped),
    /// with the network they came from.
    dropped: Vec<(u16, u64)>,
    /// No entry expires before this.
    earliest: Now,
    /// The identification of the last IPv4 packet this worker made out of
    /// an IPv6 one without DF (RFC 7915 §5.1: a fragment identification
    /// generator at the translator).
    ident: u16,
}

impl<F: Family> Default for Fragments<F> {
    fn default() -> Self {
        Fragments {
            entries: Vec::with_capacity(MAX_DATAGRAMS),
            arena: vec![0u8; ARENA].into_boxed_slice(),
            used: 0,
            ready: Vec::with_capacity(MAX_DATAGRAMS * MAX_HELD),
            dropped: Vec::with_capacity(MAX_DATAGRAMS),
            earliest: Now(u32::MAX),
            ident: 0,
        }
    }
}

/// A worker's fragment state for both families: IPv6 datagrams (and the
/// IPv4 fragments of flows translated to IPv6) in `v6`, keyed by
/// IPv6 or IPv4-mapped addresses.
#[derive(Debug, Default)]
pub struct Frags {
    pub v4: Fragments<V4>,
    v6: Fragments<crate::addr::V6>,
    /// Whether `v6` was ever used: until then a packet's tick and drop
    /// report skip it (an IPv4-only worker pays one flag test).
    v6_used: bool,
}

impl Frags {
    /// The IPv6 table, marked as in use.
    #[inline]
    pub fn v6(&mut self) -> &mut Fragments<crate::addr::V6> {
        self.v6_used = true;
        &mut self.v6
    }

    /// The IPv6 table, if it was ever used.
    #[inline]
    pub fn v6_if_used(&mut self) -> Option<&mut Fragments<crate::addr::V6>> {
        self.v6_used.then_some(&mut self.v6)
    }

    /// [`Fragments::tick`] of the IPv4 table, before a packet (the IPv6
    /// table's comes after it, in [`take_dropped`](Self::take_dropped):
    /// one flag test per packet, and its own lookups expire it anyway).
    #[inline]
    pub fn tick(&mut self, now: Now) {
        self.v4.tick(now);
    }

    /// [`Fragments::take_dropped`] of both tables, the IPv6 one ticked
    /// first.
    #[inline]
    pub fn take_dropped(&mut self, now: Now, mut f: impl FnMut(u16, u64)) {
        self.v4.take_dropped(&mut f);
        if self.v6_used {
            self.v6.tick(now);
            self.v6.take_dropped(f);
        }
    }

    /// Whether released fragments of either table wait.
    #[inline]
    pub fn has_ready(&self) -> bool {
        self.v4.has_ready() || (self.v6_used && self.v6.has_ready())
    }
}

impl<F: Family> Fragments<F> {
    /// The next IPv4 identification for a translated packet without DF.
    #[inline]
    pub fn next_ident(&mut self) -> u16 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
    }
}

/// What [`Fragments::later`] decided for a non-first fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later<F: Family = V4> {
    /// The first fragment was seen: rewrite with this mapping.
    Translate(Mapping<F>),
    /// Held until the first fragment comes.
    Held,
    /// No room to hold it: drop (counted by the caller).
    Full,
}

impl<F: Family> Fragments<F> {
    /// Gives up on datagrams past their time; cheap when none is due.
    #[inline]
    pub fn tick(&mut self, now: Now) {
        if now >= self.earliest {
            self.expire(now);
        }
    }

    fn expire(&mut self, now: Now) {
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].expires <= now {
                let e = self.entries.swap_remove(i);
                if e.n_held > 0 {
                    self.dropped.push((e.key.net, e.n_held as u64));
                }
            } else {
                i += 1;
            }
        }
        if self.entries.iter().all(|e| e.n_held == 0) && self.ready.is_empty() {
            self.used = 0;
        }
        self.earliest = self.entries.iter().map(|e| e.expires).min().unwrap_or(Now(u32::MAX));
    }

    fn entry(&mut self, key: FragKey<F>, now: Now) -> Option<&mut Entry<F>> {
        self.expire(now);
        if let Some(i) = self.entries.iter().position(|e| e.key == key) {
            return Some(&mut self.entries[i]);
        }
        if self.entries.len() == MAX_DATAGRAMS {
            return None;
        }
        self.earliest = self.earliest.min(now.plus(REASSEMBLY_SECS));
        self.entries.push(Entry {
            key,
            expires: now.plus(REASSEMBLY_SECS),
            mapping: None,
            held: [(0, 0); MAX_HELD],
            n_held: 0,
            spans: [(0, 0); MAX_SPANS],
            n_spans: 0,
            refused: false,
        });
        self.entries.last_mut()
    }

    /// Records the first fragment's translation and releases the fragments
    /// held for it (see [`take_ready`](Self::take_ready)).
    pub fn first(&mut self, key: FragKey<F>, mapping: Mapping<F>, now: Now) {
        let Some(e) = self.entry(key, now) else {
            return;
        };
        e.mapping = Some(mapping);
        let held = e.n_held;
        let spans = e.held;
        e.n_held = 0;
        for &(start, len) in &spans[..held] {
            self.ready.push(Ready { net: key.net, mapping, start, len });
        }
    }

    /// A fragment other than the first.
    pub fn later(&mut self, key: FragKey<F>, pkt: &[u8], now: Now) -> Later<F> {
        let arena_left = ARENA - self.used;
        let Some(e) = self.entry(key, now) else { return Later::Full };
        if let Some(m) = e.mapping {
            return Later::Translate(m);
        }
        if e.n_held == MAX_HELD || pkt.len() > arena_left {
            return Later::Full;
        }
        let start = ARENA - arena_left;
        e.held[e.n_held] = (start as u32, pkt.len() as u32);
        e.n_held += 1;
        self.arena[start..start + pkt.len()].copy_from_slice(pkt);
        self.used += pkt.len();
        Later::Held
    }

    /// Records that bytes `start..end` of datagram `key` came, and says
    /// whether its fragment may go on: not when it overlaps one seen
    /// before (RFC 5722: the datagram is then refused for good, whatever
    /// comes later; an exact duplicate is let through, as Linux does), nor
    /// past [`MAX_SPANS`] fragments, nor without room for the datagram.
    pub fn span(&mut self, key: FragKey<F>, start: u16, end: u16, now: Now) -> bool {
        let Some(e) = self.entry(key, now) else { return false };
        if e.refused {
            return false;
        }
        let spans = &e.spans[..usize::from(e.n_spans)];
        if spans.contains(&(start, end)) {
            return true;
        }
        if spans.iter().any(|&(s, t)| start < t && s < end) || usize::from(e.n_spans) == MAX_SPANS {
            e.refused = true;
            return false;
        }
        e.spans[usize::from(e.n_spans)] = (start, end);
        e.n_spans += 1;
        true
    }

    /// The translation datagram `key`'s first fragment got, if it came.
    pub fn mapping(&self, key: FragKey<F>) -> Option<Mapping<F>> {
        self.entries.iter().find(|e| e.key == key).and_then(|e| e.mapping)
    }

    /// True when released fragments wait to be sent.
    #[inline]
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Hands each released fragment (its bytes, to be rewritten by the
    /// caller) and empties the list.
    pub fn take_ready(&mut self, mut f: impl FnMut(u16, Mapping<F>, &mut [u8])) {
        for r in self.ready.drain(..) {
            let (s, l) = (r.start as usize, r.len as usize);
            f(r.net, r.mapping, &mut self.arena[s..s + l]);
        }
    }

    /// Fragments given up on, by network (`u16::MAX`: provider side).
    #[inline]
    pub fn take_dropped(&mut self, mut f: impl FnMut(u16, u64)) {
        // Called per packet: an empty list costs one compare, not a drain.
        if self.dropped.is_empty() {
            return;
        }
        for (net, n) in self.dropped.drain(..) {
            f(net, n);
        }
    }
}
