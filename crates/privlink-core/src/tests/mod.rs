//! Engine-level tests: built packets through `Worker::process` with a fake
//! clock, checked against etherparse's independent parsing and checksums.

use crate::outbox::{Out, Outbox};
use crate::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proptest::prelude::*;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

const CLIENT: [u8; 4] = [10, 1, 0, 10];
const EP: [u8; 4] = [10, 1, 0, 5];
const NAT_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 4);
const NAT_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 8);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const NET_A: NetworkId = NetworkId(0);
const NET_B: NetworkId = NetworkId(1);

fn desired(nat_ports: std::ops::RangeInclusive<u16>, b_state: ConnectionState) -> Desired {
    let svc = |name: &str, nat: Ipv4Addr, backend: Ipv4Addr| ServiceSpec {
        proxy: None,
        name: name.into(),
        nat_ips: vec![nat],
        nat_ports: nat_ports.clone(),
        backends: vec![backend],
        ports: vec![
            PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
            PortRule { protocol: Protocol::Udp, port: 53, backend_port: 5353 },
        ],
    };
    let ep = |name: &str, network, service, state| EndpointSpec {
        link_id: 0,
        name: name.into(),
        network,
        ip: Ipv4Addr::from(EP),
        service,
        state,
        limits: EndpointLimits::default(),
    };
    Desired {
        provider_mtu: 1500,
        networks: vec![
            NetworkSpec { id: NET_A, name: "vnet-a".into(), mtu: 1500 },
            NetworkSpec { id: NET_B, name: "vnet-b".into(), mtu: 1400 },
        ],
        services: vec![svc("svc-a", NAT_A, BACKEND_A), svc("svc-b", NAT_B, BACKEND_B)],
        endpoints: vec![ep("pe-a", 0, 0, ConnectionState::Approved), ep("pe-b", 1, 1, b_state)],
    }
}

fn engine_with(settings: Settings, d: &Desired) -> (Arc<Engine>, Worker) {
    let e = Engine::new(settings);
    e.apply(d, Now(0)).expect("valid config");
    let w = e.worker(0);
    (e, w)
}

/// Settings with a table small enough to build per proptest case.
fn small() -> Settings {
    Settings { max_flows: 4096, ..Settings::default() }
}

fn engine() -> (Arc<Engine>, Worker) {
    engine_with(small(), &desired(1024..=65535, ConnectionState::Approved))
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, payload).expect("build");
    v
}

fn ping(src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64);
    let b = if reply { b.icmpv4_echo_reply(id, 1) } else { b.icmpv4_echo_request(id, 1) };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").expect("build");
    v
}

/// Recomputes the IP header checksum after a test edits the header.
fn fix_ip_checksum(v: &mut [u8]) {
    v[10..12].copy_from_slice(&[0, 0]);
    let ihl = usize::from(v[0] & 0x0f) * 4;
    let c = checksum::checksum(&v[..ihl]);
    v[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Addresses and ports of a packet, and whether etherparse's full
/// recomputation agrees with every checksum in it.
fn inspect(v: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, bool) {
    let p = SlicedPacket::from_ip(v).expect("etherparse parses it");
    let Some(NetSlice::Ipv4(ip)) = p.net else { panic!("not ipv4") };
    let h = ip.header().to_header();
    let mut ok = h.calc_header_checksum() == h.header_checksum;
    let (s, d) = (Ipv4Addr::from(h.source), Ipv4Addr::from(h.destination));
    let payload = ip.payload().payload;
    let (sp, dp) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            ok &= th.calc_checksum_ipv4(&h, t.payload()).expect("size") == th.checksum;
            (th.source_port, th.destination_port)
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            if uh.checksum != 0 {
                ok &= uh.calc_checksum_ipv4(&h, u.payload()).expect("size") == uh.checksum;
            }
            (uh.source_port, uh.destination_port)
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let ih = i.header();
            ok &= ih.icmp_type.calc_checksum(i.payload()) == ih.checksum;
            let id = u16::from_be_bytes([payload[4], payload[5]]);
            (id, 0)
        }
        _ => (0, 0),
    };
    (s, sp, d, dp, ok)
}

/// Swaps source and destination (addresses and ports): the reply a peer
/// would send, with checksums still valid.
fn swap(v: &mut [u8]) {
    let ihl = usize::from(v[0] & 0x0f) * 4;
    let (a, b) = (v[12..16].to_vec(), v[16..20].to_vec());
    v[12..16].copy_from_slice(&b);
    v[16..20].copy_from_slice(&a);
    if v[9] != 1 {
        let (a, b) = (v[ihl..ihl + 2].to_vec(), v[ihl + 2..ihl + 4].to_vec());
        v[ihl..ihl + 2].copy_from_slice(&b);
        v[ihl + 2..ihl + 4].copy_from_slice(&a);
    } else {
        // Echo request -> reply: type 8 -> 0, fix the checksum incrementally.
        let mut d = checksum::Delta::default();
        d.word(u16::from(v[ihl]) << 8, 0);
        v[ihl] = 0;
        let c = d.apply(u16::from_be_bytes([v[ihl + 2], v[ihl + 3]]));
        v[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
    }
}

fn dropped(e: &Engine, net: Option<&str>, r: DropReason) -> u64 {
    match net {
        None => e.provider_drops()[r.index()],
        Some(n) => {
            let snap = e.snapshot();
            let net = snap.network_list().find(|x| x.name == n).expect("network");
            Engine::network_drops(net)[r.index()]
        }
    }
}

#[test]
fn tcp_round_trip_translates_and_keeps_checksums() {
    let (e, mut w) = engine();
    let mut p = tcp(CLIENT, 40000, EP, 80, "S", b"");
    assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, sp, d, dp, ok) = inspect(&p);
    assert!(ok, "checksums after translation");
    assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 8080));
    assert!(sp >= 1024);
    assert_eq!(p[8], 63, "TTL decremented");

    let mut r = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), sp, "SA", b"hello");
    assert_eq!(w.process(&mut r, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let (s, sp2, d, dp2, ok) = inspect(&r);
    assert!(ok);
    assert_eq!((s, sp2, d, dp2), (Ipv4Addr::from(EP), 80, Ipv4Addr::from(CLIENT), 40000));

    let snap = e.snapshot();
    let ep = &snap.endpoint_by_name("pe-a").expect("pe-a").shared;
    let (bi, pi, bo, po) = ep.totals();
    assert_eq!((bi, pi, bo, po), (40, 1, 45, 1));
    assert_eq!(ep.flows_created.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(e.flows().len(), 1);
}

#[test]
fn overlapping_tenants_stay_apart() {
    let (_e, mut w) = engine();
    let mut a = tcp(CLIENT, 40000, EP, 80, "S", b"");
    let mut b = a.clone();
    assert_eq!(w.process(&mut a, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(w.process(&mut b, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (sa, pa, da, _, _) = inspect(&a);
    let (sb, pb, db, _, _) = inspect(&b);
    assert_eq!((sa, da), (NAT_A, BACKEND_A));
    assert_eq!((sb, db), (NAT_B, BACKEND_B));
    // Replies go back to the network each flow came from.
    let mut ra = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), pa, "SA", b"");
    let mut rb = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), pb, "SA", b"");
    assert_eq!(w.process(&mut ra, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(w.process(&mut rb, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_B)));
    // B's backend cannot reach A's flow by guessing A's NAT port on B's NAT IP.
    let mut x = tcp(BACKEND_B.octets(), 8080, NAT_A.octets(), pa, "A", b"");
    assert_eq!(w.process(&mut x, Source::Provider, Now(1)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn udp_and_icmp_echo() {
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 5000, EP, 53, b"query");
    assert_eq!(w.process(&mut u, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, sp, d, dp, ok) = inspect(&u);
    assert!(ok);
    assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 5353));
    swap(&mut u);
    assert_eq!(w.process(&mut u, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&u), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 5000, true));
    let _ = sp;

    let mut p = ping(CLIENT, EP, 77, false);
    assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let (s, id, d, _, ok) = inspect(&p);
    assert!(ok);
    assert_eq!((s, d), (NAT_A, BACKEND_A));
    let mut r = ping(BACKEND_A.octets(), NAT_A.octets(), id, true);
    assert_eq!(w.process(&mut r, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 77, Ipv4Addr::from(CLIENT), 0, true));
}

#[test]
fn udp_zero_checksum_stays_zero() {
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 5000, EP, 53, b"q");
    u[26..28].copy_from_slice(&[0, 0]);
    assert_eq!(w.process(&mut u, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(&u[26..28], &[0, 0]);
    assert!(inspect(&u).4);
}

#[test]
fn every_drop_reason() {
    let d = desired(2000..=2000, ConnectionState::Pending);
    let (e, mut w) = engine_with(Settings { max_flows: 2, ..Settings::default() }, &d);
    let a = Source::Network(NET_A);
    let cases: Vec<(Vec<u8>, Source, DropReason)> = vec![
        (tcp(CLIENT, 1, [10, 1, 0, 6], 80, "S", b""), a, DropReason::NoEndpoint),
        (tcp(CLIENT, 1, EP, 81, "S", b""), a, DropReason::PortNotAllowed),
        (udp(CLIENT, 1, EP, 54, b""), a, DropReason::PortNotAllowed),
        (tcp(CLIENT, 1, EP, 80, "S", b""), Source::Network(NET_B), DropReason::NotApproved),
        (tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), 2000, "A", b""), Source::Provider, DropReason::NoFlow),
        (tcp(CLIENT, 1, EP, 80, "A", b""), a, DropReason::NoFlow),
        (vec![0x45, 0, 0], a, DropReason::Malformed),
        (vec![0x45, 0, 0], Source::Provider, DropReason::Malformed),
    ];
    for (mut p, src, want) in cases {
        assert_eq!(w.process(&mut p, src, Now(1)), Verdict::Drop(want), "{want}");
    }
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::PortNotAllowed), 2);
    assert_eq!(dropped(&e, Some("vnet-b"), DropReason::NotApproved), 1);
    assert_eq!(dropped(&e, None, DropReason::NoFlow), 1);
    assert_eq!(dropped(&e, None, DropReason::Malformed), 1);

    // unsupported_protocol: GRE to an endpoint.
    let mut g = udp(CLIENT, 1, EP, 53, b"");
    g[9] = 47;
    fix_ip_checksum(&mut g);
    assert_eq!(w.process(&mut g, a, Now(1)), Verdict::Drop(DropReason::UnsupportedProtocol));

    // ttl_expired: answered with time exceeded from the endpoint address.
    let mut t = tcp(CLIENT, 1, EP, 80, "S", b"");
    t[8] = 1;
    fix_ip_checksum(&mut t);
    let Verdict::Reply { reason: DropReason::TtlExpired, len } = w.process(&mut t, a, Now(1)) else {
        panic!("ttl reply")
    };
    let (s, _, dst, _, ok) = inspect(w.reply(len));
    assert!(ok);
    assert_eq!((s, dst), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT)));
    assert_eq!(w.reply(len)[20], 11);

    // ports_exhausted: the pool has one port and one backend, so a second
    // consumer port would need the same provider tuple.
    let mut f1 = tcp(CLIENT, 1, EP, 80, "S", b"");
    assert_eq!(w.process(&mut f1, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut f2 = tcp(CLIENT, 2, EP, 80, "S", b"");
    let Verdict::Reply { reason: DropReason::PortsExhausted, len } = w.process(&mut f2, a, Now(1)) else {
        panic!("exhausted")
    };
    assert_eq!((w.reply(len)[20], w.reply(len)[21]), (3, 13));
    let snap = e.snapshot();
    let pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Tcp).expect("pool");
    assert_eq!((pool.pool.available(), pool.pool.exhausted()), (0, 1));

    // flow_table_full: max_flows is 2 (the TCP flow plus this UDP one).
    let mut u1 = udp(CLIENT, 1, EP, 53, b"");
    assert_eq!(w.process(&mut u1, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut u2 = udp(CLIENT, 2, EP, 53, b"");
    assert_eq!(w.process(&mut u2, a, Now(1)), Verdict::Drop(DropReason::FlowTableFull));

    // too_big: network B has MTU 1400; a 1450-byte DF reply from the backend
    // gets "fragmentation needed" with MTU 1400.
    e.set_connection_state("pe-b", ConnectionState::Approved, Now(1));
    let (e2, mut w2) = engine();
    let _ = &e2;
    let mut syn = tcp(CLIENT, 9, EP, 80, "S", b"");
    assert_eq!(w2.process(&mut syn, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);
    let mut big = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &[7u8; 1410]);
    big[6] |= 0x40;
    fix_ip_checksum(&mut big);
    let Verdict::Reply { reason: DropReason::TooBig, len } = w2.process(&mut big, Source::Provider, Now(1)) else {
        panic!("too big")
    };
    let r = w2.reply(len);
    assert_eq!((r[20], r[21], u16::from_be_bytes([r[26], r[27]])), (3, 4, 1400));
    assert_eq!(inspect(r).0, NAT_B);
}

#[test]
fn malformed_inputs_never_panic() {
    let (e, mut w) = engine();
    let good = udp(CLIENT, 1, EP, 53, b"abcd");
    let mut cases: Vec<Vec<u8>> = vec![vec![], vec![0x45], vec![0x45; 19]];
    let mut v = good.clone();
    v[0] = 0x44; // IHL < 5
    cases.push(v);
    let mut v = good.clone();
    v[0] = 0x4f; // IHL past the end of a 32-byte packet
    cases.push(v);
    let mut v = good.clone();
    v.pop(); // total length larger than the buffer
    cases.push(v);
    let mut v = good.clone();
    v[15] ^= 0xff; // bad header checksum
    cases.push(v);
    let mut v = tcp(CLIENT, 1, EP, 80, "S", b"");
    v[32] = 4 << 4; // TCP data offset < 5
    cases.push(v);
    let mut v = good.clone();
    v[24..26].copy_from_slice(&9u16.to_be_bytes()); // UDP length wrong
    cases.push(v);
    let n = cases.len() as u64;
    for mut c in cases {
        assert_eq!(w.process(&mut c, Source::Network(NET_A), Now(1)), Verdict::Drop(DropReason::Malformed));
    }
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::Malformed), n);
}

