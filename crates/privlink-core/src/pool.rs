//! NAT port pools, one per (service, NAT IP, protocol).
//!
//! Allocation picks uniformly at random among the free ports (a swap-remove
//! from a dense free array: O(1), and the order is unpredictable as RFC 6056
//! asks). When no port is wholly free, a port already in use may be shared by
//! a flow to a *different* backend address/port ("port overloading",
//! RFC 4787 REQ-1's endpoint-independent mapping is not needed for a
//! private endpoint): the caller's `claim` closure only succeeds when the
//! provider-side 5-tuple is not live, so a live tuple is never handed out twice.
//!
//! A port whose last flow expired (rather than closed) sits in quarantine for
//! [`QUARANTINE_SECS`], so a backend still holding TIME_WAIT state for that tuple
//! never sees it reused early.
//!
//! A pool also queues its flows that closed (both FINs, or an exact RST)
//! in the order they closed: their ports are still in use (RFC 7857 §2.2
//! keeps state for a while after a close), but when a new flow finds no
//! port, or no slot in the flow table, the oldest closed flow is ended for
//! it rather than the new one refused, as conntrack's early drop ends
//! unassured entries first. The queue holds (slot, generation, when); an
//! entry whose flow has since ended or opened again is stale and skipped
//! ([`crate::conntrack`]).
//!
//! The pool takes a mutex only on flow setup and teardown (a close
//! included), never on the per-packet path of an established flow.

use crate::types::Now;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

/// Seconds a port freed by expiry is kept out of circulation.
pub const QUARANTINE_SECS: u32 = 120;

/// How many in-use ports to try for sharing before giving up.
const OVERLOAD_TRIES: usize = 64;

#[derive(Debug)]
struct Inner {
    free: Vec<u16>,
    /// Live flows per port, indexed by `port - first`.
    users: Vec<u32>,
    quarantine: VecDeque<(u16, Now)>,
    /// Flows of this pool that closed, oldest first (see the module docs).
    closed: VecDeque<ClosedFlow>,
    rng: StdRng,
}

/// A closed flow waiting in its pool's queue: its slot, the slot's
/// generation, when it closed, and which table the slot is in (an IPv4
/// pool also serves IPv6 flows translated to its IPv4 service: one
/// queue, two tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedFlow {
    pub slot: u32,
    pub gen: u32,
    pub at: Now,
    /// The slot is in the IPv6 table.
    pub v6: bool,
}

