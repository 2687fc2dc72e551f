//! Retention that really deletes (D4, A6): a unique string sent to a room with a short
//! `m.room.retention`, the purge job run, and then the string is in no file under the server's
//! data directory (the database, its write-ahead log, the media store) and no client API returns
//! the event, while the room keeps working. The same for the Synapse-compatible admin purge and
//! room deletion, and for media retention.

use std::time::Duration;

use hafen::service::retention;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, files_containing, TestServer, TestUser};

/// Where the server keeps anything: the database directory and the media store.
fn data_dirs(s: &TestServer) -> Vec<std::path::PathBuf> {
    let c = &s.services().config;
    vec![c.database_path.clone(), c.media_dir()]
}

fn found_anywhere(s: &TestServer, needle: &str) -> Vec<String> {
    data_dirs(s)
        .iter()
        .flat_map(|d| files_containing(d, needle.as_bytes()))
        .collect()
}

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        hafen::utils::random_string(24)
    )
}

async fn send_text(s: &TestServer, u: &TestUser, room: &str, body: &str) -> String {
    let txn = hafen::utils::random_string(12);
    let (status, v) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                enc(room)
            ),
            u,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "send: {v}");
    v["event_id"].as_str().expect("event_id").to_owned()
}

async fn admin(s: &TestServer, localpart: &str) -> TestUser {
    let u = s.user(localpart).await;
    let id = ruma::UserId::parse(u.user_id.as_str()).expect("user id");
    s.services()
        .accounts
        .set_admin(&id, true)
        .expect("make admin");
    u
}

/// What a client can still get of the event: nothing from sync, messages, context, event,
/// relations, search.
async fn assert_gone_from_apis(
    s: &TestServer,
    u: &TestUser,
    room: &str,
    event_id: &str,
    text: &str,
) {
    let (status, sync) = s.get("/_matrix/client/v3/sync", u).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let sync_text = sync.to_string();
    assert!(!sync_text.contains(text), "sync still has the text");
    assert!(!sync_text.contains(event_id), "sync still has the event");

    let (status, msgs) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                enc(room)
            ),
            u,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    assert!(msgs["chunk"].is_array(), "{msgs}");
    assert!(!msgs.to_string().contains(event_id), "messages: {msgs}");
    assert!(!msgs.to_string().contains(text), "messages: {msgs}");

    let got = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}",
                enc(room),
                enc(event_id)
            ),
            u,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(room),
                enc(event_id)
            ),
            u,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!(
                "/_matrix/client/v1/rooms/{}/relations/{}",
                enc(room),
                enc(event_id)
            ),
            u,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let (status, found) = s
        .post(
            "/_matrix/client/v3/search",
            u,
            json!({ "search_categories": { "room_events": { "search_term": text } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        found["search_categories"]["room_events"]["results"],
        json!([]),
        "{found}"
    );
}

/// The room still works: its state is there and a new message goes through and is read back.
async fn assert_room_works(s: &TestServer, u: &TestUser, room: &str, name: &str) {
    let (status, v) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(room)),
            u,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "name": name }));
    let after = unique("after-purge");
    let id = send_text(s, u, room, &after).await;
    let (status, v) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(&id)),
            u,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"]["body"], json!(after));
}

