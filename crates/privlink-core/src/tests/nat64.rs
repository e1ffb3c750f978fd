//! IPv6 endpoints of IPv4 services (RFC 6146 state, RFC 7915 headers):
//! built packets through the worker both ways, every checksum checked by
//! etherparse's full recomputation. Network b's IPv6 endpoint reaches the
//! IPv4 service b; network a's, with the same client and endpoint
//! addresses, the IPv6 service a.

use super::ipv6::{desired6, fwd, inspect6, ping6, tcp6, udp6, BACKEND6_A, CLIENT6, EP6, NAT6_A};
use super::*;
use crate::wire::nat64::GROWTH;
use std::net::{IpAddr, Ipv6Addr};

fn desired64() -> Desired {
    let mut d = desired6();
    d.endpoints[3].service = 1;
    d
}

fn engine64() -> (Arc<Engine>, Worker) {
    engine_with(small(), &desired64())
}

/// `v` with room to grow into (a packet translated to IPv6 needs it).
fn roomy(mut v: Vec<u8>) -> Vec<u8> {
    v.resize(v.len() + GROWTH, 0);
    v
}

/// The packet a translation left in `v`.
fn packet(v: &[u8]) -> &[u8] {
    &v[..wire::packet_len(v)]
}

/// A backend's IPv4 reply to `v` (addresses and ports swapped; the
/// checksum stays valid), with room.
fn swap4(v: &[u8]) -> Vec<u8> {
    let mut r = v.to_vec();
    r[12..16].copy_from_slice(&v[16..20]);
    r[16..20].copy_from_slice(&v[12..16]);
    r[20..22].copy_from_slice(&v[22..24]);
    r[22..24].copy_from_slice(&v[20..22]);
    roomy(r)
}

#[test]
fn one_ula_client_reaches_an_ipv6_service_in_one_tenant_and_an_ipv4_one_in_the_other() {
    let (e, mut w) = engine64();
    // Tenant a: 6 -> 6, as before.
    let mut syn_a = tcp6(CLIENT6, 40000, EP6, 80, "S", &[]);
    fwd(w.process(&mut syn_a, Source::Network(NET_A), Now(1)));
    assert_eq!(inspect6(&syn_a).2, BACKEND6_A);
    // Tenant b: the same SYN becomes IPv4, from the NAT address to the
    // backend, 20 bytes shorter, TTL = hop limit - 1.
    let syn = tcp6(CLIENT6, 40000, EP6, 80, "S", b"hello");
    let mut b = syn.clone();
    assert_eq!(fwd(w.process(&mut b, Source::Network(NET_B), Now(1))), Egress::Provider);
    let out = packet(&b).to_vec();
    assert_eq!(out.len(), syn.len() - 20);
    let (s, nport, d, dp, ok) = inspect(&out);
    assert_eq!((s, d, dp), (NAT_B, BACKEND_B, 8080));
    assert!(ok, "IPv4 header and TCP checksums");
    assert_eq!((out[8], out[1]), (63, 0), "TTL, TOS");
    assert_eq!(&out[out.len() - 5..], b"hello");
    // The backend's SYN-ACK comes back as IPv6 to the client.
    let mut synack = swap4(&out);
    synack[20 + 13] = 0x12;
    let c = u16::from_be_bytes([synack[36], synack[37]]);
    let mut dlt = checksum::Delta::default();
    dlt.word(0x0002, 0x0012);
    synack[36..38].copy_from_slice(&dlt.apply(c).to_be_bytes());
    assert_eq!(fwd(w.process(&mut synack, Source::Provider, Now(1))), Egress::Network(NET_B));
    let back = packet(&synack).to_vec();
    assert_eq!(back.len(), out.len() + 20);
    let (s, sp, d, dp, hops, ok) = inspect6(&back);
    assert_eq!((s, sp, d, dp, hops, ok), (EP6, 80, CLIENT6, 40000, 62, true), "the backend sent TTL 63");
    // Listed with the service's own IPv4 addresses.
    let flows = e.flow_list(Some("pe6-b"), Now(1));
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].nat, flows[0].backend.ip()), ((NAT_B, nport).into(), IpAddr::from(BACKEND_B)));
    assert_eq!(flows[0].state, "opening");
    assert_eq!(e.flow_list(Some("pe6-a"), Now(1))[0].nat.ip(), IpAddr::from(NAT6_A));
}

