//! TCP tracking: closed flows do not count against the bounds and give way
//! to new flows; only an exact RST ends a flow.

use super::*;
use std::sync::atomic::Ordering::Relaxed;

/// The five packets of one short connection from consumer port `sport`
/// (SYN, SYN-ACK, ACK, FIN both ways) through endpoint `pe-a`; returns the
/// SYN's verdict.
fn short_connection(w: &mut Worker, sport: u16, now: Now) -> Verdict {
    let a = Source::Network(NET_A);
    let mut syn = tcp_seq(CLIENT, sport, EP, 80, true, 1000, None, b"");
    let v = step(w, &mut syn, a, now);
    if v != Verdict::Forward(Egress::Provider) {
        return v;
    }
    let nport = inspect(&syn).1;
    let (be, nat) = (BACKEND_A.octets(), NAT_A.octets());
    for (p, src) in [
        (tcp_seq(be, 8080, nat, nport, true, 5000, Some(1001), b""), Source::Provider),
        (tcp_seq(CLIENT, sport, EP, 80, false, 1001, Some(5001), b"GET"), a),
        (tcp_fin(be, 8080, nat, nport, 5001, 1004), Source::Provider),
        (tcp_fin(CLIENT, sport, EP, 80, 1004, 5002), a),
    ] {
        let mut p = p;
        assert!(matches!(step(w, &mut p, src, now), Verdict::Forward(_)));
    }
    v
}

fn tcp_fin(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, seq: u32, ack: u32) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 1000).ack(ack).fin().write(&mut v, b"").expect("build");
    v
}

fn limited(max_flows: u32, nat_ports: std::ops::RangeInclusive<u16>, settings: Settings) -> (Arc<Engine>, Worker) {
    let mut d = desired(nat_ports, ConnectionState::Approved);
    d.endpoints[0].limits.max_flows = Some(max_flows);
    engine_with(settings, &d)
}

fn shared(e: &Engine) -> Arc<crate::EndpointShared> {
    e.snapshot().endpoint_by_name("pe-a").expect("pe-a").shared.clone()
}

#[test]
fn closed_connections_do_not_count_against_max_flows() {
    let (e, mut w) = limited(5, 1024..=65535, small());
    for i in 0..20 {
        assert_eq!(short_connection(&mut w, 30000 + i, Now(1)), Verdict::Forward(Egress::Provider), "connection {i}");
    }
    let ep = shared(&e);
    assert_eq!(ep.flows_active.load(Relaxed), 0, "every connection closed");
    assert_eq!(ep.flows_closed.load(Relaxed), 20, "each still holds its port while it lingers");
    assert_eq!(ep.ports_in_use(), 20);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::EndpointFlowLimit), 0);
    // Eight held open at once: exactly five.
    let mut admitted = 0;
    for i in 0..8 {
        let mut syn = tcp_seq(CLIENT, 40000 + i, EP, 80, true, 1000, None, b"");
        if step(&mut w, &mut syn, Source::Network(NET_A), Now(2)) == Verdict::Forward(Egress::Provider) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
    assert_eq!(ep.flows_active.load(Relaxed), 5);
    assert_eq!(dropped(&e, Some("vnet-a"), DropReason::EndpointFlowLimit), 3);
    // Expiry ends the closed ones and takes them off the closed count only.
    e.expire(Now(1 + e.settings().timeouts.tcp_closed));
    assert_eq!((ep.flows_active.load(Relaxed), ep.flows_closed.load(Relaxed)), (5, 0));
}

