//! Media encrypted at rest (C2): with `media_encryption_key_file` set, no uploaded byte is on
//! disk in the clear, yet downloads, thumbnails, federation media and the export archive return
//! the content; files of several chunks stream; a damaged file is an error, not data; a store
//! with files from before the key works and `hafen media encrypt` converts it.

use std::{io::Read, path::Path};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

use crate::common::{assert_err, start_federating, TestPki, TestServer, TestUser};

/// Write a key file (64 hex digits, mode 600) into `dir`.
pub fn key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::write(&path, key).expect("key file");
    set_mode(&path, 0o600);
    path
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Every regular file below `dir`, with its bytes.
pub fn all_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        assert!(
            out.len() < 100_000,
            "too many files under {}",
            dir.display()
        );
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    all_files(dir)
        .into_iter()
        .filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// The stored media files (not the store's temp directory).
fn stored(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    all_files(dir)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(dir.join("tmp")))
        .collect()
}

fn unique(tag: &str) -> String {
    format!("{tag}-{}", hafen::utils::random_string(32))
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 77, 255]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

pub async fn upload(s: &TestServer, u: &TestUser, bytes: Vec<u8>, ct: &str) -> (String, String) {
    let res = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=f.bin", s.base))
        .bearer_auth(&u.token)
        .header("Content-Type", ct)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let v: Value = res.json().await.expect("json");
    let mxc = v["content_uri"].as_str().expect("content_uri");
    let (server, id) = mxc
        .strip_prefix("mxc://")
        .and_then(|r| r.split_once('/'))
        .expect("mxc");
    (server.to_owned(), id.to_owned())
}

pub async fn download(s: &TestServer, u: &TestUser, server: &str, id: &str) -> reqwest::Response {
    s.http
        .get(format!(
            "{}/_matrix/client/v1/media/download/{server}/{id}",
            s.base
        ))
        .bearer_auth(&u.token)
        .send()
        .await
        .expect("download")
}

/// A byte range of a download: status, `Content-Range`, body.
async fn ranged(
    s: &TestServer,
    u: &TestUser,
    server: &str,
    id: &str,
    range: &str,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let res = s
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/download/{server}/{id}",
            s.base
        ))
        .bearer_auth(&u.token)
        .header("Range", range)
        .send()
        .await
        .expect("download");
    let status = res.status();
    let content_range = res
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        status,
        content_range,
        res.bytes().await.expect("body").to_vec(),
    )
}

async fn download_ok(s: &TestServer, u: &TestUser, server: &str, id: &str) -> Vec<u8> {
    let res = download(s, u, server, id).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.bytes().await.expect("body").to_vec()
}

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Restart `s` on the same data with the config changed by `adjust`.
pub async fn restart_with(s: &mut TestServer, adjust: impl FnOnce(&mut hafen::config::Config)) {
    let r = s.running.take().expect("running");
    let mut config = r.services.config.clone();
    r.stop().await.expect("clean stop");
    adjust(&mut config);
    let running = hafen::server::start(config).await.expect("server restarts");
    s.base = running.base_url();
    s.running = Some(running);
}

