//! Interop with a real Synapse: `SynapsePeer` starts Synapse (the reference homeserver) as a
//! separate process on loopback, federating over TLS with the Hafens of the test, and the tests
//! below check that each side understands the other.
//!
//! Synapse comes from the venv `scripts/synapse-venv.sh` makes (pinned matrix-synapse from PyPI),
//! found through `HAFEN_SYNAPSE_VENV`, or at the script's default place
//! (`~/.cache/hafen-synapse-venv`) when the variable is unset. `scripts/test.sh` (and so CI) runs
//! the script and exports the variable.
//!
//! Without the venv: when `CI` or `HAFEN_SYNAPSE_VENV` is set (CI, `scripts/test.sh`, or anyone
//! who asked for Synapse), the test fails with a message saying how to install it; a developer
//! running `cargo test` by hand with neither set gets a "skipped" line on stderr and the test
//! returns early, so the suite stays usable without Python.
//!
//! The peer: server name `localhost:PORT` (PORT its TLS federation listener, the certificate from
//! the shared test CA, which it also trusts for outgoing requests), a plain-HTTP client listener
//! on another port, SQLite and its signing key in a temp dir, open registration, aliases and the
//! room directory open (also over federation), every rate limit raised, loopback allowed as a federation address, keys fetched from each server directly (no
//! notary). Its log (WARNING and up) is in the temp dir and printed when it fails to start or when
//! a test using it panics. The process is killed when the peer is dropped.
//!
//! Run just these: `scripts/synapse-venv.sh && cargo test --test integration synapse`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rand::{distributions::Alphanumeric, Rng};
use reqwest::{Method, StatusCode};
use ruma::{
    serde::Base64,
    signatures::{sign_json, Ed25519KeyPair},
    CanonicalJsonObject,
};
use serde_json::{json, Value};

use crate::common::{enc, free_port, start_federating, TestPki, TestUser};

const V3: &str = "/_matrix/client/v3";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the Synapse venv is, or None (after saying so) when the test may be skipped.
fn synapse_venv() -> Option<PathBuf> {
    let from_env = std::env::var_os("HAFEN_SYNAPSE_VENV").filter(|v| !v.is_empty());
    let venv = match &from_env {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/hafen-synapse-venv"),
    };
    if venv.join("bin/python").is_file() {
        return Some(venv);
    }
    let required = from_env.is_some() || std::env::var_os("CI").is_some();
    if required {
        panic!(
            "Synapse interop test: no Synapse venv at {} (HAFEN_SYNAPSE_VENV={:?}, CI={:?}). \
             Install it with scripts/synapse-venv.sh (scripts/test.sh does this).",
            venv.display(),
            from_env,
            std::env::var_os("CI"),
        );
    }
    eprintln!(
        "skipped: Synapse interop test needs the venv scripts/synapse-venv.sh makes \
         (none at {}); set HAFEN_SYNAPSE_VENV or run the script",
        venv.display()
    );
    None
}

