//! Counters written on the packet path: one slot per worker, written with
//! a plain load and store by the one worker that owns it, summed on read.
//! No registry lookup, no shared write per packet.

use crate::types::DropReason;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Drop counters, one slot per reason.
#[derive(Debug, Default)]
pub struct DropCounters(pub [AtomicU64; DropReason::COUNT]);

/// An endpoint's traffic counters as written by one worker.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    pub bytes_in: AtomicU64,
    pub packets_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_out: AtomicU64,
}

impl EndpointCounters {
    /// Counts `packets` packets of `bytes` bytes; `inbound` is consumer ->
    /// service. Only the owning worker calls this (see [`bump`]).
    #[inline]
    pub(crate) fn add(&self, inbound: bool, bytes: usize, packets: u64) {
        let (b, p) = if inbound { (&self.bytes_in, &self.packets_in) } else { (&self.bytes_out, &self.packets_out) };
        bump(b, bytes as u64);
        bump(p, packets);
    }
}

/// Adds `n` to a counter that only one thread writes: a plain load and
/// store, no read-modify-write, so no cache line bounces between workers.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Per-worker counter slots; readers sum them.
#[derive(Debug)]
pub struct PerWorker<T>(Box<[CachePadded<T>]>);

impl<T: Default> PerWorker<T> {
    pub(crate) fn new(workers: usize) -> Self {
        PerWorker((0..workers.max(1)).map(|_| CachePadded::new(T::default())).collect())
    }
}

impl<T> PerWorker<T> {
    #[inline]
    pub(crate) fn get(&self, worker: usize) -> &T {
        &self.0[worker % self.0.len()]
    }
    pub fn sum(&self, f: impl Fn(&T) -> u64) -> u64 {
        self.0.iter().map(|c| f(c)).fold(0, u64::wrapping_add)
    }
}

/// Subtracts one, wrapping. A removal by the sweep can count a flow's end
/// before the worker that closed or reopened it counts that change: for a
/// moment the count is one below its true value, possibly below zero, and
/// the late count brings it back. So counts wrap and are read through
/// [`count`]/[`count32`], never saturated (a lost decrement would stay).
pub(crate) fn dec64(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::Relaxed);
}

pub(crate) fn dec32(a: &AtomicU32) {
    a.fetch_sub(1, Ordering::Relaxed);
}

/// A count kept with wrapping decrements and `fetch_add`: its value, 0 while it is
/// transiently below zero.
#[inline]
pub fn count(a: &AtomicU64) -> u64 {
    (a.load(Ordering::Relaxed) as i64).max(0) as u64
}

/// As [`count`], for the networks' 32-bit shares.
#[inline]
pub fn count32(a: &AtomicU32) -> u32 {
    (a.load(Ordering::Relaxed) as i32).max(0) as u32
}
