//! Online backups (A7): taken while the server runs, restored by starting a server on them.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{assert_err, enc, TestServer};

#[tokio::test]
async fn online_backup_restores_rooms_messages_and_media() {
    let backups = tempfile::tempdir().expect("dir");
    let root = backups.path().to_path_buf();
    let s = TestServer::start_with(|c| c.backup_path = Some(root.clone())).await;
    let admin = s.user("admin").await;
    let id = ruma::UserId::parse(admin.user_id.as_str()).expect("id");
    s.services().accounts.set_admin(&id, true).expect("admin");
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({ "name": "Kept" })).await;
    let (status, sent) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
                enc(&room)
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": "in the backup" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let res = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=a.txt", s.base))
        .bearer_auth(&alice.token)
        .header("Content-Type", "text/plain")
        .body("media in the backup")
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let mxc: serde_json::Value = res.json().await.expect("json");
    let mxc = mxc["content_uri"].as_str().expect("mxc").to_owned();

    // Only admins take backups.
    let refused = s.post("/_hafen/admin/v1/backup", &alice, json!({})).await;
    assert_err(&refused, 403, "M_FORBIDDEN");
    let (status, body) = s.post("/_hafen/admin/v1/backup", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let path = std::path::PathBuf::from(body["path"].as_str().expect("path"));
    assert!(path.starts_with(&root), "{body}");

    // Written after the backup: not in it.
    s.put(
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/t2",
            enc(&room)
        ),
        &alice,
        json!({ "msgtype": "m.text", "body": "after the backup" }),
    )
    .await;

    // Restore: a server started on the backup has the room, the message and the media.
    let restored = TestServer::start_with(|c| {
        c.database_path = path.join("db");
        c.media_path = Some(path.join("media"));
    })
    .await;
    let (status, msgs) = restored
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    let bodies: Vec<&str> = msgs["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, vec!["in the backup"], "{msgs}");
    let (server, media_id) = mxc
        .strip_prefix("mxc://")
        .and_then(|r| r.split_once('/'))
        .expect("mxc");
    let res = restored
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/download/{server}/{media_id}",
            restored.base
        ))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("download");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.expect("text"), "media in the backup");

    // Without backup_path the endpoint says so.
    let plain = TestServer::start().await;
    let admin2 = plain.user("admin").await;
    let id = ruma::UserId::parse(admin2.user_id.as_str()).expect("id");
    plain
        .services()
        .accounts
        .set_admin(&id, true)
        .expect("admin");
    let refused = plain
        .post("/_hafen/admin/v1/backup", &admin2, json!({}))
        .await;
    assert_err(&refused, 403, "M_FORBIDDEN");
}

async fn make_admin(s: &TestServer, localpart: &str) -> crate::common::TestUser {
    let admin = s.user(localpart).await;
    let id = ruma::UserId::parse(admin.user_id.as_str()).expect("id");
    s.services().accounts.set_admin(&id, true).expect("admin");
    admin
}

