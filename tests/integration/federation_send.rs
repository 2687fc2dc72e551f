//! Two Hafens federating over TLS on loopback: to-device messages travel in `/send`
//! transactions from the persistent queue, survive the receiver and the sender being down, are
//! applied once; bad transactions are refused or ignored.
//!
//! Not covered end to end here: typing and receipt EDUs across servers (they need remote joins,
//! which are not built yet); their incoming side requires the remote user to be joined.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use ruma::{OwnedServerName, ServerName};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, start_federating, TestPki, TestServer, TestUser};

fn name(s: &TestServer) -> OwnedServerName {
    ServerName::parse(s.server_name()).expect("server name")
}

/// Send a to-device message of type `m.test` from `from` (on `a`) to `to`'s device.
async fn send_to_device(a: &TestServer, from: &TestUser, to: &TestUser, txn: &str, n: u64) {
    let got = a
        .put(
            &format!("/_matrix/client/v3/sendToDevice/m.test/{txn}"),
            from,
            json!({ "messages": { to.user_id.clone(): { to.device_id.clone(): { "n": n } } } }),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, json!({}));
}

/// Sync `u` until `want` to-device events arrived (or `wait` passed); returns them all and the
/// token after them.
async fn to_device_events(
    s: &TestServer,
    u: &TestUser,
    since: Option<String>,
    want: usize,
    wait: Duration,
) -> (Vec<Value>, String) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut since = since;
    let mut events = Vec::new();
    loop {
        let path = match &since {
            Some(t) => format!("/_matrix/client/v3/sync?timeout=1000&since={}", enc(t)),
            None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
        };
        let (status, body) = s.get(&path, u).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if let Some(list) = body["to_device"]["events"].as_array() {
            events.extend(list.iter().cloned());
        }
        since = Some(body["next_batch"].as_str().expect("next_batch").to_owned());
        if events.len() >= want || tokio::time::Instant::now() >= deadline {
            return (events, since.unwrap_or_default());
        }
    }
}

