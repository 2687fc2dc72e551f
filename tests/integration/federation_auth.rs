//! Two Hafen servers on loopback: signed requests (`X-Matrix`) from one are verified by the other
//! with keys it fetches from the first; unsigned and wrongly signed requests are refused.

use reqwest::{Method, StatusCode};
use ruma::ServerName;
use serde_json::json;

use crate::common::{assert_err, free_port, TestServer};

async fn two_servers() -> (TestServer, TestServer) {
    two_servers_with(|_| {}).await
}

/// Two federating servers; `b_policy` adjusts B's config further.
async fn two_servers_with(
    b_policy: impl FnOnce(&mut hafen::config::Config),
) -> (TestServer, TestServer) {
    let (pa, pb) = (free_port(), free_port());
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test".try_into().expect("name");
        c.port = pa;
        c.federation_destinations
            .insert("b.test".into(), format!("http://127.0.0.1:{pb}"));
    })
    .await;
    let b = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "b.test".try_into().expect("name");
        c.port = pb;
        c.federation_destinations
            .insert("a.test".into(), format!("http://127.0.0.1:{pa}"));
        b_policy(c);
    })
    .await;
    (a, b)
}

#[tokio::test]
async fn signed_requests_are_verified_with_fetched_keys() {
    let (a, b) = two_servers().await;
    let bob = b.user("bob").await;
    let (status, _) = b
        .put(
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                crate::common::enc(&bob.user_id)
            ),
            &bob,
            json!({ "displayname": "Bob at B" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        crate::common::enc(&bob.user_id)
    );

    // A signs, B fetches A's keys from A, checks, answers.
    let answer = a
        .services()
        .federation
        .send(Method::GET, b_name, &path, None)
        .await
        .expect("B answers A");
    assert_eq!(answer, json!({ "displayname": "Bob at B" }));
    let field = a
        .services()
        .federation
        .send(
            Method::GET,
            b_name,
            &format!("{path}&field=avatar_url"),
            None,
        )
        .await
        .expect("B answers A");
    assert_eq!(field, json!({}));
    // B remembers A's keys.
    let cached = b
        .services()
        .storage
        .get(hafen::storage::Table::RemoteServerKeys, b"a.test")
        .expect("db");
    assert!(cached.is_some());
    // An error of B comes back as an error with B's errcode.
    let missing = a
        .services()
        .federation
        .send(
            Method::GET,
            b_name,
            "/_matrix/federation/v1/query/profile?user_id=%40nobody%3Ab.test",
            None,
        )
        .await
        .expect_err("unknown user");
    assert!(missing.to_string().contains("M_NOT_FOUND"), "{missing}");

    // Unsigned, wrongly signed, for another destination, with an unknown key, from a server whose
    // keys cannot be had: all 401 M_UNAUTHORIZED.
    let got = b.req(Method::GET, &path, None, None).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
    let good = hafen::service::federation::auth::authorization_header(
        &a.services().globals,
        &Method::GET,
        b_name,
        &path,
        None,
    )
    .expect("header");
    let raw = |header: String| {
        let http = b.http.clone();
        let url = format!("{}{}", b.base, path);
        async move {
            let res = http
                .get(url)
                .header("Authorization", header)
                .send()
                .await
                .expect("sent");
            let status = res.status();
            (
                status,
                res.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = raw(good.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["displayname"], json!("Bob at B"));
    let sig_start = good.find("sig=\"").expect("sig") + 5;
    let mut tampered = good.clone();
    tampered.replace_range(sig_start..sig_start + 4, "AAAA");
    let got = raw(tampered).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
    let got = raw(good.replace("destination=\"b.test\"", "destination=\"c.test\"")).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
    let key_start = good.find("key=\"").expect("key") + 5;
    let key_end = good[key_start..].find('"').expect("end") + key_start;
    let mut wrong_key = good.clone();
    wrong_key.replace_range(key_start..key_end, "ed25519:nope");
    let got = raw(wrong_key).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
    let got = raw(good.replace("origin=\"a.test\"", "origin=\"nowhere.invalid\"")).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");
    // The same signature over another path does not pass.
    let other_path = format!("{path}&field=displayname");
    let res = b
        .http
        .get(format!("{}{}", b.base, other_path))
        .header("Authorization", good)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn federation_policy_refuses_servers_both_ways() {
    // B federates only with *.partner.test: A's requests are refused before A is contacted.
    let (a, b) = two_servers_with(|c| c.federation_allowlist = vec!["*.partner.test".into()]).await;
    let bob = b.user("bob").await;
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        crate::common::enc(&bob.user_id)
    );
    let refused = a
        .services()
        .federation
        .send(Method::GET, b_name, &path, None)
        .await
        .expect_err("B refuses A");
    assert!(refused.to_string().contains("M_FORBIDDEN"), "{refused}");
    assert!(b
        .services()
        .storage
        .get(hafen::storage::Table::RemoteServerKeys, b"a.test")
        .expect("db")
        .is_none());
    // And B sends nothing to A.
    let a_name = <&ServerName>::try_from("a.test").expect("name");
    let err = b
        .services()
        .federation
        .send(Method::GET, a_name, "/_matrix/federation/v1/version", None)
        .await
        .expect_err("policy");
    assert_eq!(err.errcode(), "M_FORBIDDEN");

    // With federation off (the default) the same holds for everybody.
    let lone = TestServer::start().await;
    let err = lone
        .services()
        .federation
        .send(Method::GET, b_name, "/_matrix/federation/v1/version", None)
        .await
        .expect_err("federation is off");
    assert_eq!(err.errcode(), "M_FORBIDDEN");
}

#[tokio::test]
async fn notary_serves_keys_countersigned() {
    let (a, b) = two_servers().await;
    // B vouches for A's keys (fetched from A) and for its own.
    let (status, body) = b
        .req(Method::GET, "/_matrix/key/v2/query/a.test", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let docs = body["server_keys"].as_array().expect("server_keys");
    assert_eq!(docs.len(), 1, "{body}");
    let doc = &docs[0];
    assert_eq!(doc["server_name"], json!("a.test"));
    let (_, a_own) = a
        .req(Method::GET, "/_matrix/key/v2/server", None, None)
        .await;
    assert_eq!(doc["verify_keys"], a_own["verify_keys"]);
    let signers = doc["signatures"].as_object().expect("signatures");
    assert!(
        signers.contains_key("a.test") && signers.contains_key("b.test"),
        "{doc}"
    );

    let (status, body) = b
        .req(
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(json!({ "server_keys": { "a.test": {}, "b.test": {}, "unknown.invalid": {} } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut names: Vec<String> = body["server_keys"]
        .as_array()
        .expect("server_keys")
        .iter()
        .filter_map(|d| d["server_name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, vec!["a.test", "b.test"], "{body}");
    let got = b
        .req(
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(json!({ "server_keys": [] })),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
}

#[tokio::test]
async fn keys_devices_and_aliases_are_queried_across_servers() {
    let (a, b) = two_servers().await;
    let bob = b.user("bob").await;
    let dk = json!({
        "user_id": bob.user_id, "device_id": bob.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{}", bob.device_id): "curve", format!("ed25519:{}", bob.device_id): "ed" },
        "signatures": { bob.user_id.clone(): { format!("ed25519:{}", bob.device_id): "sig" } },
    });
    let otk = json!({ "key": "one-time", "signatures": { bob.user_id.clone(): { format!("ed25519:{}", bob.device_id): "sig" } } });
    let (status, body) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            &bob,
            json!({ "device_keys": dk, "one_time_keys": { "signed_curve25519:AAAA": otk } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = b
        .create_room(
            &bob,
            json!({ "room_alias_name": "lobby", "preset": "public_chat" }),
        )
        .await;
    let fed = &a.services().federation;
    let b_name = <&ServerName>::try_from("b.test").expect("name");

    let keys = fed
        .send(
            Method::POST,
            b_name,
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({ "device_keys": { bob.user_id.clone(): [], "@eve:a.test": [] } })),
        )
        .await
        .expect("keys query");
    assert_eq!(
        keys["device_keys"][&bob.user_id][&bob.device_id]["keys"], dk["keys"],
        "{keys}"
    );
    assert!(keys["device_keys"].get("@eve:a.test").is_none(), "{keys}");
    assert!(keys.get("user_signing_keys").is_none());

    let claimed = fed
        .send(
            Method::POST,
            b_name,
            "/_matrix/federation/v1/user/keys/claim",
            Some(json!({ "one_time_keys": { bob.user_id.clone(): { bob.device_id.clone(): "signed_curve25519" } } })),
        )
        .await
        .expect("claim");
    assert_eq!(
        claimed["one_time_keys"][&bob.user_id][&bob.device_id]["signed_curve25519:AAAA"]["key"],
        json!("one-time"),
        "{claimed}"
    );

    let devices = fed
        .send(
            Method::GET,
            b_name,
            &format!(
                "/_matrix/federation/v1/user/devices/{}",
                crate::common::enc(&bob.user_id)
            ),
            None,
        )
        .await
        .expect("devices");
    assert_eq!(devices["user_id"], json!(bob.user_id));
    assert_eq!(
        devices["devices"][0]["device_id"],
        json!(bob.device_id),
        "{devices}"
    );

    let dir = fed
        .send(
            Method::GET,
            b_name,
            "/_matrix/federation/v1/query/directory?room_alias=%23lobby%3Ab.test",
            None,
        )
        .await
        .expect("alias");
    assert_eq!(dir, json!({ "room_id": room, "servers": ["b.test"] }));
    let missing = fed
        .send(
            Method::GET,
            b_name,
            "/_matrix/federation/v1/query/directory?room_alias=%23nope%3Ab.test",
            None,
        )
        .await
        .expect_err("unknown alias");
    assert!(missing.to_string().contains("M_NOT_FOUND"));
    // A body that is not an object is refused (after the signature is checked).
    let bad = fed
        .send(
            Method::POST,
            b_name,
            "/_matrix/federation/v1/user/keys/query",
            Some(json!([1])),
        )
        .await
        .expect_err("bad body");
    assert!(bad.to_string().contains("M_BAD_JSON"), "{bad}");
}

#[tokio::test]
async fn client_key_queries_reach_other_servers() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let dk = json!({
        "user_id": bob.user_id, "device_id": bob.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": { format!("curve25519:{}", bob.device_id): "curve", format!("ed25519:{}", bob.device_id): "ed" },
        "signatures": { bob.user_id.clone(): { format!("ed25519:{}", bob.device_id): "sig" } },
    });
    let otk = json!({ "key": "otk", "signatures": { bob.user_id.clone(): { format!("ed25519:{}", bob.device_id): "sig" } } });
    let (status, _) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            &bob,
            json!({ "device_keys": dk, "one_time_keys": { "signed_curve25519:B1": otk } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, q) = a
        .post(
            "/_matrix/client/v3/keys/query",
            &alice,
            json!({ "device_keys": { bob.user_id.clone(): [], "@x:unreachable.invalid": [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(
        q["device_keys"][&bob.user_id][&bob.device_id]["keys"], dk["keys"],
        "{q}"
    );
    assert!(q["failures"].get("b.test").is_none(), "{q}");
    assert_eq!(
        q["failures"]["unreachable.invalid"]["status"],
        json!(503),
        "{q}"
    );
    let (status, c) = a
        .post(
            "/_matrix/client/v3/keys/claim",
            &alice,
            json!({ "one_time_keys": { bob.user_id.clone(): { bob.device_id.clone(): "signed_curve25519" } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(
        c["one_time_keys"][&bob.user_id][&bob.device_id]["signed_curve25519:B1"]["key"],
        json!("otk"),
        "{c}"
    );
}

#[tokio::test]
async fn public_rooms_of_another_server() {
    let (a, b) = two_servers_with(|c| c.allow_public_rooms_over_federation = true).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = b
        .create_room(
            &bob,
            json!({ "preset": "public_chat", "name": "Partner lobby", "visibility": "public" }),
        )
        .await;
    let (status, list) = a
        .get(
            "/_matrix/client/v3/publicRooms?server=b.test&limit=5",
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["chunk"][0]["room_id"], json!(room), "{list}");
    assert_eq!(list["chunk"][0]["name"], json!("Partner lobby"));
    let (status, found) = a
        .post(
            "/_matrix/client/v3/publicRooms?server=b.test",
            &alice,
            json!({ "filter": { "generic_search_term": "lobby" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["chunk"].as_array().map(Vec::len), Some(1), "{found}");
    let (_, none) = a
        .post(
            "/_matrix/client/v3/publicRooms?server=b.test",
            &alice,
            json!({ "filter": { "generic_search_term": "nothing like it" } }),
        )
        .await;
    assert_eq!(none["chunk"], json!([]));

    // A server that does not publish its directory over federation refuses.
    let (c, d) = two_servers().await;
    let carol = c.user("carol").await;
    let dave = d.user("dave").await;
    d.create_room(
        &dave,
        json!({ "preset": "public_chat", "visibility": "public" }),
    )
    .await;
    let (status, body) = c
        .get("/_matrix/client/v3/publicRooms?server=b.test", &carol)
        .await;
    // The other server's refusal is passed on as it is.
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errcode"], json!("M_FORBIDDEN"), "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not publish")),
        "{body}"
    );
}

#[tokio::test]
async fn profiles_of_another_servers_users() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let enc = crate::common::enc;
    b.put(
        &format!(
            "/_matrix/client/v3/profile/{}/displayname",
            enc(&bob.user_id)
        ),
        &bob,
        json!({ "displayname": "Bob at B" }),
    )
    .await;
    let (status, profile) = a
        .get(
            &format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile, json!({ "displayname": "Bob at B" }));
    let (status, name) = a
        .get(
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&bob.user_id)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{name}");
    assert_eq!(name, json!({ "displayname": "Bob at B" }));
    let got = a
        .get(
            &format!(
                "/_matrix/client/v3/profile/{}/avatar_url",
                enc(&bob.user_id)
            ),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = a
        .get(
            &format!("/_matrix/client/v3/profile/{}", enc("@ghost:b.test")),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn space_hierarchy_for_another_server() {
    let (a, b) = two_servers().await;
    let bob = b.user("bob").await;
    let space = b
        .create_room(
            &bob,
            json!({ "preset": "public_chat", "name": "Partner space", "creation_content": { "type": "m.space" } }),
        )
        .await;
    let open = b
        .create_room(&bob, json!({ "preset": "public_chat", "name": "Open" }))
        .await;
    let closed = b
        .create_room(&bob, json!({ "preset": "private_chat" }))
        .await;
    for (child, suggested) in [(&open, true), (&closed, false)] {
        let (status, body) = b
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.space.child/{}",
                    crate::common::enc(&space),
                    crate::common::enc(child)
                ),
                &bob,
                json!({ "via": ["b.test"], "suggested": suggested }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let fed = &a.services().federation;
    let b_name = <&ServerName>::try_from("b.test").expect("name");
    let path = format!(
        "/_matrix/federation/v1/hierarchy/{}",
        crate::common::enc(&space)
    );
    let h = fed
        .send(Method::GET, b_name, &path, None)
        .await
        .expect("hierarchy");
    assert_eq!(h["room"]["room_id"], json!(space), "{h}");
    assert_eq!(
        h["room"]["children_state"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(h["children"].as_array().map(Vec::len), Some(1), "{h}");
    assert_eq!(h["children"][0]["room_id"], json!(open));
    assert_eq!(h["inaccessible_children"], json!([closed]));
    let h = fed
        .send(
            Method::GET,
            b_name,
            &format!("{path}?suggested_only=true"),
            None,
        )
        .await
        .expect("hierarchy");
    assert_eq!(h["inaccessible_children"], json!([]), "{h}");
    let err = fed
        .send(
            Method::GET,
            b_name,
            &format!(
                "/_matrix/federation/v1/hierarchy/{}",
                crate::common::enc(&closed)
            ),
            None,
        )
        .await
        .expect_err("private room");
    assert!(err.to_string().contains("M_NOT_FOUND"), "{err}");
}

#[tokio::test]
async fn a_server_cannot_answer_for_other_servers_users_keys() {
    // A hostile server answers a key query with keys for a user of another server too.
    async fn spoof() -> axum::Json<serde_json::Value> {
        axum::Json(json!({ "device_keys": {
            "@mallory:evil.test": { "DEV": { "keys": { "ed25519:DEV": "mallory" } } },
            "@alice:a.test": { "FAKE": { "keys": { "ed25519:FAKE": "spoofed" } } },
        } }))
    }
    let app = axum::Router::new().route(
        "/_matrix/federation/v1/user/keys/query",
        axum::routing::post(spoof),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test".try_into().expect("name");
        c.federation_destinations
            .insert("evil.test".into(), format!("http://127.0.0.1:{port}"));
    })
    .await;
    let alice = a.user("alice").await;
    let (status, q) = a
        .post(
            "/_matrix/client/v3/keys/query",
            &alice,
            json!({ "device_keys": { "@mallory:evil.test": [], alice.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{q}");
    assert_eq!(
        q["device_keys"]["@mallory:evil.test"]["DEV"]["keys"]["ed25519:DEV"],
        json!("mallory")
    );
    assert_eq!(q["device_keys"][&alice.user_id], json!({}), "{q}");
}

#[tokio::test]
async fn aliases_of_another_server_resolve_through_it() {
    let (a, b) = two_servers().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let enc = crate::common::enc;
    let room = b
        .create_room(&bob, json!({ "room_alias_name": "lounge" }))
        .await;
    let (status, v) = a
        .get(
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#lounge:b.test")
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "room_id": room, "servers": ["b.test"] }));
    // Unknown on B, and a server that cannot be reached: both "not found".
    let got = a
        .get(
            &format!("/_matrix/client/v3/directory/room/{}", enc("#nope:b.test")),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = a
        .get(
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc(&format!("#x:127.0.0.1:{}", free_port()))
            ),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn keys_of_an_unreachable_server_come_from_a_trusted_notary() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let dead = free_port();
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test".try_into().expect("name");
        c.port = pa;
    })
    .await;
    let _notary = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "b.test".try_into().expect("name");
        c.port = pb;
        c.federation_destinations
            .insert("a.test".into(), format!("http://127.0.0.1:{pa}"));
    })
    .await;
    // C cannot reach A (a port nobody listens on) but trusts B as a notary.
    let c = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "c.test".try_into().expect("name");
        c.port = pc;
        c.trusted_servers = vec!["b.test".try_into().expect("name")];
        c.federation_destinations
            .insert("a.test".into(), format!("http://127.0.0.1:{dead}"));
        c.federation_destinations
            .insert("b.test".into(), format!("http://127.0.0.1:{pb}"));
    })
    .await;
    let a_key = a.services().globals.signing_key.public_key();
    let keys = c
        .services()
        .federation
        .current_keys(ServerName::parse("a.test").expect("name").as_ref())
        .await
        .expect("A's keys through the notary");
    assert_eq!(keys.values().next(), Some(&a_key), "{keys:?}");
    // Kept as A signed it (no notary signature), and served by C's own notary countersigned.
    let (status, doc) = c
        .req(Method::GET, "/_matrix/key/v2/query/a.test", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let sigs = doc["server_keys"][0]["signatures"]
        .as_object()
        .expect("signatures");
    assert!(
        sigs.contains_key("a.test") && sigs.contains_key("c.test"),
        "{doc}"
    );
    assert!(!sigs.contains_key("b.test"), "{doc}");
    // Without a notary the same situation is a failure.
    let d = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "d.test".try_into().expect("name");
        c.federation_destinations
            .insert("a.test".into(), format!("http://127.0.0.1:{dead}"));
    })
    .await;
    assert!(d
        .services()
        .federation
        .current_keys(ServerName::parse("a.test").expect("name").as_ref())
        .await
        .is_err());
}

#[tokio::test]
async fn unreachable_notaries_do_not_ask_each_other_forever() {
    let (x, y, a) = (free_port(), free_port(), free_port());
    // Nobody listens on any of these ports: every server here is unreachable.
    let e = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "e.test".try_into().expect("name");
        c.trusted_servers = vec![
            "x.test".try_into().expect("name"),
            "y.test".try_into().expect("name"),
        ];
        for (name, port) in [("x.test", x), ("y.test", y), ("a.test", a)] {
            c.federation_destinations
                .insert(name.into(), format!("http://127.0.0.1:{port}"));
        }
    })
    .await;
    let a_name = ServerName::parse("a.test").expect("name");
    let attempt = e.services().federation.current_keys(&a_name);
    let result = tokio::time::timeout(std::time::Duration::from_secs(15), attempt)
        .await
        .expect("gives up instead of asking notary after notary");
    let err = result.expect_err("no keys to be had");
    assert!(err.to_string().contains("a.test"), "{err}");
}

/// Two servers whose names carry ports (`a.test:8448`, `b.test:8448`), as many real ones do.
async fn two_servers_with_ports(
    b_policy: impl FnOnce(&mut hafen::config::Config),
) -> (TestServer, TestServer) {
    let (pa, pb) = (free_port(), free_port());
    let a = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test:8448".try_into().expect("name");
        c.port = pa;
        c.federation_destinations
            .insert("b.test:8448".into(), format!("http://127.0.0.1:{pb}"));
    })
    .await;
    let b = TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "b.test:8448".try_into().expect("name");
        c.port = pb;
        c.federation_destinations
            .insert("a.test:8448".into(), format!("http://127.0.0.1:{pa}"));
        b_policy(c);
    })
    .await;
    (a, b)
}

#[tokio::test]
async fn a_denied_host_is_refused_whatever_its_port() {
    // B denies the host a.test: A, whose name is a.test:8448, is refused both ways.
    let (a, b) = two_servers_with_ports(|c| c.federation_denylist = vec!["a.test".into()]).await;
    let bob = b.user("bob").await;
    let b_name = <&ServerName>::try_from("b.test:8448").expect("name");
    let a_name = <&ServerName>::try_from("a.test:8448").expect("name");
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        crate::common::enc(&bob.user_id)
    );
    // Incoming: B answers A's signed request with 403 before fetching A's keys.
    let refused = a
        .services()
        .federation
        .send(Method::GET, b_name, &path, None)
        .await
        .expect_err("B refuses A");
    assert!(refused.to_string().contains("M_FORBIDDEN"), "{refused}");
    assert!(
        refused.to_string().contains("a.test:8448"),
        "the refusal names the server: {refused}"
    );
    assert!(b
        .services()
        .storage
        .get(hafen::storage::Table::RemoteServerKeys, b"a.test:8448")
        .expect("db")
        .is_none());
    // Outgoing: B sends nothing to A.
    let err = b
        .services()
        .federation
        .send(Method::GET, a_name, "/_matrix/federation/v1/version", None)
        .await
        .expect_err("policy");
    assert_eq!(err.errcode(), "M_FORBIDDEN");
    // The refusal is audited with the server as it claimed to be.
    let (entries, _) = b
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "policy_denied")
        .expect("audit");
    assert!(
        entries
            .iter()
            .any(|e| e.detail["policy"] == "federation" && e.detail["server"] == "a.test:8448"),
        "{:?}",
        entries.iter().map(|e| &e.detail).collect::<Vec<_>>()
    );

    // An entry with a port names that port only: a.test:9000 leaves a.test:8448 alone.
    let (a2, b2) =
        two_servers_with_ports(|c| c.federation_denylist = vec!["a.test:9000".into()]).await;
    let bob2 = b2.user("bob").await;
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        crate::common::enc(&bob2.user_id)
    );
    let answer = a2
        .services()
        .federation
        .send(Method::GET, b_name, &path, None)
        .await
        .expect("another port is not denied");
    assert!(answer.is_object(), "{answer}");
}

/// Upload device keys for `u`'s device on `server`.
async fn upload_device_keys(server: &TestServer, u: &crate::common::TestUser, curve: &str) {
    let dk = json!({
        "user_id": u.user_id, "device_id": u.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{}", u.device_id): curve, format!("ed25519:{}", u.device_id): "ed" },
        "signatures": { u.user_id.clone(): { format!("ed25519:{}", u.device_id): "sig" } },
    });
    let (status, body) = server
        .post(
            "/_matrix/client/v3/keys/upload",
            u,
            json!({ "device_keys": dk }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Name `u`'s device `name`.
async fn name_device(server: &TestServer, u: &crate::common::TestUser, name: &str) {
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/devices/{}", u.device_id),
            u,
            json!({ "display_name": name }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// What `asker` gets for `u` (of `owner`) from the federation key query and device list.
async fn remote_device_answers(
    asker: &TestServer,
    owner: &TestServer,
    u: &crate::common::TestUser,
) -> (serde_json::Value, serde_json::Value) {
    let owner_name = ruma::ServerName::parse(owner.server_name()).expect("name");
    let fed = &asker.services().federation;
    let keys = fed
        .send(
            Method::POST,
            &owner_name,
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({ "device_keys": { u.user_id.clone(): [] } })),
        )
        .await
        .expect("keys query");
    let devices = fed
        .send(
            Method::GET,
            &owner_name,
            &format!(
                "/_matrix/federation/v1/user/devices/{}",
                crate::common::enc(&u.user_id)
            ),
            None,
        )
        .await
        .expect("devices");
    (keys, devices)
}

#[tokio::test]
async fn device_names_reach_other_servers_only_when_allowed() {
    use crate::common::{start_federating, TestPki};
    let pki = TestPki::new();
    let mut a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let open = start_federating(&pki, |c| c.allow_device_name_federation = true).await;

    // Off (the default): keys and device lists go to other servers without the names; the
    // server's own users still see them.
    let bob = b.user("bob").await;
    name_device(&b, &bob, "Bob's work phone").await;
    upload_device_keys(&b, &bob, "curve").await;
    let (keys, devices) = remote_device_answers(&a, &b, &bob).await;
    assert_eq!(
        keys["device_keys"][&bob.user_id][&bob.device_id]["user_id"],
        json!(bob.user_id),
        "{keys}"
    );
    assert_eq!(
        devices["devices"][0]["device_id"],
        json!(bob.device_id),
        "{devices}"
    );
    for answer in [&keys, &devices] {
        assert!(!answer.to_string().contains("Bob's work phone"), "{answer}");
    }
    let brenda = b.user("brenda").await;
    let (status, local) = b
        .post(
            "/_matrix/client/v3/keys/query",
            &brenda,
            json!({ "device_keys": { bob.user_id.clone(): [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{local}");
    assert_eq!(
        local["device_keys"][&bob.user_id][&bob.device_id]["unsigned"]["device_display_name"],
        json!("Bob's work phone"),
        "{local}"
    );

    // The device list update EDU: bob shares a room with a user of A, A is down, so the EDU
    // bob's next key upload makes stays in B's queue, where it is looked at.
    let alice = a.user("alice").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let got = crate::federation_rooms::join_via(&b, &bob, &room, &a).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    a.halt().await;
    name_device(&b, &bob, "Bob's new phone").await;
    upload_device_keys(&b, &bob, "curve2").await;
    let queued: Vec<serde_json::Value> = b
        .services()
        .storage
        .scan_prefix(hafen::storage::Table::FederationQueue, b"")
        .expect("scan")
        .filter_map(|r| r.ok())
        .filter_map(|(_, v)| serde_json::from_slice::<serde_json::Value>(&v).ok())
        .filter(|v| v["edu_type"] == "m.device_list_update")
        .collect();
    assert!(!queued.is_empty(), "no device list update was queued");
    for edu in &queued {
        assert!(edu["content"].get("device_display_name").is_none(), "{edu}");
        assert!(edu["content"]["keys"].is_object(), "{edu}");
    }

    // On: the names go out.
    let olga = open.user("olga").await;
    name_device(&open, &olga, "Olga's laptop").await;
    upload_device_keys(&open, &olga, "curve").await;
    let (keys, devices) = remote_device_answers(&b, &open, &olga).await;
    assert_eq!(
        keys["device_keys"][&olga.user_id][&olga.device_id]["unsigned"]["device_display_name"],
        json!("Olga's laptop"),
        "{keys}"
    );
    assert_eq!(
        devices["devices"][0]["device_display_name"],
        json!("Olga's laptop"),
        "{devices}"
    );
}
