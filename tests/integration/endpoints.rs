//! Every endpoint of the Loom and Coopr REST APIs (`/v1/loom` and `/v2`), classified.
//!
//! Pure: no servers. Each row is (method, path relative to `{B}` or absolute, route). `{id}` is
//! a cluster in shard 9; rows are checked under both generations where Loom has them.

use http::Method;
use loom_router::routing::classify::{classify, Class, Key, Route};

const ID: &str = "00000079";

fn check(method: &str, path: &str, route: Route, key: Key) {
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    let got = classify(&m, path).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(got, Class { route, key }, "{method} {path}");
}

/// Rows under `{B}` that exist in both Loom (`/v1/loom`) and Coopr (`/v2`).
#[test]
fn every_endpoint_of_both_generations() {
    use Key::{Cluster, ClusterRead, Global, Home, None as NoKey};
    use Route::*;
    let c = Cluster(79);
    // A read of one cluster names it, in case it must be read from the owner.
    let r = ClusterRead(79);
    let rows: Vec<(&str, String, Route, Key)> = vec![
        // 2.1 clusters by ID
        ("GET", format!("/clusters/{ID}"), Read, r),
        ("GET", format!("/clusters/{ID}/status"), Read, r),
        ("GET", format!("/clusters/{ID}/services"), Read, r),
        ("GET", format!("/clusters/{ID}/plans"), Read, r),
        ("GET", format!("/clusters/{ID}/plans/{ID}-001"), Read, r),
        ("GET", format!("/clusters/{ID}/config"), Read, r),
        ("DELETE", format!("/clusters/{ID}"), Write, c),
        ("POST", format!("/clusters/{ID}"), Write, c),
        ("POST", format!("/clusters/{ID}/abort"), Write, c),
        ("POST", format!("/clusters/{ID}/pause"), Write, c),
        ("POST", format!("/clusters/{ID}/resume"), Write, c),
        ("PUT", format!("/clusters/{ID}/config"), Write, c),
        ("POST", format!("/clusters/{ID}/services"), Write, c),
        ("POST", format!("/clusters/{ID}/services/start"), Write, c),
        ("POST", format!("/clusters/{ID}/services/stop"), Write, c),
        ("POST", format!("/clusters/{ID}/services/restart"), Write, c),
        (
            "POST",
            format!("/clusters/{ID}/services/hdfs/start"),
            Write,
            c,
        ),
        (
            "POST",
            format!("/clusters/{ID}/services/hdfs/stop"),
            Write,
            c,
        ),
        (
            "POST",
            format!("/clusters/{ID}/services/hdfs/restart"),
            Write,
            c,
        ),
        (
            "POST",
            format!("/clusters/{ID}/clustertemplate/sync"),
            Write,
            c,
        ),
        // 2.1 IDs outside the path
        ("POST", "/getNodeProperties".to_owned(), Read, NoKey),
        ("POST", "/tasks/finish".to_owned(), Provisioner, NoKey),
        // 2.2 create and collections
        ("POST", "/clusters".to_owned(), Create, Home),
        ("GET", "/clusters".to_owned(), Read, NoKey),
        (
            "GET",
            "/clusters?status=pending,active".to_owned(),
            Read,
            NoKey,
        ),
        ("POST", "/getClusterStatuses".to_owned(), Read, NoKey),
        // 2.3 entities (Loom 0.9.6/0.9.7 and Coopr alike)
        ("GET", "/providers".to_owned(), Read, NoKey),
        ("GET", "/providers/rackspace".to_owned(), Read, NoKey),
        ("POST", "/providers".to_owned(), GlobalWrite, Global),
        (
            "PUT",
            "/providers/rackspace".to_owned(),
            GlobalWrite,
            Global,
        ),
        (
            "DELETE",
            "/providers/rackspace".to_owned(),
            GlobalWrite,
            Global,
        ),
        ("POST", "/hardwaretypes".to_owned(), GlobalWrite, Global),
        ("PUT", "/imagetypes/centos6".to_owned(), GlobalWrite, Global),
        ("DELETE", "/services/hdfs".to_owned(), GlobalWrite, Global),
        (
            "PUT",
            "/clustertemplates/hadoop".to_owned(),
            GlobalWrite,
            Global,
        ),
        ("GET", "/export".to_owned(), Read, NoKey),
        ("POST", "/import".to_owned(), GlobalWrite, Global),
        ("GET", "/providertypes".to_owned(), Read, NoKey),
        (
            "PUT",
            "/providertypes/openstack".to_owned(),
            GlobalWrite,
            Global,
        ),
        (
            "DELETE",
            "/automatortypes/chef".to_owned(),
            GlobalWrite,
            Global,
        ),
        // 2.4 provisioner traffic
        ("POST", "/tasks/take".to_owned(), Provisioner, NoKey),
    ];
    for base in ["/v1/loom", "/v2"] {
        for (method, path, route, key) in &rows {
            // Strip the query the way a request URI's path does.
            let path = path.split('?').next().unwrap();
            check(method, &format!("{base}{path}"), *route, *key);
        }
    }
}

