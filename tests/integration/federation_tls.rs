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
            reload_interval_secs: 60,
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

/// A new client that trusts only `pki`'s CA (new: no pooled connection, no TLS session to
/// resume, so each check is a full handshake with the certificate the server presents now).
fn trusting(pki: &TestPki) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).expect("ca"))
        .expect("ca pem");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

async fn reaches(pki: &TestPki, url: &str) -> bool {
    match trusting(pki).get(url).send().await {
        Ok(res) => {
            assert_eq!(res.status(), StatusCode::OK);
            let body: serde_json::Value = res.json().await.expect("json");
            assert_eq!(body["server"]["name"], json!("hafen"));
            true
        }
        Err(_) => false,
    }
}

/// Put `pki`'s certificate and key where the server reads them (each file replaced whole, as
/// certbot and similar tools do).
fn install(from: &TestPki, dir: &std::path::Path) {
    for name in ["key.pem", "cert.pem"] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::copy(from.path(name), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

#[tokio::test]
async fn a_renewed_certificate_is_used_without_a_restart() {
    let (old, new) = (TestPki::new(), TestPki::new());
    let dir = tempfile::tempdir().expect("dir");
    install(&old, dir.path());
    let tls_port = free_port();
    let start = |interval: u64, port: u16| {
        let d = dir.path().to_path_buf();
        TestServer::start_with(move |c| {
            c.tls = Some(hafen::config::TlsConfig {
                certs: d.join("cert.pem"),
                key: d.join("key.pem"),
                port,
                reload_interval_secs: interval,
            });
        })
    };
    let a = start(1, tls_port).await;
    let url = format!("https://localhost:{tls_port}/_matrix/federation/v1/version");
    assert!(reaches(&old, &url).await);
    assert!(!reaches(&new, &url).await);

    // Renewed on disk: within a few checks the listener presents the new certificate.
    install(&new, dir.path());
    let mut switched = false;
    for _ in 0..50 {
        if reaches(&new, &url).await {
            switched = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(switched, "the new certificate was never presented");
    assert!(!reaches(&old, &url).await);

    // A broken file is not taken: the last good certificate stays in use.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(reaches(&new, &url).await);
    a.stop().await;

    // Without periodic checks (0), SIGHUP reloads.
    install(&old, dir.path());
    let tls_port = free_port();
    let b = start(0, tls_port).await;
    let url = format!("https://localhost:{tls_port}/_matrix/federation/v1/version");
    assert!(reaches(&old, &url).await);
    install(&new, dir.path());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(reaches(&old, &url).await, "reloaded without being asked");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut switched = false;
    for _ in 0..50 {
        if reaches(&new, &url).await {
            switched = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(switched, "SIGHUP did not reload the certificate");
    b.stop().await;
}
