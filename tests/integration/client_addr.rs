//! The client's real address behind trusted proxies (`trusted_proxies`), and what uses it: rate
//! limits (IPv6 by /64, failed passwords per account and address, re-authentication), the
//! audit log, whois and the devices' last seen address under `audit_ip_mode`; and login on a
//! deactivated account.

use hafen::config::{Config, RateLimit};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

/// A request as if a proxy had forwarded it for `xff` (the `X-Forwarded-For` header).
async fn from(
    s: &TestServer,
    xff: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    s.req_with_headers(method, path, token, body, &[("X-Forwarded-For", xff)])
        .await
}

fn login_body(user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    })
}

async fn login_from(s: &TestServer, xff: &str, user: &str, password: &str) -> (StatusCode, Value) {
    from(
        s,
        xff,
        Method::POST,
        &format!("{V3}/login"),
        None,
        Some(login_body(user, password)),
    )
    .await
}

/// The test server behind a proxy on loopback (so `X-Forwarded-For` counts).
fn behind_proxy(c: &mut Config) {
    c.trusted_proxies = vec!["127.0.0.1".into(), "::1".into()];
}

fn slow(burst: u32) -> RateLimit {
    RateLimit {
        per_second: 0.001,
        burst,
    }
}

/// The address the audit log kept for the latest entry of `kind` about `user`.
fn audit_ip(s: &TestServer, kind: &str, user: &str) -> Option<String> {
    let (entries, _) = s
        .services()
        .audit
        .query(0, u64::MAX, 10_000, None, |e| {
            e.kind == kind && e.user.as_deref() == Some(user)
        })
        .expect("audit query");
    entries.last().expect("an audit entry").ip.clone()
}

async fn admin(s: &TestServer) -> TestUser {
    let u = s.user("boss").await;
    s.services()
        .accounts
        .set_admin(&ruma::UserId::parse(u.user_id.as_str()).unwrap(), true)
        .unwrap();
    u
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    // Without trusted proxies, a client cannot choose its address by sending the header.
    let s = TestServer::start_with(|c| {
        c.audit_ip_mode = hafen::policy::audit::IpMode::Keep;
    })
    .await;
    s.user("alice").await;
    let (status, v) = login_from(&s, "203.0.113.9", "alice", "password").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        audit_ip(&s, "login", "@alice:localhost").as_deref(),
        Some("127.0.0.1")
    );
    let token = v["access_token"].as_str().unwrap();
    let (_, devices) = from(
        &s,
        "203.0.113.9",
        Method::GET,
        &format!("{V3}/devices"),
        Some(token),
        None,
    )
    .await;
    let device = v["device_id"].as_str().unwrap();
    let mine = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .unwrap();
    assert_eq!(mine["last_seen_ip"], "127.0.0.1", "{devices}");

    // Behind a trusted proxy: the right-most address the proxies did not add themselves. The
    // left entry is what the client wrote; it is not believed.
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.audit_ip_mode = hafen::policy::audit::IpMode::Keep;
    })
    .await;
    let boss = admin(&s).await;
    s.user("alice").await;
    let (status, v) = login_from(&s, "192.0.2.66, 203.0.113.9", "alice", "password").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        audit_ip(&s, "login", "@alice:localhost").as_deref(),
        Some("203.0.113.9")
    );
    let (status, _) = login_from(&s, "198.51.100.3", "alice", "wrong").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        audit_ip(&s, "login_failed", "@alice:localhost").as_deref(),
        Some("198.51.100.3")
    );
    // A later request from elsewhere: the connection, the device's last seen, whois.
    let token = v["access_token"].as_str().unwrap();
    let (status, _) = from(
        &s,
        "198.51.100.20",
        Method::GET,
        &format!("{V3}/account/whoami"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        audit_ip(&s, "connection", "@alice:localhost").as_deref(),
        Some("198.51.100.20")
    );
    let (status, whois) = s
        .get(
            &format!("/_synapse/admin/v1/whois/{}", enc("@alice:localhost")),
            &boss,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{whois}");
    let ips: Vec<&str> = whois["devices"][""]["sessions"][0]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["ip"].as_str())
        .collect();
    assert_eq!(ips, vec!["198.51.100.20"], "{whois}");
}

#[tokio::test]
async fn device_addresses_follow_audit_ip_mode() {
    // The default mode truncates: the device list and whois do not keep more than the log.
    let s = TestServer::start_with(behind_proxy).await;
    let boss = admin(&s).await;
    s.user("alice").await;
    let (status, v) = login_from(&s, "203.0.113.9", "alice", "password").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let alice = TestUser {
        user_id: "@alice:localhost".into(),
        device_id: v["device_id"].as_str().unwrap().into(),
        token: v["access_token"].as_str().unwrap().into(),
    };
    let (status, d) = from(
        &s,
        "203.0.113.9",
        Method::GET,
        &format!("{V3}/devices/{}", alice.device_id),
        Some(&alice.token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d["last_seen_ip"], "203.0.113.0/24", "{d}");
    // Nor is the full address stored in a device record.
    for row in s
        .services()
        .storage
        .scan_prefix(hafen::storage::Table::Devices, b"")
        .unwrap()
    {
        let (_, v) = row.unwrap();
        let text = String::from_utf8_lossy(&v);
        assert!(
            !text.contains("203.0.113.9"),
            "a full address was kept: {text}"
        );
    }
    let (_, whois) = s
        .get(&format!("{V3}/admin/whois/{}", enc(&alice.user_id)), &boss)
        .await;
    let text = whois.to_string();
    assert!(text.contains("203.0.113.0/24"), "{whois}");
    assert!(!text.contains("203.0.113.9"), "{whois}");

    // `drop`: no address at all.
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.audit_ip_mode = hafen::policy::audit::IpMode::Drop;
    })
    .await;
    s.user("bob").await;
    let (status, v) = login_from(&s, "203.0.113.9", "bob", "password").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let token = v["access_token"].as_str().unwrap();
    let (status, d) = from(
        &s,
        "203.0.113.10",
        Method::GET,
        &format!("{V3}/devices/{}", v["device_id"].as_str().unwrap()),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert!(d.get("last_seen_ip").is_none(), "{d}");
}

