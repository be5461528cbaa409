//! Header names the router owns, and the pure header rewrites of a proxy (RFC 9110 section 7.6).
//!
//! Everything here works on a `HeaderMap` and returns; no I/O. `proxy/` calls
//! [`prepare_upstream`] on every request it sends and [`prepare_downstream`] on every response it
//! returns. Loom's own headers (`X-Loom-UserID`, `X-Loom-ApiKey`, `Coopr-*`, `Authorization`, and
//! any `X-Loom-*` the router does not own) are never touched.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, VIA};
use http::uri::Authority;
use http::Version;

/// The route a request took (docs/routing.md).
pub const ROUTE: HeaderName = HeaderName::from_static("x-loom-route");
/// The DC whose Loom produced the response.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-loom-served-by");
/// Set by a router on a read it served locally because the owner could not be reached.
pub const STALE: HeaderName = HeaderName::from_static("x-loom-stale");
/// `owner` asks for a read of one cluster from its owner (docs/routing.md).
pub const CONSISTENCY: HeaderName = HeaderName::from_static("x-loom-consistency");
/// The code of an error the router produced.
pub const ROUTER_ERROR: HeaderName = HeaderName::from_static("x-loom-router-error");
/// Set to `1` on a write forwarded by a router: the receiver never forwards it again.
pub const HOP: HeaderName = HeaderName::from_static("x-loom-router-hop");
/// The DC that forwarded a write.
pub const ORIGIN: HeaderName = HeaderName::from_static("x-loom-router-origin");
/// The shard epoch a write was routed (origin) or admitted (owner) under.
pub const EPOCH: HeaderName = HeaderName::from_static("x-loom-router-epoch");
/// The shard a forwarded write is for. Needed for creates, whose shard is the origin's home
/// shard and cannot be derived from the path; sent on every forwarded write for auditing.
pub const SHARD: HeaderName = HeaderName::from_static("x-loom-router-shard");
/// Generated when absent (tower-http), passed upstream, echoed on the response, logged.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The content type of router errors, as Loom's own text errors have.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The `X-Loom-Router-` prefix of headers routers send each other.
const ROUTER_PREFIX: &str = "x-loom-router-";

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1). A `static`:
/// a `const` array would be built and dropped again at every use.
const HOP_BY_HOP_COUNT: usize = 8;
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
];

/// `name`'s place in [`HOP_BY_HOP`]. A `match` on the name compares lengths first, so most
/// names are passed over at once; comparing `HeaderName`s one by one was ~150 instructions a
/// header (callgrind).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "proxy-authorization" => 7,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], name);
    Some(i)
}

/// The `Via` token that names a router's DC: `loom-router-<dc>`.
pub fn via_token(dc: &str) -> String {
    format!("loom-router-{dc}")
}

/// The request's `X-Request-Id`, after giving it a new one (a v4 UUID) if it had none, so that
/// one ID follows a request upstream, across routers and into Loom's logs.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID) {
        return id.clone();
    }
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// Give a response the request's `X-Request-Id`, unless the upstream already named one.
pub fn propagate_request_id(headers: &mut HeaderMap, id: HeaderValue) {
    if !headers.contains_key(REQUEST_ID) {
        headers.insert(REQUEST_ID, id);
    }
}

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One scan of the few names present finds which hop-by-hop headers to remove; most
    // messages have none, or only `Connection`. (Standard names compare by tag, the two
    // custom ones by bytes.) Removing all eight names unconditionally hashed each of them on
    // every request and response.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    if present == [false; HOP_BY_HOP_COUNT] {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`: the scan already says whether it is there. Every
    // `Connection` field line counts, not only the first (RFC 9110 section 7.6.1): a second line
    // naming `X-Secret` must not let it through.
    if present[0] {
        // Collect first: we cannot remove while borrowing the values. `keep-alive` and `close`,
        // the usual tokens, are skipped without parsing: the first is in HOP_BY_HOP, the second
        // names no header.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            // Bytes, not `to_str`: one non-ASCII byte must not hide the names beside it.
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|n| !n.eq_ignore_ascii_case(b"keep-alive") && !n.eq_ignore_ascii_case(b"close"))
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// Whether a request names its host as RFC 9112 section 3.2 requires: exactly one `Host` field,
/// holding `host[:port]`. An HTTP/2 request may name it in `:authority` instead, which hyper
/// puts in the URI. The router never routes on the host; it refuses what a server must refuse,
/// so that no later hop reads a different host from the same request.
pub fn host_ok(headers: &HeaderMap, version: Version, authority: Option<&Authority>) -> bool {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => valid_host(host.as_bytes()),
        (None, None) => {
            version == Version::HTTP_2
                && authority.is_some_and(|a| valid_host(a.as_str().as_bytes()))
        }
        _ => false,
    }
}

