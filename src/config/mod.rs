//! Configuration: the TOML file (docs/configuration.md) and its validation.
//!
//! Two layers, kept apart on purpose. [`RawConfig`] (`raw.rs`) mirrors the file exactly (serde,
//! `deny_unknown_fields`, strings for durations and URLs). [`Config`] (this file) is what the
//! rest of the router uses: real types, defaults applied, cross-references resolved to indices,
//! and every rule checked by `validate.rs`, one function per section. Every error names the key
//! it is about (`datacenters[1].replicas[0]: ...`), which is what `loom-router check` prints.
//! `diff.rs` says what a reload changes; `table.rs` builds the ownership table a config
//! describes.
//!
//! Nothing here touches the network, and nothing here may import from above `routing`: every
//! part of the router reads its config, so the config reads none of them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

mod diff;
mod raw;
pub mod table;
mod validate;

pub use raw::RawConfig;

use crate::shard::{DcId, ShardKey, ShardState};

/// Where `run` and `check` look when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/loom-router/loom-router.toml";

/// One problem with a config, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key path, such as `datacenters[1].replicas[0]`; empty for whole-file problems.
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.key, self.problem)
        }
    }
}

/// Everything wrong with a config file. Validation keeps going after the first problem so that
/// an operator fixes the file in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

// === The validated config ===

/// A validated config. Built only by [`Config::from_toml`] / [`Config::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This router's DC.
    pub local: DcId,
    /// Home of the global shard.
    pub global_home: DcId,
    pub listen: Listen,
    pub tls: Option<Tls>,
    pub loom: Loom,
    /// Loom's `ids.increment.by`, the same in every DC: the number of residues.
    pub increment: u64,
    pub datacenters: Vec<Datacenter>,
    pub shards: Vec<ShardEntry>,
    pub coordination: Coordination,
    pub health: Health,
    pub limits: Limits,
    /// `[response] route_headers`: send `X-Loom-Route` and `X-Loom-Served-By`.
    pub route_headers: bool,
    pub consistency: Consistency,
    pub access_log: AccessLog,
    /// `[admin] token`: bearer token for admin calls that change state.
    pub admin_token: Option<String>,
    pub drain_timeout: Duration,
    /// `[runtime] workers`: request workers, each a single-threaded runtime with its own
    /// listener sockets and upstream connections (docs/performance.md).
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The listen queue of every listener; the kernel caps it at `net.core.somaxconn`.
    pub backlog: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub handshake_timeout: Duration,
}

/// Whether the https listener requires a client certificate from `client_ca` (`[tls]
/// client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a certificate (the load balancer) is served, but is no peer.
    Optional,
    /// The handshake fails without a certificate from `client_ca` (nginx's
    /// `ssl_verify_client on`).
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loom {
    pub upstream: Uri,
    pub health_path: String,
    pub ca: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datacenter {
    pub name: String,
    pub id_start: u64,
    /// `id_start mod increment`: the residue this DC homes.
    pub residue: u64,
    /// Where peers send this DC's writes and probes.
    pub router: Uri,
    /// Failover order for the shards homed here.
    pub replicas: Vec<DcId>,
}

/// A `[[shards]]` entry: maps an unhomed residue, or moves a shard by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardEntry {
    pub key: ShardKey,
    pub owner: DcId,
    /// `None` keeps the home DC's replicas.
    pub replicas: Option<Vec<DcId>>,
    pub epoch: u64,
    pub state: ShardState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Static,
    Memory,
    Etcd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    pub backend: Backend,
    pub lease: Duration,
    pub keepalive: Duration,
    pub failover_cooldown: Duration,
    pub become_owner_hook: Option<Uri>,
    pub hook_timeout: Duration,
    pub endpoints: Vec<String>,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_read_body_bytes: usize,
    pub max_retry_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Connections the router opens at most to one upstream (the local Loom, each peer router),
    /// pooled and connection-owned together.
    pub max_upstream_connections: usize,
}

/// `[consistency]`: reading your own writes across DCs (docs/routing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    /// How long after a forwarded write this router, and the cookie it sets, send reads of the
    /// written cluster to its owner. Zero turns tracking and the cookie off.
    pub read_your_writes: Duration,
    /// The most clusters this router tracks at once.
    pub max_tracked_clusters: usize,
}

