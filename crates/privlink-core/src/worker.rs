//! The per-packet path: [`Worker::process`] takes a packet in a `&mut [u8]`,
//! where it came from and the time, rewrites it in place and says where it
//! goes (a [`Verdict`]).
//!
//! A worker belongs to one packet thread. It reads the configuration through
//! its own `arc_swap::Cache` (no shared write per packet), counts into its own
//! per-worker counter slots (plain load/store, summed on read), and touches
//! shared memory only in the flow it translates. Flow setup and teardown take
//! the flow table's striped locks and the port pool's mutex; an established
//! flow's packets take none.

use crate::engine::{bump, EndpointView, Engine, Snapshot};
use crate::flow::{state, ConsumerKey, FlowView, InsertError, Inserted, ProviderKey, TcpPhase};
use crate::frag::{FragKey, Fragments, Later, Mapping};
use crate::types::{DropReason, Egress, NetworkId, Now, Offload, Protocol, Source, Verdict};
use crate::wire::{self, icmp_type, tcp_flags, Ipv4Packet, Transport};
use arc_swap::{ArcSwap, Cache};
use std::sync::Arc;

/// Largest ICMP error privlink builds: IP header, ICMP header, and the
/// original IP header (up to 60 bytes) plus 8 bytes.
pub const REPLY_MAX: usize = 96;

/// Per-worker token bucket for generated ICMP (refilled each second).
#[derive(Debug)]
struct IcmpLimiter {
    second: u32,
    left: u32,
    rate: u32,
}

