//! What the in-memory benches share: one network, one endpoint, a service
//! with 8 NAT IPs and 4 backends offering one port, consumers spread so the
//! NAT IPs share the load, and packet builders.

#![allow(dead_code)] // Each bench uses part of it.

use privlink_core::*;
use std::net::Ipv4Addr;

/// The endpoint's address.
pub const EP: u32 = 0x0a01_0005;

/// The configuration: `proto` port 53 offered by the service.
pub fn desired(proto: Protocol) -> Desired {
    Desired {
        provider_mtu: 1500,
        networks: vec![NetworkSpec { id: NetworkId(0), name: "vnet-a".into(), mtu: 1500 }],
        services: vec![ServiceSpec {
            proxy: None,
            name: "svc".into(),
            nat_ips: (1..=8).map(|i| Ipv4Addr::new(192, 168, 100, i).into()).collect(),
            nat_ports: 1024..=65535,
            backends: (10..14).map(|i| Ipv4Addr::new(192, 168, 50, i).into()).collect(),
            ports: vec![PortRule { protocol: proto, port: 53, backend_port: 53 }],
        }],
        endpoints: vec![EndpointSpec {
            link_id: 0,
            name: "pe".into(),
            network: 0,
            ip: Ipv4Addr::from(EP).into(),
            service: 0,
            state: ConnectionState::Approved,
            limits: EndpointLimits::default(),
        }],
    }
}

/// Consumer `i`'s address and port: 1,000 flows per address.
pub fn consumer(i: u32) -> (u32, u16) {
    (0x0a00_0000 + i / 1_000 + 1, 1024 + (i % 1_000) as u16)
}

/// A TCP segment with valid checksums; `flags` holds `S`, `A`, `F`.
#[allow(clippy::too_many_arguments)]
pub fn tcp(src: u32, sport: u16, dst: u32, dport: u16, seq: u32, ack: u32, flags: &str, data: usize) -> Vec<u8> {
    let mut b = etherparse::PacketBuilder::ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64).tcp(sport, dport, seq, 65535);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; data]).expect("tcp");
    v
}

/// (source, source port, destination, destination port) of a packet.
pub fn ends(p: &[u8]) -> (u32, u16, u32, u16) {
    let g = |a: usize| u32::from_be_bytes([p[a], p[a + 1], p[a + 2], p[a + 3]]);
    let h = |a: usize| u16::from_be_bytes([p[a], p[a + 1]]);
    (g(12), h(20), g(16), h(22))
}
