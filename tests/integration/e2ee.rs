//! End-to-end encryption over HTTP: key upload, query, claim (one-time, then fallback), key
//! changes in sync and `/keys/changes`, to-device messages, cross-signing with real ed25519
//! signatures, and server-side key backup, each with its errors.

use reqwest::{Method, StatusCode};
use ruma::{
    serde::Base64,
    signatures::{sign_json, Ed25519KeyPair},
    CanonicalJsonObject,
};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

/// An ed25519 key for signing test keys, named by its public key as cross-signing keys are.
pub(crate) struct TestKey {
    pub(crate) pair: Ed25519KeyPair,
    pub(crate) public: String,
}

pub(crate) fn new_key() -> TestKey {
    let doc = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&doc, "probe".into()).expect("key parses");
    let public =
        Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(probe.public_key().to_vec()).encode();
    let pair = Ed25519KeyPair::from_der(&doc, public.clone()).expect("key parses");
    TestKey { pair, public }
}

/// Sign `value` as `entity` with `key` (the signature is named `ed25519:<public>`).
pub(crate) fn sign(entity: &str, key: &TestKey, value: &Value) -> Value {
    let mut obj: CanonicalJsonObject =
        serde_json::from_value(value.clone()).expect("canonical JSON");
    sign_json(entity, &key.pair, &mut obj).expect("signs");
    serde_json::to_value(obj).expect("serializes")
}

pub(crate) fn device_keys(u: &TestUser, curve: &str) -> Value {
    json!({
        "user_id": u.user_id,
        "device_id": u.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", u.device_id): curve,
            format!("ed25519:{}", u.device_id): "ed25519-public-key",
        },
        "signatures": { u.user_id.clone(): { format!("ed25519:{}", u.device_id): "sig" } },
    })
}

pub(crate) fn signed_key(u: &TestUser, key: &str) -> Value {
    json!({ "key": key, "signatures": { u.user_id.clone(): { format!("ed25519:{}", u.device_id): "sig" } } })
}

