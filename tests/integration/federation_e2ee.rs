//! Two Hafens federating over TLS on loopback, driven the way real clients drive them:
//! `matrix-sdk` clients with end-to-end encryption on both servers (device lists, key queries and
//! one-time key claims across servers, `m.room_key` to-device messages over federation, encrypted
//! room events), typing notices and read receipts across servers, history a late joiner gets by
//! backfill from the other server, and concurrent state changes on both servers resolving to the
//! same state.

use std::time::Duration;

use matrix_sdk::{
    config::SyncSettings,
    encryption::EncryptionSettings,
    room::MessagesOptions,
    ruma::{
        api::client::room::create_room,
        events::{
            room::{encryption::RoomEncryptionEventContent, message::RoomMessageEventContent},
            InitialStateEvent,
        },
        OwnedRoomId, OwnedUserId, RoomId,
    },
    Client, RoomState,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    common::{enc, start_federating, TestPki, TestServer, TestUser},
    federation_rooms::{membership, say, wait_for, wait_membership},
    sdk_client::collect_texts,
};

/// The text bodies of one `/messages` page (newest first), and its `end`.
async fn page(
    server: &TestServer,
    user: &TestUser,
    room: &str,
    from: Option<&str>,
    limit: usize,
) -> (Vec<String>, Option<String>) {
    let mut path = format!(
        "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}",
        enc(room)
    );
    if let Some(from) = from {
        path.push_str(&format!("&from={}", enc(from)));
    }
    let (status, body) = server.get(&path, user).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let texts = body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    (texts, body["end"].as_str().map(str::to_owned))
}

/// Join `room` (on another server) through `via`.
async fn join_via(server: &TestServer, user: &TestUser, room: &str, via: &TestServer) {
    let (status, body) = server
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={}",
                enc(room),
                enc(&via.server_name())
            ),
            user,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn sdk_login(base: &str, user: &str, device_name: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(base)
        .with_encryption_settings(EncryptionSettings::default())
        .build()
        .await
        .expect("client builds");
    client
        .matrix_auth()
        .login_username(user, "password")
        .initial_device_display_name(device_name)
        .send()
        .await
        .expect("login");
    // The first sync uploads the device's keys.
    client
        .sync_once(SyncSettings::default().timeout(Duration::from_millis(100)))
        .await
        .expect("first sync");
    client
}

async fn sync_until(client: &Client, what: &str, mut done: impl FnMut() -> bool) {
    let settings = SyncSettings::default().timeout(Duration::from_secs(1));
    for _ in 0..40 {
        client.sync_once(settings.clone()).await.expect("sync");
        if done() {
            return;
        }
    }
    panic!("{what}: not reached through sync");
}

/// Whether `client` can read `text` in the room: seen decrypted in sync, or decrypted now from
/// the room's history (a room key that arrives after its message is used when the message is
/// read again).
async fn can_read(
    client: &Client,
    room_id: &RoomId,
    seen: &parking_lot::Mutex<Vec<(String, String)>>,
    text: &str,
) -> bool {
    if seen.lock().iter().any(|(_, b)| b == text) {
        return true;
    }
    let Some(room) = client.get_room(room_id) else {
        return false;
    };
    let Ok(messages) = room.messages(MessagesOptions::backward()).await else {
        return false;
    };
    messages.chunk.iter().any(|e| {
        e.encryption_info().is_some() && e.raw().json().get().contains(&format!("\"{text}\""))
    })
}

async fn sync_until_readable(
    client: &Client,
    room_id: &RoomId,
    seen: &parking_lot::Mutex<Vec<(String, String)>>,
    text: &str,
) {
    let settings = SyncSettings::default().timeout(Duration::from_secs(1));
    for _ in 0..40 {
        client.sync_once(settings.clone()).await.expect("sync");
        if can_read(client, room_id, seen, text).await {
            return;
        }
    }
    panic!(
        "{} never decrypted {text:?}",
        client.user_id().expect("logged in")
    );
}

/// `/messages` on the server as `user`: the room's messages are `m.room.encrypted` events and
/// none of the plain texts appear.
async fn assert_only_ciphertext(server: &TestServer, user: &TestUser, room: &str, texts: &[&str]) {
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
    let chunk = body["chunk"].as_array().expect("chunk");
    let encrypted = chunk
        .iter()
        .filter(|e| e["type"] == "m.room.encrypted")
        .count();
    assert!(encrypted >= texts.len(), "{body}");
    assert!(
        !chunk.iter().any(|e| e["type"] == "m.room.message"),
        "{body}"
    );
    for t in texts {
        assert!(!body.to_string().contains(t), "{t} in clear: {body}");
    }
}

