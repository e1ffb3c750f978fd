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

use crate::flow::{state, FlowView};
use crate::wire::tcp_flags;

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
