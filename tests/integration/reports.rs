//! Reporting rooms, events and users, and OpenID tokens.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{assert_err, enc, TestServer};

const V3: &str = "/_matrix/client/v3";

#[tokio::test]
async fn reports_are_kept_for_admins() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, sent) = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/t1", enc(&room)),
            &alice,
            json!({ "msgtype": "m.text", "body": "spam" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let event = sent["event_id"].as_str().expect("event id").to_owned();
    let event_path = format!("{V3}/rooms/{}/report/{}", enc(&room), enc(&event));

    // Bob is not in the room: the event "does not exist" for him.
    let got = s.post(&event_path, &bob, json!({ "reason": "spam" })).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    s.join(&bob, &room).await;
    let got = s
        .post(
            &event_path,
            &bob,
            json!({ "reason": "spam", "score": -100 }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({}));
    let got = s.post(&event_path, &bob, json!({ "score": 5 })).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.post(&event_path, &bob, json!({ "reason": 7 })).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .post(
            &format!("{V3}/rooms/{}/report/{}", enc(&room), enc("$nosuch")),
            &bob,
            json!({}),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // Rooms: no need to be joined; unknown rooms are 404.
    let carol = s.user("carol").await;
    let got = s
        .post(
            &format!("{V3}/rooms/{}/report", enc(&room)),
            &carol,
            json!({ "reason": "bad room" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = s
        .post(
            &format!("{V3}/rooms/{}/report", enc("!nosuch:localhost")),
            &carol,
            json!({}),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // Users.
    let got = s
        .post(
            &format!("{V3}/users/{}/report", enc(&alice.user_id)),
            &carol,
            json!({ "reason": "rude" }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = s
        .post(
            &format!("{V3}/users/{}/report", enc("@ghost:localhost")),
            &carol,
            json!({}),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let reports = s.services().reports.list(100).expect("reports");
    let kinds: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| (r.kind.as_str(), r.reason.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        kinds,
        vec![("event", "spam"), ("room", "bad room"), ("user", "rude")]
    );
    assert_eq!(reports[0].score, Some(-100));
    assert_eq!(reports[0].event_id.as_deref(), Some(event.as_str()));
    assert_eq!(reports[2].reporter, carol.user_id);

    let got = s
        .req(
            reqwest::Method::POST,
            &format!("{V3}/rooms/{}/report", enc(&room)),
            None,
            Some(json!({})),
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
}

#[tokio::test]
async fn openid_tokens() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let path = format!("{V3}/user/{}/openid/request_token", enc(&alice.user_id));
    let got = s.post(&path, &alice, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["token_type"], json!("Bearer"));
    assert_eq!(got.1["matrix_server_name"], json!("localhost"));
    assert_eq!(got.1["expires_in"], json!(3600));
    let token = got.1["access_token"].as_str().expect("token").to_owned();
    assert!(token.len() >= 32);
    assert_eq!(
        s.services().reports.openid_user(&token).expect("lookup"),
        Some(alice.user_id.clone())
    );
    assert_eq!(
        s.services().reports.openid_user("wrong").expect("lookup"),
        None
    );
    let got = s.post(&path, &bob, json!({})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
}
