//! The audit log (B3, C1) and the register of third-party services (A11) over real HTTP:
//! entries written at the hook points (logins, failed logins, devices, connections,
//! memberships, admin actions, federation contacts) with truncated addresses and user agents;
//! the admin query with filters, pagination and JSON-lines/CSV exports; Synapse's admin
//! endpoints with their bodies; the destinations register across two servers; retention.

use hafen::policy::audit::AuditEntry;
use reqwest::{Method, StatusCode};
use ruma::ServerName;
use serde_json::{json, Value};

use crate::common::{assert_err, enc, free_port, TestServer, TestUser};

const UA: &str = "AuditTest/1.0 (hafen tests)";

/// A user who is a server admin.
async fn make_admin(server: &TestServer) -> TestUser {
    let u = server.user("admin").await;
    let id = ruma::UserId::parse(u.user_id.as_str()).expect("user id");
    server
        .services()
        .accounts
        .set_admin(&id, true)
        .expect("make admin");
    u
}

/// A request with a user agent; status and JSON body.
async fn send_ua(
    server: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    ua: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = server
        .http
        .request(method, format!("{}{}", server.base, path))
        .header("User-Agent", ua);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let res = r.send().await.expect("request sent");
    let status = res.status();
    let text = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `GET /_hafen/admin/v1/audit?<query>` as `who`: the entries (asserting 200).
async fn audit(server: &TestServer, who: &TestUser, query: &str) -> Value {
    let (status, body) = server
        .get(&format!("/_hafen/admin/v1/audit?{query}"), who)
        .await;
    assert_eq!(status, StatusCode::OK, "audit query: {body}");
    body
}

fn kinds(body: &Value) -> Vec<String> {
    body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_owned())
        .collect()
}

fn login_body(user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    })
}

#[tokio::test]
async fn logins_failures_devices_and_connections_are_audited() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;

    // A login over HTTP: a new device and a login, from 127.0.0.1 with our user agent.
    let (status, session) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login_body("alice", "password")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    let device = session["device_id"].as_str().expect("device").to_owned();
    let token = session["access_token"].as_str().expect("token").to_owned();

    // Failed logins: a wrong password and an unknown user.
    let wrong = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login_body("alice", "Wr0ng-Secret")),
    )
    .await;
    assert_err(&wrong, 403, "M_FORBIDDEN");
    let unknown = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login_body("@nobody:localhost", "Wr0ng-Secret")),
    )
    .await;
    assert_err(&unknown, 403, "M_FORBIDDEN");

    // Connections: the first request and a change of user agent are written, repeats are not.
    for ua in ["Client/1", "Client/1", "Client/1", "Client/2"] {
        let (status, _) = send_ua(
            &server,
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&token),
            ua,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Log the device out: a logout and the device's deletion.
    let (status, _) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/logout",
        Some(&token),
        UA,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let mine = audit(
        &server,
        &admin,
        &format!("user={}&device={device}", enc(&alice.user_id)),
    )
    .await;
    assert_eq!(
        kinds(&mine),
        [
            "device_created",
            "login",
            "connection",
            "connection",
            "connection",
            "logout",
            "device_deleted"
        ],
        "{mine}"
    );
    for e in mine["entries"].as_array().expect("entries") {
        assert_eq!(e["user"], json!(alice.user_id));
        assert_eq!(e["device"], json!(device));
        assert_eq!(e["ip"], json!("127.0.0.0/24"), "{e}");
        assert!(e["ts"].as_u64().expect("ts") > 0);
    }
    let entries = &mine["entries"];
    assert_eq!(entries[0]["user_agent"], json!(UA));
    assert_eq!(entries[1]["user_agent"], json!(UA));
    assert_eq!(entries[2]["user_agent"], json!("Client/1"));
    assert_eq!(entries[3]["user_agent"], json!("Client/2"));
    // The logout request came with another user agent: a connection entry first.
    assert_eq!(entries[4]["user_agent"], json!(UA));
    assert_eq!(entries[6]["user_agent"], json!(UA));

    let failed = audit(&server, &admin, "kind=login_failed").await;
    let failed = failed["entries"].as_array().expect("entries").clone();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0]["user"], json!("@alice:localhost"));
    assert_eq!(failed[0]["detail"]["reason"], json!("wrong_password"));
    assert_eq!(failed[1]["user"], json!("@nobody:localhost"));
    assert_eq!(failed[1]["detail"]["reason"], json!("unknown_user"));
    for e in &failed {
        assert_eq!(e["ip"], json!("127.0.0.0/24"));
        assert_eq!(e["user_agent"], json!(UA));
        assert!(e.get("device").is_none());
    }

    // Secrets never reach the log.
    let everything = audit(&server, &admin, "limit=1000").await.to_string();
    assert!(!everything.contains("Wr0ng-Secret"));
    assert!(!everything.contains(&token));
    assert!(!everything.contains(&alice.token));
}

