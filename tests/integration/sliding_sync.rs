//! Simplified Sliding Sync (MSC4186) over HTTP: lists (ranges, counts, recency order, filters),
//! required_state and its wildcards, timeline_limit, room subscriptions, incremental responses
//! by `pos` and `M_UNKNOWN_POS`, the long-poll, each extension, unread counts; then a
//! `matrix-sdk` client's sliding sync seeing a new room and a new message arrive.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    common::{assert_err, enc, TestServer, TestUser},
    e2ee::{device_keys, signed_key},
    sync::{bodies, text, types},
};

const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const V3: &str = "/_matrix/client/v3";

/// One sliding sync request; `query` is appended (e.g. `pos=...&timeout=0`).
async fn ss(s: &TestServer, u: &TestUser, query: &str, body: Value) -> (StatusCode, Value) {
    s.post(&format!("{SS}?{query}"), u, body).await
}

/// A request that must succeed; returns the body.
async fn ss_ok(s: &TestServer, u: &TestUser, query: &str, body: Value) -> Value {
    let (status, v) = ss(s, u, query, body).await;
    assert_eq!(status, StatusCode::OK, "sliding sync: {v}");
    assert!(v["pos"].is_string(), "{v}");
    v
}

fn pos_query(v: &Value) -> String {
    format!("pos={}&timeout=0", enc(v["pos"].as_str().expect("pos")))
}

/// A list named `all` over `ranges`.
fn list(ranges: Value, required_state: Value, timeline_limit: u64) -> Value {
    json!({ "lists": { "all": {
        "ranges": ranges,
        "required_state": required_state,
        "timeline_limit": timeline_limit,
    } } })
}

fn room<'a>(v: &'a Value, room: &str) -> &'a Value {
    &v["rooms"][room]
}

fn room_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["rooms"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Alice and bob in a public room alice made.
async fn two_in_room(s: &TestServer) -> (TestUser, TestUser, String) {
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let r = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &r).await;
    (alice, bob, r)
}

