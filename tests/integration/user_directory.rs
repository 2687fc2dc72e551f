//! `/user_directory/search`: who may be found, matching, limits, errors.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{assert_err, enc, TestServer};

const V3: &str = "/_matrix/client/v3";

/// The user directory finds room mates and members of public rooms, nobody else.
#[tokio::test]
async fn user_directory_search() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let dave = s.user("dave").await;
    // alice and bob share a private room; carol is in a public room; dave is in nothing.
    let private = s
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    s.invite_and_join(&alice, &bob, &private).await;
    s.create_room(&carol, json!({ "preset": "public_chat" }))
        .await;
    let got = s
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&bob.user_id)),
            &bob,
            json!({ "displayname": "Bobby Tables" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);

    let search = |term: &str, limit: Option<u64>| {
        let mut body = json!({ "search_term": term });
        if let Some(l) = limit {
            body["limit"] = json!(l);
        }
        body
    };
    let path = format!("{V3}/user_directory/search");
    // By display name, case-insensitively.
    let got = s.post(&path, &alice, search("TABLES", None)).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        got.1,
        json!({ "results": [{ "user_id": bob.user_id, "display_name": "Bobby Tables" }], "limited": false })
    );
    // Everybody alice may see: herself, bob (shared room), carol (public room); not dave.
    let got = s.post(&path, &alice, search("localhost", None)).await;
    let ids: Vec<&str> = got.1["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["user_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![
            alice.user_id.as_str(),
            bob.user_id.as_str(),
            carol.user_id.as_str()
        ]
    );
    let got = s.post(&path, &alice, search("dave", None)).await;
    assert_eq!(got.1, json!({ "results": [], "limited": false }));
    // Dave sees carol (public room) but not the private room's members.
    let got = s.post(&path, &dave, search("bob", None)).await;
    assert_eq!(got.1["results"], json!([]));
    let got = s.post(&path, &dave, search("carol", None)).await;
    assert_eq!(got.1["results"][0]["user_id"], json!(carol.user_id));
    // Limits.
    let got = s.post(&path, &alice, search("localhost", Some(2))).await;
    assert_eq!(got.1["results"].as_array().map(Vec::len), Some(2));
    assert_eq!(got.1["limited"], json!(true));
    // Errors.
    let got = s.post(&path, &alice, json!({})).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s.post(&path, &alice, json!({ "search_term": 5 })).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .post(&path, &alice, json!({ "search_term": "a", "limit": -1 }))
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
}

#[tokio::test]
async fn mutual_rooms_lists_rooms_both_joined() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let shared = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &shared).await;
    let _alone = s.create_room(&alice, json!({})).await;
    let path = |u: &str| format!("/_matrix/client/v1/mutual_rooms?user_id={}", enc(u));
    let (status, body) = s.get(&path(&bob.user_id), &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "joined": [shared], "count": 1 }));
    let (_, body) = s.get(&path("@nobody:localhost"), &alice).await;
    assert_eq!(body, json!({ "joined": [], "count": 0 }));
    let got = s.get(&path(&alice.user_id), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&path("not-a-user"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get("/_matrix/client/v1/mutual_rooms", &alice).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s
        .get(&format!("{}&from=zz", path(&bob.user_id)), &alice)
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
}
