//! Listing live flows (`privlink flows`, the control API).

use crate::addr::{End, V4, V6};
use crate::engine::{Engine, Tables};
use crate::types::{NetworkId, Now, Protocol};
use std::net::SocketAddr;

/// One live flow, for listings (`privlink flows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub protocol: Protocol,
    pub endpoint: String,
    pub network: NetworkId,
    pub consumer: SocketAddr,
    pub endpoint_addr: SocketAddr,
    pub nat: SocketAddr,
    pub backend: SocketAddr,
    pub state: &'static str,
    pub age: u32,
    pub idle: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Engine {
    /// The live flows, optionally of one endpoint only.
    pub fn flow_list(&self, endpoint: Option<&str>, now: Now) -> Vec<FlowInfo> {
        let mut out = Vec::new();
        self.list_table::<V4>(endpoint, now, &mut out);
        self.list_table::<V6>(endpoint, now, &mut out);
        out
    }

    /// [`flow_list`](Self::flow_list) of one family's table.
    fn list_table<F: Tables>(&self, endpoint: Option<&str>, now: Now, out: &mut Vec<FlowInfo>) {
        let Some(flows) = F::table(self) else { return };
        let snap = self.snap.load_full();
        // An IPv4 service reached from IPv6 shows its own addresses, not the
        // IPv4-mapped forms its flows are keyed by.
        let sa = |e: End<F>| SocketAddr::new(F::ip(e.addr).to_canonical(), e.port);
        flows.for_each_live(|r| {
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
                consumer: sa(c.consumer()),
                endpoint_addr: sa(c.endpoint()),
                nat: sa(p.nat()),
                backend: sa(p.backend()),
                state: if protocol == Protocol::Tcp { v.phase().as_str() } else { "active" },
                age: now.0.saturating_sub(r.created.0),
                idle: now.0.saturating_sub(r.last_seen.0),
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
            });
        });
    }
}
