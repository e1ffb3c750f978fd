//! Bounds: a SYN flood, a network's share of the table, an endpoint's
//! `max_flows`, source rules.

use super::*;

#[test]
fn syn_flood_leaves_existing_flows_working_and_the_pool_recovers() {
    // A 100-port pool, one backend: at most 100 flows can hold a port.
    let d = desired(3000..=3099, ConnectionState::Approved);
    let (e, mut w) = engine_with(Settings { max_flows: 4096, ..Settings::default() }, &d);
    let a = Source::Network(NET_A);
    // An established flow from another client before the flood.
    let mut syn = tcp([10, 1, 0, 99], 5555, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut syn, a, Now(0)), Verdict::Forward(Egress::Provider));
    let (_, nport, _, _, _) = inspect(&syn);
    let mut sa = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "SA", b"");
    step(&mut w, &mut sa, Source::Provider, Now(0));
    let mut ack = tcp([10, 1, 0, 99], 5555, EP, 80, "A", b"");
    step(&mut w, &mut ack, a, Now(0));

    // 100,000 SYNs from distinct source ports (and addresses).
    let mut forwarded = 0;
    let mut exhausted = 0;
    for i in 0..100_000u32 {
        let src = [10, 2, (i >> 16) as u8, (i >> 8) as u8];
        let mut p = tcp(src, 1024 + (i % 60_000) as u16, EP, 80, "S", b"");
        match step(&mut w, &mut p, a, Now(1)) {
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
    assert_eq!(step(&mut w, &mut data, a, Now(2)), Verdict::Forward(Egress::Provider));
    let mut back = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "A", b"yes");
    assert_eq!(step(&mut w, &mut back, Source::Provider, Now(2)), Verdict::Forward(Egress::Network(NET_A)));
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
    assert_eq!(step(&mut w, &mut fresh, a, Now(400)), Verdict::Forward(Egress::Provider));
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
        match step(&mut w, &mut p, Source::Network(NET_A), Now(1)) {
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
        assert_eq!(
            step(&mut w, &mut p, Source::Network(NET_B), Now(1)),
            Verdict::Forward(Egress::Provider),
            "B {port}"
        );
    }
    // A's flows end: its share is free again.
    e.expire(Now(10_000));
    let mut p = udp(CLIENT, 30_000, EP, 53, b"x");
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(10_000)), Verdict::Forward(Egress::Provider));
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
        ip: Ipv4Addr::new(10, 1, 0, 6).into(),
        service: 0,
        state: ConnectionState::Approved,
        limits: EndpointLimits::default(),
    });
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    let mut made = 0;
    for port in 0..30u16 {
        let mut p = tcp(CLIENT, 5000 + port, EP, 80, "S", b"");
        match step(&mut w, &mut p, a, Now(1)) {
            Verdict::Forward(_) => made += 1,
            Verdict::Drop(DropReason::EndpointFlowLimit) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(made, 20);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::EndpointFlowLimit), 10);
    let mut p = tcp(CLIENT, 6000, [10, 1, 0, 6], 80, "S", b"");
    assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Forward(Egress::Provider), "the other endpoint connects");
    let snap = e.snapshot();
    let pe = snap.endpoint_by_name("pe-a").expect("pe-a");
    assert_eq!(pe.shared.flows_active.load(std::sync::atomic::Ordering::Relaxed), 20);
    // Packets of existing flows are not limited.
    let mut again = tcp(CLIENT, 5000, EP, 80, "A", b"data");
    assert_eq!(step(&mut w, &mut again, a, Now(1)), Verdict::Forward(Egress::Provider));
}

#[test]
fn source_rules_admit_only_allowed_consumers_and_a_reload_ends_disallowed_flows() {
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints[0].limits.allow_sources = vec![(Ipv4Addr::new(10, 1, 0, 8).into(), 30)]; // .8 to .11
    let (e, mut w) = engine_with(small(), &d);
    let a = Source::Network(NET_A);
    let mut ok = udp(CLIENT, 1000, EP, 53, b"x"); // 10.1.0.10
    assert_eq!(step(&mut w, &mut ok, a, Now(1)), Verdict::Forward(Egress::Provider));
    let mut no = udp([10, 1, 0, 20], 1000, EP, 53, b"x");
    assert_eq!(step(&mut w, &mut no, a, Now(1)), Verdict::Drop(DropReason::SourceNotAllowed));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::SourceNotAllowed), 1);
    assert_eq!(e.flows().len(), 1);
    // The reload narrows the rule: the allowed flow of .10 ends, its packets drop.
    d.endpoints[0].limits.allow_sources = vec![(Ipv4Addr::new(10, 1, 0, 20).into(), 32)];
    let report = e.apply(&d, Now(2)).expect("config");
    assert_eq!(report.flows_ended, 1);
    assert_eq!(report.endpoints_kept, vec!["pe-a".to_string(), "pe-b".to_string()]);
    let mut ok = udp(CLIENT, 1000, EP, 53, b"x");
    assert_eq!(step(&mut w, &mut ok, a, Now(2)), Verdict::Drop(DropReason::SourceNotAllowed));
    let mut now_ok = udp([10, 1, 0, 20], 1000, EP, 53, b"x");
    assert_eq!(step(&mut w, &mut now_ok, a, Now(2)), Verdict::Forward(Egress::Provider));
}

// ---- Backend health. ----