impl IcmpLimiter {
    fn take(&mut self, now: Now) -> bool {
        if now.0 != self.second {
            self.second = now.0;
            self.left = self.rate;
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// A packet-processing handle; one per packet thread.
#[derive(Debug)]
pub struct Worker {
    engine: Arc<Engine>,
    index: usize,
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    reply: [u8; REPLY_MAX],
    icmp: IcmpLimiter,
    frags: Fragments,
}

/// Borrowed pieces of a worker for one packet.
struct Ctx<'a> {
    engine: &'a Engine,
    w: usize,
    snap: &'a Snapshot,
    reply: &'a mut [u8; REPLY_MAX],
    icmp: &'a mut IcmpLimiter,
    frags: &'a mut Fragments,
    now: Now,
    off: Offload,
}

/// Packet fields the consumer path needs after validation.
struct Parsed {
    proto: Protocol,
    sport: u16,
    dport: u16,
    backend_port: u16,
    flags: u8,
    /// Transport header length (for GSO segment sizes).
    l4_header: usize,
}

impl Worker {
    pub(crate) fn new(engine: Arc<Engine>, index: usize) -> Worker {
        let cache = Cache::new(engine.snap.clone());
        let rate = engine.settings.icmp_rate;
        Worker {
            engine,
            index,
            cache,
            reply: [0; REPLY_MAX],
            icmp: IcmpLimiter { second: u32::MAX, left: 0, rate },
            frags: Fragments::default(),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The ICMP answer of the last [`Verdict::Reply`].
    pub fn reply(&self, len: usize) -> &[u8] {
        &self.reply[..len]
    }

    /// Translates `buf` in place and says what to do with it.
    #[inline]
    pub fn process(&mut self, buf: &mut [u8], src: Source, now: Now) -> Verdict {
        self.process_offload(buf, src, now, Offload::default())
    }

    /// As [`process`](Self::process) for a packet read from a device with
    /// offloads: `off` says whether its L4 checksum is partial and whether it
    /// is a GSO super-packet, which is translated once for all its segments.
    #[inline]
    pub fn process_offload(&mut self, buf: &mut [u8], src: Source, now: Now, off: Offload) -> Verdict {
        let Worker { engine, index, cache, reply, icmp, frags } = self;
        let snap: &Snapshot = cache.load();
        let mut cx = Ctx { engine, w: *index, snap, reply, icmp, frags, now, off };
        cx.frags.tick(now);
        let v = cx.dispatch(buf, src);
        let mut gave_up: [(u16, u64); 4] = [(0, 0); 4];
        let mut n = 0;
        cx.frags.take_dropped(|net, count| {
            if n < gave_up.len() {
                gave_up[n] = (net, count);
                n += 1;
            }
        });
        for &(net, count) in &gave_up[..n] {
            let net = (net != u16::MAX).then_some(NetworkId(net));
            for _ in 0..count {
                cx.count_drop(net, DropReason::ReassemblyTimeout);
            }
        }
        v
    }

    /// True when held fragments were released and wait for
    /// [`take_ready`](Self::take_ready).
    #[inline]
    pub fn has_ready(&self) -> bool {
        self.frags.has_ready()
    }

    /// Translates each released fragment (held because it came before its
    /// datagram's first fragment) and hands it to `f` with its egress and
    /// that egress's MTU.
    pub fn take_ready(&mut self, mut f: impl FnMut(Egress, u16, &[u8])) {
        let Worker { cache, frags, index, .. } = self;
        let snap: &Snapshot = cache.load();
        frags.take_ready(|m, bytes| {
            let mut p = Ipv4Packet::new_unchecked(&mut *bytes);
            if p.ttl() <= 1 {
                return;
            }
            p.forward_rewrite(m.src, m.dst);
            if let Some(ep) = snap.endpoint_by_id(m.endpoint) {
                ep.shared.counters.get(*index).add(m.egress == Egress::Provider, bytes.len(), 1);
            }
            f(m.egress, m.mtu, bytes);
        });
    }
}

impl Ctx<'_> {
    fn dispatch(&mut self, buf: &mut [u8], src: Source) -> Verdict {
        let cx = self;
        match src {
            Source::Network(n) => {
                let v = cx.consumer_to_provider(buf, n);
                if let Verdict::Drop(r) | Verdict::Reply { reason: r, .. } = v {
                    cx.count_drop(Some(n), r);
                }
                v
            }
            Source::Provider => {
                let v = cx.provider_to_consumer(buf);
                if let Verdict::Drop(r) | Verdict::Reply { reason: r, .. } = v {
                    cx.count_drop(None, r);
                }
                v
            }
        }
    }

    /// A fragment other than the first: translated like its datagram's first
    /// fragment, or held until that one comes.
    fn later_fragment(&mut self, buf: &mut [u8], net: Option<NetworkId>) -> Verdict {
        let pkt = Ipv4Packet::new_unchecked(&*buf);
        let key = FragKey {
            net: net.map_or(u16::MAX, |n| n.0),
            src: pkt.src_addr(),
            dst: pkt.dst_addr(),
            proto: pkt.protocol(),
            id: pkt.ident(),
        };
        if pkt.ttl() <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        let (len, df) = (pkt.total_len(), pkt.dont_frag());
        match self.frags.later(key, buf, self.now) {
            Later::Held => Verdict::Held,
            Later::Full => Verdict::Drop(DropReason::ReassemblyTimeout),
            Later::Translate(m) => {
                let Some(ep) = self.snap.endpoint_by_id(m.endpoint) else {
                    return Verdict::Drop(DropReason::NoFlow);
                };
                if !ep.shared.approved() {
                    return Verdict::Drop(DropReason::NotApproved);
                }
                if len > usize::from(m.mtu) && df {
                    return Verdict::Drop(DropReason::TooBig);
                }
                Ipv4Packet::new_unchecked(&mut *buf).forward_rewrite(m.src, m.dst);
                ep.shared.counters.get(self.w).add(m.egress == Egress::Provider, len, 1);
                if len > usize::from(m.mtu) {
                    Verdict::Fragment { to: m.egress, mtu: m.mtu }
                } else {
                    Verdict::Forward(m.egress)
                }
            }
        }
    }
}

impl Ctx<'_> {
    fn count_drop(&self, net: Option<NetworkId>, r: DropReason) {
        let counters = match net.and_then(|n| self.snap.network(n)) {
            Some((n, _)) => n.drops.get(self.w),
            // Provider side, or a network detached while its packet was in
            // flight: counted on the provider side rather than lost.
            None => self.engine.provider_drops.get(self.w),
        };
        bump(&counters.0[r.index()], 1);
    }

    /// An ICMP error about `orig` from `src`, if one may be sent (RFC 1812
    /// 4.3.2.7: never about an ICMP error, a later fragment or to a
    /// non-unicast address; rate-limited per worker).
    fn answer(&mut self, orig: &[u8], src: u32, kind: u8, code: u8, rest: u32, reason: DropReason) -> Verdict {
        let p = Ipv4Packet::new_unchecked(orig);
        let about_error = p.protocol() == wire::proto::ICMP
            && (p.is_later_fragment() || p.payload().first().is_none_or(|&t| wire::is_icmp_error(t)));
        if about_error || p.is_later_fragment() || !wire::is_unicast(p.src_addr()) || !self.icmp.take(self.now) {
            return Verdict::Drop(reason);
        }
        let len = wire::build_icmp_error(&mut self.reply[..], orig, src, p.src_addr(), kind, code, rest);
        Verdict::Reply { reason, len }
    }

    /// The largest IP packet this one puts on the wire, and how many: a GSO
    /// super-packet leaves as segments of `headers + gso_size` bytes.
    #[inline]
    fn on_wire(&self, len: usize, headers: usize) -> (usize, u64) {
        let gso = usize::from(self.off.gso_size);
        if gso == 0 || len <= headers + gso {
            return (len, 1);
        }
        (headers + gso, (len - headers).div_ceil(gso) as u64)
    }

    /// A packet too big for the egress that may not be fragmented: DF set
    /// (answered with "fragmentation needed" and the MTU, RFC 1191), or a
    /// GSO super-packet whose segments would not fit.
    fn too_big(&mut self, buf: &[u8], mtu: u16, from: u32) -> Verdict {
        let p = Ipv4Packet::new_unchecked(buf);
        if p.dont_frag() {
            self.answer(buf, from, icmp_type::DEST_UNREACHABLE, 4, u32::from(mtu), DropReason::TooBig)
        } else {
            Verdict::Drop(DropReason::TooBig)
        }
    }

    fn consumer_to_provider(&mut self, buf: &mut [u8], net: NetworkId) -> Verdict {
        let snap = self.snap;
        let pkt = match Ipv4Packet::new_checked(&*buf) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(invalid(buf, e)),
        };
        let (src, dst, len) = (pkt.src_addr(), pkt.dst_addr(), pkt.total_len());
        let Some(ep) = snap.endpoint_at(net.0, dst) else { return Verdict::Drop(DropReason::NoEndpoint) };
        if pkt.is_later_fragment() {
            return self.later_fragment(buf, Some(net));
        }
        let first_fragment = pkt.is_fragment();
        let Ok(tr) = Transport::parse_in(pkt.protocol(), pkt.payload(), !first_fragment) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if pkt.ttl() <= 1 {
            return self.answer(buf, dst, icmp_type::TIME_EXCEEDED, 0, 0, DropReason::TtlExpired);
        }
        let svc = &snap.services[ep.service];
        let parsed = match tr {
            Transport::Tcp { src: sport, dst: dport, flags, header_len } => match svc.rule(Protocol::Tcp, dport) {
                Some(r) => Parsed {
                    proto: Protocol::Tcp,
                    sport,
                    dport,
                    backend_port: r.backend_port,
                    flags,
                    l4_header: usize::from(header_len),
                },
                None => return Verdict::Drop(DropReason::PortNotAllowed),
            },
            Transport::Udp { src: sport, dst: dport } => match svc.rule(Protocol::Udp, dport) {
                Some(r) => Parsed {
                    proto: Protocol::Udp,
                    sport,
                    dport,
                    backend_port: r.backend_port,
                    flags: 0,
                    l4_header: wire::field::UDP_HEADER,
                },
                None => return Verdict::Drop(DropReason::PortNotAllowed),
            },
            Transport::Icmp { kind: icmp_type::ECHO_REQUEST, ident, .. } => Parsed {
                proto: Protocol::Icmp,
                sport: ident,
                dport: 0,
                backend_port: 0,
                flags: 0,
                l4_header: wire::field::ICMP_HEADER,
            },
            // ICMP errors never create, refresh or delete flows.
            Transport::Icmp { kind, .. } if wire::is_icmp_error(kind) => {
                return self.error_to_provider(buf, net, ep);
            }
            Transport::Icmp { .. } | Transport::Other(_) => return Verdict::Drop(DropReason::UnsupportedProtocol),
        };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        let ihl = pkt.header_len();
        let (wire_len, segments) = self.on_wire(len, ihl + parsed.l4_header);
        let mut split = None;
        if wire_len > usize::from(snap.provider_mtu) {
            if pkt.dont_frag() || segments > 1 {
                return self.too_big(buf, snap.provider_mtu, dst);
            }
            split = Some(snap.provider_mtu);
        }
        let frag_key = FragKey { net: net.0, src, dst, proto: pkt.protocol(), id: pkt.ident() };
        let ck = ConsumerKey::new(net.0, parsed.proto.number(), src, parsed.sport, dst, parsed.dport);
        let flows = &self.engine.flows;
        let is_tcp = parsed.proto == Protocol::Tcp;
        let pure_syn = parsed.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN;
        let v = match flows.find_consumer(ck) {
            Some(v) => v,
            None if is_tcp && !pure_syn => return Verdict::Drop(DropReason::NoFlow),
            None => match self.create(ep, ck, &parsed) {
                Ok(v) => v,
                Err(InsertError::Full) => return Verdict::Drop(DropReason::FlowTableFull),
                Err(InsertError::Refused) => {
                    return self.answer(buf, dst, icmp_type::DEST_UNREACHABLE, 13, 0, DropReason::PortsExhausted)
                }
            },
        };
        if is_tcp {
            let f = parsed.flags;
            let s = v.state;
            if pure_syn && TcpPhase::from_bits(s) == TcpPhase::Closed {
                // The same 5-tuple opens again (client reuses its port).
                flows.reopen(&v);
            } else if f & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                flows.add_state(&v, if f & tcp_flags::RST != 0 { state::RST } else { state::C_FIN });
            } else if f & tcp_flags::ACK != 0 && s & (state::P_SYN | state::ESTABLISHED) == state::P_SYN {
                flows.add_state(&v, state::ESTABLISHED);
            }
        }
        let pk = v.pkey;
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        let pseudo = pkt.forward_rewrite(pk.nat_addr(), pk.backend_addr());
        let l4 = pkt.payload_mut();
        match parsed.proto {
            Protocol::Icmp => wire::set_icmp_ident(l4, pk.nat_port()),
            p => wire::set_ports(p.number(), l4, pk.nat_port(), pk.backend_port(), pseudo, self.off.csum_partial),
        }
        flows.touch(&v, self.now);
        flows.add_bytes(&v, true, len as u64);
        ep.shared.counters.get(self.w).add(true, len, segments);
        if first_fragment {
            let m = Mapping {
                src: pk.nat_addr(),
                dst: pk.backend_addr(),
                egress: Egress::Provider,
                mtu: snap.provider_mtu,
                endpoint: ep.shared.id,
            };
            self.frags.first(frag_key, m, self.now);
        }
        match split {
            Some(mtu) => Verdict::Fragment { to: Egress::Provider, mtu },
            None => Verdict::Forward(Egress::Provider),
        }
    }

