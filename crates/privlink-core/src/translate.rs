//! One translation path for both directions. A packet goes through the same
//! steps whichever way it crosses; what differs between the directions is
//! data ([`Dir`]): which index finds its flow, which ends of the flow it is
//! rewritten to, which TCP state bits it sets, where it leaves.
//!
//! The steps, in this order (docs/ARCHITECTURE.md has the table of which
//! drop reason each gives):
//!
//! 1. validate the IPv4 header (`malformed`), drop source-routed packets
//!    (`source_route`) and martian sources (`martian_source`); an IPv6
//!    packet takes the same steps in [`Ctx::steps6`];
//! 2. address: on the consumer side, the destination must be an endpoint
//!    of the network (`no_endpoint`);
//! 3. reassemble: a later fragment takes its first fragment's translation,
//!    or waits for it (`reassembly_timeout` when it never comes);
//! 4. parse the transport header (`malformed`; TCP flags no connection
//!    sends, such as SYN+FIN, are `invalid_tcp_flags`; ICMP errors go to
//!    [`Ctx::translate_error`], other ICMP and protocols are
//!    `unsupported_protocol`);
//! 5. look up: the service's port rule (`port_not_allowed`), the
//!    endpoint's source rules (`source_not_allowed`) and the flow (provider
//!    side: `no_flow`);
//! 6. approve: the endpoint's connection must be approved (`not_approved`).
//!    Before TTL, so nothing about a pending or rejected endpoint answers,
//!    not even traceroute;
//! 7. TTL (`ttl_expired`, answered with time exceeded);
//! 8. MTU (`too_big`, answered with fragmentation needed when DF is set;
//!    otherwise the packet leaves in fragments);
//! 9. flow: the consumer side creates one for a new conversation (`no_flow`
//!    for TCP other than a SYN, `no_healthy_backend`, `endpoint_flow_limit`,
//!    `flow_table_full`, `ports_exhausted`; a closed flow is ended for it
//!    first when the table or the pool is full);
//! 10. TCP state from the flags ([`crate::conntrack`]: only an exact RST
//!     closes), and for a PROXY service its header and sequence shift;
//! 11. rewrite addresses, ports (or the echo identifier) and checksums;
//! 12. count.

use crate::addr::{self, End, Family, V6};
use crate::conntrack::{self, pure_syn, Rst, TcpUpdate, RECLAIM_TRIES};
use crate::engine::{Engine, Tables};
use crate::events::NatEventKind;
use crate::flow::{state, ConsumerKey, FlowView, InsertError, Inserted, ProviderKey};
use crate::frag::{FragKey, Frags, Later, Mapping};
use crate::proxy;
use crate::snapshot::{Addressed, EndpointView, Snapshot};
use crate::spec::ProxyTlv;
use crate::types::{DropReason, Egress, NetworkId, Now, Offload, Protocol, Verdict};
use crate::wire::ipv6::Ipv6Packet;
use crate::wire::{self, icmp_type, tcp_flags, Ipv4Packet, Transport, REPLY_MAX};

/// Which way a packet crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Consumer -> provider, read from this network's device.
    In(NetworkId),
    /// Provider -> consumer, read from the provider device.
    Out,
}

impl Dir {
    /// Whether this is the consumer -> service direction of the counters.
    #[inline]
    fn inbound(self) -> bool {
        matches!(self, Dir::In(_))
    }

    /// The network id fragments are kept under (`u16::MAX`: provider side).
    #[inline]
    fn frag_net(self) -> u16 {
        match self {
            Dir::In(n) => n.0,
            Dir::Out => u16::MAX,
        }
    }

    /// The ICMP echo message that travels this way.
    #[inline]
    fn echo(self) -> u8 {
        match self {
            Dir::In(_) => icmp_type::ECHO_REQUEST,
            Dir::Out => icmp_type::ECHO_REPLY,
        }
    }

    /// A packet's (source, destination) as (near, far): near is the side
    /// the flow index of this direction is keyed by first (the consumer
    /// going in, the NAT address coming out).
    #[inline]
    fn near_far<F: Family>(self, src: End<F>, dst: End<F>) -> (End<F>, End<F>) {
        match self {
            Dir::In(_) => (src, dst),
            Dir::Out => (dst, src),
        }
    }

    /// What a packet of flow `v` leaves with in this direction: (source,
    /// destination).
    #[inline]
    fn ends<F: Family>(self, v: &FlowView<F>) -> (End<F>, End<F>) {
        let (c, p) = (v.ckey, v.pkey);
        match self {
            Dir::In(_) => (p.nat(), p.backend()),
            Dir::Out => (c.endpoint(), c.consumer()),
        }
    }

    /// The ICMP echo identifier of a packet leaving with `ends`: the
    /// source's on the way in, the destination's on the way out.
    #[inline]
    fn echo_ident<F: Family>(self, (src, dst): (End<F>, End<F>)) -> u16 {
        match self {
            Dir::In(_) => src.port,
            Dir::Out => dst.port,
        }
    }
}

/// Per-worker token bucket for generated ICMP (refilled each second).
#[derive(Debug)]
pub(crate) struct IcmpLimiter {
    second: u32,
    left: u32,
    rate: u32,
}

impl IcmpLimiter {
    pub(crate) fn new(rate: u32) -> IcmpLimiter {
        IcmpLimiter { second: u32::MAX, left: 0, rate }
    }

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

/// Borrowed pieces of a worker for one packet.
pub(crate) struct Ctx<'a> {
    pub(crate) engine: &'a Engine,
    pub(crate) w: usize,
    pub(crate) snap: &'a Snapshot,
    pub(crate) reply: &'a mut [u8; REPLY_MAX],
    /// A packet the translation made besides the one it forwards (a PROXY
    /// header segment, in `reply`).
    pub(crate) extra: &'a mut Option<Extra>,
    pub(crate) icmp: &'a mut IcmpLimiter,
    pub(crate) frags: &'a mut Frags,
    pub(crate) now: Now,
    pub(crate) off: Offload,
}

/// A packet made besides the one forwarded: where it goes, its length (in
/// the worker's reply buffer), and whether it must leave before the
/// forwarded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extra {
    pub(crate) to: Egress,
    pub(crate) len: usize,
    pub(crate) before: bool,
}

/// What step 4 read of the transport header.
struct Segment {
    proto: Protocol,
    sport: u16,
    dport: u16,
    flags: u8,
    /// Transport header length (for GSO segment sizes).
    l4_header: usize,
}

