//! Where a flow table's arrays live: on the heap (tests, benches, a daemon
//! without a state mapping), or in a memory region the caller mapped
//! (`MAP_SHARED`), which outlives the process that wrote it.
//!
//! Keeping the table in a shared mapping is what lets a daemon be killed
//! without losing its flows: the next process maps the same region, checks
//! its [`Header`], and rebuilds what is process-local (free slots, pools,
//! counters) from the slots. It also lets two processes use one table at
//! once during a hand-over: every field a packet reads or writes is an
//! atomic, and atomics in shared memory work across processes the way they
//! do across threads. Only writers (flow setup and teardown) must be one
//! process at a time: their stripe locks and free list are process-local.
//!
//! Layout of a region, in this order, each part 64-byte aligned:
//! the [`Header`] (one 4 KiB page), the slots, their cold halves, the
//! consumer index's chain heads, the provider index's.

use std::fmt;
use std::sync::Arc;

/// A memory region for a flow table: at least [`Layout::bytes`] long,
/// page-aligned, readable and writable, and zeroed when new.
///
/// # Safety
/// `base()` must stay valid for `len()` bytes for as long as the value
/// lives, and nothing may use the memory other than through the flow table
/// (and other processes' flow tables on the same region).
pub unsafe trait Region: Send + Sync + fmt::Debug {
    fn base(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An array of `T` (atomics only, so all-zero is a valid value of each), on
/// the heap or in a [`Region`].
pub(crate) struct Arr<T> {
    ptr: *const T,
    len: usize,
    _own: Own<T>,
}

#[allow(dead_code)] // The fields only keep the memory alive.
enum Own<T> {
    Heap(Box<[T]>),
    Region(Arc<dyn Region>),
}

// SAFETY: an `Arr` is a shared slice of atomics (Sync values); the region
// or box it points into lives as long as it does.
unsafe impl<T: Sync> Send for Arr<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Arr<T> {}

impl<T> fmt::Debug for Arr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Arr[{}]", self.len)
    }
}

impl<T> std::ops::Deref for Arr<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialised values kept alive by `_own`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Arr<T> {
    pub(crate) fn heap(b: Box<[T]>) -> Arr<T> {
        Arr { ptr: b.as_ptr(), len: b.len(), _own: Own::Heap(b) }
    }

    /// `len` values at byte `offset` of `region`.
    ///
    /// # Safety
    /// The range must lie inside the region, be aligned for `T`, and hold
    /// valid `T`s (all-zero bytes are, for the atomics-only types used here).
    pub(crate) unsafe fn in_region(region: &Arc<dyn Region>, offset: usize, len: usize) -> Arr<T> {
        // SAFETY: the caller keeps the range inside the region.
        let ptr = unsafe { region.base().add(offset) } as *const T;
        Arr { ptr, len, _own: Own::Region(region.clone()) }
    }
}

/// What identifies a region's layout; checked before a table is attached.
pub const MAGIC: [u8; 8] = *b"PRVLFLOW";
/// Bumped whenever the slot format, the layout, the header or the index
/// hash changes. Format 4 added [`Header::family`]; a format 3 region
/// (IPv4 only, slots laid out as format 4's IPv4 slots) is still attached
/// by an IPv4 table, so a hand-over from the build before works.
pub const VERSION: u32 = 4;
/// The format before [`VERSION`] that an IPv4 table still attaches.
pub const VERSION_IPV4_ONLY: u32 = 3;

/// The first bytes of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    pub slot_size: u32,
    pub cold_size: u32,
    pub max_flows: u32,
    pub reuse_delay: u32,
    pub buckets: u32,
    /// The index hash's keys: every process on the region hashes alike.
    pub keys: [u64; 2],
    /// FNV-1a of the fields above (and, from format 4, of `family`): a
    /// header overwritten with anything else does not validate.
    pub check: u64,
    /// The IP version of the flows the table holds (4, 6; 0 in a format 3
    /// region, which held IPv4 only). After `check` so that format 3's
    /// fields keep their offsets.
    pub family: u32,
    pub reserved: u32,
}