#[test]
fn a_reopened_flow_counts_again_and_respects_the_bound() {
    let (e, mut w) = limited(1, 1024..=65535, small());
    let ep = shared(&e);
    assert_eq!(short_connection(&mut w, 30000, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!((ep.flows_active.load(Relaxed), ep.flows_closed.load(Relaxed)), (0, 1));
    // The same 5-tuple again: reopened, open again.
    assert_eq!(short_connection(&mut w, 30000, Now(2)), Verdict::Forward(Egress::Provider));
    let mut syn = tcp_seq(CLIENT, 30000, EP, 80, true, 9000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(3)), Verdict::Forward(Egress::Provider));
    assert_eq!((ep.flows_active.load(Relaxed), ep.flows_closed.load(Relaxed)), (1, 0));
    // Another connection is over the bound; so is reopening a closed one
    // while the bound is reached.
    let mut other = tcp_seq(CLIENT, 30001, EP, 80, true, 1000, None, b"");
    assert_eq!(step(&mut w, &mut other, Source::Network(NET_A), Now(3)), Verdict::Drop(DropReason::EndpointFlowLimit));
    assert_eq!(e.flows().len(), 1);
}

#[test]
fn an_exhausted_pool_ends_its_oldest_closed_flow_for_a_new_one() {
    let s = Settings { event_queue: 64, ..small() };
    let (e, mut w) = limited(100, 2000..=2001, s);
    let pool = e.snapshot().pools.values().find(|p| p.protocol == Protocol::Tcp && p.service == "svc-a").cloned();
    let pool = pool.expect("tcp pool");
    assert_eq!(short_connection(&mut w, 30000, Now(1)), Verdict::Forward(Egress::Provider));
    assert_eq!(short_connection(&mut w, 30001, Now(2)), Verdict::Forward(Egress::Provider));
    assert_eq!(pool.pool.available(), 0, "both ports held by closed flows");
    let q = e.events().expect("events");
    while q.pop().is_some() {}
    // A third connection: the oldest closed flow (port of 30000) gives way.
    let mut syn = tcp_seq(CLIENT, 30002, EP, 80, true, 1000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(3)), Verdict::Forward(Egress::Provider));
    let listed = e.flow_list(None, Now(3));
    let ports: Vec<u16> = listed.iter().map(|f| f.consumer.port()).collect();
    assert!(!ports.contains(&30000) && ports.contains(&30001) && ports.contains(&30002), "{ports:?}");
    let ev = q.pop().expect("delete of the reclaimed flow");
    assert_eq!((ev.kind, ev.ckey.consumer_port()), (crate::events::NatEventKind::Delete, 30000));
    assert_eq!(pool.pool.exhausted(), 0, "not counted as an exhaustion");
    // Two open flows hold both ports (each to the one backend): a fourth
    // is refused, and nothing open was ended for it.
    let mut syn = tcp_seq(CLIENT, 30003, EP, 80, true, 1000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(4)), Verdict::Forward(Egress::Provider));
    let mut syn = tcp_seq(CLIENT, 30004, EP, 80, true, 1000, None, b"");
    assert!(matches!(step(&mut w, &mut syn, Source::Network(NET_A), Now(4)), Verdict::Reply { .. }));
    assert_eq!(pool.pool.exhausted(), 1);
    assert_eq!(e.flows().len(), 2);
    // No NAT tuple is live twice.
    let listed = e.flow_list(None, Now(4));
    let tuples: HashSet<_> = listed.iter().map(|f| (f.nat, f.backend)).collect();
    assert_eq!(tuples.len(), listed.len());
}

#[test]
fn a_full_table_ends_the_oldest_closed_flow_of_any_pool() {
    // Four flows in all; the network's share lets one network use them all.
    let mut d = desired(1024..=65535, ConnectionState::Approved);
    d.networks.truncate(1);
    d.endpoints.truncate(1);
    let (e, mut w) = engine_with(Settings { max_flows: 4, ..small() }, &d);
    for i in 0..4 {
        assert_eq!(short_connection(&mut w, 30000 + i, Now(1 + u32::from(i))), Verdict::Forward(Egress::Provider));
    }
    assert_eq!(e.flows().len(), 4);
    let mut syn = tcp_seq(CLIENT, 31000, EP, 80, true, 1000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(9)), Verdict::Forward(Egress::Provider));
    let ports: Vec<u16> = e.flow_list(None, Now(9)).iter().map(|f| f.consumer.port()).collect();
    assert!(!ports.contains(&30000) && ports.contains(&31000), "the oldest closed went: {ports:?}");
    // Open flows fill the table: the next new flow is refused.
    for i in 0..3 {
        let mut syn = tcp_seq(CLIENT, 32000 + i, EP, 80, true, 1000, None, b"");
        assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(10)), Verdict::Forward(Egress::Provider));
    }
    let mut syn = tcp_seq(CLIENT, 33000, EP, 80, true, 1000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(10)), Verdict::Drop(DropReason::FlowTableFull));
}

