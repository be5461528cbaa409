//! Classification: method + path → which route a request takes and which shard key it names.
//!
//! This is docs/routing.md as a pure function. It owns the cluster-ID grammar, the path rule
//! (`bad_path`: every path must be in the normal form Loom routes on, see [`normal_path`]) and the
//! routing table rows for both API generations (`/v1/loom` and `/v2`). It must not look at the
//! ownership table, the body or the network: rows that need the body (`/v2/nodes`) or a lookup
//! (`DELETE /v2/nodes/{node}`) come back as a [`Key`] that tells the proxy what to read, and
//! `routing/table.rs` decides where the request goes.
//!
//! The common path (no percent-escapes) allocates nothing: segments are borrowed from the path
//! and the cluster ID is parsed straight into a `u64`.

use std::borrow::Cow;

use http::Method;

/// The largest cluster ID: Loom's counter is a Java `long`.
pub const MAX_CLUSTER_ID: u64 = i64::MAX as u64;

/// The router's own probe path on the data listeners (docs/operations.md).
pub const READYZ_PATH: &str = "/loom-router/readyz";
/// Asked by a planned switchover of this router's DC's shard: has this router seen the fence,
/// and finished every write it admitted before it? Answered by the router, never passed on.
pub const DRAINED_PATH: &str = "/loom-router/drained";

/// What the request is, as the routing table in docs/routing.md names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Task and provisioner traffic: always the local Loom.
    Provisioner,
    /// Reads, and POSTs used as queries: always the local Loom.
    Read,
    /// `POST {B}/clusters`: the local Loom allocates an ID in this DC's home shard.
    Create,
    /// A write for one cluster: the owner of its shard.
    Write,
    /// A write with no cluster key: the owner of the global shard.
    GlobalWrite,
    /// Anything outside `{B}`: the local Loom.
    Passthrough,
    /// `GET /loom-router/readyz`: answered by the router itself.
    Readyz,
    /// `GET /loom-router/drained`: answered by the router itself.
    Drained,
}

/// Where the shard key of a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The request names no shard (reads, passthrough, provisioner, readyz).
    None,
    /// A cluster ID taken from the path of a write.
    Cluster(u64),
    /// A read of one cluster (`GET`/`HEAD` `{B}/clusters/{id}[/...]`): served locally, unless
    /// the client must read its own write, when it goes to the owner (`read-owner`).
    ClusterRead(u64),
    /// The global shard.
    Global,
    /// This DC's home shard (creates).
    Home,
    /// `clusterId` in the JSON body (`POST`/`PUT /v2/nodes[/{node}]`).
    NodeBody,
    /// The cluster of an existing node, learned from the local Loom (`DELETE /v2/nodes/{node}`).
    NodeLookup,
}

/// The result of classifying one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub route: Route,
    pub key: Key,
}

/// Why a request could not be classified. Both are the client's fault (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("the path has a dot-segment, an encoded '/' or an empty segment")]
    BadPath,
    #[error("the cluster ID is not 1 to 19 decimal digits of at most 9223372036854775807")]
    BadClusterId,
    #[error("a node body that is not strict JSON but may name a clusterId")]
    AmbiguousNodeBody,
}

/// API generation prefixes, as (prefix, number of segments it spans).
const V1: &str = "/v1/loom";
const V2: &str = "/v2";

/// Classify a request by method and raw (still percent-encoded) path, without its query.
///
/// The path must be in normal form ([`normal_path`]); the route is decided on its decoded form,
/// which is the path Loom routes on.
pub fn classify(method: &Method, raw_path: &str) -> Result<Class, ClassifyError> {
    let path = normal_path(raw_path)?;
    if path == READYZ_PATH || path == DRAINED_PATH {
        // Never passed on, whatever the method (the proxy answers 405 to anything but GET).
        let route = if path == READYZ_PATH {
            Route::Readyz
        } else {
            Route::Drained
        };
        return Ok(Class {
            route,
            key: Key::None,
        });
    }
    let Some(generation) = generation(&path) else {
        return Ok(PASSTHROUGH);
    };
    // Loom drops one trailing '/' before it matches a route, so `PUT /v2/nodes/n1/` is a node
    // write there; refusing it keeps the segments below the ones Loom sees.
    if path.ends_with('/') {
        return Err(ClassifyError::BadPath);
    }
    let rest = &path[generation.prefix().len()..];
    classify_under_base(method, generation, rest)
}

