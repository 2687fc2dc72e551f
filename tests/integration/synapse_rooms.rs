//! Rooms shared between Hafen and a real Synapse (`SynapsePeer`): remote joins both ways (by
//! room id with `via`, by alias, by room id alone after an invite), invites both ways, messages
//! and state both ways, leaves, typing notices and read receipts, key queries of room members,
//! and room versions besides Synapse's default 12.
//!
//! Run just these: `scripts/synapse-venv.sh && cargo test --test integration synapse_rooms`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    common::{enc, start_federating, TestPki, TestServer, TestUser},
    synapse::{signed_device_keys, SynapsePeer},
};

const V3: &str = "/_matrix/client/v3";

// ---------------------------------------------------------------------------------------------
// Hafen side (as in federation_rooms.rs)

/// Poll `GET path` on Hafen as `user` until `pred` holds on the body (30 s at most).
async fn wait_for(
    server: &TestServer,
    user: &TestUser,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (status, body) = server.get(path, user).await;
        if status == StatusCode::OK && pred(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what} on Hafen; last answer: {last}");
}

/// The bodies of the room's `m.room.message` events in a `/messages` chunk, oldest first.
fn bodies(chunk: &Value) -> Vec<String> {
    let mut out: Vec<String> = chunk
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    out.reverse();
    out
}

/// The message bodies of a room as a Hafen user sees them (`/messages`), oldest first.
async fn h_messages(server: &TestServer, user: &TestUser, room: &str) -> Vec<String> {
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(room)),
            user,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen /messages: {body}");
    bodies(&body["chunk"])
}

async fn h_wait_messages(server: &TestServer, user: &TestUser, room: &str, want: &[&str]) {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = h_messages(server, user, room).await;
        if want.iter().all(|w| last.iter().any(|m| m == w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} on Hafen never saw {want:?}; saw {last:?}", user.user_id);
}

async fn h_say(server: &TestServer, user: &TestUser, room: &str, text: &str) -> String {
    let (status, body) = server
        .put(
            &format!(
                "{V3}/rooms/{}/send/m.room.message/{}",
                enc(room),
                crate::common::unique_txn()
            ),
            user,
            json!({ "msgtype": "m.text", "body": text }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen send: {body}");
    let id = body["event_id"].as_str().expect("event id").to_owned();
    assert!(id.starts_with('$'), "{body}");
    id
}

async fn h_membership(server: &TestServer, user: &TestUser, room: &str, who: &str) -> Value {
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(room), enc(who)),
            user,
        )
        .await;
    if status == StatusCode::OK {
        body["membership"].clone()
    } else {
        Value::Null
    }
}

async fn h_wait_membership(server: &TestServer, user: &TestUser, room: &str, who: &str, m: &str) {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = h_membership(server, user, room, who).await;
        if last == json!(m) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{who} never became {m} in {room} as Hafen's {} sees it (last: {last})",
        user.user_id
    );
}

