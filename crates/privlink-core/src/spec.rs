//! What the engine is asked to run: the desired configuration
//! ([`Desired`]) and the settings fixed for its life ([`Settings`]), with
//! their defaults. The config crate builds these from its own parsed types
//! (which keep file positions and defaults besides); the engine knows only
//! these.

use crate::types::{ConnectionState, NetworkId, Protocol};
use std::net::IpAddr;
use std::ops::RangeInclusive;

/// Most NAT IPs one service may have.
pub const MAX_NAT_IPS: usize = 8;
/// NAT addresses per service with `[store]` (a fleet shares them, each host
/// owning some by lease; GCP's NAT subnets are prefixes).
pub const MAX_NAT_IPS_STORE: usize = 256;

/// Most backends one service may have: Maglev's table (65,537 entries)
/// spreads flows evenly while it holds well over 50 entries per backend.
pub const MAX_BACKENDS: usize = 1024;

/// Idle timeouts in seconds (SPEC "Timeouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: u32,
    /// TCP opening or closing (SYN or one FIN seen).
    pub tcp_transitory: u32,
    /// After both FINs or a RST: how long the flow lingers before its port
    /// returns (without quarantine). A SYN for the same 5-tuple meanwhile
    /// reopens it with the same NAT port: 60 s covers Linux's TIME_WAIT, so
    /// a backend that closed first sees the reopened connection on the same
    /// 4-tuple, whose TCP timestamps keep increasing (Linux derives the
    /// timestamp offset from the 4-tuple). A new port could land on another
    /// consumer tuple's TIME_WAIT socket, whose PAWS check then refuses the
    /// SYN about half the time: a one-second stall for the client.
    pub tcp_closed: u32,
    pub udp: u32,
    pub icmp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { tcp_established: 7440, tcp_transitory: 240, tcp_closed: 60, udp: 300, icmp: 60 }
    }
}

/// Fixed for the engine's life.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Number of [`Worker`]s that will process packets (per-worker counters).
    pub workers: usize,
    pub max_flows: u32,
    pub timeouts: Timeouts,
    /// ICMP messages each worker may generate per second.
    pub icmp_rate: u32,
    /// NAT events (flow create and delete, pool exhaustion) held for an
    /// exporter at most; 0: none are recorded ([`crate::events`]).
    pub event_queue: usize,
    /// Seed of the engine's randomness (the flow table's hash keys, the NAT
    /// port pools' RFC 6056 order); 0: drawn from the operating system, as
    /// the daemon does. Tests and benches fix it to replay a run exactly.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            workers: 1,
            max_flows: 1 << 20,
            timeouts: Timeouts::default(),
            icmp_rate: 100,
            event_queue: 0,
            seed: 0,
        }
    }
}

/// A consumer network as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub id: NetworkId,
    pub name: String,
    pub mtu: u16,
}

/// One offered (protocol, port) and the backend port it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: u16,
    pub backend_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub nat_ips: Vec<IpAddr>,
    pub nat_ports: RangeInclusive<u16>,
    pub backends: Vec<IpAddr>,
    pub ports: Vec<PortRule>,
    /// PROXY protocol v2 before each TCP connection's data, with this TLV
    /// (`None`: off). See [`crate::proxy`].
    pub proxy: Option<ProxyTlv>,
}

/// The TLV a PROXY v2 header carries after the addresses: the clouds'
/// ways of naming the private endpoint connection (SPEC `proxy_tlv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyTlv {
    /// Addresses only.
    None,
    /// Azure Private Link: type 0xEE, subtype 0x01, link id as u32 LE.
    Azure,
    /// AWS PrivateLink: type 0xEA, subtype 0x01, `vpce-` and 17 hex digits.
    Aws,
    /// GCP Private Service Connect: type 0xE0, connection id as u64 BE.
    Gcp,
}

impl ProxyTlv {
    pub const ALL: [ProxyTlv; 4] = [ProxyTlv::None, ProxyTlv::Azure, ProxyTlv::Aws, ProxyTlv::Gcp];
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyTlv::None => "none",
            ProxyTlv::Azure => "azure",
            ProxyTlv::Aws => "aws",
            ProxyTlv::Gcp => "gcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    /// Index into [`Desired::networks`].
    pub network: usize,
    pub ip: IpAddr,
    /// Index into [`Desired::services`].
    pub service: usize,
    /// The connection state to start with when the endpoint is new.
    pub state: ConnectionState,
    pub limits: EndpointLimits,
    /// The connection's link id (stable for its life; PROXY v2 TLVs).
    pub link_id: u64,
}

/// What an endpoint lets through beyond its service's ports, like a
/// network security group on an Azure private endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Most flows the endpoint may hold at once (`None`: no bound but the
    /// table's); past it new flows drop as `endpoint_flow_limit`.
    pub max_flows: Option<u32>,
    /// Consumer sources allowed, as (address, prefix length); empty: any
    /// address of the network. Others drop as `source_not_allowed`.
    pub allow_sources: Vec<(IpAddr, u8)>,
}

/// The whole desired configuration, as given to [`Engine::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub provider_mtu: u16,
    pub networks: Vec<NetworkSpec>,
    pub services: Vec<ServiceSpec>,
    pub endpoints: Vec<EndpointSpec>,
}
