//! The TLS listener, and federation over TLS with a private CA made at test time: a server named
//! `localhost:PORT` is found by its name alone and its keys are fetched over TLS by a peer that
//! trusts the CA through `federation_ca_file`.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{free_port, TestPki, TestServer};

#[tokio::test]
async fn federation_over_tls_with_a_private_ca() {
    let pki = TestPki::new();
    let tls_port = free_port();
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = format!("localhost:{tls_port}").try_into().expect("name");
        c.tls = Some(hafen::config::TlsConfig {
            certs: pki.path("cert.pem"),
            key: pki.path("key.pem"),
            port: tls_port,
        });
    })
    .await;
    let tls_addr = a
        .running
        .as_ref()
        .and_then(|r| r.tls_addr)
        .expect("TLS listener");
    assert_eq!(tls_addr.port(), tls_port);

    // A client trusting the CA reaches the TLS listener; one that does not, fails.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).expect("ca"))
        .expect("ca pem");
    let trusting = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client");
    let url = format!("https://localhost:{tls_port}/_matrix/federation/v1/version");
    let res = trusting.get(&url).send().await.expect("TLS request");
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["server"]["name"], json!("hafen"));
    assert!(reqwest::Client::new().get(&url).send().await.is_err());

    // B trusts the CA through federation_ca_file and finds A by its name (host:port).
    let b = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "b.test".try_into().expect("name");
        c.federation_ca_file = Some(pki.path("ca.pem"));
        // A is on loopback, which discovered servers may only be at when allowed.
        c.federation_ip_range_allowlist = vec!["127.0.0.0/8".into(), "::1/128".into()];
    })
    .await;
    let a_name = format!("localhost:{tls_port}");
    let (status, keys) = b
        .req(
            Method::GET,
            &format!("/_matrix/key/v2/query/{a_name}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(
        keys["server_keys"][0]["server_name"],
        json!(a_name),
        "{keys}"
    );
    // A server without the CA cannot verify A and leaves it out.
    let c = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "c.test".try_into().expect("name");
        c.federation_ip_range_allowlist = vec!["127.0.0.0/8".into(), "::1/128".into()];
    })
    .await;
    let (status, keys) = c
        .req(
            Method::GET,
            &format!("/_matrix/key/v2/query/{a_name}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys["server_keys"], json!([]), "{keys}");
    // A server that trusts the CA but not loopback addresses never contacts A: a name cannot
    // lead it into its own network.
    let d = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "d.test".try_into().expect("name");
        c.federation_ca_file = Some(pki.path("ca.pem"));
    })
    .await;
    for name in [a_name.clone(), format!("127.0.0.1:{tls_port}")] {
        let (status, keys) = d
            .req(
                Method::GET,
                &format!("/_matrix/key/v2/query/{name}"),
                None,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(keys["server_keys"], json!([]), "{name}: {keys}");
    }
    a.stop().await;
}
