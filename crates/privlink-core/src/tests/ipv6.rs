//! IPv6 endpoints to IPv6 services: built packets through the worker in
//! both directions, every checksum checked by etherparse's full
//! recomputation (which knows nothing of RFC 1624).

use super::*;
use etherparse::{Icmpv6Type, IpNumber};
use std::net::{IpAddr, Ipv6Addr};

/// Both tenants use the same ULA client address and endpoint address.
pub(super) const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 0x10);
pub(super) const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 0x5);
pub(super) const NAT6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0x4);
pub(super) const NAT6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0x8);
pub(super) const BACKEND6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x10);
pub(super) const BACKEND6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 0x10);

/// The IPv4 test configuration with two IPv6 services and an IPv6
/// endpoint of each in networks a and b (network b's MTU is 1,400).
pub(super) fn desired6() -> Desired {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    let svc = |name: &str, nat: Ipv6Addr, backend: Ipv6Addr| ServiceSpec {
        proxy: None,
        name: name.into(),
        nat_ips: vec![nat.into()],
        nat_ports: 1024..=65535,
        backends: vec![backend.into()],
        ports: vec![
            PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
            PortRule { protocol: Protocol::Udp, port: 53, backend_port: 5353 },
        ],
    };
    d.services.push(svc("svc6-a", NAT6_A, BACKEND6_A));
    d.services.push(svc("svc6-b", NAT6_B, BACKEND6_B));
    for (name, network, service) in [("pe6-a", 0, 2), ("pe6-b", 1, 3)] {
        d.endpoints.push(EndpointSpec {
            link_id: 0,
            name: name.into(),
            network,
            ip: EP6.into(),
            service,
            state: ConnectionState::Approved,
            limits: EndpointLimits::default(),
        });
    }
    d
}

fn engine6() -> (Arc<Engine>, Worker) {
    engine_with(small(), &desired6())
}

pub(super) fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).tcp(sport, dport, 1000, 65535);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

pub(super) fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(sport, dport).write(&mut v, payload).expect("build");
    v
}

pub(super) fn ping6(src: Ipv6Addr, dst: Ipv6Addr, id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64);
    let b = if reply { b.icmpv6_echo_reply(id, 1) } else { b.icmpv6_echo_request(id, 1) };
    let mut v = Vec::new();
    b.write(&mut v, b"ping6").expect("build");
    v
}

/// Addresses, ports (echo: identifier, 0), hop limit of an IPv6 packet,
/// and whether its transport checksum is what a full recomputation gives.
pub(super) fn inspect6(v: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16, u8, bool) {
    let p = SlicedPacket::from_ip(v).expect("etherparse parses it");
    let Some(NetSlice::Ipv6(ip)) = p.net else { panic!("not ipv6") };
    let h = ip.header().to_header();
    let (s, d) = (Ipv6Addr::from(h.source), Ipv6Addr::from(h.destination));
    let (sp, dp, ok) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            (th.source_port, th.destination_port, th.calc_checksum_ipv6(&h, t.payload()).expect("size") == th.checksum)
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            (uh.source_port, uh.destination_port, uh.calc_checksum_ipv6(&h, u.payload()).expect("size") == uh.checksum)
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let ih = i.header();
            let ok = ih.icmp_type.calc_checksum(h.source, h.destination, i.payload()).expect("size") == ih.checksum;
            let id = match ih.icmp_type {
                Icmpv6Type::EchoRequest(e) | Icmpv6Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (id, 0, ok)
        }
        _ => (0, 0, false),
    };
    (s, sp, d, dp, h.hop_limit, ok)
}

/// The reply a peer would send to `v` (a UDP or TCP packet): addresses and
/// ports swapped; the checksum stays valid (a swap changes no sum).
pub(super) fn swap6(v: &[u8]) -> Vec<u8> {
    let mut r = v.to_vec();
    r[8..24].copy_from_slice(&v[24..40]);
    r[24..40].copy_from_slice(&v[8..24]);
    r[40..42].copy_from_slice(&v[42..44]);
    r[42..44].copy_from_slice(&v[40..42]);
    r
}

pub(super) fn fwd(v: Verdict) -> Egress {
    match v {
        Verdict::Forward(e) => e,
        other => panic!("not forwarded: {other:?}"),
    }
}

