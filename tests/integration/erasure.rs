//! The data subject's rights and transparency over real HTTP: export of a user's data (tar
//! archive, unpacked and checked), erasure on deactivation with `erase` (the text is physically
//! gone from the data directory, others see redactions, media and profile gone, audit entries
//! pseudonymized; across two federating Hafens the remote copy is redacted too), the privacy
//! notice accepted through `m.login.terms` at registration, and `hafen audit`.

use std::{collections::HashMap, io::Read, path::Path, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{
    assert_err, enc, files_containing, start_federating, TestPki, TestServer, TestUser,
};

const V3: &str = "/_matrix/client/v3";

fn uid(s: &str) -> ruma::OwnedUserId {
    ruma::UserId::parse(s).expect("user id")
}

async fn say(server: &TestServer, user: &TestUser, room: &str, text: &str) -> String {
    let (status, body) = server
        .put(
            &format!(
                "{V3}/rooms/{}/send/m.room.message/{}",
                enc(room),
                crate::common::unique_txn()
            ),
            user,
            json!({ "msgtype": "m.text", "body": text }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event id").to_owned()
}

async fn upload(server: &TestServer, user: &TestUser, bytes: Vec<u8>) -> (String, String) {
    let res = server
        .http
        .post(format!("{}/_matrix/media/v3/upload", server.base))
        .bearer_auth(&user.token)
        .header("content-type", "text/plain")
        .body(bytes)
        .send()
        .await
        .expect("upload sent");
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("json");
    let mxc = body["content_uri"].as_str().expect("content_uri");
    let (server_name, id) = mxc
        .strip_prefix("mxc://")
        .and_then(|r| r.split_once('/'))
        .expect("mxc");
    (server_name.to_owned(), id.to_owned())
}

async fn get_bytes(server: &TestServer, path: &str, user: &TestUser) -> (StatusCode, Vec<u8>) {
    let res = server
        .http
        .get(format!("{}{path}", server.base))
        .bearer_auth(&user.token)
        .send()
        .await
        .expect("request sent");
    let status = res.status();
    (status, res.bytes().await.expect("body").to_vec())
}

/// The files of a tar archive by path.
fn untar(bytes: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = HashMap::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read entry");
        out.insert(path, data);
    }
    out
}

fn password_auth(user: &TestUser) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user.user_id },
        "password": "password",
    })
}