#[tokio::test]
async fn encrypted_messages_between_sdk_clients_on_two_servers() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice_user = a.user("alice").await;
    let bob_user = b.user("bob").await;
    let alice = sdk_login(&a.base, "alice", "alice phone").await;
    let bob = sdk_login(&b.base, "bob", "bob laptop").await;
    let alice_seen = collect_texts(&alice);
    let bob_seen = collect_texts(&bob);
    let bob_id: OwnedUserId = bob.user_id().expect("bob").to_owned();
    assert_eq!(bob_id.server_name().as_str(), b.server_name());

    // Alice creates an encrypted room on A and invites bob of B.
    let mut request = create_room::v3::Request::new();
    request.invite = vec![bob_id.clone()];
    request.initial_state = vec![InitialStateEvent::with_empty_state_key(
        RoomEncryptionEventContent::with_recommended_defaults(),
    )
    .to_raw_any()];
    let room_id: OwnedRoomId = alice
        .create_room(request)
        .await
        .expect("create room")
        .room_id()
        .to_owned();

    // Bob's client sees the invite on B and joins through the SDK (B joins through A).
    sync_until(&bob, "bob's invite", || {
        bob.get_room(&room_id)
            .is_some_and(|r| r.state() == RoomState::Invited)
    })
    .await;
    bob.join_room_by_id(&room_id).await.expect("join");
    sync_until(&alice, "bob joined, seen by alice", || {
        alice
            .get_room(&room_id)
            .is_some_and(|r| r.joined_members_count() == 2)
    })
    .await;
    sync_until(&bob, "bob's room joined", || {
        bob.get_room(&room_id)
            .is_some_and(|r| r.state() == RoomState::Joined)
    })
    .await;

    // A -> B: alice's client queries bob's keys (A asks B), claims a one-time key of his device
    // (A asks B), sends him the room key (to-device over federation) and the encrypted message.
    let room = alice.get_room(&room_id).expect("alice's room");
    assert!(room
        .latest_encryption_state()
        .await
        .expect("encryption state")
        .is_encrypted());
    room.send(RoomMessageEventContent::text_plain("secret from A"))
        .await
        .expect("send");
    sync_until_readable(&bob, &room_id, &bob_seen, "secret from A").await;

    // B -> A, the other way round.
    let bob_room = bob.get_room(&room_id).expect("bob's room");
    assert!(bob_room
        .latest_encryption_state()
        .await
        .expect("encryption state")
        .is_encrypted());
    bob_room
        .send(RoomMessageEventContent::text_plain("secret from B"))
        .await
        .expect("send");
    sync_until_readable(&alice, &room_id, &alice_seen, "secret from B").await;

    // The senders are who they should be.
    if let Some((sender, _)) = bob_seen
        .lock()
        .iter()
        .find(|(_, b)| b == "secret from A")
        .cloned()
    {
        assert_eq!(sender, alice_user.user_id);
    }

    // Both servers hold only ciphertext.
    let both = ["secret from A", "secret from B"];
    wait_for(
        &a,
        &alice_user,
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
            enc(room_id.as_str())
        ),
        "both encrypted messages on A",
        |b| {
            b["chunk"]
                .as_array()
                .is_some_and(|c| c.iter().filter(|e| e["type"] == "m.room.encrypted").count() >= 2)
        },
    )
    .await;
    assert_only_ciphertext(&a, &alice_user, room_id.as_str(), &both).await;
    assert_only_ciphertext(&b, &bob_user, room_id.as_str(), &both).await;
}

