//! Room history and state over federation: server B asks server A (signed requests) for events,
//! the state at an event, auth chains, backfill and missing events; what a server may see is
//! decided by the room's history visibility, its ACL and whether any of its users is in the room.

use std::collections::{BTreeSet, HashSet};

use reqwest::{Method, StatusCode};
use ruma::{EventId, RoomId, ServerName};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, free_port, TestServer, TestUser};

async fn two_servers() -> (TestServer, TestServer) {
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
    (a, b)
}

/// A request to A signed by B (`X-Matrix`), with A's status and JSON answer.
async fn from_b(
    a: &TestServer,
    b: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let a_name = <&ServerName>::try_from("a.test").expect("name");
    let header = hafen::service::federation::auth::authorization_header(
        &b.services().globals,
        &method,
        a_name,
        path,
        body.as_ref(),
    )
    .expect("header");
    let mut request = a
        .http
        .request(method, format!("{}{}", a.base, path))
        .header("Authorization", header);
    if let Some(body) = &body {
        request = request.json(body);
    }
    let res = request.send().await.expect("sent");
    let status = res.status();
    let text = res.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(a: &TestServer, b: &TestServer, path: &str) -> (StatusCode, Value) {
    from_b(a, b, Method::GET, path, None).await
}

async fn send_text(s: &TestServer, u: &TestUser, room: &str, body: &str) -> String {
    let (status, v) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(room),
                rand_txn()
            ),
            u,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["event_id"].as_str().expect("event_id").to_owned()
}

async fn send_state(
    s: &TestServer,
    u: &TestUser,
    room: &str,
    kind: &str,
    content: Value,
) -> String {
    let (status, v) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room)),
            u,
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["event_id"].as_str().expect("event_id").to_owned()
}

fn rand_txn() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}", N.fetch_add(1, Ordering::Relaxed))
}

fn room_id(s: &str) -> &RoomId {
    <&RoomId>::try_from(s).expect("room id")
}

fn event_id(s: &str) -> &EventId {
    <&EventId>::try_from(s).expect("event id")
}

fn ids(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|id| id.as_str().expect("id").to_owned())
        .collect()
}

/// (type, state_key) of each PDU of a list.
fn state_keys(v: &Value) -> BTreeSet<(String, String)> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|p| {
            (
                p["type"].as_str().expect("type").to_owned(),
                p["state_key"].as_str().expect("state_key").to_owned(),
            )
        })
        .collect()
}

/// What A's rooms say the state before `event` is, as (type, state_key) -> event id.
fn state_before(a: &TestServer, event: &str) -> BTreeSet<String> {
    a.services()
        .rooms
        .state_ids_before(event_id(event))
        .expect("db")
        .expect("known")
        .into_values()
        .map(|id| id.to_string())
        .collect()
}

fn bodies(pdus: &Value) -> Vec<String> {
    pdus.as_array()
        .expect("pdus")
        .iter()
        .map(|p| {
            p["content"]["body"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("<{}>", p["type"].as_str().unwrap_or("?")))
        })
        .collect()
}

#[tokio::test]
async fn world_readable_room_is_served_to_another_server() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    // v12: the create event is no auth event and the room id is its hash; v10: the classic form.
    world_readable_room(&a, &b, &alice, "12").await;
    world_readable_room(&a, &b, &alice, "10").await;
}