/// The decoded path a request is routed on, if its raw path is in normal form (docs/routing.md).
///
/// Loom's HTTP layer (netty-http) routes on `java.net.URI.create(uri).normalize().getPath()`:
/// dot-segments are removed, repeated slashes merged, and then percent-escapes decoded, `%2F`
/// into a real `/`. A path that any of those steps would change could reach Loom as a request
/// the router classified differently, so a path is in normal form only when:
/// - it starts with `/`;
/// - no segment is empty (`//`, leading or not); a trailing `/` is checked by [`classify`];
/// - no segment is `.` or `..`, plain or percent-encoded;
/// - no percent-escape decodes to `/` or `\`, and there is no raw `\` (some servers treat it as
///   `/`).
///
/// Then decoding changes no segment boundary, and the decoded path is the one Loom routes on.
/// The common path, with no `%`, is checked in one pass over its bytes and not copied.
pub fn normal_path(raw_path: &str) -> Result<Cow<'_, str>, ClassifyError> {
    let bytes = raw_path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(ClassifyError::BadPath);
    }
    let mut encoded = false;
    // `start` is where the current segment begins; byte 0 is the leading '/'.
    let mut start = 1;
    for i in 1..=bytes.len() {
        let end = i == bytes.len();
        match if end { b'/' } else { bytes[i] } {
            b'/' => {
                let segment = &bytes[start..i];
                let bad = match segment {
                    // A trailing '/' leaves an empty last segment; classify judges it.
                    b"" => !end,
                    b"." | b".." => true,
                    _ => encoded && !encoded_segment_ok(segment),
                };
                if bad {
                    return Err(ClassifyError::BadPath);
                }
                start = i + 1;
            }
            b'%' => encoded = true,
            b'\\' => return Err(ClassifyError::BadPath),
            _ => {}
        }
    }
    Ok(if encoded {
        percent_encoding::percent_decode(bytes).decode_utf8_lossy()
    } else {
        Cow::Borrowed(raw_path)
    })
}

/// Whether a segment with percent-escapes decodes to one ordinary segment: not `.` or `..`, and
/// with no `/` or `\`. Decoded byte by byte, without allocating.
fn encoded_segment_ok(segment: &[u8]) -> bool {
    let mut len = 0;
    let mut dots = 0;
    for b in percent_encoding::percent_decode(segment) {
        match b {
            b'/' | b'\\' => return false,
            b'.' => dots += 1,
            _ => {}
        }
        len += 1;
    }
    !(len == dots && len <= 2)
}

const PASSTHROUGH: Class = Class {
    route: Route::Passthrough,
    key: Key::None,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    Loom,
    Coopr,
}

impl Generation {
    fn prefix(self) -> &'static str {
        match self {
            Self::Loom => V1,
            Self::Coopr => V2,
        }
    }
}

/// Which `{B}` a decoded path is under, if any.
fn generation(path: &str) -> Option<Generation> {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if under(V1) {
        Some(Generation::Loom)
    } else if under(V2) {
        Some(Generation::Coopr)
    } else {
        None
    }
}

fn is_read_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD || method == Method::OPTIONS
}