impl Header {
    pub(crate) fn sum(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(&self.magic);
        for v in [self.version, self.slot_size, self.cold_size, self.max_flows, self.reuse_delay, self.buckets] {
            eat(&v.to_le_bytes());
        }
        eat(&self.keys[0].to_le_bytes());
        eat(&self.keys[1].to_le_bytes());
        if self.version >= 4 {
            eat(&self.family.to_le_bytes());
        }
        h
    }
}

/// Sizes of a table's parts, and where each sits in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub max_flows: u32,
    pub reuse_delay: u32,
    pub slots: usize,
    pub buckets: usize,
    /// Bytes per slot (the family's: 64 for IPv4, 128 for IPv6).
    pub slot_size: usize,
    /// The family's IP version (4, 6).
    pub family: u8,
}

/// Bytes reserved for the header at the start of a region.
pub const HEADER_BYTES: usize = 4096;

fn up64(n: usize) -> usize {
    (n + 63) & !63
}

impl Layout {
    /// The layout of an IPv4 table.
    pub fn new(max_flows: u32, reuse_delay: u32) -> Layout {
        Layout::of::<crate::addr::V4>(max_flows, reuse_delay)
    }
    /// The layout of a table of family `F`.
    pub fn of<F: crate::addr::Family>(max_flows: u32, reuse_delay: u32) -> Layout {
        let max_flows = max_flows.clamp(1, 1 << 31);
        // Twice as many buckets as flows: chains stay short (a hit visits 1.25
        // slots on average), and every extra slot visited is a cache miss.
        let buckets = (max_flows as usize).next_power_of_two().max(16) * 2;
        Layout {
            max_flows,
            reuse_delay,
            slots: max_flows as usize + reuse_delay as usize,
            buckets,
            slot_size: std::mem::size_of::<super::FlowSlot<F>>(),
            family: F::VERSION,
        }
    }
    pub(crate) fn slots_at(&self) -> usize {
        HEADER_BYTES
    }
    pub(crate) fn cold_at(&self) -> usize {
        self.slots_at() + up64(self.slots * self.slot_size)
    }
    pub(crate) fn cidx_at(&self) -> usize {
        self.cold_at() + up64(self.slots * std::mem::size_of::<super::Cold>())
    }
    pub(crate) fn pidx_at(&self) -> usize {
        self.cidx_at() + up64(self.buckets * 4)
    }
    /// Bytes a region for this layout needs.
    pub fn bytes(&self) -> usize {
        self.pidx_at() + up64(self.buckets * 4)
    }
    /// The header a region of this layout carries.
    pub(crate) fn header(&self, keys: [u64; 2]) -> Header {
        self.header_as(VERSION, u32::from(self.family), keys)
    }
    /// The header a format 3 region of this (IPv4) layout carries.
    pub(crate) fn header_ipv4_only(&self, keys: [u64; 2]) -> Header {
        self.header_as(VERSION_IPV4_ONLY, 0, keys)
    }
    fn header_as(&self, version: u32, family: u32, keys: [u64; 2]) -> Header {
        let mut h = Header {
            magic: MAGIC,
            version,
            slot_size: self.slot_size as u32,
            cold_size: std::mem::size_of::<super::Cold>() as u32,
            max_flows: self.max_flows,
            reuse_delay: self.reuse_delay,
            buckets: self.buckets as u32,
            keys,
            check: 0,
            family,
            reserved: 0,
        };
        h.check = h.sum();
        h
    }
}

/// Why a region could not be attached (the caller sets the file aside).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("region is {have} bytes, the layout needs {need}")]
    Size { have: usize, need: usize },
    #[error("not a privlink flow table (bad magic or header checksum)")]
    NotATable,
    #[error("flow table format {0}, this build reads {VERSION} (and {VERSION_IPV4_ONLY} for IPv4)")]
    Version(u32),
    #[error("flow table holds IPv{have} flows, this table is for IPv{want}")]
    Family { have: u32, want: u8 },
    #[error("flow table laid out for max_flows {have} (slots of {slot} bytes), the configuration asks for {want}")]
    Layout { have: u32, slot: u32, want: u32 },
}