impl Consistency {
    /// Whether forwarded writes are tracked and set the cookie, and the cookie is honoured.
    pub fn tracks(&self) -> bool {
        !self.read_your_writes.is_zero()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Text,
    Json,
    Off,
}

// === Defaults (docs/configuration.md) ===

/// Client listener.
pub const DEFAULT_LISTEN_HTTP: &str = "0.0.0.0:8080";
/// Admin listener: loopback only unless the operator opens it.
pub const DEFAULT_LISTEN_ADMIN: &str = "127.0.0.1:9901";
/// Every listener's listen queue: nginx uses 511, and a load balancer that opens hundreds of
/// connections at once overflowed 128.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// The largest `[listen] backlog`: the kernel keeps `somaxconn` in 16 bits.
pub const MAX_BACKLOG: u32 = 65535;
/// TLS handshake bound.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Loom's health endpoint.
pub const DEFAULT_HEALTH_PATH: &str = "/status";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on reads and other non-writes.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Hard bound on a write, local or forwarded.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(1);
pub const DEFAULT_FAILOVER_COOLDOWN: Duration = Duration::from_secs(300);
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_millis(400);
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// Request line plus headers, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 65536;
/// Bodies the router must read (`/v2/nodes`), in bytes.
pub const DEFAULT_MAX_READ_BODY_BYTES: usize = 65536;
/// Forwarded write bodies buffered for a 421 retry, in bytes.
pub const DEFAULT_MAX_RETRY_BODY_BYTES: usize = 65536;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 10000;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// As nginx's `client_body_timeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Per upstream, as nginx's and HAProxy's connection caps are: far more than a Loom needs, few
/// enough that a flood of idle clients cannot open a connection each.
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 1024;
/// `[consistency] read_your_writes`: off, so that reads stay local as the design has them.
pub const DEFAULT_READ_YOUR_WRITES: Duration = Duration::ZERO;
/// `[consistency] max_tracked_clusters`: a few MiB of map at most.
pub const DEFAULT_MAX_TRACKED_CLUSTERS: usize = 100_000;
/// The longest `read_your_writes`: replication takes seconds; an hour is a mistake, and the
/// cookie's `Max-Age` must stay meaningful.
pub const MAX_READ_YOUR_WRITES: Duration = Duration::from_secs(3600);
/// The most `[runtime] workers`: a thread each.
pub const MAX_WORKERS: usize = 1024;
/// The largest `max_concurrent_requests`: far above what one process can serve, and well inside
/// what a semaphore can count.
pub const MAX_CONCURRENT_REQUESTS: usize = 1_000_000_000;
/// The smallest header limit: hyper cannot buffer less than this.
pub const MIN_HEADER_BYTES: usize = 8192;

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parse and validate config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let raw = raw::parse_raw(text)?;
        Self::try_from(raw)
    }

    /// This router's DC.
    pub fn local_dc(&self) -> &Datacenter {
        &self.datacenters[self.local]
    }

    /// Look a DC up by name.
    pub fn dc_by_name(&self, name: &str) -> Option<DcId> {
        self.datacenters.iter().position(|dc| dc.name == name)
    }

    /// Warnings that do not stop the router but that an operator should read.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.coordination.backend == Backend::Etcd && self.datacenters.len() < 3 {
            out.push(
                "coordination.backend: etcd must span three failure domains; with fewer than 3 \
                 datacenters add a witness site"
                    .to_owned(),
            );
        }
        if let Some(max) = somaxconn() {
            if self.listen.backlog > max {
                out.push(format!(
                    "listen.backlog: {} is above the kernel's net.core.somaxconn ({max}), which caps                      it; raise somaxconn (sysctl) for the full queue",
                    self.listen.backlog
                ));
            }
        }
        out
    }
}

/// The kernel's cap on listen queues, where it can be read (Linux).
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::etcd_unavailable;

    const GOOD: &str = r#"
datacenter = "us-east"
global_home = "us-east"

[loom]
upstream = "http://127.0.0.1:55054"

[ids]
increment = 10

[[datacenters]]
name = "us-east"
id_start = 1
router = "http://10.1.0.10:8080"
replicas = ["us-west"]