/// Give a request that names its host only in the URI (HTTP/2's `:authority`) a `Host` field.
pub fn host_from_authority(headers: &mut HeaderMap, authority: Option<&Authority>) {
    if headers.contains_key(HOST) {
        return;
    }
    if let Some(value) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        headers.insert(HOST, value);
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 section 3.2.2): a bracketed IP literal, or a name of
/// unreserved characters, sub-delims and percent-escapes; then at most five port digits. No
/// userinfo, path, query, space or backslash.
pub fn valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        match &value[close + 1..] {
            [] => (ok, None),
            [b':', port @ ..] => (ok, Some(port)),
            _ => return false,
        }
    } else {
        // One pass: name bytes, looked up in a table, up to the first byte that is not one.
        match value.iter().position(|&b| !REG_NAME[usize::from(b)]) {
            None => (!value.is_empty(), None),
            Some(i) if value[i] == b':' => (i > 0, Some(&value[i + 1..])),
            Some(_) => return false,
        }
    };
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok
}

/// The bytes of a reg-name: unreserved, sub-delims, and the `%` of a percent-escape.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(
            b as u8,
            b'a'..=b'z'
                | b'A'..=b'Z'
                | b'0'..=b'9'
                | b'-'
                | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        );
        b += 1;
    }
    table
};

/// Whether any `Via` entry names `token` as its receiver (`<protocol> <token> [comment]`).
pub fn via_names(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(VIA).iter().any(|value| {
        value.to_str().unwrap_or("").split(',').any(|entry| {
            entry
                .split_whitespace()
                .nth(1)
                .is_some_and(|received_by| received_by.eq_ignore_ascii_case(token))
        })
    })
}

/// Whether a request claims to come from a peer router.
pub fn has_hop(headers: &HeaderMap) -> bool {
    headers.contains_key(HOP)
}

/// Who sent a request to the router, for `X-Forwarded-*`.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The client's address, formatted once per connection by [`ip_value`].
    pub ip: &'a HeaderValue,
    pub https: bool,
}

/// A client address as the header value `X-Forwarded-For` appends. Built when a connection is
/// accepted, so requests clone it instead of formatting the address again.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Rewrite a request's headers for an upstream (local Loom or peer router):
/// - drop hop-by-hop headers and `Host` (the client sets it from the upstream URI);
/// - drop the response-only headers the router owns, and `X-Loom-Router-*` unless the request is
///   a trusted hop (`keep_router_headers`);
/// - append `Via` and `X-Forwarded-For`; set `X-Forwarded-Proto` and `X-Forwarded-Host` unless
///   a proxy in front already did.
pub fn prepare_upstream(
    headers: &mut HeaderMap,
    client: Client<'_>,
    via: &HeaderValue,
    keep_router_headers: bool,
) {
    // Room for what is added below (and the epoch and `Host` after), in one growth of the map
    // rather than several.
    headers.reserve(6);
    strip_hop_by_hop(headers);
    // One pass over the few names present says which of the lookups below are needed; each
    // skipped one is a hashed probe of the map, on every proxied request.
    let (mut host, mut owned, mut router) = (false, false, false);
    let (mut forwarded_host, mut forwarded_for, mut forwarded_proto) = (false, false, false);
    for name in headers.keys() {
        if name == HOST {
            host = true;
        } else if name == ROUTE || name == SERVED_BY || name == STALE {
            owned = true;
        } else if name == FORWARDED_HOST {
            forwarded_host = true;
        } else if name == FORWARDED_FOR {
            forwarded_for = true;
        } else if name == FORWARDED_PROTO {
            forwarded_proto = true;
        } else if name.as_str().starts_with(ROUTER_PREFIX) {
            router = true;
        }
    }
    if host {
        if let Some(host) = headers.remove(HOST) {
            if !forwarded_host {
                headers.insert(FORWARDED_HOST, host);
            }
        }
    }
    if owned {
        headers.remove(ROUTE);
        headers.remove(SERVED_BY);
        headers.remove(STALE);
    }
    if router && !keep_router_headers {
        strip_router_headers(headers);
    }
    headers.append(VIA, via.clone());
    if forwarded_for {
        append_forwarded_for(headers, client.ip);
    } else {
        // Most requests arrive without one: the client's address is the whole value.
        headers.insert(FORWARDED_FOR, client.ip.clone());
    }
    // The load balancer in front of the router may terminate TLS and say so; keep its word,
    // and the origin router's on a hop.
    if !forwarded_proto {
        headers.insert(
            FORWARDED_PROTO,
            HeaderValue::from_static(if client.https { "https" } else { "http" }),
        );
    }
}