#[test]
fn udp_and_echo_translate_both_ways_with_checksums() {
    let (e, mut w) = engine64();
    let mut q = udp6(CLIENT6, 5000, EP6, 53, b"query");
    fwd(w.process(&mut q, Source::Network(NET_B), Now(1)));
    let out = packet(&q).to_vec();
    let (s, nport, d, dp, ok) = inspect(&out);
    assert_eq!((s, d, dp, ok), (NAT_B, BACKEND_B, 5353, true));
    assert_eq!(out[6] & 0x40, 0, "no DF at or below 1,260 bytes (RFC 7915 §5.1)");
    let mut a = swap4(&out);
    assert_eq!(fwd(w.process(&mut a, Source::Provider, Now(1))), Egress::Network(NET_B));
    let (s, sp, d, dp, _, ok) = inspect6(packet(&a));
    assert_eq!((s, sp, d, dp, ok), (EP6, 53, CLIENT6, 5000, true));
    // A UDP reply without checksum (allowed in IPv4) gets one in IPv6.
    let mut z = swap4(&out);
    z[26..28].copy_from_slice(&[0, 0]);
    fwd(w.process(&mut z, Source::Provider, Now(1)));
    assert!(inspect6(packet(&z)).5, "computed");
    // Without room to grow, a reply cannot become IPv6.
    let mut tight = packet(&swap4(&out)).to_vec();
    assert_eq!(w.process(&mut tight, Source::Provider, Now(1)), Verdict::Drop(DropReason::TooBig));

    // ICMPv6 echo <-> ICMP echo.
    let mut p = ping6(CLIENT6, EP6, 777, false);
    fwd(w.process(&mut p, Source::Network(NET_B), Now(1)));
    let out = packet(&p).to_vec();
    let (s, id, d, _, ok) = inspect(&out);
    assert_eq!((s, d, ok, out[20]), (NAT_B, BACKEND_B, true, 8));
    let mut r = roomy(ping(BACKEND_B.octets(), NAT_B.octets(), id, true));
    assert_eq!(fwd(w.process(&mut r, Source::Provider, Now(1))), Egress::Network(NET_B));
    let back = packet(&r).to_vec();
    let (s, id2, d, _, _, ok) = inspect6(&back);
    assert_eq!((s, id2, d, ok, back[40]), (EP6, 777, CLIENT6, true, 129));
    let t = e.snapshot().endpoint_by_name("pe6-b").expect("pe6-b").shared.tally();
    assert_eq!((t.packets_in, t.packets_out, t.flows_created), (2, 3, 2));
    // An IPv4 packet for no flow of either table is still `no_flow`.
    let mut stray = roomy(udp(BACKEND_B.octets(), 5353, NAT_B.octets(), nport.wrapping_add(1), b"x"));
    assert_eq!(w.process(&mut stray, Source::Provider, Now(1)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn mtu_differences_are_answered_in_each_family() {
    let mut d = desired64();
    d.provider_mtu = 1300;
    let (e, mut w) = engine_with(small(), &d);
    // 6 -> 4: an IPv6 packet whose IPv4 form exceeds the provider MTU:
    // Packet Too Big with that MTU + 20.
    let mut big = udp6(CLIENT6, 5000, EP6, 53, &[1u8; 1400]);
    let Verdict::Reply { reason: DropReason::TooBig, len } = w.process(&mut big, Source::Network(NET_B), Now(1)) else {
        panic!("packet too big expected")
    };
    let r = w.reply(len).to_vec();
    assert_eq!((r[40], u32::from_be_bytes([r[44], r[45], r[46], r[47]])), (2, 1320));
    assert!(inspect6(&r).5);
    // One just below: leaves as IPv4 of exactly the MTU.
    let mut fits = udp6(CLIENT6, 5000, EP6, 53, &[1u8; 1300 - 28]);
    fwd(w.process(&mut fits, Source::Network(NET_B), Now(1)));
    let out = packet(&fits).to_vec();
    assert_eq!(out.len(), 1300);
    assert_eq!(out[6] & 0x40, 0x40, "DF above 1,260 bytes");
    // 4 -> 6: network b's MTU is 1,400; a 1,381-byte IPv4 reply with DF
    // becomes 1,401 bytes of IPv6: fragmentation needed, MTU 1,380.
    let (_, nport, _, _, _) = inspect(&out);
    let mut reply = roomy(udp(BACKEND_B.octets(), 5353, NAT_B.octets(), nport, &[2u8; 1381 - 28]));
    reply[6] |= 0x40;
    fix_ip_checksum(&mut reply);
    let Verdict::Reply { reason: DropReason::TooBig, len } = w.process(&mut reply, Source::Provider, Now(1)) else {
        panic!("fragmentation needed expected")
    };
    let r = w.reply(len).to_vec();
    assert_eq!((r[20], r[21], u16::from_be_bytes([r[26], r[27]])), (3, 4, 1380));
    assert_eq!(dropped(&e, Some("vnet-b"), DropReason::TooBig), 1);
    assert_eq!(dropped(&e, None, DropReason::TooBig), 1);
    // With a smaller IPv4 MTU than 1,260, a packet within the threshold
    // leaves without DF in fragments an IPv4 router may make.
    let mut d = desired64();
    d.provider_mtu = 1000;
    let (_, mut w) = engine_with(small(), &d);
    let mut mid = udp6(CLIENT6, 5000, EP6, 53, &[3u8; 1100]);
    assert_eq!(
        w.process(&mut mid, Source::Network(NET_B), Now(1)),
        Verdict::Fragment { to: Egress::Provider, mtu: 1000 }
    );
    let out = packet(&mid);
    assert_eq!((out.len(), out[6] & 0x40), (1128, 0));
    assert_ne!(u16::from_be_bytes([out[4], out[5]]), 0, "an identification for the fragments");
}

/// An ICMP error of `kind`/`code` from `src` to `dst` quoting `quoted`.
fn icmp4_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_raw(kind, code, rest)
        .write(&mut v, quoted)
        .expect("build");
    roomy(v)
}

fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_raw(kind, code, rest)
        .write(&mut v, quoted)
        .expect("build");
    v
}

#[test]
fn icmp_errors_cross_with_their_quotes_translated() {
    let (e, mut w) = engine64();
    let sent = udp6(CLIENT6, 5000, EP6, 53, b"query");
    let mut q = sent.clone();
    fwd(w.process(&mut q, Source::Network(NET_B), Now(1)));
    let out = packet(&q).to_vec();
    let (_, nport, _, _, _) = inspect(&out);
    // The backend's port unreachable about it: an ICMPv6 port unreachable
    // to the client from the endpoint, quoting the client's own datagram.
    let mut err = icmp4_error(BACKEND_B, NAT_B, 3, 3, [0; 4], &out);
    assert_eq!(fwd(w.process(&mut err, Source::Provider, Now(1))), Egress::Network(NET_B));
    let got = packet(&err).to_vec();
    let (s, _, d, _, hops, ok) = inspect6(&got);
    assert_eq!((s, d, hops, ok), (EP6, CLIENT6, 63, true));
    assert_eq!((got[40], got[41]), (1, 4), "destination unreachable, port");
    let mut want = sent.clone();
    want[7] = 63;
    assert_eq!(
        &got[48..],
        &want[..],
        "the quote is the client's datagram as it left (hop limit as the backend saw it)"
    );
    // A router's fragmentation needed (MTU 1,300): Packet Too Big 1,320.
    let mut fneed = icmp4_error(Ipv4Addr::new(192, 168, 1, 1), NAT_B, 3, 4, [0, 0, 0x05, 0x14], &out);
    fwd(w.process(&mut fneed, Source::Provider, Now(1)));
    let got = packet(&fneed).to_vec();
    assert_eq!((got[40], u32::from_be_bytes([got[44], got[45], got[46], got[47]])), (2, 1320));
    assert!(inspect6(&got).5);

    // The client's port unreachable about the reply: an ICMP port
    // unreachable to the backend from the NAT address, quoting the
    // backend's own datagram.
    let reply4 = swap4(&out);
    let mut a = reply4.clone();
    fwd(w.process(&mut a, Source::Provider, Now(1)));
    let reply6 = packet(&a).to_vec();
    let mut err6 = icmp6_error(CLIENT6, EP6, 1, 4, [0; 4], &reply6);
    assert_eq!(fwd(w.process(&mut err6, Source::Network(NET_B), Now(1))), Egress::Provider);
    let got = packet(&err6).to_vec();
    let (s, _, d, _, ok) = inspect(&got);
    assert_eq!((s, d, ok), (NAT_B, BACKEND_B, true));
    assert_eq!((got[20], got[21]), (3, 3));
    let quoted = &got[28..];
    assert_eq!(&quoted[12..20], &[BACKEND_B.octets(), NAT_B.octets()].concat()[..], "backend -> NAT");
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), nport);
    assert_eq!(&quoted[20..], &packet(&reply4)[20..], "the backend's UDP datagram, checksum too");
    // Errors naming no flow, or quoting what privlink did not send, stop.
    let mut forged = icmp6_error(CLIENT6, EP6, 1, 4, [0; 4], &udp6(EP6, 53, CLIENT6, 5999, b"x"));
    assert_eq!(w.process(&mut forged, Source::Network(NET_B), Now(1)), Verdict::Drop(DropReason::NoFlow));
    let t = e.snapshot().endpoint_by_name("pe6-b").expect("pe6-b").shared.tally();
    assert_eq!(t.flows_created, 1, "errors create no flow");
}

