//! The media repository over HTTP: uploads, downloads and their headers, create-then-upload,
//! thumbnails (decoded and measured), legacy endpoints, config, URL previews and their SSRF guard.

use std::{io::Cursor, time::Duration};

use reqwest::{header::HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_err, enc, TestServer, TestUser};

const V1: &str = "/_matrix/client/v1/media";
const LEGACY: &str = "/_matrix/media/v3";

/// A response: status, headers, body bytes.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// As the `(status, json)` pair `assert_err` reads.
    fn err(&self) -> (StatusCode, Value) {
        (self.status, self.json())
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<reqwest::Body>,
) -> Got {
    let mut r = s.http.request(method, format!("{}{}", s.base, path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    if let Some(b) = body {
        r = r.body(b);
    }
    let res = r.send().await.expect("request sent");
    Got {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.expect("body").to_vec(),
    }
}

async fn get(s: &TestServer, path: &str, u: Option<&TestUser>) -> Got {
    send(
        s,
        reqwest::Method::GET,
        path,
        u.map(|u| u.token.as_str()),
        None,
        None,
    )
    .await
}

/// A GET that must fail with `status` and `errcode`.
async fn get_err(s: &TestServer, path: &str, u: Option<&TestUser>, status: u16, errcode: &str) {
    assert_err(&get(s, path, u).await.err(), status, errcode);
}

/// A request with a byte body from `u`.
async fn send_bytes(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    u: &TestUser,
    content_type: Option<&str>,
    bytes: &[u8],
) -> Got {
    let body = Some(bytes.to_vec().into());
    send(s, method, path, Some(&u.token), content_type, body).await
}

/// Upload `bytes` and return (server name, media id).
async fn upload(
    s: &TestServer,
    u: &TestUser,
    bytes: Vec<u8>,
    content_type: Option<&str>,
    filename: Option<&str>,
) -> (String, String) {
    let path = match filename {
        Some(f) => format!("{LEGACY}/upload?filename={}", enc(f)),
        None => format!("{LEGACY}/upload"),
    };
    let got = send(
        s,
        reqwest::Method::POST,
        &path,
        Some(&u.token),
        content_type,
        Some(bytes.into()),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "upload: {}", got.json());
    mxc_parts(got.json()["content_uri"].as_str().expect("content_uri"))
}

fn mxc_parts(mxc: &str) -> (String, String) {
    let rest = mxc.strip_prefix("mxc://").expect("mxc uri");
    let (server, id) = rest.split_once('/').expect("server/id");
    (server.to_owned(), id.to_owned())
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x % 256) as u8, (y % 256) as u8, 90, 255])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 30])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .expect("jpeg");
    out
}

fn dimensions(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("a decodable thumbnail");
    (img.width(), img.height())
}

/// Every file under the media directory (content and thumbnails; temp files excluded).
fn stored_files(s: &TestServer) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    if p.file_name().is_some_and(|n| n == "tmp") {
                        0
                    } else {
                        walk(&p)
                    }
                } else {
                    1
                }
            })
            .sum()
    }
    walk(&s.services().config.media_dir())
}