#[test]
fn a_burst_of_one_new_flow_takes_one_port() {
    let (e, mut w) = engine();
    for _ in 0..50 {
        let mut p = udp(CLIENT, 7000, EP, 53, b"x");
        assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    }
    assert_eq!(e.flows().len(), 1);
    let snap = e.snapshot();
    let pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Udp).expect("pool");
    assert_eq!(pool.pool.available(), pool.pool.capacity() - 1);
}

#[test]
fn timeouts_follow_a_fake_clock() {
    let (e, mut w) = engine_with(small(), &desired(3000..=3001, ConnectionState::Approved));
    let snap = e.snapshot();
    let udp_pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Udp).expect("pool");
    let tcp_pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Tcp).expect("pool");
    let a = Source::Network(NET_A);

    // UDP: idle 300 s, then the port is quarantined 120 s.
    let mut u = udp(CLIENT, 1, EP, 53, b"");
    w.process(&mut u, a, Now(0));
    assert_eq!(e.expire(Now(299)), 0);
    let mut again = udp(CLIENT, 1, EP, 53, b"");
    w.process(&mut again, a, Now(100)); // refresh
    assert_eq!(e.expire(Now(399)), 0);
    assert_eq!(e.expire(Now(400)), 1);
    assert_eq!(udp_pool.pool.available(), 1, "expired port is quarantined");
    e.expire(Now(400 + pool::QUARANTINE_SECS));
    assert_eq!(udp_pool.pool.available(), 2);

    // TCP: opening times out after the transitory 240 s.
    let mut s = tcp(CLIENT, 2, EP, 80, "S", b"");
    w.process(&mut s, a, Now(1000));
    assert_eq!(e.expire(Now(1239)), 0);
    assert_eq!(e.expire(Now(1240)), 1);

    // TCP: established waits 7440 s; a full close frees the port early and
    // without quarantine.
    let mut s = tcp(CLIENT, 3, EP, 80, "S", b"");
    w.process(&mut s, a, Now(2000));
    let (_, nport, _, _, _) = inspect(&s);
    let mut sa = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "SA", b"");
    assert_eq!(w.process(&mut sa, Source::Provider, Now(2000)), Verdict::Forward(Egress::Network(NET_A)));
    let mut ack = tcp(CLIENT, 3, EP, 80, "A", b"");
    w.process(&mut ack, a, Now(2000));
    assert_eq!(e.flow_list(None, Now(2000))[0].state, "established");
    assert_eq!(e.expire(Now(2000 + 7439)), 0);
    let before = tcp_pool.pool.available();
    let mut fin = tcp(CLIENT, 3, EP, 80, "FA", b"");
    w.process(&mut fin, a, Now(9500));
    let mut fin2 = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "FA", b"");
    w.process(&mut fin2, Source::Provider, Now(9500));
    assert_eq!(e.flow_list(None, Now(9500))[0].state, "closed");
    // The same 5-tuple opening again while the flow lingers gets the same
    // NAT port (the backend may hold that 4-tuple in TIME_WAIT).
    let mut syn = tcp(CLIENT, 3, EP, 80, "S", b"");
    assert_eq!(w.process(&mut syn, a, Now(9530)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&syn).1, nport, "reopened on the same port");
    assert_eq!(e.flow_list(None, Now(9530))[0].state, "opening");
    // The RST at the consumer's next sequence number (the SYN took 1000).
    let mut rst = tcp_rst(CLIENT, 3, EP, 80, 1001, None);
    w.process(&mut rst, a, Now(9540));
    assert_eq!(e.flow_list(None, Now(9540))[0].state, "closed");
    assert_eq!(e.expire(Now(9599)), 0);
    assert_eq!(e.expire(Now(9600)), 1);
    assert_eq!(tcp_pool.pool.available(), before + 1, "closed: no quarantine");

    // RST closes too; ICMP query flows use the ICMP timeout.
    let mut s = tcp(CLIENT, 4, EP, 80, "S", b"");
    w.process(&mut s, a, Now(20000));
    let mut r = tcp_rst(CLIENT, 4, EP, 80, 1001, None);
    w.process(&mut r, a, Now(20000));
    assert_eq!(e.expire(Now(20059)), 0);
    assert_eq!(e.expire(Now(20060)), 1);
    let mut p = ping(CLIENT, EP, 5, false);
    w.process(&mut p, a, Now(30000));
    assert_eq!(e.expire(Now(30059)), 0);
    assert_eq!(e.expire(Now(30060)), 1);
}