#[tokio::test]
async fn typing_and_read_receipts_cross_servers() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join_via(&b, &bob, &room, &a).await;
    wait_membership(&a, &alice, &room, &bob.user_id, "join").await;
    let event = say(&a, &alice, &room, "read me").await;
    // Bob's server has the message before he reads it.
    wait_for(
        &b,
        &bob,
        &format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&event)
        ),
        "the message on B",
        |_| true,
    )
    .await;

    // Alice types on A; bob's sync on B shows her typing.
    let (status, body) = a
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "typing": true, "timeout": 30000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let typing_of = |s: &Value| -> Vec<Value> {
        s["rooms"]["join"][&room]["ephemeral"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "m.typing")
            .flat_map(|e| {
                e["content"]["user_ids"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    wait_for(
        &b,
        &bob,
        "/_matrix/client/v3/sync",
        "alice typing on B",
        |s| typing_of(s).contains(&json!(alice.user_id)),
    )
    .await;

    // She stops: the notice ends on B as well.
    let (status, _) = a
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "typing": false }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_for(
        &b,
        &bob,
        "/_matrix/client/v3/sync",
        "alice stopped typing",
        |s| !typing_of(s).contains(&json!(alice.user_id)),
    )
    .await;

    // Bob reads the message on B; alice's sync on A shows his receipt.
    let (status, body) = b
        .post(
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(&event)
            ),
            &bob,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sync = wait_for(
        &a,
        &alice,
        "/_matrix/client/v3/sync",
        "bob's receipt on A",
        |s| {
            s["rooms"]["join"][&room]["ephemeral"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["type"] == "m.receipt"
                        && e["content"][&event]["m.read"][&bob.user_id]["ts"].is_u64()
                })
        },
    )
    .await;
    assert!(sync["rooms"]["join"][&room].is_object());
}

#[tokio::test]
async fn late_joiner_gets_earlier_history_by_backfill() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "name": "History" }),
        )
        .await;
    let sent: Vec<String> = (1..=30).map(|i| format!("early {i}")).collect();
    for t in &sent {
        say(&a, &alice, &room, t).await;
    }

    // Bob's sync position before he joins.
    let (status, before) = b.get("/_matrix/client/v3/sync", &bob).await;
    assert_eq!(status, StatusCode::OK);
    let since = before["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();

    join_via(&b, &bob, &room, &a).await;
    say(&a, &alice, &room, "after bob joined").await;
    let (mut newest, _) = (Vec::new(), ());
    for _ in 0..200 {
        newest = page(&b, &bob, &room, None, 1).await.0;
        if newest == ["after bob joined"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(newest, ["after bob joined"]);

    // Bob pages back on B in pages of 7: B has only his join and what came after, so it asks A
    // for the rest (`/backfill`) as he goes.
    let mut got: Vec<String> = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..30 {
        let (texts, end) = page(&b, &bob, &room, from.as_deref(), 7).await;
        got.extend(texts);
        match end {
            Some(e) => from = Some(e),
            None => break,
        }
    }
    got.reverse();
    let mut want = sent.clone();
    want.push("after bob joined".to_owned());
    assert_eq!(got, want);

    // The room's beginning is reached: the creation is in the history.
    let (status, body) = b
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000",
                enc(&room)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .any(|e| e["type"] == "m.room.create"),
        "{body}"
    );

    // A backfilled event can be fetched by id (what a client does for a reply to it); in
    // another room's path it is not found.
    let early = body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .find(|e| e["content"]["body"] == "early 3")
        .expect("early 3 in the history")
        .clone();
    let early_id = early["event_id"].as_str().expect("event_id");
    assert!(b.services().rooms.is_backfilled(early_id).expect("index"));
    let (status, ev) = b
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(early_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert_eq!(ev["event_id"], json!(early_id));
    assert_eq!(ev["content"]["body"], json!("early 3"));
    assert_eq!(ev["sender"], json!(alice.user_id));
    // /context around it walks the backfilled history both ways, with tokens /messages takes.
    let (status, ctx) = b
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
                enc(&room),
                enc(early_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    let bodies = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("events")
            .iter()
            .map(|e| e["content"]["body"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(ctx["event"]["event_id"], json!(early_id));
    assert_eq!(bodies(&ctx["events_before"]), ["early 2", "early 1"]);
    assert_eq!(bodies(&ctx["events_after"]), ["early 4", "early 5"]);
    let (status, next) = b
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1&from={}",
                enc(&room),
                enc(ctx["end"].as_str().expect("end"))
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{next}");
    assert_eq!(bodies(&next["chunk"]), ["early 6"]);
    let other = b.create_room(&bob, json!({})).await;
    let (status, ev) = b
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&other),
                enc(early_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(
        (status, ev["errcode"].clone()),
        (StatusCode::NOT_FOUND, json!("M_NOT_FOUND"))
    );

    // Backfilled events are history, not news: an incremental sync does not show them.
    let (status, sync) = b
        .get(
            &format!("/_matrix/client/v3/sync?since={}", enc(&since)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !timeline.iter().any(|e| e["content"]["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("early "))),
        "{timeline:?}"
    );
    let (status, sync) = b
        .get(
            &format!(
                "/_matrix/client/v3/sync?since={}",
                enc(sync["next_batch"].as_str().expect("next_batch"))
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(sync["rooms"]["join"].get(&room).is_none(), "{sync}");
}

/// The room's state as `GET /rooms/{id}/state` shows it: event id per (type, state key).
async fn state_ids(
    server: &TestServer,
    user: &TestUser,
    room: &str,
) -> std::collections::BTreeMap<(String, String), String> {
    let (status, body) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state", enc(room)),
            user,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body.as_array()
        .expect("state")
        .iter()
        .map(|e| {
            (
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["state_key"].as_str().unwrap_or_default().to_owned(),
                ),
                e["event_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn concurrent_state_changes_resolve_to_the_same_state_on_both_servers() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let carol = a.user("carol").await;
    let bob = b.user("bob").await;
    let dave = b.user("dave").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    a.join(&carol, &room).await;
    join_via(&b, &bob, &room, &a).await;
    join_via(&b, &dave, &room, &a).await;
    wait_membership(&a, &alice, &room, &dave.user_id, "join").await;

    let pl_path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
        enc(&room)
    );
    let (status, mut pl) = a.get(&pl_path, &alice).await;
    assert_eq!(status, StatusCode::OK);
    // Bob (on B) becomes an admin; B learns of it before the race.
    pl["users"][&bob.user_id] = json!(100);
    let (status, body) = a.put(&pl_path, &alice, pl.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(&b, &bob, &pl_path, "bob's power on B", |p| {
        p["users"][&bob.user_id] == 100
    })
    .await;

    for round in 0..3 {
        // At the same moment: alice (A) demotes bob and makes carol a moderator, while bob (B)
        // changes the topic and kicks dave. Each server accepts its own change before the
        // other's arrives, so the room forks and both servers must resolve it.
        let mut demote = pl.clone();
        demote["users"][&bob.user_id] = json!(0);
        demote["users"][&carol.user_id] = json!(50 + round);
        let topic_path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            enc(&room)
        );
        let kick_path = format!("/_matrix/client/v3/rooms/{}/kick", enc(&room));
        let ((s1, b1), ((s2, b2), (s3, b3))) =
            tokio::join!(a.put(&pl_path, &alice, demote), async {
                tokio::join!(
                    b.put(
                        &topic_path,
                        &bob,
                        json!({ "topic": format!("bob's topic {round}") })
                    ),
                    b.post(
                        &kick_path,
                        &bob,
                        json!({ "user_id": dave.user_id, "reason": "race" })
                    )
                )
            });
        assert_eq!(s1, StatusCode::OK, "{b1}");
        eprintln!("round {round}: bob's topic {s2} {b2}, kick {s3} {b3}");

        // Quiesce: a message from each side after the race arrives on the other side only after
        // the racing events (each destination's queue is in order).
        let from_a = say(&a, &alice, &room, &format!("after race {round} from A")).await;
        let (status, body) = b
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(&room),
                    crate::common::unique_txn()
                ),
                &dave,
                json!({ "msgtype": "m.text", "body": "dave" }),
            )
            .await;
        eprintln!("dave after the race: {status} {body}");
        let (status, body) = b
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(&room),
                    crate::common::unique_txn()
                ),
                &bob,
                json!({ "msgtype": "m.text", "body": format!("after race {round} from B") }),
            )
            .await;
        let from_b = (status == StatusCode::OK)
            .then(|| body["event_id"].as_str().map(str::to_owned))
            .flatten();
        wait_for(
            &b,
            &bob,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&from_a)
            ),
            "A's message on B",
            |_| true,
        )
        .await;
        if let Some(from_b) = from_b {
            wait_for(
                &a,
                &alice,
                &format!(
                    "/_matrix/client/v3/rooms/{}/event/{}",
                    enc(&room),
                    enc(&from_b)
                ),
                "B's message on A",
                |_| true,
            )
            .await;
        }

        let mut same = false;
        let (mut on_a, mut on_b) = (Default::default(), Default::default());
        for _ in 0..100 {
            on_a = state_ids(&a, &alice, &room).await;
            on_b = state_ids(&b, &bob, &room).await;
            if on_a == on_b {
                same = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            same,
            "round {round}: the states differ\nA: {on_a:#?}\nB: {on_b:#?}"
        );
        // Bob is demoted on both servers.
        let (_, now) = b.get(&pl_path, &bob).await;
        assert_eq!(now["users"][&bob.user_id], json!(0), "{now}");
        assert_eq!(now["users"][&carol.user_id], json!(50 + round), "{now}");

        // Restore bob's power (and the members) for the next round.
        let (status, body) = a.put(&pl_path, &alice, pl.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        wait_for(&b, &bob, &pl_path, "bob's power back on B", |p| {
            p["users"][&bob.user_id] == 100
        })
        .await;
        if membership(&a, &alice, &room, &dave.user_id).await != json!("join") {
            join_via(&b, &dave, &room, &a).await;
            wait_membership(&a, &alice, &room, &dave.user_id, "join").await;
        }
    }
}