#[tokio::test]
async fn upload_and_download_round_trip_with_headers() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let text = b"hello media".to_vec();
    let (server, id) = upload(
        &s,
        &alice,
        text.clone(),
        Some("text/plain"),
        Some("hello.txt"),
    )
    .await;
    assert_eq!(server, s.server_name());
    assert_eq!(id.len(), 24);

    // Anyone with a token may download; bytes and headers as the spec says.
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&bob)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, text);
    assert_eq!(got.header("content-type"), "text/plain");
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=hello.txt"
    );
    assert_eq!(got.header("content-length"), text.len().to_string());
    assert_eq!(got.header("cross-origin-resource-policy"), "cross-origin");
    let csp = got.header("content-security-policy");
    assert!(
        csp.starts_with("sandbox; default-src 'none'; script-src 'none';"),
        "{csp}"
    );

    // The file name in the path replaces the uploaded one.
    let got = get(
        &s,
        &format!("{V1}/download/{server}/{id}/{}", enc("other name.txt")),
        Some(&bob),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, text);
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=\"other name.txt\""
    );

    // Non-ASCII names use RFC 6266 / RFC 8187 encoding; unsafe types are attachments.
    let (_, id) = upload(
        &s,
        &alice,
        b"%PDF-1.4".to_vec(),
        Some("application/pdf"),
        Some("Grüße.pdf"),
    )
    .await;
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&alice)).await;
    assert_eq!(got.header("content-type"), "application/pdf");
    assert_eq!(
        got.header("content-disposition"),
        "attachment; filename*=utf-8''Gr%C3%BC%C3%9Fe.pdf"
    );

    // HTML is never inline; no filename means none in the header.
    let (_, id) = upload(
        &s,
        &alice,
        b"<script>alert(1)</script>".to_vec(),
        Some("text/html"),
        None,
    )
    .await;
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&alice)).await;
    assert_eq!(got.header("content-type"), "text/html");
    assert_eq!(got.header("content-disposition"), "attachment");

    // No content type: application/octet-stream. Empty files are fine.
    let (_, id) = upload(&s, &alice, Vec::new(), None, None).await;
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&alice)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body.is_empty());
    assert_eq!(got.header("content-type"), "application/octet-stream");
    assert_eq!(got.header("content-disposition"), "attachment");

    // Equal bytes are stored once.
    let before = stored_files(&s);
    upload(&s, &bob, text.clone(), Some("text/plain"), None).await;
    assert_eq!(stored_files(&s), before);
    s.stop().await;
}