#[test]
fn icmp_errors_never_touch_flows() {
    let (e, mut w) = engine();
    let mut u = udp(CLIENT, 1, EP, 53, b"");
    w.process(&mut u, Source::Network(NET_A), Now(0));
    let (_, nport, _, _, _) = inspect(&u);
    // A port unreachable from the backend about that flow.
    let mut err = Vec::new();
    PacketBuilder::ipv4(BACKEND_A.octets(), NAT_A.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &udp(NAT_A.octets(), nport, BACKEND_A.octets(), 5353, b"")[..28])
        .expect("build");
    assert_eq!(w.process(&mut err, Source::Provider, Now(200)), Verdict::Forward(Egress::Network(NET_A)));
    // Translated for the consumer: from the endpoint, about the datagram the
    // consumer sent, every checksum right.
    let (s, _, d, _, ok) = inspect(&err);
    assert!(ok, "outer IP and ICMP checksums");
    assert_eq!((s, d), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT)));
    let quoted = &err[28..];
    assert_eq!(checksum::fold(checksum::sum(&quoted[..20])), 0xffff, "quoted IP checksum");
    assert_eq!(&quoted[12..16], &CLIENT);
    assert_eq!(&quoted[16..20], &EP);
    assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 1);
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 53);
    // It did not refresh the flow: it still expires 300 s after its packet.
    assert_eq!(e.expire(Now(300)), 1);
    // Now there is no flow: the same error is dropped.
    let mut again = Vec::new();
    PacketBuilder::ipv4(BACKEND_A.octets(), NAT_A.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut again, &udp(NAT_A.octets(), nport, BACKEND_A.octets(), 5353, b"")[..28])
        .expect("build");
    assert_eq!(w.process(&mut again, Source::Provider, Now(301)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn icmp_errors_from_the_consumer_and_bad_ones() {
    let (_e, mut w) = engine();
    let mut syn = tcp(CLIENT, 40000, EP, 80, "S", b"");
    w.process(&mut syn, Source::Network(NET_A), Now(0));
    let (_, nport, _, _, _) = inspect(&syn);
    // The consumer answers the endpoint's SYN-ACK with an unreachable.
    let mut synack = tcp(EP, 80, CLIENT, 40000, "SA", b"");
    synack.truncate(48); // IP header + the first 28 bytes of TCP
    let quote = synack.clone();
    let mut err = Vec::new();
    PacketBuilder::ipv4(CLIENT, EP, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &quote)
        .expect("build");
    let mut bad = err.clone();
    assert_eq!(w.process(&mut err, Source::Network(NET_A), Now(5)), Verdict::Forward(Egress::Provider));
    let (s, _, d, _, ok) = inspect(&err);
    assert!(ok);
    assert_eq!((s, d), (NAT_A, BACKEND_A));
    let q = &err[28..];
    assert_eq!(checksum::fold(checksum::sum(&q[..20])), 0xffff);
    assert_eq!((&q[12..16], &q[16..20]), (&BACKEND_A.octets()[..], &NAT_A.octets()[..]));
    assert_eq!(u16::from_be_bytes([q[20], q[21]]), 8080);
    assert_eq!(u16::from_be_bytes([q[22], q[23]]), nport);
    // A bad ICMP checksum: dropped.
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    assert_eq!(w.process(&mut bad, Source::Network(NET_A), Now(5)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn reload_keeps_unchanged_flows_and_ends_removed_ones() {
    let (e, mut w) = engine();
    let mut a = tcp(CLIENT, 1, EP, 80, "S", b"");
    let mut b = tcp(CLIENT, 1, EP, 80, "S", b"");
    w.process(&mut a, Source::Network(NET_A), Now(0));
    w.process(&mut b, Source::Network(NET_B), Now(0));
    let (_, pa, _, _, _) = inspect(&a);
    assert_eq!(e.flows().len(), 2);
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints.pop(); // remove pe-b
    d.endpoints.push(EndpointSpec {
        link_id: 0,
        name: "pe-new".into(),
        network: 0,
        ip: Ipv4Addr::new(10, 1, 0, 6),
        service: 1,
        state: ConnectionState::Approved,
        limits: EndpointLimits::default(),
    });
    let report = e.apply(&d, Now(1)).expect("apply");
    assert_eq!(report.endpoints_kept, vec!["pe-a".to_string()]);
    assert_eq!(report.endpoints_removed, vec!["pe-b".to_string()]);
    assert_eq!(report.endpoints_added, vec!["pe-new".to_string()]);
    assert_eq!(report.flows_ended, 1);
    assert_eq!(e.flows().len(), 1);
    let mut ra = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), pa, "SA", b"");
    assert_eq!(w.process(&mut ra, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let mut n = tcp(CLIENT, 1, [10, 1, 0, 6], 80, "S", b"");
    assert_eq!(w.process(&mut n, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&n).2, BACKEND_B);
    // Reject ends the endpoint's flows and drops its packets.
    assert!(e.set_connection_state("pe-a", ConnectionState::Rejected, Now(2)));
    let mut again = tcp(CLIENT, 1, EP, 80, "A", b"");
    assert_eq!(w.process(&mut again, Source::Network(NET_A), Now(2)), Verdict::Drop(DropReason::NotApproved));
    assert_eq!(e.flow_list(Some("pe-a"), Now(2)).len(), 0);
}

#[test]
fn bad_desired_is_refused_without_panic() {
    let e = Engine::new(Settings::default());
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].backends.clear();
    assert_eq!(e.apply(&d, Now(0)), Err(CoreError::NoBackends("svc-a".into())));
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].nat_ips = vec![NAT_A; 9];
    assert!(matches!(e.apply(&d, Now(0)), Err(CoreError::NatIpCount(..))));
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints[1].network = 0;
    assert!(matches!(e.apply(&d, Now(0)), Err(CoreError::DuplicateEndpointAddress(..))));
}

#[test]
fn one_consumer_address_keeps_one_nat_ip() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].nat_ips = (1..=8).map(|i| Ipv4Addr::new(192, 168, 100, i)).collect();
    let (_e, mut w) = engine_with(small(), &d);
    let mut nats = HashSet::new();
    for port in 0..200u16 {
        let mut p = tcp(CLIENT, 10_000 + port, EP, 80, "S", b"");
        w.process(&mut p, Source::Network(NET_A), Now(0));
        nats.insert(inspect(&p).0);
    }
    assert_eq!(nats.len(), 1);
    let mut spread = HashSet::new();
    for host in 1..=64u8 {
        let mut p = tcp([10, 1, 1, host], 10_000, EP, 80, "S", b"");
        w.process(&mut p, Source::Network(NET_A), Now(0));
        spread.insert(inspect(&p).0);
    }
    assert!(spread.len() >= 6, "64 consumers over 8 NAT IPs used {}", spread.len());
}

#[test]
fn concurrent_workers_never_share_a_live_tuple() {
    let e = Engine::new(Settings { workers: 4, ..Settings::default() });
    e.apply(&desired(5000..=5999, ConnectionState::Approved), Now(0)).expect("apply");
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let mut w = e.worker(t);
            std::thread::spawn(move || {
                let mut fwd = 0;
                for i in 0..400u16 {
                    // Threads overlap on half their flows, racing on setup.
                    let port = if i % 2 == 0 { 20_000 + i } else { 30_000 + i + 1000 * t as u16 };
                    let mut p = udp(CLIENT, port, EP, 53, b"");
                    if w.process(&mut p, Source::Network(NET_A), Now(0)) == Verdict::Forward(Egress::Provider) {
                        fwd += 1;
                    }
                }
                fwd
            })
        })
        .collect();
    let forwarded: u32 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(forwarded, 1600);
    let flows = e.flow_list(None, Now(0));
    assert_eq!(flows.len(), 200 + 4 * 200);
    let tuples: HashSet<_> = flows.iter().map(|f| (f.nat, f.backend)).collect();
    assert_eq!(tuples.len(), flows.len(), "a live provider tuple was handed out twice");
}

fn arb_packet() -> impl Strategy<Value = (Vec<u8>, u8)> {
    let payload = proptest::collection::vec(any::<u8>(), 0..200);
    (0u8..3, any::<[u8; 4]>(), any::<u16>(), payload, 3u8..=255, any::<bool>()).prop_map(
        |(kind, src, sport, payload, ttl, zero_udp)| {
            let b = PacketBuilder::ipv4(src, EP, ttl);
            let mut v = Vec::new();
            match kind {
                0 => b.tcp(sport, 80, 7, 1000).syn().write(&mut v, &payload),
                1 => b.udp(sport, 53).write(&mut v, &payload),
                _ => b.icmpv4_echo_request(sport, 3).write(&mut v, &payload),
            }
            .expect("build");
            if kind == 1 && zero_udp {
                v[26..28].copy_from_slice(&[0, 0]);
            }
            (v, kind)
        },
    )
}

proptest! {
    #[test]
    fn translation_checksums_equal_full_recomputation((pkt, kind) in arb_packet()) {
        let (_e, mut w) = engine();
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        prop_assume!(!wire::is_martian_source(u32::from(src)));
        let original = pkt.clone();
        let mut p = pkt;
        prop_assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(0)), Verdict::Forward(Egress::Provider));
        let (s, _, d, _, ok) = inspect(&p);
        prop_assert!(ok, "checksums differ from etherparse's recomputation");
        prop_assert_eq!((s, d), (NAT_A, BACKEND_A));
        let l7 = if kind == 0 { 40 } else { 28 };
        prop_assert_eq!(&p[l7..], &original[l7..], "payload untouched");

        // The backend answers with the mirror image; reversing gives back
        // the original packet, mirrored, with TTL down by two.
        swap(&mut p);
        prop_assert_eq!(w.process(&mut p, Source::Provider, Now(0)), Verdict::Forward(Egress::Network(NET_A)));
        prop_assert!(inspect(&p).4);
        let mut want = original.clone();
        swap(&mut want);
        want[8] -= 2;
        fix_ip_checksum(&mut want);
        prop_assert_eq!(p, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), provider in any::<bool>()) {
        let (_e, mut w) = engine();
        let mut b = bytes;
        let src = if provider { Source::Provider } else { Source::Network(NET_A) };
        let _ = w.process(&mut b, src, Now(0));
    }
}

/// Turns a built TCP packet's checksum into the partial form a TUN with
/// offloads hands over (`NEEDS_CSUM`): the folded pseudo-header sum.
fn make_partial(p: &mut [u8]) {
    let l4 = (p.len() - 20) as u64;
    let sum = checksum::sum(&p[12..20]) + 6 + l4;
    p[36..38].copy_from_slice(&checksum::fold(sum).to_be_bytes());
}

/// Completes a partial checksum as the device would: the one's complement
/// of the sum over the L4 bytes (whose checksum field holds the partial sum).
fn complete(p: &mut [u8]) {
    let c = !checksum::fold(checksum::sum(&p[20..]));
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn offload_partial_checksum_and_gso_super_packets() {
    let (e, mut w) = engine();
    let mut syn = tcp(CLIENT, 40000, EP, 80, "S", b"");
    assert_eq!(w.process(&mut syn, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);

    // Consumer -> provider: a 3-segment super-packet with a partial checksum.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let mut p = tcp(CLIENT, 40000, EP, 80, "A", &payload);
    make_partial(&mut p);
    let off = Offload { csum_partial: true, gso_size: 1000 };
    assert_eq!(w.process_offload(&mut p, Source::Network(NET_B), Now(1), off), Verdict::Forward(Egress::Provider));
    complete(&mut p);
    let (s, sp, d, dp, ok) = inspect(&p);
    assert!(ok, "completed checksum equals etherparse's full recomputation");
    assert_eq!((s, sp, d, dp), (NAT_B, nport, BACKEND_B, 8080));
    let snap = e.snapshot();
    let ep = &snap.endpoint_by_name("pe-b").expect("pe-b").shared;
    assert_eq!(ep.totals().1, 1 + 3, "the SYN, then 3 segments");

    // Provider -> consumer (network B has MTU 1400): segments of 20 + 20 +
    // 1300 fit, so a 3,000-byte super-packet is forwarded whole ...
    let mut r = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &payload);
    r[6] |= 0x40;
    fix_ip_checksum(&mut r);
    make_partial(&mut r);
    let off = Offload { csum_partial: true, gso_size: 1300 };
    assert_eq!(w.process_offload(&mut r, Source::Provider, Now(1), off), Verdict::Forward(Egress::Network(NET_B)));
    complete(&mut r);
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 80, Ipv4Addr::from(CLIENT), 40000, true));
    assert_eq!(ep.totals().3, 3, "3 segments out");
    // ... but segments of 1380 bytes of payload would not: frag needed, 1400.
    let mut r = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &payload);
    r[6] |= 0x40;
    fix_ip_checksum(&mut r);
    let off = Offload { csum_partial: true, gso_size: 1380 };
    let Verdict::Reply { reason: DropReason::TooBig, len } = w.process_offload(&mut r, Source::Provider, Now(1), off)
    else {
        panic!("too big")
    };
    assert_eq!(u16::from_be_bytes([w.reply(len)[26], w.reply(len)[27]]), 1400);
}

