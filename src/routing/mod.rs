//! Routing decisions as pure functions: what a request is, and where it may go
//! (docs/routing.md).
//!
//! - `classify`: method + path → route and shard key; the cluster-ID grammar and the path rule.
//! - `table`: the immutable ownership [`Table`](table::Table) and the resolve and admit
//!   functions the request path calls on it.
//! - `fresh`: which reads of one cluster its owner must serve, so a client reads its own write
//!   (`X-Loom-Consistency`, the `loom-ryw` cookie, and the clusters written through this router).
//! - `fence`: how long a lease lets a router admit writes (docs/failover.md), shared by the
//!   lease task and config validation.
//!
//! Nothing here does I/O, spawns a task or knows about health, config files or the store: it
//! imports only `shard`, and time comes in as an argument. Building a table from a config (`config`) or from a store's view
//! (`coord`) happens above, so that this folder stays the part a reviewer can check by reading.

pub mod classify;
pub mod fence;
pub mod fresh;
pub mod table;
