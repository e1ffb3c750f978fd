//! Connection states shared by a fleet: the [`ConnectionStore`] over etcd
//! (`[store]`). A host's records are the keys
//! `<prefix>/hosts/<host>/connections/<endpoint>` (JSON, as the local
//! store keeps them); a record's revision is its key's `mod_revision`, so
//! a write is a transaction comparing each record's revision, as
//! [`ConnectionStore::put_if_revision`] promises. The audit trail stays on
//! each host, in its local store: it records the decisions made there.
//!
//! Any host's operator may decide any host's connection: a record not
//! found under this host is looked for under every host (endpoint names
//! must then be unique in the fleet; two hosts with one name are refused
//! as ambiguous). The endpoint's own host sees the key change through its
//! watch and applies it, as a reload does.

use super::etcd::Etcd;
use super::{AuditEntry, Change, Connection, ConnectionStore, Guard, RedbStore, StoreError};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Connection records in etcd, audit entries in the host's local store.
#[derive(Debug)]
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    local: Arc<RedbStore>,
    /// Keys of other hosts' records read by [`get`](ConnectionStore::get),
    /// so that a write goes back to the same key.
    remote: Mutex<HashMap<String, String>>,
    /// Where the records last listed are kept, and what was written there
    /// last (written again only when it changes).
    copy: std::path::PathBuf,
    copied: Mutex<Vec<u8>>,
}

fn decode(key: &[u8], value: &[u8], revision: i64) -> Result<Connection, StoreError> {
    let c: Connection = serde_json::from_slice(value)
        .map_err(|e| StoreError::Corrupt(format!("etcd:{}: {e}", String::from_utf8_lossy(key))))?;
    Ok(Connection { revision: revision as u64, ..c })
}

impl EtcdStore {
    /// Over `etcd`, with `local` for the audit trail. Records the local
    /// store holds that etcd has not (a host joining a fleet) are copied
    /// in, only where absent: approvals made before are kept.
    ///
    /// The records last listed are kept in `state_dir`
    /// (`store-connections.json`): while etcd cannot be reached, listing
    /// answers them (a start during an outage), and writes wait.
    pub fn open(etcd: Arc<Etcd>, local: Arc<RedbStore>, state_dir: &std::path::Path) -> Result<EtcdStore, StoreError> {
        let copy = state_dir.join("store-connections.json");
        let s = EtcdStore { etcd, local, remote: Mutex::new(HashMap::new()), copy, copied: Mutex::new(Vec::new()) };
        let have: Vec<String> = s.list()?.into_iter().map(|c| c.endpoint).collect();
        for c in s.local.list()? {
            if have.contains(&c.endpoint) {
                continue;
            }
            let key = s.key(&c.endpoint);
            let value = serde_json::to_string(&c).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let r = s.etcd.block(|mut cl| async move {
                let t = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value, None)]);
                cl.txn(t).await.map(drop)
            });
            if let Err(e) = r {
                // etcd away (started from the copy): copied at a later start.
                tracing::warn!("cannot copy the local connection records into etcd now: {e}");
                break;
            }
            tracing::info!(endpoint = %c.endpoint, state = %c.state, "connection copied from the local store into etcd");
        }
        Ok(s)
    }

    /// Keeps `list` (with revisions) in the state directory.
    fn keep_copy(&self, list: &[Connection]) {
        let rows: Vec<serde_json::Value> =
            list.iter().map(|c| serde_json::json!({ "revision": c.revision, "record": c })).collect();
        let Ok(bytes) = serde_json::to_vec(&rows) else { return };
        let mut copied = self.copied.lock().unwrap_or_else(|e| e.into_inner());
        if *copied == bytes {
            return;
        }
        match crate::state::write_atomic(&self.copy, &bytes) {
            Ok(()) => *copied = bytes,
            Err(e) => tracing::warn!("cannot keep a copy of the connection records: {e:#}"),
        }
    }

    fn copy(&self) -> Option<Vec<Connection>> {
        let bytes = std::fs::read(&self.copy).ok()?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
        rows.into_iter()
            .map(|r| {
                let c: Connection = serde_json::from_value(r["record"].clone()).ok()?;
                Some(Connection { revision: r["revision"].as_u64()?, ..c })
            })
            .collect()
    }

    fn root(&self) -> String {
        format!("{}connections/", self.etcd.layout.host_root())
    }

    fn key(&self, endpoint: &str) -> String {
        if let Some(k) = self.remote.lock().unwrap_or_else(|e| e.into_inner()).get(endpoint) {
            return k.clone();
        }
        format!("{}{endpoint}", self.root())
    }
}