/// The routing table rows under `{B}`. `rest` is the decoded path after the prefix, empty or
/// starting with '/', and known to have no empty or dot segments.
fn classify_under_base(
    method: &Method,
    generation: Generation,
    rest: &str,
) -> Result<Class, ClassifyError> {
    let mut segments = segments(rest).skip(1);
    let first = segments.next().unwrap_or("");
    let second = segments.next();
    let third = segments.next();
    let coopr = generation == Generation::Coopr;

    // Row 1: provisioner traffic stays local whatever the method.
    let provisioner = first == "tasks"
        || (coopr && first == "provisioners")
        || (coopr
            && first == "tenants"
            && second.is_some()
            && matches!(third, Some("automatortypes" | "providertypes")));
    if provisioner {
        return Ok(class(Route::Provisioner, Key::None));
    }
    // Row 2: safe methods are reads. A read of one cluster names it, in case it must be served
    // fresh by the owner; an ID outside the grammar is Loom's to answer, locally.
    if is_read_method(method) {
        let one_cluster = match second {
            Some(id) if first == "clusters" && method != Method::OPTIONS => {
                parse_owning_cluster(id).ok()
            }
            _ => None,
        };
        return Ok(class(
            Route::Read,
            one_cluster.map_or(Key::None, Key::ClusterRead),
        ));
    }
    // Row 3: POSTs used as queries.
    if method == Method::POST
        && second.is_none()
        && (first == "getNodeProperties"
            || first == "getClusterStatuses"
            || (coopr && first == "resolve"))
    {
        return Ok(class(Route::Read, Key::None));
    }
    let write_method = method == Method::POST
        || method == Method::PUT
        || method == Method::DELETE
        || method == Method::PATCH;
    if !write_method {
        // TRACE, CONNECT, WebDAV and custom methods: not rows of the table, and not writes Loom
        // knows. Its own Loom answers them (404 or 405), like anything outside {B}.
        return Ok(PASSTHROUGH);
    }
    if first == "clusters" {
        return match second {
            // Row 4: create.
            None if method == Method::POST => Ok(class(Route::Create, Key::Home)),
            None => Ok(class(Route::GlobalWrite, Key::Global)),
            // Row 5: a write for one cluster.
            Some(id) => parse_owning_cluster(id).map(|id| class(Route::Write, Key::Cluster(id))),
        };
    }
    if coopr && first == "nodes" {
        // Rows 6 and 7: node writes are keyed by the node's cluster.
        match (method, second, third) {
            (&Method::POST | &Method::PUT, _, None) => {
                return Ok(class(Route::Write, Key::NodeBody))
            }
            (&Method::DELETE, Some(_), None) => return Ok(class(Route::Write, Key::NodeLookup)),
            _ => {}
        }
    }
    // Row 8: everything else that changes state belongs to the global shard.
    Ok(class(Route::GlobalWrite, Key::Global))
}

/// `path` split at each '/', as `str::split('/')` splits it. A scan for the byte: segments are
/// a few bytes long, and the generic `char` searcher cost ~100 instructions a segment
/// (callgrind).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(path);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == b'/') {
            Some(i) => {
                rest = r.get(i + 1..);
                r.get(..i)
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

const fn class(route: Route, key: Key) -> Class {
    Class { route, key }
}

/// Parse a cluster ID (docs/routing.md): 1 to 19 ASCII digits, value at most `i64::MAX`, leading
/// zeros allowed. The input is already percent-decoded.
pub fn parse_cluster_id(s: &str) -> Result<u64, ClassifyError> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 19 {
        return Err(ClassifyError::BadClusterId);
    }
    let mut value: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return Err(ClassifyError::BadClusterId);
        }
        // 19 digits fit in a u64 (max 9_999_999_999_999_999_999 < 1.8e19).
        value = value * 10 + u64::from(b - b'0');
    }
    if value > MAX_CLUSTER_ID {
        return Err(ClassifyError::BadClusterId);
    }
    Ok(value)
}

/// The cluster that a cluster, job, plan or task ID belongs to: the cluster ID before the first
/// `-` (`00000079-001` and `00000079-001-004` belong to cluster 79). What follows the `-` is
/// Loom's to judge, at the owner.
pub fn parse_owning_cluster(s: &str) -> Result<u64, ClassifyError> {
    // A byte scan: `split_once('-')`'s char searcher cost ~90 instructions a read (callgrind).
    let cluster = match s.bytes().position(|b| b == b'-') {
        Some(i) => &s[..i],
        None => s,
    };
    parse_cluster_id(cluster)
}

