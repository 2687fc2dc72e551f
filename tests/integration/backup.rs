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
