//! Listing live flows (`privlink flows`, the control API).

use crate::engine::Engine;
use crate::types::{NetworkId, Now, Protocol};
use std::net::Ipv4Addr;

/// One live flow, for listings (`privlink flows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub protocol: Protocol,
    pub endpoint: String,
    pub network: NetworkId,
    pub consumer: (Ipv4Addr, u16),
    pub endpoint_addr: (Ipv4Addr, u16),
    pub nat: (Ipv4Addr, u16),
    pub backend: (Ipv4Addr, u16),
    pub state: &'static str,
    pub age: u32,
    pub idle: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Engine {
    /// The live flows, optionally of one endpoint only.
    pub fn flow_list(&self, endpoint: Option<&str>, now: Now) -> Vec<FlowInfo> {
        let snap = self.snap.load_full();
        let mut out = Vec::new();
        self.flows.for_each_live(|r| {
            let v = &r.view;
            let Some(e) = snap.endpoint_by_id(v.endpoint) else { return };
            if endpoint.is_some_and(|n| n != e.shared.name) {
                return;
            }
            let (c, p) = (v.ckey, v.pkey);
            let protocol = v.protocol();
            out.push(FlowInfo {
                protocol,
                endpoint: e.shared.name.clone(),
                network: NetworkId(c.network()),
                consumer: (Ipv4Addr::from(c.consumer_addr()), c.consumer_port()),
                endpoint_addr: (Ipv4Addr::from(c.endpoint_addr()), c.endpoint_port()),
                nat: (Ipv4Addr::from(p.nat_addr()), p.nat_port()),
                backend: (Ipv4Addr::from(p.backend_addr()), p.backend_port()),
                state: if protocol == Protocol::Tcp { v.phase().as_str() } else { "active" },
                age: now.0.saturating_sub(r.created.0),
                idle: now.0.saturating_sub(r.last_seen.0),
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
            });
        });
        out
    }
}
