//! The Application Service API: a real appservice (an axum server on 127.0.0.1 written here)
//! registered through a YAML file and through the admin API, driven over real HTTP.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode as AxStatus},
    routing::{get, post, put},
    Json, Router,
};
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, unique_txn, TestServer, TestUser};

const AS_TOKEN: &str = "as-secret-token-1";
const HS_TOKEN: &str = "hs-secret-token-1";

/// One transaction the appservice received (also the refused ones).
#[derive(Clone, Debug)]
struct Received {
    txn_id: String,
    authorization: Option<String>,
    body: Value,
    accepted: bool,
}

/// What the fake appservice saw, and how it behaves.
#[derive(Default)]
struct AsState {
    txns: Mutex<Vec<Received>>,
    /// Answer transactions with 503 (the bridge is down).
    down: AtomicBool,
    /// The homeserver's base URL, for the appservice's own calls (creating ghosts and rooms).
    hs: Mutex<Option<String>>,
    user_queries: Mutex<Vec<(String, Option<String>)>>,
    alias_queries: Mutex<Vec<String>>,
    pings: Mutex<Vec<Value>>,
    /// Status the ping answers with (0: 200).
    ping_status: AtomicU16,
    thirdparty: Mutex<Vec<String>>,
}

struct FakeAs {
    addr: SocketAddr,
    state: Arc<AsState>,
}

