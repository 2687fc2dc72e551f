//! `/voip/turnServer` (TURN credentials from the config) and the third-party network lookups
//! (no bridges: nothing to find).

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{assert_err, TestServer};

const V3: &str = "/_matrix/client/v3";

#[tokio::test]
async fn turn_credentials() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    // No TURN server configured: an empty answer.
    let (status, body) = s.get(&format!("{V3}/voip/turnServer"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({}));
    let got = s
        .req(Method::GET, &format!("{V3}/voip/turnServer"), None, None)
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");

    // A shared secret: time-limited credentials the TURN server can check.
    let s = TestServer::start_with(|c| {
        c.turn_uris = vec!["turn:turn.example.org:3478?transport=udp".into()];
        c.turn_secret = Some("s3cret".into());
        c.turn_ttl = 600;
    })
    .await;
    let alice = s.user("alice").await;
    let (status, body) = s.get(&format!("{V3}/voip/turnServer"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["uris"],
        json!(["turn:turn.example.org:3478?transport=udp"])
    );
    assert_eq!(body["ttl"], json!(600));
    let username = body["username"].as_str().expect("username");
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    assert_eq!(user, alice.user_id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expiry: u64 = expiry.parse().expect("expiry");
    assert!(expiry > now && expiry <= now + 601, "{expiry} vs {now}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").expect("key");
    mac.update(username.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(body["password"], json!(expected));

    // Fixed credentials.
    let s = TestServer::start_with(|c| {
        c.turn_uris = vec!["turns:turn.example.org:5349".into()];
        c.turn_username = Some("user".into());
        c.turn_password = Some("pass".into());
    })
    .await;
    let alice = s.user("alice").await;
    let (_, body) = s.get(&format!("{V3}/voip/turnServer"), &alice).await;
    assert_eq!(
        body,
        json!({ "username": "user", "password": "pass", "uris": ["turns:turn.example.org:5349"], "ttl": 86400 })
    );
}

#[tokio::test]
async fn third_party_lookups_find_nothing() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (status, body) = s.get(&format!("{V3}/thirdparty/protocols"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({}));
    for path in ["protocol/irc", "location/irc?searchFields=x", "user/irc"] {
        let got = s.get(&format!("{V3}/thirdparty/{path}"), &alice).await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    for path in [
        "location?alias=%23a:localhost",
        "user?userid=%40a:localhost",
    ] {
        let (status, body) = s.get(&format!("{V3}/thirdparty/{path}"), &alice).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!([]));
    }
    let got = s
        .req(
            Method::GET,
            &format!("{V3}/thirdparty/protocols"),
            None,
            None,
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
}