    /// Sets up a new flow: NAT IP by consumer address (RFC 4787 REQ-2),
    /// backend by Maglev over the 5-tuple, a port from the pool.
    fn create(&mut self, ep: &EndpointView, ck: ConsumerKey, p: &Parsed) -> Result<FlowView, InsertError> {
        let svc = &self.snap.services[ep.service];
        let flows = &self.engine.flows;
        let nat_idx = nat_ip_index(ck.network(), ck.consumer_addr(), svc.nat_ips.len());
        let nat_ip = svc.nat_ips[nat_idx];
        let pool = &svc.pools[nat_idx][p.proto.index()];
        let backend = svc.backends[svc.maglev.lookup(flows.flow_hash(ck))];
        let bits = if p.proto == Protocol::Tcp { state::C_SYN } else { 0 };
        let (proto, bport, now) = (p.proto.number(), p.backend_port, self.now);
        let r = flows.insert(ck, ep.shared.id, now, |claim| {
            pool.pool.allocate(now, |port| claim(ProviderKey::new(proto, nat_ip, port, backend, bport)))?;
            Some((pool.id, bits))
        })?;
        match r {
            Inserted::Existing(v) => Ok(v),
            Inserted::New(v) => {
                use std::sync::atomic::Ordering::Relaxed;
                ep.shared.flows_active.fetch_add(1, Relaxed);
                ep.shared.flows_created.fetch_add(1, Relaxed);
                Ok(v)
            }
        }
    }

