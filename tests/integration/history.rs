//! Room history: `/messages` pagination, filters and visibility; `/context`.
//!
//! Rooms are set up through the room service directly (fast, and independent of createRoom);
//! everything under test goes over HTTP.

use reqwest::{Method, StatusCode};
use ruma::{OwnedRoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use hafen::service::rooms::NewEvent;

use crate::common::{assert_err, enc, TestServer, TestUser};

/// Make a room owned by `owner` with the given room version, join rule and history visibility.
pub async fn make_room(
    s: &TestServer,
    owner: &TestUser,
    version: RoomVersionId,
    join_rule: &str,
    history_visibility: &str,
) -> String {
    let svc = s.services();
    let user = UserId::parse(owner.user_id.as_str()).unwrap();
    let (room, _guard) = svc
        .rooms
        .create_room_event(&version, &user, serde_json::Map::new())
        .await
        .unwrap();
    let rooms = &svc.rooms;
    rooms
        .append_locked(
            &room,
            &user,
            NewEvent::state(
                "m.room.member",
                user.as_str(),
                json!({"membership": "join"}),
            ),
            None,
        )
        .await
        .unwrap();
    // Room versions that privilege creators must not list them in `users`.
    let users = if version == RoomVersionId::V12 {
        json!({})
    } else {
        json!({ user.as_str(): 100 })
    };
    let pl = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.tombstone": 100,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.name": 50,
        },
        "events_default": 0,
        "state_default": 50,
        "invite": 0,
        "ban": 50,
        "kick": 50,
        "redact": 50,
    });
    rooms
        .append_locked(
            &room,
            &user,
            NewEvent::state("m.room.power_levels", "", pl),
            None,
        )
        .await
        .unwrap();
    rooms
        .append_locked(
            &room,
            &user,
            NewEvent::state("m.room.join_rules", "", json!({"join_rule": join_rule})),
            None,
        )
        .await
        .unwrap();
    rooms
        .append_locked(
            &room,
            &user,
            NewEvent::state(
                "m.room.history_visibility",
                "",
                json!({"history_visibility": history_visibility}),
            ),
            None,
        )
        .await
        .unwrap();
    room.to_string()
}

pub async fn send_state(
    s: &TestServer,
    u: &TestUser,
    room: &str,
    kind: &str,
    key: &str,
    content: Value,
) -> String {
    let room = OwnedRoomId::try_from(room).unwrap();
    let user = UserId::parse(u.user_id.as_str()).unwrap();
    let sent = s
        .services()
        .rooms
        .append(&room, &user, NewEvent::state(kind, key, content), None)
        .await
        .unwrap();
    sent.event_id.to_string()
}

pub async fn join(s: &TestServer, u: &TestUser, room: &str) {
    send_state(
        s,
        u,
        room,
        "m.room.member",
        &u.user_id,
        json!({"membership": "join"}),
    )
    .await;
}

pub async fn say(s: &TestServer, u: &TestUser, room: &str, body: &str) -> String {
    let room = OwnedRoomId::try_from(room).unwrap();
    let user = UserId::parse(u.user_id.as_str()).unwrap();
    let content = json!({"msgtype": "m.text", "body": body});
    let sent = s
        .services()
        .rooms
        .append(
            &room,
            &user,
            NewEvent::message("m.room.message", content),
            None,
        )
        .await
        .unwrap();
    sent.event_id.to_string()
}

fn messages_path(room: &str, query: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/messages?{query}", enc(room))
}

