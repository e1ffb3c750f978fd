//! Each step of the path and the drop reason it gives, both directions;
//! malformed input.

use super::*;

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
        assert_eq!(step(&mut w, &mut p, src, Now(1)), Verdict::Drop(want), "{want}");
    }
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::PortNotAllowed), 2);
    assert_eq!(dropped(&e, Some("vnet-b"), DropReason::NotApproved), 1);
    assert_eq!(dropped(&e, None, DropReason::NoFlow), 1);
    assert_eq!(dropped(&e, None, DropReason::Malformed), 1);

    // unsupported_protocol: GRE to an endpoint.
    let mut g = udp(CLIENT, 1, EP, 53, b"");
    g[9] = 47;
    fix_ip_checksum(&mut g);
    assert_eq!(step(&mut w, &mut g, a, Now(1)), Verdict::Drop(DropReason::UnsupportedProtocol));

    // ttl_expired: answered with time exceeded from the endpoint address.
    let mut t = tcp(CLIENT, 1, EP, 80, "S", b"");
    t[8] = 1;
    fix_ip_checksum(&mut t);
    let Verdict::Reply { reason: DropReason::TtlExpired, len } = step(&mut w, &mut t, a, Now(1)) else {
        panic!("ttl reply")
    };
    let (s, _, dst, _, ok) = inspect(w.reply(len));
    assert!(ok);
    assert_eq!((s, dst), (Ipv4Addr::from(EP), Ipv4Addr::from(CLIENT)));
    assert_eq!(w.reply(len)[20], 11);

    // ports_exhausted: the pool has one port and one backend, so a second
    // consumer port would need the same provider tuple.
    let mut f1 = tcp(CLIENT, 1, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut f1, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut f2 = tcp(CLIENT, 2, EP, 80, "S", b"");
    let Verdict::Reply { reason: DropReason::PortsExhausted, len } = step(&mut w, &mut f2, a, Now(1)) else {
        panic!("exhausted")
    };
    assert_eq!((w.reply(len)[20], w.reply(len)[21]), (3, 13));
    let snap = e.snapshot();
    let pool = snap.pools.values().find(|p| p.service == "svc-a" && p.protocol == Protocol::Tcp).expect("pool");
    assert_eq!((pool.pool.available(), pool.pool.exhausted()), (0, 1));

    // flow_table_full: max_flows is 2 (the TCP flow plus this UDP one).
    let mut u1 = udp(CLIENT, 1, EP, 53, b"");
    assert_eq!(step(&mut w, &mut u1, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut u2 = udp(CLIENT, 2, EP, 53, b"");
    assert_eq!(step(&mut w, &mut u2, a, Now(1)), Verdict::Drop(DropReason::FlowTableFull));

    // too_big: network B has MTU 1400; a 1450-byte DF reply from the backend
    // gets "fragmentation needed" with MTU 1400.
    e.set_connection_state("pe-b", ConnectionState::Approved, Now(1));
    let (e2, mut w2) = engine();
    let _ = &e2;
    let mut syn = tcp(CLIENT, 9, EP, 80, "S", b"");
    assert_eq!(step(&mut w2, &mut syn, Source::Network(NET_B), Now(1)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);
    let mut big = tcp(BACKEND_B.octets(), 8080, NAT_B.octets(), nport, "A", &[7u8; 1410]);
    big[6] |= 0x40;
    fix_ip_checksum(&mut big);
    let Verdict::Reply { reason: DropReason::TooBig, len } = step(&mut w2, &mut big, Source::Provider, Now(1)) else {
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
        assert_eq!(step(&mut w, &mut c, Source::Network(NET_A), Now(1)), Verdict::Drop(DropReason::Malformed));
    }
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::Malformed), n);
}

fn ttl1(p: &mut [u8]) {
    p[8] = 1;
    fix_ip_checksum(p);
}

#[test]
fn each_step_of_the_consumer_side_gives_its_reason() {
    let (_e, mut w) = engine_with(small(), &desired(1024..=65535, ConnectionState::Pending));
    let (a, b) = (Source::Network(NET_A), Source::Network(NET_B));
    let run = |w: &mut Worker, mut p: Vec<u8>, s: Source| step(w, &mut p, s, Now(1));
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
    assert_eq!(step(&mut w, &mut syn, a, Now(1)), Verdict::Forward(Egress::Provider));
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
    let run = |w: &mut Worker, mut pkt: Vec<u8>| step(w, &mut pkt, p, Now(1));
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
    assert_eq!(step(&mut w, &mut r, p, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    assert_eq!(inspect(&r), (Ipv4Addr::from(EP), 53, Ipv4Addr::from(CLIENT), 1000, true));
    let mut r = b_reply.clone();
    assert_eq!(step(&mut w, &mut r, p, Now(1)), Verdict::Forward(Egress::Network(NET_B)));
    // 6. approve, before TTL: a flow whose endpoint is no longer approved
    // (caught between the state change and its sweep) answers nothing.
    let snap = e.snapshot();
    let ep = snap.endpoint_by_name("pe-a").expect("pe-a");
    ep.shared.conn.store(ConnectionState::Rejected as u8, std::sync::atomic::Ordering::Release);
    assert_eq!(run(&mut w, a_reply), Verdict::Drop(DropReason::NotApproved));
    assert_eq!(run(&mut w, t), Verdict::Drop(DropReason::NotApproved), "no time exceeded");
}