    fn provider_to_consumer(&mut self, buf: &mut [u8]) -> Verdict {
        let snap = self.snap;
        let pkt = match Ipv4Packet::new_checked(&*buf) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(invalid(buf, e)),
        };
        if pkt.is_later_fragment() {
            return self.later_fragment(buf, None);
        }
        let first_fragment = pkt.is_fragment();
        let Ok(tr) = Transport::parse_in(pkt.protocol(), pkt.payload(), !first_fragment) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let (src, dst, len) = (pkt.src_addr(), pkt.dst_addr(), pkt.total_len());
        let frag_key = FragKey { net: u16::MAX, src, dst, proto: pkt.protocol(), id: pkt.ident() };
        let (pk, flags, l4_header) = match tr {
            Transport::Tcp { src: sp, dst: dp, flags, header_len } => {
                (ProviderKey::new(wire::proto::TCP, dst, dp, src, sp), flags, usize::from(header_len))
            }
            Transport::Udp { src: sp, dst: dp } => {
                (ProviderKey::new(wire::proto::UDP, dst, dp, src, sp), 0, wire::field::UDP_HEADER)
            }
            Transport::Icmp { kind: icmp_type::ECHO_REPLY, ident, .. } => {
                (ProviderKey::new(wire::proto::ICMP, dst, ident, src, 0), 0, wire::field::ICMP_HEADER)
            }
            Transport::Icmp { kind, .. } if wire::is_icmp_error(kind) => return self.error_to_consumer(buf),
            Transport::Icmp { .. } | Transport::Other(_) => return Verdict::Drop(DropReason::UnsupportedProtocol),
        };
        let flows = &self.engine.flows;
        let Some(v) = flows.find_provider(pk) else { return Verdict::Drop(DropReason::NoFlow) };
        let ck = v.ckey;
        let Some(ep) = snap.endpoint_by_id(v.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if pkt.ttl() <= 1 {
            return self.answer(buf, dst, icmp_type::TIME_EXCEEDED, 0, 0, DropReason::TtlExpired);
        }
        let net = NetworkId(ck.network());
        let Some(&(_, mtu)) = snap.network(net) else { return Verdict::Drop(DropReason::NoFlow) };
        let (wire_len, segments) = self.on_wire(len, pkt.header_len() + l4_header);
        let mut split = None;
        if wire_len > usize::from(mtu) {
            if pkt.dont_frag() || segments > 1 {
                return self.too_big(buf, mtu, dst);
            }
            split = Some(mtu);
        }
        if pk.0 >> 96 == u128::from(wire::proto::TCP) && flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0
        {
            let bit = if flags & tcp_flags::RST != 0 {
                state::RST
            } else if flags & tcp_flags::SYN != 0 {
                state::P_SYN
            } else {
                state::P_FIN
            };
            flows.add_state(&v, bit);
        }
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        let pseudo = pkt.forward_rewrite(ck.endpoint_addr(), ck.consumer_addr());
        let proto = pkt.protocol();
        let l4 = pkt.payload_mut();
        if proto == wire::proto::ICMP {
            wire::set_icmp_ident(l4, ck.consumer_port());
        } else {
            wire::set_ports(proto, l4, ck.endpoint_port(), ck.consumer_port(), pseudo, self.off.csum_partial);
        }
        flows.touch(&v, self.now);
        flows.add_bytes(&v, false, len as u64);
        ep.shared.counters.get(self.w).add(false, len, segments);
        if first_fragment {
            let m = Mapping {
                src: ck.endpoint_addr(),
                dst: ck.consumer_addr(),
                egress: Egress::Network(net),
                mtu,
                endpoint: ep.shared.id,
            };
            self.frags.first(frag_key, m, self.now);
        }
        match split {
            Some(mtu) => Verdict::Fragment { to: Egress::Network(net), mtu },
            None => Verdict::Forward(Egress::Network(net)),
        }
    }
}