/// A request to `to` signed by `from` (as another server would send it), answered status and
/// body.
async fn signed(
    from: &TestServer,
    to: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let header = hafen::service::federation::auth::authorization_header(
        &from.services().globals,
        &method,
        &name(to),
        path,
        body.as_ref(),
    )
    .expect("header");
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

#[tokio::test]
async fn to_device_reaches_a_user_on_another_server() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let (_, since) = to_device_events(&b, &bob, None, 0, Duration::ZERO).await;

    send_to_device(&a, &alice, &bob, "t1", 1).await;
    let (events, _) = to_device_events(&b, &bob, Some(since), 1, Duration::from_secs(20)).await;
    assert_eq!(
        events,
        vec![json!({ "sender": alice.user_id, "type": "m.test", "content": { "n": 1 } })]
    );
    // Delivered: nothing is left in A's queue for B.
    assert_eq!(
        a.services()
            .federation
            .sender
            .queued(&name(&b))
            .expect("db"),
        (0, 0)
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn queued_messages_survive_a_down_receiver_and_a_sender_restart() {
    let pki = TestPki::new();
    let mut a = start_federating(&pki, |_| {}).await;
    let mut b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let (_, since) = to_device_events(&b, &bob, None, 0, Duration::ZERO).await;
    let b_name = name(&b);

    b.halt().await;
    // The client is answered at once although B is down.
    for n in 1..=3 {
        send_to_device(&a, &alice, &bob, &format!("t{n}"), n).await;
    }
    // Retried client transactions queue nothing more.
    send_to_device(&a, &alice, &bob, "t3", 3).await;
    let queued = a.services().federation.sender.queued(&b_name).expect("db");
    assert_eq!(queued, (0, 3));

    // A restarts with the messages still queued (the queue is in its database).
    a.restart().await;
    assert_eq!(
        a.services().federation.sender.queued(&b_name).expect("db"),
        (0, 3)
    );
    // Let A fail against the down B a few times (its backoff grows).
    tokio::time::sleep(Duration::from_secs(3)).await;

    b.resume().await;
    // B contacts A: A retries at once instead of waiting out its backoff.
    let (status, body) = signed(
        &b,
        &a,
        Method::GET,
        &format!(
            "/_matrix/federation/v1/query/profile?user_id={}",
            enc(&alice.user_id)
        ),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (events, next) = to_device_events(&b, &bob, Some(since), 3, Duration::from_secs(20)).await;
    let ns: Vec<Value> = events.iter().map(|e| e["content"]["n"].clone()).collect();
    assert_eq!(ns, vec![json!(1), json!(2), json!(3)], "{events:?}");
    for e in &events {
        assert_eq!(e["sender"], json!(alice.user_id));
        assert_eq!(e["type"], json!("m.test"));
    }
    // Exactly once: nothing more arrives, and A's queue is empty.
    let (more, _) = to_device_events(&b, &bob, Some(next), 1, Duration::from_secs(2)).await;
    assert_eq!(more, Vec::<Value>::new());
    assert_eq!(
        a.services().federation.sender.queued(&b_name).expect("db"),
        (0, 0)
    );
    a.stop().await;
    b.stop().await;
}

fn to_device_edu(sender: &str, to: &TestUser, message_id: &str, n: u64) -> Value {
    json!({
        "edu_type": "m.direct_to_device",
        "content": {
            "sender": sender,
            "type": "m.test",
            "message_id": message_id,
            "messages": { to.user_id.clone(): { to.device_id.clone(): { "n": n } } },
        },
    })
}

#[tokio::test]
async fn a_retried_transaction_is_applied_once() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let bob = b.user("bob").await;
    let (_, since) = to_device_events(&b, &bob, None, 0, Duration::ZERO).await;
    let alice = format!("@alice:{}", a.server_name());
    let txn = json!({
        "origin": a.server_name(),
        "origin_server_ts": 1,
        "pdus": [{ "event_id": "$not-handled", "type": "m.room.message" }],
        "edus": [to_device_edu(&alice, &bob, "m1", 1)],
    });
    let path = "/_matrix/federation/v1/send/txn-1";
    let first = signed(&a, &b, Method::PUT, path, Some(txn.clone())).await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    assert_eq!(
        first.1,
        json!({ "pdus": { "$not-handled": {
            "error": "BadJson: room_id is missing" } } })
    );
    // The same transaction again: the same answer, nothing applied twice.
    let again = signed(&a, &b, Method::PUT, path, Some(txn.clone())).await;
    assert_eq!(again, first);
    // Another transaction carrying the same message (same message_id): stored once too.
    let other = json!({ "origin": a.server_name(), "origin_server_ts": 2, "pdus": [],
        "edus": [to_device_edu(&alice, &bob, "m1", 1)] });
    let got = signed(
        &a,
        &b,
        Method::PUT,
        "/_matrix/federation/v1/send/txn-2",
        Some(other),
    )
    .await;
    assert_eq!(got, (StatusCode::OK, json!({ "pdus": {} })));

    let (events, _) = to_device_events(&b, &bob, Some(since), 2, Duration::from_secs(3)).await;
    assert_eq!(
        events,
        vec![json!({ "sender": alice, "type": "m.test", "content": { "n": 1 } })]
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn bad_transactions_are_refused_or_ignored() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let bob = b.user("bob").await;
    let (_, since) = to_device_events(&b, &bob, None, 0, Duration::ZERO).await;
    let path = "/_matrix/federation/v1/send/bad-1";

    // Unsigned.
    let body = json!({ "origin": a.server_name(), "origin_server_ts": 1, "pdus": [] });
    let got = b.req(Method::PUT, path, None, Some(body)).await;
    assert_err(&got, 401, "M_UNAUTHORIZED");

    // 51 PDUs.
    let pdus: Vec<Value> = (0..51)
        .map(|i| json!({ "event_id": format!("$e{i}") }))
        .collect();
    let body = json!({ "origin": a.server_name(), "origin_server_ts": 1, "pdus": pdus });
    let got = signed(&a, &b, Method::PUT, path, Some(body)).await;
    assert_err(&got, 400, "M_BAD_JSON");

    // 101 EDUs.
    let edus: Vec<Value> = (0..101)
        .map(|_| json!({ "edu_type": "m.x", "content": {} }))
        .collect();
    let body =
        json!({ "origin": a.server_name(), "origin_server_ts": 1, "pdus": [], "edus": edus });
    let got = signed(&a, &b, Method::PUT, path, Some(body)).await;
    assert_err(&got, 400, "M_BAD_JSON");

    // EDUs that are not objects; pdus missing.
    let body = json!({ "origin": a.server_name(), "origin_server_ts": 1, "pdus": [],
        "edus": ["m.typing", 3] });
    let got = signed(&a, &b, Method::PUT, path, Some(body)).await;
    assert_err(&got, 400, "M_BAD_JSON");
    let body = json!({ "origin": a.server_name(), "origin_server_ts": 1 });
    let got = signed(&a, &b, Method::PUT, path, Some(body)).await;
    assert_err(&got, 400, "M_BAD_JSON");

    // An EDU about a user of another server (here: B's own user, and a third server's) is
    // ignored; the transaction itself succeeds. So are unknown EDU types and EDUs without content.
    let body = json!({
        "origin": a.server_name(),
        "origin_server_ts": 1,
        "pdus": [],
        "edus": [
            to_device_edu(&bob.user_id, &bob, "spoof-1", 1),
            to_device_edu("@eve:c.test", &bob, "spoof-2", 2),
            { "edu_type": "m.unknown", "content": { "x": 1 } },
            { "edu_type": "m.typing" },
            { "edu_type": "m.typing", "content": { "room_id": "!nope:b", "user_id": bob.user_id,
                "typing": true } },
            { "edu_type": "m.device_list_update", "content": { "user_id": bob.user_id,
                "device_id": "X", "stream_id": 1 } },
        ],
    });
    let got = signed(&a, &b, Method::PUT, path, Some(body)).await;
    assert_eq!(got, (StatusCode::OK, json!({ "pdus": {} })));

    // The server keeps running and still takes a good transaction.
    let alice = format!("@alice:{}", a.server_name());
    let body = json!({ "origin": a.server_name(), "origin_server_ts": 1, "pdus": [],
        "edus": [to_device_edu(&alice, &bob, "good-1", 7)] });
    let got = signed(
        &a,
        &b,
        Method::PUT,
        "/_matrix/federation/v1/send/good-1",
        Some(body),
    )
    .await;
    assert_eq!(got, (StatusCode::OK, json!({ "pdus": {} })));
    let (events, _) = to_device_events(&b, &bob, Some(since), 2, Duration::from_secs(3)).await;
    assert_eq!(
        events,
        vec![json!({ "sender": alice, "type": "m.test", "content": { "n": 7 } })]
    );
    a.stop().await;
    b.stop().await;
}
