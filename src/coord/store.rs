//! The configured coordination store: one type that dispatches the interface of `coord/mod.rs` to
//! its backend (`coord/memory.rs`, or `coord/etcd.rs` with the `etcd` feature).
//!
//! An enum rather than a trait object: two backends, known at build time, and no boxing of
//! futures. Election is written here once, for every backend, as a key created on the
//! candidate's lease. This file must not decide anything; it only forwards.

use std::time::Duration;

use crate::coord::memory::MemoryClient;
use crate::coord::{
    Compare, CoordError, Kv, LeaseId, Op, Renewal, Revision, TxnOutcome, WatchStream,
};

/// The configured backend.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(MemoryClient),
    #[cfg(feature = "etcd")]
    Etcd(crate::coord::etcd::EtcdClient),
}

impl Store {
    /// Grant a lease of `ttl`.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        match self {
            Self::Memory(m) => m.grant(ttl),
            #[cfg(feature = "etcd")]
            Self::Etcd(e) => e.grant(ttl).await,
        }
    }

    /// One keepalive round trip, given `within` at each etcd member it tries (the memory store
    /// answers at once).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn keepalive(&self, lease: LeaseId, within: Duration) -> Result<Renewal, CoordError> {
        match self {
            Self::Memory(m) => m.keepalive(lease),
            #[cfg(feature = "etcd")]
            Self::Etcd(e) => e.keepalive(lease, within).await,
        }
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, Revision), CoordError> {
        match self {
            Self::Memory(m) => m.range(prefix),
            #[cfg(feature = "etcd")]
            Self::Etcd(e) => e.range(prefix).await,
        }
    }

    /// If every compare holds, apply `then`; otherwise apply `otherwise`. Atomic.
    pub async fn txn(
        &self,
        compares: Vec<Compare>,
        then: Vec<Op>,
        otherwise: Vec<Op>,
    ) -> Result<TxnOutcome, CoordError> {
        match self {
            Self::Memory(m) => m.txn(&compares, then, otherwise),
            #[cfg(feature = "etcd")]
            Self::Etcd(e) => e.txn(&compares, then, otherwise).await,
        }
    }

    /// Election: become the holder of `key` unless someone holds it, on `lease` (so the role
    /// ends with the holder's lease). Returns the key's `create_revision` when elected; the
    /// holder proves it still leads by comparing that revision in its transactions.
    pub async fn campaign(
        &self,
        key: &str,
        candidate: &str,
        lease: LeaseId,
    ) -> Result<Option<Revision>, CoordError> {
        let claim = Op::Put {
            key: key.to_owned(),
            value: candidate.as_bytes().to_vec(),
            lease,
        };
        let absent = vec![Compare::CreateRevision(key.to_owned(), 0)];
        let outcome = self.txn(absent, vec![claim], Vec::new()).await?;
        Ok(outcome.succeeded.then_some(outcome.revision))
    }

    /// Changes under `prefix` from revision `from` on.
    pub async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, CoordError> {
        match self {
            Self::Memory(m) => m.watch(prefix, from),
            #[cfg(feature = "etcd")]
            Self::Etcd(e) => e.watch(prefix, from).await,
        }
    }
}
