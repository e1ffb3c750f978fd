//! privlink-core: the sans-IO packet translation engine of privlink.
//!
//! Nothing here opens a device, a socket or reads a clock. The daemon hands a
//! packet (`&mut [u8]`), where it came from ([`Source`]) and the time
//! ([`Now`]) to a [`Worker`]; the worker rewrites the packet in place and
//! returns a [`Verdict`]: forward to the provider or to network N, drop with a
//! reason, or send back the ICMP answer it wrote. Configuration arrives as a
//! [`Desired`] through [`Engine::apply`]. Tests drive the whole engine with
//! built packets and a fake clock.
//!
//! See `docs/ARCHITECTURE.md` for a packet's walk through these modules.

pub mod checksum;
pub mod engine;
pub mod error;
pub mod flow;
pub mod frag;
pub mod maglev;
pub mod pool;
mod sync;
pub mod types;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod tests;

pub use engine::{
    now_since, ApplyReport, Desired, EndpointShared, EndpointSpec, Engine, FlowInfo, NetworkShared, NetworkSpec,
    PoolEntry, PortRule, ServiceSpec, Settings, Snapshot, Timeouts,
};
pub use error::CoreError;
pub use types::*;
pub use worker::Worker;

/// Most NAT IPs one service may have.
pub const MAX_NAT_IPS: usize = 8;
