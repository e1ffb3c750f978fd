//! TCP connection tracking as far as a NAT needs it: which segments open,
//! close and reopen a flow, and what a closed flow still holds.
//!
//! The state bits live in the flow's slot ([`crate::flow::state`]); this
//! module decides what a segment does to them and keeps the counts that
//! hang on them right:
//!
//! - **A RST ends a flow only at the exact sequence number** its receiver
//!   expects (RFC 5961 §3.2; Linux conntrack does the same since 2022). A
//!   RST elsewhere in the window makes an RFC 5961 receiver answer with a
//!   challenge ACK and keep the connection, and one outside the window is
//!   ignored; privlink forwards either and changes nothing, so a stale or
//!   guessed RST does not end a flow its endpoints keep. The slot keeps,
//!   per side, the sequence number right after the highest that side sent
//!   (8 bytes): the opening SYN sets it, later segments raise it by at
//!   most [`MAX_SEQ_ADVANCE`](crate::flow::MAX_SEQ_ADVANCE), so a blind
//!   forger must land inside that span to set up an exact RST (windows are
//!   not tracked: there is no room in the slot). A RST from a side must
//!   carry exactly that number. Before the backend answered, a RST from it
//!   must acknowledge the consumer's SYN (a refused connection, RFC 9293
//!   §3.10.7.3).
//! - **A flow that closed no longer counts as open.** The segment whose
//!   bits close a flow (both FINs, or an exact RST) also sets
//!   `COUNTED_CLOSED`, in the same compare-and-swap, so exactly one packet
//!   takes the flow off its endpoint's open flows (what `max_flows`
//!   bounds) and its network's share of the table, and queues it in its
//!   NAT pool's closed queue. A new SYN on the same 5-tuple reopens it and
//!   counts it again.
//! - **A closed flow gives way.** It keeps its slot and NAT port for
//!   `tcp_closed_idle` (RFC 7857 §2.2: late segments and retransmitted
//!   FINs still translate), unless a new flow needs them: when the table
//!   has no free slot, or the NAT pool no port, the oldest closed flow
//!   (of any pool, or of that pool) is ended first, as conntrack's early
//!   drop ends unassured entries. Only the flow's own removal (a
//!   compare-and-swap that requires `COUNTED_CLOSED`) frees its tuple, so
//!   a live 5-tuple is never given out twice.
//! - **During a hand-over** the frozen process still sets FIN and RST bits
//!   but not `COUNTED_CLOSED`: the counts are the successor's, whose sweep
//!   brings the bit in step with the phase within a second.

use crate::engine::Engine;
use crate::flow::{state, Changed, FlowRecord, FlowView};
use crate::pool::ClosedFlow;
use crate::snapshot::{PoolEntry, Snapshot};
use crate::types::Now;
use crate::wire::tcp_flags;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// At most this many closed flows are ended for one new flow before it is
/// refused (each is stale-checked; a pool shared by port overloading may
/// need more than one to free a usable port).
pub(crate) const RECLAIM_TRIES: usize = 8;

/// What a TCP segment does to its flow's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpUpdate {
    None,
    Add(u32),
    /// A new SYN from the consumer on a closed 5-tuple.
    Reopen,
}

#[inline]
pub(crate) fn pure_syn(flags: u8) -> bool {
    flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
}

/// What a segment with `flags` from the consumer (`inbound`) or the
/// provider does to flow `v`, whose sides have sent up to `next` =
/// (consumer, provider) so far.
///
/// `read` gives what deciding on a RST needs
/// (its acknowledgement number and the flow's next sequence numbers, see
/// [`rst_closes`]) only when there is one.
#[inline(always)]
pub(crate) fn update(inbound: bool, flags: u8, v: &FlowView, read: impl FnOnce() -> Rst) -> TcpUpdate {
    let (syn, fin, rst, ack) = (
        flags & tcp_flags::SYN != 0,
        flags & tcp_flags::FIN != 0,
        flags & tcp_flags::RST != 0,
        flags & tcp_flags::ACK != 0,
    );
    if rst {
        return if rst_closes(inbound, flags, v, read()) { TcpUpdate::Add(state::RST) } else { TcpUpdate::None };
    }
    if inbound {
        // The consumer's first ACK after the provider's SYN establishes
        // the flow, whatever else it carries (data, a FIN).
        let completes = ack && v.state & (state::P_SYN | state::ESTABLISHED) == state::P_SYN;
        let est = if completes { state::ESTABLISHED } else { 0 };
        if pure_syn(flags) && v.phase() == crate::flow::TcpPhase::Closed {
            TcpUpdate::Reopen
        } else if fin {
            TcpUpdate::Add(state::C_FIN | est)
        } else if completes {
            TcpUpdate::Add(state::ESTABLISHED)
        } else {
            TcpUpdate::None
        }
    } else if syn {
        TcpUpdate::Add(state::P_SYN)
    } else if fin {
        TcpUpdate::Add(state::P_FIN)
    } else {
        TcpUpdate::None
    }
}

/// What deciding on a RST reads: its sequence and acknowledgement numbers,
/// and the sequence numbers right after the highest each side of its flow
/// sent (consumer, provider).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rst {
    pub seq: u32,
    pub ack: u32,
    pub next: (u32, u32),
}

/// Whether a RST ends the flow: it carries exactly the next sequence
/// number of its sender (see the module docs).
#[inline(never)]
fn rst_closes(inbound: bool, flags: u8, v: &FlowView, r: Rst) -> bool {
    let (next_c, next_p) = r.next;
    if inbound {
        r.seq == next_c
    } else if v.state & state::P_SYN != 0 {
        r.seq == next_p
    } else {
        flags & tcp_flags::ACK != 0 && r.ack == next_c
    }
}

