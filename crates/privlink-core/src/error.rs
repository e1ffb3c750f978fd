//! The one error type of the core: a desired configuration the engine cannot
//! run. The config crate reports the same problems earlier, with positions.

use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("service {0}: no backends")]
    NoBackends(String),
    #[error("service {0}: {1} backends (at most {max})", max = crate::spec::MAX_BACKENDS)]
    TooManyBackends(String, usize),
    #[error("service {0}: {1} NAT IPs (at most 256)")]
    NatIpCount(String, usize),
    #[error("service {0}: empty or invalid NAT port range")]
    PortRange(String),
    #[error("network {0}: duplicate network id")]
    DuplicateNetwork(String),
    #[error("endpoint {0}: refers to a missing network or service")]
    DanglingEndpoint(String),
    #[error("too many endpoints created over this daemon's life (16,777,215); restart it")]
    TooManyEndpoints,
    #[error("too many networks attached over this daemon's life (65,536); restart it")]
    TooManyNetworks,
    #[error("endpoint {0}: address {1} is already an endpoint in its network")]
    DuplicateEndpointAddress(String, IpAddr),
    #[error("service {0}: its NAT IPs and backends are not all of one IP family")]
    MixedFamilies(String),
    #[error("endpoint {0}: an IPv4 endpoint cannot reach an IPv6 service")]
    FamilyMismatch(String),
}
