//! What users hit, end to end (real daemon, TUN devices, namespaces,
//! kernel TCP/UDP): `max_flows` counts open connections only, a RST the
//! endpoints ignore does not end the flow while the RST of a socket closed
//! before late data arrives does, and packets with trailing bytes
//! after their IP total length are trimmed and forwarded both ways.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, UdpSocket};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

/// One short connection (connect, one request, close) to the hashing
/// backend; true when it was answered.
fn short_request(ns: &str) -> bool {
    let Ok(mut s) = connect(ns, EP, 80, 2 * SEC) else { return false };
    let _ = s.set_read_timeout(Some(3 * SEC));
    let greeting = line(&mut s);
    if s.write_all(b"one request").is_err() || s.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let answer = line(&mut s);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    greeting.starts_with("svc=orders") && answer.starts_with("len=11 ")
}

#[test]
fn max_flows_counts_open_connections_and_closed_ones_give_way() {
    if !privileged() {
        return;
    }
    // Closed flows linger two minutes here: long enough that the old
    // behaviour (closed flows counting) refuses the sixth connection.
    let opts = Opts { tcp_closed_idle: 120, ..Opts::default() };
    let mut bed = Bed::new("maxopen", Opts { tcp_closed_idle: 120, ..Opts::default() });
    std::fs::write(&bed.config, with_pe_a(&bed, &opts, "max_flows = 5")).expect("config");
    bed.start();
    for i in 0..20 {
        assert!(short_request(&bed.a), "short connection {i} was not answered");
    }
    let m = |name: &str| bed.metric(name, &[("endpoint", "pe-a")]);
    let ports = || bed.metric("privlink_endpoint_nat_ports_in_use", &[("endpoint", "pe-a"), ("service", "orders")]);
    assert!(eventually(5, || m("privlink_endpoint_flows_active") == 0.0), "open flows after 20 closed connections");
    assert_eq!(ports(), 20.0, "the closed connections still hold their ports while they linger");
    assert_eq!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "endpoint_flow_limit"), ("network", "vnet-a")]),
        0.0
    );
    // Eight held at once: exactly five.
    let held: Vec<_> = (0..8).filter_map(|_| connect(&bed.a, EP, 80, Duration::from_millis(1500)).ok()).collect();
    assert_eq!(held.len(), 5, "max_flows = 5 admits five open connections");
    assert_eq!(m("privlink_endpoint_flows_active"), 5.0);
    assert!(
        bed.metric("privlink_packets_dropped_total", &[("reason", "endpoint_flow_limit"), ("network", "vnet-a")])
            >= 3.0
    );
}