#[tokio::test]
async fn tokens_limits_and_unknown_media() {
    let s = TestServer::start_with(|c| c.max_upload_size = 1024).await;
    let alice = s.user("alice").await;
    let (server, id) = upload(&s, &alice, vec![7; 1024], None, None).await;

    // Every endpoint but the frozen legacy ones needs a token.
    for path in [
        format!("{V1}/download/{server}/{id}"),
        format!("{V1}/download/{server}/{id}/x.bin"),
        format!("{V1}/thumbnail/{server}/{id}?width=32&height=32"),
        format!("{V1}/config"),
        format!("{V1}/preview_url?url=https://example.org"),
        format!("{LEGACY}/config"),
    ] {
        get_err(&s, &path, None, 401, "M_MISSING_TOKEN").await;
    }
    for path in [
        format!("{LEGACY}/upload"),
        "/_matrix/media/v1/create".to_owned(),
    ] {
        let got = send(
            &s,
            reqwest::Method::POST,
            &path,
            None,
            None,
            Some(b"x".to_vec().into()),
        )
        .await;
        assert_err(&got.err(), 401, "M_MISSING_TOKEN");
    }
    let got = send(
        &s,
        reqwest::Method::POST,
        &format!("{LEGACY}/upload"),
        Some("nope"),
        None,
        Some(b"x".to_vec().into()),
    )
    .await;
    assert_err(&got.err(), 401, "M_UNKNOWN_TOKEN");

    // One byte over the limit: 413, with a Content-Length and when streamed without one.
    let got = send_bytes(
        &s,
        reqwest::Method::POST,
        &format!("{LEGACY}/upload"),
        &alice,
        None,
        &vec![7; 1025],
    )
    .await;
    assert_err(&got.err(), 413, "M_TOO_LARGE");
    let files = stored_files(&s);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..5).map(|_| Ok(vec![1u8; 300])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let got = send(
        &s,
        reqwest::Method::POST,
        &format!("{LEGACY}/upload"),
        Some(&alice.token),
        None,
        Some(body),
    )
    .await;
    assert_err(&got.err(), 413, "M_TOO_LARGE");
    assert_eq!(stored_files(&s), files, "a refused upload leaves no file");

    // The limit is what the config endpoints announce.
    for path in [format!("{V1}/config"), format!("{LEGACY}/config")] {
        let got = get(&s, &path, Some(&alice)).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.json(), json!({ "m.upload.size": 1024 }));
    }

    // Unknown, malformed and remote media ids are not found.
    for path in [
        format!("{V1}/download/{server}/nosuchmedia"),
        format!("{V1}/download/{server}/{}", enc("bad id!")),
        format!("{V1}/download/other.example/{id}"),
        format!("{V1}/thumbnail/other.example/{id}?width=32&height=32"),
        format!("{V1}/thumbnail/{server}/nosuchmedia?width=32&height=32"),
    ] {
        get_err(&s, &path, Some(&alice), 404, "M_NOT_FOUND").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn create_then_upload() {
    let s = TestServer::start_with(|c| c.max_pending_media_uploads = 2).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let create = |u: TestUser| {
        let s = &s;
        async move {
            send(
                s,
                reqwest::Method::POST,
                "/_matrix/media/v1/create",
                Some(&u.token),
                Some("application/json"),
                Some(b"{}".to_vec().into()),
            )
            .await
        }
    };
    let got = create(alice.clone()).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.json());
    let v = got.json();
    let (server, id) = mxc_parts(v["content_uri"].as_str().expect("content_uri"));
    let expires = v["unused_expires_at"].as_u64().expect("unused_expires_at");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(expires > now + 23 * 3600 * 1000 && expires <= now + 24 * 3600 * 1000 + 1000);

    // Not uploaded yet: a download waits timeout_ms and then says so.
    get_err(
        &s,
        &format!("{V1}/download/{server}/{id}?timeout_ms=100"),
        Some(&bob),
        504,
        "M_NOT_YET_UPLOADED",
    )
    .await;
    get_err(
        &s,
        &format!("{V1}/thumbnail/{server}/{id}?width=32&height=32&timeout_ms=50"),
        Some(&bob),
        504,
        "M_NOT_YET_UPLOADED",
    )
    .await;
    get_err(
        &s,
        &format!("{V1}/download/{server}/{id}?timeout_ms=soon"),
        Some(&bob),
        400,
        "M_INVALID_PARAM",
    )
    .await;

    let put_path = format!("{LEGACY}/upload/{server}/{id}?filename=late.txt");
    // Only the creator may upload, only to an id that was created here.
    for (u, path, status, errcode) in [
        (&bob, put_path.clone(), 403, "M_FORBIDDEN"),
        (
            &alice,
            format!("{LEGACY}/upload/{server}/neverCreated"),
            404,
            "M_NOT_FOUND",
        ),
        (
            &alice,
            format!("{LEGACY}/upload/other.example/{id}"),
            404,
            "M_NOT_FOUND",
        ),
    ] {
        let got = send_bytes(&s, reqwest::Method::PUT, &path, u, None, b"x").await;
        assert_err(&got.err(), status, errcode);
    }

    // A waiting download gets the content as soon as it arrives.
    let waiting = {
        let url = format!("{}{V1}/download/{server}/{id}?timeout_ms=10000", s.base);
        let http = s.http.clone();
        let token = bob.token.clone();
        tokio::spawn(async move {
            let res = http.get(url).bearer_auth(token).send().await.expect("sent");
            (res.status(), res.bytes().await.expect("body").to_vec())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = send_bytes(
        &s,
        reqwest::Method::PUT,
        &put_path,
        &alice,
        Some("text/plain"),
        b"arrived",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.json());
    assert_eq!(got.json(), json!({}));
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"arrived");
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&bob)).await;
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=late.txt"
    );

    // Uploaded once; a second upload is refused.
    let got = send_bytes(&s, reqwest::Method::PUT, &put_path, &alice, None, b"again").await;
    assert_err(&got.err(), 409, "M_CANNOT_OVERWRITE_MEDIA");

    // At most two pending ids per user (the uploaded one no longer counts).
    assert_eq!(create(alice.clone()).await.status, StatusCode::OK);
    assert_eq!(create(alice.clone()).await.status, StatusCode::OK);
    let got = create(alice.clone()).await;
    assert_err(&got.err(), 429, "M_LIMIT_EXCEEDED");
    assert!(got.json()["retry_after_ms"].is_u64());
    assert_eq!(
        create(bob.clone()).await.status,
        StatusCode::OK,
        "the limit is per user"
    );
    s.stop().await;
}