#[test]
fn syn_flood_leaves_existing_flows_working_and_the_pool_recovers() {
    // A 100-port pool, one backend: at most 100 flows can hold a port.
    let d = desired(3000..=3099, ConnectionState::Approved);
    let (e, mut w) = engine_with(Settings { max_flows: 4096, ..Settings::default() }, &d);
    let a = Source::Network(NET_A);
    // An established flow from another client before the flood.
    let mut syn = tcp([10, 1, 0, 99], 5555, EP, 80, "S", b"");
    assert_eq!(w.process(&mut syn, a, Now(0)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);
    let mut sa = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "SA", b"");
    w.process(&mut sa, Source::Provider, Now(0));
    let mut ack = tcp([10, 1, 0, 99], 5555, EP, 80, "A", b"");
    w.process(&mut ack, a, Now(0));

    // 100,000 SYNs from distinct source ports (and addresses).
    let mut forwarded = 0;
    let mut exhausted = 0;
    for i in 0..100_000u32 {
        let src = [10, 2, (i >> 16) as u8, (i >> 8) as u8];
        let mut p = tcp(src, 1024 + (i % 60_000) as u16, EP, 80, "S", b"");
        match w.process(&mut p, a, Now(1)) {
            Verdict::Forward(_) => forwarded += 1,
            Verdict::Reply { reason: DropReason::PortsExhausted, .. } | Verdict::Drop(DropReason::PortsExhausted) => {
                exhausted += 1
            }
            v => panic!("unexpected {v:?}"),
        }
    }
    assert_eq!(forwarded, 99, "the pool's other 99 ports");
    assert_eq!(exhausted, 100_000 - 99);
    // Memory stays bounded: 100 flows, not 100,000.
    assert_eq!(e.flows().len(), 100);
    // The established flow still works both ways.
    let mut data = tcp([10, 1, 0, 99], 5555, EP, 80, "A", b"still here");
    assert_eq!(w.process(&mut data, a, Now(2)), Verdict::Forward(Egress::Provider));
    let mut back = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "A", b"yes");
    assert_eq!(w.process(&mut back, Source::Provider, Now(2)), Verdict::Forward(Egress::Network(NET_A)));
    // The half-open flows go after the transitory timeout (240 s); their
    // ports come back after the 120 s quarantine.
    let snap = e.snapshot();
    let pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Tcp).expect("pool");
    assert_eq!(e.expire(Now(240)), 0);
    assert_eq!(e.expire(Now(241)), 99);
    assert_eq!(pool.pool.available(), 0);
    e.expire(Now(241 + pool::QUARANTINE_SECS));
    assert_eq!(pool.pool.available(), 99);
    let mut fresh = tcp([10, 3, 0, 1], 1000, EP, 80, "S", b"");
    assert_eq!(w.process(&mut fresh, a, Now(400)), Verdict::Forward(Egress::Provider));
}

/// Splits `p` into fragments of at most `mtu` bytes.
fn fragments_of(p: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let mut f = wire::Fragmenter::new(p, mtu).expect("fragmenter");
    let mut out = Vec::new();
    let mut buf = vec![0u8; mtu];
    while let Some(n) = f.next_into(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Reassembles fragments (any order) into one datagram.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> =
        frags.iter().map(|f| ((usize::from(u16::from_be_bytes([f[6], f[7]]) & 0x1fff)) * 8, &f[20..])).collect();
    parts.sort_by_key(|p| p.0);
    let mut d = frags.iter().find(|f| f[6] & 0x1f == 0 && f[7] == 0).expect("first")[..20].to_vec();
    for (_, payload) in parts {
        d.extend_from_slice(payload);
    }
    let len = d.len() as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    d[6..8].copy_from_slice(&[0, 0]);
    fix_ip_checksum(&mut d);
    d
}

#[test]
fn fragments_are_translated_consistently_in_any_order() {
    let (_e, mut w) = engine();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    let mut big = udp(CLIENT, 6000, EP, 53, &payload);
    big[6] = 0; // no DF
    fix_ip_checksum(&mut big);
    let frags = fragments_of(&big, 1500);
    assert_eq!(frags.len(), 3);
    for order in [[0usize, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let (_e, mut w) = engine();
        let mut out = Vec::new();
        for &k in &order {
            let mut f = frags[k].clone();
            match w.process(&mut f, Source::Network(NET_A), Now(1)) {
                Verdict::Forward(Egress::Provider) => out.push(f),
                Verdict::Held => {}
                v => panic!("fragment {k}: {v:?}"),
            }
            w.take_ready(|to, _, bytes| {
                assert_eq!(to, Egress::Provider);
                out.push(bytes.to_vec());
            });
        }
        assert_eq!(out.len(), 3, "order {order:?}");
        for f in &out {
            assert_eq!(checksum::fold(checksum::sum(&f[..20])), 0xffff);
            assert_eq!((&f[12..16], &f[16..20]), (&NAT_A.octets()[..], &BACKEND_A.octets()[..]));
        }
        let whole = reassemble(&out);
        let (s, _, d, dp, ok) = inspect(&whole);
        assert!(ok, "the reassembled datagram's UDP checksum holds (order {order:?})");
        assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 5353));
        assert_eq!(&whole[28..], &payload[..]);
    }

    // And back: the backend's fragmented answer reaches the consumer whole.
    let mut first = frags[0].clone();
    w.process(&mut first, Source::Network(NET_A), Now(1));
    let nport = u16::from_be_bytes([first[20], first[21]]);
    let mut answer = udp(BACKEND_A.octets(), 5353, NAT_A.octets(), nport, &payload);
    answer[6] = 0;
    fix_ip_checksum(&mut answer);
    let mut back = Vec::new();
    for mut f in fragments_of(&answer, 1500).into_iter().rev() {
        match w.process(&mut f, Source::Provider, Now(2)) {
            Verdict::Forward(Egress::Network(NET_A)) => back.push(f),
            Verdict::Held => {}
            v => panic!("{v:?}"),
        }
        w.take_ready(|_, _, b| back.push(b.to_vec()));
    }
    let whole = reassemble(&back);
    assert_eq!(inspect(&whole), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 6000, true));
}

#[test]
fn held_fragments_time_out_and_are_counted() {
    let (e, mut w) = engine();
    let mut big = udp(CLIENT, 6001, EP, 53, &[1u8; 3000]);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    let mut later = fragments_of(&big, 1500).pop().expect("last");
    assert_eq!(w.process(&mut later, Source::Network(NET_A), Now(1)), Verdict::Held);
    let mut other = udp(CLIENT, 6002, EP, 53, b"x");
    w.process(&mut other, Source::Network(NET_A), Now(1 + frag::REASSEMBLY_SECS));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::ReassemblyTimeout), 1);
}

#[test]
fn too_big_without_df_is_fragmented() {
    // Network B has MTU 1400: a 3,000-byte answer without DF leaves in fragments.
    let (_e, mut w) = engine();
    let mut u = udp(CLIENT, 7000, EP, 53, b"q");
    w.process(&mut u, Source::Network(NET_B), Now(1));
    let nport = u16::from_be_bytes([u[20], u[21]]);
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut big = udp(BACKEND_B.octets(), 5353, NAT_B.octets(), nport, &payload);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    let v = w.process(&mut big, Source::Provider, Now(1));
    assert_eq!(v, Verdict::Fragment { to: Egress::Network(NET_B), mtu: 1400 });
    let frags = fragments_of(&big, 1400);
    assert_eq!(frags.len(), 3);
    assert!(frags.iter().all(|f| f.len() <= 1400));
    assert_eq!(inspect(&reassemble(&frags)), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 7000, true));
}

#[test]
fn generated_icmp_is_rate_limited_and_never_about_errors_fragments_or_broadcasts() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    let expire = |p: &mut Vec<u8>| {
        p[8] = 1;
        fix_ip_checksum(p);
    };
    // Rate: 100 answers per second per worker, the rest only dropped.
    let mut replies = 0;
    for i in 0..150u16 {
        let mut p = udp(CLIENT, 1000 + i, EP, 53, b"");
        expire(&mut p);
        match w.process(&mut p, a, Now(7)) {
            Verdict::Reply { reason: DropReason::TtlExpired, .. } => replies += 1,
            Verdict::Drop(DropReason::TtlExpired) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(replies, 100);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::TtlExpired), 150);
    let mut p = udp(CLIENT, 999, EP, 53, b"");
    expire(&mut p);
    assert!(matches!(w.process(&mut p, a, Now(8)), Verdict::Reply { .. }), "a new second, a new budget");

    // Never about an ICMP error (one about a live flow, so that it gets as
    // far as the TTL step).
    let mut open = udp(CLIENT, 1, EP, 53, b"");
    assert_eq!(w.process(&mut open, a, Now(9)), Verdict::Forward(Egress::Provider));
    let mut err = Vec::new();
    PacketBuilder::ipv4(CLIENT, EP, 1)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut err, &udp(EP, 53, CLIENT, 1, b"")[..28])
        .expect("build");
    assert_eq!(w.process(&mut err, a, Now(9)), Verdict::Drop(DropReason::TtlExpired), "dropped, no answer");
    // Never to a broadcast or multicast source (martian: dropped first).
    let mut p = udp([255, 255, 255, 255], 1, EP, 53, b"");
    expire(&mut p);
    assert_eq!(w.process(&mut p, a, Now(9)), Verdict::Drop(DropReason::MartianSource));
    let mut p = udp([224, 0, 0, 1], 1, EP, 53, b"");
    expire(&mut p);
    assert_eq!(w.process(&mut p, a, Now(9)), Verdict::Drop(DropReason::MartianSource));
    // Never about a later fragment.
    let mut big = udp(CLIENT, 5, EP, 53, &[0u8; 3000]);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    let mut later = fragments_of(&big, 1500).pop().expect("fragment");
    expire(&mut later);
    // Held for its first fragment (reassembly comes before TTL); no answer.
    assert_eq!(w.process(&mut later, a, Now(9)), Verdict::Held);
}

proptest! {
    #[test]
    fn partial_checksums_complete_to_the_full_recomputation(
        src in any::<[u8; 4]>(),
        sport in 1u16..,
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        gso in prop_oneof![Just(0u16), 500u16..1460],
    ) {
        let (_e, mut w) = engine();
        prop_assume!(!wire::is_martian_source(u32::from_be_bytes(src)));
        prop_assume!(gso > 0 || payload.len() <= 1400);
        let mut syn = tcp(src, sport, EP, 80, "S", b"");
        prop_assert_eq!(w.process(&mut syn, Source::Network(NET_A), Now(0)), Verdict::Forward(Egress::Provider));
        let mut p = tcp(src, sport, EP, 80, "A", &payload);
        make_partial(&mut p);
        let off = Offload { csum_partial: true, gso_size: gso };
        prop_assert_eq!(w.process_offload(&mut p, Source::Network(NET_A), Now(0), off), Verdict::Forward(Egress::Provider));
        complete(&mut p);
        let (s, _, d, dp, ok) = inspect(&p);
        prop_assert!(ok, "completed partial checksum differs from etherparse's recomputation");
        prop_assert_eq!((s, d, dp), (NAT_A, BACKEND_A, 8080));
    }
}

// ---- The outbox: what one read batch makes the worker write. ----

/// What the daemon would perform, as owned values.
#[derive(Debug)]
enum Sent {
    One(Egress, Vec<u8>),
    Coalesced(Egress, Vec<Vec<u8>>),
}

/// Reads `pkt` (behind a zeroed virtio-net header) into the outbox and
/// hands it to the worker.
fn handle(w: &mut Worker, out: &mut Outbox, pkt: &[u8], src: Source, now: Now) {
    let hdr = out.header_len();
    let buf = out.read_buf();
    buf[..hdr].fill(0);
    buf[hdr..hdr + pkt.len()].copy_from_slice(pkt);
    w.handle(out, hdr + pkt.len(), src, now);
}

fn drain(out: &mut Outbox) -> Vec<Sent> {
    let mut v = Vec::new();
    out.drain(|o| match o {
        Out::Write { to, bytes } => v.push(Sent::One(to, bytes.to_vec())),
        Out::Coalesce { to, bufs } => v.push(Sent::Coalesced(to, bufs.iter().map(|b| b.to_vec()).collect())),
    });
    v
}

