//! Room creation, membership, state, sending, redaction and single events.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

fn room_path(room: &str, rest: &str) -> String {
    format!("{V3}/rooms/{}/{rest}", enc(room))
}

async fn send_text(s: &TestServer, u: &TestUser, room: &str, txn: &str, body: &str) -> String {
    let got = s
        .put(
            &room_path(room, &format!("send/m.room.message/{txn}")),
            u,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "send: {}", got.1);
    got.1["event_id"].as_str().expect("event_id").to_owned()
}

async fn join(s: &TestServer, u: &TestUser, room: &str) -> (StatusCode, Value) {
    s.post(&room_path(room, "join"), u, json!({})).await
}

async fn state_content(s: &TestServer, u: &TestUser, room: &str, kind: &str, key: &str) -> Value {
    let got = s
        .get(&room_path(room, &format!("state/{kind}/{}", enc(key))), u)
        .await;
    assert_eq!(got.0, StatusCode::OK, "state {kind}: {}", got.1);
    got.1
}

#[tokio::test]
async fn create_room_with_everything() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    hafen::service::profile_defaults(s.services(), &ruma::UserId::parse(&alice.user_id).unwrap())
        .unwrap();
    let bob = s.user("bob").await;
    let body = json!({
        "preset": "public_chat",
        "visibility": "public",
        "room_alias_name": "pub",
        "name": "The Pub",
        "topic": "Happy hour",
        "invite": [bob.user_id],
        "initial_state": [{ "type": "m.custom.state", "state_key": "k", "content": { "a": 1 } }],
        "creation_content": { "m.federate": false },
        "power_level_content_override": { "events_default": 10 },
    });
    let room = s.create_room(&alice, body).await;

    let (status, state) = s.get(&room_path(&room, "state"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    let find = |t: &str, k: &str| {
        state
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == json!(t) && e["state_key"] == json!(k))
            .cloned()
            .unwrap_or_else(|| panic!("no {t} in {state}"))
    };
    let create = find("m.room.create", "");
    assert_eq!(create["content"]["room_version"], json!("12"));
    assert_eq!(create["content"]["m.federate"], json!(false));
    assert_eq!(
        find("m.room.join_rules", "")["content"]["join_rule"],
        json!("public")
    );
    assert_eq!(
        find("m.room.history_visibility", "")["content"]["history_visibility"],
        json!("shared")
    );
    let alias = format!("#pub:{}", s.server_name());
    assert_eq!(
        find("m.room.canonical_alias", "")["content"]["alias"],
        json!(alias)
    );
    assert_eq!(find("m.room.name", "")["content"]["name"], json!("The Pub"));
    assert_eq!(
        find("m.room.topic", "")["content"]["topic"],
        json!("Happy hour")
    );
    assert_eq!(find("m.custom.state", "k")["content"]["a"], json!(1));
    assert_eq!(
        find("m.room.member", &bob.user_id)["content"]["membership"],
        json!("invite")
    );
    let joined = find("m.room.member", &alice.user_id);
    assert_eq!(joined["content"]["membership"], json!("join"));
    assert_eq!(joined["content"]["displayname"], json!("alice"));
    // Room version 12: creators are privileged by the create event, not listed in users.
    let pl = find("m.room.power_levels", "")["content"].clone();
    assert!(pl["users"].get(&alice.user_id).is_none(), "{pl}");
    assert_eq!(pl["events_default"], json!(10));
    assert_eq!(pl["events"]["m.room.tombstone"], json!(150));
    // Public presets do not send guest access.
    assert!(state
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["type"] != json!("m.room.guest_access")));
    // Published in the directory.
    assert!(s
        .services()
        .rooms
        .is_public(&ruma::RoomId::parse(&room).unwrap())
        .unwrap());

    // The alias resolves for joining.
    let carol = s.user("carol").await;
    let (status, body) = s
        .post(&format!("{V3}/join/{}", enc(&alias)), &carol, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(room));

    // The same alias again is taken.
    let got = s
        .post(
            &format!("{V3}/createRoom"),
            &alice,
            json!({ "room_alias_name": "pub" }),
        )
        .await;
    assert_err(&got, 400, "M_ROOM_IN_USE");
}

#[tokio::test]
async fn create_room_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let path = format!("{V3}/createRoom");
    assert_err(
        &s.req(Method::POST, &path, None, Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(Method::POST, &path, Some("bad"), Some(json!({})))
            .await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.req_raw(Method::POST, &path, Some(&alice.token), b"{not json")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "name": 5 })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "invite": "bob" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "room_version": "999" }))
            .await,
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "room_alias_name": "a:b" }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "room_alias_name": "a b" }))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.post(
            &path,
            &alice,
            json!({ "power_level_content_override": [1] }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "preset": "nope" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(
            &path,
            &alice,
            json!({ "initial_state": [{ "type": "m.room.create", "content": {} }] }),
        )
        .await,
        400,
        "M_INVALID_ROOM_STATE",
    );
}

