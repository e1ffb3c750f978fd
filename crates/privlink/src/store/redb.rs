//! The single-host [`ConnectionStore`]: connection states and their audit
//! trail in `connections.redb` under `[state] dir`.
//!
//! redb is an embedded, pure-Rust, transactional key-value store whose
//! commits are durable (fsync) and atomic, with copy-on-write pages so
//! that a crash at any moment leaves the last committed transaction intact.
//! It needs no C toolchain or server (SQLite would need a C build) and its
//! one-file format is enough for a few thousand connection records.
//! A batch of changes and their audit entries are written in one
//! transaction, and the control API answers only after the commit returns:
//! whatever the CLI reported as done survives `kill -9`.
//!
//! Revisions: a counter in the `meta` table goes up by one per committed
//! write; each record written carries the counter's new value (records
//! from before revisions were kept read as revision 0). Writers are
//! serialised by redb's single write transaction, so checking the revisions
//! and writing in that transaction is the compare-and-swap.

use super::{AuditEntry, Change, Connection, ConnectionStore, Guard, StoreError};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// A record as the file keeps it: the connection and its revision.
#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    conn: Connection,
    #[serde(default)]
    revision: u64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode(bytes: &[u8]) -> Result<Connection, StoreError> {
    let s: Stored = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
    Ok(Connection { revision: s.revision, ..s.conn })
}

#[derive(Debug)]
pub struct RedbStore {
    /// `None` while handed to a successor (redb allows one process per file).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (or creates) `dir/connections.redb`; `dir` is made 0700.
    pub fn open(dir: &Path) -> anyhow::Result<RedbStore> {
        use anyhow::Context;
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
        tx.open_table(META)?;
        tx.commit()?;
        Ok(RedbStore { db: std::sync::RwLock::new(Some(db)), path })
    }

    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, StoreError> {
        let g = self.db.read().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(StoreError::Unavailable("it is being handed to another privlink".into()));
        }
        Ok(g)
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let g = self.db()?;
        let db = g.as_ref().ok_or_else(|| unavailable("closed"))?;
        let tx = db.begin_read().map_err(unavailable)?;
        f(&tx)
    }
}

impl RedbStore {
    /// Appends the audit entries of `changes` (written elsewhere: a
    /// fleet's records live in etcd, its audit trail on each host).
    pub fn append_audit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let g = self.db()?;
        let db = g.as_ref().ok_or_else(|| unavailable("closed"))?;
        let tx = db.begin_write().map_err(unavailable)?;
        append_audit(&tx, changes)?;
        tx.commit().map_err(|e| unavailable(format!("cannot commit: {e}")))
    }
}

/// Appends one audit entry per change, numbered on from the last.
fn append_audit(tx: &redb::WriteTransaction, changes: &[Change]) -> Result<(), StoreError> {
    let mut audit = tx.open_table(AUDIT).map_err(unavailable)?;
    let first = audit.last().map_err(unavailable)?.map_or(1, |(k, _)| k.value() + 1);
    for (seq, c) in (first..).zip(changes) {
        let entry = AuditEntry {
            seq,
            at: c.conn.updated,
            endpoint: c.conn.endpoint.clone(),
            from: c.from,
            to: c.conn.state,
            message: c.message.clone(),
            by: c.by.clone(),
        };
        let entry = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        audit.insert(seq, entry.as_slice()).map_err(unavailable)?;
    }
    Ok(())
}