async fn sync(s: &TestServer, u: &TestUser, since: Option<&str>) -> Value {
    let path = match since {
        Some(t) => format!("{V3}/sync?timeout=0&since={}", enc(t)),
        None => format!("{V3}/sync?timeout=0"),
    };
    let (status, body) = s.get(&path, u).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The `next_batch` of an initial sync: "from now on".
async fn sync_token(s: &TestServer, u: &TestUser) -> String {
    sync(s, u, None).await["next_batch"]
        .as_str()
        .expect("token")
        .to_owned()
}

#[tokio::test]
async fn upload_query_and_claim_keys() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;

    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({
                "device_keys": device_keys(&alice, "curve-a"),
                "one_time_keys": {
                    "signed_curve25519:AAAA": signed_key(&alice, "otk-1"),
                    "signed_curve25519:AAAB": signed_key(&alice, "otk-2"),
                },
                "fallback_keys": {
                    "signed_curve25519:FFFF": { "key": "fallback-1", "fallback": true,
                        "signatures": { alice.user_id.clone(): { format!("ed25519:{}", alice.device_id): "sig" } } },
                },
            }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        got.1,
        json!({ "one_time_key_counts": { "signed_curve25519": 2 } })
    );

    // Re-uploading the same key is harmless; the same id with other content is refused.
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "one_time_keys": { "signed_curve25519:AAAA": signed_key(&alice, "otk-1") } }),
        )
        .await;
    assert_eq!(got.1["one_time_key_counts"]["signed_curve25519"], json!(2));
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "one_time_keys": { "signed_curve25519:AAAA": signed_key(&alice, "other") } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // Sync reports the counts and the unused fallback key.
    let body = sync(&s, &alice, None).await;
    assert_eq!(
        body["device_one_time_keys_count"]["signed_curve25519"],
        json!(2)
    );
    assert_eq!(
        body["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );

    // Query: bob sees alice's device with its display name; asking for one device works.
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &bob,
            json!({ "device_keys": { alice.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let dk = &got.1["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(
        dk["keys"][format!("curve25519:{}", alice.device_id)],
        json!("curve-a")
    );
    assert_eq!(got.1["failures"], json!({}));
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &bob,
            json!({ "device_keys": { alice.user_id.clone(): ["NOSUCHDEVICE"] } }),
        )
        .await;
    assert_eq!(got.1["device_keys"][&alice.user_id], json!({}));

    // Claim: two one-time keys, then the fallback key (again and again), never twice the same.
    let claim = json!({ "one_time_keys": { alice.user_id.clone(): { alice.device_id.clone(): "signed_curve25519" } } });
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let got = s
            .post(&format!("{V3}/keys/claim"), &bob, claim.clone())
            .await;
        assert_eq!(got.0, StatusCode::OK, "{}", got.1);
        let keys = got.1["one_time_keys"][&alice.user_id][&alice.device_id]
            .as_object()
            .expect("a key")
            .clone();
        assert_eq!(keys.len(), 1);
        let (id, key) = keys.into_iter().next().expect("one key");
        claimed.push((id, key["key"].as_str().unwrap_or_default().to_owned()));
    }
    assert_eq!(claimed[0].1, "otk-1");
    assert_eq!(claimed[1].1, "otk-2");
    assert_eq!(
        claimed[2],
        ("signed_curve25519:FFFF".to_owned(), "fallback-1".to_owned())
    );
    assert_eq!(claimed[3], claimed[2]);
    let body = sync(&s, &alice, None).await;
    assert_eq!(
        body["device_one_time_keys_count"]["signed_curve25519"],
        json!(0)
    );
    assert_eq!(body["device_unused_fallback_key_types"], json!([]));

    // A device without keys: nothing, no error.
    let got = s
        .post(
            &format!("{V3}/keys/claim"),
            &alice,
            json!({ "one_time_keys": { bob.user_id.clone(): { bob.device_id.clone(): "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["one_time_keys"], json!({}));
}

#[tokio::test]
async fn key_upload_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let got = s
        .req(
            Method::POST,
            &format!("{V3}/keys/upload"),
            None,
            Some(json!({})),
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = s
        .req_raw(
            Method::POST,
            &format!("{V3}/keys/upload"),
            Some(&alice.token),
            b"{not json",
        )
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    // Someone else's device keys.
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "device_keys": device_keys(&bob, "x") }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "one_time_keys": { "no-algorithm": "k" } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "device_keys": "not an object" }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    // Fallback keys for at most 16 algorithms per device.
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("alg{i}:K"), json!("k"))).collect();
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "fallback_keys": many }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.post(&format!("{V3}/keys/query"), &alice, json!({})).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &alice,
            json!({ "device_keys": { "not-a-user": [] } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.get(&format!("{V3}/keys/changes?from=s0"), &alice).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    // Remote users are reported as failures, not errors.
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &alice,
            json!({ "device_keys": { "@carol:remote.example": [] } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert!(got.1["failures"]["remote.example"].is_object(), "{}", got.1);
}

#[tokio::test]
async fn device_list_changes_reach_room_mates() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &room).await;
    let since = sync_token(&s, &bob).await;

    // Alice's new device keys: bob (sharing a room) hears of it, carol (not) does not.
    let carol_since = sync_token(&s, &carol).await;
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "device_keys": device_keys(&alice, "curve-a") }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let body = sync(&s, &bob, Some(&since)).await;
    assert_eq!(
        body["device_lists"]["changed"],
        json!([alice.user_id]),
        "{body}"
    );
    let bob_next = body["next_batch"].as_str().expect("token").to_owned();
    let body = sync(&s, &carol, Some(&carol_since)).await;
    assert_eq!(body["device_lists"]["changed"], json!([]), "{body}");

    let got = s
        .get(
            &format!(
                "{V3}/keys/changes?from={}&to={}",
                enc(&since),
                enc(&bob_next)
            ),
            &bob,
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({ "changed": [alice.user_id], "left": [] }));

    // Carol joins: bob must now track her devices; when she leaves again, bob may forget them.
    let bob_since = sync_token(&s, &bob).await;
    let got = s
        .post(
            &format!("{V3}/rooms/{}/join", enc(&room)),
            &carol,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let body = sync(&s, &bob, Some(&bob_since)).await;
    assert_eq!(
        body["device_lists"]["changed"],
        json!([carol.user_id]),
        "{body}"
    );
    let bob_since = body["next_batch"].as_str().expect("token").to_owned();
    // Carol herself learns about everybody in the room she joined.
    let body = sync(&s, &carol, Some(&carol_since)).await;
    let mut changed: Vec<String> =
        serde_json::from_value(body["device_lists"]["changed"].clone()).expect("list");
    changed.sort();
    assert_eq!(
        changed,
        vec![alice.user_id.clone(), bob.user_id.clone()],
        "{body}"
    );

    let got = s
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &carol,
            json!({}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let body = sync(&s, &bob, Some(&bob_since)).await;
    assert_eq!(
        body["device_lists"]["left"],
        json!([carol.user_id]),
        "{body}"
    );
    assert_eq!(body["device_lists"]["changed"], json!([]), "{body}");
}

#[tokio::test]
async fn to_device_messages_are_delivered_once() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let since = sync_token(&s, &bob).await;
    let msg = json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": 1 } } } });
    let path = format!("{V3}/sendToDevice/m.test/txn1");
    let got = s.put(&path, &alice, msg.clone()).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({}));
    // The same transaction again: acknowledged, not delivered twice.
    let got = s.put(&path, &alice, msg).await;
    assert_eq!(got.0, StatusCode::OK);

    let body = sync(&s, &bob, Some(&since)).await;
    assert_eq!(
        body["to_device"]["events"],
        json!([{ "sender": alice.user_id, "type": "m.test", "content": { "n": 1 } }]),
        "{body}"
    );
    // The same `since` again (a lost response): delivered again.
    let again = sync(&s, &bob, Some(&since)).await;
    assert_eq!(
        again["to_device"]["events"].as_array().map(Vec::len),
        Some(1)
    );
    // Syncing on from the new token acknowledges it: gone.
    let next = body["next_batch"].as_str().expect("token").to_owned();
    let body = sync(&s, &bob, Some(&next)).await;
    assert_eq!(body["to_device"]["events"], json!([]), "{body}");

    // `*` reaches every device of the user.
    let bob2 = {
        let services = s.services();
        let user = ruma::UserId::parse(bob.user_id.as_str()).expect("user id");
        let session = services
            .accounts
            .create_session(&user, None, None, false)
            .expect("second device");
        TestUser {
            user_id: bob.user_id.clone(),
            device_id: session.device_id.to_string(),
            token: session.access_token,
        }
    };
    let got = s
        .put(
            &format!("{V3}/sendToDevice/m.test/txn2"),
            &alice,
            json!({ "messages": { bob.user_id.clone(): { "*": { "all": true } } } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    for u in [&bob, &bob2] {
        let body = sync(&s, u, None).await;
        let events = body["to_device"]["events"].as_array().expect("events");
        assert!(
            events
                .iter()
                .any(|e| e["content"] == json!({ "all": true })),
            "{body}"
        );
    }

    // More than one response carries: the rest follow, each message exactly once.
    let carol = s.user("carol").await;
    let since = sync_token(&s, &carol).await;
    for i in 0..130 {
        let got = s
            .put(
                &format!("{V3}/sendToDevice/m.test/bulk{i}"),
                &alice,
                json!({ "messages": { carol.user_id.clone(): { carol.device_id.clone(): { "i": i } } } }),
            )
            .await;
        assert_eq!(got.0, StatusCode::OK);
    }
    let mut token = since;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let body = sync(&s, &carol, Some(&token)).await;
        for e in body["to_device"]["events"].as_array().expect("events") {
            seen.push(e["content"]["i"].as_i64().expect("i"));
        }
        token = body["next_batch"].as_str().expect("token").to_owned();
    }
    assert_eq!(seen, (0..130).collect::<Vec<i64>>());

    let got = s
        .put(
            &format!("{V3}/sendToDevice/m.test/bad"),
            &alice,
            json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): "not an object" } } }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(&format!("{V3}/sendToDevice/m.test/none"), &alice, json!({}))
        .await;
    assert_err(&got, 400, "M_MISSING_PARAM");
}

/// Cross-signing keys signed for real, checked by the server.
#[tokio::test]
async fn cross_signing_and_signatures() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let (master, self_signing, user_signing) = (new_key(), new_key(), new_key());
    let cs_key = |k: &TestKey, usage: &str| {
        json!({
            "user_id": alice.user_id,
            "usage": [usage],
            "keys": { format!("ed25519:{}", k.public): k.public },
        })
    };
    let master_key = cs_key(&master, "master");
    let ssk = sign(
        &alice.user_id,
        &master,
        &cs_key(&self_signing, "self_signing"),
    );
    let usk = sign(
        &alice.user_id,
        &master,
        &cs_key(&user_signing, "user_signing"),
    );

    // A self-signing key not signed by the master key is refused.
    let unsigned_ssk = cs_key(&self_signing, "self_signing");
    let got = s
        .post(
            &format!("{V3}/keys/device_signing/upload"),
            &alice,
            json!({ "master_key": master_key, "self_signing_key": unsigned_ssk }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_SIGNATURE");

    // The first upload needs no user-interactive auth.
    let upload =
        json!({ "master_key": master_key, "self_signing_key": ssk, "user_signing_key": usk });
    let got = s
        .post(
            &format!("{V3}/keys/device_signing/upload"),
            &alice,
            upload.clone(),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({}));
    // The same keys again: still no auth needed.
    let got = s
        .post(&format!("{V3}/keys/device_signing/upload"), &alice, upload)
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // New keys: auth required (401 with flows), then accepted with the password.
    let master2 = new_key();
    let replace = json!({ "master_key": {
        "user_id": alice.user_id, "usage": ["master"],
        "keys": { format!("ed25519:{}", master2.public): master2.public } } });
    let got = s
        .post(
            &format!("{V3}/keys/device_signing/upload"),
            &alice,
            replace.clone(),
        )
        .await;
    assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{}", got.1);
    assert_eq!(got.1["flows"], json!([{ "stages": ["m.login.password"] }]));
    let session = got.1["session"].as_str().expect("session").to_owned();

    // Meanwhile, with the first keys in place: sign alice's device with the self-signing key.
    let dk = device_keys(&alice, "curve-a");
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({ "device_keys": dk }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let signed_dk = sign(&alice.user_id, &self_signing, &dk);
    let got = s
        .post(
            &format!("{V3}/keys/signatures/upload"),
            &alice,
            json!({ alice.user_id.clone(): { alice.device_id.clone(): signed_dk } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({ "failures": {} }));
    // A signature by a wrong key is reported per key.
    let forged = sign(&alice.user_id, &new_key(), &dk);
    let mut forged = forged;
    let sigs = forged["signatures"][&alice.user_id]
        .as_object()
        .expect("sigs")
        .clone();
    let forged_sig = sigs
        .iter()
        .find(|(k, _)| !k.ends_with(&alice.device_id))
        .map(|(_, v)| v.clone())
        .expect("forged signature");
    forged["signatures"][&alice.user_id] =
        json!({ format!("ed25519:{}", self_signing.public): forged_sig });
    let got = s
        .post(
            &format!("{V3}/keys/signatures/upload"),
            &alice,
            json!({ alice.user_id.clone(): { alice.device_id.clone(): forged } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(
        got.1["failures"][&alice.user_id][&alice.device_id]["errcode"],
        json!("M_INVALID_SIGNATURE"),
        "{}",
        got.1
    );

    // Bob sees alice's master and self-signing keys and the device signature; not her
    // user-signing key, which only she sees.
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &bob,
            json!({ "device_keys": { alice.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(
        got.1["master_keys"][&alice.user_id]["keys"],
        json!({ format!("ed25519:{}", master.public): master.public })
    );
    assert!(
        got.1["self_signing_keys"][&alice.user_id].is_object(),
        "{}",
        got.1
    );
    assert_eq!(got.1["user_signing_keys"], json!({}));
    let device_sigs =
        &got.1["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id];
    assert!(
        device_sigs
            .get(format!("ed25519:{}", self_signing.public))
            .is_some(),
        "{}",
        got.1
    );
    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &alice,
            json!({ "device_keys": { alice.user_id.clone(): [] } }),
        )
        .await;
    assert!(
        got.1["user_signing_keys"][&alice.user_id].is_object(),
        "{}",
        got.1
    );

    // Finish the replacement with the password.
    let mut replace = replace;
    replace["auth"] = json!({
        "type": "m.login.password", "session": session,
        "identifier": { "type": "m.id.user", "user": "alice" }, "password": "password",
    });
    let got = s
        .post(&format!("{V3}/keys/device_signing/upload"), &alice, replace)
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let got = s.get(&format!("{V3}/room_keys/version"), &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let alg = "m.megolm_backup.v1.curve25519-aes-sha2";
    let got = s
        .post(
            &format!("{V3}/room_keys/version"),
            &alice,
            json!({ "algorithm": alg, "auth_data": { "public_key": "abc" } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({ "version": "1" }));
    let got = s.get(&format!("{V3}/room_keys/version"), &alice).await;
    assert_eq!(
        got.1,
        json!({ "algorithm": alg, "auth_data": { "public_key": "abc" }, "count": 0, "etag": "0", "version": "1" })
    );

    let key = |index: u64, verified: bool, tag: &str| {
        json!({ "first_message_index": index, "forwarded_count": 0, "is_verified": verified,
                "session_data": { "ciphertext": tag } })
    };
    let room = "!room:localhost";
    let got = s
        .put(
            &format!("{V3}/room_keys/keys?version=1"),
            &alice,
            json!({ "rooms": { room: { "sessions": { "sess1": key(5, false, "a"), "sess2": key(0, true, "b") } } } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({ "count": 2, "etag": "1" }));
    // A worse key does not replace a better one (and the etag stays); a better one does.
    let path = format!("{V3}/room_keys/keys/{}/sess1?version=1", enc(room));
    let got = s.put(&path, &alice, key(9, false, "worse")).await;
    assert_eq!(got.1, json!({ "count": 2, "etag": "1" }));
    let got = s.put(&path, &alice, key(2, false, "better")).await;
    assert_eq!(got.1, json!({ "count": 2, "etag": "2" }));
    let got = s.get(&path, &alice).await;
    assert_eq!(got.1, key(2, false, "better"));
    let got = s
        .get(
            &format!("{V3}/room_keys/keys/{}?version=1", enc(room)),
            &alice,
        )
        .await;
    assert_eq!(got.1["sessions"].as_object().map(|o| o.len()), Some(2));
    let got = s
        .get(
            &format!("{V3}/room_keys/keys/{}?version=1", enc("!other:localhost")),
            &alice,
        )
        .await;
    assert_eq!(got.1, json!({ "sessions": {} }));
    let got = s
        .get(
            &format!("{V3}/room_keys/keys/{}/nosuch?version=1", enc(room)),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(&format!("{V3}/room_keys/keys?version=1"), &alice)
        .await;
    assert_eq!(got.1["rooms"][room]["sessions"]["sess2"], key(0, true, "b"));
    let got = s.get(&format!("{V3}/room_keys/keys"), &alice).await;
    assert_err(&got, 400, "M_MISSING_PARAM");

    // A new version: writes to the old one are refused with the current version.
    let got = s
        .post(
            &format!("{V3}/room_keys/version"),
            &alice,
            json!({ "algorithm": alg, "auth_data": { "public_key": "def" } }),
        )
        .await;
    assert_eq!(got.1, json!({ "version": "2" }));
    let got = s.put(&path, &alice, key(0, true, "late")).await;
    assert_err(&got, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(got.1["current_version"], json!("2"));

    // Update: only auth_data; a different algorithm or version is refused.
    let got = s
        .put(
            &format!("{V3}/room_keys/version/2"),
            &alice,
            json!({ "algorithm": "other", "auth_data": {} }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .put(
            &format!("{V3}/room_keys/version/2"),
            &alice,
            json!({ "algorithm": alg, "auth_data": { "public_key": "ghi" }, "version": "1" }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .put(
            &format!("{V3}/room_keys/version/2"),
            &alice,
            json!({ "algorithm": alg, "auth_data": { "public_key": "ghi" } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = s.get(&format!("{V3}/room_keys/version/2"), &alice).await;
    assert_eq!(got.1["auth_data"], json!({ "public_key": "ghi" }));

    // Delete keys, then the version.
    let got = s
        .req(
            Method::DELETE,
            &format!("{V3}/room_keys/keys?version=1"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(got.1, json!({ "count": 0, "etag": "3" }));
    let got = s
        .req(
            Method::DELETE,
            &format!("{V3}/room_keys/version/2"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let got = s.get(&format!("{V3}/room_keys/version/2"), &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    // Version numbers are not reused.
    let got = s
        .post(
            &format!("{V3}/room_keys/version"),
            &alice,
            json!({ "algorithm": alg, "auth_data": {} }),
        )
        .await;
    assert_eq!(got.1, json!({ "version": "3" }));
}

#[tokio::test]
async fn logout_removes_the_device_keys_and_tells_room_mates() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    s.join(&bob, &room).await;
    let got = s
        .post(
            &format!("{V3}/keys/upload"),
            &alice,
            json!({
                "device_keys": device_keys(&alice, "curve-a"),
                "one_time_keys": { "signed_curve25519:AAAA": signed_key(&alice, "otk-1") },
            }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let got = s
        .put(
            &format!("{V3}/sendToDevice/m.test/t1"),
            &bob,
            json!({ "messages": { alice.user_id.clone(): { alice.device_id.clone(): { "x": 1 } } } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let since = sync_token(&s, &bob).await;

    let got = s.post(&format!("{V3}/logout"), &alice, json!({})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    let got = s
        .post(
            &format!("{V3}/keys/query"),
            &bob,
            json!({ "device_keys": { alice.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["device_keys"][&alice.user_id], json!({}), "{}", got.1);
    let got = s
        .post(
            &format!("{V3}/keys/claim"),
            &bob,
            json!({ "one_time_keys": { alice.user_id.clone(): { alice.device_id.clone(): "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(got.1["one_time_keys"], json!({}), "{}", got.1);
    let body = sync(&s, &bob, Some(&since)).await;
    assert_eq!(
        body["device_lists"]["changed"],
        json!([alice.user_id]),
        "{body}"
    );
}

#[tokio::test]
async fn dehydrated_device_lifecycle() {
    const DD: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;

    let got = s.get(DD, &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (_, versions) = s
        .req(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(
        versions["unstable_features"]["org.matrix.msc3814"],
        json!(true)
    );

    // The dehydrated device is a device of alice with keys others can claim.
    let dehydrated = TestUser {
        user_id: alice.user_id.clone(),
        device_id: "DEHYDRATED1".into(),
        token: String::new(),
    };
    let mut dk = device_keys(&dehydrated, "curve-dehydrated");
    dk["dehydrated"] = json!(true);
    let body = json!({
        "device_id": "DEHYDRATED1",
        "device_data": { "algorithm": "org.matrix.msc3814.v2", "device_pickle": "encrypted" },
        "initial_device_display_name": "Offline device",
        "device_keys": dk,
        "one_time_keys": { "signed_curve25519:AAAA": signed_key(&dehydrated, "otk-1") },
    });
    let (status, put) = s.put(DD, &alice, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put, json!({ "device_id": "DEHYDRATED1" }));
    let (status, got) = s.get(DD, &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["device_id"], json!("DEHYDRATED1"));
    assert_eq!(got["device_data"]["device_pickle"], json!("encrypted"));
    let (_, devices) = s.get(&format!("{V3}/devices"), &alice).await;
    assert!(devices["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .any(|d| d["device_id"] == json!("DEHYDRATED1")
            && d["display_name"] == json!("Offline device")));
    let (_, queried) = s
        .post(
            &format!("{V3}/keys/query"),
            &bob,
            json!({ "device_keys": { alice.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(
        queried["device_keys"][&alice.user_id]["DEHYDRATED1"]["dehydrated"],
        json!(true),
        "{queried}"
    );
    let (_, claimed) = s
        .post(
            &format!("{V3}/keys/claim"),
            &bob,
            json!({ "one_time_keys": { alice.user_id.clone(): { "DEHYDRATED1": "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(
        claimed["one_time_keys"][&alice.user_id]["DEHYDRATED1"]["signed_curve25519:AAAA"]["key"],
        json!("otk-1"),
        "{claimed}"
    );

    // Bob sends it to-device messages; a new login of alice drains them in pages.
    let (status, _) = s
        .put(
            &format!("{V3}/sendToDevice/m.room.encrypted/t1"),
            &bob,
            json!({ "messages": { alice.user_id.clone(): {
                "DEHYDRATED1": { "ciphertext": "for the dehydrated device" } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = format!("{DD}/DEHYDRATED1/events");
    let (status, first) = s.post(&events, &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["events"].as_array().map(Vec::len), Some(1), "{first}");
    assert_eq!(first["events"][0]["sender"], json!(bob.user_id));
    assert_eq!(
        first["events"][0]["content"]["ciphertext"],
        json!("for the dehydrated device")
    );
    let next = first["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, second) = s.post(&events, &alice, json!({ "next_batch": next })).await;
    assert_eq!(second["events"], json!([]), "{second}");
    // Acknowledged messages are gone: asking again from the start finds nothing.
    let (_, again) = s.post(&events, &alice, json!({})).await;
    assert_eq!(again["events"], json!([]), "{again}");

    // Errors.
    let got = s
        .post(&format!("{DD}/OTHER/events"), &alice, json!({}))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s.post(&events, &alice, json!({ "next_batch": "x" })).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s.put(DD, &alice, json!({ "device_id": "D2" })).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(
            DD,
            &alice,
            json!({ "device_id": alice.device_id, "device_data": { "algorithm": "a" } }),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    // Keys of another device are refused and leave nothing behind.
    let mut wrong = body.clone();
    wrong["device_id"] = json!("DEHYDRATED2");
    let got = s.put(DD, &alice, wrong).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    let (_, devices) = s.get(&format!("{V3}/devices"), &alice).await;
    assert!(!devices["devices"].to_string().contains("DEHYDRATED2"));
    let got = s.req(Method::GET, DD, None, None).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");

    // Replacing it deletes the old device; deleting it answers with its id.
    let mut replacement = body.clone();
    replacement["device_id"] = json!("DEHYDRATED3");
    let dehydrated3 = TestUser {
        device_id: "DEHYDRATED3".into(),
        ..dehydrated.clone()
    };
    replacement["device_keys"] = device_keys(&dehydrated3, "curve-3");
    replacement["one_time_keys"] = json!({});
    let (status, put) = s.put(DD, &alice, replacement).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    let (_, devices) = s.get(&format!("{V3}/devices"), &alice).await;
    let list = devices["devices"].to_string();
    assert!(
        !list.contains("DEHYDRATED1") && list.contains("DEHYDRATED3"),
        "{list}"
    );
    let (status, deleted) = s.req(Method::DELETE, DD, Some(&alice.token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted, json!({ "device_id": "DEHYDRATED3" }));
    let got = s.get(DD, &alice).await;
    assert_err(&got, 404, "M_NOT_FOUND");
}
