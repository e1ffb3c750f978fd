//! A fixed-work driver of the in-memory packet path for instruction counts
//! under callgrind (repeatable to the instruction, unlike wall clock on a
//! noisy 2-core host). Each case builds its engine and packets outside the
//! counted function and then runs a fixed number of iterations inside it;
//! callgrind counts only that function:
//!
//! ```sh
//! cargo bench -p privlink-core --bench instructions --no-run
//! valgrind --tool=callgrind --toggle-collect='*counted*' \
//!     target/release/deps/instructions-* udp_established 1000
//! ```
//!
//! Cases: `udp_established N` (N UDP flows, 1,000,000 iterations of one
//! packet each way), `tcp_established N` (N TCP flows after a real
//! handshake, data segments with advancing sequence numbers both ways),
//! `udp_new_flow` (100,000 UDP flows set up and expired), `tcp_new_flow`
//! (100,000 TCP connections: handshake, FIN both ways, expiry);
//! `udp_established6 N` and `udp_new_flow6`, the UDP cases over IPv6 (an
//! IPv6 endpoint of an IPv6 service); `udp_established64 N`, IPv6
//! consumers of an IPv4 service (translated both ways).

#[path = "common.rs"]
mod common;

use common::{consumer, consumer6, desired, desired6, ends, ends6, tcp, udp6, EP, EP6};
use privlink_core::*;
use std::hint::black_box;

const ITERS: usize = 1_000_000;

fn udp(src: u32, sport: u16, dst: u32, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64)
        .udp(sport, dport)
        .write(&mut v, &[0u8; 36])
        .expect("udp");
    v
}

fn engine(proto: Protocol, max: u32) -> (std::sync::Arc<Engine>, Worker) {
    let e = Engine::new(Settings { max_flows: max, seed: 7, ..Settings::default() });
    e.apply(&desired(proto), Now(0)).expect("config");
    let w = e.worker(0);
    (e, w)
}

fn ok(v: Verdict) {
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
}

const IN: Source = Source::Network(NetworkId(0));

#[inline(never)]
fn counted_established(w: &mut Worker, ups: &[Vec<u8>], downs: &[Vec<u8>]) {
    let mut buf = [0u8; 128];
    let mut i = 0;
    for _ in 0..ITERS {
        i = if i + 1 == ups.len() { 0 } else { i + 1 };
        let n = ups[i].len();
        buf[..n].copy_from_slice(&ups[i]);
        black_box(w.process(&mut buf[..n], IN, Now(1)));
        let n = downs[i].len();
        buf[..n].copy_from_slice(&downs[i]);
        black_box(w.process(&mut buf[..n], Source::Provider, Now(1)));
    }
}

fn udp_established(n: u32) {
    let (_e, mut w) = engine(Protocol::Udp, n + 1024);
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (a, p) = consumer(i);
        let up = udp(a, p, EP, 53);
        let mut t = up.clone();
        ok(w.process(&mut t, IN, Now(0)));
        let (nat, np, be, bp) = ends(&t);
        ups.push(up);
        downs.push(udp(be, bp, nat, np));
    }
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7_919) % n as usize).collect();
    let ups: Vec<_> = order.iter().map(|&i| ups[i].clone()).collect();
    let downs: Vec<_> = order.iter().map(|&i| downs[i].clone()).collect();
    counted_established(&mut w, &ups, &downs);
}

/// TCP flows after a handshake; then, per flow, `rounds` data segments
/// each way with advancing sequence numbers (laid out round by round).
fn tcp_established(n: u32) {
    let (_e, mut w) = engine(Protocol::Tcp, n + 1024);
    let rounds: u32 = if n <= 10_000 { 16 } else { 1 };
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    let mut per_flow = Vec::new();
    for i in 0..n {
        let (a, p) = consumer(i);
        let mut t = tcp(a, p, EP, 53, 1000, 0, "S", 0);
        ok(w.process(&mut t, IN, Now(0)));
        let (nat, np, be, bp) = ends(&t);
        ok(w.process(&mut tcp(be, bp, nat, np, 5000, 1001, "SA", 0), Source::Provider, Now(0)));
        ok(w.process(&mut tcp(a, p, EP, 53, 1001, 5001, "A", 0), IN, Now(0)));
        per_flow.push((a, p, nat, np, be, bp));
    }
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7_919) % n as usize).collect();
    for r in 0..rounds {
        for &i in &order {
            let (a, p, nat, np, be, bp) = per_flow[i];
            ups.push(tcp(a, p, EP, 53, 1001 + r * 10, 5001 + r * 10, "A", 10));
            downs.push(tcp(be, bp, nat, np, 5001 + r * 10, 1011 + r * 10, "A", 10));
        }
    }
    counted_established(&mut w, &ups, &downs);
}

/// [`udp_established`] over IPv6: the same shape of configuration, an
/// IPv6 endpoint of an IPv6 service.
fn udp_established6(n: u32) {
    let e = Engine::new(Settings { max_flows: n + 1024, seed: 7, ..Settings::default() });
    e.apply(&desired6(Protocol::Udp), Now(0)).expect("config");
    let mut w = e.worker(0);
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (a, p) = consumer6(i);
        let up = udp6(a, p, EP6, 53, 36);
        let mut t = up.clone();
        ok(w.process(&mut t, IN, Now(0)));
        let (nat, np, be, bp) = ends6(&t);
        ups.push(up);
        downs.push(udp6(be, bp, nat, np, 36));
    }
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7_919) % n as usize).collect();
    let ups: Vec<_> = order.iter().map(|&i| ups[i].clone()).collect();
    let downs: Vec<_> = order.iter().map(|&i| downs[i].clone()).collect();
    counted_established(&mut w, &ups, &downs);
}