/// A Hafen user joins by room id or alias through `via` (may be empty); the join must succeed.
async fn h_join(server: &TestServer, user: &TestUser, room_or_alias: &str, via: &[&str]) -> String {
    let query: Vec<String> = via.iter().map(|v| format!("via={}", enc(v))).collect();
    let path = if query.is_empty() {
        format!("{V3}/join/{}", enc(room_or_alias))
    } else {
        format!("{V3}/join/{}?{}", enc(room_or_alias), query.join("&"))
    };
    let (status, body) = server.post(&path, user, json!({})).await;
    assert_eq!(status, StatusCode::OK, "Hafen join {room_or_alias}: {body}");
    body["room_id"].as_str().expect("room_id").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Synapse side

/// A Synapse user: id and access token.
struct SUser {
    id: String,
    token: String,
}

async fn s_user(synapse: &SynapsePeer, localpart: &str) -> SUser {
    let (id, token) = synapse.register(localpart).await;
    SUser { id, token }
}

async fn s_req(
    synapse: &SynapsePeer,
    method: Method,
    path: &str,
    u: &SUser,
    body: Option<Value>,
) -> (StatusCode, Value) {
    synapse.client_req(method, path, Some(&u.token), body).await
}

async fn s_create_room(synapse: &SynapsePeer, u: &SUser, body: Value) -> String {
    let (status, v) = s_req(
        synapse,
        Method::POST,
        &format!("{V3}/createRoom"),
        u,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse createRoom: {v}");
    v["room_id"].as_str().expect("room_id").to_owned()
}

async fn s_say(synapse: &SynapsePeer, u: &SUser, room: &str, text: &str) -> String {
    let (status, v) = s_req(
        synapse,
        Method::PUT,
        &format!(
            "{V3}/rooms/{}/send/m.room.message/{}",
            enc(room),
            crate::common::unique_txn()
        ),
        u,
        Some(json!({ "msgtype": "m.text", "body": text })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse send: {v}");
    v["event_id"].as_str().expect("event_id").to_owned()
}

async fn s_messages(synapse: &SynapsePeer, u: &SUser, room: &str) -> Vec<String> {
    let (status, v) = s_req(
        synapse,
        Method::GET,
        &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(room)),
        u,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse /messages: {v}");
    bodies(&v["chunk"])
}

async fn s_wait_messages(synapse: &SynapsePeer, u: &SUser, room: &str, want: &[&str]) {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = s_messages(synapse, u, room).await;
        if want.iter().all(|w| last.iter().any(|m| m == w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} on Synapse never saw {want:?}; saw {last:?}", u.id);
}

/// A state event's content as a Synapse user sees it (None when absent).
async fn s_state(
    synapse: &SynapsePeer,
    u: &SUser,
    room: &str,
    kind: &str,
    key: &str,
) -> Option<Value> {
    let (status, v) = s_req(
        synapse,
        Method::GET,
        &format!("{V3}/rooms/{}/state/{kind}/{}", enc(room), enc(key)),
        u,
        None,
    )
    .await;
    (status == StatusCode::OK).then_some(v)
}

/// Poll a state event on Synapse until `pred` holds on its content.
async fn s_wait_state(
    synapse: &SynapsePeer,
    u: &SUser,
    room: &str,
    kind: &str,
    key: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = None;
    for _ in 0..300 {
        last = s_state(synapse, u, room, kind, key).await;
        if let Some(v) = &last {
            if pred(v) {
                return v.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{kind}/{key} in {room} never matched on Synapse (seen by {}); last: {last:?}",
        u.id
    );
}

async fn s_wait_membership(synapse: &SynapsePeer, u: &SUser, room: &str, who: &str, m: &str) {
    s_wait_state(synapse, u, room, "m.room.member", who, |v| {
        v["membership"] == json!(m)
    })
    .await;
}

/// Synapse's `/sync` until `pred` holds on a response: an initial sync, then incremental long
/// polls (Synapse caches identical sync requests, so a repeated initial sync would not change).
async fn s_sync_until(
    synapse: &SynapsePeer,
    u: &SUser,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let (status, mut v) = s_req(
        synapse,
        Method::GET,
        &format!("{V3}/sync?timeout=0"),
        u,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse sync: {v}");
    for _ in 0..60 {
        if pred(&v) {
            return v;
        }
        let since = v["next_batch"].as_str().expect("next_batch").to_owned();
        let (status, next) = s_req(
            synapse,
            Method::GET,
            &format!("{V3}/sync?timeout=1000&since={}", enc(&since)),
            u,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "Synapse sync: {next}");
        v = next;
    }
    panic!("Synapse's sync for {} never showed {what}; last: {v}", u.id);
}

// ---------------------------------------------------------------------------------------------

/// A room made on Synapse (its default version 12: the room id names no server), joined from
/// Hafen by room id with `via`, and another by alias; messages and state both ways; leave.
#[tokio::test]
async fn synapse_room_joined_from_hafen() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    let room = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "public_chat", "name": "Synapse lobby" }),
    )
    .await;
    assert!(!room.contains(':'), "a v12 room id has no server: {room}");
    let (status, v) = s_req(
        &synapse,
        Method::GET,
        &format!("{V3}/rooms/{}/state/m.room.create/", enc(&room)),
        &sam,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["room_version"], json!("12"), "{v}");

    // Hafen joins by room id, through Synapse.
    let joined = h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    assert_eq!(joined, room);
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
    assert_eq!(
        h_membership(&hafen, &hanna, &room, &hanna.user_id).await,
        json!("join")
    );
    let (status, v) = hafen
        .get(
            &format!("{V3}/rooms/{}/state/m.room.name/", enc(&room)),
            &hanna,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "name": "Synapse lobby" }));
    let (status, v) = hafen.get(&format!("{V3}/joined_rooms"), &hanna).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "joined_rooms": [room] }));

    // Messages both ways.
    s_say(&synapse, &sam, &room, "hello from synapse").await;
    h_wait_messages(&hafen, &hanna, &room, &["hello from synapse"]).await;
    let sync = wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync"),
        "Synapse's message in sync",
        |s| {
            s["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .is_some_and(|t| {
                    t.iter()
                        .any(|e| e["content"]["body"] == "hello from synapse")
                })
        },
    )
    .await;
    let event = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .and_then(|t| {
            t.iter()
                .find(|e| e["content"]["body"] == "hello from synapse")
        })
        .cloned()
        .expect("the message");
    assert_eq!(event["sender"], json!(sam.id));
    assert_eq!(event["type"], json!("m.room.message"));
    h_say(&hafen, &hanna, &room, "hello from hafen").await;
    s_wait_messages(
        &synapse,
        &sam,
        &room,
        &["hello from synapse", "hello from hafen"],
    )
    .await;

    // A state change on Synapse (topic) reaches Hafen.
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!("{V3}/rooms/{}/state/m.room.topic/", enc(&room)),
        &sam,
        Some(json!({ "topic": "set on synapse" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["event_id"].is_string(), "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/rooms/{}/state/m.room.topic/", enc(&room)),
        "the topic on Hafen",
        |t| t["topic"] == "set on synapse",
    )
    .await;

    // One on Hafen (hanna's member event with a display name) reaches Synapse.
    let (status, v) = hafen
        .put(
            &format!(
                "{V3}/rooms/{}/state/m.room.member/{}",
                enc(&room),
                enc(&hanna.user_id)
            ),
            &hanna,
            json!({ "membership": "join", "displayname": "Hanna from Hafen" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["event_id"].is_string(), "{v}");
    let member = s_wait_state(
        &synapse,
        &sam,
        &room,
        "m.room.member",
        &hanna.user_id,
        |m| m["displayname"] == "Hanna from Hafen",
    )
    .await;
    assert_eq!(member["membership"], json!("join"));

    // A second room, with an alias: Hafen joins by the alias, which it resolves at Synapse.
    let room2 = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "public_chat", "room_alias_name": "x" }),
    )
    .await;
    let alias = format!("#x:{}", synapse.server_name);
    let joined = h_join(&hafen, &hanna, &alias, &[]).await;
    assert_eq!(joined, room2);
    s_wait_membership(&synapse, &sam, &room2, &hanna.user_id, "join").await;
    h_say(&hafen, &hanna, &room2, "joined by alias").await;
    s_wait_messages(&synapse, &sam, &room2, &["joined by alias"]).await;

    // Hanna leaves the first room: Synapse sees it.
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "leave").await;
    let (status, v) = hafen.get(&format!("{V3}/joined_rooms"), &hanna).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "joined_rooms": [room2] }));

    // Sam talks while Hafen is out of the room; hanna comes back (Hafen has the room's old
    // state) and both sides go on.
    s_say(&synapse, &sam, &room, "while hanna was away").await;
    let joined = h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    assert_eq!(joined, room);
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
    assert_eq!(
        h_membership(&hafen, &hanna, &room, &hanna.user_id).await,
        json!("join")
    );
    s_say(&synapse, &sam, &room, "welcome back").await;
    h_wait_messages(&hafen, &hanna, &room, &["welcome back"]).await;
    h_say(&hafen, &hanna, &room, "glad to be back").await;
    s_wait_messages(&synapse, &sam, &room, &["glad to be back"]).await;

    hafen.stop().await;
}

