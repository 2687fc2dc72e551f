//! Aliases, the published room directory and room upgrades.

use reqwest::{Method, StatusCode};
use ruma::{OwnedRoomId, RoomVersionId};
use serde_json::{json, Value};

use crate::{
    common::{assert_err, enc, TestServer, TestUser},
    history::{join, make_room, say, send_state},
};

fn alias_path(alias: &str) -> String {
    format!("/_matrix/client/v3/directory/room/{}", enc(alias))
}

fn state_content(s: &TestServer, room: &str, kind: &str, key: &str) -> Option<Value> {
    let room = OwnedRoomId::try_from(room).unwrap();
    s.services()
        .rooms
        .state_get(&room, kind, key)
        .unwrap()
        .map(|p| p.content_value())
}

async fn delete(s: &TestServer, path: &str, u: &TestUser) -> (StatusCode, Value) {
    s.req(Method::DELETE, path, Some(&u.token), None).await
}

#[tokio::test]
async fn alias_lifecycle() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    join(&s, &bob, &room).await;
    let alias = format!("#lobby:{}", s.server_name());

    let (status, v) = s
        .put(&alias_path(&alias), &alice, json!({"room_id": room}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    // Taken: 409 M_UNKNOWN, as the spec says.
    assert_err(
        &s.put(&alias_path(&alias), &bob, json!({"room_id": room}))
            .await,
        409,
        "M_UNKNOWN",
    );

    // Resolving needs no token.
    let (status, v) = s.req(Method::GET, &alias_path(&alias), None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["room_id"], json!(room));
    assert_eq!(v["servers"], json!([s.server_name()]));

    let aliases_path = format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room));
    let (status, v) = s.get(&aliases_path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["aliases"], json!([alias]));
    assert_err(&s.get(&aliases_path, &carol).await, 403, "M_FORBIDDEN");

    // Bob (power 0) neither created the alias nor may set the canonical alias.
    assert_err(
        &delete(&s, &alias_path(&alias), &bob).await,
        403,
        "M_FORBIDDEN",
    );
    let (status, v) = delete(&s, &alias_path(&alias), &alice).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    assert_err(
        &s.req(Method::GET, &alias_path(&alias), None, None).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &delete(&s, &alias_path(&alias), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    let (_, v) = s.get(&aliases_path, &alice).await;
    assert_eq!(v["aliases"], json!([]));

    // The creator of an alias may delete it without any power in the room.
    let bobs = format!("#bobs:{}", s.server_name());
    let (status, _) = s
        .put(&alias_path(&bobs), &bob, json!({"room_id": room}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = delete(&s, &alias_path(&bobs), &bob).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn alias_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    let alias = format!("#x:{}", s.server_name());

    assert_err(
        &s.put(
            &alias_path("#x:elsewhere.example"),
            &alice,
            json!({"room_id": room}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.put(&alias_path("no-hash"), &alice, json!({"room_id": room}))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.req(Method::GET, &alias_path("no-hash"), None, None).await,
        400,
        "M_INVALID_PARAM",
    );
    let unknown = format!("!unknown:{}", s.server_name());
    assert_err(
        &s.put(&alias_path(&alias), &alice, json!({"room_id": unknown}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(&alias_path(&alias), &alice, json!({})).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(&alias_path(&alias), &alice, json!({"room_id": 5}))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(
            Method::PUT,
            &alias_path(&alias),
            Some(&alice.token),
            b"{nope",
        )
        .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req(
            Method::PUT,
            &alias_path(&alias),
            None,
            Some(json!({"room_id": room})),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(
            Method::PUT,
            &alias_path(&alias),
            Some("bad"),
            Some(json!({"room_id": room})),
        )
        .await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.req(Method::DELETE, &alias_path(&alias), None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(
            Method::GET,
            &alias_path("#remote:elsewhere.example"),
            None,
            None,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    let aliases_unknown = format!("/_matrix/client/v3/rooms/{}/aliases", enc(&unknown));
    assert_err(&s.get(&aliases_unknown, &alice).await, 403, "M_FORBIDDEN");
    // Nothing was created by the failed requests.
    assert_err(
        &s.req(Method::GET, &alias_path(&alias), None, None).await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn deleting_the_canonical_alias_updates_the_state() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    let main = format!("#main:{}", s.server_name());
    let alt = format!("#alt:{}", s.server_name());
    for a in [&main, &alt] {
        let (status, v) = s
            .put(&alias_path(a), &alice, json!({"room_id": room}))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    send_state(
        &s,
        &alice,
        &room,
        "m.room.canonical_alias",
        "",
        json!({"alias": main, "alt_aliases": [main, alt]}),
    )
    .await;
    let (status, _) = delete(&s, &alias_path(&main), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        state_content(&s, &room, "m.room.canonical_alias", ""),
        Some(json!({"alt_aliases": [alt]}))
    );
    // Deleting an alias that is not in the event leaves it alone.
    let other = format!("#other:{}", s.server_name());
    s.put(&alias_path(&other), &alice, json!({"room_id": room}))
        .await;
    delete(&s, &alias_path(&other), &alice).await;
    assert_eq!(
        state_content(&s, &room, "m.room.canonical_alias", ""),
        Some(json!({"alt_aliases": [alt]}))
    );
}

fn visibility_path(room: &str) -> String {
    format!("/_matrix/client/v3/directory/list/room/{}", enc(room))
}

#[tokio::test]
async fn room_directory_visibility() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    join(&s, &bob, &room).await;

    let (status, v) = s
        .req(Method::GET, &visibility_path(&room), None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"visibility": "private"}));

    assert_err(
        &s.put(
            &visibility_path(&room),
            &bob,
            json!({"visibility": "public"}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    let (status, v) = s
        .put(
            &visibility_path(&room),
            &alice,
            json!({"visibility": "public"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let (_, v) = s
        .req(Method::GET, &visibility_path(&room), None, None)
        .await;
    assert_eq!(v["visibility"], "public");
    let (status, _) = s
        .put(
            &visibility_path(&room),
            &alice,
            json!({"visibility": "private"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, v) = s
        .req(Method::GET, &visibility_path(&room), None, None)
        .await;
    assert_eq!(v["visibility"], "private");
    // `public` is the default.
    let (status, _) = s.put(&visibility_path(&room), &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, v) = s
        .req(Method::GET, &visibility_path(&room), None, None)
        .await;
    assert_eq!(v["visibility"], "public");

    let unknown = format!("!unknown:{}", s.server_name());
    assert_err(
        &s.req(Method::GET, &visibility_path(&unknown), None, None)
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(
            &visibility_path(&unknown),
            &alice,
            json!({"visibility": "public"}),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(
            &visibility_path(&room),
            &alice,
            json!({"visibility": "secret"}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.put(&visibility_path(&room), &alice, json!({"visibility": 1}))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.req_raw(
            Method::PUT,
            &visibility_path(&room),
            Some(&alice.token),
            b"[",
        )
        .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.put(&visibility_path(&room), &alice, json!([1])).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req(Method::PUT, &visibility_path(&room), None, Some(json!({})))
            .await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test]
async fn publishing_can_be_disabled_by_policy() {
    let s = TestServer::start_with(|c| c.allow_public_room_directory = false).await;
    let alice = s.user("alice").await;
    let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
    assert_err(
        &s.put(
            &visibility_path(&room),
            &alice,
            json!({"visibility": "public"}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    // Unpublishing stays possible.
    let (status, _) = s
        .put(
            &visibility_path(&room),
            &alice,
            json!({"visibility": "private"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn public_rooms_search_and_pagination() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let mut rooms = Vec::new();
    for i in 0..5 {
        let room = make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;
        send_state(
            &s,
            &alice,
            &room,
            "m.room.name",
            "",
            json!({"name": format!("Room {i}")}),
        )
        .await;
        let (status, _) = s
            .put(
                &visibility_path(&room),
                &alice,
                json!({"visibility": "public"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        rooms.push(room);
    }
    // Richer details on one room; bob joins it so it sorts first.
    let special = rooms[3].clone();
    join(&s, &bob, &special).await;
    send_state(
        &s,
        &alice,
        &special,
        "m.room.topic",
        "",
        json!({"topic": "All about Gardening"}),
    )
    .await;
    let alias = format!("#garden:{}", s.server_name());
    s.put(&alias_path(&alias), &alice, json!({"room_id": special}))
        .await;
    send_state(
        &s,
        &alice,
        &special,
        "m.room.canonical_alias",
        "",
        json!({"alias": alias}),
    )
    .await;
    send_state(
        &s,
        &alice,
        &special,
        "m.room.guest_access",
        "",
        json!({"guest_access": "can_join"}),
    )
    .await;
    send_state(
        &s,
        &alice,
        &special,
        "m.room.avatar",
        "",
        json!({"url": "mxc://x/y"}),
    )
    .await;
    // An unpublished room never shows.
    make_room(&s, &alice, RoomVersionId::V12, "public", "shared").await;

    let (status, v) = s
        .req(Method::GET, "/_matrix/client/v3/publicRooms", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["total_room_count_estimate"], 5);
    let chunk = v["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 5);
    assert!(
        v.get("next_batch").is_none() && v.get("prev_batch").is_none(),
        "{v}"
    );
    let first = &chunk[0];
    assert_eq!(first["room_id"], json!(special));
    assert_eq!(first["name"], "Room 3");
    assert_eq!(first["topic"], "All about Gardening");
    assert_eq!(first["canonical_alias"], json!(alias));
    assert_eq!(first["num_joined_members"], 2);
    assert_eq!(first["world_readable"], false);
    assert_eq!(first["guest_can_join"], true);
    assert_eq!(first["join_rule"], "public");
    assert_eq!(first["avatar_url"], "mxc://x/y");
    assert!(first.get("room_type").is_none());
    assert_eq!(chunk[1]["num_joined_members"], 1);
    assert_eq!(chunk[1]["guest_can_join"], false);

    // Pages of two, chained with next_batch; the way back with prev_batch.
    let mut seen = Vec::new();
    let mut since: Option<String> = None;
    let mut pages = Vec::new();
    for _ in 0..5 {
        let path = match &since {
            Some(t) => format!("/_matrix/client/v3/publicRooms?limit=2&since={t}"),
            None => "/_matrix/client/v3/publicRooms?limit=2".to_owned(),
        };
        let (status, v) = s.req(Method::GET, &path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["total_room_count_estimate"], 5);
        seen.extend(
            v["chunk"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["room_id"].as_str().unwrap().to_owned()),
        );
        pages.push(v.clone());
        match v.get("next_batch") {
            Some(n) => since = Some(n.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    assert_eq!(pages.len(), 3);
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5);
    assert!(pages[0].get("prev_batch").is_none());
    let prev = pages[2]["prev_batch"].as_str().unwrap();
    let (_, back) = s
        .req(
            Method::GET,
            &format!("/_matrix/client/v3/publicRooms?limit=2&since={prev}"),
            None,
            None,
        )
        .await;
    assert_eq!(back["chunk"], pages[1]["chunk"]);

    // POST: search by name, topic and alias, case-insensitively; limit and since in the body.
    let (sr, al) = (&s, &alice);
    let post =
        |body: Value| async move { sr.post("/_matrix/client/v3/publicRooms", al, body).await };
    let (status, v) = post(json!({"filter": {"generic_search_term": "gardening"}})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(v["total_room_count_estimate"], 1);
    let (_, v) = post(json!({"filter": {"generic_search_term": "GARDEN:"}})).await;
    assert_eq!(v["chunk"][0]["room_id"], json!(special));
    let (_, v) = post(json!({"filter": {"generic_search_term": "room 1"}})).await;
    assert_eq!(v["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(v["chunk"][0]["name"], "Room 1");
    let (_, v) = post(json!({"filter": {"generic_search_term": "nothing like this"}})).await;
    assert_eq!(v["chunk"], json!([]));
    assert_eq!(v["total_room_count_estimate"], 0);
    let (_, v) = post(json!({"limit": 3})).await;
    assert_eq!(v["chunk"].as_array().unwrap().len(), 3);
    let next = v["next_batch"].as_str().unwrap().to_owned();
    let (_, v) = post(json!({"limit": 3, "since": next})).await;
    assert_eq!(v["chunk"].as_array().unwrap().len(), 2);
    let (_, v) = post(json!({"filter": {"room_types": ["m.space"]}})).await;
    assert_eq!(v["chunk"], json!([]));
    let (_, v) = post(json!({"filter": {"room_types": [null]}})).await;
    assert_eq!(v["chunk"].as_array().unwrap().len(), 5);

    // Errors.
    assert_err(
        &s.req(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            None,
            Some(json!({})),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(&post(json!({"limit": "ten"})).await, 400, "M_BAD_JSON");
    assert_err(
        &post(json!({"filter": {"generic_search_term": 3}})).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &post(json!({"since": "garbage"})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.req_raw(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            Some(&alice.token),
            b"{x",
        )
        .await,
        400,
        "M_NOT_JSON",
    );
    // Another server's directory is asked over federation, which is off by default.
    assert_err(
        &s.req(
            Method::GET,
            "/_matrix/client/v3/publicRooms?server=elsewhere.example",
            None,
            None,
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.req(
            Method::GET,
            "/_matrix/client/v3/publicRooms?limit=x",
            None,
            None,
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    let own = format!("/_matrix/client/v3/publicRooms?server={}", s.server_name());
    let (status, _) = s.req(Method::GET, &own, None, None).await;
    assert_eq!(status, StatusCode::OK);
}

fn upgrade_path(room: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/upgrade", enc(room))
}

#[tokio::test]
async fn upgrade_replaces_the_room() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let old = make_room(&s, &alice, RoomVersionId::V11, "public", "shared").await;
    join(&s, &bob, &old).await;
    send_state(
        &s,
        &alice,
        &old,
        "m.room.name",
        "",
        json!({"name": "Old name"}),
    )
    .await;
    send_state(
        &s,
        &alice,
        &old,
        "m.room.topic",
        "",
        json!({"topic": "Old topic"}),
    )
    .await;
    let alias = format!("#up:{}", s.server_name());
    s.put(&alias_path(&alias), &alice, json!({"room_id": old}))
        .await;
    send_state(
        &s,
        &alice,
        &old,
        "m.room.canonical_alias",
        "",
        json!({"alias": alias}),
    )
    .await;
    s.put(
        &visibility_path(&old),
        &alice,
        json!({"visibility": "public"}),
    )
    .await;
    say(&s, &alice, &old, "last words").await;

    let (status, v) = s
        .post(&upgrade_path(&old), &alice, json!({"new_version": "12"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new = v["replacement_room"]
        .as_str()
        .expect("replacement_room")
        .to_owned();
    assert_ne!(new, old);

    // The old room points at the new one and is restricted.
    let tomb = state_content(&s, &old, "m.room.tombstone", "").expect("tombstone");
    assert_eq!(tomb["replacement_room"], json!(new));
    assert!(tomb["body"].is_string());
    let old_pl = state_content(&s, &old, "m.room.power_levels", "").unwrap();
    assert_eq!(old_pl["events_default"], 50);
    assert_eq!(old_pl["invite"], 50);
    assert_eq!(
        state_content(&s, &old, "m.room.canonical_alias", ""),
        Some(json!({}))
    );

    // The new room: predecessor, version, copied state, creator joined.
    let create = state_content(&s, &new, "m.room.create", "").unwrap();
    assert_eq!(create["predecessor"]["room_id"], json!(old));
    assert!(create["predecessor"]["event_id"].is_string(), "{create}");
    assert_eq!(create["room_version"], "12");
    assert_eq!(
        state_content(&s, &new, "m.room.name", "").unwrap()["name"],
        "Old name"
    );
    assert_eq!(
        state_content(&s, &new, "m.room.topic", "").unwrap()["topic"],
        "Old topic"
    );
    assert_eq!(
        state_content(&s, &new, "m.room.join_rules", "").unwrap()["join_rule"],
        "public"
    );
    assert_eq!(
        state_content(&s, &new, "m.room.canonical_alias", "").unwrap()["alias"],
        json!(alias)
    );
    assert_eq!(
        state_content(&s, &new, "m.room.member", &alice.user_id).unwrap()["membership"],
        "join"
    );
    let pl = state_content(&s, &new, "m.room.power_levels", "").unwrap();
    // v12 privileges its creator: alice must not be listed.
    assert!(pl["users"].get(&alice.user_id).is_none(), "{pl}");
    assert_eq!(pl["events"]["m.room.tombstone"], 100);

    // Aliases and the directory listing moved.
    let (_, v) = s.req(Method::GET, &alias_path(&alias), None, None).await;
    assert_eq!(v["room_id"], json!(new));
    let (_, v) = s.req(Method::GET, &visibility_path(&new), None, None).await;
    assert_eq!(v["visibility"], "public");
    let (_, v) = s.req(Method::GET, &visibility_path(&old), None, None).await;
    assert_eq!(v["visibility"], "private");

    // The tombstone is in the old room's timeline; members see it.
    let (_, v) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
                enc(&old)
            ),
            &bob,
        )
        .await;
    assert!(
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.tombstone"),
        "{v}"
    );
    // Bob can join the new (public) room.
    join(&s, &bob, &new).await;

    // A room is upgraded only once.
    assert_err(
        &s.post(&upgrade_path(&old), &alice, json!({"new_version": "12"}))
            .await,
        403,
        "M_FORBIDDEN",
    );
}

#[tokio::test]
async fn upgrade_from_v12_keeps_the_creator_in_charge() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let old = make_room(&s, &alice, RoomVersionId::V12, "invite", "shared").await;
    let (status, v) = s
        .post(&upgrade_path(&old), &alice, json!({"new_version": "10"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new = v["replacement_room"].as_str().unwrap();
    let pl = state_content(&s, new, "m.room.power_levels", "").unwrap();
    assert_eq!(pl["users"][&alice.user_id], 100, "{pl}");
    let create = state_content(&s, new, "m.room.create", "").unwrap();
    assert_eq!(create["room_version"], "10");
    assert_eq!(create["creator"], json!(alice.user_id));
    assert_eq!(
        state_content(&s, new, "m.room.join_rules", "").unwrap()["join_rule"],
        "invite"
    );
    assert_eq!(
        state_content(&s, new, "m.room.history_visibility", "").unwrap()["history_visibility"],
        "shared"
    );
}

#[tokio::test]
async fn upgrade_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = make_room(&s, &alice, RoomVersionId::V11, "public", "shared").await;
    join(&s, &bob, &room).await;
    let path = upgrade_path(&room);

    assert_err(
        &s.post(&path, &alice, json!({"new_version": "99"})).await,
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    assert_err(
        &s.post(&path, &bob, json!({"new_version": "12"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&path, &carol, json!({"new_version": "12"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(&s.post(&path, &alice, json!({})).await, 400, "M_BAD_JSON");
    assert_err(
        &s.post(&path, &alice, json!({"new_version": 12})).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::POST, &path, Some(&alice.token), b"nope")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req(
            Method::POST,
            &path,
            None,
            Some(json!({"new_version": "12"})),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );
    let unknown = format!("!unknown:{}", s.server_name());
    assert_err(
        &s.post(
            &upgrade_path(&unknown),
            &alice,
            json!({"new_version": "12"}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    // None of this touched the room.
    assert!(state_content(&s, &room, "m.room.tombstone", "").is_none());
}

/// createRoom's `room_alias_name` lands in the same alias tables this area serves.
#[tokio::test]
async fn create_room_alias_resolves_and_deletes() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(
            &alice,
            json!({"preset": "public_chat", "room_alias_name": "made"}),
        )
        .await;
    let alias = format!("#made:{}", s.server_name());
    let (status, v) = s.req(Method::GET, &alias_path(&alias), None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["room_id"], json!(room));
    let (_, v) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(v["aliases"], json!([alias]));
    let (status, _) = delete(&s, &alias_path(&alias), &alice).await;
    assert_eq!(status, StatusCode::OK);
    // The canonical alias createRoom set is gone with it.
    let content = state_content(&s, &room, "m.room.canonical_alias", "").unwrap();
    assert!(content.get("alias").is_none(), "{content}");
}