impl FakeAs {
    async fn start() -> FakeAs {
        let state = Arc::new(AsState::default());
        let app = Router::new()
            .route("/_matrix/app/v1/transactions/{txn}", put(as_transaction))
            .route("/_matrix/app/v1/users/{user}", get(as_user_query))
            .route("/_matrix/app/v1/rooms/{alias}", get(as_room))
            .route("/_matrix/app/v1/ping", post(as_ping))
            .route(
                "/_matrix/app/v1/thirdparty/protocol/{protocol}",
                get(as_protocol),
            )
            .route(
                "/_matrix/app/v1/thirdparty/user/{protocol}",
                get(as_tp_user),
            )
            .route("/_matrix/app/v1/thirdparty/location", get(as_tp_location))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeAs { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> Vec<Received> {
        self.state
            .txns
            .lock()
            .iter()
            .filter(|t| t.accepted)
            .cloned()
            .collect()
    }

    /// The events of every accepted transaction, in the order received.
    fn events(&self) -> Vec<Value> {
        self.accepted()
            .iter()
            .flat_map(|t| t.body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn ephemeral(&self) -> Vec<Value> {
        self.accepted()
            .iter()
            .flat_map(|t| t.body["ephemeral"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Wait (up to 30 s) until `check` holds.
    async fn wait_until(&self, what: &str, check: impl Fn(&FakeAs) -> bool) {
        for _ in 0..600 {
            if check(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}; transactions: {:?}",
            self.state.txns.lock()
        );
    }

    /// The message bodies received so far, in order.
    fn bodies(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    }
}

async fn as_transaction(
    State(st): State<Arc<AsState>>,
    Path(txn): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (AxStatus, Json<Value>) {
    let accepted = !st.down.load(Ordering::SeqCst);
    st.txns.lock().push(Received {
        txn_id: txn,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        accepted,
    });
    if accepted {
        (AxStatus::OK, Json(json!({})))
    } else {
        (AxStatus::SERVICE_UNAVAILABLE, Json(json!({})))
    }
}

/// Users `@bridge_auto*` are created on demand (registered through the homeserver), others not.
async fn as_user_query(
    State(st): State<Arc<AsState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> (AxStatus, Json<Value>) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    st.user_queries.lock().push((user.clone(), auth));
    if !user.starts_with("@bridge_auto") {
        return (
            AxStatus::NOT_FOUND,
            Json(json!({ "errcode": "M_NOT_FOUND" })),
        );
    }
    let hs = st.hs.lock().clone().unwrap();
    let localpart = user[1..].split(':').next().unwrap().to_owned();
    let res = reqwest::Client::new()
        .post(format!("{hs}/_matrix/client/v3/register"))
        .bearer_auth(AS_TOKEN)
        .json(&json!({
            "type": "m.login.application_service",
            "username": localpart,
            "inhibit_login": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    (AxStatus::OK, Json(json!({})))
}

/// Aliases `#bridge_auto*` are created on demand (a room made by the bridge bot), others not.
async fn as_room(
    State(st): State<Arc<AsState>>,
    Path(alias): Path<String>,
) -> (AxStatus, Json<Value>) {
    st.alias_queries.lock().push(alias.clone());
    if !alias.starts_with("#bridge_auto") {
        return (
            AxStatus::NOT_FOUND,
            Json(json!({ "errcode": "M_NOT_FOUND" })),
        );
    }
    let hs = st.hs.lock().clone().unwrap();
    let localpart = alias[1..].split(':').next().unwrap().to_owned();
    let res = reqwest::Client::new()
        .post(format!("{hs}/_matrix/client/v3/createRoom"))
        .bearer_auth(AS_TOKEN)
        .json(&json!({ "room_alias_name": localpart, "preset": "public_chat" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    (AxStatus::OK, Json(json!({})))
}

async fn as_ping(
    State(st): State<Arc<AsState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (AxStatus, String) {
    let mut seen = body.clone();
    seen["authorization"] = json!(headers.get("authorization").and_then(|v| v.to_str().ok()));
    st.pings.lock().push(seen);
    match st.ping_status.load(Ordering::SeqCst) {
        0 => (AxStatus::OK, "{}".to_owned()),
        code => (
            AxStatus::from_u16(code).unwrap(),
            r#"{"errcode":"M_UNKNOWN","error":"bridge broken"}"#.to_owned(),
        ),
    }
}

async fn as_protocol(
    State(st): State<Arc<AsState>>,
    Path(protocol): Path<String>,
) -> (AxStatus, Json<Value>) {
    st.thirdparty.lock().push(format!("protocol {protocol}"));
    if protocol != "gitter" {
        return (
            AxStatus::NOT_FOUND,
            Json(json!({ "errcode": "M_NOT_FOUND" })),
        );
    }
    (
        AxStatus::OK,
        Json(json!({
            "user_fields": ["username"],
            "location_fields": ["room"],
            "icon": "mxc://example.org/gitter",
            "field_types": {
                "username": { "regexp": "[a-z]+", "placeholder": "alice" },
                "room": { "regexp": "[a-z/]+", "placeholder": "matrix/spec" },
            },
            "instances": [{
                "network_id": "gitter-main",
                "desc": "Gitter",
                "fields": {},
            }],
        })),
    )
}

async fn as_tp_user(
    State(st): State<Arc<AsState>>,
    Path(protocol): Path<String>,
    RawQuery(q): RawQuery,
) -> Json<Value> {
    let q = q.unwrap_or_default();
    st.thirdparty.lock().push(format!("user {protocol} {q}"));
    Json(json!([{
        "userid": "@bridge_gitter_alice:localhost",
        "protocol": protocol,
        "fields": { "username": "alice" },
    }]))
}

async fn as_tp_location(State(st): State<Arc<AsState>>, RawQuery(q): RawQuery) -> Json<Value> {
    let q = q.unwrap_or_default();
    st.thirdparty.lock().push(format!("location {q}"));
    Json(json!([{
        "alias": "#bridge_gitter_spec:localhost",
        "protocol": "gitter",
        "fields": { "room": "matrix/spec" },
    }]))
}

/// A registration file for `fake`, with exclusive user and alias namespaces `bridge_*`.
fn registration_yaml(id: &str, url: &str, as_token: &str, hs_token: &str, sender: &str) -> String {
    format!(
        r##"# written by the bridge
id: {id}
url: {url}
as_token: "{as_token}"
hs_token: "{hs_token}"
sender_localpart: {sender}
rate_limited: false
receive_ephemeral: true
protocols: ["gitter"]
namespaces:
  users:
    - exclusive: true
      regex: "@bridge_.*:localhost"
  aliases:
    - exclusive: true
      regex: "#bridge_.*:localhost"
  rooms: []
de.sorunome.msc2409.push_ephemeral: true
"##
    )
}

/// A homeserver with the fake appservice registered through a YAML file.
async fn start_with_bridge(fake: &FakeAs, dir: &tempfile::TempDir) -> TestServer {
    start_with_bridge_and(fake, dir, |_| {}).await
}

async fn start_with_bridge_and(
    fake: &FakeAs,
    dir: &tempfile::TempDir,
    adjust: impl FnOnce(&mut hafen::config::Config),
) -> TestServer {
    let path = dir.path().join("bridge.yaml");
    std::fs::write(
        &path,
        registration_yaml("bridge", &fake.url(), AS_TOKEN, HS_TOKEN, "bridgebot"),
    )
    .unwrap();
    let server = TestServer::start_with(|c| {
        c.app_service_config_files = vec![path.clone()];
        adjust(c);
    })
    .await;
    *fake.state.hs.lock() = Some(server.base.clone());
    server
}

fn as_user(server: &TestServer, localpart: &str) -> String {
    format!("@{localpart}:{}", server.server_name())
}

/// The appservice registers a ghost user (without logging it in).
async fn register_ghost(server: &TestServer, localpart: &str) -> (StatusCode, Value) {
    server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            Some(AS_TOKEN),
            Some(json!({
                "type": "m.login.application_service",
                "username": localpart,
                "inhibit_login": true,
            })),
        )
        .await
}

async fn send_text(server: &TestServer, u: &TestUser, room: &str, body: &str) -> String {
    let (status, v) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(room),
                unique_txn()
            ),
            u,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "send: {v}");
    v["event_id"].as_str().unwrap().to_owned()
}

/// A room of alice's with the ghost `@bridge_bob` joined (invited by alice, joined through the
/// appservice asserting the ghost).
async fn bridged_room(server: &TestServer, alice: &TestUser) -> String {
    let (status, v) = register_ghost(server, "bridge_bob").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let room = server.create_room(alice, json!({})).await;
    let bob = as_user(server, "bridge_bob");
    let (status, v) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            alice,
            json!({ "user_id": bob }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = server
        .req(
            Method::POST,
            &format!(
                "/_matrix/client/v3/rooms/{}/join?user_id={}",
                enc(&room),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    room
}

#[tokio::test]
async fn yaml_registered_appservice_receives_transactions() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;

    // The sender user exists from the start; the as_token authenticates as it.
    let (status, v) = server
        .req(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(as_user(&server, "bridgebot")));
    // Acting without a device: none is reported.
    assert!(v.get("device_id").is_none(), "{v}");
    assert_eq!(v["is_guest"], json!(false));

    // The privacy statement names the bridge among the recipients (A1).
    let (status, v) = server
        .req(Method::GET, "/_hafen/client/v1/privacy", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let bridges = v["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "bridges")
        .expect("a bridges category")
        .clone();
    assert!(
        bridges["recipients"]
            .as_str()
            .unwrap()
            .ends_with(": bridge"),
        "{bridges}"
    );
    assert_eq!(bridges["settings"], json!(["app_service_config_files"]));

    let room = bridged_room(&server, &alice).await;
    let event_id = send_text(&server, &alice, &room, "hello bridge").await;
    fake.wait_until("the message", |f| {
        f.bodies().contains(&"hello bridge".to_owned())
    })
    .await;

    let accepted = fake.accepted();
    for t in &accepted {
        assert_eq!(
            t.authorization.as_deref(),
            Some(&*format!("Bearer {HS_TOKEN}"))
        );
    }
    // Transaction ids are never reused.
    let mut ids: Vec<&str> = accepted.iter().map(|t| t.txn_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), accepted.len(), "{ids:?}");
    let events = fake.events();
    let message = events
        .iter()
        .find(|e| e["event_id"] == json!(event_id))
        .expect("the message event");
    assert_eq!(message["room_id"], json!(room));
    assert_eq!(message["sender"], json!(alice.user_id));
    assert_eq!(message["type"], json!("m.room.message"));
    assert_eq!(message["content"]["body"], json!("hello bridge"));
    // The invite and join of the ghost came first (its membership interests the appservice).
    let bob = as_user(&server, "bridge_bob");
    let memberships: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["state_key"] == json!(bob))
        .map(|e| e["content"]["membership"].as_str().unwrap())
        .collect();
    assert_eq!(memberships, vec!["invite", "join"]);

    // A room with none of the appservice's users does not interest it.
    let other = server.create_room(&alice, json!({})).await;
    send_text(&server, &alice, &other, "private matter").await;
    send_text(&server, &alice, &room, "after private").await;
    fake.wait_until("the later message", |f| {
        f.bodies().contains(&"after private".to_owned())
    })
    .await;
    assert!(!fake.bodies().contains(&"private matter".to_owned()));
    assert!(fake.events().iter().all(|e| e["room_id"] != json!(other)));
    server.stop().await;
}

#[tokio::test]
async fn appservice_asserts_users_in_its_namespace_only() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A tight message limit: 5 at once, then one every 10 s.
    let server = start_with_bridge_and(&fake, &dir, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.message.burst = 5;
        c.rate_limits.message.per_second = 0.1;
    })
    .await;
    let alice = server.user("alice").await;
    let room = bridged_room(&server, &alice).await;
    let bob = as_user(&server, "bridge_bob");

    // Inside the namespace: the ghost, also through the access_token query parameter.
    let (status, v) = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}&access_token={AS_TOKEN}",
                enc(&bob)
            ),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(bob));

    // The ghost sends; the event is the ghost's.
    let (status, v) = server
        .req(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}?user_id={}",
                enc(&room),
                unique_txn(),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({ "msgtype": "m.text", "body": "from the other network" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let event_id = v["event_id"].as_str().unwrap().to_owned();
    let (status, v) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&event_id)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["sender"], json!(bob));

    // Timestamp massaging: the appservice keeps the other network's time; others cannot.
    let (status, v) = server
        .req(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}?user_id={}&ts=1500000000000",
                enc(&room),
                unique_txn(),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({ "msgtype": "m.text", "body": "sent long ago" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let old_id = v["event_id"].as_str().unwrap().to_owned();
    let (status, v) = server
        .req(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/?user_id={}&ts=1500000000001",
                enc(&room),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({ "topic": "bridged" })),
        )
        .await;
    // The ghost may not set the topic (power level), which says the request got that far.
    assert_err(&(status, v), 403, "M_FORBIDDEN");
    let (status, v) = server
        .req(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/?ts=1500000000001",
                enc(&room)
            ),
            Some(&alice.token),
            Some(json!({ "topic": "not bridged" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let topic_id = v["event_id"].as_str().unwrap().to_owned();
    for (id, old) in [(&old_id, true), (&topic_id, false)] {
        let (status, v) = server
            .get(
                &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id)),
                &alice,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(
            v["origin_server_ts"] == json!(1_500_000_000_000u64),
            old,
            "{v}"
        );
        assert_ne!(v["origin_server_ts"], json!(1_500_000_000_001u64), "{v}");
    }

    // Outside the namespace: 403, even for a user that exists.
    let got = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}",
                enc(&alice.user_id)
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Inside but not registered: 403.
    let got = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}",
                enc(&as_user(&server, "bridge_nobody"))
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Device masquerading: a device of the ghost (made by logging in as it), or 400.
    let (status, login) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(AS_TOKEN),
            Some(json!({
                "type": "m.login.application_service",
                "identifier": { "type": "m.id.user", "user": "bridge_bob" },
                "device_id": "BOBPHONE",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], json!(bob));
    assert_eq!(login["device_id"], json!("BOBPHONE"));
    assert!(login["access_token"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    let (status, v) = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}&org.matrix.msc3202.device_id=BOBPHONE",
                enc(&bob)
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["device_id"], json!("BOBPHONE"));
    let got = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}&device_id=NOSUCH",
                enc(&bob)
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // Devices made by the appservice (spec v1.17): PUT creates (201), DELETE needs no password.
    let dev_path = format!("/_matrix/client/v3/devices/BRIDGEDEV?user_id={}", enc(&bob));
    let (status, v) = server
        .req(
            Method::PUT,
            &dev_path,
            Some(AS_TOKEN),
            Some(json!({ "display_name": "bridge device" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v, json!({}));
    let (status, v) = server
        .req(
            Method::PUT,
            &dev_path,
            Some(AS_TOKEN),
            Some(json!({ "display_name": "renamed" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}&device_id=BRIDGEDEV",
                enc(&bob)
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["device_id"], json!("BRIDGEDEV"));
    let got = server
        .put("/_matrix/client/v3/devices/NEWDEV", &alice, json!({}))
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (status, v) = server
        .req(Method::DELETE, &dev_path, Some(AS_TOKEN), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let got = server
        .req(
            Method::GET,
            &format!(
                "/_matrix/client/v3/account/whoami?user_id={}&device_id=BRIDGEDEV",
                enc(&bob)
            ),
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    // An ordinary user still re-authenticates.
    let got = server
        .req(
            Method::DELETE,
            &format!("/_matrix/client/v3/devices/{}", alice.device_id),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{}", got.1);
    assert!(got.1["flows"].is_array(), "{}", got.1);

    // rate_limited: false exempts the appservice: many messages in a row are accepted where
    // the default limit (enabled in this server) stops an ordinary user.
    for i in 0..20 {
        let (status, v) = server
            .req(
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}?user_id={}",
                    enc(&room),
                    unique_txn(),
                    enc(&bob)
                ),
                Some(AS_TOKEN),
                Some(json!({ "msgtype": "m.text", "body": format!("burst {i}") })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "message {i}: {v}");
    }
    let mut limited = None;
    for i in 0..10 {
        let (status, v) = server
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(&room),
                    unique_txn()
                ),
                &alice,
                json!({ "msgtype": "m.text", "body": format!("alice {i}") }),
            )
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(v);
            break;
        }
    }
    let limited = limited.expect("alice is rate limited");
    assert_eq!(limited["errcode"], json!("M_LIMIT_EXCEEDED"));
    server.stop().await;
}

#[tokio::test]
async fn appservice_registration_login_and_exclusive_namespaces() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;

    // Registration by the appservice, with a session.
    let (status, v) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            Some(AS_TOKEN),
            Some(json!({
                "type": "m.login.application_service",
                "username": "bridge_carol",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(as_user(&server, "bridge_carol")));
    let carol_token = v["access_token"].as_str().unwrap().to_owned();
    let (status, who) = server
        .req(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&carol_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["user_id"], json!(as_user(&server, "bridge_carol")));
    // With inhibit_login: no session.
    let (status, v) = register_ghost(&server, "bridge_dave").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(as_user(&server, "bridge_dave")));
    assert!(v.get("access_token").is_none(), "{v}");
    // Taken.
    let got = register_ghost(&server, "bridge_dave").await;
    assert_err(&got, 400, "M_USER_IN_USE");
    // Outside its namespace.
    let got = register_ghost(&server, "someone").await;
    assert_err(&got, 400, "M_EXCLUSIVE");
    // Without or with a wrong token.
    let body = json!({ "type": "m.login.application_service", "username": "bridge_eve" });
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(body.clone()),
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            Some("not-a-token"),
            Some(body),
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");

    // Anyone else registering in the exclusive namespace: M_EXCLUSIVE.
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({
                "username": "bridge_mallory",
                "password": "a long password",
                "auth": { "type": "m.login.registration_token", "token": "test-token" },
            })),
        )
        .await;
    assert_err(&got, 400, "M_EXCLUSIVE");
    let got = server
        .req(
            Method::GET,
            "/_matrix/client/v3/register/available?username=bridge_mallory",
            None,
            None,
        )
        .await;
    assert_err(&got, 400, "M_EXCLUSIVE");
    let (status, v) = server
        .req(
            Method::GET,
            "/_matrix/client/v3/register/available?username=mallory",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["available"], json!(true));

    // Aliases in the exclusive namespace: refused for others, allowed for the appservice.
    let room = server.create_room(&alice, json!({})).await;
    let alias = format!("#bridge_room:{}", server.server_name());
    let got = server
        .put(
            &format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
            &alice,
            json!({ "room_id": room }),
        )
        .await;
    assert_err(&got, 400, "M_EXCLUSIVE");
    let got = server
        .post(
            "/_matrix/client/v3/createRoom",
            &alice,
            json!({ "room_alias_name": "bridge_other" }),
        )
        .await;
    assert_err(&got, 400, "M_EXCLUSIVE");
    let (status, v) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(AS_TOKEN),
            Some(json!({ "room_alias_name": "bridge_portal" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = server
        .post(
            "/_matrix/client/v3/createRoom",
            &alice,
            json!({ "room_alias_name": "alices_room" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // /login offers the type; it works only with an appservice's token and for its users.
    let (status, v) = server
        .req(Method::GET, "/_matrix/client/v3/login", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        v["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["type"] == "m.login.application_service"),
        "{v}"
    );
    let login = |user: &str| {
        json!({
            "type": "m.login.application_service",
            "identifier": { "type": "m.id.user", "user": user },
        })
    };
    let (status, v) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(AS_TOKEN),
            Some(login("bridge_dave")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], json!(as_user(&server, "bridge_dave")));
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(AS_TOKEN),
            Some(login("alice")),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(login("bridge_dave")),
        )
        .await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    server.stop().await;
}

#[tokio::test]
async fn appservice_queue_survives_downtime_and_restart() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;
    let room = bridged_room(&server, &alice).await;
    send_text(&server, &alice, &room, "warm up").await;
    fake.wait_until("the first message", |f| {
        f.bodies().contains(&"warm up".to_owned())
    })
    .await;

    // The bridge goes down: events queue and the transaction is retried.
    fake.state.down.store(true, Ordering::SeqCst);
    for i in 1..=3 {
        send_text(&server, &alice, &room, &format!("while down {i}")).await;
    }
    fake.wait_until("two refused attempts", |f| {
        f.state.txns.lock().iter().filter(|t| !t.accepted).count() >= 2
    })
    .await;
    let refused: Vec<Received> = fake
        .state
        .txns
        .lock()
        .iter()
        .filter(|t| !t.accepted)
        .cloned()
        .collect();
    // Retried unchanged: the same id and the same events.
    assert_eq!(refused[0].txn_id, refused[1].txn_id);
    assert_eq!(refused[0].body, refused[1].body);
    fake.state.down.store(false, Ordering::SeqCst);
    fake.wait_until("the queued messages", |f| {
        f.bodies().contains(&"while down 3".to_owned())
    })
    .await;
    let after_warm_up: Vec<String> = fake
        .bodies()
        .into_iter()
        .skip_while(|b| b != "warm up")
        .collect();
    assert_eq!(
        after_warm_up,
        vec!["warm up", "while down 1", "while down 2", "while down 3"]
    );
    // The accepted retry is the transaction that was refused.
    assert!(fake
        .accepted()
        .iter()
        .any(|t| t.txn_id == refused[0].txn_id && t.body == refused[0].body));

    // Down again, then Hafen restarts: the queue (and the transaction in flight) survive.
    fake.state.down.store(true, Ordering::SeqCst);
    send_text(&server, &alice, &room, "before restart 1").await;
    send_text(&server, &alice, &room, "before restart 2").await;
    let refused_before = fake
        .state
        .txns
        .lock()
        .iter()
        .filter(|t| !t.accepted)
        .count();
    fake.wait_until("a refused attempt", |f| {
        f.state.txns.lock().iter().filter(|t| !t.accepted).count() > refused_before
    })
    .await;
    let in_flight = fake
        .state
        .txns
        .lock()
        .iter()
        .rev()
        .find(|t| !t.accepted)
        .cloned()
        .unwrap();
    server.restart().await;
    *fake.state.hs.lock() = Some(server.base.clone());
    let (events, _) = server
        .services()
        .appservices
        .queue
        .queued("bridge")
        .unwrap();
    assert!(events >= 2, "{events} events queued");
    fake.state.down.store(false, Ordering::SeqCst);
    fake.wait_until("the messages from before the restart", |f| {
        f.bodies().contains(&"before restart 2".to_owned())
    })
    .await;
    let tail: Vec<String> = fake
        .bodies()
        .into_iter()
        .skip_while(|b| b != "while down 3")
        .collect();
    assert_eq!(
        tail,
        vec!["while down 3", "before restart 1", "before restart 2"]
    );
    assert!(fake
        .accepted()
        .iter()
        .any(|t| t.txn_id == in_flight.txn_id && t.body == in_flight.body));
    // Everything acknowledged is gone from the queue.
    let mut left = (1, 1);
    for _ in 0..100 {
        left = server
            .services()
            .appservices
            .queue
            .queued("bridge")
            .unwrap();
        if left == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn unknown_users_and_aliases_are_asked_of_the_appservice() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;

    // A profile lookup of an unknown ghost: the appservice creates it.
    let ghost = as_user(&server, "bridge_auto_one");
    let (status, v) = server
        .get(
            &format!("/_matrix/client/v3/profile/{}", enc(&ghost)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["displayname"], json!("bridge_auto_one"));
    {
        let queries = fake.state.user_queries.lock();
        assert_eq!(queries.len(), 1);
        assert_eq!(queries[0].0, ghost);
        assert_eq!(
            queries[0].1.as_deref(),
            Some(&*format!("Bearer {HS_TOKEN}"))
        );
    }
    // One it does not know: still 404, after asking.
    let nobody = as_user(&server, "bridge_nobody");
    let got = server
        .get(
            &format!("/_matrix/client/v3/profile/{}", enc(&nobody)),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    assert_eq!(fake.state.user_queries.lock().len(), 2);
    // Outside every namespace nobody is asked.
    let got = server
        .get(
            &format!(
                "/_matrix/client/v3/profile/{}",
                enc(&as_user(&server, "stranger"))
            ),
            &alice,
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    assert_eq!(fake.state.user_queries.lock().len(), 2);

    // Inviting an unknown ghost: asked first, then invited.
    let room = server.create_room(&alice, json!({})).await;
    let ghost2 = as_user(&server, "bridge_auto_two");
    let (status, v) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": ghost2 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(fake.state.user_queries.lock()[2].0, ghost2);

    // An unknown alias in the namespace: the appservice makes the room, then it resolves.
    let alias = format!("#bridge_auto_room:{}", server.server_name());
    let (status, v) = server
        .get(
            &format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["room_id"].as_str().is_some_and(|r| r.starts_with('!')));
    assert_eq!(fake.state.alias_queries.lock().clone(), vec![alias.clone()]);
    // Joining by an alias the appservice does not know: 404 after asking.
    let unknown = format!("#bridge_none:{}", server.server_name());
    let got = server
        .post(
            &format!("/_matrix/client/v3/join/{}", enc(&unknown)),
            &alice,
            json!({}),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    assert_eq!(fake.state.alias_queries.lock().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn appservice_ping_reports_the_spec_errors() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;
    let path = "/_matrix/client/v1/appservice/bridge/ping";

    let (status, v) = server
        .req(
            Method::POST,
            path,
            Some(AS_TOKEN),
            Some(json!({ "transaction_id": "ping-1" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["duration_ms"].as_u64().is_some(), "{v}");
    {
        let pings = fake.state.pings.lock();
        assert_eq!(pings.len(), 1);
        assert_eq!(pings[0]["transaction_id"], json!("ping-1"));
        assert_eq!(
            pings[0]["authorization"],
            json!(format!("Bearer {HS_TOKEN}"))
        );
    }

    // Only the appservice itself.
    let got = server.post(path, &alice, json!({})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v1/appservice/other/ping",
            Some(AS_TOKEN),
            Some(json!({})),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // The appservice answers with an error.
    fake.state.ping_status.store(500, Ordering::SeqCst);
    let got = server
        .req(Method::POST, path, Some(AS_TOKEN), Some(json!({})))
        .await;
    assert_err(&got, 502, "M_BAD_STATUS");
    assert_eq!(got.1["status"], json!(500));
    assert!(
        got.1["body"].as_str().unwrap().contains("bridge broken"),
        "{}",
        got.1
    );

    // Unreachable, and without a URL (registered through the admin API).
    let admin = admin_user(&server, "root").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, v) = server
        .post(
            "/_hafen/admin/v1/appservices",
            &admin,
            json!({
                "id": "gone", "url": format!("http://{closed}"), "as_token": "gone-as",
                "hs_token": "gone-hs", "sender_localpart": "gonebot",
                "namespaces": { "users": [], "aliases": [], "rooms": [] },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v1/appservice/gone/ping",
            Some("gone-as"),
            Some(json!({})),
        )
        .await;
    assert_err(&got, 502, "M_CONNECTION_FAILED");
    let (status, v) = server
        .post(
            "/_hafen/admin/v1/appservices",
            &admin,
            json!({
                "id": "clientonly", "url": null, "as_token": "co-as",
                "hs_token": "co-hs", "sender_localpart": "cobot",
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let got = server
        .req(
            Method::POST,
            "/_matrix/client/v1/appservice/clientonly/ping",
            Some("co-as"),
            Some(json!({})),
        )
        .await;
    assert_err(&got, 400, "M_URL_NOT_SET");
    server.stop().await;
}

async fn admin_user(server: &TestServer, name: &str) -> TestUser {
    let u = server.user(name).await;
    let id = ruma::UserId::parse(u.user_id.as_str()).unwrap();
    server.services().accounts.set_admin(&id, true).unwrap();
    u
}

#[tokio::test]
async fn admin_api_registers_lists_and_removes_appservices() {
    let config_fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with_bridge(&config_fake, &dir).await;
    let admin = admin_user(&server, "root").await;
    let alice = server.user("alice").await;
    let fake = FakeAs::start().await;
    *fake.state.hs.lock() = Some(server.base.clone());
    let registration = json!({
        "id": "hookshot",
        "url": fake.url(),
        "as_token": "hookshot-as",
        "hs_token": "hookshot-hs",
        "sender_localpart": "hookshot",
        "namespaces": {
            "users": [{ "exclusive": true, "regex": "@hook_.*" }],
            "aliases": [],
            "rooms": [],
        },
    });

    // Not an admin: 403, audited.
    let got = server
        .post("/_hafen/admin/v1/appservices", &alice, registration.clone())
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = server.get("/_hafen/admin/v1/appservices", &alice).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    let (status, v) = server
        .post("/_hafen/admin/v1/appservices", &admin, registration.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["id"], json!("hookshot"));
    assert_eq!(v["sender"], json!(as_user(&server, "hookshot")));
    assert_eq!(v["source"], json!("admin_api"));
    // Same id, same as_token, a bad regex: refused, naming the field.
    let got = server
        .post("/_hafen/admin/v1/appservices", &admin, registration.clone())
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    assert!(
        got.1["error"].as_str().unwrap().contains("`id`"),
        "{}",
        got.1
    );
    let mut same_token = registration.clone();
    same_token["id"] = json!("copy");
    let got = server
        .post("/_hafen/admin/v1/appservices", &admin, same_token)
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    assert!(
        got.1["error"].as_str().unwrap().contains("as_token"),
        "{}",
        got.1
    );
    let mut bad_regex = registration.clone();
    bad_regex["id"] = json!("bad");
    bad_regex["as_token"] = json!("bad-as");
    bad_regex["namespaces"]["users"] = json!([{ "exclusive": true, "regex": "@(unclosed" }]);
    let got = server
        .post("/_hafen/admin/v1/appservices", &admin, bad_regex)
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    assert!(
        got.1["error"]
            .as_str()
            .unwrap()
            .contains("namespaces.users[0].regex"),
        "{}",
        got.1
    );
    // Registered from YAML text too.
    let (status, v) = server
        .post(
            "/_hafen/admin/v1/appservices",
            &admin,
            json!({ "yaml": "id: yamlbridge\nurl: null\nas_token: y-as\nhs_token: y-hs\nsender_localpart: ybot\nnamespaces: {}\n" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // The list: all three, no tokens.
    let (status, v) = server.get("/_hafen/admin/v1/appservices", &admin).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["appservices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["bridge", "hookshot", "yamlbridge"]);
    let text = v.to_string();
    assert!(!text.contains("hookshot-as") && !text.contains("hookshot-hs"));
    assert!(!text.contains(AS_TOKEN) && !text.contains(HS_TOKEN));

    // It works at once: its token, its namespace, its transactions.
    let (status, v) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/register",
            Some("hookshot-as"),
            Some(json!({ "type": "m.login.application_service", "username": "hook_1", "inhibit_login": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let room = server.create_room(&alice, json!({})).await;
    let hook = as_user(&server, "hook_1");
    let (status, v) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": hook }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    fake.wait_until("the invite", |f| {
        f.events()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == json!(hook))
    })
    .await;
    assert!(fake
        .accepted()
        .iter()
        .all(|t| t.authorization.as_deref() == Some("Bearer hookshot-hs")));

    // `hafen audit` (here its admin endpoint) names it among the outbound destinations.
    let (status, v) = server
        .get("/_hafen/admin/v1/compliance_report", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let a11 = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "A11")
        .unwrap()
        .clone();
    assert_eq!(a11["status"], json!("met"), "{a11}");
    let findings = a11["findings"].to_string();
    assert!(
        findings.contains(&format!(
            "appservice hookshot (admin API) at {}",
            fake.url()
        )),
        "{findings}"
    );
    assert!(findings.contains("appservice bridge ("), "{findings}");

    // It survives a restart; the file's one cannot be removed here.
    server.restart().await;
    let (status, v) = server
        .get("/_hafen/admin/v1/appservices/hookshot", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["url"], json!(fake.url()));
    let got = server
        .req(
            Method::DELETE,
            "/_hafen/admin/v1/appservices/bridge",
            Some(&admin.token),
            None,
        )
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let (status, v) = server
        .req(
            Method::DELETE,
            "/_hafen/admin/v1/appservices/hookshot",
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let got = server
        .get("/_hafen/admin/v1/appservices/hookshot", &admin)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = server
        .req(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some("hookshot-as"),
            None,
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");

    // The changes are in the audit log, with the appservice and never a token.
    let (status, v) = server
        .get("/_hafen/admin/v1/audit?kind=admin_action&limit=100", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v.to_string();
    assert!(!text.contains("hookshot-as") && !text.contains("hookshot-hs"));
    let entries = v["entries"].as_array().expect("entries");
    let changes: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["detail"]["endpoint"] == "appservices" && e["detail"].get("change").is_some())
        .map(|e| {
            (
                e["detail"]["change"].as_str().unwrap(),
                e["detail"]["appservice"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(changes.contains(&("register", "hookshot")), "{changes:?}");
    assert!(changes.contains(&("delete", "hookshot")), "{changes:?}");
    // The appservices contacted are in the register of destinations.
    let (status, v) = server.get("/_hafen/admin/v1/destinations", &admin).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v.to_string();
    assert!(text.contains("appservice"), "{v}");
    assert!(text.contains(&fake.url()), "{v}");
    server.stop().await;
}

#[tokio::test]
async fn bad_registration_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing_hs = dir.path().join("missing.yaml");
    std::fs::write(
        &missing_hs,
        "id: x\nurl: null\nas_token: a\nsender_localpart: xbot\n",
    )
    .unwrap();
    let bad_regex = dir.path().join("regex.yaml");
    std::fs::write(
        &bad_regex,
        "id: y\nurl: null\nas_token: a\nhs_token: h\nsender_localpart: ybot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@(\"\n",
    )
    .unwrap();
    let one = dir.path().join("one.yaml");
    std::fs::write(
        &one,
        registration_yaml("one", "http://127.0.0.1:9", "same", "h1", "onebot"),
    )
    .unwrap();
    let two = dir.path().join("two.yaml");
    std::fs::write(
        &two,
        registration_yaml("two", "http://127.0.0.1:9", "same", "h2", "twobot"),
    )
    .unwrap();

    for (files, file, field) in [
        (vec![missing_hs.clone()], &missing_hs, "hs_token"),
        (
            vec![bad_regex.clone()],
            &bad_regex,
            "namespaces.users[0].regex",
        ),
        (vec![one.clone(), two.clone()], &two, "as_token"),
    ] {
        let db = tempfile::tempdir().unwrap();
        let mut config = crate::common::test_config(db.path());
        config.app_service_config_files = files;
        let err = match hafen::server::start(config).await {
            Ok(_) => panic!("the server started with a bad registration"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(field), "{err}");
    }
}

#[tokio::test]
async fn ephemeral_events_reach_appservices_that_ask() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;
    let room = bridged_room(&server, &alice).await;
    let event_id = send_text(&server, &alice, &room, "read me").await;

    let (status, v) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "typing": true, "timeout": 10000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = server
        .post(
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(&event_id)
            ),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    fake.wait_until("typing and receipt", |f| {
        let e = f.ephemeral();
        e.iter().any(|x| x["type"] == "m.typing") && e.iter().any(|x| x["type"] == "m.receipt")
    })
    .await;
    let eph = fake.ephemeral();
    let typing = eph.iter().find(|x| x["type"] == "m.typing").unwrap();
    assert_eq!(typing["room_id"], json!(room));
    assert_eq!(typing["content"]["user_ids"], json!([alice.user_id]));
    let receipt = eph.iter().find(|x| x["type"] == "m.receipt").unwrap();
    assert_eq!(receipt["room_id"], json!(room));
    assert!(receipt["content"][&event_id]["m.read"][&alice.user_id]["ts"].is_u64());
    // The unstable name carries the same list (mautrix bridges read it).
    let with_unstable = fake
        .accepted()
        .into_iter()
        .find(|t| t.body.get("ephemeral").is_some())
        .unwrap();
    assert_eq!(
        with_unstable.body["ephemeral"],
        with_unstable.body["de.sorunome.msc2409.ephemeral"]
    );

    // While the bridge is down (a transaction failed), typing and receipts are not queued for
    // it: momentary data must not pile up; the room's messages are.
    fake.state.down.store(true, Ordering::SeqCst);
    send_text(&server, &alice, &room, "while down").await;
    fake.wait_until("a refused attempt", |f| {
        f.state.txns.lock().iter().any(|t| !t.accepted)
    })
    .await;
    // The fake answered; Hafen marks the bridge as backing off once it has read the answer.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for typing in [true, false, true, false] {
        let (status, v) = server
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/typing/{}",
                    enc(&room),
                    enc(&alice.user_id)
                ),
                &alice,
                json!({ "typing": typing, "timeout": 10000 }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let (events, ephemeral) = server
        .services()
        .appservices
        .queue
        .queued("bridge")
        .expect("queue");
    assert_eq!((events, ephemeral), (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn thirdparty_lookups_and_network_room_lists_go_through_the_appservice() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;

    let (status, v) = server
        .get("/_matrix/client/v3/thirdparty/protocols", &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["gitter"]["user_fields"], json!(["username"]));
    assert_eq!(
        v["gitter"]["instances"][0]["instance_id"],
        json!("bridge|gitter-main")
    );
    let (status, v) = server
        .get("/_matrix/client/v3/thirdparty/protocol/gitter", &alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["icon"], json!("mxc://example.org/gitter"));
    let got = server
        .get("/_matrix/client/v3/thirdparty/protocol/irc", &alice)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (status, v) = server
        .get(
            "/_matrix/client/v3/thirdparty/user/gitter?username=alice",
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v[0]["userid"], json!("@bridge_gitter_alice:localhost"));
    let (status, v) = server
        .get(
            "/_matrix/client/v3/thirdparty/location?alias=%23bridge_gitter_spec%3Alocalhost",
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v[0]["protocol"], json!("gitter"));
    {
        let seen = fake.state.thirdparty.lock();
        assert!(
            seen.contains(&"user gitter username=alice".to_owned()),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|s| s.starts_with("location alias=")),
            "{seen:?}"
        );
    }
    let got = server
        .get("/_matrix/client/v3/thirdparty/user/irc?nick=x", &alice)
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // The appservice publishes a portal room in its network's list.
    let (status, v) = server
        .req(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(AS_TOKEN),
            Some(json!({ "preset": "public_chat", "name": "Gitter portal" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let portal = v["room_id"].as_str().unwrap().to_owned();
    let path = format!(
        "/_matrix/client/v3/directory/list/appservice/gitter-main/{}",
        enc(&portal)
    );
    let got = server
        .put(&path, &alice, json!({ "visibility": "public" }))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let (status, v) = server
        .req(
            Method::PUT,
            &path,
            Some(AS_TOKEN),
            Some(json!({ "visibility": "public" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({}));
    let public = server
        .create_room(&alice, json!({ "visibility": "public" }))
        .await;

    let rooms = |v: &Value| -> Vec<String> {
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, v) = server
        .post("/_matrix/client/v3/publicRooms", &alice, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(rooms(&v), vec![public.clone()]);
    let (status, v) = server
        .post(
            "/_matrix/client/v3/publicRooms",
            &alice,
            json!({ "third_party_instance_id": "bridge|gitter-main" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(rooms(&v), vec![portal.clone()]);
    assert_eq!(v["chunk"][0]["name"], json!("Gitter portal"));
    let (status, v) = server
        .post(
            "/_matrix/client/v3/publicRooms",
            &alice,
            json!({ "include_all_networks": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut all = rooms(&v);
    all.sort();
    let mut want = vec![public, portal.clone()];
    want.sort();
    assert_eq!(all, want);
    // Unpublished again.
    let (status, _) = server
        .req(
            Method::PUT,
            &path,
            Some(AS_TOKEN),
            Some(json!({ "visibility": "private" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = server
        .req(
            Method::GET,
            "/_matrix/client/v3/publicRooms?third_party_instance_id=bridge%7Cgitter-main",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(rooms(&v), Vec::<String>::new());
    server.stop().await;
}

#[test]
fn hafen_audit_reports_appservices() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.yaml");
    std::fs::write(
        &local,
        registration_yaml("local", "http://127.0.0.1:29317", "l-as", "l-hs", "lbot"),
    )
    .unwrap();
    let remote = dir.path().join("remote.yaml");
    std::fs::write(
        &remote,
        registration_yaml(
            "remote",
            "http://bridges.internal.example:29318",
            "r-as",
            "r-hs",
            "rbot",
        ),
    )
    .unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.app_service_config_files = vec![local.clone(), remote.clone()];
    let report = hafen::policy::report::compliance_report(&config, None).unwrap();
    let row =
        |id: &str| serde_json::to_value(report.rows.iter().find(|r| r.id == id).unwrap()).unwrap();
    let a11 = row("A11");
    assert_eq!(a11["status"], json!("met"));
    assert!(
        a11["findings"].to_string().contains(&format!(
            "appservice local ({}) at http://127.0.0.1:29317",
            local.display()
        )),
        "{a11}"
    );
    // Plain HTTP to another host carries the tokens and every event unencrypted.
    let b1 = row("B1");
    assert_eq!(b1["status"], json!("falls_short"));
    assert!(
        b1["findings"].to_string().contains("appservice remote"),
        "{b1}"
    );
    assert!(
        !b1["findings"].to_string().contains("appservice local"),
        "{b1}"
    );
    let b4 = row("B4");
    assert_eq!(b4["status"], json!("met"));
    assert!(
        b4["findings"].to_string().contains("2 appservice(s)"),
        "{b4}"
    );

    // A file the server could not start with makes B4 fall short.
    std::fs::write(&remote, "id: broken\n").unwrap();
    let report = hafen::policy::report::compliance_report(&config, None).unwrap();
    let b4 = serde_json::to_value(report.rows.iter().find(|r| r.id == "B4").unwrap()).unwrap();
    assert_eq!(b4["status"], json!("falls_short"));
    assert!(b4["findings"].to_string().contains("remote.yaml"), "{b4}");
}

#[tokio::test]
async fn closed_user_groups_apply_to_appservice_users() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Only alice and carol are in a group; the bridge's ghosts are in none.
    let server = start_with_bridge_and(&fake, &dir, |c| {
        c.groups = vec![hafen::policy::groups::GroupConfig {
            name: "staff".into(),
            users: vec!["@alice:localhost".into(), "@carol:localhost".into()],
            servers: vec![],
            sso_groups: vec![],
        }];
    })
    .await;
    let alice = server.user("alice").await;
    let carol = server.user("carol").await;
    let (status, v) = register_ghost(&server, "bridge_bob").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let bob = as_user(&server, "bridge_bob");

    // The ghost cannot reach alice: its room invite is refused by the group policy, audited.
    let (status, v) = server
        .req(
            Method::POST,
            &format!("/_matrix/client/v3/createRoom?user_id={}", enc(&bob)),
            Some(AS_TOKEN),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let ghost_room = v["room_id"].as_str().unwrap().to_owned();
    let got = server
        .req(
            Method::POST,
            &format!(
                "/_matrix/client/v3/rooms/{}/invite?user_id={}",
                enc(&ghost_room),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({ "user_id": alice.user_id })),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Nor can alice invite the ghost; members of the same group still reach each other.
    let room = server.create_room(&alice, json!({})).await;
    let got = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": bob }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let (status, v) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            &alice,
            json!({ "user_id": carol.user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.stop().await;
}

#[tokio::test]
async fn a_request_from_the_appservice_ends_the_backoff() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_bridge(&fake, &dir).await;
    let alice = server.user("alice").await;
    let room = bridged_room(&server, &alice).await;
    fake.state.down.store(true, Ordering::SeqCst);
    send_text(&server, &alice, &room, "waiting").await;
    // Refused at once, after 1 s and after 2 s more: the next try would be 4 s later.
    fake.wait_until("three refused attempts", |f| {
        f.state.txns.lock().iter().filter(|t| !t.accepted).count() >= 3
    })
    .await;
    fake.state.down.store(false, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let (status, v) = server
        .req(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(AS_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    fake.wait_until("the message", |f| {
        f.bodies().contains(&"waiting".to_owned())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "delivered only after {:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn appservice_puppets_cannot_write_memberships_around_the_groups() {
    let fake = FakeAs::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Only alice is in a group; the bridge's ghosts are in none.
    let server = start_with_bridge_and(&fake, &dir, |c| {
        c.groups = vec![hafen::policy::groups::GroupConfig {
            name: "staff".into(),
            users: vec!["@alice:localhost".into()],
            servers: vec![],
            sso_groups: vec![],
        }];
    })
    .await;
    let alice = server.user("alice").await;
    let (status, v) = register_ghost(&server, "bridge_bob").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let bob = as_user(&server, "bridge_bob");
    let (status, v) = server
        .req(
            Method::POST,
            &format!("/_matrix/client/v3/createRoom?user_id={}", enc(&bob)),
            Some(AS_TOKEN),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let ghost_room = v["room_id"].as_str().unwrap().to_owned();
    // The ghost writes alice's invite as a state event: the same invite as through /invite,
    // refused by the same policy, audited.
    let got = server
        .req(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.member/{}?user_id={}",
                enc(&ghost_room),
                enc(&alice.user_id),
                enc(&bob)
            ),
            Some(AS_TOKEN),
            Some(json!({ "membership": "invite" })),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let msg = got.1["error"].as_str().unwrap_or_default();
    assert!(msg.contains("the closed_user_groups policy"), "{}", got.1);
    let room_id = ruma::RoomId::parse(&ghost_room).expect("room id");
    let alice_id = ruma::UserId::parse(&alice.user_id).expect("user id");
    assert_eq!(
        server
            .services()
            .rooms
            .membership(&room_id, &alice_id)
            .expect("membership"),
        None
    );
    let (entries, _) = server
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "policy_denied")
        .expect("audit");
    assert!(entries
        .iter()
        .any(|e| e.user.as_deref() == Some(bob.as_str())
            && e.detail["policy"] == "closed_user_groups"
            && e.detail["action"] == "invite"));
    server.stop().await;
}
