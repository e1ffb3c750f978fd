//! Criterion benches of the in-memory packet path (no I/O):
//! established translation both ways at 1k and 1M flows (on the heap, and
//! at 1M also in a shared memory mapping as the daemon keeps its table),
//! established TCP both ways at 1k flows (data segments with advancing
//! sequence numbers, which TCP tracking follows), new flow setup plus
//! teardown, and NAT port allocate plus free; and IPv6 beside them:
//! established UDP at 1k flows from IPv6 consumers to an IPv6 service and
//! to an IPv4 one (translated both ways), new IPv6 flow setup plus
//! teardown. Run:
//! `cargo bench -p privlink-core --bench packet_path`.

#[path = "common.rs"]
mod common;

use common::{consumer, consumer6, desired, desired6, ends, ends6, tcp, udp6, EP, EP6};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use privlink_core::pool::PortPool;
use privlink_core::*;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A 64-byte UDP packet (20 IP + 8 UDP + 36 payload) with valid checksums.
fn udp(src: u32, sport: u16, dst: u32, dport: u16) -> [u8; 64] {
    let mut p = [0u8; 64];
    p[..20].copy_from_slice(&[0x45, 0, 0, 64, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&44u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(56);
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 17, 0, 44]);
    pseudo.extend_from_slice(&p[20..]);
    let c = checksum::checksum(&pseudo);
    p[26..28].copy_from_slice(&c.to_be_bytes());
    p
}

/// An engine holding `n` UDP flows, and for each flow the packet in each
/// direction.
/// Packets of each flow in one direction.
type Packets = Vec<[u8; 64]>;

/// Shared memory as the daemon maps its flow table (`MAP_SHARED` of a tmpfs
/// file; here a memfd, which is the same shmem underneath).
#[derive(Debug)]
struct Shm {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: plain shared memory used through the table's atomics.
unsafe impl Send for Shm {}
// SAFETY: as above.
unsafe impl Sync for Shm {}
// SAFETY: mapped for `len` bytes until dropped (never, in a bench).
unsafe impl flow::Region for Shm {
    fn base(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

fn shm(len: usize) -> Arc<dyn flow::Region> {
    // SAFETY: plain system calls on a descriptor made here; the mapping
    // stays valid after the descriptor closes.
    unsafe {
        let fd = libc::memfd_create(c"privlink-bench".as_ptr(), 0);
        assert!(fd >= 0 && libc::ftruncate(fd, len as libc::off_t) == 0, "memfd");
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert!(p != libc::MAP_FAILED, "mmap");
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        libc::close(fd);
        Arc::new(Shm { ptr: p as *mut u8, len })
    }
}

fn populated_in(n: u32, shared: bool) -> (Arc<Engine>, Worker, Packets, Packets) {
    let settings = Settings { max_flows: n + 1024, ..Settings::default() };
    let e = if shared {
        let region = shm(flow::Layout::new(settings.max_flows, flow::REUSE_DELAY).bytes());
        let t = flow::FlowTable::create_in(region, settings.max_flows).expect("region");
        Engine::with_flows(settings, t)
    } else {
        Engine::new(settings)
    };
    e.apply(&desired(Protocol::Udp), Now(0)).expect("config");
    let mut w = e.worker(0);
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (addr, port) = consumer(i);
        let up = udp(addr, port, EP, 53);
        let mut p = up;
        assert_eq!(w.process(&mut p, Source::Network(NetworkId(0)), Now(0)), Verdict::Forward(Egress::Provider));
        // The backend's answer: the translated packet mirrored.
        let (nat, backend) =
            (u32::from_be_bytes([p[12], p[13], p[14], p[15]]), u32::from_be_bytes([p[16], p[17], p[18], p[19]]));
        let nport = u16::from_be_bytes([p[20], p[21]]);
        ups.push(up);
        downs.push(udp(backend, 53, nat, nport));
    }
    (e, w, ups, downs)
}

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(2));
    for (n, shared) in [(1_000u32, false), (1_000_000, false), (1_000_000, true)] {
        let (_e, mut w, ups, downs) = populated_in(n, shared);
        // Visit flows in a scattered order so the 1M case misses the flow
        // table's cache lines as real traffic would. The packets themselves
        // are laid out in visiting order: a real packet arrives in a buffer
        // the kernel just wrote, so it is in cache.
        let order: Vec<usize> = (0..n as usize).map(|i| (i * 7_919) % n as usize).collect();
        let ups: Vec<[u8; 64]> = order.iter().map(|&i| ups[i]).collect();
        let downs: Vec<[u8; 64]> = order.iter().map(|&i| downs[i]).collect();
        let name = if shared { "both_directions_shared" } else { "both_directions" };
        g.bench_function(BenchmarkId::new(name, n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = if i + 1 == ups.len() { 0 } else { i + 1 };
                let mut up = ups[i];
                let v1 = w.process(&mut up, Source::Network(NetworkId(0)), Now(1));
                let mut down = downs[i];
                let v2 = w.process(&mut down, Source::Provider, Now(1));
                black_box((v1, v2, up, down))
            })
        });
    }
    g.finish();
}