/// A room made on Hafen, joined from Synapse; messages both ways; Hafen invites a second
/// Synapse user, who sees the invite and joins; a Synapse user leaves.
#[tokio::test]
async fn hafen_room_joined_from_synapse() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let sue = s_user(&synapse, "sue").await;
    let hanna = hafen.user("hanna").await;

    let room = hafen
        .create_room(
            &hanna,
            json!({ "preset": "public_chat", "name": "Hafen harbour" }),
        )
        .await;
    h_say(&hafen, &hanna, &room, "before sam").await;

    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?via={}", enc(&room), enc(&hafen.server_name())),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse join of a Hafen room: {v}");
    assert_eq!(v, json!({ "room_id": room }));
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "join").await;
    let name = s_state(&synapse, &sam, &room, "m.room.name", "").await;
    assert_eq!(name, Some(json!({ "name": "Hafen harbour" })));

    // Messages both ways.
    s_say(&synapse, &sam, &room, "sam says hi").await;
    h_wait_messages(&hafen, &hanna, &room, &["before sam", "sam says hi"]).await;
    h_say(&hafen, &hanna, &room, "hanna says hi").await;
    // "before sam" predates Synapse's join: Synapse backfills it from Hafen.
    s_wait_messages(
        &synapse,
        &sam,
        &room,
        &["before sam", "sam says hi", "hanna says hi"],
    )
    .await;

    // Hanna invites sue; sue's sync on Synapse shows the invite, and she joins.
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/invite", enc(&room)),
            &hanna,
            json!({ "user_id": sue.id }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Hafen invite of a Synapse user: {v}"
    );
    assert_eq!(v, json!({}));
    let sync = s_sync_until(&synapse, &sue, "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        invite_state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == json!(sue.id)
            && e["content"]["membership"] == "invite"
            && e["sender"] == json!(hanna.user_id)),
        "{invite_state:?}"
    );
    // The room's state went along as PDUs (which Synapse checks) and reached sue's client.
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Hafen harbour"),
        "{invite_state:?}"
    );
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.create" && e["sender"] == json!(hanna.user_id)),
        "{invite_state:?}"
    );
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/join", enc(&room)),
        &sue,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse join after invite: {v}");
    assert_eq!(v, json!({ "room_id": room }));
    h_wait_membership(&hafen, &hanna, &room, &sue.id, "join").await;
    s_say(&synapse, &sue, &room, "sue is here").await;
    h_wait_messages(&hafen, &hanna, &room, &["sue is here"]).await;

    // Sam leaves: Hafen sees it.
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/leave", enc(&room)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "leave").await;
    // Sue is still there and still hears Hafen.
    h_say(&hafen, &hanna, &room, "after sam left").await;
    s_wait_messages(&synapse, &sue, &room, &["after sam left"]).await;

    hafen.stop().await;
}

/// A Synapse user invites a Hafen user to a private room: the invite shows in Hafen's sync with
/// the room's name, and the Hafen user joins by room id alone (through the inviting server).
#[tokio::test]
async fn synapse_invite_of_hafen_user() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    let room = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "private_chat", "name": "Secret", "invite": [hanna.user_id] }),
    )
    .await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "invite").await;

    let sync = wait_for(&hafen, &hanna, &format!("{V3}/sync"), "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Secret"),
        "{invite_state:?}"
    );
    assert!(
        invite_state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == json!(hanna.user_id)
            && e["content"]["membership"] == "invite"),
        "{invite_state:?}"
    );
    // Synapse sent the state as signed PDUs; the client gets them checked and stripped.
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.create" && e["sender"] == json!(sam.id)),
        "{invite_state:?}"
    );
    for e in &invite_state {
        let mut keys: Vec<&str> = e
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["content", "sender", "state_key", "type"], "{e}");
    }

    // Join by room id alone: Hafen goes through the inviting server.
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/join", enc(&room)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "room_id": room }));
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
    h_say(&hafen, &hanna, &room, "thanks for the invite").await;
    s_wait_messages(&synapse, &sam, &room, &["thanks for the invite"]).await;
    s_say(&synapse, &sam, &room, "welcome").await;
    h_wait_messages(&hafen, &hanna, &room, &["welcome"]).await;

    hafen.stop().await;
}

