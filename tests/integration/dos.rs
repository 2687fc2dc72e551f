//! Denial of service through locks and memory: a slow or hostile server must not stall a room,
//! and fetching other servers' media is bounded in concurrency and memory (issue "Every promise
//! holds under attack", item 3).

use std::{sync::Arc, time::Duration};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::common::{
    enc, files_containing, start_federating, unique_txn, TestPki, TestServer, TestUser,
};

/// A server name on loopback whose port accepts connections and never answers: every request
/// to it hangs until the requester gives up.
struct Tarpit {
    name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tarpit() -> Tarpit {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Tarpit {
        name: format!("localhost:{port}"),
        task,
    }
}

/// A server on loopback speaking TLS (the test CA's certificate) that answers every request
/// with the next of `answers` (raw HTTP/1.1 response bytes) and closes the connection.
async fn scripted_tls_server(pki: &TestPki, answers: Vec<Vec<u8>>) -> Tarpit {
    let store = hafen::api::tls::CertStore::open(&hafen::config::TlsConfig {
        certs: pki.path("cert.pem"),
        key: pki.path("key.pem"),
        port: 0,
        reload_interval_secs: 60,
    })
    .expect("certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_cert_resolver(store);
    // HTTP/1.1 only: the answers are written by hand.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut answers = answers.into_iter();
        while let Ok((socket, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(socket).await else {
                continue;
            };
            // Read the request head, then answer.
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let Some(answer) = answers.next() else {
                break;
            };
            let _ = tls.write_all(&answer).await;
            let _ = tls.shutdown().await;
        }
    });
    Tarpit {
        name: format!("localhost:{port}"),
        task,
    }
}

/// A federation media answer (`multipart/mixed`): the metadata part, the content part's headers
/// and `content`; `closed` adds the closing delimiter (without it the answer is cut short).
fn media_answer(content: &[u8], closed: bool) -> Vec<u8> {
    let mut body = b"--bnd\r\nContent-Type: application/json\r\n\r\n{}\r\n--bnd\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    body.extend_from_slice(content);
    if closed {
        body.extend_from_slice(b"\r\n--bnd--\r\n");
    }
    let mut answer = "HTTP/1.1 200 OK\r\nContent-Type: multipart/mixed; boundary=bnd\r\nConnection: close\r\n\r\n".to_string()
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

async fn download(
    server: &TestServer,
    user: &TestUser,
    origin: &str,
    id: &str,
) -> (StatusCode, Value) {
    server
        .get(
            &format!("/_matrix/client/v1/media/download/{origin}/{id}"),
            user,
        )
        .await
}

#[tokio::test]
async fn a_remote_invite_does_not_hold_the_room_while_the_invitees_server_stalls() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let room = a.create_room(&alice, json!({})).await;
    let pit = tarpit().await;

    // The invite waits for a server that never answers.
    let invite = {
        let http = a.http.clone();
        let url = format!("{}/_matrix/client/v3/rooms/{}/invite", a.base, enc(&room));
        let token = alice.token.clone();
        let who = format!("@bob:{}", pit.name);
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({ "user_id": who }))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!invite.is_finished(), "the invite should still be waiting");

    // Meanwhile the room goes on: a message is sent at once, not after the invite gives up.
    let sent = tokio::time::timeout(
        Duration::from_secs(5),
        a.put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(&room),
                unique_txn()
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": "not held up" }),
        ),
    )
    .await
    .expect("the send was held up by the invite");
    assert_eq!(sent.0, StatusCode::OK, "{:?}", sent.1);
    assert!(sent.1["event_id"]
        .as_str()
        .is_some_and(|e| e.starts_with('$')));
    invite.abort();
}

#[tokio::test]
async fn remote_media_fetches_are_bounded_per_requester() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let bob = a.user("bob").await;
    let pit = tarpit().await;

    // Four fetches from a server that never answers: the requester's limit.
    let mut waiting = Vec::new();
    for i in 0..hafen::service::federation::media::MAX_REMOTE_FETCHES_PER_REQUESTER {
        let http = a.http.clone();
        let url = format!(
            "{}/_matrix/client/v1/media/download/{}/media{i}",
            a.base, pit.name
        );
        let token = bob.token.clone();
        waiting.push(tokio::spawn(async move {
            http.get(url).bearer_auth(token).send().await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(waiting.iter().all(|w| !w.is_finished()));

    // One more is refused at once instead of tying up another connection.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        download(&a, &bob, &pit.name, "one-more"),
    )
    .await
    .expect("the fifth fetch should be refused at once");
    assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS, "{:?}", refused.1);
    assert_eq!(refused.1["errcode"], json!("M_LIMIT_EXCEEDED"));
    assert!(refused.1["retry_after_ms"].as_u64().is_some());

    // Another user is not affected by bob's limit: their fetch is taken on (it waits too).
    let carol = a.user("carol").await;
    let theirs = tokio::time::timeout(
        Duration::from_millis(500),
        download(&a, &carol, &pit.name, "carols"),
    )
    .await;
    assert!(theirs.is_err(), "carol's fetch was answered: {theirs:?}");
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn a_remote_media_answer_cut_short_is_not_kept_and_a_whole_one_is() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let bob = a.user("bob").await;
    let content = b"the-remote-file-content-".repeat(20_000); // ~480 KB, many chunks
    let remote = scripted_tls_server(
        &pki,
        vec![media_answer(&content, false), media_answer(&content, true)],
    )
    .await;

    // Cut short (no closing delimiter): not served, and no file of it left behind.
    let (status, body) = download(&a, &bob, &remote.name, "file1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["errcode"], json!("M_NOT_FOUND"));
    let media_dir = a.services().config.media_dir();
    assert!(
        files_containing(&media_dir, b"the-remote-file-content-").is_empty(),
        "a partial file was kept"
    );

    // Whole: stored (streamed to disk) and served byte for byte.
    let res = a
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/download/{}/file1",
            a.base, remote.name
        ))
        .bearer_auth(&bob.token)
        .send()
        .await
        .expect("download");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain")
    );
    assert_eq!(res.bytes().await.expect("bytes").to_vec(), content);
}

#[tokio::test]
async fn a_remote_media_answer_larger_than_the_upload_limit_is_refused() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |c| c.max_upload_size = 100_000).await;
    let bob = a.user("bob").await;
    let content = vec![b'x'; 300_000];
    let remote = scripted_tls_server(&pki, vec![media_answer(&content, true)]).await;
    let (status, body) = download(&a, &bob, &remote.name, "big").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["errcode"], json!("M_TOO_LARGE"));
}
