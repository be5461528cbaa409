//! Micro-benchmarks of the request path's pure middle (issue 5): classify plus resolve over a
//! mix of real Loom requests, the Host check, and the header rewrite every forwarded request
//! gets, and what reading your own writes adds to a read it does not redirect. Reports
//! criterion's time per request, and heap allocations per request (counted with
//! allocation-counter, which installs a counting allocator in this benchmark binary).
//!
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, Method, Version};
use loom_router::config::Config;
use loom_router::http::headers::{
    host_ok, ip_value, prepare_downstream, prepare_upstream, Client, CONSISTENCY,
};
use loom_router::routing::classify::{classify, Key};
use loom_router::routing::fresh::{self, Asked, Tracked};
use loom_router::routing::table::Table;
use loom_router::shard::ShardKey;

/// A mix of the requests a Loom front door sees, reads first (they dominate).
const MIX: [(&str, &str); 10] = [
    ("GET", "/v2/clusters/00000079"),
    ("GET", "/v2/clusters/00000012/status"),
    ("GET", "/v1/loom/clusters"),
    ("GET", "/v2/clusters/00000013/plans/00000013-001"),
    ("POST", "/v2/clusters"),
    ("DELETE", "/v2/clusters/00000012"),
    ("POST", "/v1/loom/clusters/00000013/services/hdfs/restart"),
    ("PUT", "/v2/providers/rackspace"),
    ("POST", "/v2/tasks/finish"),
    ("GET", "/status"),
];

fn requests() -> Vec<(Method, &'static str)> {
    MIX.iter()
        .map(|(m, p)| (Method::from_bytes(m.as_bytes()).expect("method"), *p))
        .collect()
}

fn route_all(config: &Config, table: &Table, requests: &[(Method, &str)]) -> usize {
    let mut owned = 0;
    for (method, path) in requests {
        let Ok(class) = classify(method, path) else {
            continue;
        };
        let key = match class.key {
            Key::Cluster(id) => Some(table.shard_key_of_cluster(id)),
            Key::Global => Some(ShardKey::Global),
            Key::Home => table.home_shard_of(config.local),
            Key::None | Key::ClusterRead(_) | Key::NodeBody | Key::NodeLookup => None,
        };
        if let Some(key) = key {
            owned += usize::from(table.resolve_write(config.local, key).is_ok());
        }
    }
    owned
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "loom.example.com"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("coopr-userid", "admin"),
        ("coopr-tenantid", "tenant1"),
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("connection", "keep-alive"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let config = Config::from_toml(include_str!("../config/loom-router.toml")).expect("config");
    let table = config.table();
    let requests = requests();

    let allocations = allocation_counter::measure(|| {
        black_box(route_all(&config, &table, black_box(&requests)));
    });
    eprintln!(
        "classify + resolve: {:.2} heap allocations per request",
        allocations.count_total as f64 / requests.len() as f64
    );
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(requests.len() as u64));
    group.bench_function("classify_and_resolve_per_10_requests", |b| {
        b.iter(|| route_all(&config, &table, black_box(&requests)));
    });

    let ip = ip_value(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
    let client = Client {
        ip: &ip,
        https: false,
    };
    let via = HeaderValue::from_static("1.1 loom-router-us-east");
    let template = request_headers();
    let rewrite = |mut headers: HeaderMap| {
        prepare_upstream(&mut headers, client, &via, false);
        prepare_downstream(&mut headers, &via);
        headers
    };
    let allocations = allocation_counter::measure(|| {
        black_box(rewrite(black_box(template.clone())));
    });
    eprintln!(
        "header rewrite (with the clone of the map it starts from): {} heap allocations",
        allocations.count_total
    );
    group.throughput(Throughput::Elements(1));
    group.bench_function("header_rewrite", |b| {
        b.iter_batched(
            || template.clone(),
            |headers| rewrite(black_box(headers)),
            criterion::BatchSize::SmallInput,
        );
    });
    // The Host check every request gets before it is classified (RFC 9112 section 3.2).
    group.bench_function("host_check", |b| {
        b.iter(|| host_ok(black_box(&template), Version::HTTP_11, None));
    });
    fresh_read(&mut group, &template);
    group.finish();
}

/// What `[consistency] read_your_writes` adds to a read of one cluster that stays local: the
/// `X-Loom-Consistency` lookup every such read makes, then, with tracking on, one lookup in a
/// map of 10,000 other clusters and a check for a `Cookie` header (docs/routing.md).
fn fresh_read(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    headers: &HeaderMap,
) {
    let tracked = Tracked::default();
    for id in 0..10_000 {
        tracked.remember(1_000_000 + id, u64::MAX, 0, 100_000);
    }
    let asked = |h: &HeaderMap| fresh::asked(h.get_all(CONSISTENCY).iter().map(|v| v.as_bytes()));
    group.bench_function("read_your_writes_off_untracked_read", |b| {
        b.iter(|| asked(black_box(headers)) == Ok(Asked::Owner));
    });
    group.bench_function("read_your_writes_on_untracked_read", |b| {
        b.iter(|| {
            let h = black_box(headers);
            asked(h) == Ok(Asked::Owner)
                || tracked.holds(black_box(79), || 0)
                || h.contains_key(http::header::COOKIE)
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
