//! Connection states and their audit trail, persisted under `[state] dir`.
//!
//! The store is redb: an embedded, pure-Rust, transactional key-value store
//! whose commits are durable (fsync) and atomic, with copy-on-write pages so
//! that a crash at any moment leaves the last committed transaction intact.
//! It needs no C toolchain or server (SQLite would need a C build) and its
//! one-file format is enough for a few thousand connection records.
//! A state change and its audit entry are written in one transaction, and
//! the control API answers only after the commit returns: whatever the CLI
//! reported as done survives `kill -9`.

use anyhow::{Context, Result};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// One endpoint's connection to its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub endpoint: String,
    pub service: String,
    pub network: String,
    pub tenant: String,
    /// `pending`, `approved`, `rejected` or `disconnected`.
    pub state: String,
    pub request_message: Option<String>,
    pub response_message: Option<String>,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    /// Who made the last change: `config` or `operator`.
    #[serde(default)]
    pub decided_by: String,
    /// The connection's link id: given when the connection is made, kept
    /// for its life (across restarts) and carried in PROXY v2 TLVs (Azure:
    /// its low 32 bits; AWS: `vpce-` and 17 hex digits; GCP: all 64).
    #[serde(default)]
    pub link_id: u64,
}

/// A connection record to write, with what its audit entry says.
#[derive(Debug, Clone)]
pub struct Change {
    pub conn: Connection,
    pub from: Option<String>,
    pub message: Option<String>,
    pub by: String,
}

/// One change, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    pub endpoint: String,
    pub from: Option<String>,
    pub to: String,
    pub message: Option<String>,
    /// `operator` (control API) or `config` (start or reload).
    pub by: String,
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

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Debug)]
pub struct Store {
    /// `None` while handed to a successor (redb allows one process per file).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    /// `[flow_logs] events_file`: each committed change is appended there
    /// as one JSON line.
    events_file: std::sync::Mutex<Option<PathBuf>>,
}

