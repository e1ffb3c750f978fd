//! TCP connection tracking as far as a NAT needs it: which segments open,
//! close and reopen a flow, and what a closed flow still holds.
//!
//! The state bits ([`state`]), the phases the timeouts see ([`TcpPhase`],
//! [`timeout`]) and what a segment does to them live here; the flow's slot
//! keeps the bits, and the engine keeps the counts that hang on them
//! (`engine/closed.rs`):
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
//!   forger must land inside that span to move it (windows are not
//!   tracked: there is no room in the slot; a series of forged segments
//!   can walk it, docs/NAT-BEHAVIOUR.md says what that costs a flow). A RST from a side must
//!   carry exactly that number, or, after that side's FIN, the FIN's own
//!   (the RST of a closed socket answering late data, which Linux's
//!   receiver accepts as `rcv_nxt - 1`). Before the backend answered, a RST from it
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

use crate::spec::Timeouts;
use crate::types::Protocol;
use crate::wire::tcp_flags;

/// Bits of a TCP flow's state, as its slot keeps them (the low 12 bits of
/// its `meta` word; the generation is in the 20 bits above, see
/// [`crate::flow`]).
pub mod state {
    /// The slot holds a flow fully set up (set last, cleared first).
    pub const LIVE: u32 = 1 << 0;
    /// TCP SYN seen from the consumer.
    pub const C_SYN: u32 = 1 << 1;
    /// TCP SYN (SYN-ACK, or simultaneous open) seen from the provider.
    pub const P_SYN: u32 = 1 << 2;
    /// TCP FIN seen from the consumer / the provider.
    pub const C_FIN: u32 = 1 << 3;
    pub const P_FIN: u32 = 1 << 4;
    /// TCP RST seen from either side.
    pub const RST: u32 = 1 << 5;
    /// An ACK from the consumer after the provider's SYN: established.
    pub const ESTABLISHED: u32 = 1 << 6;
    /// PROXY protocol: the backend has acknowledged the whole header.
    pub const HDR_ACKED: u32 = 1 << 7;
    /// The flow's close has been taken off its endpoint's and network's
    /// open flows (see [`FlowTable::add_state`](crate::flow::FlowTable::add_state)): set with the bits that
    /// close it, by the process that owns the table's counts.
    pub const COUNTED_CLOSED: u32 = 1 << 8;
    /// The state bits of a `meta` word.
    pub(crate) const MASK: u32 = 0xfff;
}

/// TCP state of a flow, as the timeouts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpPhase {
    /// SYN seen, handshake not finished: transitory timeout.
    Opening,
    Established,
    /// One FIN seen: transitory timeout.
    Closing,
    /// Both FINs or a RST: short linger, port back without quarantine.
    Closed,
}

impl TcpPhase {
    pub fn from_bits(s: u32) -> TcpPhase {
        if s & state::RST != 0 || (s & state::C_FIN != 0 && s & state::P_FIN != 0) {
            TcpPhase::Closed
        } else if s & (state::C_FIN | state::P_FIN) != 0 {
            TcpPhase::Closing
        } else if s & state::ESTABLISHED != 0 {
            TcpPhase::Established
        } else {
            TcpPhase::Opening
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TcpPhase::Opening => "opening",
            TcpPhase::Established => "established",
            TcpPhase::Closing => "closing",
            TcpPhase::Closed => "closed",
        }
    }
}

/// The idle timeout of a flow of protocol `proto` in TCP phase `phase`
/// (ignored for UDP and ICMP), in seconds: RFC 5382 REQ-5 for TCP
/// (established at least 2 h 4 min, transitory at least 4 min), RFC 4787
/// REQ-5 for UDP, RFC 5508 REQ-1 for ICMP queries; a closed TCP flow
/// lingers `tcp_closed` (docs/NAT-BEHAVIOUR.md, "Timeouts").
pub fn timeout(proto: Protocol, phase: TcpPhase, t: &Timeouts) -> u32 {
    match proto {
        Protocol::Tcp => match phase {
            TcpPhase::Established => t.tcp_established,
            TcpPhase::Closed => t.tcp_closed,
            TcpPhase::Opening | TcpPhase::Closing => t.tcp_transitory,
        },
        Protocol::Udp => t.udp,
        Protocol::Icmp => t.icmp,
    }
}

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
/// provider does to a flow whose state is `bits`.
///
/// `read` gives what deciding on a RST needs
/// (its acknowledgement number and the flow's next sequence numbers, see
/// [`rst_closes`]) only when there is one.
#[inline(always)]
pub(crate) fn update(inbound: bool, flags: u8, bits: u32, read: impl FnOnce() -> Rst) -> TcpUpdate {
    let (syn, fin, rst, ack) = (
        flags & tcp_flags::SYN != 0,
        flags & tcp_flags::FIN != 0,
        flags & tcp_flags::RST != 0,
        flags & tcp_flags::ACK != 0,
    );
    if rst {
        return if rst_closes(inbound, flags, bits, read()) { TcpUpdate::Add(state::RST) } else { TcpUpdate::None };
    }
    if inbound {
        // The consumer's first ACK after the provider's SYN establishes
        // the flow, whatever else it carries (data, a FIN).
        let completes = ack && bits & (state::P_SYN | state::ESTABLISHED) == state::P_SYN;
        let est = if completes { state::ESTABLISHED } else { 0 };
        if pure_syn(flags) && TcpPhase::from_bits(bits) == TcpPhase::Closed {
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
/// number of its sender (see the module docs), or, once that sender's FIN
/// went out, the FIN's own number: a socket that sent its FIN and then
/// receives data resets with the number that data acknowledged (Linux
/// `tcp_rcv_state_process`, then `tcp_v4_send_reset` taking the RST's
/// sequence number from the segment's ACK, RFC 9293 §3.10.7.1), and the
/// receiver accepts `rcv_nxt - 1` after a FIN (Linux `tcp_reset_check`).
#[inline(never)]
fn rst_closes(inbound: bool, flags: u8, bits: u32, r: Rst) -> bool {
    let (next_c, next_p) = r.next;
    let at = |next: u32, fin: u32| r.seq == next || (bits & fin != 0 && r.seq == next.wrapping_sub(1));
    if inbound {
        at(next_c, state::C_FIN)
    } else if bits & state::P_SYN != 0 {
        at(next_p, state::P_FIN)
    } else {
        flags & tcp_flags::ACK != 0 && r.ack == next_c
    }
}

/// Whether a SYN (from the consumer when `inbound`) on a flow in state
/// `bits` (before this segment) starts its side's sequence space: the consumer's
/// before the provider answered or on a closed flow it reopens; the
/// provider's first. A SYN in the middle of a connection is not believed.
#[inline]
pub(crate) fn syn_starts(inbound: bool, bits: u32) -> bool {
    bits & state::P_SYN == 0 || (inbound && TcpPhase::from_bits(bits) == TcpPhase::Closed)
}

/// Whether state bits say a TCP flow closed and was counted so: what a
/// reclaim requires, in the removing compare-and-swap. (A frozen table's
/// reopen keeps `COUNTED_CLOSED` on an open flow until the successor's
/// sweep clears it: the phase must be checked too.)
pub(crate) fn closed(bits: u32) -> bool {
    bits & state::COUNTED_CLOSED != 0 && TcpPhase::from_bits(bits) == TcpPhase::Closed
}