async fn search_count(s: &TestServer, u: &TestUser, text: &str) -> usize {
    let (status, found) = s
        .post(
            "/_matrix/client/v3/search",
            u,
            json!({ "search_categories": { "room_events": { "search_term": text } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    found["search_categories"]["room_events"]["results"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn room_retention_purges_expired_messages_from_disk_and_apis() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(
            &alice,
            json!({
                "name": "Short-lived",
                "initial_state": [{
                    "type": "m.room.retention", "state_key": "",
                    "content": { "max_lifetime": 1000 }
                }]
            }),
        )
        .await;
    s.invite_and_join(&alice, &bob, &room).await;
    let secret = unique("retention-secret");
    let event_id = send_text(&s, &alice, &room, &secret).await;
    // An edit carrying the text too, and a thread reply: both expire with it.
    let txn = hafen::utils::random_string(12);
    let (status, v) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                enc(&room)
            ),
            &alice,
            json!({
                "msgtype": "m.text", "body": format!("* {secret}"),
                "m.new_content": { "msgtype": "m.text", "body": format!("{secret} edited") },
                "m.relates_to": { "rel_type": "m.replace", "event_id": event_id }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    let txn = hafen::utils::random_string(12);
    let (status, v) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                enc(&room)
            ),
            &alice,
            json!({
                "msgtype": "m.text", "body": format!("thread on {secret}"),
                "m.relates_to": { "rel_type": "m.thread", "event_id": event_id }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let threads_path = format!("/_matrix/client/v1/rooms/{}/threads", enc(&room));
    let (status, v) = s.get(&threads_path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["chunk"].as_array().map(Vec::len), Some(1), "{v}");
    let (status, v) = s.get("/_matrix/client/v3/notifications", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v.to_string().contains(&event_id), "{v}");
    let (status, v) = s.get("/_matrix/client/v3/sync", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["rooms"]["join"][&room]["unread_notifications"]["notification_count"],
        json!(3),
        "{v}"
    );

    // Before: the text is on disk and found by search. Flushed, it is in an SST file too (a
    // compaction must drop that old version, not only a new log file replace the old one).
    assert!(!found_anywhere(&s, &secret).is_empty());
    s.services().storage.flush_all().expect("flush");
    let before = found_anywhere(&s, &secret);
    assert!(before.iter().any(|f| f.ends_with(".sst")), "{before:?}");
    assert!(search_count(&s, &bob, &secret).await >= 1);

    // The purge runs at a time when all of that has expired but a message sent later has not
    // (the job's clock is injected: the same as waiting a second, without the wait).
    tokio::time::sleep(Duration::from_millis(10)).await;
    let expired_before = hafen::utils::now_ms();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let fresh = unique("fresh");
    let fresh_id = send_text(&s, &bob, &room, &fresh).await;
    let report = retention::purge_expired(s.services(), expired_before + 1000)
        .await
        .expect("purge");
    assert_eq!(report.events, 3, "{report:?}");
    assert_eq!(report.rooms, 1);

    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    assert_gone_from_apis(&s, &bob, &room, &event_id, &secret).await;
    let (status, v) = s.get(&threads_path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["chunk"], json!([]), "{v}");
    let (status, v) = s.get("/_matrix/client/v3/notifications", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // (The invite, a state event, is still there.)
    let listed: Vec<&Value> = v["notifications"]
        .as_array()
        .map(|a| a.iter().map(|n| &n["event"]["event_id"]).collect())
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{v}");
    assert!(!v.to_string().contains(&event_id), "{v}");
    assert!(!v.to_string().contains(&secret), "{v}");
    let (status, v) = s.get("/_matrix/client/v3/sync", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // Only the invite's notification is left to count.
    assert_eq!(
        v["rooms"]["join"][&room]["unread_notifications"]["notification_count"],
        json!(1),
        "{v}"
    );
    // The younger message is untouched.
    let (status, v) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&fresh_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"]["body"], json!(fresh));
    // State stays, including the policy itself; the room goes on.
    let (status, v) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.retention/",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "max_lifetime": 1000 }));
    assert_room_works(&s, &alice, &room, "Short-lived").await;
    let (status, v) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["joined"].as_object().map(|o| o.len()), Some(2), "{v}");

    // A room without a policy keeps its messages (no server default configured).
    let keep = s.create_room(&alice, json!({ "name": "Kept" })).await;
    let kept = unique("kept");
    send_text(&s, &alice, &keep, &kept).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = retention::purge_expired(s.services(), hafen::utils::now_ms() + 3_600_000)
        .await
        .expect("purge");
    // Only the short-lived room's newer messages expire an hour later.
    assert_eq!(report.rooms, 1, "{report:?}");
    assert_eq!(search_count(&s, &alice, &kept).await, 1);
    s.stop().await;
}

#[tokio::test]
async fn server_bounds_clamp_room_policies() {
    // allowed_min raises a room's 1 ms lifetime to an hour: nothing expires now.
    let s = TestServer::start_with(|c| {
        c.retention.allowed_min = Some(3_600_000);
        c.retention.default_max_lifetime = Some(7_200_000);
    })
    .await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(
            &alice,
            json!({
                "name": "Clamped",
                "initial_state": [{
                    "type": "m.room.retention", "state_key": "",
                    "content": { "max_lifetime": 1 }
                }]
            }),
        )
        .await;
    let other = s.create_room(&alice, json!({ "name": "Default" })).await;
    let text = unique("clamped");
    send_text(&s, &alice, &room, &text).await;
    let other_text = unique("default");
    send_text(&s, &alice, &other, &other_text).await;
    let now = hafen::utils::now_ms();
    let report = retention::purge_expired(s.services(), now + 10)
        .await
        .expect("purge");
    assert_eq!(report.events, 0, "{report:?}");
    assert_eq!(search_count(&s, &alice, &text).await, 1);
    // An hour on, the clamped room expires; the default (two hours) not yet.
    let report = retention::purge_expired(s.services(), now + 3_600_000 + 10)
        .await
        .expect("purge");
    assert_eq!((report.rooms, report.events), (1, 1), "{report:?}");
    assert_eq!(search_count(&s, &alice, &text).await, 0);
    assert_eq!(search_count(&s, &alice, &other_text).await, 1);
    let report = retention::purge_expired(s.services(), now + 7_200_000 + 10)
        .await
        .expect("purge");
    assert_eq!(report.events, 1, "{report:?}");
    assert_eq!(search_count(&s, &alice, &other_text).await, 0);
    assert_eq!(found_anywhere(&s, &other_text), Vec::<String>::new());
    assert_room_works(&s, &alice, &other, "Default").await;
    s.stop().await;
}

async fn wait_status(s: &TestServer, u: &TestUser, path: &str, done: &str) -> Value {
    for _ in 0..400 {
        let (status, v) = s.get(path, u).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if v["status"] == json!(done) || v["status"] == json!("failed") {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} did not reach {done}");
}

#[tokio::test]
async fn admin_purge_history() {
    let s = TestServer::start().await;
    let root = admin(&s, "root").await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({ "name": "Purged" })).await;
    let secret = unique("purge-secret");
    let event_id = send_text(&s, &alice, &room, &secret).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut = hafen::utils::now_ms();
    let path = format!("/_synapse/admin/v1/purge_history/{}", enc(&room));

    // Not an admin: refused, and nothing happens.
    let got = s
        .post(
            &path,
            &alice,
            json!({ "purge_up_to_ts": cut, "delete_local_events": true }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .get("/_synapse/admin/v1/purge_history_status/nope", &alice)
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Bad requests.
    let got = s.post(&path, &root, json!({})).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            "/_synapse/admin/v1/purge_history/!nope:localhost",
            &root,
            json!({ "purge_up_to_ts": cut }),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get("/_synapse/admin/v1/purge_history_status/nope", &root)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // By default local users' events are kept (Synapse's default).
    let (status, v) = s.post(&path, &root, json!({ "purge_up_to_ts": cut })).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let purge_id = v["purge_id"].as_str().expect("purge_id").to_owned();
    assert_eq!(v, json!({ "purge_id": purge_id }));
    let st = wait_status(
        &s,
        &root,
        &format!("/_synapse/admin/v1/purge_history_status/{purge_id}"),
        "complete",
    )
    .await;
    assert_eq!(st, json!({ "status": "complete" }));
    assert_eq!(search_count(&s, &alice, &secret).await, 1);

    // With delete_local_events they go, from the APIs and from the disk.
    let (status, v) = s
        .post(
            &path,
            &root,
            json!({ "purge_up_to_ts": cut, "delete_local_events": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let purge_id = v["purge_id"].as_str().expect("purge_id").to_owned();
    let st = wait_status(
        &s,
        &root,
        &format!("/_synapse/admin/v1/purge_history_status/{purge_id}"),
        "complete",
    )
    .await;
    assert_eq!(st, json!({ "status": "complete" }));
    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    assert_gone_from_apis(&s, &alice, &room, &event_id, &secret).await;
    assert_room_works(&s, &alice, &room, "Purged").await;

    // Up to an event: that event stays, the one before goes.
    let older = unique("older");
    let older_id = send_text(&s, &alice, &room, &older).await;
    let newer = unique("newer");
    let newer_id = send_text(&s, &alice, &room, &newer).await;
    let (status, v) = s
        .post(
            &format!("{path}/{}", enc(&newer_id)),
            &root,
            json!({ "delete_local_events": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let purge_id = v["purge_id"].as_str().expect("purge_id").to_owned();
    wait_status(
        &s,
        &root,
        &format!("/_synapse/admin/v1/purge_history_status/{purge_id}"),
        "complete",
    )
    .await;
    assert_eq!(found_anywhere(&s, &older), Vec::<String>::new());
    assert_gone_from_apis(&s, &alice, &room, &older_id, &older).await;
    assert_eq!(search_count(&s, &alice, &newer).await, 1);

    // Each call is in the audit log.
    let (entries, _) = s
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "admin_action")
        .expect("audit");
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(entries
        .iter()
        .all(|e| e.user.as_deref() == Some(root.user_id.as_str())
            && e.room.as_deref() == Some(room.as_str())
            && e.detail["action"] == json!("purge_history")));
    s.stop().await;
}

async fn room_with_alias(
    s: &TestServer,
    owner: &TestUser,
    member: &TestUser,
    alias: &str,
) -> String {
    let room = s
        .create_room(
            owner,
            json!({ "name": "Doomed", "room_alias_name": alias, "visibility": "public" }),
        )
        .await;
    s.join(member, &room).await;
    room
}

#[tokio::test]
async fn admin_delete_room_v1() {
    let s = TestServer::start().await;
    let root = admin(&s, "root").await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = room_with_alias(&s, &alice, &bob, "doomed").await;
    let secret = unique("deleted-room-secret");
    let event_id = send_text(&s, &bob, &room, &secret).await;
    let path = format!("/_synapse/admin/v1/rooms/{}", enc(&room));

    let got = s
        .req(Method::DELETE, &path, Some(&alice.token), Some(json!({})))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .req(
            Method::DELETE,
            "/_synapse/admin/v1/rooms/!nope:localhost",
            Some(&root.token),
            Some(json!({})),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let (status, mut v) = s
        .req(
            Method::DELETE,
            &path,
            Some(&root.token),
            Some(json!({ "purge": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    if let Some(k) = v["kicked_users"].as_array_mut() {
        k.sort_by_key(|u| u.to_string());
    }
    assert_eq!(
        v,
        json!({
            "kicked_users": [alice.user_id, bob.user_id],
            "failed_to_kick_users": [],
            "local_aliases": [format!("#doomed:{}", s.server_name())],
            "new_room_id": null,
        })
    );
    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    // (The room id stays where it is a record: the audit log, the device-list log.)

    // Gone everywhere a client could look.
    let got = s
        .get(
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc(&format!("#doomed:{}", s.server_name()))
            ),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (status, v) = s.get("/_matrix/client/v3/publicRooms", &alice).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["chunk"], json!([]), "{v}");
    let (status, v) = s.get("/_matrix/client/v3/joined_rooms", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "joined_rooms": [] }));
    let (status, v) = s.get("/_matrix/client/v3/sync", &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(!v.to_string().contains(&room), "{v}");
    assert_eq!(search_count(&s, &bob, &secret).await, 0);
    let got = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&event_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(got.0.as_u16() / 100, 4, "{:?}", got);
    // Deleting it again: it is unknown.
    let got = s
        .req(Method::DELETE, &path, Some(&root.token), Some(json!({})))
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    // The users go on: a new room works.
    let next = s.create_room(&alice, json!({ "name": "Next" })).await;
    assert_room_works(&s, &alice, &next, "Next").await;
    let (entries, _) = s
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "admin_action")
        .expect("audit");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].detail["action"], json!("delete_room"));
    s.stop().await;
}

#[tokio::test]
async fn admin_delete_room_v2() {
    let s = TestServer::start().await;
    let root = admin(&s, "root").await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = room_with_alias(&s, &alice, &bob, "doomed2").await;
    let secret = unique("deleted-room-v2");
    send_text(&s, &alice, &room, &secret).await;
    let path = format!("/_synapse/admin/v2/rooms/{}", enc(&room));
    let got = s
        .req(Method::DELETE, &path, Some(&bob.token), Some(json!({})))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .get("/_synapse/admin/v2/rooms/delete_status/nope", &root)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let (status, v) = s
        .req(Method::DELETE, &path, Some(&root.token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let delete_id = v["delete_id"].as_str().expect("delete_id").to_owned();
    assert_eq!(v, json!({ "delete_id": delete_id }));
    let mut st = wait_status(
        &s,
        &root,
        &format!("/_synapse/admin/v2/rooms/delete_status/{delete_id}"),
        "complete",
    )
    .await;
    if let Some(k) = st["shutdown_room"]["kicked_users"].as_array_mut() {
        k.sort_by_key(|u| u.to_string());
    }
    let shutdown = json!({
        "kicked_users": [alice.user_id, bob.user_id],
        "failed_to_kick_users": [],
        "local_aliases": [format!("#doomed2:{}", s.server_name())],
        "new_room_id": null,
    });
    assert_eq!(
        st,
        json!({ "status": "complete", "shutdown_room": shutdown })
    );
    let (status, mut v) = s.get(&format!("{path}/delete_status"), &root).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    if let Some(k) = v["results"][0]["shutdown_room"]["kicked_users"].as_array_mut() {
        k.sort_by_key(|u| u.to_string());
    }
    assert_eq!(
        v,
        json!({ "results": [{ "delete_id": delete_id, "status": "complete", "shutdown_room": shutdown }] })
    );
    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    assert_eq!(search_count(&s, &alice, &secret).await, 0);
    s.stop().await;
}

async fn upload(s: &TestServer, u: &TestUser, bytes: Vec<u8>) -> (String, String) {
    let res = s
        .http
        .post(format!("{}/_matrix/media/v3/upload", s.base))
        .bearer_auth(&u.token)
        .header("content-type", "text/plain")
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let v: Value = res.json().await.expect("json");
    let mxc = v["content_uri"].as_str().expect("content_uri");
    let rest = mxc.strip_prefix("mxc://").expect("mxc");
    let (server, id) = rest.split_once('/').expect("server/id");
    (server.to_owned(), id.to_owned())
}

async fn download(s: &TestServer, u: &TestUser, server: &str, id: &str) -> (StatusCode, Vec<u8>) {
    let res = s
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/download/{server}/{id}",
            s.base
        ))
        .bearer_auth(&u.token)
        .send()
        .await
        .expect("download");
    let status = res.status();
    (status, res.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn media_retention_deletes_files_when_unused() {
    let s = TestServer::start_with(|c| c.media_retention.local_max_lifetime = Some(500)).await;
    let alice = s.user("alice").await;
    let secret = unique("media-secret");
    let (server, first) = upload(&s, &alice, secret.clone().into_bytes()).await;
    let first_done = hafen::utils::now_ms();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The same bytes again: one file, two media.
    let (_, second) = upload(&s, &alice, secret.clone().into_bytes()).await;
    assert_eq!(
        download(&s, &alice, &server, &first).await.0,
        StatusCode::OK
    );
    let files = files_containing(&s.services().config.media_dir(), secret.as_bytes());
    assert_eq!(files.len(), 1, "{files:?}");

    // Half a second after the first upload: the first expired, the second not, and the file
    // stays for the second.
    let report = retention::purge_expired(s.services(), first_done + 500)
        .await
        .expect("purge");
    assert_eq!(report.media, 1);
    let (status, body) = download(&s, &alice, &server, &first).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["errcode"], json!("M_NOT_FOUND"));
    let (status, body) = download(&s, &alice, &server, &second).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, secret.as_bytes());

    // Later the second expires too, and the file goes.
    let report = retention::purge_expired(s.services(), hafen::utils::now_ms() + 1000)
        .await
        .expect("purge");
    assert_eq!(report.media, 1);
    assert_eq!(
        download(&s, &alice, &server, &second).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    s.stop().await;
}

#[tokio::test]
async fn the_job_runs_by_itself() {
    let s = TestServer::start_with(|c| c.retention.purge_interval = 1000).await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(
            &alice,
            json!({
                "name": "Ephemeral",
                "initial_state": [{
                    "type": "m.room.retention", "state_key": "",
                    "content": { "max_lifetime": 1 }
                }]
            }),
        )
        .await;
    let secret = unique("job-secret");
    let event_id = send_text(&s, &alice, &room, &secret).await;
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if search_count(&s, &alice, &secret).await == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "the job did not purge within 10 s");
    // The job compacts after its writes; give it the moment between the two.
    let mut on_disk = found_anywhere(&s, &secret);
    for _ in 0..50 {
        if on_disk.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        on_disk = found_anywhere(&s, &secret);
    }
    assert_eq!(on_disk, Vec::<String>::new());
    assert_gone_from_apis(&s, &alice, &room, &event_id, &secret).await;
    s.stop().await;
}

#[tokio::test]
async fn an_interrupted_room_deletion_is_finished_by_the_job() {
    use hafen::storage::{keys, Table};
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({ "name": "Half" })).await;
    let secret = unique("half-deleted");
    send_text(&s, &alice, &room, &secret).await;
    // A crash right after the deletion was recorded: only its marker is on disk.
    s.services()
        .storage
        .put(Table::Global, &keys::join(&["deleting_room", &room]), b"")
        .expect("marker");
    retention::purge_expired(s.services(), hafen::utils::now_ms())
        .await
        .expect("purge");
    let (status, v) = s.get("/_matrix/client/v3/joined_rooms", &alice).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "joined_rooms": [] }));
    assert_eq!(search_count(&s, &alice, &secret).await, 0);
    assert_eq!(found_anywhere(&s, &secret), Vec::<String>::new());
    // The next run has nothing left to finish.
    let report = retention::purge_expired(s.services(), hafen::utils::now_ms())
        .await
        .expect("purge");
    assert_eq!((report.rooms, report.events, report.media), (0, 0, 0));
    s.stop().await;
}

/// Deleting a room another server is in: the local members' leave events reach that server
/// before the room's rows go, even when it is down at the moment of the deletion.
#[tokio::test]
async fn room_deletion_waits_for_the_leaves_to_reach_other_servers() {
    use crate::federation_rooms::{join_via, wait_membership};
    let pki = crate::common::TestPki::new();
    let a = crate::common::start_federating(&pki, |_| {}).await;
    let mut b = crate::common::start_federating(&pki, |_| {}).await;
    let root = admin(&a, "root").await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let got = join_via(&b, &bob, &room, &a).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    wait_membership(&b, &bob, &room, &alice.user_id, "join").await;

    // B is down when the deletion starts.
    b.halt().await;
    let path = format!("/_synapse/admin/v2/rooms/{}", enc(&room));
    let (status, v) = a
        .req(Method::DELETE, &path, Some(&root.token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let delete_id = v["delete_id"].as_str().expect("delete_id").to_owned();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, st) = a
        .get(
            &format!("/_synapse/admin/v2/rooms/delete_status/{delete_id}"),
            &root,
        )
        .await;
    assert_eq!(
        st["status"],
        json!("shutting_down"),
        "still waiting for B: {st}"
    );
    b.resume().await;
    let st = wait_status(
        &a,
        &root,
        &format!("/_synapse/admin/v2/rooms/delete_status/{delete_id}"),
        "complete",
    )
    .await;
    assert_eq!(
        st["shutdown_room"]["kicked_users"],
        json!([alice.user_id]),
        "{st}"
    );
    // B learned that alice left; the room is gone on A.
    wait_membership(&b, &bob, &room, &alice.user_id, "leave").await;
    let (status, _) = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    a.stop().await;
    b.stop().await;
}