#[tokio::test]
async fn unused_media_ids_expire() {
    let s = TestServer::start_with(|c| {
        c.pending_media_expiry_secs = 1;
        c.max_pending_media_uploads = 1;
    })
    .await;
    let alice = s.user("alice").await;
    let create = || {
        send(
            &s,
            reqwest::Method::POST,
            "/_matrix/media/v1/create",
            Some(&alice.token),
            None,
            None,
        )
    };
    let got = create().await;
    assert_eq!(got.status, StatusCode::OK);
    let (server, id) = mxc_parts(got.json()["content_uri"].as_str().expect("uri"));
    assert_err(&create().await.err(), 429, "M_LIMIT_EXCEEDED");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = send_bytes(
        &s,
        reqwest::Method::PUT,
        &format!("{LEGACY}/upload/{server}/{id}"),
        &alice,
        None,
        b"late",
    )
    .await;
    assert_err(&got.err(), 404, "M_NOT_FOUND");
    get_err(
        &s,
        &format!("{V1}/download/{server}/{id}?timeout_ms=5000"),
        Some(&alice),
        404,
        "M_NOT_FOUND",
    )
    .await;
    // The expired id no longer counts against the limit.
    assert_eq!(create().await.status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn thumbnails_are_made_measured_and_cached() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (server, id) = upload(
        &s,
        &alice,
        png(1000, 500),
        Some("image/png"),
        Some("wide.png"),
    )
    .await;
    let thumb = |query: String| {
        let s = &s;
        let alice = &alice;
        let path = format!("{V1}/thumbnail/{server}/{id}?{query}");
        async move { get(s, &path, Some(alice)).await }
    };

    let got = thumb("width=96&height=96&method=crop".into()).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.json());
    assert_eq!(got.header("content-type"), "image/png");
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=thumbnail.png"
    );
    assert_eq!(got.header("cross-origin-resource-policy"), "cross-origin");
    assert_eq!(dimensions(&got.body), (96, 96));
    let first = got.body;

    // Scale keeps the aspect ratio, at the smallest size that covers the request.
    let got = thumb("width=300&height=200&method=scale".into()).await;
    assert_eq!(dimensions(&got.body), (320, 160));
    let got = thumb("width=33&height=20".into()).await; // scale is the default
    assert_eq!(dimensions(&got.body), (320, 160));
    let got = thumb("width=32&height=32&method=crop&animated=true".into()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(dimensions(&got.body), (32, 32));

    // The second request is served from disk: same bytes, no new file.
    let files = stored_files(&s);
    let got = thumb("width=96&height=96&method=crop".into()).await;
    assert_eq!(got.body, first);
    assert_eq!(stored_files(&s), files);
    // A request that maps to the same size uses the same thumbnail.
    let got = thumb("width=50&height=60&method=crop".into()).await;
    assert_eq!(got.body, first);
    assert_eq!(stored_files(&s), files);

    // Never larger than the original.
    let (_, small) = upload(&s, &alice, png(40, 30), Some("image/png"), None).await;
    let got = get(
        &s,
        &format!("{V1}/thumbnail/{server}/{small}?width=800&height=600"),
        Some(&alice),
    )
    .await;
    assert_eq!(dimensions(&got.body), (40, 30));

    // JPEG stays JPEG.
    let (_, photo) = upload(&s, &alice, jpeg(640, 480), Some("image/jpeg"), None).await;
    let got = get(
        &s,
        &format!("{V1}/thumbnail/{server}/{photo}?width=320&height=240"),
        Some(&alice),
    )
    .await;
    assert_eq!(got.header("content-type"), "image/jpeg");
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=thumbnail.jpg"
    );
    assert_eq!(dimensions(&got.body), (320, 240));

    // Bad parameters and content that is no image.
    assert_err(
        &thumb("height=32".into()).await.err(),
        400,
        "M_MISSING_PARAM",
    );
    assert_err(
        &thumb("width=-3&height=32".into()).await.err(),
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &thumb("width=0&height=32".into()).await.err(),
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &thumb("width=32&height=32&method=stretch".into())
            .await
            .err(),
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &thumb("width=32&height=32&animated=maybe".into())
            .await
            .err(),
        400,
        "M_INVALID_PARAM",
    );
    let (_, text) = upload(&s, &alice, b"just text".to_vec(), Some("text/plain"), None).await;
    get_err(
        &s,
        &format!("{V1}/thumbnail/{server}/{text}?width=32&height=32"),
        Some(&alice),
        400,
        "M_UNKNOWN",
    )
    .await;
    // A file that only starts like a PNG is refused the same way (bounded decoding of huge
    // dimensions is unit-tested in service::media::thumbnail).
    let (_, fake) = upload(
        &s,
        &alice,
        b"\x89PNG\r\n\x1a\nnot really".to_vec(),
        Some("image/png"),
        None,
    )
    .await;
    get_err(
        &s,
        &format!("{V1}/thumbnail/{server}/{fake}?width=32&height=32"),
        Some(&alice),
        400,
        "M_UNKNOWN",
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn legacy_endpoints_are_frozen_by_default() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let (server, id) = upload(&s, &alice, png(64, 64), Some("image/png"), None).await;
    for path in [
        format!("{LEGACY}/download/{server}/{id}"),
        format!("{LEGACY}/download/{server}/{id}/a.png"),
        format!("{LEGACY}/thumbnail/{server}/{id}?width=32&height=32"),
    ] {
        get_err(&s, &path, None, 404, "M_NOT_FOUND").await;
        get_err(&s, &path, Some(&alice), 404, "M_NOT_FOUND").await;
    }
    s.stop().await;

    let s = TestServer::start_with(|c| c.freeze_legacy_media = false).await;
    let alice = s.user("alice").await;
    let bytes = png(64, 64);
    let (server, id) = upload(&s, &alice, bytes.clone(), Some("image/png"), Some("a.png")).await;
    let got = get(&s, &format!("{LEGACY}/download/{server}/{id}"), None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, bytes);
    assert_eq!(got.header("content-disposition"), "inline; filename=a.png");
    let got = get(&s, &format!("{LEGACY}/download/{server}/{id}/b.png"), None).await;
    assert_eq!(got.header("content-disposition"), "inline; filename=b.png");
    let got = get(
        &s,
        &format!("{LEGACY}/thumbnail/{server}/{id}?width=32&height=32&method=crop"),
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(dimensions(&got.body), (32, 32));
    get_err(
        &s,
        &format!("{LEGACY}/download/{server}/missing"),
        None,
        404,
        "M_NOT_FOUND",
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn media_survives_a_restart() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bytes = png(200, 100);
    let (server, id) = upload(
        &s,
        &alice,
        bytes.clone(),
        Some("image/png"),
        Some("keep.png"),
    )
    .await;
    let thumb_path = format!("{V1}/thumbnail/{server}/{id}?width=32&height=32&method=crop");
    let thumb = get(&s, &thumb_path, Some(&alice)).await.body;
    let got = send(
        &s,
        reqwest::Method::POST,
        "/_matrix/media/v1/create",
        Some(&alice.token),
        None,
        None,
    )
    .await;
    let (_, pending) = mxc_parts(got.json()["content_uri"].as_str().expect("uri"));

    s.restart().await;
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&alice)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, bytes);
    assert_eq!(
        got.header("content-disposition"),
        "inline; filename=keep.png"
    );
    let files = stored_files(&s);
    assert_eq!(get(&s, &thumb_path, Some(&alice)).await.body, thumb);
    assert_eq!(stored_files(&s), files, "the thumbnail came from disk");
    // A created id is still waiting for its upload.
    let got = send_bytes(
        &s,
        reqwest::Method::PUT,
        &format!("{LEGACY}/upload/{server}/{pending}"),
        &alice,
        None,
        b"after restart",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.json());
    s.stop().await;
}

