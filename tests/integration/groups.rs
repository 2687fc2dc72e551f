//! Closed user groups, rooms bound to a group, partner federation and the external policy hook
//! (docs/compliance.md), over real HTTP: on one server, across two Hafens federating over TLS
//! (a partner server by name in a group, a server outside the federation allowlist), and with
//! a policy service of the organization running on loopback.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    common::{assert_err, enc, start_federating, TestPki, TestServer, TestUser},
    federation_rooms::{invite, join_via},
};
use hafen::policy::groups::GroupConfig;

const V3: &str = "/_matrix/client/v3";

fn group(name: &str, users: &[String], servers: &[String]) -> GroupConfig {
    GroupConfig {
        name: name.into(),
        users: users.to_vec(),
        servers: servers.to_vec(),
        sso_groups: vec![],
    }
}

/// A 403 `M_FORBIDDEN` whose message names `policy`.
fn assert_denied(got: &(StatusCode, Value), policy: &str) {
    assert_err(got, 403, "M_FORBIDDEN");
    let msg = got.1["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("the {policy} policy")),
        "the message does not name {policy}: {}",
        got.1
    );
}

/// The `policy_denied` audit entries of `server`.
fn denials(server: &TestServer) -> Vec<Value> {
    let (entries, _) = server
        .services()
        .audit
        .query(0, u64::MAX, 1000, None, |e| e.kind == "policy_denied")
        .expect("audit query");
    entries
        .into_iter()
        .map(|e| serde_json::to_value(e).expect("json"))
        .collect()
}

fn has_denial(server: &TestServer, user: Option<&str>, policy: &str, action: &str) -> bool {
    denials(server).iter().any(|e| {
        e["detail"]["policy"] == policy
            && e["detail"]["action"] == action
            && user.is_none_or(|u| e["user"] == u)
    })
}

