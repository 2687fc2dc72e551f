//! The real crypto stack: `matrix-sdk` clients with end-to-end encryption against Hafen. A message
//! in an encrypted room is decrypted by the other member (and is ciphertext on the server);
//! cross-signing is bootstrapped; a key backup made on one device is restored on a new login of
//! the same user, which then decrypts the old history.

use std::time::Duration;

use matrix_sdk::{
    config::SyncSettings,
    encryption::EncryptionSettings,
    room::MessagesOptions,
    ruma::{
        api::client::room::create_room,
        events::{
            room::{encryption::RoomEncryptionEventContent, message::RoomMessageEventContent},
            InitialStateEvent,
        },
        OwnedRoomId,
    },
    Client, RoomState,
};

use crate::{
    common::{enc, TestServer},
    sdk_client::{collect_texts, sync_until},
};

async fn login(base: &str, user: &str, device_name: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(base)
        .with_encryption_settings(EncryptionSettings::default())
        .build()
        .await
        .expect("client builds");
    client
        .matrix_auth()
        .login_username(user, "password")
        .initial_device_display_name(device_name)
        .send()
        .await
        .expect("login");
    // The first sync uploads the device's keys.
    client
        .sync_once(SyncSettings::default().timeout(Duration::from_millis(100)))
        .await
        .expect("first sync");
    client
}

async fn create_encrypted_room(
    client: &Client,
    invite: Vec<matrix_sdk::ruma::OwnedUserId>,
) -> OwnedRoomId {
    let mut request = create_room::v3::Request::new();
    request.invite = invite;
    request.initial_state = vec![InitialStateEvent::with_empty_state_key(
        RoomEncryptionEventContent::with_recommended_defaults(),
    )
    .to_raw_any()];
    let room = client.create_room(request).await.expect("create room");
    room.room_id().to_owned()
}

#[tokio::test]
async fn encrypted_message_is_decrypted_by_the_other_member() {
    let s = TestServer::start().await;
    s.user("alice").await;
    let bob_user = s.user("bob").await;
    let alice = login(&s.base, "alice", "alice phone").await;
    let bob = login(&s.base, "bob", "bob laptop").await;
    let bob_seen = collect_texts(&bob);

    let room_id = create_encrypted_room(&alice, vec![bob.user_id().expect("bob").to_owned()]).await;
    sync_until(&bob, || {
        bob.get_room(&room_id)
            .is_some_and(|r| r.state() == RoomState::Invited)
    })
    .await;
    bob.join_room_by_id(&room_id).await.expect("join");
    sync_until(&alice, || {
        alice
            .get_room(&room_id)
            .is_some_and(|r| r.joined_members_count() == 2)
    })
    .await;

    let room = alice.get_room(&room_id).expect("room");
    assert!(room
        .latest_encryption_state()
        .await
        .expect("encryption state")
        .is_encrypted());
    room.send(RoomMessageEventContent::text_plain("secret hello"))
        .await
        .expect("send");

    sync_until(&bob, || {
        bob_seen.lock().iter().any(|(_, b)| b == "secret hello")
    })
    .await;

    // On the server the message is ciphertext only.
    let (status, body) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                enc(room_id.as_str())
            ),
            &bob_user,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let chunk = body["chunk"].as_array().expect("chunk");
    assert!(
        chunk.iter().any(|e| e["type"] == "m.room.encrypted"),
        "{body}"
    );
    assert!(!body.to_string().contains("secret hello"), "{body}");
}

#[tokio::test]
async fn cross_signing_and_key_backup_restore_on_new_login() {
    let s = TestServer::start().await;
    s.user("alice").await;
    let first = login(&s.base, "alice", "first device").await;

    // Cross-signing: the first upload needs no user-interactive auth.
    first
        .encryption()
        .bootstrap_cross_signing(None)
        .await
        .expect("bootstrap cross-signing");
    let status = first
        .encryption()
        .cross_signing_status()
        .await
        .expect("status");
    assert!(status.has_master && status.has_self_signing && status.has_user_signing);

    // Recovery: secret storage plus a server-side key backup.
    let recovery_key = first
        .encryption()
        .recovery()
        .enable()
        .wait_for_backups_to_upload()
        .await
        .expect("enable recovery");
    assert!(first.encryption().backups().are_enabled().await);

    let room_id = create_encrypted_room(&first, vec![]).await;
    sync_until(&first, || first.get_room(&room_id).is_some()).await;
    let room = first.get_room(&room_id).expect("room");
    room.send(RoomMessageEventContent::text_plain(
        "history before the new login",
    ))
    .await
    .expect("send");
    first
        .encryption()
        .backups()
        .wait_for_steady_state()
        .await
        .expect("backup uploaded");

    // A new login of the same user restores from the backup and reads the old message.
    let second = login(&s.base, "alice", "second device").await;
    second
        .encryption()
        .recovery()
        .recover(&recovery_key)
        .await
        .expect("recover");
    sync_until(&second, || second.get_room(&room_id).is_some()).await;
    second
        .encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .expect("download keys");
    let room = second.get_room(&room_id).expect("room on the new device");
    let messages = room
        .messages(MessagesOptions::backward())
        .await
        .expect("messages");
    let texts: Vec<String> = messages
        .chunk
        .iter()
        .map(|e| e.raw().json().get().to_owned())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("history before the new login")),
        "{texts:?}"
    );
}
