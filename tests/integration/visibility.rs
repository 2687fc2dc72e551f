//! History visibility is judged at each event, by the `m.room.history_visibility` in force when
//! it was sent, on every path that hands events to a client; and what is bundled into events
//! (thread summaries, edits, references) obeys the same judgement.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    common::{assert_err, enc, unique_txn, TestServer, TestUser},
    history::send_state,
};

const V3: &str = "/_matrix/client/v3";
const V1: &str = "/_matrix/client/v1";

async fn send(s: &TestServer, u: &TestUser, room: &str, content: Value) -> String {
    let (status, body) = s
        .put(
            &format!(
                "{V3}/rooms/{}/send/m.room.message/{}",
                enc(room),
                unique_txn()
            ),
            u,
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event id").to_owned()
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

fn related(body: &str, rel_type: &str, parent: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body,
            "m.relates_to": { "rel_type": rel_type, "event_id": parent } })
}

fn edit(body: &str, parent: &str) -> Value {
    json!({ "msgtype": "m.text", "body": format!("* {body}"),
            "m.new_content": { "msgtype": "m.text", "body": body },
            "m.relates_to": { "rel_type": "m.replace", "event_id": parent } })
}

async fn set_visibility(s: &TestServer, u: &TestUser, room: &str, hv: &str) {
    send_state(
        s,
        u,
        room,
        "m.room.history_visibility",
        "",
        json!({ "history_visibility": hv }),
    )
    .await;
}

