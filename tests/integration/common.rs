//! Test harness: start a server, make users, send requests, assert status and body.

#![allow(dead_code)]

use std::sync::Arc;

use hafen::{config::Config, server::Running, service::Services};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub struct TestServer {
    pub running: Option<Running>,
    /// The config of a server stopped by [`TestServer::halt`], for [`TestServer::resume`].
    halted: Option<Config>,
    pub base: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A logged-in user of a test server.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

// Key by key, as a config file would set them.
#[allow(clippy::field_reassign_with_default)]
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.port = 0;
    c.database_path = dir.join("db");
    c.database_sync_writes = false;
    // The physical-deletion tests search the data directory for text byte by byte: compressed
    // blocks could hide a string that is still there (or split one that is).
    c.rocksdb_compression_algo = "none".into();
    c.registration_token = Some("test-token".into());
    c.rate_limits.enabled = false;
    c.log = "warn".into();
    c
}

/// Panics of the server's own code (not of the tests' assertions) seen in this test process.
/// A panic in a request handler or a background task does not take the process down (tokio
/// and hyper catch it), so without this a test could pass although the server panicked.
static SERVER_PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Record every panic located in the server's source (`src/`, or ruma, which it drives), then
/// let the default hook print it as usual. Installed once per process, by the first server.
fn watch_for_server_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(at) = info.location() {
                let file = at.file();
                if file.starts_with("src/") || file.contains("/ruma") {
                    let what = info
                        .payload()
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| info.payload().downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    if let Ok(mut seen) = SERVER_PANICS.lock() {
                        seen.push(format!("{file}:{}: {what}", at.line()));
                    }
                }
            }
            default(info);
        }));
    });
}

/// Fails the calling test when the server panicked anywhere in this process so far.
pub fn assert_no_server_panic() {
    let seen = SERVER_PANICS.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(seen.is_empty(), "the server panicked: {seen:?}");
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_server_panic();
        }
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        watch_for_server_panics();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let running = hafen::server::start(config).await.expect("server starts");
        let base = running.base_url();
        TestServer {
            running: Some(running),
            halted: None,
            base,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.running.as_ref().expect("running").services
    }

    pub fn server_name(&self) -> String {
        self.services().config.server_name.to_string()
    }

    /// Create a user directly (fast) and log a device in.
    pub async fn user(&self, localpart: &str) -> TestUser {
        let s = self.services();
        let user_id = s
            .accounts
            .validate_new_localpart(localpart)
            .expect("valid localpart");
        s.accounts
            .create_user(&user_id, Some("password"), false, false)
            .expect("create user");
        let session = s
            .accounts
            .create_session(&user_id, None, None, false)
            .expect("session");
        TestUser {
            user_id: user_id.to_string(),
            device_id: session.device_id.to_string(),
            token: session.access_token,
        }
    }

    /// Send a request; `token` None sends none. Returns status and JSON body (Null if empty).
    pub async fn req(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.req_with_headers(method, path, token, body, &[]).await
    }

    /// [`TestServer::req`] with extra request headers (e.g. `X-Forwarded-For`).
    pub async fn req_with_headers(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Send raw bytes as the body.
    pub async fn req_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &'static [u8],
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let res = r.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str, u: &TestUser) -> (StatusCode, Value) {
        self.req(Method::GET, path, Some(&u.token), None).await
    }
    pub async fn post(&self, path: &str, u: &TestUser, body: Value) -> (StatusCode, Value) {
        self.req(Method::POST, path, Some(&u.token), Some(body))
            .await
    }
    pub async fn put(&self, path: &str, u: &TestUser, body: Value) -> (StatusCode, Value) {
        self.req(Method::PUT, path, Some(&u.token), Some(body))
            .await
    }

    /// Create a room with `body` and return its id.
    pub async fn create_room(&self, u: &TestUser, body: Value) -> String {
        let (status, v) = self.post("/_matrix/client/v3/createRoom", u, body).await;
        assert_eq!(status, StatusCode::OK, "createRoom: {v}");
        v["room_id"].as_str().expect("room_id").to_owned()
    }

    /// `u` joins `room`; the join must succeed.
    pub async fn join(&self, u: &TestUser, room: &str) {
        let (status, v) = self
            .post(
                &format!("/_matrix/client/v3/rooms/{}/join", enc(room)),
                u,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "join: {v}");
    }

    /// `by` invites `u` to `room` and `u` joins.
    pub async fn invite_and_join(&self, by: &TestUser, u: &TestUser, room: &str) {
        let (status, v) = self
            .post(
                &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
                by,
                json!({ "user_id": u.user_id }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "invite: {v}");
        self.join(u, room).await;
    }

    /// Stop the server and start it again on the same data (database and media files).
    pub async fn restart(&mut self) {
        self.restart_after(|_| {}).await
    }

    /// Stop the server, run `offline` (an admin command on the stopped server's config), start
    /// it again on the same database.
    pub async fn restart_after(&mut self, offline: impl FnOnce(&Config)) {
        let r = self.running.take().expect("running");
        let config = r.services.config.clone();
        r.stop().await.expect("clean stop");
        offline(&config);
        let running = hafen::server::start(config).await.expect("server restarts");
        self.base = running.base_url();
        self.running = Some(running);
    }

    /// Stop the server but keep its data (and, for federating servers, its name and TLS port):
    /// to other servers it is down until [`TestServer::resume`].
    pub async fn halt(&mut self) {
        let r = self.running.take().expect("running");
        let config = r.services.config.clone();
        r.stop().await.expect("clean stop");
        self.halted = Some(config);
    }

    /// Start a server stopped by [`TestServer::halt`] again on the same data.
    pub async fn resume(&mut self) {
        self.resume_with(|_| {}).await
    }

    /// [`TestServer::resume`] with a changed configuration (what an operator does between two
    /// starts).
    pub async fn resume_with(&mut self, adjust: impl FnOnce(&mut Config)) {
        let mut config = self.halted.take().expect("halted");
        adjust(&mut config);
        // The fixed TLS port may still be held for a moment by an outgoing connection that the
        // OS gave it as its local port: try again for a few seconds.
        let mut tries = 0;
        let running = loop {
            match hafen::server::start(config.clone()).await {
                Ok(r) => break r,
                Err(e) if e.contains("Address already in use") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("server restarts: {e:?}"),
            }
        };
        self.base = running.base_url();
        self.running = Some(running);
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }
}