#[tokio::test]
async fn private_presets_and_direct_invites() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(
            &alice,
            json!({ "preset": "trusted_private_chat", "invite": [bob.user_id], "is_direct": true, "room_version": "11" }),
        )
        .await;
    assert_eq!(
        state_content(&s, &alice, &room, "m.room.join_rules", "").await["join_rule"],
        json!("invite")
    );
    assert_eq!(
        state_content(&s, &alice, &room, "m.room.guest_access", "").await["guest_access"],
        json!("can_join")
    );
    let pl = state_content(&s, &alice, &room, "m.room.power_levels", "").await;
    // Before v12 the creator is listed; trusted_private_chat gives invitees the same level.
    assert_eq!(pl["users"][&alice.user_id], json!(100));
    assert_eq!(pl["users"][&bob.user_id], json!(100));
    assert_eq!(pl["events"]["m.room.tombstone"], json!(100));
    let invite = state_content(&s, &alice, &room, "m.room.member", &bob.user_id).await;
    assert_eq!(invite["membership"], json!("invite"));
    assert_eq!(invite["is_direct"], json!(true));

    // Invite-only: the invitee joins, others may not.
    assert_err(&join(&s, &carol, &room).await, 403, "M_FORBIDDEN");
    let (status, body) = join(&s, &bob, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(room));

    // v12 trusted_private_chat: invitees become additional creators.
    let room12 = s
        .create_room(
            &alice,
            json!({ "preset": "trusted_private_chat", "invite": [carol.user_id] }),
        )
        .await;
    let create = state_content(&s, &alice, &room12, "m.room.create", "").await;
    assert_eq!(create["additional_creators"], json!([carol.user_id]));
    let pl = state_content(&s, &alice, &room12, "m.room.power_levels", "").await;
    assert_eq!(pl["users"], json!({}));
}

#[tokio::test]
async fn every_room_version_creates_sends_and_joins() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    for v in 1..=12 {
        let room = s
            .create_room(
                &alice,
                json!({ "room_version": v.to_string(), "preset": "public_chat" }),
            )
            .await;
        let create = state_content(&s, &alice, &room, "m.room.create", "").await;
        assert_eq!(create["room_version"], json!(v.to_string()));
        let event_id = send_text(&s, &alice, &room, &format!("t{v}"), "hello").await;
        let (status, body) = join(&s, &bob, &room).await;
        assert_eq!(status, StatusCode::OK, "v{v}: {body}");
        let (status, ev) = s
            .get(
                &room_path(&room, &format!("event/{}", enc(&event_id))),
                &bob,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "v{v}: {ev}");
        assert_eq!(ev["content"]["body"], json!("hello"));
        send_text(&s, &bob, &room, &format!("b{v}"), "hi").await;
        // Own-event redaction works in every version.
        let got = s
            .put(
                &room_path(&room, &format!("redact/{}/r{v}", enc(&event_id))),
                &alice,
                json!({}),
            )
            .await;
        assert_eq!(got.0, StatusCode::OK, "v{v}: {}", got.1);
    }
}