impl ConnectionStore for EtcdStore {
    fn get(&self, endpoint: &str) -> Result<Connection, StoreError> {
        let own = format!("{}{endpoint}", self.root());
        let kvs = self.etcd.block(|mut c| async move { c.get(own, None).await.map(|mut r| r.take_kvs()) })?;
        let mine = kvs.first().map(|kv| decode(kv.key(), kv.value(), kv.mod_revision())).transpose()?;
        if let Some(c) = mine.as_ref().filter(|c| c.state != privlink_core::ConnectionState::Disconnected) {
            self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(endpoint);
            return Ok(c.clone());
        }
        // Another host's endpoint (one that moved leaves a disconnected
        // record behind: the live one wins)?
        let hosts = format!("{}/hosts/", self.etcd.layout.prefix);
        let suffix = format!("/connections/{endpoint}");
        let own_key = format!("{}{endpoint}", self.root());
        let kvs = self.etcd.block(|mut c| async move {
            c.get(hosts, Some(GetOptions::new().with_prefix())).await.map(|mut r| r.take_kvs())
        })?;
        let mut live = Vec::new();
        for kv in kvs.iter().filter(|kv| kv.key().ends_with(suffix.as_bytes()) && kv.key() != own_key.as_bytes()) {
            let c = decode(kv.key(), kv.value(), kv.mod_revision())?;
            if c.state != privlink_core::ConnectionState::Disconnected {
                live.push((String::from_utf8_lossy(kv.key()).to_string(), c));
            }
        }
        match (live.len(), mine) {
            (1, _) => {
                let (key, c) = live.remove(0);
                self.remote.lock().unwrap_or_else(|e| e.into_inner()).insert(endpoint.to_string(), key);
                Ok(c)
            }
            (0, Some(c)) => {
                self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(endpoint);
                Ok(c)
            }
            (0, None) => Err(StoreError::NotFound(endpoint.to_string())),
            (n, _) => Err(StoreError::Corrupt(format!(
                "endpoint `{endpoint}` is live on {n} hosts ({}): endpoint names must be unique in a fleet",
                live.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    fn list(&self) -> Result<Vec<Connection>, StoreError> {
        let root = self.root();
        let kvs = self.etcd.block(|mut c| async move {
            c.get(root, Some(GetOptions::new().with_prefix())).await.map(|mut r| r.take_kvs())
        });
        match kvs {
            Ok(kvs) => {
                let list: Vec<Connection> =
                    kvs.iter().map(|kv| decode(kv.key(), kv.value(), kv.mod_revision())).collect::<Result<_, _>>()?;
                // Records of this host are written at this host's keys.
                let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
                for c in &list {
                    remote.remove(&c.endpoint);
                }
                drop(remote);
                self.keep_copy(&list);
                Ok(list)
            }
            // etcd away: the records as last read (a start meanwhile runs
            // on them; any write still waits for etcd).
            Err(e) => self.copy().ok_or_else(|| StoreError::from(e)),
        }
    }

    fn put_if_revision(&self, guards: &[Guard], changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        // A new record is always this host's own; a decision on another
        // host's goes back to the key it was read from.
        let key_of = |c: &Change| match c.expected {
            None => format!("{}{}", self.root(), c.conn.endpoint),
            Some(_) => self.key(&c.conn.endpoint),
        };
        let check = |key: String, expected: Option<u64>| match expected {
            None => Compare::version(key, CompareOp::Equal, 0),
            Some(r) => Compare::mod_revision(key, CompareOp::Equal, r as i64),
        };
        let mut puts = Vec::with_capacity(changes.len());
        for c in changes {
            let value = serde_json::to_string(&c.conn).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            puts.push(TxnOp::put(key_of(c), value, None));
        }
        let max = super::etcd::MAX_TXN_OPS;
        let first = changes.first().map_or(String::new(), |c| c.conn.endpoint.clone());
        if guards.len() + changes.len() <= max {
            // One compare per record, one transaction.
            let mut when: Vec<Compare> =
                guards.iter().map(|g| check(format!("{}{}", self.root(), g.endpoint), g.expected)).collect();
            when.extend(changes.iter().map(|c| check(key_of(c), c.expected)));
            let ok = self.etcd.block(|mut c| async move {
                c.txn(Txn::new().when(when).and_then(puts)).await.map(|r| r.succeeded())
            })?;
            if !ok {
                return Err(StoreError::Conflict(first));
            }
        } else {
            // More records than etcd takes compares (--max-txn-ops): read
            // this host's records at revision R and check every expected
            // revision against them (as one transaction would), then write
            // in chunks, each under one compare over the whole range
            // ("nothing here changed since R", then since the chunk
            // before). A conflict part way leaves the chunks before it, each
            // a valid state; the caller reads and decides again.
            let root = self.root();
            if changes.iter().any(|c| !key_of(c).starts_with(&root)) {
                return Err(StoreError::Conflict(first));
            }
            let r2 = root.clone();
            let (now, mut since) = self.etcd.block(|mut c| async move {
                c.get(r2, Some(GetOptions::new().with_prefix().with_keys_only())).await.map(|mut r| {
                    let at = r.header().map_or(0, |h| h.revision());
                    let revs: HashMap<String, u64> = r
                        .take_kvs()
                        .iter()
                        .map(|kv| (String::from_utf8_lossy(kv.key()).to_string(), kv.mod_revision() as u64))
                        .collect();
                    (revs, at)
                })
            })?;
            let expected = guards
                .iter()
                .map(|g| (format!("{root}{}", g.endpoint), g.expected, &g.endpoint))
                .chain(changes.iter().map(|c| (key_of(c), c.expected, &c.conn.endpoint)));
            for (key, want, endpoint) in expected {
                if now.get(&key).copied() != want {
                    return Err(StoreError::Conflict(endpoint.clone()));
                }
            }
            let mut puts = puts.into_iter().peekable();
            while puts.peek().is_some() {
                let chunk: Vec<TxnOp> = puts.by_ref().take(max).collect();
                let cmp = Compare::mod_revision(root.clone(), CompareOp::Less, since + 1).with_prefix();
                let (ok, at) = self.etcd.block(|mut c| async move {
                    c.txn(Txn::new().when([cmp]).and_then(chunk))
                        .await
                        .map(|r| (r.succeeded(), r.header().map_or(0, |h| h.revision())))
                })?;
                if !ok {
                    return Err(StoreError::Conflict(first));
                }
                since = at;
            }
        }
        if let Err(e) = self.local.append_audit(changes) {
            tracing::warn!("connection change written to etcd, but not to the local audit trail: {e}");
        }
        Ok(())
    }

    fn audit(&self, endpoint: Option<&str>, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.local.audit(endpoint, after, limit)
    }

    fn release(&self) {
        self.local.release();
    }

    fn resume(&self) -> Result<(), StoreError> {
        self.local.resume()
    }

    fn shared(&self) -> bool {
        true
    }
}
