//! Rooms across two Hafens federating over TLS on loopback: remote joins (by id with `via`, and
//! by alias), invites of another server's users, messages and state both ways, leave, delivery
//! after the receiving server was down, and bad PDUs refused without harming the room.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{enc, start_federating, TestPki, TestServer, TestUser};

/// Poll `GET path` as `user` until `pred` holds on the body (20 s at most).
pub(crate) async fn wait_for(
    server: &TestServer,
    user: &TestUser,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let (status, body) = server.get(path, user).await;
        if status == StatusCode::OK && pred(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; last answer: {last}");
}

/// The bodies of the room's `m.room.message` events, oldest first, as `user` sees them.
pub(crate) async fn messages(server: &TestServer, user: &TestUser, room: &str) -> Vec<String> {
    let (status, body) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                enc(room)
            ),
            user,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut out: Vec<String> = body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    out.reverse();
    out
}

pub(crate) async fn say(server: &TestServer, user: &TestUser, room: &str, text: &str) -> String {
    let (status, body) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(room),
                crate::common::unique_txn()
            ),
            user,
            json!({ "msgtype": "m.text", "body": text }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event id").to_owned()
}

pub(crate) async fn membership(
    server: &TestServer,
    user: &TestUser,
    room: &str,
    who: &str,
) -> Value {
    let (status, body) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
                enc(room),
                enc(who)
            ),
            user,
        )
        .await;
    if status == StatusCode::OK {
        body["membership"].clone()
    } else {
        Value::Null
    }
}

pub(crate) async fn wait_membership(
    server: &TestServer,
    user: &TestUser,
    room: &str,
    who: &str,
    m: &str,
) {
    for _ in 0..200 {
        if membership(server, user, room, who).await == json!(m) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{who} never became {m} in {room} as seen by {}",
        user.user_id
    );
}

pub(crate) async fn wait_messages(server: &TestServer, user: &TestUser, room: &str, want: &[&str]) {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = messages(server, user, room).await;
        if want.iter().all(|w| last.iter().any(|m| m == w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never saw {want:?}; saw {last:?}", user.user_id);
}

/// `POST /join/{room}?via=<via's name>` as `user` on `server`.
pub async fn join_via(
    server: &TestServer,
    user: &TestUser,
    room: &str,
    via: &TestServer,
) -> (StatusCode, Value) {
    server
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={}",
                enc(room),
                enc(&via.server_name())
            ),
            user,
            json!({}),
        )
        .await
}

/// `POST /rooms/{room}/invite` of `who` by `by` on `server`.
pub async fn invite(
    server: &TestServer,
    by: &TestUser,
    room: &str,
    who: &str,
) -> (StatusCode, Value) {
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            by,
            json!({ "user_id": who }),
        )
        .await
}

/// `POST /rooms/{room}/leave` as `user` on `server`.
pub async fn leave(server: &TestServer, user: &TestUser, room: &str) -> (StatusCode, Value) {
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(room)),
            user,
            json!({}),
        )
        .await
}

#[tokio::test]
async fn remote_join_messages_state_and_leave_both_ways() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;

    let room = a
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_alias_name": "lobby", "name": "Lobby" }),
        )
        .await;
    say(&a, &alice, &room, "before bob").await;

    // Bob joins through A, by alias (resolved over federation).
    let alias = format!("#lobby:{}", a.server_name());
    let (status, body) = b
        .post(
            &format!("/_matrix/client/v3/join/{}", enc(&alias)),
            &bob,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(room));

    // Both servers see bob joined; B has the room's state (name) and history.
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;
    assert_eq!(
        membership(&b, &bob, &room, &bob.user_id).await,
        json!("join")
    );
    let (status, name) = b
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{name}");
    assert_eq!(name["name"], json!("Lobby"));
    let (status, joined) = b.get("/_matrix/client/v3/joined_rooms", &bob).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(joined["joined_rooms"], json!([room]));

    // Messages both ways.
    say(&a, &alice, &room, "hello bob").await;
    wait_messages(&b, &bob, &room, &["hello bob"]).await;
    say(&b, &bob, &room, "hello alice").await;
    wait_messages(&a, &alice, &room, &["hello alice"]).await;

    // A state change on A reaches B; one on B (bob's display name) reaches A.
    let (status, _) = a
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                enc(&room)
            ),
            &alice,
            json!({ "topic": "federated" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_for(
        &b,
        &bob,
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            enc(&room)
        ),
        "the topic on B",
        |b| b["topic"] == "federated",
    )
    .await;

    // Sync on B shows the room joined with alice's message in the timeline.
    let (status, sync) = b.get("/_matrix/client/v3/sync", &bob).await;
    assert_eq!(status, StatusCode::OK);
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    assert!(
        timeline
            .as_array()
            .expect("timeline")
            .iter()
            .any(|e| e["content"]["body"] == "hello bob" || e["content"]["topic"] == "federated"),
        "{sync}"
    );

    // Bob leaves: both servers see it, and A no longer sends him the room's events.
    let (status, body) = leave(&b, &bob, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &bob.user_id, "leave").await;
}