#[tokio::test]
async fn encrypted_backup_holds_no_plaintext_and_restores() {
    use crate::at_rest::{download, files_containing, key_file, upload};
    let keys = tempfile::tempdir().expect("dir");
    let key = key_file(keys.path(), "backup.key");
    let backups = tempfile::tempdir().expect("dir");
    let root = backups.path().to_path_buf();
    // Media in the clear (no media key), the backup key set: the archive must hide both.
    let s = TestServer::start_with(|c| {
        c.backup_path = Some(root.clone());
        c.backup_encryption_key_file = Some(key.clone());
    })
    .await;
    let admin = make_admin(&s, "admin").await;
    let alice = s.user("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let secret = format!("backup-secret-{}", hafen::utils::random_string(24));
    let (status, sent) = s
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                enc(&room),
                crate::common::unique_txn()
            ),
            &alice,
            json!({ "msgtype": "m.text", "body": secret }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let media_text = format!("backup-media-{}", hafen::utils::random_string(24));
    let (server, media_id) =
        upload(&s, &alice, media_text.clone().into_bytes(), "text/plain").await;

    let (status, body) = s.post("/_hafen/admin/v1/backup", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["encrypted"], json!(true));
    let archive = std::path::PathBuf::from(body["path"].as_str().expect("path"));
    assert!(archive.is_file(), "{body}");
    assert!(archive.to_string_lossy().ends_with(".tar.enc"), "{body}");
    // Nothing below backup_path but the archive (the checkpoint taken for it is gone).
    let names: Vec<String> = std::fs::read_dir(&root)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(files_containing(&root, secret.as_bytes()).is_empty());
    assert!(files_containing(&root, media_text.as_bytes()).is_empty());
    assert!(
        files_containing(&root, b"ustar").is_empty(),
        "the tar is not in the clear"
    );
    // ... while the live data has them in the clear (so the test would see a leak).
    assert!(!files_containing(&s.services().config.media_dir(), media_text.as_bytes()).is_empty());

    // The list shows it.
    let (status, list) = s.get("/_hafen/admin/v1/backup", &admin).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["encrypted"], json!(true));
    let entries = list["backups"].as_array().expect("backups");
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["encrypted"], json!(true));
    assert_eq!(entries[0]["path"], body["path"]);
    let size = std::fs::metadata(&archive).expect("meta").len();
    assert_eq!(entries[0]["size_bytes"], json!(size));
    assert_eq!(list["last_run"]["ok"], json!(true));
    assert_eq!(list["last_run"]["trigger"], json!("request"));
    assert_eq!(list["last_run"]["path"], body["path"]);
    let refused = s.get("/_hafen/admin/v1/backup", &alice).await;
    assert_err(&refused, 403, "M_FORBIDDEN");

    // Restore with the config's key, then a server starts on it.
    let config = s.services().config.clone();
    let target_root = tempfile::tempdir().expect("dir");
    let target = target_root.path().join("restored");
    hafen::service::backup::restore(&config, &archive, &target).expect("restore");
    assert!(target.join("db").join("CURRENT").is_file());
    // Not into a directory that has something in it.
    let err = hafen::service::backup::restore(&config, &archive, &target).expect_err("not empty");
    assert!(err.contains("not empty"), "{err}");
    // A damaged archive or another key: an error and no restore left behind.
    let mut damaged = std::fs::read(&archive).expect("read");
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    let bad = target_root.path().join("bad.tar.enc");
    std::fs::write(&bad, &damaged).expect("write");
    let err = hafen::service::backup::restore(&config, &bad, &target_root.path().join("x"))
        .expect_err("damaged");
    assert!(err.contains("damaged"), "{err}");
    assert!(!target_root.path().join("x").exists());
    let mut other = config.clone();
    other.backup_encryption_key_file = Some(key_file(keys.path(), "other.key"));
    let err = hafen::service::backup::restore(&other, &archive, &target_root.path().join("y"))
        .expect_err("another key");
    assert!(err.contains("another key"), "{err}");
    assert!(!target_root.path().join("y").exists());

    let restored = TestServer::start_with(|c| {
        c.database_path = target.join("db");
        c.media_path = Some(target.join("media"));
    })
    .await;
    let (status, msgs) = restored
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                enc(&room)
            ),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    assert!(
        msgs["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .any(|e| e["content"]["body"] == json!(secret)),
        "{msgs}"
    );
    let res = download(&restored, &alice, &server, &media_id).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.expect("text"), media_text);
}