#[test]
fn a_provider_side_icmpv6_error_reaches_the_consumer_of_an_ipv6_flow() {
    let (_, mut w) = engine64();
    let sent = udp6(CLIENT6, 5000, EP6, 53, b"query");
    let mut q = sent.clone();
    fwd(w.process(&mut q, Source::Network(NET_A), Now(1)));
    let router: Ipv6Addr = "fd00:50::1".parse().expect("addr");
    let mut err = icmp6_error(router, NAT6_A, 3, 0, [0; 4], &q);
    assert_eq!(fwd(w.process(&mut err, Source::Provider, Now(1))), Egress::Network(NET_A));
    let got = packet(&err).to_vec();
    let (s, _, d, _, _, ok) = inspect6(&got);
    assert_eq!((s, d, ok, got[40]), (EP6, CLIENT6, true, 3));
    let mut want = sent;
    want[7] = 63;
    assert_eq!(&got[48..], &want[..]);
}

/// `whole` (an IPv6 packet without extension headers) as fragments with
/// identification `id`, the first carrying `first` bytes of its payload.
fn fragments6(whole: &[u8], id: u32, first: usize) -> Vec<Vec<u8>> {
    let payload = &whole[40..];
    let mut out = Vec::new();
    for (offset, chunk) in [(0, &payload[..first]), (first, &payload[first..])] {
        let mut p = whole[..40].to_vec();
        p[6] = 44;
        p[4..6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
        let more = u16::from(offset == 0);
        p.extend_from_slice(&[whole[6], 0]);
        p.extend_from_slice(&((offset as u16) | more).to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(chunk);
        out.push(p);
    }
    out
}

/// `whole` (an IPv4 packet without options) as two fragments, the first
/// carrying `first` bytes of its payload.
fn fragments4(whole: &[u8], first: usize) -> Vec<Vec<u8>> {
    let payload = &whole[20..];
    let mut out = Vec::new();
    for (offset, chunk) in [(0, &payload[..first]), (first, &payload[first..])] {
        let mut p = whole[..20].to_vec();
        p[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        let word = (offset / 8) as u16 | if offset == 0 { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&word.to_be_bytes());
        fix_ip_checksum(&mut p);
        p.extend_from_slice(chunk);
        out.push(roomy(p));
    }
    out
}

/// The IPv6 datagram `frags` (translated IPv6 fragments, in order) make,
/// as a whole packet without the Fragment header.
fn reassemble6(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut whole = frags[0][..40].to_vec();
    whole[6] = frags[0][40];
    for f in frags {
        whole.extend_from_slice(&f[48..]);
    }
    let n = (whole.len() - 40) as u16;
    whole[4..6].copy_from_slice(&n.to_be_bytes());
    whole
}

/// The IPv4 datagram `frags` (translated IPv4 fragments, in order) make.
fn reassemble4(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut whole = frags[0][..20].to_vec();
    for f in frags {
        whole.extend_from_slice(&f[20..]);
    }
    let n = whole.len() as u16;
    whole[2..4].copy_from_slice(&n.to_be_bytes());
    whole[6..8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut whole);
    whole
}

#[test]
fn ipv6_fragments_follow_their_first_fragment_and_overlaps_are_refused() {
    let (e, mut w) = engine64();
    let net = Source::Network(NET_A);
    let whole = udp6(CLIENT6, 5000, EP6, 53, &[9u8; 2000]);
    // In order: both rewritten for the IPv6 service.
    let frags = fragments6(&whole, 7, 1232);
    let mut out = Vec::new();
    for f in &frags {
        let mut f = f.clone();
        assert_eq!(fwd(w.process(&mut f, net, Now(1))), Egress::Provider);
        out.push(f);
    }
    assert_eq!(&out[1][8..40], &[NAT6_A.octets(), BACKEND6_A.octets()].concat()[..], "the later fragment too");
    let (s, _, d, dp, _, ok) = inspect6(&reassemble6(&out));
    assert_eq!((s, d, dp, ok), (NAT6_A, BACKEND6_A, 5353, true), "the datagram's checksum holds across fragments");
    // Out of order: the later fragment waits for its first.
    let frags = fragments6(&whole, 8, 1232);
    let mut later = frags[1].clone();
    assert_eq!(w.process(&mut later, net, Now(1)), Verdict::Held);
    assert!(!w.has_ready());
    fwd(w.process(&mut frags[0].clone(), net, Now(1)));
    let mut released = Vec::new();
    w.take_ready(|to, _, b| released.push((to, b.to_vec())));
    assert_eq!(released.len(), 1);
    assert_eq!(&released[0].1[24..40], &BACKEND6_A.octets());
    // An overlapping fragment refuses its datagram, and what follows.
    let frags = fragments6(&whole, 9, 1232);
    fwd(w.process(&mut frags[0].clone(), net, Now(1)));
    let mut overlap = frags[1].clone();
    overlap[42..44].copy_from_slice(&1224u16.to_be_bytes()); // 8 bytes into the first
    assert_eq!(w.process(&mut overlap, net, Now(1)), Verdict::Drop(DropReason::Malformed));
    assert_eq!(w.process(&mut frags[1].clone(), net, Now(1)), Verdict::Drop(DropReason::Malformed));
    // A first fragment too short for the transport header (RFC 7112).
    let mut tiny = fragments6(&whole, 10, 8)[0].clone();
    tiny.truncate(40 + 8 + 4);
    tiny[4..6].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(w.process(&mut tiny, net, Now(1)), Verdict::Drop(DropReason::Malformed));
    assert!(dropped(&e, Some("vnet-a"), DropReason::Malformed) >= 3);
}

#[test]
fn fragments_cross_between_the_families_both_ways() {
    let (_, mut w) = engine64();
    let net = Source::Network(NET_B);
    let whole = udp6(CLIENT6, 5000, EP6, 53, &[5u8; 2000]);
    let mut out = Vec::new();
    for (i, f) in fragments6(&whole, 0x0001_2345, 1232).into_iter().enumerate() {
        let mut f = f;
        let v = w.process(&mut f, net, Now(1));
        assert_eq!(v, Verdict::Forward(Egress::Provider), "fragment {i}");
        out.push(packet(&f).to_vec());
    }
    // IPv4 fragments: the identification's low 16 bits, offsets, MF, no DF.
    assert_eq!((&out[0][4..8], &out[1][4..8]), (&[0x23, 0x45, 0x20, 0][..], &[0x23, 0x45, 0, 154][..]));
    let (s, nport, d, dp, ok) = inspect(&reassemble4(&out));
    assert_eq!((s, d, dp, ok), (NAT_B, BACKEND_B, 5353, true));
    // The backend's fragmented answer: IPv6 fragments with a Fragment
    // header holding the IPv4 identification.
    let mut answer = Vec::new();
    PacketBuilder::ipv4(BACKEND_B.octets(), NAT_B.octets(), 64)
        .udp(5353, nport)
        .write(&mut answer, &[6u8; 2000])
        .expect("build");
    answer[4..6].copy_from_slice(&0x0bcdu16.to_be_bytes());
    fix_ip_checksum(&mut answer);
    let mut back = Vec::new();
    for f in fragments4(&answer, 1200) {
        let mut f = f;
        assert_eq!(fwd(w.process(&mut f, Source::Provider, Now(1))), Egress::Network(NET_B));
        back.push(packet(&f).to_vec());
    }
    assert_eq!((back[0][6], back[0][40], &back[0][42..48]), (44, 17, &[0, 1, 0, 0, 0x0b, 0xcd][..]));
    assert_eq!(&back[1][42..44], &1200u16.to_be_bytes(), "offset, last");
    // Too big for network b (MTU 1,400) once IPv6, without DF: dropped.
    let mut big = fragments4(&answer, 1368)[0].clone();
    assert_eq!(w.process(&mut big, Source::Provider, Now(1)), Verdict::Drop(DropReason::TooBig));
    let (s, sp, d, dp, _, ok) = inspect6(&reassemble6(&back));
    assert_eq!((s, sp, d, dp, ok), (EP6, 53, CLIENT6, 5000, true));
}

/// A TCP segment over IPv6 with sequence `seq`, ACK `ack` if given.
#[allow(clippy::too_many_arguments)]
fn tcp6_seq(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    syn: bool,
    seq: u32,
    ack: Option<u32>,
    data: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).tcp(sport, dport, seq, 65535);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, data).expect("build");
    roomy(v)
}

/// (sequence, acknowledgement, payload) of a TCP segment of either family,
/// its checksums checked.
fn tcp_any(v: &[u8]) -> (u32, u32, Vec<u8>) {
    let v = packet(v);
    let ok = if v[0] >> 4 == 6 { inspect6(v).5 } else { inspect(v).4 };
    assert!(ok, "checksums");
    let p = SlicedPacket::from_ip(v).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    (t.sequence_number(), t.acknowledgment_number(), t.payload().to_vec())
}

#[test]
fn a_proxy_header_carries_the_ipv6_consumer_to_ipv4_and_ipv6_backends() {
    let mut d = desired64();
    d.services[1].proxy = Some(ProxyTlv::Azure); // IPv4 service b: 6 -> 4
    d.services[2].proxy = Some(ProxyTlv::None); // IPv6 service a: 6 -> 6
    let (e, mut w) = engine_with(small(), &d);
    for (net, nat, backend, v6) in [
        (NET_B, std::net::IpAddr::from(NAT_B), std::net::IpAddr::from(BACKEND_B), false),
        (NET_A, NAT6_A.into(), BACKEND6_A.into(), true),
    ] {
        let c = Source::Network(net);
        let mut syn = tcp6_seq(CLIENT6, 40000, EP6, 80, true, 1000, None, b"");
        fwd(w.process(&mut syn, c, Now(1)));
        let nport = u16::from_be_bytes(if v6 { [syn[40], syn[41]] } else { [syn[20], syn[21]] });
        // The backend's SYN-ACK, in its own family.
        let mut synack = match (nat, backend) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(b)) => {
                roomy(tcp_seq(b.octets(), 8080, n.octets(), nport, true, 5000, Some(1001), b""))
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(b)) => {
                tcp6_seq(b, 8080, n, nport, true, 5000, Some(1001), b"")
            }
            _ => unreachable!(),
        };
        assert_eq!(fwd(w.process(&mut synack, Source::Provider, Now(1))), Egress::Network(net));
        // The consumer's data completes its handshake: the header goes
        // first, then the data, moved up by the header's length.
        let mut data = tcp6_seq(CLIENT6, 40000, EP6, 80, false, 1001, Some(5001), b"GET /");
        fwd(w.process(&mut data, c, Now(1)));
        let (to, hdr) = w.take_extra().map(|(t, h)| (t, h.to_vec())).expect("a header segment");
        assert_eq!(to, Egress::Provider);
        assert_eq!(hdr[0] >> 4, if v6 { 6 } else { 4 }, "the backend's family");
        let (seq, ack, payload) = tcp_any(&hdr);
        let hl =
            crate::proxy::header_len_for::<crate::addr::V6>(d.services[if v6 { 2 } else { 1 }].proxy.expect("proxy"));
        assert_eq!((seq, ack, payload.len()), (1001, 5001, hl));
        assert_eq!(&payload[12..14], &[0x21, 0x21], "PROXY v2, TCP over IPv6");
        assert_eq!(&payload[16..32], &CLIENT6.octets(), "the consumer's own IPv6 address");
        assert_eq!(&payload[32..48], &EP6.octets());
        assert_eq!(&payload[48..52], &[0x9c, 0x40, 0, 80]);
        let (seq, _, got) = tcp_any(&data);
        assert_eq!((seq, got.as_slice()), (1001 + hl as u32, &b"GET /"[..]));
        // The backend acknowledges header and data: the consumer sees its
        // own numbers.
        let mut ok = match (nat, backend) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(b)) => {
                roomy(tcp_seq(b.octets(), 8080, n.octets(), nport, false, 5001, Some(1006 + hl as u32), b"200"))
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(b)) => {
                tcp6_seq(b, 8080, n, nport, false, 5001, Some(1006 + hl as u32), b"200")
            }
            _ => unreachable!(),
        };
        assert_eq!(fwd(w.process(&mut ok, Source::Provider, Now(1))), Egress::Network(net));
        assert_eq!(tcp_any(&ok).1, 1006);
        assert!(w.take_extra().is_none());
    }
    assert_eq!(e.queue_proxy_resends(), 0, "both headers acknowledged");
}