#[tokio::test]
async fn invite_of_another_servers_user_then_join_and_reject() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let carol = b.user("carol").await;
    let dave = b.user("dave").await;

    let room = a
        .create_room(
            &alice,
            json!({ "preset": "private_chat", "name": "Secret" }),
        )
        .await;
    // Not invited: a private room refuses the join with A's answer.
    let (status, body) = join_via(&b, &carol, &room, &a).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errcode"], json!("M_FORBIDDEN"));

    for who in [&carol, &dave] {
        let (status, body) = invite(&a, &alice, &room, &who.user_id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        membership(&a, &alice, &room, &carol.user_id).await,
        json!("invite")
    );

    // Carol's sync on B shows the invite with the room's name from the stripped state.
    let sync = wait_for(&b, &carol, "/_matrix/client/v3/sync", "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .expect("invite state")
        .clone();
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Secret"),
        "{invite_state:?}"
    );
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member"
        && e["state_key"] == json!(carol.user_id)
        && e["content"]["membership"] == "invite"));

    // Carol joins by room id alone: B joins through the inviting server.
    let (status, body) = b
        .post(
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
            &carol,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &carol.user_id, "join").await;
    say(&b, &carol, &room, "thanks for the invite").await;
    wait_messages(&a, &alice, &room, &["thanks for the invite"]).await;

    // Dave's invite is on B too, since the room is on B now; he rejects it.
    let (status, body) = leave(&b, &dave, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &dave.user_id, "leave").await;
}

#[tokio::test]
async fn rejecting_an_invite_to_a_room_this_server_is_not_in() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let erin = b.user("erin").await;
    let room = a
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let (status, body) = invite(&a, &alice, &room, &erin.user_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(&b, &erin, "/_matrix/client/v3/sync", "the invite", |s| {
        s["rooms"]["invite"].get(&room).is_some()
    })
    .await;
    let (status, body) = leave(&b, &erin, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A hears of the rejection through make_leave/send_leave.
    wait_membership(&a, &alice, &room, &erin.user_id, "leave").await;
    // And erin's sync on B shows the room as left.
    wait_for(&b, &erin, "/_matrix/client/v3/sync", "the room left", |s| {
        s["rooms"]["invite"].get(&room).is_none()
    })
    .await;
}

#[tokio::test]
async fn events_sent_while_a_server_is_down_arrive_after_it_returns() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let mut b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, body) = join_via(&b, &bob, &room, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;

    b.halt().await;
    for text in ["while down 1", "while down 2", "while down 3"] {
        say(&a, &alice, &room, text).await;
    }
    b.resume().await;
    // B asks A for something (any signed request), which makes A retry at once.
    wait_messages(
        &b,
        &bob,
        &room,
        &["while down 1", "while down 2", "while down 3"],
    )
    .await;
    let seen = messages(&b, &bob, &room).await;
    let count = |t: &str| seen.iter().filter(|m| *m == t).count();
    assert_eq!(count("while down 2"), 1, "{seen:?}");
}

#[tokio::test]
async fn bad_pdus_are_refused_and_the_room_goes_on() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, body) = join_via(&b, &bob, &room, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;

    // A forged event: bob's server sends an event in alice's name (signed by B, not by A).
    let fed = &b.services().federation;
    let depth = 100;
    let forged = json!({
        "type": "m.room.message",
        "room_id": room,
        "sender": alice.user_id,
        "content": { "msgtype": "m.text", "body": "forged" },
        "origin_server_ts": 1,
        "depth": depth,
        "prev_events": [],
        "auth_events": [],
        "hashes": { "sha256": "AAAA" },
        "signatures": {},
    });
    let a_name: ruma::OwnedServerName = a.server_name().try_into().expect("name");
    let answer = fed
        .send(
            Method::PUT,
            &a_name,
            "/_matrix/federation/v1/send/forged1",
            Some(json!({
                "origin": b.server_name(),
                "origin_server_ts": 1,
                "pdus": [forged, { "not": "an event" }, {
                    "type": "m.room.message", "room_id": room, "sender": bob.user_id,
                    "content": { "body": "x".repeat(70_000) } }],
                "edus": [],
            })),
        )
        .await
        .expect("the transaction itself is accepted");
    let results = answer["pdus"].as_object().expect("pdu results");
    assert_eq!(results.len(), 3, "{answer}");
    assert!(
        results.values().all(|r| r.get("error").is_some()),
        "every bad PDU gets an error: {answer}"
    );
    // Membership handshakes refuse what is not theirs: a template for another server's user,
    // and a send_join whose body is no join.
    let refused = fed
        .send(
            Method::GET,
            &a_name,
            &format!(
                "/_matrix/federation/v1/make_join/{}/{}?ver=12&ver=11",
                enc(&room),
                enc(&alice.user_id)
            ),
            None,
        )
        .await
        .expect_err("not B's user");
    assert!(refused.to_string().contains("M_FORBIDDEN"), "{refused}");
    let refused = fed
        .send(
            Method::PUT,
            &a_name,
            &format!("/_matrix/federation/v2/send_join/{}/$nothing", enc(&room)),
            Some(json!({ "type": "m.room.message" })),
        )
        .await
        .expect_err("no join");
    assert!(refused.to_string().contains("M_BAD_JSON"), "{refused}");
    // Nothing of it reached the room, and the room still works both ways.
    assert!(!messages(&a, &alice, &room)
        .await
        .contains(&"forged".to_owned()));
    say(&b, &bob, &room, "still fine").await;
    wait_messages(&a, &alice, &room, &["still fine"]).await;
}

