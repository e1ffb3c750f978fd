//! The address-family seam: what an address, a transport endpoint and a
//! flow's two keys are, per IP family.
//!
//! Why a seam: the packet path keeps addresses as integers in host byte
//! order (an IPv4 address is a `u32`, an IPv6 one a `u128`), and the flow
//! table packs a flow's identity into machine words so that a lookup is a
//! few word compares in one cache line. Those choices are right per family
//! and wrong across them: an IPv6 5-tuple does not fit the 128 bits an IPv4
//! one does. So each family is a type ([`V4`], [`V6`]) implementing
//! [`Family`], which says how its addresses are held and how its keys are
//! packed, stored in a slot and hashed; the flow table
//! ([`crate::flow::FlowTable`]) is generic over it. An IPv4 table is
//! exactly what it was before the seam (two 64-bit words per key, a 64-byte
//! slot: the code is monomorphised, nothing is looked up at run time); an
//! IPv6 table has five words per key and 128-byte slots. The engine keeps
//! one table per family rather than one table of the wider key, so IPv4
//! flows never pay for IPv6's width (smoltcp's `wire::ip::Address` and
//! boringtun's per-family results make the same split).
//!
//! The rules that depend on the family and are shared with the
//! configuration crate also live here: which source addresses no router
//! forwards from ([`is_martian_v4`]).
//!
//! Types outside the packet path (configuration, listings, the control
//! API) use `std::net::IpAddr` and `SocketAddr`; [`End`] is the packet
//! path's own, and converts.

use crate::sync::{AtomicU64, Ordering};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Folded multiply: the high and low halves of a 64x64 product, xored.
#[inline(always)]
pub(crate) fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// An IP family as the packet path and the flow table see it.
///
/// Implemented by [`V4`] and [`V6`] only. `Word` is a packed flow key
/// (consumer or provider side), `Cell` the atomics a slot keeps it in; the
/// table reads and writes keys only through [`load`](Family::load) and
/// [`store`](Family::store), so the seqlock protocol of
/// [`crate::flow`] is the same for every family.
pub trait Family: Copy + Clone + Debug + Default + PartialEq + Eq + Hash + Send + Sync + 'static {
    /// An address in host byte order (`u32`, `u128`).
    type Addr: Copy + Clone + Debug + Default + PartialEq + Eq + Hash + Send + Sync;
    /// A packed key.
    type Word: Copy + Clone + Debug + Default + PartialEq + Eq + Hash + Send + Sync;
    /// A slot's atomic storage for one `Word` (all-zero is a valid value).
    type Cell: Debug + Default + Send + Sync;
    /// The IP version number (4, 6): what a shared-memory table's header
    /// records.
    const VERSION: u8;
    /// Bytes of the address on the wire.
    const ADDR_BYTES: usize;

    /// Reads a key from a slot (relaxed loads; the caller's seqlock
    /// validates the read).
    fn load(c: &Self::Cell) -> Self::Word;
    /// Writes a key into a slot that is not live (relaxed stores).
    fn store(c: &Self::Cell, w: Self::Word);
    /// The table's keyed hash of a key. Written here rather than taken from
    /// a hash crate because every process attached to a shared table must
    /// hash alike, whatever crate version it was built with.
    fn key_hash(keys: &[u64; 2], w: Self::Word) -> u64;
    /// `w` with `x` mixed into its low word (a slot's check value folds
    /// the pool and creation time into the provider word so).
    fn mix(w: Self::Word, x: u64) -> Self::Word;
    /// Splits a slot's provider word into the provider key and the
    /// endpoint id the slot keeps beside it (24 bits).
    fn split_provider(w: Self::Word) -> (Self::Word, u32);
    /// The provider word of key `w` and endpoint `ep` (24 bits).
    fn join_provider(w: Self::Word, ep: u32) -> Self::Word;
    /// The IP protocol number a consumer key holds.
    fn consumer_proto(w: Self::Word) -> u8;
    /// Writes `a` in network byte order into `out[..ADDR_BYTES]`.
    fn put_addr(out: &mut [u8], a: Self::Addr);
    /// `a` as a standard library address (listings, logs).
    fn ip(a: Self::Addr) -> std::net::IpAddr;
    /// `a` folded to 64 bits (the NAT address choice hashes it).
    fn fold_addr(a: Self::Addr) -> u64;

    /// Packs a consumer key (layout per family: [`ConsumerKey`]).
    fn ck_new(network: u16, proto: u8, src: Self::Addr, sport: u16, dst: Self::Addr, dport: u16) -> Self::Word;
    /// A consumer key's network id.
    fn ck_network(w: Self::Word) -> u16;
    /// A consumer key's consumer end.
    fn ck_consumer(w: Self::Word) -> End<Self>;
    /// A consumer key's endpoint end.
    fn ck_endpoint(w: Self::Word) -> End<Self>;
    /// Packs a provider key (layout per family: [`ProviderKey`]).
    fn pk_new(proto: u8, nat: Self::Addr, nport: u16, backend: Self::Addr, bport: u16) -> Self::Word;
    /// A provider key's IP protocol number.
    fn pk_proto(w: Self::Word) -> u8;
    /// A provider key's NAT end.
    fn pk_nat(w: Self::Word) -> End<Self>;
    /// A provider key's backend end.
    fn pk_backend(w: Self::Word) -> End<Self>;
}