/// One connection from `CLIENT6` port `sport` through tenant b's IPv6
/// endpoint of the IPv4 service (SYN, SYN-ACK, data, FIN both ways): it
/// ends closed, its port held until reclaimed.
fn closed_connection64(w: &mut Worker, sport: u16) -> Verdict {
    let b = Source::Network(NET_B);
    let mut syn = tcp6_seq(CLIENT6, sport, EP6, 80, true, 1000, None, b"");
    let v = w.process(&mut syn, b, Now(1));
    if v != Verdict::Forward(Egress::Provider) {
        return v;
    }
    let nport = u16::from_be_bytes([syn[20], syn[21]]);
    let fin4 = |seq, ack| {
        let mut v = Vec::new();
        PacketBuilder::ipv4(BACKEND_B.octets(), NAT_B.octets(), 64)
            .tcp(8080, nport, seq, 1000)
            .ack(ack)
            .fin()
            .write(&mut v, b"")
            .expect("build");
        roomy(v)
    };
    let mut fin6 = Vec::new();
    PacketBuilder::ipv6(CLIENT6.octets(), EP6.octets(), 64)
        .tcp(sport, 80, 1004, 1000)
        .ack(5002)
        .fin()
        .write(&mut fin6, b"")
        .expect("build");
    for (p, src) in [
        (
            roomy(tcp_seq(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, true, 5000, Some(1001), b"")),
            Source::Provider,
        ),
        (tcp6_seq(CLIENT6, sport, EP6, 80, false, 1001, Some(5001), b"GET"), b),
        (fin4(5001, 1004), Source::Provider),
        (roomy(fin6), b),
    ] {
        let mut p = p;
        assert!(matches!(w.process(&mut p, src, Now(1)), Verdict::Forward(_)));
    }
    v
}

