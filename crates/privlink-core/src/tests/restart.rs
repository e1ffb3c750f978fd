use super::*;

/// A zeroed, page-aligned heap region standing in for a shared mapping
/// (what the core sees of one; the daemon's tests use real files).
#[derive(Debug)]
struct TestRegion {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the memory is only used through the flow tables' atomics.
unsafe impl Send for TestRegion {}
// SAFETY: as above.
unsafe impl Sync for TestRegion {}
impl TestRegion {
    fn new(len: usize) -> Arc<TestRegion> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Arc::new(TestRegion { ptr, len })
    }
    /// Rewrites byte `at` (as a crash or another program might).
    fn poke(&self, at: usize, f: impl Fn(u8) -> u8) {
        assert!(at < self.len);
        // SAFETY: inside the allocation; no table writes while a test edits it.
        unsafe { *self.ptr.add(at) = f(*self.ptr.add(at)) };
    }
}
impl Drop for TestRegion {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
// SAFETY: the allocation lives as long as the value.
unsafe impl flow::Region for TestRegion {
    fn base(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

fn region_for(s: &Settings) -> Arc<TestRegion> {
    TestRegion::new(flow::Layout::new(s.max_flows, flow::REUSE_DELAY).bytes())
}

/// An engine on `r`'s table: a new one, or the one found there.
fn engine_on(r: &Arc<TestRegion>, mode: Option<flow::AttachMode>, ids: &Ids) -> (Arc<Engine>, flow::Attached) {
    let region: Arc<dyn flow::Region> = r.clone();
    let (t, found) = match mode {
        None => (flow::FlowTable::create_in(region, small().max_flows).expect("fresh"), flow::Attached::default()),
        Some(m) => flow::FlowTable::attach(region, small().max_flows, m).expect("attaches"),
    };
    let e = Engine::with_flows(small(), t);
    e.seed_ids(ids);
    e.apply(&desired(1024..=1100, ConnectionState::Approved), Now(5)).expect("valid");
    (e, found)
}

/// Opens 20 TCP flows (SYN out, SYN-ACK back) and returns each flow's NAT port.
fn open_flows(w: &mut Worker) -> Vec<u16> {
    let mut ports = Vec::new();
    for i in 0..20 {
        let mut p = tcp(CLIENT, 41000 + i, EP, 80, "S", b"");
        assert_eq!(step(w, &mut p, Source::Network(NET_A), Now(5)), Verdict::Forward(Egress::Provider));
        ports.push(inspect(&p).1);
    }
    ports
}

/// Whether consumer port `41000 + i` still maps to NAT port `port`, both ways.
fn still_mapped(w: &mut Worker, i: u16, port: u16) -> bool {
    let mut p = tcp(CLIENT, 41000 + i, EP, 80, "A", b"x");
    let out = step(w, &mut p, Source::Network(NET_A), Now(6)) == Verdict::Forward(Egress::Provider);
    let mut r = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), port, "A", b"y");
    let back = step(w, &mut r, Source::Provider, Now(6)) == Verdict::Forward(Egress::Network(NET_A));
    out && inspect(&p).1 == port && back && inspect(&r).3 == 41000 + i
}

/// An engine on `r` that opens 20 TCP flows ([`open_flows`]) and dies:
/// nothing of it runs again, its memory stays. Returns the flows' NAT
/// ports, the ids it gave out and the NAT ports its pools had left.
fn crash_with_flows(r: &Arc<TestRegion>) -> (Vec<u16>, Ids, u32) {
    let (old, _) = engine_on(r, None, &Ids::default());
    let mut w = old.worker(0);
    let ports = open_flows(&mut w);
    let ids = old.ids();
    let avail = old.snapshot().pools.values().map(|p| p.pool.available()).sum::<u32>();
    std::mem::forget(w);
    std::mem::forget(old);
    (ports, ids, avail)
}

#[test]
fn a_crashed_engines_flows_go_on_in_the_next_one_with_their_ports() {
    let r = region_for(&small());
    let (ports, ids, avail) = crash_with_flows(&r);

    let (new, found) = engine_on(&r, Some(flow::AttachMode::Recover), &ids);
    assert_eq!(found, flow::Attached { flows: 20, torn: 0 });
    assert_eq!(new.adopt_flows(Now(6)), Adopted { flows: 20, ended: 0 });
    let mut w = new.worker(0);
    for (i, &port) in ports.iter().enumerate() {
        assert!(still_mapped(&mut w, i as u16, port), "flow {i} carried on");
    }
    let now_avail = new.snapshot().pools.values().map(|p| p.pool.available()).sum::<u32>();
    assert_eq!(now_avail, avail, "the adopted ports are in use");
    // A new flow never takes a port a carried-on flow holds.
    let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(6)), Verdict::Forward(Egress::Provider));
    assert!(!ports.contains(&inspect(&p).1));
    assert_eq!(new.flows().len(), 21);
}