async fn world_readable_room(a: &TestServer, b: &TestServer, alice: &TestUser, version: &str) {
    let alice = alice.clone();
    let room = a
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                "room_version": version,
                "initial_state": [{
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": { "history_visibility": "world_readable" }
                }]
            }),
        )
        .await;
    let r = enc(&room);
    let m1 = send_text(a, &alice, &room, "one").await;
    let topic = send_state(a, &alice, &room, "m.room.topic", json!({ "topic": "t1" })).await;
    let m2 = send_text(a, &alice, &room, "two").await;
    let m3 = send_text(a, &alice, &room, "three").await;

    // A single event, as a transaction from A, in its federation form.
    let got = get(a, b, &format!("/_matrix/federation/v1/event/{}", enc(&m2))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["origin"], json!("a.test"));
    assert!(got.1["origin_server_ts"].as_u64().is_some());
    let pdus = got.1["pdus"].as_array().expect("pdus");
    assert_eq!(pdus.len(), 1);
    assert_eq!(pdus[0]["content"]["body"], json!("two"));
    assert_eq!(pdus[0]["room_id"], json!(room));
    assert!(pdus[0].get("unsigned").is_none());
    assert!(pdus[0]["signatures"]["a.test"].is_object());
    assert_eq!(
        Some(pdus[0].clone()),
        a.services()
            .rooms
            .federation_pdu(event_id(&m2))
            .expect("db")
    );

    // The state before the topic change does not hold it; the state before m2 does.
    let got = get(
        a,
        b,
        &format!(
            "/_matrix/federation/v1/state_ids/{r}?event_id={}",
            enc(&topic)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let before_topic = ids(&got.1["pdu_ids"]);
    assert!(!before_topic.contains(&topic));
    assert_eq!(before_topic, state_before(a, &topic));
    let got = get(
        a,
        b,
        &format!("/_matrix/federation/v1/state_ids/{r}?event_id={}", enc(&m2)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let at_m2 = ids(&got.1["pdu_ids"]);
    assert!(at_m2.contains(&topic));
    assert_eq!(at_m2.len(), before_topic.len() + 1);
    let current: BTreeSet<String> = a
        .services()
        .rooms
        .current_state_ids(room_id(&room))
        .expect("db")
        .into_values()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(at_m2, current);
    // The auth chain of that state: the create event, power levels, join rules, alice's join...
    let chain = ids(&got.1["auth_chain_ids"]);
    let expected_chain: BTreeSet<String> = a
        .services()
        .rooms
        .auth_chain(room_id(&room), at_m2.iter().map(|id| event_id(id)))
        .expect("db")
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(chain, expected_chain);
    let create = a
        .services()
        .rooms
        .state_event_id(room_id(&room), "m.room.create", "")
        .expect("db")
        .expect("create");
    // From v12 on the create event is no auth event (the room id names it).
    assert_eq!(chain.contains(create.as_str()), version != "12");
    let power = a
        .services()
        .rooms
        .state_event_id(room_id(&room), "m.room.power_levels", "")
        .expect("db")
        .expect("power levels");
    assert!(chain.contains(power.as_str()));
    assert!(!chain.contains(&m1) && !chain.contains(&topic));

    // `/state`: the same, as events.
    let got = get(
        a,
        b,
        &format!("/_matrix/federation/v1/state/{r}?event_id={}", enc(&m2)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let state = &got.1["pdus"];
    assert_eq!(state.as_array().expect("pdus").len(), at_m2.len());
    let keys = state_keys(state);
    for k in [
        ("m.room.create", ""),
        ("m.room.topic", ""),
        ("m.room.history_visibility", ""),
        ("m.room.member", alice.user_id.as_str()),
    ] {
        assert!(keys.contains(&(k.0.to_owned(), k.1.to_owned())), "{k:?}");
    }
    let topic_pdu = state
        .as_array()
        .expect("pdus")
        .iter()
        .find(|p| p["type"] == json!("m.room.topic"))
        .expect("topic");
    assert_eq!(topic_pdu["content"]["topic"], json!("t1"));
    assert_eq!(
        got.1["auth_chain"].as_array().expect("chain").len(),
        chain.len()
    );

    // `/event_auth`: the auth chain of one event.
    let got = get(
        a,
        b,
        &format!("/_matrix/federation/v1/event_auth/{r}/{}", enc(&m3)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let auth = got.1["auth_chain"].as_array().expect("auth_chain");
    let expected = a
        .services()
        .rooms
        .auth_chain(room_id(&room), [event_id(&m3)])
        .expect("db");
    assert_eq!(auth.len(), expected.len());
    let auth_types: HashSet<&str> = auth
        .iter()
        .map(|p| p["type"].as_str().expect("type"))
        .collect();
    assert_eq!(auth_types.contains("m.room.create"), version != "12");
    assert!(auth_types.contains("m.room.power_levels"));
    assert!(auth_types.contains("m.room.member"));
    assert!(!auth_types.contains("m.room.message"));

    // Backfill: the `v` event first, then backwards, deepest first, at most `limit`.
    let got = get(
        a,
        b,
        &format!("/_matrix/federation/v1/backfill/{r}?v={}&limit=3", enc(&m3)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["origin"], json!("a.test"));
    assert_eq!(
        bodies(&got.1["pdus"]),
        vec!["three", "two", "<m.room.topic>"]
    );
    // Everything down to the create event, depths falling.
    let got = get(
        a,
        b,
        &format!(
            "/_matrix/federation/v1/backfill/{r}?v={}&limit=1000",
            enc(&m3)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let all = got.1["pdus"].as_array().expect("pdus");
    let depths: Vec<u64> = all
        .iter()
        .map(|p| p["depth"].as_u64().expect("depth"))
        .collect();
    assert!(depths.windows(2).all(|w| w[0] > w[1]), "{depths:?}");
    assert_eq!(all.last().expect("create")["type"], json!("m.room.create"));
    assert_eq!(depths[0], depths.len() as u64, "a linear room from depth 1");
    // Two `v` events: both are included, and nothing twice.
    let got = get(
        a,
        b,
        &format!(
            "/_matrix/federation/v1/backfill/{r}?v={}&v={}&limit=3",
            enc(&m1),
            enc(&m3)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        bodies(&got.1["pdus"]),
        vec!["three", "two", "<m.room.topic>"]
    );
    let got = get(
        a,
        b,
        &format!("/_matrix/federation/v1/backfill/{r}?v={}&limit=0", enc(&m3)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["pdus"], json!([]));

    // Missing events between m1 (which B has) and m3 (which B got): the topic and m2.
    let path = format!("/_matrix/federation/v1/get_missing_events/{r}");
    let got = from_b(
        a,
        b,
        Method::POST,
        &path,
        Some(json!({ "earliest_events": [m1], "latest_events": [m3] })),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(bodies(&got.1["events"]), vec!["<m.room.topic>", "two"]);
    // `limit` takes the newest first (the walk starts at the latest events).
    let got = from_b(
        a,
        b,
        Method::POST,
        &path,
        Some(json!({ "earliest_events": [m1], "latest_events": [m3], "limit": 1 })),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(bodies(&got.1["events"]), vec!["two"]);
    // `min_depth` stops the walk.
    let m2_depth = a.services().rooms.pdu(&m2).expect("db").expect("m2").depth;
    let got = from_b(
        a,
        b,
        Method::POST,
        &path,
        Some(json!({
            "earliest_events": [],
            "latest_events": [m3],
            "min_depth": u64::from(m2_depth),
        })),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(bodies(&got.1["events"]), vec!["two"]);

    // Unknown events and rooms: 404.
    let other = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let other_msg = send_text(a, &alice, &other, "elsewhere").await;
    let unknown = "$unknownunknownunknownunknownunknownunknown0";
    for path in [
        format!("/_matrix/federation/v1/event/{}", enc(unknown)),
        format!(
            "/_matrix/federation/v1/state_ids/{r}?event_id={}",
            enc(unknown)
        ),
        format!("/_matrix/federation/v1/state/{r}?event_id={}", enc(unknown)),
        format!("/_matrix/federation/v1/event_auth/{r}/{}", enc(unknown)),
        // An event of another room than the path names.
        format!(
            "/_matrix/federation/v1/state_ids/{r}?event_id={}",
            enc(&other_msg)
        ),
        format!("/_matrix/federation/v1/event_auth/{r}/{}", enc(&other_msg)),
        format!(
            "/_matrix/federation/v1/state_ids/{}?event_id={}",
            enc("!nosuchroom:a.test"),
            enc(&m1)
        ),
        format!(
            "/_matrix/federation/v1/backfill/{}?v={}&limit=5",
            enc("!nosuchroom:a.test"),
            enc(&m1)
        ),
    ] {
        let got = get(a, b, &path).await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    // Backfill ignores `v` events that are not in the room.
    let got = get(
        a,
        b,
        &format!(
            "/_matrix/federation/v1/backfill/{r}?v={}&limit=5",
            enc(&other_msg)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["pdus"], json!([]));

    // Malformed requests: 400 with the errcode for what is wrong.
    for (path, errcode) in [
        (
            format!("/_matrix/federation/v1/state_ids/{r}"),
            "M_MISSING_PARAM",
        ),
        (
            format!("/_matrix/federation/v1/state/{r}?event_id=nonsense"),
            "M_INVALID_PARAM",
        ),
        (
            format!("/_matrix/federation/v1/backfill/{r}?limit=5"),
            "M_MISSING_PARAM",
        ),
        (
            format!("/_matrix/federation/v1/backfill/{r}?v={}", enc(&m3)),
            "M_MISSING_PARAM",
        ),
        (
            format!(
                "/_matrix/federation/v1/backfill/{r}?v={}&limit=ten",
                enc(&m3)
            ),
            "M_INVALID_PARAM",
        ),
        (
            format!(
                "/_matrix/federation/v1/backfill/{r}?v={}&limit=-1",
                enc(&m3)
            ),
            "M_INVALID_PARAM",
        ),
        (
            format!("/_matrix/federation/v1/backfill/{r}?v=nonsense&limit=1"),
            "M_INVALID_PARAM",
        ),
        (
            "/_matrix/federation/v1/event/nonsense".to_owned(),
            "M_INVALID_PARAM",
        ),
        (
            format!(
                "/_matrix/federation/v1/state_ids/notaroom?event_id={}",
                enc(&m1)
            ),
            "M_INVALID_PARAM",
        ),
    ] {
        let got = get(a, b, &path).await;
        assert_err(&got, 400, errcode);
    }
    for body in [
        json!({}),
        json!({ "earliest_events": [] }),
        json!({ "earliest_events": [], "latest_events": "x" }),
        json!({ "earliest_events": [], "latest_events": ["nonsense"] }),
        json!({ "earliest_events": [], "latest_events": [], "limit": "ten" }),
        json!({ "earliest_events": [], "latest_events": [], "min_depth": -1 }),
        json!([]),
    ] {
        let got = from_b(a, b, Method::POST, &path, Some(body)).await;
        assert_err(&got, 400, "M_BAD_JSON");
    }

    // Unsigned requests are refused before anything else.
    let got = a
        .req(
            Method::GET,
            &format!("/_matrix/federation/v1/event/{}", enc(&m2)),
            None,
            None,
        )
        .await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
}

/// Every endpoint, asked about `room` at `event`.
fn all_paths(room: &str, event: &str) -> Vec<(Method, String, Option<Value>)> {
    let (r, e) = (enc(room), enc(event));
    vec![
        (
            Method::GET,
            format!("/_matrix/federation/v1/event/{e}"),
            None,
        ),
        (
            Method::GET,
            format!("/_matrix/federation/v1/state/{r}?event_id={e}"),
            None,
        ),
        (
            Method::GET,
            format!("/_matrix/federation/v1/state_ids/{r}?event_id={e}"),
            None,
        ),
        (
            Method::GET,
            format!("/_matrix/federation/v1/event_auth/{r}/{e}"),
            None,
        ),
        (
            Method::GET,
            format!("/_matrix/federation/v1/backfill/{r}?v={e}&limit=10"),
            None,
        ),
        (
            Method::POST,
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(json!({ "earliest_events": [], "latest_events": [event] })),
        ),
    ]
}

#[tokio::test]
async fn rooms_without_the_server_are_forbidden() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    for visibility in ["shared", "joined", "invited"] {
        let room = a
            .create_room(
                &alice,
                json!({
                    "preset": "public_chat",
                    "initial_state": [{
                        "type": "m.room.history_visibility",
                        "state_key": "",
                        "content": { "history_visibility": visibility }
                    }]
                }),
            )
            .await;
        let m = send_text(&a, &alice, &room, "secret").await;
        for (method, path, body) in all_paths(&room, &m) {
            let got = from_b(&a, &b, method, &path, body).await;
            assert_err(&got, 403, "M_FORBIDDEN");
            assert!(
                !got.1.to_string().contains("secret"),
                "{visibility} {path}: {}",
                got.1
            );
        }
    }
    // The service's check says the same.
    let room = a
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let m = send_text(&a, &alice, &room, "x").await;
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    let a_name = <&ServerName>::try_from("a.test").expect("name");
    let rooms = &a.services().rooms;
    assert!(!rooms
        .server_can_see_event(room_id(&room), b_name, event_id(&m))
        .expect("db"));
    assert!(rooms
        .server_can_see_event(room_id(&room), a_name, event_id(&m))
        .expect("db"));
}

#[tokio::test]
async fn history_from_before_the_room_was_world_readable_is_served_redacted() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let room = a
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                "initial_state": [{
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": { "history_visibility": "joined" }
                }]
            }),
        )
        .await;
    let hidden = send_text(&a, &alice, &room, "before").await;
    let change = send_state(
        &a,
        &alice,
        &room,
        "m.room.history_visibility",
        json!({ "history_visibility": "world_readable" }),
    )
    .await;
    let open = send_text(&a, &alice, &room, "after").await;
    let r = enc(&room);

    let got = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/backfill/{r}?v={}&limit=3",
            enc(&open)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let pdus = got.1["pdus"].as_array().expect("pdus");
    assert_eq!(pdus.len(), 3);
    assert_eq!(pdus[0]["content"]["body"], json!("after"));
    // The change itself is visible: it makes the room world readable.
    assert_eq!(pdus[1]["type"], json!("m.room.history_visibility"));
    assert_eq!(
        pdus[1]["content"]["history_visibility"],
        json!("world_readable")
    );
    // The message from before is there (the graph stays whole) but without its content.
    assert_eq!(pdus[2]["type"], json!("m.room.message"));
    assert_eq!(pdus[2]["content"], json!({}));
    assert!(!got.1.to_string().contains("before"));

    let got = get(
        &a,
        &b,
        &format!("/_matrix/federation/v1/event/{}", enc(&hidden)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["pdus"][0]["content"], json!({}));
    let got = get(
        &a,
        &b,
        &format!("/_matrix/federation/v1/event/{}", enc(&open)),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["pdus"][0]["content"]["body"], json!("after"));
    // The state at an event the server may not see is not served.
    let got = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/state_ids/{r}?event_id={}",
            enc(&hidden)
        ),
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/state_ids/{r}?event_id={}",
            enc(&change)
        ),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert!(ids(&got.1["pdu_ids"]).len() >= 5);
    let got = from_b(
        &a,
        &b,
        Method::POST,
        &format!("/_matrix/federation/v1/get_missing_events/{r}"),
        Some(json!({ "earliest_events": [], "latest_events": [open], "limit": 2 })),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let events = got.1["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["content"], json!({}));
    assert_eq!(events[1]["type"], json!("m.room.history_visibility"));
}

#[tokio::test]
async fn server_acl_shuts_a_server_out() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let room = a
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                "creation_content": { "type": "m.space" },
                "initial_state": [{
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": { "history_visibility": "world_readable" }
                }]
            }),
        )
        .await;
    let m = send_text(&a, &alice, &room, "hello").await;
    let hierarchy = format!("/_matrix/federation/v1/hierarchy/{}", enc(&room));

    // An ACL that names other servers only changes nothing for B.
    send_state(
        &a,
        &alice,
        &room,
        "m.room.server_acl",
        json!({ "allow": ["*"], "deny": ["c.test", "*.evil.test"] }),
    )
    .await;
    for (method, path, body) in all_paths(&room, &m) {
        let got = from_b(&a, &b, method, &path, body).await;
        assert_eq!(got.0, StatusCode::OK, "{path}: {}", got.1);
    }
    let got = get(&a, &b, &hierarchy).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["room"]["room_id"], json!(room));

    // Denying B (by a pattern with `?`) shuts it out of the world-readable room everywhere.
    send_state(
        &a,
        &alice,
        &room,
        "m.room.server_acl",
        json!({ "allow": ["*"], "deny": ["b.te?t"] }),
    )
    .await;
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    assert!(!a
        .services()
        .rooms
        .server_acl_allows(room_id(&room), b_name)
        .expect("db"));
    for (method, path, body) in all_paths(&room, &m) {
        let got = from_b(&a, &b, method, &path, body).await;
        assert_err(&got, 403, "M_FORBIDDEN");
        assert!(!got.1.to_string().contains("hello"), "{path}");
    }
    let got = get(&a, &b, &hierarchy).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // An allow list without B shuts it out as well.
    send_state(
        &a,
        &alice,
        &room,
        "m.room.server_acl",
        json!({ "allow": ["a.test"] }),
    )
    .await;
    let got = get(&a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&m))).await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

/// A destination found through DNS SRV: the request connects to the record's target while TLS
/// checks the certificate for the server's (delegated) name, which need not resolve at all.
/// There is no DNS server in tests, so the SRV answer is handed to the destination cache.
#[tokio::test]
async fn srv_destination_connects_to_the_target_and_checks_tls_for_the_name() {
    // A CA and one certificate for localhost and for a name no DNS knows.
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec![
        "localhost".to_owned(),
        "matrix.hafen-srv.invalid".to_owned(),
    ])
    .expect("leaf params")
    .signed_by(&leaf_key, &ca, &ca_key)
    .expect("leaf");
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("cert.pem", leaf.pem()),
        ("key.pem", leaf_key.serialize_pem()),
    ] {
        std::fs::write(dir.path().join(name), pem).expect("write");
    }
    let start = |tls_port: u16| {
        let dir = dir.path().to_owned();
        TestServer::start_with(move |c| {
            c.allow_federation = true;
            c.server_name = format!("localhost:{tls_port}").try_into().expect("name");
            c.tls = Some(hafen::config::TlsConfig {
                certs: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                port: tls_port,
                reload_interval_secs: 60,
            });
            c.federation_ca_file = Some(dir.join("ca.pem"));
            c.federation_ip_range_allowlist = vec!["127.0.0.0/8".into(), "::1/128".into()];
        })
    };
    let (pa, pb) = (free_port(), free_port());
    let a = start(pa).await;
    let b = start(pb).await;
    let alice = a.user("alice").await;
    let (status, _) = a
        .put(
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "displayname": "Alice at A" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let a_name = a.services().config.server_name.clone();

    // As if `_matrix-fed._tcp.matrix.hafen-srv.invalid` named localhost at A's TLS port.
    let srv = hafen::service::federation::destination::Destination {
        url: format!("https://matrix.hafen-srv.invalid:{pa}"),
        pinned: false,
        connect_to: Some("localhost".into()),
        host_header: Some("matrix.hafen-srv.invalid".into()),
    };
    b.services().federation.destinations.remember(
        &a_name,
        srv.clone(),
        std::time::Duration::from_secs(60),
    );
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        enc(&alice.user_id)
    );
    let answer = b
        .services()
        .federation
        .send(Method::GET, &a_name, &path, None)
        .await
        .expect("A answers through the SRV target");
    assert_eq!(answer, json!({ "displayname": "Alice at A" }));

    // A name the certificate does not cover fails TLS even at the right address.
    let c = start(free_port()).await;
    c.services().federation.destinations.remember(
        &a_name,
        hafen::service::federation::destination::Destination {
            url: format!("https://other.hafen-srv.invalid:{pa}"),
            host_header: Some("other.hafen-srv.invalid".into()),
            ..srv.clone()
        },
        std::time::Duration::from_secs(60),
    );
    let err = c
        .services()
        .federation
        .send(Method::GET, &a_name, &path, None)
        .await
        .expect_err("certificate is not for that name");
    assert_eq!(err.errcode(), "M_UNKNOWN");
    assert!(err.to_string().contains("unreachable"), "{err}");

    // A target outside the allowed addresses is refused by the guard.
    let d = TestServer::start_with(|cfg| {
        cfg.allow_federation = true;
        cfg.federation_ca_file = Some(dir.path().join("ca.pem"));
    })
    .await;
    d.services()
        .federation
        .destinations
        .remember(&a_name, srv, std::time::Duration::from_secs(60));
    let err = d
        .services()
        .federation
        .send(Method::GET, &a_name, &path, None)
        .await
        .expect_err("loopback is not public");
    assert!(
        err.to_string().contains("no address that may be reached"),
        "{err}"
    );
}

#[tokio::test]
async fn timestamp_to_event_openid_and_unknown_queries() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let room = a
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": { "history_visibility": "world_readable" } }] }),
        )
        .await;
    let first = send_text(&a, &alice, &room, "first").await;
    let (status, body) = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/timestamp_to_event/{}?ts=0&dir=f",
            enc(&room)
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["origin_server_ts"].as_u64().is_some(), "{body}");
    // Backwards from far in the future: the newest event, our message.
    let (status, body) = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/timestamp_to_event/{}?ts=99999999999999&dir=b",
            enc(&room)
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["event_id"], json!(first));
    let missing_dir = get(
        &a,
        &b,
        &format!(
            "/_matrix/federation/v1/timestamp_to_event/{}?ts=0",
            enc(&room)
        ),
    )
    .await;
    assert_err(&missing_dir, 400, "M_MISSING_PARAM");

    // OpenID: a token alice's client requested names her; anything else is 401.
    let (status, token) = a
        .post(
            &format!(
                "/_matrix/client/v3/user/{}/openid/request_token",
                enc(&alice.user_id)
            ),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{token}");
    let access = token["access_token"].as_str().expect("token");
    let (status, who) = a
        .req(
            Method::GET,
            &format!("/_matrix/federation/v1/openid/userinfo?access_token={access}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert_eq!(who, json!({ "sub": alice.user_id }));
    let bad = a
        .req(
            Method::GET,
            "/_matrix/federation/v1/openid/userinfo?access_token=nope",
            None,
            None,
        )
        .await;
    assert_err(&bad, 401, "M_UNKNOWN_TOKEN");

    let unknown = get(&a, &b, "/_matrix/federation/v1/query/weather?city=x").await;
    assert_err(&unknown, 404, "M_UNRECOGNIZED");
}
