//! A hostile server against our promises (`hostile_peer`): events never cross rooms, restricted
//! rooms stay restricted, retired keys sign nothing new, an invite never overwrites a stored
//! event, and the notary is bounded and rate limited.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use ruma::{OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use crate::{
    common::{assert_err, enc, TestServer, TestUser},
    federation_rooms::messages,
    hostile_peer::{now_ms, server_with_peer, HostilePeer},
};

fn room_id(room: &str) -> OwnedRoomId {
    RoomId::parse(room).expect("room id")
}

/// The room's current state on `s`, sorted: (type, state key) -> event id.
fn state_of(s: &TestServer, room: &str) -> BTreeMap<(String, String), String> {
    s.services()
        .rooms
        .current_state_ids(&room_id(room))
        .expect("db")
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}

/// The joined members of the room on `s`.
fn joined(s: &TestServer, room: &str) -> BTreeSet<String> {
    s.services()
        .rooms
        .joined_members(&room_id(room))
        .expect("db")
        .iter()
        .map(|u| u.to_string())
        .collect()
}

async fn power_levels(s: &TestServer, u: &TestUser, room: &str) -> Value {
    let (status, body) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
                enc(room)
            ),
            u,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The error of one PDU in a `/send` answer, or None when it was accepted. A PDU refused before
/// its id is known (its signatures) is answered under `unknown-<index>`: in a transaction of
/// one PDU, that one entry.
fn pdu_error(results: &Value, id: &str) -> Option<String> {
    let only = results
        .as_object()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("unknown-0"));
    let r = results
        .get(id)
        .or(only)
        .unwrap_or_else(|| panic!("{id} in {results}"));
    r.get("error")
        .map(|e| e.as_str().unwrap_or_default().to_owned())
}

/// Two public rooms of alice on A, and the peer's mallory joined to both; in the second room
/// mallory has power level 100.
async fn two_rooms(
    a: &TestServer,
    alice: &TestUser,
    peer: &HostilePeer,
) -> (String, String, String) {
    let mallory = peer.user("mallory");
    let first = a
        .create_room(alice, json!({ "preset": "public_chat", "name": "first" }))
        .await;
    let second = a
        .create_room(
            alice,
            json!({
                "preset": "public_chat",
                "name": "second",
                "power_level_content_override": { "users": { mallory.clone(): 100 } },
            }),
        )
        .await;
    peer.join(a, &first, &mallory).await;
    peer.join(a, &second, &mallory).await;
    (first, second, mallory)
}

fn member_auth(sender: &str) -> Vec<(&'static str, String)> {
    vec![
        ("m.room.create", String::new()),
        ("m.room.power_levels", String::new()),
        ("m.room.member", sender.to_owned()),
    ]
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(t, k)| (*t, k.as_str())).collect()
}

#[tokio::test]
async fn prev_events_in_another_room_are_refused_and_the_room_is_unchanged() {
    let peer = HostilePeer::start().await;
    let a = server_with_peer(&peer, |_| {}).await;
    let alice = a.user("alice").await;
    let (first, second, mallory) = two_rooms(&a, &alice, &peer).await;
    let version = HostilePeer::version(&a, &first);
    let state = state_of(&a, &first);
    let levels = power_levels(&a, &alice, &first).await;
    let members = joined(&a, &first);
    assert_eq!(
        members,
        BTreeSet::from([alice.user_id.clone(), mallory.clone()])
    );

    // A message of the first room whose prev event is mallory's join of the second room (whose
    // state gives mallory power level 100).
    let second_tip = a
        .services()
        .rooms
        .meta(&room_id(&second))
        .expect("db")
        .expect("room")
        .extremities[0]
        .to_string();
    let auth = member_auth(&mallory);
    let mut event = peer.event_on_top(
        &a,
        &first,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "across rooms" }),
        &as_refs(&auth),
    );
    event["prev_events"] = json!([second_tip]);
    let (via_prev, via_prev_event) = peer.sign_event(&version, event);

    // A power level change of the first room authorized by the second room's power levels.
    let second_levels =
        state_of(&a, &second)[&("m.room.power_levels".to_owned(), String::new())].clone();
    let mut event = peer.event_on_top(
        &a,
        &first,
        &mallory,
        "m.room.power_levels",
        Some(""),
        json!({ "users": { mallory.clone(): 100 } }),
        &as_refs(&auth),
    );
    let mut auth_events: Vec<Value> = event["auth_events"].as_array().expect("auth").clone();
    auth_events.retain(|id| {
        id.as_str() != Some(state[&("m.room.power_levels".to_owned(), String::new())].as_str())
    });
    auth_events.push(json!(second_levels));
    event["auth_events"] = json!(auth_events);
    let (via_auth, via_auth_event) = peer.sign_event(&version, event);

    let results = peer
        .send_pdus(&a, vec![via_prev_event, via_auth_event])
        .await;
    let err = pdu_error(&results, &via_prev).expect("the cross-room prev event is refused");
    assert!(err.contains("another room"), "{err}");
    let err = pdu_error(&results, &via_auth).expect("the cross-room auth event is refused");
    assert!(err.contains("another room"), "{err}");

    assert_eq!(
        state_of(&a, &first),
        state,
        "the first room's state changed"
    );
    assert_eq!(power_levels(&a, &alice, &first).await, levels);
    assert_eq!(joined(&a, &first), members);
    assert!(a
        .services()
        .rooms
        .event_meta(&via_prev)
        .expect("db")
        .is_none());
    assert!(!messages(&a, &alice, &first)
        .await
        .contains(&"across rooms".to_owned()));
    // The room goes on: a proper message of mallory is accepted.
    let event = peer.event_on_top(
        &a,
        &first,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "proper" }),
        &as_refs(&auth),
    );
    let (proper, event) = peer.sign_event(&version, event);
    let results = peer.send_pdus(&a, vec![event]).await;
    assert_eq!(pdu_error(&results, &proper), None, "{results}");
    assert!(messages(&a, &alice, &first)
        .await
        .contains(&"proper".to_owned()));
}