[[datacenters]]
name = "us-west"
id_start = 2
router = "http://10.2.0.10:8080"
replicas = ["us-east"]
"#;

    #[test]
    fn only_probe_settings_make_a_reload_restart_the_probes() {
        let base = Config::from_toml(GOOD).unwrap();
        let moved = format!("{GOOD}\n[[shards]]\nresidue = 2\nowner = \"us-east\"\nepoch = 2\n");
        assert!(!base.probes_differ(&Config::from_toml(&moved).unwrap()));
        let faster = format!("{GOOD}\n[health]\ninterval = \"250ms\"\n");
        assert!(base.probes_differ(&Config::from_toml(&faster).unwrap()));
        let rerouted = GOOD.replace("10.2.0.10:8080", "10.2.0.11:8080");
        assert!(base.probes_differ(&Config::from_toml(&rerouted).unwrap()));
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_error(text: &str, expected: &str) {
        let got = errors(text);
        assert!(
            got.iter().any(|e| e == expected),
            "expected {expected:?} in {got:?}"
        );
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.local, 0);
        assert_eq!(c.local_dc().name, "us-east");
        assert_eq!(c.increment, 10);
        assert_eq!(c.datacenters[1].residue, 2);
        assert_eq!(c.datacenters[0].replicas, vec![1]);
        assert_eq!(c.listen.http, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(c.listen.https, None);
        assert_eq!(c.listen.admin, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.loom.health_path, "/status");
        assert_eq!(c.loom.write_timeout, Duration::from_secs(2));
        assert_eq!(c.health.interval, Duration::from_millis(500));
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.coordination.backend, Backend::Static);
        assert_eq!(c.coordination.failover_cooldown, Duration::from_secs(300));
        assert!(c.route_headers);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.consistency.read_your_writes, Duration::ZERO);
        assert!(!c.consistency.tracks());
        assert_eq!(c.consistency.max_tracked_clusters, 100_000);
    }

    #[test]
    fn consistency_takes_a_window_of_zero_to_an_hour_and_a_positive_bound() {
        let on =
            format!("{GOOD}\n[consistency]\nread_your_writes = \"5s\"\nmax_tracked_clusters = 7\n");
        let c = Config::from_toml(&on).unwrap();
        assert_eq!(c.consistency.read_your_writes, Duration::from_secs(5));
        assert!(c.consistency.tracks());
        assert_eq!(c.consistency.max_tracked_clusters, 7);
        let off = format!("{GOOD}\n[consistency]\nread_your_writes = \"0s\"\n");
        assert!(!Config::from_toml(&off).unwrap().consistency.tracks());
        assert_error(
            &format!("{GOOD}\n[consistency]\nread_your_writes = \"2h\"\n"),
            "consistency.read_your_writes: must be at most 1h",
        );
        assert_error(
            &format!("{GOOD}\n[consistency]\nmax_tracked_clusters = 0\n"),
            "consistency.max_tracked_clusters: must be at least 1",
        );
        let got = errors(&format!(
            "{GOOD}\n[consistency]\nread_your_writes = \"soon\"\n"
        ));
        assert!(
            got[0].starts_with("consistency.read_your_writes: invalid duration \"soon\""),
            "{got:?}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_error(
            &format!("{GOOD}\n[health]\nintervall = \"1s\"\n"),
            "health.intervall: unknown key",
        );
        assert_error(&format!("colour = 1\n{GOOD}"), "colour: unknown key");
        assert_error(
            &GOOD.replace("id_start = 2", "id_start = 2\nweight = 3"),
            "datacenters[1].weight: unknown key",
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let got = errors("datacenter = \"us-east\"\nglobal_home = = 1\n");
        assert!(
            got[0].starts_with("TOML syntax error at line 2, column"),
            "{got:?}"
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert_error(
            &GOOD.replace("global_home = \"us-east\"", ""),
            "global_home: required key is missing",
        );
        assert_error(
            &GOOD.replace("upstream = \"http://127.0.0.1:55054\"", ""),
            "loom.upstream: required key is missing",
        );
    }

    #[test]
    fn duplicate_datacenter_names() {
        assert_error(
            &GOOD.replace("name = \"us-west\"", "name = \"us-east\""),
            "datacenters[1].name: duplicate datacenter \"us-east\"",
        );
    }

    #[test]
    fn two_datacenters_in_one_residue() {
        assert_error(
            &GOOD.replace("id_start = 2", "id_start = 11"),
            "datacenters[1].id_start: residue 1 (id_start 11 mod increment 10) is already homed by \"us-east\"",
        );
    }

    #[test]
    fn replicas_naming_unknown_datacenters() {
        assert_error(
            &GOOD.replace("replicas = [\"us-east\"]", "replicas = [\"eu-north\"]"),
            "datacenters[1].replicas[0]: unknown datacenter \"eu-north\"",
        );
    }

    #[test]
    fn datacenter_must_be_defined() {
        assert_error(
            &GOOD.replace("datacenter = \"us-east\"", "datacenter = \"mars\""),
            "datacenter: unknown datacenter \"mars\"",
        );
    }

    #[test]
    fn global_home_must_be_defined() {
        assert_error(
            &GOOD.replace("global_home = \"us-east\"", "global_home = \"mars\""),
            "global_home: unknown datacenter \"mars\"",
        );
    }

    #[test]
    fn zero_increment() {
        assert_error(
            &GOOD.replace("increment = 10", "increment = 0"),
            "ids.increment: must be at least 1",
        );
    }

    #[test]
    fn workers_and_upstream_connections() {
        let config = Config::from_toml(&format!(
            "{GOOD}\n[limits]\nmax_upstream_connections = 16\n[runtime]\nworkers = 3\n"
        ));
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (config.limits.max_upstream_connections, config.workers),
            (16, 3)
        );
        let defaults = Config::from_toml(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.limits.max_upstream_connections, 1024);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(defaults.workers, cores);
        assert_error(
            &format!("{GOOD}\n[runtime]\nworkers = 0\n"),
            "runtime.workers: must be at least 1",
        );
        assert_error(
            &format!("{GOOD}\n[runtime]\nworkers = 5000\n"),
            "runtime.workers: must be at most 1024",
        );
        assert_error(
            &format!("{GOOD}\n[limits]\nmax_upstream_connections = 0\n"),
            "limits.max_upstream_connections: must be at least 1",
        );
    }

    #[test]
    fn a_backlog_above_somaxconn_is_warned_about() {
        let Some(max) = somaxconn() else {
            return; // Not Linux: nothing to compare with.
        };
        let backlog = (max + 1).min(MAX_BACKLOG);
        let config = Config::from_toml(&format!("{GOOD}\n[listen]\nbacklog = {backlog}\n"));
        let warnings = config.unwrap_or_else(|e| panic!("{e}")).warnings();
        let warned = warnings.iter().any(|w| w.starts_with("listen.backlog: "));
        assert_eq!(warned, backlog > max, "{warnings:?}");
    }

    #[test]
    fn the_backlog_defaults_to_1024_and_is_bounded() {
        let defaults = Config::from_toml(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.listen.backlog, 1024);
        let set = Config::from_toml(&format!("{GOOD}\n[listen]\nbacklog = 4096\n"));
        assert_eq!(set.unwrap_or_else(|e| panic!("{e}")).listen.backlog, 4096);
        assert_error(
            &format!("{GOOD}\n[listen]\nbacklog = 0\n"),
            "listen.backlog: must be at least 1",
        );
        assert_error(
            &format!("{GOOD}\n[listen]\nbacklog = 70000\n"),
            "listen.backlog: must be at most 65535",
        );
    }

    #[test]
    fn bad_durations_and_addresses_are_named() {
        assert_error(
            &format!("{GOOD}\n[health]\ninterval = \"soon\"\n"),
            "health.interval: invalid duration \"soon\" (expected number at 0); write e.g. \"500ms\" or \"5s\"",
        );
        assert_error(
            &GOOD.replace("[loom]", "[listen]\nadmin = \"localhost\"\n[loom]"),
            "listen.admin: invalid socket address \"localhost\"; write e.g. \"0.0.0.0:8080\"",
        );
        assert_error(
            &GOOD.replace("http://10.2.0.10:8080", "10.2.0.10"),
            "datacenters[1].router: invalid URL \"10.2.0.10\"; write scheme://host:port with no path",
        );
    }

    #[test]
    fn shard_entries_are_checked() {
        let with = |s: &str| format!("{GOOD}\n[[shards]]\n{s}\n");
        assert_error(
            &with("residue = 10\nowner = \"us-east\""),
            "shards[0].residue: must be between 0 and 9 (increment - 1)",
        );
        assert_error(
            &with("residue = 0\nowner = \"mars\""),
            "shards[0].owner: unknown datacenter \"mars\"",
        );
        assert_error(
            &with("residue = 0\nowner = \"us-east\"\nstate = \"frozen\""),
            "shards[0].state: unknown state \"frozen\"; use \"active\" or \"fenced\"",
        );
        let c = Config::from_toml(&with(
            "residue = \"global\"\nowner = \"us-west\"\nepoch = 3",
        ))
        .unwrap();
        assert_eq!(c.shards[0].key, ShardKey::Global);
        assert_eq!(c.shards[0].owner, 1);
        assert_eq!(c.shards[0].epoch, 3);
    }

    #[test]
    fn with_a_lease_the_write_timeout_must_fit_inside_it() {
        assert_error(
            &format!("{GOOD}\n[coordination]\nbackend = \"memory\"\nlease = \"2s\"\n"),
            "loom.write_timeout: 2s does not fit inside the coordination lease: with lease 2s and \
             keepalive 1s, at most 710ms does; every write would be fenced",
        );
        // The defaults fit: 2 s + 1 s keepalive inside 5 s × 0.98 − 250 ms.
        assert!(
            Config::from_toml(&format!("{GOOD}\n[coordination]\nbackend = \"memory\"\n")).is_ok()
        );
    }

    #[test]
    fn a_build_without_etcd_says_how_to_get_it() {
        assert_eq!(etcd_unavailable(true), None);
        let problem = etcd_unavailable(false).unwrap();
        assert!(problem.starts_with("this binary was built without the etcd backend"));
        assert!(problem.contains("--features etcd"));
        let text = format!(
            "{GOOD}\n[coordination]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
        );
        let got = Config::from_toml(&text)
            .map(|_| ())
            .map_err(|e| e.to_string());
        if cfg!(feature = "etcd") {
            assert_eq!(got, Ok(()));
        } else {
            assert_eq!(got, Err(format!("coordination.backend: {problem}")));
        }
    }

    #[test]
    fn client_auth_is_optional_or_required_and_required_needs_a_ca() {
        let tls = |extra: &str| {
            GOOD.replace(
                "[loom]",
                &format!("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n{extra}\n[loom]"),
            )
        };
        let auth = |extra: &str| {
            Config::from_toml(&tls(extra))
                .unwrap()
                .tls
                .unwrap()
                .client_auth
        };
        assert_eq!(auth(""), ClientAuth::Optional);
        assert_eq!(auth("client_ca = \"ca.pem\""), ClientAuth::Optional);
        assert_eq!(
            auth("client_ca = \"ca.pem\"\nclient_auth = \"required\""),
            ClientAuth::Required
        );
        assert_error(
            &tls("client_auth = \"required\""),
            "tls.client_auth: \"required\" needs tls.client_ca, the CA whose certificates it requires",
        );
        assert_error(
            &tls("client_ca = \"ca.pem\"\nclient_auth = \"on\""),
            "tls.client_auth: unknown value \"on\"; use \"optional\" or \"required\"",
        );
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_with_fewer_than_three_datacenters_is_warned_about() {
        let two = Config::from_toml(&format!(
            "{GOOD}\n[coordination]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
        ))
        .unwrap();
        // The backlog's warning depends on the machine's somaxconn (its own test above).
        let about_etcd = |config: &Config| {
            let mut warnings = config.warnings();
            warnings.retain(|w| !w.starts_with("listen.backlog: "));
            warnings
        };
        let warnings = about_etcd(&two);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("three failure domains"));
        assert!(about_etcd(&Config::from_toml(GOOD).unwrap()).is_empty());
    }

    #[test]
    fn https_needs_tls() {
        assert_error(
            &GOOD.replace("[loom]", "[listen]\nhttps = \"0.0.0.0:8443\"\n[loom]"),
            "listen.https: an https listener needs a [tls] section",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = GOOD
            .replace("increment = 10", "increment = 0")
            .replace("datacenter = \"us-east\"", "datacenter = \"mars\"");
        assert!(errors(&text).len() >= 2);
    }
}