impl Ctx<'_> {
    /// Translates the packet `buf[..n]` in place (steps 1 to 12) and
    /// counts a drop. The bytes past `n` are room: a packet translated
    /// from IPv4 to IPv6 grows into them ([`wire::nat64::GROWTH`]).
    pub(crate) fn translate(&mut self, buf: &mut [u8], n: usize, dir: Dir) -> Verdict {
        // One body, instantiated per direction: with `dir`'s variant known,
        // the compiler folds away what belongs to the other direction
        // (measured: 6 % fewer instructions per packet than one instance).
        let pkt = &mut buf[..n];
        let v = match (dir, pkt.first().map(|b| b >> 4)) {
            (_, Some(6)) => self.steps6(pkt, dir),
            (Dir::In(n), _) => self.steps(pkt, Dir::In(n)),
            (Dir::Out, _) => self.steps(pkt, Dir::Out),
        };
        // An IPv4 packet of no IPv4 flow may belong to an IPv6 flow
        // translated to IPv4 (RFC 6146): looked up there only then.
        let v = match v {
            Verdict::Drop(DropReason::NoFlow) if dir == Dir::Out && self.engine.flows6().is_some() => {
                match buf.first() {
                    Some(b) if b >> 4 == 4 => self.steps46(buf, n),
                    _ => v,
                }
            }
            v => v,
        };
        if let Verdict::Drop(r) | Verdict::Reply { reason: r, .. } = v {
            self.count_drop(dir, r);
        }
        v
    }

    #[inline(always)]
    fn steps(&mut self, buf: &mut [u8], dir: Dir) -> Verdict {
        let snap = self.snap;
        // 1. Validate.
        let pkt = match Ipv4Packet::new_checked(&*buf) {
            Ok(p) => p,
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        let (src, dst, len, ttl, ihl) = (pkt.src_addr(), pkt.dst_addr(), pkt.total_len(), pkt.ttl(), pkt.header_len());
        let (df, proto_num, ident) = (pkt.dont_frag(), pkt.protocol(), pkt.ident());
        if ihl > wire::field::HEADER_MIN {
            match wire::source_routed(&buf[..ihl]) {
                Ok(false) => {}
                Ok(true) => return Verdict::Drop(DropReason::SourceRoute),
                Err(_) => return Verdict::Drop(DropReason::Malformed),
            }
        }
        if addr::is_martian_v4(src) {
            return Verdict::Drop(DropReason::MartianSource);
        }
        // 2. Address: a consumer reaches its network's endpoints, nothing else.
        let at = match dir {
            Dir::In(net) => match snap.endpoint_at(net.0, dst) {
                Some(ep) => Some(ep),
                None => return Verdict::Drop(DropReason::NoEndpoint),
            },
            Dir::Out => None,
        };
        // 3. Reassemble.
        if pkt.is_later_fragment() {
            return self.later_fragment(buf, dir);
        }
        let first_fragment = pkt.is_fragment();
        // 4. Parse.
        let Ok(tr) = Transport::parse_in(proto_num, pkt.payload(), !first_fragment) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let seg = match tr {
            Transport::Tcp { flags, .. } if !tcp_flags::valid(flags) => {
                return Verdict::Drop(DropReason::InvalidTcpFlags)
            }
            Transport::Tcp { src, dst, flags, header_len } => {
                Segment { proto: Protocol::Tcp, sport: src, dport: dst, flags, l4_header: usize::from(header_len) }
            }
            Transport::Udp { src, dst } => {
                Segment { proto: Protocol::Udp, sport: src, dport: dst, flags: 0, l4_header: wire::field::UDP_HEADER }
            }
            Transport::Icmp { kind, ident, .. } if kind == dir.echo() => Segment {
                proto: Protocol::Icmp,
                sport: ident,
                dport: ident,
                flags: 0,
                l4_header: wire::field::ICMP_HEADER,
            },
            // ICMP errors never create, refresh or delete flows.
            Transport::Icmp { kind, .. } if wire::is_icmp_error(kind) => return self.translate_error(buf, dir, at),
            Transport::Icmp { .. } | Transport::Other(_) => return Verdict::Drop(DropReason::UnsupportedProtocol),
        };
        // 5. Look up: the port rule (consumer side) and the flow.
        let (near, far) = dir.near_far(End::new(src, seg.sport), End::new(dst, seg.dport));
        let found = self.find(dir, seg.proto, near, far);
        let (ep, backend_port) = match at {
            Some(ep) => {
                let bport = match seg.proto {
                    Protocol::Icmp => 0,
                    p => match snap.services[ep.service].rule(p, seg.dport) {
                        Some(r) => r.backend_port,
                        None => return Verdict::Drop(DropReason::PortNotAllowed),
                    },
                };
                if !ep.allows(src) {
                    return Verdict::Drop(DropReason::SourceNotAllowed);
                }
                (ep, bport)
            }
            None => match found.and_then(|v| snap.endpoint_by_id(v.endpoint)) {
                Some(ep) => (ep, 0),
                None => return Verdict::Drop(DropReason::NoFlow),
            },
        };
        // 6. Approve.
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        // 7. TTL.
        if ttl <= 1 {
            return self.answer(buf, dst, icmp_type::TIME_EXCEEDED, 0, 0, DropReason::TtlExpired);
        }
        // 8. MTU.
        let Some((egress, mtu)) = self.egress(dir, found.as_ref()) else { return Verdict::Drop(DropReason::NoFlow) };
        let (wire_len, segments) = self.on_wire(len, ihl + seg.l4_header);
        let mut split = None;
        if wire_len > usize::from(mtu) {
            if df || segments > 1 {
                return self.too_big(buf, mtu, dst);
            }
            split = Some(mtu);
        }
        // 9. The flow: found, or created for a new conversation.
        let v = match found {
            Some(v) => v,
            None if seg.proto == Protocol::Tcp && !pure_syn(seg.flags) => return Verdict::Drop(DropReason::NoFlow),
            None => {
                let Dir::In(net) = dir else { return Verdict::Drop(DropReason::NoFlow) };
                let ck = consumer_key(net, seg.proto, near, far);
                match self.create(ep, ck, seg.proto, backend_port) {
                    Ok(v) => v,
                    Err(InsertError::Full) => return Verdict::Drop(DropReason::FlowTableFull),
                    Err(InsertError::Limit) => return Verdict::Drop(DropReason::EndpointFlowLimit),
                    // Refused at once rather than left to time out: a TCP
                    // RST, for UDP port unreachable (rate-limited, as ICMP).
                    Err(InsertError::NoBackend) => return self.refuse(buf, seg.proto, dst),
                    Err(InsertError::NoNatIp) => return Verdict::Drop(DropReason::NoNatIp),
                    Err(InsertError::Land) => return Verdict::Drop(DropReason::MartianSource),
                    Err(InsertError::Refused) => {
                        return self.answer(buf, dst, icmp_type::DEST_UNREACHABLE, 13, 0, DropReason::PortsExhausted)
                    }
                }
            }
        };
        // 10. TCP state (and PROXY protocol's sequence shift).
        if seg.proto == Protocol::Tcp {
            let payload = len.saturating_sub(ihl + seg.l4_header);
            if let Err(r) = self.tcp_step(buf, ihl, payload, dir, seg.flags, &v, ep) {
                return Verdict::Drop(r);
            }
        }
        let flows = &self.engine.flows;
        // 11. Rewrite.
        let ends = dir.ends(&v);
        let (End { addr: nsrc, port: nsport }, End { addr: ndst, port: ndport }) = ends;
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        let pseudo = pkt.forward_rewrite(nsrc, ndst);
        let l4 = pkt.payload_mut();
        match seg.proto {
            Protocol::Icmp => wire::set_icmp_ident(l4, dir.echo_ident(ends)),
            p => wire::set_ports(p.number(), l4, nsport, ndport, pseudo, self.off.csum_partial),
        }
        // 12. Count.
        flows.note_packet(&v, self.now, dir.inbound(), len as u64);
        ep.shared.counters.get(self.w).add(dir.inbound(), len, segments);
        if first_fragment {
            let key = FragKey { net: dir.frag_net(), src, dst, proto: proto_num, id: u32::from(ident) };
            let m = Mapping { src: nsrc, dst: ndst, egress, mtu, endpoint: ep.shared.id };
            self.frags.v4.first(key, m, self.now);
        }
        match split {
            Some(mtu) => Verdict::Fragment { to: egress, mtu },
            None => Verdict::Forward(egress),
        }
    }

    /// Step 10 for a TCP segment of flow `v` (`buf` its packet, with an IP
    /// header of `ihl` bytes and `payload` bytes of data): the state its
    /// flags set, the open and closed counts ([`crate::conntrack`]), the
    /// sequence number its sender reached, and for a PROXY service the
    /// header and the sequence shift.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tcp_step<F: Tables>(
        &mut self,
        buf: &mut [u8],
        ihl: usize,
        payload: usize,
        dir: Dir,
        flags: u8,
        v: &FlowView<F>,
        ep: &EndpointView,
    ) -> Result<(), DropReason> {
        let Some(flows) = F::table(self.engine) else { return Err(DropReason::NoFlow) };
        let l4 = &mut buf[ihl..];
        let inbound = dir.inbound();
        let (syn, fin) = (flags & tcp_flags::SYN != 0, flags & tcp_flags::FIN != 0);
        let seq = wire::tcp::seq(l4);
        let end = seq.wrapping_add(payload as u32 + u32::from(syn) + u32::from(fin));
        let rst = || Rst { seq, ack: wire::tcp::ack(l4), next: flows.next_seqs(v) };
        let change = match conntrack::update(inbound, flags, v.state, rst) {
            TcpUpdate::None => None,
            TcpUpdate::Add(bits) => flows.add_state(v, bits),
            TcpUpdate::Reopen => {
                // Open again: the endpoint's bound and the network's share
                // apply as to a new flow.
                if ep.shared.open_flows() >= u64::from(ep.max_flows) {
                    return Err(DropReason::EndpointFlowLimit);
                }
                if crate::counters::count32(&self.engine.net_flows[usize::from(ep.network.0)]) >= self.snap.flow_share {
                    return Err(DropReason::FlowTableFull);
                }
                flows.reopen(v)
            }
        };
        if let Some(c) = change {
            self.engine.count_change(self.snap, v, c, self.now);
        }
        let mut end = end;
        if let Some(tlv) = ep.proxy {
            let established = change.is_some_and(|c| c.set(state::ESTABLISHED));
            if self.proxy_step(l4, payload, dir, flags, v, ep, tlv, established) {
                wire::strip_tcp_payload(buf, ihl, self.off.csum_partial);
                // What the backend sees of this SYN: no data.
                end = seq.wrapping_add(1);
            }
        }
        // How far the sender got. A RST teaches nothing: one that ended
        // nothing may be forged. A SYN sets it only while the handshake is
        // open (a SYN in the middle of a connection is not a new one).
        if flags & tcp_flags::RST == 0 {
            let opening = syn && conntrack::syn_starts(inbound, v.state);
            flows.note_seq(v, inbound, end, opening);
        }
        Ok(())
    }

    /// Step 10b for a TCP segment of a flow whose service sends a PROXY v2
    /// header (see [`crate::proxy`]).
    ///
    /// Toward the backend: a SYN records the consumer's ISN and loses any
    /// data it carries (TCP Fast Open: the consumer sends it again after
    /// the handshake, behind the header). The segment that completes the
    /// consumer's handshake (`established`) sends the header, built to
    /// look like the consumer's next segment (its acknowledgement, window
    /// and timestamps): after it when it is a bare ACK, which goes on
    /// unshifted (a SYN-cookie backend checks its sequence number), before
    /// it when it carries data. Every later segment moves up by the
    /// header's length.
    ///
    /// Toward the consumer: an acknowledgement moves down by the header's
    /// length once the backend has the header; until then it stays at the
    /// consumer's ISN + 1 and the header is sent again. A SYN-ACK passes
    /// as it is.
    ///
    /// Returns true when the segment's data must be dropped (the SYN's).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn proxy_step<F: Tables>(
        &mut self,
        l4: &mut [u8],
        payload: usize,
        dir: Dir,
        flags: u8,
        v: &FlowView<F>,
        ep: &EndpointView,
        tlv: ProxyTlv,
        established: bool,
    ) -> bool {
        let Some(flows) = F::table(self.engine) else { return false };
        let partial = self.off.csum_partial;
        let hl = proxy::header_len_for::<F>(tlv) as u32;
        match dir {
            Dir::In(_) if flags & tcp_flags::SYN != 0 => {
                // Only the SYN of a connection opening (or reopening) says
                // where its stream starts.
                if conntrack::syn_starts(true, v.state) {
                    flows.set_proxy_isn(v, wire::tcp::seq(l4));
                }
                return payload > 0;
            }
            Dir::In(_) => {
                let bare = payload == 0 && flags & (tcp_flags::FIN | tcp_flags::RST) == 0;
                if established {
                    let ts = wire::tcp_timestamps(l4);
                    flows.set_proxy_ack(v, wire::tcp::ack(l4), wire::tcp::window(l4), ts);
                    self.proxy_header(v, ep, tlv, !bare);
                    if bare {
                        return false;
                    }
                }
                if v.state & state::ESTABLISHED != 0 || established {
                    wire::tcp::set_seq(l4, wire::tcp::seq(l4).wrapping_add(hl), partial);
                }
            }
            Dir::Out => {
                if flags & (tcp_flags::SYN | tcp_flags::RST) != 0 || flags & tcp_flags::ACK == 0 {
                    return false;
                }
                let ack = wire::tcp::ack(l4);
                if v.state & state::HDR_ACKED == 0 {
                    let isn = flows.proxy_isn(v);
                    let past = ack.wrapping_sub(isn.wrapping_add(1));
                    if past < hl || past >= 1 << 31 {
                        wire::tcp::set_ack(l4, isn.wrapping_add(1), partial);
                        if v.state & state::ESTABLISHED != 0 {
                            self.proxy_header(v, ep, tlv, false);
                        }
                        return false;
                    }
                    if let Some(c) = flows.add_state(v, state::HDR_ACKED) {
                        self.engine.count_change(self.snap, v, c, self.now);
                    }
                }
                wire::tcp::set_ack(l4, ack.wrapping_sub(hl), partial);
                wire::tcp::shift_sack(l4, hl, partial);
            }
        }
        false
    }

    /// Queues the PROXY header segment of flow `v` toward the backend,
    /// before the packet being translated or after it.
    fn proxy_header<F: Tables>(&mut self, v: &FlowView<F>, ep: &EndpointView, tlv: ProxyTlv, before: bool) {
        let Some(flows) = F::table(self.engine) else { return };
        let len = proxy::segment(flows, v, ep.link_id, tlv, &mut self.reply[..]);
        if len > 0 {
            *self.extra = Some(Extra { to: Egress::Provider, len, before });
        }
    }

    /// The flow a packet belongs to, by the index of its direction.
    #[inline(always)]
    fn find<F: Tables>(&self, dir: Dir, proto: Protocol, near: End<F>, far: End<F>) -> Option<FlowView<F>> {
        let flows = F::table(self.engine)?;
        match dir {
            Dir::In(net) => flows.find_consumer(consumer_key(net, proto, near, far)),
            Dir::Out => flows.find_provider(provider_key(proto, near, far)),
        }
    }

    /// Where a packet of flow `found` leaves, and that device's MTU.
    #[inline(always)]
    fn egress<F: Family>(&self, dir: Dir, found: Option<&FlowView<F>>) -> Option<(Egress, u16)> {
        match dir {
            Dir::In(_) => Some((Egress::Provider, self.snap.provider_mtu)),
            Dir::Out => {
                let net = NetworkId(found?.ckey.network());
                self.snap.network(net).map(|&(_, mtu)| (Egress::Network(net), mtu))
            }
        }
    }

    /// Sets up a new flow: NAT IP by consumer address (RFC 4787 REQ-2),
    /// backend by Maglev over the 5-tuple, a port from the pool.
    fn create<F: Tables>(
        &mut self,
        ep: &EndpointView,
        ck: ConsumerKey<F>,
        proto: Protocol,
        bport: u16,
    ) -> Result<FlowView<F>, InsertError> {
        // Never a flow from the endpoint's own address (a LAND packet: its
        // answers would come back to the endpoint); checked where flows
        // are made, since without a flow no later packet of it passes.
        if ck.consumer_addr() == ck.endpoint_addr() {
            return Err(InsertError::Land);
        }
        let svc = &self.snap.services[ep.service];
        let Some(flows) = F::table(self.engine) else { return Err(InsertError::Full) };
        let nat_ips = F::nat_ips(svc);
        // No address held, or the lease not renewed in time (the
        // addresses may be another host's by now).
        if nat_ips.is_empty() || self.now.0 > self.engine.lease_deadline.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(InsertError::NoNatIp);
        }
        let nat_idx = nat_index(ck.network(), F::fold_addr(ck.consumer_addr()), nat_ips.len());
        let nat_ip = nat_ips[nat_idx];
        let pool = &svc.pools[nat_idx][proto.index()];
        let Some(bi) = svc.picker.pick(flows.flow_hash(ck)) else { return Err(InsertError::NoBackend) };
        let backend = F::backends(svc)[bi];
        let bits = if proto == Protocol::Tcp { state::C_SYN } else { 0 };
        let (num, now) = (proto.number(), self.now);
        use std::sync::atomic::Ordering::Relaxed;
        // The endpoint's own bound and the network's share of the table:
        // checked, then counted once the flow exists. Workers creating flows
        // of one endpoint at the same instant may each pass the check, so a
        // bound can be exceeded by at most one flow per worker; checking
        // with a plain load keeps two atomic read-modify-writes (and their
        // undo) off every new flow.
        let active = &ep.shared.flows_active;
        if ep.shared.open_flows() >= u64::from(ep.max_flows) {
            return Err(InsertError::Limit);
        }
        let share = &self.engine.net_flows[usize::from(ck.network())];
        if crate::counters::count32(share) >= self.snap.flow_share {
            return Err(InsertError::Full);
        }
        // A closed flow never causes a refusal: with no slot (`Full`) or no
        // port (`Refused`), the oldest closed flow (of any pool, or of this
        // one) is ended for this one first (crate::conntrack).
        let mut hint = None;
        let mut tries = 0;
        // Both tables exist: a tuple of an IPv4 pool may be held in either.
        let across = self.engine.flows6().is_some();
        let r = loop {
            let got = flows.insert(ck, ep.shared.id, now, |claim| {
                pool.pool.allocate_hinted(now, hint, |port| {
                    !(across && self.engine.held_across::<F>(num, nat_ip, port, backend, bport))
                        && claim(ProviderKey::of(num, nat_ip, port, backend, bport))
                })?;
                Some((pool.id, bits))
            });
            match got {
                Err(InsertError::Full) if tries < RECLAIM_TRIES && !flows.is_frozen() => {
                    tries += 1;
                    if self.engine.reclaim_closed::<F>(self.snap, None, now).is_none() {
                        break got;
                    }
                }
                Err(InsertError::Refused) if tries < RECLAIM_TRIES && !flows.is_frozen() => {
                    tries += 1;
                    match self.engine.reclaim_closed::<F>(self.snap, Some(pool), now) {
                        Some(port) => hint = Some(port),
                        None => break got,
                    }
                }
                _ => break got,
            }
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                if e == InsertError::Refused {
                    pool.pool.note_exhausted();
                    let pkey = ProviderKey::of(num, nat_ip, 0, backend, bport);
                    F::nat_event(self.engine, NatEventKind::PortsExhausted, ck, pkey, ep.shared.id);
                }
                return Err(e);
            }
        };
        if let Inserted::New(v) = r {
            F::nat_event(self.engine, NatEventKind::Create, ck, v.pkey, ep.shared.id);
            active.fetch_add(1, Relaxed);
            share.fetch_add(1, Relaxed);
            ep.shared.flows_created.fetch_add(1, Relaxed);
            svc.created[bi].fetch_add(1, Relaxed);
        }
        Ok(r.view())
    }

    /// An ICMP error about a packet of a flow (RFC 5508), the same steps
    /// for both directions: the quoted packet crossed the other way and
    /// names the flow; the error is translated like a packet of it, outer
    /// and quoted headers alike. No flow is created, refreshed or deleted,
    /// and no ICMP is generated about it.
    #[inline(never)]
    fn translate_error(&mut self, buf: &mut [u8], dir: Dir, at: Option<&EndpointView>) -> Verdict {
        let pkt = Ipv4Packet::new_unchecked(&*buf);
        let (ihl, len, dst, ttl) = (pkt.header_len(), pkt.total_len(), pkt.dst_addr(), pkt.ttl());
        let Some(q) = wire::parse_icmp_error(&buf[ihl..]) else { return Verdict::Drop(DropReason::NoFlow) };
        // Look up: the quoted packet must be one privlink sent this side.
        let (near, far, ours) = match dir {
            Dir::In(_) => (
                End::new(q.dst, q.dport),
                End::new(q.src, q.sport),
                at.is_some_and(|ep| ep.ip == std::net::IpAddr::from(std::net::Ipv4Addr::from(q.src))),
            ),
            Dir::Out => (End::new(q.src, q.sport), End::new(q.dst, q.dport), q.src == dst),
        };
        let found = Protocol::from_number(q.proto).filter(|_| ours).and_then(|p| self.find(dir, p, near, far));
        let Some(v) = found else { return Verdict::Drop(DropReason::NoFlow) };
        let Some(ep) = self.snap.endpoint_by_id(v.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        let Some((egress, mtu)) = self.egress(dir, Some(&v)) else { return Verdict::Drop(DropReason::NoFlow) };
        if len > usize::from(mtu) {
            return Verdict::Drop(DropReason::TooBig);
        }
        // A quoted segment privlink sent the backend of a PROXY flow: its
        // sequence number back in the consumer's numbering; an error about
        // the header segment privlink made itself goes no further.
        if let (Dir::Out, Some(tlv), wire::proto::TCP) = (dir, ep.proxy, q.proto) {
            let l4 = &mut buf[ihl + q.l4..];
            let (isn, hl) = (self.engine.flows.proxy_isn(&v), proxy::header_len(tlv) as u32);
            if l4.len() >= 8 && !proxy::unshift_quoted_seq(l4, isn, hl) {
                return Verdict::Drop(DropReason::NoFlow);
            }
        }
        let (from, to) = dir.ends(&v);
        let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
        pkt.forward_rewrite(from.addr, to.addr);
        // The quoted packet went the other way: its ends are swapped.
        wire::rewrite_quoted(pkt.payload_mut(), &q, to, from);
        ep.shared.counters.get(self.w).add(dir.inbound(), len, 1);
        Verdict::Forward(egress)
    }

    /// A fragment other than the first: translated like its datagram's first
    /// fragment, or held until that one comes (then released through
    /// [`release`]).
    fn later_fragment(&mut self, buf: &mut [u8], dir: Dir) -> Verdict {
        let pkt = Ipv4Packet::new_unchecked(&*buf);
        let key = FragKey {
            net: dir.frag_net(),
            src: pkt.src_addr(),
            dst: pkt.dst_addr(),
            proto: pkt.protocol(),
            id: u32::from(pkt.ident()),
        };
        // A datagram of a flow translated to IPv6: left to `steps46`,
        // which has the room to grow it (the `no_flow` fallback).
        if dir == Dir::Out && self.engine.flows6().is_some() {
            let key6 = FragKey::<V6> {
                net: u16::MAX,
                src: wire::nat64::mapped(key.src),
                dst: wire::nat64::mapped(key.dst),
                proto: key.proto,
                id: key.id,
            };
            if self.frags.v6().mapping(key6).is_some() {
                return Verdict::Drop(DropReason::NoFlow);
            }
        }
        match self.frags.v4.later(key, buf, self.now) {
            Later::Held => Verdict::Held,
            Later::Full => Verdict::Drop(DropReason::ReassemblyTimeout),
            Later::Translate(m) => match fragment_steps(self.snap, self.w, buf, m) {
                Ok(len) if len > usize::from(m.mtu) => Verdict::Fragment { to: m.egress, mtu: m.mtu },
                Ok(_) => Verdict::Forward(m.egress),
                Err(r) => Verdict::Drop(r),
            },
        }
    }

    pub(crate) fn count_drop(&self, dir: Dir, r: DropReason) {
        count_drop(self.engine, self.snap, self.w, dir, r, 1);
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

    /// A new flow to a service with no healthy backend: answered at once so
    /// the client does not wait for its own timeout (a TCP SYN with a RST
    /// from the endpoint, UDP with ICMP port unreachable), rate-limited with
    /// the generated ICMP and never to a non-unicast source.
    fn refuse(&mut self, buf: &[u8], proto: Protocol, from: u32) -> Verdict {
        let reason = DropReason::NoHealthyBackend;
        match proto {
            Protocol::Udp => self.answer(buf, from, icmp_type::DEST_UNREACHABLE, 3, 0, reason),
            Protocol::Tcp => {
                let p = Ipv4Packet::new_unchecked(buf);
                if p.is_fragment() || !wire::is_unicast(p.src_addr()) || !self.icmp.take(self.now) {
                    return Verdict::Drop(reason);
                }
                let len = wire::build_tcp_rst(&mut self.reply[..], buf);
                if len == 0 {
                    return Verdict::Drop(reason);
                }
                Verdict::Reply { reason, len }
            }
            Protocol::Icmp => Verdict::Drop(reason),
        }
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
}

impl Ctx<'_> {
    /// Steps 1 to 12 for an IPv6 packet, to an IPv6 service. The same
    /// steps as [`steps`](Self::steps) with IPv6's rules: the
    /// extension-header chain walked once and bounded
    /// ([`wire::ipv6`]: routing type 0 is `source_route`, an unknown
    /// header `unsupported_protocol`), no header checksum (the
    /// pseudo-header's change goes into the transport checksum, RFC 8200
    /// §8.1), a zero UDP checksum refused (§8.1), the hop limit for the
    /// TTL, ICMPv6 echo for ICMP echo, and the errors a router sends
    /// (RFC 4443: Time Exceeded, Packet Too Big, since an IPv6 router never
    /// fragments, RFC 8200 §5). Not yet (docs/IPV6.md): fragments other
    /// than atomic ones (`unsupported_protocol`), ICMPv6 errors from the
    /// far side (`no_flow`).
    #[inline(never)]
    fn steps6(&mut self, buf: &mut [u8], dir: Dir) -> Verdict {
        use wire::icmpv6::icmpv6_type as t6;
        let snap = self.snap;
        // 1. Validate.
        let pkt = match Ipv6Packet::new_checked(&*buf) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(refused6(e)),
        };
        let (src, dst, hops, l4at, proto_num) =
            (pkt.src_addr(), pkt.dst_addr(), pkt.hop_limit(), pkt.l4_offset(), pkt.protocol());
        let frag = pkt.fragment();
        let len = buf.len();
        if addr::is_martian_v6(src) {
            return Verdict::Drop(DropReason::MartianSource);
        }
        // 2. Address.
        let at = match dir {
            Dir::In(net) => match V6::endpoint_at(snap, net.0, dst) {
                Some(ep) => Some(ep),
                None => return Verdict::Drop(DropReason::NoEndpoint),
            },
            Dir::Out => None,
        };
        // 3. Fragments (other than atomic ones): virtual reassembly as for
        // IPv4, keyed by the Fragment header's identification; a fragment
        // overlapping another refuses its datagram (RFC 5722).
        // A first fragment's bytes are recorded once it passed the policy
        // steps (5 and 6), so no packet the network may not send takes a
        // reassembly entry; a later one's at once (it may be held).
        let frag_key = match frag {
            Some(f) => {
                let key = FragKey::<V6> { net: dir.frag_net(), src, dst, proto: buf[usize::from(f.at)], id: f.ident };
                let data = (len - (usize::from(f.at) + 8)) as u16;
                if f.offset != 0 {
                    if !self.frags.v6().span(key, f.offset, f.offset + data, self.now) {
                        return Verdict::Drop(DropReason::Malformed);
                    }
                    return self.later_fragment6(buf, key);
                }
                Some((key, f, data))
            }
            None => None,
        };
        // 4. Parse.
        let l4 = &buf[l4at..];
        let seg = match (proto_num, Transport::parse_in(proto_num, l4, frag_key.is_none())) {
            (_, Ok(Transport::Tcp { flags, .. })) if !tcp_flags::valid(flags) => {
                return Verdict::Drop(DropReason::InvalidTcpFlags)
            }
            (_, Ok(Transport::Tcp { src, dst, flags, header_len })) => {
                Segment { proto: Protocol::Tcp, sport: src, dport: dst, flags, l4_header: usize::from(header_len) }
            }
            (_, Ok(Transport::Udp { .. })) if l4[6..8] == [0, 0] => return Verdict::Drop(DropReason::Malformed),
            (_, Ok(Transport::Udp { src, dst })) => {
                Segment { proto: Protocol::Udp, sport: src, dport: dst, flags: 0, l4_header: wire::field::UDP_HEADER }
            }
            (wire::ipv6::next::ICMPV6, _) => {
                let echo = match dir {
                    Dir::In(_) => t6::ECHO_REQUEST,
                    Dir::Out => t6::ECHO_REPLY,
                };
                if l4[0] == echo {
                    let ident = u16::from_be_bytes([l4[4], l4[5]]);
                    Segment { proto: Protocol::Icmp, sport: ident, dport: ident, flags: 0, l4_header: 8 }
                } else if wire::icmpv6::is_icmpv6_error(l4[0]) {
                    return self.translate_error6(buf, dir, true);
                } else {
                    return Verdict::Drop(DropReason::UnsupportedProtocol);
                }
            }
            _ => return Verdict::Drop(DropReason::Malformed),
        };
        // 5. Look up.
        let (near, far) = dir.near_far(End::<V6>::new(src, seg.sport), End::new(dst, seg.dport));
        let found = self.find(dir, seg.proto, near, far);
        let (ep, backend_port) = match at {
            Some(ep) => {
                let bport = match seg.proto {
                    Protocol::Icmp => 0,
                    p => match snap.services[ep.service].rule(p, seg.dport) {
                        Some(r) => r.backend_port,
                        None => return Verdict::Drop(DropReason::PortNotAllowed),
                    },
                };
                if !V6::allows(ep, src) {
                    return Verdict::Drop(DropReason::SourceNotAllowed);
                }
                (ep, bport)
            }
            None => match found.and_then(|v| snap.endpoint_by_id(v.endpoint)) {
                Some(ep) => (ep, 0),
                None => return Verdict::Drop(DropReason::NoFlow),
            },
        };
        // 6. Approve.
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if let Some((key, _, data)) = frag_key {
            if !self.frags.v6().span(key, 0, data, self.now) {
                return Verdict::Drop(DropReason::Malformed);
            }
        }
        // 7. Hop limit.
        if hops <= 1 {
            return self.answer6(buf, dst, t6::TIME_EXCEEDED, 0, 0, DropReason::TtlExpired);
        }
        // 8. MTU: never fragmented on the way, unless translated to
        // IPv4 small enough to leave without DF (RFC 7915 §5.1).
        let Some((egress, mtu)) = self.egress(dir, found.as_ref()) else { return Verdict::Drop(DropReason::NoFlow) };
        let (wire_len, segments) = self.on_wire(len, l4at + seg.l4_header);
        let to_v4 = dir.inbound() && !snap.services[ep.service].backends.is_empty();
        if to_v4 && frag_key.is_some() && seg.proto == Protocol::Icmp {
            // The ICMPv6 checksum's pseudo-header holds the whole
            // message's length, which a first fragment does not tell.
            return Verdict::Drop(DropReason::UnsupportedProtocol);
        }
        let mut split = None;
        if to_v4 && wire_len - l4at + wire::field::HEADER_MIN > usize::from(mtu) {
            // The IPv6 packet's MTU is the IPv4 one plus the header
            // difference, and never below IPv6's minimum (RFC 7915 §4.2).
            if len - l4at + wire::field::HEADER_MIN > wire::nat64::DF_THRESHOLD || segments > 1 {
                let mtu6 = (u32::from(mtu) + 20).max(wire::icmpv6::MIN_MTU as u32);
                return self.answer6(buf, dst, t6::PACKET_TOO_BIG, 0, mtu6, DropReason::TooBig);
            }
            split = Some(mtu);
        } else if !to_v4 && wire_len > usize::from(mtu) {
            return self.answer6(buf, dst, t6::PACKET_TOO_BIG, 0, u32::from(mtu), DropReason::TooBig);
        }
        // 9. The flow.
        let v = match found {
            Some(v) => v,
            None if seg.proto == Protocol::Tcp && !pure_syn(seg.flags) => return Verdict::Drop(DropReason::NoFlow),
            None => {
                let Dir::In(net) = dir else { return Verdict::Drop(DropReason::NoFlow) };
                let ck = consumer_key(net, seg.proto, near, far);
                match self.create(ep, ck, seg.proto, backend_port) {
                    Ok(v) => v,
                    Err(InsertError::Full) => return Verdict::Drop(DropReason::FlowTableFull),
                    Err(InsertError::Limit) => return Verdict::Drop(DropReason::EndpointFlowLimit),
                    // Port unreachable for TCP too: Linux ends the connect
                    // at once (ECONNREFUSED), as a RST would.
                    Err(InsertError::NoBackend) if seg.proto != Protocol::Icmp => {
                        return self.answer6(buf, dst, t6::DEST_UNREACHABLE, 4, 0, DropReason::NoHealthyBackend)
                    }
                    Err(InsertError::NoBackend) => return Verdict::Drop(DropReason::NoHealthyBackend),
                    Err(InsertError::NoNatIp) => return Verdict::Drop(DropReason::NoNatIp),
                    Err(InsertError::Land) => return Verdict::Drop(DropReason::MartianSource),
                    // Administratively prohibited (RFC 4443 §3.1, code 1).
                    Err(InsertError::Refused) => {
                        return self.answer6(buf, dst, t6::DEST_UNREACHABLE, 1, 0, DropReason::PortsExhausted)
                    }
                }
            }
        };
        // 10. TCP state (and PROXY protocol's sequence shift).
        if seg.proto == Protocol::Tcp {
            let payload = len.saturating_sub(l4at + seg.l4_header);
            if let Err(r) = self.tcp_step(buf, l4at, payload, dir, seg.flags, &v, ep) {
                return Verdict::Drop(r);
            }
        }
        // A SYN's data dropped for a PROXY header: the packet is shorter.
        let len = if ep.proxy.is_some() { wire::packet_len(buf) } else { len };
        let Some(flows) = V6::table(self.engine) else { return Verdict::Drop(DropReason::NoFlow) };
        // 11. Rewrite, or translate to IPv4 (the provider side of the
        // flow holds IPv4-mapped addresses).
        let ends = dir.ends(&v);
        let (End { addr: nsrc, port: nsport }, End { addr: ndst, port: ndport }) = ends;
        if to_v4 {
            let (Some(src4), Some(dst4)) = (wire::nat64::unmapped(nsrc), wire::nat64::unmapped(ndst)) else {
                return Verdict::Drop(DropReason::NoFlow);
            };
            let ports = match seg.proto {
                Protocol::Icmp => (dir.echo_ident(ends), dir.echo_ident(ends)),
                _ => (nsport, ndport),
            };
            let ident = self.frags.v4.next_ident();
            let (partial, f) = (self.off.csum_partial, frag_key.map(|(_, f, _)| f));
            if wire::nat64::to_ipv4(buf, len, l4at, proto_num, src4, dst4, Some(ports), ident, f, partial).is_none() {
                return Verdict::Drop(DropReason::TooBig);
            }
        } else {
            let pseudo = wire::ipv6::forward_rewrite(buf, nsrc, ndst);
            let l4 = &mut buf[l4at..];
            match seg.proto {
                Protocol::Icmp => wire::icmpv6::set_icmpv6_ident(l4, dir.echo_ident(ends), pseudo),
                p => wire::set_ports(p.number(), l4, nsport, ndport, pseudo, self.off.csum_partial),
            }
        }
        // 12. Count.
        flows.note_packet(&v, self.now, dir.inbound(), len as u64);
        ep.shared.counters.get(self.w).add(dir.inbound(), len, segments);
        if let Some((key, ..)) = frag_key {
            let m = Mapping { src: nsrc, dst: ndst, egress, mtu, endpoint: ep.shared.id };
            self.frags.v6().first(key, m, self.now);
        }
        match split {
            Some(mtu) => Verdict::Fragment { to: egress, mtu },
            None => Verdict::Forward(egress),
        }
    }

    /// An IPv6 fragment other than the first: translated like its
    /// datagram's first fragment, or held until that one comes (then
    /// released through [`release6`]).
    fn later_fragment6(&mut self, buf: &mut [u8], key: FragKey<V6>) -> Verdict {
        match self.frags.v6().later(key, buf, self.now) {
            Later::Held => Verdict::Held,
            Later::Full => Verdict::Drop(DropReason::ReassemblyTimeout),
            // An IPv4 fragment (6->4) may be split again on the way.
            Later::Translate(m) => match fragment_steps6(self.snap, self.w, buf, m) {
                Ok(len) if len > usize::from(m.mtu) => Verdict::Fragment { to: m.egress, mtu: m.mtu },
                Ok(_) => Verdict::Forward(m.egress),
                Err(r) => Verdict::Drop(r),
            },
        }
    }

    /// Steps 1 to 12 for an IPv4 packet from the provider side that no
    /// IPv4 flow knows: a packet of an IPv6 flow translated to IPv4 (RFC
    /// 6146), found by its IPv4-mapped provider key, and translated back to
    /// IPv6 into the room past `n` (RFC 7915 §4). A packet too big for the
    /// consumer's network with DF is answered with fragmentation needed
    /// (the MTU less the 20 bytes IPv6 adds); without DF it leaves in IPv6
    /// fragments (a Fragment header with its identification, split by the
    /// outbox: [`Verdict::Fragment`]).
    #[inline(never)]
    fn steps46(&mut self, buf: &mut [u8], n: usize) -> Verdict {
        use wire::nat64::mapped;
        let dir = Dir::Out;
        let Some(flows) = V6::table(self.engine) else { return Verdict::Drop(DropReason::NoFlow) };
        // 1. Validated by `steps` already.
        let pkt = Ipv4Packet::new_unchecked(&buf[..n]);
        let (src, dst, len, ttl, ihl, df) =
            (pkt.src_addr(), pkt.dst_addr(), pkt.total_len(), pkt.ttl(), pkt.header_len(), pkt.dont_frag());
        // 3. Fragments: a later one takes the translation its first
        // fragment got here (in order only: one held before its first
        // fragment came waits in the IPv4 table and times out).
        let key = FragKey::<V6> {
            net: u16::MAX,
            src: mapped(src),
            dst: mapped(dst),
            proto: pkt.protocol(),
            id: u32::from(pkt.ident()),
        };
        let (first_fragment, ident) = (pkt.is_fragment(), pkt.ident());
        if pkt.is_later_fragment() {
            return self.later_fragment46(buf, n, key);
        }
        if first_fragment && pkt.protocol() == wire::proto::ICMP {
            // ICMPv6's pseudo-header needs the whole message's length.
            return Verdict::Drop(DropReason::UnsupportedProtocol);
        }
        // 4. Parse.
        let seg = match Transport::parse_in(pkt.protocol(), pkt.payload(), !first_fragment) {
            Ok(Transport::Tcp { src, dst, flags, header_len }) => {
                Segment { proto: Protocol::Tcp, sport: src, dport: dst, flags, l4_header: usize::from(header_len) }
            }
            Ok(Transport::Udp { src, dst }) => {
                Segment { proto: Protocol::Udp, sport: src, dport: dst, flags: 0, l4_header: wire::field::UDP_HEADER }
            }
            Ok(Transport::Icmp { kind: icmp_type::ECHO_REPLY, ident, .. }) => Segment {
                proto: Protocol::Icmp,
                sport: ident,
                dport: ident,
                flags: 0,
                l4_header: wire::field::ICMP_HEADER,
            },
            Ok(Transport::Icmp { kind, .. }) if wire::is_icmp_error(kind) => {
                return self.translate_error6(buf, dir, false)
            }
            _ => return Verdict::Drop(DropReason::NoFlow),
        };
        // 5. Look up.
        let near = End::<V6>::new(mapped(dst), seg.dport);
        let far = End::<V6>::new(mapped(src), seg.sport);
        let Some(v) = flows.find_provider(provider_key(seg.proto, near, far)) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        let Some(ep) = self.snap.endpoint_by_id(v.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        // 6. Approve.
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        // 7. TTL.
        if ttl <= 1 {
            return self.answer(&buf[..n], dst, icmp_type::TIME_EXCEEDED, 0, 0, DropReason::TtlExpired);
        }
        // 8. MTU: IPv6 adds 20 bytes and never fragments on the way.
        let Some((egress, mtu)) = self.egress(dir, Some(&v)) else { return Verdict::Drop(DropReason::NoFlow) };
        let (wire_len, segments) = self.on_wire(len, ihl + seg.l4_header);
        let frag_header = if first_fragment { 8 } else { 0 };
        // Without DF, a packet too big as IPv6 leaves in IPv6 fragments
        // (RFC 7915 §4: a Fragment header with the IPv4 identification).
        let mut split = None;
        if wire_len - ihl + wire::ipv6::HEADER + frag_header > usize::from(mtu) {
            if df || segments > 1 {
                let mtu4 = u32::from(mtu).saturating_sub(20);
                return self.answer(&buf[..n], dst, icmp_type::DEST_UNREACHABLE, 4, mtu4, DropReason::TooBig);
            }
            if first_fragment {
                return Verdict::Drop(DropReason::TooBig);
            }
            split = Some(mtu);
        }
        // 10. TCP state.
        if seg.proto == Protocol::Tcp {
            let payload = len.saturating_sub(ihl + seg.l4_header);
            if let Err(r) = self.tcp_step(&mut buf[..n], ihl, payload, dir, seg.flags, &v, ep) {
                return Verdict::Drop(r);
            }
        }
        // 11. Translate.
        let ends = dir.ends(&v);
        let ports = match seg.proto {
            Protocol::Icmp => (dir.echo_ident(ends), dir.echo_ident(ends)),
            _ => (ends.0.port, ends.1.port),
        };
        let partial = self.off.csum_partial;
        let frag = match (first_fragment, split) {
            (true, _) => Some((ident, 0, true)),
            // A whole datagram with a Fragment header the outbox splits.
            (false, Some(_)) => Some((ident, 0, false)),
            (false, None) => None,
        };
        if wire::nat64::to_ipv6(buf, n, ihl, ends.0.addr, ends.1.addr, Some(ports), frag, partial).is_none() {
            return Verdict::Drop(DropReason::TooBig);
        }
        // 12. Count.
        flows.note_packet(&v, self.now, false, len as u64);
        ep.shared.counters.get(self.w).add(false, len, segments);
        if first_fragment {
            let m = Mapping { src: ends.0.addr, dst: ends.1.addr, egress, mtu, endpoint: ep.shared.id };
            self.frags.v6().first(key, m, self.now);
        }
        match split {
            Some(mtu) => Verdict::Fragment { to: egress, mtu },
            None => Verdict::Forward(egress),
        }
    }

    /// A later IPv4 fragment of a flow translated to IPv6: an IPv6
    /// fragment with the first fragment's translation (RFC 7915 §4.1: a
    /// Fragment header with the IPv4 identification, offset and More
    /// Fragments).
    fn later_fragment46(&mut self, buf: &mut [u8], n: usize, key: FragKey<V6>) -> Verdict {
        let Some(m) = self.frags.v6().mapping(key) else { return Verdict::Drop(DropReason::NoFlow) };
        let Some(ep) = self.snap.endpoint_by_id(m.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        let pkt = Ipv4Packet::new_unchecked(&buf[..n]);
        let (ihl, len, ttl, ident) = (pkt.header_len(), pkt.total_len(), pkt.ttl(), pkt.ident());
        let word = u16::from_be_bytes([buf[6], buf[7]]);
        if ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        if len - ihl + wire::ipv6::HEADER + 8 > usize::from(m.mtu) {
            return Verdict::Drop(DropReason::TooBig);
        }
        let frag = Some((ident, (word & 0x1fff) << 3, word & 0x2000 != 0));
        if wire::nat64::to_ipv6(buf, n, ihl, m.src, m.dst, None, frag, false).is_none() {
            return Verdict::Drop(DropReason::TooBig);
        }
        ep.shared.counters.get(self.w).add(false, len, 1);
        Verdict::Forward(m.egress)
    }

    /// An ICMP error about a packet of an IPv6 flow (RFC 4443, and RFC
    /// 7915 §4.2 and §5.2 where the flow is translated): `buf` is an
    /// ICMPv6 error (`outer_v6`) from the consumer or the provider side,
    /// or an ICMP error from an IPv4 backend. As for IPv4 (RFC 5508), the
    /// quoted packet crossed the other way and names the flow; the error
    /// is rebuilt from the flow's other ends, in the other side's family,
    /// with its quote translated the same way (a router's error quoting the
    /// IPv4 packet becomes one quoting the consumer's IPv6 packet). No flow
    /// is created, refreshed or deleted, and no ICMP is generated about it.
    #[inline(never)]
    fn translate_error6(&mut self, buf: &mut [u8], dir: Dir, outer_v6: bool) -> Verdict {
        use wire::nat64::{self, mapped, QuotedEnds};
        let Some(flows) = V6::table(self.engine) else { return Verdict::Drop(DropReason::NoFlow) };
        let (src, dst, hops, l4at, n) = if outer_v6 {
            let Ok(p) = Ipv6Packet::new_checked(&*buf) else { return Verdict::Drop(DropReason::Malformed) };
            (p.src_addr(), p.dst_addr(), p.hop_limit(), p.l4_offset(), buf.len())
        } else {
            let p = Ipv4Packet::new_unchecked(&*buf);
            (0, mapped(p.dst_addr()), p.ttl(), p.header_len(), p.total_len())
        };
        let l4 = &buf[l4at..n];
        if l4.len() < 8 || (outer_v6 && !nat64::icmp_checksum_ok(true, src, dst, l4)) {
            return Verdict::Drop(DropReason::NoFlow);
        }
        if !outer_v6 && crate::checksum::fold(crate::checksum::sum(l4)) != 0xffff {
            return Verdict::Drop(DropReason::NoFlow);
        }
        let (kind, code, param) = (l4[0], l4[1], u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]));
        let Some(q) = nat64::parse_quote(&l4[8..]).filter(|q| q.v6 == outer_v6) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        let addr = |a: u128| if q.v6 { a } else { mapped(a as u32) };
        let Some(proto) = Protocol::from_number(q.proto) else { return Verdict::Drop(DropReason::NoFlow) };
        // Look up: the quoted packet must be one privlink sent this side.
        if addr(q.src) != dst {
            return Verdict::Drop(DropReason::NoFlow);
        }
        let found = match dir {
            Dir::In(net) => flows.find_consumer(consumer_key(
                net,
                proto,
                End::new(addr(q.dst), q.dport),
                End::new(addr(q.src), q.sport),
            )),
            Dir::Out => {
                flows.find_provider(provider_key(proto, End::new(addr(q.src), q.sport), End::new(addr(q.dst), q.dport)))
            }
        };
        let Some(v) = found else { return Verdict::Drop(DropReason::NoFlow) };
        let Some(ep) = self.snap.endpoint_by_id(v.endpoint) else { return Verdict::Drop(DropReason::NoFlow) };
        if !ep.shared.approved() {
            return Verdict::Drop(DropReason::NotApproved);
        }
        if hops <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        // A quoted segment privlink sent the backend of a PROXY flow: its
        // sequence number back in the consumer's numbering (the consumer's
        // stack checks it is in its window); an error about the header
        // segment privlink made itself goes no further.
        let qoff = q.l4.as_ptr() as usize - buf.as_ptr() as usize;
        if let (Dir::Out, Some(tlv), Protocol::Tcp) = (dir, ep.proxy, proto) {
            let hl = proxy::header_len_for::<V6>(tlv) as u32;
            if !proxy::unshift_quoted_seq(&mut buf[qoff..n], flows.proxy_isn(&v), hl) {
                return Verdict::Drop(DropReason::NoFlow);
            }
        }
        let Some(q) = nat64::parse_quote(&buf[l4at + 8..n]) else { return Verdict::Drop(DropReason::Malformed) };
        let Some((egress, mtu)) = self.egress(dir, Some(&v)) else { return Verdict::Drop(DropReason::NoFlow) };
        let (from, to) = dir.ends(&v);
        let to_v6 = dir == Dir::Out || nat64::unmapped(to.addr).is_none();
        let kind = match (outer_v6, to_v6) {
            (true, true) => Some((kind, code, param)),
            (true, false) => nat64::error_to_v4(kind, code, param, mtu),
            _ => nat64::error_to_v6(kind, code, param, q.l4_len + 20, mtu),
        };
        let Some(kind) = kind else { return Verdict::Drop(DropReason::UnsupportedProtocol) };
        // The quoted packet went the other way: its ends are swapped, and
        // an echo's identifier is the one this side of the flow uses.
        let mut ends = QuotedEnds { src: to.addr, sport: to.port, dst: from.addr, dport: from.port };
        if proto == Protocol::Icmp {
            let id = if dir == Dir::Out { v.ckey.consumer().port } else { v.pkey.nat().port };
            (ends.sport, ends.dport) = (id, id);
        }
        let strip = |a: u128| if to_v6 { a } else { u128::from(nat64::unmapped(a).unwrap_or(0)) };
        (ends.src, ends.dst) = (strip(ends.src), strip(ends.dst));
        let len =
            nat64::build_error(&mut self.reply[..], to_v6, kind, strip(from.addr), strip(to.addr), hops - 1, &q, ends);
        if len == 0 || len > buf.len() || len > usize::from(mtu) {
            return Verdict::Drop(DropReason::TooBig);
        }
        buf[..len].copy_from_slice(&self.reply[..len]);
        ep.shared.counters.get(self.w).add(dir.inbound(), n, 1);
        Verdict::Forward(egress)
    }

    /// An ICMPv6 error about `orig` from `src` to its source, rate-limited
    /// per worker (RFC 4443 §2.4 (f)). The callers never answer an ICMPv6
    /// error or a fragment, and the source is unicast (martian sources
    /// were dropped): §2.4 (e).
    fn answer6(&mut self, orig: &[u8], src: u128, kind: u8, code: u8, param: u32, reason: DropReason) -> Verdict {
        if !self.icmp.take(self.now) {
            return Verdict::Drop(reason);
        }
        match wire::icmpv6::build_icmpv6_error(&mut self.reply[..], orig, src, kind, code, param) {
            0 => Verdict::Drop(reason),
            len => Verdict::Reply { reason, len },
        }
    }
}