/// A loopback port free right now (for servers that must know their ports before starting).
/// A client transaction id (`PUT .../send/{type}/{txnId}`, redactions, to-device) no other call
/// in this test process uses. Servers treat a repeated transaction id of the same device as a
/// retry and answer with the first event, creating nothing: ids taken from `free_port()` could
/// repeat (the OS hands the same ephemeral port out again, more often under load), so a message
/// now and then was silently never sent.
pub fn unique_txn() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "txn-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub fn free_port() -> u16 {
    // Never the same port twice in this process: a server halted for a while (its TLS port is
    // fixed in its config) must find its port free when it resumes, not taken by another test.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
    panic!("no unused free port");
}

/// Assert a Matrix error: status and errcode.
#[track_caller]
pub fn assert_err(got: &(StatusCode, Value), status: u16, errcode: &str) {
    assert_eq!(got.0.as_u16(), status, "unexpected status, body: {}", got.1);
    assert_eq!(
        got.1["errcode"],
        json!(errcode),
        "unexpected errcode, body: {}",
        got.1
    );
}

/// URL-encode a path segment (room ids, aliases, event ids).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A private CA made at test time, and a certificate for `localhost` and 127.0.0.1 it signed
/// (`ca.pem`, `cert.pem`, `key.pem` in a temp dir): what servers federating over TLS on loopback
/// present and trust.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// A CA, and a certificate for `localhost` and 127.0.0.1 it signed.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Hafen test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).expect("write");
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).expect("write");
        TestPki { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A server federating over TLS on loopback as `localhost:PORT` (its TLS listener's port), trusting
/// the test CA and loopback addresses: the way two Hafens, or Hafen and Synapse, meet in tests.
pub async fn start_federating(
    pki: &TestPki,
    adjust: impl FnOnce(&mut hafen::config::Config),
) -> TestServer {
    let tls_port = free_port();
    TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = format!("localhost:{tls_port}").try_into().expect("name");
        c.tls = Some(hafen::config::TlsConfig {
            certs: pki.path("cert.pem"),
            key: pki.path("key.pem"),
            port: tls_port,
            reload_interval_secs: 60,
        });
        c.federation_ca_file = Some(pki.path("ca.pem"));
        c.federation_ip_range_allowlist = vec!["127.0.0.0/8".into(), "::1/128".into()];
        adjust(c);
    })
    .await
}

/// Files under `dir` (recursively) whose bytes contain `needle`: the physical-deletion checks
/// (retention, erasure, admin media deletion) search the whole data directory with it.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut visited = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            assert!(visited < 100_000, "too many files under {}", dir.display());
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(path.display().to_string());
                }
            }
        }
    }
    out
}