/// In a shared room: Hafen's key query finds the Synapse user's device; typing notices and read
/// receipts go both ways.
#[tokio::test]
async fn keys_typing_and_receipts_in_a_shared_room() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    let s_device = synapse.device_id(&sam.token).await;
    let s_keys = signed_device_keys(&sam.id, &s_device);
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/keys/upload"),
        &sam,
        Some(json!({ "device_keys": s_keys })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    let room = s_create_room(&synapse, &sam, json!({ "preset": "public_chat" })).await;
    h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;

    // Key query while sharing the room.
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/query"),
            &hanna,
            json!({ "device_keys": { sam.id.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["failures"], json!({}), "{v}");
    let got = &v["device_keys"][&sam.id][&s_device];
    for field in ["user_id", "device_id", "algorithms", "keys", "signatures"] {
        assert_eq!(got[field], s_keys[field], "{field} of {v}");
    }

    // A new device of sam's (a second login with keys) reaches Hafen as a device-list update:
    // hanna's sync lists sam as changed, and a new query shows both devices.
    let (_, since) = {
        let (status, v) = hafen.get(&format!("{V3}/sync"), &hanna).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        (
            v.clone(),
            v["next_batch"].as_str().expect("next_batch").to_owned(),
        )
    };
    let (status, v) = synapse
        .client_req(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "sam" },
                "password": "interop-password",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sam2 = SUser {
        id: sam.id.clone(),
        token: v["access_token"].as_str().expect("token").to_owned(),
    };
    let s_device2 = v["device_id"].as_str().expect("device_id").to_owned();
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/keys/upload"),
        &sam2,
        Some(json!({ "device_keys": signed_device_keys(&sam.id, &s_device2) })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync?since={}&timeout=500", enc(&since)),
        "sam's device list change",
        |s| {
            s["device_lists"]["changed"]
                .as_array()
                .is_some_and(|c| c.contains(&json!(sam.id)))
        },
    )
    .await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/query"),
            &hanna,
            json!({ "device_keys": { sam.id.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let devices = v["device_keys"][&sam.id].as_object().expect("devices");
    assert!(
        devices.contains_key(&s_device) && devices.contains_key(&s_device2),
        "{v}"
    );

    // And the other way: a new Hafen device with keys shows in sam's sync as a change.
    let (status, v) = s_req(
        &synapse,
        Method::GET,
        &format!("{V3}/sync?timeout=0"),
        &sam,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let s_since = v["next_batch"].as_str().expect("next_batch").to_owned();
    let h_keys = signed_device_keys(&hanna.user_id, &hanna.device_id);
    let (status, v) = hafen
        .post(
            &format!("{V3}/keys/upload"),
            &hanna,
            json!({ "device_keys": h_keys }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut since_tok = s_since;
    let mut seen = false;
    for _ in 0..30 {
        let (status, v) = s_req(
            &synapse,
            Method::GET,
            &format!("{V3}/sync?timeout=1000&since={}", enc(&since_tok)),
            &sam,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if v["device_lists"]["changed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(hanna.user_id)))
        {
            seen = true;
            break;
        }
        since_tok = v["next_batch"].as_str().expect("next_batch").to_owned();
    }
    assert!(seen, "Synapse's sync never listed hanna's device change");
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/keys/query"),
        &sam,
        Some(json!({ "device_keys": { hanna.user_id.clone(): [] } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["device_keys"][&hanna.user_id][&hanna.device_id]["keys"], h_keys["keys"],
        "{v}"
    );

    // Synapse -> Hafen: typing.
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!("{V3}/rooms/{}/typing/{}", enc(&room), enc(&sam.id)),
        &sam,
        Some(json!({ "typing": true, "timeout": 30000 })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let ephemeral = |s: &Value, kind: &str| -> Option<Value> {
        s["rooms"]["join"][&room]["ephemeral"]["events"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["type"] == kind).cloned())
    };
    let sync = wait_for(&hafen, &hanna, &format!("{V3}/sync"), "sam typing", |s| {
        ephemeral(s, "m.typing").is_some_and(|t| t["content"]["user_ids"] == json!([sam.id]))
    })
    .await;
    assert!(ephemeral(&sync, "m.typing").is_some());

    // Synapse -> Hafen: a read receipt.
    let event = s_say(&synapse, &sam, &room, "read me").await;
    h_wait_messages(&hafen, &hanna, &room, &["read me"]).await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sync = wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync"),
        "sam's receipt",
        |s| {
            ephemeral(s, "m.receipt")
                .is_some_and(|r| r["content"][&event]["m.read"].get(&sam.id).is_some())
        },
    )
    .await;
    let receipt = ephemeral(&sync, "m.receipt").expect("receipt");
    assert!(
        receipt["content"][&event]["m.read"][&sam.id]["ts"].is_u64(),
        "{receipt}"
    );

    // Hafen -> Synapse: typing.
    let (status, v) = hafen
        .put(
            &format!("{V3}/rooms/{}/typing/{}", enc(&room), enc(&hanna.user_id)),
            &hanna,
            json!({ "typing": true, "timeout": 30000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    s_sync_until(&synapse, &sam, "hanna typing", |s| {
        ephemeral(s, "m.typing").is_some_and(|t| {
            t["content"]["user_ids"]
                .as_array()
                .is_some_and(|u| u.contains(&json!(hanna.user_id)))
        })
    })
    .await;

    // Hafen -> Synapse: a read receipt.
    let event = h_say(&hafen, &hanna, &room, "read me too").await;
    s_wait_messages(&synapse, &sam, &room, &["read me too"]).await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let sync = s_sync_until(&synapse, &sam, "hanna's receipt", |s| {
        ephemeral(s, "m.receipt")
            .is_some_and(|r| r["content"][&event]["m.read"].get(&hanna.user_id).is_some())
    })
    .await;
    let receipt = ephemeral(&sync, "m.receipt").expect("receipt");
    assert!(
        receipt["content"][&event]["m.read"][&hanna.user_id]["ts"].is_u64(),
        "{receipt}"
    );

    hafen.stop().await;
}

/// Room versions besides 12: rooms of older versions made on Synapse and joined from Hafen (the
/// room id names Synapse, so no `via` is needed), and made on Hafen joined from Synapse.
#[tokio::test]
async fn older_room_versions_both_ways() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    for version in ["10", "11", "1"] {
        let room = s_create_room(
            &synapse,
            &sam,
            json!({ "preset": "public_chat", "room_version": version }),
        )
        .await;
        assert!(
            room.ends_with(&format!(":{}", synapse.server_name)),
            "{room}"
        );
        let joined = h_join(&hafen, &hanna, &room, &[]).await;
        assert_eq!(joined, room);
        s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
        let (status, v) = hafen
            .get(
                &format!("{V3}/rooms/{}/state/m.room.create/", enc(&room)),
                &hanna,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["room_version"], json!(version), "{v}");
        let from_synapse = format!("synapse in v{version}");
        let from_hafen = format!("hafen in v{version}");
        s_say(&synapse, &sam, &room, &from_synapse).await;
        h_wait_messages(&hafen, &hanna, &room, &[&from_synapse]).await;
        h_say(&hafen, &hanna, &room, &from_hafen).await;
        s_wait_messages(&synapse, &sam, &room, &[&from_hafen]).await;
    }

    // Rooms of older versions made on Hafen, joined from Synapse (version 1 has event ids
    // naming their server, 3 the first hash ids, 10 integer-only power levels).
    for version in ["10", "3", "1"] {
        let room = hafen
            .create_room(
                &hanna,
                json!({ "preset": "public_chat", "room_version": version }),
            )
            .await;
        let (status, v) = s_req(
            &synapse,
            Method::POST,
            // Synapse does not try the room id's server by itself: it is named.
            &format!("{V3}/join/{}?via={}", enc(&room), enc(&hafen.server_name())),
            &sam,
            Some(json!({})),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "Synapse joining a v{version} Hafen room: {v}"
        );
        assert_eq!(v, json!({ "room_id": room }));
        h_wait_membership(&hafen, &hanna, &room, &sam.id, "join").await;
        let create = s_state(&synapse, &sam, &room, "m.room.create", "").await;
        assert_eq!(
            create.as_ref().map(|c| c["room_version"].clone()),
            Some(json!(version)),
            "{create:?}"
        );
        let from_synapse = format!("sam in a hafen v{version} room");
        let from_hafen = format!("hanna in her v{version} room");
        s_say(&synapse, &sam, &room, &from_synapse).await;
        h_wait_messages(&hafen, &hanna, &room, &[&from_synapse]).await;
        let id = h_say(&hafen, &hanna, &room, &from_hafen).await;
        s_wait_messages(&synapse, &sam, &room, &[&from_hafen]).await;
        if version == "1" {
            assert!(id.ends_with(&format!(":{}", hafen.server_name())), "{id}");
        }
    }

    hafen.stop().await;
}

/// Knocking both ways: a Hafen user knocks on a Synapse room (and is let in), a Synapse user
/// knocks on a Hafen room (and is let in); the knocker's client sees the room's stripped state.
#[tokio::test]
async fn knocks_both_ways() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    // Hafen knocks on a Synapse room.
    let room = s_create_room(
        &synapse,
        &sam,
        json!({
            "preset": "private_chat",
            "name": "Knock here",
            "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                                "content": { "join_rule": "knock" } }],
        }),
    )
    .await;
    let (status, v) = hafen
        .post(
            &format!(
                "{V3}/knock/{}?via={}",
                enc(&room),
                enc(&synapse.server_name)
            ),
            &hanna,
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "Hafen knock on Synapse: {v}");
    assert_eq!(v, json!({ "room_id": room }));
    let member = s_wait_state(
        &synapse,
        &sam,
        &room,
        "m.room.member",
        &hanna.user_id,
        |m| m["membership"] == "knock",
    )
    .await;
    assert_eq!(member["reason"], json!("let me in"));
    let sync = wait_for(&hafen, &hanna, &format!("{V3}/sync"), "the knock", |s| {
        s["rooms"]["knock"].get(&room).is_some()
    })
    .await;
    let knock_state = sync["rooms"]["knock"][&room]["knock_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        knock_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock here"),
        "{knock_state:?}"
    );
    // Sam lets her in (an invite of a knocking user); she joins by room id alone.
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/invite", enc(&room)),
        &sam,
        Some(json!({ "user_id": hanna.user_id })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(&hafen, &hanna, &format!("{V3}/sync"), "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/join", enc(&room)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "room_id": room }));
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;

    // Synapse knocks on a Hafen room.
    let room = hafen
        .create_room(
            &hanna,
            json!({
                "preset": "private_chat",
                "name": "Hafen door",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                                    "content": { "join_rule": "knock" } }],
            }),
        )
        .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!(
            "{V3}/knock/{}?via={}",
            enc(&room),
            enc(&hafen.server_name())
        ),
        &sam,
        Some(json!({ "reason": "knock knock" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "Synapse knock on Hafen: {v}");
    assert_eq!(v, json!({ "room_id": room }));
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "knock").await;
    let sync = s_sync_until(&synapse, &sam, "the knock", |s| {
        s["rooms"]["knock"].get(&room).is_some()
    })
    .await;
    let knock_state = sync["rooms"]["knock"][&room]["knock_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        knock_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Hafen door"),
        "{knock_state:?}"
    );
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/invite", enc(&room)),
            &hanna,
            json!({ "user_id": sam.id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    s_sync_until(&synapse, &sam, "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/join", enc(&room)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "room_id": room }));
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "join").await;

    hafen.stop().await;
}

/// Redactions both ways, and a Synapse moderator kicking then banning a Hafen user.
#[tokio::test]
async fn redactions_kick_and_ban_across() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;
    let room = s_create_room(&synapse, &sam, json!({ "preset": "public_chat" })).await;
    h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;

    // Synapse redacts its own message: Hafen no longer shows the body.
    let event = s_say(&synapse, &sam, &room, "oops from synapse").await;
    h_wait_messages(&hafen, &hanna, &room, &["oops from synapse"]).await;
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!(
            "{V3}/rooms/{}/redact/{}/{}",
            enc(&room),
            enc(&event),
            crate::common::unique_txn()
        ),
        &sam,
        Some(json!({ "reason": "typo" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&event)),
        "the redaction on Hafen",
        |e| e["content"] == json!({}) && e["unsigned"]["redacted_because"].is_object(),
    )
    .await;

    // Hafen redacts its own message: Synapse no longer shows the body.
    let event = h_say(&hafen, &hanna, &room, "oops from hafen").await;
    s_wait_messages(&synapse, &sam, &room, &["oops from hafen"]).await;
    let (status, v) = hafen
        .put(
            &format!(
                "{V3}/rooms/{}/redact/{}/{}",
                enc(&room),
                enc(&event),
                crate::common::unique_txn()
            ),
            &hanna,
            json!({ "reason": "typo" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut last = Value::Null;
    for _ in 0..300 {
        let (status, v) = s_req(
            &synapse,
            Method::GET,
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&event)),
            &sam,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if v["content"] == json!({}) {
            last = v;
            break;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["content"], json!({}), "Synapse still shows {last}");

    // Sam kicks hanna: Hafen's sync shows the room left; she rejoins; sam bans her.
    let (status, v) = hafen.get(&format!("{V3}/sync"), &hanna).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let since = v["next_batch"].as_str().expect("next_batch").to_owned();
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/kick", enc(&room)),
        &sam,
        Some(json!({ "user_id": hanna.user_id, "reason": "out" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/joined_rooms"),
        "the kick",
        |j| j["joined_rooms"] == json!([]),
    )
    .await;
    let sync = wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync?since={}", enc(&since)),
        "the room left",
        |s| s["rooms"]["leave"].get(&room).is_some(),
    )
    .await;
    assert!(sync["rooms"]["join"].get(&room).is_none(), "{sync}");
    let kick = sync["rooms"]["leave"][&room]["timeline"]["events"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["type"] == "m.room.member").cloned())
        .expect("the kick in the left room's timeline");
    assert_eq!(kick["sender"], json!(sam.id), "{kick}");
    assert_eq!(kick["state_key"], json!(hanna.user_id), "{kick}");
    assert_eq!(kick["content"]["membership"], json!("leave"), "{kick}");
    assert_eq!(kick["content"]["reason"], json!("out"), "{kick}");
    h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/ban", enc(&room)),
        &sam,
        Some(json!({ "user_id": hanna.user_id, "reason": "enough" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/joined_rooms"),
        "the ban",
        |j| j["joined_rooms"] == json!([]),
    )
    .await;
    // A banned user's join is refused by Synapse, with its answer.
    let (status, v) = hafen
        .post(
            &format!("{V3}/join/{}?via={}", enc(&room), enc(&synapse.server_name)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["errcode"], json!("M_FORBIDDEN"), "{v}");

    hafen.stop().await;
}

/// Hafen is down while Synapse's users talk: Synapse (told not to retry a request, so the
/// outage is real to it) drops the events of the transaction that failed and sends the later
/// ones once Hafen is back and speaks to it, so Hafen must fetch the gap with
/// `/get_missing_events`. And both sides talking at once (a fork in the room's graph, each
/// side's event with only its own prev event) ends with both seeing everything.
#[tokio::test]
async fn catch_up_after_hafen_was_down_and_concurrent_messages() {
    let pki = TestPki::new();
    let no_retries = json!({ "federation": { "max_long_retries": 0, "max_short_retries": 0 } });
    let Some(synapse) = SynapsePeer::start_with(&pki, no_retries).await else {
        return;
    };
    let mut hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;
    let room = s_create_room(&synapse, &sam, json!({ "preset": "public_chat" })).await;
    h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;
    s_say(&synapse, &sam, &room, "before the outage").await;
    h_wait_messages(&hafen, &hanna, &room, &["before the outage"]).await;

    hafen.halt().await;
    let missed = ["missed 1", "missed 2", "missed 3", "missed 4", "missed 5"];
    for text in missed {
        s_say(&synapse, &sam, &room, text).await;
    }
    // Let Synapse try (and fail) to deliver them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    hafen.resume().await;
    // Hafen speaks to Synapse (its transaction tells Synapse it is back).
    h_say(&hafen, &hanna, &room, "back online").await;
    s_wait_messages(&synapse, &sam, &room, &["back online"]).await;
    // Synapse may wait for something new before catching up: give it one.
    s_say(&synapse, &sam, &room, "after the outage").await;
    let mut want = missed.to_vec();
    want.push("after the outage");
    h_wait_messages(&hafen, &hanna, &room, &want).await;

    // Both talk at once, several times: neither side loses a message.
    let mut sent = Vec::new();
    for i in 0..5 {
        let from_s = format!("concurrent synapse {i}");
        let from_h = format!("concurrent hafen {i}");
        let (a, b) = tokio::join!(
            s_say(&synapse, &sam, &room, &from_s),
            h_say(&hafen, &hanna, &room, &from_h)
        );
        assert!(a.starts_with('$') && b.starts_with('$'));
        sent.push(from_s);
        sent.push(from_h);
    }
    let want: Vec<&str> = sent.iter().map(String::as_str).collect();
    h_wait_messages(&hafen, &hanna, &room, &want).await;
    s_wait_messages(&synapse, &sam, &room, &want).await;
    // And the room goes on: one more each way after the forks merged.
    h_say(&hafen, &hanna, &room, "merged from hafen").await;
    s_wait_messages(&synapse, &sam, &room, &["merged from hafen"]).await;
    s_say(&synapse, &sam, &room, "merged from synapse").await;
    h_wait_messages(&hafen, &hanna, &room, &["merged from synapse"]).await;

    hafen.stop().await;
}

/// Restricted rooms (`join_rule: restricted`, allowed for members of another room) both ways:
/// the resident server vouches for the join (`join_authorised_via_users_server`) and countersigns
/// it in `send_join`.
#[tokio::test]
async fn restricted_rooms_both_ways() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;
    let restricted_to = |room: &str| {
        json!([{ "type": "m.room.join_rules", "state_key": "",
                 "content": { "join_rule": "restricted",
                              "allow": [{ "type": "m.room_membership", "room_id": room }] } }])
    };

    // On Synapse: hanna may join the inner room because she is in the outer one.
    let outer = s_create_room(&synapse, &sam, json!({ "preset": "public_chat" })).await;
    let inner = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "private_chat", "initial_state": restricted_to(&outer) }),
    )
    .await;
    // Not yet a member of the outer room: refused.
    let (status, v) = hafen
        .post(
            &format!(
                "{V3}/join/{}?via={}",
                enc(&inner),
                enc(&synapse.server_name)
            ),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["errcode"], json!("M_FORBIDDEN"), "{v}");
    h_join(&hafen, &hanna, &outer, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &outer, &hanna.user_id, "join").await;
    let joined = h_join(&hafen, &hanna, &inner, &[&synapse.server_name]).await;
    assert_eq!(joined, inner);
    let member = s_wait_state(
        &synapse,
        &sam,
        &inner,
        "m.room.member",
        &hanna.user_id,
        |m| m["membership"] == "join",
    )
    .await;
    assert_eq!(member["join_authorised_via_users_server"], json!(sam.id));
    h_say(&hafen, &hanna, &inner, "in through the outer room").await;
    s_wait_messages(&synapse, &sam, &inner, &["in through the outer room"]).await;

    // On Hafen: sam may join the inner room because he is in the outer one.
    let outer = hafen
        .create_room(&hanna, json!({ "preset": "public_chat" }))
        .await;
    let inner = hafen
        .create_room(
            &hanna,
            json!({ "preset": "private_chat", "initial_state": restricted_to(&outer) }),
        )
        .await;
    let via = format!("via={}", enc(&hafen.server_name()));
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?{via}", enc(&inner)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["errcode"], json!("M_FORBIDDEN"), "{v}");
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?{via}", enc(&outer)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    h_wait_membership(&hafen, &hanna, &outer, &sam.id, "join").await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?{via}", enc(&inner)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Synapse restricted join of a Hafen room: {v}"
    );
    assert_eq!(v, json!({ "room_id": inner }));
    h_wait_membership(&hafen, &hanna, &inner, &sam.id, "join").await;
    let (status, member) = hafen
        .get(
            &format!(
                "{V3}/rooms/{}/state/m.room.member/{}",
                enc(&inner),
                enc(&sam.id)
            ),
            &hanna,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{member}");
    assert_eq!(
        member["join_authorised_via_users_server"],
        json!(hanna.user_id)
    );
    s_say(&synapse, &sam, &inner, "in through hafen's outer room").await;
    h_wait_messages(&hafen, &hanna, &inner, &["in through hafen's outer room"]).await;

    hafen.stop().await;
}

/// Invites rejected both ways (the invitee's server goes through `make_leave`/`send_leave` at
/// the inviting server), a Hafen moderator kicking a Synapse user, and to-device messages both
/// ways.
#[tokio::test]
async fn rejections_remote_kick_and_to_device() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    // Synapse invites hanna; she rejects; Synapse sees her leave.
    let room = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "private_chat", "invite": [hanna.user_id] }),
    )
    .await;
    wait_for(&hafen, &hanna, &format!("{V3}/sync"), "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &hanna,
            json!({ "reason": "no thanks" }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Hafen rejecting a Synapse invite: {v}"
    );
    assert_eq!(v, json!({}));
    let member = s_wait_state(
        &synapse,
        &sam,
        &room,
        "m.room.member",
        &hanna.user_id,
        |m| m["membership"] == "leave",
    )
    .await;
    assert_eq!(member["reason"], json!("no thanks"));
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync"),
        "the invite gone",
        |s| s["rooms"]["invite"].get(&room).is_none(),
    )
    .await;

    // Hafen invites sam; he rejects; Hafen sees his leave.
    let room = hafen
        .create_room(&hanna, json!({ "preset": "private_chat" }))
        .await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/invite", enc(&room)),
            &hanna,
            json!({ "user_id": sam.id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    s_sync_until(&synapse, &sam, "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/leave", enc(&room)),
        &sam,
        Some(json!({ "reason": "not now" })),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Synapse rejecting a Hafen invite: {v}"
    );
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "leave").await;

    // Sam joins a Hafen room, and hanna (its creator) kicks him: Synapse sees the kick.
    let room = hafen
        .create_room(&hanna, json!({ "preset": "public_chat" }))
        .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?via={}", enc(&room), enc(&hafen.server_name())),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    h_wait_membership(&hafen, &hanna, &room, &sam.id, "join").await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/kick", enc(&room)),
            &hanna,
            json!({ "user_id": sam.id, "reason": "bye" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let (status, v) = s_req(
        &synapse,
        Method::GET,
        &format!("{V3}/joined_rooms"),
        &sam,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut left = false;
    for _ in 0..300 {
        let (_, v) = s_req(
            &synapse,
            Method::GET,
            &format!("{V3}/joined_rooms"),
            &sam,
            None,
        )
        .await;
        if !v["joined_rooms"]
            .as_array()
            .is_some_and(|r| r.contains(&json!(room)))
        {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left, "Synapse still has sam in the room after the kick");

    // To-device messages both ways.
    let s_device = synapse.device_id(&sam.token).await;
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!(
            "{V3}/sendToDevice/m.interop.ping/{}",
            crate::common::unique_txn()
        ),
        &sam,
        Some(json!({ "messages": { hanna.user_id.clone(): {
            hanna.device_id.clone(): { "hello": "from synapse" } } } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sync = wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync"),
        "the to-device message",
        |s| {
            s["to_device"]["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|m| m["type"] == "m.interop.ping"))
        },
    )
    .await;
    let msg = sync["to_device"]["events"]
        .as_array()
        .and_then(|e| e.iter().find(|m| m["type"] == "m.interop.ping"))
        .expect("message");
    assert_eq!(msg["sender"], json!(sam.id));
    assert_eq!(msg["content"], json!({ "hello": "from synapse" }));
    let (status, v) = hafen
        .put(
            &format!("{V3}/sendToDevice/m.interop.pong/{}", crate::common::unique_txn()),
            &hanna,
            json!({ "messages": { sam.id.clone(): { s_device.clone(): { "hello": "from hafen" } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let sync = s_sync_until(&synapse, &sam, "the to-device message", |s| {
        s["to_device"]["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|m| m["type"] == "m.interop.pong"))
    })
    .await;
    let msg = sync["to_device"]["events"]
        .as_array()
        .and_then(|e| e.iter().find(|m| m["type"] == "m.interop.pong"))
        .expect("message");
    assert_eq!(msg["sender"], json!(hanna.user_id));
    assert_eq!(msg["content"], json!({ "hello": "from hafen" }));

    hafen.stop().await;
}

/// With Hafen already in a Synapse room: a second Hafen user is invited (the invite reaches Hafen
/// through `/invite` and again through `/send`) and joins locally; a profile change on Hafen
/// updates the member event Synapse sees; reactions and edits relate across servers.
#[tokio::test]
async fn second_local_user_profiles_and_relations() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;
    let hugo = hafen.user("hugo").await;
    let room = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "private_chat", "name": "Two" }),
    )
    .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/invite", enc(&room)),
        &sam,
        Some(json!({ "user_id": hanna.user_id })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/sync"),
        "hanna's invite",
        |s| s["rooms"]["invite"].get(&room).is_some(),
    )
    .await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/join", enc(&room)),
            &hanna,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;

    // Hafen is in the room now: hugo's invite comes as a room event too.
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/invite", enc(&room)),
        &sam,
        Some(json!({ "user_id": hugo.user_id })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sync = wait_for(&hafen, &hugo, &format!("{V3}/sync"), "hugo's invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Two"),
        "{invite_state:?}"
    );
    h_wait_membership(&hafen, &hanna, &room, &hugo.user_id, "invite").await;
    let (status, v) = hafen
        .post(&format!("{V3}/rooms/{}/join", enc(&room)), &hugo, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "room_id": room }));
    s_wait_membership(&synapse, &sam, &room, &hugo.user_id, "join").await;
    h_say(&hafen, &hugo, &room, "hugo here").await;
    s_wait_messages(&synapse, &sam, &room, &["hugo here"]).await;

    // Hanna's new display name reaches her member event on Synapse.
    let (status, v) = hafen
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&hanna.user_id)),
            &hanna,
            json!({ "displayname": "Hanna H." }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    s_wait_state(
        &synapse,
        &sam,
        &room,
        "m.room.member",
        &hanna.user_id,
        |m| m["displayname"] == "Hanna H." && m["membership"] == "join",
    )
    .await;

    // Sam reacts to hugo's message and edits his own; Hafen relates them.
    let hugo_msg = h_say(&hafen, &hugo, &room, "react to me").await;
    s_wait_messages(&synapse, &sam, &room, &["react to me"]).await;
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!(
            "{V3}/rooms/{}/send/m.reaction/{}",
            enc(&room),
            crate::common::unique_txn()
        ),
        &sam,
        Some(json!({ "m.relates_to": { "rel_type": "m.annotation",
                                       "event_id": hugo_msg, "key": "👍" } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let reaction = v["event_id"].as_str().expect("event_id").to_owned();
    let rel = wait_for(
        &hafen,
        &hugo,
        &format!(
            "/_matrix/client/v1/rooms/{}/relations/{}",
            enc(&room),
            enc(&hugo_msg)
        ),
        "sam's reaction on Hafen",
        |r| {
            r["chunk"]
                .as_array()
                .is_some_and(|c| c.iter().any(|e| e["event_id"] == json!(reaction)))
        },
    )
    .await;
    assert_eq!(rel["chunk"][0]["type"], json!("m.reaction"), "{rel}");
    let original = s_say(&synapse, &sam, &room, "tpyo").await;
    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!(
            "{V3}/rooms/{}/send/m.room.message/{}",
            enc(&room),
            crate::common::unique_txn()
        ),
        &sam,
        Some(json!({ "msgtype": "m.text", "body": "* typo",
                     "m.new_content": { "msgtype": "m.text", "body": "typo" },
                     "m.relates_to": { "rel_type": "m.replace", "event_id": original } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let edit = v["event_id"].as_str().expect("event_id").to_owned();
    let ev = wait_for(
        &hafen,
        &hugo,
        &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&original)),
        "the edit bundled on Hafen",
        |e| e["unsigned"]["m.relations"]["m.replace"]["event_id"] == json!(edit),
    )
    .await;
    assert_eq!(ev["sender"], json!(sam.id));

    // Hugo reacts to sam's message: Synapse relates it.
    let (status, v) = hafen
        .put(
            &format!(
                "{V3}/rooms/{}/send/m.reaction/{}",
                enc(&room),
                crate::common::unique_txn()
            ),
            &hugo,
            json!({ "m.relates_to": { "rel_type": "m.annotation",
                                      "event_id": original, "key": "🎉" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let reaction = v["event_id"].as_str().expect("event_id").to_owned();
    let mut found = Value::Null;
    for _ in 0..300 {
        let (status, v) = s_req(
            &synapse,
            Method::GET,
            &format!(
                "/_matrix/client/v1/rooms/{}/relations/{}",
                enc(&room),
                enc(&original)
            ),
            &sam,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if let Some(e) = v["chunk"]
            .as_array()
            .and_then(|c| c.iter().find(|e| e["event_id"] == json!(reaction)))
        {
            found = e.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found["sender"],
        json!(hugo.user_id),
        "Synapse never related it"
    );
    assert_eq!(found["content"]["m.relates_to"]["key"], json!("🎉"));

    hafen.stop().await;
}

/// Presence across (with Hafen's presence switched on; Synapse has it on by default): a status
/// set on either side reaches the other side's users who share a room.
#[tokio::test]
async fn presence_both_ways() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |c| c.allow_presence = true).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;
    let room = s_create_room(&synapse, &sam, json!({ "preset": "public_chat" })).await;
    h_join(&hafen, &hanna, &room, &[&synapse.server_name]).await;
    s_wait_membership(&synapse, &sam, &room, &hanna.user_id, "join").await;

    let (status, v) = s_req(
        &synapse,
        Method::PUT,
        &format!("{V3}/presence/{}/status", enc(&sam.id)),
        &sam,
        Some(json!({ "presence": "unavailable", "status_msg": "on synapse" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let status_path = format!("{V3}/presence/{}/status", enc(&sam.id));
    let p = wait_for(
        &hafen,
        &hanna,
        &status_path,
        "sam's presence on Hafen",
        |p| p["status_msg"] == "on synapse",
    )
    .await;
    assert_eq!(p["presence"], json!("unavailable"), "{p}");

    let (status, v) = hafen
        .put(
            &format!("{V3}/presence/{}/status", enc(&hanna.user_id)),
            &hanna,
            json!({ "presence": "online", "status_msg": "on hafen" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let (status, v) = s_req(
        &synapse,
        Method::GET,
        &format!("{V3}/sync?timeout=0"),
        &sam,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let hanna_presence = |s: &Value| -> Option<Value> {
        s["presence"]["events"].as_array().and_then(|e| {
            e.iter()
                .find(|p| {
                    p["sender"] == json!(hanna.user_id) && p["content"]["status_msg"] == "on hafen"
                })
                .cloned()
        })
    };
    let sync = s_sync_until(&synapse, &sam, "hanna's presence", |s| {
        hanna_presence(s).is_some()
    })
    .await;
    let p = hanna_presence(&sync).expect("presence");
    assert_eq!(p["content"]["presence"], json!("online"), "{p}");
    assert_eq!(p["type"], json!("m.presence"), "{p}");

    hafen.stop().await;
}

/// Room upgrades across: Synapse upgrades a room with a Hafen member (Hafen sees the tombstone
/// and follows into the new room), and Hafen upgrades a room with a Synapse member.
#[tokio::test]
async fn room_upgrades_across() {
    let pki = TestPki::new();
    let Some(synapse) = SynapsePeer::start(&pki).await else {
        return;
    };
    let hafen = start_federating(&pki, |_| {}).await;
    let sam = s_user(&synapse, "sam").await;
    let hanna = hafen.user("hanna").await;

    let old = s_create_room(
        &synapse,
        &sam,
        json!({ "preset": "public_chat", "room_version": "11", "name": "Old" }),
    )
    .await;
    h_join(&hafen, &hanna, &old, &[]).await;
    s_wait_membership(&synapse, &sam, &old, &hanna.user_id, "join").await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/rooms/{}/upgrade", enc(&old)),
        &sam,
        Some(json!({ "new_version": "12" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new = v["replacement_room"]
        .as_str()
        .expect("replacement_room")
        .to_owned();
    let tomb = wait_for(
        &hafen,
        &hanna,
        &format!("{V3}/rooms/{}/state/m.room.tombstone/", enc(&old)),
        "the tombstone on Hafen",
        |t| t["replacement_room"] == json!(new),
    )
    .await;
    assert!(tomb["body"].is_string(), "{tomb}");
    let joined = h_join(&hafen, &hanna, &new, &[&synapse.server_name]).await;
    assert_eq!(joined, new);
    s_wait_membership(&synapse, &sam, &new, &hanna.user_id, "join").await;
    let (status, create) = hafen
        .get(
            &format!("{V3}/rooms/{}/state/m.room.create/", enc(&new)),
            &hanna,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{create}");
    assert_eq!(create["room_version"], json!("12"), "{create}");
    assert_eq!(create["predecessor"]["room_id"], json!(old), "{create}");
    h_say(&hafen, &hanna, &new, "followed the upgrade").await;
    s_wait_messages(&synapse, &sam, &new, &["followed the upgrade"]).await;

    // Hafen upgrades a room sam is in.
    let old = hafen
        .create_room(
            &hanna,
            json!({ "preset": "public_chat", "room_version": "11", "name": "Hafen old" }),
        )
        .await;
    let via = format!("via={}", enc(&hafen.server_name()));
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?{via}", enc(&old)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    h_wait_membership(&hafen, &hanna, &old, &sam.id, "join").await;
    let (status, v) = hafen
        .post(
            &format!("{V3}/rooms/{}/upgrade", enc(&old)),
            &hanna,
            json!({ "new_version": "12" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new = v["replacement_room"]
        .as_str()
        .expect("replacement_room")
        .to_owned();
    s_wait_state(&synapse, &sam, &old, "m.room.tombstone", "", |t| {
        t["replacement_room"] == json!(new)
    })
    .await;
    let (status, v) = s_req(
        &synapse,
        Method::POST,
        &format!("{V3}/join/{}?{via}", enc(&new)),
        &sam,
        Some(json!({})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Synapse joining Hafen's upgraded room: {v}"
    );
    assert_eq!(v, json!({ "room_id": new }));
    h_wait_membership(&hafen, &hanna, &new, &sam.id, "join").await;
    let name = s_state(&synapse, &sam, &new, "m.room.name", "").await;
    assert_eq!(name, Some(json!({ "name": "Hafen old" })));
    s_say(&synapse, &sam, &new, "sam followed too").await;
    h_wait_messages(&hafen, &hanna, &new, &["sam followed too"]).await;

    hafen.stop().await;
}
