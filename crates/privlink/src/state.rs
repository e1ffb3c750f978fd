//! What outlives the daemon process (see docs/OPERATIONS.md):
//!
//! - the flow table, in a file under `/dev/shm` mapped `MAP_SHARED`
//!   ([`RunDir::open_table`]). tmpfs, because the table only has to survive
//!   the process, not the host (the TUN devices do not survive a reboot
//!   either), and a disk-backed mapping would be written back to disk over
//!   and over as packets touch their flows;
//! - its sidecar (`flows.json` beside it): what the slots' ids stand for
//!   (networks, endpoints, pools), the clock the slots' timestamps count
//!   from, and the boot it was written in;
//! - the device manifest (`devices.json` in the state directory): which
//!   persistent TUN devices this daemon made, by name, namespace and
//!   interface index, so that a restart re-attaches its own devices and
//!   still refuses anybody else's.
//!
//! - the state directory's lock ([`StateLock`]): one daemon per state
//!   directory.
//!
//! A file that does not validate is renamed aside with a log line saying
//! why, and the daemon starts with an empty table: nothing from it is used.

use anyhow::{Context, Result};
use privlink_core::addr::{Family, V4, V6};
use privlink_core::flow::{AttachMode, Attached, FlowTable, Layout, Region, REUSE_DELAY};
use privlink_core::{EndpointId, EndpointIdEntry, Ids, PoolId, PoolIdEntry, Protocol};
use serde::{Deserialize, Serialize};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

/// The sidecar's format; bumped when its meaning changes.
const SIDECAR_VERSION: u32 = 1;

/// A file mapped `MAP_SHARED`, read-write; unmapped on drop (the file and
/// what was written to it stay).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, used only through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn of(file: &std::fs::File, len: usize) -> Result<Mapping> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let n = NonZeroUsize::new(len).context("empty state file")?;
        // SAFETY: a fresh shared mapping of a file this process opened; no
        // Rust reference aliases it except through the flow table.
        let ptr = unsafe {
            mmap(None, n, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, file.as_fd(), 0)
        }
        .context("cannot map the state file")?;
        // Huge pages where the host allows them for shared memory
        // (`shmem_enabled` = advise); a hint, so its failure is ignored.
        // SAFETY: advice on the mapping just made.
        let _ = unsafe { nix::sys::mman::madvise(ptr, len, nix::sys::mman::MmapAdvise::MADV_HUGEPAGE) };
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `of`; the flow table
        // holding this `Arc` is gone.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

// SAFETY: the mapping is valid for `len` bytes until dropped, page-aligned,
// and zeroed when the file was made (ftruncate of an empty file).
unsafe impl Region for Mapping {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// An endpoint id in the sidecar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRec {
    pub id: u32,
    pub name: String,
    pub network: String,
    pub ip: std::net::IpAddr,
    pub service: String,
}

/// A pool id in the sidecar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolRec {
    pub id: u32,
    pub service: String,
    pub nat_ip: std::net::IpAddr,
    pub protocol: String,
    pub first: u16,
    pub last: u16,
}

/// What the flow table's ids and timestamps mean.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sidecar {
    pub version: u32,
    pub boot_id: String,
    /// `CLOCK_MONOTONIC` nanoseconds at the engine's time zero.
    pub epoch_mono_ns: u64,
    pub max_flows: u32,
    /// Network name -> id.
    pub networks: Vec<(String, u16)>,
    /// Network ids at or above this were never given (65,536: all were).
    pub next_network: u32,
    pub next_endpoint: u32,
    pub next_pool: u32,
    pub endpoints: Vec<EndpointRec>,
    pub pools: Vec<PoolRec>,
}

