//! The per-packet entry points. A [`Worker`] belongs to one packet thread.
//! It reads the configuration through its own `arc_swap::Cache` (no shared
//! write per packet), counts into its own per-worker counter slots (plain
//! load/store, summed on read), and touches shared memory only in the flow
//! it translates. Flow setup and teardown take the flow table's striped
//! locks and the port pool's mutex; an established flow's packets take none.
//!
//! Two ways in: [`Worker::process`] translates one packet in a `&mut [u8]`
//! and returns a [`Verdict`] (tests, benches, the fuzzer); [`Worker::handle`]
//! does the same for a packet read into an [`Outbox`] and queues every write
//! it leads to there (the daemon). The translation itself is
//! `translate.rs`, one path for both directions.

use crate::engine::Engine;
use crate::frag::Frags;
use crate::outbox::{parse_vnet_hdr, Outbox, STAGE_MAX};
use crate::snapshot::Snapshot;
use crate::translate::{count_drop, release, release6, Ctx, Dir, Extra, IcmpLimiter};
use crate::types::{DropReason, Egress, NetworkId, Now, Offload, Source, Verdict};
use arc_swap::{ArcSwap, Cache};
use std::sync::Arc;

pub use crate::translate::nat_ip_index;
pub use crate::wire::REPLY_MAX;

/// A packet-processing handle; one per packet thread.
#[derive(Debug)]
pub struct Worker {
    engine: Arc<Engine>,
    index: usize,
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    reply: [u8; REPLY_MAX],
    /// A packet made besides the one forwarded (in `reply`).
    extra: Option<Extra>,
    icmp: IcmpLimiter,
    frags: Frags,
}

impl Engine {
    /// A packet-processing handle for worker number `index`
    /// (`0..settings.workers`).
    pub fn worker(self: &Arc<Self>, index: usize) -> Worker {
        let cache = Cache::new(self.snap.clone());
        let rate = self.settings.icmp_rate;
        Worker {
            engine: self.clone(),
            index,
            cache,
            reply: [0; REPLY_MAX],
            extra: None,
            icmp: IcmpLimiter::new(rate),
            frags: Frags::default(),
        }
    }
}

impl Worker {
    pub fn index(&self) -> usize {
        self.index
    }

    /// The ICMP answer of the last [`Verdict::Reply`].
    pub fn reply(&self, len: usize) -> &[u8] {
        &self.reply[..len]
    }

    /// A packet a [`process`](Self::process) call made besides the one it
    /// translated (a PROXY header segment toward the backend), once; the
    /// caller takes it before the next call (`handle` always does).
    pub fn take_extra(&mut self) -> Option<(Egress, &[u8])> {
        self.extra.take().map(|x| (x.to, &self.reply[..x.len]))
    }

    /// Translates `buf` in place and says what to do with it. The packet is
    /// `buf[..wire::packet_len(buf)]` (bytes past an IPv4 header's total
    /// length are trimmed, as Linux's input path does) both before and after.
    #[inline]
    pub fn process(&mut self, buf: &mut [u8], src: Source, now: Now) -> Verdict {
        self.process_offload(buf, src, now, Offload::default())
    }

    /// As [`process`](Self::process) for a packet read from a device with
    /// offloads: `off` says whether its L4 checksum is partial and whether it
    /// is a GSO super-packet, which is translated once for all its segments.
    ///
    /// A packet translated between IPv4 and IPv6 changes length: one from
    /// IPv4 to IPv6 grows into the bytes of `buf` past the packet
    /// ([`GROWTH`](crate::wire::nat64::GROWTH) of them are needed; without
    /// them it is dropped as `too_big`), and the result is again
    /// `buf[..wire::packet_len(buf)]`.
    #[inline]
    pub fn process_offload(&mut self, buf: &mut [u8], src: Source, now: Now, off: Offload) -> Verdict {
        let n = crate::wire::packet_len(buf);
        self.run(buf, n, src, now, off)
    }

