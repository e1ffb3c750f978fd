//! Reloads: unchanged flows stay, removed ones end, ports and counters
//! carry over, bad input is refused.

use super::*;

#[test]
fn reload_keeps_unchanged_flows_and_ends_removed_ones() {
    let (e, mut w) = engine();
    let mut a = tcp(CLIENT, 1, EP, 80, "S", b"");
    let mut b = tcp(CLIENT, 1, EP, 80, "S", b"");
    step(&mut w, &mut a, Source::Network(NET_A), Now(0));
    step(&mut w, &mut b, Source::Network(NET_B), Now(0));
    let (_, pa, _, _, _) = inspect(&a);
    assert_eq!(e.flows().len(), 2);
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints.pop(); // remove pe-b
    d.endpoints.push(EndpointSpec {
        link_id: 0,
        name: "pe-new".into(),
        network: 0,
        ip: Ipv4Addr::new(10, 1, 0, 6).into(),
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
    assert_eq!(step(&mut w, &mut ra, Source::Provider, Now(1)), Verdict::Forward(Egress::Network(NET_A)));
    let mut n = tcp(CLIENT, 1, [10, 1, 0, 6], 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&n).2, BACKEND_B);
    // Reject ends the endpoint's flows and drops its packets.
    assert!(e.connection_approved("pe-a") && e.connection_approved("pe-new"));
    assert!(!e.connection_approved("pe-b"), "removed");
    assert!(e.set_connection_state("pe-a", ConnectionState::Rejected, Now(2)));
    assert!(!e.connection_approved("pe-a"), "rejected");
    let mut again = tcp(CLIENT, 1, EP, 80, "A", b"");
    assert_eq!(step(&mut w, &mut again, Source::Network(NET_A), Now(2)), Verdict::Drop(DropReason::NotApproved));
    assert_eq!(e.flow_list(Some("pe-a"), Now(2)).len(), 0);
}

#[test]
fn bad_desired_is_refused_without_panic() {
    let e = Engine::new(Settings::default());
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].backends.clear();
    assert_eq!(e.apply(&d, Now(0)), Err(CoreError::NoBackends("svc-a".into())));
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].nat_ips = vec![NAT_A.into(); 257];
    assert!(matches!(e.apply(&d, Now(0)), Err(CoreError::NatIpCount(..))));
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.endpoints[1].network = 0;
    assert!(matches!(e.apply(&d, Now(0)), Err(CoreError::DuplicateEndpointAddress(..))));
}

#[test]
fn a_service_whose_nat_addresses_this_host_lost_ends_their_flows_and_drops_new_ones() {
    // A fleet host that holds none of a service's addresses (lost by
    // lease): its flows on them end, new ones drop as `no_nat_ip`, and the
    // other service is untouched.
    let (e, mut w) = engine();
    let mut a = tcp(CLIENT, 1, EP, 80, "S", b"");
    let mut b = tcp(CLIENT, 1, EP, 80, "S", b"");
    step(&mut w, &mut a, Source::Network(NET_A), Now(0));
    step(&mut w, &mut b, Source::Network(NET_B), Now(0));
    assert_eq!(e.flows().len(), 2);
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.services[0].nat_ips.clear();
    let report = e.apply(&d, Now(1)).expect("apply");
    assert_eq!(report.flows_ended, 1);
    assert_eq!(e.flow_list(Some("pe-a"), Now(1)).len(), 0);
    assert_eq!(e.flow_list(Some("pe-b"), Now(1)).len(), 1);
    let mut n = tcp(CLIENT, 2, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(1)), Verdict::Drop(DropReason::NoNatIp));
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::NoNatIp), 1);
    // Given back (claimed again), new flows go out from it.
    e.apply(&desired(1024..=65535, ConnectionState::Approved), Now(2)).expect("apply");
    let mut n = tcp(CLIENT, 3, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&n).0, NAT_A);
}

#[test]
fn past_the_lease_deadline_new_flows_wait_and_established_ones_go_on() {
    let (e, mut w) = engine();
    let mut a = tcp(CLIENT, 1, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut a, Source::Network(NET_A), Now(0)), Verdict::Forward(Egress::Provider));
    e.set_lease_deadline(Some(Now(5)));
    let mut n = tcp(CLIENT, 2, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(5)), Verdict::Forward(Egress::Provider));
    let mut n = tcp(CLIENT, 3, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(6)), Verdict::Drop(DropReason::NoNatIp));
    let mut more = tcp(CLIENT, 1, EP, 80, "A", b"data");
    assert_eq!(step(&mut w, &mut more, Source::Network(NET_A), Now(6)), Verdict::Forward(Egress::Provider));
    e.set_lease_deadline(None);
    let mut n = tcp(CLIENT, 3, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut n, Source::Network(NET_A), Now(7)), Verdict::Forward(Egress::Provider));
}

#[test]
fn a_reload_that_changes_nat_ports_under_live_flows_gives_every_port_back() {
    let (e, mut w) = engine_with(small(), &desired(5000..=5009, ConnectionState::Approved));
    let a = Source::Network(NET_A);
    for port in 0..10 {
        let mut p = tcp(CLIENT, 2000 + port, EP, 80, "S", b"");
        assert_eq!(step(&mut w, &mut p, a, Now(1)), Verdict::Forward(Egress::Provider));
    }
    // The range grows under the live flows, which end with their old pool;
    // new flows take ports of the new range, overlapping the old one.
    e.apply(&desired(5000..=5019, ConnectionState::Approved), Now(2)).expect("config");
    for port in 0..15 {
        let mut p = tcp(CLIENT, 3000 + port, EP, 80, "S", b"");
        assert_eq!(step(&mut w, &mut p, a, Now(2)), Verdict::Forward(Egress::Provider));
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

#[test]
fn counters_stay_monotonic_when_an_endpoint_or_network_leaves_and_returns() {
    // 30 packets, removal, re-adding, 45 more: 75.
    let full = desired(1024..=65535, ConnectionState::Approved);
    let (e, mut w) = engine_with(small(), &full);
    let a = Source::Network(NET_A);
    let send = |w: &mut Worker, n: u16, now: u32| {
        for i in 0..n {
            let mut p = udp(CLIENT, 3000 + i, EP, 53, b"x");
            assert_eq!(step(w, &mut p, a, Now(now)), Verdict::Forward(Egress::Provider));
        }
    };
    send(&mut w, 30, 1);
    let mut bad = udp(CLIENT, 1, [10, 1, 0, 99], 53, b"");
    assert_eq!(step(&mut w, &mut bad, a, Now(1)), Verdict::Drop(DropReason::NoEndpoint));
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
    assert_eq!(step(&mut w, &mut bad, a, Now(4)), Verdict::Drop(DropReason::NoEndpoint));
    let snap = e.snapshot();
    let ep = snap.endpoint_by_name("pe-a").expect("pe-a is back");
    assert_eq!(ep.shared.totals().1, 75, "packets in over both lives of pe-a");
    assert_eq!(ep.shared.flows_created.load(std::sync::atomic::Ordering::Relaxed), 75);
    assert_eq!(ep.shared.flows_active.load(std::sync::atomic::Ordering::Relaxed), 45, "only the live flows");
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::NoEndpoint), 2, "drops over both lives of vnet-a");
}
