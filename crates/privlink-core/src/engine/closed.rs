//! The engine's side of TCP tracking ([`crate::conntrack`]): the open and
//! closed counts that hang on a flow's state, and closed flows ending for
//! new ones (`reclaim_closed`, oldest first, per NAT pool).

use crate::addr::{V4, V6};
use crate::conntrack::closed;
use crate::counters::{dec32, dec64};
use crate::engine::{Engine, Tables};
use crate::flow::{state, Changed, FlowRecord, FlowView};
use crate::pool::ClosedFlow;
use crate::snapshot::{PoolEntry, Snapshot};
use crate::types::Now;
use std::sync::atomic::Ordering::Relaxed;

impl Engine {
    /// Adjusts the counts for a state change of flow `v`: a close takes it
    /// off the open counts and queues it in its pool; a reopen puts it back.
    #[inline]
    pub(crate) fn count_change<F: Tables>(&self, snap: &Snapshot, v: &FlowView<F>, c: Changed, now: Now) {
        if (c.before ^ c.after) & state::COUNTED_CLOSED == 0 {
            return;
        }
        let ep = snap.endpoint_by_id(v.endpoint);
        let net = &self.net_flows[usize::from(v.ckey.network())];
        if c.counted_closed() {
            if let Some(e) = ep {
                dec64(&e.shared.flows_active);
                e.shared.flows_closed.fetch_add(1, Relaxed);
            }
            dec32(net);
            let pool = F::table(self).map(|t| t.pool_of(v));
            if let Some(p) = pool.and_then(|id| snap.pools.get(&id)) {
                p.pool.note_closed(ClosedFlow { slot: v.slot, gen: v.generation(), at: now, v6: F::VERSION == 6 });
            }
        } else if c.reopened() {
            if let Some(e) = ep {
                e.shared.flows_active.fetch_add(1, Relaxed);
                dec64(&e.shared.flows_closed);
            }
            net.fetch_add(1, Relaxed);
        }
    }

    /// The counts for flow `r`, just removed with final state `bits`: off
    /// the open counts, or off the closed ones if it had closed.
    pub(crate) fn count_end<F: Tables>(&self, snap: &Snapshot, r: &FlowRecord<F>, bits: u32) {
        let ep = snap.endpoint_by_id(r.view.endpoint);
        if bits & state::COUNTED_CLOSED != 0 {
            if let Some(e) = ep {
                dec64(&e.shared.flows_closed);
            }
        } else {
            dec32(&self.net_flows[usize::from(r.view.ckey.network())]);
            if let Some(e) = ep {
                dec64(&e.shared.flows_active);
            }
        }
    }

    /// Ends the oldest closed flow of `pool` (or, with `None`, of any pool
    /// whose flows may sit in table `F`) so that a new flow can have its
    /// slot or port; returns the port it held, or `None` when no closed
    /// flow is left to end. Each queued flow is looked up in the table it
    /// is in ([`ClosedFlow::v6`]): an IPv4 pool's queue also holds IPv6
    /// flows translated to its service.
    pub(crate) fn reclaim_closed<F: Tables>(&self, snap: &Snapshot, pool: Option<&PoolEntry>, now: Now) -> Option<u16> {
        loop {
            let (from, c) = match pool {
                Some(p) => (p, p.pool.pop_closed()?),
                // Table `F` is full: only a closed flow of table `F` frees
                // a slot there (an IPv4 pool queues flows of both).
                None => {
                    let v6 = F::VERSION == 6;
                    let p = snap
                        .pools
                        .values()
                        .filter(|p| F::holds(p.nat_ip) || v6)
                        .filter_map(|p| p.pool.oldest_closed_in(v6).map(|at| (at, p)))
                        .min_by_key(|&(at, p)| (at, p.id))
                        .map(|(_, p)| p)?;
                    let Some(c) = p.pool.pop_closed_in(v6) else { continue };
                    (&**p, c)
                }
            };
            let port = if c.v6 {
                self.end_closed::<V6>(snap, from, c, now)
            } else {
                self.end_closed::<V4>(snap, from, c, now)
            };
            if port.is_some() {
                return port;
            }
        }
    }

    /// Ends the closed flow `c` of pool `from` in table `F` if it is still
    /// there and still closed (stale otherwise: it ended, or opened again,
    /// since it was queued); returns its port.
    fn end_closed<F: Tables>(&self, snap: &Snapshot, from: &PoolEntry, c: ClosedFlow, now: Now) -> Option<u16> {
        let flows = F::table(self)?;
        let r = flows.record_at(c.slot, c.gen)?;
        if r.pool != from.id {
            return None;
        }
        let bits = flows.remove_if(&r.view, closed)?;
        self.finish_end(snap, &r, bits, now, true);
        Some(r.view.pkey.nat_port())
    }

    /// What follows the removal of flow `r` (final state `bits`): its
    /// delete event, its counts, its port back to its pool (at once when
    /// the TCP close was seen, else after quarantine).
    pub(crate) fn finish_end<F: Tables>(&self, snap: &Snapshot, r: &FlowRecord<F>, bits: u32, now: Now, closed: bool) {
        let v = &r.view;
        F::nat_event(self, crate::events::NatEventKind::Delete, v.ckey, v.pkey, v.endpoint);
        self.count_end(snap, r, bits);
        if let Some(p) = snap.pools.get(&r.pool) {
            p.pool.free(r.view.pkey.nat_port(), now, closed);
        }
    }

    /// The sweep's part: brings `COUNTED_CLOSED` of live flow `r` in step
    /// with its phase (another process changed its state during a
    /// hand-over) and counts the change.
    pub(crate) fn recount<F: Tables>(&self, snap: &Snapshot, r: &FlowRecord<F>, now: Now) {
        let v = &r.view;
        let closed = v.protocol() == crate::Protocol::Tcp && v.phase() == crate::flow::TcpPhase::Closed;
        if closed != (v.state & state::COUNTED_CLOSED != 0) {
            if let Some(c) = F::table(self).and_then(|t| t.set_counted(v)) {
                self.count_change(snap, v, c, now);
            }
        }
    }

    /// Drops stale entries (flows that ended or opened again) from every
    /// pool's closed queue.
    pub(crate) fn prune_closed(&self, snap: &Snapshot) {
        for p in snap.pools.values() {
            p.pool.retain_closed(|c| match c.v6 {
                false => self.closed_at::<V4>(p, c.slot, c.gen),
                true => self.closed_at::<V6>(p, c.slot, c.gen),
            });
        }
    }

    /// Whether slot `slot` of generation `gen` still holds a closed flow
    /// of pool `p`.
    fn closed_at<F: Tables>(&self, p: &PoolEntry, slot: u32, gen: u32) -> bool {
        F::table(self).and_then(|t| t.record_at(slot, gen)).is_some_and(|r| r.pool == p.id && closed(r.view.state))
    }
}
