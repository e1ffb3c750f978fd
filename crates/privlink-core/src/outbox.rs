//! The worker's outbox: everything one read batch makes the worker send,
//! in the order it must go out. The core decides every write (which device,
//! which bytes, coalesced or not); the daemon's loop only reads into
//! [`Outbox::read_buf`], hands the length to [`Worker::handle`](crate::Worker::handle),
//! and performs what [`Outbox::drain`] hands it, one system call each. As
//! quinn-proto's endpoint owns its transmits, nothing the core decided to
//! send (a staged packet, a released fragment, a generated ICMP error) can
//! be forgotten by the I/O loop.
//!
//! With offloads every packet read and written starts with a virtio-net
//! header ([`VNET_HDR_LEN`] bytes). Three kinds of entries come out:
//!
//! - the packet just read, translated in place and written as it is (a
//!   TCP super-packet keeps its header, so the kernel segments it);
//! - small packets *staged* per egress device and written together at the
//!   end of the batch ([`Out::Coalesce`]), so the daemon can coalesce
//!   segments of one flow into one write (userspace GRO): fewer writes,
//!   fewer wake-ups of the receiver. Staged packets of a device are always
//!   queued before anything else written to that device, which keeps each
//!   flow's order;
//! - packets the core made: ICMP answers, fragments, released held
//!   fragments, each behind a zeroed virtio-net header, in the outbox's
//!   own arena.
//!
//! Nothing here allocates per packet: the read buffer, the arena and the
//! staging buffers are allocated once and reused.

use crate::types::{Egress, NetworkId, Offload};
use crate::wire::Fragmenter;

/// `struct virtio_net_hdr` (without `num_buffers`), as TUN reads and writes
/// it in native (little) endianness with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// Largest packet staged for coalescing; larger ones (and GSO super-packets)
/// are written at once, they gain nothing from it.
pub const STAGE_MAX: usize = 1024;

/// Room for a virtio-net header and the largest packet TUN hands over.
const READ_BUF: usize = VNET_HDR_LEN + 65536;
const PAGE: usize = 4096;
/// The common TCP packet's headers: virtio-net, 20-byte IP, 32-byte TCP
/// with timestamps.
const COMMON_HEADERS: usize = VNET_HDR_LEN + 20 + 32;