/// Coopr-only rows (`/v2`).
#[test]
fn every_coopr_only_endpoint() {
    use Key::{Global, NodeBody, NodeLookup, None as NoKey};
    use Route::*;
    let rows: [(&str, &str, Route, Key); 31] = [
        ("GET", "/v2/partialtemplates", Read, NoKey),
        ("GET", "/v2/providers/rackspace/2", Read, NoKey),
        ("DELETE", "/v2/providers/rackspace/2", GlobalWrite, Global),
        ("POST", "/v2/resolve", Read, NoKey),
        ("GET", "/v2/plugins/providertypes", Read, NoKey),
        (
            "GET",
            "/v2/plugins/automatortypes/chef/cookbooks",
            Read,
            NoKey,
        ),
        ("PUT", "/v2/plugins/providertypes/aws", GlobalWrite, Global),
        (
            "DELETE",
            "/v2/plugins/automatortypes/chef/3",
            GlobalWrite,
            Global,
        ),
        (
            "POST",
            "/v2/plugins/automatortypes/chef/cookbooks/hadoop",
            GlobalWrite,
            Global,
        ),
        (
            "POST",
            "/v2/plugins/automatortypes/chef/cookbooks/hadoop/versions/2/stage",
            GlobalWrite,
            Global,
        ),
        (
            "POST",
            "/v2/plugins/automatortypes/chef/cookbooks/hadoop/versions/2/recall",
            GlobalWrite,
            Global,
        ),
        (
            "DELETE",
            "/v2/plugins/automatortypes/chef/cookbooks/hadoop",
            GlobalWrite,
            Global,
        ),
        ("POST", "/v2/plugins/sync", GlobalWrite, Global),
        ("GET", "/v2/tenants", Read, NoKey),
        ("GET", "/v2/tenants/acme", Read, NoKey),
        ("POST", "/v2/tenants", GlobalWrite, Global),
        ("PUT", "/v2/tenants/acme", GlobalWrite, Global),
        ("DELETE", "/v2/tenants/acme", GlobalWrite, Global),
        ("GET", "/v2/provisioners", Provisioner, NoKey),
        ("GET", "/v2/provisioners/p1", Provisioner, NoKey),
        ("PUT", "/v2/provisioners/p1", Provisioner, NoKey),
        ("POST", "/v2/provisioners/p1/heartbeat", Provisioner, NoKey),
        ("DELETE", "/v2/provisioners/p1", Provisioner, NoKey),
        (
            "GET",
            "/v2/tenants/t1/automatortypes/chef/cookbooks/hadoop/versions/2",
            Provisioner,
            NoKey,
        ),
        (
            "GET",
            "/v2/tenants/t1/providertypes/aws/keys/dev/versions/1",
            Provisioner,
            NoKey,
        ),
        ("GET", "/v2/profile", Read, NoKey),
        ("PUT", "/v2/profile", GlobalWrite, Global),
        ("DELETE", "/v2/profile", GlobalWrite, Global),
        ("GET", "/v2/metrics/queues", Read, NoKey),
        ("GET", "/v2/metrics/nodes/usage", Read, NoKey),
        ("POST", "/v2/nodes", Write, NodeBody),
    ];
    for (method, path, route, key) in rows {
        check(method, path, route, key);
    }
    check("PUT", "/v2/nodes/5e0f-uuid", Route::Write, NodeBody);
    check("DELETE", "/v2/nodes/5e0f-uuid", Route::Write, NodeLookup);
    check("GET", "/v2/nodes/5e0f-uuid", Route::Read, Key::None);
}

/// 2.5: outside `{B}`.
#[test]
fn status_and_other_paths_outside_the_bases() {
    check("GET", "/status", Route::Passthrough, Key::None);
    check("GET", "/loom-router/readyz", Route::Readyz, Key::None);
    check(
        "POST",
        "/coopr/clusters/00000079",
        Route::Passthrough,
        Key::None,
    );
}