#[tokio::test]
async fn media_of_another_server_is_fetched_once_and_thumbnailed() {
    let pki = TestPki::new();
    let mut a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let img = {
        let img = image::RgbaImage::from_fn(64, 48, |x, y| image::Rgba([x as u8, y as u8, 9, 255]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgba8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("png");
        out
    };
    let res = a
        .http
        .post(format!(
            "{}/_matrix/media/v3/upload?filename=cat.png",
            a.base
        ))
        .bearer_auth(&alice.token)
        .header("Content-Type", "image/png")
        .body(img.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let uri: Value = res.json().await.expect("json");
    let mxc = uri["content_uri"].as_str().expect("mxc").to_owned();
    let (server, id) = mxc
        .strip_prefix("mxc://")
        .and_then(|r| r.split_once('/'))
        .expect("mxc parts");
    assert_eq!(server, a.server_name());

    let download = |path: String| {
        let b = &b;
        let token = bob.token.clone();
        async move {
            b.http
                .get(format!("{}{path}", b.base))
                .bearer_auth(token)
                .send()
                .await
                .expect("download")
        }
    };
    let res = download(format!("/_matrix/client/v1/media/download/{server}/{id}")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("image/png")
    );
    assert_eq!(res.bytes().await.expect("bytes").to_vec(), img);

    let res = download(format!(
        "/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32&method=scale"
    ))
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let thumb = res.bytes().await.expect("bytes");
    let decoded = image::load_from_memory(&thumb).expect("a thumbnail image");
    assert!(
        decoded.width() <= 64 && decoded.width() >= 32,
        "{}",
        decoded.width()
    );

    // Unknown media on A: 404 on B.
    let res = download(format!(
        "/_matrix/client/v1/media/download/{server}/nosuchmedia"
    ))
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["errcode"], json!("M_NOT_FOUND"));

    // Fetched once: B serves it with A down.
    a.halt().await;
    let res = download(format!("/_matrix/client/v1/media/download/{server}/{id}")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.bytes().await.expect("bytes").to_vec(), img);
    a.resume().await;
}

#[tokio::test]
async fn knocking_on_a_room_of_another_server() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(
            &alice,
            json!({ "preset": "private_chat", "name": "Knock here", "initial_state": [{
                "type": "m.room.join_rules", "state_key": "",
                "content": { "join_rule": "knock" } }] }),
        )
        .await;
    let (status, body) = b
        .post(
            &format!(
                "/_matrix/client/v3/knock/{}?via={}",
                enc(&room),
                enc(&a.server_name())
            ),
            &bob,
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(room));
    wait_membership(&a, &alice, &room, &bob.user_id, "knock").await;
    // Bob's sync on B shows the knock with the room's stripped state.
    let sync = wait_for(&b, &bob, "/_matrix/client/v3/sync", "the knock", |s| {
        s["rooms"]["knock"].get(&room).is_some()
    })
    .await;
    let state = sync["rooms"]["knock"][&room]["knock_state"]["events"]
        .as_array()
        .expect("knock state")
        .clone();
    assert!(
        state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock here"),
        "{state:?}"
    );
    // Alice lets him in; he joins through A.
    let (status, body) = invite(&a, &alice, &room, &bob.user_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b
        .post(
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
            &bob,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;
}

#[tokio::test]
async fn restricted_join_vouched_for_by_the_resident_server() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let outer = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let inner = a
        .create_room(
            &alice,
            json!({
                "preset": "private_chat",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                    "content": { "join_rule": "restricted",
                        "allow": [{ "type": "m.room_membership", "room_id": outer }] } }],
            }),
        )
        .await;
    let join = |room: String| {
        let (b, bob, via) = (&b, &bob, a.server_name());
        async move {
            b.post(
                &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&via)),
                bob,
                json!({}),
            )
            .await
        }
    };
    let (status, body) = join(inner.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errcode"], json!("M_FORBIDDEN"));
    let (status, body) = join(outer.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A member of the outer room now: A vouches for the join (and signs it in send_join).
    let (status, body) = join(inner.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "room_id": inner }));
    wait_membership(&a, &alice, &inner, &bob.user_id, "join").await;
    let (status, member) = a
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
                enc(&inner),
                enc(&bob.user_id)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{member}");
    assert_eq!(
        member["join_authorised_via_users_server"],
        json!(alice.user_id)
    );
    say(&b, &bob, &inner, "vouched for").await;
    wait_messages(&a, &alice, &inner, &["vouched for"]).await;
}
