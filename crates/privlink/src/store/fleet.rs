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
    /// Where the records last listed are kept (`None`: nowhere).
    copy: Option<std::path::PathBuf>,
}

fn down(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
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
        let copy = Some(state_dir.join("store-connections.json"));
        let s = EtcdStore { etcd, local, remote: Mutex::new(HashMap::new()), copy };
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
        let Some(path) = &self.copy else { return };
        let rows: Vec<serde_json::Value> =
            list.iter().map(|c| serde_json::json!({ "revision": c.revision, "record": c })).collect();
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec(&rows)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::warn!("cannot keep a copy of the connection records in {}: {e}", path.display());
        }
    }

    fn copy(&self) -> Option<Vec<Connection>> {
        let bytes = std::fs::read(self.copy.as_ref()?).ok()?;
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
        let kvs =
            self.etcd.block(|mut c| async move { c.get(own, None).await.map(|mut r| r.take_kvs()) }).map_err(down)?;
        if let Some(kv) = kvs.first() {
            self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(endpoint);
            return decode(kv.key(), kv.value(), kv.mod_revision());
        }
        // Another host's endpoint?
        let hosts = format!("{}/hosts/", self.etcd.layout.prefix);
        let suffix = format!("/connections/{endpoint}");
        let kvs = self
            .etcd
            .block(|mut c| async move {
                c.get(hosts, Some(GetOptions::new().with_prefix())).await.map(|mut r| r.take_kvs())
            })
            .map_err(down)?;
        let found: Vec<_> = kvs.iter().filter(|kv| kv.key().ends_with(suffix.as_bytes())).collect();
        match found.as_slice() {
            [] => Err(StoreError::NotFound(endpoint.to_string())),
            [kv] => {
                let key = String::from_utf8_lossy(kv.key()).to_string();
                self.remote.lock().unwrap_or_else(|e| e.into_inner()).insert(endpoint.to_string(), key);
                decode(kv.key(), kv.value(), kv.mod_revision())
            }
            many => Err(StoreError::Corrupt(format!(
                "endpoint `{endpoint}` is on {} hosts ({}): endpoint names must be unique in a fleet",
                many.len(),
                many.iter().map(|kv| String::from_utf8_lossy(kv.key()).to_string()).collect::<Vec<_>>().join(", ")
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
                self.keep_copy(&list);
                Ok(list)
            }
            // etcd away: the records as last read (a start meanwhile runs
            // on them; any write still waits for etcd).
            Err(e) => self.copy().ok_or_else(|| down(e)),
        }
    }

    fn put_if_revision(&self, guards: &[Guard], changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let check = |endpoint: &str, expected: Option<u64>| {
            let key = self.key(endpoint);
            match expected {
                None => Compare::version(key, CompareOp::Equal, 0),
                Some(r) => Compare::mod_revision(key, CompareOp::Equal, r as i64),
            }
        };
        let mut when: Vec<Compare> = guards.iter().map(|g| check(&g.endpoint, g.expected)).collect();
        when.extend(changes.iter().map(|c| check(&c.conn.endpoint, c.expected)));
        let mut ops = Vec::with_capacity(changes.len());
        for c in changes {
            let value = serde_json::to_string(&c.conn).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            ops.push(TxnOp::put(self.key(&c.conn.endpoint), value, None));
        }
        // etcd's --max-txn-ops bounds the compares and the puts alike.
        if when.len() > super::etcd::MAX_TXN_OPS {
            return Err(StoreError::Unavailable(format!(
                "{} connection records in one change: etcd takes at most {} per transaction",
                when.len(),
                super::etcd::MAX_TXN_OPS
            )));
        }
        let ok = self
            .etcd
            .block(|mut c| async move { c.txn(Txn::new().when(when).and_then(ops)).await.map(|r| r.succeeded()) })
            .map_err(down)?;
        if !ok {
            let first = changes.first().map_or(String::new(), |c| c.conn.endpoint.clone());
            return Err(StoreError::Conflict(first));
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