/// IPv4: 32-bit addresses; a key is 128 bits (two words), so a slot with
/// both keys, its links, times, state, byte counts and TCP sequence words
/// is one 64-byte cache line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct V4;

/// IPv6: 128-bit addresses; a key is 320 bits (five words), a slot two
/// cache lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct V6;

/// Bits of a provider word that hold the key; the endpoint id sits above.
const V4_PKEY_MASK: u128 = (1 << 104) - 1;
const V4_EP_SHIFT: u32 = 104;
/// Endpoint ids a slot keeps: 24 bits.
const EP_MASK: u32 = (1 << 24) - 1;

impl Family for V4 {
    type Addr = u32;
    type Word = u128;
    type Cell = [AtomicU64; 2];
    const VERSION: u8 = 4;
    const ADDR_BYTES: usize = 4;

    #[inline(always)]
    fn load(c: &Self::Cell) -> u128 {
        (u128::from(c[0].load(Ordering::Relaxed)) << 64) | u128::from(c[1].load(Ordering::Relaxed))
    }
    #[inline(always)]
    fn store(c: &Self::Cell, w: u128) {
        c[0].store((w >> 64) as u64, Ordering::Relaxed);
        c[1].store(w as u64, Ordering::Relaxed);
    }
    #[inline(always)]
    fn key_hash(keys: &[u64; 2], k: u128) -> u64 {
        fold(fold((k as u64) ^ keys[0], ((k >> 64) as u64) ^ keys[1]), MIX)
    }
    #[inline(always)]
    fn mix(w: u128, x: u64) -> u128 {
        w ^ u128::from(x)
    }
    #[inline(always)]
    fn split_provider(w: u128) -> (u128, u32) {
        (w & V4_PKEY_MASK, (w >> V4_EP_SHIFT) as u32)
    }
    #[inline(always)]
    fn join_provider(w: u128, ep: u32) -> u128 {
        (w & V4_PKEY_MASK) | (u128::from(ep & EP_MASK) << V4_EP_SHIFT)
    }
    #[inline(always)]
    fn consumer_proto(w: u128) -> u8 {
        (w >> 96) as u8
    }
    #[inline(always)]
    fn put_addr(out: &mut [u8], a: u32) {
        out[..4].copy_from_slice(&a.to_be_bytes());
    }
    fn ip(a: u32) -> std::net::IpAddr {
        Ipv4Addr::from(a).into()
    }
    #[inline(always)]
    fn fold_addr(a: u32) -> u64 {
        u64::from(a)
    }
    /// Bits, high to low: network 16, protocol 8, consumer address 32 and
    /// port 16, endpoint address 32 and port 16 (120 of 128).
    #[inline(always)]
    fn ck_new(network: u16, proto: u8, src: u32, sport: u16, dst: u32, dport: u16) -> u128 {
        (u128::from(network) << 104)
            | (u128::from(proto) << 96)
            | (u128::from(src) << 64)
            | (u128::from(sport) << 48)
            | (u128::from(dst) << 16)
            | u128::from(dport)
    }
    #[inline(always)]
    fn ck_network(w: u128) -> u16 {
        (w >> 104) as u16
    }
    #[inline(always)]
    fn ck_consumer(w: u128) -> End<V4> {
        End::new((w >> 64) as u32, (w >> 48) as u16)
    }
    #[inline(always)]
    fn ck_endpoint(w: u128) -> End<V4> {
        End::new((w >> 16) as u32, w as u16)
    }
    /// Bits, high to low: protocol 8, NAT address 32 and port 16, backend
    /// address 32 and port 16 (the low 104 of 128).
    #[inline(always)]
    fn pk_new(proto: u8, nat: u32, nport: u16, backend: u32, bport: u16) -> u128 {
        (u128::from(proto) << 96)
            | (u128::from(nat) << 64)
            | (u128::from(nport) << 48)
            | (u128::from(backend) << 16)
            | u128::from(bport)
    }
    #[inline(always)]
    fn pk_proto(w: u128) -> u8 {
        (w >> 96) as u8
    }
    #[inline(always)]
    fn pk_nat(w: u128) -> End<V4> {
        End::new((w >> 64) as u32, (w >> 48) as u16)
    }
    #[inline(always)]
    fn pk_backend(w: u128) -> End<V4> {
        End::new((w >> 16) as u32, w as u16)
    }
}