/// [`udp_established`] from IPv6 consumers to an IPv4 service (RFC 6146):
/// the consumer's datagrams leave as IPv4, the backend's come back as
/// IPv6, each with the room it grows into behind it.
fn udp_established64(n: u32) {
    let e = Engine::new(Settings { max_flows: n + 1024, seed: 7, ..Settings::default() });
    let mut d = desired(Protocol::Udp);
    d.endpoints[0].ip = std::net::Ipv6Addr::from(EP6).into();
    e.apply(&d, Now(0)).expect("config");
    let mut w = e.worker(0);
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (a, p) = consumer6(i);
        let up = udp6(a, p, EP6, 53, 36);
        let mut t = up.clone();
        t.resize(t.len() + 40, 0);
        ok(w.process(&mut t, IN, Now(0)));
        let (nat, np, be, bp) = ends(&t);
        ups.push(up);
        let down = udp(be, bp, nat, np);
        let mut t = down.clone();
        t.resize(t.len() + 40, 0);
        ok(w.process(&mut t, Source::Provider, Now(0)));
        downs.push(down);
    }
    let order: Vec<usize> = (0..n as usize).map(|i| (i * 7_919) % n as usize).collect();
    let ups: Vec<_> = order.iter().map(|&i| ups[i].clone()).collect();
    let downs: Vec<_> = order.iter().map(|&i| downs[i].clone()).collect();
    counted_established_room(&mut w, &ups, &downs);
}

/// [`counted_established`] with 40 bytes of room behind each packet.
#[inline(never)]
fn counted_established_room(w: &mut Worker, ups: &[Vec<u8>], downs: &[Vec<u8>]) {
    let mut buf = [0u8; 160];
    let mut i = 0;
    for _ in 0..ITERS {
        i = if i + 1 == ups.len() { 0 } else { i + 1 };
        let n = ups[i].len();
        buf[..n].copy_from_slice(&ups[i]);
        black_box(w.process(&mut buf[..n], IN, Now(1)));
        let n = downs[i].len();
        buf[..n].copy_from_slice(&downs[i]);
        black_box(w.process(&mut buf[..n + 40], Source::Provider, Now(1)));
    }
}

/// [`udp_new_flow`] over IPv6.
fn udp_new_flow6() {
    let e = Engine::new(Settings { max_flows: 2 * NEW, seed: 7, ..Settings::default() });
    e.apply(&desired6(Protocol::Udp), Now(0)).expect("config");
    let mut w = e.worker(0);
    let packets: Vec<_> = (0..NEW).map(consumer6).map(|(a, p)| udp6(a, p, EP6, 53, 36)).collect();
    counted_udp_new(&e, &mut w, &packets);
}

#[inline(never)]
fn counted_udp_new(e: &Engine, w: &mut Worker, packets: &[Vec<u8>]) {
    let mut buf = [0u8; 128];
    for p in packets {
        buf[..p.len()].copy_from_slice(p);
        black_box(w.process(&mut buf[..p.len()], IN, Now(1)));
    }
    assert_eq!(e.expire(Now(1000)), packets.len());
}

#[inline(never)]
fn counted_tcp_new(e: &Engine, w: &mut Worker, conns: &[[Vec<u8>; 6]]) {
    let mut buf = [0u8; 128];
    for c in conns {
        for (k, p) in c.iter().enumerate() {
            let src = if k % 2 == 0 { IN } else { Source::Provider };
            buf[..p.len()].copy_from_slice(p);
            black_box(w.process(&mut buf[..p.len()], src, Now(1)));
        }
    }
    assert_eq!(e.expire(Now(1000)), conns.len());
}

const NEW: u32 = 100_000;

fn udp_new_flow() {
    let (e, mut w) = engine(Protocol::Udp, 2 * NEW);
    let packets: Vec<_> = (0..NEW).map(consumer).map(|(a, p)| udp(a, p, EP, 53)).collect();
    counted_udp_new(&e, &mut w, &packets);
}

fn tcp_new_flow() {
    // The provider side's tuple depends on the NAT port: a probe engine
    // learns each connection's tuple, and a twin with the same seed, which
    // hands out the same ports in the same order, replays them counted.
    let (e, mut w) = engine(Protocol::Tcp, 2 * NEW);
    let mut conns = Vec::new();
    for i in 0..NEW {
        let (a, p) = consumer(i);
        let syn = tcp(a, p, EP, 53, 1000, 0, "S", 0);
        let mut t = syn.clone();
        ok(w.process(&mut t, IN, Now(0)));
        let (nat, np, be, bp) = ends(&t);
        conns.push([
            syn,
            tcp(be, bp, nat, np, 5000, 1001, "SA", 0),
            tcp(a, p, EP, 53, 1001, 5001, "A", 0),
            tcp(be, bp, nat, np, 5001, 1001, "AF", 0),
            tcp(a, p, EP, 53, 1001, 5002, "AF", 0),
            tcp(be, bp, nat, np, 5002, 1002, "A", 0),
        ]);
    }
    drop((e, w));
    let (e2, mut w2) = engine(Protocol::Tcp, 2 * NEW);
    counted_tcp_new(&e2, &mut w2, &conns);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    match args.first().map(String::as_str) {
        Some("udp_established") => udp_established(n),
        Some("tcp_established") => tcp_established(n),
        Some("udp_new_flow") => udp_new_flow(),
        Some("tcp_new_flow") => tcp_new_flow(),
        Some("udp_established6") => udp_established6(n),
        Some("udp_new_flow6") => udp_new_flow6(),
        Some("udp_established64") => udp_established64(n),
        // `cargo bench` runs every bench target: nothing to do unasked.
        _ => eprintln!("usage: instructions udp_established|tcp_established N | udp_new_flow | tcp_new_flow"),
    }
}