#[tokio::test]
async fn scheduled_backups_keep_the_newest_and_failures_show() {
    let backups = tempfile::tempdir().expect("dir");
    let root = backups.path().join("b");
    let s = TestServer::start_with(|c| {
        c.backup_path = Some(root.clone());
        c.backup_interval_secs = Some(1);
        c.backup_keep = Some(2);
    })
    .await;
    let admin = make_admin(&s, "admin").await;
    // An older backup of the operator's that the retention must delete, and a directory that
    // is not a backup, which it must leave alone.
    std::fs::create_dir_all(root.join("hafen-1000/db")).expect("old backup");
    std::fs::create_dir_all(root.join("keep-me")).expect("other dir");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let list = loop {
        let (status, list) = s.get("/_hafen/admin/v1/backup", &admin).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let runs_done = list["backups"].as_array().map_or(0, |b| b.len());
        if runs_done == 2
            && !root.join("hafen-1000").exists()
            && list["last_run"]["trigger"] == json!("schedule")
        {
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled backups: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(list["interval_secs"], json!(1));
    assert_eq!(list["keep"], json!(2));
    assert_eq!(list["encrypted"], json!(false));
    assert_eq!(list["last_run"]["ok"], json!(true));
    for b in list["backups"].as_array().expect("backups") {
        assert_eq!(b["encrypted"], json!(false));
        assert!(b["size_bytes"].as_u64().expect("size") > 0, "{b}");
        assert!(std::path::Path::new(b["path"].as_str().expect("path"))
            .join("db/CURRENT")
            .is_file());
    }
    assert!(root.join("keep-me").is_dir());
    // The privacy statement tells users how long backups keep their data.
    let (status, statement) = s
        .req(
            reqwest::Method::GET,
            "/_hafen/client/v1/privacy",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{statement}");
    let backups_category = statement["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .find(|c| c["id"] == json!("backups"))
        .expect("backups")
        .clone();
    assert!(
        backups_category["kept_for"]
            .as_str()
            .is_some_and(|k| k.starts_with("the newest 2 backups")),
        "{backups_category}"
    );
    // Two more periods: still two backups, the newest ones.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (_, later) = s.get("/_hafen/admin/v1/backup", &admin).await;
    let names = |l: &serde_json::Value| -> Vec<String> {
        l["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(names(&later).len(), 2, "{later}");
    assert_ne!(
        names(&later),
        names(&list),
        "newer backups replaced older ones"
    );
    // The runs are on record.
    let (status, audit) = s.get("/_hafen/admin/v1/audit?kind=backup", &admin).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    assert!(audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["detail"]["deleted"]
            .as_array()
            .is_some_and(|d| !d.is_empty())));

    // A failing backup (backup_path is a file): 500 to the caller, and visible in the list.
    let file = backups.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("file");
    let failing = TestServer::start_with(|c| c.backup_path = Some(file.clone())).await;
    let admin2 = make_admin(&failing, "admin").await;
    let got = failing
        .post("/_hafen/admin/v1/backup", &admin2, json!({}))
        .await;
    assert_err(&got, 500, "M_UNKNOWN");
    let (status, list) = failing.get("/_hafen/admin/v1/backup", &admin2).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["last_run"]["ok"], json!(false));
    assert!(
        list["last_run"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{list}"
    );
}

/// `hafen audit` (what `main` runs) on a config: the rows C2, A7 and A10 as JSON.
fn audit_rows(
    dir: &std::path::Path,
    extra: &str,
) -> std::collections::HashMap<String, serde_json::Value> {
    let text = format!(
        "[global]\nserver_name = \"audit.test\"\ndatabase_path = \"{}\"\n{extra}",
        dir.join("db").display()
    );
    let loaded = hafen::config::from_toml_str(&text, Vec::new()).expect("config");
    let (code, out) = hafen::policy::report::run_audit(&loaded.config, true);
    assert!(code == 0 || code == 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| ["C2", "A7", "A10"].contains(&r["id"].as_str().unwrap_or("")))
        .map(|r| (r["id"].as_str().expect("id").to_owned(), r.clone()))
        .collect()
}

#[test]
fn hafen_audit_judges_encryption_backups_and_the_schema_version() {
    let dir = tempfile::tempdir().expect("dir");
    let rows = audit_rows(dir.path(), "");
    assert_eq!(
        rows["C2"]["status"],
        json!("falls_short"),
        "{:?}",
        rows["C2"]
    );
    assert!(rows["C2"]["findings"]
        .to_string()
        .contains("media_encryption_key_file"));
    assert_eq!(rows["A7"]["status"], json!("falls_short"));
    assert!(rows["A7"]["findings"]
        .to_string()
        .contains("backup_interval_secs"));
    assert!(rows["A7"]["findings"].to_string().contains("backup_keep"));
    assert_eq!(rows["A10"]["status"], json!("met"));
    assert!(rows["A10"]["findings"].to_string().contains(hafen::VERSION));

    // Backups without a key: C2 still falls short for them.
    let backups = dir.path().join("backups");
    let configured = format!(
        "backup_path = \"{}\"\nbackup_interval_secs = 86400\nbackup_keep = 7\n",
        backups.display()
    );
    let rows = audit_rows(dir.path(), &configured);
    assert_eq!(rows["A7"]["status"], json!("met"), "{:?}", rows["A7"]);
    assert!(rows["A7"]["findings"].to_string().contains("86400"));
    let key = crate::at_rest::key_file(dir.path(), "backup.key");
    let rows = audit_rows(
        dir.path(),
        &format!(
            "{configured}backup_encryption_key_file = \"{}\"\n",
            key.display()
        ),
    );
    assert_eq!(
        rows["C2"]["status"],
        json!("falls_short"),
        "{:?}",
        rows["C2"]
    );
    assert!(rows["C2"]["findings"]
        .to_string()
        .contains("media stored unencrypted"));

    // Both encrypted: met.
    let rows = audit_rows(
        dir.path(),
        &format!(
            "{configured}media_encryption_key_file = \"{}\"\n",
            key.display()
        ),
    );
    assert_eq!(rows["C2"]["status"], json!("met"), "{:?}", rows["C2"]);
    assert!(rows["C2"]["findings"]
        .to_string()
        .contains("encrypted archives"));

    // A key file every user can read: falls short, naming the problem.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let rows = audit_rows(
        dir.path(),
        &format!(
            "{configured}media_encryption_key_file = \"{}\"\n",
            key.display()
        ),
    );
    assert_eq!(rows["C2"]["status"], json!("falls_short"));
    assert!(rows["C2"]["findings"]
        .to_string()
        .contains("accessible to every user"));

    // A database written by a later release: A10 falls short.
    {
        let storage = hafen::storage::Storage::open(&dir.path().join("db"), 8, true).expect("open");
        hafen::storage::schema::set_version(&storage, hafen::storage::schema::CURRENT + 1)
            .expect("set");
    }
    let rows = audit_rows(dir.path(), "");
    assert_eq!(
        rows["A10"]["status"],
        json!("falls_short"),
        "{:?}",
        rows["A10"]
    );
    assert!(rows["A10"]["findings"].to_string().contains("newer"));
}
