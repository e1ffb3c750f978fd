//! Where connection states and their audit trail are kept: the
//! [`ConnectionStore`] interface, its records and its errors.
//!
//! Why an interface: a single host keeps its connections in a local
//! transactional file ([`RedbStore`]); a fleet of hosts keeps them in a
//! shared store (etcd), where another host may change a record between a
//! read and a write. So every write here is conditional, as etcd's are: a
//! record carries the *revision* it was read at, and
//! [`put_if_revision`](ConnectionStore::put_if_revision) writes a batch of
//! changes only if none of their records changed since (a compare-and-swap
//! per record, all or nothing, each change with its audit entry). What to
//! write is decided elsewhere, by pure functions ([`crate::approval`]); the
//! API turns the typed [`StoreError`]s into 404, 409 and 503.

pub mod etcd;
mod fleet;
pub mod lease;
mod redb;

pub use self::fleet::EtcdStore;
pub use self::redb::RedbStore;

use privlink_core::ConnectionState;
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// One endpoint's connection to its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub endpoint: String,
    pub service: String,
    pub network: String,
    pub tenant: String,
    /// Stored as its name (`pending`, `approved`, `rejected`,
    /// `disconnected`), as records have always been.
    #[serde(with = "state_name")]
    pub state: ConnectionState,
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
    /// Allocated by [`privlink_core::ids::link_id`].
    #[serde(default)]
    pub link_id: u64,
    /// The store's revision of this record when it was read (0: a record
    /// written before revisions were kept); not part of what is stored or
    /// shown. A write names it to say "only if nobody changed it since".
    #[serde(skip)]
    pub revision: u64,
}

/// A connection record to write, with what its audit entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub conn: Connection,
    /// The state before (`None`: a new record).
    pub from: Option<ConnectionState>,
    /// The record's revision when read: the write happens only if it is
    /// still that (`None`: only if there is no record).
    pub expected: Option<u64>,
    pub message: Option<String>,
    /// `operator` (control API) or `config` (start or reload).
    pub by: String,
}

/// A record a batch was decided from but does not write: the batch is
/// written only if it is still at `expected` (`None`: still absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub endpoint: String,
    pub expected: Option<u64>,
}

/// One change, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    pub endpoint: String,
    #[serde(with = "state_name::option")]
    pub from: Option<ConnectionState>,
    #[serde(with = "state_name")]
    pub to: ConnectionState,
    pub message: Option<String>,
    /// `operator` (control API) or `config` (start or reload).
    pub by: String,
}

/// What a store operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No record for this endpoint.
    #[error("no connection for endpoint `{0}`")]
    NotFound(String),
    /// The record changed since it was read (another writer, another
    /// host): read it again and decide again.
    #[error("the connection of endpoint `{0}` changed meanwhile; try again")]
    Conflict(String),
    /// The store cannot be reached or written now (handed to a successor,
    /// an I/O error, a server away): the request may succeed later.
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    /// A record that does not parse.
    #[error("corrupt record in the state store: {0}")]
    Corrupt(String),
}

/// An etcd request that failed: the store cannot be reached now.
impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!("etcd: {e}"))
    }
}

/// The connection store. Implementations: [`RedbStore`] (one host),
/// [`EtcdStore`] (a fleet).
pub trait ConnectionStore: Send + Sync + std::fmt::Debug {
    /// The record of `endpoint`, with its revision.
    fn get(&self, endpoint: &str) -> Result<Connection, StoreError>;
    /// Every record, with its revision.
    fn list(&self) -> Result<Vec<Connection>, StoreError>;
    /// Writes every change and its audit entry, all or nothing, if each
    /// record's revision is still its change's `expected` and each
    /// guard's record still its guard's (what the batch was decided from
    /// but does not write); else [`StoreError::Conflict`] naming the first
    /// that moved, and nothing is written. Returns when the write is
    /// durable.
    fn put_if_revision(&self, guards: &[Guard], changes: &[Change]) -> Result<(), StoreError>;
    /// At most `limit` audit entries after sequence number `after`,
    /// optionally of one endpoint, oldest first.
    fn audit(&self, endpoint: Option<&str>, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Lets go of what one process at a time may hold (a hand-over
    /// follows); until [`resume`](Self::resume), calls fail as
    /// [`StoreError::Unavailable`]. Nothing to do for a shared store.
    fn release(&self) {}
    /// Takes the store back after a hand-over that did not happen.
    fn resume(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether other hosts share these records (a fleet's etcd): then a
    /// record may be another host's endpoint's.
    fn shared(&self) -> bool {
        false
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A [`ConnectionState`] as its name, for serde.
mod state_name {
    use privlink_core::ConnectionState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &ConnectionState, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<ConnectionState, D::Error> {
        let name = String::deserialize(de)?;
        ConnectionState::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown connection state `{name}`")))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(s: &Option<ConnectionState>, ser: S) -> Result<S::Ok, S::Error> {
            match s {
                Some(s) => ser.serialize_some(s.as_str()),
                None => ser.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<ConnectionState>, D::Error> {
            match Option::<String>::deserialize(de)? {
                None => Ok(None),
                Some(name) => ConnectionState::parse(&name)
                    .map(Some)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown connection state `{name}`"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_before_typed_states_and_revisions_still_read() {
        // A record and an audit entry as the store wrote them before.
        let old = r#"{"endpoint":"pe","service":"s","network":"n","tenant":"t","state":"approved",
            "request_message":null,"response_message":"ok","created":1,"updated":2}"#;
        let c: Connection = serde_json::from_str(old).expect("reads");
        assert_eq!((c.state, c.link_id, c.revision, c.decided_by.as_str()), (ConnectionState::Approved, 0, 0, ""));
        let again: serde_json::Value = serde_json::to_value(&c).expect("json");
        assert_eq!(again["state"], "approved");
        assert!(again.get("revision").is_none());
        let old = r#"{"seq":3,"at":2,"endpoint":"pe","from":"pending","to":"rejected","message":null,"by":"operator"}"#;
        let a: AuditEntry = serde_json::from_str(old).expect("reads");
        assert_eq!((a.from, a.to), (Some(ConnectionState::Pending), ConnectionState::Rejected));
        assert_eq!(serde_json::to_value(&a).expect("json")["from"], "pending");
        let bad = old.replace("rejected", "maybe");
        let err = serde_json::from_str::<AuditEntry>(&bad).expect_err("refused");
        assert!(err.to_string().contains("unknown connection state `maybe`"), "{err}");
    }
}