#[tokio::test]
async fn fetched_state_naming_another_rooms_events_is_refused() {
    let peer = HostilePeer::start().await;
    let a = server_with_peer(&peer, |_| {}).await;
    let alice = a.user("alice").await;
    let (first, second, mallory) = two_rooms(&a, &alice, &peer).await;
    let version = HostilePeer::version(&a, &first);
    let state = state_of(&a, &first);
    let auth = member_auth(&mallory);

    // X: an event of the first room A does not have; M: a message on top of X. Asked about
    // X, the peer says the state at it is the second room's state.
    let x = peer.event_on_top(
        &a,
        &first,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "x" }),
        &as_refs(&auth),
    );
    let (x_id, x_event) = peer.sign_event(&version, x);
    let mut m = peer.event_on_top(
        &a,
        &first,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "on a lie" }),
        &as_refs(&auth),
    );
    m["prev_events"] = json!([x_id]);
    m["depth"] = json!(m["depth"].as_u64().expect("depth") + 1);
    let (m_id, m_event) = peer.sign_event(&version, m);
    let second_state: Vec<String> = state_of(&a, &second).into_values().collect();
    peer.script(
        "/_matrix/federation/v1/get_missing_events/",
        200,
        json!({ "events": [] }),
    );
    peer.script(
        "/_matrix/federation/v1/state_ids/",
        200,
        json!({ "pdu_ids": second_state, "auth_chain_ids": [] }),
    );
    peer.script(
        "/_matrix/federation/v1/event/",
        200,
        json!({ "origin": peer.name, "origin_server_ts": now_ms(), "pdus": [x_event] }),
    );

    let results = peer.send_pdus(&a, vec![m_event]).await;
    let err = pdu_error(&results, &m_id).expect("refused");
    assert!(err.contains("another room"), "{err}");
    assert!(
        peer.requests()
            .iter()
            .any(|r| r.starts_with("GET /_matrix/federation/v1/state_ids/")),
        "the state was asked for: {:?}",
        peer.requests()
    );
    assert_eq!(
        state_of(&a, &first),
        state,
        "the first room's state changed"
    );
    assert!(a.services().rooms.event_meta(&m_id).expect("db").is_none());

    // What A serves about the first room never names the second room's events.
    let second_event = &state_of(&a, &second)[&("m.room.create".to_owned(), String::new())];
    for path in [
        format!(
            "/_matrix/federation/v1/state_ids/{}?event_id={}",
            enc(&first),
            enc(second_event)
        ),
        format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            enc(&first),
            enc(second_event)
        ),
    ] {
        let got = peer.request(&a, Method::GET, &path, None).await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    let (status, body) = peer
        .request(
            &a,
            Method::GET,
            &format!(
                "/_matrix/federation/v1/backfill/{}?v={}&limit=10",
                enc(&first),
                enc(second_event)
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pdus"], json!([]));
}

#[tokio::test]
async fn send_join_applies_the_restricted_join_rule_like_make_join() {
    let peer = HostilePeer::start().await;
    let a = server_with_peer(&peer, |_| {}).await;
    let alice = a.user("alice").await;
    let mallory = peer.user("mallory");
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
    let version = HostilePeer::version(&a, &inner);
    // make_join says no: mallory is in none of the allowed rooms.
    let got = peer
        .request(
            &a,
            Method::GET,
            &format!(
                "/_matrix/federation/v1/make_join/{}/{}?ver={}",
                enc(&inner),
                enc(&mallory),
                version
            ),
            None,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // So the peer skips make_join: a join of its own making that names alice as the one who
    // vouches, for A to countersign.
    let forged_join = |peer: &HostilePeer| {
        let auth = [
            ("m.room.create", String::new()),
            ("m.room.power_levels", String::new()),
            ("m.room.join_rules", String::new()),
            ("m.room.member", alice.user_id.clone()),
            ("m.room.member", mallory.clone()),
        ];
        let event = peer.event_on_top(
            &a,
            &inner,
            &mallory,
            "m.room.member",
            Some(mallory.as_str()),
            json!({ "membership": "join",
                "join_authorised_via_users_server": alice.user_id }),
            &as_refs(&auth),
        );
        peer.sign_event(&version, event)
    };
    let (id, event) = forged_join(&peer);
    let got = peer.send_join(&a, &inner, &id, event).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert_ne!(
        a.services()
            .rooms
            .membership(
                &room_id(&inner),
                &UserId::parse(mallory.as_str()).expect("user")
            )
            .expect("db")
            .as_deref(),
        Some("join")
    );
    assert!(!joined(&a, &inner).contains(&mallory));

    // Once mallory is in the allowed room, the same kind of join is countersigned.
    peer.join(&a, &outer, &mallory).await;
    let (id, event) = forged_join(&peer);
    let (status, body) = peer.send_join(&a, &inner, &id, event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["event"]["signatures"]
            .as_object()
            .expect("signatures")
            .contains_key("a.test"),
        "{body}"
    );
    assert!(joined(&a, &inner).contains(&mallory));
}

#[tokio::test]
async fn retired_keys_verify_only_events_from_before_they_were_retired() {
    let retired_at = now_ms() - 3_600_000;
    let peer = HostilePeer::start_named("evil.test", &[retired_at]).await;
    let a = server_with_peer(&peer, |_| {}).await;
    let alice = a.user("alice").await;
    let mallory = peer.user("mallory");
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    peer.join(&a, &room, &mallory).await;
    let version = HostilePeer::version(&a, &room);
    let auth = member_auth(&mallory);
    let old_key = &peer.old_keys[0];

    // From before the key was retired: verified by it.
    let mut event = peer.event_on_top(
        &a,
        &room,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "old enough" }),
        &as_refs(&auth),
    );
    event["origin_server_ts"] = json!(retired_at - 60_000);
    let (old_id, old_event) = peer.sign_event_with(old_key, &version, event);
    let results = peer.send_pdus(&a, vec![old_event]).await;
    assert_eq!(pdu_error(&results, &old_id), None, "{results}");

    // From after: the retired key proves nothing (someone who got hold of it signs new ones).
    let event = peer.event_on_top(
        &a,
        &room,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "signed with a retired key" }),
        &as_refs(&auth),
    );
    let (new_id, new_event) = peer.sign_event_with(old_key, &version, event);
    let results = peer.send_pdus(&a, vec![new_event]).await;
    let err = pdu_error(&results, &new_id).expect("refused");
    assert!(err.contains("signatures"), "{err}");
    let seen = messages(&a, &alice, &room).await;
    assert!(seen.contains(&"old enough".to_owned()), "{seen:?}");
    assert!(
        !seen.contains(&"signed with a retired key".to_owned()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn an_invite_never_overwrites_a_stored_event() {
    let peer = HostilePeer::start().await;
    let a = server_with_peer(&peer, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = a.user("bob").await;
    let mallory = peer.user("mallory");
    // Room version 1: event ids are the sender's choice.
    let room = a
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_version": "1" }),
        )
        .await;
    let join_id = peer.join(&a, &room, &mallory).await;
    let stored = a
        .services()
        .rooms
        .pdu(&join_id)
        .expect("db")
        .expect("the join is stored");
    assert_eq!(stored.membership().as_deref(), Some("join"));

    // An invite of bob to another room, reusing the join's id.
    let other = format!("!elsewhere:{}", peer.name);
    let invite = |id: &str, body: &str| {
        json!({
            "event_id": id,
            "type": "m.room.member",
            "room_id": other,
            "sender": mallory,
            "state_key": bob.user_id,
            "origin": peer.name,
            "origin_server_ts": now_ms(),
            "content": { "membership": "invite", "reason": body },
            "depth": 5,
            "prev_events": [],
            "auth_events": [],
        })
    };
    let (id, event) = peer.sign_event(&RoomVersionId::V1, invite(&join_id, "overwrite"));
    assert_eq!(id, join_id);
    let send_invite = |id: String, event: Value| {
        let (peer, a, other) = (&peer, &a, &other);
        async move {
            peer.request(
                a,
                Method::PUT,
                &format!("/_matrix/federation/v2/invite/{}/{}", enc(other), enc(&id)),
                Some(json!({ "room_version": "1", "event": event, "invite_room_state": [] })),
            )
            .await
        }
    };
    let got = send_invite(id, event).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let after = a
        .services()
        .rooms
        .pdu(&join_id)
        .expect("db")
        .expect("still stored");
    assert_eq!(after.room_id, Some(room_id(&room)));
    assert_eq!(after.membership().as_deref(), Some("join"));
    let bob_id = UserId::parse(bob.user_id.as_str()).expect("user");
    assert!(a
        .services()
        .rooms
        .user_rooms(&bob_id)
        .expect("db")
        .is_empty());

    // A real invite is kept; the same invite again (a retry) changes nothing and is answered.
    let fresh = format!("$fresh{}:{}", now_ms(), peer.name);
    let (id, event) = peer.sign_event(&RoomVersionId::V1, invite(&fresh, "welcome"));
    let got = send_invite(id.clone(), event.clone()).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = send_invite(id.clone(), event).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let rooms = a.services().rooms.user_rooms(&bob_id).expect("db");
    assert_eq!(rooms.len(), 1, "{rooms:?}");
    assert_eq!(rooms[0].1.membership, "invite");
    // Another event under the fresh invite's id is refused too.
    let (_, changed) = peer.sign_event(&RoomVersionId::V1, invite(&fresh, "changed"));
    let got = send_invite(fresh.clone(), changed).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let kept = a.services().rooms.pdu(&fresh).expect("db").expect("kept");
    assert_eq!(kept.content_value()["reason"], json!("welcome"));
}

#[tokio::test]
async fn notary_queries_are_bounded_and_rate_limited() {
    let peer = HostilePeer::start().await;
    let a = server_with_peer(&peer, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.key_query = hafen::config::RateLimit {
            per_second: 0.001,
            burst: 4,
        };
        // Ten names that all lead to the peer, which answers for none of them.
        for i in 0..10 {
            c.federation_destinations
                .insert(format!("s{i}.test"), peer.url.clone());
        }
    })
    .await;
    // Too many servers, or too many key ids for one: refused before any work.
    let many: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("x{i}.test"), json!({}))).collect();
    let got = a
        .req(
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(json!({ "server_keys": many })),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let ids: serde_json::Map<String, Value> = (0..17)
        .map(|i| (format!("ed25519:k{i}"), json!({})))
        .collect();
    let got = a
        .req(
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(json!({ "server_keys": { "s0.test": ids } })),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    assert!(peer.requests().is_empty(), "{:?}", peer.requests());

    // Ten unknown servers: at most three are fetched for one query.
    let ten: serde_json::Map<String, Value> =
        (0..10).map(|i| (format!("s{i}.test"), json!({}))).collect();
    let (status, body) = a
        .req(
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(json!({ "server_keys": ten })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "server_keys": [] }));
    let fetched = peer
        .requests()
        .iter()
        .filter(|r| r.contains("/_matrix/key/v2/server"))
        .count();
    assert!(
        (1..=3).contains(&fetched),
        "{fetched} fetches: {:?}",
        peer.requests()
    );

    // The fourth query of this address takes the last token; the fifth is refused.
    let (status, body) = a
        .req(Method::GET, "/_matrix/key/v2/query/a.test", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server_keys"][0]["server_name"], json!("a.test"));
    let got = a
        .req(Method::GET, "/_matrix/key/v2/query/a.test", None, None)
        .await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    assert!(got.1["retry_after_ms"].as_u64().is_some(), "{}", got.1);
}
