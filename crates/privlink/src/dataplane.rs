//! The packet threads. Each worker owns queue `w` of every TUN device and
//! loops: `poll(2)` on its queues, then for each readable queue read up to a
//! batch of packets into its [`Outbox`], hand each to its
//! [`privlink_core::Worker`], and perform the writes the outbox then holds.
//! The core decides every write (staging, coalescing, fragments, ICMP
//! answers, released fragments); this loop is system calls only. The clock
//! is read once per poll.
//!
//! With offloads (the default) every read and write starts with a
//! virtio-net header; staged small packets go out through tun-rs's
//! `send_multiple`, which coalesces packets of one flow into one GSO write
//! (userspace GRO, as wireguard-go does). Per packet, then, one read and at
//! most one write.
//!
//! Adaptive busy polling (`[dataplane] busy_poll`): for that long after a
//! packet a worker polls without sleeping (yielding the core between
//! empty polls), so the answer to a request it just forwarded finds it
//! awake: on a virtual machine the wake-up, not the translation, is most
//! of a round trip through privlink (docs/BENCHMARKS.md, "Latency").
//!
//! The set of devices can change on reload: workers pick up a new
//! [`DeviceSet`] through an `arc_swap::Cache` between batches, and the poll
//! timeout bounds how long an idle worker takes to notice (and to stop).

use crate::device::Device;
use arc_swap::{ArcSwap, Cache};
use privlink_core::{Egress, Engine, NetworkId, Now, Out, Outbox, Source};
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

pub use privlink_core::outbox::VNET_HDR_LEN;

/// When this process's `run` began: the first packet a worker forwards is
/// logged against it (how long a restart or hand-over leaves traffic to
/// the other daemon or to the kernel's queues).
pub static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The engine's clock: whole seconds since the daemon's `epoch`.
pub fn now_since(epoch: Instant) -> Now {
    Now(u32::try_from(epoch.elapsed().as_secs()).unwrap_or(u32::MAX))
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
    fn egress(&self, to: Egress) -> Option<&Arc<Device>> {
        match to {
            Egress::Provider => self.provider.as_ref(),
            Egress::Network(id) => self.networks.get(usize::from(id.0)).and_then(Option::as_ref),
        }
    }

    /// Every device with where its packets come from.
    fn sources(&self) -> impl Iterator<Item = (Source, &Arc<Device>)> {
        let p = self.provider.iter().map(|d| (Source::Provider, d));
        let n = self
            .networks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((Source::Network(NetworkId(i as u16)), d.as_ref()?)));
        p.chain(n)
    }
}

/// Write failures per worker (rare: a device going away mid-reload), and
/// devices lost under the daemon.
#[derive(Debug, Default)]
pub struct IoErrors {
    pub writes: AtomicU64,
    /// Times each device (by name) was found gone. Written only when that
    /// happens, never per packet.
    pub devices_lost: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl IoErrors {
    /// Marks `dev` lost; logs and counts it once, whichever worker saw it
    /// first.
    fn lose(&self, dev: &Device, why: &str) {
        if !dev.lost.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                device = %dev.name,
                netns = dev.netns.as_deref().unwrap_or("-"),
                "device lost ({why}): its queues are no longer polled; recreating it"
            );
            let mut m = self.devices_lost.lock().unwrap_or_else(|e| e.into_inner());
            *m.entry(dev.name.clone()).or_default() += 1;
        }
    }
}

/// Running packet threads.
#[derive(Debug)]
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub errors: Arc<IoErrors>,
}

