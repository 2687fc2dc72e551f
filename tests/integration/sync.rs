//! /sync, typing, receipts, read markers, presence.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

async fn sync(s: &TestServer, u: &TestUser, query: &str) -> Value {
    let (status, body) = s.get(&format!("{V3}/sync?{query}"), u).await;
    assert_eq!(status, StatusCode::OK, "sync: {body}");
    assert!(
        body["next_batch"]
            .as_str()
            .is_some_and(|t| t.starts_with('s')),
        "{body}"
    );
    body
}

fn since(token: &Value) -> String {
    format!(
        "since={}",
        token["next_batch"].as_str().expect("next_batch")
    )
}

pub(crate) async fn send(s: &TestServer, u: &TestUser, room: &str, body: Value) -> String {
    let txn = format!("t{}", rand_suffix());
    let (status, v) = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/{txn}", enc(room)),
            u,
            body,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "send: {v}");
    v["event_id"].as_str().expect("event_id").to_owned()
}

pub(crate) async fn text(s: &TestServer, u: &TestUser, room: &str, msg: &str) -> String {
    send(s, u, room, json!({ "msgtype": "m.text", "body": msg })).await
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub(crate) async fn invite(s: &TestServer, by: &TestUser, room: &str, who: &TestUser) {
    let (status, v) = s
        .post(
            &format!("{V3}/rooms/{}/invite", enc(room)),
            by,
            json!({ "user_id": who.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "invite: {v}");
}

async fn join(s: &TestServer, u: &TestUser, room: &str) {
    let (status, v) = s
        .post(&format!("{V3}/rooms/{}/join", enc(room)), u, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "join: {v}");
}

async fn public_room(s: &TestServer, owner: &TestUser, members: &[&TestUser]) -> String {
    let room = s
        .create_room(
            owner,
            json!({ "preset": "public_chat", "name": "Sync room" }),
        )
        .await;
    for m in members {
        join(s, m, &room).await;
    }
    room
}

fn timeline<'a>(body: &'a Value, room: &str) -> &'a Vec<Value> {
    body["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .expect("timeline events")
}

pub(crate) fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

pub(crate) fn bodies(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect()
}

#[tokio::test]
async fn sync_auth_and_bad_params() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    assert_err(
        &s.req(Method::GET, &format!("{V3}/sync"), None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(Method::GET, &format!("{V3}/sync"), Some("nope"), None)
            .await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?since=garbage"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?timeout=soon"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?full_state=yes"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?set_presence=busy"), &alice).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?filter={}", enc("{bad")), &alice)
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.get(&format!("{V3}/sync?filter=nosuchfilter"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    // A new user's first sync is empty but well formed.
    let body = sync(&s, &alice, "").await;
    assert!(body.get("rooms").is_none(), "{body}");
    assert_eq!(body["to_device"], json!({ "events": [] }));
    s.stop().await;
}

#[tokio::test]
async fn initial_sync_shows_created_room() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(&alice, json!({ "name": "Hello", "topic": "t" }))
        .await;
    let body = sync(&s, &alice, "").await;
    let joined = &body["rooms"]["join"][&room];
    let tl = timeline(&body, &room);
    assert!(!tl.is_empty(), "{body}");
    assert!(tl.len() <= 10, "default timeline limit is 10");
    let state = joined["state"]["events"].as_array().expect("state");
    let all: Vec<&str> = types(tl).into_iter().chain(types(state)).collect();
    for t in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.name",
    ] {
        assert!(all.contains(&t), "{t} missing in {body}");
    }
    // State and timeline do not repeat each other.
    let tl_ids: Vec<&Value> = tl.iter().map(|e| &e["event_id"]).collect();
    assert!(state.iter().all(|e| !tl_ids.contains(&&e["event_id"])));
    assert_eq!(joined["summary"]["m.joined_member_count"], json!(1));
    assert_eq!(
        joined["unread_notifications"]["notification_count"],
        json!(0)
    );
    assert!(joined["timeline"]["prev_batch"]
        .as_str()
        .is_some_and(|t| t.starts_with('s')));
    s.stop().await;
}

#[tokio::test]
async fn incremental_sync_shows_only_new_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let first = sync(&s, &alice, "").await;
    let event_id = text(&s, &alice, &room, "news").await;
    let second = sync(&s, &alice, &since(&first)).await;
    let tl = timeline(&second, &room);
    assert_eq!(tl.len(), 1, "{second}");
    assert_eq!(tl[0]["event_id"], json!(event_id));
    assert_eq!(tl[0]["content"]["body"], json!("news"));
    // The sending device gets its transaction id back.
    assert!(tl[0]["unsigned"]["transaction_id"].is_string(), "{}", tl[0]);
    assert_eq!(
        second["rooms"]["join"][&room]["timeline"]["limited"],
        json!(false)
    );
    assert_eq!(second["rooms"]["join"][&room]["state"]["events"], json!([]));
    // Nothing new: no rooms, and the token stays where it was.
    let third = sync(&s, &alice, &since(&second)).await;
    assert!(third.get("rooms").is_none(), "{third}");
    assert_eq!(third["next_batch"], second["next_batch"]);
    s.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_on_message() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = public_room(&s, &alice, &[&bob]).await;
    let token = sync(&s, &bob, "").await;
    let url = format!("{}{V3}/sync?{}&timeout=20000", s.base, since(&token));
    let http = s.http.clone();
    let bob_token = bob.token.clone();
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        let res = http
            .get(url)
            .bearer_auth(bob_token)
            .send()
            .await
            .expect("sync sent");
        let status = res.status();
        (
            status,
            res.json::<Value>().await.expect("json"),
            Instant::now(),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    text(&s, &alice, &room, "wake up").await;
    let (status, body, answered) = waiting.await.expect("task");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bodies(timeline(&body, &room)), vec!["wake up"]);
    // Answered long before the 20 s timeout.
    assert!(
        answered.duration_since(started) < Duration::from_secs(10),
        "{:?}",
        answered - started
    );
    s.stop().await;
}

#[tokio::test]
async fn long_poll_times_out_empty() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    s.create_room(&alice, json!({})).await;
    let token = sync(&s, &alice, "").await;
    let started = Instant::now();
    let body = sync(&s, &alice, &format!("{}&timeout=400", since(&token))).await;
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "answered too early"
    );
    assert!(body.get("rooms").is_none(), "{body}");
    assert_eq!(body["next_batch"], token["next_batch"]);
    s.stop().await;
}

