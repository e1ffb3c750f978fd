//! End-to-end tests of the awkward paths: ICMP echo, TTL and traceroute,
//! different MTUs with path MTU discovery, fragments, and ICMP errors from
//! the provider side. Real daemon, real namespaces, real `ping`,
//! `traceroute` and sockets.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn run_in(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn ping_and_traceroute_through_an_endpoint() {
    let Some(bed) = Bed::running("ping", Opts::default()) else { return };
    let (ok, out) = run_in(&bed.a, &["ping", "-c", "3", "-i", "0.2", "-W", "2", &EP.to_string()]);
    assert!(ok && out.contains("3 received"), "{out}");
    // The endpoint is one routed hop: TTL 1 expires there, and the answer
    // comes from the endpoint's address.
    let (ok, out) = run_in(&bed.a, &["traceroute", "-n", "-I", "-q", "1", "-w", "2", "-m", "4", &EP.to_string()]);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("1  10.1.0.5")), "{out}");
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "ttl_expired"), ("network", "vnet-a")]) >= 1.0);
}

#[test]
fn smaller_provider_mtu_pmtud_and_frag_needed() {
    let Some(bed) = Bed::running("mtu", Opts { provider_mtu: 1280, ..Opts::default() }) else { return };
    // A DF ping larger than the provider MTU is answered "fragmentation
    // needed" with the provider's MTU.
    let (_, out) = run_in(&bed.a, &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", &EP.to_string()]);
    assert!(out.contains("mtu = 1280") || out.contains("mtu=1280"), "{out}");
    assert!(bed.metric("privlink_packets_dropped_total", &[("reason", "too_big"), ("network", "vnet-a")]) >= 1.0);

    // A 20 MB transfer with 1500-byte segments and DF adapts (PMTUD) and
    // arrives intact.
    assert!(transfer_intact(&bed.a, 20 * 1024 * 1024).starts_with("svc=orders"));
}

#[test]
fn fragmented_udp_makes_a_round_trip() {
    let Some(bed) = Bed::running("frag", Opts { provider_mtu: 1280, ..Opts::default() }) else { return };
    let payload: String = (0..4000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let answer = within(&bed.a, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(payload.as_bytes(), (EP, 53))?;
        let mut buf = vec![0u8; 9000];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), payload))
    })
    .expect("a 4,000-byte datagram and its answer");
    let (answer, payload) = answer;
    assert!(answer.starts_with(&format!("svc=orders peer={NAT_ORDERS}:")), "{}", &answer[..60.min(answer.len())]);
    assert!(answer.ends_with(&format!("data={payload}")), "the whole datagram made it both ways");
}

/// One IPv4 fragment of a UDP datagram `udp` (header and payload) from
/// CLIENT to the endpoint: bytes `from..to` of it, at that offset.
fn ip_fragment(udp: &[u8], from: usize, to: usize, id: u16) -> Vec<u8> {
    let more = to < udp.len();
    let total = (20 + to - from) as u16;
    let frag = ((from / 8) as u16) | if more { 0x2000 } else { 0 };
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, 17, 0, 0]);
    p.extend_from_slice(&CLIENT.octets());
    p.extend_from_slice(&EP.octets());
    let c = privlink_core::checksum::checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&udp[from..to]);
    p
}

#[test]
fn a_datagram_whose_small_first_fragment_arrives_last_is_delivered() {
    // The later fragment is held until its first fragment comes; the first
    // is small, so it is staged for a coalesced write. Releasing the held
    // fragment must not wait for some other packet to reach that worker.
    let Some(bed) = Bed::running("fraglast", Opts::default()) else { return };
    let answer = within(&bed.a, || {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = std::net::UdpSocket::bind((CLIENT, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let sport = sock.local_addr()?.port();
        let payload: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let len = (8 + payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&CLIENT.octets());
        pseudo.extend_from_slice(&EP.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        pseudo.extend_from_slice(&udp);
        let c = privlink_core::checksum::checksum(&pseudo);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
        raw.set_header_included_v4(true)?;
        let to = std::net::SocketAddr::from((EP, 0)).into();
        raw.send_to(&ip_fragment(&udp, 200, udp.len(), 0x4242), &to)?;
        std::thread::sleep(Duration::from_millis(50));
        raw.send_to(&ip_fragment(&udp, 0, 200, 0x4242), &to)?;
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), String::from_utf8_lossy(&payload).into_owned()))
    })
    .expect("the answer to a datagram sent as fragments, first fragment last");
    let (answer, payload) = answer;
    assert!(answer.ends_with(&format!("data={payload}")), "{}", &answer[..80.min(answer.len())]);
}

#[test]
fn port_unreachable_from_the_provider_reaches_the_consumer_socket() {
    let Some(bed) = Bed::running("unreach", Opts::default()) else { return };
    // Port 54 maps to backend port 5454, where nothing listens: the
    // backend's kernel answers port unreachable, privlink translates it.
    let err = within(&bed.a, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect((EP, 54))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        Ok(s.recv(&mut buf).map(|_| ()).map_err(|e| e.kind()))
    })
    .expect("socket");
    assert_eq!(err, Err(std::io::ErrorKind::ConnectionRefused), "the error reached the socket");
}
