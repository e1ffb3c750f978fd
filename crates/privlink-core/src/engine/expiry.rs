//! Ending flows: idle timeouts (a sweep about once a second), and flows
//! the configuration no longer allows (after a reload or a change of
//! connection state). Each flow is ended once, by whoever wins its removal
//! in the flow table, and its port goes back to the pool it came from.

use crate::addr::{V4, V6};
use crate::engine::{Engine, Tables};
use crate::flow::{FlowRecord, TcpPhase};
use crate::snapshot::Addressed;
use crate::snapshot::Snapshot;
use crate::types::{ConnectionState, Now, Protocol};
use std::sync::atomic::Ordering;

impl Engine {
    /// Sets an endpoint's connection state; a state other than approved ends
    /// its live flows. Returns false when no such endpoint is configured.
    pub fn set_connection_state(&self, endpoint: &str, state: ConnectionState, now: Now) -> bool {
        let snap = self.snap.load();
        let Some(e) = snap.endpoint_by_name(endpoint) else { return false };
        e.shared.conn.store(state as u8, Ordering::Release);
        if state != ConnectionState::Approved {
            self.sweep(now, false);
        }
        true
    }

    /// Ends idle flows and returns their ports; call about once a second.
    /// Returns how many flows ended.
    pub fn expire(&self, now: Now) -> usize {
        self.sweep(now, true)
    }

    /// Ends every flow that is no longer allowed by the snapshot and, when
    /// `idle` is set, every flow past its timeout; keeps the open and
    /// closed counts in step ([`crate::conntrack`]).
    pub(crate) fn sweep(&self, now: Now, idle: bool) -> usize {
        // Handing the table over: the successor removes from now on.
        if self.flows.is_frozen() {
            return 0;
        }
        let snap = self.snap.load_full();
        let ended = self.sweep_table::<V4>(&snap, now, idle) + self.sweep_table::<V6>(&snap, now, idle);
        self.prune_closed(&snap);
        for p in snap.pools.values() {
            p.pool.release_quarantine(now);
        }
        ended
    }

    /// The sweep over one family's table.
    fn sweep_table<F: Tables>(&self, snap: &Snapshot, now: Now, idle: bool) -> usize {
        let Some(flows) = F::table(self) else { return 0 };
        let t = self.settings.timeouts;
        let mut ended = 0;
        flows.for_each_live(|r| {
            let v = &r.view;
            let phase = v.phase();
            let timeout = crate::conntrack::timeout(v.protocol(), phase, &t);
            let expired = idle && now.0.saturating_sub(r.last_seen.0) >= timeout;
            if expired || !allowed(snap, r) {
                let closed = v.protocol() == Protocol::Tcp && phase == TcpPhase::Closed;
                if let Some(bits) = flows.remove(&r.view) {
                    self.finish_end(snap, r, bits, now, closed);
                    ended += 1;
                }
            } else {
                self.recount(snap, r, now);
            }
        });
        ended
    }
}

/// Whether a live flow is still allowed: its endpoint is configured and
/// approved and still allows its source, its service still offers the
/// port, has the backend and the pool.
fn allowed<F: Addressed>(snap: &Snapshot, r: &FlowRecord<F>) -> bool {
    let v = &r.view;
    let Some(e) = snap.endpoint_by_id(v.endpoint) else { return false };
    if !e.shared.approved() || !snap.pools.contains_key(&r.pool) || !F::allows(e, v.ckey.consumer_addr()) {
        return false;
    }
    let svc = &snap.services[e.service];
    let proto = v.protocol();
    let rule_ok = proto == Protocol::Icmp || svc.rule(proto, v.ckey.endpoint_port()).is_some();
    rule_ok && F::backends(svc).contains(&v.pkey.backend_addr())
}
