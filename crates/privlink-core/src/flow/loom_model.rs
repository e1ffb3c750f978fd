//! Model tests of the flow table's lookup-versus-reuse protocol with
//! `loom`, which runs every interleaving of the threads (within a
//! preemption bound). Run:
//! `RUSTFLAGS="--cfg loom" cargo test -p privlink-core --release --lib flow::loom_model`.
//!
//! The table has one flow slot and no reuse delay, so a removal followed by
//! an insert reuses the very slot a concurrent reader stands on: the worst
//! case that the delay only makes rare.

use super::*;
use loom::sync::Arc;
use loom::thread;

fn ck(port: u16) -> ConsumerKey {
    ConsumerKey::new(1, 17, 0x0a00_0001, port, 0x0a01_0005, 53)
}
fn pk(port: u16) -> ProviderKey {
    ProviderKey::new(17, 0xc0a8_6404, port, 0xc0a8_320a, 53)
}

fn table_with_a() -> (Arc<FlowTable>, FlowView) {
    let t = Arc::new(FlowTable::with_reuse_delay(1, 0));
    let a = t.insert(ck(1), EndpointId(1), Now(0), |claim| claim(pk(1)).then_some((PoolId(1), 0)));
    let Ok(Inserted::New(a)) = a else { panic!("insert a") };
    (t, a)
}

/// Removes flow A and creates flow B (another tenant's endpoint) in the same
/// slot.
fn replace_a_with_b(t: &FlowTable, a: &FlowView) {
    assert!(t.remove(a).is_some());
    let b = t.insert(ck(2), EndpointId(2), Now(0), |claim| claim(pk(2)).then_some((PoolId(2), 0)));
    assert!(matches!(b, Ok(Inserted::New(_))));
}

#[test]
fn consumer_lookup_racing_reuse_sees_one_whole_flow() {
    loom::model(|| {
        let (t, a) = table_with_a();
        let t2 = t.clone();
        let w = thread::spawn(move || replace_a_with_b(&t2, &a));
        if let Some(v) = t.find_consumer(ck(1)) {
            assert_eq!((v.ckey, v.pkey, v.endpoint), (ck(1), pk(1), EndpointId(1)));
        }
        if let Some(v) = t.find_consumer(ck(2)) {
            assert_eq!((v.ckey, v.pkey, v.endpoint), (ck(2), pk(2), EndpointId(2)));
        }
        w.join().expect("writer");
    });
}

#[test]
fn provider_lookup_racing_reuse_sees_one_whole_flow() {
    loom::model(|| {
        let (t, a) = table_with_a();
        let t2 = t.clone();
        let w = thread::spawn(move || replace_a_with_b(&t2, &a));
        if let Some(v) = t.find_provider(pk(1)) {
            assert_eq!((v.ckey, v.pkey, v.endpoint), (ck(1), pk(1), EndpointId(1)));
        }
        w.join().expect("writer");
    });
}

#[test]
fn a_stale_view_never_sets_state_on_the_next_flow() {
    loom::model(|| {
        let (t, a) = table_with_a();
        let t2 = t.clone();
        let w = thread::spawn(move || replace_a_with_b(&t2, &a));
        // A packet of flow A that looked it up before the reuse.
        t.add_state(&a, state::RST);
        w.join().expect("writer");
        let b = t.find_consumer(ck(2)).expect("b is live");
        assert_eq!(b.state & state::RST, 0, "A's RST landed on B");
    });
}

#[test]
fn concurrent_removals_end_a_flow_once() {
    loom::model(|| {
        let (t, a) = table_with_a();
        let t2 = t.clone();
        let w = thread::spawn(move || t2.remove(&a).is_some());
        let mine = t.remove(&a).is_some();
        let theirs = w.join().expect("remover");
        assert!(mine ^ theirs, "removed {} times", u8::from(mine) + u8::from(theirs));
        assert_eq!(t.len(), 0);
    });
}

/// A hand-over's freeze: once `freeze` has returned, no insert completes
/// (the successor then reads a table that no longer changes under it),
/// whatever point a racing insert had reached.
#[test]
fn no_insert_completes_after_freeze_returns() {
    loom::model(|| {
        let t = Arc::new(FlowTable::with_reuse_delay(4, 0));
        let t2 = t.clone();
        let w = thread::spawn(move || {
            t2.insert(ck(7), EndpointId(1), Now(0), |claim| claim(pk(7)).then_some((PoolId(1), 0))).is_ok()
        });
        t.freeze();
        let at_freeze = t.len();
        let inserted = w.join().expect("writer");
        assert_eq!(t.len(), at_freeze, "an insert completed after the freeze");
        assert_eq!(inserted, at_freeze == 1);
        assert!(t.find_consumer(ck(7)).is_some() == inserted);
    });
}

/// An established TCP flow alone in its table.
fn tcp_flow() -> (Arc<FlowTable>, FlowView) {
    let t = Arc::new(FlowTable::with_reuse_delay(1, 0));
    let k = ConsumerKey::new(1, 6, 0x0a00_0001, 1, 0x0a01_0005, 80);
    let p = ProviderKey::new(6, 0xc0a8_6404, 1, 0xc0a8_320a, 80);
    let bits = state::C_SYN | state::P_SYN | state::ESTABLISHED;
    let a = t.insert(k, EndpointId(1), Now(0), |claim| claim(p).then_some((PoolId(1), bits)));
    let Ok(Inserted::New(a)) = a else { panic!("insert") };
    (t, a)
}

#[test]
fn the_two_fins_of_a_close_take_a_flow_off_the_open_counts_once() {
    loom::model(|| {
        let (t, a) = tcp_flow();
        let t2 = t.clone();
        // The consumer's FIN and the backend's, on two workers at once.
        let w = thread::spawn(move || t2.add_state(&a, state::P_FIN).is_some_and(|c| c.counted_closed()));
        let mine = t.add_state(&a, state::C_FIN).is_some_and(|c| c.counted_closed());
        let theirs = w.join().expect("worker");
        assert!(mine ^ theirs, "counted closed {} times", u8::from(mine) + u8::from(theirs));
    });
}

#[test]
fn a_reclaim_never_ends_a_flow_that_opened_again() {
    loom::model(|| {
        let (t, a) = tcp_flow();
        assert!(t.add_state(&a, state::RST).is_some_and(|c| c.counted_closed()));
        let t2 = t.clone();
        // A new flow reclaims the closed one while its consumer's new SYN
        // reopens it.
        let w = thread::spawn(move || t2.remove_if(&a, crate::conntrack::closed).is_some());
        let reopened = t.reopen(&a).is_some_and(|c| c.reopened());
        let reclaimed = w.join().expect("reclaimer");
        assert!(reopened ^ reclaimed, "reopened {reopened}, reclaimed {reclaimed}");
        // What won is what the table holds.
        assert_eq!(t.find_consumer(a.ckey).is_some(), reopened);
    });
}
