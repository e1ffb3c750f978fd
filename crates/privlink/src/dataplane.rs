//! The packet threads. Each worker owns queue `w` of every TUN device and
//! loops: `poll(2)` on its queues, then for each readable queue read up to a
//! batch of packets, hand each to its [`privlink_core::Worker`], and write
//! the result to the egress device's queue `w` (or the ICMP answer back to
//! where the packet came from). The clock is read once per batch.
//!
//! With offloads (the default) every read and write starts with a
//! virtio-net header. A TCP super-packet (up to 64 KiB, GSO) is translated
//! once and written at once with its header, so the kernel segments it, or
//! does not need to. Small packets are staged per egress device until the
//! read batch ends and written with tun-rs's `send_multiple`, which
//! coalesces packets of one flow into one GSO write (userspace GRO, as
//! wireguard-go does): fewer writes, and fewer wake-ups of the receiver.
//! Per packet, then, one read and at most one write.
//!
//! The set of devices can change on reload: workers pick up a new
//! [`DeviceSet`] through an `arc_swap::Cache` between batches, and the poll
//! timeout bounds how long an idle worker takes to notice (and to stop).

use crate::device::Device;
use arc_swap::{ArcSwap, Cache};
use privlink_core::worker::REPLY_MAX;
use privlink_core::{now_since, Egress, Engine, NetworkId, Offload, Source, Verdict};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tun_rs::GROTable;

/// Packets read from one queue before moving on to the next.
const BATCH: usize = 128;
/// Poll timeout: how soon an idle worker sees a stop or a new device set.
const POLL_MS: i32 = 100;

/// `struct virtio_net_hdr` (without `num_buffers`), as TUN reads and writes
/// it in native (little) endianness with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// What the translation needs from a virtio-net header.
#[inline]
pub fn parse_vnet_hdr(h: &[u8]) -> Offload {
    let gso = if h[1] & 0x7f == VIRTIO_NET_HDR_GSO_NONE { 0 } else { u16::from_le_bytes([h[4], h[5]]) };
    Offload { csum_partial: h[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0, gso_size: gso }
}

/// The devices workers read and write.
#[derive(Debug, Default)]
pub struct DeviceSet {
    pub provider: Option<Arc<Device>>,
    /// Indexed by `NetworkId`.
    pub networks: Vec<Option<Arc<Device>>>,
    /// Every device was opened with `IFF_VNET_HDR`: each read and write
    /// starts with a virtio-net header.
    pub vnet_hdr: bool,
}

impl DeviceSet {
    fn network(&self, id: NetworkId) -> Option<&Arc<Device>> {
        self.networks.get(usize::from(id.0)).and_then(Option::as_ref)
    }
}

/// Write failures per worker (rare: a device going away mid-reload).
#[derive(Debug, Default)]
pub struct IoErrors {
    pub writes: AtomicU64,
}

/// Running packet threads.
#[derive(Debug)]
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub errors: Arc<IoErrors>,
}