#[tokio::test]
async fn encrypted_media_is_not_on_disk_in_the_clear_but_is_served() {
    let keys = tempfile::tempdir().expect("dir");
    let key = key_file(keys.path(), "media.key");
    let s = TestServer::start_with(|c| c.media_encryption_key_file = Some(key.clone())).await;
    let alice = s.user("alice").await;
    let media_dir = s.services().config.media_dir();

    let text = unique("secret-media");
    let (server, text_id) = upload(&s, &alice, text.clone().into_bytes(), "text/plain").await;
    let image = png(96, 64);
    let (_, image_id) = upload(&s, &alice, image.clone(), "image/png").await;
    // Several chunks (64 KiB each), the last one partial, and one of exactly four chunks.
    let large = random_bytes(5 * 64 * 1024 + 1234);
    let (_, large_id) = upload(&s, &alice, large.clone(), "application/octet-stream").await;
    let exact = random_bytes(4 * 64 * 1024);
    let (_, exact_id) = upload(&s, &alice, exact.clone(), "application/octet-stream").await;
    let empty_id = upload(&s, &alice, Vec::new(), "text/plain").await.1;

    // Served as uploaded.
    assert_eq!(
        download_ok(&s, &alice, &server, &text_id).await,
        text.as_bytes()
    );
    assert_eq!(download_ok(&s, &alice, &server, &image_id).await, image);
    let res = download(&s, &alice, &server, &large_id).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(large.len().to_string().as_str())
    );
    assert_eq!(res.bytes().await.expect("body").to_vec(), large);
    assert_eq!(download_ok(&s, &alice, &server, &exact_id).await, exact);
    // Byte ranges: across a chunk boundary, from inside a later chunk to the end, the last
    // bytes, and outside the file.
    let size = large.len();
    for (range, from, to) in [
        ("bytes=65530-65545".to_owned(), 65530, 65545),
        ("bytes=200000-".to_owned(), 200_000, size - 1),
        ("bytes=-100".to_owned(), size - 100, size - 1),
        ("bytes=0-0".to_owned(), 0, 0),
        (
            format!("bytes={}-{}", 3 * 65536, 4 * 65536 - 1),
            3 * 65536,
            4 * 65536 - 1,
        ),
    ] {
        let (status, content_range, body) = ranged(&s, &alice, &server, &large_id, &range).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            content_range,
            Some(format!("bytes {from}-{to}/{size}")),
            "{range}"
        );
        assert_eq!(body, large[from..=to], "{range}");
    }
    let (status, content_range, body) =
        ranged(&s, &alice, &server, &large_id, &format!("bytes={size}-")).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(content_range, Some(format!("bytes */{size}")));
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["errcode"], json!("M_UNKNOWN"));
    // Several ranges are not served as such: the whole file.
    let (status, _, body) = ranged(&s, &alice, &server, &large_id, "bytes=0-1,5-6").await;
    assert_eq!((status, body.len()), (StatusCode::OK, size));
    assert!(download_ok(&s, &alice, &server, &empty_id).await.is_empty());
    let res = s
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/thumbnail/{server}/{image_id}?width=32&height=32&method=scale",
            s.base
        ))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("thumbnail");
    assert_eq!(res.status(), StatusCode::OK);
    let thumb = res.bytes().await.expect("thumbnail bytes");
    let decoded = image::load_from_memory(&thumb).expect("a thumbnail image");
    assert!(decoded.width() <= 96 && decoded.width() >= 32);

    // The export archive holds the plaintext.
    let res = s
        .http
        .get(format!("{}/_hafen/client/v1/export", s.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("export");
    assert_eq!(res.status(), StatusCode::OK);
    let tar = res.bytes().await.expect("export body").to_vec();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut exported = std::collections::HashMap::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read");
        exported.insert(path, data);
    }
    assert_eq!(
        exported.get(&format!("media/{server}/{text_id}")),
        Some(&text.clone().into_bytes())
    );
    assert_eq!(
        exported.get(&format!("media/{server}/{large_id}")),
        Some(&large)
    );

    // On disk: every file is encrypted, none holds the content, none is named by its hash.
    let files = stored(&media_dir);
    assert!(files.len() >= 5, "{} files", files.len());
    for (path, bytes) in &files {
        assert!(
            bytes.starts_with(b"HAFENENC"),
            "{} is not encrypted",
            path.display()
        );
        assert!(
            path.to_string_lossy().ends_with(".enc"),
            "{}",
            path.display()
        );
    }
    assert!(files_containing(&media_dir, text.as_bytes()).is_empty());
    assert!(files_containing(&media_dir, &large[70_000..70_064]).is_empty());
    assert!(
        files_containing(&media_dir, b"\x89PNG\r\n\x1a\n").is_empty(),
        "no image in the clear"
    );
    for hash in [
        sha256_hex(text.as_bytes()),
        sha256_hex(&large),
        sha256_hex(&image),
    ] {
        assert!(
            files
                .iter()
                .all(|(p, _)| !p.to_string_lossy().contains(&hash)),
            "a file is named by the content hash {hash}"
        );
    }
}

