//! Configuration: the TOML file (docs/configuration.md) and its validation.
//!
//! Two layers, kept apart on purpose. [`RawConfig`] mirrors the file exactly (serde,
//! `deny_unknown_fields`, strings for durations and URLs). [`Config`] is what the rest of the
//! router uses: real types, defaults applied, cross-references resolved to indices, and every
//! rule checked. Every error names the key it is about (`datacenters[1].replicas[0]: ...`), which
//! is what `loom-router check` prints.
//!
//! This file must not touch the network or build routing state; `routing/table.rs` turns a `Config`
//! into a table.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

pub mod table;

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

// === The file as written ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    datacenter: String,
    global_home: String,
    #[serde(default)]
    listen: RawListen,
    tls: Option<RawTls>,
    loom: RawLoom,
    ids: RawIds,
    datacenters: Vec<RawDatacenter>,
    #[serde(default)]
    shards: Vec<RawShard>,
    #[serde(default)]
    coordination: RawCoordination,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    response: RawResponse,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    shutdown: RawShutdown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    http: Option<String>,
    https: Option<String>,
    admin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_auth: Option<String>,
    handshake_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoom {
    upstream: String,
    health_path: Option<String>,
    ca: Option<PathBuf>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    write_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIds {
    increment: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatacenter {
    name: String,
    id_start: i64,
    router: String,
    #[serde(default)]
    replicas: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    residue: RawResidue,
    owner: String,
    #[serde(default)]
    replicas: Vec<String>,
    epoch: Option<i64>,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawResidue {
    Number(i64),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordination {
    backend: Option<String>,
    lease: Option<String>,
    keepalive: Option<String>,
    failover_cooldown: Option<String>,
    become_owner_hook: Option<String>,
    hook_timeout: Option<String>,
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<String>,
    timeout: Option<String>,
    unhealthy_after: Option<i64>,
    healthy_after: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<i64>,
    max_read_body_bytes: Option<i64>,
    max_retry_body_bytes: Option<i64>,
    max_concurrent_requests: Option<i64>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    route_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain_timeout: Option<String>,
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
    pub access_log: AccessLog,
    /// `[admin] token`: bearer token for admin calls that change state.
    pub admin_token: Option<String>,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
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
        let raw = parse_raw(text)?;
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

    /// Whether the health probes `next` asks for differ from this config's: what is probed
    /// (each DC's router, the local Loom and its health path) or how (`[health]`). A reload that
    /// only moves shards keeps the running probes and the health they have learned.
    pub fn probes_differ(&self, next: &Self) -> bool {
        self.health != next.health
            || self.local != next.local
            || self.datacenters != next.datacenters
            || self.loom.upstream != next.loom.upstream
            || self.loom.health_path != next.loom.health_path
    }

    /// Keys whose change a reload refuses (docs/configuration.md): they need a restart.
    pub fn restart_only_changes(&self, next: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.listen.http != next.listen.http {
            out.push("listen.http");
        }
        if self.listen.https != next.listen.https {
            out.push("listen.https");
        }
        if self.listen.admin != next.listen.admin {
            out.push("listen.admin");
        }
        if self.local_dc().name != next.local_dc().name {
            out.push("datacenter");
        }
        if self.increment != next.increment {
            out.push("ids.increment");
        }
        if self.coordination.backend != next.coordination.backend {
            out.push("coordination.backend");
        }
        if self.coordination.endpoints != next.coordination.endpoints {
            out.push("coordination.endpoints");
        }
        if self.coordination.prefix != next.coordination.prefix {
            out.push("coordination.prefix");
        }
        out
    }

    /// Keys a reload accepts but that take effect only at the next restart: certificates and the
    /// pooled client's connection settings are loaded once, at start-up.
    pub fn applied_at_restart(&self, next: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.tls != next.tls {
            out.push("tls");
        }
        if self.loom.ca != next.loom.ca {
            out.push("loom.ca");
        }
        if self.loom.connect_timeout != next.loom.connect_timeout {
            out.push("loom.connect_timeout");
        }
        if self.limits.idle_timeout != next.limits.idle_timeout {
            out.push("limits.idle_timeout");
        }
        if self.coordination.lease != next.coordination.lease
            || self.coordination.keepalive != next.coordination.keepalive
        {
            out.push("coordination.lease/keepalive");
        }
        if self.coordination.become_owner_hook != next.coordination.become_owner_hook
            || self.coordination.hook_timeout != next.coordination.hook_timeout
        {
            out.push("coordination.become_owner_hook/hook_timeout");
        }
        if self.coordination.failover_cooldown != next.coordination.failover_cooldown {
            out.push("coordination.failover_cooldown");
        }
        if self.drain_timeout != next.drain_timeout {
            out.push("shutdown.drain_timeout");
        }
        // Turning the access log off or on applies at once; its format is the log's, set at
        // start-up.
        let format = |a: AccessLog| matches!(a, AccessLog::Json);
        if self.access_log != AccessLog::Off
            && next.access_log != AccessLog::Off
            && format(self.access_log) != format(next.access_log)
        {
            out.push("log.access (text/json)");
        }
        out
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
        out
    }
}

/// TOML text → [`RawConfig`]. Syntax errors carry line and column; type errors and unknown keys
/// carry the key path.
fn parse_raw(text: &str) -> Result<RawConfig, ConfigErrors> {
    let value: toml::Table = toml::from_str(text).map_err(|e| {
        let problem = e.message().trim().to_owned();
        let location = e
            .span()
            .map(|span| line_col(text, span.start))
            .map(|(line, col)| format!("TOML syntax error at line {line}, column {col}"))
            .unwrap_or_else(|| "TOML syntax error".to_owned());
        ConfigError::new(location, problem)
    })?;
    serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(value)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().to_owned();
        let path = if path == "." { String::new() } else { path };
        // The path of an unknown key already ends with the key itself.
        if message.starts_with("unknown field `") {
            return ConfigError::new(path, "unknown key").into();
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or("");
            return ConfigError::new(join_key(&path, field), "required key is missing").into();
        }
        ConfigError::new(path, message).into()
    })
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_owned()
    } else {
        format!("{parent}.{field}")
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Collects problems while validating, so that all of them are reported at once.
#[derive(Debug, Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ConfigError::new(key, problem));
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.push(key, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.push(
                    key,
                    format!("invalid duration {text:?} ({e}); write e.g. \"500ms\" or \"5s\""),
                );
                default
            }
        }
    }

    fn addr(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: Option<&str>,
    ) -> Option<SocketAddr> {
        let text = value.or(default)?;
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    format!("invalid socket address {text:?}; write e.g. \"0.0.0.0:8080\""),
                );
                None
            }
        }
    }

    fn url(&mut self, key: &str, text: &str) -> Option<Uri> {
        match text.parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && matches!(uri.path(), "" | "/")
                    && uri.query().is_none() =>
            {
                Some(uri)
            }
            _ => {
                self.push(
                    key,
                    format!("invalid URL {text:?}; write scheme://host:port with no path"),
                );
                None
            }
        }
    }

    fn positive(&mut self, key: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(v) if v >= 1 => usize::try_from(v).unwrap_or(usize::MAX),
            Some(_) => {
                self.push(key, "must be at least 1");
                default
            }
        }
    }

    fn dc(&mut self, key: &str, names: &HashMap<&str, DcId>, name: &str) -> Option<DcId> {
        let found = names.get(name).copied();
        if found.is_none() {
            self.push(key, format!("unknown datacenter {name:?}"));
        }
        found
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigErrors;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigErrors> {
        let mut p = Problems::default();

        // Loom's counter settings must fit a Java int (Coopr reads them with getInt).
        let increment = match u64::try_from(raw.ids.increment) {
            Ok(0) | Err(_) => {
                p.push("ids.increment", "must be at least 1");
                1
            }
            Ok(n) if n > i32::MAX as u64 => {
                p.push("ids.increment", "must fit Loom's 32-bit setting");
                1
            }
            Ok(n) => n,
        };

        if raw.datacenters.is_empty() {
            p.push(
                "datacenters",
                "at least one [[datacenters]] entry is required",
            );
        }
        let mut names: HashMap<&str, DcId> = HashMap::new();
        for (i, dc) in raw.datacenters.iter().enumerate() {
            let key = format!("datacenters[{i}].name");
            if dc.name.is_empty() || !dc.name.bytes().all(is_dc_name_byte) {
                p.push(
                    &key,
                    format!(
                        "invalid name {:?}: use letters, digits, '-' and '_'",
                        dc.name
                    ),
                );
            }
            if names.insert(dc.name.as_str(), i).is_some() {
                p.push(key, format!("duplicate datacenter {:?}", dc.name));
            }
        }

        let mut homed: HashMap<u64, &str> = HashMap::new();
        let mut datacenters = Vec::with_capacity(raw.datacenters.len());
        for (i, dc) in raw.datacenters.iter().enumerate() {
            let id_start = match u64::try_from(dc.id_start) {
                Ok(n) if n <= i32::MAX as u64 => n,
                _ => {
                    p.push(
                        format!("datacenters[{i}].id_start"),
                        "must be between 0 and 2147483647",
                    );
                    0
                }
            };
            let residue = id_start % increment;
            if let Some(other) = homed.insert(residue, dc.name.as_str()) {
                p.push(
                    format!("datacenters[{i}].id_start"),
                    format!(
                        "residue {residue} (id_start {id_start} mod increment {increment}) is \
                         already homed by {other:?}"
                    ),
                );
            }
            let router = p
                .url(&format!("datacenters[{i}].router"), &dc.router)
                .unwrap_or_default();
            let mut replicas = Vec::with_capacity(dc.replicas.len());
            for (j, name) in dc.replicas.iter().enumerate() {
                let key = format!("datacenters[{i}].replicas[{j}]");
                let Some(r) = p.dc(&key, &names, name) else {
                    continue;
                };
                if r == i {
                    p.push(key, format!("{name:?} cannot be a replica of itself"));
                } else if replicas.contains(&r) {
                    p.push(key, format!("{name:?} is listed twice"));
                } else {
                    replicas.push(r);
                }
            }
            datacenters.push(Datacenter {
                name: dc.name.clone(),
                id_start,
                residue,
                router,
                replicas,
            });
        }

        let local = p.dc("datacenter", &names, &raw.datacenter).unwrap_or(0);
        let global_home = p.dc("global_home", &names, &raw.global_home).unwrap_or(0);

        let mut shards = Vec::with_capacity(raw.shards.len());
        let mut seen_keys = HashMap::new();
        for (i, s) in raw.shards.iter().enumerate() {
            let key = match &s.residue {
                RawResidue::Number(n) => match u64::try_from(*n) {
                    Ok(r) if r < increment => ShardKey::Residue(r),
                    _ => {
                        p.push(
                            format!("shards[{i}].residue"),
                            format!("must be between 0 and {} (increment - 1)", increment - 1),
                        );
                        continue;
                    }
                },
                RawResidue::Name(n) if n == "global" => ShardKey::Global,
                RawResidue::Name(n) => {
                    p.push(
                        format!("shards[{i}].residue"),
                        format!("{n:?} is not a residue; use an integer or \"global\""),
                    );
                    continue;
                }
            };
            if seen_keys.insert(key, i).is_some() {
                p.push(
                    format!("shards[{i}].residue"),
                    format!("shard {key} is listed twice"),
                );
            }
            let owner = p.dc(&format!("shards[{i}].owner"), &names, &s.owner);
            let replicas = if s.replicas.is_empty() {
                None
            } else {
                let mut out = Vec::new();
                for (j, name) in s.replicas.iter().enumerate() {
                    if let Some(r) = p.dc(&format!("shards[{i}].replicas[{j}]"), &names, name) {
                        out.push(r);
                    }
                }
                Some(out)
            };
            let epoch = match s.epoch.map(u64::try_from) {
                None => 1,
                Some(Ok(e)) if e >= 1 => e,
                Some(_) => {
                    p.push(format!("shards[{i}].epoch"), "must be at least 1");
                    1
                }
            };
            let state = match s.state.as_deref() {
                None | Some("active") => ShardState::Active,
                Some("fenced") => ShardState::Fenced,
                Some(other) => {
                    p.push(
                        format!("shards[{i}].state"),
                        format!("unknown state {other:?}; use \"active\" or \"fenced\""),
                    );
                    ShardState::Active
                }
            };
            if let Some(owner) = owner {
                shards.push(ShardEntry {
                    key,
                    owner,
                    replicas,
                    epoch,
                    state,
                });
            }
        }

        let listen = Listen {
            http: p.addr(
                "listen.http",
                raw.listen.http.as_deref(),
                Some(DEFAULT_LISTEN_HTTP),
            ),
            https: p.addr("listen.https", raw.listen.https.as_deref(), None),
            admin: p
                .addr(
                    "listen.admin",
                    raw.listen.admin.as_deref(),
                    Some(DEFAULT_LISTEN_ADMIN),
                )
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
        };
        let tls = raw.tls.as_ref().map(|t| Tls {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
            client_auth: client_auth(&mut p, t),
            handshake_timeout: p.duration(
                "tls.handshake_timeout",
                t.handshake_timeout.as_deref(),
                DEFAULT_HANDSHAKE_TIMEOUT,
            ),
        });
        if listen.https.is_some() && tls.is_none() {
            p.push("listen.https", "an https listener needs a [tls] section");
        }
        if listen.http.is_none() && listen.https.is_none() {
            p.push(
                "listen",
                "no client listener: set listen.http, listen.https or both",
            );
        }
        // Toward an https peer a router presents its own certificate and verifies the peer's
        // against client_ca (docs/configuration.md).
        let peers_ca = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        for (i, dc) in raw.datacenters.iter().enumerate() {
            if dc.router.starts_with("https://")
                && !peers_ca
                && i != names
                    .get(raw.datacenter.as_str())
                    .copied()
                    .unwrap_or(usize::MAX)
            {
                p.push(
                    format!("datacenters[{i}].router"),
                    "an https:// peer needs [tls] with cert, key and client_ca",
                );
            }
        }

        let upstream = p
            .url("loom.upstream", &raw.loom.upstream)
            .unwrap_or_default();
        let health_path = raw
            .loom
            .health_path
            .clone()
            .unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_owned());
        if !health_path.starts_with('/') || health_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            p.push("loom.health_path", "must be a path starting with '/'");
        }
        if raw.loom.upstream.starts_with("https://") && raw.loom.ca.is_none() {
            p.push(
                "loom.ca",
                "an https:// upstream needs the CA that signed its certificate",
            );
        }
        let loom = Loom {
            upstream,
            health_path,
            ca: raw.loom.ca.clone(),
            connect_timeout: p.duration(
                "loom.connect_timeout",
                raw.loom.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            request_timeout: p.duration(
                "loom.request_timeout",
                raw.loom.request_timeout.as_deref(),
                DEFAULT_REQUEST_TIMEOUT,
            ),
            write_timeout: p.duration(
                "loom.write_timeout",
                raw.loom.write_timeout.as_deref(),
                DEFAULT_WRITE_TIMEOUT,
            ),
        };

        let c = &raw.coordination;
        let backend = match c.backend.as_deref() {
            None | Some("static") => Backend::Static,
            Some("memory") => Backend::Memory,
            Some("etcd") => {
                if let Some(problem) = etcd_unavailable(cfg!(feature = "etcd")) {
                    p.push("coordination.backend", problem);
                }
                Backend::Etcd
            }
            Some(other) => {
                p.push(
                    "coordination.backend",
                    format!("unknown backend {other:?}; use \"static\", \"memory\" or \"etcd\""),
                );
                Backend::Static
            }
        };
        let become_owner_hook =
            c.become_owner_hook
                .as_deref()
                .and_then(|h| match h.parse::<Uri>() {
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) => Some(uri),
                    _ => {
                        p.push(
                            "coordination.become_owner_hook",
                            format!("invalid URL {h:?}"),
                        );
                        None
                    }
                });
        let endpoints = c.endpoints.clone().unwrap_or_default();
        if backend == Backend::Etcd && endpoints.is_empty() {
            p.push(
                "coordination.endpoints",
                "the etcd backend needs at least one endpoint",
            );
        }
        let coordination = Coordination {
            backend,
            lease: p.duration("coordination.lease", c.lease.as_deref(), DEFAULT_LEASE),
            keepalive: p.duration(
                "coordination.keepalive",
                c.keepalive.as_deref(),
                DEFAULT_KEEPALIVE,
            ),
            failover_cooldown: p.duration(
                "coordination.failover_cooldown",
                c.failover_cooldown.as_deref(),
                DEFAULT_FAILOVER_COOLDOWN,
            ),
            become_owner_hook,
            hook_timeout: p.duration(
                "coordination.hook_timeout",
                c.hook_timeout.as_deref(),
                DEFAULT_HOOK_TIMEOUT,
            ),
            endpoints,
            prefix: c
                .prefix
                .clone()
                .unwrap_or_else(|| "/loom-router".to_owned()),
        };
        // With a lease, every owned write must fit inside it (docs/failover.md): the gate
        // admits a write only if write_timeout ends before lease·(1 − 2ρ) − δ after the last
        // keepalive was sent, and the next keepalive may be up to one interval away.
        if backend != Backend::Static {
            let usable =
                crate::routing::fence::usable_lease(coordination.lease, coordination.keepalive);
            if loom.write_timeout > usable {
                p.push(
                    "loom.write_timeout",
                    format!(
                        "{} does not fit inside the coordination lease: with lease {} and \
                         keepalive {}, at most {} does; every write would be fenced",
                        humantime::format_duration(loom.write_timeout),
                        humantime::format_duration(coordination.lease),
                        humantime::format_duration(coordination.keepalive),
                        humantime::format_duration(usable),
                    ),
                );
            }
        }
        if coordination.keepalive >= coordination.lease {
            p.push(
                "coordination.keepalive",
                "must be shorter than coordination.lease",
            );
        }

        let h = &raw.health;
        let health = Health {
            interval: p.duration(
                "health.interval",
                h.interval.as_deref(),
                DEFAULT_HEALTH_INTERVAL,
            ),
            timeout: p.duration(
                "health.timeout",
                h.timeout.as_deref(),
                DEFAULT_HEALTH_TIMEOUT,
            ),
            unhealthy_after: threshold(
                &mut p,
                "health.unhealthy_after",
                h.unhealthy_after,
                DEFAULT_UNHEALTHY_AFTER,
            ),
            healthy_after: threshold(
                &mut p,
                "health.healthy_after",
                h.healthy_after,
                DEFAULT_HEALTHY_AFTER,
            ),
        };

        let l = &raw.limits;
        let limits = Limits {
            max_header_bytes: p.positive(
                "limits.max_header_bytes",
                l.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
            ),
            max_read_body_bytes: p.positive(
                "limits.max_read_body_bytes",
                l.max_read_body_bytes,
                DEFAULT_MAX_READ_BODY_BYTES,
            ),
            max_retry_body_bytes: match l.max_retry_body_bytes {
                // Zero is allowed: it turns 421 retries of bodies off.
                Some(0) => 0,
                other => p.positive(
                    "limits.max_retry_body_bytes",
                    other,
                    DEFAULT_MAX_RETRY_BODY_BYTES,
                ),
            },
            max_concurrent_requests: p.positive(
                "limits.max_concurrent_requests",
                l.max_concurrent_requests,
                DEFAULT_MAX_CONCURRENT_REQUESTS,
            ),
            header_read_timeout: p.duration(
                "limits.header_read_timeout",
                l.header_read_timeout.as_deref(),
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            body_read_timeout: p.duration(
                "limits.body_read_timeout",
                l.body_read_timeout.as_deref(),
                DEFAULT_BODY_READ_TIMEOUT,
            ),
            idle_timeout: p.duration(
                "limits.idle_timeout",
                l.idle_timeout.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            ),
        };
        if limits.max_concurrent_requests > MAX_CONCURRENT_REQUESTS {
            p.push(
                "limits.max_concurrent_requests",
                format!("must be at most {MAX_CONCURRENT_REQUESTS}"),
            );
        }
        if limits.max_header_bytes < MIN_HEADER_BYTES {
            p.push(
                "limits.max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            );
        }

        let access_log = match raw.log.access.as_deref() {
            None | Some("text") => AccessLog::Text,
            Some("json") => AccessLog::Json,
            Some("off") => AccessLog::Off,
            Some(other) => {
                p.push(
                    "log.access",
                    format!("unknown format {other:?}; use \"text\", \"json\" or \"off\""),
                );
                AccessLog::Text
            }
        };
        let drain_timeout = p.duration(
            "shutdown.drain_timeout",
            raw.shutdown.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        );

        if !p.0.is_empty() {
            return Err(ConfigErrors(p.0));
        }
        Ok(Self {
            local,
            global_home,
            listen,
            tls,
            loom,
            increment,
            datacenters,
            shards,
            coordination,
            health,
            limits,
            route_headers: raw.response.route_headers.unwrap_or(true),
            access_log,
            admin_token: raw.admin.token.clone(),
            drain_timeout,
        })
    }
}