impl Sidecar {
    pub fn new(epoch_mono_ns: u64, max_flows: u32, ids: &Ids) -> Self {
        Sidecar {
            version: SIDECAR_VERSION,
            boot_id: boot_id(),
            epoch_mono_ns,
            max_flows,
            networks: ids.networks.clone(),
            next_network: ids.next_network,
            next_endpoint: ids.next_endpoint,
            next_pool: ids.next_pool,
            endpoints: ids
                .endpoints
                .iter()
                .map(|e| EndpointRec {
                    id: e.id.0,
                    name: e.name.clone(),
                    network: e.network.clone(),
                    ip: e.ip,
                    service: e.service.clone(),
                })
                .collect(),
            pools: ids
                .pools
                .iter()
                .map(|p| PoolRec {
                    id: p.id.0,
                    service: p.service.clone(),
                    nat_ip: p.nat_ip,
                    protocol: p.protocol.as_str().to_string(),
                    first: p.first,
                    last: p.last,
                })
                .collect(),
        }
    }

    /// The engine's ids, for [`privlink_core::Engine::seed_ids`].
    pub fn ids(&self) -> Ids {
        Ids {
            next_endpoint: self.next_endpoint,
            next_pool: self.next_pool,
            next_network: self.next_network,
            networks: self.networks.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointIdEntry {
                    id: EndpointId(e.id),
                    name: e.name.clone(),
                    network: e.network.clone(),
                    ip: e.ip,
                    service: e.service.clone(),
                })
                .collect(),
            pools: self
                .pools
                .iter()
                .filter_map(|p| {
                    Some(PoolIdEntry {
                        id: PoolId(p.id),
                        service: p.service.clone(),
                        nat_ip: p.nat_ip,
                        protocol: Protocol::ALL.into_iter().find(|x| x.as_str() == p.protocol)?,
                        first: p.first,
                        last: p.last,
                    })
                })
                .collect(),
        }
    }
}

/// A persistent TUN device this daemon made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRec {
    pub name: String,
    pub netns: Option<String>,
    pub ifindex: u32,
    /// What it was made from (namespace, MTU, address).
    pub recipe: String,
}

/// The device manifest (`devices.json` in the state directory).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub devices: Vec<DeviceRec>,
}