/// The drop reason for an IPv6 packet the header chain walk refused.
fn refused6(e: wire::ipv6::Refused6) -> DropReason {
    use wire::ipv6::Refused6;
    match e {
        Refused6::Malformed(_) | Refused6::BadFragment => DropReason::Malformed,
        Refused6::SourceRoute => DropReason::SourceRoute,
        Refused6::UnknownHeader(_) | Refused6::ChainTooLong => DropReason::UnsupportedProtocol,
    }
}

/// Steps 6 to 12 for a later fragment whose first fragment was translated
/// with `m` (held or not); returns its length.
fn fragment_steps(snap: &Snapshot, w: usize, buf: &mut [u8], m: Mapping) -> Result<usize, DropReason> {
    let Some(ep) = snap.endpoint_by_id(m.endpoint) else { return Err(DropReason::NoFlow) };
    if !ep.shared.approved() {
        return Err(DropReason::NotApproved);
    }
    let mut pkt = Ipv4Packet::new_unchecked(&mut *buf);
    if pkt.ttl() <= 1 {
        return Err(DropReason::TtlExpired);
    }
    let (len, df) = (pkt.total_len(), pkt.dont_frag());
    if len > usize::from(m.mtu) && df {
        return Err(DropReason::TooBig);
    }
    pkt.forward_rewrite(m.src, m.dst);
    ep.shared.counters.get(w).add(m.egress == Egress::Provider, len, 1);
    Ok(len)
}