impl Family for V6 {
    type Addr = u128;
    /// Words 0-1: the first address (consumer, or NAT); 2-3: the second
    /// (endpoint, or backend); 4: network (16 bits) or endpoint id (24),
    /// protocol, ports (see [`Family::ck_new`], [`Family::pk_new`]).
    type Word = [u64; 5];
    type Cell = [AtomicU64; 5];
    const VERSION: u8 = 6;
    const ADDR_BYTES: usize = 16;

    #[inline(always)]
    fn load(c: &Self::Cell) -> [u64; 5] {
        std::array::from_fn(|i| c[i].load(Ordering::Relaxed))
    }
    #[inline(always)]
    fn store(c: &Self::Cell, w: [u64; 5]) {
        for (c, w) in c.iter().zip(w) {
            c.store(w, Ordering::Relaxed);
        }
    }
    #[inline(always)]
    fn key_hash(keys: &[u64; 2], w: [u64; 5]) -> u64 {
        let h = fold(w[0] ^ keys[0], w[1] ^ keys[1]);
        let h = fold(h ^ w[2], w[3] ^ keys[0]);
        fold(fold(h ^ w[4], keys[1] ^ MIX), MIX)
    }
    #[inline(always)]
    fn mix(mut w: [u64; 5], x: u64) -> [u64; 5] {
        w[4] ^= x;
        w
    }
    #[inline(always)]
    fn split_provider(mut w: [u64; 5]) -> ([u64; 5], u32) {
        let ep = (w[4] >> 40) as u32;
        w[4] &= (1 << 40) - 1;
        (w, ep)
    }
    #[inline(always)]
    fn join_provider(mut w: [u64; 5], ep: u32) -> [u64; 5] {
        w[4] = (w[4] & ((1 << 40) - 1)) | (u64::from(ep & EP_MASK) << 40);
        w
    }
    #[inline(always)]
    fn consumer_proto(w: [u64; 5]) -> u8 {
        (w[4] >> 32) as u8
    }
    #[inline(always)]
    fn put_addr(out: &mut [u8], a: u128) {
        out[..16].copy_from_slice(&a.to_be_bytes());
    }
    fn ip(a: u128) -> std::net::IpAddr {
        Ipv6Addr::from(a).into()
    }
    #[inline(always)]
    fn fold_addr(a: u128) -> u64 {
        (a as u64) ^ ((a >> 64) as u64).rotate_left(32)
    }
    /// Words: consumer address (2), endpoint address (2), then network 16
    /// bits, a zero byte, protocol 8, consumer port 16, endpoint port 16.
    #[inline(always)]
    fn ck_new(network: u16, proto: u8, src: u128, sport: u16, dst: u128, dport: u16) -> [u64; 5] {
        [
            (src >> 64) as u64,
            src as u64,
            (dst >> 64) as u64,
            dst as u64,
            (u64::from(network) << 48) | (u64::from(proto) << 32) | (u64::from(sport) << 16) | u64::from(dport),
        ]
    }
    #[inline(always)]
    fn ck_network(w: [u64; 5]) -> u16 {
        (w[4] >> 48) as u16
    }
    #[inline(always)]
    fn ck_consumer(w: [u64; 5]) -> End<V6> {
        End::new((u128::from(w[0]) << 64) | u128::from(w[1]), (w[4] >> 16) as u16)
    }
    #[inline(always)]
    fn ck_endpoint(w: [u64; 5]) -> End<V6> {
        End::new((u128::from(w[2]) << 64) | u128::from(w[3]), w[4] as u16)
    }
    /// Words: NAT address (2), backend address (2), then 24 bits the slot
    /// keeps the endpoint id in, protocol 8, NAT port 16, backend port 16.
    #[inline(always)]
    fn pk_new(proto: u8, nat: u128, nport: u16, backend: u128, bport: u16) -> [u64; 5] {
        [
            (nat >> 64) as u64,
            nat as u64,
            (backend >> 64) as u64,
            backend as u64,
            (u64::from(proto) << 32) | (u64::from(nport) << 16) | u64::from(bport),
        ]
    }
    #[inline(always)]
    fn pk_proto(w: [u64; 5]) -> u8 {
        (w[4] >> 32) as u8
    }
    #[inline(always)]
    fn pk_nat(w: [u64; 5]) -> End<V6> {
        End::new((u128::from(w[0]) << 64) | u128::from(w[1]), (w[4] >> 16) as u16)
    }
    #[inline(always)]
    fn pk_backend(w: [u64; 5]) -> End<V6> {
        End::new((u128::from(w[2]) << 64) | u128::from(w[3]), w[4] as u16)
    }
}