impl Manifest {
    pub fn read(state_dir: &Path) -> Manifest {
        let path = state_dir.join("devices.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is not a device manifest ({e}); no device is taken as this daemon's",
                    path.display()
                );
                Manifest::default()
            }),
            Err(_) => Manifest::default(),
        }
    }
    pub fn write(&self, state_dir: &Path) -> Result<()> {
        write_atomic(&state_dir.join("devices.json"), &serde_json::to_vec_pretty(self)?)
    }
    pub fn owns(&self, netns: Option<&str>, name: &str, ifindex: u32) -> bool {
        self.devices.iter().any(|d| d.name == name && d.netns.as_deref() == netns && d.ifindex == ifindex)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash leaves the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock `Instant` reads, shared
/// by every process of one boot).
pub fn mono_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// The `Instant` of a `CLOCK_MONOTONIC` reading (earlier than now).
pub fn instant_of(mono: u64) -> std::time::Instant {
    let ago = std::time::Duration::from_nanos(mono_ns().saturating_sub(mono));
    let now = std::time::Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The directory under `/dev/shm` of one state directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

/// How the table was opened.
#[derive(Debug)]
pub enum Opened {
    /// No usable table was there: a new, empty one.
    Fresh,
    /// A table taken over, with what was found in it.
    Attached(Attached),
}

impl RunDir {
    /// `/dev/shm/privlink-<hash of the state directory's path>`, made 0700
    /// (`PRIVLINK_RUN_DIR` overrides the parent, for hosts without /dev/shm).
    pub fn for_state_dir(state_dir: &Path) -> Result<RunDir> {
        let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in canon.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        let parent = std::env::var_os("PRIVLINK_RUN_DIR").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from);
        let dir = parent.join(format!("privlink-{h:016x}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", dir.display()))?;
        }
        Ok(RunDir { dir })
    }

    pub fn flows_path(&self) -> PathBuf {
        self.dir.join("flows")
    }

    /// The IPv6 flow table's file (beside the IPv4 one; the same sidecar).
    pub fn flows6_path(&self) -> PathBuf {
        self.dir.join("flows6")
    }

    fn sidecar_path(&self) -> PathBuf {
        self.dir.join("flows.json")
    }

    /// The sidecar, if there is one of this boot and format (otherwise why
    /// not, for the log).
    pub fn read_sidecar(&self) -> Result<Sidecar, String> {
        let b = std::fs::read(self.sidecar_path()).map_err(|_| "no sidecar".to_string())?;
        let s: Sidecar = serde_json::from_slice(&b).map_err(|e| format!("sidecar unreadable: {e}"))?;
        if s.version != SIDECAR_VERSION {
            return Err(format!("sidecar format {}, this build writes {SIDECAR_VERSION}", s.version));
        }
        if s.boot_id != boot_id() {
            return Err("written before the host rebooted".into());
        }
        Ok(s)
    }

    pub fn write_sidecar(&self, s: &Sidecar) -> Result<()> {
        write_atomic(&self.sidecar_path(), &serde_json::to_vec(s)?)
    }

    /// Moves the table aside (keeping only the last one set aside), with a
    /// log line saying why.
    pub fn set_aside(&self, why: &str) {
        self.set_aside_file(&self.flows_path(), why);
        let _ = std::fs::remove_file(self.sidecar_path());
    }

    /// Moves the table file `from` aside (the sidecar stays: an IPv6 table
    /// set aside leaves the IPv4 one and its sidecar valid).
    fn set_aside_file(&self, from: &Path, why: &str) {
        if !from.exists() {
            return;
        }
        let name = from.file_name().and_then(|n| n.to_str()).unwrap_or("flows");
        let to = self.dir.join(format!("{name}.set-aside"));
        match std::fs::rename(from, &to) {
            Ok(()) => tracing::warn!(
                "flow table {} set aside as {}: {why}; starting with an empty flow table",
                from.display(),
                to.display()
            ),
            Err(e) => {
                tracing::warn!(
                    "flow table {} unusable ({why}) and cannot be set aside ({e}); removing it",
                    from.display()
                );
                let _ = std::fs::remove_file(from);
            }
        }
    }

    /// The flow table for `max_flows` flows: the one left here by the
    /// previous process (`sidecar` says what it means; `mode` how to
    /// attach), or a new one.
    pub fn open_table(
        &self,
        max_flows: u32,
        sidecar: Result<&Sidecar, &str>,
        mode: AttachMode,
    ) -> Result<(FlowTable, Opened)> {
        let r = self.open_table_of::<V4>(&self.flows_path(), max_flows, sidecar, mode);
        if !matches!(r, Ok((_, Opened::Attached(_)))) {
            // A new IPv4 table: the ids the sidecar gave meant nothing,
            // and an IPv6 table left beside it means nothing either.
            let _ = std::fs::remove_file(self.flows6_path());
        }
        r
    }

    /// The IPv6 flow table (docs/IPV6.md), in its own file beside the
    /// IPv4 one and described by the same sidecar: attached when the IPv4
    /// table was (`sidecar` valid), else new.
    pub fn open_table6(
        &self,
        max_flows: u32,
        sidecar: Result<&Sidecar, &str>,
        mode: AttachMode,
    ) -> Result<(FlowTable<V6>, Opened)> {
        self.open_table_of::<V6>(&self.flows6_path(), max_flows, sidecar, mode)
    }

    /// [`open_table`](Self::open_table) for the table of family `F` in
    /// file `path`.
    fn open_table_of<F: Family>(
        &self,
        path: &Path,
        max_flows: u32,
        sidecar: Result<&Sidecar, &str>,
        mode: AttachMode,
    ) -> Result<(FlowTable<F>, Opened)> {
        let path = path.to_path_buf();
        let layout = || Layout::of::<F>(max_flows, REUSE_DELAY);
        if path.exists() {
            let attempt = || -> Result<(FlowTable<F>, Attached), String> {
                let sc = sidecar.map_err(str::to_string)?;
                if sc.max_flows != max_flows {
                    return Err(format!("max_flows changed from {} to {max_flows}", sc.max_flows));
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| format!("cannot open: {e}"))?;
                let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
                let need = layout().bytes();
                if len < need {
                    return Err(format!("{len} bytes, a table of max_flows {max_flows} takes {need}"));
                }
                let map = Mapping::of(&file, need).map_err(|e| format!("{e:#}"))?;
                let region: Arc<dyn Region> = Arc::new(map);
                FlowTable::attach(region, max_flows, mode).map_err(|e| e.to_string())
            };
            match attempt() {
                Ok((t, found)) => {
                    self.huge_pages_hint(layout().bytes());
                    return Ok((t, Opened::Attached(found)));
                }
                // The running daemon still uses it: never move it away.
                Err(why) if mode == AttachMode::Share => anyhow::bail!("cannot share the flow table: {why}"),
                Err(why) if F::VERSION == 4 => self.set_aside(&why),
                Err(why) => self.set_aside_file(&path, &why),
            }
        }
        if F::VERSION == 4 {
            let _ = std::fs::remove_file(self.sidecar_path());
        }
        let l = layout();
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?
        };
        file.set_len(l.bytes() as u64).with_context(|| format!("cannot size {}", path.display()))?;
        let region: Arc<dyn Region> = Arc::new(Mapping::of(&file, l.bytes())?);
        let t = FlowTable::create_in(region, max_flows).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.huge_pages_hint(l.bytes());
        Ok((t, Opened::Fresh))
    }

    /// Warns when a large table sits on a tmpfs without huge pages: each
    /// packet's lookup then costs TLB misses (measured +9 to 15 % per packet
    /// at 1M flows here; see docs/OPERATIONS.md).
    pub fn huge_pages_hint(&self, bytes: usize) {
        if bytes < 32 << 20 {
            return;
        }
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return };
        let dir = self.dir.to_string_lossy();
        let best = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && dir.starts_with(f[1]))
                    .then(|| (f[1].len(), f[1].to_string(), f[2] == "tmpfs", f[3].to_string()))
            })
            .max_by_key(|m| m.0);
        if let Some((_, at, true, opts)) = best {
            if !opts.split(',').any(|o| matches!(o, "huge=always" | "huge=within_size" | "huge=advise")) {
                tracing::warn!(
                    "the flow table ({} MiB) sits in 4 KiB pages: remount {at} with huge=within_size (or set \
                     PRIVLINK_RUN_DIR to a tmpfs mounted so) for fewer TLB misses per packet",
                    bytes >> 20
                );
            }
        }
    }

    /// Removes a table this process made and never used (a failed start).
    pub fn discard_table(&self) {
        let _ = std::fs::remove_file(self.flows_path());
        let _ = std::fs::remove_file(self.flows6_path());
        let _ = std::fs::remove_file(self.sidecar_path());
        // The directory too, when nothing else (a table set aside) is in it.
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// A clean stop: nothing is left behind.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lock that makes one state directory serve one daemon at a time: an
/// exclusive `flock(2)` on `privlink.lock` in it, held for the daemon's
/// life and released by the kernel however the process ends (so a crash
/// never leaves a stale lock). The file holds the owner's pid, for the
/// error a second daemon prints.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<StateLock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let path = dir.join("privlink.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            anyhow::bail!(
                "state directory {} is in use by another privlink (pid {}); one daemon per state directory",
                dir.display(),
                pid.trim()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(StateLock { _file: file })
    }

    /// The lock a running daemon passed over the hand-over socket: the same
    /// open file, so the lock was never free. Records this process's pid.
    pub fn adopt(fd: std::os::fd::OwnedFd) -> Result<StateLock> {
        use std::io::{Seek, Write};
        let mut file = std::fs::File::from(fd);
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(StateLock { _file: file })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._file.as_fd()
    }
}