/// `[tls] client_auth`: "optional" (the default) or "required", which needs `client_ca`.
fn client_auth(p: &mut Problems, tls: &RawTls) -> ClientAuth {
    match tls.client_auth.as_deref() {
        None | Some("optional") => ClientAuth::Optional,
        Some("required") => {
            if tls.client_ca.is_none() {
                p.push(
                    "tls.client_auth",
                    "\"required\" needs tls.client_ca, the CA whose certificates it requires",
                );
            }
            ClientAuth::Required
        }
        Some(other) => {
            p.push(
                "tls.client_auth",
                format!("unknown value {other:?}; use \"optional\" or \"required\""),
            );
            ClientAuth::Optional
        }
    }
}

/// Why `backend = "etcd"` cannot run in this binary, if it cannot: said by `check` and by `run`
/// before anything starts, not after the router claims to be serving.
fn etcd_unavailable(built_with_etcd: bool) -> Option<&'static str> {
    (!built_with_etcd).then_some(
        "this binary was built without the etcd backend; build with `--features etcd` (needs \
         protoc) or use the Docker image",
    )
}

fn threshold(p: &mut Problems, key: &str, value: Option<i64>, default: u32) -> u32 {
    match value {
        None => default,
        Some(v) if (1..=1000).contains(&v) => u32::try_from(v).unwrap_or(default),
        Some(_) => {
            p.push(key, "must be between 1 and 1000");
            default
        }
    }
}

fn is_dc_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(two.warnings().len(), 1);
        assert!(two.warnings()[0].contains("three failure domains"));
        assert!(Config::from_toml(GOOD).unwrap().warnings().is_empty());
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