/// What a virtio-net header says, as far as translation cares.
#[inline]
pub fn parse_vnet_hdr(h: &[u8]) -> Offload {
    let gso = if h[1] & 0x7f == VIRTIO_NET_HDR_GSO_NONE { 0 } else { u16::from_le_bytes([h[4], h[5]]) };
    Offload { csum_partial: h[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0, gso_size: gso }
}

/// One write the daemon must perform.
#[derive(Debug)]
pub enum Out<'a> {
    /// Write these bytes (header included, when the devices have one) to
    /// the device, in one write.
    Write { to: Egress, bytes: &'a [u8] },
    /// Write these packets, each `[virtio-net header][packet]` with
    /// complete checksums, to the device, coalescing what can be
    /// (tun-rs's `send_multiple`).
    Coalesce { to: Egress, bufs: &'a mut [Vec<u8>] },
}

#[derive(Debug, Clone, Copy)]
enum Body {
    /// The packet in the read buffer, `len` bytes.
    Read(usize),
    /// Bytes in the arena.
    Arena(usize, usize),
    /// The packets staged for a device (its staging slot).
    Staged(usize),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    to: Egress,
    body: Body,
}

/// Packets for one egress device, each `[virtio-net header][packet]`.
#[derive(Debug, Default)]
struct Staged {
    bufs: Vec<Vec<u8>>,
    n: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct Outbox {
    hdr: usize,
    backing: Box<[u8]>,
    read_at: usize,
    arena: Vec<u8>,
    /// Per egress device: slot 0 the provider, 1 + i network i.
    staged: Vec<Staged>,
    queue: Vec<Entry>,
}

impl Outbox {
    /// An outbox for devices that do (`vnet_hdr`) or do not carry a
    /// virtio-net header before each packet.
    pub fn new(vnet_hdr: bool) -> Outbox {
        let backing = vec![0u8; READ_BUF + 2 * PAGE].into_boxed_slice();
        let read_at = payload_page_offset(backing.as_ptr() as usize);
        Outbox {
            hdr: if vnet_hdr { VNET_HDR_LEN } else { 0 },
            backing,
            read_at,
            // A 64 KiB packet in fragments, each behind its header, twice
            // (the packet read and a released one).
            arena: Vec::with_capacity(4 * READ_BUF),
            staged: Vec::new(),
            queue: Vec::with_capacity(256),
        }
    }

    /// Bytes of virtio-net header before each packet (0 or 10).
    pub fn header_len(&self) -> usize {
        self.hdr
    }

    /// Where the daemon reads the next packet (header first, when the
    /// devices have one). The buffer is placed so that the TCP payload of
    /// the common packet starts on a page boundary: the kernel copies a
    /// super-packet into it on read and out of it on write, and aligned
    /// copies cost the workers about 7 % less CPU per byte (4 TCP streams,
    /// median of six runs each: 396 against 428 ms of worker CPU per GB).
    pub fn read_buf(&mut self) -> &mut [u8] {
        &mut self.backing[self.read_at..self.read_at + READ_BUF]
    }

    /// The packet just read (`len` bytes with its header): its header,
    /// and the packet with the rest of the read buffer behind it (room
    /// for a translation to IPv6 to grow into, [`crate::wire::nat64`]).
    pub(crate) fn read_parts(&mut self, len: usize) -> (&mut [u8], &mut [u8]) {
        let hdr = self.hdr;
        let end = (self.read_at + READ_BUF + crate::wire::nat64::GROWTH).max(self.read_at + len);
        self.backing[self.read_at..end].split_at_mut(hdr)
    }

    /// After a translation changed the packet's IP version (RFC 7915):
    /// the virtio-net header's checksum start and header length move to
    /// the new header's end (IPv4 20 bytes, IPv6 40: a translated packet
    /// has no options or extension headers but a Fragment header when it
    /// must be split), and a TCP GSO type becomes the other family's.
    pub(crate) fn retarget_vnet_hdr(&mut self, v6: bool) {
        if self.hdr == 0 {
            return;
        }
        // Where the upper-layer header now starts: after IPv4's 20 bytes,
        // IPv6's 40, or 48 with the Fragment header of a datagram to be
        // split (RFC 7915 §4).
        let frag = self.backing[self.read_at + self.hdr + 6] == crate::wire::ipv6::next::FRAGMENT;
        let h = &mut self.backing[self.read_at..self.read_at + VNET_HDR_LEN];
        let l4: u16 = match (v6, frag) {
            (false, _) => 20,
            (true, false) => 40,
            (true, true) => 48,
        };
        let start = u16::from_le_bytes([h[6], h[7]]);
        if h[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let hdr_len = u16::from_le_bytes([h[2], h[3]]);
            if hdr_len >= start {
                h[2..4].copy_from_slice(&(hdr_len - start + l4).to_le_bytes());
            }
            h[6..8].copy_from_slice(&l4.to_le_bytes());
        }
        let gso = h[1] & 0x7f;
        if gso == VIRTIO_NET_HDR_GSO_TCPV4 || gso == VIRTIO_NET_HDR_GSO_TCPV6 {
            let to = if v6 { VIRTIO_NET_HDR_GSO_TCPV6 } else { VIRTIO_NET_HDR_GSO_TCPV4 };
            h[1] = h[1] & 0x80 | to;
        }
    }

    /// Marks the packet just read as changed: the receiving stack must
    /// verify its checksum rather than trust a validation done before.
    pub(crate) fn clear_data_valid(&mut self) {
        if self.hdr > 0 {
            self.backing[self.read_at] &= !VIRTIO_NET_HDR_F_DATA_VALID;
        }
    }

    fn slot(&mut self, to: Egress) -> usize {
        let s = match to {
            Egress::Provider => 0,
            Egress::Network(id) => 1 + usize::from(id.0),
        };
        if self.staged.len() <= s {
            self.staged.resize_with(s + 1, Staged::default);
        }
        s
    }

    /// Queues whatever is staged for `to` (before anything else for it).
    fn flush(&mut self, to: Egress) {
        let s = self.slot(to);
        if self.staged[s].n > 0 && !self.queue.iter().any(|e| matches!(e.body, Body::Staged(x) if x == s)) {
            self.queue.push(Entry { to, body: Body::Staged(s) });
        }
    }

    /// Queues every device's staged packets: the end of a read batch.
    pub fn flush_all(&mut self) {
        for s in 0..self.staged.len() {
            if self.staged[s].n > 0 {
                let to = if s == 0 { Egress::Provider } else { Egress::Network(NetworkId((s - 1) as u16)) };
                self.flush(to);
            }
        }
    }

    /// Stages the small packet just read (`len` bytes with its header) for
    /// `to`, completing a partial checksum first: coalescing needs complete
    /// checksums and rewrites the header.
    pub(crate) fn stage_read(&mut self, to: Egress, len: usize, csum_partial: bool) {
        let s = self.slot(to);
        let (hdr, at) = (self.hdr, self.read_at);
        let whole = &mut self.backing[at..at + len];
        if csum_partial {
            complete_checksum(whole);
        }
        let st = &mut self.staged[s];
        if st.n == st.bufs.len() {
            st.bufs.push(Vec::with_capacity(2048));
        }
        let b = &mut st.bufs[st.n];
        b.clear();
        b.resize(hdr, 0);
        b.extend_from_slice(&whole[hdr..]);
        st.n += 1;
    }

    /// Queues the packet just read (`len` bytes with its header) for `to`.
    pub(crate) fn write_read(&mut self, to: Egress, len: usize) {
        self.flush(to);
        self.queue.push(Entry { to, body: Body::Read(len) });
    }

    /// Queues a packet the core made, behind a zeroed header.
    pub(crate) fn write_made(&mut self, to: Egress, pkt: &[u8]) {
        self.flush(to);
        push_made(&mut self.arena, &mut self.queue, self.hdr, to, pkt);
    }

    /// Queues `pkt` in fragments of at most `mtu` bytes (whole when it
    /// fits), each behind a zeroed header.
    pub(crate) fn write_fragments(&mut self, to: Egress, pkt: &[u8], mtu: u16) {
        self.flush(to);
        push_fragments(&mut self.arena, &mut self.queue, self.hdr, to, pkt, mtu);
    }

    /// Queues the packet just read (`len` bytes with its header) in
    /// fragments of at most `mtu` bytes, completing a partial checksum
    /// first (fragments carry no offload).
    pub(crate) fn fragment_read(&mut self, to: Egress, len: usize, mtu: u16, csum_partial: bool) {
        self.flush(to);
        let (hdr, at) = (self.hdr, self.read_at);
        if csum_partial {
            complete_checksum(&mut self.backing[at..at + len]);
        }
        push_fragments(&mut self.arena, &mut self.queue, hdr, to, &self.backing[at + hdr..at + len], mtu);
    }

    /// Whether anything waits to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Hands every queued write to `f`, in order, and empties the queue.
    pub fn drain(&mut self, mut f: impl FnMut(Out<'_>)) {
        for e in self.queue.drain(..) {
            match e.body {
                Body::Read(len) => f(Out::Write { to: e.to, bytes: &self.backing[self.read_at..self.read_at + len] }),
                Body::Arena(a, b) => f(Out::Write { to: e.to, bytes: &self.arena[a..b] }),
                Body::Staged(s) => {
                    let st = &mut self.staged[s];
                    f(Out::Coalesce { to: e.to, bufs: &mut st.bufs[..st.n] });
                    st.n = 0;
                }
            }
        }
        self.arena.clear();
    }
}

/// Copies `pkt` into the arena behind a zeroed header of `hdr` bytes and
/// queues it for `to`.
fn push_made(arena: &mut Vec<u8>, queue: &mut Vec<Entry>, hdr: usize, to: Egress, pkt: &[u8]) {
    let start = arena.len();
    arena.resize(start + hdr, 0);
    arena.extend_from_slice(pkt);
    queue.push(Entry { to, body: Body::Arena(start, arena.len()) });
}

/// Queues `pkt` for `to` in fragments of at most `mtu` bytes (whole when it
/// fits), each behind a zeroed header of `hdr` bytes in the arena.
/// A fragmenter of either family.
enum Either<'a> {
    V4(Fragmenter<'a>),
    V6(crate::wire::ipv6::Fragmenter6<'a>),
}

fn push_fragments(arena: &mut Vec<u8>, queue: &mut Vec<Entry>, hdr: usize, to: Egress, pkt: &[u8], mtu: u16) {
    if pkt.len() <= usize::from(mtu) {
        return push_made(arena, queue, hdr, to, pkt);
    }
    // An IPv6 packet translated from IPv4 without DF (RFC 7915 §4), or
    // an IPv4 one.
    let mut f = if pkt.first().is_some_and(|v| v >> 4 == 6) {
        let Some(f) = crate::wire::ipv6::Fragmenter6::new(pkt, usize::from(mtu)) else { return };
        Either::V6(f)
    } else {
        let Some(f) = Fragmenter::new(pkt, usize::from(mtu)) else { return };
        Either::V4(f)
    };
    loop {
        let start = arena.len();
        arena.resize(start + hdr + usize::from(mtu), 0);
        let out = &mut arena[start + hdr..];
        let got = match &mut f {
            Either::V4(f) => f.next_into(out),
            Either::V6(f) => f.next_into(out),
        };
        match got {
            Some(n) => {
                arena.truncate(start + hdr + n);
                queue.push(Entry { to, body: Body::Arena(start, arena.len()) });
            }
            None => {
                arena.truncate(start);
                return;
            }
        }
    }
}

/// Where to start reading in a buffer at address `base` (with at least two
/// pages to spare) so that the TCP payload of the common packet starts on a
/// page boundary.
fn payload_page_offset(base: usize) -> usize {
    (base + COMMON_HEADERS).next_multiple_of(PAGE) - COMMON_HEADERS - base
}

/// Completes a `NEEDS_CSUM` packet's checksum as the device would: the
/// complement of the sum from `csum_start`, written at `csum_start +
/// csum_offset` (whose field holds the partial pseudo-header sum).
pub fn complete_checksum(whole: &mut [u8]) {
    let start = usize::from(u16::from_le_bytes([whole[6], whole[7]]));
    let at = start + usize::from(u16::from_le_bytes([whole[8], whole[9]]));
    let pkt = &mut whole[VNET_HDR_LEN..];
    if at + 2 > pkt.len() || start > pkt.len() {
        return;
    }
    let mut c = !crate::checksum::fold(crate::checksum::sum(&pkt[start..]));
    let udp = match pkt.first().map(|v| v >> 4) {
        Some(4) => pkt.get(9) == Some(&17),
        _ => pkt.get(6) == Some(&17),
    };
    if c == 0 && udp {
        c = 0xffff; // UDP sends a computed zero as all ones
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    whole[0] &= !VIRTIO_NET_HDR_F_NEEDS_CSUM;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffer_puts_the_common_payload_on_a_page_and_fits_its_backing() {
        for base in [0usize, 1, 16, 62, 63, 64, 4034, 4095, 4096, 0x7f00_1234_5678] {
            let at = payload_page_offset(base);
            assert_eq!((base + at + COMMON_HEADERS) % PAGE, 0, "base {base:#x}");
            assert!(at + READ_BUF <= READ_BUF + 2 * PAGE, "base {base:#x}: offset {at}");
        }
    }

    #[test]
    fn complete_checksum_matches_a_full_recomputation() {
        // A UDP packet whose checksum field holds the pseudo-header sum, as
        // a sender with checksum offload hands it over.
        let payload = b"privlink";
        let (src, dst) = ([10, 1, 0, 10], [10, 1, 0, 5]);
        let udp_len = (8 + payload.len()) as u16;
        let mut whole = vec![0u8; VNET_HDR_LEN];
        whole[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        whole[6..8].copy_from_slice(&20u16.to_le_bytes()); // csum_start
        whole[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset
        let total = 20 + udp_len;
        whole.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        whole.extend_from_slice(&src);
        whole.extend_from_slice(&dst);
        whole.extend_from_slice(&[0x30, 0x39, 0x14, 0x51]);
        whole.extend_from_slice(&udp_len.to_be_bytes());
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&src);
        pseudo[4..8].copy_from_slice(&dst);
        pseudo[9] = 17;
        pseudo[10..].copy_from_slice(&udp_len.to_be_bytes());
        let partial = crate::checksum::fold(crate::checksum::sum(&pseudo));
        whole.extend_from_slice(&partial.to_be_bytes());
        whole.extend_from_slice(payload);
        complete_checksum(&mut whole);
        assert_eq!(whole[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&whole[VNET_HDR_LEN..]).expect("IPv4 header").to_header();
        let udp = etherparse::UdpHeaderSlice::from_slice(&whole[VNET_HDR_LEN + 20..]).expect("UDP header").to_header();
        assert_eq!(udp.checksum, udp.calc_checksum_ipv4(&ip, payload).expect("checksum"));
    }
}