#[test]
fn outbox_stages_small_packets_and_keeps_each_devices_order() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let a = Source::Network(NET_A);
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, b"one"), a, Now(1));
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, b"two"), a, Now(1));
    assert!(out.is_empty(), "small packets wait for the end of the batch");
    // A large packet to the same device: what waits goes first.
    handle(&mut w, &mut out, &udp(CLIENT, 1000, EP, 53, &[7u8; 1200]), a, Now(1));
    let sent = drain(&mut out);
    let [Sent::Coalesced(Egress::Provider, staged), Sent::One(Egress::Provider, big)] = &sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(staged.len(), 2);
    for (b, text) in staged.iter().zip([&b"one"[..], b"two"]) {
        assert_eq!(&b[..10], &[0u8; 10], "a zeroed virtio-net header");
        let (s, _, d, dp, ok) = inspect(&b[10..]);
        assert_eq!((s, d, dp, ok), (NAT_A, BACKEND_A, 5353, true));
        assert!(b.ends_with(text));
    }
    assert!(inspect(&big[10..]).4, "checksums of the large packet");
    // The end of the batch flushes what is staged, per device.
    handle(&mut w, &mut out, &udp(CLIENT, 1001, EP, 53, b"three"), a, Now(1));
    assert!(out.is_empty());
    w.end_batch(&mut out);
    let sent = drain(&mut out);
    assert!(matches!(&sent[..], [Sent::Coalesced(Egress::Provider, b)] if b.len() == 1), "{sent:?}");
    w.end_batch(&mut out);
    assert!(drain(&mut out).is_empty(), "staged packets go out once");
}

#[test]
fn outbox_answers_go_back_where_the_packet_came_from() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let mut p = udp(CLIENT, 1000, EP, 53, b"");
    p[8] = 1;
    fix_ip_checksum(&mut p);
    handle(&mut w, &mut out, &p, Source::Network(NET_B), Now(1));
    let sent = drain(&mut out);
    let [Sent::One(Egress::Network(NET_B), reply)] = &sent[..] else { panic!("{sent:?}") };
    let (s, _, d, _, ok) = inspect(&reply[10..]);
    assert_eq!((s, d, ok), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT), true));
    assert_eq!(reply[10 + 20], wire::icmp_type::TIME_EXCEEDED);
}

#[test]
fn outbox_fragments_a_packet_too_big_for_the_egress() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let mut big = udp(CLIENT, 1000, EP, 53, &[9u8; 3000]);
    big[6] = 0; // no DF
    fix_ip_checksum(&mut big);
    handle(&mut w, &mut out, &big, Source::Network(NET_A), Now(1));
    let frags: Vec<Vec<u8>> = drain(&mut out)
        .into_iter()
        .map(|s| match s {
            Sent::One(Egress::Provider, b) => {
                assert!(b.len() <= 10 + 1500);
                b[10..].to_vec()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(frags.len(), 3);
    let whole = reassemble(&frags);
    let (s, _, d, dp, ok) = inspect(&whole);
    assert_eq!((s, d, dp, ok), (NAT_A, BACKEND_A, 5353, true));
}

#[test]
fn outbox_releases_held_fragments_behind_a_staged_first_fragment() {
    let (_e, mut w) = engine();
    let mut out = Outbox::new(true);
    let a = Source::Network(NET_A);
    // A datagram whose first fragment is small (staged) and comes last.
    let mut d = udp(CLIENT, 1000, EP, 53, &[5u8; 1000]);
    d[6] = 0;
    fix_ip_checksum(&mut d);
    let frags = fragments_of(&d, 500);
    assert_eq!(frags.len(), 3);
    for f in &frags[1..] {
        handle(&mut w, &mut out, f, a, Now(1));
        assert!(out.is_empty(), "held");
    }
    handle(&mut w, &mut out, &frags[0], a, Now(1));
    let sent = drain(&mut out);
    // The staged first fragment goes out before the released ones, at once.
    let [Sent::Coalesced(Egress::Provider, first), Sent::One(Egress::Provider, f2), Sent::One(Egress::Provider, f3)] =
        &sent[..]
    else {
        panic!("{sent:?}")
    };
    let all = vec![first[0][10..].to_vec(), f2[10..].to_vec(), f3[10..].to_vec()];
    let whole = reassemble(&all);
    let (s, _, dst, dp, ok) = inspect(&whole);
    assert_eq!((s, dst, dp, ok), (NAT_A, BACKEND_A, 5353, true));
}

// ---- One translation path: each step, each direction. ----

/// The engine with pe-b in `b_state`, and a live UDP flow of each tenant
/// (consumer port 1000): for the provider-side steps.
fn with_flows(b_state: ConnectionState) -> (Arc<Engine>, Worker, Vec<u8>, Vec<u8>) {
    let (e, mut w) = engine_with(small(), &desired(1024..=65535, ConnectionState::Approved));
    let mut replies = Vec::new();
    for net in [NET_A, NET_B] {
        let mut p = udp(CLIENT, 1000, EP, 53, b"x");
        assert_eq!(w.process(&mut p, Source::Network(net), Now(1)), Verdict::Forward(Egress::Provider));
        swap(&mut p);
        replies.push(p);
    }
    e.apply(&desired(1024..=65535, b_state), Now(1)).expect("config");
    let b = replies.pop().expect("b");
    (e, w, replies.pop().expect("a"), b)
}

fn ttl1(p: &mut [u8]) {
    p[8] = 1;
    fix_ip_checksum(p);
}

#[test]
fn each_step_of_the_consumer_side_gives_its_reason() {
    let (_e, mut w) = engine_with(small(), &desired(1024..=65535, ConnectionState::Pending));
    let (a, b) = (Source::Network(NET_A), Source::Network(NET_B));
    let run = |w: &mut Worker, mut p: Vec<u8>, s: Source| w.process(&mut p, s, Now(1));
    // 1. validate
    assert_eq!(run(&mut w, vec![0x45, 0, 0], a), Verdict::Drop(DropReason::Malformed));
    // 2. address
    assert_eq!(run(&mut w, udp(CLIENT, 1, [10, 1, 0, 6], 53, b""), a), Verdict::Drop(DropReason::NoEndpoint));
    // 3. reassemble
    let mut big = udp(CLIENT, 1, EP, 53, &[1u8; 2000]);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    assert_eq!(run(&mut w, fragments_of(&big, 1000).pop().expect("later"), a), Verdict::Held);
    // 4. parse
    let mut bad_tcp = tcp(CLIENT, 1, EP, 80, "S", b"");
    bad_tcp[20 + 12] = 0x10; // data offset 4 bytes
    assert_eq!(run(&mut w, bad_tcp, a), Verdict::Drop(DropReason::Malformed));
    let mut gre = udp(CLIENT, 1, EP, 53, b"");
    gre[9] = 47;
    fix_ip_checksum(&mut gre);
    assert_eq!(run(&mut w, gre, a), Verdict::Drop(DropReason::UnsupportedProtocol));
    // 5. look up
    assert_eq!(run(&mut w, udp(CLIENT, 1, EP, 54, b""), a), Verdict::Drop(DropReason::PortNotAllowed));
    // 6. approve, before TTL: a pending endpoint answers nothing.
    assert_eq!(run(&mut w, udp(CLIENT, 1, EP, 53, b""), b), Verdict::Drop(DropReason::NotApproved));
    let mut p = udp(CLIENT, 1, EP, 53, b"");
    ttl1(&mut p);
    assert_eq!(run(&mut w, p.clone(), b), Verdict::Drop(DropReason::NotApproved), "no traceroute answer");
    // 7. TTL
    assert!(matches!(run(&mut w, p, a), Verdict::Reply { reason: DropReason::TtlExpired, .. }));
    // 8. MTU (provider MTU 1500)
    assert!(matches!(
        run(&mut w, udp(CLIENT, 1, EP, 53, &[0u8; 1600]), a),
        Verdict::Reply { reason: DropReason::TooBig, .. }
    ));
    // 9. flow
    assert_eq!(run(&mut w, tcp(CLIENT, 1, EP, 80, "A", b""), a), Verdict::Drop(DropReason::NoFlow));
    // 10 to 12. TCP state, rewrite, count
    let mut syn = tcp(CLIENT, 2, EP, 80, "S", b"");
    assert_eq!(w.process(&mut syn, a, Now(1)), Verdict::Forward(Egress::Provider));
    let (s, _, d, dp, ok) = inspect(&syn);
    assert_eq!((s, d, dp, ok), (NAT_A, BACKEND_A, 8080, true));
    let snap = _e.snapshot();
    let ep = snap.endpoint_by_name("pe-a").expect("pe-a");
    assert_eq!(ep.shared.totals().1, 1, "one packet counted in");
    let flows = _e.flow_list(Some("pe-a"), Now(1));
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].state, "opening");
}

#[test]
fn each_step_of_the_provider_side_gives_its_reason() {
    let (e, mut w, a_reply, b_reply) = with_flows(ConnectionState::Approved);
    let p = Source::Provider;
    let run = |w: &mut Worker, mut pkt: Vec<u8>| w.process(&mut pkt, p, Now(1));
    // 1. validate
    assert_eq!(run(&mut w, vec![0x45, 0, 0]), Verdict::Drop(DropReason::Malformed));
    // 3. reassemble
    let mut big = udp(BACKEND_A.octets(), 5353, NAT_A.octets(), 1, &[1u8; 2000]);
    big[6] = 0;
    fix_ip_checksum(&mut big);
    assert_eq!(run(&mut w, fragments_of(&big, 1000).pop().expect("later")), Verdict::Held);
    // 4. parse
    let mut gre = a_reply.clone();
    gre[9] = 47;
    fix_ip_checksum(&mut gre);
    assert_eq!(run(&mut w, gre), Verdict::Drop(DropReason::UnsupportedProtocol));
    // 5. look up
    let stranger = udp(BACKEND_A.octets(), 5353, NAT_A.octets(), 1, b"");
    assert_eq!(run(&mut w, stranger), Verdict::Drop(DropReason::NoFlow));
    // 7. TTL
    let mut t = a_reply.clone();
    ttl1(&mut t);
    assert!(matches!(run(&mut w, t.clone()), Verdict::Reply { reason: DropReason::TtlExpired, .. }));
    // 8. MTU: vnet-b's MTU is 1400.
    let mut long = udp(BACKEND_B.octets(), 5353, NAT_B.octets(), 0, &[0u8; 1450]);
    long[20..22].copy_from_slice(&b_reply[20..22]);
    long[22..24].copy_from_slice(&b_reply[22..24]);
    long[26..28].copy_from_slice(&[0, 0]); // no UDP checksum
    assert!(matches!(run(&mut w, long), Verdict::Reply { reason: DropReason::TooBig, .. }));
    // 11, 12. rewrite, count: each reply reaches its own tenant.
    let mut r = a_reply.clone();
    assert_eq!(w.process(&mut r, p, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 1000, true));
    let mut r = b_reply.clone();
    assert_eq!(w.process(&mut r, p, Now(1)), Verdict::Forward(Egress::Network(NET_B)));
    // 6. approve, before TTL: a flow whose endpoint is no longer approved
    // (caught between the state change and its sweep) answers nothing.
    let snap = e.snapshot();
    let ep = snap.endpoint_by_name("pe-a").expect("pe-a");
    ep.shared.conn.store(ConnectionState::Rejected as u8, std::sync::atomic::Ordering::Release);
    assert_eq!(run(&mut w, a_reply), Verdict::Drop(DropReason::NotApproved));
    assert_eq!(run(&mut w, t), Verdict::Drop(DropReason::NotApproved), "no time exceeded");
}

