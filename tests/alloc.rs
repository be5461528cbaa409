//! Classification and resolution allocate nothing on the common path (issue 2, item 3).
//!
//! A separate test binary, because `allocation-counter` installs a counting global allocator
//! for the whole process.

use http::Method;
use loom_router::config::Config;
use loom_router::routing::classify::{classify, Key};
use loom_router::shard::ShardKey;

#[test]
fn classify_and_resolve_allocate_nothing_for_plain_paths() {
    let config = Config::from_toml(include_str!("../config/loom-router.toml")).unwrap();
    let table = config.table();
    let requests = [
        (Method::GET, "/v2/clusters/00000079"),
        (Method::GET, "/v1/loom/clusters/00000012/status"),
        (Method::POST, "/v2/clusters"),
        (Method::DELETE, "/v2/clusters/00000012"),
        (
            Method::POST,
            "/v1/loom/clusters/00000013/services/hdfs/restart",
        ),
        (Method::PUT, "/v2/providers/p1"),
        (Method::POST, "/v2/tasks/finish"),
        (Method::GET, "/status"),
    ];
    let mut owners = 0;
    let counted = allocation_counter::measure(|| {
        for _ in 0..100 {
            for (method, path) in &requests {
                let class = classify(method, path).unwrap();
                let key = match class.key {
                    Key::Cluster(id) => Some(table.shard_key_of_cluster(id)),
                    Key::Global => Some(ShardKey::Global),
                    Key::Home => table.home_shard_of(config.local),
                    Key::None | Key::ClusterRead(_) | Key::NodeBody | Key::NodeLookup => None,
                };
                if let Some(key) = key {
                    owners += usize::from(table.resolve_write(config.local, key).is_ok());
                }
            }
        }
    });
    assert_eq!(owners, 400);
    assert_eq!(
        counted.count_total, 0,
        "the hot path allocated: {counted:?}"
    );
}