#[tokio::test]
async fn memberships_and_admin_actions_are_audited() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = server.create_room(&alice, json!({})).await;
    server.invite_and_join(&alice, &bob, &room).await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let body = audit(&server, &admin, &format!("room={}", enc(&room))).await;
    let entries = body["entries"].as_array().expect("entries");
    let got: Vec<(Value, Value, Value, Value)> = entries
        .iter()
        .map(|e| {
            (
                e["kind"].clone(),
                e["user"].clone(),
                e["detail"]["membership"].clone(),
                e["detail"]["action"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                json!("membership"),
                json!(alice.user_id),
                json!("join"),
                json!("create")
            ),
            (
                json!("membership"),
                json!(bob.user_id),
                json!("invite"),
                Value::Null
            ),
            (
                json!("membership"),
                json!(bob.user_id),
                json!("join"),
                Value::Null
            ),
            (
                json!("membership"),
                json!(bob.user_id),
                json!("leave"),
                json!("kick")
            ),
        ],
        "{body}"
    );
    assert!(entries[0]["detail"].get("sender").is_none());
    assert_eq!(entries[1]["detail"]["sender"], json!(alice.user_id));
    assert_eq!(entries[3]["detail"]["sender"], json!(alice.user_id));
    assert_eq!(entries[2]["ip"], json!("127.0.0.0/24"));

    // A non-admin is refused, and the attempt is on record; no token at all is 401.
    let denied = server.get("/_synapse/admin/v2/users", &bob).await;
    assert_err(&denied, 403, "M_FORBIDDEN");
    let denied = server.get("/_hafen/admin/v1/audit", &bob).await;
    assert_err(&denied, 403, "M_FORBIDDEN");
    let anonymous = server
        .req(Method::GET, "/_hafen/admin/v1/audit", None, None)
        .await;
    assert_err(&anonymous, 401, "M_MISSING_TOKEN");
    let actions = audit(&server, &admin, "kind=admin_action").await;
    let actions: Vec<(Value, Value, Value)> = actions["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["user"].clone(),
                e["detail"]["endpoint"].clone(),
                e["detail"]["allowed"].clone(),
            )
        })
        .collect();
    let audit_query = json!("GET /_hafen/admin/v1/audit");
    assert_eq!(
        actions,
        [
            // The admin's room query above, bob's two attempts, this query itself.
            (json!(admin.user_id), audit_query.clone(), json!(true)),
            (
                json!(bob.user_id),
                json!("GET /_synapse/admin/v2/users"),
                json!(false)
            ),
            (json!(bob.user_id), audit_query.clone(), json!(false)),
            (json!(admin.user_id), audit_query, json!(true)),
        ]
    );
}

/// Entries with chosen times, recorded directly.
fn seed(server: &TestServer) {
    let audit = &server.services().audit;
    for i in 0..10u64 {
        audit
            .record(AuditEntry {
                ts: 1_000 + i,
                kind: if i % 2 == 0 { "login" } else { "logout" }.into(),
                user: Some(
                    if i < 5 {
                        "@u1:localhost"
                    } else {
                        "@u2:localhost"
                    }
                    .into(),
                ),
                device: Some(format!("D{i}")),
                ip: Some("192.0.2.0/24".into()),
                user_agent: Some(if i == 3 {
                    "=HYPERLINK(\"x\"), evil".into()
                } else {
                    "Agent".into()
                }),
                room: (i == 7).then(|| "!r:localhost".into()),
                detail: json!({ "n": i }),
            })
            .expect("record");
    }
}

fn ns(body: &Value) -> Vec<u64> {
    body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["detail"]["n"].as_u64().expect("n"))
        .collect()
}