/// A transport endpoint on the packet path: an address and a port (for
/// ICMP echo, the identifier in the consumer's or NAT's role, 0 in the
/// other).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct End<F: Family = V4> {
    pub addr: F::Addr,
    pub port: u16,
}

impl<F: Family> End<F> {
    #[inline(always)]
    pub fn new(addr: F::Addr, port: u16) -> Self {
        End { addr, port }
    }
}

impl From<End<V4>> for std::net::SocketAddr {
    fn from(e: End<V4>) -> Self {
        (Ipv4Addr::from(e.addr), e.port).into()
    }
}

impl From<End<V6>> for std::net::SocketAddr {
    fn from(e: End<V6>) -> Self {
        (Ipv6Addr::from(e.addr), e.port).into()
    }
}

/// The consumer-side identity of a flow: network, protocol, consumer
/// address and port, endpoint address and port (for ICMP echo: the
/// identifier, 0). Packed per family ([`Family::Word`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerKey<F: Family = V4>(pub F::Word);

impl<F: Family> ConsumerKey<F> {
    /// The IP protocol number.
    #[inline(always)]
    pub fn proto(self) -> u8 {
        F::consumer_proto(self.0)
    }
}

impl ConsumerKey<V4> {
    /// An IPv4 key ([`ConsumerKey::of`]).
    #[inline(always)]
    pub fn new(network: u16, proto: u8, src: u32, sport: u16, dst: u32, dport: u16) -> Self {
        Self::of(network, proto, src, sport, dst, dport)
    }
}