/// The cluster ID in a `/v2/nodes` JSON body: `clusterId` as a string or an integer. `None` when
/// the body has no usable `clusterId`, or is not JSON and cannot name one, which routes the write
/// locally (Loom then answers for it). A present but malformed string ID is an error.
///
/// Coopr reads bodies with Gson, which is lenient: it takes single quotes, unquoted names, a
/// repeated key (the last wins), a byte-order mark, `\u` escapes in names. A body that strict
/// JSON refuses but that mentions `clusterId`, or has an escape that could spell it, might be a
/// node write for a cluster the router cannot see; it is refused rather than sent to the local
/// Loom, which could then write another DC's shard.
pub fn cluster_from_node_body(body: &[u8]) -> Result<Option<u64>, ClassifyError> {
    #[derive(serde::Deserialize)]
    struct NodeBody {
        #[serde(rename = "clusterId")]
        cluster_id: Option<serde_json::Value>,
    }
    let Ok(node) = serde_json::from_slice::<NodeBody>(body) else {
        let may_name_cluster = contains(body, b"clusterId") || contains(body, b"\\u");
        return if may_name_cluster {
            Err(ClassifyError::AmbiguousNodeBody)
        } else {
            Ok(None)
        };
    };
    match node.cluster_id {
        Some(serde_json::Value::String(s)) => parse_cluster_id(&s).map(Some),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(id) if id <= MAX_CLUSTER_ID => Ok(Some(id)),
            _ => Err(ClassifyError::BadClusterId),
        },
        Some(serde_json::Value::Null) | None => Ok(None),
        Some(_) => Err(ClassifyError::BadClusterId),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The shard of a cluster ID: `id mod increment`.
pub fn shard_of(id: u64, increment: u64) -> u64 {
    id % increment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: &str, path: &str) -> Result<Class, ClassifyError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        classify(&method, path)
    }

    fn route(method: &str, path: &str) -> Route {
        c(method, path).unwrap().route
    }

    const BASES: [&str; 2] = ["/v1/loom", "/v2"];

    // === Row 1: provisioner ===

    #[test]
    fn tasks_are_provisioner_in_both_generations_for_every_method() {
        for b in BASES {
            for m in ["GET", "POST", "PUT", "DELETE"] {
                assert_eq!(route(m, &format!("{b}/tasks/take")), Route::Provisioner);
                assert_eq!(route(m, &format!("{b}/tasks/finish")), Route::Provisioner);
            }
        }
    }

    #[test]
    fn provisioner_endpoints_and_plugin_downloads_are_provisioner() {
        assert_eq!(route("PUT", "/v2/provisioners/p1"), Route::Provisioner);
        assert_eq!(
            route("POST", "/v2/provisioners/p1/heartbeat"),
            Route::Provisioner
        );
        assert_eq!(route("GET", "/v2/provisioners"), Route::Provisioner);
        assert_eq!(
            route(
                "GET",
                "/v2/tenants/t1/automatortypes/chef/cookbooks/x/versions/1"
            ),
            Route::Provisioner
        );
        assert_eq!(
            route("GET", "/v2/tenants/t1/providertypes/aws/keys/k/versions/2"),
            Route::Provisioner
        );
        // Only Coopr has provisioners; under Loom they are ordinary global entities.
        assert_eq!(route("POST", "/v1/loom/provisioners"), Route::GlobalWrite);
        // A tenant itself is a global entity, not provisioner traffic.
        assert_eq!(route("PUT", "/v2/tenants/t1"), Route::GlobalWrite);
    }

    // === Rows 2 and 3: reads ===

    #[test]
    fn safe_methods_are_reads() {
        for b in BASES {
            for m in ["GET", "HEAD", "OPTIONS"] {
                assert_eq!(route(m, &format!("{b}/clusters/00000079")), Route::Read);
                assert_eq!(route(m, &format!("{b}/clusters")), Route::Read);
                assert_eq!(route(m, &format!("{b}/providers")), Route::Read);
            }
        }
        // A read never needs a valid ID: Loom answers for it.
        assert_eq!(route("GET", "/v2/clusters/abc"), Route::Read);
    }

    #[test]
    fn a_get_or_head_of_one_cluster_names_it_and_nothing_else_does() {
        for b in BASES {
            for m in ["GET", "HEAD"] {
                for suffix in ["", "/status", "/services", "/plan/3"] {
                    let got = c(m, &format!("{b}/clusters/00000079{suffix}")).unwrap();
                    assert_eq!(
                        got,
                        class(Route::Read, Key::ClusterRead(79)),
                        "{m} {suffix}"
                    );
                }
            }
            for (m, path) in [
                ("OPTIONS", "/clusters/00000079"),
                ("GET", "/clusters"),
                ("GET", "/clusters/abc"),
                ("GET", "/clusters/99999999999999999999"),
                ("GET", "/providers/00000079"),
            ] {
                let got = c(m, &format!("{b}{path}")).unwrap();
                assert_eq!(got, class(Route::Read, Key::None), "{m} {path}");
            }
        }
        // Provisioner reads and query POSTs never name one.
        assert_eq!(c("GET", "/v1/loom/tasks/1").unwrap().key, Key::None);
        assert_eq!(c("POST", "/v2/getClusterStatuses").unwrap().key, Key::None);
    }

    #[test]
    fn query_posts_are_reads() {
        for b in BASES {
            assert_eq!(
                route("POST", &format!("{b}/getNodeProperties")),
                Route::Read
            );
            assert_eq!(
                route("POST", &format!("{b}/getClusterStatuses")),
                Route::Read
            );
        }
        assert_eq!(route("POST", "/v2/resolve"), Route::Read);
        // /resolve is Coopr-only.
        assert_eq!(route("POST", "/v1/loom/resolve"), Route::GlobalWrite);
    }

    // === Row 4: create ===

    #[test]
    fn post_clusters_is_create() {
        for b in BASES {
            assert_eq!(
                c("POST", &format!("{b}/clusters")).unwrap(),
                class(Route::Create, Key::Home)
            );
        }
    }

    // === Row 5: cluster writes ===

    #[test]
    fn cluster_writes_are_keyed_by_the_id_in_the_path() {
        for b in BASES {
            for m in ["POST", "PUT", "DELETE", "PATCH"] {
                for suffix in ["", "/abort", "/services/hdfs/restart", "/config"] {
                    let got = c(m, &format!("{b}/clusters/00000079{suffix}")).unwrap();
                    assert_eq!(got, class(Route::Write, Key::Cluster(79)), "{m} {suffix}");
                }
            }
        }
    }

    #[test]
    fn job_and_task_ids_belong_to_the_cluster_before_the_first_dash() {
        assert_eq!(parse_owning_cluster("00000079-001"), Ok(79));
        assert_eq!(parse_owning_cluster("00000079-001-004"), Ok(79));
        assert_eq!(parse_owning_cluster("00000079-x"), Ok(79));
        assert_eq!(
            parse_owning_cluster("-001"),
            Err(ClassifyError::BadClusterId)
        );
        assert_eq!(
            parse_owning_cluster("x-001"),
            Err(ClassifyError::BadClusterId)
        );
        assert_eq!(
            c("POST", "/v2/clusters/00000079-001").unwrap().key,
            Key::Cluster(79)
        );
    }

    #[test]
    fn cluster_id_grammar() {
        assert_eq!(parse_cluster_id("00000079"), Ok(79));
        assert_eq!(parse_cluster_id("0"), Ok(0));
        assert_eq!(
            parse_cluster_id("9223372036854775807"),
            Ok(9_223_372_036_854_775_807)
        );
        for bad in [
            "",
            "-1",
            "+1",
            "1a",
            " 1",
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999",
            "00000000000000000001",
            "١٢",
        ] {
            assert_eq!(
                parse_cluster_id(bad),
                Err(ClassifyError::BadClusterId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_write_with_a_bad_cluster_id_is_bad_cluster_id() {
        for id in ["abc", "-5", "%2B5", "9223372036854775808", "1.5"] {
            assert_eq!(
                c("DELETE", &format!("/v2/clusters/{id}")),
                Err(ClassifyError::BadClusterId),
                "{id}"
            );
        }
    }

    #[test]
    fn percent_encoded_digits_are_decoded_before_parsing() {
        assert_eq!(
            c("DELETE", "/v2/clusters/%30%30000079").unwrap().key,
            Key::Cluster(79)
        );
        assert_eq!(
            c("DELETE", "/v2/%63lusters/00000079").unwrap().key,
            Key::Cluster(79)
        );
    }

    // === Rows 6 and 7: nodes ===

    #[test]
    fn node_writes_are_keyed_by_body_or_lookup() {
        assert_eq!(c("POST", "/v2/nodes").unwrap().key, Key::NodeBody);
        assert_eq!(c("PUT", "/v2/nodes/abc-uuid").unwrap().key, Key::NodeBody);
        assert_eq!(
            c("DELETE", "/v2/nodes/abc-uuid").unwrap().key,
            Key::NodeLookup
        );
        assert_eq!(route("GET", "/v2/nodes/abc-uuid"), Route::Read);
        // Loom has no /nodes endpoint: a global write like any other entity.
        assert_eq!(route("POST", "/v1/loom/nodes"), Route::GlobalWrite);
    }

    #[test]
    fn node_body_cluster_id_is_a_string_or_an_integer() {
        assert_eq!(
            cluster_from_node_body(br#"{"clusterId":"00000012"}"#),
            Ok(Some(12))
        );
        assert_eq!(cluster_from_node_body(br#"{"clusterId":12}"#), Ok(Some(12)));
        assert_eq!(cluster_from_node_body(br#"{"id":"n1"}"#), Ok(None));
        assert_eq!(cluster_from_node_body(b"not json"), Ok(None));
        assert_eq!(cluster_from_node_body(b"[1,2]"), Ok(None));
        assert_eq!(
            cluster_from_node_body(br#"{"clusterId":"x1"}"#),
            Err(ClassifyError::BadClusterId)
        );
        assert_eq!(
            cluster_from_node_body(br#"{"clusterId":-3}"#),
            Err(ClassifyError::BadClusterId)
        );
    }

    #[test]
    fn a_node_body_only_a_lenient_parser_reads_is_refused_if_it_may_name_a_cluster() {
        // Gson would read clusterId 13 from each of these.
        for body in [
            &br#"{"clusterId":"00000013","clusterId":"00000013"}"#[..],
            br#"{clusterId:'00000013'}"#,
            b"\xef\xbb\xbf{\"clusterId\":\"00000013\"}",
            br#"{'\u0063lusterId':'00000013'}"#,
        ] {
            assert_eq!(
                cluster_from_node_body(body),
                Err(ClassifyError::AmbiguousNodeBody),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Invalid UTF-8 in another field: read past, as Gson would, and routed by its cluster.
        assert_eq!(
            cluster_from_node_body(b"{\"clusterId\":\"00000013\",\"name\":\"\xff\"}"),
            Ok(Some(13))
        );
        // Strict JSON decodes the escape itself.
        assert_eq!(
            cluster_from_node_body(br#"{"\u0063lusterId":"00000013"}"#),
            Ok(Some(13))
        );
        // Not JSON, and cannot name a cluster: local, as the contract says.
        assert_eq!(cluster_from_node_body(b"hostname=h1"), Ok(None));
    }

    // === Row 8: global writes ===

    #[test]
    fn other_writes_are_global() {
        for b in BASES {
            for (m, p) in [
                ("POST", "/providers"),
                ("PUT", "/hardwaretypes/medium"),
                ("DELETE", "/imagetypes/centos"),
                ("POST", "/import"),
                ("PUT", "/clustertemplates/hadoop"),
                ("PUT", "/clusters"),
                ("POST", ""),
            ] {
                assert_eq!(
                    c(m, &format!("{b}{p}")).unwrap(),
                    class(Route::GlobalWrite, Key::Global),
                    "{m} {b}{p}"
                );
            }
        }
        for (m, p) in [
            ("POST", "/v2/tenants"),
            ("PUT", "/v2/profile"),
            ("POST", "/v2/plugins/sync"),
        ] {
            assert_eq!(route(m, p), Route::GlobalWrite, "{m} {p}");
        }
    }

    // === Row 9 and 10: readyz and passthrough ===

    #[test]
    fn readyz_is_answered_by_the_router_whatever_the_method_or_encoding() {
        assert_eq!(route("GET", READYZ_PATH), Route::Readyz);
        assert_eq!(route("POST", READYZ_PATH), Route::Readyz);
        assert_eq!(route("GET", "/loom-router/ready%7A"), Route::Readyz);
    }

    #[test]
    fn encoded_ordinary_characters_route_by_the_decoded_path() {
        assert_eq!(
            c("DELETE", "/%762/clusters/00000012").unwrap(),
            class(Route::Write, Key::Cluster(12))
        );
        assert_eq!(
            c("DELETE", "/v1/l%6fom/clusters/00000012").unwrap(),
            class(Route::Write, Key::Cluster(12))
        );
    }

    #[test]
    fn methods_outside_the_table_go_to_the_local_loom() {
        for m in ["TRACE", "PROPFIND", "BREW"] {
            assert_eq!(route(m, "/v2/clusters/00000012"), Route::Passthrough, "{m}");
        }
    }

    #[test]
    fn paths_outside_the_bases_are_passthrough() {
        for (m, p) in [
            ("GET", "/status"),
            ("POST", "/v1/clusters/1"),
            ("DELETE", "/v3/clusters/1"),
            ("POST", "/v2x/clusters/1"),
            ("POST", "/v1/loomx/clusters/1"),
            ("GET", "/"),
        ] {
            assert_eq!(route(m, p), Route::Passthrough, "{m} {p}");
        }
    }

    // === bad_path: the normal form, for every path ===

    #[test]
    fn dot_segments_encoded_slashes_and_empty_segments_are_bad_paths() {
        for p in [
            "/v2/clusters/00000011/../00000012",
            "/v2/clusters/./00000012",
            "/v2/clusters/%2e%2e/00000012",
            "/v2/clusters/%2E/00000012",
            "/v2/clusters/.%2e/00000012",
            "/v2/clusters%2F00000012",
            "/v2%2Fclusters%2F00000012",
            "/v2/clusters%5C00000012",
            "/v2/clusters\\00000012",
            "/v2/clusters//00000012",
            "/v2/clusters/00000012/",
            "/v1/loom/clusters/00000012/%2fabort",
            "/v2/clusters/..",
            "/v2/.",
            "/v2/",
            "/v2/clusters/00000012/.",
        ] {
            assert_eq!(c("POST", p), Err(ClassifyError::BadPath), "{p}");
            assert_eq!(c("GET", p), Err(ClassifyError::BadPath), "{p}");
        }
    }

    #[test]
    fn paths_that_normalise_into_the_api_are_bad_paths_too() {
        // Loom merges the slashes and removes the dot-segments of these, and routes them as
        // writes under {B}; the router refuses them instead of calling them passthrough.
        for p in [
            "//v1/loom/clusters/00000013",
            "/v1//loom/clusters/00000013",
            "/x/../v1/loom/clusters/00000013",
            "/./v2/clusters/00000013",
            "/%2e/v2/clusters/00000013",
            "/x/%2E%2E/v2/clusters/00000013",
            "/v2x/..%2fv2/clusters/00000013",
            "/foo/../status",
            "//status",
            "/status//",
        ] {
            assert_eq!(c("DELETE", p), Err(ClassifyError::BadPath), "{p}");
        }
    }

    #[test]
    fn a_path_must_start_with_a_slash() {
        assert_eq!(c("OPTIONS", "*"), Err(ClassifyError::BadPath));
        assert_eq!(c("GET", ""), Err(ClassifyError::BadPath));
    }

    #[test]
    fn passthrough_paths_in_normal_form_keep_working() {
        for p in [
            "/status",
            "/",
            "/status/",
            "/a/b.c/..d/.e",
            "/x%20y/z",
            "/%2e%2e%2e",
        ] {
            assert_eq!(route("GET", p), Route::Passthrough, "{p}");
        }
    }

    #[test]
    fn the_routing_path_is_decoded_once() {
        assert_eq!(normal_path("/v2/a%2520b").as_deref(), Ok("/v2/a%20b"));
        assert_eq!(normal_path("/v2/%63lusters").as_deref(), Ok("/v2/clusters"));
        assert!(matches!(normal_path("/v2/clusters"), Ok(Cow::Borrowed(_))));
    }

    // === The property: the router decides on the path Loom routes on ===

    /// RFC 3986 section 5.2.4 dot removal on a path whose repeated slashes are merged.
    fn rfc3986_normalise(path: &str) -> String {
        let mut merged = String::with_capacity(path.len());
        for ch in path.chars() {
            if !(ch == '/' && merged.ends_with('/')) {
                merged.push(ch);
            }
        }
        let mut input = merged.as_str();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../") {
                input = rest;
            } else if let Some(rest) = input.strip_prefix("./") {
                input = rest;
            } else if input.starts_with("/./") {
                input = &input[2..];
            } else if input == "/." {
                input = "/";
            } else if input.starts_with("/../") || input == "/.." {
                input = if input == "/.." { "/" } else { &input[3..] };
                match output.rfind('/') {
                    Some(i) => output.truncate(i),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input = "";
            } else {
                let from = usize::from(input.starts_with('/'));
                let end = input[from..].find('/').map_or(input.len(), |i| i + from);
                output.push_str(&input[..end]);
                input = &input[end..];
            }
        }
        output
    }

    /// `java.net.URI` reads a request target that starts with `//` as an authority and a path.
    fn java_authority_stripped(raw: &str) -> &str {
        match raw.strip_prefix("//") {
            Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
            None => raw,
        }
    }

    fn decode(path: &str) -> String {
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// Tokens an attacker builds paths from: API words, dots, slashes and their encodings.
    const TOKENS: &[&str] = &[
        "v1",
        "loom",
        "v2",
        "clusters",
        "00000013",
        "00000013-001",
        "nodes",
        "n1",
        "tasks",
        "status",
        "x",
        "",
        ".",
        "..",
        "...",
        "%2e",
        "%2E",
        "%2e%2E",
        ".%2e",
        "%2e.",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "\\",
        "%63lusters",
        "%76%32",
        "%25",
        "%252e",
        "v%32",
        "l%6fom",
    ];

    fn method() -> impl proptest::strategy::Strategy<Value = Method> {
        proptest::sample::select(vec![
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ])
    }

    fn raw_path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = (
            prop_oneof![4 => Just("/"), 1 => Just("//")],
            proptest::sample::select(TOKENS),
        );
        (proptest::collection::vec(piece, 0..7), any::<bool>()).prop_map(|(pieces, slash)| {
            let mut path: String = pieces.iter().map(|(sep, t)| format!("{sep}{t}")).collect();
            if slash || path.is_empty() {
                path.push('/');
            }
            path
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// The byte scan splits every path as `str::split('/')` does, multi-byte text included.
        #[test]
        fn segments_split_as_str_split_does(path in "[/a-z\u{e9}\u{1F600}%0-9]{0,24}") {
            let ours: Vec<&str> = segments(&path).collect();
            let std: Vec<&str> = path.split('/').collect();
            proptest::prop_assert_eq!(ours, std);
        }

        /// Whenever a path normalises (dot removal and merged slashes, before or after decoding,
        /// as a server could do either) into `{B}`, the router refuses it or routes it by exactly
        /// that normalised path.
        #[test]
        fn paths_that_normalise_under_the_api_are_refused_or_routed_by_that_path(
            method in method(),
            raw in raw_path(),
        ) {
            for normalised in [
                rfc3986_normalise(&decode(&raw)),
                decode(&rfc3986_normalise(&raw)),
                decode(&rfc3986_normalise(java_authority_stripped(&raw))),
            ] {
                if generation(&normalised).is_none() {
                    continue;
                }
                match classify(&method, &raw) {
                    Err(ClassifyError::BadPath) => {}
                    got => {
                        let routed_on = normal_path(&raw).map(Cow::into_owned);
                        proptest::prop_assert_eq!(routed_on, Ok(normalised.clone()));
                        let generation = generation(&normalised).expect("under {B}");
                        let rest = &normalised[generation.prefix().len()..];
                        let via_normalised = if normalised.ends_with('/') {
                            Err(ClassifyError::BadPath)
                        } else {
                            classify_under_base(&method, generation, rest)
                        };
                        proptest::prop_assert_eq!(got, via_normalised);
                    }
                }
            }
        }

        /// A path the router accepts is one no normaliser changes.
        #[test]
        fn accepted_paths_are_already_normal(raw in raw_path()) {
            if let Ok(path) = normal_path(&raw) {
                proptest::prop_assert_eq!(&rfc3986_normalise(&path), &path);
                proptest::prop_assert_eq!(rfc3986_normalise(&decode(&raw)), decode(&raw));
                proptest::prop_assert_eq!(decode(&rfc3986_normalise(&raw)), decode(&raw));
            }
        }
    }
}
