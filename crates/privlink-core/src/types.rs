//! Small types that say what they hold: identifiers, the clock, drop reasons,
//! connection states, and where a packet came from or goes to.

use std::fmt;

/// A consumer network, as numbered by the engine (stable for its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkId(pub u16);

/// A private endpoint, as numbered by the engine. Never reused within one
/// engine's life, so a stale reference can never name another endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// A service, as numbered by the engine (stable for its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

/// A NAT port pool: one (service, NAT IP, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub u32);

/// A port taken from a NAT pool (or an ICMP echo identifier in that role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatPort(pub u16);

/// The engine's clock: whole seconds since the engine's epoch. Callers turn an
/// `Instant` into a `Now` once per batch; tests
/// build any `Now` they like, so timeouts are tested without sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Now(pub u32);

impl Now {
    pub fn plus(self, secs: u32) -> Now {
        Now(self.0.saturating_add(secs))
    }
}

/// Where a packet was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Network(NetworkId),
    Provider,
}

/// Where a translated packet must be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Provider,
    Network(NetworkId),
}

/// Translated protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => crate::wire::proto::TCP,
            Protocol::Udp => crate::wire::proto::UDP,
            Protocol::Icmp => crate::wire::proto::ICMP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            crate::wire::proto::TCP => Some(Protocol::Tcp),
            crate::wire::proto::UDP => Some(Protocol::Udp),
            crate::wire::proto::ICMP => Some(Protocol::Icmp),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One list makes the enum, its `COUNT`, `ALL` (in index order) and its
/// labels, so a reason added anywhere has its counter slot and label: no
/// hand-kept count can fall behind the variants.
macro_rules! drop_reasons {
    ($(#[$m:meta])* { $($(#[$doc:meta])* $v:ident => $label:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[$doc])* $v,)+
        }

        impl DropReason {
            /// How many reasons there are.
            pub const COUNT: usize = [$(DropReason::$v),+].len();
            /// Every reason, in index order.
            pub const ALL: [DropReason; Self::COUNT] = [$(DropReason::$v),+];

            /// The `reason` label of `privlink_packets_dropped_total`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$v => $label,)+
                }
            }
        }
    };
}

drop_reasons! {
    /// Why a packet was not forwarded. The label values are SPEC's, plus
    /// `flow_table_full` (SPEC's `max_flows` bound, which SPEC names no reason for),
    /// `reassembly_timeout` (fragments whose first fragment never came), and the
    /// reasons docs/NAT-BEHAVIOUR.md names for martian sources, invalid TCP flag
    /// combinations and source-routed packets.
    {
        NoEndpoint => "no_endpoint",
        PortNotAllowed => "port_not_allowed",
        NotApproved => "not_approved",
        NoFlow => "no_flow",
        Malformed => "malformed",
        PortsExhausted => "ports_exhausted",
        TtlExpired => "ttl_expired",
        TooBig => "too_big",
        UnsupportedProtocol => "unsupported_protocol",
        FlowTableFull => "flow_table_full",
        ReassemblyTimeout => "reassembly_timeout",
        MartianSource => "martian_source",
        InvalidTcpFlags => "invalid_tcp_flags",
        SourceRoute => "source_route",
        EndpointFlowLimit => "endpoint_flow_limit",
        SourceNotAllowed => "source_not_allowed",
        NoHealthyBackend => "no_healthy_backend",
        /// A new flow to a service of which this host holds no NAT address
        /// (with `[store]`, addresses are owned by lease; docs/OPERATIONS.md,
        /// "Fleet").
        NoNatIp => "no_nat_ip",
    }
}

impl DropReason {
    /// The reason's counter slot (`0..COUNT`).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of an endpoint's connection to its service. Only `Approved`
/// carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectionState {
    Pending = 0,
    Approved = 1,
    Rejected = 2,
    Disconnected = 3,
}

impl ConnectionState {
    pub const ALL: [ConnectionState; 4] =
        [ConnectionState::Pending, ConnectionState::Approved, ConnectionState::Rejected, ConnectionState::Disconnected];

    pub fn from_u8(v: u8) -> ConnectionState {
        match v {
            1 => ConnectionState::Approved,
            2 => ConnectionState::Rejected,
            3 => ConnectionState::Disconnected,
            _ => ConnectionState::Pending,
        }
    }

    pub fn parse(s: &str) -> Option<ConnectionState> {
        ConnectionState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Pending => "pending",
            ConnectionState::Approved => "approved",
            ConnectionState::Rejected => "rejected",
            ConnectionState::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a TUN device with `IFF_VNET_HDR` says about a packet, as far as
/// translation cares (the virtio-net header's flags and GSO size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum field holds the
    /// pseudo-header sum and the device completes it.
    pub csum_partial: bool,
    /// Non-zero for a GSO super-packet: the payload bytes per segment.
    pub gso_size: u16,
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The buffer was translated in place; write it to this device.
    Forward(Egress),
    /// Drop it (already counted).
    Drop(DropReason),
    /// The buffer was translated in place but is larger than the egress MTU
    /// (and may be fragmented): write it as fragments of at most `mtu`
    /// bytes (see [`crate::wire::Fragmenter`]).
    Fragment { to: Egress, mtu: u16 },
    /// A later fragment kept until its datagram's first fragment arrives;
    /// it comes out through [`crate::Worker::take_ready`].
    Held,
    /// Drop it (already counted) and write the ICMP answer in
    /// [`crate::Worker::reply`]`[..len]` back to the device it came from.
    Reply { reason: DropReason, len: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_has_its_own_slot_and_label() {
        let mut labels = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?} out of index order");
            assert!(labels.insert(r.as_str()), "{r:?}: label used twice");
            assert!(r.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{r:?}: not snake_case");
        }
        assert_eq!(labels.len(), DropReason::COUNT);
    }
}