/// Whether a SYN (from the consumer when `inbound`) on flow `v` (its state
/// before this segment) starts its side's sequence space: the consumer's
/// before the provider answered or on a closed flow it reopens; the
/// provider's first. A SYN in the middle of a connection is not believed.
#[inline]
pub(crate) fn syn_starts(inbound: bool, v: &FlowView) -> bool {
    v.state & state::P_SYN == 0 || (inbound && v.phase() == crate::flow::TcpPhase::Closed)
}

/// Whether state bits say a TCP flow closed and was counted so: what a
/// reclaim requires, in the removing compare-and-swap. (A frozen table's
/// reopen keeps `COUNTED_CLOSED` on an open flow until the successor's
/// sweep clears it: the phase must be checked too.)
pub(crate) fn closed(bits: u32) -> bool {
    bits & state::COUNTED_CLOSED != 0 && crate::flow::TcpPhase::from_bits(bits) == crate::flow::TcpPhase::Closed
}

/// Subtracts one, wrapping. A removal by the sweep can count a flow's end
/// before the worker that closed or reopened it counts that change: for a
/// moment the count is one below its true value, possibly below zero, and
/// the late count brings it back. So counts wrap and are read through
/// [`count`]/[`count32`], never saturated (a lost decrement would stay).
fn dec64(a: &AtomicU64) {
    a.fetch_sub(1, Relaxed);
}

fn dec32(a: &AtomicU32) {
    a.fetch_sub(1, Relaxed);
}

/// A count kept with wrapping decrements and `fetch_add`: its value, 0 while it is
/// transiently below zero.
#[inline]
pub fn count(a: &AtomicU64) -> u64 {
    (a.load(Relaxed) as i64).max(0) as u64
}

/// As [`count`], for the networks' 32-bit shares.
#[inline]
pub fn count32(a: &AtomicU32) -> u32 {
    (a.load(Relaxed) as i32).max(0) as u32
}

impl Engine {
    /// Adjusts the counts for a state change of flow `v`: a close takes it
    /// off the open counts and queues it in its pool; a reopen puts it back.
    pub(crate) fn count_change(&self, snap: &Snapshot, v: &FlowView, c: Changed, now: Now) {
        let ep = snap.endpoint_by_id(v.endpoint);
        let net = &self.net_flows[usize::from(v.ckey.network())];
        if c.counted_closed() {
            if let Some(e) = ep {
                dec64(&e.shared.flows_active);
                e.shared.flows_closed.fetch_add(1, Relaxed);
            }
            dec32(net);
            if let Some(p) = snap.pools.get(&self.flows.pool_of(v)) {
                p.pool.note_closed(ClosedFlow { slot: v.slot, gen: v.generation(), at: now });
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
    pub(crate) fn count_end(&self, snap: &Snapshot, r: &FlowRecord, bits: u32) {
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

    /// Ends the oldest closed flow of `pool` (or, with `None`, of any pool)
    /// so that a new flow can have its slot or port; returns the port it
    /// held, or `None` when no closed flow is left to end.
    pub(crate) fn reclaim_closed(&self, snap: &Snapshot, pool: Option<&PoolEntry>, now: Now) -> Option<u16> {
        loop {
            let (from, c) = match pool {
                Some(p) => (p, p.pool.pop_closed()?),
                None => {
                    let p = snap
                        .pools
                        .values()
                        .filter_map(|p| p.pool.oldest_closed().map(|at| (at, p)))
                        .min_by_key(|&(at, p)| (at, p.id))
                        .map(|(_, p)| p)?;
                    let Some(c) = p.pool.pop_closed() else { continue };
                    (&**p, c)
                }
            };
            // Stale: the flow ended, or opened again, since it was queued.
            let Some(r) = self.flows.record_at(c.slot, c.gen) else { continue };
            if r.pool != from.id {
                continue;
            }
            let Some(bits) = self.flows.remove_if(&r.view, closed) else { continue };
            self.finish_end(snap, &r, bits, now, true);
            return Some(r.view.pkey.nat_port());
        }
    }

    /// What follows the removal of flow `r` (final state `bits`): its
    /// delete event, its counts, its port back to its pool (at once when
    /// the TCP close was seen, else after quarantine).
    pub(crate) fn finish_end(&self, snap: &Snapshot, r: &FlowRecord, bits: u32, now: Now, closed: bool) {
        if let Some(q) = &self.events {
            let v = &r.view;
            q.push(crate::events::NatEvent {
                kind: crate::events::NatEventKind::Delete,
                ckey: v.ckey,
                pkey: v.pkey,
                endpoint: v.endpoint,
            });
        }
        self.count_end(snap, r, bits);
        if let Some(p) = snap.pools.get(&r.pool) {
            p.pool.free(r.view.pkey.nat_port(), now, closed);
        }
    }

    /// The sweep's part: brings `COUNTED_CLOSED` of live flow `r` in step
    /// with its phase (another process changed its state during a
    /// hand-over) and counts the change.
    pub(crate) fn recount(&self, snap: &Snapshot, r: &FlowRecord, now: Now) {
        let v = &r.view;
        let closed = v.protocol() == crate::Protocol::Tcp && v.phase() == crate::flow::TcpPhase::Closed;
        if closed != (v.state & state::COUNTED_CLOSED != 0) {
            if let Some(c) = self.flows.set_counted(v) {
                self.count_change(snap, v, c, now);
            }
        }
    }

    /// Drops stale entries (flows that ended or opened again) from every
    /// pool's closed queue.
    pub(crate) fn prune_closed(&self, snap: &Snapshot) {
        for p in snap.pools.values() {
            p.pool.retain_closed(|c| {
                self.flows.record_at(c.slot, c.gen).is_some_and(|r| r.pool == p.id && closed(r.view.state))
            });
        }
    }
}