/// An established flow of `pe-a` from consumer port 40000; returns its NAT
/// port. The consumer's next sequence number is 1001 + 5, the backend's
/// 5001 + 3.
fn established(w: &mut Worker) -> u16 {
    let a = Source::Network(NET_A);
    let mut syn = tcp_seq(CLIENT, 40000, EP, 80, true, 1000, None, b"");
    assert_eq!(step(w, &mut syn, a, Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&syn).1;
    let (be, nat) = (BACKEND_A.octets(), NAT_A.octets());
    let mut sa = tcp_seq(be, 8080, nat, nport, true, 5000, Some(1001), b"");
    assert!(matches!(step(w, &mut sa, Source::Provider, Now(1)), Verdict::Forward(_)));
    let mut d = tcp_seq(CLIENT, 40000, EP, 80, false, 1001, Some(5001), b"hello");
    assert!(matches!(step(w, &mut d, a, Now(1)), Verdict::Forward(_)));
    let mut d = tcp_seq(be, 8080, nat, nport, false, 5001, Some(1006), b"hey");
    assert!(matches!(step(w, &mut d, Source::Provider, Now(1)), Verdict::Forward(_)));
    nport
}

#[test]
fn only_a_rst_at_the_exact_next_sequence_number_ends_a_flow() {
    let (e, mut w) = engine();
    let nport = established(&mut w);
    let (be, nat) = (BACKEND_A.octets(), NAT_A.octets());
    let state = |e: &Engine| e.flow_list(None, Now(1))[0].state;
    // In the window but not exact, from either side; far outside it: the
    // RST is forwarded (the endpoints answer it) and nothing changes.
    for (mut p, src) in [
        (tcp_rst(CLIENT, 40000, EP, 80, 1006 + 1000, None), Source::Network(NET_A)),
        (tcp_rst(be, 8080, nat, nport, 5004 + 1000, Some(1006)), Source::Provider),
        (tcp_rst(CLIENT, 40000, EP, 80, 1006u32.wrapping_add(1 << 31), None), Source::Network(NET_A)),
        (tcp_rst(be, 8080, nat, nport, 5003, None), Source::Provider),
    ] {
        assert!(matches!(step(&mut w, &mut p, src, Now(2)), Verdict::Forward(_)));
        assert_eq!(state(&e), "established");
    }
    // The idle connection lives on past the closed timeout.
    assert_eq!(e.expire(Now(2 + e.settings().timeouts.tcp_closed)), 0);
    // Exact: the backend's next sequence number.
    let mut p = tcp_rst(be, 8080, nat, nport, 5004, Some(1006));
    assert!(matches!(step(&mut w, &mut p, Source::Provider, Now(100)), Verdict::Forward(_)));
    assert_eq!(state(&e), "closed");
}

#[test]
fn a_rst_answering_data_after_its_senders_fin_ends_the_flow() {
    // A socket closed with its FIN sent that then receives data resets
    // the connection with the sequence number the data acknowledged: the
    // FIN's own, one before the sender's next (Linux tcp_rcv_state_process
    // then tcp_v4_send_reset; the receiver accepts rcv_nxt - 1 after a
    // FIN, tcp_reset_check). From either side.
    let (be, nat) = (BACKEND_A.octets(), NAT_A.octets());
    let a = Source::Network(NET_A);
    for consumer_closes in [true, false] {
        let (e, mut w) = engine();
        let nport = established(&mut w);
        let state = |e: &Engine| e.flow_list(None, Now(1))[0].state;
        let (mut fin, mut data, mut rst, fin_src, rst_src) = if consumer_closes {
            (
                tcp_fin(CLIENT, 40000, EP, 80, 1006, 5004),
                tcp_seq(be, 8080, nat, nport, false, 5004, Some(1006), b"late"),
                tcp_rst(CLIENT, 40000, EP, 80, 1006, None),
                a,
                a,
            )
        } else {
            (
                tcp_fin(be, 8080, nat, nport, 5004, 1006),
                tcp_seq(CLIENT, 40000, EP, 80, false, 1006, Some(5004), b"late"),
                tcp_rst(be, 8080, nat, nport, 5004, None),
                Source::Provider,
                Source::Provider,
            )
        };
        assert!(matches!(step(&mut w, &mut fin, fin_src, Now(2)), Verdict::Forward(_)));
        assert_eq!(state(&e), "closing");
        let data_src = if consumer_closes { Source::Provider } else { a };
        assert!(matches!(step(&mut w, &mut data, data_src, Now(2)), Verdict::Forward(_)));
        assert!(matches!(step(&mut w, &mut rst, rst_src, Now(2)), Verdict::Forward(_)));
        assert_eq!(state(&e), "closed", "consumer closes: {consumer_closes}");
    }
    // Without a FIN before it, the same number is not the sender's next.
    let (e, mut w) = engine();
    established(&mut w);
    let mut rst = tcp_rst(CLIENT, 40000, EP, 80, 1005, None);
    assert!(matches!(step(&mut w, &mut rst, a, Now(2)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(2))[0].state, "established");
}

#[test]
fn a_rst_from_the_consumer_at_its_next_sequence_number_ends_the_flow() {
    let (e, mut w) = engine();
    established(&mut w);
    let mut p = tcp_rst(CLIENT, 40000, EP, 80, 1006, Some(5004));
    assert!(matches!(step(&mut w, &mut p, Source::Network(NET_A), Now(2)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(2))[0].state, "closed");
}

#[test]
fn a_refused_connection_ends_with_the_rst_that_acknowledges_its_syn() {
    let (e, mut w) = engine();
    let mut syn = tcp_seq(CLIENT, 40000, EP, 80, true, 7000, None, b"");
    assert_eq!(step(&mut w, &mut syn, Source::Network(NET_A), Now(1)), Verdict::Forward(Egress::Provider));
    let nport = inspect(&syn).1;
    let (be, nat) = (BACKEND_A.octets(), NAT_A.octets());
    // A RST that does not acknowledge the SYN changes nothing.
    let mut p = tcp_rst(be, 8080, nat, nport, 0, Some(6999));
    assert!(matches!(step(&mut w, &mut p, Source::Provider, Now(1)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(1))[0].state, "opening");
    let mut p = tcp_rst(be, 8080, nat, nport, 0, Some(7001));
    assert!(matches!(step(&mut w, &mut p, Source::Provider, Now(1)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(1))[0].state, "closed");
}

#[test]
fn a_blind_forged_segment_cannot_set_up_an_exact_rst() {
    let (e, mut w) = engine();
    established(&mut w);
    let a = Source::Network(NET_A);
    // Forged: data far ahead of the consumer's stream, then a RST at its
    // end. Both are forwarded (the backend discards them); the flow stays.
    let far = 1006u32.wrapping_add(1 << 30);
    let mut forged = tcp_seq(CLIENT, 40000, EP, 80, false, far, Some(5004), b"xxxx");
    assert!(matches!(step(&mut w, &mut forged, a, Now(2)), Verdict::Forward(_)));
    let mut rst = tcp_rst(CLIENT, 40000, EP, 80, far + 4, None);
    assert!(matches!(step(&mut w, &mut rst, a, Now(2)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(2))[0].state, "established");
    // A SYN in the middle of the connection moves nothing either.
    let mut syn = tcp_seq(CLIENT, 40000, EP, 80, true, 77, None, b"");
    step(&mut w, &mut syn, a, Now(2));
    let mut rst = tcp_rst(CLIENT, 40000, EP, 80, 78, None);
    step(&mut w, &mut rst, a, Now(2));
    assert_eq!(e.flow_list(None, Now(2))[0].state, "established");
    // The real stream goes on and its own RST still closes.
    let mut d = tcp_seq(CLIENT, 40000, EP, 80, false, 1006, Some(5004), b"more");
    assert!(matches!(step(&mut w, &mut d, a, Now(3)), Verdict::Forward(_)));
    let mut rst = tcp_rst(CLIENT, 40000, EP, 80, 1010, None);
    assert!(matches!(step(&mut w, &mut rst, a, Now(3)), Verdict::Forward(_)));
    assert_eq!(e.flow_list(None, Now(3))[0].state, "closed");
}

#[test]
fn a_flow_reopened_in_a_frozen_table_is_not_reclaimed() {
    use crate::flow::{state, ConsumerKey, Inserted, ProviderKey};
    let t = crate::flow::FlowTable::new(16);
    let k = ConsumerKey::new(1, 6, 1, 1, 2, 80);
    let bits = state::C_SYN | state::P_SYN | state::ESTABLISHED;
    let Ok(Inserted::New(v)) = t
        .insert(k, EndpointId(1), Now(0), |claim| claim(ProviderKey::new(6, 3, 1, 4, 80)).then_some((PoolId(1), bits)))
    else {
        panic!("insert")
    };
    assert!(t.add_state(&v, state::RST).is_some_and(|c| c.counted_closed()));
    // The old daemon of a hand-over reopens it: the bit stays for the
    // successor's sweep, but the flow is open.
    t.freeze();
    assert!(t.reopen(&v).is_some_and(|c| c.after & state::COUNTED_CLOSED != 0));
    t.thaw();
    assert_eq!(t.remove_if(&v, crate::conntrack::closed), None, "an open flow is never reclaimed");
    assert!(t.find_consumer(k).is_some());
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
    step(&mut w, &mut u, a, Now(0));
    assert_eq!(e.expire(Now(299)), 0);
    let mut again = udp(CLIENT, 1, EP, 53, b"");
    step(&mut w, &mut again, a, Now(100)); // refresh
    assert_eq!(e.expire(Now(399)), 0);
    assert_eq!(e.expire(Now(400)), 1);
    assert_eq!(udp_pool.pool.available(), 1, "expired port is quarantined");
    e.expire(Now(400 + pool::QUARANTINE_SECS));
    assert_eq!(udp_pool.pool.available(), 2);

    // TCP: opening times out after the transitory 240 s.
    let mut s = tcp(CLIENT, 2, EP, 80, "S", b"");
    step(&mut w, &mut s, a, Now(1000));
    assert_eq!(e.expire(Now(1239)), 0);
    assert_eq!(e.expire(Now(1240)), 1);

    // TCP: established waits 7440 s; a full close frees the port early and
    // without quarantine.
    let mut s = tcp(CLIENT, 3, EP, 80, "S", b"");
    step(&mut w, &mut s, a, Now(2000));
    let (_, nport, _, _, _) = inspect(&s);
    let mut sa = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "SA", b"");
    assert_eq!(step(&mut w, &mut sa, Source::Provider, Now(2000)), Verdict::Forward(Egress::Network(NET_A)));
    let mut ack = tcp(CLIENT, 3, EP, 80, "A", b"");
    step(&mut w, &mut ack, a, Now(2000));
    assert_eq!(e.flow_list(None, Now(2000))[0].state, "established");
    assert_eq!(e.expire(Now(2000 + 7439)), 0);
    let before = tcp_pool.pool.available();
    let mut fin = tcp(CLIENT, 3, EP, 80, "FA", b"");
    step(&mut w, &mut fin, a, Now(9500));
    let mut fin2 = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), nport, "FA", b"");
    step(&mut w, &mut fin2, Source::Provider, Now(9500));
    assert_eq!(e.flow_list(None, Now(9500))[0].state, "closed");
    // The same 5-tuple opening again while the flow lingers gets the same
    // NAT port (the backend may hold that 4-tuple in TIME_WAIT).
    let mut syn = tcp(CLIENT, 3, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut syn, a, Now(9530)), Verdict::Forward(Egress::Provider));
    assert_eq!(inspect(&syn).1, nport, "reopened on the same port");
    assert_eq!(e.flow_list(None, Now(9530))[0].state, "opening");
    // The RST at the consumer's next sequence number (the SYN took 1000).
    let mut rst = tcp_rst(CLIENT, 3, EP, 80, 1001, None);
    step(&mut w, &mut rst, a, Now(9540));
    assert_eq!(e.flow_list(None, Now(9540))[0].state, "closed");
    assert_eq!(e.expire(Now(9599)), 0);
    assert_eq!(e.expire(Now(9600)), 1);
    assert_eq!(tcp_pool.pool.available(), before + 1, "closed: no quarantine");

    // RST closes too; ICMP query flows use the ICMP timeout.
    let mut s = tcp(CLIENT, 4, EP, 80, "S", b"");
    step(&mut w, &mut s, a, Now(20000));
    let mut r = tcp_rst(CLIENT, 4, EP, 80, 1001, None);
    step(&mut w, &mut r, a, Now(20000));
    assert_eq!(e.expire(Now(20059)), 0);
    assert_eq!(e.expire(Now(20060)), 1);
    let mut p = ping(CLIENT, EP, 5, false);
    step(&mut w, &mut p, a, Now(30000));
    assert_eq!(e.expire(Now(30059)), 0);
    assert_eq!(e.expire(Now(30060)), 1);
}
