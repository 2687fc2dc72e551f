//! `/search` over room events: terms, keys, filters, order, paging, context, state, groups,
//! visibility.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

async fn say(s: &TestServer, u: &TestUser, room: &str, txn: &str, body: &str) -> String {
    let (status, sent) = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/{txn}", enc(room)),
            u,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    sent["event_id"].as_str().expect("event id").to_owned()
}

async fn search(s: &TestServer, u: &TestUser, criteria: Value, next: Option<&str>) -> Value {
    let path = match next {
        Some(n) => format!("{V3}/search?next_batch={n}"),
        None => format!("{V3}/search"),
    };
    let (status, body) = s
        .post(
            &path,
            u,
            json!({ "search_categories": { "room_events": criteria } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["search_categories"]["room_events"].clone()
}

fn result_ids(found: &Value) -> Vec<String> {
    found["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["result"]["event_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn search_finds_messages_in_the_users_rooms() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(
            &alice,
            json!({ "preset": "private_chat", "name": "Planning" }),
        )
        .await;
    let other = s
        .create_room(&bob, json!({ "preset": "private_chat" }))
        .await;
    s.invite_and_join(&alice, &bob, &room).await;
    let m1 = say(&s, &alice, &room, "1", "The Budget meeting is on Monday").await;
    say(&s, &alice, &room, "2", "lunch?").await;
    let m3 = say(&s, &bob, &room, "3", "budget budget: meeting moved").await;
    // Bob's own room: alice is not in it, so she never finds this.
    say(&s, &bob, &other, "4", "secret budget meeting").await;

    // Every term must match, case-insensitively; newest first with order_by recent.
    let found = search(
        &s,
        &alice,
        json!({ "search_term": "budget MEETING", "order_by": "recent" }),
        None,
    )
    .await;
    assert_eq!(result_ids(&found), vec![m3.clone(), m1.clone()], "{found}");
    assert_eq!(found["count"], json!(2));
    assert_eq!(found["highlights"], json!(["budget", "meeting"]));
    assert!(found.get("next_batch").is_none(), "{found}");
    // Rank: bob's message says "budget" twice.
    let found = search(&s, &alice, json!({ "search_term": "budget" }), None).await;
    assert_eq!(result_ids(&found), vec![m3.clone(), m1.clone()]);
    assert!(found["results"][0]["rank"].as_f64() > found["results"][1]["rank"].as_f64());

    // Keys: the room name is content.name of a state event.
    let found = search(
        &s,
        &alice,
        json!({ "search_term": "planning", "keys": ["content.name"] }),
        None,
    )
    .await;
    assert_eq!(
        found["results"][0]["result"]["type"],
        json!("m.room.name"),
        "{found}"
    );
    let found = search(
        &s,
        &alice,
        json!({ "search_term": "planning", "keys": ["content.body"] }),
        None,
    )
    .await;
    assert_eq!(found["results"], json!([]));

    // Filters: senders and rooms.
    let found = search(
        &s,
        &alice,
        json!({ "search_term": "budget", "filter": { "senders": [alice.user_id] } }),
        None,
    )
    .await;
    assert_eq!(result_ids(&found), vec![m1.clone()]);
    let found = search(
        &s,
        &bob,
        json!({ "search_term": "budget", "filter": { "rooms": [other] }, "order_by": "recent" }),
        None,
    )
    .await;
    assert_eq!(
        found["results"].as_array().map(Vec::len),
        Some(1),
        "{found}"
    );

    // Paging with filter.limit.
    let page1 = search(
        &s,
        &alice,
        json!({ "search_term": "budget", "order_by": "recent", "filter": { "limit": 1 } }),
        None,
    )
    .await;
    assert_eq!(result_ids(&page1), vec![m3.clone()]);
    let next = page1["next_batch"].as_str().expect("next_batch").to_owned();
    let page2 = search(
        &s,
        &alice,
        json!({ "search_term": "budget", "order_by": "recent", "filter": { "limit": 1 } }),
        Some(&next),
    )
    .await;
    assert_eq!(result_ids(&page2), vec![m1.clone()]);

    // Context, profiles, state and groups.
    let found = search(
        &s,
        &alice,
        json!({
            "search_term": "lunch",
            "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
            "include_state": true,
            "groupings": { "group_by": [{ "key": "room_id" }, { "key": "sender" }] },
        }),
        None,
    )
    .await;
    let first = &found["results"][0];
    assert_eq!(
        first["context"]["events_before"][0]["event_id"],
        json!(m1),
        "{found}"
    );
    assert_eq!(first["context"]["events_after"][0]["event_id"], json!(m3));
    assert!(first["context"]["start"].is_string() && first["context"]["end"].is_string());
    // Test users have no display names: the profiles are there, empty.
    assert_eq!(
        first["context"]["profile_info"][&alice.user_id],
        json!({}),
        "{found}"
    );
    assert_eq!(
        first["context"]["profile_info"][&bob.user_id],
        json!({}),
        "{found}"
    );
    assert!(found["state"][&room]
        .as_array()
        .expect("state")
        .iter()
        .any(|e| e["type"] == json!("m.room.name")));
    let lunch = first["result"]["event_id"].clone();
    assert_eq!(found["groups"]["room_id"][&room]["results"], json!([lunch]));
    assert_eq!(
        found["groups"]["sender"][&alice.user_id]["results"],
        json!([lunch])
    );

    // Errors.
    let got = s.post(&format!("{V3}/search"), &alice, json!({})).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .post(
            &format!("{V3}/search"),
            &alice,
            json!({ "search_categories": { "room_events": { "search_term": "  " } } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/search?next_batch=zz"),
            &alice,
            json!({ "search_categories": { "room_events": { "search_term": "x" } } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/search"),
            &alice,
            json!({ "search_categories": { "room_events": { "search_term": "x", "keys": ["content.nope"] } } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
}