#[test]
fn a_reload_that_changes_nat_ports_under_live_flows_gives_every_port_back() {
    let (e, mut w) = engine_with(small(), &desired(5000..=5009, ConnectionState::Approved));
    let a = Source::Network(NET_A);
    for port in 0..10 {
        let mut p = tcp(CLIENT, 2000 + port, EP, 80, "S", b"");
        assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
    }
    // The range grows under the live flows, which end with their old pool;
    // new flows take ports of the new range, overlapping the old one.
    e.apply(&desired(5000..=5019, ConnectionState::Approved), Now(2)).expect("config");
    for port in 0..15 {
        let mut p = tcp(CLIENT, 3000 + port, EP, 80, "S", b"");
        assert_eq!(w.process(&mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
    }
    // Every flow ends; past the quarantine each pool is whole again.
    e.apply(&desired(5000..=5019, ConnectionState::Approved), Now(3)).expect("config");
    e.expire(Now(10_000));
    e.expire(Now(20_000));
    let snap = e.snapshot();
    for p in snap.pools.values() {
        assert_eq!(p.pool.available(), p.pool.capacity(), "{} {} {}", p.service, p.nat_ip, p.protocol);
    }
}

// ---- Hostile packets. ----

/// `p` with IP options `opts` (a multiple of 4 bytes) after its header.
fn with_ip_options(p: &[u8], opts: &[u8]) -> Vec<u8> {
    let mut v = p[..20].to_vec();
    v.extend_from_slice(opts);
    v.extend_from_slice(&p[20..]);
    v[0] = 0x40 | ((20 + opts.len()) / 4) as u8;
    let total = v.len() as u16;
    v[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut v);
    v
}

#[test]
fn martian_sources_never_make_a_flow() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    for src in [
        [0, 0, 0, 0],
        [0, 1, 2, 3],
        [127, 0, 0, 1],
        [224, 0, 0, 1],
        [239, 1, 1, 1],
        [255, 255, 255, 255],
        [240, 0, 0, 1],
    ] {
        let mut p = udp(src, 1000, EP, 53, b"x");
        assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Drop(DropReason::MartianSource), "{src:?}");
        let mut s = tcp(src, 1000, EP, 80, "S", b"");
        assert_eq!(w.process(&mut s, a, Now(1)), Verdict::Drop(DropReason::MartianSource), "{src:?}");
    }
    assert_eq!(e.flows().len(), 0);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::MartianSource), 14);
}

#[test]
fn invalid_tcp_flag_combinations_are_dropped_both_ways() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    for flags in ["SF", "SR", "", "F", "FR"] {
        let mut p = tcp(CLIENT, 1000, EP, 80, flags, b"");
        assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags), "{flags:?}");
    }
    assert_eq!(e.flows().len(), 0, "SYN+FIN makes no flow");
    // A real connection; then a bad combination from the backend.
    let mut syn = tcp(CLIENT, 1000, EP, 80, "S", b"");
    assert_eq!(w.process(&mut syn, a, Now(1)), Verdict::Forward(Egress::Provider));
    swap(&mut syn);
    syn[20 + 13] = 0x03; // SYN+FIN
    let ihl = 20;
    syn[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
    let mut fixed = syn.clone();
    let (src, dst) = (&fixed[12..16].to_vec(), &fixed[16..20].to_vec());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((fixed.len() - 20) as u16).to_be_bytes());
    pseudo.extend_from_slice(&fixed[20..]);
    let c = checksum::checksum(&pseudo);
    fixed[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(w.process(&mut fixed, Source::Provider, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags));
    // Valid ones still pass.
    for flags in ["A", "FA", "RA", "R"] {
        let mut p = tcp(CLIENT, 1000, EP, 80, flags, b"");
        assert_ne!(w.process(&mut p, a, Now(1)), Verdict::Drop(DropReason::InvalidTcpFlags), "{flags:?}");
    }
}

#[test]
fn source_routed_packets_are_dropped_and_harmless_options_pass() {
    let (e, mut w) = engine();
    let a = Source::Network(NET_A);
    let b = BACKEND_B.octets();
    // Loose and strict source routes naming another service's backend.
    for kind in [0x83u8, 0x89] {
        let opts = [kind, 7, 4, b[0], b[1], b[2], b[3], 0];
        let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &opts);
        assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Drop(DropReason::SourceRoute), "{kind:#x}");
        let mut s = with_ip_options(&tcp(CLIENT, 1000, EP, 80, "S", b""), &opts);
        assert_eq!(w.process(&mut s, a, Now(1)), Verdict::Drop(DropReason::SourceRoute), "{kind:#x}");
    }
    assert_eq!(e.flows().len(), 0);
    // An option list of NOPs and an end marker is forwarded.
    let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &[1, 1, 1, 0]);
    assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
    assert!(inspect(&p).4, "checksums still right");
    // A truncated option is malformed.
    let mut p = with_ip_options(&udp(CLIENT, 1000, EP, 53, b"x"), &[0x83, 9, 4, 0]);
    assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Drop(DropReason::Malformed));
}

#[test]
fn counters_stay_monotonic_when_an_endpoint_or_network_leaves_and_returns() {
    // 30 packets, removal, re-adding, 45 more: 75.
    let full = desired(1024..=65535, ConnectionState::Approved);
    let (e, mut w) = engine_with(small(), &full);
    let a = Source::Network(NET_A);
    let send = |w: &mut Worker, n: u16, now: u32| {
        for i in 0..n {
            let mut p = udp(CLIENT, 3000 + i, EP, 53, b"x");
            assert_eq!(w.process(&mut p, a, Now(now)), Verdict::Forward(Egress::Provider));
        }
    };
    send(&mut w, 30, 1);
    let mut bad = udp(CLIENT, 1, [10, 1, 0, 99], 53, b"");
    assert_eq!(w.process(&mut bad, a, Now(1)), Verdict::Drop(DropReason::NoEndpoint));
    // pe-a and its network vnet-a leave the config, then come back.
    let mut without = full.clone();
    without.endpoints.retain(|x| x.name != "pe-a");
    without.networks.retain(|n| n.name != "vnet-a");
    for x in &mut without.endpoints {
        x.network -= 1;
    }
    e.apply(&without, Now(2)).expect("config");
    e.apply(&full, Now(3)).expect("config");
    send(&mut w, 45, 4);
    let mut bad = udp(CLIENT, 1, [10, 1, 0, 99], 53, b"");
    assert_eq!(w.process(&mut bad, a, Now(4)), Verdict::Drop(DropReason::NoEndpoint));
    let snap = e.snapshot();
    let ep = snap.endpoint_by_name("pe-a").expect("pe-a is back");
    assert_eq!(ep.shared.totals().1, 75, "packets in over both lives of pe-a");
    assert_eq!(ep.shared.flows_created.load(std::sync::atomic::Ordering::Relaxed), 75);
    assert_eq!(ep.shared.flows_active.load(std::sync::atomic::Ordering::Relaxed), 45, "only the live flows");
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::NoEndpoint), 2, "drops over both lives of vnet-a");
}

#[test]
fn one_network_cannot_take_the_whole_flow_table() {
    // max_flows 1000, tenant A floods with 1,500 flows;
    // tenant B still connects.
    let settings = Settings { max_flows: 1000, ..Settings::default() };
    let (e, mut w) = engine_with(settings, &desired(1024..=65535, ConnectionState::Approved));
    let mut a_made = 0;
    for port in 0..1500u16 {
        let mut p = udp(CLIENT, 10_000 + port, EP, 53, b"x");
        match w.process(&mut p, Source::Network(NET_A), Now(1)) {
            Verdict::Forward(Egress::Provider) => a_made += 1,
            Verdict::Drop(DropReason::FlowTableFull) => {}
            v => panic!("{v:?}"),
        }
    }
    // Two networks: each keeps a reserve of max_flows / 4 = 250 the other
    // cannot take.
    assert_eq!(a_made, 750, "A's share");
    for port in 0..20u16 {
        let mut p = udp(CLIENT, 20_000 + port, EP, 53, b"x");
        assert_eq!(w.process(&mut p, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider), "B {port}");
    }
    // A's flows end: its share is free again.
    e.expire(Now(10_000));
    let mut p = udp(CLIENT, 30_000, EP, 53, b"x");
    assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(10_000)), Verdict::Forward(Egress::Provider));
}

// ---- Per-endpoint limits and source rules. ----

#[test]
fn an_endpoint_holds_at_most_its_max_flows_and_others_still_connect() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints[0].limits.max_flows = Some(20);
    // A second endpoint of the same service in the same network.
    d.endpoints.push(EndpointSpec {
        link_id: 0,
        name: "pe-a2".into(),
        network: 0,
        ip: Ipv4Addr::new(10, 1, 0, 6),
        service: 0,
        state: ConnectionState::Approved,
        limits: EndpointLimits::default(),
    });
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    let mut made = 0;
    for port in 0..30u16 {
        let mut p = tcp(CLIENT, 5000 + port, EP, 80, "S", b"");
        match w.process(&mut p, a, Now(1)) {
            Verdict::Forward(_) => made += 1,
            Verdict::Drop(DropReason::EndpointFlowLimit) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(made, 20);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::EndpointFlowLimit), 10);
    let mut p = tcp(CLIENT, 6000, [10, 1, 0, 6], 80, "S", b"");
    assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Forward(Egress::Provider), "the other endpoint connects");
    let snap = e.snapshot();
    let pe = snap.endpoint_by_name("pe-a").expect("pe-a");
    assert_eq!(pe.shared.flows_active.load(std::sync::atomic::Ordering::Relaxed), 20);
    // Packets of existing flows are not limited.
    let mut again = tcp(CLIENT, 5000, EP, 80, "A", b"data");
    assert_eq!(w.process(&mut again, a, Now(1)), Verdict::Forward(Egress::Provider));
}