/// A tiny HTTP server on loopback that answers every path from `pages`: (path, status, headers,
/// body). Stops when dropped.
struct TinyHttp {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TinyHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Page = (&'static str, u16, Vec<(&'static str, String)>, Vec<u8>);

async fn tiny_http(bind: &str, pages: Vec<Page>) -> TinyHttp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let pages = std::sync::Arc::new(pages);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, headers, body) = match pages.iter().find(|p| p.0 == path) {
                    Some((_, status, headers, body)) => (*status, headers.clone(), body.clone()),
                    None => (404, Vec::new(), b"not found".to_vec()),
                };
                let mut res = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    res.push_str(&format!("{k}: {v}\r\n"));
                }
                res.push_str("\r\n");
                let _ = conn.write_all(res.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    TinyHttp { addr, task }
}

#[tokio::test]
async fn url_previews_are_off_by_default_and_never_reach_internal_addresses() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    get_err(
        &s,
        &format!("{V1}/preview_url?url={}", enc("https://example.org/")),
        Some(&alice),
        404,
        "M_UNRECOGNIZED",
    )
    .await;
    s.stop().await;

    let s = TestServer::start_with(|c| c.url_preview_enabled = true).await;
    let alice = s.user("alice").await;
    let page = tiny_http(
        "127.0.0.1:0",
        vec![(
            "/",
            200,
            vec![("content-type", "text/html".into())],
            b"<title>secret</title>".to_vec(),
        )],
    )
    .await;
    let port = page.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://0.0.0.0/".to_owned(),
    ] {
        for prefix in [V1, LEGACY] {
            let path = format!("{prefix}/preview_url?url={}", enc(&url));
            let got = get(&s, &path, Some(&alice)).await;
            assert_err(&got.err(), 403, "M_FORBIDDEN");
            assert!(!got.json().to_string().contains("secret"));
        }
    }
    for url in ["file:///etc/passwd", "gopher://example.org/", "not a url"] {
        get_err(
            &s,
            &format!("{V1}/preview_url?url={}", enc(url)),
            Some(&alice),
            400,
            "M_INVALID_PARAM",
        )
        .await;
    }
    get_err(
        &s,
        &format!("{V1}/preview_url"),
        Some(&alice),
        400,
        "M_MISSING_PARAM",
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn url_preview_of_an_allowed_range_reads_opengraph() {
    let s = TestServer::start_with(|c| {
        c.url_preview_enabled = true;
        c.url_preview_ip_range_allowlist = vec!["127.0.0.1/32".into()];
    })
    .await;
    let alice = s.user("alice").await;
    let image = png(48, 24);
    // An IPv6 loopback server, outside the allowlist, that a redirect points to.
    let v6 = tiny_http(
        "[::1]:0",
        vec![(
            "/",
            200,
            vec![("content-type", "text/html".into())],
            b"<title>v6</title>".to_vec(),
        )],
    )
    .await;
    let html = r#"<html><head><title>Fallback</title>
        <meta property="og:title" content="Hafen &amp; friends">
        <meta property="og:description" content="A page about media">
        <meta property="og:image" content="/logo.png">
        </head><body>hello</body></html>"#;
    let web = tiny_http(
        "127.0.0.1:0",
        vec![
            (
                "/page",
                200,
                vec![("content-type", "text/html; charset=utf-8".into())],
                html.as_bytes().to_vec(),
            ),
            (
                "/logo.png",
                200,
                vec![("content-type", "image/png".into())],
                image.clone(),
            ),
            (
                "/plain",
                200,
                vec![("content-type", "text/html".into())],
                b"<html><head><title>Just a title</title></head></html>".to_vec(),
            ),
            (
                "/moved",
                302,
                vec![("location", "/page".into())],
                Vec::new(),
            ),
            (
                "/escape",
                302,
                vec![("location", format!("http://[::1]:{}/", v6.addr.port()))],
                Vec::new(),
            ),
            ("/loop", 302, vec![("location", "/loop".into())], Vec::new()),
        ],
    )
    .await;
    let base = format!("http://127.0.0.1:{}", web.addr.port());
    let preview = |path: &str| {
        let url = format!("{V1}/preview_url?url={}", enc(&format!("{base}{path}")));
        let s = &s;
        let alice = &alice;
        async move { get(s, &url, Some(alice)).await }
    };

    let got = preview("/page").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.json());
    let og = got.json();
    assert_eq!(og["og:title"], "Hafen & friends");
    assert_eq!(og["og:description"], "A page about media");
    assert_eq!(og["og:image:type"], "image/png");
    assert_eq!(og["og:image:width"], 48);
    assert_eq!(og["og:image:height"], 24);
    assert_eq!(og["matrix:image:size"], image.len());
    let (server, id) = mxc_parts(og["og:image"].as_str().expect("og:image is an mxc uri"));
    let got = get(&s, &format!("{V1}/download/{server}/{id}"), Some(&alice)).await;
    assert_eq!(got.body, image, "the preview image is stored as media");

    // Redirects are followed (and checked).
    let got = preview("/moved").await;
    assert_eq!(got.json()["og:title"], "Hafen & friends");
    let got = preview("/plain").await;
    assert_eq!(got.json(), json!({ "og:title": "Just a title" }));
    let got = preview("/escape").await;
    assert_err(&got.err(), 403, "M_FORBIDDEN");
    let got = preview("/loop").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.json());
    let got = preview("/missing").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);

    // Cached: the page is served again after its server is gone.
    drop(web);
    let got = preview("/page").await;
    assert_eq!(got.json()["og:title"], "Hafen & friends");
    s.stop().await;
}