/// The last `lines` lines of a file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn secret() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// A real Synapse on loopback, federating over TLS with the test CA.
pub struct SynapsePeer {
    child: Child,
    /// `localhost:PORT`, PORT being the TLS federation listener.
    pub server_name: String,
    /// The plain-HTTP client API, `http://127.0.0.1:PORT`.
    pub client_base: String,
    pub http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl SynapsePeer {
    /// Start Synapse and wait until its client API answers; None when the test is to be skipped
    /// (see the module comment).
    pub async fn start(pki: &TestPki) -> Option<SynapsePeer> {
        Self::start_with(pki, json!({})).await
    }

    /// [`SynapsePeer::start`] with `extra` (a JSON object) merged into the top level of the
    /// config, replacing keys of the same name.
    pub async fn start_with(pki: &TestPki, extra: Value) -> Option<SynapsePeer> {
        let venv = synapse_venv()?;
        let dir = tempfile::tempdir().expect("temp dir for Synapse");
        let d = dir.path();
        let fed_port = free_port();
        let client_port = free_port();
        let server_name = format!("localhost:{fed_port}");
        let path = |name: &str| d.join(name).to_string_lossy().into_owned();

        // Logging: WARNING and up to a file; JSON is YAML, so both files are written as JSON.
        let log_config = json!({
            "version": 1,
            "formatters": { "plain": {
                "format": "%(asctime)s %(levelname)s %(name)s %(request)s: %(message)s" } },
            "filters": { "context": { "()": "synapse.logging.context.LoggingContextFilter",
                "request": "" } },
            "handlers": { "file": {
                "class": "logging.FileHandler", "filename": path("homeserver.log"),
                "formatter": "plain", "filters": ["context"], "level": "WARNING" } },
            "root": { "level": "WARNING", "handlers": ["file"] },
            "disable_existing_loggers": false,
        });
        std::fs::write(d.join("log.yaml"), log_config.to_string()).expect("write log config");

        let rc = json!({ "per_second": 100000, "burst_count": 100000 });
        let config = json!({
            "server_name": server_name,
            "pid_file": path("homeserver.pid"),
            "report_stats": false,
            "listeners": [
                { "port": fed_port, "bind_addresses": ["127.0.0.1"], "type": "http",
                  "tls": true, "x_forwarded": false,
                  "resources": [{ "names": ["federation"], "compress": false }] },
                { "port": client_port, "bind_addresses": ["127.0.0.1"], "type": "http",
                  "tls": false, "x_forwarded": false,
                  "resources": [{ "names": ["client"], "compress": false }] },
            ],
            "tls_certificate_path": pki.path("cert.pem"),
            "tls_private_key_path": pki.path("key.pem"),
            "federation_custom_ca_list": [pki.path("ca.pem")],
            // Synapse refuses private addresses for federation unless told.
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            // Fetch each server's keys from the server itself, never from a notary.
            "trusted_key_servers": [],
            "suppress_key_server_warning": true,
            "database": { "name": "sqlite3", "args": { "database": path("homeserver.db") } },
            "log_config": path("log.yaml"),
            "media_store_path": path("media"),
            // Made by Synapse on first start (its default "generate missing files and run").
            "signing_key_path": path("signing.key"),
            "macaroon_secret_key": secret(),
            "form_secret": secret(),
            // Aliases and the room directory open to ordinary users, the directory to other
            // servers too (closed by default).
            "alias_creation_rules": [{ "action": "allow" }],
            "room_list_publication_rules": [{ "action": "allow" }],
            "allow_public_rooms_over_federation": true,
            "enable_registration": true,
            "enable_registration_without_verification": true,
        });
        // Rate limits high enough never to be hit by tests (a second object: one json! of all
        // of it is too deep for the macro).
        let limits = json!({
            "rc_message": rc,
            "rc_registration": rc,
            "rc_registration_token_validity": rc,
            "rc_login": { "address": rc, "account": rc, "failed_attempts": rc },
            "rc_admin_redaction": rc,
            "rc_joins": { "local": rc, "remote": rc },
            "rc_joins_per_room": rc,
            "rc_key_requests": rc,
            "rc_3pid_validation": rc,
            "rc_invites": { "per_room": rc, "per_user": rc, "per_issuer": rc },
            "rc_third_party_invite": rc,
            "rc_media_create": rc,
            "rc_presence": { "per_user": rc },
            "rc_delayed_event_mgmt": rc,
            "rc_room_creation": rc,
            "rc_reports": rc,
            "rc_user_directory": rc,
            "rc_profile": rc,
            "rc_federation": { "window_size": 1000, "sleep_limit": 100000, "sleep_delay": 0,
                               "reject_limit": 100000, "concurrent": 1000 },
            "federation_rr_transactions_per_room_per_second": 100000,
        });
        let mut config = config;
        if let (Some(c), Value::Object(l)) = (config.as_object_mut(), limits) {
            c.extend(l);
        }
        if let (Some(c), Value::Object(e)) = (config.as_object_mut(), extra) {
            c.extend(e);
        }
        let config_path = d.join("homeserver.yaml");
        std::fs::write(&config_path, config.to_string()).expect("write Synapse config");

        let out = std::fs::File::create(d.join("stdout.log")).expect("stdout log");
        let err = std::fs::File::create(d.join("stderr.log")).expect("stderr log");
        let child = Command::new(venv.join("bin/python"))
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config_path)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting Synapse from {}: {e}", venv.display()));
        let mut peer = SynapsePeer {
            child,
            server_name,
            client_base: format!("http://127.0.0.1:{client_port}"),
            http: reqwest::Client::new(),
            dir,
        };
        peer.wait_ready().await;
        Some(peer)
    }