#[test]
fn source_rules_admit_only_allowed_consumers_and_a_reload_ends_disallowed_flows() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints[0].limits.allow_sources = vec![(Ipv4Addr::new(10, 1, 0, 8), 30)]; // .8 to .11
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    let mut ok = udp(CLIENT, 1000, EP, 53, b"x"); // 10.1.0.10
    assert_eq!(w.process(&mut ok, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut no = udp([10, 1, 0, 20], 1000, EP, 53, b"x");
    assert_eq!(w.process(&mut no, a, Now(1)), Verdict::Drop(DropReason::SourceNotAllowed));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::SourceNotAllowed), 1);
    assert_eq!(e.flows().len(), 1);
    // The reload narrows the rule: the allowed flow of .10 ends, its packets drop.
    d.endpoints[0].limits.allow_sources = vec![(Ipv4Addr::new(10, 1, 0, 20), 32)];
    let report = e.apply(&d, Now(2)).expect("config");
    assert_eq!(report.flows_ended, 1);
    assert_eq!(report.endpoints_kept, vec!["pe-a".to_string(), "pe-b".to_string()]);
    let mut ok = udp(CLIENT, 1000, EP, 53, b"x");
    assert_eq!(w.process(&mut ok, a, Now(2)), Verdict::Drop(DropReason::SourceNotAllowed));
    let mut now_ok = udp([10, 1, 0, 20], 1000, EP, 53, b"x");
    assert_eq!(w.process(&mut now_ok, a, Now(2)), Verdict::Forward(Egress::Provider));
}

// ---- Backend health. ----

#[test]
fn a_down_backend_gets_no_new_flows_keeps_its_old_ones_and_none_up_refuses_at_once() {
    let other = Ipv4Addr::new(192, 168, 50, 11);
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].backends.push(other);
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    // Both up: flows spread over both.
    let mut on_a = None;
    let mut seen = HashSet::new();
    for port in 0..64u16 {
        let mut p = tcp(CLIENT, 7000 + port, EP, 80, "S", b"");
        assert_eq!(w.process(&mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
        let (_, _, backend, _, _) = inspect(&p);
        seen.insert(backend);
        if backend == BACKEND_A {
            on_a.get_or_insert(7000 + port);
        }
    }
    assert_eq!(seen.len(), 2, "Maglev spreads new flows over both");
    // BACKEND_A goes down: new flows all go to the other, the old ones stay.
    assert!(e.set_backend_up("svc-a", BACKEND_A, false));
    for port in 0..64u16 {
        let mut p = tcp(CLIENT, 8000 + port, EP, 80, "S", b"");
        assert_eq!(w.process(&mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
        assert_eq!(inspect(&p).2, other, "a new flow went to the down backend");
    }
    let old = on_a.expect("a flow on BACKEND_A");
    let mut p = tcp(CLIENT, old, EP, 80, "A", b"still here");
    assert_eq!(w.process(&mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&p).2, BACKEND_A, "an existing flow keeps its backend");
    let states = e.backends();
    assert!(states.iter().any(|b| b.service == "svc-a" && b.backend == BACKEND_A && !b.up));
    assert!(states.iter().any(|b| b.backend == other && b.up && b.flows_created >= 64));
    // Both down: a SYN is answered with a RST from the endpoint, UDP with
    // port unreachable, at once.
    e.set_backend_up("svc-a", other, false);
    let mut syn = tcp(CLIENT, 9000, EP, 80, "S", b"");
    let Verdict::Reply { reason: DropReason::NoHealthyBackend, len } = w.process(&mut syn, a, Now(3)) else {
        panic!("a RST")
    };
    let rst = w.reply(len).to_vec();
    let p = SlicedPacket::from_ip(&rst).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("tcp") };
    assert!(t.rst() && t.ack() && !t.syn());
    assert_eq!((t.source_port(), t.destination_port(), t.acknowledgment_number()), (80, 9000, 1001));
    let (s, _, dst, _, ok) = inspect(&rst);
    assert_eq!((s, dst, ok), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT), true));
    let mut u = udp(CLIENT, 9001, EP, 53, b"q");
    assert!(matches!(w.process(&mut u, a, Now(3)), Verdict::Reply { reason: DropReason::NoHealthyBackend, .. }));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::NoHealthyBackend), 2);
    // Back up after a reload too: health is kept across reloads.
    e.apply(&d, Now(4)).expect("config");
    let mut p = tcp(CLIENT, 9100, EP, 80, "S", b"");
    assert!(matches!(w.process(&mut p, a, Now(4)), Verdict::Reply { reason: DropReason::NoHealthyBackend, .. }));
    e.set_backend_up("svc-a", other, true);
    let mut p = tcp(CLIENT, 9101, EP, 80, "S", b"");
    assert_eq!(w.process(&mut p, a, Now(4)), Verdict::Forward(Egress::Provider));
}

/// Restart and hand-over: tables in a region (not built for loom, whose
/// atomics are not plain memory).
#[cfg(not(loom))]
mod restart {
    use super::*;

    /// A zeroed, page-aligned heap region standing in for a shared mapping
    /// (what the core sees of one; the daemon's tests use real files).
    #[derive(Debug)]
    struct TestRegion {
        ptr: *mut u8,
        len: usize,
    }
    // SAFETY: the memory is only used through the flow tables' atomics.
    unsafe impl Send for TestRegion {}
    // SAFETY: as above.
    unsafe impl Sync for TestRegion {}
    impl TestRegion {
        fn new(len: usize) -> Arc<TestRegion> {
            let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
            // SAFETY: a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Arc::new(TestRegion { ptr, len })
        }
        /// Rewrites byte `at` (as a crash or another program might).
        fn poke(&self, at: usize, f: impl Fn(u8) -> u8) {
            assert!(at < self.len);
            // SAFETY: inside the allocation; no table writes while a test edits it.
            unsafe { *self.ptr.add(at) = f(*self.ptr.add(at)) };
        }
    }
    impl Drop for TestRegion {
        fn drop(&mut self) {
            let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }
    // SAFETY: the allocation lives as long as the value.
    unsafe impl flow::Region for TestRegion {
        fn base(&self) -> *mut u8 {
            self.ptr
        }
        fn len(&self) -> usize {
            self.len
        }
    }

    fn region_for(s: &Settings) -> Arc<TestRegion> {
        TestRegion::new(flow::Layout::new(s.max_flows, flow::REUSE_DELAY).bytes())
    }

    /// An engine on `r`'s table: a new one, or the one found there.
    fn engine_on(r: &Arc<TestRegion>, mode: Option<flow::AttachMode>, ids: &Ids) -> (Arc<Engine>, flow::Attached) {
        let region: Arc<dyn flow::Region> = r.clone();
        let (t, found) = match mode {
            None => (flow::FlowTable::create_in(region, small().max_flows).expect("fresh"), flow::Attached::default()),
            Some(m) => flow::FlowTable::attach(region, small().max_flows, m).expect("attaches"),
        };
        let e = Engine::with_flows(small(), t);
        e.seed_ids(ids);
        e.apply(&desired(1024..=1100, ConnectionState::Approved), Now(5)).expect("valid");
        (e, found)
    }

    /// Opens 20 TCP flows (SYN out, SYN-ACK back) and returns each flow's NAT port.
    fn open_flows(w: &mut Worker) -> Vec<u16> {
        let mut ports = Vec::new();
        for i in 0..20 {
            let mut p = tcp(CLIENT, 41000 + i, EP, 80, "S", b"");
            assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(5)), Verdict::Forward(Egress::Provider));
            ports.push(inspect(&p).1);
        }
        ports
    }

    /// Whether consumer port `41000 + i` still maps to NAT port `port`, both ways.
    fn still_mapped(w: &mut Worker, i: u16, port: u16) -> bool {
        let mut p = tcp(CLIENT, 41000 + i, EP, 80, "A", b"x");
        let out = w.process(&mut p, Source::Network(NET_A), Now(6)) == Verdict::Forward(Egress::Provider);
        let mut r = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), port, "A", b"y");
        let back = w.process(&mut r, Source::Provider, Now(6)) == Verdict::Forward(Egress::Network(NET_A));
        out && inspect(&p).1 == port && back && inspect(&r).3 == 41000 + i
    }

    #[test]
    fn a_crashed_engines_flows_go_on_in_the_next_one_with_their_ports() {
        let r = region_for(&small());
        let (old, _) = engine_on(&r, None, &Ids::default());
        let mut w = old.worker(0);
        let ports = open_flows(&mut w);
        let ids = old.ids();
        let avail = old.snapshot().pools.values().map(|p| p.pool.available()).sum::<u32>();
        // The old process dies: nothing of it runs again, its memory stays.
        std::mem::forget(w);
        std::mem::forget(old);

        let (new, found) = engine_on(&r, Some(flow::AttachMode::Recover), &ids);
        assert_eq!(found, flow::Attached { flows: 20, torn: 0 });
        assert_eq!(new.adopt_flows(Now(6)), Adopted { flows: 20, ended: 0 });
        let mut w = new.worker(0);
        for (i, &port) in ports.iter().enumerate() {
            assert!(still_mapped(&mut w, i as u16, port), "flow {i} carried on");
        }
        let now_avail = new.snapshot().pools.values().map(|p| p.pool.available()).sum::<u32>();
        assert_eq!(now_avail, avail, "the adopted ports are in use");
        // A new flow never takes a port a carried-on flow holds.
        let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
        assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(6)), Verdict::Forward(Egress::Provider));
        assert!(!ports.contains(&inspect(&p).1));
        assert_eq!(new.flows().len(), 21);
    }

    #[test]
    fn a_slot_cut_short_by_a_crash_is_never_forwarded() {
        let r = region_for(&small());
        let (old, _) = engine_on(&r, None, &Ids::default());
        let mut w = old.worker(0);
        let ports = open_flows(&mut w);
        let ids = old.ids();
        std::mem::forget(w);
        std::mem::forget(old);
        // Flow 0 sits in slot 0; change its provider key as a torn write would
        // leave it (the NAT port's bytes, which the check covers).
        let slot0 = flow::HEADER_BYTES;
        r.poke(slot0 + 16 + 8 + 6, |b| b ^ 0x5a);
        let (new, found) = engine_on(&r, Some(flow::AttachMode::Recover), &ids);
        assert_eq!(found, flow::Attached { flows: 19, torn: 1 });
        new.adopt_flows(Now(6));
        let mut w = new.worker(0);
        let mut p = tcp(CLIENT, 41000, EP, 80, "A", b"x");
        assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(6)), Verdict::Drop(DropReason::NoFlow));
        for (i, &port) in ports.iter().enumerate().skip(1) {
            assert!(still_mapped(&mut w, i as u16, port));
        }
    }

    #[test]
    fn a_region_that_is_not_this_table_is_refused() {
        let s = small();
        let r = region_for(&s);
        let region: Arc<dyn flow::Region> = r.clone();
        let err = flow::FlowTable::attach(region.clone(), s.max_flows, flow::AttachMode::Recover).err();
        assert_eq!(err, Some(flow::AttachError::NotATable), "zeroes");
        drop(flow::FlowTable::create_in(region.clone(), s.max_flows).expect("fresh"));
        let err = flow::FlowTable::attach(region.clone(), s.max_flows / 2, flow::AttachMode::Recover).err();
        assert!(matches!(err, Some(flow::AttachError::Layout { .. })), "{err:?}");
        for i in 0..64 {
            r.poke(i, |_| (i as u8).wrapping_mul(151));
        }
        let err = flow::FlowTable::attach(region, s.max_flows, flow::AttachMode::Recover).err();
        assert_eq!(err, Some(flow::AttachError::NotATable), "garbage");
    }

    #[test]
    fn during_a_hand_over_both_engines_forward_and_only_the_new_one_creates() {
        let r = region_for(&small());
        let (old, _) = engine_on(&r, None, &Ids::default());
        let mut wo = old.worker(0);
        let ports = open_flows(&mut wo);
        old.flows().freeze();
        let (new, found) = engine_on(&r, Some(flow::AttachMode::Share), &old.ids());
        assert_eq!(found.flows, 20);
        new.adopt_flows(Now(6));
        let mut wn = new.worker(0);
        for (i, &port) in ports.iter().enumerate() {
            assert!(still_mapped(&mut wo, i as u16, port), "old still forwards flow {i}");
            assert!(still_mapped(&mut wn, i as u16, port), "new forwards flow {i}");
        }
        let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
        assert_eq!(wo.process(&mut p, Source::Network(NET_A), Now(6)), Verdict::Drop(DropReason::FlowTableFull));
        assert_eq!(old.expire(Now(100_000)), 0, "a frozen engine ends nothing");
        let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
        assert_eq!(wn.process(&mut p, Source::Network(NET_A), Now(6)), Verdict::Forward(Egress::Provider));
        let port = inspect(&p).1;
        assert!(!ports.contains(&port));
        // The old one sees the new one's flow too (one table).
        let mut r2 = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), port, "SA", b"");
        assert_eq!(wo.process(&mut r2, Source::Provider, Now(6)), Verdict::Forward(Egress::Network(NET_A)));
    }

    #[test]
    fn a_restart_with_an_endpoint_removed_ends_its_flows_and_keeps_the_rest() {
        let r = region_for(&small());
        let (old, _) = engine_on(&r, None, &Ids::default());
        let mut w = old.worker(0);
        let ports = open_flows(&mut w);
        let mut u = udp(CLIENT, 5000, EP, 53, b"q");
        assert_eq!(w.process(&mut u, Source::Network(NET_B), Now(5)), Verdict::Forward(Egress::Provider));
        let ids = old.ids();
        std::mem::forget(w);
        std::mem::forget(old);
        let region: Arc<dyn flow::Region> = r.clone();
        let (t, found) =
            flow::FlowTable::attach(region, small().max_flows, flow::AttachMode::Recover).expect("attaches");
        assert_eq!(found.flows, 21);
        let e = Engine::with_flows(small(), t);
        e.seed_ids(&ids);
        let mut d = desired(1024..=1100, ConnectionState::Approved);
        d.endpoints.retain(|x| x.name != "pe-b");
        e.apply(&d, Now(5)).expect("valid");
        assert_eq!(e.adopt_flows(Now(6)), Adopted { flows: 20, ended: 1 });
        let mut w = e.worker(0);
        for (i, &port) in ports.iter().enumerate() {
            assert!(still_mapped(&mut w, i as u16, port));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn tcp_seq(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    syn: bool,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 65535);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

/// A TCP ACK with the timestamps option (value, echo) and a window.
#[allow(clippy::too_many_arguments)]
fn tcp_ts(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    seq: u32,
    ack: u32,
    window: u16,
    ts: (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64)
        .tcp(sport, dport, seq, window)
        .ack(ack)
        .options(&[etherparse::TcpOptionElement::Timestamp(ts.0, ts.1)])
        .expect("options");
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

/// The window and timestamps of a TCP packet.
fn tcp_window_ts(v: &[u8]) -> (u16, Option<(u32, u32)>) {
    let p = SlicedPacket::from_ip(v).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    let ts = t.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::Timestamp(a, b)) => Some((a, b)),
        _ => None,
    });
    (t.window_size(), ts)
}

