//! TLS termination and mutual TLS between routers (issue 4): HTTPS with HTTP/1.1 and HTTP/2,
//! forwarded writes over mTLS, and hop headers refused without a verified peer certificate.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs::TestCa;
use crate::support::*;

fn tls_options() -> Options {
    Options {
        tls: true,
        ..Options::default()
    }
}

/// A rustls client trusting `ca`, presenting `identity` (cert, key) if given.
fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn https_client(config: rustls::ClientConfig, http2: bool) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector = if http2 {
        connector.enable_http2().wrap_connector(http)
    } else {
        connector.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

async fn https(
    client: &HttpsClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Version, http::HeaderMap, String), hyper_util::client::legacy::Error> {
    let mut request = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = client.request(request.body(Full::new(Bytes::new())).unwrap());
    let response = within(format!("{method} {url}"), request).await?;
    let (parts, body) = response.into_parts();
    let body = within(format!("{method} {url}: body"), body.collect())
        .await
        .unwrap()
        .to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.version,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http1_and_http2_by_alpn() {
    let c = Cluster::start_with(tls_options()).await;
    let (_, ca) = c.certs.as_ref().unwrap();
    let url = format!("https://127.0.0.1:{}/status", c.dc(EAST).https.port());
    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let client = https_client(client_config(&ca.ca_pem, None), http2);
        let (status, got, headers, body) = https(&client, "GET", &url, &[]).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(got, version);
        assert_eq!(body, "OK\n");
        assert_eq!(headers["x-loom-route"], "passthrough");
        assert_eq!(headers["x-loom-served-by"], "us-east");
    }
    // Loom sees the request as having come over https, for the host the client named (HTTP/2
    // names it in :authority, not in a Host field). Health probes of /status come from the
    // router itself, without X-Forwarded-*.
    let seen: Vec<_> = c
        .dc(EAST)
        .loom
        .received()
        .into_iter()
        .filter(|r| r.headers.contains_key("x-forwarded-proto"))
        .collect();
    assert_eq!(seen.len(), 2);
    let host = format!("127.0.0.1:{}", c.dc(EAST).https.port());
    for r in &seen {
        assert_eq!(r.headers["x-forwarded-proto"], "https");
        assert_eq!(r.headers["x-forwarded-host"], host.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_forward_writes_to_each_other_over_mutual_tls() {
    let c = Cluster::start_with(tls_options()).await;
    let id = create_cluster(c.dc(WEST), "m").await;
    c.clear();
    // eu-central forwards to us-west's https:// router URL, presenting its own certificate.
    let path = format!("/v2/clusters/{id}/abort");
    let r = send("POST", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    assert_eq!(c.who_saw("POST", &path), vec!["us-west"]);
    assert_eq!(
        c.dc(WEST).received()[0].headers["x-loom-router-origin"],
        "eu-central"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_headers_need_a_verified_peer_certificate() {
    let c = Cluster::start_with(tls_options()).await;
    let (dir, ca) = c.certs.as_ref().unwrap();
    let path = "/v2/clusters/00000002/abort";
    let hop = [
        ("x-loom-router-hop", "1"),
        ("x-loom-router-origin", "us-east"),
        ("x-loom-router-epoch", "1"),
        ("coopr-userid", "admin"),
        ("coopr-tenantid", "t"),
    ];
    // Over plain HTTP: refused.
    let r = send("POST", &c.dc(WEST).url(path), &hop, b"").await;
    r.assert_router_error(403, "peer_unauthenticated", "write-local");
    // Over https without a client certificate: refused.
    let https_url = format!("https://127.0.0.1:{}{path}", c.dc(WEST).https.port());
    let anonymous = https_client(client_config(&ca.ca_pem, None), false);
    let (status, _, headers, _) = https(&anonymous, "POST", &https_url, &hop).await.unwrap();
    assert_eq!(status, 403);
    assert_eq!(headers["x-loom-router-error"], "peer_unauthenticated");
    // With a certificate from another CA: the handshake itself fails.
    let rogue_ca = TestCa::new(dir.path(), "rogue-ca");
    let (cert, key) = rogue_ca.issue("rogue");
    let rogue = https_client(client_config(&ca.ca_pem, Some((&cert, &key))), false);
    assert!(https(&rogue, "POST", &https_url, &hop).await.is_err());
    // With a certificate from the peers' CA: accepted as a peer.
    let (cert, key) = ca.issue("peer");
    let peer = https_client(client_config(&ca.ca_pem, Some((&cert, &key))), false);
    let (status, _, headers, body) = https(&peer, "POST", &https_url, &hop).await.unwrap();
    assert_ne!(status, 403, "{body}");
    assert_eq!(headers["x-loom-route"], "write-local");
    assert_eq!(c.who_saw("POST", path), vec!["us-west"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_auth_fails_the_handshake_without_a_certificate_from_the_ca() {
    let c = Cluster::start_with(Options {
        client_auth: "required",
        ..tls_options()
    })
    .await;
    let (dir, ca) = c.certs.as_ref().unwrap();
    let url = format!("https://127.0.0.1:{}/status", c.dc(EAST).https.port());
    // No certificate: no handshake, so no request.
    let anonymous = https_client(client_config(&ca.ca_pem, None), false);
    assert!(https(&anonymous, "GET", &url, &[]).await.is_err());
    // A certificate from another CA: no handshake either.
    let rogue_ca = TestCa::new(dir.path(), "rogue-ca");
    let (cert, key) = rogue_ca.issue("rogue");
    let rogue = https_client(client_config(&ca.ca_pem, Some((&cert, &key))), false);
    assert!(https(&rogue, "GET", &url, &[]).await.is_err());
    assert!(c.dc(EAST).seen().is_empty());
    // A certificate from client_ca: served.
    let (cert, key) = ca.issue("lb");
    let client = https_client(client_config(&ca.ca_pem, Some((&cert, &key))), false);
    let (status, _, headers, body) = https(&client, "GET", &url, &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    assert_eq!(headers["x-loom-served-by"], "us-east");
    // Routers still reach each other: they present their certificates.
    let id = create_cluster(c.dc(WEST), "m").await;
    c.clear();
    let path = format!("/v2/clusters/{id}/abort");
    let r = send("POST", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.who_saw("POST", &path), vec!["us-west"]);
}