/// Translates a held fragment released by its first fragment; counts it
/// as a drop of network `net` (`u16::MAX`: provider) if it may not leave.
pub(crate) fn release(engine: &Engine, snap: &Snapshot, w: usize, net: u16, m: Mapping, buf: &mut [u8]) -> bool {
    match fragment_steps(snap, w, buf, m) {
        Ok(_) => true,
        Err(r) => {
            let dir = if net == u16::MAX { Dir::Out } else { Dir::In(NetworkId(net)) };
            count_drop(engine, snap, w, dir, r, 1);
            false
        }
    }
}

/// Steps 6 to 12 for a later IPv6 fragment whose first fragment was
/// translated with `m` (held or not): its addresses rewritten (it holds
/// no transport header), or its header translated to IPv4 when `m`'s
/// addresses are IPv4-mapped (RFC 7915 §5.1.1); returns its new length.
fn fragment_steps6(snap: &Snapshot, w: usize, buf: &mut [u8], m: Mapping<V6>) -> Result<usize, DropReason> {
    let Some(ep) = snap.endpoint_by_id(m.endpoint) else { return Err(DropReason::NoFlow) };
    if !ep.shared.approved() {
        return Err(DropReason::NotApproved);
    }
    let Ok(p) = Ipv6Packet::new_checked(&*buf) else { return Err(DropReason::Malformed) };
    let (Some(f), at, hops) = (p.fragment(), p.l4_offset(), p.hop_limit()) else { return Err(DropReason::Malformed) };
    if hops <= 1 {
        return Err(DropReason::TtlExpired);
    }
    let len = buf.len();
    let out = match (wire::nat64::unmapped(m.src), wire::nat64::unmapped(m.dst)) {
        (Some(s4), Some(d4)) => {
            let next = buf[usize::from(f.at)];
            if next != wire::proto::TCP && next != wire::proto::UDP {
                return Err(DropReason::UnsupportedProtocol);
            }
            match wire::nat64::to_ipv4(buf, len, at, next, s4, d4, None, 0, Some(f), false) {
                Some(n) => n,
                None => return Err(DropReason::TooBig),
            }
        }
        _ => {
            if len > usize::from(m.mtu) {
                return Err(DropReason::TooBig);
            }
            wire::ipv6::forward_rewrite(buf, m.src, m.dst);
            len
        }
    };
    ep.shared.counters.get(w).add(m.egress == Egress::Provider, len, 1);
    Ok(out)
}