    /// [`process_offload`](Self::process_offload) of the packet read into
    /// `buf[..read]` (trimmed as there), with the rest of `buf` as room to
    /// grow into (a translation to IPv6, [`GROWTH`](crate::wire::nat64::GROWTH)
    /// bytes): what the daemon's read buffer gives, for tests and fuzzing.
    pub fn process_read(&mut self, buf: &mut [u8], read: usize, src: Source, now: Now, off: Offload) -> Verdict {
        let n = crate::wire::packet_len(&buf[..read.min(buf.len())]);
        self.run(buf, n, src, now, off)
    }

    /// [`process_offload`](Self::process_offload) of the packet
    /// `buf[..n]`, growing into the rest of `buf` if it must.
    #[inline]
    fn run(&mut self, buf: &mut [u8], n: usize, src: Source, now: Now, off: Offload) -> Verdict {
        let mut cx = self.ctx(now, off);
        cx.frags.tick(now);
        let dir = match src {
            Source::Network(n) => Dir::In(n),
            Source::Provider => Dir::Out,
        };
        let v = cx.translate(buf, n, dir);
        // Reassemblies given up on in this tick, every one of them (a
        // fragment flood can expire many at once).
        let Ctx { engine, snap, w, frags, .. } = &mut cx;
        frags.take_dropped(now, |net, count| {
            let dir = if net == u16::MAX { Dir::Out } else { Dir::In(NetworkId(net)) };
            count_drop(engine, snap, *w, dir, DropReason::ReassemblyTimeout, count);
        });
        v
    }

