//! A scripted hostile federation peer, for tests of what the server under test must refuse.
//!
//! The peer is a server name of its own (`evil.test` unless told otherwise) with its own
//! ed25519 signing key (and, if asked, retired keys), and a small HTTP server on loopback that
//! serves its key document (`/_matrix/key/v2/server`) and whatever answers the test scripts for
//! the federation endpoints the tested server calls (`/state_ids`, `/event`, `/event_auth`,
//! `get_missing_events`, `/backfill`, ...; `/send` transactions are accepted and dropped). The
//! tested server reaches it through `federation_destinations` ([`HostilePeer::wire`]).
//!
//! It signs requests (`X-Matrix`) and events with its keys, so a test can send forged,
//! cross-room, wrongly signed or replayed PDUs, join rooms without `make_join`'s blessing, and
//! answer fetches with lies. Nothing here checks what it is told: that is the point.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    extract::{Request, State},
    response::Response,
    Router,
};
use reqwest::{Method, StatusCode};
use ruma::{
    serde::Base64,
    signatures::{hash_and_sign_event, sign_json, Ed25519KeyPair},
    CanonicalJsonObject, OwnedRoomId, RoomId, RoomVersionId,
};
use serde_json::{json, Value};

use crate::common::{enc, TestServer};

/// One signing key of the peer: the pair, its id (`ed25519:<version>`) and, for a retired
/// key, when it was retired.
pub struct PeerKey {
    pub pair: Ed25519KeyPair,
    pub id: String,
    pub public: String,
    pub expired_ts: Option<u64>,
}

impl PeerKey {
    fn new(version: &str, expired_ts: Option<u64>) -> PeerKey {
        let doc = Ed25519KeyPair::generate();
        let pair = Ed25519KeyPair::from_der(&doc, version.to_owned()).expect("key parses");
        let public =
            Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(pair.public_key().to_vec())
                .encode();
        PeerKey {
            pair,
            id: format!("ed25519:{version}"),
            public,
            expired_ts,
        }
    }
}

/// What the peer's HTTP server shares with the test.
#[derive(Default)]
struct Shared {
    /// The key document served at `/_matrix/key/v2/server`.
    key_document: Mutex<Value>,
    /// Scripted answers: (path prefix, status, body); the longest matching prefix answers.
    answers: Mutex<Vec<(String, u16, Value)>>,
    /// Every request received, as `METHOD path?query`.
    requests: Mutex<Vec<String>>,
}

pub struct HostilePeer {
    pub name: String,
    /// Base URL of the peer's HTTP server (`http://127.0.0.1:PORT`).
    pub url: String,
    pub key: PeerKey,
    pub old_keys: Vec<PeerKey>,
    shared: Arc<Shared>,
}

async fn serve(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let line = format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    shared.requests.lock().expect("lock").push(line);
    let json = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("response")
    };
    if path.starts_with("/_matrix/key/v2/server") {
        return json(200, shared.key_document.lock().expect("lock").clone());
    }
    let scripted = shared
        .answers
        .lock()
        .expect("lock")
        .iter()
        .filter(|(prefix, _, _)| path.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|(_, status, body)| (*status, body.clone()));
    if let Some((status, body)) = scripted {
        return json(status, body);
    }
    if path.starts_with("/_matrix/federation/v1/send/") {
        return json(200, json!({ "pdus": {} }));
    }
    json(
        404,
        json!({ "errcode": "M_NOT_FOUND", "error": "not scripted" }),
    )
}

impl HostilePeer {
    /// A peer named `evil.test`.
    pub async fn start() -> HostilePeer {
        Self::start_named("evil.test", &[]).await
    }

    /// A peer named `name`, with a retired key for each `expired_ts` given (`old_keys[i]`).
    pub async fn start_named(name: &str, retired: &[u64]) -> HostilePeer {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(serve).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let peer = HostilePeer {
            name: name.to_owned(),
            url: format!("http://{addr}"),
            key: PeerKey::new("current", None),
            old_keys: retired
                .iter()
                .enumerate()
                .map(|(i, ts)| PeerKey::new(&format!("old{i}"), Some(*ts)))
                .collect(),
            shared,
        };
        *peer.shared.key_document.lock().expect("lock") = peer.key_document();
        peer
    }

