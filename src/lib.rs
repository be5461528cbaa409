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
//! Folders by concern, layered: each may import only from those listed before it, and
//! `tests/layout.rs` fails on an import that points up, or on any cycle between folders or
//! between the files of one folder.
//!
//! - `shard`: the leaf domain types, `DcId`, `ShardKey`, `ShardState`, `Epoch`.
//! - `metrics`: metric names and the Prometheus recorder; anything may record into it.
//! - `events`: the ring of recent events (ownership, health, reloads, fences, hooks) behind
//!   `/admin/events`; anything may record into it too.
//! - `routing/`: pure decisions. `classify` (method + path → route and shard key, the path
//!   rule), `table` (the immutable ownership [`Table`](routing::table::Table), resolve and
//!   admit), `fence` (the lease arithmetic).
//! - `config/`: the TOML file (`raw`), its validation with one function per section
//!   (`validate`), what a reload changes (`diff`), and the table a config describes (`table`).
//! - `http/`: HTTP plumbing: the body type, header rules, the upstream client (`forward`: the
//!   shared pool, a client connection's own Loom connection in `affine`, the per-upstream
//!   connection bound in `bound`), TLS configs, and `error`, where every router error becomes a
//!   response.
//! - `health`: probes of the local Loom and peer routers, and the threshold state machine.
//! - `coord/`: the coordination store (interface, `memory` and `etcd` backends), joining and
//!   following it (`join`), the single snapshot writer (`control`), the lease and write gate,
//!   failover and the become-owner hook.
//! - `proxy/`: the request path: the per-request context (`request`), a client's request
//!   (`client`), what the local Loom serves (`local`), a write sent to the owner (`peer`), the
//!   routers' probes (`probe`), the one edge where responses are finished and counted (`edge`),
//!   the data listeners (`listener`), and the request workers that run them (`workers`: a thread
//!   and a single-threaded runtime each).
//! - `ops/`: the admin listener, reload triggers and the operator CLI.
//! - `app`: wiring; bind, run, drain.
//! - `demo/` (cargo feature `demo`, on by default): the three-DC sandbox of `loom-router demo`
//!   and the tests, each DC an emulated Loom from the `loom-emulator` workspace crate
//!   (`crates/loom-emulator`) and a real router. The production build leaves both out.
//!
//! `docs/architecture.md` draws the same map with the reasons behind it.
//!
//! # The life of a request
//!
//! 1. A request worker's `proxy::listener` accepts a connection and serves it to the end on that
//!    worker's thread; hyper parses each request head within the header size and time limits
//!    (hyper's own 400 and 431 are rewritten into router errors with codes).
//! 2. `proxy` loads the current snapshot (config + table) once, with one `ArcSwap` load, and
//!    refuses a request without exactly one valid `Host`.
//! 3. `routing::classify` refuses a path that is not in the normal form Loom routes on (no `//`,
//!    no dot-segments, no encoded `/` or `\`: `docs/routing.md`), then names the route (read,
//!    write, create, global-write, provisioner, passthrough) and the shard key: a cluster ID
//!    from the path, the global shard, this DC's home shard, or a `/v2/nodes` body or lookup.
//! 4. `routing::table` resolves the key against the table: the local Loom, or the owner DC's
//!    router. A read of one cluster stays local unless the client must read its own write
//!    (`routing::fresh`), when it goes to the owner too (`read-owner`). A request from a peer
//!    router (`X-Loom-Router-Hop`) is instead admitted or answered 421.
//! 5. `http::forward` sends it: to the local Loom over the client connection's own upstream
//!    connection (its first request, and any past the connection bound, through the pool), to a
//!    peer over a pooled keep-alive connection with hop headers; it streams the response back,
//!    and a 421 from a peer is retried at most twice.
//! 6. `proxy::edge` adds `X-Loom-Route` and `X-Loom-Served-By`, turns any error into its
//!    status and code (`http::error`), and logs and counts the request once.
//!
//! Off the request path, `health` probes peers and the local Loom, feeding fail-fast
//! `owner_unavailable` answers, `/readyz` and the router's registration; with a coordination
//! store, `coord::join` follows ownership and `coord::failover` moves shards of dead DCs;
//! `coord::control` is the only code that replaces the snapshot.
//!
//! # Glossary
//!
//! - *residue*: `id mod increment`, the number of a shard.
//! - *home*: the DC whose `id_start` lands in a residue. *owner*: the DC that may write it now.
//! - *global shard*: writes that name no cluster (templates, providers, tenants...).
//! - *epoch*: a shard's version; grows whenever its owner or state changes.
//! - *hop*: one router forwarding a write, or a `read-owner` read, to another. Never more than
//!   one.

pub mod app;
pub mod config;
pub mod coord;
#[cfg(feature = "demo")]
pub mod demo;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod routing;
pub mod shard;
