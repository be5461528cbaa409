//! Validation: [`RawConfig`] → [`Config`], one function per section of the file
//! (docs/configuration.md).
//!
//! Every problem is collected in [`Problems`] with the key it is about, and validation goes on
//! after the first one, so that an operator fixes the file in one pass. Checks that span
//! sections (an https listener needs `[tls]`; a write must fit inside the lease) are functions of
//! their own, called once both sections are known.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use super::raw::{
    RawConfig, RawConsistency, RawCoordination, RawDatacenter, RawHealth, RawIds, RawLimits,
    RawListen, RawLoom, RawResidue, RawRuntime, RawShard, RawTls,
};
use super::*;
use crate::routing::fence;
use crate::shard::{DcId, ShardKey, ShardState};

/// Collects problems while validating, so that all of them are reported at once.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<ConfigError>);

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

/// What the sections after `[[datacenters]]` look DCs up in: names → indices, and the number of
/// residues.
struct Dcs<'a> {
    names: HashMap<&'a str, DcId>,
    increment: u64,
}

impl Dcs<'_> {
    /// The index of `name`, or a problem at `key`.
    fn find(&self, p: &mut Problems, key: &str, name: &str) -> Option<DcId> {
        p.dc(key, &self.names, name)
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigErrors;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigErrors> {
        let mut p = Problems::default();
        let dcs = Dcs {
            increment: increment(&mut p, &raw.ids),
            names: dc_names(&mut p, &raw.datacenters),
        };
        let datacenters = datacenters(&mut p, &raw.datacenters, &dcs);
        let local = dcs.find(&mut p, "datacenter", &raw.datacenter).unwrap_or(0);
        let global_home = dcs
            .find(&mut p, "global_home", &raw.global_home)
            .unwrap_or(0);
        let shards = shards(&mut p, &raw.shards, &dcs);
        let listen = listen(&mut p, &raw.listen);
        let tls = raw.tls.as_ref().map(|t| tls(&mut p, t));
        let named_local = dcs.names.get(raw.datacenter.as_str()).copied();
        listeners_and_peers(&mut p, &raw, &listen, tls.as_ref(), named_local);
        let loom = loom(&mut p, &raw.loom);
        let coordination = coordination(&mut p, &raw.coordination);
        write_fits_lease(&mut p, &loom, &coordination);
        let health = health(&mut p, &raw.health);
        let limits = limits(&mut p, &raw.limits);
        let consistency = consistency(&mut p, &raw.consistency);
        let access_log = access_log(&mut p, raw.log.access.as_deref());
        let drain_timeout = p.duration(
            "shutdown.drain_timeout",
            raw.shutdown.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        );
        let workers = workers(&mut p, &raw.runtime);
        if !p.0.is_empty() {
            return Err(ConfigErrors(p.0));
        }
        Ok(Self {
            local,
            global_home,
            listen,
            tls,
            loom,
            increment: dcs.increment,
            datacenters,
            shards,
            coordination,
            health,
            limits,
            route_headers: raw.response.route_headers.unwrap_or(true),
            consistency,
            access_log,
            admin_token: raw.admin.token,
            drain_timeout,
            workers,
        })
    }
}

/// `[ids] increment`. Loom's counter settings must fit a Java int (Coopr reads them with
/// getInt).
fn increment(p: &mut Problems, ids: &RawIds) -> u64 {
    match u64::try_from(ids.increment) {
        Ok(0) | Err(_) => {
            p.push("ids.increment", "must be at least 1");
            1
        }
        Ok(n) if n > i32::MAX as u64 => {
            p.push("ids.increment", "must fit Loom's 32-bit setting");
            1
        }
        Ok(n) => n,
    }
}

/// `[[datacenters]] name`: present, well-formed and unique.
fn dc_names<'a>(p: &mut Problems, raw: &'a [RawDatacenter]) -> HashMap<&'a str, DcId> {
    if raw.is_empty() {
        p.push(
            "datacenters",
            "at least one [[datacenters]] entry is required",
        );
    }
    let mut names = HashMap::new();
    for (i, dc) in raw.iter().enumerate() {
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
    names
}

