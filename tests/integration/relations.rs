//! `/relations`: children of an event by relation type and event type, paginated both ways.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

async fn send(
    s: &TestServer,
    u: &TestUser,
    room: &str,
    kind: &str,
    txn: &str,
    content: Value,
) -> String {
    let (status, body) = s
        .put(
            &format!("{V3}/rooms/{}/send/{kind}/{txn}", enc(room)),
            u,
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event id").to_owned()
}

fn ids(body: &Value) -> Vec<String> {
    body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn relations_by_type_and_page() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let eve = s.user("eve").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    s.invite_and_join(&alice, &bob, &room).await;

    let parent = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "p",
        json!({ "msgtype": "m.text", "body": "root" }),
    )
    .await;
    let reaction = send(
        &s,
        &bob,
        &room,
        "m.reaction",
        "r",
        json!({
        "m.relates_to": { "rel_type": "m.annotation", "event_id": parent, "key": "+1" } }),
    )
    .await;
    let reply = send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "t",
        json!({ "msgtype": "m.text", "body": "in thread",
        "m.relates_to": { "rel_type": "m.thread", "event_id": parent } }),
    )
    .await;
    let edit = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "e",
        json!({ "msgtype": "m.text", "body": "* root!",
        "m.new_content": { "msgtype": "m.text", "body": "root!" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": parent } }),
    )
    .await;
    // Unrelated events are not children.
    send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "x",
        json!({ "msgtype": "m.text", "body": "other" }),
    )
    .await;

    let base = format!(
        "/_matrix/client/v1/rooms/{}/relations/{}",
        enc(&room),
        enc(&parent)
    );
    let got = s.get(&base, &bob).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        ids(&got.1),
        vec![edit.clone(), reply.clone(), reaction.clone()]
    );
    assert!(got.1.get("next_batch").is_none(), "{}", got.1);
    assert_eq!(
        got.1["chunk"][0]["content"]["m.new_content"]["body"],
        json!("root!")
    );

    let got = s.get(&format!("{base}/m.annotation"), &bob).await;
    assert_eq!(ids(&got.1), vec![reaction.clone()]);
    let got = s
        .get(&format!("{base}/m.thread/m.room.message"), &bob)
        .await;
    assert_eq!(ids(&got.1), vec![reply.clone()]);
    let got = s.get(&format!("{base}/m.thread/m.reaction"), &bob).await;
    assert_eq!(ids(&got.1), Vec::<String>::new());

    // One at a time, backwards and forwards, each child exactly once.
    for (dir, expected) in [
        ("b", vec![edit.clone(), reply.clone(), reaction.clone()]),
        ("f", vec![reaction.clone(), reply.clone(), edit.clone()]),
    ] {
        let mut seen = Vec::new();
        let mut from: Option<String> = None;
        for _ in 0..10 {
            let mut path = format!("{base}?limit=1&dir={dir}");
            if let Some(f) = &from {
                path.push_str(&format!("&from={}", enc(f)));
            }
            let got = s.get(&path, &bob).await;
            assert_eq!(got.0, StatusCode::OK, "{}", got.1);
            seen.extend(ids(&got.1));
            match got.1["next_batch"].as_str() {
                Some(n) => from = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, expected, "dir {dir}");
    }

    // A redacted child loses its relation.
    let got = s
        .put(
            &format!("{V3}/rooms/{}/redact/{}/red1", enc(&room), enc(&reaction)),
            &bob,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = s.get(&base, &bob).await;
    assert_eq!(ids(&got.1), vec![edit.clone(), reply.clone()]);

    // Errors: a stranger sees nothing of a private room; unknown parents; bad parameters.
    let got = s.get(&base, &eve).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!(
                "/_matrix/client/v1/rooms/{}/relations/{}",
                enc(&room),
                enc("$nosuch")
            ),
            &bob,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s.get(&format!("{base}?dir=sideways"), &bob).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{base}?from=nonsense"), &bob).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.req(reqwest::Method::GET, &base, None, None).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
}

fn thread_reply(root: &str, body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body,
            "m.relates_to": { "rel_type": "m.thread", "event_id": root } })
}

