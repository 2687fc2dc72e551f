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