#[test]
fn a_rst_the_endpoints_ignore_does_not_end_the_connection() {
    let Some(bed) = Bed::running("rstwin", Opts { tcp_closed_idle: 2, ..Opts::default() }) else { return };
    let mut s = connect(&bed.a, EP, 7, 3 * SEC).expect("connect to the echo service");
    s.set_read_timeout(Some(5 * SEC)).expect("timeout");
    let sport = s.local_addr().expect("local").port().to_string();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut echo = |s: &mut std::net::TcpStream, text: &str| -> String {
        s.write_all(text.as_bytes()).expect("write");
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        l
    };
    assert_eq!(echo(&mut s, "one\n"), "one\n");
    // A RST 1000 past the next sequence number from each side, in the
    // window: both Linux endpoints answer with a challenge ACK and carry on
    // (RFC 5961 §3.2).
    let (ep, client, be, nat) =
        (EP.to_string(), CLIENT.to_string(), BACKEND_ORDERS.to_string(), NAT_ORDERS.to_string());
    let mut from_consumer = rawpkt(&bed.a, &["rst", "pla0", &client, &sport, &ep, "7", "1000"]);
    let mut from_backend = rawpkt(&bed.prov, &["rst", "plp0", &be, "8007", &nat, "0", "1000"]);
    for c in [&mut from_consumer, &mut from_backend] {
        let mut ready = String::new();
        BufReader::new(c.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("ready");
        assert_eq!(ready.trim(), "ready");
    }
    assert_eq!(echo(&mut s, "two\n"), "two\n");
    for c in [from_consumer, from_backend] {
        let out = rawpkt_done(c);
        assert!(out.contains("rst seq"), "RST sent: {out}");
    }
    // Past the closed-flow linger (2 s): the connection still works.
    std::thread::sleep(5 * SEC);
    assert_eq!(echo(&mut s, "three\n"), "three\n", "the connection outlived the ignored RSTs");
    let (code, flows, _) = bed.cli(&["flows"]);
    assert_eq!(code, 0);
    assert!(flows.contains("established"), "{flows}");
    assert_eq!(bed.metric("privlink_packets_dropped_total", &[("reason", "no_flow"), ("network", "provider")]), 0.0);
}

#[test]
fn a_socket_closed_before_late_data_arrives_ends_its_flow_with_its_rst() {
    let Some(bed) = Bed::running("rstfin", Opts { tcp_closed_idle: 2, ..Opts::default() }) else { return };
    // The backend never sees the consumer's FIN (dropped in the provider's
    // namespace, after privlink saw it), so its echo acknowledges only
    // the data; the consumer's closed socket answers that echo with a RST
    // at the FIN's own sequence number, one before its next.
    nft(
        &bed.prov,
        &format!(
            "table inet finloss {{\n  chain in {{ type filter hook input priority 0;\n    \
             ip daddr {BACKEND_ORDERS} tcp dport 8007 tcp flags & fin == fin counter drop\n  }}\n}}"
        ),
    );
    let mut s = connect(&bed.a, EP, 7, 3 * SEC).expect("connect to the echo service");
    s.write_all(b"late").expect("write");
    drop(s);
    let states = || {
        let (code, out, err) = bed.cli(&["flows", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v.as_array().expect("array").iter().map(|f| f["state"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>()
    };
    // Closed, then gone after the 2 s linger, not held for the transitory
    // timeout (4 min) of a half-closed connection.
    assert!(eventually(8, || states().is_empty()), "flows: {:?}", states());
    assert_eq!(bed.metric("privlink_endpoint_flows_active", &[("endpoint", "pe-a")]), 0.0);
}

#[test]
fn padded_packets_are_trimmed_and_cross_both_ways() {
    let Some(bed) = Bed::running("pad", Opts::default()) else { return };
    let sock: UdpSocket = within(&bed.a, || Ok(UdpSocket::bind((CLIENT, 40053))?)).expect("bind");
    sock.set_read_timeout(Some(3 * SEC)).expect("timeout");
    let (ep, client, be, nat) =
        (EP.to_string(), CLIENT.to_string(), BACKEND_ORDERS.to_string(), NAT_ORDERS.to_string());
    // A 36-byte UDP datagram and 10 bytes of Ethernet padding.
    let out = rawpkt_done(rawpkt(&bed.a, &["udp", "pla0", &client, "40053", &ep, "53", "padded!!", "10"]));
    assert!(out.contains("sent udp 36 + 10"), "{out}");
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).expect("the backend's answer to the padded datagram");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(from.to_string(), format!("{EP}:53"));
    assert!(
        answer.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")) && answer.ends_with("data=padded!!"),
        "{answer}"
    );
    // The backend side pads too.
    let nport = answer.split(':').nth(1).and_then(|p| p.split(' ').next()).expect("NAT port").to_string();
    let out = rawpkt_done(rawpkt(&bed.prov, &["udp", "plp0", &be, "5353", &nat, &nport, "from the backend", "6"]));
    assert!(out.contains("sent udp"), "{out}");
    let (n, _) = sock.recv_from(&mut buf).expect("the padded answer reaches the consumer");
    assert_eq!(&buf[..n], b"from the backend");
    // A padded SYN opens a connection (the backend answers with its SYN-ACK).
    let out = rawpkt_done(rawpkt(&bed.a, &["syn", "pla0", &client, "40080", &ep, "80", "6"]));
    assert!(out.starts_with("synack"), "{out}");
    for net in ["vnet-a", "provider"] {
        assert_eq!(bed.metric("privlink_packets_dropped_total", &[("reason", "malformed"), ("network", net)]), 0.0);
    }
}