#[tokio::test]
async fn aggregations_are_bundled_into_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    s.invite_and_join(&alice, &bob, &room).await;
    let msg = json!({ "msgtype": "m.text", "body": "original" });
    let root = send(&s, &alice, &room, "m.room.message", "r", msg).await;

    // An edit by the sender counts; one by somebody else does not.
    let edit = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "e1",
        json!({
            "msgtype": "m.text", "body": "* edited",
            "m.new_content": { "msgtype": "m.text", "body": "edited" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": root },
        }),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "e2",
        json!({
            "msgtype": "m.text", "body": "* hijack",
            "m.new_content": { "msgtype": "m.text", "body": "hijack" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": root },
        }),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "t1",
        thread_reply(&root, "one"),
    )
    .await;
    let latest = send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "t2",
        thread_reply(&root, "two"),
    )
    .await;
    let reference = send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "ref",
        json!({
            "msgtype": "m.text", "body": "see above",
            "m.relates_to": { "rel_type": "m.reference", "event_id": root },
        }),
    )
    .await;

    let (status, event) = s
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&root)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{event}");
    let rel = &event["unsigned"]["m.relations"];
    assert_eq!(rel["m.replace"]["event_id"], json!(edit), "{event}");
    // The server no longer applies edits to the original's content.
    assert_eq!(event["content"]["body"], json!("original"));
    assert_eq!(rel["m.thread"]["count"], json!(2), "{event}");
    assert_eq!(rel["m.thread"]["latest_event"]["event_id"], json!(latest));
    assert_eq!(rel["m.thread"]["current_user_participated"], json!(true));
    assert_eq!(
        rel["m.reference"]["chunk"],
        json!([{ "event_id": reference }])
    );

    // The same bundle arrives through /sync and /messages.
    let (_, synced) = s.get(&format!("{V3}/sync"), &bob).await;
    let events = synced["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline")
        .clone();
    let (_, page) = s
        .get(
            &format!("{V3}/rooms/{}/messages?dir=b&limit=50", enc(&room)),
            &bob,
        )
        .await;
    let chunk = page["chunk"].as_array().expect("chunk").clone();
    for list in [events, chunk] {
        let found = list
            .iter()
            .find(|e| e["event_id"] == json!(root))
            .expect("root listed");
        assert_eq!(
            found["unsigned"]["m.relations"]["m.thread"]["count"],
            json!(2),
            "{found}"
        );
        assert_eq!(
            found["unsigned"]["m.relations"]["m.replace"]["event_id"],
            json!(edit)
        );
    }

    // A redacted event has no aggregations.
    let (status, _) = s
        .put(
            &format!("{V3}/rooms/{}/redact/{}/x1", enc(&room), enc(&root)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, event) = s
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&root)),
            &alice,
        )
        .await;
    assert!(event["unsigned"].get("m.relations").is_none(), "{event}");
}

#[tokio::test]
async fn threads_list_by_latest_activity() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let eve = s.user("eve").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    s.invite_and_join(&alice, &bob, &room).await;
    let msg = |b: &str| json!({ "msgtype": "m.text", "body": b });
    let first = send(&s, &alice, &room, "m.room.message", "a", msg("first")).await;
    let second = send(&s, &bob, &room, "m.room.message", "b", msg("second")).await;
    send(&s, &bob, &room, "m.room.message", "no-thread", msg("plain")).await;
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "r1",
        thread_reply(&first, "x"),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "r2",
        thread_reply(&second, "y"),
    )
    .await;
    // A new reply moves the first thread back to the top.
    send(
        &s,
        &bob,
        &room,
        "m.room.message",
        "r3",
        thread_reply(&first, "z"),
    )
    .await;

    let path = format!("/_matrix/client/v1/rooms/{}/threads", enc(&room));
    let (status, body) = s.get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), vec![first.clone(), second.clone()]);
    assert_eq!(
        body["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"],
        json!(2)
    );
    assert!(body.get("next_batch").is_none(), "{body}");

    // Paging.
    let (_, page1) = s.get(&format!("{path}?limit=1"), &alice).await;
    assert_eq!(ids(&page1), vec![first.clone()]);
    let next = page1["next_batch"].as_str().expect("next_batch");
    let (_, page2) = s.get(&format!("{path}?limit=1&from={next}"), &alice).await;
    assert_eq!(ids(&page2), vec![second.clone()]);

    // Alice took part in the first thread only (she sent its root).
    let (_, mine) = s.get(&format!("{path}?include=participated"), &alice).await;
    assert_eq!(ids(&mine), vec![first.clone()]);

    // Errors: bad include, bad token, a stranger.
    let got = s.get(&format!("{path}?include=some"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{path}?from=nope"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&path, &eve).await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn relations_recurse_into_children_of_children() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let msg = json!({ "msgtype": "m.text", "body": "root" });
    let root = send(&s, &alice, &room, "m.room.message", "r", msg).await;
    let reply = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "t",
        thread_reply(&root, "reply"),
    )
    .await;
    let reaction = send(
        &s,
        &alice,
        &room,
        "m.reaction",
        "x",
        json!({
            "m.relates_to": { "rel_type": "m.annotation", "event_id": reply, "key": "👍" },
        }),
    )
    .await;
    let base = format!(
        "/_matrix/client/v1/rooms/{}/relations/{}",
        enc(&room),
        enc(&root)
    );
    let (status, flat) = s.get(&base, &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&flat), vec![reply.clone()]);
    assert!(flat.get("recursion_depth").is_none());
    let (status, deep) = s.get(&format!("{base}?recurse=true"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{deep}");
    assert_eq!(ids(&deep), vec![reaction.clone(), reply.clone()]);
    assert_eq!(deep["recursion_depth"], json!(3));
    let (_, annotations) = s
        .get(&format!("{base}/m.annotation?recurse=true"), &alice)
        .await;
    assert_eq!(ids(&annotations), vec![reaction.clone()]);
    let (_, page) = s.get(&format!("{base}?recurse=true&limit=1"), &alice).await;
    assert_eq!(ids(&page), vec![reaction.clone()]);
    let next = page["next_batch"].as_str().expect("next_batch");
    let (_, page2) = s
        .get(&format!("{base}?recurse=true&limit=1&from={next}"), &alice)
        .await;
    assert_eq!(ids(&page2), vec![reply]);
    let got = s.get(&format!("{base}?recurse=yes"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
}
