//! Arbitrary bytes into `Worker::process`, from either side, on top of a
//! populated flow table (TCP, UDP and ICMP flows already set up), so that
//! inputs reach the established-flow paths and not only the validators.
//! The first input byte picks the side and the offload flags.

#![no_main]

use libfuzzer_sys::fuzz_target;
use privlink_core::*;
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

fn desired() -> Desired {
    Desired {
        provider_mtu: 1400,
        networks: vec![NetworkSpec { id: NetworkId(0), name: "a".into(), mtu: 1500 }],
        services: vec![ServiceSpec {
            proxy: None,
            name: "s".into(),
            nat_ips: vec![Ipv4Addr::new(192, 168, 100, 4)],
            nat_ports: 2000..=2063,
            backends: vec![Ipv4Addr::new(192, 168, 50, 10)],
            ports: vec![
                PortRule { protocol: Protocol::Tcp, port: 80, backend_port: 8080 },
                PortRule { protocol: Protocol::Udp, port: 53, backend_port: 53 },
            ],
        }],
        endpoints: vec![EndpointSpec {
            link_id: 0,
            name: "e".into(),
            network: 0,
            ip: Ipv4Addr::new(10, 1, 0, 5),
            service: 0,
            state: ConnectionState::Approved,
            limits: EndpointLimits::default(),
        }],
    }
}

/// A valid IPv4 packet from `src` to `dst` with an L4 header `l4`.
fn packet(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

fn engine() -> &'static (Arc<Engine>, std::sync::Mutex<Worker>) {
    static E: OnceLock<(Arc<Engine>, std::sync::Mutex<Worker>)> = OnceLock::new();
    E.get_or_init(|| {
        let e = Engine::new(Settings { max_flows: 256, ..Settings::default() });
        e.apply(&desired(), Now(0)).expect("config");
        let mut w = e.worker(0);
        // Flows to hit: TCP (SYN), UDP, ICMP echo, from a few consumers.
        for host in 1..=8u8 {
            let mut syn = [0u8; 20];
            syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
            syn[2..4].copy_from_slice(&80u16.to_be_bytes());
            syn[12] = 5 << 4;
            syn[13] = 0x02;
            let mut p = packet(6, [10, 1, 0, host], [10, 1, 0, 5], &syn);
            w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
            let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
            let mut p = packet(17, [10, 1, 0, host], [10, 1, 0, 5], &udp);
            w.process(&mut p, Source::Network(NetworkId(0)), Now(1));
        }
        (e, std::sync::Mutex::new(w))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (_, w) = engine();
    let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = rest.to_vec();
    let src = if mode & 1 == 0 { Source::Network(NetworkId(0)) } else { Source::Provider };
    let off = Offload { csum_partial: mode & 2 != 0, gso_size: if mode & 4 != 0 { 536 } else { 0 } };
    let v = w.process_offload(&mut buf, src, Now(2), off);
    if let Verdict::Reply { len, .. } = v {
        assert!(len <= worker::REPLY_MAX);
        let _ = w.reply(len);
    }
});