async fn read_receipt(s: &TestServer, u: &TestUser, room: &str, event: &str) {
    let path = format!("{V3}/rooms/{}/receipt/m.read/{}", enc(room), enc(event));
    let got = s.post(&path, u, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

async fn named_room(s: &TestServer, u: &TestUser, name: &str) -> String {
    s.create_room(u, json!({ "name": name, "preset": "private_chat" }))
        .await
}

#[tokio::test]
async fn sliding_sync_advertised_and_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (status, v) = s
        .req(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v["unstable_features"]["org.matrix.simplified_msc3575"],
        json!(true)
    );

    assert_err(
        &s.req(Method::POST, SS, None, Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req_raw(Method::POST, SS, Some(&alice.token), b"{not json")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &ss(&s, &alice, "", json!({ "lists": 5 })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &ss(&s, &alice, "timeout=soon", json!({})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &ss(&s, &alice, "", list(json!([[3, 1]]), json!([]), 1)).await,
        400,
        "M_INVALID_PARAM",
    );
    let many: serde_json::Map<String, Value> = (0..101)
        .map(|i| {
            (
                format!("l{i}"),
                json!({ "ranges": [[0, 1]], "timeline_limit": 1 }),
            )
        })
        .collect();
    assert_err(
        &ss(&s, &alice, "", json!({ "lists": many })).await,
        400,
        "M_INVALID_PARAM",
    );
    let unknown = ss(&s, &alice, "pos=nope_1&timeout=0", json!({})).await;
    assert_err(&unknown, 400, "M_UNKNOWN_POS");

    // An empty request works and echoes the transaction id.
    let v = ss_ok(&s, &alice, "", json!({ "txn_id": "t-1" })).await;
    assert_eq!(v["txn_id"], json!("t-1"));
    assert_eq!(v["lists"], json!({}));
    assert_eq!(v["rooms"], json!({}));
}

#[tokio::test]
async fn sliding_sync_lists_ranges_counts_and_recency() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let a = named_room(&s, &alice, "A").await;
    let b = named_room(&s, &alice, "B").await;
    let c = named_room(&s, &alice, "C").await;
    // A message makes A the most recent, then C (created last), then B.
    text(&s, &alice, &a, "hello A").await;

    let v = ss_ok(
        &s,
        &alice,
        "",
        list(json!([[0, 1]]), json!([["m.room.name", ""]]), 1),
    )
    .await;
    assert_eq!(v["lists"]["all"]["count"], json!(3), "{v}");
    assert_eq!(room_ids(&v), sorted(vec![a.clone(), c.clone()]), "{v}");
    let (ra, rc) = (room(&v, &a), room(&v, &c));
    assert_eq!(ra["initial"], json!(true));
    assert_eq!(ra["name"], json!("A"));
    assert!(ra["bump_stamp"].as_u64() > rc["bump_stamp"].as_u64(), "{v}");
    // timeline_limit 1: only the newest event, and the timeline says more exist.
    assert_eq!(
        bodies(ra["timeline"].as_array().expect("timeline")),
        vec!["hello A"]
    );
    assert_eq!(ra["limited"], json!(true));
    assert!(ra["prev_batch"]
        .as_str()
        .is_some_and(|t| t.starts_with('s')));
    // required_state: exactly the name event.
    assert_eq!(
        types(ra["required_state"].as_array().expect("state")),
        vec!["m.room.name"]
    );
    assert_eq!(ra["joined_count"], json!(1));
    assert_eq!(ra["invited_count"], json!(0));
    assert_eq!(ra["is_dm"], json!(false));

    // The second room of the list alone: C; the third: B.
    let v = ss_ok(&s, &alice, "", list(json!([[1, 1], [2, 5]]), json!([]), 0)).await;
    assert_eq!(room_ids(&v), sorted(vec![b.clone(), c.clone()]), "{v}");
    assert_eq!(room(&v, &b)["timeline"], json!([]));
    assert_eq!(room(&v, &b)["limited"], json!(true));

    // A message in B moves it to the top.
    text(&s, &alice, &b, "B now").await;
    let v = ss_ok(&s, &alice, "", list(json!([[0, 0]]), json!([]), 1)).await;
    assert_eq!(room_ids(&v), vec![b.clone()], "{v}");
    // A range past the end is empty but the count is still given.
    let v = ss_ok(&s, &alice, "", list(json!([[10, 20]]), json!([]), 1)).await;
    assert_eq!(v["lists"]["all"]["count"], json!(3));
    assert_eq!(v["rooms"], json!({}));
}

#[tokio::test]
async fn sliding_sync_list_filters() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let plain = named_room(&s, &alice, "plain").await;
    let encrypted = s
        .create_room(
            &alice,
            json!({ "initial_state": [{
                "type": "m.room.encryption", "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" },
            }] }),
        )
        .await;
    let space = s
        .create_room(&alice, json!({ "creation_content": { "type": "m.space" } }))
        .await;
    let dm = s
        .create_room(
            &bob,
            json!({ "is_direct": true, "invite": [alice.user_id] }),
        )
        .await;
    let lists = json!({ "lists": {
        "invites": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_invite": true } },
        "joined": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_invite": false } },
        "encrypted": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_encrypted": true } },
        "spaces": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "room_types": ["m.space"] } },
        "rooms": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "not_room_types": ["m.space"] } },
        "dms": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_dm": true } },
    } });
    let v = ss_ok(&s, &alice, "", lists.clone()).await;
    let count = |name: &str| v["lists"][name]["count"].as_u64();
    assert_eq!(count("invites"), Some(1), "{v}");
    assert_eq!(count("joined"), Some(3));
    assert_eq!(count("encrypted"), Some(1));
    assert_eq!(count("spaces"), Some(1));
    assert_eq!(count("rooms"), Some(3));
    // The invite says it is direct.
    assert_eq!(count("dms"), Some(1));
    let inv = room(&v, &dm);
    assert_eq!(inv["is_dm"], json!(true));
    let stripped = inv["invite_state"].as_array().expect("invite_state");
    assert!(stripped.iter().any(|e| e["type"] == "m.room.member"
        && e["state_key"] == json!(alice.user_id)
        && e["content"]["membership"] == "invite"));
    assert!(inv.get("timeline").is_none());

    // m.direct makes a joined room a DM too.
    let got = s
        .put(
            &format!("{V3}/user/{}/account_data/m.direct", enc(&alice.user_id)),
            &alice,
            json!({ bob.user_id.clone(): [plain.clone()] }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let v = ss_ok(&s, &alice, "", lists).await;
    assert_eq!(v["lists"]["dms"]["count"], json!(2), "{v}");
    assert_eq!(room(&v, &plain)["is_dm"], json!(true));
    let _ = encrypted;

    // `spaces`: the children of the space only.
    let got = s
        .put(
            &format!(
                "{V3}/rooms/{}/state/m.space.child/{}",
                enc(&space),
                enc(&plain)
            ),
            &alice,
            json!({ "via": [s.server_name()] }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let in_space = json!({ "lists": { "space": {
        "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "spaces": [space] },
    } } });
    let v = ss_ok(&s, &alice, "", in_space).await;
    assert_eq!(v["lists"]["space"]["count"], json!(1), "{v}");
    assert_eq!(room_ids(&v), vec![plain.clone()]);
    let bad = json!({ "lists": { "space": {
        "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "spaces": ["not a room"] },
    } } });
    assert_err(&ss(&s, &alice, "", bad).await, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn sliding_sync_required_state_wildcards() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let r = s
        .create_room(&alice, json!({ "preset": "public_chat", "topic": "t" }))
        .await;
    s.join(&bob, &r).await;
    s.join(&carol, &r).await;
    text(&s, &bob, &r, "from bob").await;

    let state_of = |v: &Value| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = room(v, &r)["required_state"]
            .as_array()
            .expect("required_state")
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").to_owned(),
                    e["state_key"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let pair = |t: &str, k: &str| (t.to_owned(), k.to_owned());

    // `*`: everything.
    let v = ss_ok(
        &s,
        &alice,
        "",
        list(json!([[0, 0]]), json!([["*", "*"]]), 1),
    )
    .await;
    let all = state_of(&v);
    assert!(all.contains(&pair("m.room.create", "")));
    assert!(all.contains(&pair("m.room.topic", "")));
    assert_eq!(
        all.iter().filter(|(t, _)| t == "m.room.member").count(),
        3,
        "{v}"
    );
    // Heroes name the room after the others when it has no name.
    let heroes: Vec<&str> = room(&v, &r)["heroes"]
        .as_array()
        .expect("heroes")
        .iter()
        .filter_map(|h| h["user_id"].as_str())
        .collect();
    assert_eq!(heroes, vec![bob.user_id.as_str(), carol.user_id.as_str()]);
    assert_eq!(room(&v, &r)["joined_count"], json!(3));

    // `$ME` and `$LAZY`: the user's own member event and those of the timeline's senders.
    let v = ss_ok(
        &s,
        &alice,
        "",
        list(
            json!([[0, 0]]),
            json!([
                ["m.room.member", "$ME"],
                ["m.room.member", "$LAZY"],
                ["m.room.topic", ""]
            ]),
            1,
        ),
    )
    .await;
    assert_eq!(
        state_of(&v),
        vec![
            pair("m.room.member", &alice.user_id),
            pair("m.room.member", &bob.user_id),
            pair("m.room.topic", ""),
        ],
        "{v}"
    );
    // A type with `*` state keys: every member.
    let v = ss_ok(
        &s,
        &alice,
        "",
        list(json!([[0, 0]]), json!([["m.room.member", "*"]]), 0),
    )
    .await;
    assert_eq!(state_of(&v).len(), 3);
}

#[tokio::test]
async fn sliding_sync_incremental_by_pos() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let a = named_room(&s, &alice, "A").await;
    let b = named_room(&s, &alice, "B").await;
    let req = list(json!([[0, 9]]), json!([["m.room.name", ""]]), 5);

    let first = ss_ok(&s, &alice, "", req.clone()).await;
    assert_eq!(room_ids(&first), sorted(vec![a.clone(), b.clone()]));
    // Nothing new: no rooms, same count.
    let quiet = ss_ok(&s, &alice, &pos_query(&first), req.clone()).await;
    assert_eq!(quiet["rooms"], json!({}), "{quiet}");
    assert_eq!(quiet["lists"]["all"]["count"], json!(2));

    text(&s, &alice, &a, "new in A").await;
    let v = ss_ok(&s, &alice, &pos_query(&quiet), req.clone()).await;
    assert_eq!(room_ids(&v), vec![a.clone()], "{v}");
    let ra = room(&v, &a);
    assert!(ra.get("initial").is_none(), "{v}");
    assert_eq!(
        bodies(ra["timeline"].as_array().expect("timeline")),
        vec!["new in A"]
    );
    assert_eq!(ra["num_live"], json!(1));
    assert_eq!(ra["limited"], json!(false));
    // The name did not change: no required_state again.
    assert_eq!(ra["required_state"], json!([]));

    // A state change is sent in required_state when asked for.
    let got = s
        .put(
            &format!("{V3}/rooms/{}/state/m.room.name/", enc(&b)),
            &alice,
            json!({ "name": "B2" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let w = ss_ok(&s, &alice, &pos_query(&v), req.clone()).await;
    assert_eq!(room_ids(&w), vec![b.clone()], "{w}");
    assert_eq!(room(&w, &b)["name"], json!("B2"));
    assert_eq!(
        types(room(&w, &b)["required_state"].as_array().expect("state")),
        vec!["m.room.name"]
    );

    // A new room appears with `initial` and the list count grows.
    let c = named_room(&s, &alice, "C").await;
    let x = ss_ok(&s, &alice, &pos_query(&w), req.clone()).await;
    assert_eq!(x["lists"]["all"]["count"], json!(3));
    assert_eq!(room(&x, &c)["initial"], json!(true), "{x}");

    // The previous pos may be retried until a newer one is used; then it is gone.
    let retry = ss_ok(&s, &alice, &pos_query(&w), req.clone()).await;
    assert_eq!(room(&retry, &c)["initial"], json!(true));
    ss_ok(&s, &alice, &pos_query(&x), req.clone()).await;
    assert_err(
        &ss(&s, &alice, &pos_query(&w), req.clone()).await,
        400,
        "M_UNKNOWN_POS",
    );
    // A pos belongs to its connection: another conn_id does not know it.
    let mut other = req.clone();
    other["conn_id"] = json!("other");
    assert_err(
        &ss(&s, &alice, &pos_query(&x), other).await,
        400,
        "M_UNKNOWN_POS",
    );
}

#[tokio::test]
async fn sliding_sync_room_subscriptions() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let old = named_room(&s, &alice, "old").await;
    let _new = named_room(&s, &alice, "new").await;
    let strangers = named_room(&s, &bob, "not alice's").await;
    text(&s, &alice, &old, "one").await;
    text(&s, &alice, &old, "two").await;
    let _newest = named_room(&s, &alice, "newest").await;

    // The list shows only the newest room; the subscription adds `old` with its own limit.
    let mut req = list(json!([[0, 0]]), json!([]), 1);
    req["room_subscriptions"] = json!({
        old.clone(): { "required_state": [["m.room.name", ""]], "timeline_limit": 2 },
        strangers.clone(): { "timeline_limit": 2 },
    });
    let v = ss_ok(&s, &alice, "", req).await;
    assert_eq!(room_ids(&v).len(), 2, "{v}");
    let ro = room(&v, &old);
    assert_eq!(
        bodies(ro["timeline"].as_array().expect("timeline")),
        vec!["one", "two"]
    );
    assert_eq!(ro["name"], json!("old"));
    assert!(v["rooms"].get(&strangers).is_none(), "{v}");

    // Opening a room (a subscription with a longer timeline than its list gave it) sends it
    // again with the longer timeline, as a fresh room.
    let newest = room_ids(&v)
        .into_iter()
        .find(|r| *r != old)
        .expect("the list's room");
    let pos = v["pos"].as_str().expect("pos").to_owned();
    text(&s, &alice, &newest, "a").await;
    text(&s, &alice, &newest, "b").await;
    let mut req = list(json!([[0, 0]]), json!([]), 1);
    let v = ss_ok(&s, &alice, &format!("pos={}", enc(&pos)), req.clone()).await;
    assert_eq!(
        bodies(room(&v, &newest)["timeline"].as_array().expect("timeline")),
        vec!["b"]
    );
    let pos = v["pos"].as_str().expect("pos").to_owned();
    req["room_subscriptions"] = json!({ newest.clone(): { "timeline_limit": 2 } });
    let v = ss_ok(&s, &alice, &format!("pos={}", enc(&pos)), req).await;
    let opened = room(&v, &newest);
    assert_eq!(opened["initial"], json!(true), "{v}");
    assert_eq!(
        bodies(opened["timeline"].as_array().expect("timeline")),
        vec!["a", "b"]
    );
}

#[tokio::test]
async fn sliding_sync_long_poll_wakes_on_message() {
    let s = TestServer::start().await;
    let (alice, bob, r) = two_in_room(&s).await;
    let req = list(json!([[0, 9]]), json!([]), 5);
    let first = ss_ok(&s, &alice, "", req.clone()).await;
    let pos = first["pos"].as_str().expect("pos").to_owned();

    // Nothing new: the request waits out its timeout.
    let started = Instant::now();
    let q = format!("pos={}&timeout=300", enc(&pos));
    let v = ss_ok(&s, &alice, &q, req.clone()).await;
    assert!(started.elapsed() >= Duration::from_millis(280));
    assert_eq!(v["rooms"], json!({}));

    let q = format!("pos={}&timeout=10000", enc(v["pos"].as_str().expect("pos")));
    let started = Instant::now();
    let path = format!("{SS}?{q}");
    let waiting = s.post(&path, &alice, req.clone());
    let sender = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        text(&s, &bob, &r, "wake up").await;
    };
    let ((status, v), ()) = tokio::join!(waiting, sender);
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(started.elapsed() < Duration::from_secs(5), "woke late");
    assert_eq!(
        bodies(room(&v, &r)["timeline"].as_array().expect("timeline")),
        vec!["wake up"]
    );
}

#[tokio::test]
async fn sliding_sync_notification_counts() {
    let s = TestServer::start().await;
    let (alice, bob, r) = two_in_room(&s).await;
    let req = list(json!([[0, 9]]), json!([]), 1);
    let first = ss_ok(&s, &alice, "", req.clone()).await;
    assert_eq!(room(&first, &r)["notification_count"], json!(0));

    text(&s, &bob, &r, "hi").await;
    let last = text(&s, &bob, &r, &format!("hey {}", "alice")).await;
    let v = ss_ok(&s, &alice, &pos_query(&first), req.clone()).await;
    assert_eq!(room(&v, &r)["notification_count"], json!(2), "{v}");
    assert_eq!(room(&v, &r)["highlight_count"], json!(0));

    // A read receipt clears them: the room is sent again for the counts alone.
    read_receipt(&s, &alice, &r, &last).await;
    let w = ss_ok(&s, &alice, &pos_query(&v), req).await;
    assert_eq!(room(&w, &r)["notification_count"], json!(0), "{w}");
    assert_eq!(room(&w, &r)["timeline"], json!([]));
}

#[tokio::test]
async fn sliding_sync_to_device_extension() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    for i in 0..3 {
        let got = s
            .put(
                &format!("{V3}/sendToDevice/m.test/t{i}"),
                &alice,
                json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": i } } } }),
            )
            .await;
        assert_eq!(got.0, StatusCode::OK);
    }
    let ext = |since: Option<&str>, limit: u64| {
        let mut td = json!({ "enabled": true, "limit": limit });
        if let Some(since) = since {
            td["since"] = json!(since);
        }
        json!({ "extensions": { "to_device": td } })
    };
    let ns = |v: &Value| -> Vec<u64> {
        v["extensions"]["to_device"]["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["content"]["n"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Two at a time.
    let v = ss_ok(&s, &bob, "", ext(None, 2)).await;
    assert_eq!(ns(&v), vec![0, 1], "{v}");
    assert_eq!(
        v["extensions"]["to_device"]["events"][0]["sender"],
        json!(alice.user_id)
    );
    let next = v["extensions"]["to_device"]["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    // Not acknowledged (no since): delivered again (on another connection, as a new one
    // replaces the connection of the same conn_id).
    let mut other = ext(None, 2);
    other["conn_id"] = json!("again");
    let again = ss_ok(&s, &bob, "", other).await;
    assert_eq!(ns(&again), vec![0, 1]);
    // Acknowledged by `since`: the rest follows, then nothing.
    let w = ss_ok(&s, &bob, &pos_query(&v), ext(Some(&next), 2)).await;
    assert_eq!(ns(&w), vec![2], "{w}");
    let next = w["extensions"]["to_device"]["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let x = ss_ok(&s, &bob, &pos_query(&w), ext(Some(&next), 2)).await;
    assert_eq!(ns(&x), Vec::<u64>::new(), "{x}");
    // A bad token.
    assert_err(
        &ss(&s, &bob, "", ext(Some("abc"), 2)).await,
        400,
        "M_INVALID_PARAM",
    );
    // Without the extension, nothing of it.
    let y = ss_ok(&s, &bob, "", json!({})).await;
    assert!(y["extensions"].get("to_device").is_none(), "{y}");
}

#[tokio::test]
async fn sliding_sync_e2ee_extension() {
    let s = TestServer::start().await;
    let (alice, bob, r) = two_in_room(&s).await;
    let req = json!({ "extensions": { "e2ee": { "enabled": true } } });

    let v = ss_ok(&s, &alice, "", req.clone()).await;
    let e2ee = &v["extensions"]["e2ee"];
    assert_eq!(
        e2ee["device_one_time_keys_count"],
        json!({ "signed_curve25519": 0 }),
        "{v}"
    );
    assert_eq!(e2ee["device_unused_fallback_key_types"], json!([]));

    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({
                "one_time_keys": {
                    "signed_curve25519:A1": signed_key(&alice, "k1"),
                    "signed_curve25519:A2": signed_key(&alice, "k2"),
                },
                "fallback_keys": { "signed_curve25519:F1": signed_key(&alice, "f1") },
            }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // Bob's new device keys: alice shares a room with him, so his list changed for her.
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &bob,
            json!({ "device_keys": device_keys(&bob, "curve-bob") }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    let w = ss_ok(&s, &alice, &pos_query(&v), req.clone()).await;
    let e2ee = &w["extensions"]["e2ee"];
    assert_eq!(
        e2ee["device_one_time_keys_count"]["signed_curve25519"],
        json!(2),
        "{w}"
    );
    assert_eq!(
        e2ee["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    assert_eq!(e2ee["device_lists"]["changed"], json!([bob.user_id]), "{w}");

    // Bob leaves: alice no longer shares a room with him.
    let got = s
        .post(&format!("{V3}/rooms/{}/leave", enc(&r)), &bob, json!({}))
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let x = ss_ok(&s, &alice, &pos_query(&w), req).await;
    assert_eq!(
        x["extensions"]["e2ee"]["device_lists"]["left"],
        json!([bob.user_id]),
        "{x}"
    );
}

#[tokio::test]
async fn sliding_sync_account_data_receipts_typing_extensions() {
    let s = TestServer::start().await;
    let (alice, bob, r) = two_in_room(&s).await;
    let other = named_room(&s, &alice, "outside the window").await;
    let ev = text(&s, &bob, &r, "read me").await;
    let put_ad = |path: String, body: Value| {
        let s = &s;
        let alice = &alice;
        async move {
            let got = s.put(&path, alice, body).await;
            assert_eq!(got.0, StatusCode::OK, "{}", got.1);
        }
    };
    let user_ad = format!("{V3}/user/{}/account_data", enc(&alice.user_id));
    put_ad(format!("{user_ad}/m.test.global"), json!({ "g": 1 })).await;
    let room_ad = |room: &str| {
        format!(
            "{V3}/user/{}/rooms/{}/account_data/m.tag",
            enc(&alice.user_id),
            enc(room)
        )
    };
    put_ad(room_ad(&r), json!({ "tags": { "u.work": {} } })).await;
    put_ad(room_ad(&other), json!({ "tags": { "u.other": {} } })).await;

    let mut req = list(json!([[0, 0]]), json!([]), 1);
    req["extensions"] = json!({
        "account_data": { "enabled": true },
        "receipts": { "enabled": true },
        "typing": { "enabled": true },
    });
    // `r` has the newest event: it alone is in the window.
    let v = ss_ok(&s, &alice, "", req.clone()).await;
    assert_eq!(room_ids(&v), vec![r.clone()], "{v}");
    let ad = &v["extensions"]["account_data"];
    assert!(
        ad["global"]
            .as_array()
            .expect("global")
            .iter()
            .any(|e| e["type"] == "m.test.global" && e["content"] == json!({ "g": 1 })),
        "{v}"
    );
    assert_eq!(
        ad["rooms"][&r],
        json!([{ "type": "m.tag", "content": { "tags": { "u.work": {} } } }])
    );
    assert!(
        ad["rooms"].get(&other).is_none(),
        "rooms outside the window: {v}"
    );

    // Bob reads and types; alice changes account data.
    read_receipt(&s, &bob, &r, &ev).await;
    let got = s
        .put(
            &format!("{V3}/rooms/{}/typing/{}", enc(&r), enc(&bob.user_id)),
            &bob,
            json!({ "typing": true, "timeout": 30000 }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    put_ad(format!("{user_ad}/m.test.global"), json!({ "g": 2 })).await;

    let w = ss_ok(&s, &alice, &pos_query(&v), req.clone()).await;
    let ext = &w["extensions"];
    assert_eq!(
        ext["account_data"]["global"],
        json!([{ "type": "m.test.global", "content": { "g": 2 } }]),
        "{w}"
    );
    assert_eq!(ext["account_data"]["rooms"], json!({}));
    let receipt = &ext["receipts"]["rooms"][&r];
    assert_eq!(receipt["type"], json!("m.receipt"), "{w}");
    assert!(
        receipt["content"][&ev]["m.read"][&bob.user_id]["ts"].is_u64(),
        "{w}"
    );
    assert_eq!(
        ext["typing"]["rooms"][&r],
        json!({ "type": "m.typing", "content": { "user_ids": [bob.user_id] } })
    );

    // Nothing changed since: the extensions are empty.
    let x = ss_ok(&s, &alice, &pos_query(&w), req.clone()).await;
    assert_eq!(x["extensions"]["receipts"]["rooms"], json!({}), "{x}");
    assert_eq!(x["extensions"]["typing"]["rooms"], json!({}));
    assert_eq!(x["extensions"]["account_data"]["global"], json!([]));

    // Scoped to no list: no per-room data.
    let mut scoped = req.clone();
    scoped["extensions"]["receipts"]["lists"] = json!([]);
    let y = ss_ok(&s, &alice, "", scoped).await;
    assert_eq!(y["extensions"]["receipts"]["rooms"], json!({}), "{y}");
}

/// Element X's way of syncing: `matrix-sdk`'s sliding sync with a growing list and all
/// extensions sees a room it is invited to appear, and then a message in it.
#[tokio::test]
async fn sdk_sliding_sync_sees_new_room_and_message() {
    use matrix_sdk::{
        ruma::{events::StateEventType, OwnedRoomId},
        sliding_sync::Version,
        SlidingSyncList, SlidingSyncMode,
    };

    use crate::sdk_client::{collect_texts, sdk_login};

    let s = TestServer::start().await;
    let alice_http = s.user("alice").await;
    let bob = s.user("bob").await;
    let alice = sdk_login(&s.base, "alice").await;
    // What the client discovers from `/versions`.
    let versions = alice.available_sliding_sync_versions().await;
    assert!(
        versions.iter().any(|v| matches!(v, Version::Native)),
        "{versions:?}"
    );
    alice.set_sliding_sync_version(Version::Native);
    let seen = collect_texts(&alice);

    let sync = alice
        .sliding_sync("main")
        .expect("builder")
        .with_all_extensions()
        .poll_timeout(Duration::from_millis(500))
        .add_list(
            SlidingSyncList::builder("all")
                .sync_mode(SlidingSyncMode::new_growing(10))
                .timeline_limit(10)
                .required_state(vec![
                    (StateEventType::RoomName, String::new()),
                    (StateEventType::RoomMember, "$LAZY".to_owned()),
                ]),
        )
        .build()
        .await
        .expect("sliding sync builds");
    sync.sync_once().await.expect("first sync");
    assert!(alice.rooms().is_empty());

    // Bob invites alice to a new room: it appears.
    let room = s
        .create_room(
            &bob,
            json!({ "name": "sliding room", "invite": [alice_http.user_id] }),
        )
        .await;
    let room_id: OwnedRoomId = room.parse().expect("room id");
    let mut appeared = false;
    for _ in 0..20 {
        let summary = sync.sync_once().await.expect("sync");
        if summary.rooms.contains(&room_id) && alice.get_room(&room_id).is_some() {
            appeared = true;
            break;
        }
    }
    assert!(appeared, "the new room never appeared");
    assert_eq!(
        alice.get_room(&room_id).map(|r| r.state()),
        Some(matrix_sdk::RoomState::Invited)
    );

    // Alice joins (over HTTP, as her other device) and bob writes: the message arrives.
    s.join(&alice_http, &room).await;
    text(&s, &bob, &room, "hello over sliding sync").await;
    for _ in 0..20 {
        sync.sync_once().await.expect("sync");
        if seen
            .lock()
            .iter()
            .any(|(from, body)| from == &bob.user_id && body == "hello over sliding sync")
        {
            let joined = alice.get_room(&room_id).expect("room");
            assert_eq!(joined.state(), matrix_sdk::RoomState::Joined);
            assert_eq!(joined.name().as_deref(), Some("sliding room"));
            return;
        }
    }
    panic!("the message never arrived; seen: {:?}", seen.lock());
}
