//! Isolation under concurrency: several threads translate two tenants'
//! flows both ways while another thread expires, rejects and creates flows
//! in a full table, so flow slots are freed and reused all the time. Every
//! packet that comes out is checked against the flow it belongs to; a
//! single packet carrying another flow's tuple fails the test.
//!
//! Both tenants use the same client address, client ports and endpoint
//! address (overlapping networks), so only the network id tells them apart.
//! Each checked flow has a destination port of its own (the service maps
//! port p to backend port p + 1000), and the churn flows use other ports:
//! a translated packet whose backend port, network or consumer port is not
//! its own flow's was rewritten with another flow's tuple.
//!
//! A second test races creators against an endpoint's `max_flows`, which
//! may be exceeded by at most one flow per worker.
//!
//! Meant for release mode: `cargo test --release -p privlink-core --test
//! stress`. `PRIVLINK_STRESS_SECS` sets how long it runs (default 2 s; the
//! test command runs it for 20 s).

use privlink_core::*;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENT: u32 = 0x0a00_0001;
const EP: u32 = 0x0a01_0005;
const BACKEND: u32 = 0xc0a8_320a;
const NAT_IPS: [u32; 2] = [0xc0a8_6401, 0xc0a8_6402];
/// Checked flows: flow f is in network f % 2, from CLIENT:40000+f to EP:f+1.
const CHECKED: u16 = 16;
const TRANSLATORS: usize = 3;
const TABLE: u32 = 64;

fn desired(a: ConnectionState, b: ConnectionState) -> Desired {
    let ports = (1..=CHECKED)
        .chain(100..164)
        .map(|p| PortRule { protocol: Protocol::Udp, port: p, backend_port: p + 1000 })
        .collect();
    Desired {
        provider_mtu: 1500,
        networks: vec![
            NetworkSpec { id: NetworkId(0), name: "vnet-a".into(), mtu: 1500 },
            NetworkSpec { id: NetworkId(1), name: "vnet-b".into(), mtu: 1500 },
        ],
        services: vec![ServiceSpec {
            proxy: None,
            name: "svc".into(),
            nat_ips: NAT_IPS.iter().map(|&a| Ipv4Addr::from(a).into()).collect(),
            nat_ports: 1024..=65535,
            backends: vec![Ipv4Addr::from(BACKEND).into()],
            ports,
        }],
        endpoints: vec![
            EndpointSpec {
                link_id: 0,
                name: "pe-a".into(),
                network: 0,
                ip: Ipv4Addr::from(EP).into(),
                service: 0,
                state: a,
                limits: EndpointLimits::default(),
            },
            EndpointSpec {
                link_id: 0,
                name: "pe-b".into(),
                network: 1,
                ip: Ipv4Addr::from(EP).into(),
                service: 0,
                state: b,
                limits: EndpointLimits::default(),
            },
        ],
    }
}

/// A UDP packet with valid IP and UDP checksums.
fn udp(src: u32, sport: u16, dst: u32, dport: u16) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[..20].copy_from_slice(&[0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p[28..36].copy_from_slice(b"privlink");
    let mut pseudo = [0u8; 28];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&16u16.to_be_bytes());
    pseudo[12..].copy_from_slice(&p[20..36]);
    let c = checksum::checksum(&pseudo);
    p[26..28].copy_from_slice(&c.to_be_bytes());
    p
}