fn established_tcp(c: &mut Criterion) {
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(2));
    let n = 1_000u32;
    let d = desired(Protocol::Tcp);
    let e = Engine::new(Settings { max_flows: n + 1024, ..Settings::default() });
    e.apply(&d, Now(0)).expect("config");
    let mut w = e.worker(0);
    let a = Source::Network(NetworkId(0));
    let mut flows = Vec::new();
    for i in 0..n {
        let (addr, port) = consumer(i);
        let mut t = tcp(addr, port, EP, 53, 1000, 0, "S", 0);
        assert_eq!(w.process(&mut t, a, Now(0)), Verdict::Forward(Egress::Provider));
        let (nat, np, be, bp) = ends(&t);
        w.process(&mut tcp(be, bp, nat, np, 5000, 1001, "SA", 0), Source::Provider, Now(0));
        w.process(&mut tcp(addr, port, EP, 53, 1001, 5001, "A", 0), a, Now(0));
        flows.push((addr, port, nat, np, be, bp));
    }
    // 16 rounds of one 10-byte segment each way per flow, scattered.
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for r in 0..16u32 {
        for i in (0..n as usize).map(|i| (i * 7_919) % n as usize) {
            let (addr, port, nat, np, be, bp) = flows[i];
            ups.push(tcp(addr, port, EP, 53, 1001 + r * 10, 5001 + r * 10, "A", 10));
            downs.push(tcp(be, bp, nat, np, 5001 + r * 10, 1011 + r * 10, "A", 10));
        }
    }
    g.bench_function(BenchmarkId::new("tcp_both_directions", n), |b| {
        let mut i = 0usize;
        let mut buf = [0u8; 64];
        b.iter(|| {
            i = if i + 1 == ups.len() { 0 } else { i + 1 };
            let k = ups[i].len();
            buf[..k].copy_from_slice(&ups[i]);
            let v1 = w.process(&mut buf[..k], a, Now(1));
            let k = downs[i].len();
            buf[..k].copy_from_slice(&downs[i]);
            let v2 = w.process(&mut buf[..k], Source::Provider, Now(1));
            black_box((v1, v2, buf))
        })
    });
    g.finish();
}

fn setup_teardown(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow");
    const BATCH: u32 = 10_000;
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    let e = Engine::new(Settings { max_flows: 2 * BATCH, ..Settings::default() });
    e.apply(&desired(Protocol::Udp), Now(0)).expect("config");
    let mut w = e.worker(0);
    let packets: Vec<[u8; 64]> = (0..BATCH)
        .map(|i| {
            let (addr, port) = consumer(i);
            udp(addr, port, EP, 53)
        })
        .collect();
    let mut round = 1u32;
    g.bench_function("setup_plus_teardown_x10000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Each round is far enough from the last that quarantined
                // ports are back.
                let now = Now(round * 1_000);
                round += 1;
                let t = Instant::now();
                for p in &packets {
                    let mut p = *p;
                    black_box(w.process(&mut p, Source::Network(NetworkId(0)), now));
                }
                let ended = e.expire(now.plus(500));
                total += t.elapsed();
                assert_eq!(ended, BATCH as usize);
            }
            total
        })
    });
    g.finish();
}