impl Ctx<'_> {
    /// An ICMP error a consumer sends about a packet it got from the
    /// endpoint (RFC 5508): translated to the flow's backend, outer and
    /// quoted headers alike. No flow is created, refreshed or deleted.
    fn error_to_provider(&mut self, buf: &mut [u8], net: NetworkId, ep: &EndpointView) -> Verdict {
        let pkt = Ipv4Packet::new_unchecked(&*buf);
        let (ihl, len) = (pkt.header_len(), pkt.total_len());
        let Some(q) = wire::parse_icmp_error(&buf[ihl..]) else { return Verdict::Drop(DropReason::NoFlow) };
        if q.src != ep.ip {
            return Verdict::Drop(DropReason::NoFlow);
        }
        let ck = if q.proto == wire::proto::ICMP {
            ConsumerKey::new(net.0, q.proto, q.dst, q.dport, q.src, 0)
        } else {
            ConsumerKey::new(net.0, q.proto, q.dst, q.dport, q.src, q.sport)
        };
        let Some(v) = self.engine.flows.find_consumer(ck) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if buf[wire::field::TTL] <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        if len > usize::from(self.snap.provider_mtu) {
            return Verdict::Drop(DropReason::TooBig);
        }
        let pk = v.pkey;
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        pkt.forward_rewrite(pk.nat_addr(), pk.backend_addr());
        let quoted_src = (pk.backend_addr(), if q.proto == wire::proto::ICMP { 0 } else { pk.backend_port() });
        wire::rewrite_quoted(pkt.payload_mut(), &q, quoted_src, (pk.nat_addr(), pk.nat_port()));
        ep.shared.counters.get(self.w).add(true, len, 1);
        Verdict::Forward(Egress::Provider)
    }

    /// An ICMP error from the provider side about a translated packet (a
    /// backend's port unreachable, a router's fragmentation needed): sent
    /// on to the consumer from the endpoint's address, the quoted packet
    /// restored to what the consumer sent.
    fn error_to_consumer(&mut self, buf: &mut [u8]) -> Verdict {
        let pkt = Ipv4Packet::new_unchecked(&*buf);
        let (ihl, len, dst) = (pkt.header_len(), pkt.total_len(), pkt.dst_addr());
        let Some(q) = wire::parse_icmp_error(&buf[ihl..]) else { return Verdict::Drop(DropReason::NoFlow) };
        if q.src != dst {
            return Verdict::Drop(DropReason::NoFlow);
        }
        let pk = if q.proto == wire::proto::ICMP {
            ProviderKey::new(q.proto, q.src, q.sport, q.dst, 0)
        } else {
            ProviderKey::new(q.proto, q.src, q.sport, q.dst, q.dport)
        };
        let Some(v) = self.engine.flows.find_provider(pk) else { return Verdict::Drop(DropReason::NoFlow) };
        let ck = v.ckey;
        let Some(ep) = self.snap.endpoint_by_id(v.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if buf[wire::field::TTL] <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        let net = NetworkId(ck.network());
        let Some(&(_, mtu)) = self.snap.network(net) else { return Verdict::Drop(DropReason::NoFlow) };
        if len > usize::from(mtu) {
            return Verdict::Drop(DropReason::TooBig);
        }
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        pkt.forward_rewrite(ck.endpoint_addr(), ck.consumer_addr());
        let quoted_dst = (ck.endpoint_addr(), if q.proto == wire::proto::ICMP { 0 } else { ck.endpoint_port() });
        wire::rewrite_quoted(pkt.payload_mut(), &q, (ck.consumer_addr(), ck.consumer_port()), quoted_dst);
        ep.shared.counters.get(self.w).add(false, len, 1);
        Verdict::Forward(Egress::Network(net))
    }
}

/// The drop reason for a buffer that is no valid IPv4 packet: a well-formed
/// IPv6 packet is an unsupported protocol, anything else is malformed.
fn invalid(buf: &[u8], e: wire::Malformed) -> DropReason {
    if e == wire::Malformed::Version && buf.len() >= 40 && buf[0] >> 4 == 6 {
        DropReason::UnsupportedProtocol
    } else {
        DropReason::Malformed
    }
}

/// Which of `n` NAT IPs a consumer address uses: a fixed hash, so the same
/// consumer always gets the same NAT IP (RFC 4787 REQ-2), in every run.
#[inline]
pub fn nat_ip_index(network: u16, consumer: u32, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let x = (u64::from(network) << 32 | u64::from(consumer)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 32) % n as u64) as usize
}