impl Dataplane {
    /// Starts one worker per `engine`'s worker slot; each keeps polling
    /// without sleeping for `busy_poll` after its last packet.
    pub fn start(
        engine: &Arc<Engine>,
        devices: &Arc<ArcSwap<DeviceSet>>,
        epoch: Instant,
        busy_poll: std::time::Duration,
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
                    .spawn(move || run_worker(worker, devices, stop, errors, epoch, busy_poll))?,
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
    busy_poll: std::time::Duration,
) {
    let w = worker.index();
    // Adaptive busy polling: while a packet came within `busy_poll`, poll
    // without sleeping; then sleep in poll(2) again.
    let mut last_packet: Option<Instant> = None;
    let mut cache = Cache::new(devices);
    let mut set: Arc<DeviceSet> = cache.load().clone();
    let mut out = Outbox::new(set.vnet_hdr);
    let mut gro = GROTable::new();
    let mut polled = Polled::new(&set, w);
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if !Arc::ptr_eq(cache.load(), &set) {
            set = cache.load().clone();
            polled = Polled::new(&set, w);
        }
        let spinning = last_packet.is_some_and(|t| t.elapsed() < busy_poll);
        let ready = polled.wait(if spinning { 0 } else { POLL_MS });
        // What the control thread asked to send (PROXY headers again)
        // leaves through this worker's outbox too.
        if worker.send_resends(&mut out) > 0 {
            out.drain(|o| write(&set, w, o, &mut gro, &errors));
        }
        if !ready {
            if spinning {
                // A hint that anything else runnable on this core (the
                // clients and servers of the traffic, on a small host)
                // may go first.
                // SAFETY: no arguments; always succeeds on Linux.
                unsafe { libc::sched_yield() };
            } else {
                last_packet = None;
            }
            continue;
        }
        let now = now_since(epoch);
        let mut got = false;
        for i in 0..polled.fds.len() {
            if !polled.readable(i, &errors) {
                continue;
            }
            let (src, dev) = (polled.srcs[i].0, polled.srcs[i].1.clone());
            for _ in 0..BATCH {
                match dev.queue(w).recv(out.read_buf()) {
                    Ok(len) => {
                        got = true;
                        if first {
                            first = false;
                            let ms = STARTED.get().map_or(0, |t| t.elapsed().as_millis() as u64);
                            tracing::info!(worker = w, since_start_ms = ms, "first packet");
                        }
                        worker.handle(&mut out, len, src, now);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => break,
                    Err(e) => {
                        polled.lose(i, &errors, &e.to_string());
                        break;
                    }
                }
                out.drain(|o| write(&set, w, o, &mut gro, &errors));
            }
            worker.end_batch(&mut out);
            out.drain(|o| write(&set, w, o, &mut gro, &errors));
        }
        if got && !busy_poll.is_zero() {
            last_packet = Some(Instant::now());
        }
    }
}

/// The queues a worker polls, with where their packets come from.
struct Polled {
    fds: Vec<libc::pollfd>,
    srcs: Vec<(Source, Arc<Device>)>,
}

impl Polled {
    fn new(set: &DeviceSet, w: usize) -> Polled {
        let srcs: Vec<(Source, Arc<Device>)> = set.sources().map(|(s, d)| (s, d.clone())).collect();
        let fds = srcs.iter().map(|(_, d)| libc::pollfd { fd: d.fd(w), events: libc::POLLIN, revents: 0 }).collect();
        Polled { fds, srcs }
    }

    /// `poll(2)` for at most `timeout_ms` (0: does not sleep); whether any
    /// queue is ready.
    fn wait(&mut self, timeout_ms: i32) -> bool {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
        unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, timeout_ms) > 0 }
    }

    /// Whether queue `i` has packets; a queue reporting an error (its
    /// device deleted) is marked lost instead.
    fn readable(&mut self, i: usize, errors: &IoErrors) -> bool {
        let r = self.fds[i].revents;
        if r & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            self.lose(i, errors, "poll error");
            return false;
        }
        r != 0
    }

    /// Stops polling queue `i` (poll(2) skips negative descriptors) and
    /// reports its device lost.
    fn lose(&mut self, i: usize, errors: &IoErrors, why: &str) {
        self.fds[i].fd = -1;
        errors.lose(&self.srcs[i].1, why);
    }
}

/// Performs one write the core queued: one system call.
fn write(set: &DeviceSet, w: usize, o: Out<'_>, gro: &mut GROTable, errors: &IoErrors) {
    let r = match o {
        Out::Write { to, bytes } => set.egress(to).map(|d| d.queue(w).send(bytes).map(drop)),
        Out::Coalesce { to, bufs } => {
            set.egress(to).map(|d| d.queue(w).send_multiple(gro, bufs, VNET_HDR_LEN).map(drop))
        }
    };
    if let Some(Err(_)) = r {
        errors.writes.fetch_add(1, Ordering::Relaxed);
    }
}
