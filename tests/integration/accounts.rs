//! Accounts, sessions, devices, profiles, account data, tags and filters.

use reqwest::{Method, StatusCode};
use ruma::{events::StateEventType, RoomId};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V3: &str = "/_matrix/client/v3";

/// A room with `u` joined, made through the createRoom endpoint.
async fn room_with(s: &TestServer, u: &TestUser) -> String {
    s.create_room(u, json!({})).await
}

fn member_content(s: &TestServer, room: &str, user: &str) -> Value {
    let room = RoomId::parse(room).unwrap();
    s.services()
        .rooms
        .state_content(&room, &StateEventType::RoomMember, user)
        .unwrap()
        .unwrap_or(Value::Null)
}

async fn anon(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    s.req(method, &format!("{V3}{path}"), None, body).await
}

fn as_user(v: &Value) -> TestUser {
    TestUser {
        user_id: v["user_id"].as_str().unwrap().to_owned(),
        device_id: v["device_id"].as_str().unwrap_or_default().to_owned(),
        token: v["access_token"].as_str().unwrap_or_default().to_owned(),
    }
}

async fn login(s: &TestServer, user: &str, password: &str, extra: Value) -> (StatusCode, Value) {
    let mut body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    anon(s, Method::POST, "/login", Some(body)).await
}

// ---- registration ----