#[tokio::test]
async fn a_damaged_encrypted_file_is_an_error_not_data() {
    let keys = tempfile::tempdir().expect("dir");
    let key = key_file(keys.path(), "media.key");
    let s = TestServer::start_with(|c| c.media_encryption_key_file = Some(key.clone())).await;
    let alice = s.user("alice").await;
    let media_dir = s.services().config.media_dir();

    let find = |needle_before: &[(std::path::PathBuf, Vec<u8>)]| -> std::path::PathBuf {
        let before: Vec<_> = needle_before.iter().map(|(p, _)| p.clone()).collect();
        stored(&media_dir)
            .into_iter()
            .map(|(p, _)| p)
            .find(|p| !before.contains(p))
            .expect("the new file")
    };

    // A small file with one byte changed: 500 M_UNKNOWN, no content.
    let before = stored(&media_dir);
    let (server, small_id) = upload(&s, &alice, unique("small").into_bytes(), "text/plain").await;
    let small_path = find(&before);
    let mut bytes = std::fs::read(&small_path).expect("read");
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&small_path, &bytes).expect("write");
    let res = download(&s, &alice, &server, &small_id).await;
    let status = res.status();
    let body: Value = res.json().await.expect("json error");
    assert_err(&(status, body), 500, "M_UNKNOWN");

    // A large file damaged in its third chunk: the transfer breaks off instead of delivering
    // wrong bytes (the headers went out with the first chunk, which was sound).
    let before = stored(&media_dir);
    let large = random_bytes(4 * 64 * 1024 + 10);
    let (_, large_id) = upload(&s, &alice, large.clone(), "application/octet-stream").await;
    let large_path = find(&before);
    let mut bytes = std::fs::read(&large_path).expect("read");
    bytes[16 + 2 * (64 * 1024 + 16) + 100] ^= 1;
    std::fs::write(&large_path, &bytes).expect("write");
    // A client of its own: the broken-off connection must not be reused by the next requests.
    // The server aborts the connection at the damaged chunk: before the response head was
    // flushed (the request fails) or after it (the body fails); never a complete body.
    let sent = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v1/media/download/{server}/{large_id}",
            s.base
        ))
        .bearer_auth(&alice.token)
        .send()
        .await;
    if let Ok(res) = sent {
        assert_eq!(res.status(), StatusCode::OK);
        if let Ok(got) = res.bytes().await {
            panic!(
                "a damaged file was served ({} of {} bytes)",
                got.len(),
                large.len()
            );
        }
    }

    // Cut after its first chunk (a chunk boundary): the cut is noticed, 500.
    let before = stored(&media_dir);
    let other = random_bytes(3 * 64 * 1024);
    let (_, other_id) = upload(&s, &alice, other, "application/octet-stream").await;
    let other_path = find(&before);
    let bytes = std::fs::read(&other_path).expect("read");
    std::fs::write(&other_path, &bytes[..16 + 64 * 1024 + 16]).expect("write");
    let res = download(&s, &alice, &server, &other_id).await;
    let status = res.status();
    let body: Value = res.json().await.expect("json error");
    assert_err(&(status, body), 500, "M_UNKNOWN");

    // Undamaged media is unaffected.
    let fine = unique("fine");
    let (_, fine_id) = upload(&s, &alice, fine.clone().into_bytes(), "text/plain").await;
    assert_eq!(
        download_ok(&s, &alice, &server, &fine_id).await,
        fine.as_bytes()
    );
}

