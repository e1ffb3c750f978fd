//! NAT events for flow logs (RFC 8158's NAT44 session create and delete,
//! NAT ports exhausted): what an exporter sends to a collector, recorded
//! where they happen without ever waiting there.
//!
//! The queue is bounded and lock-free (`crossbeam_queue::ArrayQueue`): a
//! worker creating a flow pushes one event (a compare-and-swap) and goes on;
//! when the exporter has fallen behind and the queue is full, the event is
//! dropped and counted, never waited for. Established packets record
//! nothing. The daemon's exporter drains it off the packet path.

use crate::addr::{Family, V4};
use crate::flow::{ConsumerKey, ProviderKey};
use crate::types::EndpointId;
use std::sync::atomic::{AtomicU64, Ordering};

/// RFC 8158 `natEvent` values privlink reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NatEventKind {
    /// NAT44 session create.
    Create = 1,
    /// NAT44 session delete.
    Delete = 2,
    /// NAT ports exhausted (the provider key has port 0).
    PortsExhausted = 10,
}

/// One event: both sides of the translation (of an IPv6 flow with `F` =
/// `V6`, its provider side IPv4-mapped when translated to IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatEvent<F: Family = V4> {
    pub kind: NatEventKind,
    pub ckey: ConsumerKey<F>,
    pub pkey: ProviderKey<F>,
    pub endpoint: EndpointId,
}

/// The bounded event queue (one per family: an IPv6 event is wider, and
/// IPv4's slots stay as they were).
#[derive(Debug)]
pub struct EventQueue<F: Family = V4> {
    q: crossbeam_queue::ArrayQueue<NatEvent<F>>,
    dropped: AtomicU64,
}

impl<F: Family> EventQueue<F> {
    pub fn new(capacity: usize) -> EventQueue<F> {
        EventQueue { q: crossbeam_queue::ArrayQueue::new(capacity.max(1)), dropped: AtomicU64::new(0) }
    }

    /// Records `e`, or counts it dropped when the queue is full.
    #[inline]
    pub fn push(&self, e: NatEvent<F>) {
        if self.q.push(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn pop(&self) -> Option<NatEvent<F>> {
        self.q.pop()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let q = EventQueue::<V4>::new(2);
        let e = NatEvent {
            kind: NatEventKind::Create,
            ckey: ConsumerKey(1),
            pkey: ProviderKey(2),
            endpoint: EndpointId(3),
        };
        for _ in 0..5 {
            q.push(e);
        }
        assert_eq!(q.dropped(), 3);
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(e), Some(e), None));
    }
}