    #[inline(always)]
    fn ctx(&mut self, now: Now, off: Offload) -> Ctx<'_> {
        let Worker { engine, index, cache, reply, extra, icmp, frags } = self;
        let snap: &Snapshot = cache.load();
        Ctx { engine, w: *index, snap, reply, extra, icmp, frags, now, off }
    }

    /// True when held fragments were released and wait for
    /// [`take_ready`](Self::take_ready).
    #[inline]
    pub fn has_ready(&self) -> bool {
        self.frags.has_ready()
    }

    /// Translates each released fragment (held because it came before its
    /// datagram's first fragment) and hands it to `f` with its egress and
    /// that egress's MTU. A fragment that may not leave (its endpoint no
    /// longer approved, its TTL spent) is counted as a drop instead.
    pub fn take_ready(&mut self, mut f: impl FnMut(Egress, u16, &[u8])) {
        let Worker { engine, index, cache, frags, .. } = self;
        let snap: &Snapshot = cache.load();
        frags.v4.take_ready(|net, m, bytes| {
            if release(engine, snap, *index, net, m, bytes) {
                f(m.egress, m.mtu, bytes);
            }
        });
        if let Some(v6) = frags.v6_if_used() {
            v6.take_ready(|net, m, bytes| match release6(engine, snap, *index, net, m, bytes) {
                0 => {}
                n => f(m.egress, m.mtu, &bytes[..n]),
            });
        }
    }

    /// Translates the packet the daemon just read into
    /// [`Outbox::read_buf`] (`len` bytes, virtio-net header first when the
    /// outbox has one) and queues every write it leads to: the packet
    /// itself (staged for coalescing when small), an ICMP answer, its
    /// fragments, fragments it released. Then the daemon drains the outbox.
    /// Returns the packet's verdict, already acted on (the daemon needs
    /// nothing from it; tests read it): counted, except a read shorter
    /// than the virtio-net header, which is `Drop(Malformed)` uncounted.
    pub fn handle(&mut self, out: &mut Outbox, len: usize, src: Source, now: Now) -> Verdict {
        let hdr = out.header_len();
        if len < hdr {
            return Verdict::Drop(DropReason::Malformed);
        }
        let (head, pkt) = out.read_parts(len);
        let off = if hdr > 0 { parse_vnet_hdr(head) } else { Offload::default() };
        let (n, version) = (crate::wire::packet_len(&pkt[..len - hdr]), pkt.first().map(|b| b >> 4));
        let verdict = self.run(pkt, n, src, now, off);
        // What leaves is the packet its IP header describes: trailing bytes
        // trimmed, a stripped payload gone, a translated one shorter or
        // longer.
        let (_, pkt) = out.read_parts(len);
        let (len, now_version) = (hdr + crate::wire::packet_len(pkt), pkt.first().map(|b| b >> 4));
        if version != now_version {
            out.retarget_vnet_hdr(now_version == Some(6));
        }
        out.clear_data_valid();
        let extra = self.extra.take();
        let first = extra.filter(|x| x.before);
        if let Some(x) = first {
            out.write_made(x.to, &self.reply[..x.len]);
        }
        match verdict {
            // Not staged behind a packet that must precede it: a staged
            // group already queued would carry it ahead of that packet.
            Verdict::Forward(to) if hdr > 0 && off.gso_size == 0 && len - hdr <= STAGE_MAX && first.is_none() => {
                out.stage_read(to, len, off.csum_partial)
            }
            Verdict::Forward(to) => out.write_read(to, len),
            Verdict::Fragment { to, mtu } => out.fragment_read(to, len, mtu, off.csum_partial),
            Verdict::Reply { len, .. } => {
                let back = match src {
                    Source::Network(n) => Egress::Network(n),
                    Source::Provider => Egress::Provider,
                };
                out.write_made(back, &self.reply[..len]);
            }
            Verdict::Drop(_) | Verdict::Held => {}
        }
        if let Some(x) = extra.filter(|x| !x.before) {
            out.write_made(x.to, &self.reply[..x.len]);
        }
        // Fragments held for a first fragment that just came, whatever
        // became of that first fragment (staged or written).
        if self.has_ready() {
            self.take_ready(|to, mtu, bytes| out.write_fragments(to, bytes, mtu));
        }
        verdict
    }

    /// Queues, on this worker's outbox toward the provider, the PROXY
    /// header segments the control thread found waiting
    /// ([`Engine::queue_proxy_resends`]), for flows that still wait; call
    /// it between read batches. Returns how many were queued. Costs one
    /// atomic load when there are none.
    pub fn send_resends(&mut self, out: &mut Outbox) -> usize {
        let Worker { engine, cache, reply, .. } = self;
        if engine.resends.is_empty() && engine.resends6.is_empty() {
            return 0;
        }
        let snap: &Snapshot = cache.load();
        let mut n = 0;
        while let Some(v) = engine.resends.pop() {
            n += resend(&engine.flows, snap, v, reply, out);
        }
        if let Some(t) = engine.flows6() {
            while let Some(v) = engine.resends6.pop() {
                n += resend(t, snap, v, reply, out);
            }
        }
        n
    }

    /// Ends a read batch: queues every staged packet.
    pub fn end_batch(&mut self, out: &mut Outbox) {
        out.flush_all();
    }
}

/// Queues the PROXY header segment of flow `v` of table `flows` once more,
/// if it is still live and still waiting (the view the scan took may be
/// old); returns 1 when it did.
fn resend<F: crate::addr::Family>(
    flows: &crate::flow::FlowTable<F>,
    snap: &Snapshot,
    v: crate::flow::FlowView<F>,
    reply: &mut [u8],
    out: &mut Outbox,
) -> usize {
    let Some(r) = flows.record_at(v.slot, v.generation()) else { return 0 };
    let Some(ep) = snap.endpoint_by_id(r.view.endpoint) else { return 0 };
    let Some(tlv) = ep.proxy.filter(|_| crate::proxy::wants_resend(&r.view)) else { return 0 };
    let len = crate::proxy::segment(flows, &r.view, ep.link_id, tlv, reply);
    if len == 0 {
        return 0;
    }
    out.write_made(Egress::Provider, &reply[..len]);
    1
}