impl<F: Family> ConsumerKey<F> {
    /// Packs network, protocol, consumer and endpoint ends ([`Family::ck_new`]).
    #[inline(always)]
    pub fn of(network: u16, proto: u8, src: F::Addr, sport: u16, dst: F::Addr, dport: u16) -> Self {
        ConsumerKey(F::ck_new(network, proto, src, sport, dst, dport))
    }
    #[inline(always)]
    pub fn network(self) -> u16 {
        F::ck_network(self.0)
    }
    #[inline(always)]
    pub fn consumer_addr(self) -> F::Addr {
        F::ck_consumer(self.0).addr
    }
    #[inline(always)]
    pub fn consumer_port(self) -> u16 {
        F::ck_consumer(self.0).port
    }
    #[inline(always)]
    pub fn endpoint_addr(self) -> F::Addr {
        F::ck_endpoint(self.0).addr
    }
    #[inline(always)]
    pub fn endpoint_port(self) -> u16 {
        F::ck_endpoint(self.0).port
    }
    /// The consumer's end.
    #[inline(always)]
    pub fn consumer(self) -> End<F> {
        F::ck_consumer(self.0)
    }
    /// The endpoint's end.
    #[inline(always)]
    pub fn endpoint(self) -> End<F> {
        F::ck_endpoint(self.0)
    }
}

/// The provider-side identity of a flow: protocol, NAT address and port,
/// backend address and port (for ICMP echo: the NAT identifier, 0). The
/// slot keeps the flow's endpoint id beside it ([`Family::join_provider`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProviderKey<F: Family = V4>(pub F::Word);

impl ProviderKey<V4> {
    /// An IPv4 key ([`ProviderKey::of`]).
    #[inline(always)]
    pub fn new(proto: u8, nat: u32, nport: u16, backend: u32, bport: u16) -> Self {
        Self::of(proto, nat, nport, backend, bport)
    }
}

impl<F: Family> ProviderKey<F> {
    /// Packs protocol, NAT and backend ends ([`Family::pk_new`]).
    #[inline(always)]
    pub fn of(proto: u8, nat: F::Addr, nport: u16, backend: F::Addr, bport: u16) -> Self {
        ProviderKey(F::pk_new(proto, nat, nport, backend, bport))
    }
    #[inline(always)]
    pub fn proto(self) -> u8 {
        F::pk_proto(self.0)
    }
    #[inline(always)]
    pub fn nat_addr(self) -> F::Addr {
        F::pk_nat(self.0).addr
    }
    #[inline(always)]
    pub fn nat_port(self) -> u16 {
        F::pk_nat(self.0).port
    }
    #[inline(always)]
    pub fn backend_addr(self) -> F::Addr {
        F::pk_backend(self.0).addr
    }
    #[inline(always)]
    pub fn backend_port(self) -> u16 {
        F::pk_backend(self.0).port
    }
    /// The NAT end.
    #[inline(always)]
    pub fn nat(self) -> End<F> {
        F::pk_nat(self.0)
    }
    /// The backend's end.
    #[inline(always)]
    pub fn backend(self) -> End<F> {
        F::pk_backend(self.0)
    }
}

/// Whether an IPv4 address is a source no router forwards from (RFC 1812
/// §5.3.7): "this network" (0/8), loopback (127/8), multicast (224/4),
/// reserved (240/4) and broadcast. The packet path drops such sources as
/// `martian_source`; the configuration refuses them where an address must
/// be unicast (one definition for both).
#[inline]
pub fn is_martian_v4(addr: u32) -> bool {
    let first = addr >> 24;
    first == 0 || first == 127 || first >= 224
}

/// Whether an IPv6 address is a source no router forwards from: the
/// unspecified address and loopback (RFC 4291 §2.5.2, §2.5.3), multicast
/// (§2.7: never a source), link-local (§2.5.6: routers must not forward
/// it) and IPv4-mapped addresses (§2.5.5.2: never on the wire, RFC 5156
/// §2.2). The IPv6 counterpart of [`is_martian_v4`].
#[inline]
pub fn is_martian_v6(addr: u128) -> bool {
    martian_v6(addr).is_some()
}