/// Synapse's admin API for a user's media: list (paginated, ordered), delete the user's media,
/// delete one item; admins only; the deleted bytes and file names are gone from disk.
#[tokio::test]
async fn admins_list_and_delete_a_users_media_at_synapses_paths() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let admin = s.user("admin").await;
    s.services()
        .accounts
        .set_admin(
            &ruma::UserId::parse(admin.user_id.as_str()).expect("id"),
            true,
        )
        .expect("admin");
    let mut ids = Vec::new();
    for (i, size) in [40usize, 20, 30].into_iter().enumerate() {
        let bytes = format!("{:0>size$}", format!("alice-secret-{i}-")).into_bytes();
        let (_, id) = upload(
            &s,
            &alice,
            bytes,
            Some("text/plain"),
            Some(&format!("note-{i}-unique-name.txt")),
        )
        .await;
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, bobs) = upload(&s, &bob, b"bob's file".to_vec(), Some("text/plain"), None).await;
    let media_path = |u: &TestUser| format!("/_synapse/admin/v1/users/{}/media", enc(&u.user_id));

    // Not an admin: 403, whoever asks about whom.
    assert_err(
        &s.get(&media_path(&alice), &alice).await,
        403,
        "M_FORBIDDEN",
    );

    // By upload time (default), a page of two, then the rest.
    let (status, body) = s
        .get(&format!("{}?limit=2", media_path(&alice)), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], json!(3));
    assert_eq!(body["next_token"], json!(2));
    let listed: Vec<&str> = body["media"]
        .as_array()
        .expect("media")
        .iter()
        .map(|m| m["media_id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, vec![ids[0].as_str(), ids[1].as_str()]);
    let first = &body["media"][0];
    assert_eq!(first["media_type"], json!("text/plain"));
    assert_eq!(first["media_length"], json!(40));
    assert_eq!(first["upload_name"], json!("note-0-unique-name.txt"));
    assert!(first["created_ts"].as_u64().expect("ts") > 0);
    assert_eq!(first["quarantined_by"], Value::Null);
    assert_eq!(first["safe_from_quarantine"], json!(false));
    let (_, body) = s
        .get(&format!("{}?from=2", media_path(&alice)), &admin)
        .await;
    assert_eq!(body["media"][0]["media_id"], json!(ids[2]));
    assert!(body.get("next_token").is_none(), "{body}");
    // By size, largest first.
    let (_, body) = s
        .get(
            &format!("{}?order_by=media_length&dir=b", media_path(&alice)),
            &admin,
        )
        .await;
    let sizes: Vec<u64> = body["media"]
        .as_array()
        .expect("media")
        .iter()
        .map(|m| m["media_length"].as_u64().expect("len"))
        .collect();
    assert_eq!(sizes, vec![40, 30, 20]);
    // Bad parameters and users.
    assert_err(
        &s.get(&format!("{}?order_by=nonsense", media_path(&alice)), &admin)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(&format!("{}?from=-1", media_path(&alice)), &admin)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &s.get(
            "/_synapse/admin/v1/users/%40nobody%3Alocalhost/media",
            &admin,
        )
        .await,
        404,
        "M_NOT_FOUND",
    );

    // Delete one item; remote media and unknown ids are refused.
    let (status, body) = s
        .req(
            reqwest::Method::DELETE,
            &format!("/_synapse/admin/v1/media/localhost/{}", ids[0]),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "total": 1, "deleted_media": [ids[0]] }));
    get_err(
        &s,
        &format!("{V1}/download/localhost/{}", ids[0]),
        Some(&bob),
        404,
        "M_NOT_FOUND",
    )
    .await;
    let again = s
        .req(
            reqwest::Method::DELETE,
            &format!("/_synapse/admin/v1/media/localhost/{}", ids[0]),
            Some(&admin.token),
            None,
        )
        .await;
    assert_err(&again, 404, "M_NOT_FOUND");
    let remote = s
        .req(
            reqwest::Method::DELETE,
            "/_synapse/admin/v1/media/other.example/abc",
            Some(&admin.token),
            None,
        )
        .await;
    assert_err(&remote, 400, "M_UNKNOWN");

    // Delete the rest of alice's media; bob's stays.
    let (status, body) = s
        .req(
            reqwest::Method::DELETE,
            &media_path(&alice),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], json!(2));
    let mut deleted: Vec<String> = body["deleted_media"]
        .as_array()
        .expect("deleted")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    deleted.sort();
    let mut expected = vec![ids[1].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(deleted, expected);
    let (_, body) = s.get(&media_path(&alice), &admin).await;
    assert_eq!(body, json!({ "media": [], "total": 0 }));
    let got = get(&s, &format!("{V1}/download/localhost/{bobs}"), Some(&alice)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"bob's file");

    // Neither the contents nor the file names are anywhere on disk.
    let data = s
        .services()
        .config
        .database_path
        .parent()
        .expect("dir")
        .to_path_buf();
    for needle in ["alice-secret-", "unique-name.txt"] {
        let hits = crate::common::files_containing(&data, needle.as_bytes());
        assert!(hits.is_empty(), "{needle} still in {hits:?}");
    }
    // Every call was audited as an admin action.
    let calls = s
        .services()
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "admin_action")
        .expect("audit")
        .0;
    assert!(calls.iter().any(|e| e.detail["endpoint"]
        == json!("DELETE /_synapse/admin/v1/users/{userId}/media")
        && e.detail["allowed"] == json!(true)));
    assert!(calls.iter().any(|e| e.detail["endpoint"]
        == json!("GET /_synapse/admin/v1/users/{userId}/media")
        && e.detail["allowed"] == json!(false)));
    s.stop().await;
}