impl ConnectionStore for RedbStore {
    fn get(&self, endpoint: &str) -> Result<Connection, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(CONNECTIONS).map_err(unavailable)?;
            match t.get(endpoint).map_err(unavailable)? {
                Some(v) => decode(v.value()),
                None => Err(StoreError::NotFound(endpoint.to_string())),
            }
        })
    }

    fn list(&self) -> Result<Vec<Connection>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(CONNECTIONS).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
    }

    fn put_if_revision(&self, guards: &[Guard], changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let g = self.db()?;
        let db = g.as_ref().ok_or_else(|| unavailable("closed"))?;
        let tx = db.begin_write().map_err(unavailable)?;
        {
            let mut t = tx.open_table(CONNECTIONS).map_err(unavailable)?;
            let checks = guards
                .iter()
                .map(|g| (&g.endpoint, g.expected))
                .chain(changes.iter().map(|c| (&c.conn.endpoint, c.expected)));
            for (endpoint, expected) in checks {
                let current = match t.get(endpoint.as_str()).map_err(unavailable)? {
                    Some(v) => Some(decode(v.value())?.revision),
                    None => None,
                };
                if current != expected {
                    // Dropped without commit: nothing is written.
                    return Err(StoreError::Conflict(endpoint.clone()));
                }
            }
            let mut meta = tx.open_table(META).map_err(unavailable)?;
            let revision = meta.get(REVISION).map_err(unavailable)?.map_or(0, |v| v.value()) + 1;
            meta.insert(REVISION, revision).map_err(unavailable)?;
            for c in changes {
                let rec = Stored { conn: c.conn.clone(), revision };
                let rec = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                t.insert(c.conn.endpoint.as_str(), rec.as_slice()).map_err(unavailable)?;
            }
        }
        append_audit(&tx, changes)?;
        tx.commit().map_err(|e| unavailable(format!("cannot commit: {e}")))
    }

    fn audit(&self, endpoint: Option<&str>, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(AUDIT).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.range(after.saturating_add(1)..).map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                let e: AuditEntry =
                    serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(format!("audit: {e}")))?;
                if endpoint.is_none_or(|n| n == e.endpoint) {
                    out.push(e);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    fn release(&self) {
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn resume(&self) -> Result<(), StoreError> {
        let db = Database::create(&self.path).map_err(|e| unavailable(format!("{}: {e}", self.path.display())))?;
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use privlink_core::ConnectionState::{self, *};

    fn conn(endpoint: &str, state: ConnectionState) -> Connection {
        Connection {
            endpoint: endpoint.into(),
            service: "svc".into(),
            network: "net".into(),
            tenant: "t".into(),
            state,
            request_message: None,
            response_message: Some("ok".into()),
            created: 1,
            updated: 2,
            decided_by: "config".into(),
            link_id: 7,
            revision: 0,
        }
    }

    /// Writes `c` over what is stored (the revision it was read at).
    fn put(s: &RedbStore, c: Connection, message: Option<&str>, by: &str) -> Result<(), StoreError> {
        let before = s.get(&c.endpoint).ok();
        s.put_if_revision(
            &[],
            &[Change {
                from: before.as_ref().map(|b| b.state),
                expected: before.map(|b| b.revision),
                conn: c,
                message: message.map(str::to_string),
                by: by.to_string(),
            }],
        )
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("privlink-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn put_get_list_and_audit() {
        let dir = tmp("basic");
        let s = RedbStore::open(&dir).expect("open");
        assert_eq!(s.get("pe"), Err(StoreError::NotFound("pe".into())));
        put(&s, conn("pe", Pending), None, "config").expect("put");
        put(&s, conn("pe", Approved), Some("welcome"), "operator").expect("put");
        put(&s, conn("other", Pending), None, "config").expect("put");
        assert_eq!(s.get("pe").map(|c| c.state), Ok(Approved));
        assert_eq!(s.list().expect("list").len(), 2);
        let trail = s.audit(Some("pe"), 0, 100).expect("audit");
        assert_eq!(trail.len(), 2);
        assert_eq!((trail[1].seq, trail[1].from, trail[1].to), (2, Some(Pending), Approved));
        assert_eq!(trail[1].message.as_deref(), Some("welcome"));
        assert_eq!(s.audit(None, 0, 100).expect("audit").len(), 3);
        assert_eq!(s.audit(None, 1, 1).expect("page").iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
        drop(s);
        // Reopened cleanly: everything is still there.
        let s = RedbStore::open(&dir).expect("reopen");
        assert_eq!(s.get("pe").map(|c| c.state), Ok(Approved));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_write_at_a_stale_revision_is_refused_whole() {
        let dir = tmp("cas");
        let s = RedbStore::open(&dir).expect("open");
        put(&s, conn("a", Pending), None, "config").expect("put");
        put(&s, conn("b", Pending), None, "config").expect("put");
        let (a, b) = (s.get("a").expect("a"), s.get("b").expect("b"));
        assert!(a.revision > 0 && b.revision > a.revision, "{} {}", a.revision, b.revision);
        // Someone else approves `b` after we read it.
        put(&s, conn("b", Approved), None, "operator").expect("put");
        let stale = [a.clone(), b.clone()].map(|c| Change {
            from: Some(c.state),
            expected: Some(c.revision),
            conn: Connection { state: Rejected, ..c },
            message: None,
            by: "operator".into(),
        });
        assert_eq!(s.put_if_revision(&[], &stale), Err(StoreError::Conflict("b".into())));
        // Nothing of the batch was written, `a` included.
        assert_eq!(s.get("a").map(|c| (c.state, c.revision)), Ok((Pending, a.revision)));
        assert_eq!(s.get("b").map(|c| c.state), Ok(Approved));
        assert_eq!(s.audit(None, 0, 100).expect("audit").len(), 3);
        // Creating what exists is a conflict too.
        let create = Change { conn: conn("a", Approved), from: None, expected: None, message: None, by: "x".into() };
        assert_eq!(s.put_if_revision(&[], &[create]), Err(StoreError::Conflict("a".into())));
        // A guard on a record the batch does not write: `b` moved since.
        let guard = Guard { endpoint: "b".into(), expected: Some(b.revision) };
        let write_a = Change {
            from: Some(Pending),
            expected: Some(a.revision),
            conn: Connection { state: Approved, ..a.clone() },
            message: None,
            by: "config".into(),
        };
        assert_eq!(s.put_if_revision(&[guard], std::slice::from_ref(&write_a)), Err(StoreError::Conflict("b".into())));
        assert_eq!(s.get("a").map(|c| c.state), Ok(Pending));
        let guard = Guard { endpoint: "b".into(), expected: Some(s.get("b").expect("b").revision) };
        s.put_if_revision(&[guard], &[write_a]).expect("b as read");
        // Released for a hand-over: unavailable until resumed.
        s.release();
        assert!(matches!(s.list(), Err(StoreError::Unavailable(_))));
        s.resume().expect("resume");
        assert_eq!(s.list().map(|l| l.len()), Ok(2));
        assert_eq!(s.get("a").map(|c| c.state), Ok(Approved));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_written_before_revisions_reads_and_takes_writes() {
        // The old format: records without a revision, no meta table.
        let dir = tmp("old");
        std::fs::create_dir_all(&dir).expect("dir");
        {
            let db = Database::create(dir.join("connections.redb")).expect("create");
            let tx = db.begin_write().expect("tx");
            {
                let mut t = tx.open_table(CONNECTIONS).expect("table");
                let old = r#"{"endpoint":"pe","service":"s","network":"n","tenant":"t","state":"pending",
                    "request_message":null,"response_message":null,"created":1,"updated":1,"decided_by":"config","link_id":9}"#;
                t.insert("pe", old.as_bytes()).expect("insert");
                tx.open_table(AUDIT).expect("audit");
            }
            tx.commit().expect("commit");
        }
        let s = RedbStore::open(&dir).expect("open");
        let c = s.get("pe").expect("old record");
        assert_eq!((c.state, c.revision, c.link_id), (Pending, 0, 9));
        put(&s, Connection { state: Approved, ..c }, None, "operator").expect("write at revision 0");
        assert_eq!(s.get("pe").map(|c| (c.state, c.revision)), Ok((Approved, 1)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn committed_state_survives_a_crash() {
        // A crash is simulated by copying the file while the database is
        // still open, as the disk would hold it had the process died right
        // after the commit, then opening the copy.
        let dir = tmp("crash");
        let s = RedbStore::open(&dir).expect("open");
        put(&s, conn("pe", Pending), None, "config").expect("put");
        put(&s, conn("pe", Approved), None, "operator").expect("put");
        let crashed = tmp("crash-copy");
        std::fs::create_dir_all(&crashed).expect("dir");
        std::fs::copy(dir.join("connections.redb"), crashed.join("connections.redb")).expect("copy");
        // More work after the "crash" point does not reach the copy.
        put(&s, conn("pe", Rejected), None, "operator").expect("put");
        let r = RedbStore::open(&crashed).expect("open after crash");
        assert_eq!(r.get("pe").map(|c| c.state), Ok(Approved));
        assert_eq!(r.audit(None, 0, 100).expect("audit").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&crashed);
    }
}
