//! loom-router: routes Loom/Coopr API traffic by cluster shard. Reads are served by the local
//! Loom; writes go to the data center (DC) that owns the cluster's shard.
//!
//! One router runs in front of each DC's Loom server. Cluster IDs come from per-DC counters
//! (`start_k, start_k + M, ...`), so `shard(id) = id mod M` names the DC that created a cluster,
//! and only the shard's owner may write it. What it promises is written down in `docs/`
//! (`docs/routing.md` for requests, `docs/failover.md` for ownership, `docs/configuration.md` and
//! `docs/operations.md`); comments cite those pages.
//!
//! # Layout
//!
//! Pure, no I/O:
//! - `shard`: the leaf domain types, `DcId`, `ShardKey`, `ShardState`, `Epoch`; imports nothing
//!   from the rest of the crate.
//! - `classify`: method + path → route and shard key (docs/routing.md); the cluster-ID grammar.
//! - `ownership`: the immutable ownership [`Table`](ownership::Table); resolving a request to
//!   the local Loom or a peer; admitting a forwarded write.
//! - `config`: the TOML file, its validation, and errors that name the key.
//! - `fence`: the fence arithmetic (how long a lease lets a router admit writes), shared by the
//!   lease task and config validation.
//! - `headers`: header names the router owns and proxy header rewrites (hop-by-hop, `Via`).
//! - `error`: every error the router answers itself, mapped to status and code in one place.
//!
//! I/O at the edges:
//! - `control`: the single writer of the routing snapshot (`ArcSwap`).
//! - `proxy`: the request path, classify → resolve → forward, and the edge that logs and counts.
//! - `forward`: the pooled upstream client, timeouts, body buffering.
//! - `health`: probes of the local Loom and peer routers, and the threshold state machine.
//! - `listener`: the data listeners' accept loop (plain and TLS), connection limits and drain.
//! - `tls`: PEM files → rustls configs for the https listener and https upstreams.
//! - `reload`: what triggers a config reload (SIGHUP, file changes); `control` performs it.
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, `/admin/table`.
//! - `metrics`: metric names and the Prometheus recorder.
//! - `coord`: the coordination store interface (etcd semantics) and its data model;
//!   `memory_store` and `etcd_store` implement it, and `store` dispatches to the configured one.
//! - `coordinator`: joining the store, following it with a watch, starting the tasks below.
//! - `lease`: this router's lease, its registration, and the self-fencing write gate.
//! - `failover`: the failover manager, planned switchover, freeze.
//! - `hook`: the become-owner hook calls.
//! - `operator`: the CLI side of the admin API.
//! - `app`: wiring; bind, run, drain.
//! - `demo` (cargo feature `demo`, on by default): the three-DC sandbox of `loom-router demo`,
//!   each DC an emulated Loom from the `loom-emulator` workspace crate (`crates/loom-emulator`)
//!   and a real router. The production build leaves both out.
//! - `body`: the body type requests and responses travel in, and the client body's stall timer.
//!
//! # The life of a request
//!
//! 1. `listener` accepts a connection; hyper parses each request head within the header size
//!    and time limits (hyper's own 400 and 431 are rewritten into router errors with codes).
//! 2. `proxy` loads the current snapshot (config + table) once, with one `ArcSwap` load, and
//!    refuses a request without exactly one valid `Host`.
//! 3. `classify` refuses a path that is not in the normal form Loom routes on (no `//`, no
//!    dot-segments, no encoded `/` or `\`: `docs/routing.md`), then names the route (read,
//!    write, create, global-write, provisioner, passthrough) and the shard key: a cluster ID
//!    from the path, the global shard, this DC's home shard, or a `/v2/nodes` body or lookup.
//! 4. `ownership` resolves the key against the table: the local Loom, or the owner DC's router.
//!    A request from a peer router (`X-Loom-Router-Hop`) is instead admitted or answered 421.
//! 5. `forward` sends it over a pooled keep-alive connection, with hop headers for peers, and
//!    streams the response back; a 421 from a peer is retried at most twice.
//! 6. `proxy` adds `X-Loom-Route` and `X-Loom-Served-By`, turns any error into its status and
//!    code (`error`), and logs and counts the request once.
//!
//! Off the request path, `health` probes peers and the local Loom, feeding fail-fast
//! `owner_unavailable` answers, `/readyz` and the router's registration; with a coordination
//! store, `coordinator` follows ownership and `failover` moves shards of dead DCs; `control` is
//! the only code that replaces the snapshot.
//!
//! # Glossary
//!
//! - *residue*: `id mod increment`, the number of a shard.
//! - *home*: the DC whose `id_start` lands in a residue. *owner*: the DC that may write it now.
//! - *global shard*: writes that name no cluster (templates, providers, tenants...).
//! - *epoch*: a shard's version; grows whenever its owner or state changes.
//! - *hop*: one router forwarding a write to another. Never more than one.

pub mod admin;
pub mod app;
pub mod body;
pub mod classify;
pub mod config;
pub mod control;
pub mod coord;
pub mod coordinator;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd_store;
pub mod failover;
pub mod fence;
pub mod forward;
pub mod headers;
pub mod health;
pub mod hook;
pub mod lease;
pub mod listener;
pub mod memory_store;
pub mod metrics;
pub mod operator;
pub mod ownership;
pub mod proxy;
pub mod reload;
pub mod shard;
pub mod store;
pub mod tls;