/// A TCP RST at `seq` (with ACK when `ack` is given).
fn tcp_rst(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 0).rst();
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, b"").expect("build");
    v
}

/// (seq, ack, payload) of a TCP packet, after checking every checksum.
fn tcp_fields(v: &[u8]) -> (u32, u32, Vec<u8>) {
    assert!(inspect(v).4, "checksums");
    let p = SlicedPacket::from_ip(v).expect("parses");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    (t.sequence_number(), t.acknowledgment_number(), t.payload().to_vec())
}

#[test]
fn proxy_protocol_header_goes_first_and_sequence_numbers_line_up() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].proxy = Some(ProxyTlv::Azure);
    d.endpoints[0].link_id = 0x0bad_cafe;
    let (e, mut w) = engine_with(small(), &d);
    let (c, b) = (Source::Network(NET_A), Source::Provider);
    // SYN: as it was.
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, true, 1000, None, b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1000);
    let nport = inspect(&p).1;
    assert!(w.take_extra().is_none());
    // SYN-ACK: to the consumer as it was, nothing else yet.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, true, 5000, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1001);
    assert!(w.take_extra().is_none(), "no header before the consumer's handshake completes");
    // The consumer's ACK completes its handshake: it goes on unshifted (a
    // SYN-cookie backend checks its sequence number), the header after it,
    // with the ACK's window and timestamps.
    let mut p = tcp_ts(CLIENT, 40000, EP, 80, 1001, 5001, 502, (77, 88), b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1001);
    let (to, hdr) = w.take_extra().map(|(t, h)| (t, h.to_vec())).expect("header segment");
    assert_eq!(
        tcp_window_ts(&hdr),
        (502, Some((77, 88))),
        "the header segment repeats the consumer's window and timestamps"
    );
    assert_eq!(to, Egress::Provider);
    assert_eq!(inspect(&hdr).0..=inspect(&hdr).2, NAT_A..=BACKEND_A);
    assert_eq!((inspect(&hdr).1, inspect(&hdr).3), (nport, 8080));
    let (seq, ack, payload) = tcp_fields(&hdr);
    assert_eq!((seq, ack, payload.len()), (1001, 5001, 36));
    assert_eq!(&payload[..12], &proxy::SIGNATURE);
    assert_eq!(&payload[16..28], &[10, 1, 0, 10, 10, 1, 0, 5, 0x9c, 0x40, 0, 80], "the consumer's own addresses");
    assert_eq!(&payload[28..], &[0xEE, 0, 5, 1, 0xfe, 0xca, 0xad, 0x0b]);
    // The consumer's segments move up by the header's 36 bytes.
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, false, 1001, Some(5001), b"hi");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p).0, 1037);
    // A backend ACK short of the header: held at the consumer's ISN + 1,
    // and the header goes again.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, false, 5001, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1001);
    assert!(w.take_extra().is_some(), "header sent again");
    assert_eq!(e.proxy_resends(|_| {}), 1, "the sweep would send it too");
    // Header and "hi" acknowledged: the consumer sees its own numbers.
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, false, 5001, Some(1039), b"ok");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(tcp_fields(&p).1, 1003);
    assert!(w.take_extra().is_none());
    assert_eq!(e.proxy_resends(|_| {}), 0, "acknowledged: nothing to resend");
    // A service without the setting is untouched.
    let mut p = tcp_seq(CLIENT, 40001, EP, 80, true, 7000, None, b"");
    assert_eq!(w.process(&mut p, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let mut p2 = tcp_seq(CLIENT, 40001, EP, 80, false, 7001, Some(1), b"x");
    assert_eq!(w.process(&mut p2, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&p2).0, 7001);
}

#[test]
fn icmp_errors_about_proxy_flows_quote_the_consumers_own_numbers() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].proxy = Some(ProxyTlv::Gcp);
    let (_e, mut w) = engine_with(small(), &d);
    let (c, b) = (Source::Network(NET_A), Source::Provider);
    let mut p = tcp_seq(CLIENT, 40000, EP, 80, true, 1000, None, b"");
    assert_eq!(w.process(&mut p, c, Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&p).1;
    let mut p = tcp_seq(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, true, 5000, Some(1001), b"");
    assert_eq!(w.process(&mut p, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    // The consumer's ACK was lost: its first data segment completes the
    // handshake, and the header goes first.
    let mut data = tcp_seq(CLIENT, 40000, EP, 80, false, 1001, Some(5001), &[7u8; 100]);
    assert_eq!(w.process(&mut data, c, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(tcp_fields(&data).0, 1001 + 39);
    let (_, hdr) = w.take_extra().map(|(t, h)| (t, h.to_vec())).expect("header segment");
    assert_eq!(tcp_fields(&hdr).0, 1001);
    // The backend's side says "fragmentation needed" about that segment.
    let mut err = [0u8; 96];
    let n = wire::build_icmp_error(&mut err, &data, u32::from(BACKEND_A), u32::from(NAT_A), 3, 4, 1200);
    let mut err = err[..n].to_vec();
    assert_eq!(w.process(&mut err, b, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let q = &err[20 + 8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    let seq = u32::from_be_bytes([q[qihl + 4], q[qihl + 5], q[qihl + 6], q[qihl + 7]]);
    assert_eq!(seq, 1001, "the quoted segment carries the consumer's own sequence number");
    assert_eq!(checksum::checksum(&err[20..]), 0, "ICMP checksum");
    // An error about privlink's own header segment goes no further.
    let mut err = [0u8; 96];
    let n = wire::build_icmp_error(&mut err, &hdr, u32::from(BACKEND_A), u32::from(NAT_A), 3, 4, 1200);
    let mut err = err[..n].to_vec();
    assert_eq!(w.process(&mut err, b, Now(1)), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn nat_events_record_creates_deletes_and_exhaustion() {
    use crate::events::NatEventKind;
    let s = Settings { event_queue: 16, ..small() };
    let (e, mut w) = engine_with(s, &desired(2000..=2000, ConnectionState::Approved));
    let q = e.events().expect("queue");
    let mut p = udp(CLIENT, 5000, EP, 53, b"q");
    assert_eq!(w.process(&mut p, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let ev = q.pop().expect("create");
    assert_eq!(ev.kind, NatEventKind::Create);
    assert_eq!((ev.ckey.consumer_port(), ev.pkey.nat_port(), ev.pkey.backend_port()), (5000, 2000, 5353));
    // The same packet again: an existing flow, no event.
    let mut p = udp(CLIENT, 5000, EP, 53, b"q");
    w.process(&mut p, Source::Network(NET_A), Now(1));
    assert!(q.pop().is_none());
    // A second flow to the same backend port finds the one port taken.
    let mut p = udp(CLIENT, 5001, EP, 53, b"q");
    assert!(matches!(w.process(&mut p, Source::Network(NET_A), Now(1)), Verdict::Reply { .. } | Verdict::Drop(_)));
    let ev = q.pop().expect("exhaustion");
    assert_eq!((ev.kind, ev.ckey.consumer_port(), ev.pkey.nat_port()), (NatEventKind::PortsExhausted, 5001, 0));
    assert_eq!(e.expire(Now(10_000)), 1);
    let ev = q.pop().expect("delete");
    assert_eq!((ev.kind, ev.ckey.consumer_port(), ev.pkey.nat_port()), (NatEventKind::Delete, 5000, 2000));
    assert!(q.pop().is_none());
}

mod conntrack;
mod fragments;
mod proxy_handshake;
mod trim;
