//! The integration tests: one binary, one module per concern of the contract.
//!
//! Each test starts three emulated DCs (Loom emulator + real router, on 127.0.0.1 port 0) with
//! `support::Cluster` and asserts what the client got and what each DC's Loom received.

// Test support panics on purpose: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

mod admin;
mod certs;
mod cli;
mod consistency;
mod demo;
mod docker;
mod edge;
mod endpoints;
mod errors;
#[cfg(feature = "etcd")]
mod etcd;
// Shared with tests/chaos and the failover benchmark, which use more of it.
#[cfg(feature = "etcd")]
#[allow(dead_code)]
#[path = "../common/etcd_cluster.rs"]
mod etcd_cluster;
mod failover;
mod history;
mod peers;
mod reload;
mod routing;
mod status_page;
mod support;
mod tls;
mod upstream;
mod workers;