#[tokio::test]
async fn a_mixed_store_works_and_hafen_media_encrypt_converts_it() {
    let keys = tempfile::tempdir().expect("dir");
    let key = key_file(keys.path(), "media.key");
    let mut s = TestServer::start().await;
    let alice = s.user("alice").await;
    let media_dir = s.services().config.media_dir();
    let old = unique("before-the-key");
    let (server, old_id) = upload(&s, &alice, old.clone().into_bytes(), "text/plain").await;
    assert_eq!(files_containing(&media_dir, old.as_bytes()).len(), 1);

    // A bad key file stops the start with a message naming the file.
    let world_readable = key_file(keys.path(), "open.key");
    set_mode(&world_readable, 0o644);
    let short = keys.path().join("short.key");
    std::fs::write(&short, "abcd").expect("write");
    set_mode(&short, 0o600);
    for (bad, says) in [
        (world_readable.clone(), "accessible to every user"),
        (short.clone(), "32 bytes"),
        (keys.path().join("missing.key"), "cannot read"),
    ] {
        let mut config = s.services().config.clone();
        config.database_path = keys
            .path()
            .join(format!("db-{}", hafen::utils::random_string(8)));
        config.media_encryption_key_file = Some(bad);
        let err = match hafen::server::start(config).await {
            Ok(_) => panic!("started with a bad key file"),
            Err(e) => e,
        };
        assert!(err.contains(says), "{err}");
        assert!(!err.contains(&std::fs::read_to_string(&world_readable).expect("key")));
    }

    restart_with(&mut s, |c| c.media_encryption_key_file = Some(key.clone())).await;
    let new = unique("after-the-key");
    let (_, new_id) = upload(&s, &alice, new.clone().into_bytes(), "text/plain").await;
    // Both served; only the old one is in the clear.
    assert_eq!(
        download_ok(&s, &alice, &server, &old_id).await,
        old.as_bytes()
    );
    assert_eq!(
        download_ok(&s, &alice, &server, &new_id).await,
        new.as_bytes()
    );
    let (status, _, part) = ranged(&s, &alice, &server, &old_id, "bytes=2-5").await;
    assert_eq!(
        (status, part),
        (StatusCode::PARTIAL_CONTENT, old.as_bytes()[2..=5].to_vec())
    );
    let (status, _, part) = ranged(&s, &alice, &server, &new_id, "bytes=2-5").await;
    assert_eq!(
        (status, part),
        (StatusCode::PARTIAL_CONTENT, new.as_bytes()[2..=5].to_vec())
    );
    assert_eq!(files_containing(&media_dir, old.as_bytes()).len(), 1);
    assert!(files_containing(&media_dir, new.as_bytes()).is_empty());

    // `hafen media encrypt` refuses while the server holds the database...
    let config = s.services().config.clone();
    let err = hafen::service::media::encrypt_store(&config).expect_err("server running");
    assert!(err.contains("in use"), "{err}");
    // ... and converts the old file once it is stopped; a second run has nothing to do.
    let mut report = None;
    s.restart_after(|c| report = Some(hafen::service::media::encrypt_store(c)))
        .await;
    let report = report.expect("ran").expect("encrypt");
    assert_eq!((report.converted, report.mismatched), (1, 0));
    assert!(files_containing(&media_dir, old.as_bytes()).is_empty());
    assert!(stored(&media_dir)
        .iter()
        .all(|(_, b)| b.starts_with(b"HAFENENC")));
    assert_eq!(
        download_ok(&s, &alice, &server, &old_id).await,
        old.as_bytes()
    );
    assert_eq!(
        download_ok(&s, &alice, &server, &new_id).await,
        new.as_bytes()
    );
    let mut again = None;
    s.restart_after(|c| again = Some(hafen::service::media::encrypt_store(c)))
        .await;
    assert_eq!(again.expect("ran").expect("encrypt").converted, 0);

    // Without the key the encrypted files cannot be served: an error, not ciphertext.
    restart_with(&mut s, |c| c.media_encryption_key_file = None).await;
    let res = download(&s, &alice, &server, &new_id).await;
    let status = res.status();
    let body: Value = res.json().await.expect("json");
    assert_err(&(status, body), 500, "M_UNKNOWN");
}

#[tokio::test]
async fn federation_media_of_an_encrypting_server() {
    let keys = tempfile::tempdir().expect("dir");
    let key_a = key_file(keys.path(), "a.key");
    let key_b = key_file(keys.path(), "b.key");
    let pki = TestPki::new();
    let a = start_federating(&pki, |c| c.media_encryption_key_file = Some(key_a.clone())).await;
    let b = start_federating(&pki, |c| c.media_encryption_key_file = Some(key_b.clone())).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let text = unique("federated-secret");
    let (server, id) = upload(&a, &alice, text.clone().into_bytes(), "text/plain").await;
    let image = png(80, 40);
    let (_, image_id) = upload(&a, &alice, image.clone(), "image/png").await;

    // B fetches from A over federation (A decrypts as it streams), stores it encrypted itself.
    assert_eq!(download_ok(&b, &bob, &server, &id).await, text.as_bytes());
    // A file of several encryption chunks arrives whole (the answer is streamed, not buffered).
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (_, big_id) = upload(&a, &alice, big.clone(), "application/octet-stream").await;
    assert_eq!(download_ok(&b, &bob, &server, &big_id).await, big);
    assert_eq!(download_ok(&b, &bob, &server, &image_id).await, image);
    let res = b
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/thumbnail/{server}/{image_id}?width=32&height=32&method=scale",
            b.base
        ))
        .bearer_auth(&bob.token)
        .send()
        .await
        .expect("thumbnail");
    assert_eq!(res.status(), StatusCode::OK);
    image::load_from_memory(&res.bytes().await.expect("bytes")).expect("a thumbnail image");
    for s in [&a, &b] {
        let dir = s.services().config.media_dir();
        assert!(files_containing(&dir, text.as_bytes()).is_empty());
        assert!(files_containing(&dir, b"\x89PNG\r\n\x1a\n").is_empty());
    }
    let (status, body) = b.get("/_matrix/client/v3/account/whoami", &bob).await;
    assert_eq!(
        (status, body["user_id"].clone()),
        (StatusCode::OK, json!(bob.user_id))
    );
}
