//! The three-DC sandbox that `loom-router demo`, the integration tests and the failover
//! benchmark all run on: its topology, its emulated Looms, and the config of each of its routers.
//!
//! Three DCs, `us-east`, `us-west` and `eu-central`, with Loom counters starting at 1, 2 and 3
//! and `ids.increment.by` 10, so each homes one residue; the global shard is homed in us-east;
//! each DC's shards fail over to the next DC in the ring. What differs between the demo and a
//! test (ports, timings, TLS, extra config) is the caller's; what the sandbox *is* is written
//! once, here.

use std::net::SocketAddr;
use std::time::Duration;

use loom_emulator::{Emulator, EmulatorConfig};

/// The DCs: name and Loom `ids.start.num`. `ids.increment.by` is [`INCREMENT`].
pub const DCS: [(&str, u64); 3] = [("us-east", 1), ("us-west", 2), ("eu-central", 3)];
/// Loom's `ids.increment.by`: the number of residues.
pub const INCREMENT: u64 = 10;
/// The DC that homes the global shard.
pub const GLOBAL_HOME: &str = "us-east";

/// The DC that takes over DC `i`'s shards: the next one in the ring.
pub fn replica_of(i: usize) -> &'static str {
    DCS[(i + 1) % DCS.len()].0
}

/// One emulated Loom per DC, each replicating completed writes to the others after
/// `replication_delay`, as the seed design describes. None is listening yet.
pub fn looms(replication_delay: Duration) -> Vec<Emulator> {
    let looms: Vec<Emulator> = DCS
        .iter()
        .map(|&(name, start)| {
            Emulator::new(EmulatorConfig {
                dc: name.to_owned(),
                id_start: start,
                increment: INCREMENT,
                replication_delay,
            })
        })
        .collect();
    for (i, loom) in looms.iter().enumerate() {
        for (j, peer) in looms.iter().enumerate() {
            if i != j {
                loom.add_peer(peer.clone());
            }
        }
    }
    looms
}

/// Lease, keepalive and write timeout of a sandbox: how fast a dead DC fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub lease: Duration,
    pub keepalive: Duration,
    pub write_timeout: Duration,
}

impl Profile {
    /// The config's defaults: a 5 s lease renewed every second, 2 s writes.
    pub const DEFAULT: Self = Self {
        lease: Duration::from_secs(5),
        keepalive: Duration::from_secs(1),
        write_timeout: Duration::from_secs(2),
    };
    /// Same-metro DCs: a 3 s lease renewed every 500 ms, 1 s writes. The demo uses it.
    pub const FAST: Self = Self {
        lease: Duration::from_secs(3),
        keepalive: Duration::from_millis(500),
        write_timeout: Duration::from_secs(1),
    };
}

/// Where the sandbox's routers agree on ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordination {
    /// No store: ownership as the config says.
    Static,
    /// One in-process store shared by the routers of this process.
    Memory,
    /// A real etcd: the members this router talks to, and the key prefix of this sandbox.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// The config of DC `dc`'s router: the sandbox's topology, plus what the caller adds.
#[derive(Debug, Clone)]
pub struct RouterToml<'a> {
    pub dc: usize,
    /// This DC's Loom.
    pub loom: SocketAddr,
    /// Every DC's router, by DC index, as peers reach it.
    pub routers: &'a [SocketAddr],
    pub coordination: Coordination,
    /// Lease, keepalive and write timeout; the lease applies only with a store.
    pub profile: Profile,
    /// The become-owner hook; `None` calls the DC's own emulated Loom.
    pub hook: Option<&'a str>,
    /// More `[loom]` keys (`connect_timeout = "300ms"`...).
    pub loom_keys: &'a str,
    /// More `[coordination]` keys, with a store.
    pub coordination_keys: &'a str,
    /// Whole tables (`[health]`, `[log]`...), placed before the `[[datacenters]]`.
    pub tables: &'a str,
}

impl RouterToml<'_> {
    /// The config file's text.
    pub fn render(&self) -> String {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let (name, loom) = (DCS[self.dc].0, self.loom);
        let mut toml = format!(
            "datacenter = \"{name}\"\nglobal_home = \"{GLOBAL_HOME}\"\n\n\
             [loom]\nupstream = \"http://{loom}\"\nwrite_timeout = \"{write}\"\n{keys}\n\
             [ids]\nincrement = {INCREMENT}\n\n",
            write = ms(self.profile.write_timeout),
            keys = self.loom_keys,
        );
        let backend = match &self.coordination {
            Coordination::Static => None,
            Coordination::Memory => Some("backend = \"memory\"".to_owned()),
            Coordination::Etcd { endpoints, prefix } => Some(format!(
                "backend = \"etcd\"\nendpoints = [{}]\nprefix = \"{prefix}\"",
                endpoints
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        if let Some(backend) = backend {
            let own_hook = format!("http://{loom}/replication/become-owner");
            toml.push_str(&format!(
                "[coordination]\n{backend}\nlease = \"{lease}\"\nkeepalive = \"{keepalive}\"\n\
                 become_owner_hook = \"{hook}\"\n{keys}\n",
                lease = ms(self.profile.lease),
                keepalive = ms(self.profile.keepalive),
                hook = self.hook.unwrap_or(&own_hook),
                keys = self.coordination_keys,
            ));
        }
        toml.push_str(self.tables);
        for (j, (name, start)) in DCS.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[datacenters]]\nname = \"{name}\"\nid_start = {start}\n\
                 router = \"http://{router}\"\nreplicas = [\"{replica}\"]\n",
                router = self.routers[j],
                replica = replica_of(j),
            ));
        }
        toml
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Config};

    fn routers() -> Vec<SocketAddr> {
        (1..=3)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 8080 + i)))
            .collect()
    }

    #[test]
    fn every_router_config_is_valid_and_describes_the_same_ring() {
        let routers = routers();
        for dc in 0..DCS.len() {
            let toml = RouterToml {
                dc,
                loom: SocketAddr::from(([127, 0, 0, 1], 9081)),
                routers: &routers,
                coordination: Coordination::Memory,
                profile: Profile::FAST,
                hook: None,
                loom_keys: "",
                coordination_keys: "",
                tables: "[log]\naccess = \"off\"\n",
            }
            .render();
            let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
            assert_eq!(config.local, dc);
            assert_eq!(config.coordination.backend, Backend::Memory);
            assert_eq!(config.coordination.lease, Profile::FAST.lease);
            assert_eq!(config.loom.write_timeout, Profile::FAST.write_timeout);
            let residues: Vec<u64> = config.datacenters.iter().map(|d| d.residue).collect();
            assert_eq!(residues, [1, 2, 3]);
            let replicas: Vec<Vec<usize>> = config
                .datacenters
                .iter()
                .map(|d| d.replicas.clone())
                .collect();
            assert_eq!(replicas, [vec![1], vec![2], vec![0]]);
        }
    }
}