#[tokio::test]
async fn audit_query_filters_pages_and_exports() {
    // Entries from 1970 would be past any retention period.
    let server = TestServer::start_with(|c| c.audit_retention_days = 0).await;
    let admin = make_admin(&server).await;
    seed(&server);
    let range = "from=1000&to=2000";

    assert_eq!(
        ns(&audit(&server, &admin, range).await),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(
        ns(&audit(&server, &admin, "from=1003&to=1006").await),
        [3, 4, 5]
    );
    assert_eq!(
        ns(&audit(&server, &admin, &format!("{range}&kind=logout")).await),
        [1, 3, 5, 7, 9]
    );
    assert_eq!(
        ns(&audit(&server, &admin, "user=%40u2%3Alocalhost&from=1000&to=1008").await),
        [5, 6, 7]
    );
    assert_eq!(
        ns(&audit(&server, &admin, "user=%40u1%3Alocalhost&kind=login&to=2000").await),
        [0, 2, 4]
    );
    assert_eq!(ns(&audit(&server, &admin, "device=D8&to=2000").await), [8]);
    assert_eq!(
        ns(&audit(&server, &admin, "room=%21r%3Alocalhost").await),
        [7]
    );

    // Pages of 4 chained by `next`; the last page has none.
    let mut seen = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..5 {
        let q = match &since {
            Some(t) => format!("{range}&limit=4&since={t}"),
            None => format!("{range}&limit=4"),
        };
        let page = audit(&server, &admin, &q).await;
        seen.extend(ns(&page));
        match page["next"].as_str() {
            Some(t) => since = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // Per user too (the index).
    let first = audit(&server, &admin, "user=%40u1%3Alocalhost&limit=2&to=2000").await;
    assert_eq!(ns(&first), [0, 1]);
    let next = first["next"].as_str().expect("next");
    let rest = audit(
        &server,
        &admin,
        &format!("user=%40u1%3Alocalhost&limit=10&to=2000&since={next}"),
    )
    .await;
    assert_eq!(ns(&rest), [2, 3, 4]);
    assert!(rest.get("next").is_none(), "{rest}");

    let bad = server
        .get("/_hafen/admin/v1/audit?since=nothex", &admin)
        .await;
    assert_err(&bad, 400, "M_INVALID_PARAM");
    let bad = server
        .get("/_hafen/admin/v1/audit?format=xml", &admin)
        .await;
    assert_err(&bad, 400, "M_INVALID_PARAM");

    // JSON lines.
    let res = server
        .http
        .get(format!(
            "{}/_hafen/admin/v1/audit?{range}&kind=login&format=jsonl",
            server.base
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let text = res.text().await.expect("body");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["kind"], json!("login"));
    assert_eq!(lines[0]["ts"], json!(1000));
    assert_eq!(lines[0]["user"], json!("@u1:localhost"));
    assert_eq!(lines[4]["detail"], json!({ "n": 8 }));

    // CSV with quoting and formula protection.
    let res = server
        .http
        .get(format!(
            "{}/_hafen/admin/v1/audit?from=1002&to=1004&format=csv",
            server.base
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        res.text().await.expect("body"),
        "ts,kind,user,device,ip,user_agent,room,detail\r\n\
         1002,login,@u1:localhost,D2,192.0.2.0/24,Agent,,\"{\"\"n\"\":2}\"\r\n\
         1003,logout,@u1:localhost,D3,192.0.2.0/24,\"'=HYPERLINK(\"\"x\"\"), evil\",,\"{\"\"n\"\":3}\"\r\n"
    );
    // An export cut by `limit` says where to go on.
    let res = server
        .http
        .get(format!(
            "{}/_hafen/admin/v1/audit?{range}&format=csv&limit=3",
            server.base
        ))
        .bearer_auth(&admin.token)
        .send()
        .await
        .expect("sent");
    let next = res.headers()["x-hafen-next"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(res.text().await.expect("body").lines().count(), 4);
    assert_eq!(
        ns(&audit(&server, &admin, &format!("{range}&since={next}&limit=2")).await),
        [3, 4]
    );
}

#[tokio::test]
async fn retention_deletes_old_entries_and_their_index_rows() {
    let server = TestServer::start_with(|c| c.audit_retention_days = 30).await;
    let admin = make_admin(&server).await;
    let s = server.services();
    let day = 86_400_000u64;
    let now = hafen::utils::now_ms();
    for (i, age) in [40u64, 31, 29, 1].iter().enumerate() {
        s.audit
            .record(AuditEntry {
                ts: now - age * day,
                kind: "login".into(),
                user: Some("@old:localhost".into()),
                detail: json!({ "n": i }),
                ..Default::default()
            })
            .expect("record");
    }
    assert_eq!(s.audit.run_retention().expect("retention"), 2);
    assert_eq!(
        ns(&audit(&server, &admin, "user=%40old%3Alocalhost").await),
        [2, 3]
    );
    assert_eq!(ns(&audit(&server, &admin, "kind=login").await), [2, 3]);
    let mut prefix = b"@old:localhost".to_vec();
    prefix.push(0xff);
    let index_rows = s
        .storage
        .scan_prefix(hafen::storage::Table::AuditByUser, &prefix)
        .expect("scan")
        .count();
    assert_eq!(index_rows, 2);
    // Nothing more to delete.
    assert_eq!(s.audit.run_retention().expect("retention"), 0);

    // 0 keeps everything.
    let keep = TestServer::start_with(|c| c.audit_retention_days = 0).await;
    keep.services()
        .audit
        .record(AuditEntry {
            ts: 5,
            kind: "login".into(),
            ..Default::default()
        })
        .expect("record");
    assert_eq!(keep.services().audit.run_retention().expect("retention"), 0);
    let keep_admin = make_admin(&keep).await;
    assert_eq!(kinds(&audit(&keep, &keep_admin, "to=10").await), ["login"]);
}

#[tokio::test]
async fn synapse_user_and_device_endpoints() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let alice_id = ruma::UserId::parse(alice.user_id.as_str()).expect("id");
    server
        .services()
        .profiles
        .set(&alice_id, "displayname", Some(&json!("Alice")))
        .expect("display name");

    // Users, paged.
    let (status, page) = server.get("/_synapse/admin/v2/users?limit=2", &admin).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["total"], json!(3));
    assert_eq!(page["next_token"], json!("2"));
    let names: Vec<&str> = page["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["@admin:localhost", "@alice:localhost"]);
    assert_eq!(page["users"][0]["admin"], json!(true));
    assert_eq!(page["users"][1]["admin"], json!(false));
    assert_eq!(page["users"][1]["is_guest"], json!(false));
    assert_eq!(page["users"][1]["deactivated"], json!(false));
    assert_eq!(page["users"][1]["displayname"], json!("Alice"));
    assert_eq!(page["users"][0]["displayname"], Value::Null);
    let (_, rest) = server
        .get("/_synapse/admin/v2/users?from=2&limit=2", &admin)
        .await;
    assert_eq!(rest["users"][0]["name"], json!("@bob:localhost"));
    assert_eq!(rest["users"].as_array().expect("users").len(), 1);
    assert!(rest.get("next_token").is_none(), "{rest}");
    assert_eq!(rest["total"], json!(3));

    // One user.
    let (status, info) = server
        .get(
            &format!("/_synapse/admin/v2/users/{}", enc(&alice.user_id)),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["name"], json!(alice.user_id));
    assert_eq!(info["displayname"], json!("Alice"));
    assert_eq!(info["threepids"], json!([]));
    assert_eq!(info["admin"], json!(false));
    assert_eq!(info["deactivated"], json!(false));
    assert_eq!(info["locked"], json!(false));
    assert!(info["creation_ts"].as_u64().expect("creation_ts") > 0);
    let missing = server
        .get("/_synapse/admin/v2/users/%40ghost%3Alocalhost", &admin)
        .await;
    assert_err(&missing, 404, "M_NOT_FOUND");

    // Devices with their last connection (kept current in memory).
    let (status, _) = send_ua(
        &server,
        Method::GET,
        "/_matrix/client/v3/account/whoami",
        Some(&alice.token),
        "Element/1.11",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let devices_path = format!("/_synapse/admin/v2/users/{}/devices", enc(&alice.user_id));
    let (status, devices) = server.get(&devices_path, &admin).await;
    assert_eq!(status, StatusCode::OK, "{devices}");
    assert_eq!(devices["total"], json!(1));
    let d = &devices["devices"][0];
    assert_eq!(d["device_id"], json!(alice.device_id));
    assert_eq!(d["user_id"], json!(alice.user_id));
    assert_eq!(d["last_seen_ip"], json!("127.0.0.0/24"));
    assert_eq!(d["last_seen_user_agent"], json!("Element/1.11"));
    assert!(d["last_seen_ts"].as_u64().expect("ts") > 0);

    // whois.
    let (status, whois) = server
        .get(
            &format!("/_synapse/admin/v1/whois/{}", enc(&alice.user_id)),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{whois}");
    assert_eq!(whois["user_id"], json!(alice.user_id));
    // Synapse's shape: every connection in one session under the device key "".
    assert_eq!(
        whois["devices"].as_object().expect("devices").len(),
        1,
        "{whois}"
    );
    let conn = &whois["devices"][""]["sessions"][0]["connections"][0];
    assert_eq!(conn["ip"], json!("127.0.0.0/24"));
    assert_eq!(conn["user_agent"], json!("Element/1.11"));
    assert!(conn["last_seen"].as_u64().expect("last_seen") > 0);

    // Delete one device: its token stops working.
    let (status, body) = server
        .req(
            Method::DELETE,
            &format!("{devices_path}/{}", alice.device_id),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let gone = server
        .get("/_matrix/client/v3/account/whoami", &alice)
        .await;
    assert_err(&gone, 401, "M_UNKNOWN_TOKEN");
    let (_, devices) = server.get(&devices_path, &admin).await;
    assert_eq!(devices, json!({ "total": 0, "devices": [] }));

    // Delete several.
    let (status, body) = server
        .post(
            &format!(
                "/_synapse/admin/v2/users/{}/delete_devices",
                enc(&bob.user_id)
            ),
            &admin,
            json!({ "devices": [bob.device_id, "NOSUCHDEVICE"] }),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert_err(
        &server.get("/_matrix/client/v3/account/whoami", &bob).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let bad = server
        .post(
            &format!(
                "/_synapse/admin/v2/users/{}/delete_devices",
                enc(&bob.user_id)
            ),
            &admin,
            json!({ "devices": "all" }),
        )
        .await;
    assert_err(&bad, 400, "M_BAD_JSON");

    // The deletions are on record as admin actions and device deletions.
    let body = audit(
        &server,
        &admin,
        &format!("user={}&kind=device_deleted", enc(&alice.user_id)),
    )
    .await;
    assert_eq!(body["entries"][0]["device"], json!(alice.device_id));
    let actions = audit(&server, &admin, "kind=admin_action").await;
    assert!(actions["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["detail"]["endpoint"]
            == json!("DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}")
            && e["detail"]["target"] == json!(format!("{} {}", alice.user_id, alice.device_id))));
}

#[tokio::test]
async fn synapse_registration_token_endpoints() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let carol = server.user("carol").await;
    let base = "/_synapse/admin/v1/registration_tokens";

    let (status, made) = server
        .post(&format!("{base}/new"), &admin, json!({ "uses_allowed": 3 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    let generated = made["token"].as_str().expect("token").to_owned();
    assert_eq!(generated.len(), 16);
    assert_eq!(
        made,
        json!({ "token": generated, "uses_allowed": 3, "pending": 0, "completed": 0, "expiry_time": null })
    );
    let (status, named) = server
        .post(
            &format!("{base}/new"),
            &admin,
            json!({ "token": "abcd", "expiry_time": 4_000_000_000_000u64 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{named}");
    assert_eq!(
        named,
        json!({ "token": "abcd", "uses_allowed": null, "pending": 0, "completed": 0, "expiry_time": 4_000_000_000_000u64 })
    );
    assert_err(
        &server
            .post(&format!("{base}/new"), &admin, json!({ "token": "abcd" }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &server
            .post(
                &format!("{base}/new"),
                &admin,
                json!({ "uses_allowed": -1 }),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &server
            .post(&format!("{base}/new"), &admin, json!({ "length": 65 }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let (status, short) = server
        .post(&format!("{base}/new"), &admin, json!({ "length": 5 }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(short["token"].as_str().expect("token").len(), 5);

    let (status, list) = server.get(base, &admin).await;
    assert_eq!(status, StatusCode::OK);
    let mut tokens: Vec<&str> = list["registration_tokens"]
        .as_array()
        .expect("list")
        .iter()
        .map(|t| t["token"].as_str().expect("token"))
        .collect();
    tokens.sort_unstable();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.contains(&"abcd") && tokens.contains(&generated.as_str()));

    let (status, one) = server.get(&format!("{base}/abcd"), &admin).await;
    assert_eq!((status, one), (StatusCode::OK, named.clone()));
    let (status, changed) = server
        .put(
            &format!("{base}/abcd"),
            &admin,
            json!({ "uses_allowed": 0, "expiry_time": null }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        changed,
        json!({ "token": "abcd", "uses_allowed": 0, "pending": 0, "completed": 0, "expiry_time": null })
    );
    // Used up: listed as invalid.
    let (_, invalid) = server.get(&format!("{base}?valid=false"), &admin).await;
    assert_eq!(invalid["registration_tokens"], json!([changed]));
    let (_, valid) = server.get(&format!("{base}?valid=true"), &admin).await;
    assert_eq!(
        valid["registration_tokens"].as_array().expect("list").len(),
        2
    );

    let (status, body) = server
        .req(
            Method::DELETE,
            &format!("{base}/abcd"),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert_err(
        &server.get(&format!("{base}/abcd"), &admin).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &server
            .req(
                Method::DELETE,
                &format!("{base}/abcd"),
                Some(&admin.token),
                None,
            )
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(&server.get(base, &carol).await, 403, "M_FORBIDDEN");
    assert_err(
        &server.post(&format!("{base}/new"), &carol, json!({})).await,
        403,
        "M_FORBIDDEN",
    );

    // The tokens themselves (secrets) are not in the audit log.
    let all = audit(&server, &admin, "limit=1000").await.to_string();
    assert!(!all.contains(&generated));
    assert!(all.contains("POST /_synapse/admin/v1/registration_tokens/new"));
}

#[tokio::test]
async fn destinations_register_records_federation_contacts() {
    let (pa, pb) = (free_port(), free_port());
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test".try_into().expect("name");
        c.port = pa;
        c.federation_destinations
            .insert("b.test".into(), format!("http://127.0.0.1:{pb}"));
    })
    .await;
    let b = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "b.test".try_into().expect("name");
        c.port = pb;
        c.federation_destinations
            .insert("a.test".into(), format!("http://127.0.0.1:{pa}"));
    })
    .await;
    let a_admin = make_admin(&a).await;
    let b_admin = make_admin(&b).await;
    let before = hafen::utils::now_ms();
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    for _ in 0..2 {
        a.services()
            .federation
            .send(Method::GET, b_name, "/_matrix/federation/v1/version", None)
            .await
            .expect("B answers");
    }
    // A signed request: B fetches A's keys from A.
    a.services()
        .federation
        .send(
            Method::GET,
            b_name,
            "/_matrix/federation/v1/query/profile?user_id=%40admin%3Ab.test",
            None,
        )
        .await
        .expect("B answers");

    let (status, reg) = a.get("/_hafen/admin/v1/destinations", &a_admin).await;
    assert_eq!(status, StatusCode::OK, "{reg}");
    assert_eq!(reg["total"], json!(1));
    let d = &reg["destinations"][0];
    assert_eq!(d["kind"], json!("federation"));
    assert_eq!(d["destination"], json!("b.test"));
    assert_eq!(d["count"], json!(3));
    let first = d["first_contact_ts"].as_u64().expect("first");
    let last = d["last_contact_ts"].as_u64().expect("last");
    assert!(before <= first && first <= last, "{reg}");

    let (status, reg) = b.get("/_hafen/admin/v1/destinations", &b_admin).await;
    assert_eq!(status, StatusCode::OK, "{reg}");
    let names: Vec<(Value, Value)> = reg["destinations"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| (d["kind"].clone(), d["destination"].clone()))
        .collect();
    assert_eq!(names, [(json!("federation"), json!("a.test"))], "{reg}");

    // The first contact of the day is in the audit log, once.
    let contacts = audit(&a, &a_admin, "kind=federation_contact").await;
    let contacts = contacts["entries"].as_array().expect("entries");
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["detail"]["server"], json!("b.test"));

    // Counts survive a restart (flushed at shutdown) and add up.
    let mut a = a;
    a.restart().await;
    a.services()
        .federation
        .send(Method::GET, b_name, "/_matrix/federation/v1/version", None)
        .await
        .expect("B answers");
    let (_, reg) = a.get("/_hafen/admin/v1/destinations", &a_admin).await;
    assert_eq!(reg["destinations"][0]["count"], json!(4), "{reg}");
    assert_eq!(reg["destinations"][0]["first_contact_ts"], json!(first));
    assert_err(
        &a.req(Method::GET, "/_hafen/admin/v1/destinations", None, None)
            .await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test]
async fn memberships_across_servers_are_audited_on_both_sides() {
    use crate::common::{start_federating, TestPki};
    use crate::federation_rooms::{invite, join_via, leave};
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let a_admin = make_admin(&a).await;
    let b_admin = make_admin(&b).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, body) = invite(&a, &alice, &room, &bob.user_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = join_via(&b, &bob, &room, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = leave(&b, &bob, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let membership = |body: &Value| -> Vec<(Value, Value, Value)> {
        body["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["user"].clone(),
                    e["detail"]["membership"].clone(),
                    e["detail"]["sender"].clone(),
                )
            })
            .collect()
    };
    // A: its user created the room and invited B's user (sent over federation).
    let on_a = audit(
        &a,
        &a_admin,
        &format!("room={}&kind=membership", enc(&room)),
    )
    .await;
    assert_eq!(
        membership(&on_a),
        [
            (json!(alice.user_id), json!("join"), Value::Null),
            (json!(bob.user_id), json!("invite"), json!(alice.user_id)),
        ],
        "{on_a}"
    );
    // B: its user was invited from A, joined through A and left.
    let on_b = audit(
        &b,
        &b_admin,
        &format!("user={}&kind=membership", enc(&bob.user_id)),
    )
    .await;
    assert_eq!(
        membership(&on_b),
        [
            (json!(bob.user_id), json!("invite"), json!(alice.user_id)),
            (json!(bob.user_id), json!("join"), Value::Null),
            (json!(bob.user_id), json!("leave"), Value::Null),
        ],
        "{on_b}"
    );
    for e in on_b["entries"].as_array().expect("entries") {
        assert_eq!(e["room"], json!(room));
    }
}

/// A push gateway on loopback that accepts everything and counts the requests.
async fn counting_gateway(hits: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> (String, u16) {
    use axum::{routing::post, Json, Router};
    let app = Router::new().route(
        "/_matrix/push/v1/notify",
        post(move |Json(_): Json<Value>| async move {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Json(json!({ "rejected": [] }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        format!("http://127.0.0.1:{port}/_matrix/push/v1/notify"),
        port,
    )
}

#[tokio::test]
async fn destinations_register_records_push_gateways() {
    use std::sync::{atomic::Ordering, Arc};
    let server = TestServer::start_with(|c| {
        c.push_gateway_ip_range_allowlist = vec!["127.0.0.0/8".into()];
    })
    .await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    server.join(&bob, &room).await;
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (url, port) = counting_gateway(hits.clone()).await;
    let (status, body) = server
        .post(
            "/_matrix/client/v3/pushers/set",
            &alice,
            json!({
                "kind": "http", "app_id": "org.example.app", "pushkey": "phone",
                "app_display_name": "Example", "device_display_name": "Phone",
                "lang": "en", "data": { "url": url },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
                enc(&room)
            ),
            &bob,
            json!({ "msgtype": "m.text", "body": "ping" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let start = std::time::Instant::now();
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no push"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (status, reg) = server.get("/_hafen/admin/v1/destinations", &admin).await;
    assert_eq!(status, StatusCode::OK, "{reg}");
    assert_eq!(reg["total"], json!(1), "{reg}");
    let d = &reg["destinations"][0];
    assert_eq!(d["kind"], json!("push_gateway"));
    assert_eq!(d["destination"], json!(format!("127.0.0.1:{port}")));
    assert_eq!(d["count"], json!(hits.load(Ordering::SeqCst)));
    assert!(d["first_contact_ts"].as_u64().expect("first") > 0);
}

/// `GET /_synapse/admin/v2/users?<query>` as the admin: the names in order, and the body.
async fn user_names(server: &TestServer, admin: &TestUser, query: &str) -> (Vec<String>, Value) {
    let (status, page) = server
        .get(&format!("/_synapse/admin/v2/users?{query}"), admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {page}");
    let names = page["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["name"].as_str().expect("name").to_owned())
        .collect();
    (names, page)
}

#[tokio::test]
async fn synapse_user_list_filters_and_order() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let s = server.services();
    let _alice = server.user("alice").await;
    let _bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let alice_id = ruma::UserId::parse("@alice:localhost").expect("id");
    s.profiles
        .set(&alice_id, "displayname", Some(&json!("Wonderland Queen")))
        .expect("display name");
    let guest = ruma::UserId::parse("@guest1:localhost").expect("id");
    s.accounts
        .create_user(&guest, None, false, true)
        .expect("guest");
    let carol_id = ruma::UserId::parse(carol.user_id.as_str()).expect("id");
    s.accounts.deactivate(&carol_id).expect("deactivate");

    // Default: by user id, guests in, deactivated users out.
    let (names, page) = user_names(&server, &admin, "").await;
    assert_eq!(
        names,
        [
            "@admin:localhost",
            "@alice:localhost",
            "@bob:localhost",
            "@guest1:localhost"
        ]
    );
    assert_eq!(page["total"], json!(4));
    let (names, _) = user_names(&server, &admin, "deactivated=true&guests=false").await;
    assert_eq!(
        names,
        [
            "@admin:localhost",
            "@alice:localhost",
            "@bob:localhost",
            "@carol:localhost"
        ]
    );
    // name: a substring of the user id or of the display name (any case).
    let (names, _) = user_names(&server, &admin, "name=wonder").await;
    assert_eq!(names, ["@alice:localhost"]);
    let (names, _) = user_names(&server, &admin, "name=BO").await;
    assert_eq!(names, ["@bob:localhost"]);
    // user_id: a substring of the user id only; ignored when name is given.
    let (names, _) = user_names(&server, &admin, "user_id=wonder").await;
    assert!(names.is_empty(), "{names:?}");
    let (names, page) = user_names(&server, &admin, "user_id=%40a").await;
    assert_eq!(names, ["@admin:localhost", "@alice:localhost"]);
    assert_eq!(page["total"], json!(2));
    let (names, _) = user_names(&server, &admin, "user_id=bob&name=guest").await;
    assert_eq!(names, ["@guest1:localhost"]);
    // admins: only admins, or none.
    let (names, _) = user_names(&server, &admin, "admins=true").await;
    assert_eq!(names, ["@admin:localhost"]);
    let (names, _) = user_names(&server, &admin, "admins=false&guests=false").await;
    assert_eq!(names, ["@alice:localhost", "@bob:localhost"]);
    // order_by and dir.
    let (names, _) = user_names(&server, &admin, "dir=b").await;
    assert_eq!(
        names,
        [
            "@guest1:localhost",
            "@bob:localhost",
            "@alice:localhost",
            "@admin:localhost"
        ]
    );
    for (name, ts) in [
        ("@bob:localhost", 3000u64),
        ("@admin:localhost", 2000),
        ("@alice:localhost", 1000),
        ("@guest1:localhost", 4000),
    ] {
        let id = ruma::UserId::parse(name).expect("id");
        let mut rec = s.accounts.user(&id).expect("read").expect("user");
        rec.created_ms = ts;
        s.storage
            .put(
                hafen::storage::Table::Users,
                id.localpart().as_bytes(),
                &serde_json::to_vec(&rec).expect("json"),
            )
            .expect("store");
    }
    let (names, page) = user_names(&server, &admin, "order_by=creation_ts").await;
    assert_eq!(
        names,
        [
            "@alice:localhost",
            "@admin:localhost",
            "@bob:localhost",
            "@guest1:localhost"
        ]
    );
    assert_eq!(page["users"][0]["creation_ts"], json!(1000));
    let (names, page) = user_names(&server, &admin, "order_by=creation_ts&dir=b&limit=3").await;
    assert_eq!(
        names,
        ["@guest1:localhost", "@bob:localhost", "@admin:localhost"]
    );
    assert_eq!(page["next_token"], json!("3"));
    let (names, _) = user_names(&server, &admin, "order_by=creation_ts&dir=b&from=3").await;
    assert_eq!(names, ["@alice:localhost"]);
    // Bad values.
    for q in ["order_by=password", "dir=x", "admins=maybe"] {
        let got = server
            .get(&format!("/_synapse/admin/v2/users?{q}"), &admin)
            .await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    // Not an admin.
    let bob = server.user("bob2").await;
    let got = server.get("/_synapse/admin/v2/users?name=a", &bob).await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn device_limit_refuses_logins_beyond_it() {
    let server = TestServer::start_with(|c| c.max_devices_per_user = 2).await;
    let admin = make_admin(&server).await;
    let _alice = server.user("alice").await; // one device
    let login = |device: Option<&str>| {
        let mut b = login_body("alice", "password");
        if let Some(d) = device {
            b["device_id"] = json!(d);
        }
        b
    };
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login(Some("SECOND"))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A third device: refused, naming the policy.
    let got = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login(None)),
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let msg = got.1["error"].as_str().expect("error");
    assert!(msg.contains("max_devices_per_user"), "{msg}");
    let got = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login(Some("THIRD"))),
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Logging in again on a device the user has is allowed.
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login(Some("SECOND"))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_id"], json!("SECOND"));
    // After logging a device out there is room again.
    let token = body["access_token"].as_str().expect("token").to_owned();
    let (status, _) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/logout",
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        UA,
        Some(login(Some("THIRD"))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The denials are audited.
    let entries = audit(
        &server,
        &admin,
        "kind=policy_denied&user=%40alice%3Alocalhost",
    )
    .await;
    let list = entries["entries"].as_array().expect("entries");
    assert_eq!(list.len(), 2, "{entries}");
    for e in list {
        assert_eq!(e["detail"]["policy"], json!("max_devices_per_user"));
        assert_eq!(e["detail"]["action"], json!("login"));
    }
    // The compliance report names the limit under C1.
    let (status, body) = server
        .get("/_hafen/admin/v1/compliance_report", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let c1 = body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["id"] == "C1")
        .expect("C1")
        .clone();
    assert!(
        c1["findings"]
            .to_string()
            .contains("at most 2 devices per user"),
        "{c1}"
    );
}
#[tokio::test]
async fn blocked_user_agents_are_refused_and_audited_once() {
    let server = TestServer::start_with(|c| {
        c.blocked_user_agents = vec!["OldClient/0.".to_owned(), "Legacy*/1.*".to_owned()]
    })
    .await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let whoami = "/_matrix/client/v3/account/whoami";
    let (status, body) = send_ua(
        &server,
        Method::GET,
        whoami,
        Some(&alice.token),
        "Element/1.11",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for ua in ["OldClient/0.9 (Linux)", "LegacyApp/1.2", "OldClient/0.1"] {
        let got = send_ua(&server, Method::GET, whoami, Some(&alice.token), ua, None).await;
        assert_err(&got, 403, "M_FORBIDDEN");
        let msg = got.1["error"].as_str().expect("error");
        assert!(msg.contains("blocked_user_agents"), "{msg}");
    }
    // A glob must match the whole agent; a newer version passes.
    for ua in ["MyLegacyApp/2.0", "OldClient/1.0"] {
        let (status, body) =
            send_ua(&server, Method::GET, whoami, Some(&alice.token), ua, None).await;
        assert_eq!(status, StatusCode::OK, "{ua}: {body}");
    }
    // Unauthenticated requests are not refused (login works, the client can say what to update).
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/login",
        None,
        "OldClient/0.9",
        Some(login_body("alice", "password")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A blocked client may still log out.
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/logout",
        Some(&alice.token),
        "OldClient/0.9",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Audited once for the device within the hour, whatever the number of refusals.
    let entries = audit(&server, &admin, "kind=policy_denied").await;
    let list = entries["entries"].as_array().expect("entries");
    assert_eq!(list.len(), 1, "{entries}");
    assert_eq!(list[0]["user"], json!(alice.user_id));
    assert_eq!(list[0]["detail"]["policy"], json!("blocked_user_agents"));
    assert_eq!(list[0]["detail"]["device"], json!(alice.device_id));
    assert_eq!(
        list[0]["detail"]["user_agent"],
        json!("OldClient/0.9 (Linux)")
    );
}

#[tokio::test]
async fn clients_below_a_minimum_version_are_refused() {
    use hafen::policy::client_version::MinVersion;
    let server = TestServer::start_with(|c| {
        c.min_user_agent_versions = vec![
            MinVersion {
                token: "Android".into(),
                version: "12".into(),
            },
            MinVersion {
                token: "Element".into(),
                version: "1.6.0".into(),
            },
        ]
    })
    .await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let whoami = "/_matrix/client/v3/account/whoami";
    for ua in [
        "Element/1.6.10 (Google Pixel 6; Android 13; TQ3A)",
        "Element/1.10.0 (Android 12.1)",
        "curl/8.5.0",
    ] {
        let (status, body) =
            send_ua(&server, Method::GET, whoami, Some(&alice.token), ua, None).await;
        assert_eq!(status, StatusCode::OK, "{ua}: {body}");
        assert_eq!(body["user_id"], json!(alice.user_id));
    }
    let got = send_ua(
        &server,
        Method::GET,
        whoami,
        Some(&alice.token),
        "Element/1.6.10 (Google Pixel 3; Android 11; RQ3A)",
        None,
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert_eq!(
        got.1["error"],
        json!("Denied by the min_user_agent_versions policy: Android 11 is older than 12, the oldest version this server accepts; please update")
    );
    let got = send_ua(
        &server,
        Method::GET,
        whoami,
        Some(&alice.token),
        "Element/1.5.2 (Android 14)",
        None,
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert!(got.1["error"]
        .as_str()
        .expect("error")
        .contains("Element 1.5.2 is older than 1.6.0"));
    // Still free to log out.
    let (status, body) = send_ua(
        &server,
        Method::POST,
        "/_matrix/client/v3/logout",
        Some(&alice.token),
        "Element/1.5.2 (Android 14)",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entries = audit(&server, &admin, "kind=policy_denied").await;
    let list = entries["entries"].as_array().expect("entries");
    assert_eq!(list.len(), 1, "audited once per device: {entries}");
    assert_eq!(
        list[0]["detail"]["policy"],
        json!("min_user_agent_versions")
    );
    assert_eq!(list[0]["detail"]["token"], json!("Android"));
    assert_eq!(list[0]["detail"]["device"], json!(alice.device_id));

    // A version that is not a number is a configuration error.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[global]\nserver_name = \"x.test\"\ndatabase_path = \"/tmp/x\"\nmin_user_agent_versions = [{ token = \"Android\", version = \"twelve\" }]\n",
    )
    .expect("write");
    let Err(err) = hafen::config::load(Some(&file), Vec::<(String, String)>::new()) else {
        panic!("a version that is not a number was accepted");
    };
    assert!(err.to_string().contains("min_user_agent_versions"), "{err}");
}

#[tokio::test]
async fn memberships_changed_by_another_servers_events_are_audited() {
    use crate::common::{start_federating, TestPki};
    use crate::federation_rooms::{invite, join_via};
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let b_admin = make_admin(&b).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let bea = b.user("bea").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    // Bea keeps B in the room, so that B sees what happens to Bob.
    for u in [&bea, &bob] {
        let (status, body) = join_via(&b, u, &room, &a).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let moderate = |what: &'static str| {
        let a = &a;
        let alice = &alice;
        let bob = &bob;
        let room = &room;
        async move {
            a.post(
                &format!("/_matrix/client/v3/rooms/{}/{what}", enc(room)),
                alice,
                json!({ "user_id": bob.user_id, "reason": "test" }),
            )
            .await
        }
    };
    let bob_entries = |want: usize| {
        let b = &b;
        let b_admin = &b_admin;
        let bob = &bob;
        async move {
            let q = format!("user={}&kind=membership", enc(&bob.user_id));
            let mut last = Value::Null;
            for _ in 0..100 {
                last = audit(b, b_admin, &q).await;
                if last["entries"].as_array().map_or(0, Vec::len) >= want {
                    return last;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("wanted {want} membership entries of bob on B: {last}");
        }
    };
    for (what, want) in [("kick", 2), ("ban", 3), ("unban", 4)] {
        let (status, body) = moderate(what).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        bob_entries(want).await;
    }
    // An invite goes through /invite (audited there) and then through /send: one entry.
    let (status, body) = invite(&a, &alice, &room, &bob.user_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    bob_entries(5).await;
    // A message after the invite: once it is on B, the invite's /send has been handled too.
    let (status, body) = a
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
                enc(&room)
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": "after" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut seen = false;
    for _ in 0..100 {
        let (_, msgs) = b
            .get(
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
                    enc(&room)
                ),
                &bea,
            )
            .await;
        if msgs.to_string().contains("\"after\"") {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen, "the message reached B");
    let got = bob_entries(5).await;
    let list: Vec<(Value, Value, Value)> = got["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            assert_eq!(e["user"], json!(bob.user_id));
            assert_eq!(e["room"], json!(room));
            (
                e["detail"]["membership"].clone(),
                e["detail"]["sender"].clone(),
                e["detail"]["action"].clone(),
            )
        })
        .collect();
    let alice_v = json!(alice.user_id);
    assert_eq!(
        list,
        [
            (json!("join"), Value::Null, Value::Null),
            (json!("leave"), alice_v.clone(), json!("kick")),
            (json!("ban"), alice_v.clone(), json!("ban")),
            (json!("leave"), alice_v.clone(), json!("unban")),
            (json!("invite"), alice_v.clone(), Value::Null),
        ],
        "{got}"
    );
    // Other servers' users' memberships are not audited on B.
    let all = audit(
        &b,
        &b_admin,
        &format!("room={}&kind=membership", enc(&room)),
    )
    .await;
    for e in all["entries"].as_array().expect("entries") {
        assert!(
            e["user"] == json!(bob.user_id) || e["user"] == json!(bea.user_id),
            "{all}"
        );
    }
}

/// A user agent longer than the audit log keeps is one connection, not a new entry (and a
/// device write) on every request.
#[tokio::test]
async fn a_long_user_agent_is_one_connection() {
    let server = TestServer::start().await;
    let admin = make_admin(&server).await;
    let alice = server.user("alice").await;
    let long_ua = format!("LongClient/1.0 ({})", "x".repeat(2000));
    for _ in 0..4 {
        let (status, body) = send_ua(
            &server,
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&alice.token),
            &long_ua,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["user_id"], json!(alice.user_id));
    }
    let entries = audit(
        &server,
        &admin,
        &format!(
            "kind=connection&user={}",
            crate::common::enc(&alice.user_id)
        ),
    )
    .await;
    let list = entries["entries"].as_array().expect("entries");
    assert_eq!(list.len(), 1, "{entries}");
    let kept = list[0]["user_agent"].as_str().expect("user agent");
    assert!(kept.starts_with("LongClient/1.0 (xxx"), "{kept}");
    assert!(kept.len() < long_ua.len());
}