fn addr(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}
fn port(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

#[derive(Default)]
struct Tally {
    forwarded: AtomicU64,
    violations: AtomicU64,
    cross_tenant: AtomicU64,
}

/// One checked flow, both ways. Returns false on a violation.
fn round_trip(w: &mut Worker, f: u16, now: Now, t: &Tally) {
    let net = NetworkId(f % 2);
    let (cport, dport) = (40_000 + f, f + 1);
    let mut up = udp(CLIENT, cport, EP, dport);
    let v = w.process(&mut up, Source::Network(net), now);
    if v != Verdict::Forward(Egress::Provider) {
        return;
    }
    t.forwarded.fetch_add(1, Ordering::Relaxed);
    let (nat, nport, backend, bport) = (addr(&up, 12), port(&up, 20), addr(&up, 16), port(&up, 22));
    if backend != BACKEND || bport != dport + 1000 || !NAT_IPS.contains(&nat) {
        t.violations.fetch_add(1, Ordering::Relaxed);
        // The other tenant's checked flows have odd/even ports of their own.
        if (1..=CHECKED).contains(&(bport.wrapping_sub(1000))) && (bport - 1001) % 2 != f % 2 {
            t.cross_tenant.fetch_add(1, Ordering::Relaxed);
        }
        eprintln!("consumer->provider: flow {f} left as {nat:#x}:{nport} -> {backend:#x}:{bport}");
        return;
    }
    let mut down = udp(BACKEND, bport, nat, nport);
    match w.process(&mut down, Source::Provider, now) {
        Verdict::Forward(Egress::Network(m)) => {
            t.forwarded.fetch_add(1, Ordering::Relaxed);
            let ok = m == net
                && addr(&down, 16) == CLIENT
                && port(&down, 22) == cport
                && addr(&down, 12) == EP
                && port(&down, 20) == dport;
            if !ok {
                t.violations.fetch_add(1, Ordering::Relaxed);
                if m != net {
                    t.cross_tenant.fetch_add(1, Ordering::Relaxed);
                }
                eprintln!(
                    "provider->consumer: reply of flow {f} (net {}) went to net {} as {:#x}:{} -> {:#x}:{}",
                    net.0,
                    m.0,
                    addr(&down, 12),
                    port(&down, 20),
                    addr(&down, 16),
                    port(&down, 22)
                );
            }
        }
        Verdict::Drop(_) => {}
        other => {
            t.violations.fetch_add(1, Ordering::Relaxed);
            eprintln!("provider->consumer: reply of flow {f}: unexpected {other:?}");
        }
    }
}

#[test]
fn concurrent_reuse_never_sends_a_packet_with_another_flows_tuple() {
    let secs: u64 = std::env::var("PRIVLINK_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let timeouts = Timeouts { udp: 2, ..Timeouts::default() };
    let settings =
        Settings { workers: TRANSLATORS + 1, max_flows: TABLE, timeouts, icmp_rate: 100, event_queue: 0, seed: 0 };
    let engine = Engine::new(settings);
    let approved = ConnectionState::Approved;
    engine.apply(&desired(approved, approved), Now(0)).expect("config");
    let clock = AtomicU32::new(1);
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let churned = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..TRANSLATORS {
            let mut w = engine.worker(t);
            let (clock, stop, tally) = (&clock, &stop, &tally);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for f in (t as u16..CHECKED).step_by(TRANSLATORS) {
                        round_trip(&mut w, f, Now(clock.load(Ordering::Relaxed)), tally);
                    }
                }
            });
        }
        let mut w = engine.worker(TRANSLATORS);
        let (engine, clock, stop, churned) = (&engine, &clock, &stop, &churned);
        s.spawn(move || {
            let mut x: u32 = 0x9e37_79b9;
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let now = Now(clock.load(Ordering::Relaxed));
                // Refill: new flows on both networks until the table is full.
                let mut p = udp(CLIENT, 20_000 + (x % 20_000) as u16, EP, 100 + (x >> 16) as u16 % 64);
                let _ = w.process(&mut p, Source::Network(NetworkId((x >> 8) as u16 % 2)), now);
                if n % 64 == 0 {
                    // Time passes: idle flows (churn and checked alike) expire.
                    let now = Now(clock.fetch_add(1, Ordering::Relaxed) + 1);
                    churned.fetch_add(engine.expire(now) as u64, Ordering::Relaxed);
                }
                if n % 1024 == 0 {
                    // A tenant's connection is rejected (its flows end) and
                    // approved again.
                    let ep = if x & 1 == 0 { "pe-a" } else { "pe-b" };
                    engine.set_connection_state(ep, ConnectionState::Rejected, now);
                    engine.set_connection_state(ep, ConnectionState::Approved, now);
                }
            }
        });
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let (fwd, bad, cross) = (
        tally.forwarded.load(Ordering::Relaxed),
        tally.violations.load(Ordering::Relaxed),
        tally.cross_tenant.load(Ordering::Relaxed),
    );
    eprintln!(
        "stress: {fwd} packets forwarded, {} flows churned, {bad} with another flow's tuple ({cross} across tenants) in {:.1} s",
        churned.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert!(fwd > 0, "nothing was forwarded: the test checked nothing");
    assert!(churned.load(Ordering::Relaxed) > 0, "no flow was churned: the test raced nothing");
    assert_eq!(bad, 0, "{bad} packets left with another flow's tuple ({cross} across tenants)");
}

#[test]
fn concurrent_creators_exceed_an_endpoints_bound_by_at_most_one_flow_each() {
    // The endpoint's max_flows is checked with a plain load and counted once
    // the flow exists (translate.rs): racing creators may each pass the
    // check, so the bound may be exceeded by at most one flow per worker.
    const THREADS: usize = 4;
    let mut d = desired(ConnectionState::Approved, ConnectionState::Approved);
    d.endpoints[0].limits.max_flows = Some(20);
    for round in 0..50u32 {
        let engine = Engine::new(Settings { workers: THREADS, max_flows: 10_000, ..Settings::default() });
        engine.apply(&d, Now(0)).expect("config");
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let mut w = engine.worker(t);
                s.spawn(move || {
                    for i in 0..200u16 {
                        let mut p = udp(CLIENT, 1 + t as u16 * 1000 + i, EP, 1);
                        let _ = w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
                    }
                });
            }
        });
        let live = engine.flow_list(Some("pe-a"), Now(1)).len();
        assert!((20..=20 + THREADS).contains(&live), "round {round}: {live} flows for a bound of 20");
    }
}