async fn search(server: &TestServer, user: &TestUser, term: &str) -> Vec<String> {
    let (status, body) = server
        .post(
            &format!("{V3}/user_directory/search"),
            user,
            json!({ "search_term": term, "limit": 50 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["user_id"].as_str().map(str::to_owned))
        .collect()
}

async fn create(server: &TestServer, user: &TestUser, body: Value) -> (StatusCode, Value) {
    server.post(&format!("{V3}/createRoom"), user, body).await
}

async fn join(server: &TestServer, user: &TestUser, room: &str) -> (StatusCode, Value) {
    server
        .post(&format!("{V3}/rooms/{}/join", enc(room)), user, json!({}))
        .await
}

async fn membership(server: &TestServer, user: &TestUser, room: &str, who: &str) -> Value {
    let (_, body) = server
        .get(
            &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(room), enc(who)),
            user,
        )
        .await;
    body["membership"].clone()
}

async fn wait_membership(server: &TestServer, user: &TestUser, room: &str, who: &str, m: &str) {
    for _ in 0..200 {
        if membership(server, user, room, who).await == json!(m) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{who} never became {m} in {room}");
}

#[tokio::test]
async fn groups_decide_invites_dms_directory_joins_and_bound_rooms() {
    let name = "localhost";
    let u = |l: &str| format!("@{l}:{name}");
    let s = TestServer::start_with(|c| {
        c.groups = vec![
            group("staff", &[u("alice"), u("anna")], &[]),
            group("other", &[u("eve")], &[]),
            group("friends", &[u("fred")], &[]),
        ];
        c.group_contact = vec![["staff".into(), "friends".into()]];
    })
    .await;
    let alice = s.user("alice").await;
    let anna = s.user("anna").await;
    let eve = s.user("eve").await;
    let fred = s.user("fred").await;
    let zed = s.user("zed").await;

    // Invites: within the group and to a contact group yes; across groups, or to a user in no
    // group, no.
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    assert_eq!(
        invite(&s, &alice, &room, &anna.user_id).await.0,
        StatusCode::OK
    );
    assert_eq!(
        invite(&s, &alice, &room, &fred.user_id).await.0,
        StatusCode::OK
    );
    let got = invite(&s, &alice, &room, &eve.user_id).await;
    assert_denied(&got, "closed_user_groups");
    assert_denied(
        &invite(&s, &alice, &room, &zed.user_id).await,
        "closed_user_groups",
    );
    assert_eq!(
        membership(&s, &alice, &room, &eve.user_id).await,
        Value::Null
    );

    // Joins: sharing a public room with users outside one's groups is refused.
    assert_eq!(join(&s, &anna, &room).await.0, StatusCode::OK);
    assert_denied(&join(&s, &eve, &room).await, "closed_user_groups");
    assert_eq!(join(&s, &fred, &room).await.0, StatusCode::OK);

    // DMs: createRoom with is_direct and an invite is refused as a whole (no room is made).
    let got = create(
        &s,
        &alice,
        json!({ "is_direct": true, "preset": "trusted_private_chat", "invite": [eve.user_id] }),
    )
    .await;
    assert_denied(&got, "closed_user_groups");
    let got = create(
        &s,
        &alice,
        json!({ "is_direct": true, "preset": "trusted_private_chat", "invite": [anna.user_id] }),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // The user directory shows only users one may contact (eve is in a public room of hers).
    let eves = s
        .create_room(&eve, json!({ "preset": "public_chat" }))
        .await;
    assert!(!eves.is_empty());
    let found = search(&s, &alice, name).await;
    assert!(found.contains(&anna.user_id), "{found:?}");
    assert!(found.contains(&fred.user_id), "{found:?}");
    assert!(!found.contains(&eve.user_id), "{found:?}");
    assert!(!search(&s, &eve, "alice").await.contains(&alice.user_id));

    // A room bound to the staff group: fred (a contact, but not staff) can be neither invited
    // nor join; anna can.
    let (status, body) = create(
        &s,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bound = body["room_id"].as_str().expect("room id").to_owned();
    assert_denied(
        &invite(&s, &alice, &bound, &fred.user_id).await,
        "room_group",
    );
    assert_denied(&join(&s, &fred, &bound).await, "room_group");
    assert_eq!(join(&s, &anna, &bound).await.0, StatusCode::OK);
    // An upgrade keeps the binding.
    let (status, body) = s
        .post(
            &format!("{V3}/rooms/{}/upgrade", enc(&bound)),
            &alice,
            json!({ "new_version": "11" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let upgraded = body["replacement_room"]
        .as_str()
        .expect("new room")
        .to_owned();
    let (status, create_event) = s
        .get(
            &format!("{V3}/rooms/{}/state/m.room.create/", enc(&upgraded)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{create_event}");
    assert_eq!(create_event["org.hafen.group"], json!("staff"));
    assert_denied(&join(&s, &fred, &upgraded).await, "room_group");
    // Nor knock on a knock room bound to the group.
    let (status, body) = create(
        &s,
        &alice,
        json!({
            "creation_content": { "org.hafen.group": "staff" },
            "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }],
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let knockable = body["room_id"].as_str().expect("room id").to_owned();
    let got = s
        .post(&format!("{V3}/knock/{}", enc(&knockable)), &fred, json!({}))
        .await;
    assert_denied(&got, "room_group");
    // Only a member may make such a room, and only for a group that exists.
    let got = create(
        &s,
        &fred,
        json!({ "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    assert_denied(&got, "room_group");
    let got = create(
        &s,
        &alice,
        json!({ "creation_content": { "org.hafen.group": "nope" } }),
    )
    .await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // Every denial is in the audit log with the policy and the action.
    assert!(has_denial(
        &s,
        Some(&alice.user_id),
        "closed_user_groups",
        "invite"
    ));
    assert!(has_denial(
        &s,
        Some(&eve.user_id),
        "closed_user_groups",
        "join"
    ));
    assert!(has_denial(&s, Some(&alice.user_id), "room_group", "invite"));
    assert!(has_denial(&s, Some(&fred.user_id), "room_group", "join"));
    assert!(has_denial(
        &s,
        Some(&fred.user_id),
        "room_group",
        "create_room"
    ));
    assert!(has_denial(&s, Some(&fred.user_id), "room_group", "knock"));
}

#[tokio::test]
async fn the_groups_admin_api() {
    let s = TestServer::start_with(|c| {
        c.groups = vec![group("staff", &["@alice:localhost".into()], &[])];
    })
    .await;
    let alice = s.user("alice").await;
    let zed = s.user("zed").await;
    let admin = s.user("admin").await;
    let admin_id = ruma::UserId::parse(&admin.user_id).expect("id");
    s.services()
        .accounts
        .set_admin(&admin_id, true)
        .expect("admin");
    let path = "/_hafen/admin/v1/groups";

    let got = s.get(path, &alice).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s.put(&format!("{path}/ops"), &alice, json!({})).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    let (status, body) = s.get(path, &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "groups": [{ "name": "staff", "users": ["@alice:localhost"], "servers": [], "source": "config" }] })
    );
    // Config groups are read-only.
    let got = s
        .put(
            &format!("{path}/staff/members/{}", enc(&zed.user_id)),
            &admin,
            json!({}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert!(got.1["error"]
        .as_str()
        .unwrap_or_default()
        .contains("config"));

    let room = s.create_room(&alice, json!({})).await;
    assert_denied(
        &invite(&s, &alice, &room, &zed.user_id).await,
        "closed_user_groups",
    );

    // A runtime group with alice and zed lets them meet.
    let got = s.put(&format!("{path}/ops"), &admin, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    for m in [&alice.user_id, &zed.user_id] {
        let got = s
            .put(&format!("{path}/ops/members/{}", enc(m)), &admin, json!({}))
            .await;
        assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    }
    let got = s
        .put(
            &format!("{path}/ops/members/partner.example"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let (_, body) = s.get(path, &admin).await;
    assert_eq!(
        body["groups"][1],
        json!({ "name": "ops", "users": [alice.user_id, zed.user_id], "servers": ["partner.example"], "source": "admin_api" })
    );
    assert_eq!(
        invite(&s, &alice, &room, &zed.user_id).await.0,
        StatusCode::OK
    );

    // Removing zed again: the next invite of him is refused.
    let got = s
        .req(
            Method::DELETE,
            &format!("{path}/ops/members/{}", enc(&zed.user_id)),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let room2 = s.create_room(&alice, json!({})).await;
    assert_denied(
        &invite(&s, &alice, &room2, &zed.user_id).await,
        "closed_user_groups",
    );
    let got = s
        .req(
            Method::DELETE,
            &format!("{path}/nope"),
            Some(&admin.token),
            None,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // The changes are admin actions in the audit log; the group outlives a restart.
    let (entries, _) = s
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "admin_action")
        .expect("audit");
    assert!(entries
        .iter()
        .any(|e| e.detail["change"] == "add_member" && e.detail["group"] == "ops"));
    let mut s = s;
    s.restart().await;
    let (_, body) = s.get(path, &admin).await;
    assert_eq!(body["groups"][1]["users"], json!([alice.user_id]));
}

#[tokio::test]
async fn partner_servers_join_and_non_partners_get_nothing() {
    let pki = TestPki::new();
    let b = start_federating(&pki, |_| {}).await;
    let c = start_federating(&pki, |_| {}).await;
    let (b_name, c_name) = (b.server_name(), c.server_name());
    let a = start_federating(&pki, |cfg| {
        cfg.federation_allowlist = vec![b_name.clone()];
        let me = cfg.server_name.to_string();
        cfg.groups = vec![group(
            "staff",
            &[format!("@alice:{me}"), format!("@anna:{me}")],
            std::slice::from_ref(&b_name),
        )];
    })
    .await;
    let alice = a.user("alice").await;
    let zed = a.user("zed").await;
    let bob = b.user("bob").await;
    let carol = c.user("carol").await;

    // The partner's users (a group by server name) can be invited and join, also into a room
    // bound to the group.
    let (status, body) = create(
        &a,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = body["room_id"].as_str().expect("room").to_owned();
    let got = invite(&a, &alice, &room, &bob.user_id).await;
    assert_eq!(
        got.0,
        StatusCode::OK,
        "{} a={} b={b_name} c={c_name}",
        got.1,
        a.server_name()
    );
    let got = join_via(&b, &bob, &room, &a).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;

    // The non-partner's users cannot be invited (nothing is sent to C) ...
    let got = invite(&a, &alice, &room, &carol.user_id).await;
    assert_denied(&got, "federation");
    assert!(has_denial(&a, Some(&alice.user_id), "federation", "invite"));
    let got = create(
        &a,
        &alice,
        json!({ "is_direct": true, "invite": [carol.user_id] }),
    )
    .await;
    assert_denied(&got, "federation");
    // ... nor join: C's make_join is refused, so carol's join fails and A has no trace of her.
    let got = join_via(&c, &carol, &room, &a).await;
    assert_ne!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["errcode"], json!("M_FORBIDDEN"), "{}", got.1);
    assert_eq!(
        membership(&a, &alice, &room, &carol.user_id).await,
        Value::Null
    );
    // C's signed requests get 403 M_FORBIDDEN, audited (with the server it claimed).
    let a_server = ruma::ServerName::parse(a.server_name()).expect("name");
    let err = c
        .services()
        .federation
        .send(
            Method::GET,
            &a_server,
            &format!(
                "/_matrix/federation/v1/query/profile?user_id={}",
                enc(&alice.user_id)
            ),
            None,
        )
        .await
        .expect_err("A refuses C");
    assert!(err.to_string().contains("M_FORBIDDEN"), "{err}");
    // Its transactions (events) are refused the same way.
    let err = c
        .services()
        .federation
        .send(
            Method::PUT,
            &a_server,
            "/_matrix/federation/v1/send/t1",
            Some(json!({ "origin": c_name, "origin_server_ts": 1, "pdus": [], "edus": [] })),
        )
        .await
        .expect_err("A refuses C's transaction");
    assert!(err.to_string().contains("M_FORBIDDEN"), "{err}");
    assert!(denials(&a)
        .iter()
        .any(|e| e["detail"]["policy"] == "federation"
            && e["detail"]["action"] == "federation_request"
            && e["detail"]["server"] == json!(c_name)));
    // A sends nothing to C: no requests, no media fetches, no key queries.
    let c_server = ruma::ServerName::parse(&c_name).expect("name");
    let err = a
        .services()
        .federation
        .send(
            Method::GET,
            &c_server,
            "/_matrix/federation/v1/version",
            None,
        )
        .await
        .expect_err("A does not contact C");
    assert_eq!(err.errcode(), "M_FORBIDDEN");
    let got = a
        .get(
            &format!("/_matrix/client/v1/media/download/{c_name}/someid"),
            &alice,
        )
        .await;
    assert_denied(&got, "federation");
    assert!(has_denial(&a, None, "federation", "media_fetch"));
    let (status, keys) = a
        .post(
            &format!("{V3}/keys/query"),
            &alice,
            json!({ "device_keys": { carol.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert!(keys["failures"].get(&c_name).is_some(), "{keys}");
    assert!(keys["device_keys"].get(&carol.user_id).is_none(), "{keys}");

    // A partner user may not reach a local user outside the group: bob's invite of zed (from a
    // room on B) is refused by A.
    let b_room = b.create_room(&bob, json!({})).await;
    let got = invite(&b, &bob, &b_room, &zed.user_id).await;
    assert_eq!(got.1["errcode"], json!("M_FORBIDDEN"), "{}", got.1);
    assert!(has_denial(
        &a,
        Some(&bob.user_id),
        "closed_user_groups",
        "invite"
    ));
    // And zed cannot join the group's room.
    assert_denied(&join(&a, &zed, &room).await, "room_group");
}

/// The organization's policy service: records what it is asked; denies invites of users named
/// `blocked*` and anything `mute*` does; `/slow` never answers in time.
async fn policy_service() -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::{routing::post, Json, Router};
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = seen.clone();
    let app = Router::new()
        .route(
            "/decide",
            post(move |Json(v): Json<Value>| {
                let log = log.clone();
                async move {
                    log.lock().expect("lock").push(v.clone());
                    let user = v["user_id"].as_str().unwrap_or_default();
                    let target = v["target"].as_str().unwrap_or_default();
                    if user.starts_with("@mute") {
                        Json(json!({ "allow": false, "reason": "muted by compliance" }))
                    } else if target.starts_with("@blocked") {
                        Json(json!({ "allow": false, "reason": "blocked recipient" }))
                    } else {
                        Json(json!({ "allow": true }))
                    }
                }
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Json(json!({ "allow": true }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn the_external_policy_hook_decides_and_fails_closed_or_open() {
    let (base, seen) = policy_service().await;
    let hook = |path: &str, fail_open: bool| {
        Some(hafen::policy::hook::PolicyHookConfig {
            url: format!("{base}{path}"),
            timeout_ms: 300,
            fail_open,
        })
    };
    let s = TestServer::start_with(|c| c.policy_hook = hook("/decide", false)).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let blocked = s.user("blocked").await;
    let mute = s.user("mute").await;

    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    assert_eq!(
        invite(&s, &alice, &room, &bob.user_id).await.0,
        StatusCode::OK
    );
    let got = invite(&s, &alice, &room, &blocked.user_id).await;
    assert_denied(&got, "policy_hook");
    assert!(got.1["error"]
        .as_str()
        .unwrap_or_default()
        .contains("blocked recipient"));
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    assert_denied(&join(&s, &mute, &room).await, "policy_hook");
    let got = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/t1", enc(&room)),
            &bob,
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = create(&s, &mute, json!({})).await;
    assert_denied(&got, "policy_hook");
    assert!(got.1["error"]
        .as_str()
        .unwrap_or_default()
        .contains("muted by compliance"));

    // What the service was told: the action, who, where; never the message content.
    let asked = seen.lock().expect("lock").clone();
    let actions: Vec<&str> = asked.iter().filter_map(|v| v["action"].as_str()).collect();
    for a in ["create_room", "invite", "join", "send"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
    let send = asked
        .iter()
        .find(|v| v["action"] == "send")
        .expect("send asked");
    assert_eq!(send["event_type"], json!("m.room.message"));
    assert_eq!(send["room_id"], json!(room));
    assert_eq!(send["user_id"], json!(bob.user_id));
    assert!(send.get("content").is_none(), "{send}");
    assert!(has_denial(
        &s,
        Some(&alice.user_id),
        "policy_hook",
        "invite"
    ));
    assert!(has_denial(
        &s,
        Some(&mute.user_id),
        "policy_hook",
        "create_room"
    ));

    // A service that does not answer in time: fail closed denies, fail open allows.
    let closed = TestServer::start_with(|c| c.policy_hook = hook("/slow", false)).await;
    let u = closed.user("alice").await;
    let started = std::time::Instant::now();
    let got = create(&closed, &u, json!({})).await;
    assert_denied(&got, "policy_hook");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout holds"
    );
    assert!(has_denial(
        &closed,
        Some(&u.user_id),
        "policy_hook",
        "create_room"
    ));
    let open = TestServer::start_with(|c| c.policy_hook = hook("/slow", true)).await;
    let u = open.user("alice").await;
    let got = create(&open, &u, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // An unreachable service counts the same way.
    let gone = TestServer::start_with(|c| {
        c.policy_hook = Some(hafen::policy::hook::PolicyHookConfig {
            url: format!("http://127.0.0.1:{}/decide", crate::common::free_port()),
            timeout_ms: 300,
            fail_open: false,
        })
    })
    .await;
    let u = gone.user("alice").await;
    assert_denied(&create(&gone, &u, json!({})).await, "policy_hook");
}

#[tokio::test]
async fn the_policy_hook_is_asked_about_knocks_and_other_servers_users() {
    let (base, seen) = policy_service().await;
    let pki = TestPki::new();
    let b = start_federating(&pki, |_| {}).await;
    let a = start_federating(&pki, |c| {
        c.policy_hook = Some(hafen::policy::hook::PolicyHookConfig {
            url: format!("{base}/decide"),
            timeout_ms: 2000,
            fail_open: false,
        })
    })
    .await;
    let alice = a.user("alice").await;
    let kim = a.user("kim").await;
    let mute = a.user("mute").await;
    let blocked = a.user("blocked").await;
    let bob = b.user("bob").await;
    let mute_b = b.user("mute").await;

    // A local knock is asked about: allowed for kim, denied for mute.
    let (status, body) = create(
        &a,
        &alice,
        json!({ "initial_state": [{
            "type": "m.room.join_rules", "state_key": "",
            "content": { "join_rule": "knock" }
        }]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let knock_room = body["room_id"].as_str().expect("room").to_owned();
    let knock_path = format!("{V3}/knock/{}", enc(&knock_room));
    let got = a
        .post(&knock_path, &kim, json!({ "reason": "let me in" }))
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["room_id"], json!(knock_room));
    assert_denied(
        &a.post(&knock_path, &mute, json!({ "reason": "let me in" }))
            .await,
        "policy_hook",
    );
    assert!(has_denial(&a, Some(&mute.user_id), "policy_hook", "knock"));

    // Another server's users joining here: bob is allowed, B's mute is refused at send_join and
    // never becomes a member.
    let room = create(&a, &alice, json!({ "preset": "public_chat" }))
        .await
        .1["room_id"]
        .as_str()
        .expect("room")
        .to_owned();
    // (mute first: once bob is in, B is in the room and joins of its users reach us only as
    // PDUs, which the auth rules decide, see docs/compliance.md.)
    let got = join_via(&b, &mute_b, &room, &a).await;
    assert_eq!(got.1["errcode"], json!("M_FORBIDDEN"), "{}", got.1);
    assert_eq!(
        membership(&a, &alice, &room, &mute_b.user_id).await,
        Value::Null
    );
    assert!(has_denial(&a, Some(&mute_b.user_id), "policy_hook", "join"));
    let got = join_via(&b, &bob, &room, &a).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;

    // An invite from another server's user to a local user: asked with the target; the
    // service refuses invites of @blocked.
    let b_room = create(&b, &bob, json!({ "preset": "private_chat" }))
        .await
        .1["room_id"]
        .as_str()
        .expect("room")
        .to_owned();
    let got = invite(&b, &bob, &b_room, &alice.user_id).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = invite(&b, &bob, &b_room, &blocked.user_id).await;
    assert_eq!(got.1["errcode"], json!("M_FORBIDDEN"), "{}", got.1);
    assert!(has_denial(&a, Some(&bob.user_id), "policy_hook", "invite"));

    let asked = seen.lock().expect("lock").clone();
    let find = |action: &str, user: &str| {
        asked
            .iter()
            .find(|v| v["action"] == json!(action) && v["user_id"] == json!(user))
            .cloned()
    };
    let k = find("knock", &kim.user_id).expect("knock asked");
    assert_eq!(k["room_id"], json!(knock_room));
    let j = find("join", &bob.user_id).expect("remote join asked");
    assert_eq!(j["remote"], json!(true));
    assert_eq!(j["room_id"], json!(room));
    assert_eq!(j["server_name"], json!(a.server_name()));
    let i = asked
        .iter()
        .find(|v| v["action"] == json!("invite") && v["target"] == json!(alice.user_id))
        .expect("remote invite asked");
    assert_eq!(i["user_id"], json!(bob.user_id));
    assert_eq!(i["remote"], json!(true));
}

#[tokio::test]
async fn leaving_a_group_removes_the_user_from_rooms_bound_to_it() {
    let mut s = TestServer::start_with(|c| {
        c.groups = vec![group(
            "staff",
            &["@alice:localhost".into(), "@kim:localhost".into()],
            &[],
        )];
    })
    .await;
    let alice = s.user("alice").await;
    let kim = s.user("kim").await;
    let zed = s.user("zed").await;
    let yan = s.user("yan").await;
    let admin = s.user("admin").await;
    let admin_id = ruma::UserId::parse(&admin.user_id).expect("id");
    s.services()
        .accounts
        .set_admin(&admin_id, true)
        .expect("admin");
    let path = "/_hafen/admin/v1/groups";
    assert_eq!(
        s.put(&format!("{path}/ops"), &admin, json!({})).await.0,
        StatusCode::OK
    );
    for m in [&alice.user_id, &zed.user_id, &yan.user_id] {
        let got = s
            .put(&format!("{path}/ops/members/{}", enc(m)), &admin, json!({}))
            .await;
        assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    }
    let (status, body) = create(
        &s,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "ops" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = body["room_id"].as_str().expect("room").to_owned();
    assert_eq!(join(&s, &zed, &room).await.0, StatusCode::OK);
    assert_eq!(
        invite(&s, &alice, &room, &yan.user_id).await.0,
        StatusCode::OK
    );
    // A room bound to another group is not touched.
    let (_, body) = create(
        &s,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    let staff_room = body["room_id"].as_str().expect("room").to_owned();
    assert_eq!(join(&s, &kim, &staff_room).await.0, StatusCode::OK);

    // zed leaves the group: he leaves the bound room, with the reason.
    let (status, body) = s
        .req(
            Method::DELETE,
            &format!("{path}/ops/members/{}", enc(&zed.user_id)),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "removed_from_rooms": [{ "room_id": room, "user_id": zed.user_id }] })
    );
    assert_eq!(
        membership(&s, &alice, &room, &zed.user_id).await,
        json!("leave")
    );
    let (_, member) = s
        .get(
            &format!(
                "{V3}/rooms/{}/state/m.room.member/{}",
                enc(&room),
                enc(&zed.user_id)
            ),
            &alice,
        )
        .await;
    assert_eq!(
        member["reason"],
        json!("No longer a member of the group ops this room is bound to")
    );
    assert_eq!(
        membership(&s, &alice, &room, &yan.user_id).await,
        json!("invite")
    );
    let removed: Vec<Value> = denials(&s)
        .into_iter()
        .filter(|e| e["detail"]["action"] == json!("remain_member"))
        .collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["user"], json!(zed.user_id));
    assert_eq!(removed[0]["room"], json!(room));
    assert_eq!(removed[0]["detail"]["policy"], json!("room_group"));
    assert_eq!(removed[0]["detail"]["group"], json!("ops"));

    // The group is deleted: everyone left in its room goes (the invite is withdrawn too).
    let (status, body) = s
        .req(
            Method::DELETE,
            &format!("{path}/ops"),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut gone: Vec<String> = body["removed_from_rooms"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|r| {
            assert_eq!(r["room_id"], json!(room));
            r["user_id"].as_str().expect("user").to_owned()
        })
        .collect();
    gone.sort();
    assert_eq!(gone, vec![alice.user_id.clone(), yan.user_id.clone()]);
    assert_eq!(
        membership(&s, &kim, &staff_room, &kim.user_id).await,
        json!("join")
    );

    // A group changed in the config file is enforced at the next start.
    s.halt().await;
    s.resume_with(|c| {
        c.groups = vec![group("staff", &["@alice:localhost".into()], &[])];
    })
    .await;
    wait_membership(&s, &alice, &staff_room, &kim.user_id, "leave").await;
    assert_eq!(
        membership(&s, &alice, &staff_room, &alice.user_id).await,
        json!("join")
    );
}

/// `PUT /rooms/{room}/state/m.room.member/{who}` with `membership`, as `by`.
async fn put_member(
    server: &TestServer,
    by: &TestUser,
    room: &str,
    who: &str,
    membership: &str,
) -> (StatusCode, Value) {
    server
        .put(
            &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(room), enc(who)),
            by,
            json!({ "membership": membership }),
        )
        .await
}

fn denial_count(server: &TestServer, user: &str, policy: &str, action: &str) -> usize {
    denials(server)
        .iter()
        .filter(|e| {
            e["detail"]["policy"] == policy && e["detail"]["action"] == action && e["user"] == user
        })
        .count()
}

#[tokio::test]
async fn memberships_pass_the_groups_whichever_way_they_are_written() {
    let name = "localhost";
    let u = |l: &str| format!("@{l}:{name}");
    let s = TestServer::start_with(|c| {
        c.groups = vec![
            group("staff", &[u("alice"), u("anna")], &[]),
            group("other", &[u("eve")], &[]),
            group("friends", &[u("fred")], &[]),
        ];
        c.group_contact = vec![["staff".into(), "friends".into()]];
    })
    .await;
    let alice = s.user("alice").await;
    let anna = s.user("anna").await;
    let eve = s.user("eve").await;
    let fred = s.user("fred").await;

    // A public room: alice may not invite eve by writing the invite as state (instead of
    // calling /invite). Audited once: the write path's check does not add a second entry.
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let got = put_member(&s, &alice, &room, &eve.user_id, "invite").await;
    assert_denied(&got, "closed_user_groups");
    assert_eq!(
        membership(&s, &alice, &room, &eve.user_id).await,
        Value::Null
    );
    assert_eq!(
        denial_count(&s, &alice.user_id, "closed_user_groups", "invite"),
        1
    );
    // What the groups allow still goes through this way.
    let got = put_member(&s, &alice, &room, &anna.user_id, "invite").await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = put_member(&s, &alice, &room, &fred.user_id, "invite").await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // A room bound to staff: fred (a contact of staff, not a member) cannot be invited as state.
    let (status, body) = create(
        &s,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bound = body["room_id"].as_str().expect("room").to_owned();
    assert_denied(
        &put_member(&s, &alice, &bound, &fred.user_id, "invite").await,
        "room_group",
    );
    assert_eq!(
        membership(&s, &alice, &bound, &fred.user_id).await,
        Value::Null
    );
    assert_eq!(denial_count(&s, &alice.user_id, "room_group", "invite"), 1);

    // createRoom: members cannot be smuggled in through initial_state, and invites are checked.
    let got = create(
        &s,
        &alice,
        json!({
            "creation_content": { "org.hafen.group": "staff" },
            "initial_state": [{ "type": "m.room.member", "state_key": fred.user_id,
                                "content": { "membership": "invite" } }],
        }),
    )
    .await;
    assert_err(&got, 400, "M_INVALID_ROOM_STATE");
    let got = create(
        &s,
        &alice,
        json!({ "creation_content": { "org.hafen.group": "staff" }, "invite": [fred.user_id] }),
    )
    .await;
    assert_denied(&got, "room_group");

    // A room upgrade: alice was taken out of a runtime group and the sweep has not removed her
    // yet; she cannot carry herself into a new room bound to that group.
    let groups = &s.services().access.groups;
    groups.create("ops").expect("group");
    groups
        .change_member("ops", &alice.user_id, true)
        .expect("member");
    let (status, body) = create(
        &s,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "ops" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ops_room = body["room_id"].as_str().expect("room").to_owned();
    groups
        .change_member("ops", &alice.user_id, false)
        .expect("remove");
    let got = s
        .post(
            &format!("{V3}/rooms/{}/upgrade", enc(&ops_room)),
            &alice,
            json!({ "new_version": "11" }),
        )
        .await;
    assert_denied(&got, "room_group");
    assert!(has_denial(&s, Some(&alice.user_id), "room_group", "join"));
    // The old room was not replaced.
    let (status, _) = s
        .get(
            &format!("{V3}/rooms/{}/state/m.room.tombstone/", enc(&ops_room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn other_servers_joins_in_bound_rooms_pass_our_groups() {
    let pki = TestPki::new();
    // B counts everybody as staff: it lets its users join the room A binds to staff.
    let b = start_federating(&pki, |c| {
        c.groups = vec![group("staff", &["@*:*".to_owned()], &[])];
    })
    .await;
    let b_name = b.server_name();
    // A counts only alice and B's b1 as staff.
    let a = start_federating(&pki, |c| {
        let me = c.server_name.to_string();
        c.groups = vec![group(
            "staff",
            &[format!("@alice:{me}"), format!("@b1:{b_name}")],
            &[],
        )];
    })
    .await;
    let alice = a.user("alice").await;
    let b1 = b.user("b1").await;
    let b2 = b.user("b2").await;
    let (status, body) = create(
        &a,
        &alice,
        json!({ "preset": "public_chat", "creation_content": { "org.hafen.group": "staff" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = body["room_id"].as_str().expect("room").to_owned();
    let got = join_via(&b, &b1, &room, &a).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    wait_membership(&a, &alice, &room, &b1.user_id, "join").await;

    // b2 joins through B, which is in the room now: the join reaches A only as a PDU of a
    // `/send` transaction. A refuses it: b2 is not staff by A's rules.
    let got = join(&b, &b2, &room).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // b1 talks after b2's join: A fetches the join as a missing event and sees it in the state
    // B resolved; it stays out of A's state either way.
    let (status, body) = b
        .put(
            &format!(
                "{V3}/rooms/{}/send/m.room.message/{}",
                enc(&room),
                crate::common::unique_txn()
            ),
            &b1,
            json!({ "msgtype": "m.text", "body": "after b2 joined" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut seen = false;
    for _ in 0..200 {
        let (_, msgs) = a
            .get(
                &format!("{V3}/rooms/{}/messages?dir=b&limit=20", enc(&room)),
                &alice,
            )
            .await;
        seen = msgs["chunk"]
            .as_array()
            .is_some_and(|c| c.iter().any(|e| e["content"]["body"] == "after b2 joined"));
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "A never got b1's message");
    assert_ne!(
        membership(&a, &alice, &room, &b2.user_id).await,
        json!("join")
    );
    let (status, members) = a
        .get(&format!("{V3}/rooms/{}/joined_members", enc(&room)), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert!(members["joined"].get(&b2.user_id).is_none(), "{members}");
    assert!(has_denial(&a, Some(&b2.user_id), "room_group", "join"));
}

#[tokio::test]
async fn to_device_messages_pass_the_groups_locally_and_from_other_servers() {
    let name = "localhost";
    let u = |l: &str| format!("@{l}:{name}");
    let s = TestServer::start_with(|c| {
        c.groups = vec![
            group(
                "staff",
                &[u("alice"), u("anna")],
                &["partner.test".to_owned()],
            ),
            group("other", &[u("eve")], &[]),
        ];
    })
    .await;
    let alice = s.user("alice").await;
    let anna = s.user("anna").await;
    let eve = s.user("eve").await;
    let send = |to: &TestUser| json!({ "messages": { to.user_id.clone(): { to.device_id.clone(): { "secret": "s3" } } } });
    let path = || format!("{V3}/sendToDevice/m.test/{}", crate::common::unique_txn());

    // Within the group: delivered.
    let (status, body) = s.put(&path(), &alice, send(&anna)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Across groups: refused as a whole, audited; nothing reaches eve.
    let got = s.put(&path(), &alice, send(&eve)).await;
    assert_denied(&got, "closed_user_groups");
    assert!(has_denial(
        &s,
        Some(&alice.user_id),
        "closed_user_groups",
        "to_device"
    ));
    // A user of another server outside alice's groups is refused too (nothing is queued).
    let got = s
        .put(
            &path(),
            &alice,
            json!({ "messages": { "@x:elsewhere.test": { "DEV": { "secret": "s3" } } } }),
        )
        .await;
    assert_denied(&got, "closed_user_groups");

    // From another server (an m.direct_to_device EDU): a partner's user reaches anna, not eve.
    let origin = <&ruma::ServerName>::try_from("partner.test").expect("name");
    let edu = json!({ "edu_type": "m.direct_to_device", "content": {
        "sender": "@p:partner.test", "type": "m.test", "message_id": "m1",
        "messages": {
            anna.user_id.clone(): { anna.device_id.clone(): { "secret": "from partner" } },
            eve.user_id.clone(): { eve.device_id.clone(): { "secret": "from partner" } },
        },
    }});
    hafen::service::federation::edu::apply(s.services(), origin, &[edu]);

    let events = |v: &Value| -> Vec<Value> {
        v["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (status, anna_sync) = s.get(&format!("{V3}/sync"), &anna).await;
    assert_eq!(status, StatusCode::OK, "{anna_sync}");
    let got = events(&anna_sync);
    assert!(
        got.iter().any(|e| e["sender"] == alice.user_id.as_str()),
        "{got:?}"
    );
    assert!(
        got.iter().any(|e| e["sender"] == "@p:partner.test"),
        "{got:?}"
    );
    let (status, eve_sync) = s.get(&format!("{V3}/sync"), &eve).await;
    assert_eq!(status, StatusCode::OK, "{eve_sync}");
    assert!(events(&eve_sync).is_empty(), "{eve_sync}");
}