/// Tenant b's IPv4 endpoint and an IPv6 endpoint of the same IPv4
/// service, which has one NAT port per protocol: both take it from one
/// pool.
fn one_port_shared() -> (Arc<Engine>, Worker) {
    let mut d = desired(2000..=2000, ConnectionState::Approved);
    d.endpoints.push(EndpointSpec {
        link_id: 0,
        name: "pe64-b".into(),
        network: 1,
        ip: EP6.into(),
        service: 1,
        state: ConnectionState::Approved,
        limits: EndpointLimits::default(),
    });
    engine_with(small(), &d)
}

#[test]
fn closed_flows_of_both_tables_give_way_in_the_ipv4_pool_they_share() {
    let (e, mut w) = one_port_shared();
    // A 6->4 connection closes, holding the port; an IPv4 connection
    // needs it: the closed IPv6 flow gives way (before, its queue entry
    // was looked up in the IPv4 table, and the IPv4 connection got the
    // same NAT tuple as the IPv6 flow still there).
    assert_eq!(closed_connection64(&mut w, 30000), Verdict::Forward(Egress::Provider));
    let mut syn = tcp_seq(CLIENT, 31000, EP, 80, true, 1000, None, b"");
    assert_eq!(w.process(&mut syn, Source::Network(NET_B), Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(e.flows6().map(|t| t.len()), Some(0), "the closed IPv6 flow ended for it");
    // And the other way: that IPv4 connection closes, a 6->4 one needs
    // the port.
    let (be, nat) = (BACKEND_B.octets(), NAT_B.octets());
    let fin = |src, sport, dst, dport, seq, ack| {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .tcp(sport, dport, seq, 1000)
            .ack(ack)
            .fin()
            .write(&mut v, b"")
            .expect("build");
        v
    };
    for (p, src) in [
        (tcp_seq(be, 8080, nat, 2000, true, 5000, Some(1001), b""), Source::Provider),
        (tcp_seq(CLIENT, 31000, EP, 80, false, 1001, Some(5001), b"GET"), Source::Network(NET_B)),
        (fin(be, 8080, nat, 2000, 5001, 1004), Source::Provider),
        (fin(CLIENT, 31000, EP, 80, 1004, 5002), Source::Network(NET_B)),
    ] {
        let mut p = p;
        assert!(matches!(w.process(&mut p, src, Now(2)), Verdict::Forward(_)));
    }
    assert_eq!(closed_connection64(&mut w, 30001), Verdict::Forward(Egress::Provider));
    assert_eq!(e.flows().len(), 0, "the closed IPv4 flow ended for it");
    assert_eq!(e.flows6().map(|t| t.len()), Some(1));
}

#[test]
fn an_open_flow_of_one_table_keeps_its_nat_tuple_from_the_other() {
    // The one port is held by an open 6->4 flow: an IPv4 flow to the same
    // backend may not overload it (the tuple would be the same), and the
    // other way round.
    let (e, mut w) = one_port_shared();
    let mut syn6 = tcp6_seq(CLIENT6, 30000, EP6, 80, true, 1000, None, b"");
    fwd(w.process(&mut syn6, Source::Network(NET_B), Now(1)));
    let mut syn = tcp_seq(CLIENT, 31000, EP, 80, true, 1000, None, b"");
    assert!(matches!(
        w.process(&mut syn, Source::Network(NET_B), Now(1)),
        Verdict::Reply { reason: DropReason::PortsExhausted, .. }
    ));
    assert_eq!(e.flows().len(), 0);
    let (e, mut w) = one_port_shared();
    let mut syn = tcp_seq(CLIENT, 31000, EP, 80, true, 1000, None, b"");
    fwd(w.process(&mut syn, Source::Network(NET_B), Now(1)));
    let mut syn6 = tcp6_seq(CLIENT6, 30000, EP6, 80, true, 1000, None, b"");
    assert!(matches!(
        w.process(&mut syn6, Source::Network(NET_B), Now(1)),
        Verdict::Reply { reason: DropReason::PortsExhausted, .. }
    ));
    assert_eq!(e.flows6().map(|t| t.len()), Some(0));
}

#[test]
fn an_ipv4_reply_without_df_too_big_as_ipv6_leaves_in_ipv6_fragments() {
    let (_, mut w) = engine64();
    let mut q = udp6(CLIENT6, 5000, EP6, 53, b"query");
    fwd(w.process(&mut q, Source::Network(NET_B), Now(1)));
    let (_, nport, _, _, _) = inspect(packet(&q));
    // 1,392 bytes of IPv4 without DF: 1,412 as IPv6, over network b's
    // 1,400.
    let mut reply = Vec::new();
    PacketBuilder::ipv4(BACKEND_B.octets(), NAT_B.octets(), 64)
        .udp(5353, nport)
        .write(&mut reply, &[4u8; 1392 - 28])
        .expect("build");
    reply[6] &= !0x40;
    reply[4..6].copy_from_slice(&[0, 1]);
    fix_ip_checksum(&mut reply);
    let mut buf = roomy(reply.clone());
    assert_eq!(
        w.process(&mut buf, Source::Provider, Now(1)),
        Verdict::Fragment { to: Egress::Network(NET_B), mtu: 1400 }
    );
    let whole = packet(&buf).to_vec();
    assert_eq!(
        (whole[6], whole[40], &whole[42..48]),
        (44, 17, &[0, 0, 0, 0, 0, 1][..]),
        "a Fragment header, the IPv4 id"
    );
    // Split as the outbox does: each fragment fits, and they make the
    // datagram again, its checksum right.
    let mut f = wire::ipv6::Fragmenter6::new(&whole, 1400).expect("fragmenter");
    let mut frags = Vec::new();
    let mut out = [0u8; 1400];
    while let Some(n) = f.next_into(&mut out) {
        assert!(n <= 1400);
        frags.push(out[..n].to_vec());
    }
    assert_eq!(frags.len(), 2);
    assert_eq!(&frags[1][42..44], &1352u16.to_be_bytes(), "offset 1,352, last");
    let (s, sp, d, dp, _, ok) = inspect6(&reassemble6(&frags));
    assert_eq!((s, sp, d, dp, ok), (EP6, 53, CLIENT6, 5000, true));
}

/// A packet behind a virtio-net header with NEEDS_CSUM (checksum field at
/// `csum_at` from `l4`, which holds the pseudo-header sum) and, when
/// `gso` > 0, a GSO type, through [`Worker::handle`]; what left.
fn handle_offloaded(w: &mut Worker, pkt: &[u8], l4: usize, gso: (u8, u16), src: Source) -> (Verdict, Vec<Sent>) {
    let mut out = Outbox::new(true);
    let buf = out.read_buf();
    let h = &mut buf[..10];
    h.fill(0);
    h[0] = 1; // NEEDS_CSUM
    h[1] = gso.0;
    h[2..4].copy_from_slice(&((l4 + 20) as u16).to_le_bytes());
    h[4..6].copy_from_slice(&gso.1.to_le_bytes());
    h[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    let csum_off: u16 = if pkt[if pkt[0] >> 4 == 6 { 6 } else { 9 }] == 6 { 16 } else { 6 };
    h[8..10].copy_from_slice(&csum_off.to_le_bytes());
    buf[10..10 + pkt.len()].copy_from_slice(pkt);
    let v = w.handle(&mut out, 10 + pkt.len(), src, Now(1));
    w.end_batch(&mut out);
    (v, drain(&mut out))
}

/// The partial (pseudo-header) checksum form of a built packet's TCP or
/// UDP checksum, as a TUN with offloads hands it over.
fn partial(p: &mut [u8]) {
    let (v6, l4) = if p[0] >> 4 == 6 { (true, 40) } else { (false, usize::from(p[0] & 15) * 4) };
    let proto = if v6 { p[6] } else { p[9] };
    let at = l4 + if proto == 6 { 16 } else { 6 };
    let addrs = if v6 { checksum::sum(&p[8..40]) } else { checksum::sum(&p[12..20]) };
    let sum = addrs + u64::from(proto) + (p.len() - l4) as u64;
    p[at..at + 2].copy_from_slice(&checksum::fold(sum).to_be_bytes());
}

#[test]
fn offloads_follow_a_translation_gso_type_checksum_start_and_fragments() {
    let (_, mut w) = engine64();
    let b = Source::Network(NET_B);
    let mut syn = tcp6(CLIENT6, 40000, EP6, 80, "S", &[]);
    fwd(w.process(&mut syn, b, Now(1)));
    // A TCPv6 super-packet with a partial checksum becomes TCPv4: the
    // virtio-net header's GSO type, checksum start and header length move.
    let mut p = tcp6(CLIENT6, 40000, EP6, 80, "A", &[9u8; 3000]);
    partial(&mut p);
    let (v, sent) = handle_offloaded(&mut w, &p, 40, (4, 1000), b);
    assert_eq!(v, Verdict::Forward(Egress::Provider));
    let [Sent::One(Egress::Provider, out)] = &sent[..] else { panic!("{sent:?}") };
    let h = &out[..10];
    assert_eq!(
        (h[1], u16::from_le_bytes([h[6], h[7]]), u16::from_le_bytes([h[2], h[3]])),
        (1, 20, 40),
        "TCPv4, L4 at 20"
    );
    let mut whole = out.clone();
    crate::outbox::complete_checksum(&mut whole);
    let (s, _, d, dp, ok) = inspect(&whole[10..]);
    assert_eq!((s, d, dp, ok), (NAT_B, BACKEND_B, 8080, true), "the device's completion gives the right checksum");
    // An IPv4 reply without DF too big for network b as IPv6, its UDP
    // checksum partial: completed, then split into IPv6 fragments.
    let mut q = udp6(CLIENT6, 5000, EP6, 53, b"q");
    fwd(w.process(&mut q, b, Now(1)));
    let (_, nport, _, _, _) = inspect(packet(&q));
    let mut r = Vec::new();
    PacketBuilder::ipv4(BACKEND_B.octets(), NAT_B.octets(), 64)
        .udp(5353, nport)
        .write(&mut r, &[3u8; 1500])
        .expect("build");
    r[6] &= !0x40;
    fix_ip_checksum(&mut r);
    partial(&mut r);
    let (v, sent) = handle_offloaded(&mut w, &r, 20, (0, 0), Source::Provider);
    assert_eq!(v, Verdict::Fragment { to: Egress::Network(NET_B), mtu: 1400 });
    let frags: Vec<Vec<u8>> = sent
        .iter()
        .map(|s| match s {
            Sent::One(Egress::Network(NET_B), b) => b[10..].to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(frags.len(), 2);
    assert!(frags.iter().all(|f| f.len() <= 1400 && f[6] == 44));
    let (s, sp, d, dp, _, ok) = inspect6(&reassemble6(&frags));
    assert_eq!((s, sp, d, dp, ok), (EP6, 53, CLIENT6, 5000, true));
}

/// Stress: two workers create an IPv4 and a 6->4 flow at the same
/// instant, over and over, on a service whose pool has one port per
/// protocol: at most one of them may get the NAT tuple (the other is
/// refused), never both.
#[test]
fn racing_ipv4_and_ipv6_creations_never_share_a_nat_tuple() {
    let mut both = 0;
    for round in 0..300u16 {
        let (e, _) = one_port_shared();
        let go = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = [false, true]
            .into_iter()
            .map(|v6| {
                let (e, go) = (e.clone(), go.clone());
                std::thread::spawn(move || {
                    let mut w = e.worker(usize::from(v6));
                    let mut p = if v6 {
                        udp6(CLIENT6, 2000 + round, EP6, 53, b"x")
                    } else {
                        udp(CLIENT, 3000 + round, EP, 53, b"x")
                    };
                    p.resize(p.len() + GROWTH, 0);
                    go.wait();
                    w.process(&mut p, Source::Network(NET_B), Now(1))
                })
            })
            .collect();
        let verdicts: Vec<Verdict> = threads.into_iter().map(|t| t.join().expect("worker")).collect();
        let flows = e.flow_list(None, Now(1));
        assert_eq!(flows.len(), 1, "round {round}: {verdicts:?}\n{flows:#?}");
        both += usize::from(verdicts.iter().all(|v| matches!(v, Verdict::Forward(_))));
    }
    assert_eq!(both, 0, "both forwarded in some round");
}
