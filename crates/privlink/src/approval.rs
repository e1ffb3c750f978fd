//! The connection approval workflow as pure functions: the configuration
//! and the stored records in, the states and the changes to write out.
//! Nothing here reads a clock, a store or a random source; the callers
//! (`control.rs`: start, reload, the API) pass them in and write what
//! comes back with a compare-and-swap ([`ConnectionStore::put_if_revision`](crate::store::ConnectionStore::put_if_revision)),
//! deciding again from fresh records when another writer got there first.
//!
//! The rules follow Private Link: an endpoint whose tenant is not in its
//! service's `visibility` is `rejected` and never connects; a visible
//! tenant in `auto_approve` is `approved` at once; any other starts
//! `pending` and carries nothing until an operator approves it. An
//! endpoint that leaves the config (with or without its service) becomes
//! `disconnected`.

use crate::store::{Change, Connection, Guard};
use privlink_config::Config;
use privlink_core::ConnectionState;
use std::collections::HashMap;

/// The state an endpoint's connection should have under `config`, given
/// what the store remembers.
pub fn desired_state(config: &Config, ep: &privlink_config::Endpoint, stored: Option<&Connection>) -> ConnectionState {
    use ConnectionState::*;
    let (Some(net), Some(svc)) = (config.network(&ep.network), config.service(&ep.service)) else {
        return Disconnected;
    };
    if !svc.visible_to(&net.tenant) {
        return Rejected;
    }
    match stored {
        // A pending connection of a tenant that auto-approval now covers is
        // approved, as Azure approves pending connections when a
        // subscription is added to auto-approval.
        Some(c) if c.state == Pending && svc.auto_approves(&net.tenant) => Approved,
        // The operator's word stands while the endpoint is the same link
        // (a rejection the config made for visibility is re-evaluated).
        Some(c)
            if c.service == ep.service
                && c.tenant == net.tenant
                && c.state != Disconnected
                && !(c.state == Rejected && c.decided_by == "config") =>
        {
            c.state
        }
        _ if svc.auto_approves(&net.tenant) => Approved,
        _ => Pending,
    }
}

/// What bringing the store in line with a configuration takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every configured endpoint's state.
    pub states: HashMap<String, ConnectionState>,
    /// The records to write (new connections, changed states, endpoints
    /// gone), each at the revision it was read at.
    pub changes: Vec<Change>,
    /// Every record read and not written, at the revision it was read at:
    /// `states` hold only while none of them moved.
    pub guards: Vec<Guard>,
}

/// The plan for `config` over the `stored` records at unix time `now`; a
/// new connection's link id is `new_link_id()`
/// ([`privlink_core::ids::link_id`] of a random number).
pub fn plan(config: &Config, stored: Vec<Connection>, now: u64, new_link_id: &mut dyn FnMut() -> u64) -> Plan {
    let mut states = HashMap::new();
    let mut all: HashMap<String, Connection> = stored.into_iter().map(|c| (c.endpoint.clone(), c)).collect();
    let mut changes = Vec::new();
    let mut guards = Vec::new();
    for ep in &config.endpoints {
        let stored = all.remove(&ep.name);
        let state = desired_state(config, ep, stored.as_ref());
        let tenant = config.network(&ep.network).map(|n| n.tenant.clone()).unwrap_or_default();
        // A connection keeps its link id for its life; a new one (or a
        // record from before link ids) gets a fresh one.
        let link_id = stored
            .as_ref()
            .filter(|c| c.state != ConnectionState::Disconnected && c.link_id != 0)
            .map_or_else(&mut *new_link_id, |c| c.link_id);
        let same = stored.as_ref().is_some_and(|c| {
            c.state == state
                && c.service == ep.service
                && c.network == ep.network
                && c.tenant == tenant
                && c.link_id == link_id
        });
        if !same {
            let why = match state {
                ConnectionState::Rejected => {
                    format!("tenant {tenant} is not in the visibility of service {}", ep.service)
                }
                ConnectionState::Approved => "auto-approved".to_string(),
                _ => "connection requested".to_string(),
            };
            let created =
                stored.as_ref().filter(|c| c.state != ConnectionState::Disconnected).map_or(now, |c| c.created);
            let c = Connection {
                endpoint: ep.name.clone(),
                service: ep.service.clone(),
                network: ep.network.clone(),
                tenant,
                state,
                request_message: None,
                response_message: Some(why.clone()),
                created,
                updated: now,
                decided_by: "config".into(),
                link_id,
                revision: 0,
            };
            changes.push(Change {
                conn: c,
                from: stored.as_ref().map(|c| c.state),
                expected: stored.as_ref().map(|c| c.revision),
                message: Some(why),
                by: "config".into(),
            });
        } else {
            guards.push(Guard { endpoint: ep.name.clone(), expected: stored.as_ref().map(|c| c.revision) });
        }
        states.insert(ep.name.clone(), state);
    }
    // What is left of the store is no longer configured.
    let mut gone: Vec<Connection> = all.into_values().collect();
    gone.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    for c in gone {
        if c.state == ConnectionState::Disconnected || states.contains_key(&c.endpoint) {
            guards.push(Guard { endpoint: c.endpoint.clone(), expected: Some(c.revision) });
        } else {
            let why = "endpoint or service removed from the config";
            changes.push(Change {
                from: Some(c.state),
                expected: Some(c.revision),
                message: Some(why.into()),
                by: "config".into(),
                conn: Connection {
                    state: ConnectionState::Disconnected,
                    response_message: Some(why.into()),
                    updated: now,
                    decided_by: "config".into(),
                    ..c
                },
            });
        }
    }
    Plan { states, changes, guards }
}