#[tokio::test]
async fn register_with_registration_token() {
    let s = TestServer::start().await;
    let (status, challenge) = anon(
        &s,
        Method::POST,
        "/register",
        Some(json!({ "username": "carol", "password": "pw" })),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.registration_token"] }]),
        "{challenge}"
    );
    assert_eq!(challenge["params"], json!({}));
    let session = challenge["session"].as_str().expect("session").to_owned();

    // A wrong token keeps the session and reports the error in the 401 body.
    let bad = json!({ "username": "carol", "password": "pw",
        "auth": { "type": "m.login.registration_token", "token": "wrong", "session": session } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(bad)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["errcode"], "M_UNAUTHORIZED", "{v}");
    assert_eq!(v["session"], json!(session));
    assert_eq!(v["completed"], json!([]));

    // An unknown stage is refused.
    let other =
        json!({ "username": "carol", "auth": { "type": "m.login.dummy", "session": session } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(other)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["errcode"], "M_UNRECOGNIZED", "{v}");

    let good = json!({ "username": "Carol", "password": "pw", "initial_device_display_name": "phone",
        "device_id": "DEV1",
        "auth": { "type": "m.login.registration_token", "token": "test-token", "session": session } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(good)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], "@carol:localhost");
    assert_eq!(v["device_id"], "DEV1");
    assert!(v["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(v.get("refresh_token").is_none());
    let carol = as_user(&v);

    let (status, v) = s.get(&format!("{V3}/account/whoami"), &carol).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v,
        json!({ "user_id": "@carol:localhost", "device_id": "DEV1", "is_guest": false })
    );
    // New users are named after their localpart.
    let (status, v) = s
        .get(
            &format!("{V3}/profile/{}/displayname", enc(&carol.user_id)),
            &carol,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({ "displayname": "carol" }));
    let (_, v) = s.get(&format!("{V3}/devices/DEV1"), &carol).await;
    assert_eq!(v["display_name"], "phone");

    // The finished session cannot be replayed for a second account.
    let replay = json!({ "username": "dave", "auth": { "session": session } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(replay)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_ne!(v["session"], json!(session));
    // And the password works.
    let (status, _) = login(&s, "carol", "pw", json!({})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn register_closed_is_forbidden() {
    let s = TestServer::start_with(|c| c.registration_token = None).await;
    let got = anon(
        &s,
        Method::POST,
        "/register",
        Some(json!({ "username": "x", "password": "pw" })),
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .req(
            Method::GET,
            "/_matrix/client/v1/register/m.login.registration_token/validity?token=abc",
            None,
            None,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn register_open_with_dummy_and_options() {
    let s = TestServer::start_with(|c| {
        c.registration_token = None;
        c.allow_registration = true;
    })
    .await;
    let (status, challenge) = anon(&s, Method::POST, "/register", Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.dummy"] }]));
    // Without a username, the server picks one; refresh tokens on request.
    let body =
        json!({ "password": "pw", "refresh_token": true, "auth": { "type": "m.login.dummy" } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["user_id"].as_str().unwrap().ends_with(":localhost"));
    assert!(v["refresh_token"].is_string());
    assert!(v["expires_in_ms"].is_u64());
    // inhibit_login: only the user id.
    let body =
        json!({ "username": "quiet", "inhibit_login": true, "auth": { "type": "m.login.dummy" } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], "@quiet:localhost");
    assert!(v.get("access_token").is_none());
    assert!(v.get("device_id").is_none());
    // Wrong types.
    let got = anon(
        &s,
        Method::POST,
        "/register",
        Some(json!({ "username": 5 })),
    )
    .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = anon(&s, Method::POST, "/register", Some(json!({ "auth": "x" }))).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .req_raw(Method::POST, &format!("{V3}/register"), None, b"{not json")
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    let got = anon(&s, Method::POST, "/register?kind=robot", Some(json!({}))).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn register_username_checks_and_availability() {
    let s = TestServer::start().await;
    s.user("taken").await;
    let got = anon(
        &s,
        Method::POST,
        "/register",
        Some(json!({ "username": "taken", "password": "pw" })),
    )
    .await;
    assert_err(&got, 400, "M_USER_IN_USE");
    let got = anon(
        &s,
        Method::POST,
        "/register",
        Some(json!({ "username": "bad name!", "password": "pw" })),
    )
    .await;
    assert_err(&got, 400, "M_INVALID_USERNAME");

    let (status, v) = anon(&s, Method::GET, "/register/available?username=free", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({ "available": true }));
    let got = anon(&s, Method::GET, "/register/available?username=taken", None).await;
    assert_err(&got, 400, "M_USER_IN_USE");
    let got = anon(
        &s,
        Method::GET,
        "/register/available?username=%C3%A9t%C3%A9",
        None,
    )
    .await;
    assert_err(&got, 400, "M_INVALID_USERNAME");
    let got = anon(&s, Method::GET, "/register/available", None).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
}

#[tokio::test]
async fn guest_registration() {
    let s = TestServer::start().await;
    let got = anon(&s, Method::POST, "/register?kind=guest", Some(json!({}))).await;
    assert_err(&got, 403, "M_GUEST_ACCESS_FORBIDDEN");

    let s = TestServer::start_with(|c| c.allow_guest_registration = true).await;
    let (status, v) = anon(&s, Method::POST, "/register?kind=guest", Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let guest = as_user(&v);
    let (status, v) = s.get(&format!("{V3}/account/whoami"), &guest).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["is_guest"], true);
}

#[tokio::test]
async fn created_registration_tokens_count_uses() {
    let s = TestServer::start_with(|c| c.registration_token = None).await;
    s.services()
        .accounts
        .create_registration_token(Some("once".into()), Some(1), None)
        .unwrap();
    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
    let (status, v) = s
        .req(Method::GET, &format!("{validity}?token=once"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({ "valid": true }));
    let (_, v) = s
        .req(Method::GET, &format!("{validity}?token=nope"), None, None)
        .await;
    assert_eq!(v, json!({ "valid": false }));
    let got = s.req(Method::GET, validity, None, None).await;
    assert_err(&got, 400, "M_MISSING_PARAM");

    let body = json!({ "username": "first", "password": "pw", "auth": { "type": "m.login.registration_token", "token": "once" } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, v) = s
        .req(Method::GET, &format!("{validity}?token=once"), None, None)
        .await;
    assert_eq!(v, json!({ "valid": false }));
    let body = json!({ "username": "second", "password": "pw", "auth": { "type": "m.login.registration_token", "token": "once" } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["errcode"], "M_UNAUTHORIZED");
}

#[tokio::test]
async fn registration_is_rate_limited() {
    let s = TestServer::start_with(|c| c.rate_limits.enabled = true).await;
    let mut limited = None;
    for _ in 0..20 {
        let got = anon(
            &s,
            Method::POST,
            "/register",
            Some(json!({ "username": "flood" })),
        )
        .await;
        if got.0 == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(got);
            break;
        }
    }
    let got = limited.expect("registration was never rate limited");
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    assert!(got.1["retry_after_ms"].is_u64());
}

// ---- login, refresh, logout ----

#[tokio::test]
async fn login_flows_and_password_login() {
    let s = TestServer::start().await;
    let (status, v) = anon(&s, Method::GET, "/login", None).await;
    assert_eq!(status, StatusCode::OK);
    // Appservices log in as their users with their own type (docs/appservices.md).
    assert_eq!(
        v,
        json!({ "flows": [
            { "type": "m.login.password" },
            { "type": "m.login.application_service" },
        ] })
    );

    let alice = s.user("alice").await;
    let (status, v) = login(
        &s,
        "alice",
        "password",
        json!({ "device_id": "LAPTOP", "initial_device_display_name": "laptop" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(alice.user_id));
    assert_eq!(v["device_id"], "LAPTOP");
    let laptop = as_user(&v);
    let (_, d) = s.get(&format!("{V3}/devices/LAPTOP"), &laptop).await;
    assert_eq!(d["display_name"], "laptop");
    // Kept as `audit_ip_mode` keeps addresses (truncated by default).
    assert_eq!(d["last_seen_ip"], "127.0.0.0/24");
    assert!(d["last_seen_ts"].is_u64());

    // Legacy `user` with a full user id.
    let body =
        json!({ "type": "m.login.password", "user": "@alice:localhost", "password": "password" });
    let (status, v) = anon(&s, Method::POST, "/login", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    assert_err(
        &login(&s, "alice", "wrong", json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &login(&s, "nobody", "password", json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &login(&s, "@alice:elsewhere.org", "password", json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let got = anon(
        &s,
        Method::POST,
        "/login",
        Some(json!({ "type": "m.login.sso" })),
    )
    .await;
    assert_err(&got, 400, "M_UNKNOWN");
    let got = anon(&s, Method::POST, "/login", Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.thirdparty", "medium": "email", "address": "a@b" }, "password": "x" }))).await;
    assert_err(&got, 400, "M_UNKNOWN");
    let got = anon(
        &s,
        Method::POST,
        "/login",
        Some(json!({ "type": "m.login.password", "user": "alice", "password": 5 })),
    )
    .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = anon(
        &s,
        Method::POST,
        "/login",
        Some(json!({ "type": "m.login.password", "user": "alice" })),
    )
    .await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s
        .req_raw(Method::POST, &format!("{V3}/login"), None, b"nope")
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    let got = s
        .req_raw(Method::POST, &format!("{V3}/login"), None, b"[1]")
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
}

#[tokio::test]
async fn login_is_rate_limited() {
    let s = TestServer::start_with(|c| c.rate_limits.enabled = true).await;
    s.user("alice").await;
    let mut limited = None;
    for _ in 0..30 {
        let got = login(&s, "alice", "wrong", json!({})).await;
        if got.0 == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(got);
            break;
        }
        assert_err(&got, 403, "M_FORBIDDEN");
    }
    assert_err(
        &limited.expect("login was never rate limited"),
        429,
        "M_LIMIT_EXCEEDED",
    );
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let s = TestServer::start().await;
    s.user("alice").await;
    let (status, v) = login(&s, "alice", "password", json!({ "refresh_token": true })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["expires_in_ms"], json!(3_600_000));
    let first = as_user(&v);
    let refresh1 = v["refresh_token"].as_str().unwrap().to_owned();

    let (status, v) = anon(
        &s,
        Method::POST,
        "/refresh",
        Some(json!({ "refresh_token": refresh1 })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        v["access_token"].is_string()
            && v["refresh_token"].is_string()
            && v["expires_in_ms"].is_u64()
    );
    let second = TestUser {
        token: v["access_token"].as_str().unwrap().to_owned(),
        ..first.clone()
    };
    let (status, w) = s.get(&format!("{V3}/account/whoami"), &second).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w["device_id"], json!(first.device_id));
    // The old pair stops working.
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &first).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let got = anon(
        &s,
        Method::POST,
        "/refresh",
        Some(json!({ "refresh_token": refresh1 })),
    )
    .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let got = anon(&s, Method::POST, "/refresh", Some(json!({}))).await;
    assert_err(&got, 400, "M_MISSING_PARAM");
}

#[tokio::test]
async fn expired_access_token_is_soft_logout() {
    let s = TestServer::start_with(|c| c.access_token_lifetime_secs = 0).await;
    s.user("alice").await;
    let (_, v) = login(&s, "alice", "password", json!({ "refresh_token": true })).await;
    let got = s.get(&format!("{V3}/account/whoami"), &as_user(&v)).await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(got.1["soft_logout"], true);
    let (status, _) = anon(
        &s,
        Method::POST,
        "/refresh",
        Some(json!({ "refresh_token": v["refresh_token"] })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn logout_and_logout_all() {
    let s = TestServer::start().await;
    let a1 = s.user("alice").await;
    let (_, v) = login(&s, "alice", "password", json!({})).await;
    let a2 = as_user(&v);
    let (_, v) = login(&s, "alice", "password", json!({})).await;
    let a3 = as_user(&v);

    assert_err(
        &anon(&s, Method::POST, "/logout", Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
    let (status, v) = s.post(&format!("{V3}/logout"), &a1, json!({})).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &a1).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let (_, devices) = s.get(&format!("{V3}/devices"), &a2).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2, "{devices}");

    let (status, _) = s.post(&format!("{V3}/logout/all"), &a2, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &a2).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &a3).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
}

#[tokio::test]
async fn whoami_needs_a_valid_token() {
    let s = TestServer::start().await;
    assert_err(
        &anon(&s, Method::GET, "/account/whoami", None).await,
        401,
        "M_MISSING_TOKEN",
    );
    let got = s
        .req(
            Method::GET,
            &format!("{V3}/account/whoami"),
            Some("bogus"),
            None,
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(got.1["soft_logout"], false);
}

// ---- password change, deactivation, 3pids ----

#[tokio::test]
async fn change_password_with_reauth() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (_, v) = login(&s, "alice", "password", json!({})).await;
    let other = as_user(&v);
    let path = format!("{V3}/account/password");

    let (status, ch) = s
        .post(&path, &alice, json!({ "new_password": "new-pw" }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.password"] }]));
    let session = ch["session"].as_str().unwrap();

    let wrong = json!({ "new_password": "new-pw", "auth": { "type": "m.login.password", "session": session,
        "identifier": { "type": "m.id.user", "user": "alice" }, "password": "nope" } });
    let (status, v) = s.post(&path, &alice, wrong).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["errcode"], "M_FORBIDDEN");
    // Authenticating as someone else is refused.
    s.user("bob").await;
    let as_bob = json!({ "new_password": "x", "auth": { "type": "m.login.password", "session": session,
        "identifier": { "type": "m.id.user", "user": "bob" }, "password": "password" } });
    let (status, v) = s.post(&path, &alice, as_bob).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["errcode"], "M_FORBIDDEN");

    let got = s.post(&path, &alice, json!({ "new_password": 7 })).await;
    assert_err(&got, 400, "M_BAD_JSON");

    let ok = json!({ "new_password": "new-pw", "auth": { "type": "m.login.password", "session": session,
        "identifier": { "type": "m.id.user", "user": "alice" }, "password": "password" } });
    let (status, v) = s.post(&path, &alice, ok).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    // The current device stays, the others are logged out.
    assert_eq!(
        s.get(&format!("{V3}/account/whoami"), &alice).await.0,
        StatusCode::OK
    );
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &other).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &login(&s, "alice", "password", json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (status, v) = login(&s, "alice", "new-pw", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let third = as_user(&v);

    // logout_devices: false keeps the other devices.
    let keep = json!({ "new_password": "pw3", "logout_devices": false,
        "auth": { "type": "m.login.password", "user": "alice", "password": "new-pw" } });
    let (status, _) = s.post(&path, &alice, keep).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.get(&format!("{V3}/account/whoami"), &third).await.0,
        StatusCode::OK
    );
    assert_err(
        &s.req(Method::POST, &path, None, Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test]
async fn deactivate_leaves_rooms_and_locks_account() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = room_with(&s, &alice).await;
    let path = format!("{V3}/account/deactivate");

    let (status, ch) = s.post(&path, &alice, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.password"] }]));
    let body = json!({ "auth": { "type": "m.login.password", "session": ch["session"],
        "identifier": { "type": "m.id.user", "user": alice.user_id }, "password": "password" } });
    let (status, v) = s.post(&path, &alice, body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({ "id_server_unbind_result": "no-support" }));

    assert_eq!(
        member_content(&s, &room, &alice.user_id)["membership"],
        "leave"
    );
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &alice).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    // Deactivation removed the password: logging in is refused like any wrong password
    // (`M_USER_DEACTIVATED` only ever goes to the right one).
    assert_err(
        &login(&s, "alice", "password", json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    // The id stays taken.
    let got = anon(&s, Method::GET, "/register/available?username=alice", None).await;
    assert_err(&got, 400, "M_USER_IN_USE");
}

#[tokio::test]
async fn third_party_ids_are_off() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (status, v) = s.get(&format!("{V3}/account/3pid"), &alice).await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "threepids": [] })));
    let got = s
        .post(
            &format!("{V3}/account/3pid/add"),
            &alice,
            json!({ "sid": "x", "client_secret": "y" }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = anon(&s, Method::POST, "/account/3pid/add", Some(json!({}))).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = anon(
        &s,
        Method::POST,
        "/register/email/requestToken",
        Some(json!({ "email": "a@b.c" })),
    )
    .await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

// ---- devices ----

#[tokio::test]
async fn devices_list_show_rename_delete() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (_, v) = login(&s, "alice", "password", json!({ "device_id": "PHONE" })).await;
    let phone = as_user(&v);
    let (_, v) = login(&s, "alice", "password", json!({ "device_id": "TABLET" })).await;
    let tablet = as_user(&v);

    let (status, v) = s.get(&format!("{V3}/devices"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    let mut ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![alice.device_id.as_str(), "PHONE", "TABLET"];
    want.sort();
    assert_eq!(ids, want);

    let (status, v) = s
        .put(
            &format!("{V3}/devices/PHONE"),
            &alice,
            json!({ "display_name": "My phone" }),
        )
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    let (status, v) = s.get(&format!("{V3}/devices/PHONE"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["device_id"], "PHONE");
    assert_eq!(v["display_name"], "My phone");
    assert_err(
        &s.get(&format!("{V3}/devices/NOPE"), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(
            &format!("{V3}/devices/NOPE"),
            &alice,
            json!({ "display_name": "x" }),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.put(
            &format!("{V3}/devices/PHONE"),
            &alice,
            json!({ "display_name": 1 }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &anon(&s, Method::GET, "/devices", None).await,
        401,
        "M_MISSING_TOKEN",
    );
    // Another user's device is simply unknown.
    let bob = s.user("bob").await;
    assert_err(
        &s.get(&format!("{V3}/devices/PHONE"), &bob).await,
        404,
        "M_NOT_FOUND",
    );

    // Deleting needs the password.
    let path = format!("{V3}/devices/PHONE");
    let (status, ch) = s
        .req(Method::DELETE, &path, Some(&alice.token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(ch["flows"], json!([{ "stages": ["m.login.password"] }]));
    let auth = json!({ "auth": { "type": "m.login.password", "session": ch["session"], "user": "alice", "password": "password" } });
    let (status, v) = s
        .req(Method::DELETE, &path, Some(&alice.token), Some(auth))
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &phone).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let got = s
        .req(Method::DELETE, &path, Some(&alice.token), Some(json!({})))
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // Bulk delete.
    let path = format!("{V3}/delete_devices");
    let (status, ch) = s
        .post(&path, &alice, json!({ "devices": ["TABLET"] }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body = json!({ "devices": ["TABLET", "UNKNOWN"], "auth": { "type": "m.login.password", "session": ch["session"], "user": "alice", "password": "password" } });
    let (status, v) = s.post(&path, &alice, body).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    assert_err(
        &s.get(&format!("{V3}/account/whoami"), &tablet).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "devices": "TABLET" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({ "devices": [1] })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.post(&path, &alice, json!({})).await,
        400,
        "M_MISSING_PARAM",
    );
    let (_, v) = s.get(&format!("{V3}/devices"), &alice).await;
    assert_eq!(v["devices"].as_array().unwrap().len(), 1);
}

// ---- profile ----

#[tokio::test]
async fn profile_fields_and_room_propagation() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = room_with(&s, &alice).await;
    let me = enc(&alice.user_id);

    let (status, v) = s
        .put(
            &format!("{V3}/profile/{me}/displayname"),
            &alice,
            json!({ "displayname": "Alice A." }),
        )
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    let (status, v) = s
        .put(
            &format!("{V3}/profile/{me}/avatar_url"),
            &alice,
            json!({ "avatar_url": "mxc://localhost/abc" }),
        )
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));

    let (status, v) = s.get(&format!("{V3}/profile/{me}"), &bob).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v,
        json!({ "displayname": "Alice A.", "avatar_url": "mxc://localhost/abc" })
    );
    let (_, v) = s
        .get(
            &format!("/_matrix/client/r0/profile/{me}/displayname"),
            &bob,
        )
        .await;
    assert_eq!(v, json!({ "displayname": "Alice A." }));

    // The room sees the new name and avatar as a join event.
    let member = member_content(&s, &room, &alice.user_id);
    assert_eq!(member["membership"], "join");
    assert_eq!(member["displayname"], "Alice A.");
    assert_eq!(member["avatar_url"], "mxc://localhost/abc");

    // Errors.
    let got = s
        .put(
            &format!("{V3}/profile/{me}/displayname"),
            &bob,
            json!({ "displayname": "evil" }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .put(
            &format!("{V3}/profile/{me}/displayname"),
            &alice,
            json!({ "displayname": 42 }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(
            &format!("{V3}/profile/{me}/avatar_url"),
            &alice,
            json!({ "avatar_url": ["x"] }),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(&format!("{V3}/profile/{me}/displayname"), &alice, json!({}))
        .await;
    assert_err(&got, 400, "M_MISSING_PARAM");
    let got = s
        .get(&format!("{V3}/profile/{}", enc("@ghost:localhost")), &alice)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!("{V3}/profile/{}/displayname", enc("@ghost:localhost")),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!("{V3}/profile/{}/avatar_url", enc(&bob.user_id)),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .req(
            Method::PUT,
            &format!("{V3}/profile/{me}/displayname"),
            None,
            Some(json!({ "displayname": "x" })),
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");

    // Removing the display name reaches the room too.
    let (status, _) = s
        .req(
            Method::DELETE,
            &format!("{V3}/profile/{me}/displayname"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let member = member_content(&s, &room, &alice.user_id);
    assert!(member.get("displayname").is_none(), "{member}");
    assert_eq!(member["avatar_url"], "mxc://localhost/abc");
}

#[tokio::test]
async fn custom_profile_fields() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let me = enc(&alice.user_id);
    let path = format!("{V3}/profile/{me}/org.example.pronouns");
    let (status, _) = s
        .put(
            &path,
            &alice,
            json!({ "org.example.pronouns": { "en": "she/her" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s.get(&path, &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({ "org.example.pronouns": { "en": "she/her" } }));
    let (status, _) = s.req(Method::DELETE, &path, Some(&alice.token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_err(&s.get(&path, &alice).await, 404, "M_NOT_FOUND");

    let long = "k".repeat(300);
    let got = s
        .put(
            &format!("{V3}/profile/{me}/{long}"),
            &alice,
            json!({ long.clone(): 1 }),
        )
        .await;
    assert_err(&got, 400, "M_KEY_TOO_LARGE");
    let big = "x".repeat(70 * 1024);
    let got = s
        .put(
            &format!("{V3}/profile/{me}/org.example.big"),
            &alice,
            json!({ "org.example.big": big }),
        )
        .await;
    assert_err(&got, 400, "M_PROFILE_TOO_LARGE");
    let bob = s.user("bob").await;
    let got = s.req(Method::DELETE, &path, Some(&bob.token), None).await;
    assert_err(&got, 403, "M_FORBIDDEN");
}

// ---- account data and tags ----

#[tokio::test]
async fn global_and_room_account_data() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let me = enc(&alice.user_id);
    let path = format!("{V3}/user/{me}/account_data/org.example.settings");

    assert_err(&s.get(&path, &alice).await, 404, "M_NOT_FOUND");
    let (status, v) = s.put(&path, &alice, json!({ "theme": "dark" })).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    let (status, v) = s.get(&path, &alice).await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "theme": "dark" })));

    assert_err(&s.get(&path, &bob).await, 403, "M_FORBIDDEN");
    assert_err(&s.put(&path, &bob, json!({})).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.req(Method::GET, &path, None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
    assert_err(
        &s.req(Method::GET, &path, Some("bad"), None).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_err(
        &s.put(&path, &alice, json!([1, 2])).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.put(&path, &alice, json!("text")).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::PUT, &path, Some(&alice.token), b"{oops")
            .await,
        400,
        "M_NOT_JSON",
    );
    let fully_read = format!("{V3}/user/{me}/account_data/m.fully_read");
    assert_err(
        &s.put(&fully_read, &alice, json!({ "event_id": "$x" }))
            .await,
        400,
        "M_BAD_JSON",
    );

    // Room account data, also for a room the server does not know.
    let room = enc("!somewhere:localhost");
    let rpath = format!("{V3}/user/{me}/rooms/{room}/account_data/org.example.note");
    assert_err(&s.get(&rpath, &alice).await, 404, "M_NOT_FOUND");
    let (status, _) = s.put(&rpath, &alice, json!({ "note": "hi" })).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s.get(&rpath, &alice).await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "note": "hi" })));
    // Global and room data of the same type are separate.
    assert_err(
        &s.get(
            &format!("{V3}/user/{me}/account_data/org.example.note"),
            &alice,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(&s.get(&rpath, &bob).await, 403, "M_FORBIDDEN");
    let got = s
        .put(
            &format!("{V3}/user/{me}/rooms/{room}/account_data/m.fully_read"),
            &alice,
            json!({}),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = s
        .put(
            &format!("{V3}/user/{me}/rooms/not-a-room/account_data/x"),
            &alice,
            json!({}),
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn room_tags() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let me = enc(&alice.user_id);
    let room = enc("!r:localhost");
    let tags = format!("{V3}/user/{me}/rooms/{room}/tags");

    let (status, v) = s.get(&tags, &alice).await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "tags": {} })));
    let (status, _) = s
        .put(
            &format!("{tags}/m.favourite"),
            &alice,
            json!({ "order": 0.25 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s.put(&format!("{tags}/u.work"), &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, v) = s.get(&tags, &alice).await;
    assert_eq!(
        v,
        json!({ "tags": { "m.favourite": { "order": 0.25 }, "u.work": {} } })
    );
    // Tags are room account data of type m.tag.
    let (_, v) = s
        .get(
            &format!("{V3}/user/{me}/rooms/{room}/account_data/m.tag"),
            &alice,
        )
        .await;
    assert_eq!(v["tags"]["u.work"], json!({}));

    let (status, _) = s
        .req(
            Method::DELETE,
            &format!("{tags}/u.work"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, v) = s.get(&tags, &alice).await;
    assert_eq!(v, json!({ "tags": { "m.favourite": { "order": 0.25 } } }));

    assert_err(
        &s.put(&format!("{tags}/u.x"), &alice, json!({ "order": "high" }))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(&s.get(&tags, &bob).await, 403, "M_FORBIDDEN");
    assert_err(
        &s.put(&format!("{tags}/u.x"), &bob, json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &s.req(Method::GET, &tags, None, None).await,
        401,
        "M_MISSING_TOKEN",
    );
}

// ---- filters ----

#[tokio::test]
async fn filters_create_and_get() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let me = enc(&alice.user_id);
    let path = format!("{V3}/user/{me}/filter");
    let filter =
        json!({ "room": { "timeline": { "limit": 10 } }, "event_fields": ["type", "content"] });

    let (status, v) = s.post(&path, &alice, filter.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id = v["filter_id"].as_str().expect("filter_id").to_owned();
    let (status, v) = s.get(&format!("{path}/{id}"), &alice).await;
    assert_eq!((status, v), (StatusCode::OK, filter));

    assert_err(
        &s.get(&format!("{path}/unknown"), &alice).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &s.get(&format!("{path}/{id}"), &bob).await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(&s.post(&path, &bob, json!({})).await, 403, "M_FORBIDDEN");
    assert_err(&s.post(&path, &alice, json!([1])).await, 400, "M_BAD_JSON");
    assert_err(
        &s.post(
            &path,
            &alice,
            json!({ "room": { "timeline": { "limit": "ten" } } }),
        )
        .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &s.req_raw(Method::POST, &path, Some(&alice.token), b"{")
            .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &s.req(Method::POST, &path, None, Some(json!({}))).await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test]
async fn whois_for_admins_and_oneself() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let (status, body) = s
        .get(&format!("{V3}/admin/whois/{}", enc(&alice.user_id)), &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], json!(alice.user_id));
    assert!(
        body["devices"][&alice.device_id]["sessions"].is_array(),
        "{body}"
    );
    let got = s
        .get(&format!("{V3}/admin/whois/{}", enc(&alice.user_id)), &bob)
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let uid = ruma::UserId::parse(bob.user_id.as_str()).expect("user id");
    s.services().accounts.set_admin(&uid, true).expect("admin");
    let (status, body) = s
        .get(&format!("{V3}/admin/whois/{}", enc(&alice.user_id)), &bob)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["devices"].as_object().map(|d| d.len()), Some(1));
    let got = s
        .get(
            &format!("{V3}/admin/whois/{}", enc("@ghost:localhost")),
            &bob,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn admins_suspend_and_lock_accounts() {
    const V1: &str = "/_matrix/client/v1";
    let s = TestServer::start().await;
    let admin = s.user("admin").await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let admin_id = ruma::UserId::parse(admin.user_id.as_str()).expect("user id");
    s.services()
        .accounts
        .set_admin(&admin_id, true)
        .expect("admin");
    let room = s
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, sent) = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/before", enc(&room)),
            &alice,
            json!({ "msgtype": "m.text", "body": "mine" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let own_event = sent["event_id"].as_str().expect("event id").to_owned();

    // Admins see the capability; others do not.
    let (_, caps) = s.get(&format!("{V3}/capabilities"), &admin).await;
    assert_eq!(
        caps["capabilities"]["m.account_moderation"],
        json!({ "suspend": true, "lock": true })
    );
    let (_, caps) = s.get(&format!("{V3}/capabilities"), &alice).await;
    assert!(caps["capabilities"].get("m.account_moderation").is_none());

    let suspend = format!("{V1}/admin/suspend/{}", enc(&alice.user_id));
    // Only admins; checked before the target is looked up.
    let got = s.get(&suspend, &bob).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .get(
            &format!("{V1}/admin/suspend/{}", enc("@ghost:localhost")),
            &bob,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s
        .get(
            &format!("{V1}/admin/suspend/{}", enc("@ghost:localhost")),
            &admin,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = s
        .get(
            &format!("{V1}/admin/suspend/{}", enc("@x:elsewhere.org")),
            &admin,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = s
        .put(
            &format!("{V1}/admin/suspend/{}", enc(&admin.user_id)),
            &admin,
            json!({ "suspended": true }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = s.put(&suspend, &admin, json!({ "suspended": "yes" })).await;
    assert_err(&got, 400, "M_BAD_JSON");

    let (status, body) = s.get(&suspend, &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "suspended": false }));
    let (status, body) = s.put(&suspend, &admin, json!({ "suspended": true })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "suspended": true }));
    let (_, body) = s.get(&suspend, &admin).await;
    assert_eq!(body, json!({ "suspended": true }));

    // Suspended: reading works, writing does not; redacting own events and leaving do.
    let (status, _) = s.get(&format!("{V3}/sync"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    let got = s
        .put(
            &format!("{V3}/rooms/{}/send/m.room.message/during", enc(&room)),
            &alice,
            json!({ "msgtype": "m.text", "body": "no" }),
        )
        .await;
    assert_err(&got, 403, "M_USER_SUSPENDED");
    let got = s.post(&format!("{V3}/createRoom"), &alice, json!({})).await;
    assert_err(&got, 403, "M_USER_SUSPENDED");
    let got = s
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&alice.user_id)),
            &alice,
            json!({ "displayname": "x" }),
        )
        .await;
    assert_err(&got, 403, "M_USER_SUSPENDED");
    let got = s
        .post(
            &format!("{V3}/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_err(&got, 403, "M_USER_SUSPENDED");
    let (status, body) = s
        .put(
            &format!("{V3}/rooms/{}/redact/{}/r1", enc(&room), enc(&own_event)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&room)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.put(&suspend, &admin, json!({ "suspended": false })).await;
    let (status, _) = s.post(&format!("{V3}/createRoom"), &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Locked: every request refused with soft logout, except logging out.
    let lock = format!("{V1}/admin/lock/{}", enc(&bob.user_id));
    let (status, body) = s.put(&lock, &admin, json!({ "locked": true })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "locked": true }));
    let (status, body) = s.get(&format!("{V3}/account/whoami"), &bob).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["errcode"], json!("M_USER_LOCKED"));
    assert_eq!(body["soft_logout"], json!(true));
    let (_, body) = s.get(&lock, &admin).await;
    assert_eq!(body, json!({ "locked": true }));
    s.put(&lock, &admin, json!({ "locked": false })).await;
    let (status, _) = s.get(&format!("{V3}/account/whoami"), &bob).await;
    assert_eq!(status, StatusCode::OK);
    s.put(&lock, &admin, json!({ "locked": true })).await;
    let (status, body) = s.post(&format!("{V3}/logout"), &bob, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// ---- registration tokens under attack ----

/// A server whose only registration is with tokens made here, and an admin to read them.
async fn token_server(adjust: impl FnOnce(&mut hafen::config::Config)) -> (TestServer, TestUser) {
    let s = TestServer::start_with(|c| {
        c.registration_token = None;
        adjust(c);
    })
    .await;
    let admin = s.user("tokenadmin").await;
    s.services()
        .accounts
        .set_admin(&ruma::UserId::parse(admin.user_id.as_str()).unwrap(), true)
        .unwrap();
    (s, admin)
}

/// The Synapse admin API's view of a registration token.
async fn token_counts(s: &TestServer, admin: &TestUser, token: &str) -> Value {
    let (status, v) = s
        .get(
            &format!("/_synapse/admin/v1/registration_tokens/{token}"),
            admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_use_token_makes_one_account_under_concurrency() {
    let (s, admin) = token_server(|_| {}).await;
    s.services()
        .accounts
        .create_registration_token(Some("single".into()), Some(1), None)
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (http, base) = (s.http.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({ "username": format!("racer{i}"), "password": "pw",
                "auth": { "type": "m.login.registration_token", "token": "single" } });
            let res = http
                .post(format!("{base}{V3}/register"))
                .json(&body)
                .send()
                .await
                .expect("sent");
            let status = res.status();
            (status, res.json::<Value>().await.expect("json"))
        }));
    }
    let mut made = 0;
    for t in tasks {
        let (status, v) = t.await.expect("task");
        if status == StatusCode::OK {
            made += 1;
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
            assert_eq!(v["errcode"], "M_UNAUTHORIZED", "{v}");
        }
    }
    assert_eq!(made, 1, "a single-use token made {made} accounts");
    let accounts = (0..10)
        .filter(|i| {
            let id = ruma::UserId::parse(format!("@racer{i}:localhost")).unwrap();
            s.services().accounts.exists(&id).unwrap()
        })
        .count();
    assert_eq!(accounts, 1);
    let v = token_counts(&s, &admin, "single").await;
    assert_eq!(v["completed"], 1, "{v}");
    assert_eq!(v["pending"], 0, "{v}");
}

#[tokio::test]
async fn token_use_is_held_by_the_session_that_passed_the_stage() {
    // With the privacy notice, the token stage does not finish registration: the session holds
    // the token's use while the user reads the notice.
    let (s, admin) = token_server(|c| {
        c.privacy_notice = Some(hafen::config::PrivacyNotice {
            url: "https://example.org/privacy".into(),
            version: "1".into(),
            name: None,
            block_until_accepted: true,
        });
    })
    .await;
    s.services()
        .accounts
        .create_registration_token(Some("held".into()), Some(1), None)
        .unwrap();
    let token_stage = |name: &str, session: Option<&str>| {
        let mut auth = json!({ "type": "m.login.registration_token", "token": "held" });
        if let Some(id) = session {
            auth["session"] = json!(id);
        }
        json!({ "username": name, "password": "pw", "auth": auth })
    };
    let (status, a) = anon(
        &s,
        Method::POST,
        "/register",
        Some(token_stage("first", None)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{a}");
    assert_eq!(a["completed"], json!(["m.login.registration_token"]), "{a}");
    let session_a = a["session"].as_str().unwrap().to_owned();
    // Naming the token again in the same session holds nothing more.
    let (status, again) = anon(
        &s,
        Method::POST,
        "/register",
        Some(token_stage("first", Some(&session_a))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(again["completed"], json!(["m.login.registration_token"]));
    let v = token_counts(&s, &admin, "held").await;
    assert_eq!(
        (v["pending"].clone(), v["completed"].clone()),
        (json!(1), json!(0)),
        "{v}"
    );
    let (_, valid) = s
        .req(
            Method::GET,
            "/_matrix/client/v1/register/m.login.registration_token/validity?token=held",
            None,
            None,
        )
        .await;
    assert_eq!(valid, json!({ "valid": false }));
    let (_, listed) = s
        .get("/_synapse/admin/v1/registration_tokens?valid=false", &admin)
        .await;
    assert_eq!(
        listed["registration_tokens"][0]["token"], "held",
        "{listed}"
    );

    // Another session cannot take the held use.
    let (status, b) = anon(
        &s,
        Method::POST,
        "/register",
        Some(token_stage("second", None)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(b["errcode"], "M_UNAUTHORIZED", "{b}");
    assert_eq!(b["completed"], json!([]), "{b}");

    // The first session finishes: the held use becomes a completed one.
    let terms = json!({ "username": "first", "password": "pw",
        "auth": { "type": "m.login.terms", "session": session_a } });
    let (status, v) = anon(&s, Method::POST, "/register", Some(terms)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], "@first:localhost");
    let v = token_counts(&s, &admin, "held").await;
    assert_eq!(
        (v["pending"].clone(), v["completed"].clone()),
        (json!(0), json!(1)),
        "{v}"
    );
    // Raising the limit (admin API) keeps the counts.
    let (status, v) = s
        .put(
            "/_synapse/admin/v1/registration_tokens/held",
            &admin,
            json!({ "uses_allowed": 2 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({ "token": "held", "uses_allowed": 2, "pending": 0, "completed": 1, "expiry_time": null })
    );
}