    /// Poll `/_matrix/client/versions` until it answers 200; panic (with the logs) when Synapse
    /// exits or does not answer within `STARTUP_TIMEOUT`.
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        let url = format!("{}/_matrix/client/versions", self.client_base);
        loop {
            if let Ok(res) = self.http.get(&url).send().await {
                if res.status() == StatusCode::OK {
                    eprintln!(
                        "Synapse {} ready after {} ms",
                        self.server_name,
                        started.elapsed().as_millis()
                    );
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Synapse exited during startup ({status})\n{}", self.logs());
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                panic!(
                    "Synapse did not answer {url} within {} s\n{}",
                    STARTUP_TIMEOUT.as_secs(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The tails of Synapse's log and of its stderr.
    pub fn logs(&self) -> String {
        let d = self.dir.path();
        format!(
            "--- Synapse homeserver.log (tail) ---\n{}\n--- Synapse stderr (tail) ---\n{}",
            tail(&d.join("homeserver.log"), 60),
            tail(&d.join("stderr.log"), 30)
        )
    }

    /// A client API request; `token` None sends none. Returns status and JSON body (Null if empty).
    pub async fn client_req(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.client_base, path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.expect("request to Synapse sent");
        let status = res.status();
        let text = res.text().await.expect("Synapse's body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Register `localpart` (open registration, the dummy stage); returns (user_id, access_token).
    pub async fn register(&self, localpart: &str) -> (String, String) {
        let mut body = json!({
            "username": localpart,
            "password": "interop-password",
            "initial_device_display_name": "interop test",
            "auth": { "type": "m.login.dummy" },
        });
        let mut res = self
            .client_req(
                Method::POST,
                &format!("{V3}/register"),
                None,
                Some(body.clone()),
            )
            .await;
        // Should the dummy stage want a session first, answer within the one offered.
        if res.0 == StatusCode::UNAUTHORIZED {
            let session = res.1["session"].as_str().expect("UIA session").to_owned();
            body["auth"]["session"] = json!(session);
            res = self
                .client_req(Method::POST, &format!("{V3}/register"), None, Some(body))
                .await;
        }
        assert_eq!(res.0, StatusCode::OK, "Synapse register: {}", res.1);
        let user_id = res.1["user_id"].as_str().expect("user_id").to_owned();
        assert_eq!(user_id, format!("@{localpart}:{}", self.server_name));
        let token = res.1["access_token"].as_str().expect("token").to_owned();
        (user_id, token)
    }
}

impl SynapsePeer {
    /// The device id of the token's session (`/account/whoami`).
    pub async fn device_id(&self, token: &str) -> String {
        let (status, v) = self
            .client_req(
                Method::GET,
                &format!("{V3}/account/whoami"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "Synapse whoami: {v}");
        v["device_id"].as_str().expect("device_id").to_owned()
    }
}

impl Drop for SynapsePeer {
    fn drop(&mut self) {
        // A failing test shows what Synapse said about it.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Device keys for `device` of `user`, signed with a fresh ed25519 key named by the device, as a
/// client makes them.
pub(crate) fn signed_device_keys(user: &str, device: &str) -> Value {
    let doc = Ed25519KeyPair::generate();
    let pair = Ed25519KeyPair::from_der(&doc, device.to_owned()).expect("key parses");
    let b64 =
        |bytes: Vec<u8>| Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(bytes).encode();
    let curve: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let keys = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): b64(curve),
            format!("ed25519:{device}"): b64(pair.public_key().to_vec()),
        },
    });
    let mut obj: CanonicalJsonObject = serde_json::from_value(keys).expect("canonical JSON");
    sign_json(user, &pair, &mut obj).expect("signs");
    serde_json::to_value(obj).expect("serializes")
}

/// Profiles and end-to-end encryption keys across Hafen and Synapse: each side's client API asks
/// the other server (X-Matrix signed requests both ways, each fetching the other's keys).
#[tokio::test]
async fn profile_and_device_keys_across_hafen_and_synapse() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;

    // A user on each side, with a display name.
    let (s_user, s_token) = synapse.register("sam").await;
    let h: TestUser = hafen.user("hanna").await;
    let (status, v) = synapse
        .client_req(
            Method::PUT,
            &format!("{V3}/profile/{}/displayname", enc(&s_user)),
            Some(&s_token),
            Some(json!({ "displayname": "Sam on Synapse" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse set displayname: {v}");
    assert_eq!(v, json!({}));
    let (status, v) = hafen
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&h.user_id)),
            &h,
            json!({ "displayname": "Hanna on Hafen" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen set displayname: {v}");
    assert_eq!(v, json!({}));

    // Hafen's client asks Hafen for the Synapse user's profile: Hafen asks Synapse over
    // federation (Synapse checks our X-Matrix signature with the keys it fetches from us).
    let (status, v) = hafen
        .get(&format!("{V3}/profile/{}", enc(&s_user)), &h)
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse profile: {v}");
    assert_eq!(v["displayname"], json!("Sam on Synapse"), "{v}");
    let (status, v) = hafen
        .get(&format!("{V3}/profile/{}/displayname", enc(&s_user)), &h)
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse displayname: {v}");
    assert_eq!(v, json!({ "displayname": "Sam on Synapse" }));

    // And the other way: Synapse asks Hafen.
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/profile/{}", enc(&h.user_id)),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen profile: {v}");
    assert_eq!(v["displayname"], json!("Hanna on Hafen"), "{v}");
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/profile/{}/displayname", enc(&h.user_id)),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen displayname: {v}");
    assert_eq!(v, json!({ "displayname": "Hanna on Hafen" }));

    // A user unknown on the other side is 404 M_NOT_FOUND both ways.
    let ghost_s = format!("@ghost:{}", synapse.server_name);
    let (status, v) = hafen
        .get(&format!("{V3}/profile/{}", enc(&ghost_s)), &h)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["errcode"], json!("M_NOT_FOUND"), "{v}");
    let ghost_h = format!("@ghost:{}", hafen.server_name());
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/profile/{}", enc(&ghost_h)),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["errcode"], json!("M_NOT_FOUND"), "{v}");

    // Device keys: each uploads signed keys for its device.
    let s_device = synapse.device_id(&s_token).await;
    let s_keys = signed_device_keys(&s_user, &s_device);
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/upload"),
            Some(&s_token),
            Some(json!({ "device_keys": s_keys })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse keys/upload: {v}");
    let h_keys = signed_device_keys(&h.user_id, &h.device_id);
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/upload"),
            &h,
            json!({ "device_keys": h_keys }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen keys/upload: {v}");

    // Hafen's client queries the Synapse user's keys: Hafen asks Synapse.
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/query"),
            &h,
            json!({ "device_keys": { s_user.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse keys/query: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    let got = &v["device_keys"][&s_user][&s_device];
    for field in ["user_id", "device_id", "algorithms", "keys", "signatures"] {
        assert_eq!(got[field], s_keys[field], "{field} of {v}");
    }

    // Synapse's client queries the Hafen user's keys, though they share no room: Synapse asks
    // Hafen over federation.
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/query"),
            Some(&s_token),
            Some(json!({ "device_keys": { h.user_id.clone(): [] } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen keys/query: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    let got = &v["device_keys"][&h.user_id][&h.device_id];
    for field in ["user_id", "device_id", "algorithms", "keys", "signatures"] {
        assert_eq!(got[field], h_keys[field], "{field} of {v}");
    }

    hafen.stop().await;
}

/// An ed25519 key named by its public key (as cross-signing keys are), and that public key.
fn named_key() -> (Ed25519KeyPair, String) {
    let doc = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&doc, "probe".into()).expect("key parses");
    let public =
        Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(probe.public_key().to_vec()).encode();
    let pair = Ed25519KeyPair::from_der(&doc, public.clone()).expect("key parses");
    (pair, public)
}

/// `value` signed as `entity` with `key`.
fn signed(entity: &str, key: &Ed25519KeyPair, value: Value) -> Value {
    let mut obj: CanonicalJsonObject = serde_json::from_value(value).expect("canonical JSON");
    sign_json(entity, key, &mut obj).expect("signs");
    serde_json::to_value(obj).expect("serializes")
}

/// A master key and a self-signing key it signed, for `user`.
fn cross_signing_keys(user: &str) -> (Value, Value) {
    let (master, master_pub) = named_key();
    let (_, ssk_pub) = named_key();
    let master_key = json!({
        "user_id": user, "usage": ["master"],
        "keys": { format!("ed25519:{master_pub}"): master_pub },
    });
    let ssk = signed(
        user,
        &master,
        json!({
            "user_id": user, "usage": ["self_signing"],
            "keys": { format!("ed25519:{ssk_pub}"): ssk_pub },
        }),
    );
    (master_key, ssk)
}

/// A one-time key `signed_curve25519:<id>` signed by the device's key.
fn one_time_key(user: &str, device: &str) -> (String, Value) {
    let doc = Ed25519KeyPair::generate();
    let pair = Ed25519KeyPair::from_der(&doc, device.to_owned()).expect("key parses");
    let curve: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let key = Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(curve).encode();
    let id = format!("signed_curve25519:AAAA{}", secret().get(..6).unwrap_or("x"));
    (id, signed(user, &pair, json!({ "key": key })))
}

/// One-time keys claimed and cross-signing keys queried across Hafen and Synapse, both ways.
#[tokio::test]
async fn one_time_and_cross_signing_keys_across_hafen_and_synapse() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let (s_user, s_token) = synapse.register("otto").await;
    let s_device = synapse.device_id(&s_token).await;
    let h = hafen.user("hedda").await;

    // Each side: device keys, one one-time key, and cross-signing keys (the first upload needs
    // no user-interactive auth on either server).
    let (s_otk_id, s_otk) = one_time_key(&s_user, &s_device);
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/upload"),
            Some(&s_token),
            Some(json!({
                "device_keys": signed_device_keys(&s_user, &s_device),
                "one_time_keys": { s_otk_id.clone(): s_otk },
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse keys/upload: {v}");
    assert_eq!(
        v,
        json!({ "one_time_key_counts": { "signed_curve25519": 1 } })
    );
    let (s_master, s_ssk) = cross_signing_keys(&s_user);
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/device_signing/upload"),
            Some(&s_token),
            Some(json!({ "master_key": s_master, "self_signing_key": s_ssk })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse device_signing/upload: {v}");
    assert_eq!(v, json!({}));

    let (h_otk_id, h_otk) = one_time_key(&h.user_id, &h.device_id);
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/upload"),
            &h,
            json!({
                "device_keys": signed_device_keys(&h.user_id, &h.device_id),
                "one_time_keys": { h_otk_id.clone(): h_otk },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen keys/upload: {v}");
    assert_eq!(
        v["one_time_key_counts"]["signed_curve25519"],
        json!(1),
        "{v}"
    );
    let (h_master, h_ssk) = cross_signing_keys(&h.user_id);
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/device_signing/upload"),
            &h,
            json!({ "master_key": h_master, "self_signing_key": h_ssk }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen device_signing/upload: {v}");
    assert_eq!(v, json!({}));

    // Cross-signing keys of the other server's user, through /keys/query.
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/query"),
            &h,
            json!({ "device_keys": { s_user.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse keys/query: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert_eq!(v["master_keys"][&s_user]["keys"], s_master["keys"], "{v}");
    assert_eq!(v["master_keys"][&s_user]["usage"], json!(["master"]), "{v}");
    assert_eq!(
        v["self_signing_keys"][&s_user]["keys"], s_ssk["keys"],
        "{v}"
    );
    assert_eq!(
        v["self_signing_keys"][&s_user]["signatures"], s_ssk["signatures"],
        "{v}"
    );
    assert!(v["device_keys"][&s_user][&s_device].is_object(), "{v}");

    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/query"),
            Some(&s_token),
            Some(json!({ "device_keys": { h.user_id.clone(): [] } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen keys/query: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert_eq!(
        v["master_keys"][&h.user_id]["keys"], h_master["keys"],
        "{v}"
    );
    assert_eq!(
        v["master_keys"][&h.user_id]["usage"],
        json!(["master"]),
        "{v}"
    );
    assert_eq!(
        v["self_signing_keys"][&h.user_id]["keys"], h_ssk["keys"],
        "{v}"
    );
    assert_eq!(
        v["self_signing_keys"][&h.user_id]["signatures"], h_ssk["signatures"],
        "{v}"
    );
    assert!(
        v["device_keys"][&h.user_id][&h.device_id].is_object(),
        "{v}"
    );

    // One-time keys claimed across: each claim hands out the uploaded key, a second one finds
    // none left (no fallback key was uploaded).
    let claim_s =
        json!({ "one_time_keys": { s_user.clone(): { s_device.clone(): "signed_curve25519" } } });
    let (status, v) = hafen
        .post(&format!("{V3}/keys/claim"), &h, claim_s.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse keys/claim: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert_eq!(
        v["one_time_keys"][&s_user][&s_device],
        json!({ s_otk_id.clone(): s_otk }),
        "{v}"
    );
    let (status, v) = hafen.post(&format!("{V3}/keys/claim"), &h, claim_s).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert!(
        v["one_time_keys"][&s_user][&s_device]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "no key left: {v}"
    );

    let claim_h = json!({ "one_time_keys": { h.user_id.clone(): { h.device_id.clone(): "signed_curve25519" } } });
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/claim"),
            Some(&s_token),
            Some(claim_h.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen keys/claim: {v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert_eq!(
        v["one_time_keys"][&h.user_id][&h.device_id],
        json!({ h_otk_id.clone(): h_otk }),
        "{v}"
    );
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/keys/claim"),
            Some(&s_token),
            Some(claim_h),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    assert!(
        v["one_time_keys"][&h.user_id][&h.device_id]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "no key left: {v}"
    );

    hafen.stop().await;
}

/// Assert that `doc` carries valid signatures of exactly the `signers`, each checked with the keys
/// its own key document (`/_matrix/key/v2/server`) publishes. (A notary's copy is the document
/// it fetched earlier, so its `valid_until_ts` and the origin's signature may differ from what the
/// origin serves now: the signature is verified, not compared.)
#[track_caller]
fn assert_signed_by(doc: &Value, signers: &[(&str, &Value)]) {
    let mut map = ruma::signatures::PublicKeyMap::new();
    for (name, own) in signers {
        let keys = own["verify_keys"].as_object().expect("verify_keys");
        let set = keys
            .iter()
            .map(|(id, k)| {
                let b64 = k["key"].as_str().expect("key");
                (id.clone(), Base64::parse(b64).expect("base64 key"))
            })
            .collect();
        map.insert((*name).to_owned(), set);
    }
    let mut signed_by: Vec<&str> = doc["signatures"]
        .as_object()
        .expect("signatures")
        .keys()
        .map(String::as_str)
        .collect();
    signed_by.sort();
    let mut want: Vec<&str> = signers.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(signed_by, want, "signers of {doc}");
    let obj: CanonicalJsonObject = serde_json::from_value(doc.clone()).expect("canonical JSON");
    ruma::signatures::verify_json(&map, &obj)
        .unwrap_or_else(|e| panic!("signatures of {doc} do not verify: {e}"));
}

/// Aliases, the room directory and the notary key API across Hafen and Synapse, both ways.
#[tokio::test]
async fn aliases_public_rooms_and_notary_keys_across_hafen_and_synapse() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |c| c.allow_public_rooms_over_federation = true).await;
    let (_, s_token) = synapse.register("paula").await;
    let h = hafen.user("henrik").await;
    let s_name = synapse.server_name.clone();
    let h_name = hafen.server_name();

    // A public room with an alias on each side.
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/createRoom"),
            Some(&s_token),
            Some(json!({ "room_alias_name": "lobby", "visibility": "public",
                         "preset": "public_chat", "name": "Synapse lobby" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse createRoom: {v}");
    let s_room = v["room_id"].as_str().expect("room_id").to_owned();
    let h_room = hafen
        .create_room(
            &h,
            json!({ "room_alias_name": "hall", "visibility": "public",
                    "preset": "public_chat", "name": "Hafen hall" }),
        )
        .await;

    // Aliases of the other server resolve through its federation directory query.
    let (status, v) = hafen
        .get(
            &format!("{V3}/directory/room/{}", enc(&format!("#lobby:{s_name}"))),
            &h,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse alias: {v}");
    assert_eq!(v["room_id"], json!(s_room), "{v}");
    assert_eq!(v["servers"], json!([s_name]), "{v}");
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/directory/room/{}", enc(&format!("#hall:{h_name}"))),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen alias: {v}");
    assert_eq!(v["room_id"], json!(h_room), "{v}");
    assert_eq!(v["servers"], json!([h_name]), "{v}");
    // Unknown aliases: 404 M_NOT_FOUND both ways.
    let (status, v) = hafen
        .get(
            &format!("{V3}/directory/room/{}", enc(&format!("#nope:{s_name}"))),
            &h,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["errcode"], json!("M_NOT_FOUND"), "{v}");
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/directory/room/{}", enc(&format!("#nope:{h_name}"))),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["errcode"], json!("M_NOT_FOUND"), "{v}");

    // The other server's room directory, through /publicRooms?server=.
    let (status, v) = hafen
        .get(&format!("{V3}/publicRooms?server={}", enc(&s_name)), &h)
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen -> Synapse publicRooms: {v}");
    let chunk = v["chunk"].as_array().expect("chunk");
    assert_eq!(chunk.len(), 1, "{v}");
    assert_eq!(chunk[0]["room_id"], json!(s_room), "{v}");
    assert_eq!(chunk[0]["name"], json!("Synapse lobby"), "{v}");
    assert_eq!(
        chunk[0]["canonical_alias"],
        json!(format!("#lobby:{s_name}")),
        "{v}"
    );
    assert_eq!(chunk[0]["num_joined_members"], json!(1), "{v}");
    let (status, v) = synapse
        .client_req(
            Method::GET,
            &format!("{V3}/publicRooms?server={}", enc(&h_name)),
            Some(&s_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Synapse -> Hafen publicRooms: {v}");
    let chunk = v["chunk"].as_array().expect("chunk");
    assert_eq!(chunk.len(), 1, "{v}");
    assert_eq!(chunk[0]["room_id"], json!(h_room), "{v}");
    assert_eq!(chunk[0]["name"], json!("Hafen hall"), "{v}");
    assert_eq!(
        chunk[0]["canonical_alias"],
        json!(format!("#hall:{h_name}")),
        "{v}"
    );
    assert_eq!(chunk[0]["num_joined_members"], json!(1), "{v}");

    // Notaries: each serves the other's keys as the other signed them, countersigned.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).expect("ca"))
        .expect("ca pem");
    let tls = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client");
    let own_keys = |url: String| {
        let tls = tls.clone();
        async move {
            let res = tls.get(url).send().await.expect("key request");
            assert_eq!(res.status(), StatusCode::OK);
            res.json::<Value>().await.expect("json")
        }
    };
    let s_own = own_keys(format!("https://{s_name}/_matrix/key/v2/server")).await;
    let h_own = own_keys(format!("https://{h_name}/_matrix/key/v2/server")).await;

    let (status, v) = hafen
        .req(
            Method::GET,
            &format!("/_matrix/key/v2/query/{s_name}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen notary for Synapse: {v}");
    let doc = &v["server_keys"][0];
    assert_eq!(doc["server_name"], json!(s_name), "{v}");
    assert_eq!(doc["verify_keys"], s_own["verify_keys"], "{v}");
    assert_signed_by(doc, &[(&s_name, &s_own), (&h_name, &h_own)]);

    let res = tls
        .get(format!("https://{s_name}/_matrix/key/v2/query/{h_name}"))
        .send()
        .await
        .expect("Synapse notary request");
    assert_eq!(res.status(), StatusCode::OK);
    let v: Value = res.json().await.expect("json");
    let doc = &v["server_keys"][0];
    assert_eq!(doc["server_name"], json!(h_name), "{v}");
    assert_eq!(doc["verify_keys"], h_own["verify_keys"], "{v}");
    assert_signed_by(doc, &[(&h_name, &h_own), (&s_name, &s_own)]);

    hafen.stop().await;
}
