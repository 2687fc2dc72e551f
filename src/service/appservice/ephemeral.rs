//! Ephemeral events for appservices that asked for them (`receive_ephemeral`, or MSC2409's
//! `de.sorunome.msc2409.push_ephemeral`): typing, read receipts and presence of local users, in
//! the client format, queued like events (`queue.rs`) and sent in the transactions'
//! `ephemeral` list. A room interests an appservice as for events (room or alias namespace, or a
//! joined member of its); presence interests it when the user is one of its users or shares a
//! room with one.

use ruma::{EventId, RoomId, UserId};
use serde_json::json;

use crate::{error::Result, service::Services};

fn for_room(s: &Services, room_id: &RoomId) -> Result<Vec<String>> {
    if s.appservices.is_empty() {
        return Ok(Vec::new());
    }
    let joined = s.rooms.joined_members(room_id)?;
    Ok(s.appservices
        .ephemeral_for_room(room_id, &joined, &|| {
            Ok(s.rooms
                .local_aliases(room_id)?
                .into_iter()
                .map(|a| a.to_string())
                .collect())
        })?
        .iter()
        .map(|a| a.id().to_owned())
        .collect())
}

/// The room's typing list changed.
pub fn typing(s: &Services, room_id: &RoomId) -> Result<()> {
    let ids = for_room(s, room_id)?;
    if ids.is_empty() {
        return Ok(());
    }
    let users = s
        .typing
        .typing_since(room_id, Some(0))
        .map(|(_, users)| users)
        .unwrap_or_default();
    s.appservices.queue.queue_ephemeral(
        &ids,
        &json!({ "type": "m.typing", "room_id": room_id, "content": { "user_ids": users } }),
    )
}

/// A user sent a public read receipt.
pub fn receipt(
    s: &Services,
    room_id: &RoomId,
    user: &UserId,
    event_id: &EventId,
    thread: Option<&str>,
) -> Result<()> {
    let ids = for_room(s, room_id)?;
    if ids.is_empty() {
        return Ok(());
    }
    let mut receipt = json!({ "ts": crate::utils::now_ms() });
    if let Some(t) = thread {
        receipt["thread_id"] = json!(t);
    }
    s.appservices.queue.queue_ephemeral(
        &ids,
        &json!({
            "type": "m.receipt",
            "room_id": room_id,
            "content": { event_id.as_str(): { "m.read": { user.as_str(): receipt } } },
        }),
    )
}

/// A local user's presence changed.
pub fn presence(s: &Services, user: &UserId) -> Result<()> {
    if s.appservices.is_empty() || !s.policy.presence_enabled() {
        return Ok(());
    }
    let Some(state) = s.presence.get(user)? else {
        return Ok(());
    };
    let rooms = s.rooms.joined_rooms(user)?;
    let mut ids = Vec::new();
    for a in s.appservices.all().iter() {
        if !a.registration.wants_ephemeral() || a.registration.url.is_none() {
            continue;
        }
        let mut interested = a.owns_user(user);
        // Bounded by the user's rooms and each room's (cached) member set.
        for room in rooms.iter().take(10_000) {
            if interested {
                break;
            }
            interested = s.rooms.joined_members(room)?.iter().any(|m| a.owns_user(m));
        }
        if interested {
            ids.push(a.id().to_owned());
        }
    }
    s.appservices.queue.queue_ephemeral(
        &ids,
        &json!({ "type": "m.presence", "sender": user, "content": state.content() }),
    )
}