/// Why an operator's decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no endpoint `{0}` in the running config")]
    NoEndpoint(String),
    #[error("tenant {tenant} is not in the visibility of service {service}: it cannot be approved")]
    NotVisible { tenant: String, service: String },
}

/// An operator's decision on a stored connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// It already is in that state: nothing to write (the audit records
    /// changes only).
    Unchanged(Connection),
    /// Write this.
    Change(Change),
}

/// An operator moves `stored` (the record of `endpoint`) to `to` with
/// `message`, at unix time `now`.
pub fn decide(
    config: &Config,
    endpoint: &str,
    stored: Connection,
    to: ConnectionState,
    message: Option<String>,
    now: u64,
) -> Result<Decided, Refused> {
    let Some(ep) = config.endpoints.iter().find(|e| e.name == endpoint) else {
        return Err(Refused::NoEndpoint(endpoint.to_string()));
    };
    let (net, svc) = (config.network(&ep.network), config.service(&ep.service));
    if to == ConnectionState::Approved && !net.zip(svc).is_some_and(|(n, s)| s.visible_to(&n.tenant)) {
        return Err(Refused::NotVisible { tenant: stored.tenant.clone(), service: ep.service.clone() });
    }
    if stored.state == to {
        return Ok(Decided::Unchanged(stored));
    }
    Ok(Decided::Change(operator_change(stored, to, message, now)))
}