async fn erase(server: &TestServer, user: &TestUser) {
    // Without re-authentication: the UIA challenge.
    let (status, body) = server
        .post(
            &format!("{V3}/account/deactivate"),
            user,
            json!({ "erase": true }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"][0]["stages"], json!(["m.login.password"]));
    let (status, body) = server
        .post(
            &format!("{V3}/account/deactivate"),
            user,
            json!({ "erase": true, "auth": password_auth(user) }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "id_server_unbind_result": "no-support" }));
}

#[tokio::test]
async fn export_holds_the_users_events_media_profile_and_devices() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let (status, _) = server
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&alice.user_id)),
            &alice,
            json!({ "displayname": "Alice Export" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            &format!(
                "{V3}/user/{}/account_data/org.example.note",
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "note": "kept" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let room = server.create_room(&alice, json!({})).await;
    server.invite_and_join(&alice, &bob, &room).await;
    let mine = say(&server, &alice, &room, "export-me-7f3a").await;
    say(&server, &bob, &room, "not alice's").await;
    let (media_server, media_id) = upload(&server, &alice, b"alice's file 91c2".to_vec()).await;

    // No token: 401.
    let (status, body) = server
        .req(Method::GET, "/_hafen/client/v1/export", None, None)
        .await;
    assert_err(&(status, body), 401, "M_MISSING_TOKEN");

    let (status, tar) = get_bytes(&server, "/_hafen/client/v1/export", &alice).await;
    assert_eq!(status, StatusCode::OK);
    let files = untar(&tar);
    let manifest: Value =
        serde_json::from_slice(files.get("manifest.json").expect("manifest")).expect("json");
    assert_eq!(manifest["user_id"], alice.user_id);
    assert_eq!(manifest["profile"]["displayname"], "Alice Export");
    assert!(manifest["account_data"]
        .as_array()
        .expect("account data")
        .iter()
        .any(|a| a["type"] == "org.example.note" && a["content"]["note"] == "kept"));
    let devices = manifest["devices"].as_array().expect("devices");
    assert!(devices.iter().any(|d| d["device_id"] == alice.device_id));
    let text = String::from_utf8_lossy(files.get("manifest.json").expect("manifest"));
    assert!(
        !text.contains(&alice.token),
        "no access token in the export"
    );
    assert!(
        !text.contains("token_hash"),
        "no token hashes in the export"
    );
    assert!(manifest["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .any(|r| r["room_id"] == room && r["membership"] == "join"));
    // Events: every one alice sent (the message and her state events), none of bob's.
    let mut events = Vec::new();
    for f in manifest["event_files"].as_array().expect("event files") {
        let data = files
            .get(f["path"].as_str().expect("path"))
            .expect("event file in archive");
        for line in String::from_utf8_lossy(data).lines() {
            events.push(serde_json::from_str::<Value>(line).expect("event line"));
        }
    }
    assert!(events
        .iter()
        .any(|e| e["event_id"] == mine && e["content"]["body"] == "export-me-7f3a"));
    assert!(events.iter().all(|e| e["sender"] == alice.user_id));
    assert!(events.iter().any(|e| e["type"] == "m.room.create"));
    // Media: the file itself.
    let path = format!("media/{media_server}/{media_id}");
    assert_eq!(
        files.get(&path).map(Vec::as_slice),
        Some(&b"alice's file 91c2"[..])
    );
    assert!(manifest["media"]
        .as_array()
        .expect("media")
        .iter()
        .any(|m| m["path"] == path && m["size"] == 17));
    // The export itself is audited.
    assert!(manifest["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .any(|a| a["kind"] == "export"));

    // Admin export: bob is no admin; as admin, alice's archive again.
    let target = format!("/_hafen/admin/v1/users/{}/export", enc(&alice.user_id));
    let (status, body) = server.get(&target, &bob).await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    server
        .services()
        .accounts
        .set_admin(&uid(&bob.user_id), true)
        .expect("admin");
    let (status, tar) = get_bytes(&server, &target, &bob).await;
    assert_eq!(status, StatusCode::OK);
    let files = untar(&tar);
    assert!(files.contains_key(&path));
    let (status, body) = server
        .get("/_hafen/admin/v1/users/%40nobody%3Alocalhost/export", &bob)
        .await;
    assert_err(&(status, body), 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn erasure_removes_the_text_from_disk_and_redacts_for_others() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = server.create_room(&bob, json!({})).await;
    server.invite_and_join(&bob, &alice, &room).await;
    // A display name set in the room: it goes into a membership event.
    let (status, _) = server
        .put(
            &format!("{V3}/profile/{}/displayname", enc(&alice.user_id)),
            &alice,
            json!({ "displayname": "unique-display-name-c0ffee" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let secret = "unique-erasure-text-5d9e0b";
    let event = say(&server, &alice, &room, secret).await;
    let bobs = say(&server, &bob, &room, "bob stays").await;
    let (media_server, media_id) =
        upload(&server, &alice, b"unique-media-bytes-a1b2c3".to_vec()).await;
    let (status, _) = server
        .put(
            &format!(
                "{V3}/user/{}/account_data/org.example.x",
                enc(&alice.user_id)
            ),
            &alice,
            json!({ "v": "unique-account-data-77e1" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A room alice already left: her message there can only be stripped locally.
    let left_room = server.create_room(&bob, json!({})).await;
    server.invite_and_join(&bob, &alice, &left_room).await;
    let left_event = say(&server, &alice, &left_room, "unique-left-room-text-e4f5").await;
    let (status, _) = server
        .post(
            &format!("{V3}/rooms/{}/leave", enc(&left_room)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let audit_before = server
        .services()
        .audit
        .query(0, u64::MAX, 10_000, None, |e| {
            e.user.as_deref() == Some(alice.user_id.as_str())
        })
        .expect("audit")
        .0
        .len();
    let db = server.services().config.database_path.clone();
    // Before: the text and the media are on disk (the walk would find them).
    assert!(!files_containing(&db, secret.as_bytes()).is_empty());
    assert!(!files_containing(&db, b"unique-media-bytes-a1b2c3").is_empty());

    erase(&server, &alice).await;

    // Others see a redaction.
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&event)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"], json!({}));
    assert_eq!(
        body["unsigned"]["redacted_because"]["sender"],
        alice.user_id
    );
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&bobs)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["content"]["body"], "bob stays");
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&left_room), enc(&left_event)),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"], json!({}));
    // Alice left the room.
    let (status, body) = server
        .get(
            &format!(
                "{V3}/rooms/{}/state/m.room.member/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["membership"], "leave");
    // Media gone.
    let (status, _) = get_bytes(
        &server,
        &format!("/_matrix/client/v1/media/download/{media_server}/{media_id}"),
        &bob,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Profile gone.
    let (status, body) = server
        .get(&format!("{V3}/profile/{}", enc(&alice.user_id)), &bob)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Her token no longer works.
    let (status, body) = server.get(&format!("{V3}/account/whoami"), &alice).await;
    assert_err(&(status, body), 401, "M_UNKNOWN_TOKEN");
    // Audit entries pseudonymized: none names her, as many carry the pseudonym.
    let s = server.services();
    let named = s
        .audit
        .query(0, u64::MAX, 10_000, None, |e| {
            serde_json::to_string(e)
                .map(|t| t.contains(alice.user_id.as_str()))
                .unwrap_or(true)
        })
        .expect("audit")
        .0;
    assert!(named.is_empty(), "{named:?}");
    let alias = hafen::policy::erasure::pseudonym(s, &uid(&alice.user_id));
    let pseudo = s
        .audit
        .query(0, u64::MAX, 10_000, None, |e| {
            e.user.as_deref() == Some(&alias)
        })
        .expect("audit")
        .0;
    assert!(pseudo.len() > audit_before, "{pseudo:?}");
    assert!(pseudo.iter().any(|e| e.kind == "erasure"));
    // Physically gone: no file under the data directory holds the text or the media.
    for needle in [
        secret.as_bytes(),
        b"unique-media-bytes-a1b2c3",
        b"unique-account-data-77e1",
        b"unique-display-name-c0ffee",
        b"unique-left-room-text-e4f5",
    ] {
        let found = files_containing(&db, needle);
        assert!(
            found.is_empty(),
            "{} still in {found:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // The admin API (Synapse's path) refuses non-admins.
    let carol = server.user("carol").await;
    let (status, body) = server
        .post(
            &format!("/_synapse/admin/v1/deactivate/{}", enc(&bob.user_id)),
            &carol,
            json!({ "erase": true }),
        )
        .await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn admin_erasure_at_synapses_path() {
    let server = TestServer::start().await;
    let admin = server.user("admin").await;
    let alice = server.user("alice").await;
    server
        .services()
        .accounts
        .set_admin(&uid(&admin.user_id), true)
        .expect("admin");
    let room = server.create_room(&admin, json!({})).await;
    server.invite_and_join(&admin, &alice, &room).await;
    let event = say(&server, &alice, &room, "admin-erased-3c4d").await;
    let (status, body) = server
        .post(
            &format!("/_synapse/admin/v1/deactivate/{}", enc(&alice.user_id)),
            &admin,
            json!({ "erase": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "id_server_unbind_result": "success" }));
    let (status, body) = server
        .get(
            &format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&event)),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["content"], json!({}));
    let found = files_containing(
        &server.services().config.database_path,
        b"admin-erased-3c4d",
    );
    assert!(found.is_empty(), "{found:?}");
    // The admin's own audit entry names the erased user by pseudonym only.
    let s = server.services();
    let alias = hafen::policy::erasure::pseudonym(s, &uid(&alice.user_id));
    let actions = s
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "admin_action")
        .expect("audit")
        .0;
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0].user.as_deref(), Some(admin.user_id.as_str()));
    assert_eq!(actions[0].detail["target"], alias);
    assert_eq!(actions[0].detail["erase"], true);
    server.stop().await;
}

#[tokio::test]
async fn erasure_redacts_the_remote_copy() {
    let pki = TestPki::new();
    let a = start_federating(&pki, |_| {}).await;
    let b = start_federating(&pki, |_| {}).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = a
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, body) = crate::federation_rooms::join_via(&b, &bob, &room, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let event = say(&a, &alice, &room, "remote-erasure-9a8b").await;
    let path = format!("{V3}/rooms/{}/event/{}", enc(&room), enc(&event));
    let mut seen = Value::Null;
    for _ in 0..200 {
        let (status, body) = b.get(&path, &bob).await;
        if status == StatusCode::OK && body["content"]["body"] == "remote-erasure-9a8b" {
            seen = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen["content"]["body"], "remote-erasure-9a8b",
        "bob never got it"
    );

    erase(&a, &alice).await;

    let mut last = Value::Null;
    for _ in 0..200 {
        let (status, body) = b.get(&path, &bob).await;
        if status == StatusCode::OK && body["content"] == json!({}) {
            last = body;
            break;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last["content"],
        json!({}),
        "remote copy not redacted: {last}"
    );
    assert_eq!(
        last["unsigned"]["redacted_because"]["sender"],
        alice.user_id
    );
    // Stored redacted on B, not only shown so.
    let stored = b
        .services()
        .rooms
        .pdu(&event)
        .expect("pdu")
        .expect("stored");
    assert_eq!(stored.content.get(), "{}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn registration_requires_accepting_the_privacy_notice() {
    let server = TestServer::start_with(|c| {
        c.privacy_notice = Some(hafen::config::PrivacyNotice {
            url: "https://example.org/privacy".into(),
            version: "2026-01".into(),
            name: None,
            block_until_accepted: true,
        });
    })
    .await;
    let (status, body) = server
        .req(Method::GET, "/_hafen/client/v1/privacy_notice", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["url"], "https://example.org/privacy");
    assert_eq!(body["version"], "2026-01");
    assert_eq!(body["name"], "Privacy notice");

    let reg = |auth: Option<Value>| {
        let mut b = json!({ "username": "newbie", "password": "a-password" });
        if let Some(a) = auth {
            b["auth"] = a;
        }
        b
    };
    let (status, body) = server
        .req(
            Method::POST,
            &format!("{V3}/register"),
            None,
            Some(reg(None)),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        body["flows"],
        json!([{ "stages": ["m.login.registration_token", "m.login.terms"] }])
    );
    assert_eq!(
        body["params"]["m.login.terms"]["policies"]["privacy_notice"],
        json!({
            "version": "2026-01",
            "en": { "name": "Privacy notice", "url": "https://example.org/privacy" }
        })
    );
    let session = body["session"].as_str().expect("session").to_owned();
    // The token alone does not finish registration: the terms stage is still open.
    let (status, body) = server
        .req(
            Method::POST,
            &format!("{V3}/register"),
            None,
            Some(reg(Some(json!({
                "type": "m.login.registration_token",
                "token": "test-token",
                "session": session,
            })))),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["completed"], json!(["m.login.registration_token"]));
    assert!(server
        .services()
        .accounts
        .user(&uid("@newbie:localhost"))
        .expect("read")
        .is_none());
    let (status, body) = server
        .req(
            Method::POST,
            &format!("{V3}/register"),
            None,
            Some(reg(Some(
                json!({ "type": "m.login.terms", "session": session }),
            ))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@newbie:localhost");
    assert!(body["access_token"].is_string());
    let s = server.services();
    let rec = s
        .accounts
        .user(&uid("@newbie:localhost"))
        .expect("read")
        .expect("user");
    assert_eq!(
        rec.privacy_notice_accepted
            .as_ref()
            .map(|(v, _)| v.as_str()),
        Some("2026-01")
    );
    let accepted = s
        .audit
        .query(0, u64::MAX, 100, None, |e| {
            e.kind == "privacy_notice_accepted"
        })
        .expect("audit")
        .0;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].user.as_deref(), Some("@newbie:localhost"));
    assert_eq!(accepted[0].detail["version"], "2026-01");
    server.stop().await;

    // Without a notice: 404, and registration offers no terms stage.
    let server = TestServer::start().await;
    let (status, body) = server
        .req(Method::GET, "/_hafen/client/v1/privacy_notice", None, None)
        .await;
    assert_err(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) = server
        .req(
            Method::POST,
            &format!("{V3}/register"),
            None,
            Some(reg(None)),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body["flows"],
        json!([{ "stages": ["m.login.registration_token"] }])
    );
    server.stop().await;
}

#[tokio::test]
async fn compliance_report_over_the_admin_api() {
    let server = TestServer::start().await;
    let admin = server.user("admin").await;
    let user = server.user("user").await;
    server
        .services()
        .accounts
        .set_admin(&uid(&admin.user_id), true)
        .expect("admin");
    let (status, body) = server
        .get("/_hafen/admin/v1/compliance_report", &user)
        .await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    let (status, body) = server
        .get("/_hafen/admin/v1/compliance_report", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false);
    let rows = body["rows"].as_array().expect("rows");
    let row = |id: &str| rows.iter().find(|r| r["id"] == id).expect("row").clone();
    assert_eq!(row("A2")["status"], "met");
    assert_eq!(row("A4")["status"], "falls_short");
    assert!(row("A4")["findings"][0]
        .as_str()
        .expect("finding")
        .contains("no TLS"));
    assert_eq!(row("A1")["status"], "falls_short");
    assert_eq!(row("D3")["status"], "met");
    assert_eq!(row("A11")["status"], "met");
    assert!(
        row("A11")["findings"]
            .to_string()
            .contains("0 destination(s) contacted so far"),
        "{}",
        row("A11")
    );
    server.stop().await;
}

/// `hafen audit` as the binary runs it (`run_audit` is all `main` calls), with a config file
/// loaded the way the binary loads it. (The shared target directory of the test machines makes
/// the built binary's path unreliable, so the test calls the function.)
fn run_audit(dir: &Path, extra: &str, json: bool) -> (u8, String) {
    let text = format!(
        "[global]\nserver_name = \"audit.test\"\ndatabase_path = \"{}\"\n{extra}",
        dir.join("db").display()
    );
    match hafen::config::from_toml_str(&text, Vec::new()) {
        Ok(loaded) => hafen::policy::report::run_audit(&loaded.config, json),
        Err(e) => (2, e.to_string()),
    }
}

#[test]
fn hafen_audit_exit_code_and_rows() {
    let dir = tempfile::tempdir().expect("dir");
    let (code, out) = run_audit(dir.path(), "", false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("A4   FALLS SHORT"), "{out}");
    assert!(out.contains("no TLS configured"), "{out}");
    assert!(out.contains("A2   met"), "{out}");
    assert!(out.contains("Some rows fall short."), "{out}");

    let settings = "allow_registration = true\nallow_presence = true\naudit_ip_mode = \"keep\"\n\
         privacy_notice = { url = \"https://example.org/p\", version = \"1\" }\n";
    let (code, out) = run_audit(dir.path(), settings, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("A2   FALLS SHORT"), "{out}");
    assert!(out.contains("open registration"), "{out}");
    assert!(out.contains("presence on"), "{out}");
    assert!(out.contains("B3   FALLS SHORT"), "{out}");
    assert!(out.contains("A1   met"), "{out}");

    // The same report as JSON.
    let (code, out) = run_audit(dir.path(), settings, true);
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(report["server_name"], "audit.test");
    assert_eq!(report["ok"], false);
    assert!(report["rows"].as_array().expect("rows").len() >= 20);
    let a2 = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["id"] == "A2")
        .expect("A2")
        .clone();
    assert_eq!(a2["status"], "falls_short");

    // A broken config: exit 2.
    let (code, out) = run_audit(
        dir.path(),
        "privacy_notice = { url = \"ftp://x\", version = \"1\" }\n",
        false,
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("privacy_notice"), "{out}");
}

/// Uploads cross-signing keys for `user`; returns (master key JSON as uploaded, user-signing key).
async fn cross_signing(server: &TestServer, user: &TestUser) -> (Value, crate::e2ee::TestKey) {
    use crate::e2ee::{new_key, sign};
    let (master, self_signing, user_signing) = (new_key(), new_key(), new_key());
    let cs_key = |k: &crate::e2ee::TestKey, usage: &str| {
        json!({
            "user_id": user.user_id,
            "usage": [usage],
            "keys": { format!("ed25519:{}", k.public): k.public },
        })
    };
    let master_key = cs_key(&master, "master");
    let body = json!({
        "master_key": master_key,
        "self_signing_key": sign(&user.user_id, &master, &cs_key(&self_signing, "self_signing")),
        "user_signing_key": sign(&user.user_id, &master, &cs_key(&user_signing, "user_signing")),
    });
    let (status, body) = server
        .post(&format!("{V3}/keys/device_signing/upload"), user, body)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (master_key, user_signing)
}

/// Rows of `table` under the prefix `parts`.
fn rows(server: &TestServer, table: hafen::storage::Table, parts: &[&str]) -> usize {
    server
        .services()
        .storage
        .scan_prefix(table, &hafen::storage::keys::prefix(parts))
        .expect("scan")
        .count()
}

#[tokio::test]
async fn erasure_reaches_receipts_reports_signatures_aliases_tokens_and_forgotten_rooms() {
    use hafen::storage::Table;
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = server.create_room(&bob, json!({})).await;
    server.invite_and_join(&bob, &alice, &room).await;
    let bobs = say(&server, &bob, &room, "bob's message").await;

    // A read receipt.
    let (status, body) = server
        .post(
            &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&bobs)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A report of bob's message.
    let (status, body) = server
        .post(
            &format!("{V3}/rooms/{}/report/{}", enc(&room), enc(&bobs)),
            &alice,
            json!({ "reason": "report-reason-kept", "score": -50 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({}));
    // Alice signs bob's master key with her user-signing key.
    let (bob_master, _) = cross_signing(&server, &bob).await;
    let (_, alice_usk) = cross_signing(&server, &alice).await;
    let bob_master_id = bob_master["keys"]
        .as_object()
        .and_then(|k| k.values().next())
        .and_then(Value::as_str)
        .expect("bob's master public key")
        .to_owned();
    let signed = crate::e2ee::sign(&alice.user_id, &alice_usk, &bob_master);
    let signature = signed["signatures"][&alice.user_id][format!("ed25519:{}", alice_usk.public)]
        .as_str()
        .expect("signature")
        .to_owned();
    let (status, body) = server
        .post(
            &format!("{V3}/keys/signatures/upload"),
            &alice,
            json!({ bob.user_id.clone(): { bob_master_id.clone(): signed } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "failures": {} }));
    let query = json!({ "device_keys": { bob.user_id.clone(): [] } });
    let (status, body) = server
        .post(&format!("{V3}/keys/query"), &bob, query.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["master_keys"][&bob.user_id]["signatures"][&alice.user_id].is_object(),
        "{body}"
    );
    // An alias.
    let alias = "#unique-alias-4e2f:localhost";
    let (status, body) = server
        .put(
            &format!("{V3}/directory/room/{}", enc(alias)),
            &alice,
            json!({ "room_id": room }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An OpenID token.
    let (status, body) = server
        .post(
            &format!("{V3}/user/{}/openid/request_token", enc(&alice.user_id)),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let openid = body["access_token"].as_str().expect("token").to_owned();
    let userinfo = format!("/_matrix/federation/v1/openid/userinfo?access_token={openid}");
    let (status, body) = server.req(Method::GET, &userinfo, None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "sub": alice.user_id }));
    // A dehydrated device.
    let (status, body) = server
        .put(
            "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device",
            &alice,
            json!({
                "device_id": "DEHYDRATED1",
                "device_data": {
                    "algorithm": "org.matrix.msc3814.v2",
                    "device_pickle": "unique-dehydrated-pickle-90af",
                },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A to-device message waiting in her inbox.
    let (status, body) = server
        .put(
            &format!("{V3}/sendToDevice/m.test/erasure1"),
            &bob,
            json!({ "messages": { alice.user_id.clone(): {
                alice.device_id.clone(): { "note": "unique-to-device-6b1d" } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Bob finds her in the user directory.
    let search = json!({ "search_term": "alice" });
    let (status, body) = server
        .post(&format!("{V3}/user_directory/search"), &bob, search.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["user_id"], alice.user_id, "{body}");
    // A room she left and forgot, with a message of hers.
    let forgotten = server.create_room(&bob, json!({})).await;
    server.invite_and_join(&bob, &alice, &forgotten).await;
    let forgotten_text = "unique-forgotten-room-text-3e7a";
    let forgotten_event = say(&server, &alice, &forgotten, forgotten_text).await;
    for action in ["leave", "forget"] {
        let (status, body) = server
            .post(
                &format!("{V3}/rooms/{}/{action}", enc(&forgotten)),
                &alice,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The export still holds the forgotten room and her message there.
    let (status, tar) = get_bytes(&server, "/_hafen/client/v1/export", &alice).await;
    assert_eq!(status, StatusCode::OK);
    let files = untar(&tar);
    let manifest: Value =
        serde_json::from_slice(files.get("manifest.json").expect("manifest")).expect("json");
    assert!(
        manifest["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .any(|r| r["room_id"] == forgotten
                && r["membership"] == "leave"
                && r["forgotten"] == true),
        "{}",
        manifest["rooms"]
    );
    let file = manifest["event_files"]
        .as_array()
        .expect("event files")
        .iter()
        .find(|f| f["room_id"] == forgotten)
        .and_then(|f| f["path"].as_str())
        .expect("events file of the forgotten room")
        .to_owned();
    let lines = String::from_utf8_lossy(files.get(&file).expect("file")).into_owned();
    assert!(lines.lines().any(|l| {
        let e: Value = serde_json::from_str(l).expect("event line");
        e["event_id"] == forgotten_event && e["content"]["body"] == forgotten_text
    }));

    // What is on disk before.
    let a = alice.user_id.as_str();
    assert!(rows(&server, Table::Notifications, &[a]) > 0);
    assert!(server
        .services()
        .storage
        .get(Table::DehydratedDevices, a.as_bytes())
        .expect("read")
        .is_some());
    let receipt_log_row = [a.as_bytes(), b"\xffm.read\xff"].concat();
    let reporter = format!("\"reporter\":\"{a}\"");
    let openid_hash = hafen::utils::token_hash(&openid);
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("receipt log row", receipt_log_row),
        ("reporter", reporter.into_bytes()),
        ("key signature", signature.clone().into_bytes()),
        ("alias", b"unique-alias-4e2f".to_vec()),
        ("openid token hash", openid_hash),
        (
            "dehydrated device",
            b"unique-dehydrated-pickle-90af".to_vec(),
        ),
        ("to-device message", b"unique-to-device-6b1d".to_vec()),
        ("forgotten room message", forgotten_text.as_bytes().to_vec()),
    ];
    let db = server.services().config.database_path.clone();
    for (what, needle) in &needles {
        assert!(
            !files_containing(&db, needle).is_empty(),
            "{what} not on disk before"
        );
    }

    erase(&server, &alice).await;

    // Receipts: none of hers left (nor rows in the receipt log); bob's room still works.
    let s = server.services();
    let receipts = s
        .receipts
        .since(&ruma::RoomId::parse(&room).expect("room"), None, u64::MAX);
    assert!(receipts
        .expect("receipts")
        .iter()
        .all(|r| r.user.as_str() != a));
    // The report stays for the admins, under her pseudonym.
    let pseudonym = hafen::policy::erasure::pseudonym(s, &uid(a));
    let reports = s.reports.list(100).expect("reports");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].reporter, pseudonym);
    assert_eq!(reports[0].event_id.as_deref(), Some(bobs.as_str()));
    assert_eq!(reports[0].reason.as_deref(), Some("report-reason-kept"));
    // Her signature on bob's master key is gone.
    let (status, body) = server.post(&format!("{V3}/keys/query"), &bob, query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["master_keys"][&bob.user_id]["signatures"][a].is_null(),
        "{body}"
    );
    assert!(body["master_keys"][&bob.user_id].is_object(), "{body}");
    // The alias is gone.
    let (status, body) = server
        .get(&format!("{V3}/directory/room/{}", enc(alias)), &bob)
        .await;
    assert_err(&(status, body), 404, "M_NOT_FOUND");
    // The OpenID token no longer names her.
    let got = server.req(Method::GET, &userinfo, None, None).await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    // Nobody finds her in the user directory.
    let (status, body) = server
        .post(&format!("{V3}/user_directory/search"), &bob, search)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"], json!([]), "{body}");
    // Her message in the forgotten room is stripped.
    let (status, body) = server
        .get(
            &format!(
                "{V3}/rooms/{}/event/{}",
                enc(&forgotten),
                enc(&forgotten_event)
            ),
            &bob,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"], json!({}));
    // No rows of hers left in the tables concerned.
    for table in [
        Table::Notifications,
        Table::PushUnread,
        Table::ToDevice,
        Table::Pushers,
    ] {
        assert_eq!(rows(&server, table, &[a]), 0, "{table:?}");
    }
    assert!(s
        .storage
        .get(Table::DehydratedDevices, a.as_bytes())
        .expect("read")
        .is_none());
    for table in [
        Table::OpenIdTokens,
        Table::KeySignatures,
        Table::RoomAliases,
    ] {
        let theirs = s
            .storage
            .scan_prefix(table, b"")
            .expect("scan")
            .filter(|e| {
                e.as_ref()
                    .map(|(k, v)| {
                        k.windows(a.len()).any(|w| w == a.as_bytes())
                            || v.windows(a.len()).any(|w| w == a.as_bytes())
                    })
                    .unwrap_or(true)
            })
            .count();
        assert_eq!(theirs, 0, "{table:?}");
    }
    // The erasure entry counts what was done.
    let entry = s
        .audit
        .query(0, u64::MAX, 100, None, |e| e.kind == "erasure")
        .expect("audit")
        .0;
    assert_eq!(entry.len(), 1);
    let d = &entry[0].detail;
    assert_eq!(d["forgotten_room_events"], 1, "{d}");
    assert_eq!(d["reports_pseudonymized"], 1, "{d}");
    assert_eq!(d["openid_tokens_deleted"], 1, "{d}");
    assert_eq!(d["key_signatures_deleted"], 1, "{d}");
    assert_eq!(d["aliases_deleted"], 1, "{d}");
    assert!(
        d["receipts_deleted"].as_u64().is_some_and(|n| n >= 2),
        "{d}"
    );
    // Physically gone.
    for (what, needle) in &needles {
        let found = files_containing(&db, needle);
        assert!(found.is_empty(), "{what} still in {found:?}");
    }
    server.stop().await;
}
