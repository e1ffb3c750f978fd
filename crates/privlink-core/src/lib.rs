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

pub mod addr;
pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod engine;
pub use engine::{apply, expiry, ids, listing, restart};
pub mod error;
pub mod events;
pub mod flow;
pub mod frag;
pub mod maglev;
pub mod outbox;
pub mod pool;
pub mod proxy;
pub mod snapshot;
pub mod spec;
mod sync;
mod translate;
pub mod types;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod tests;

pub use apply::{ApplyReport, BackendState};
pub use engine::Engine;
pub use error::CoreError;
pub use listing::FlowInfo;
pub use outbox::{Out, Outbox};
pub use restart::{Adopted, EndpointIdEntry, Ids, PoolIdEntry};
pub use snapshot::{EndpointShared, NetworkShared, Picker, PoolEntry, Snapshot, Tally};
pub use spec::{
    Desired, EndpointLimits, EndpointSpec, NetworkSpec, PortRule, ProxyTlv, ServiceSpec, Settings, Timeouts,
    MAX_BACKENDS, MAX_NAT_IPS, MAX_NAT_IPS_STORE,
};
pub use types::*;
pub use worker::Worker;