/// Established UDP both ways at 1k flows from IPv6 consumers: to an IPv6
/// service (`udp6_both_directions`) and to an IPv4 one, translated
/// (`udp64_both_directions`: the datagrams leave as IPv4 and come back
/// as IPv6, each with room behind it as the daemon's read buffer has).
fn established6(c: &mut Criterion) {
    let mut g = c.benchmark_group("established6");
    g.throughput(Throughput::Elements(2));
    let n = 1000u32;
    for translated in [false, true] {
        let e = Engine::new(Settings { max_flows: n + 1024, ..Settings::default() });
        let d = if translated {
            let mut d = desired(Protocol::Udp);
            d.endpoints[0].ip = std::net::Ipv6Addr::from(EP6).into();
            d
        } else {
            desired6(Protocol::Udp)
        };
        e.apply(&d, Now(0)).expect("config");
        let mut w = e.worker(0);
        let a = Source::Network(NetworkId(0));
        let (mut ups, mut downs) = (Vec::new(), Vec::new());
        for i in (0..n).map(|i| (i * 7_919) % n) {
            let (addr, port) = consumer6(i);
            let up = udp6(addr, port, EP6, 53, 36);
            let mut t = up.clone();
            t.resize(t.len() + 48, 0);
            w.process(&mut t, a, Now(0));
            let down = if translated {
                let (nat, np, be, bp) = ends(&t);
                udp(be, bp, nat, np).to_vec()
            } else {
                let (nat, np, be, bp) = ends6(&t);
                udp6(be, bp, nat, np, 36)
            };
            ups.push(up);
            downs.push(down);
        }
        let name = if translated { "udp64_both_directions" } else { "udp6_both_directions" };
        g.bench_function(BenchmarkId::new(name, n), |b| {
            let mut i = 0usize;
            let mut buf = [0u8; 160];
            b.iter(|| {
                i = if i + 1 == ups.len() { 0 } else { i + 1 };
                let k = ups[i].len();
                buf[..k].copy_from_slice(&ups[i]);
                let v1 = w.process_read(&mut buf, k, a, Now(1), Offload::default());
                let k = downs[i].len();
                buf[..k].copy_from_slice(&downs[i]);
                let v2 = w.process_read(&mut buf, k, Source::Provider, Now(1), Offload::default());
                black_box((v1, v2, buf))
            })
        });
    }
    g.finish();
}

/// [`setup_teardown`] for IPv6 consumers of an IPv6 service.
fn setup_teardown6(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow6");
    const BATCH: u32 = 10_000;
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    let e = Engine::new(Settings { max_flows: 2 * BATCH, ..Settings::default() });
    e.apply(&desired6(Protocol::Udp), Now(0)).expect("config");
    let mut w = e.worker(0);
    let packets: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| {
            let (addr, port) = consumer6(i);
            udp6(addr, port, EP6, 53, 36)
        })
        .collect();
    let mut round = 1u32;
    g.bench_function("setup_plus_teardown_x10000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let now = Now(round * 1_000);
                round += 1;
                let t = Instant::now();
                let mut buf = [0u8; 128];
                for p in &packets {
                    buf[..p.len()].copy_from_slice(p);
                    black_box(w.process(&mut buf[..p.len()], Source::Network(NetworkId(0)), now));
                }
                let ended = e.expire(now.plus(500));
                total += t.elapsed();
                assert_eq!(ended, BATCH as usize);
            }
            total
        })
    });
    g.finish();
}

fn ports(c: &mut Criterion) {
    let mut g = c.benchmark_group("ports");
    g.throughput(Throughput::Elements(1));
    let pool = PortPool::new(1024..=65535, 1);
    g.bench_function("allocate_plus_free", |b| {
        b.iter(|| {
            let p = pool.allocate(Now(0), |_| true).expect("port");
            pool.free(black_box(p), Now(0), true);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = established, established_tcp, setup_teardown, ports, established6, setup_teardown6
}
criterion_main!(benches);
