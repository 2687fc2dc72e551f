//! Push rules (CRUD and their effect on unread counts), `/notifications`, pushers and delivery to
//! a push gateway (a real HTTP server on loopback run by the test).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, routing::post, Json, Router};
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";
const RULES: &str = "/_matrix/client/v3/pushrules/global";

async fn send(s: &TestServer, u: &TestUser, room: &str, txn: &str, content: Value) -> String {
    let (status, body) = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/{txn}", enc(room)),
            u,
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event id").to_owned()
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

async fn unread(s: &TestServer, u: &TestUser, room: &str, filter: Option<Value>) -> Value {
    let query = match filter {
        Some(f) => format!("?filter={}", enc(&f.to_string())),
        None => String::new(),
    };
    let (status, body) = s.get(&format!("{V3}/sync{query}"), u).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["rooms"]["join"][room].clone()
}

fn counts(room: &Value) -> (u64, u64) {
    let c = &room["unread_notifications"];
    (
        c["notification_count"]
            .as_u64()
            .expect("notification_count"),
        c["highlight_count"].as_u64().expect("highlight_count"),
    )
}

#[tokio::test]
async fn push_rule_crud_and_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;

    // The server defaults are there, with the user's own id in the invite rule.
    let (status, all) = s.get("/_matrix/client/v3/pushrules/", &alice).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let overrides = all["global"]["override"].as_array().expect("override");
    assert_eq!(overrides[0]["rule_id"], json!(".m.rule.master"));
    assert_eq!(overrides[0]["enabled"], json!(false));
    assert!(all["global"]["underride"]
        .as_array()
        .expect("underride")
        .iter()
        .any(|r| r["rule_id"] == json!(".m.rule.message")));

    // A content rule, then one placed before it.
    let (status, body) = s
        .put(
            &format!("{RULES}/content/cake"),
            &alice,
            json!({ "pattern": "cake*lie", "actions": ["notify"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({}));
    let (status, _) = s
        .put(
            &format!("{RULES}/content/pie?before=cake"),
            &alice,
            json!({ "pattern": "pie", "actions": ["notify", { "set_tweak": "highlight" }] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, all) = s.get(&format!("{RULES}/"), &alice).await;
    let ids: Vec<&str> = all["content"]
        .as_array()
        .expect("content")
        .iter()
        .filter_map(|r| r["rule_id"].as_str())
        .collect();
    let (pie, cake) = (
        ids.iter().position(|i| *i == "pie").expect("pie"),
        ids.iter().position(|i| *i == "cake").expect("cake"),
    );
    assert!(pie < cake, "{ids:?}");

    let (status, rule) = s.get(&format!("{RULES}/content/cake"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rule["pattern"], json!("cake*lie"));
    assert_eq!(rule["enabled"], json!(true));
    assert_eq!(rule["default"], json!(false));

    // Enabled and actions, on a user rule and on a server default.
    let (status, _) = s
        .put(
            &format!("{RULES}/content/cake/enabled"),
            &alice,
            json!({ "enabled": false }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, e) = s
        .get(&format!("{RULES}/content/cake/enabled"), &alice)
        .await;
    assert_eq!(e, json!({ "enabled": false }));
    let (status, _) = s
        .put(
            &format!("{RULES}/underride/.m.rule.message/actions"),
            &alice,
            json!({ "actions": [] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, a) = s
        .get(
            &format!("{RULES}/underride/.m.rule.message/actions"),
            &alice,
        )
        .await;
    assert_eq!(a, json!({ "actions": [] }));

    // The rule set is account data: sync shows it.
    let (_, synced) = s.get(&format!("{V3}/sync"), &alice).await;
    let stored = synced["account_data"]["events"]
        .as_array()
        .expect("account data")
        .iter()
        .find(|e| e["type"] == json!("m.push_rules"))
        .expect("m.push_rules in sync")
        .clone();
    assert!(stored["content"]["global"]["content"]
        .as_array()
        .expect("content rules")
        .iter()
        .any(|r| r["rule_id"] == json!("cake") && r["enabled"] == json!(false)));

    // Conditions are optional: an override rule without them matches everything.
    let (status, body) = s
        .put(
            &format!("{RULES}/override/all"),
            &alice,
            json!({ "actions": ["notify"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, rule) = s.get(&format!("{RULES}/override/all"), &alice).await;
    assert_eq!(rule["conditions"], json!([]), "{rule}");
    let got = s
        .put(
            &format!("{RULES}/room/not-a-room"),
            &alice,
            json!({ "actions": [] }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // Errors.
    let got = s.get(&format!("{RULES}/content/nope"), &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .req(
            Method::DELETE,
            &format!("{RULES}/content/nope"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .put(
            &format!("{RULES}/override/.m.rule.mine"),
            &alice,
            json!({ "actions": [] }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .put(
            &format!("{RULES}/content/x?before=missing"),
            &alice,
            json!({ "pattern": "x", "actions": [] }),
        )
        .await;
    assert_err(&got, 400, "M_UNKNOWN");
    let got = s
        .put(
            &format!("{RULES}/content/nopattern"),
            &alice,
            json!({ "actions": [] }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(
            &format!("{RULES}/content/nope/enabled"),
            &alice,
            json!({ "enabled": true }),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .req(
            Method::DELETE,
            &format!("{RULES}/override/.m.rule.master"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.req(Method::GET, &format!("{RULES}/"), None, None).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");

    // Deleting a user rule.
    let (status, _) = s
        .req(
            Method::DELETE,
            &format!("{RULES}/content/cake"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let got = s.get(&format!("{RULES}/content/cake"), &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn push_rules_decide_unread_counts_and_notifications() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &room).await;

    send(&s, &bob, &room, "m1", text("hello")).await;
    let mention = send(
        &s,
        &bob,
        &room,
        "m2",
        json!({ "msgtype": "m.text", "body": "alice: look",
                "m.mentions": { "user_ids": [alice.user_id] } }),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m3",
        json!({ "msgtype": "m.notice", "body": "bot" }),
    )
    .await;
    assert_eq!(counts(&unread(&s, &alice, &room, None).await), (2, 1));
    // The sender's own messages never count for them.
    assert_eq!(counts(&unread(&s, &bob, &room, None).await), (0, 0));

    // A room rule that silences the room: new messages stop counting.
    let (status, _) = s
        .put(
            &format!("{RULES}/room/{}", enc(&room)),
            &alice,
            json!({ "actions": [] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send(&s, &bob, &room, "m4", text("quiet")).await;
    assert_eq!(counts(&unread(&s, &alice, &room, None).await), (2, 1));
    s.req(
        Method::DELETE,
        &format!("{RULES}/room/{}", enc(&room)),
        Some(&alice.token),
        None,
    )
    .await;

    // /notifications lists them newest first, with `read` and the event.
    let (status, n) = s.get(&format!("{V3}/notifications"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{n}");
    let list = n["notifications"].as_array().expect("notifications");
    assert_eq!(list.len(), 2, "{n}");
    assert_eq!(list[0]["event"]["event_id"], json!(mention));
    assert_eq!(list[0]["read"], json!(false));
    assert_eq!(list[0]["room_id"], json!(room));
    assert!(list[0]["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .any(|a| a["set_tweak"] == json!("highlight")));
    let (_, h) = s
        .get(&format!("{V3}/notifications?only=highlight"), &alice)
        .await;
    assert_eq!(h["notifications"].as_array().map(Vec::len), Some(1), "{h}");
    let (_, page) = s.get(&format!("{V3}/notifications?limit=1"), &alice).await;
    assert_eq!(page["notifications"].as_array().map(Vec::len), Some(1));
    let next = page["next_token"].as_str().expect("next_token").to_owned();
    let (_, page2) = s
        .get(&format!("{V3}/notifications?limit=1&from={next}"), &alice)
        .await;
    assert_eq!(
        page2["notifications"][0]["event"]["content"]["body"],
        json!("hello")
    );
    let got = s.get(&format!("{V3}/notifications?from=zzz"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // A read receipt on the mention reads both; /notifications says so.
    let (status, _) = s
        .post(
            &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&mention)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts(&unread(&s, &alice, &room, None).await), (0, 0));
    let (_, n) = s.get(&format!("{V3}/notifications"), &alice).await;
    assert!(
        n["notifications"]
            .as_array()
            .expect("list")
            .iter()
            .all(|x| x["read"] == json!(true)),
        "{n}"
    );

    // Threads: counted apart when the filter asks, in the main counts otherwise.
    let root = send(&s, &bob, &room, "t0", text("root")).await;
    send(
        &s,
        &bob,
        &room,
        "t1",
        json!({ "msgtype": "m.text", "body": "in thread",
                "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
    )
    .await;
    assert_eq!(counts(&unread(&s, &alice, &room, None).await), (2, 0));
    let filter = json!({ "room": { "timeline": { "unread_thread_notifications": true } } });
    let split = unread(&s, &alice, &room, Some(filter.clone())).await;
    assert_eq!(counts(&split), (1, 0), "{split}");
    assert_eq!(
        split["unread_thread_notifications"][&root]["notification_count"],
        json!(1),
        "{split}"
    );
    // A threaded receipt reads the thread only.
    let last = send(
        &s,
        &bob,
        &room,
        "t2",
        json!({ "msgtype": "m.text", "body": "more",
        "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
    )
    .await;
    let (status, body) = s
        .post(
            &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
            &alice,
            json!({ "thread_id": root }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let split = unread(&s, &alice, &room, Some(filter)).await;
    assert_eq!(counts(&split), (1, 0), "{split}");
    assert!(
        split["unread_thread_notifications"].get(&root).is_none(),
        "{split}"
    );

    // Leaving the room forgets what was unread there.
    let (status, _) = s
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let n = s
        .services()
        .push
        .notifications
        .total_unread(&ruma::UserId::parse(alice.user_id.as_str()).expect("user id"));
    assert_eq!(n.expect("count"), 0);
}

#[tokio::test]
async fn invites_and_room_mentions_follow_the_default_rules() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let (status, _) = s
        .post(
            &format!("{V3}/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // The invite notifies its target (and is a highlight? no: sound only).
    let (_, n) = s.get(&format!("{V3}/notifications"), &bob).await;
    let list = n["notifications"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{n}");
    assert_eq!(list[0]["event"]["type"], json!("m.room.member"));
    assert_eq!(list[0]["event"]["content"]["membership"], json!("invite"));

    s.invite_and_join(&alice, &carol, &room).await;
    s.join(&bob, &room).await;
    // @room from the creator (power 100) highlights; from carol (power 0) it does not.
    send(
        &s,
        &alice,
        &room,
        "r1",
        json!({ "msgtype": "m.text", "body": "hey", "m.mentions": { "room": true } }),
    )
    .await;
    send(
        &s,
        &carol,
        &room,
        "r2",
        json!({ "msgtype": "m.text", "body": "hey", "m.mentions": { "room": true } }),
    )
    .await;
    let (_, n) = s
        .get(&format!("{V3}/notifications?only=highlight"), &bob)
        .await;
    let list = n["notifications"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{n}");
    assert_eq!(list[0]["event"]["sender"], json!(alice.user_id));
}

/// A push gateway on loopback: records every POST; fails the first `fail_first` requests with
/// 500; rejects the pushkey "gone".
#[derive(Clone, Default)]
struct Gateway {
    received: Arc<Mutex<Vec<Value>>>,
    fail_first: Arc<AtomicUsize>,
}

async fn notify(State(g): State<Gateway>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let fail = g
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({})));
    }
    let pushkey = body["notification"]["devices"][0]["pushkey"].clone();
    g.received.lock().push(body);
    let rejected = if pushkey == json!("gone") {
        vec![pushkey]
    } else {
        vec![]
    };
    (StatusCode::OK, Json(json!({ "rejected": rejected })))
}

async fn start_gateway(g: Gateway) -> String {
    let app = Router::new()
        .route("/_matrix/push/v1/notify", post(notify))
        .with_state(g);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/_matrix/push/v1/notify")
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pusher(url: &str, pushkey: &str, format: Option<&str>) -> Value {
    let mut data = json!({ "url": url, "extra": "kept" });
    if let Some(f) = format {
        data["format"] = json!(f);
    }
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey,
        "app_display_name": "Example", "device_display_name": "Phone",
        "lang": "en", "data": data,
    })
}

#[tokio::test]
async fn pushers_deliver_to_the_gateway_with_retry() {
    // The test gateway is on loopback, which pushes may only reach when allowed.
    let s = TestServer::start_with(|c| {
        c.push_gateway_ip_range_allowlist = vec!["127.0.0.0/8".into()];
    })
    .await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Lounge" }))
        .await;
    s.join(&bob, &room).await;
    let gateway = Gateway::default();
    let url = start_gateway(gateway.clone()).await;

    // Validation.
    let got = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            pusher("http://127.0.0.1:1/wrong/path", "k", None),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            pusher(&url, &"k".repeat(513), None),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            json!({ "kind": "http", "app_id": "a" }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");

    let (status, body) = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            pusher(&url, "phone", None),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, list) = s.get(&format!("{V3}/pushers"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["pushers"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["pushers"][0]["pushkey"], json!("phone"));
    assert_eq!(list["pushers"][0]["data"]["url"], json!(url));

    // The gateway fails twice; the notification still arrives, once.
    gateway.fail_first.store(2, Ordering::SeqCst);
    let event = send(&s, &bob, &room, "p1", text("ping")).await;
    wait_for("the push", || !gateway.received.lock().is_empty()).await;
    let got = gateway.received.lock()[0].clone();
    let n = &got["notification"];
    assert_eq!(n["event_id"], json!(event), "{got}");
    assert_eq!(n["room_id"], json!(room));
    assert_eq!(n["type"], json!("m.room.message"));
    assert_eq!(n["sender"], json!(bob.user_id));
    assert_eq!(n["content"]["body"], json!("ping"));
    assert_eq!(n["room_name"], json!("Lounge"));
    assert_eq!(n["counts"]["unread"], json!(1));
    assert_eq!(n["devices"][0]["app_id"], json!("org.example.app"));
    assert_eq!(n["devices"][0]["data"], json!({ "extra": "kept" }));
    assert_eq!(
        n["devices"][0]["tweaks"]["sound"],
        json!("default"),
        "{got}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gateway.received.lock().len(), 1);

    // event_id_only format: no content.
    s.post(
        &format!("{V3}/pushers/set"),
        &alice,
        pusher(&url, "phone", Some("event_id_only")),
    )
    .await;
    send(&s, &bob, &room, "p2", text("secret")).await;
    wait_for("the second push", || gateway.received.lock().len() >= 2).await;
    let got = gateway.received.lock()[1].clone();
    assert!(got["notification"].get("content").is_none(), "{got}");
    assert_eq!(got["notification"]["counts"]["unread"], json!(2));

    // A rejected pushkey loses its pusher.
    let (status, _) = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            pusher(&url, "gone", None),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send(&s, &bob, &room, "p3", text("again")).await;
    wait_for("the rejected push", || {
        gateway
            .received
            .lock()
            .iter()
            .any(|b| b["notification"]["devices"][0]["pushkey"] == json!("gone"))
    })
    .await;
    let start = Instant::now();
    loop {
        let (_, list) = s.get(&format!("{V3}/pushers"), &alice).await;
        let keys: Vec<Value> = list["pushers"]
            .as_array()
            .expect("list")
            .iter()
            .map(|p| p["pushkey"].clone())
            .collect();
        if keys == vec![json!("phone")] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{keys:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Deleting with kind null, and logging out the device, remove pushers.
    let (status, _) = s
        .post(
            &format!("{V3}/pushers/set"),
            &alice,
            json!({ "kind": null, "app_id": "org.example.app", "pushkey": "phone" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, list) = s.get(&format!("{V3}/pushers"), &alice).await;
    assert_eq!(list["pushers"], json!([]));
    s.post(
        &format!("{V3}/pushers/set"),
        &alice,
        pusher(&url, "phone", None),
    )
    .await;
    let (status, _) = s.post(&format!("{V3}/logout"), &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, login) = s
        .req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "alice" },
                "password": "password",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let again = TestUser {
        user_id: alice.user_id.clone(),
        device_id: login["device_id"].as_str().expect("device").to_owned(),
        token: login["access_token"].as_str().expect("token").to_owned(),
    };
    let (_, list) = s.get(&format!("{V3}/pushers"), &again).await;
    assert_eq!(list["pushers"], json!([]));
}

#[tokio::test]
async fn pushes_never_reach_internal_addresses_unless_allowed() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &room).await;
    let gateway = Gateway::default();
    let url = start_gateway(gateway.clone()).await;
    // A host name resolving to loopback is refused just like the address itself.
    let by_name = url.replace("127.0.0.1", "localhost");
    for (key, u) in [("ip", url.as_str()), ("name", by_name.as_str())] {
        let (status, body) = s
            .post(&format!("{V3}/pushers/set"), &alice, pusher(u, key, None))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    send(&s, &bob, &room, "p1", text("ping")).await;
    // Two sweeps of the delivery task.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        gateway.received.lock().is_empty(),
        "a push reached loopback"
    );
}