/// [`release`] for a held IPv6 fragment; returns its length once
/// translated (0: counted as a drop).
pub(crate) fn release6(engine: &Engine, snap: &Snapshot, w: usize, net: u16, m: Mapping<V6>, buf: &mut [u8]) -> usize {
    match fragment_steps6(snap, w, buf, m) {
        Ok(n) => n,
        Err(r) => {
            let dir = if net == u16::MAX { Dir::Out } else { Dir::In(NetworkId(net)) };
            count_drop(engine, snap, w, dir, r, 1);
            0
        }
    }
}

/// Counts `n` drops for reason `r`: consumer side by network, provider
/// side apart.
pub(crate) fn count_drop(engine: &Engine, snap: &Snapshot, w: usize, dir: Dir, r: DropReason, n: u64) {
    let net = match dir {
        Dir::In(n) => snap.network(n),
        Dir::Out => None,
    };
    let counters = match net {
        Some((n, _)) => n.drops.get(w),
        // Provider side, or a network detached while its packet was in
        // flight: counted on the provider side rather than lost.
        None => engine.provider_drops.get(w),
    };
    crate::counters::bump(&counters.0[r.index()], n);
}

/// A consumer-side flow key; an ICMP echo's endpoint side has no port.
#[inline(always)]
fn consumer_key<F: Family>(net: NetworkId, proto: Protocol, consumer: End<F>, endpoint: End<F>) -> ConsumerKey<F> {
    let eport = if proto == Protocol::Icmp { 0 } else { endpoint.port };
    ConsumerKey::of(net.0, proto.number(), consumer.addr, consumer.port, endpoint.addr, eport)
}

/// A provider-side flow key; an ICMP echo's backend side has no port.
#[inline(always)]
fn provider_key<F: Family>(proto: Protocol, nat: End<F>, backend: End<F>) -> ProviderKey<F> {
    let bport = if proto == Protocol::Icmp { 0 } else { backend.port };
    ProviderKey::of(proto.number(), nat.addr, nat.port, backend.addr, bport)
}

/// Which of `n` NAT IPs a consumer address uses: a fixed hash, so the same
/// consumer always gets the same NAT IP (RFC 4787 REQ-2), in every run.
#[inline]
pub fn nat_ip_index(network: u16, consumer: u32, n: usize) -> usize {
    nat_index(network, u64::from(consumer), n)
}

/// [`nat_ip_index`] for a consumer address of any family, folded to 64
/// bits ([`Family::fold_addr`]; an IPv4 address is its own value).
#[inline]
fn nat_index(network: u16, consumer: u64, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let x = (u64::from(network) << 32 ^ consumer).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 32) % n as u64) as usize
}