#[test]
fn a_slot_cut_short_by_a_crash_is_never_forwarded() {
    let r = region_for(&small());
    let (ports, ids, _) = crash_with_flows(&r);
    // Flow 0 sits in slot 0; change its provider key as a torn write would
    // leave it (the NAT port's bytes, which the check covers).
    let slot0 = flow::HEADER_BYTES;
    r.poke(slot0 + 16 + 8 + 6, |b| b ^ 0x5a);
    let (new, found) = engine_on(&r, Some(flow::AttachMode::Recover), &ids);
    assert_eq!(found, flow::Attached { flows: 19, torn: 1 });
    new.adopt_flows(Now(6));
    let mut w = new.worker(0);
    let mut p = tcp(CLIENT, 41000, EP, 80, "A", b"x");
    assert_eq!(step(&mut w, &mut p, Source::Network(NET_A), Now(6)), Verdict::Drop(DropReason::NoFlow));
    for (i, &port) in ports.iter().enumerate().skip(1) {
        assert!(still_mapped(&mut w, i as u16, port));
    }
}

/// Rewrites `r`'s header as `f` makes it from the current one.
fn rewrite_header(r: &TestRegion, f: impl Fn(flow::Header) -> flow::Header) {
    // SAFETY: the region starts with a header page; no table writes the
    // header after creating it.
    unsafe {
        let h = std::ptr::read_volatile(r.ptr as *const flow::Header);
        std::ptr::write_volatile(r.ptr as *mut flow::Header, f(h));
    }
}

#[test]
fn a_format_3_region_is_taken_over_and_another_family_or_format_is_refused() {
    let s = small();
    let r = region_for(&s);
    let (ports, ids, _) = crash_with_flows(&r);
    let region: Arc<dyn flow::Region> = r.clone();
    // The header says which family the table holds.
    let err = flow::FlowTable::<flow::V6>::attach(region.clone(), s.max_flows, flow::AttachMode::Recover).err();
    assert_eq!(err, Some(flow::AttachError::Family { have: 4, want: 6 }));
    // What the build before wrote: format 3, no family (IPv4 only), the
    // same slots.
    let l = flow::Layout::new(s.max_flows, flow::REUSE_DELAY);
    rewrite_header(&r, |h| l.header_ipv4_only(h.keys));
    let err = flow::FlowTable::<flow::V6>::attach(region.clone(), s.max_flows, flow::AttachMode::Recover).err();
    assert_eq!(err, Some(flow::AttachError::Version(3)), "format 3 held no IPv6 table");
    let (new, found) = engine_on(&r, Some(flow::AttachMode::Recover), &ids);
    assert_eq!(found, flow::Attached { flows: 20, torn: 0 });
    assert_eq!(new.adopt_flows(Now(6)), Adopted { flows: 20, ended: 0 });
    let mut w = new.worker(0);
    for (i, &port) in ports.iter().enumerate() {
        assert!(still_mapped(&mut w, i as u16, port), "flow {i} carried on from format 3");
    }
    // Older formats are refused with their number.
    rewrite_header(&r, |mut h| {
        h.version = 2;
        h.check = h.sum();
        h
    });
    let err = <flow::FlowTable>::attach(region, s.max_flows, flow::AttachMode::Recover).err();
    assert_eq!(err, Some(flow::AttachError::Version(2)));
    assert_eq!(err.map(|e| e.to_string()).as_deref(), Some("flow table format 2, this build reads 4 (and 3 for IPv4)"));
}

