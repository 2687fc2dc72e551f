//! Spaces: `/hierarchy` (depth-first walk of `m.space.child`, visibility, paging, limits) and
//! `/room_summary`.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V1: &str = "/_matrix/client/v1";
const V3: &str = "/_matrix/client/v3";

async fn space(s: &TestServer, u: &TestUser, name: &str) -> String {
    s.create_room(
        u,
        json!({ "name": name, "preset": "public_chat", "creation_content": { "type": "m.space" } }),
    )
    .await
}

async fn add_child(s: &TestServer, u: &TestUser, parent: &str, child: &str, extra: Value) {
    let mut content = json!({ "via": [s.server_name()] });
    if let (Some(c), Some(e)) = (content.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let (status, body) = s
        .put(
            &format!(
                "{V3}/rooms/{}/state/m.space.child/{}",
                enc(parent),
                enc(child)
            ),
            u,
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn room_ids(body: &Value) -> Vec<String> {
    body["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .filter_map(|r| r["room_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn hierarchy_walks_the_space_tree() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let root = space(&s, &alice, "Company").await;
    let sub = space(&s, &alice, "Team").await;
    let public = s
        .create_room(&alice, json!({ "name": "Lobby", "preset": "public_chat" }))
        .await;
    let private = s
        .create_room(
            &alice,
            json!({ "name": "Secret", "preset": "private_chat" }),
        )
        .await;
    let deep = s
        .create_room(&alice, json!({ "name": "Deep", "preset": "public_chat" }))
        .await;
    add_child(&s, &alice, &root, &sub, json!({ "order": "b" })).await;
    add_child(
        &s,
        &alice,
        &root,
        &public,
        json!({ "order": "a", "suggested": true }),
    )
    .await;
    add_child(&s, &alice, &root, &private, json!({})).await;
    add_child(&s, &alice, &sub, &deep, json!({})).await;
    // A cycle does not loop.
    add_child(&s, &alice, &sub, &root, json!({})).await;

    let path = format!("{V1}/rooms/{}/hierarchy", enc(&root));
    let (status, body) = s.get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Depth first, children by `order`: root, Lobby ("a"), Team ("b"), Deep, then Secret.
    assert_eq!(
        room_ids(&body),
        vec![
            root.clone(),
            public.clone(),
            sub.clone(),
            deep.clone(),
            private.clone()
        ]
    );
    let first = &body["rooms"][0];
    assert_eq!(first["name"], json!("Company"));
    assert_eq!(first["room_type"], json!("m.space"));
    assert_eq!(first["join_rule"], json!("public"));
    assert_eq!(first["num_joined_members"], json!(1));
    assert_eq!(
        first["children_state"].as_array().map(Vec::len),
        Some(3),
        "{first}"
    );
    assert_eq!(first["children_state"][0]["type"], json!("m.space.child"));
    assert!(first["children_state"][0]["origin_server_ts"].is_u64());
    assert_eq!(body["rooms"][1]["children_state"], json!([]));

    // Bob may not see the private room (invite only, not a member) and it is left out.
    let (status, body) = s.get(&path, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        room_ids(&body),
        vec![root.clone(), public.clone(), sub.clone(), deep.clone()]
    );

    // max_depth and suggested_only.
    let (_, body) = s.get(&format!("{path}?max_depth=1"), &alice).await;
    assert_eq!(
        room_ids(&body),
        vec![root.clone(), public.clone(), sub.clone(), private.clone()]
    );
    let (_, body) = s.get(&format!("{path}?suggested_only=true"), &alice).await;
    assert_eq!(room_ids(&body), vec![root.clone(), public.clone()]);

    // Paging, and the parameters may not change while paging.
    let (_, page1) = s.get(&format!("{path}?limit=2"), &alice).await;
    assert_eq!(room_ids(&page1), vec![root.clone(), public.clone()]);
    let next = page1["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, page2) = s.get(&format!("{path}?limit=2&from={next}"), &alice).await;
    assert_eq!(room_ids(&page2), vec![sub.clone(), deep.clone()]);
    let next2 = page2["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, page3) = s.get(&format!("{path}?limit=2&from={next2}"), &alice).await;
    assert_eq!(room_ids(&page3), vec![private.clone()]);
    assert!(page3.get("next_batch").is_none(), "{page3}");
    let got = s
        .get(&format!("{path}?limit=2&from={next}&max_depth=1"), &alice)
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{path}?from=garbage"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    // A forged offset past any walk (its `offset + limit` overflowed: a panic in debug builds).
    let got = s
        .get(
            &format!("{path}?max_depth=1&from=h{}_1_0", u64::MAX),
            &alice,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{path}?limit=0"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{path}?suggested_only=maybe"), &alice).await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // A private root the user cannot see, an unknown room, no token.
    let got = s
        .get(&format!("{V1}/rooms/{}/hierarchy", enc(&private)), &bob)
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .get(
            &format!("{V1}/rooms/{}/hierarchy", enc("!nope:localhost")),
            &bob,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s.req(Method::GET, &path, None, None).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
}

#[tokio::test]
async fn room_summary_previews_rooms_one_may_see() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let public = s
        .create_room(
            &alice,
            json!({ "name": "Lobby", "topic": "hi", "preset": "public_chat",
                    "room_alias_name": "lobby" }),
        )
        .await;
    let private = s
        .create_room(
            &alice,
            json!({ "name": "Secret", "preset": "private_chat" }),
        )
        .await;

    let (status, body) = s
        .get(
            &format!(
                "{V1}/room_summary/{}",
                enc(&format!("#lobby:{}", s.server_name()))
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], json!(public));
    assert_eq!(body["name"], json!("Lobby"));
    assert_eq!(body["topic"], json!("hi"));
    assert_eq!(body["join_rule"], json!("public"));
    assert!(body["room_version"].is_string(), "{body}");
    assert!(body.get("membership").is_none(), "{body}");

    // Without a token, public rooms still preview.
    let (status, body) = s
        .req(
            Method::GET,
            &format!("{V1}/room_summary/{}", enc(&public)),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["num_joined_members"], json!(1));

    // The private room: its member sees it with membership; others get 404.
    let (status, body) = s
        .get(&format!("{V1}/room_summary/{}", enc(&private)), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["membership"], json!("join"));
    let got = s
        .get(&format!("{V1}/room_summary/{}", enc(&private)), &bob)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .req(
            Method::GET,
            &format!("{V1}/room_summary/{}", enc(&private)),
            None,
            None,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!("{V1}/room_summary/{}", enc("#missing:localhost")),
            &bob,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(&format!("{V1}/room_summary/{}", enc("garbage")), &bob)
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .req(
            Method::GET,
            &format!("{V1}/room_summary/{}", enc(&public)),
            Some("bad"),
            None,
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
}