    /// The peer's key document, signed by its current key: `verify_keys` and the retired keys
    /// as `old_verify_keys` with their `expired_ts`.
    fn key_document(&self) -> Value {
        let old: serde_json::Map<String, Value> = self
            .old_keys
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    json!({ "key": k.public, "expired_ts": k.expired_ts }),
                )
            })
            .collect();
        let doc = json!({
            "server_name": self.name,
            "valid_until_ts": now_ms() + 3_600_000,
            "verify_keys": { self.key.id.clone(): { "key": self.key.public } },
            "old_verify_keys": old,
        });
        let mut obj: CanonicalJsonObject = serde_json::from_value(doc).expect("canonical");
        sign_json(&self.name, &self.key.pair, &mut obj).expect("signs");
        serde_json::to_value(obj).expect("serializes")
    }

    /// Make `config`'s server reach this peer (plain HTTP on loopback) by its name.
    pub fn wire(&self, config: &mut hafen::config::Config) {
        config
            .federation_destinations
            .insert(self.name.clone(), self.url.clone());
    }

    /// Answer requests whose path starts with `prefix` with `status` and `body` (the longest
    /// matching prefix wins; a later script for the same prefix replaces an earlier one).
    pub fn script(&self, prefix: &str, status: u16, body: Value) {
        let mut answers = self.shared.answers.lock().expect("lock");
        answers.retain(|(p, _, _)| p != prefix);
        answers.push((prefix.to_owned(), status, body));
    }

    /// Every request the peer received so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().expect("lock").clone()
    }

    /// A user id of the peer.
    pub fn user(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.name)
    }

    /// Hash and sign `event` with the current key; returns its event id (for room versions 1
    /// and 2 the `event_id` in the event, which the peer picks if absent) and the signed event.
    pub fn sign_event(&self, version: &RoomVersionId, event: Value) -> (String, Value) {
        self.sign_event_with(&self.key, version, event)
    }

    /// [`HostilePeer::sign_event`] with another key (a retired one, or any key at all).
    pub fn sign_event_with(
        &self,
        key: &PeerKey,
        version: &RoomVersionId,
        mut event: Value,
    ) -> (String, Value) {
        let rules = version.rules().expect("supported room version");
        let obj = event.as_object_mut().expect("event is an object");
        for field in ["hashes", "signatures", "unsigned"] {
            obj.remove(field);
        }
        let v1_ids = matches!(version, RoomVersionId::V1 | RoomVersionId::V2);
        if v1_ids {
            obj.entry("event_id")
                .or_insert_with(|| json!(format!("${}:{}", random_id(), self.name)));
        } else {
            obj.remove("event_id");
        }
        let mut canonical: CanonicalJsonObject =
            serde_json::from_value(event).expect("canonical JSON");
        hash_and_sign_event(&self.name, &key.pair, &mut canonical, &rules.redaction)
            .expect("signs the event");
        let id = if v1_ids {
            match canonical.get("event_id") {
                Some(ruma::CanonicalJsonValue::String(id)) => id.clone(),
                _ => unreachable!("set above"),
            }
        } else {
            format!(
                "${}",
                ruma::signatures::reference_hash(&canonical, &rules).expect("hash")
            )
        };
        (id, serde_json::to_value(canonical).expect("serializes"))
    }

    /// An `X-Matrix` signed request to `to` (whose server name is the destination).
    pub async fn request(
        &self,
        to: &TestServer,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let destination = to.server_name();
        let mut object = json!({
            "method": method.as_str(),
            "uri": path,
            "origin": self.name,
            "destination": destination,
        });
        if let Some(b) = &body {
            object["content"] = b.clone();
        }
        let mut obj: CanonicalJsonObject = serde_json::from_value(object).expect("canonical");
        sign_json(&self.name, &self.key.pair, &mut obj).expect("signs");
        let sig = serde_json::to_value(&obj).expect("serializes")["signatures"][&self.name]
            [&self.key.id]
            .as_str()
            .expect("signature")
            .to_owned();
        let header = format!(
            "X-Matrix origin=\"{}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"",
            self.name, self.key.id
        );
        let mut r = to
            .http
            .request(method, format!("{}{}", to.base, path))
            .header("Authorization", header);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A `/send` transaction of `pdus`; returns the per-PDU results (`{event_id: {}|{error}}`).
    pub async fn send_pdus(&self, to: &TestServer, pdus: Vec<Value>) -> Value {
        let txn = format!("hostile-{}", random_id());
        let (status, body) = self
            .request(
                to,
                Method::PUT,
                &format!("/_matrix/federation/v1/send/{txn}"),
                Some(json!({
                    "origin": self.name,
                    "origin_server_ts": now_ms(),
                    "pdus": pdus,
                    "edus": [],
                })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["pdus"].clone()
    }

    /// `user` (of this peer) joins `room` on `to` the regular way (`make_join`, signed,
    /// `send_join`); the join must succeed. Returns the join's event id.
    pub async fn join(&self, to: &TestServer, room: &str, user: &str) -> String {
        let (status, template) = self
            .request(
                to,
                Method::GET,
                &format!(
                    "/_matrix/federation/v1/make_join/{}/{}?ver=1&ver=2&ver=3&ver=4&ver=5&ver=6&ver=7&ver=8&ver=9&ver=10&ver=11&ver=12",
                    enc(room),
                    enc(user)
                ),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "make_join: {template}");
        let version = RoomVersionId::try_from(
            template["room_version"]
                .as_str()
                .expect("room_version")
                .to_owned(),
        )
        .expect("version");
        let mut event = template["event"].clone();
        // Room versions 1 and 2: the template's id is the resident server's; ours goes on.
        event
            .as_object_mut()
            .expect("template is an object")
            .remove("event_id");
        event["origin"] = json!(self.name);
        event["origin_server_ts"] = json!(now_ms());
        let (id, signed) = self.sign_event(&version, event);
        let (status, body) = self.send_join(to, room, &id, signed).await;
        assert_eq!(status, StatusCode::OK, "send_join: {body}");
        id
    }

    /// `PUT /v2/send_join/{room}/{event_id}` with `event`, answered status and body.
    pub async fn send_join(
        &self,
        to: &TestServer,
        room: &str,
        event_id: &str,
        event: Value,
    ) -> (StatusCode, Value) {
        self.request(
            to,
            Method::PUT,
            &format!(
                "/_matrix/federation/v2/send_join/{}/{}",
                enc(room),
                enc(event_id)
            ),
            Some(event),
        )
        .await
    }

    /// An unsigned event of `room` as `to` would place it now: its prev events are `to`'s
    /// forward extremities, its depth the next one, its auth events the current state events
    /// of `auth` (type, state key) that exist (the create event left out for room version 12).
    /// Change `prev_events` or `auth_events` to lie.
    pub fn event_on_top(
        &self,
        to: &TestServer,
        room: &str,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        auth: &[(&str, &str)],
    ) -> Value {
        let rooms = &to.services().rooms;
        let room_id: OwnedRoomId = RoomId::parse(room).expect("room id");
        let meta = rooms.meta(&room_id).expect("db").expect("known room");
        let v1_refs = matches!(meta.version, RoomVersionId::V1 | RoomVersionId::V2);
        let reference = |id: &str| -> Value {
            if v1_refs {
                let pdu = to
                    .services()
                    .rooms
                    .federation_pdu(<&ruma::EventId>::try_from(id).expect("id"))
                    .expect("db")
                    .expect("stored");
                json!([id, pdu["hashes"]])
            } else {
                json!(id)
            }
        };
        let state = rooms.current_state_ids(&room_id).expect("db");
        let auth_events: Vec<Value> = auth
            .iter()
            .filter(|(t, _)| !(*t == "m.room.create" && meta.version == RoomVersionId::V12))
            .filter_map(|(t, k)| state.get(&((*t).to_owned(), (*k).to_owned())))
            .map(|id| reference(id.as_str()))
            .collect();
        let prev_events: Vec<Value> = meta
            .extremities
            .iter()
            .map(|id| reference(id.as_str()))
            .collect();
        let mut event = json!({
            "type": kind,
            "room_id": room,
            "sender": sender,
            "origin": self.name,
            "origin_server_ts": now_ms(),
            "content": content,
            "depth": meta.depth + 1,
            "prev_events": prev_events,
            "auth_events": auth_events,
        });
        if let Some(k) = state_key {
            event["state_key"] = json!(k);
        }
        event
    }

    /// The room version of `room` on `to`.
    pub fn version(to: &TestServer, room: &str) -> RoomVersionId {
        to.services()
            .rooms
            .version(&RoomId::parse(room).expect("room id"))
            .expect("known room")
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn random_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "h{}x{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        now_ms()
    )
}

/// A server federating (plain HTTP, pinned destinations) as `a.test`, reaching `peer`.
pub async fn server_with_peer(
    peer: &HostilePeer,
    adjust: impl FnOnce(&mut hafen::config::Config),
) -> TestServer {
    TestServer::start_with(|c| {
        c.allow_federation = true;
        c.server_name = "a.test".try_into().expect("name");
        peer.wire(c);
        adjust(c);
    })
    .await
}