#[test]
fn same_ula_client_and_endpoint_in_two_tenants_reach_their_own_ipv6_services() {
    let (e, mut w) = engine6();
    let mut seen = Vec::new();
    for (net, nat, backend) in [(NET_A, NAT6_A, BACKEND6_A), (NET_B, NAT6_B, BACKEND6_B)] {
        let mut syn = tcp6(CLIENT6, 40000, EP6, 80, "S", &[]);
        assert_eq!(fwd(w.process(&mut syn, Source::Network(net), Now(1))), Egress::Provider);
        let (s, sp, d, dp, hops, ok) = inspect6(&syn);
        assert_eq!((s, d, dp, hops), (nat, backend, 8080, 63), "{net:?}");
        assert!(ok, "TCP checksum after the rewrite");
        // The backend answers the NAT address and port.
        let mut synack = swap6(&syn);
        synack[40 + 13] = 0x12; // SYN+ACK
        let c = u16::from_be_bytes([synack[56], synack[57]]);
        let mut dlt = checksum::Delta::default();
        dlt.word(0x0002, 0x0012);
        synack[56..58].copy_from_slice(&dlt.apply(c).to_be_bytes());
        assert_eq!(fwd(w.process(&mut synack, Source::Provider, Now(1))), Egress::Network(net));
        let (s, sp2, d, dp2, _, ok) = inspect6(&synack);
        assert_eq!((s, sp2, d, dp2), (EP6, 80, CLIENT6, 40000));
        assert!(ok);
        seen.push(sp);
    }
    let flows = e.flow_list(None, Now(2));
    assert_eq!(flows.len(), 2);
    assert!(flows.iter().all(|f| f.consumer == "[fd00:aa::10]:40000".parse().expect("addr")));
    let nats: HashSet<IpAddr> = flows.iter().map(|f| f.nat.ip()).collect();
    assert_eq!(nats, HashSet::from([IpAddr::from(NAT6_A), IpAddr::from(NAT6_B)]));
}

#[test]
fn udp_and_echo_both_ways_with_checksums_recomputed_right() {
    let (e, mut w) = engine6();
    let mut q = udp6(CLIENT6, 5000, EP6, 53, b"query");
    assert_eq!(fwd(w.process(&mut q, Source::Network(NET_A), Now(1))), Egress::Provider);
    let (s, sp, d, dp, _, ok) = inspect6(&q);
    assert_eq!((s, d, dp), (NAT6_A, BACKEND6_A, 5353));
    assert!(ok && sp >= 1024);
    let mut a = swap6(&q);
    assert_eq!(fwd(w.process(&mut a, Source::Provider, Now(1))), Egress::Network(NET_A));
    let (s, sp, d, dp, _, ok) = inspect6(&a);
    assert_eq!((s, sp, d, dp, ok), (EP6, 53, CLIENT6, 5000, true));

    let mut p = ping6(CLIENT6, EP6, 777, false);
    assert_eq!(fwd(w.process(&mut p, Source::Network(NET_B), Now(1))), Egress::Provider);
    let (s, id, d, _, _, ok) = inspect6(&p);
    assert_eq!((s, d), (NAT6_B, BACKEND6_B));
    assert!(ok, "ICMPv6 checksum covers the pseudo-header");
    let mut r = ping6(BACKEND6_B, NAT6_B, id, true);
    assert_eq!(fwd(w.process(&mut r, Source::Provider, Now(1))), Egress::Network(NET_B));
    let (s, id2, d, _, _, ok) = inspect6(&r);
    assert_eq!((s, id2, d, ok), (EP6, 777, CLIENT6, true));
    // Counted on the endpoints like IPv4 traffic.
    let snap = e.snapshot();
    let t = snap.endpoint_by_name("pe6-b").expect("pe6-b").shared.tally();
    assert_eq!((t.packets_in, t.packets_out, t.flows_created), (1, 1, 1));
}

#[test]
fn hop_limit_and_mtu_are_answered_as_a_router_would() {
    let (e, mut w) = engine6();
    let mut p = udp6(CLIENT6, 5000, EP6, 53, b"x");
    p[7] = 1;
    let Verdict::Reply { reason: DropReason::TtlExpired, len } = w.process(&mut p, Source::Network(NET_A), Now(1))
    else {
        panic!("time exceeded expected")
    };
    let r = w.reply(len).to_vec();
    let (s, _, d, _, _, ok) = inspect6(&r);
    assert_eq!((s, d, ok), (EP6, CLIENT6, true));
    assert_eq!((r[40], r[41]), (3, 0), "Time Exceeded, hop limit");
    assert_eq!(&r[48..88], &p[..40], "the invoking header quoted");

    // Network b's MTU is 1,400: a 1,401-byte reply toward it is answered
    // with Packet Too Big (IPv6 routers never fragment), MTU 1,400.
    let mut q = udp6(CLIENT6, 5001, EP6, 53, b"q");
    fwd(w.process(&mut q, Source::Network(NET_B), Now(1)));
    let (_, nport, _, _, _, _) = inspect6(&q);
    let mut big = udp6(BACKEND6_B, 5353, NAT6_B, nport, &[7u8; 1401 - 48]);
    assert_eq!(big.len(), 1401);
    let Verdict::Reply { reason: DropReason::TooBig, len } = w.process(&mut big, Source::Provider, Now(1)) else {
        panic!("packet too big expected")
    };
    let r = w.reply(len).to_vec();
    assert_eq!((r[40], u32::from_be_bytes([r[44], r[45], r[46], r[47]])), (2, 1400));
    let (s, _, d, _, _, ok) = inspect6(&r);
    assert_eq!((s, d, ok), (NAT6_B, BACKEND6_B, true));
    assert_eq!(r.len(), 1280, "quotes as much as fits the minimum MTU");
    assert_eq!(dropped(&e, None, DropReason::TooBig), 1);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::TtlExpired), 1);
}