/// What [`is_martian_v6`] calls `addr`, for a message: "the unspecified
/// address", "a multicast address", ...; `None` for a forwardable source.
/// The one definition the packet path and the configuration share.
#[inline]
pub fn martian_v6(addr: u128) -> Option<&'static str> {
    if addr == 0 {
        Some("the unspecified address")
    } else if addr == 1 {
        Some("the loopback address")
    } else if addr >> 120 == 0xff {
        Some("a multicast address")
    } else if addr >> 118 == 0xfe80 >> 6 {
        Some("a link-local address (never forwarded)")
    } else if addr >> 32 == 0xffff {
        Some("an IPv4-mapped address (never on the wire)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_keys_round_trip() {
        let k = ConsumerKey::new(7, 17, 0x0102_0304, 5353, 0x0a0b_0c0d, 53);
        assert_eq!((k.network(), k.proto()), (7, 17));
        assert_eq!(k.consumer(), End::new(0x0102_0304, 5353));
        assert_eq!(k.endpoint(), End::new(0x0a0b_0c0d, 53));
        let p = ProviderKey::new(6, 0xc0a8_6404, 40000, 0xc0a8_320a, 5432);
        assert_eq!(p.proto(), 6);
        assert_eq!(p.nat(), End::new(0xc0a8_6404, 40000));
        assert_eq!(p.backend(), End::new(0xc0a8_320a, 5432));
        let w = V4::join_provider(p.0, 0x00ab_cdef);
        assert_eq!(V4::split_provider(w), (p.0, 0x00ab_cdef));
    }

    #[test]
    fn v6_keys_round_trip_and_differ_in_every_field() {
        let a = u128::from(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10));
        let b = u128::from(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x5));
        let k = ConsumerKey::<V6>::of(3, 6, a, 40000, b, 443);
        assert_eq!((k.network(), k.proto()), (3, 6));
        assert_eq!((k.consumer(), k.endpoint()), (End::new(a, 40000), End::new(b, 443)));
        let others = [
            ConsumerKey::<V6>::of(4, 6, a, 40000, b, 443),
            ConsumerKey::<V6>::of(3, 17, a, 40000, b, 443),
            ConsumerKey::<V6>::of(3, 6, a ^ 1, 40000, b, 443),
            ConsumerKey::<V6>::of(3, 6, a, 40001, b, 443),
            ConsumerKey::<V6>::of(3, 6, a, 40000, b ^ (1 << 127), 443),
            ConsumerKey::<V6>::of(3, 6, a, 40000, b, 444),
        ];
        for o in others {
            assert_ne!(o, k);
        }
        let p = ProviderKey::<V6>::of(17, b, 5000, a, 53);
        assert_eq!((p.proto(), p.nat(), p.backend()), (17, End::new(b, 5000), End::new(a, 53)));
        let w = V6::join_provider(p.0, EP_MASK);
        assert_eq!(V6::split_provider(w), (p.0, EP_MASK));
        // A packed key survives its slot's cells.
        let c = <V6 as Family>::Cell::default();
        V6::store(&c, k.0);
        assert_eq!(V6::load(&c), k.0);
    }

    #[test]
    fn martian_v6_sources() {
        for a in ["::", "::1", "ff02::1", "ff0e::1", "fe80::1", "febf::1", "::ffff:10.1.0.5"] {
            assert!(is_martian_v6(u128::from(a.parse::<Ipv6Addr>().expect("addr"))), "{a}");
        }
        for a in ["fd00::1", "2001:db8::1", "fec0::1", "::2", "64:ff9b::a01:5", "2a00::1"] {
            assert!(!is_martian_v6(u128::from(a.parse::<Ipv6Addr>().expect("addr"))), "{a}");
        }
    }

    #[test]
    fn martian_sources() {
        for a in [[0, 1, 2, 3], [127, 0, 0, 1], [224, 0, 0, 1], [240, 0, 0, 1], [255, 255, 255, 255]] {
            assert!(is_martian_v4(u32::from(Ipv4Addr::from(a))), "{a:?}");
        }
        for a in [[10, 1, 0, 5], [192, 168, 1, 1], [1, 1, 1, 1], [223, 255, 255, 254]] {
            assert!(!is_martian_v4(u32::from(Ipv4Addr::from(a))), "{a:?}");
        }
    }
}