#[tokio::test]
async fn join_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let unknown = format!("!nothere:{}", s.server_name());
    assert_err(&join(&s, &bob, &unknown).await, 404, "M_NOT_FOUND");
    let alias = format!("#nothere:{}", s.server_name());
    assert_err(
        &s.post(&format!("{V3}/join/{}", enc(&alias)), &bob, json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.req(
            Method::POST,
            &room_path(&unknown, "join"),
            None,
            Some(json!({})),
        )
        .await,
        401,
        "M_MISSING_TOKEN",
    );

    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, body) = s
        .post(&format!("{V3}/join/{}", enc(&room)), &bob, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Joining again is fine.
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    let got = s
        .post(
            &room_path(&room, "ban"),
            &alice,
            json!({ "user_id": bob.user_id, "reason": "spam" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_err(&join(&s, &bob, &room).await, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn restricted_join_needs_membership_of_allowed_room() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let space = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let room = s
        .create_room(
            &alice,
            json!({ "initial_state": [{ "type": "m.room.join_rules", "content": {
                "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": space }] } }] }),
        )
        .await;
    assert_err(&join(&s, &bob, &room).await, 403, "M_FORBIDDEN");
    assert_eq!(join(&s, &bob, &space).await.0, StatusCode::OK);
    let (status, body) = join(&s, &bob, &room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let member = state_content(&s, &bob, &room, "m.room.member", &bob.user_id).await;
    assert_eq!(member["membership"], json!("join"));
    assert_eq!(
        member["join_authorised_via_users_server"],
        json!(alice.user_id)
    );
}

#[tokio::test]
async fn knock_then_invite() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let private = s.create_room(&alice, json!({})).await;
    assert_err(
        &s.post(&format!("{V3}/knock/{}", enc(&private)), &bob, json!({}))
            .await,
        403,
        "M_FORBIDDEN",
    );
    let room = s
        .create_room(&alice, json!({ "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }] }))
        .await;
    let (status, body) = s
        .post(
            &format!("{V3}/knock/{}", enc(&room)),
            &bob,
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(room));
    let member = state_content(&s, &alice, &room, "m.room.member", &bob.user_id).await;
    assert_eq!(member["membership"], json!("knock"));
    assert_eq!(member["reason"], json!("let me in"));
    assert_err(&join(&s, &bob, &room).await, 403, "M_FORBIDDEN");
    let got = s
        .post(
            &room_path(&room, "invite"),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    let unknown = format!("#nothere:{}", s.server_name());
    assert_err(
        &s.post(&format!("{V3}/knock/{}", enc(&unknown)), &bob, json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn invite_rules() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let dave = s.user("dave").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let invite = |u: &TestUser, target: &TestUser| {
        let body = json!({ "user_id": target.user_id, "reason": "join us" });
        let path = room_path(&room, "invite");
        let u = u.clone();
        let s = &s;
        async move { s.post(&path, &u, body).await }
    };
    // Not in the room.
    assert_err(&invite(&bob, &carol).await, 403, "M_FORBIDDEN");
    // Public rooms need power 50 to invite.
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    assert_err(&invite(&bob, &carol).await, 403, "M_FORBIDDEN");
    // Already joined.
    assert_err(&invite(&alice, &bob).await, 403, "M_FORBIDDEN");
    // Banned.
    assert_eq!(
        s.post(
            &room_path(&room, "ban"),
            &alice,
            json!({ "user_id": dave.user_id })
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_err(&invite(&alice, &dave).await, 403, "M_FORBIDDEN");
    let (status, body) = invite(&alice, &carol).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({}));
    let member = state_content(&s, &alice, &room, "m.room.member", &carol.user_id).await;
    assert_eq!(member["membership"], json!("invite"));
    assert_eq!(member["reason"], json!("join us"));
    assert_err(
        &s.post(&room_path(&room, "invite"), &alice, json!({})).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&room_path(&room, "invite"), &alice, json!({ "user_id": 5 }))
            .await,
        400,
        "M_BAD_JSON",
    );
}

#[tokio::test]
async fn leave_reject_forget_and_joined_rooms() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "invite": [bob.user_id] }))
        .await;
    let (status, body) = s.get(&format!("{V3}/joined_rooms"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["joined_rooms"], json!([room]));
    assert_eq!(
        s.get(&format!("{V3}/joined_rooms"), &bob).await.1["joined_rooms"],
        json!([])
    );
    assert_err(
        &s.req(Method::GET, &format!("{V3}/joined_rooms"), None, None)
            .await,
        401,
        "M_MISSING_TOKEN",
    );

    // Leaving an invite rejects it.
    let got = s
        .post(
            &room_path(&room, "leave"),
            &bob,
            json!({ "reason": "no thanks" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let member = state_content(&s, &alice, &room, "m.room.member", &bob.user_id).await;
    assert_eq!(member["membership"], json!("leave"));
    assert_eq!(member["reason"], json!("no thanks"));

    // Forgetting needs leaving first.
    assert_err(
        &s.post(&room_path(&room, "forget"), &alice, json!({})).await,
        400,
        "M_UNKNOWN",
    );
    assert_eq!(
        s.post(&room_path(&room, "leave"), &alice, json!({}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        s.get(&format!("{V3}/joined_rooms"), &alice).await.1["joined_rooms"],
        json!([])
    );
    let got = s.post(&room_path(&room, "forget"), &alice, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({}));

    let unknown = format!("!nothere:{}", s.server_name());
    assert_err(
        &s.post(&room_path(&unknown, "leave"), &alice, json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn kick_ban_unban() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    assert_eq!(join(&s, &carol, &room).await.0, StatusCode::OK);

    // No power.
    assert_err(
        &s.post(
            &room_path(&room, "kick"),
            &bob,
            json!({ "user_id": carol.user_id }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(
            &room_path(&room, "ban"),
            &bob,
            json!({ "user_id": carol.user_id }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.post(&room_path(&room, "kick"), &alice, json!({})).await,
        400,
        "M_BAD_JSON",
    );

    let got = s
        .post(
            &room_path(&room, "kick"),
            &alice,
            json!({ "user_id": bob.user_id, "reason": "calm down" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let member = state_content(&s, &alice, &room, "m.room.member", &bob.user_id).await;
    assert_eq!(
        member,
        json!({ "membership": "leave", "reason": "calm down" })
    );
    // Kicking someone not in the room.
    assert_err(
        &s.post(
            &room_path(&room, "kick"),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );

    let got = s
        .post(
            &room_path(&room, "ban"),
            &alice,
            json!({ "user_id": carol.user_id, "reason": "spam" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let member = state_content(&s, &alice, &room, "m.room.member", &carol.user_id).await;
    assert_eq!(member, json!({ "membership": "ban", "reason": "spam" }));
    assert_err(&join(&s, &carol, &room).await, 403, "M_FORBIDDEN");
    // Unban needs a ban.
    assert_err(
        &s.post(
            &room_path(&room, "unban"),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    let got = s
        .post(
            &room_path(&room, "unban"),
            &alice,
            json!({ "user_id": carol.user_id, "reason": "ok" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let member = state_content(&s, &alice, &room, "m.room.member", &carol.user_id).await;
    assert_eq!(member, json!({ "membership": "leave", "reason": "ok" }));
    assert_eq!(join(&s, &carol, &room).await.0, StatusCode::OK);
}

#[tokio::test]
async fn members_and_joined_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let dave = s.user("dave").await;
    for u in [&alice, &bob] {
        hafen::service::profile_defaults(s.services(), &ruma::UserId::parse(&u.user_id).unwrap())
            .unwrap();
    }
    s.services()
        .profiles
        .set(
            &ruma::UserId::parse(&alice.user_id).unwrap(),
            "avatar_url",
            Some(&json!("mxc://x/y")),
        )
        .unwrap();
    let room = s
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "invite": [dave.user_id] }),
        )
        .await;
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);

    let (status, body) = s.get(&room_path(&room, "members"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["chunk"].as_array().unwrap().len(), 3, "{body}");
    let (_, body) = s
        .get(&room_path(&room, "members?membership=invite"), &alice)
        .await;
    let chunk = body["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1);
    assert_eq!(chunk[0]["state_key"], json!(dave.user_id));
    let (_, body) = s
        .get(&room_path(&room, "members?not_membership=invite"), &alice)
        .await;
    assert_eq!(body["chunk"].as_array().unwrap().len(), 2);
    assert_err(
        &s.get(&room_path(&room, "members?membership=bogus"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    // Never in the room.
    assert_err(
        &s.get(&room_path(&room, "members"), &carol).await,
        403,
        "M_FORBIDDEN",
    );

    let (status, body) = s.get(&room_path(&room, "joined_members"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["joined"],
        json!({
            alice.user_id.clone(): { "display_name": "alice", "avatar_url": "mxc://x/y" },
            bob.user_id.clone(): { "display_name": "bob" },
        })
    );
    assert_err(
        &s.get(&room_path(&room, "joined_members"), &carol).await,
        403,
        "M_FORBIDDEN",
    );

    // A former member sees the members as they were when they left.
    assert_eq!(
        s.post(&room_path(&room, "leave"), &bob, json!({})).await.0,
        StatusCode::OK
    );
    assert_eq!(join(&s, &carol, &room).await.0, StatusCode::OK);
    let (status, body) = s.get(&room_path(&room, "members"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chunk = body["chunk"].as_array().unwrap();
    assert!(
        chunk.iter().all(|e| e["state_key"] != json!(carol.user_id)),
        "{body}"
    );
    assert!(chunk
        .iter()
        .any(|e| e["state_key"] == json!(bob.user_id)
            && e["content"]["membership"] == json!("leave")));
    let (_, body) = s.get(&room_path(&room, "members"), &alice).await;
    assert_eq!(body["chunk"].as_array().unwrap().len(), 4);
    assert_err(
        &s.get(&room_path(&room, "joined_members"), &bob).await,
        403,
        "M_FORBIDDEN",
    );
}

#[tokio::test]
async fn state_read_and_write() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.create_room(&alice, json!({ "name": "Before" })).await;

    let got = s.get(&room_path(&room, "state"), &bob).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert_err(
        &s.get(&room_path(&room, "state/m.room.name/"), &bob).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.req(Method::GET, &room_path(&room, "state"), None, None)
            .await,
        401,
        "M_MISSING_TOKEN",
    );
    let unknown = format!("!nothere:{}", s.server_name());
    assert_err(
        &s.get(&room_path(&unknown, "state"), &alice).await,
        403,
        "M_FORBIDDEN",
    );

    // The empty state key in all three spellings.
    assert_eq!(
        s.get(&room_path(&room, "state/m.room.name"), &alice)
            .await
            .1,
        json!({ "name": "Before" })
    );
    assert_eq!(
        s.get(&room_path(&room, "state/m.room.name/"), &alice)
            .await
            .1,
        json!({ "name": "Before" })
    );
    let (status, ev) = s
        .get(&room_path(&room, "state/m.room.name/?format=event"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ev["type"], json!("m.room.name"));
    assert_eq!(ev["content"]["name"], json!("Before"));
    assert_eq!(ev["sender"], json!(alice.user_id));
    assert_eq!(ev["room_id"], json!(room));
    assert!(ev["event_id"].is_string());
    assert_err(
        &s.get(&room_path(&room, "state/m.room.avatar/"), &alice)
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.get(&room_path(&room, "state/m.room.name/?format=bogus"), &alice)
            .await,
        400,
        "M_INVALID_PARAM",
    );

    let got = s
        .put(
            &room_path(&room, "state/m.room.name"),
            &alice,
            json!({ "name": "After" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let id = got.1["event_id"].as_str().unwrap().to_owned();
    // The same content again gives the same event.
    let again = s
        .put(
            &room_path(&room, "state/m.room.name/"),
            &alice,
            json!({ "name": "After" }),
        )
        .await;
    assert_eq!(again.1["event_id"], json!(id));
    assert_eq!(
        state_content(&s, &alice, &room, "m.room.name", "").await,
        json!({ "name": "After" })
    );
    let got = s
        .put(
            &room_path(&room, "state/m.custom/some%20key"),
            &alice,
            json!({ "x": true }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        state_content(&s, &alice, &room, "m.custom", "some key").await,
        json!({ "x": true })
    );

    // Not a member; then a member without power.
    assert_err(
        &s.put(
            &room_path(&room, "state/m.room.name"),
            &bob,
            json!({ "name": "x" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    let got = s
        .post(
            &room_path(&room, "invite"),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    assert_err(
        &s.put(
            &room_path(&room, "state/m.room.name"),
            &bob,
            json!({ "name": "x" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.put(
            &room_path(&room, "state/m.room.power_levels"),
            &bob,
            json!({ "users": { bob.user_id.clone(): 100 } }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );

    // Bad bodies.
    let path = room_path(&room, "state/m.custom/k");
    assert_err(
        &s.req_raw(Method::PUT, &path, Some(&alice.token), b"nope")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &path, Some(&alice.token), b"[1]")
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &path, Some(&alice.token), b"{\"f\": 1.5}")
            .await,
        400,
        "M_BAD_JSON",
    );

    // Canonical aliases must point to this room.
    let alias = format!("#other:{}", s.server_name());
    let got = s
        .put(
            &room_path(&room, "state/m.room.canonical_alias"),
            &alice,
            json!({ "alias": alias }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_ALIAS");
    let other = s
        .create_room(&alice, json!({ "room_alias_name": "other" }))
        .await;
    assert_ne!(other, room);
    let got = s
        .put(
            &room_path(&room, "state/m.room.canonical_alias"),
            &alice,
            json!({ "alt_aliases": [alias] }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_ALIAS");
    let got = s
        .put(
            &room_path(&other, "state/m.room.canonical_alias"),
            &alice,
            json!({ "alias": alias, "alt_aliases": [] }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // World-readable rooms are readable by anyone.
    let got = s
        .put(
            &room_path(&room, "state/m.room.history_visibility"),
            &alice,
            json!({ "history_visibility": "world_readable" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let carol = s.user("carol").await;
    let (status, body) = s.get(&room_path(&room, "state"), &carol).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == json!("m.room.name")));
}

#[tokio::test]
async fn send_messages() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.create_room(&alice, json!({})).await;
    let path = room_path(&room, "send/m.room.message/txn1");
    let first = send_text(&s, &alice, &room, "txn1", "hi").await;
    assert!(first.starts_with('$'));
    // Idempotent per device and transaction id.
    assert_eq!(send_text(&s, &alice, &room, "txn1", "hi").await, first);
    let other_device = s
        .services()
        .accounts
        .create_session(
            &ruma::UserId::parse(&alice.user_id).unwrap(),
            None,
            None,
            false,
        )
        .unwrap();
    let alice2 = TestUser {
        token: other_device.access_token,
        device_id: other_device.device_id.to_string(),
        ..alice.clone()
    };
    assert_ne!(send_text(&s, &alice2, &room, "txn1", "hi").await, first);

    assert_err(
        &s.req(Method::PUT, &path, None, Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(Method::PUT, &path, Some("bad"), Some(json!({})))
            .await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.put(&path, &bob, json!({ "body": "x" })).await,
        403,
        "M_FORBIDDEN",
    );
    let unknown = format!("!nothere:{}", s.server_name());
    assert_err(
        &s.put(
            &room_path(&unknown, "send/m.room.message/t"),
            &alice,
            json!({}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );

    let p2 = room_path(&room, "send/m.room.message/txn2");
    assert_err(
        &s.req_raw(Method::PUT, &p2, Some(&alice.token), b"{oops")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &p2, Some(&alice.token), b"\"text\"")
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &p2, Some(&alice.token), b"{\"n\": 0.5}")
            .await,
        400,
        "M_BAD_JSON",
    );
    let big = "x".repeat(70_000);
    assert_err(
        &s.put(&p2, &alice, json!({ "body": big })).await,
        413,
        "M_TOO_LARGE",
    );
    // Nothing above consumed the transaction id.
    let (status, body) = s.put(&p2, &alice, json!({ "body": "fine" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn send_is_rate_limited() {
    let s = TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.rate_limits.message.burst = 3;
        c.rate_limits.message.per_second = 0.01;
    })
    .await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    for i in 0..3 {
        send_text(&s, &alice, &room, &format!("t{i}"), "x").await;
    }
    let got = s
        .put(
            &room_path(&room, "send/m.room.message/t9"),
            &alice,
            json!({ "body": "x" }),
        )
        .await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    assert!(got.1["retry_after_ms"].as_u64().unwrap() > 0, "{}", got.1);
    // A retry of an earlier transaction still answers.
    let got = s
        .put(
            &room_path(&room, "send/m.room.message/t0"),
            &alice,
            json!({ "body": "x" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

#[tokio::test]
async fn get_single_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let id = send_text(&s, &alice, &room, "tx", "secret").await;
    let path = room_path(&room, &format!("event/{}", enc(&id)));

    let (status, ev) = s.get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert_eq!(ev["event_id"], json!(id));
    assert_eq!(ev["content"]["body"], json!("secret"));
    assert_eq!(ev["unsigned"]["transaction_id"], json!("tx"));
    // Other devices of the sender do not get the transaction id.
    let other = s
        .services()
        .accounts
        .create_session(
            &ruma::UserId::parse(&alice.user_id).unwrap(),
            None,
            None,
            false,
        )
        .unwrap();
    let alice2 = TestUser {
        token: other.access_token,
        device_id: other.device_id.to_string(),
        ..alice.clone()
    };
    let (_, ev) = s.get(&path, &alice2).await;
    assert!(ev["unsigned"].get("transaction_id").is_none(), "{ev}");

    // Not a member: not visible.
    assert_err(&s.get(&path, &bob).await, 404, "M_NOT_FOUND");
    assert_err(
        &s.req(Method::GET, &path, None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.get(&room_path(&room, "event/%24nope"), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    // With `shared` visibility a later member sees earlier events.
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    assert_eq!(s.get(&path, &bob).await.0, StatusCode::OK);
    // With `joined` visibility a later member does not.
    let got = s
        .put(
            &room_path(&room, "state/m.room.history_visibility"),
            &alice,
            json!({ "history_visibility": "joined" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let id2 = send_text(&s, &alice, &room, "tx2", "later").await;
    assert_eq!(join(&s, &carol, &room).await.0, StatusCode::OK);
    assert_err(
        &s.get(&room_path(&room, &format!("event/{}", enc(&id2))), &carol)
            .await,
        404,
        "M_NOT_FOUND",
    );
    // The event is not in another room.
    let other_room = s.create_room(&alice, json!({})).await;
    assert_err(
        &s.get(
            &room_path(&other_room, &format!("event/{}", enc(&id))),
            &alice,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn redaction() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    assert_eq!(join(&s, &bob, &room).await.0, StatusCode::OK);
    let alice_msg = send_text(&s, &alice, &room, "a1", "mine").await;
    let bob_msg = send_text(&s, &bob, &room, "b1", "his").await;

    // Bob has no redact power over Alice's event, not even through /send.
    let got = s
        .put(
            &room_path(&room, &format!("redact/{}/r1", enc(&alice_msg))),
            &bob,
            json!({}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .put(
            &room_path(&room, "send/m.room.redaction/r2"),
            &bob,
            json!({ "redacts": alice_msg }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert_err(
        &s.put(&room_path(&room, "redact/%24nope/r3"), &bob, json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(
            &room_path(&room, &format!("redact/{}/r4", enc(&bob_msg))),
            &bob,
            json!({ "reason": 1 }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );

    // Own events: allowed.
    let got = s
        .put(
            &room_path(&room, &format!("redact/{}/r5", enc(&bob_msg))),
            &bob,
            json!({ "reason": "typo" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let redaction_id = got.1["event_id"].as_str().unwrap().to_owned();
    // Idempotent.
    let again = s
        .put(
            &room_path(&room, &format!("redact/{}/r5", enc(&bob_msg))),
            &bob,
            json!({ "reason": "typo" }),
        )
        .await;
    assert_eq!(again.1["event_id"], json!(redaction_id));
    let (status, ev) = s
        .get(
            &room_path(&room, &format!("event/{}", enc(&bob_msg))),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ev["content"], json!({}));
    assert_eq!(
        ev["unsigned"]["redacted_because"]["event_id"],
        json!(redaction_id)
    );
    assert_eq!(
        ev["unsigned"]["redacted_because"]["content"]["reason"],
        json!("typo")
    );
    let (_, red) = s
        .get(
            &room_path(&room, &format!("event/{}", enc(&redaction_id))),
            &alice,
        )
        .await;
    assert_eq!(red["type"], json!("m.room.redaction"));
    assert_eq!(red["redacts"], json!(bob_msg));

    // Moderators may redact others' events.
    let got = s
        .put(
            &room_path(&room, &format!("redact/{}/r6", enc(&alice_msg))),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let bob_msg2 = send_text(&s, &bob, &room, "b2", "again").await;
    let got = s
        .put(
            &room_path(&room, &format!("redact/{}/r7", enc(&bob_msg2))),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let (_, ev) = s
        .get(
            &room_path(&room, &format!("event/{}", enc(&bob_msg2))),
            &bob,
        )
        .await;
    assert_eq!(ev["content"], json!({}));
}

/// Auth checks read state events through a cache; redacting a state event must change what
/// later events are checked against. In room version 10 a redaction strips `invite` from the
/// power levels, so inviting falls back to the default level 0.
#[tokio::test]
async fn redacted_power_levels_apply_to_later_auth() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(
            &alice,
            json!({ "room_version": "10", "preset": "public_chat" }),
        )
        .await;
    let got = s.post(&room_path(&room, "join"), &bob, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{got:?}");

    let (status, levels) = s
        .get(&room_path(&room, "state/m.room.power_levels/"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut levels = levels;
    levels["invite"] = json!(50);
    let got = s
        .put(
            &room_path(&room, "state/m.room.power_levels/"),
            &alice,
            levels,
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{got:?}");
    let pl_event = got.1["event_id"].as_str().unwrap().to_owned();

    let invite = json!({ "user_id": carol.user_id });
    let got = s
        .post(&room_path(&room, "invite"), &bob, invite.clone())
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    let got = s
        .put(
            &room_path(&room, &format!("redact/{}/pl1", enc(&pl_event))),
            &alice,
            json!({ "reason": "test" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{got:?}");
    let (status, redacted) = s
        .get(&room_path(&room, "state/m.room.power_levels/"), &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(redacted.get("invite").is_none(), "{redacted}");
    assert_eq!(redacted["users"][&alice.user_id], json!(100), "{redacted}");

    let got = s.post(&room_path(&room, "invite"), &bob, invite).await;
    assert_eq!(got.0, StatusCode::OK, "{got:?}");
    assert_eq!(got.1, json!({}));
}

/// A v12 room id is the hash of its create event, so identical requests in the same
/// millisecond would build the same id: each must still get a room of its own.
#[tokio::test]
async fn concurrent_identical_create_room_gives_distinct_rooms() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let body = json!({ "preset": "private_chat" });
    let path = format!("{V3}/createRoom");
    let replies =
        futures_util::future::join_all((0..16).map(|_| s.post(&path, &alice, body.clone()))).await;
    let mut ids = std::collections::HashSet::new();
    for got in &replies {
        assert_eq!(got.0, StatusCode::OK, "{got:?}");
        let id = got.1["room_id"].as_str().expect("room_id").to_owned();
        assert!(id.starts_with('!'), "{id}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 16, "{replies:?}");
    let (status, joined) = s.get(&format!("{V3}/joined_rooms"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        joined["joined_rooms"].as_array().map(Vec::len),
        Some(16),
        "{joined}"
    );
}

/// Redacting a state event also removes its content from the `unsigned.prev_content` of the
/// event that replaced it (otherwise "changed their name from ..." keeps the old name).
#[tokio::test]
async fn redacting_a_state_event_redacts_the_successors_prev_content() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let member_path = format!(
        "{V3}/rooms/{}/state/m.room.member/{}",
        enc(&room),
        enc(&alice.user_id)
    );
    let (status, old) = s
        .put(
            &member_path,
            &alice,
            json!({ "membership": "join", "displayname": "old-name-7f3a" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{old}");
    let old_id = old["event_id"].as_str().expect("event_id").to_owned();
    let (status, new) = s
        .put(
            &member_path,
            &alice,
            json!({ "membership": "join", "displayname": "new-name" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{new}");
    let new_id = new["event_id"].as_str().expect("event_id").to_owned();
    let event_path = |id: &str| format!("{V3}/rooms/{}/event/{}", enc(&room), enc(id));
    let (status, ev) = s.get(&event_path(&new_id), &alice).await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert_eq!(
        ev["unsigned"]["prev_content"],
        json!({ "membership": "join", "displayname": "old-name-7f3a" })
    );

    let (status, body) = s
        .put(
            &format!(
                "{V3}/rooms/{}/redact/{}/{}",
                enc(&room),
                enc(&old_id),
                crate::common::unique_txn()
            ),
            &alice,
            json!({ "reason": "old name" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, ev) = s.get(&event_path(&new_id), &alice).await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert_eq!(
        ev["unsigned"]["prev_content"],
        json!({ "membership": "join" })
    );
    assert_eq!(ev["unsigned"]["replaces_state"], json!(old_id));
    assert_eq!(ev["content"]["displayname"], json!("new-name"));
    let (status, ev) = s.get(&event_path(&old_id), &alice).await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert_eq!(ev["content"], json!({ "membership": "join" }));
    s.stop().await;
}

// ---- retried writes and the disk ----

/// Is the server answering at all? A plain HTTP/1.1 request from a thread of its own (the
/// test's runtime may be the one that is stuck), with a deadline.
fn answers_within(base: &str, deadline: std::time::Duration) -> bool {
    use std::io::{Read, Write};
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    std::thread::spawn(move || {
        let Ok(mut conn) = std::net::TcpStream::connect(&addr) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(deadline));
        let request = format!(
            "GET /_matrix/client/versions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        );
        if conn.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut first = [0u8; 12];
        conn.read_exact(&mut first).is_ok() && first.starts_with(b"HTTP/1.1 200")
    })
    .join()
    .unwrap_or(false)
}

/// Wait (on this thread) until `txn` of `u` is known: the first request's batch is applied.
fn wait_for_txn(s: &TestServer, u: &TestUser, txn: &str) {
    let user = ruma::UserId::parse(u.user_id.as_str()).unwrap();
    for _ in 0..500 {
        if s.services()
            .rooms
            .transaction_event(&user, u.device_id.as_str().into(), txn)
            .unwrap()
            .is_some()
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the first request of {txn} was never applied");
}

/// One worker thread: a request that blocked its thread on an fsync would stop the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn retried_send_and_redaction_are_answered_only_once_durable() {
    let s = TestServer::start_with(|c| c.database_sync_writes = true).await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let target = send_text(&s, &alice, &room, "m0", "to be redacted").await;

    for (txn, path, body) in [
        (
            "m1",
            room_path(&room, "send/m.room.message/m1"),
            json!({ "msgtype": "m.text", "body": "once" }),
        ),
        (
            "r1",
            room_path(&room, &format!("redact/{}/r1", enc(&target))),
            json!({ "reason": "oops" }),
        ),
    ] {
        let hold = s.services().storage.hold_wal_sync().expect("sync writes");
        let put = |path: String, body: Value| {
            let (http, url, token) = (
                s.http.clone(),
                format!("{}{path}", s.base),
                alice.token.clone(),
            );
            tokio::spawn(async move {
                let res = http
                    .put(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent");
                (res.status(), res.json::<Value>().await.expect("json"))
            })
        };
        let first = put(path.clone(), body.clone());
        wait_for_txn(&s, &alice, txn);
        // The first request waits for the disk without holding the (only) worker.
        assert!(
            answers_within(&s.base, std::time::Duration::from_secs(3)),
            "{txn}: the server stopped answering while a write waited for its fsync"
        );
        let retry = put(path, body);
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!first.is_finished(), "{txn}: answered before its fsync");
        if retry.is_finished() {
            let got = retry.await.expect("retry");
            panic!("{txn}: the retry was answered before the first write's fsync: {got:?}");
        }
        drop(hold);
        let (status, one) = first.await.expect("first");
        assert_eq!(status, StatusCode::OK, "{one}");
        let (status, two) = retry.await.expect("retry");
        assert_eq!(status, StatusCode::OK, "{two}");
        assert_eq!(one["event_id"], two["event_id"], "{txn}: one event");
        // Answered means visible: the stream watermark has passed the event.
        let meta = s
            .services()
            .rooms
            .event_meta(one["event_id"].as_str().unwrap())
            .unwrap()
            .expect("stored");
        assert!(
            s.services().globals.counter.watermark() >= meta.count,
            "{txn}: answered before sync can see it"
        );
    }
    // The redaction happened once.
    let (status, v) = s
        .get(
            &room_path(&room, &format!("event/{}", enc(&target))),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"], json!({}), "{v}");
}

/// A guest account registered over HTTP (`/register?kind=guest`).
async fn guest(s: &TestServer) -> TestUser {
    let (status, v) = s
        .req(
            Method::POST,
            &format!("{V3}/register?kind=guest"),
            None,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    TestUser {
        user_id: v["user_id"].as_str().expect("user id").to_owned(),
        device_id: v["device_id"].as_str().expect("device").to_owned(),
        token: v["access_token"].as_str().expect("token").to_owned(),
    }
}

#[tokio::test]
async fn guests_obey_guest_access_on_every_path() {
    // Federation on, so that the join of a room elsewhere gets as far as the guest check.
    let s = TestServer::start_with(|c| {
        c.allow_guest_registration = true;
        c.allow_federation = true;
    })
    .await;
    let alice = s.user("alice").await;
    let visitor = guest(&s).await;

    // A public, world-readable room without m.room.guest_access: closed to guests.
    let closed = s
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "initial_state": [
                { "type": "m.room.history_visibility", "content": { "history_visibility": "world_readable" } }
            ] }),
        )
        .await;
    // Through /rooms/{id}/join and /join/{alias or id}: refused.
    let got = s
        .post(&room_path(&closed, "join"), &visitor, json!({}))
        .await;
    assert_err(&got, 403, "M_GUEST_ACCESS_FORBIDDEN");
    let got = s
        .post(&format!("{V3}/join/{}", enc(&closed)), &visitor, json!({}))
        .await;
    assert_err(&got, 403, "M_GUEST_ACCESS_FORBIDDEN");
    // Peeking: the world-readable room is not read by a guest it is closed to; by others it is.
    let got = s.get(&room_path(&closed, "messages?dir=b"), &visitor).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s.get(&room_path(&closed, "state"), &visitor).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let bob = s.user("bob").await;
    let (status, body) = s.get(&room_path(&closed, "messages?dir=b"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An invite does not open the door either.
    let (status, body) = s
        .post(
            &room_path(&closed, "invite"),
            &alice,
            json!({ "user_id": visitor.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = s
        .post(&room_path(&closed, "join"), &visitor, json!({}))
        .await;
    assert_err(&got, 403, "M_GUEST_ACCESS_FORBIDDEN");

    // The same room with guest_access can_join: the guest reads and joins.
    let (status, body) = s
        .put(
            &room_path(&closed, "state/m.room.guest_access/"),
            &alice,
            json!({ "guest_access": "can_join" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s.get(&room_path(&closed, "messages?dir=b"), &visitor).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .post(&room_path(&closed, "join"), &visitor, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A room on another server: its guest access cannot be checked before the join, so guests
    // do not join over federation.
    let got = s
        .post(
            &format!("{V3}/join/{}?via=elsewhere.test", enc("!r:elsewhere.test")),
            &visitor,
            json!({}),
        )
        .await;
    assert_err(&got, 403, "M_GUEST_ACCESS_FORBIDDEN");
}