/// A bounded pool of ports.
#[derive(Debug)]
pub struct PortPool {
    first: u16,
    capacity: u32,
    inner: Mutex<Inner>,
    available: AtomicU32,
    exhausted: AtomicU64,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>, seed: u64) -> PortPool {
        let (first, last) = (*range.start(), *range.end());
        assert!(first <= last, "empty port range");
        let capacity = u32::from(last - first) + 1;
        let free: Vec<u16> = range.collect();
        PortPool {
            first,
            capacity,
            available: AtomicU32::new(capacity),
            exhausted: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                free,
                users: vec![0; capacity as usize],
                quarantine: VecDeque::new(),
                closed: VecDeque::new(),
                rng: StdRng::seed_from_u64(seed),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the pool consistent (every
        // mutation is a single step), so poisoning is not fatal.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a port for a new flow. `claim(port)` must atomically reserve the
    /// flow's provider-side tuple and return false if it is live already.
    /// Returns `None` when no port can be had; the caller counts the
    /// exhaustion ([`note_exhausted`](Self::note_exhausted)) once it gives
    /// up (it may first end a closed flow for its port).
    pub fn allocate(&self, now: Now, claim: impl FnMut(u16) -> bool) -> Option<u16> {
        self.allocate_hinted(now, None, claim)
    }

    /// As [`allocate`](Self::allocate), trying port `hint` first (the port
    /// of a closed flow just ended for this one, which may still be shared
    /// with other flows and so not be free).
    pub fn allocate_hinted(&self, now: Now, hint: Option<u16>, mut claim: impl FnMut(u16) -> bool) -> Option<u16> {
        self.release_quarantine(now);
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(port) = hint.filter(|&p| self.contains(p)) {
            let used = inner.users[usize::from(port - self.first)] > 0;
            let free_at = inner.free.iter().position(|&p| p == port);
            if (used || free_at.is_some()) && claim(port) {
                if let Some(i) = free_at {
                    inner.free.swap_remove(i);
                }
                inner.users[usize::from(port - self.first)] += 1;
                self.available.store(inner.free.len() as u32, Ordering::Relaxed);
                return Some(port);
            }
        }
        let mut got = None;
        // Candidates are `free[..n]`. A free port whose claim fails (its
        // tuple is held by a flow of a pool this one replaced on reload) is
        // moved behind them: it stays free for a later allocation rather
        // than being tried again now, or lost.
        let mut n = inner.free.len();
        while n > 0 {
            let i = inner.rng.random_range(0..n);
            let port = inner.free[i];
            if claim(port) {
                inner.free.swap_remove(i);
                got = Some(port);
                break;
            }
            inner.free.swap(i, n - 1);
            n -= 1;
        }
        if got.is_none() {
            for _ in 0..OVERLOAD_TRIES {
                let port = self.first + inner.rng.random_range(0..self.capacity) as u16;
                if inner.users[usize::from(port - self.first)] > 0 && claim(port) {
                    got = Some(port);
                    break;
                }
            }
        }
        self.available.store(inner.free.len() as u32, Ordering::Relaxed);
        if let Some(port) = got {
            inner.users[usize::from(port - self.first)] += 1;
        }
        got
    }

    /// Counts an allocation that failed for want of a port.
    pub fn note_exhausted(&self) {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a flow of this pool that closed (see the module docs).
    ///
    /// A flow that closes, opens again and closes again between two sweeps
    /// queues itself each time: past a bound that doubles with what stays,
    /// repeats of one (slot, generation) are dropped but the latest, so the
    /// queue holds at most about twice the flows it names.
    pub fn note_closed(&self, c: ClosedFlow) {
        self.lock().closed.push_back(c);
    }

    /// When the oldest queued closed flow closed, if any is queued.
    pub fn oldest_closed(&self) -> Option<Now> {
        self.lock().closed.front().map(|c| c.at)
    }

    /// Takes the oldest queued closed flow off the queue.
    pub fn pop_closed(&self) -> Option<ClosedFlow> {
        self.lock().closed.pop_front()
    }

    /// When the oldest queued closed flow in the IPv6 table (`v6`) or the
    /// IPv4 one closed, if any is queued.
    pub fn oldest_closed_in(&self, v6: bool) -> Option<Now> {
        self.lock().closed.iter().find(|c| c.v6 == v6).map(|c| c.at)
    }

    /// Takes the oldest queued closed flow of the IPv6 table (`v6`) or the
    /// IPv4 one off the queue, leaving the other table's queued.
    pub fn pop_closed_in(&self, v6: bool) -> Option<ClosedFlow> {
        let mut g = self.lock();
        let i = g.closed.iter().position(|c| c.v6 == v6)?;
        g.closed.remove(i)
    }

    /// Keeps only the queued closed flows for which `keep` holds, and of
    /// repeats of one (slot, generation) only the latest (the sweep drops
    /// stale entries so). `keep` runs without the pool's lock: the queue is
    /// taken out, filtered, and put back in front of what was queued
    /// meanwhile. Returns how many stay.
    pub fn retain_closed(&self, mut keep: impl FnMut(&ClosedFlow) -> bool) -> usize {
        let taken = std::mem::take(&mut self.lock().closed);
        let mut seen = std::collections::HashSet::with_capacity(taken.len());
        let mut kept: VecDeque<ClosedFlow> =
            taken.iter().rev().filter(|c| seen.insert((c.slot, c.gen)) && keep(c)).copied().collect();
        kept.make_contiguous().reverse();
        let mut g = self.lock();
        let newer = std::mem::replace(&mut g.closed, kept);
        g.closed.extend(newer);
        g.closed.len()
    }

    /// Gives a port back. `closed` says the TCP close was seen, which lets the
    /// port be reused at once; otherwise it is quarantined.
    pub fn free(&self, port: u16, now: Now, closed: bool) {
        let Some(idx) = port.checked_sub(self.first).map(usize::from) else { return };
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(users) = inner.users.get_mut(idx) else { return };
        if *users == 0 {
            return;
        }
        *users -= 1;
        if *users == 0 {
            if closed {
                inner.free.push(port);
            } else {
                inner.quarantine.push_back((port, now.plus(QUARANTINE_SECS)));
            }
        }
        self.available.store(inner.free.len() as u32, Ordering::Relaxed);
    }

    /// Returns quarantined ports whose time is up to the free list, so the
    /// `available` gauge is right even when no flow is being set up.
    pub fn release_quarantine(&self, now: Now) {
        let mut g = self.lock();
        let inner = &mut *g;
        while let Some(&(port, until)) = inner.quarantine.front() {
            if until > now {
                break;
            }
            inner.quarantine.pop_front();
            inner.free.push(port);
        }
        self.available.store(inner.free.len() as u32, Ordering::Relaxed);
    }

    /// Ports that are neither in use nor quarantined.
    pub fn available(&self) -> u32 {
        self.available.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Adds `n` to the exhaustion count (the count of a pool this one
    /// replaces, so the metric series never goes down).
    pub fn count_exhausted(&self, n: u64) {
        self.exhausted.fetch_add(n, Ordering::Relaxed);
    }

    /// Allocations that failed for want of a port.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    pub fn contains(&self, port: u16) -> bool {
        port >= self.first && u32::from(port - self.first) < self.capacity
    }

    /// Takes the ports of flows another process created (one entry per
    /// flow; a port shared by several flows appears once for each) out of
    /// a fresh pool. Ports outside the range are ignored.
    pub fn adopt(&self, ports: &[u16]) {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut any = false;
        for &p in ports {
            if self.contains(p) {
                inner.users[usize::from(p - self.first)] += 1;
                any = true;
            }
        }
        if any {
            let (first, users) = (self.first, &inner.users);
            inner.free.retain(|&p| users[usize::from(p - first)] == 0);
            inner.quarantine.retain(|&(p, _)| users[usize::from(p - first)] == 0);
        }
        self.available.store(inner.free.len() as u32, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn adopted_ports_are_in_use_until_each_of_their_flows_frees_them() {
        let p = PortPool::new(1000..=1003, 1);
        p.adopt(&[1001, 1001, 1003, 4000]);
        assert_eq!(p.available(), 2);
        let mut got: Vec<u16> = (0..2).filter_map(|_| p.allocate(Now(0), |_| true)).collect();
        got.sort();
        assert_eq!(got, vec![1000, 1002]);
        p.free(1001, Now(0), true);
        assert_eq!(p.available(), 0, "1001 still has a flow");
        p.free(1001, Now(0), true);
        p.free(1003, Now(0), true);
        assert_eq!(p.available(), 2);
    }

    #[test]
    fn hands_out_every_port_once_then_exhausts() {
        let p = PortPool::new(1000..=1009, 1);
        let mut seen = HashSet::new();
        for _ in 0..10 {
            let port = p.allocate(Now(0), |_| true).expect("port");
            assert!(p.contains(port));
            assert!(seen.insert(port));
        }
        assert_eq!(p.available(), 0);
        // Sharing is refused by the claim (same tuple): exhausted.
        assert_eq!(p.allocate(Now(0), |_| false), None);
        assert_eq!(p.exhausted(), 0, "the caller counts, once it gives up");
    }

    #[test]
    fn a_hinted_port_is_taken_first_whether_free_or_shared() {
        let p = PortPool::new(5000..=5003, 1);
        assert_eq!(p.allocate_hinted(Now(0), Some(5002), |_| true), Some(5002));
        assert_eq!(p.available(), 3);
        // Still in use by the first flow: shared when the claim allows it.
        assert_eq!(p.allocate_hinted(Now(0), Some(5002), |_| true), Some(5002));
        p.free(5002, Now(0), true);
        p.free(5002, Now(0), true);
        assert_eq!(p.available(), 4);
        // A hint outside the pool, or refused, falls back to any port.
        assert!(p.allocate_hinted(Now(0), Some(80), |_| true).is_some_and(|x| p.contains(x)));
    }

    #[test]
    fn closed_flows_queue_oldest_first() {
        let p = PortPool::new(6000..=6001, 1);
        for (slot, at) in [(3, 10), (1, 11), (2, 12)] {
            p.note_closed(ClosedFlow { slot, gen: 0, at: Now(at), v6: false });
        }
        assert_eq!(p.oldest_closed(), Some(Now(10)));
        assert_eq!(p.retain_closed(|c| c.slot != 1), 2);
        assert_eq!(p.pop_closed().map(|c| c.slot), Some(3));
        assert_eq!(p.pop_closed().map(|c| c.slot), Some(2));
        assert_eq!(p.pop_closed(), None);
    }

    #[test]
    fn a_flow_closing_again_and_again_keeps_one_entry_after_a_sweep() {
        let p = PortPool::new(6000..=6001, 1);
        for i in 0..10_000u32 {
            p.note_closed(ClosedFlow { slot: i % 3, gen: 7, at: Now(i), v6: false });
        }
        assert_eq!(p.retain_closed(|_| true), 3);
        // The latest of each stays, in order.
        let last: Vec<u32> = std::iter::from_fn(|| p.pop_closed()).map(|c| c.at.0).collect();
        assert_eq!(last, vec![9_997, 9_998, 9_999]);
    }

    #[test]
    fn order_is_not_sequential() {
        let p = PortPool::new(1024..=65535, 7);
        let ports: Vec<u16> = (0..64).map(|_| p.allocate(Now(0), |_| true).expect("port")).collect();
        let ascending = ports.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(ascending < 4, "{ports:?}");
    }

    #[test]
    fn shares_a_port_when_the_tuple_differs() {
        let p = PortPool::new(2000..=2000, 1);
        assert_eq!(p.allocate(Now(0), |_| true), Some(2000));
        // Second flow to another backend: the claim succeeds, port shared.
        assert_eq!(p.allocate(Now(0), |_| true), Some(2000));
        p.free(2000, Now(1), true);
        assert_eq!(p.available(), 0, "still used by one flow");
        p.free(2000, Now(1), true);
        assert_eq!(p.available(), 1);
    }

    #[test]
    fn expired_ports_are_quarantined() {
        let p = PortPool::new(3000..=3000, 1);
        let port = p.allocate(Now(10), |_| true).expect("port");
        p.free(port, Now(10), false);
        assert_eq!(p.available(), 0);
        assert_eq!(p.allocate(Now(10 + QUARANTINE_SECS - 1), |_| true), None);
        assert_eq!(p.allocate(Now(10 + QUARANTINE_SECS), |_| true), Some(3000));
    }

    #[test]
    fn closed_ports_return_at_once() {
        let p = PortPool::new(3000..=3000, 1);
        let port = p.allocate(Now(10), |_| true).expect("port");
        p.free(port, Now(10), true);
        assert_eq!(p.allocate(Now(10), |_| true), Some(3000));
    }

    #[test]
    fn freeing_foreign_or_unused_ports_is_ignored() {
        let p = PortPool::new(3000..=3001, 1);
        p.free(80, Now(0), true);
        p.free(3000, Now(0), true);
        assert_eq!(p.available(), 2);
    }

    #[test]
    fn a_port_whose_claim_fails_goes_back_to_the_pool() {
        // A free port whose tuple something else still holds (a flow of
        // the pool this one replaced on reload) is refused by the claim; it
        // must stay in the pool, not vanish from it.
        let p = PortPool::new(4000..=4003, 1);
        let mut tried = Vec::new();
        let got = p.allocate(Now(0), |port| {
            tried.push(port);
            tried.len() > 1
        });
        assert!(got.is_some());
        assert_eq!(p.available(), 3, "refused port lost: {tried:?}");
        p.free(got.expect("port"), Now(0), true);
        assert_eq!(p.available(), p.capacity());
        // And once every port is refused, none is lost either.
        assert_eq!(p.allocate(Now(0), |_| false), None);
        assert_eq!(p.available(), p.capacity());
    }
}