#[test]
fn hostile_ipv6_is_dropped_and_counted() {
    let (e, mut w) = engine6();
    let net = Source::Network(NET_A);
    // Routing header type 0 (RFC 5095) before UDP.
    let mut rh0 = udp6(CLIENT6, 1, EP6, 53, b"x");
    let mut ext = vec![IpNumber::UDP.0, 0, 0, 1, 0, 0, 0, 0];
    ext[3] = 1;
    rh0.splice(40..40, ext);
    rh0[6] = 43;
    let plen = (rh0.len() - 40) as u16;
    rh0[4..6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(w.process(&mut rh0, net, Now(1)), Verdict::Drop(DropReason::SourceRoute));
    // An unknown extension header (253, for experiments).
    let mut unk = udp6(CLIENT6, 1, EP6, 53, b"x");
    unk.splice(40..40, [IpNumber::UDP.0, 0, 0, 0, 0, 0, 0, 0]);
    unk[6] = 253;
    let plen = (unk.len() - 40) as u16;
    unk[4..6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(w.process(&mut unk, net, Now(1)), Verdict::Drop(DropReason::UnsupportedProtocol));
    // Sources no router forwards from, and the endpoint's own address.
    for src in ["ff02::1", "fe80::1", "::", "::ffff:10.1.0.10", "fd00:aa::5"] {
        let mut p = udp6(src.parse().expect("addr"), 1, EP6, 53, b"x");
        assert_eq!(w.process(&mut p, net, Now(1)), Verdict::Drop(DropReason::MartianSource), "{src}");
    }
    // A zero UDP checksum is not allowed over IPv6 (RFC 8200 §8.1).
    let mut z = udp6(CLIENT6, 1, EP6, 53, b"x");
    z[46..48].copy_from_slice(&[0, 0]);
    assert_eq!(w.process(&mut z, net, Now(1)), Verdict::Drop(DropReason::Malformed));
    // Anything but an endpoint of the network.
    let mut other = udp6(CLIENT6, 1, BACKEND6_A, 53, b"x");
    assert_eq!(w.process(&mut other, net, Now(1)), Verdict::Drop(DropReason::NoEndpoint));
    // A fragment whose data would end past 65,535 bytes.
    let mut f = udp6(CLIENT6, 1, EP6, 53, b"12345678");
    f.splice(40..40, [IpNumber::UDP.0, 0, 0xff, 0xf8, 0, 0, 0, 9]);
    f[6] = 44;
    let plen = (f.len() - 40) as u16;
    f[4..6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(w.process(&mut f, net, Now(1)), Verdict::Drop(DropReason::Malformed));
    // A reply for no flow.
    let mut stray = udp6(BACKEND6_A, 5353, NAT6_A, 4000, b"x");
    assert_eq!(w.process(&mut stray, Source::Provider, Now(1)), Verdict::Drop(DropReason::NoFlow));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::MartianSource), 5);
    assert_eq!(e.flow_list(None, Now(1)).len(), 0);
}

#[test]
fn ipv6_flows_expire_and_give_their_ports_back() {
    let (e, mut w) = engine6();
    let mut q = udp6(CLIENT6, 5000, EP6, 53, b"q");
    fwd(w.process(&mut q, Source::Network(NET_A), Now(1)));
    let pool = |e: &Engine| {
        let snap = e.snapshot();
        let p = snap.pools.values().find(|p| p.nat_ip == IpAddr::from(NAT6_A) && p.protocol == Protocol::Udp);
        let p = p.expect("pool");
        p.pool.capacity() - p.pool.available()
    };
    assert_eq!((e.flow_list(None, Now(1)).len(), pool(&e)), (1, 1));
    assert_eq!(e.expire(Now(1 + 300)), 1, "the UDP timeout");
    assert_eq!(e.flow_list(None, Now(302)).len(), 0);
    // Back in the pool once its quarantine is over (as for IPv4).
    e.expire(Now(301 + pool::QUARANTINE_SECS));
    assert_eq!(pool(&e), 0);
    // Disconnecting ends its flows too.
    fwd(w.process(&mut udp6(CLIENT6, 5001, EP6, 53, b"q"), Source::Network(NET_A), Now(500)));
    assert!(e.set_connection_state("pe6-a", ConnectionState::Disconnected, Now(500)));
    assert_eq!(e.flow_list(None, Now(500)).len(), 0);
}

#[test]
fn family_rules_are_enforced_by_apply() {
    let e = Engine::new(small());
    let mut d = desired6();
    d.endpoints[0].service = 2;
    assert_eq!(e.apply(&d, Now(0)), Err(CoreError::FamilyMismatch("pe-a".into())));
    let mut d = desired6();
    d.services[2].backends.push(BACKEND_A.into());
    assert_eq!(e.apply(&d, Now(0)), Err(CoreError::MixedFamilies("svc6-a".into())));
    // An IPv4-only configuration makes no IPv6 table.
    e.apply(&desired(1024..=65535, ConnectionState::Approved), Now(0)).expect("v4");
    assert!(e.flows6().is_none());
}