#[tokio::test]
async fn limited_timeline_and_prev_batch() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let token = sync(&s, &alice, "").await;
    for i in 0..12 {
        text(&s, &alice, &room, &format!("m{i}")).await;
    }
    let filter = enc(&json!({ "room": { "timeline": { "limit": 4 } } }).to_string());
    let body = sync(&s, &alice, &format!("{}&filter={filter}", since(&token))).await;
    let joined = &body["rooms"]["join"][&room];
    assert_eq!(
        bodies(timeline(&body, &room)),
        vec!["m8", "m9", "m10", "m11"]
    );
    assert_eq!(joined["timeline"]["limited"], json!(true));
    let prev = joined["timeline"]["prev_batch"]
        .as_str()
        .expect("prev_batch");
    let (status, page) = s
        .get(
            &format!(
                "{V3}/rooms/{}/messages?dir=b&limit=3&from={prev}",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let chunk = page["chunk"].as_array().expect("chunk");
    assert_eq!(bodies(chunk), vec!["m7", "m6", "m5"]);

    // A stored filter works the same way.
    let (status, f) = s
        .post(
            &format!("{V3}/user/{}/filter", enc(&alice.user_id)),
            &alice,
            json!({ "room": { "timeline": { "limit": 2 } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{f}");
    let id = f["filter_id"].as_str().expect("filter_id");
    let body = sync(&s, &alice, &format!("{}&filter={id}", since(&token))).await;
    assert_eq!(bodies(timeline(&body, &room)), vec!["m10", "m11"]);
    s.stop().await;
}

#[tokio::test]
async fn invite_join_and_leave_sections() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.create_room(&alice, json!({ "name": "Secret" })).await;
    let t0 = sync(&s, &bob, "").await;

    invite(&s, &alice, &room, &bob).await;
    let t1 = sync(&s, &bob, &since(&t0)).await;
    let stripped = t1["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .expect("invite_state");
    assert!(types(stripped).contains(&"m.room.create"), "{t1}");
    assert!(types(stripped).contains(&"m.room.name"), "{t1}");
    assert!(stripped.iter().any(|e| e["type"] == "m.room.member"
        && e["state_key"] == json!(bob.user_id)
        && e["content"]["membership"] == "invite"));

    join(&s, &bob, &room).await;
    let t2 = sync(&s, &bob, &since(&t1)).await;
    let joined = &t2["rooms"]["join"][&room];
    // Newly joined: the full state comes along.
    let all: Vec<&str> = types(joined["state"]["events"].as_array().expect("state"))
        .into_iter()
        .chain(types(timeline(&t2, &room)))
        .collect();
    assert!(
        all.contains(&"m.room.create") && all.contains(&"m.room.name"),
        "{t2}"
    );
    assert!(t2["rooms"].get("invite").is_none(), "{t2}");

    let (status, v) = s
        .post(&format!("{V3}/rooms/{}/leave", enc(&room)), &bob, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t3 = sync(&s, &bob, &since(&t2)).await;
    let left = t3["rooms"]["leave"][&room]["timeline"]["events"]
        .as_array()
        .expect("leave timeline");
    let last = left.last().expect("leave event");
    assert_eq!(last["type"], json!("m.room.member"));
    assert_eq!(last["content"]["membership"], json!("leave"));
    assert!(t3["rooms"].get("join").is_none(), "{t3}");

    // Later messages in the room do not reach bob any more.
    text(&s, &alice, &room, "after you left").await;
    let t4 = sync(&s, &bob, &since(&t3)).await;
    assert!(t4.get("rooms").is_none(), "{t4}");
    // An initial sync lists left rooms only when the filter asks.
    let initial = sync(&s, &bob, "").await;
    assert!(initial["rooms"]["leave"].get(&room).is_none(), "{initial}");
    let filter = enc(&json!({ "room": { "include_leave": true } }).to_string());
    let initial = sync(&s, &bob, &format!("filter={filter}")).await;
    assert!(
        initial["rooms"]["leave"][&room]["timeline"]["events"].is_array(),
        "{initial}"
    );
    s.stop().await;
}

#[tokio::test]
async fn typing_shows_in_ephemeral() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = public_room(&s, &alice, &[&bob]).await;
    let t0 = sync(&s, &bob, "").await;
    let path = format!("{V3}/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id));

    let ok = s
        .put(&path, &alice, json!({ "typing": true, "timeout": 30000 }))
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let t1 = sync(&s, &bob, &since(&t0)).await;
    let eph = t1["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .expect("ephemeral");
    let typing = eph
        .iter()
        .find(|e| e["type"] == "m.typing")
        .expect("m.typing");
    assert_eq!(typing["content"]["user_ids"], json!([alice.user_id]));

    let ok = s.put(&path, &alice, json!({ "typing": false })).await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let t2 = sync(&s, &bob, &since(&t1)).await;
    let eph = t2["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .expect("ephemeral");
    let typing = eph
        .iter()
        .find(|e| e["type"] == "m.typing")
        .expect("m.typing");
    assert_eq!(typing["content"]["user_ids"], json!([]));

    // A short timeout expires by itself, and the room is told.
    s.put(&path, &alice, json!({ "typing": true, "timeout": 100 }))
        .await;
    let t3 = sync(&s, &bob, &since(&t2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t4 = sync(&s, &bob, &since(&t3)).await;
    let eph = t4["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .expect("ephemeral");
    assert_eq!(eph[0]["content"]["user_ids"], json!([]), "{t4}");

    // Errors.
    assert_err(
        &s.put(&path, &bob, json!({ "typing": true, "timeout": 1000 }))
            .await,
        403,
        "M_FORBIDDEN",
    );
    let carol_path = format!("{V3}/rooms/{}/typing/{}", enc(&room), enc(&carol.user_id));
    assert_err(
        &s.put(
            &carol_path,
            &carol,
            json!({ "typing": true, "timeout": 1000 }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.put(&path, &alice, json!({ "timeout": 1000 })).await,
        400,
        "M_MISSING_PARAM",
    );
    assert_err(
        &s.put(&path, &alice, json!({ "typing": "yes" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(&path, &alice, json!({ "typing": true, "timeout": "long" }))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &path, Some(&alice.token), b"{not json")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req(Method::PUT, &path, None, Some(json!({ "typing": false })))
            .await,
        401,
        "M_MISSING_TOKEN",
    );
    s.stop().await;
}

#[tokio::test]
async fn receipts_and_unread_counts() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = public_room(&s, &alice, &[&bob]).await;
    let t0 = sync(&s, &bob, "").await;
    text(&s, &alice, &room, "one").await;
    text(&s, &alice, &room, &format!("hey {}", bob.user_id)).await;
    send(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "x", "m.mentions": { "user_ids": [bob.user_id] } }),
    )
    .await;
    let last = text(&s, &alice, &room, "four").await;
    let t1 = sync(&s, &bob, &since(&t0)).await;
    let unread = &t1["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(unread["notification_count"], json!(4), "{t1}");
    // Only the intentional mention highlights: the spec's default rules no longer match user
    // ids or names in the body.
    assert_eq!(unread["highlight_count"], json!(1), "{t1}");

    let receipt = |kind: &str, event: &str| {
        format!("{V3}/rooms/{}/receipt/{kind}/{}", enc(&room), enc(event))
    };
    assert_eq!(
        s.post(&receipt("m.read", &last), &bob, json!({})).await,
        (StatusCode::OK, json!({}))
    );
    let t2 = sync(&s, &bob, &since(&t1)).await;
    let joined = &t2["rooms"]["join"][&room];
    let eph = joined["ephemeral"]["events"].as_array().expect("ephemeral");
    let r = eph
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("m.receipt");
    assert!(
        r["content"][&last]["m.read"][&bob.user_id]["ts"].is_u64(),
        "{r}"
    );
    assert_eq!(
        joined["unread_notifications"]["notification_count"],
        json!(0)
    );
    // Alice sees bob's public receipt too.
    let a = sync(&s, &alice, "").await;
    let eph = a["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .expect("ephemeral");
    assert!(
        eph.iter()
            .any(|e| e["content"][&last]["m.read"][&bob.user_id].is_object()),
        "{a}"
    );

    // Private receipts are for the sender only; threaded receipts carry their thread.
    let a0 = sync(&s, &alice, "").await;
    let ok = s
        .post(
            &receipt("m.read.private", &last),
            &bob,
            json!({ "thread_id": "main" }),
        )
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let b = sync(&s, &bob, &since(&t2)).await;
    let eph = b["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .expect("ephemeral");
    let private = &eph
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("m.receipt")["content"][&last]["m.read.private"][&bob.user_id];
    assert_eq!(private["thread_id"], json!("main"), "{b}");
    let a1 = sync(&s, &alice, &since(&a0)).await;
    assert!(a1.get("rooms").is_none(), "{a1}");

    // Read markers: m.fully_read lands in room account data.
    let markers = format!("{V3}/rooms/{}/read_markers", enc(&room));
    let ok = s
        .post(
            &markers,
            &bob,
            json!({ "m.fully_read": last, "m.read": last }),
        )
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let b2 = sync(&s, &bob, &since(&b)).await;
    let ad = b2["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .expect("account_data");
    assert!(
        ad.iter()
            .any(|e| e["type"] == "m.fully_read" && e["content"]["event_id"] == json!(last)),
        "{b2}"
    );
    let ok = s
        .post(&receipt("m.fully_read", &last), &bob, json!({}))
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));

    // Errors.
    assert_err(
        &s.post(&receipt("m.read", "$nope"), &bob, json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.post(&receipt("m.unknown", &last), &bob, json!({})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(&receipt("m.read", &last), &carol, json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&receipt("m.read", &last), &bob, json!({ "thread_id": "" }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(&receipt("m.read", &last), &bob, json!({ "thread_id": 5 }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(
            &receipt("m.fully_read", &last),
            &bob,
            json!({ "thread_id": "main" }),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.req(
            Method::POST,
            &receipt("m.read", &last),
            None,
            Some(json!({})),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.post(&markers, &carol, json!({ "m.read": last })).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&markers, &bob, json!({ "m.read": 5 })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&markers, &bob, json!({ "m.read": "$missing" }))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.req_raw(Method::POST, &markers, Some(&bob.token), b"[")
            .await,
        400,
        "M_NOT_JSON",
    );
    s.stop().await;
}

#[tokio::test]
async fn account_data_in_sync() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let path = |kind: &str| format!("{V3}/user/{}/account_data/{kind}", enc(&alice.user_id));
    let (status, v) = s
        .put(&path("org.example.one"), &alice, json!({ "a": 1 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t0 = sync(&s, &alice, "").await;
    let events = t0["account_data"]["events"]
        .as_array()
        .expect("account_data");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "org.example.one" && e["content"]["a"] == 1),
        "{t0}"
    );

    s.put(&path("org.example.two"), &alice, json!({ "b": 2 }))
        .await;
    let t1 = sync(&s, &alice, &since(&t0)).await;
    assert_eq!(
        types(t1["account_data"]["events"].as_array().expect("events")),
        vec!["org.example.two"]
    );

    // The account_data filter drops what it excludes.
    let filter = enc(&json!({ "account_data": { "not_types": ["org.example.*"] } }).to_string());
    let t2 = sync(&s, &alice, &format!("filter={filter}")).await;
    let left = t2["account_data"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        types(&left).iter().all(|t| !t.starts_with("org.example.")),
        "{t2}"
    );
    s.stop().await;
}

#[tokio::test]
async fn filters_lazy_load_and_types() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = public_room(&s, &alice, &[&bob, &carol]).await;
    text(&s, &carol, &room, "from carol").await;

    let filter =
        json!({ "room": { "timeline": { "limit": 1 }, "state": { "lazy_load_members": true } } });
    let body = sync(&s, &alice, &format!("filter={}", enc(&filter.to_string()))).await;
    let state = body["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .expect("state");
    let mut members: Vec<&str> = state
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    members.sort();
    let mut want = vec![alice.user_id.as_str(), carol.user_id.as_str()];
    want.sort();
    assert_eq!(members, want, "{body}");
    // Without lazy loading every member comes along.
    let full = sync(&s, &alice, "").await;
    let state = full["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .expect("state");
    let tl = timeline(&full, &room);
    let member_count = state
        .iter()
        .chain(tl.iter())
        .filter(|e| e["type"] == "m.room.member")
        .count();
    assert!(member_count >= 3, "{full}");

    // Type and sender filters on the timeline.
    let filter = json!({ "room": { "timeline": { "types": ["m.room.message"], "not_senders": [alice.user_id] } } });
    let body = sync(&s, &alice, &format!("filter={}", enc(&filter.to_string()))).await;
    assert_eq!(bodies(timeline(&body, &room)), vec!["from carol"]);
    assert_eq!(types(timeline(&body, &room)), vec!["m.room.message"]);
    // Room filters.
    let filter = json!({ "room": { "not_rooms": [room] } });
    let body = sync(&s, &alice, &format!("filter={}", enc(&filter.to_string()))).await;
    assert!(body.get("rooms").is_none(), "{body}");
    s.stop().await;
}

#[tokio::test]
async fn presence_disabled_and_enabled() {
    let s = TestServer::start_with(|c| c.allow_presence = false).await;
    let alice = s.user("alice").await;
    let path = format!("{V3}/presence/{}/status", enc(&alice.user_id));
    let ok = s
        .put(
            &path,
            &alice,
            json!({ "presence": "online", "status_msg": "hi" }),
        )
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let (status, v) = s.get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["presence"], json!("offline"));
    s.stop().await;

    let s = TestServer::start_with(|c| c.allow_presence = true).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    public_room(&s, &alice, &[&bob]).await;
    let t0 = sync(&s, &bob, "set_presence=offline").await;
    let path = format!("{V3}/presence/{}/status", enc(&alice.user_id));
    let ok = s
        .put(
            &path,
            &alice,
            json!({ "presence": "unavailable", "status_msg": "away" }),
        )
        .await;
    assert_eq!(ok, (StatusCode::OK, json!({})));
    let (status, v) = s.get(&path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["presence"], json!("unavailable"));
    assert_eq!(v["status_msg"], json!("away"));
    let t1 = sync(&s, &bob, &format!("{}&set_presence=offline", since(&t0))).await;
    let events = t1["presence"]["events"].as_array().expect("presence");
    let p = events
        .iter()
        .find(|e| e["sender"] == json!(alice.user_id))
        .expect("alice's presence");
    assert_eq!(p["type"], json!("m.presence"));
    assert_eq!(p["content"]["presence"], json!("unavailable"));

    // Errors.
    assert_err(&s.get(&path, &carol).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.put(&path, &bob, json!({ "presence": "online" })).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.put(&path, &alice, json!({ "presence": "dancing" })).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.put(&path, &alice, json!({})).await,
        400,
        "M_MISSING_PARAM",
    );
    assert_err(
        &s.put(
            &path,
            &alice,
            json!({ "presence": "online", "status_msg": 3 }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req(Method::GET, &path, None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    let unknown = format!(
        "{V3}/presence/{}/status",
        enc(&format!("@nobody:{}", s.server_name()))
    );
    assert_err(&s.get(&unknown, &alice).await, 404, "M_NOT_FOUND");
    s.stop().await;
}