#[tokio::test]
async fn login_rate_limit_keys_ipv6_by_its_64() {
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.rate_limits.enabled = true;
        c.rate_limits.login = slow(2);
        c.rate_limits.login_failures = slow(100);
    })
    .await;
    for xff in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
        let got = login_from(&s, xff, "nobody", "x").await;
        assert_err(&got, 403, "M_FORBIDDEN");
    }
    // Another address of the same /64: the same bucket.
    let got = login_from(&s, "2001:db8:1:2:ffff::3", "nobody", "x").await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    // Another /64 (and an IPv4 client) are not affected.
    let got = login_from(&s, "2001:db8:1:3::1", "nobody", "x").await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = login_from(&s, "192.0.2.1", "nobody", "x").await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn failed_logins_elsewhere_do_not_lock_the_owner_out() {
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.rate_limits.enabled = true;
        c.rate_limits.login = slow(5);
        c.rate_limits.login_failures = slow(3);
    })
    .await;
    s.user("victim").await;
    // Someone guesses from one address until they are stopped.
    for _ in 0..3 {
        let got = login_from(&s, "203.0.113.66", "victim", "guess").await;
        assert_err(&got, 403, "M_FORBIDDEN");
    }
    for _ in 0..5 {
        let got = login_from(&s, "203.0.113.66", "victim", "guess").await;
        assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    }
    // Even the right password is refused there now (the guesser's bucket).
    let got = login_from(&s, "203.0.113.66", "victim", "password").await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    // The owner, elsewhere, still logs in, and a typo of theirs does not count against it.
    let got = login_from(&s, "198.51.100.7", "victim", "typo").await;
    assert_err(&got, 403, "M_FORBIDDEN");
    for _ in 0..3 {
        let (status, v) = login_from(&s, "198.51.100.7", "victim", "password").await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
}

#[tokio::test]
async fn failed_password_limit_refills() {
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.rate_limits.enabled = true;
        c.rate_limits.login = slow(100);
        c.rate_limits.login_failures = RateLimit {
            per_second: 5.0,
            burst: 1,
        };
    })
    .await;
    s.user("carol").await;
    let got = login_from(&s, "203.0.113.5", "carol", "guess").await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = login_from(&s, "203.0.113.5", "carol", "guess").await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    assert!(
        got.1["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 200),
        "{}",
        got.1
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, v) = login_from(&s, "203.0.113.5", "carol", "password").await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn password_reauthentication_is_rate_limited() {
    let s = TestServer::start_with(|c| {
        behind_proxy(c);
        c.rate_limits.enabled = true;
        c.rate_limits.login = slow(100);
        c.rate_limits.login_failures = slow(3);
    })
    .await;
    let alice = s.user("alice").await;
    let path = format!("{V3}/devices/{}", alice.device_id);
    let (status, challenge) = from(
        &s,
        "203.0.113.7",
        Method::DELETE,
        &path,
        Some(&alice.token),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let session = challenge["session"].as_str().unwrap().to_owned();
    let attempt = |password: &str| {
        json!({ "auth": {
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": alice.user_id },
            "password": password,
            "session": session,
        } })
    };
    for _ in 0..3 {
        let (status, v) = from(
            &s,
            "203.0.113.7",
            Method::DELETE,
            &path,
            Some(&alice.token),
            Some(attempt("guess")),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["errcode"], "M_FORBIDDEN", "{v}");
    }
    // A stolen access token is no password oracle: the guessing stops.
    let got = from(
        &s,
        "203.0.113.7",
        Method::DELETE,
        &path,
        Some(&alice.token),
        Some(attempt("guess")),
    )
    .await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    // Password login of the account from that address shares the failure count.
    let got = login_from(&s, "203.0.113.7", "alice", "guess").await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    // The owner elsewhere re-authenticates.
    let (status, v) = from(
        &s,
        "198.51.100.8",
        Method::DELETE,
        &path,
        Some(&alice.token),
        Some(attempt("password")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn wrong_password_on_a_deactivated_account_is_plain_forbidden() {
    let s = TestServer::start().await;
    let gone = s.user("gone").await;
    let (status, v) = s
        .post(
            &format!("{V3}/account/deactivate"),
            &gone,
            json!({ "auth": {
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": gone.user_id },
                "password": "password",
            } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let unknown = s
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(login_body("never", "guess")),
        )
        .await;
    assert_err(&unknown, 403, "M_FORBIDDEN");
    // Guessing does not learn that the account existed and was deactivated: the same answer
    // as for an account that never was.
    let wrong = s
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(login_body("gone", "guess")),
        )
        .await;
    assert_eq!(wrong, unknown);
    // Deactivation removed the password: the old one is just as wrong.
    let old = s
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(login_body("gone", "password")),
        )
        .await;
    assert_eq!(old, unknown);
}