impl Store {
    /// Opens (or creates) `dir/connections.redb`; `dir` is made 0700.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let path = dir.join("connections.redb");
        let db = Database::create(&path).with_context(|| format!("cannot open state store {}", path.display()))?;
        let tx = db.begin_write()?;
        tx.open_table(CONNECTIONS)?;
        tx.open_table(AUDIT)?;
        tx.commit()?;
        Ok(Store { db: std::sync::RwLock::new(Some(db)), path, events_file: std::sync::Mutex::new(None) })
    }

    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>> {
        let g = self.db.read().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            anyhow::bail!("the state store is being handed to another privlink");
        }
        Ok(g)
    }

    /// Appends every later change to `path` as JSON lines (`None`: stop).
    pub fn set_events_file(&self, path: Option<PathBuf>) {
        *self.events_file.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }

    /// Connection changes as JSON lines (approve, reject, disconnect, ...);
    /// a file that cannot be written is logged, never fatal.
    fn append_events(&self, changes: &[Change]) {
        let Some(path) = self.events_file.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mut text = String::new();
        for c in changes {
            let line = serde_json::json!({
                "time": c.conn.updated,
                "event": "connection_state",
                "endpoint": c.conn.endpoint,
                "service": c.conn.service,
                "network": c.conn.network,
                "tenant": c.conn.tenant,
                "link_id": c.conn.link_id,
                "from": c.from,
                "to": c.conn.state,
                "by": c.by,
                "message": c.message,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = r {
            tracing::warn!("cannot append connection events to {}: {e}", path.display());
        }
    }

    /// Lets go of the file (a successor opens it); see [`reopen`](Self::reopen).
    pub fn close(&self) {
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Opens the file again after a hand-over that did not happen.
    pub fn reopen(&self) -> Result<()> {
        let db =
            Database::create(&self.path).with_context(|| format!("cannot open state store {}", self.path.display()))?;
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(())
    }

    pub fn get(&self, endpoint: &str) -> Result<Option<Connection>> {
        let g = self.db()?;
        let tx = g.as_ref().context("state store")?.begin_read()?;
        let t = tx.open_table(CONNECTIONS)?;
        match t.get(endpoint)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).context("corrupt connection record")?)),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<Connection>> {
        let g = self.db()?;
        let tx = g.as_ref().context("state store")?.begin_read()?;
        let t = tx.open_table(CONNECTIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value()).context("corrupt connection record")?);
        }
        Ok(out)
    }

    /// Writes `conn` and an audit entry for the change from `from`, in one
    /// durable transaction.
    pub fn put(&self, conn: &Connection, from: Option<&str>, message: Option<&str>, by: &str) -> Result<()> {
        self.put_all(&[Change {
            conn: conn.clone(),
            from: from.map(str::to_string),
            message: message.map(str::to_string),
            by: by.to_string(),
        }])
    }

    /// Writes every change and its audit entry in one durable transaction
    /// (a start with 10,000 new connections commits once, not 10,000 times).
    pub fn put_all(&self, changes: &[Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let g = self.db()?;
        let tx = g.as_ref().context("state store")?.begin_write()?;
        {
            let mut audit = tx.open_table(AUDIT)?;
            let first = audit.last()?.map_or(1, |(k, _)| k.value() + 1);
            let mut t = tx.open_table(CONNECTIONS)?;
            for (seq, c) in (first..).zip(changes) {
                let entry = AuditEntry {
                    seq,
                    at: c.conn.updated,
                    endpoint: c.conn.endpoint.clone(),
                    from: c.from.clone(),
                    to: c.conn.state.clone(),
                    message: c.message.clone(),
                    by: c.by.clone(),
                };
                audit.insert(seq, serde_json::to_vec(&entry)?.as_slice())?;
                t.insert(c.conn.endpoint.as_str(), serde_json::to_vec(&c.conn)?.as_slice())?;
            }
        }
        tx.commit().context("cannot commit to the state store")?;
        drop(g);
        self.append_events(changes);
        Ok(())
    }

    /// At most `limit` audit entries after sequence number `after`,
    /// optionally of one endpoint, oldest first.
    pub fn audit_page(&self, endpoint: Option<&str>, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let g = self.db()?;
        let tx = g.as_ref().context("state store")?.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            let (_, v) = row?;
            let e: AuditEntry = serde_json::from_slice(v.value()).context("corrupt audit record")?;
            if endpoint.is_none_or(|n| n == e.endpoint) {
                out.push(e);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The audit trail, oldest first; of one endpoint when given.
    pub fn audit(&self, endpoint: Option<&str>) -> Result<Vec<AuditEntry>> {
        let g = self.db()?;
        let tx = g.as_ref().context("state store")?.begin_read()?;
        let t = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            let e: AuditEntry = serde_json::from_slice(v.value()).context("corrupt audit record")?;
            if endpoint.is_none_or(|n| n == e.endpoint) {
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(endpoint: &str, state: &str) -> Connection {
        Connection {
            endpoint: endpoint.into(),
            service: "svc".into(),
            network: "net".into(),
            tenant: "t".into(),
            state: state.into(),
            request_message: None,
            response_message: Some("ok".into()),
            created: 1,
            updated: 2,
            decided_by: "config".into(),
            link_id: 7,
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("privlink-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn put_get_all_and_audit() {
        let dir = tmp("basic");
        let s = Store::open(&dir).expect("open");
        assert_eq!(s.get("pe").expect("get"), None);
        s.put(&conn("pe", "pending"), None, None, "config").expect("put");
        s.put(&conn("pe", "approved"), Some("pending"), Some("welcome"), "operator").expect("put");
        s.put(&conn("other", "pending"), None, None, "config").expect("put");
        assert_eq!(s.get("pe").expect("get").map(|c| c.state), Some("approved".into()));
        assert_eq!(s.all().expect("all").len(), 2);
        let trail = s.audit(Some("pe")).expect("audit");
        assert_eq!(trail.len(), 2);
        assert_eq!((trail[1].seq, trail[1].from.as_deref(), trail[1].to.as_str()), (2, Some("pending"), "approved"));
        assert_eq!(trail[1].message.as_deref(), Some("welcome"));
        assert_eq!(s.audit(None).expect("audit").len(), 3);
        drop(s);
        // Reopened cleanly: everything is still there.
        let s = Store::open(&dir).expect("reopen");
        assert_eq!(s.get("pe").expect("get").map(|c| c.state), Some("approved".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn committed_state_survives_a_crash() {
        // A crash is simulated by copying the file while the database is
        // still open, as the disk would hold it had the process died right
        // after the commit, then opening the copy.
        let dir = tmp("crash");
        let s = Store::open(&dir).expect("open");
        s.put(&conn("pe", "pending"), None, None, "config").expect("put");
        s.put(&conn("pe", "approved"), Some("pending"), None, "operator").expect("put");
        let crashed = tmp("crash-copy");
        std::fs::create_dir_all(&crashed).expect("dir");
        std::fs::copy(dir.join("connections.redb"), crashed.join("connections.redb")).expect("copy");
        // More work after the "crash" point does not reach the copy.
        s.put(&conn("pe", "rejected"), Some("approved"), None, "operator").expect("put");
        let r = Store::open(&crashed).expect("open after crash");
        assert_eq!(r.get("pe").expect("get").map(|c| c.state), Some("approved".into()));
        assert_eq!(r.audit(None).expect("audit").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&crashed);
    }
}