fn bodies(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn messages_paginate_both_directions() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "invite", "shared").await;
    for i in 0..30 {
        say(&s, &alice, &room, &format!("m{i}")).await;
    }
    // 5 setup events + 30 messages.
    let total = 35;

    // Backwards from the newest, 10 at a time, chaining `end` into `from`.
    let mut back_ids = Vec::new();
    let mut back_bodies = Vec::new();
    let mut from: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &from {
            Some(f) => format!("dir=b&limit=10&from={f}"),
            None => "dir=b&limit=10".to_owned(),
        };
        let (status, v) = s.get(&messages_path(&room, &q), &alice).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v["start"].is_string(), "{v}");
        if let Some(f) = &from {
            assert_eq!(v["start"], json!(f));
        }
        back_ids.extend(ids(&v["chunk"]));
        back_bodies.extend(bodies(&v["chunk"]));
        pages += 1;
        assert!(pages < 10, "pagination does not end");
        match v.get("end") {
            Some(e) => from = Some(e.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    assert_eq!(back_ids.len(), total);
    assert_eq!(pages, 4);
    let expected: Vec<String> = (0..30).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(back_bodies, expected);

    // The first page holds exactly the 10 newest messages, newest first.
    let (_, v) = s.get(&messages_path(&room, "dir=b"), &alice).await;
    assert_eq!(bodies(&v["chunk"]), expected[..10].to_vec());
    assert_eq!(v["chunk"][0]["room_id"], json!(room));
    assert!(v["chunk"][0]["unsigned"]["age"].is_u64(), "{v}");

    // Forwards from the start: the same events in chronological order.
    let mut fwd_ids = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let q = match &from {
            Some(f) => format!("dir=f&limit=7&from={f}"),
            None => "dir=f&limit=7".to_owned(),
        };
        let (status, v) = s.get(&messages_path(&room, &q), &alice).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        fwd_ids.extend(ids(&v["chunk"]));
        match v.get("end") {
            Some(e) => from = Some(e.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    let mut reversed = back_ids.clone();
    reversed.reverse();
    assert_eq!(fwd_ids, reversed);
    let (_, v) = s.get(&messages_path(&room, "dir=f&limit=1"), &alice).await;
    assert_eq!(v["chunk"][0]["type"], "m.room.create");

    // Tokens sit between events: forwards from a backwards page's `end` starts at its oldest event.
    let (_, v1) = s.get(&messages_path(&room, "dir=b&limit=5"), &alice).await;
    let end = v1["end"].as_str().unwrap().to_owned();
    let (_, v2) = s
        .get(
            &messages_path(&room, &format!("dir=f&limit=3&from={end}")),
            &alice,
        )
        .await;
    assert_eq!(bodies(&v2["chunk"]), vec!["m25", "m26", "m27"]);

    // `to` stops the walk, and then there is no `end`.
    let (_, first) = s.get(&messages_path(&room, "dir=b&limit=3"), &alice).await;
    let to = first["end"].as_str().unwrap().to_owned();
    let (status, v) = s
        .get(
            &messages_path(&room, &format!("dir=b&limit=50&to={to}")),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bodies(&v["chunk"]), vec!["m29", "m28", "m27"]);
    assert!(v.get("end").is_none(), "{v}");
    // Forwards up to the same token: the rest of the room, split at `to` without overlap.
    let forward_to = format!("dir=f&limit=50&from=s0&to={to}");
    let (_, v) = s.get(&messages_path(&room, &forward_to), &alice).await;
    assert_eq!(v["chunk"].as_array().unwrap().len(), total - 3, "{v}");
    assert_eq!(bodies(&v["chunk"]).last().unwrap(), "m26");
    assert!(v.get("end").is_none(), "{v}");

    // A huge limit is capped, not refused.
    let (status, v) = s
        .get(&messages_path(&room, "dir=b&limit=100000"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["chunk"].as_array().unwrap().len(), total);
    assert!(v.get("end").is_none());
    // r0 path works too.
    let (status, _) = s
        .get(
            &format!("/_matrix/client/r0/rooms/{}/messages?dir=b", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn messages_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "invite", "shared").await;
    say(&s, &alice, &room, "hello").await;

    let path = messages_path(&room, "dir=b");
    assert_err(
        &s.req(Method::GET, &path, None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(Method::GET, &path, Some("nope"), None).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.get(&messages_path(&room, ""), &alice).await,
        400,
        "M_MISSING_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=x"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=b&from=garbage"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=b&to=x1"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=b&limit=-1"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=b&limit=ten"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&messages_path(&room, "dir=b&filter=%7Bnot"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(
            &messages_path(&room, "dir=b&filter=%7B%22types%22%3A5%7D"),
            &alice,
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    // Never in the room, and the room is not world readable.
    assert_err(&s.get(&path, &bob).await, 403, "M_FORBIDDEN");
    // Unknown room: the same answer, so room existence does not leak.
    let unknown = format!("!nope:{}", s.server_name());
    assert_err(
        &s.get(&messages_path(&unknown, "dir=b"), &alice).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.get(&messages_path("not-a-room", "dir=b"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn messages_filters_and_lazy_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    join(&s, &bob, &room).await;
    say(&s, &alice, &room, "a1").await;
    say(&s, &bob, &room, "b1").await;
    let r = OwnedRoomId::try_from(room.as_str()).unwrap();
    let bob_id = UserId::parse(bob.user_id.as_str()).unwrap();
    s.services()
        .rooms
        .append(
            &r,
            &bob_id,
            NewEvent::message(
                "m.room.message",
                json!({"msgtype": "m.image", "body": "pic", "url": "mxc://x/y"}),
            ),
            None,
        )
        .await
        .unwrap();
    say(&s, &alice, &room, "a2").await;

    let q = |filter: Value| {
        messages_path(
            &room,
            &format!("dir=b&limit=50&filter={}", enc(&filter.to_string())),
        )
    };

    let (status, v) = s
        .get(&q(json!({"types": ["m.room.message"]})), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(bodies(&v["chunk"]), vec!["a2", "pic", "b1", "a1"]);
    assert_eq!(v["chunk"].as_array().unwrap().len(), 4);

    let (_, v) = s
        .get(
            &q(json!({"types": ["m.room.*"], "not_types": ["m.room.message"]})),
            &alice,
        )
        .await;
    let chunk = v["chunk"].as_array().unwrap();
    assert!(!chunk.is_empty());
    assert!(chunk.iter().all(|e| e["type"] != "m.room.message"), "{v}");

    let (_, v) = s
        .get(
            &q(json!({"types": ["m.room.message"], "senders": [bob.user_id]})),
            &alice,
        )
        .await;
    assert_eq!(bodies(&v["chunk"]), vec!["pic", "b1"]);

    let (_, v) = s
        .get(
            &q(json!({"types": ["m.room.message"], "not_senders": [bob.user_id]})),
            &alice,
        )
        .await;
    assert_eq!(bodies(&v["chunk"]), vec!["a2", "a1"]);

    let (_, v) = s.get(&q(json!({"contains_url": true})), &alice).await;
    assert_eq!(bodies(&v["chunk"]), vec!["pic"]);
    assert_eq!(v["chunk"].as_array().unwrap().len(), 1);

    let (_, v) = s
        .get(
            &q(json!({"types": ["m.room.message"], "contains_url": false})),
            &alice,
        )
        .await;
    assert_eq!(bodies(&v["chunk"]), vec!["a2", "b1", "a1"]);

    // Lazy-loaded members: the member events of the chunk's senders come in `state`.
    let filter =
        json!({"types": ["m.room.message"], "senders": [bob.user_id], "lazy_load_members": true});
    let (_, v) = s.get(&q(filter), &alice).await;
    let state = v["state"].as_array().expect("state");
    assert_eq!(state.len(), 1, "{v}");
    assert_eq!(state[0]["type"], "m.room.member");
    assert_eq!(state[0]["state_key"], json!(bob.user_id));
    // Without lazy loading there is no `state`.
    let (_, v) = s
        .get(&q(json!({"types": ["m.room.message"]})), &alice)
        .await;
    assert!(v.get("state").is_none(), "{v}");
}

#[tokio::test]
async fn messages_respect_history_visibility() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "joined").await;
    say(&s, &alice, &room, "before").await;
    join(&s, &bob, &room).await;
    say(&s, &alice, &room, "after").await;
    send_state(
        &s,
        &bob,
        &room,
        "m.room.member",
        &bob.user_id,
        json!({"membership": "leave"}),
    )
    .await;
    say(&s, &alice, &room, "gone").await;

    let path = messages_path(&room, "dir=b&limit=50");
    let (status, v) = s.get(&path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(bodies(&v["chunk"]), vec!["after"]);
    let (_, v) = s.get(&path, &alice).await;
    assert_eq!(bodies(&v["chunk"]), vec!["gone", "after", "before"]);
    assert_err(&s.get(&path, &carol).await, 403, "M_FORBIDDEN");

    // World readable: anybody with an account may read, even without joining.
    let open = make_room(&s, &alice, RoomVersionId::V12, "invite", "world_readable").await;
    say(&s, &alice, &open, "public words").await;
    let (status, v) = s.get(&messages_path(&open, "dir=b"), &carol).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(bodies(&v["chunk"]), vec!["public words"]);
}

#[tokio::test]
async fn messages_transaction_id_only_for_sending_device() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "invite", "shared").await;
    let r = OwnedRoomId::try_from(room.as_str()).unwrap();
    let user = UserId::parse(alice.user_id.as_str()).unwrap();
    let device: ruma::OwnedDeviceId = alice.device_id.as_str().into();
    s.services()
        .rooms
        .append(
            &r,
            &user,
            NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": "t"})),
            Some((&device, "txn-1")),
        )
        .await
        .unwrap();
    let (_, v) = s.get(&messages_path(&room, "dir=b&limit=1"), &alice).await;
    assert_eq!(v["chunk"][0]["unsigned"]["transaction_id"], "txn-1", "{v}");
    // Another device of the same user does not see it.
    let session = s
        .services()
        .accounts
        .create_session(&user, None, None, false)
        .unwrap();
    let other = TestUser {
        token: session.access_token,
        device_id: session.device_id.to_string(),
        ..alice.clone()
    };
    let (_, v) = s.get(&messages_path(&room, "dir=b&limit=1"), &other).await;
    assert!(
        v["chunk"][0]["unsigned"].get("transaction_id").is_none(),
        "{v}"
    );
}

fn context_path(room: &str, event: &str, query: &str) -> String {
    format!(
        "/_matrix/client/v3/rooms/{}/context/{}?{query}",
        enc(room),
        enc(event)
    )
}

#[tokio::test]
async fn context_around_an_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(say(&s, &alice, &room, &format!("c{i}")).await);
    }
    let (status, v) = s
        .get(&context_path(&room, &ids[5], "limit=4"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["event"]["event_id"], json!(ids[5]));
    assert_eq!(v["event"]["content"]["body"], "c5");
    // events_before is newest first.
    assert_eq!(bodies(&v["events_before"]), vec!["c4", "c3"]);
    assert_eq!(bodies(&v["events_after"]), vec!["c6", "c7"]);
    let state = v["state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "{v}");
    assert!(state
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["state_key"] == json!(alice.user_id)));

    // The tokens continue with /messages.
    let start = v["start"].as_str().unwrap();
    let (_, back) = s
        .get(
            &messages_path(&room, &format!("dir=b&limit=2&from={start}")),
            &alice,
        )
        .await;
    assert_eq!(bodies(&back["chunk"]), vec!["c2", "c1"]);
    let end = v["end"].as_str().unwrap();
    let (_, fwd) = s
        .get(
            &messages_path(&room, &format!("dir=f&limit=5&from={end}")),
            &alice,
        )
        .await;
    assert_eq!(bodies(&fwd["chunk"]), vec!["c8", "c9"]);

    // Default limit and a filter with lazy-loaded members.
    let filter = enc(&json!({"types": ["m.room.message"], "lazy_load_members": true}).to_string());
    let (status, v) = s
        .get(
            &context_path(&room, &ids[1], &format!("filter={filter}")),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(bodies(&v["events_before"]), vec!["c0"]);
    assert_eq!(
        bodies(&v["events_after"]),
        vec!["c2", "c3", "c4", "c5", "c6"]
    );
    let state = v["state"].as_array().unwrap();
    assert_eq!(state.len(), 1, "{v}");
    assert_eq!(state[0]["state_key"], json!(alice.user_id));

    // Errors: unknown event, event of another room, an outsider, no token.
    assert_err(
        &s.get(&context_path(&room, "$nope", ""), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    let other = make_room(&s, &alice, RoomVersionId::V12, "invite", "shared").await;
    assert_err(
        &s.get(&context_path(&other, &ids[0], ""), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.get(&context_path(&room, &ids[0], ""), &bob).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.get(&context_path(&room, &ids[0], "limit=x"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.req(Method::GET, &context_path(&room, &ids[0], ""), None, None)
            .await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test]
async fn context_hides_events_before_join() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "joined").await;
    let early = say(&s, &alice, &room, "early").await;
    join(&s, &bob, &room).await;
    let late = say(&s, &alice, &room, "late").await;
    assert_err(
        &s.get(&context_path(&room, &early, ""), &bob).await,
        404,
        "M_NOT_FOUND",
    );
    let (status, v) = s.get(&context_path(&room, &late, ""), &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(bodies(&v["events_before"]).is_empty(), "{v}");
}

/// End to end over HTTP: createRoom, send, sync with a small timeline, then fill the gap with
/// `/messages` from sync's `prev_batch` without repeats or holes.
#[tokio::test]
async fn sync_prev_batch_continues_with_messages() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(&alice, json!({"preset": "private_chat"}))
        .await;
    for i in 0..15 {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/t{i}",
            enc(&room)
        );
        let (status, v) = s
            .put(
                &path,
                &alice,
                json!({"msgtype": "m.text", "body": format!("h{i}")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let filter = enc(&json!({"room": {"timeline": {"limit": 5}}}).to_string());
    let (status, v) = s
        .get(&format!("/_matrix/client/v3/sync?filter={filter}"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let timeline = &v["rooms"]["join"][&room]["timeline"];
    assert_eq!(
        bodies(&timeline["events"]),
        vec!["h10", "h11", "h12", "h13", "h14"]
    );
    let prev = timeline["prev_batch"].as_str().unwrap();
    let (status, v) = s
        .get(
            &messages_path(&room, &format!("dir=b&limit=10&from={prev}")),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let expected: Vec<String> = (0..10).rev().map(|i| format!("h{i}")).collect();
    assert_eq!(bodies(&v["chunk"]), expected);
    // The sending device gets its transaction ids back.
    assert_eq!(v["chunk"][0]["unsigned"]["transaction_id"], "t9");
}

#[tokio::test]
async fn timestamp_to_event_finds_the_nearest_visible_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let eve = s.user("eve").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let first = say(&s, &alice, &room, "one").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let second = say(&s, &alice, &room, "two").await;
    let ts_of = |v: &Value| v["origin_server_ts"].as_u64().expect("ts");
    let (_, e1) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&first)
            ),
            &alice,
        )
        .await;
    let (_, e2) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&second)
            ),
            &alice,
        )
        .await;
    let (t1, t2) = (ts_of(&e1), ts_of(&e2));
    assert!(t2 > t1);
    let path = |ts: u64, dir: &str| {
        format!(
            "/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}",
            enc(&room)
        )
    };
    let (status, body) = s.get(&path(t1 + 1, "f"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "event_id": second, "origin_server_ts": t2 }));
    let (_, body) = s.get(&path(t2 - 1, "b"), &alice).await;
    assert_eq!(body, json!({ "event_id": first, "origin_server_ts": t1 }));
    let (_, body) = s.get(&path(t2, "b"), &alice).await;
    assert_eq!(body["event_id"], json!(second));
    let got = s.get(&path(t2 + 100_000, "f"), &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s.get(&path(t1, "x"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .get(
            &format!(
                "/_matrix/client/v1/rooms/{}/timestamp_to_event?dir=f",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s.get(&path(t1, "f"), &eve).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // The deprecated /events/{eventId} finds the event without its room.
    let (status, body) = s
        .get(
            &format!("/_matrix/client/v3/events/{}", enc(&first)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"]["body"], json!("one"));
    let got = s
        .get(&format!("/_matrix/client/v3/events/{}", enc(&first)), &eve)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}
