//! A real client: two `matrix-sdk` clients log in with passwords, one creates a room and invites
//! the other, they exchange messages and each sees the other's through sync.

use std::{sync::Arc, time::Duration};

use matrix_sdk::{
    config::SyncSettings,
    ruma::{
        api::client::room::create_room,
        events::room::message::{
            MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent,
        },
        OwnedUserId,
    },
    Client, RoomState,
};
use parking_lot::Mutex;

use crate::common::TestServer;

pub(crate) async fn sdk_login(base: &str, user: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(base)
        .build()
        .await
        .expect("client builds");
    client
        .matrix_auth()
        .login_username(user, "password")
        .initial_device_display_name("sdk test")
        .send()
        .await
        .expect("login");
    client
}

/// Collect the text bodies this client receives through sync.
pub(crate) fn collect_texts(client: &Client) -> Arc<Mutex<Vec<(String, String)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
        let sink = sink.clone();
        async move {
            if let MessageType::Text(text) = ev.content.msgtype {
                sink.lock().push((ev.sender.to_string(), text.body));
            }
        }
    });
    seen
}

/// Sync until `done` holds, at most 30 rounds of one-second long-polls.
pub(crate) async fn sync_until(client: &Client, mut done: impl FnMut() -> bool) {
    let settings = SyncSettings::default().timeout(Duration::from_secs(1));
    for _ in 0..30 {
        client.sync_once(settings.clone()).await.expect("sync");
        if done() {
            return;
        }
    }
    panic!("condition not reached through sync");
}

#[tokio::test]
async fn two_sdk_clients_chat() {
    let s = TestServer::start().await;
    s.user("alice").await;
    s.user("bob").await;
    let alice = sdk_login(&s.base, "alice").await;
    let bob = sdk_login(&s.base, "bob").await;
    assert_eq!(alice.user_id().unwrap().as_str(), "@alice:localhost");
    let alice_seen = collect_texts(&alice);
    let bob_seen = collect_texts(&bob);

    let bob_id: OwnedUserId = bob.user_id().unwrap().to_owned();
    let mut request = create_room::v3::Request::new();
    request.name = Some("sdk room".to_owned());
    request.invite = vec![bob_id.clone()];
    let room = alice.create_room(request).await.expect("create room");
    let room_id = room.room_id().to_owned();

    sync_until(&bob, || {
        bob.get_room(&room_id)
            .is_some_and(|r| r.state() == RoomState::Invited)
    })
    .await;
    bob.join_room_by_id(&room_id).await.expect("join");

    sync_until(&alice, || alice.get_room(&room_id).is_some()).await;
    let room = alice.get_room(&room_id).expect("alice's room");
    room.send(RoomMessageEventContent::text_plain("hello bob"))
        .await
        .expect("send");

    sync_until(&bob, || {
        bob_seen.lock().iter().any(|(_, b)| b == "hello bob")
    })
    .await;
    assert!(bob_seen
        .lock()
        .contains(&("@alice:localhost".to_owned(), "hello bob".to_owned())));

    let bob_room = bob.get_room(&room_id).expect("bob's room");
    assert_eq!(bob_room.state(), RoomState::Joined);
    assert_eq!(bob_room.name().as_deref(), Some("sdk room"));
    bob_room
        .send(RoomMessageEventContent::text_plain("hi alice"))
        .await
        .expect("reply");

    sync_until(&alice, || {
        alice_seen.lock().iter().any(|(_, b)| b == "hi alice")
    })
    .await;
    assert!(alice_seen
        .lock()
        .contains(&("@bob:localhost".to_owned(), "hi alice".to_owned())));
    let members = room.joined_user_ids().await.expect("members");
    assert_eq!(members.len(), 2, "{members:?}");
}