/// An operator's decision on `stored`: the record moved to `to`, written
/// only if it is still at the revision read.
pub fn operator_change(stored: Connection, to: ConnectionState, message: Option<String>, now: u64) -> Change {
    Change {
        from: Some(stored.state),
        expected: Some(stored.revision),
        message: message.clone(),
        by: "operator".into(),
        conn: Connection {
            state: to,
            response_message: message,
            updated: now,
            decided_by: "operator".into(),
            ..stored
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ConnectionState::*;

    const BASE: &str = r#"
[provider]
tun = "p0"
[[network]]
name = "na"
tenant = "contoso"
tun = "a0"
[[network]]
name = "nb"
tenant = "fabrikam"
tun = "b0"
[[service]]
name = "s"
nat_ips = ["192.168.100.1"]
backends = ["192.168.50.1"]
ports = [{ protocol = "tcp", port = 80 }]
visibility = VIS
auto_approve = ["contoso"]
[[endpoint]]
name = "ea"
network = "na"
ip = "10.0.0.5"
service = "s"
"#;
    const EB: &str = "[[endpoint]]\nname = \"eb\"\nnetwork = \"nb\"\nip = \"10.0.0.5\"\nservice = \"s\"\n";

    /// Two tenants' networks (`na` of contoso, `nb` of fabrikam), service
    /// `s` visible to `vis` and auto-approving contoso, endpoint `ea` in
    /// `na` and, `with_b`, `eb` in `nb`.
    pub(crate) fn cfg(vis: &str, with_b: bool) -> Config {
        let text = BASE.replace("VIS", vis) + if with_b { EB } else { "" };
        Config::parse(&text, "t.toml").expect("valid")
    }

    /// A store in memory: applies a plan's changes as a store would
    /// (revision + 1 per write).
    fn apply(records: &mut Vec<Connection>, changes: &[Change]) {
        for c in changes {
            let rev = records.iter().map(|r| r.revision).max().unwrap_or(0) + 1;
            records.retain(|r| r.endpoint != c.conn.endpoint);
            records.push(Connection { revision: rev, ..c.conn.clone() });
        }
    }

    fn run(records: &mut Vec<Connection>, config: &Config) -> HashMap<String, ConnectionState> {
        let mut next = 100;
        let p = plan(config, records.clone(), 50, &mut || {
            next += 2;
            next - 1
        });
        apply(records, &p.changes);
        p.states
    }

    fn get(records: &[Connection], name: &str) -> Connection {
        records.iter().find(|r| r.endpoint == name).cloned().expect("record")
    }

    #[test]
    fn states_follow_visibility_auto_approval_and_removal() {
        let mut r = Vec::new();
        let st = run(&mut r, &cfg(r#"["*"]"#, true));
        assert_eq!((st["ea"], st["eb"]), (Approved, Pending));
        let link = get(&r, "eb").link_id;
        assert_eq!(link, 103, "new connections get link ids from the caller");
        // An operator's approval is kept across reconciles.
        let Ok(Decided::Change(ch)) = decide(&cfg(r#"["*"]"#, true), "eb", get(&r, "eb"), Approved, None, 60) else {
            panic!("a change")
        };
        assert_eq!((ch.from, ch.expected), (Some(Pending), Some(get(&r, "eb").revision)));
        apply(&mut r, &[ch]);
        assert_eq!(run(&mut r, &cfg(r#"["*"]"#, true))["eb"], Approved);
        // Visibility narrows: rejected by the config.
        assert_eq!(run(&mut r, &cfg(r#"["contoso"]"#, true))["eb"], Rejected);
        // Visibility widens again: re-evaluated (fabrikam is not auto-approved).
        assert_eq!(run(&mut r, &cfg(r#"["*"]"#, true))["eb"], Pending);
        assert_eq!(get(&r, "eb").link_id, link, "a connection keeps its link id");
        // The endpoint leaves the config: disconnected, and the record stays.
        let p = plan(&cfg(r#"["*"]"#, false), r.clone(), 70, &mut || unreachable!("no new connection"));
        assert!(!p.states.contains_key("eb"));
        assert_eq!(p.changes.len(), 1);
        assert_eq!((p.changes[0].conn.state, p.changes[0].from), (Disconnected, Some(Pending)));
        apply(&mut r, &p.changes);
        // Nothing to do twice; what was read is guarded.
        let again = plan(&cfg(r#"["*"]"#, false), r.clone(), 80, &mut || 1);
        assert_eq!(again.changes, []);
        let mut guarded: Vec<_> = again.guards.iter().map(|g| (g.endpoint.as_str(), g.expected)).collect();
        guarded.sort();
        assert_eq!(guarded, [("ea", Some(get(&r, "ea").revision)), ("eb", Some(get(&r, "eb").revision))]);
    }

    #[test]
    fn widening_auto_approve_approves_pending_connections_but_not_rejected_ones() {
        let mut r = Vec::new();
        assert_eq!(run(&mut r, &cfg(r#"["*"]"#, true))["eb"], Pending);
        let widened = || {
            let text = BASE
                .replace("VIS", r#"["*"]"#)
                .replace(r#"auto_approve = ["contoso"]"#, r#"auto_approve = ["contoso", "fabrikam"]"#)
                + EB;
            Config::parse(&text, "t.toml").expect("valid")
        };
        // As Azure does when a subscription joins auto-approval: pending
        // connections of that tenant are approved.
        assert_eq!(run(&mut r, &widened())["eb"], Approved);
        // An operator's rejection stands.
        let Ok(Decided::Change(ch)) = decide(&widened(), "eb", get(&r, "eb"), Rejected, Some("no".into()), 60) else {
            panic!("a change")
        };
        apply(&mut r, &[ch]);
        assert_eq!(run(&mut r, &widened())["eb"], Rejected);
    }

    #[test]
    fn decisions_refused_and_unchanged() {
        let mut r = Vec::new();
        run(&mut r, &cfg(r#"["contoso"]"#, true));
        let c = cfg(r#"["contoso"]"#, true);
        assert_eq!(
            decide(&c, "eb", get(&r, "eb"), Approved, None, 1),
            Err(Refused::NotVisible { tenant: "fabrikam".into(), service: "s".into() })
        );
        assert_eq!(decide(&c, "nope", get(&r, "eb"), Approved, None, 1), Err(Refused::NoEndpoint("nope".into())));
        assert!(matches!(decide(&c, "ea", get(&r, "ea"), Approved, None, 1), Ok(Decided::Unchanged(_))));
        // Rejecting an invisible tenant's connection is allowed.
        assert!(matches!(decide(&c, "ea", get(&r, "ea"), Rejected, None, 1), Ok(Decided::Change(_))));
    }
}