#[test]
fn a_region_that_is_not_this_table_is_refused() {
    let s = small();
    let r = region_for(&s);
    let region: Arc<dyn flow::Region> = r.clone();
    let err = <flow::FlowTable>::attach(region.clone(), s.max_flows, flow::AttachMode::Recover).err();
    assert_eq!(err, Some(flow::AttachError::NotATable), "zeroes");
    drop(<flow::FlowTable>::create_in(region.clone(), s.max_flows).expect("fresh"));
    let err = <flow::FlowTable>::attach(region.clone(), s.max_flows / 2, flow::AttachMode::Recover).err();
    assert!(matches!(err, Some(flow::AttachError::Layout { .. })), "{err:?}");
    for i in 0..64 {
        r.poke(i, |_| (i as u8).wrapping_mul(151));
    }
    let err = <flow::FlowTable>::attach(region, s.max_flows, flow::AttachMode::Recover).err();
    assert_eq!(err, Some(flow::AttachError::NotATable), "garbage");
}

#[test]
fn during_a_hand_over_both_engines_forward_and_only_the_new_one_creates() {
    let r = region_for(&small());
    let (old, _) = engine_on(&r, None, &Ids::default());
    let mut wo = old.worker(0);
    let ports = open_flows(&mut wo);
    old.flows().freeze();
    let (new, found) = engine_on(&r, Some(flow::AttachMode::Share), &old.ids());
    assert_eq!(found.flows, 20);
    new.adopt_flows(Now(6));
    let mut wn = new.worker(0);
    for (i, &port) in ports.iter().enumerate() {
        assert!(still_mapped(&mut wo, i as u16, port), "old still forwards flow {i}");
        assert!(still_mapped(&mut wn, i as u16, port), "new forwards flow {i}");
    }
    let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
    assert_eq!(step(&mut wo, &mut p, Source::Network(NET_A), Now(6)), Verdict::Drop(DropReason::FlowTableFull));
    assert_eq!(old.expire(Now(100_000)), 0, "a frozen engine ends nothing");
    let mut p = tcp(CLIENT, 50000, EP, 80, "S", b"");
    assert_eq!(step(&mut wn, &mut p, Source::Network(NET_A), Now(6)), Verdict::Forward(Egress::Provider));
    let port = inspect(&p).1;
    assert!(!ports.contains(&port));
    // The old one sees the new one's flow too (one table).
    let mut r2 = tcp(BACKEND_A.octets(), 8080, NAT_A.octets(), port, "SA", b"");
    assert_eq!(step(&mut wo, &mut r2, Source::Provider, Now(6)), Verdict::Forward(Egress::Network(NET_A)));
}

#[test]
fn a_restart_with_an_endpoint_removed_ends_its_flows_and_keeps_the_rest() {
    let r = region_for(&small());
    let (old, _) = engine_on(&r, None, &Ids::default());
    let mut w = old.worker(0);
    let ports = open_flows(&mut w);
    let mut u = udp(CLIENT, 5000, EP, 53, b"q");
    assert_eq!(step(&mut w, &mut u, Source::Network(NET_B), Now(5)), Verdict::Forward(Egress::Provider));
    let ids = old.ids();
    std::mem::forget(w);
    std::mem::forget(old);
    let region: Arc<dyn flow::Region> = r.clone();
    let (t, found) = flow::FlowTable::attach(region, small().max_flows, flow::AttachMode::Recover).expect("attaches");
    assert_eq!(found.flows, 21);
    let e = Engine::with_flows(small(), t);
    e.seed_ids(&ids);
    let mut d = desired(1024..=1100, ConnectionState::Approved);
    d.endpoints.retain(|x| x.name != "pe-b");
    e.apply(&d, Now(5)).expect("valid");
    assert_eq!(e.adopt_flows(Now(6)), Adopted { flows: 20, ended: 1 });
    let mut w = e.worker(0);
    for (i, &port) in ports.iter().enumerate() {
        assert!(still_mapped(&mut w, i as u16, port));
    }
}
