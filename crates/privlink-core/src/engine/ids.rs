//! Every id privlink gives out, in one place: network, endpoint and NAT
//! pool ids (which flow slots and per-network counters name), and the
//! connection link ids PROXY TLVs carry.
//!
//! Why one place: the ids outlive a process. A flow slot in the shared
//! table names its endpoint and pool by id, a consumer key its network; a
//! successor seeded with the ids of the process before it ([`Ids`],
//! [`Engine::seed_ids`](crate::Engine::seed_ids)) must give the same thing
//! the same id and never give a new thing an id a slot may still hold.
//! With allocation spread over the daemon and the reload code, each had
//! its own rule for both; here there is one: an id seeded for a thing that
//! is configured again unchanged is given back, any other thing gets the
//! next id never given out, and ids are never reused within an engine's
//! life.

use crate::error::CoreError;
use crate::restart::{EndpointSeedKey, Ids, PoolSeedKey};
use crate::types::{EndpointId, NetworkId, PoolId};
use std::collections::HashMap;

/// The allocator (kept under the engine's apply lock).
#[derive(Debug, Default)]
pub(crate) struct IdAllocator {
    /// Ids at or above these were never given out.
    pub(crate) next_endpoint: u32,
    pub(crate) next_pool: u32,
    pub(crate) next_network: u32,
    seeds_endpoints: HashMap<EndpointSeedKey, EndpointId>,
    seeds_pools: HashMap<PoolSeedKey, PoolId>,
    seeds_networks: HashMap<String, NetworkId>,
}

impl IdAllocator {
    /// Takes `ids` (what a process before gave out) as seeds, and never
    /// gives out an id they may still name.
    pub(crate) fn seed(&mut self, ids: &Ids) {
        self.next_endpoint = self.next_endpoint.max(ids.next_endpoint);
        self.next_pool = self.next_pool.max(ids.next_pool);
        self.next_network = self.next_network.max(ids.next_network);
        for e in &ids.endpoints {
            self.seeds_endpoints.insert((e.name.clone(), e.network.clone(), e.ip, e.service.clone()), e.id);
            self.next_endpoint = self.next_endpoint.max(e.id.0 + 1);
        }
        for p in &ids.pools {
            self.seeds_pools.insert((p.service.clone(), p.nat_ip, p.protocol, p.first, p.last), p.id);
            self.next_pool = self.next_pool.max(p.id.0);
        }
        for (name, id) in &ids.networks {
            self.seeds_networks.insert(name.clone(), NetworkId(*id));
            self.next_network = self.next_network.max(u32::from(*id) + 1);
        }
    }

    /// The id of an endpoint now configured as `key` (name, network,
    /// address, service). Endpoint ids fit the 24 bits a flow slot keeps
    /// ([`crate::flow::MAX_ENDPOINT_ID`]): past that,
    /// [`CoreError::TooManyEndpoints`].
    pub(crate) fn endpoint(&mut self, key: EndpointSeedKey) -> Result<EndpointId, CoreError> {
        if let Some(id) = self.seeds_endpoints.remove(&key) {
            return Ok(id);
        }
        if self.next_endpoint > crate::flow::MAX_ENDPOINT_ID {
            return Err(CoreError::TooManyEndpoints);
        }
        self.next_endpoint += 1;
        Ok(EndpointId(self.next_endpoint - 1))
    }

    /// The id of a NAT pool now configured as `key` (service, NAT IP,
    /// protocol, port range). Pool ids start at 1 (0 is no pool).
    pub(crate) fn pool(&mut self, key: PoolSeedKey) -> PoolId {
        self.seeds_pools.remove(&key).unwrap_or_else(|| {
            self.next_pool += 1;
            PoolId(self.next_pool)
        })
    }

    /// The id of a network attached under `name` (its device made or
    /// re-attached). 65,536 networks at most over an engine's life (a
    /// consumer key keeps 16 bits): past that, [`CoreError::TooManyNetworks`].
    pub(crate) fn network(&mut self, name: &str) -> Result<NetworkId, CoreError> {
        if let Some(id) = self.seeds_networks.remove(name) {
            return Ok(id);
        }
        let id = u16::try_from(self.next_network).map_err(|_| CoreError::TooManyNetworks)?;
        self.next_network += 1;
        Ok(NetworkId(id))
    }
}

/// A new connection's link id from 64 random bits: 63 bits, odd, so never
/// 0 (which marks a record from before link ids) and positive in every
/// language's signed 64-bit integer.
pub fn link_id(random: u64) -> u64 {
    random >> 1 | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restart::{EndpointIdEntry, PoolIdEntry};
    use crate::types::Protocol;
    use std::net::Ipv4Addr;

    #[test]
    fn seeded_ids_come_back_and_new_ones_never_collide_with_them() {
        let ip = std::net::IpAddr::from(Ipv4Addr::new(10, 1, 0, 5));
        let ids = Ids {
            next_endpoint: 3,
            next_pool: 4,
            next_network: 2,
            endpoints: vec![EndpointIdEntry {
                id: EndpointId(7),
                name: "pe".into(),
                network: "n".into(),
                ip,
                service: "s".into(),
            }],
            pools: vec![PoolIdEntry {
                id: PoolId(9),
                service: "s".into(),
                nat_ip: ip,
                protocol: Protocol::Tcp,
                first: 1,
                last: 2,
            }],
            networks: vec![("n".into(), 5)],
        };
        let mut a = IdAllocator::default();
        a.seed(&ids);
        let key = || ("pe".to_string(), "n".to_string(), ip, "s".to_string());
        assert_eq!(a.endpoint(key()), Ok(EndpointId(7)));
        // Given once: the same thing configured anew gets a new id.
        assert_eq!(a.endpoint(key()), Ok(EndpointId(8)));
        assert_eq!(a.pool(("s".into(), ip, Protocol::Tcp, 1, 2)), PoolId(9));
        assert_eq!(a.pool(("s".into(), ip, Protocol::Udp, 1, 2)), PoolId(10));
        assert_eq!(a.network("n"), Ok(NetworkId(5)));
        assert_eq!(a.network("m"), Ok(NetworkId(6)));
        a.next_network = u32::from(u16::MAX) + 1;
        assert_eq!(a.network("x"), Err(CoreError::TooManyNetworks));
        a.next_endpoint = crate::flow::MAX_ENDPOINT_ID + 1;
        assert_eq!(a.endpoint(("q".into(), "n".into(), ip, "s".into())), Err(CoreError::TooManyEndpoints));
    }

    #[test]
    fn link_ids_are_odd_and_positive() {
        for r in [0, 1, u64::MAX, 0x8000_0000_0000_0000] {
            let id = link_id(r);
            assert!(id & 1 == 1 && (id as i64) > 0, "{r:#x} -> {id:#x}");
        }
    }
}