impl Dataplane {
    pub fn start(
        engine: &Arc<Engine>,
        devices: &Arc<ArcSwap<DeviceSet>>,
        epoch: Instant,
    ) -> std::io::Result<Dataplane> {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(IoErrors::default());
        let mut threads = Vec::new();
        for w in 0..engine.settings().workers {
            let worker = engine.worker(w);
            let (devices, stop, errors) = (devices.clone(), stop.clone(), errors.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("privlink-w{w}"))
                    .spawn(move || run_worker(worker, devices, stop, errors, epoch))?,
            );
        }
        Ok(Dataplane { stop, threads, errors })
    }

    /// Stops the workers and waits for them (at most one poll timeout).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_worker(
    mut worker: privlink_core::Worker,
    devices: Arc<ArcSwap<DeviceSet>>,
    stop: Arc<AtomicBool>,
    errors: Arc<IoErrors>,
    epoch: Instant,
) {
    let w = worker.index();
    let mut cache = Cache::new(devices);
    let mut current: Arc<DeviceSet> = cache.load().clone();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut srcs: Vec<(Source, Arc<Device>)> = Vec::new();
    let mut rebuild = true;
    let mut backing = vec![0u8; READ_BUF + 2 * PAGE];
    let at = payload_page_offset(backing.as_ptr() as usize);
    let buf = &mut backing[at..at + READ_BUF];
    let mut answer = [0u8; VNET_HDR_LEN + REPLY_MAX];
    // One fragment at a time, behind room for a (zeroed) virtio-net header.
    let mut piece = vec![0u8; VNET_HDR_LEN + 65536];
    // Small forwarded packets wait here per egress (0: provider, 1 + i:
    // network i) until the read batch ends, then go out coalesced (GRO in
    // userspace: one write carries many segments of a flow).
    let mut staged: Vec<Staged> = Vec::new();
    let mut gro = GROTable::new();
    while !stop.load(Ordering::Relaxed) {
        if !Arc::ptr_eq(cache.load(), &current) {
            current = cache.load().clone();
            rebuild = true;
        }
        if rebuild {
            rebuild = false;
            srcs.clear();
            if let Some(p) = &current.provider {
                srcs.push((Source::Provider, p.clone()));
            }
            for (i, d) in current.networks.iter().enumerate() {
                if let Some(d) = d {
                    srcs.push((Source::Network(NetworkId(i as u16)), d.clone()));
                }
            }
            fds = srcs.iter().map(|(_, d)| libc::pollfd { fd: d.fd(w), events: libc::POLLIN, revents: 0 }).collect();
            staged.resize_with(1 + current.networks.len(), Staged::default);
        }
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if n <= 0 {
            continue;
        }
        let now = now_since(epoch);
        for (i, pfd) in fds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let (src, dev) = &srcs[i];
            for _ in 0..BATCH {
                let len = match dev.queue(w).recv(buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => break,
                    Err(e) => {
                        tracing::debug!(device = %dev.name, "read failed: {e}");
                        break;
                    }
                };
                let hdr = if current.vnet_hdr { VNET_HDR_LEN } else { 0 };
                if len < hdr {
                    continue;
                }
                let (head, pkt) = buf[..len].split_at_mut(hdr);
                let off = if hdr > 0 { parse_vnet_hdr(head) } else { Offload::default() };
                let verdict = worker.process_offload(pkt, *src, now, off);
                if hdr > 0 {
                    // The packet changed: let the receiving stack verify the
                    // checksum rather than trust a validation done before.
                    head[0] &= !VIRTIO_NET_HDR_F_DATA_VALID;
                }
                if hdr > 0 && off.gso_size == 0 && len - hdr <= STAGE_MAX {
                    if let Verdict::Forward(e) = verdict {
                        let slot = stage_slot(e);
                        if let Some(st) = staged.get_mut(slot) {
                            st.push(&mut buf[..len], off.csum_partial);
                            continue;
                        }
                    }
                }
                if let Verdict::Forward(e) = verdict {
                    // Keep a flow's order: what waits for this device goes first.
                    let slot = stage_slot(e);
                    if let Some(st) = staged.get_mut(slot) {
                        flush(st, &current, slot, w, &mut gro, &errors);
                    }
                }
                let whole = &buf[..len];
                let out = match verdict {
                    Verdict::Forward(Egress::Provider) => current.provider.as_ref().map(|d| d.queue(w).send(whole)),
                    Verdict::Forward(Egress::Network(id)) => current.network(id).map(|d| d.queue(w).send(whole)),
                    Verdict::Reply { len, .. } => {
                        // A fresh packet: an all-zero header (no offload).
                        answer[..hdr].fill(0);
                        answer[hdr..hdr + len].copy_from_slice(worker.reply(len));
                        Some(dev.queue(w).send(&answer[..hdr + len]))
                    }
                    Verdict::Fragment { to, mtu } => {
                        if off.csum_partial {
                            complete_checksum(&mut buf[..len]);
                        }
                        egress(&current, to).map(|d| send_fragments(d, w, &buf[hdr..len], mtu, hdr, &mut piece))
                    }
                    Verdict::Drop(_) | Verdict::Held => None,
                };
                if let Some(Err(_)) = out {
                    errors.writes.fetch_add(1, Ordering::Relaxed);
                }
                if worker.has_ready() {
                    // Fragments held for a first fragment that just came.
                    worker.take_ready(|to, mtu, pkt| {
                        let r = egress(&current, to).map(|d| send_fragments(d, w, pkt, mtu, hdr, &mut piece));
                        if let Some(Err(_)) = r {
                            errors.writes.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
            for (slot, st) in staged.iter_mut().enumerate() {
                flush(st, &current, slot, w, &mut gro, &errors);
            }
        }
    }
}

fn egress(set: &DeviceSet, to: Egress) -> Option<&Arc<Device>> {
    match to {
        Egress::Provider => set.provider.as_ref(),
        Egress::Network(id) => set.network(id),
    }
}

/// Where to start reading in a buffer at address `base` (with at least two
/// pages to spare) so that the TCP payload of the common packet (10-byte
/// virtio-net header, 20-byte IP header, 32-byte TCP header with
/// timestamps) starts on a page boundary. The kernel copies a super-packet
/// into the buffer on read and out of it on write; with the payload
/// aligned those copies cost the workers about 7 % less CPU per byte
/// (4 TCP streams, median of six runs each: 396 against 428 ms of worker
/// CPU per GB).
fn payload_page_offset(base: usize) -> usize {
    (base + COMMON_HEADERS).next_multiple_of(PAGE) - COMMON_HEADERS - base
}
const PAGE: usize = 4096;
const COMMON_HEADERS: usize = VNET_HDR_LEN + 20 + 32;
/// Room for a virtio-net header and the largest packet TUN hands over.
const READ_BUF: usize = VNET_HDR_LEN + 65536;

/// Writes `pkt` in fragments of at most `mtu` bytes (one write when it
/// fits), each behind a zeroed header of `hdr` bytes.
fn send_fragments(d: &Device, w: usize, pkt: &[u8], mtu: u16, hdr: usize, piece: &mut [u8]) -> std::io::Result<usize> {
    piece[..hdr].fill(0);
    if pkt.len() <= usize::from(mtu) {
        piece[hdr..hdr + pkt.len()].copy_from_slice(pkt);
        return d.queue(w).send(&piece[..hdr + pkt.len()]);
    }
    let Some(mut f) = privlink_core::wire::Fragmenter::new(pkt, usize::from(mtu)) else { return Ok(0) };
    let mut total = 0;
    while let Some(n) = f.next_into(&mut piece[hdr..]) {
        total += d.queue(w).send(&piece[..hdr + n])?;
    }
    Ok(total)
}

/// The index in the worker's staging list of an egress device: 0 for the
/// provider, 1 + i for network i.
fn stage_slot(e: Egress) -> usize {
    match e {
        Egress::Provider => 0,
        Egress::Network(id) => 1 + usize::from(id.0),
    }
}

/// Writes what waits for egress `slot` (0: provider, 1 + i: network i).
fn flush(st: &mut Staged, set: &DeviceSet, slot: usize, w: usize, gro: &mut GROTable, errors: &IoErrors) {
    if st.n == 0 {
        return;
    }
    let dev = match slot {
        0 => set.provider.as_ref(),
        n => set.network(NetworkId((n - 1) as u16)),
    };
    if let Some(d) = dev {
        if d.queue(w).send_multiple(gro, &mut st.bufs[..st.n], VNET_HDR_LEN).is_err() {
            errors.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
    st.n = 0;
}

/// Largest packet staged for coalescing; larger ones (and GSO super-packets)
/// are written at once, they gain nothing from it.
const STAGE_MAX: usize = 1024;

/// Packets for one egress device, each `[virtio-net header][packet]`.
#[derive(Default)]
struct Staged {
    bufs: Vec<Vec<u8>>,
    n: usize,
}

impl Staged {
    /// Copies `whole` (header and packet) in, completing a partial checksum
    /// first: coalescing needs complete checksums and rewrites the header.
    fn push(&mut self, whole: &mut [u8], csum_partial: bool) {
        if csum_partial {
            complete_checksum(whole);
        }
        if self.n == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(2048));
        }
        let b = &mut self.bufs[self.n];
        b.clear();
        b.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        b.extend_from_slice(&whole[VNET_HDR_LEN..]);
        self.n += 1;
    }
}

/// Completes a `NEEDS_CSUM` packet's checksum as the device would: the
/// complement of the sum from `csum_start`, written at `csum_start +
/// csum_offset` (whose field holds the partial pseudo-header sum).
fn complete_checksum(whole: &mut [u8]) {
    let start = usize::from(u16::from_le_bytes([whole[6], whole[7]]));
    let at = start + usize::from(u16::from_le_bytes([whole[8], whole[9]]));
    let pkt = &mut whole[VNET_HDR_LEN..];
    if at + 2 > pkt.len() || start > pkt.len() {
        return;
    }
    let mut c = !privlink_core::checksum::fold(privlink_core::checksum::sum(&pkt[start..]));
    if c == 0 && pkt.get(9) == Some(&17) {
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
        let partial = privlink_core::checksum::fold(privlink_core::checksum::sum(&pseudo));
        whole.extend_from_slice(&partial.to_be_bytes());
        whole.extend_from_slice(payload);
        complete_checksum(&mut whole);
        assert_eq!(whole[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&whole[VNET_HDR_LEN..]).expect("IPv4 header").to_header();
        let udp = etherparse::UdpHeaderSlice::from_slice(&whole[VNET_HDR_LEN + 20..]).expect("UDP header").to_header();
        assert_eq!(udp.checksum, udp.calc_checksum_ipv4(&ip, payload).expect("checksum"));
    }
}