/// `[[datacenters]]`: one residue each, a router URL, and replicas that name other DCs.
fn datacenters(p: &mut Problems, raw: &[RawDatacenter], dcs: &Dcs<'_>) -> Vec<Datacenter> {
    let increment = dcs.increment;
    let mut homed: HashMap<u64, &str> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, dc) in raw.iter().enumerate() {
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
        out.push(Datacenter {
            name: dc.name.clone(),
            id_start,
            residue,
            router,
            replicas: dc_replicas(p, i, dc, dcs),
        });
    }
    out
}

/// `datacenters[i].replicas`: other DCs, each listed once.
fn dc_replicas(p: &mut Problems, i: DcId, dc: &RawDatacenter, dcs: &Dcs<'_>) -> Vec<DcId> {
    let mut replicas = Vec::with_capacity(dc.replicas.len());
    for (j, name) in dc.replicas.iter().enumerate() {
        let key = format!("datacenters[{i}].replicas[{j}]");
        let Some(r) = dcs.find(p, &key, name) else {
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
    replicas
}

/// `[[shards]]`: each key once, a known owner, an epoch of at least 1, a known state.
fn shards(p: &mut Problems, raw: &[RawShard], dcs: &Dcs<'_>) -> Vec<ShardEntry> {
    let mut shards = Vec::with_capacity(raw.len());
    let mut seen_keys = HashMap::new();
    for (i, s) in raw.iter().enumerate() {
        let Some(key) = shard_key(p, i, &s.residue, dcs.increment) else {
            continue;
        };
        if seen_keys.insert(key, i).is_some() {
            p.push(
                format!("shards[{i}].residue"),
                format!("shard {key} is listed twice"),
            );
        }
        let owner = dcs.find(p, &format!("shards[{i}].owner"), &s.owner);
        let replicas = (!s.replicas.is_empty()).then(|| {
            let key = |j: usize| format!("shards[{i}].replicas[{j}]");
            let found = s.replicas.iter().enumerate();
            found
                .filter_map(|(j, name)| dcs.find(p, &key(j), name))
                .collect()
        });
        let epoch = match s.epoch.map(u64::try_from) {
            None => 1,
            Some(Ok(e)) if e >= 1 => e,
            Some(_) => {
                p.push(format!("shards[{i}].epoch"), "must be at least 1");
                1
            }
        };
        let state = shard_state(p, i, s.state.as_deref());
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
    shards
}

/// `shards[i].residue`: a residue below `increment`, or `"global"`.
fn shard_key(p: &mut Problems, i: usize, residue: &RawResidue, increment: u64) -> Option<ShardKey> {
    let key = format!("shards[{i}].residue");
    match residue {
        RawResidue::Number(n) => match u64::try_from(*n) {
            Ok(r) if r < increment => Some(ShardKey::Residue(r)),
            _ => {
                let most = increment - 1;
                p.push(key, format!("must be between 0 and {most} (increment - 1)"));
                None
            }
        },
        RawResidue::Name(n) => match n.parse::<ShardKey>() {
            Ok(ShardKey::Global) => Some(ShardKey::Global),
            _ => {
                let problem = format!("{n:?} is not a residue; use an integer or \"global\"");
                p.push(key, problem);
                None
            }
        },
    }
}

/// `shards[i].state`: `"active"` (the default) or `"fenced"`.
fn shard_state(p: &mut Problems, i: usize, state: Option<&str>) -> ShardState {
    let Some(state) = state else {
        return ShardState::Active;
    };
    state.parse().unwrap_or_else(|()| {
        p.push(
            format!("shards[{i}].state"),
            format!("unknown state {state:?}; use \"active\" or \"fenced\""),
        );
        ShardState::Active
    })
}

/// `[listen]`.
fn listen(p: &mut Problems, raw: &RawListen) -> Listen {
    Listen {
        http: p.addr(
            "listen.http",
            raw.http.as_deref(),
            Some(DEFAULT_LISTEN_HTTP),
        ),
        https: p.addr("listen.https", raw.https.as_deref(), None),
        admin: p
            .addr(
                "listen.admin",
                raw.admin.as_deref(),
                Some(DEFAULT_LISTEN_ADMIN),
            )
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
        backlog: backlog(p, raw.backlog),
    }
}

/// `[listen] backlog`: 1 to 65535 (the kernel's limit for `somaxconn`), 1024 by default, so that
/// a load balancer opening hundreds of connections at once does not overflow the queue and wait
/// for SYN retries.
fn backlog(p: &mut Problems, raw: Option<i64>) -> u32 {
    let backlog = p.positive("listen.backlog", raw, DEFAULT_BACKLOG as usize);
    u32::try_from(backlog)
        .ok()
        .filter(|b| *b <= MAX_BACKLOG)
        .unwrap_or_else(|| {
            p.push("listen.backlog", format!("must be at most {MAX_BACKLOG}"));
            DEFAULT_BACKLOG
        })
}

/// `[tls]`.
fn tls(p: &mut Problems, raw: &RawTls) -> Tls {
    Tls {
        cert: raw.cert.clone(),
        key: raw.key.clone(),
        client_ca: raw.client_ca.clone(),
        client_auth: client_auth(p, raw),
        handshake_timeout: p.duration(
            "tls.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
    }
}

/// Across `[listen]`, `[tls]` and `[[datacenters]]`: an https listener needs `[tls]`, some
/// client listener must exist, and toward an https peer a router presents its own certificate
/// and verifies the peer's against `client_ca` (docs/configuration.md).
fn listeners_and_peers(
    p: &mut Problems,
    raw: &RawConfig,
    listen: &Listen,
    tls: Option<&Tls>,
    local: Option<DcId>,
) {
    if listen.https.is_some() && tls.is_none() {
        p.push("listen.https", "an https listener needs a [tls] section");
    }
    if listen.http.is_none() && listen.https.is_none() {
        p.push(
            "listen",
            "no client listener: set listen.http, listen.https or both",
        );
    }
    let peers_ca = tls.is_some_and(|t| t.client_ca.is_some());
    for (i, dc) in raw.datacenters.iter().enumerate() {
        if dc.router.starts_with("https://") && !peers_ca && Some(i) != local {
            p.push(
                format!("datacenters[{i}].router"),
                "an https:// peer needs [tls] with cert, key and client_ca",
            );
        }
    }
}

/// `[loom]`: an http(s) upstream with no path, its health path, a CA for https, timeouts.
fn loom(p: &mut Problems, raw: &RawLoom) -> Loom {
    let upstream = p.url("loom.upstream", &raw.upstream).unwrap_or_default();
    let health_path = raw
        .health_path
        .clone()
        .unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_owned());
    if !health_path.starts_with('/') || health_path.parse::<http::uri::PathAndQuery>().is_err() {
        p.push("loom.health_path", "must be a path starting with '/'");
    }
    if raw.upstream.starts_with("https://") && raw.ca.is_none() {
        p.push(
            "loom.ca",
            "an https:// upstream needs the CA that signed its certificate",
        );
    }
    Loom {
        upstream,
        health_path,
        ca: raw.ca.clone(),
        connect_timeout: p.duration(
            "loom.connect_timeout",
            raw.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        request_timeout: p.duration(
            "loom.request_timeout",
            raw.request_timeout.as_deref(),
            DEFAULT_REQUEST_TIMEOUT,
        ),
        write_timeout: p.duration(
            "loom.write_timeout",
            raw.write_timeout.as_deref(),
            DEFAULT_WRITE_TIMEOUT,
        ),
    }
}

/// `[coordination]`.
fn coordination(p: &mut Problems, c: &RawCoordination) -> Coordination {
    let backend = backend(p, c.backend.as_deref());
    let become_owner_hook = c
        .become_owner_hook
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
    if coordination.keepalive >= coordination.lease {
        p.push(
            "coordination.keepalive",
            "must be shorter than coordination.lease",
        );
    }
    coordination
}

/// `coordination.backend`: `static` (the default), `memory`, or `etcd` if this binary has it.
fn backend(p: &mut Problems, backend: Option<&str>) -> Backend {
    match backend {
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
    }
}

/// Across `[loom]` and `[coordination]`: with a lease, every owned write must fit inside it
/// (docs/failover.md). The gate admits a write only if `write_timeout` ends before
/// lease·(1 − 2ρ) − δ after the last keepalive was sent, and the next keepalive may be up to
/// one interval away.
fn write_fits_lease(p: &mut Problems, loom: &Loom, coordination: &Coordination) {
    if coordination.backend == Backend::Static {
        return;
    }
    let usable = fence::usable_lease(coordination.lease, coordination.keepalive);
    if loom.write_timeout > usable {
        p.push(
            "loom.write_timeout",
            format!(
                "{} does not fit inside the coordination lease: with lease {} and keepalive {}, \
                 at most {} does; every write would be fenced",
                humantime::format_duration(loom.write_timeout),
                humantime::format_duration(coordination.lease),
                humantime::format_duration(coordination.keepalive),
                humantime::format_duration(usable),
            ),
        );
    }
}

/// `[health]`.
fn health(p: &mut Problems, h: &RawHealth) -> Health {
    Health {
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
            p,
            "health.unhealthy_after",
            h.unhealthy_after,
            DEFAULT_UNHEALTHY_AFTER,
        ),
        healthy_after: threshold(
            p,
            "health.healthy_after",
            h.healthy_after,
            DEFAULT_HEALTHY_AFTER,
        ),
    }
}

/// `[limits]`.
fn limits(p: &mut Problems, l: &RawLimits) -> Limits {
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
        max_upstream_connections: p.positive(
            "limits.max_upstream_connections",
            l.max_upstream_connections,
            DEFAULT_MAX_UPSTREAM_CONNECTIONS,
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
    limits
}

/// `[runtime] workers`: 1 to [`MAX_WORKERS`]; by default one per core the process may use.
fn workers(p: &mut Problems, runtime: &RawRuntime) -> usize {
    let cores = || std::thread::available_parallelism().map_or(1, usize::from);
    let workers = p.positive("runtime.workers", runtime.workers, cores());
    if workers > MAX_WORKERS {
        p.push("runtime.workers", format!("must be at most {MAX_WORKERS}"));
        return cores().min(MAX_WORKERS);
    }
    workers
}

/// `[consistency]`: a window of zero (the default, off) up to [`MAX_READ_YOUR_WRITES`], and a
/// map bound of at least 1.
fn consistency(p: &mut Problems, raw: &RawConsistency) -> Consistency {
    let key = "consistency.read_your_writes";
    let read_your_writes = match raw.read_your_writes.as_deref() {
        None => DEFAULT_READ_YOUR_WRITES,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d > MAX_READ_YOUR_WRITES => {
                p.push(key, "must be at most 1h");
                DEFAULT_READ_YOUR_WRITES
            }
            Ok(d) => d,
            Err(e) => {
                p.push(
                    key,
                    format!(
                        "invalid duration {text:?} ({e}); write e.g. \"5s\", or \"0s\" for off"
                    ),
                );
                DEFAULT_READ_YOUR_WRITES
            }
        },
    };
    let max_tracked_clusters = p.positive(
        "consistency.max_tracked_clusters",
        raw.max_tracked_clusters,
        DEFAULT_MAX_TRACKED_CLUSTERS,
    );
    Consistency {
        read_your_writes,
        max_tracked_clusters,
    }
}

/// `[log] access`: `text` (the default), `json` or `off`.
fn access_log(p: &mut Problems, access: Option<&str>) -> AccessLog {
    match access {
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
pub(super) fn etcd_unavailable(built_with_etcd: bool) -> Option<&'static str> {
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