/// Remove every `X-Loom-Router-*` header. Called only when [`prepare_upstream`]'s scan found
/// one.
fn strip_router_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(ROUTER_PREFIX))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Join the `X-Forwarded-For` values a request arrived with, and the client's address.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let mut value = String::new();
    for prior in headers.get_all(FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            value.push_str(prior);
            value.push_str(", ");
        }
    }
    value.push_str(ip.to_str().unwrap_or("unknown"));
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(FORWARDED_FOR, value);
    }
}

/// Rewrite an upstream response's headers for the client: drop hop-by-hop headers and append
/// `Via`.
pub fn prepare_downstream(headers: &mut HeaderMap, via: &HeaderValue) {
    // `Via`, then the edge's route headers and request id: one growth of the map.
    headers.reserve(4);
    strip_hop_by_hop(headers);
    headers.append(VIA, via.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_an_id_gets_a_v4_uuid_and_one_with_an_id_keeps_it() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        let text = id.to_str().unwrap();
        assert_eq!(text.len(), 36, "{text}");
        assert_eq!(text.as_bytes()[14], b'4', "version 4: {text}");
        assert!(text
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(h.get(REQUEST_ID), Some(&id));
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);

        let mut given = map(&[("x-request-id", "abc-123")]);
        assert_eq!(ensure_request_id(&mut given), "abc-123");
        assert_eq!(given.get_all(REQUEST_ID).iter().count(), 1);
    }

    #[test]
    fn the_response_carries_the_request_id_unless_the_upstream_named_one() {
        let mut response = HeaderMap::new();
        propagate_request_id(&mut response, HeaderValue::from_static("abc-123"));
        assert_eq!(response.get(REQUEST_ID).unwrap(), "abc-123");
        let mut named = map(&[("x-request-id", "loom-7")]);
        propagate_request_id(&mut named, HeaderValue::from_static("abc-123"));
        assert_eq!(named.get(REQUEST_ID).unwrap(), "loom-7");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    static CLIENT_IP: HeaderValue = HeaderValue::from_static("10.0.0.7");
    const CLIENT: Client<'static> = Client {
        ip: &CLIENT_IP,
        https: false,
    };

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-loom-userid", "admin"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-loom-userid"], "admin");
    }

    #[test]
    fn upstream_requests_keep_loom_headers_and_gain_via_and_forwarded() {
        let mut h = map(&[
            ("host", "router.example"),
            ("x-loom-userid", "admin"),
            ("x-loom-apikey", "k"),
            ("coopr-tenantid", "t1"),
            ("authorization", "Bearer abc"),
            ("x-loom-custom", "v"),
            ("x-loom-route", "forged"),
            ("x-loom-served-by", "forged"),
            ("x-loom-stale", "1"),
            ("x-loom-router-hop", "1"),
            ("x-loom-router-epoch", "99"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        let via = HeaderValue::from_static("1.1 loom-router-us-east");
        prepare_upstream(&mut h, CLIENT, &via, false);
        assert_eq!(h["x-loom-userid"], "admin");
        assert_eq!(h["x-loom-apikey"], "k");
        assert_eq!(h["coopr-tenantid"], "t1");
        assert_eq!(h["authorization"], "Bearer abc");
        assert_eq!(h["x-loom-custom"], "v");
        assert!(!h.contains_key("x-loom-route"));
        assert!(!h.contains_key("x-loom-served-by"));
        assert!(!h.contains_key("x-loom-stale"));
        assert!(!h.contains_key("x-loom-router-hop"));
        assert!(!h.contains_key("x-loom-router-epoch"));
        assert!(!h.contains_key("host"));
        assert_eq!(h["x-forwarded-host"], "router.example");
        assert_eq!(h["via"], "1.1 loom-router-us-east");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.2, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_proxy_in_fronts_forwarded_host_and_proto_are_kept() {
        let mut h = map(&[
            ("host", "router.internal"),
            ("x-forwarded-host", "loom.example.com"),
            ("x-forwarded-proto", "https"),
            ("x-loom-served-by", "forged"),
        ]);
        let via = HeaderValue::from_static("1.1 loom-router-us-east");
        prepare_upstream(&mut h, CLIENT, &via, false);
        assert_eq!(h["x-forwarded-host"], "loom.example.com");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("host"));
        assert!(!h.contains_key("x-loom-served-by"));
    }

    #[test]
    fn a_first_hop_forwards_for_the_client_alone() {
        let mut h = map(&[("x-loom-userid", "admin")]);
        let via = HeaderValue::from_static("1.1 loom-router-us-east");
        prepare_upstream(&mut h, CLIENT, &via, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(ip_value("::1".parse().unwrap()), "::1");
    }

    #[test]
    fn trusted_hops_keep_router_headers() {
        let mut h = map(&[
            ("x-loom-router-hop", "1"),
            ("x-loom-router-origin", "us-west"),
        ]);
        let via = HeaderValue::from_static("1.1 loom-router-us-east");
        prepare_upstream(&mut h, CLIENT, &via, true);
        assert_eq!(h["x-loom-router-hop"], "1");
        assert_eq!(h["x-loom-router-origin"], "us-west");
    }

    #[test]
    fn every_connection_line_names_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("connection", "X-Secret, close"),
            ("x-secret", "1"),
            ("x-loom-router-epoch", "7"),
            ("connection", "x-loom-router-epoch"),
            ("x-loom-userid", "admin"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-loom-userid"], "admin");
    }

    #[test]
    fn a_non_ascii_connection_line_still_names_its_headers() {
        let mut h = map(&[("x-secret", "1"), ("x-other", "2")]);
        h.append(
            CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \xe9t\xe9, x-other").unwrap(),
        );
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn hosts_are_host_and_optional_port() {
        for ok in [
            "loom.example.com",
            "loom.example.com:8080",
            "10.0.0.1:80",
            "[::1]:8080",
            "[2001:db8::1]",
            "a-b_c~d%41",
            "host:",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "user@host",
            "host/path",
            "host?q",
            "host#f",
            "host\\x",
            "host:80:90",
            "host:8o",
            "host:123456",
            "[::1",
            "[]",
            "[::1]x",
            "[zz::1]",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn exactly_one_host_is_required_except_for_http2_authority() {
        let one = map(&[("host", "a:1")]);
        let two = map(&[("host", "a:1"), ("host", "b:2")]);
        let none = HeaderMap::new();
        let authority = Authority::from_static("a:1");
        assert!(host_ok(&one, Version::HTTP_11, None));
        assert!(!host_ok(&two, Version::HTTP_11, None));
        assert!(!host_ok(&none, Version::HTTP_11, Some(&authority)));
        assert!(!host_ok(&none, Version::HTTP_10, None));
        assert!(host_ok(&none, Version::HTTP_2, Some(&authority)));
        assert!(!host_ok(&none, Version::HTTP_2, None));
        assert!(!host_ok(&two, Version::HTTP_2, Some(&authority)));
    }

    #[test]
    fn via_matches_whole_receiver_tokens_only() {
        let h = map(&[("via", "1.0 fred, 1.1 loom-router-us-east (x)")]);
        assert!(via_names(&h, "loom-router-us-east"));
        assert!(!via_names(&h, "loom-router-us"));
        assert!(!via_names(&h, "loom-router-us-east-2"));
        let h = map(&[("via", "1.1 a"), ("via", "2 loom-router-eu")]);
        assert!(via_names(&h, "loom-router-eu"));
    }
}
