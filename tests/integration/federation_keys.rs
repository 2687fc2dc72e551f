//! The server's keys (`/_matrix/key/v2/server`) and version, and key rotation.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use ruma::{
    serde::Base64,
    signatures::{verify_json, PublicKeyMap},
    CanonicalJsonObject,
};
use serde_json::{json, Value};

use crate::common::TestServer;

/// Check the document's signature by `server` with the key it publishes as `key_id`.
fn verify(doc: &Value, server: &str, key_id: &str) {
    let key = doc["verify_keys"][key_id]["key"]
        .as_str()
        .expect("public key");
    let mut keys = BTreeMap::new();
    keys.insert(key_id.to_owned(), Base64::parse(key).expect("base64 key"));
    let mut map = PublicKeyMap::new();
    map.insert(server.to_owned(), keys);
    let object: CanonicalJsonObject = serde_json::from_value(doc.clone()).expect("canonical");
    verify_json(&map, &object).expect("the key document is signed by its key");
}

#[tokio::test]
async fn server_keys_are_signed_and_survive_rotation() {
    let mut s = TestServer::start().await;
    let server = s.server_name();
    let (status, doc) = s
        .req(Method::GET, "/_matrix/key/v2/server", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["server_name"], json!(server));
    let keys = doc["verify_keys"].as_object().expect("verify_keys");
    assert_eq!(keys.len(), 1, "{doc}");
    let first_id = keys.keys().next().expect("key id").clone();
    assert!(first_id.starts_with("ed25519:"), "{first_id}");
    assert_eq!(doc["old_verify_keys"], json!({}));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(doc["valid_until_ts"].as_u64().expect("valid_until_ts") > now);
    verify(&doc, &server, &first_id);
    // The deprecated form with a key id answers the same keys.
    let (status, again) = s
        .req(
            Method::GET,
            &format!("/_matrix/key/v2/server/{first_id}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["verify_keys"], doc["verify_keys"]);

    // The key survives a restart; a rotation (offline, as `hafen key rotate`) makes a new one and
    // publishes the old one as expired.
    s.restart().await;
    let (_, same) = s
        .req(Method::GET, "/_matrix/key/v2/server", None, None)
        .await;
    assert_eq!(same["verify_keys"], doc["verify_keys"]);
    s.restart_after(|config| {
        let storage = hafen::storage::Storage::open(&config.database_path, 8, true).expect("db");
        hafen::service::globals::SigningKey::rotate(&storage).expect("rotates");
    })
    .await;
    let (status, rotated) = s
        .req(Method::GET, "/_matrix/key/v2/server", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let new_id = rotated["verify_keys"]
        .as_object()
        .expect("verify_keys")
        .keys()
        .next()
        .expect("key id")
        .clone();
    assert_ne!(new_id, first_id);
    verify(&rotated, &server, &new_id);
    let old = &rotated["old_verify_keys"][&first_id];
    assert_eq!(
        old["key"], doc["verify_keys"][&first_id]["key"],
        "{rotated}"
    );
    assert!(old["expired_ts"].as_u64().expect("expired_ts") >= now);

    let (status, version) = s
        .req(Method::GET, "/_matrix/federation/v1/version", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version["server"]["name"], json!("hafen"));
    assert!(version["server"]["version"].is_string());
}