/// Everything in `v` that looks like a message body, however deep.
fn bodies(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("body", Value::String(b)) => out.push(b.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

fn assert_no_secret(what: &str, v: &Value) {
    let leaked: Vec<String> = bodies(v)
        .into_iter()
        .filter(|b| b.contains("secret"))
        .collect();
    assert!(leaked.is_empty(), "{what} leaked {leaked:?}: {v}");
}

/// A public room that is `shared`, then `joined` for a while (the secrets), then `shared`
/// again. Returns (room, parent sent under `shared`, event sent under `joined`, thread root
/// sent under `joined`, event sent after).
async fn room_with_a_joined_stretch(
    s: &TestServer,
    alice: &TestUser,
) -> (String, String, String, String, String) {
    let room = s
        .create_room(alice, json!({ "preset": "public_chat" }))
        .await;
    set_visibility(s, alice, &room, "shared").await;
    let parent = send(s, alice, &room, text("parent for everybody")).await;
    set_visibility(s, alice, &room, "joined").await;
    let secret = send(s, alice, &room, text("secret plans")).await;
    let root = send(s, alice, &room, text("secret thread root")).await;
    send(s, alice, &room, related("secret reply", "m.thread", &root)).await;
    // Children of the visible parent, sent while the room was `joined`.
    send(
        s,
        alice,
        &room,
        related("secret thread reply", "m.thread", &parent),
    )
    .await;
    send(s, alice, &room, edit("secret edit", &parent)).await;
    send(
        s,
        alice,
        &room,
        related("secret reference", "m.reference", &parent),
    )
    .await;
    set_visibility(s, alice, &room, "shared").await;
    let after = send(s, alice, &room, text("after the switch")).await;
    (room, parent, secret, root, after)
}

#[tokio::test]
async fn switching_joined_to_shared_exposes_nothing_sent_under_joined() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let (room, parent, secret, root, after) = room_with_a_joined_stretch(&s, &alice).await;
    s.join(&bob, &room).await;

    // /messages: what was sent under `shared` (before and after), nothing from between.
    let (status, page) = s
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(&room)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_no_secret("/messages", &page);
    let got = bodies(&page["chunk"]);
    assert!(got.contains(&"after the switch".to_owned()), "{page}");
    assert!(got.contains(&"parent for everybody".to_owned()), "{page}");
    // Alice, who was there, still sees it all.
    let (_, page) = s
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(&room)),
            &alice,
        )
        .await;
    assert!(bodies(&page).contains(&"secret plans".to_owned()), "{page}");

    // /context: around a visible event nothing from the stretch; the secret itself is 404.
    let (status, ctx) = s
        .get(
            &format!("{V3}/rooms/{}/context/{}?limit=40", enc(&room), enc(&after)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    assert_no_secret("/context", &ctx);
    assert!(bodies(&ctx["events_before"]).contains(&"parent for everybody".to_owned()));
    assert_err(
        &s.get(
            &format!("{V3}/rooms/{}/context/{}", enc(&room), enc(&secret)),
            &bob,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );

    // /event: 404 for the secret; the parent without what was related to it under `joined`.
    assert_err(
        &s.get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&secret)),
            &bob,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    let (status, ev) = s
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&parent)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ev}");
    assert!(ev["unsigned"].get("m.relations").is_none(), "{ev}");
    // Alice gets the whole bundle.
    let (_, ev) = s
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&parent)),
            &alice,
        )
        .await;
    let rel = &ev["unsigned"]["m.relations"];
    assert_eq!(rel["m.thread"]["count"], json!(1), "{ev}");
    assert!(rel.get("m.replace").is_some(), "{ev}");
    assert!(rel.get("m.reference").is_some(), "{ev}");

    // /sync: a joiner's first timeline.
    let filter = enc(&json!({ "room": { "timeline": { "limit": 100 } } }).to_string());
    let (status, sync) = s.get(&format!("{V3}/sync?filter={filter}"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let timeline = &sync["rooms"]["join"][&room]["timeline"];
    assert_no_secret("/sync", timeline);
    assert!(
        bodies(timeline).contains(&"after the switch".to_owned()),
        "{timeline}"
    );

    // Sliding sync: the room's initial timeline.
    let (status, ss) = s
        .post(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            &bob,
            json!({ "lists": { "all": { "ranges": [[0, 10]], "timeline_limit": 100 } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ss}");
    assert_no_secret("sliding sync", &ss);
    assert!(bodies(&ss["rooms"][&room]).contains(&"after the switch".to_owned()));

    // /search finds nothing of it.
    let (status, found) = s
        .post(
            &format!("{V3}/search"),
            &bob,
            json!({ "search_categories": { "room_events": {
                "search_term": "secret",
                "event_context": { "before_limit": 5, "after_limit": 5 } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        found["search_categories"]["room_events"]["count"],
        json!(0),
        "{found}"
    );
    // ... nor in the context of a result it may give.
    let (_, found) = s
        .post(
            &format!("{V3}/search"),
            &bob,
            json!({ "search_categories": { "room_events": {
                "search_term": "switch",
                "event_context": { "before_limit": 10, "after_limit": 0 } } } }),
        )
        .await;
    assert_eq!(
        found["search_categories"]["room_events"]["count"],
        json!(1),
        "{found}"
    );
    assert_no_secret("/search context", &found);

    // /relations of the visible parent: none of its children from the stretch.
    let (status, rels) = s
        .get(
            &format!("{V1}/rooms/{}/relations/{}", enc(&room), enc(&parent)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rels}");
    assert_eq!(rels["chunk"], json!([]), "{rels}");

    // /threads: neither the root sent under `joined` nor the parent, whose only reply was.
    let (status, threads) = s
        .get(&format!("{V1}/rooms/{}/threads", enc(&room)), &bob)
        .await;
    assert_eq!(status, StatusCode::OK, "{threads}");
    assert_eq!(threads["chunk"], json!([]), "{threads}");
    let (_, threads) = s
        .get(&format!("{V1}/rooms/{}/threads", enc(&room)), &alice)
        .await;
    let listed: Vec<&Value> = threads["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .map(|t| &t["event_id"])
        .collect();
    assert_eq!(listed, vec![&json!(parent), &json!(root)], "{threads}");
}

#[tokio::test]
async fn switching_joined_to_world_readable_exposes_nothing_sent_under_joined() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    set_visibility(&s, &alice, &room, "joined").await;
    let secret = send(&s, &alice, &room, text("secret words")).await;
    set_visibility(&s, &alice, &room, "world_readable").await;
    send(&s, &alice, &room, text("open words")).await;

    // Carol never joined: the room is world readable now, but only from the switch on.
    let (status, page) = s
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(&room)),
            &carol,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_no_secret("/messages", &page);
    assert_eq!(bodies(&page["chunk"]), vec!["open words".to_owned()]);
    // The change itself is visible (the setting after it lets her see it).
    assert!(
        page["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .any(|e| e["type"] == "m.room.history_visibility"
                && e["content"]["history_visibility"] == "world_readable"),
        "{page}"
    );
    assert_err(
        &s.get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&secret)),
            &carol,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
}

/// A thread and an edit, as seen by users who left: the root they could see must not tell them
/// of the replies, edits and references sent after they left.
#[tokio::test]
async fn bundled_aggregations_hide_what_came_after_a_reader_left() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let dave = s.user("dave").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    set_visibility(&s, &alice, &room, "joined").await;
    s.join(&bob, &room).await;
    s.join(&dave, &room).await;
    let root = send(&s, &alice, &room, text("thread root")).await;
    let bobs = send(&s, &bob, &room, related("bob's reply", "m.thread", &root)).await;
    let early_edit = send(&s, &alice, &room, edit("early edit", &root)).await;

    // Bob is kicked, Dave leaves.
    let (status, body) = s
        .post(
            &format!("{V3}/rooms/{}/kick", enc(&room)),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &dave,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let later = send(
        &s,
        &alice,
        &room,
        related("secret later reply", "m.thread", &root),
    )
    .await;
    send(&s, &alice, &room, edit("secret later edit", &root)).await;
    send(
        &s,
        &alice,
        &room,
        related("secret reference", "m.reference", &root),
    )
    .await;

    for reader in [&bob, &dave] {
        let (status, ev) = s
            .get(
                &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&root)),
                reader,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{ev}");
        assert_no_secret("the root's bundle", &ev);
        let rel = &ev["unsigned"]["m.relations"];
        assert_eq!(rel["m.thread"]["count"], json!(1), "{ev}");
        assert_eq!(rel["m.thread"]["latest_event"]["event_id"], json!(bobs));
        assert_eq!(rel["m.replace"]["event_id"], json!(early_edit), "{ev}");
        assert!(rel.get("m.reference").is_none(), "{ev}");

        // The same through /messages and /relations.
        let (_, page) = s
            .get(
                &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(&room)),
                reader,
            )
            .await;
        assert_no_secret("/messages", &page);
        let (_, rels) = s
            .get(
                &format!("{V1}/rooms/{}/relations/{}", enc(&room), enc(&root)),
                reader,
            )
            .await;
        assert_no_secret("/relations", &rels);
        assert_eq!(rels["chunk"].as_array().map(Vec::len), Some(2), "{rels}");
        let (_, threads) = s
            .get(&format!("{V1}/rooms/{}/threads", enc(&room)), reader)
            .await;
        assert_no_secret("/threads", &threads);
        assert_eq!(threads["chunk"][0]["event_id"], json!(root), "{threads}");
    }

    // Alice sees the thread as it is.
    let (_, ev) = s
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&root)),
            &alice,
        )
        .await;
    let rel = &ev["unsigned"]["m.relations"];
    assert_eq!(rel["m.thread"]["count"], json!(2), "{ev}");
    assert_eq!(rel["m.thread"]["latest_event"]["event_id"], json!(later));
    assert_eq!(
        rel["m.reference"]["chunk"].as_array().map(Vec::len),
        Some(1)
    );
}

/// A database from before the visibility log (schema version 1) gets it filled at the upgrade,
/// so the events sent before are judged by the setting they were sent under too.
#[tokio::test]
async fn an_older_database_gets_its_visibility_log_at_the_upgrade() {
    use hafen::storage::{schema, Storage, Table};

    let mut s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    set_visibility(&s, &alice, &room, "joined").await;
    send(&s, &alice, &room, text("secret from long ago")).await;
    set_visibility(&s, &alice, &room, "shared").await;
    send(&s, &alice, &room, text("after the switch")).await;

    // Make it a version 1 database: neither the per-key state log (whose history visibility
    // rows the timeline is judged by) nor the visibility log.
    s.restart_after(|config| {
        let storage = Storage::open(&config.database_path, 8, true).expect("open");
        let mut batch = storage.batch();
        let mut rows = 0;
        for table in [Table::StateByKey, Table::VisibilityLog] {
            for entry in storage.scan_prefix(table, b"").expect("scan") {
                let (k, _) = entry.expect("row");
                if String::from_utf8_lossy(&k).contains("m.room.history_visibility") {
                    rows += 1;
                }
                batch.delete(table, &k).expect("delete");
            }
        }
        assert!(rows >= 3, "the log had {rows} history visibility rows");
        batch.commit().expect("commit");
        schema::set_version(&storage, 1).expect("set version");
    })
    .await;

    s.join(&bob, &room).await;
    let (status, page) = s
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=100", enc(&room)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_no_secret("/messages after the upgrade", &page);
    assert!(bodies(&page["chunk"]).contains(&"after the switch".to_owned()));
}

/// A user who left learns nothing of what happened after through the state that comes with
/// events: a left room's `state` in sync (also with an empty timeline), lazily loaded members in
/// `/messages` and `/context`.
#[tokio::test]
async fn a_user_who_left_learns_no_later_state_through_sync_or_lazy_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": { "history_visibility": "shared" } }] }),
        )
        .await;
    s.join(&bob, &room).await;
    let before = send(&s, &alice, &room, text("findable before")).await;
    let (status, left) = s
        .post(&format!("{V3}/rooms/{}/leave", enc(&room)), &bob, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{left}");
    // After bob left: a new topic and a new display name of alice's in the room.
    send_state(
        &s,
        &alice,
        &room,
        "m.room.topic",
        "",
        json!({ "topic": "after-topic" }),
    )
    .await;
    send_state(
        &s,
        &alice,
        &room,
        "m.room.member",
        &alice.user_id,
        json!({ "membership": "join", "displayname": "Alice After" }),
    )
    .await;
    let leaks = |v: &Value| {
        let text = v.to_string();
        text.contains("after-topic") || text.contains("Alice After")
    };

    // Sync of the left room with an empty timeline: the state as of the leave.
    let filter = enc(r#"{"room":{"include_leave":true,"timeline":{"limit":0}}}"#);
    let (status, sync) = s.get(&format!("{V3}/sync?filter={filter}"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let state = &sync["rooms"]["leave"][&room]["state"]["events"];
    assert!(state.as_array().is_some_and(|e| !e.is_empty()), "{sync}");
    assert!(
        !leaks(state),
        "later state in the left room's sync: {state}"
    );

    // Lazily loaded members of /messages and /context: alice as she was when bob left.
    let lazy = enc(r#"{"lazy_load_members":true}"#);
    let (status, page) = s
        .get(
            &format!(
                "{V3}/rooms/{}/messages?dir=b&limit=20&filter={lazy}",
                enc(&room)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let members = page["state"].as_array().expect("lazy members");
    assert!(
        members
            .iter()
            .any(|m| m["state_key"] == alice.user_id.as_str()),
        "{page}"
    );
    assert!(
        !leaks(&page["state"]),
        "later member event in /messages: {page}"
    );
    let (status, ctx) = s
        .get(
            &format!(
                "{V3}/rooms/{}/context/{}?limit=2&filter={lazy}",
                enc(&room),
                enc(&before)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    assert!(
        !leaks(&ctx["state"]),
        "later member event in /context: {ctx}"
    );

    // Alice, still in the room, sees the new state.
    let (status, now) = s
        .get(
            &format!("{V3}/rooms/{}/state/m.room.topic/", enc(&room)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(now["topic"], json!("after-topic"));
}
