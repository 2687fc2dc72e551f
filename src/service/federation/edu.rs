//! EDUs (ephemeral data units) both ways.
//!
//! Outgoing: the functions below build an EDU for a local user's change and queue it (persisted,
//! see `sender.rs`) for the servers that must hear of it: typing and read receipts for the
//! servers in the room, presence (only when presence is enabled), device-list and cross-signing
//! key updates for the servers sharing a room with the user, to-device messages for the servers
//! of their recipients.
//!
//! Incoming ([`apply`], called by the `/send` handler): each EDU is applied only when the user it
//! concerns belongs to the sending server; anything else is ignored (logged at debug). Every
//! loop over remote input is bounded.

use std::collections::BTreeMap;

use ruma::{DeviceId, EventId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId};
use serde_json::{json, Map, Value};

use super::sender::{servers_in_room, servers_sharing};
use crate::{
    error::Result,
    service::{
        keys::{CrossSigning, ListChange},
        sync::room_mates,
        to_device::recipients_for,
        Services,
    },
    storage::{keys, Table},
    utils,
};

/// How long a remote user counts as typing after an `m.typing` saying so (the remote server
/// sends `typing: false` when they stop earlier).
const REMOTE_TYPING_MS: u64 = 30_000;
/// Most rooms, users per room, and presence entries read from one EDU.
const MAX_EDU_ENTRIES: usize = 100;
/// A to-device EDU is split beyond about this size (each gets its own `message_id`).
const MAX_TO_DEVICE_EDU_BYTES: usize = 256 * 1024;
/// Device id under which to-device messages from other servers are filed.
const FEDERATION_DEVICE: &str = "federation";

fn ours(s: &Services) -> &ServerName {
    &s.globals.server_name
}

// ---------------------------------------------------------------------------------------------
// Outgoing

/// A local user started or stopped typing in a room.
pub fn send_typing(s: &Services, room_id: &RoomId, user: &UserId, typing: bool) -> Result<()> {
    let servers = servers_in_room(&s.rooms, room_id, ours(s))?;
    s.federation.sender.send_edu(
        servers,
        &json!({
            "edu_type": "m.typing",
            "content": { "room_id": room_id, "user_id": user, "typing": typing },
        }),
    )
}

/// A local user's public read receipt.
pub fn send_receipt(
    s: &Services,
    room_id: &RoomId,
    user: &UserId,
    event_id: &EventId,
    thread: Option<&str>,
) -> Result<()> {
    let servers = servers_in_room(&s.rooms, room_id, ours(s))?;
    if servers.is_empty() {
        return Ok(());
    }
    let mut data = json!({ "ts": utils::now_ms() });
    if let Some(t) = thread {
        data["thread_id"] = Value::String(t.to_owned());
    }
    let mut content = Map::new();
    content.insert(
        room_id.to_string(),
        json!({ "m.read": { user.as_str(): { "event_ids": [event_id], "data": data } } }),
    );
    s.federation.sender.send_edu(
        servers,
        &json!({ "edu_type": "m.receipt", "content": content }),
    )
}

/// A local user's presence changed (only sent when presence is enabled).
pub fn send_presence(s: &Services, user: &UserId) -> Result<()> {
    if !s.policy.presence_enabled() {
        return Ok(());
    }
    let Some(state) = s.presence.get(user)? else {
        return Ok(());
    };
    let servers = servers_sharing(&s.rooms, user, ours(s))?;
    if servers.is_empty() {
        return Ok(());
    }
    let mut entry = state.content();
    entry["user_id"] = Value::String(user.to_string());
    s.federation.sender.send_edu(
        servers,
        &json!({ "edu_type": "m.presence", "content": { "push": [entry] } }),
    )
}

/// A local user's device was added, changed (keys, signatures) or deleted. `stream_id` is the
/// device-list log count of the change; `prev_id` is the previous one sent for the user.
pub fn send_device_list_update(
    s: &Services,
    user: &UserId,
    device: &DeviceId,
    deleted: bool,
    stream_id: u64,
) -> Result<()> {
    let servers = servers_sharing(&s.rooms, user, ours(s))?;
    if servers.is_empty() {
        return Ok(());
    }
    let prev_key = keys::join(&["federation_device_list_prev", user.as_str()]);
    let prev = s
        .storage
        .get(Table::Global, &prev_key)?
        .and_then(|v| keys::u64_value(&v));
    let mut content = json!({
        "user_id": user,
        "device_id": device,
        "stream_id": stream_id,
        "prev_id": prev.map(|p| vec![p]).unwrap_or_default(),
        "deleted": deleted,
    });
    if !deleted {
        if let Some(keys) = s.keys.device_keys(user, device)? {
            content["keys"] = keys;
        }
        // Device names go to other servers only when the operator allows it.
        let name = if s.config.allow_device_name_federation {
            s.accounts
                .devices(user)?
                .into_iter()
                .find(|d| *d.device_id == *device)
                .and_then(|d| d.display_name)
        } else {
            None
        };
        if let Some(name) = name {
            content["device_display_name"] = Value::String(name);
        }
    }
    let edu = json!({ "edu_type": "m.device_list_update", "content": content });
    let sender = &s.federation.sender;
    let mut batch = s.storage.batch();
    for d in &servers {
        sender.queue_edu(&mut batch, d, &edu)?;
    }
    batch.put(Table::Global, &prev_key, &stream_id.to_be_bytes())?;
    batch.commit()?;
    sender.wake.add(servers);
    Ok(())
}

/// A local user's device was deleted (`count`: the device-list log count of the deletion).
/// Errors are logged: the device is gone either way.
pub fn device_deleted(s: &Services, user: &UserId, device: &DeviceId, count: u64) {
    if let Err(e) = send_device_list_update(s, user, device, true, count) {
        tracing::warn!("queueing a device list update: {e}");
    }
}

/// A local user uploaded cross-signing keys: the master and self-signing keys go to the servers
/// sharing a room with them (the user-signing key is private to the user's own server).
pub fn send_signing_key_update(s: &Services, user: &UserId) -> Result<()> {
    let servers = servers_sharing(&s.rooms, user, ours(s))?;
    if servers.is_empty() {
        return Ok(());
    }
    let mut content = json!({ "user_id": user });
    if let Some(k) = s.keys.cross_signing_key(user, CrossSigning::Master)? {
        content["master_key"] = k;
    }
    if let Some(k) = s.keys.cross_signing_key(user, CrossSigning::SelfSigning)? {
        content["self_signing_key"] = k;
    }
    s.federation.sender.send_edu(
        servers,
        &json!({ "edu_type": "m.signing_key_update", "content": content }),
    )
}

/// `m.direct_to_device` EDUs for messages to users of other servers: per server, the messages
/// (user -> device -> content) split into EDUs of bounded size, each with its own `message_id`.
pub fn to_device_edus(
    sender: &UserId,
    kind: &str,
    by_server: BTreeMap<OwnedServerName, Map<String, Value>>,
) -> Result<Vec<(OwnedServerName, Value)>> {
    let mut out = Vec::new();
    for (server, users) in by_server {
        let mut chunk = Map::new();
        let mut size = 0;
        for (user, devices) in users {
            let len = serde_json::to_vec(&devices)?.len() + user.len();
            if !chunk.is_empty() && size + len > MAX_TO_DEVICE_EDU_BYTES {
                out.push((
                    server.clone(),
                    to_device_edu(sender, kind, std::mem::take(&mut chunk)),
                ));
                size = 0;
            }
            size += len;
            chunk.insert(user, devices);
        }
        if !chunk.is_empty() {
            out.push((server, to_device_edu(sender, kind, chunk)));
        }
    }
    Ok(out)
}

fn to_device_edu(sender: &UserId, kind: &str, messages: Map<String, Value>) -> Value {
    json!({
        "edu_type": "m.direct_to_device",
        "content": {
            "sender": sender,
            "type": kind,
            "message_id": utils::random_string(24),
            "messages": messages,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Incoming

/// Apply the EDUs of a transaction from `origin` (the caller checked there are at most 100 and
/// that each is an object). Errors are logged; a bad EDU never fails the transaction.
pub fn apply(s: &Services, origin: &ServerName, edus: &[Value]) {
    for edu in edus.iter().take(super::sender::MAX_EDUS_PER_TXN) {
        let kind = edu.get("edu_type").and_then(Value::as_str).unwrap_or("");
        let Some(content) = edu.get("content").and_then(Value::as_object) else {
            tracing::debug!("EDU {kind} from {origin} without content ignored");
            continue;
        };
        let result = match kind {
            "m.typing" => typing(s, origin, content),
            "m.receipt" => receipts(s, origin, content),
            "m.presence" => presence(s, origin, content),
            "m.direct_to_device" => to_device(s, origin, content),
            "m.device_list_update" | "m.signing_key_update" => keys_changed(s, origin, content),
            _ => {
                tracing::debug!("EDU {kind} from {origin} ignored");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::info!("EDU {kind} from {origin}: {e}");
        }
    }
}

/// The user a field names, if it is a user of `origin`.
fn origin_user(origin: &ServerName, value: Option<&Value>) -> Option<OwnedUserId> {
    let user = UserId::parse(value?.as_str()?).ok()?;
    if user.server_name() == origin {
        Some(user)
    } else {
        tracing::debug!("EDU from {origin} about {user} ignored");
        None
    }
}

/// The room, if this server knows it and its server ACL admits `origin` (room EDUs of denied
/// servers are dropped like their PDUs).
fn known_room(s: &Services, room: &str, origin: &ServerName) -> Result<Option<ruma::OwnedRoomId>> {
    let Ok(room_id) = RoomId::parse(room) else {
        return Ok(None);
    };
    if !s.rooms.exists(&room_id)? || !s.rooms.server_acl_allows(&room_id, origin)? {
        return Ok(None);
    }
    Ok(Some(room_id))
}

/// [`known_room`], and `user` (of the origin) is joined to it.
fn joined_room(s: &Services, room: &str, user: &UserId) -> Result<Option<ruma::OwnedRoomId>> {
    let Some(room_id) = known_room(s, room, user.server_name())? else {
        return Ok(None);
    };
    if !s.rooms.is_joined(&room_id, user)? {
        return Ok(None);
    }
    Ok(Some(room_id))
}

fn typing(s: &Services, origin: &ServerName, c: &Map<String, Value>) -> Result<()> {
    let Some(user) = origin_user(origin, c.get("user_id")) else {
        return Ok(());
    };
    let Some(room) = c.get("room_id").and_then(Value::as_str) else {
        return Ok(());
    };
    let Some(room_id) = joined_room(s, room, &user)? else {
        return Ok(());
    };
    let typing = c.get("typing").and_then(Value::as_bool).unwrap_or(false);
    let members = s.rooms.joined_members(&room_id)?.iter().cloned().collect();
    s.typing
        .set(&room_id, &user, typing.then_some(REMOTE_TYPING_MS), members)
}

fn receipts(s: &Services, origin: &ServerName, c: &Map<String, Value>) -> Result<()> {
    for (room, by_type) in c.iter().take(MAX_EDU_ENTRIES) {
        let Some(users) = by_type.get("m.read").and_then(Value::as_object) else {
            continue;
        };
        // Per room once: the room, its ACL and its members.
        let Some(room_id) = known_room(s, room, origin)? else {
            continue;
        };
        let members = s.rooms.joined_members(&room_id)?;
        for (user, receipt) in users.iter().take(MAX_EDU_ENTRIES) {
            let Some(user) = origin_user(origin, Some(&Value::String(user.clone()))) else {
                continue;
            };
            if !members.contains(&user) {
                continue;
            }
            let Some(event_id) = receipt
                .get("event_ids")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .and_then(|e| EventId::parse(e).ok())
            else {
                continue;
            };
            let thread = receipt
                .get("data")
                .and_then(|d| d.get("thread_id"))
                .and_then(Value::as_str)
                .filter(|t| *t == "main" || EventId::parse(*t).is_ok());
            let wake = members.iter().cloned().collect();
            s.receipts
                .set(&room_id, &user, "m.read", thread, &event_id, wake)?;
        }
    }
    Ok(())
}

fn presence(s: &Services, origin: &ServerName, c: &Map<String, Value>) -> Result<()> {
    if !s.policy.presence_enabled() {
        return Ok(());
    }
    let Some(push) = c.get("push").and_then(Value::as_array) else {
        return Ok(());
    };
    for entry in push.iter().take(MAX_EDU_ENTRIES) {
        let Some(user) = origin_user(origin, entry.get("user_id")) else {
            continue;
        };
        let Some(state) = entry
            .get("presence")
            .and_then(Value::as_str)
            .filter(|p| matches!(*p, "online" | "offline" | "unavailable"))
        else {
            continue;
        };
        let mates = room_mates(s, &user)?;
        // Only users someone here shares a room with: nobody else's presence is stored.
        if !mates.iter().any(|m| m.server_name() == ours(s)) {
            continue;
        }
        let status_msg = entry
            .get("status_msg")
            .and_then(Value::as_str)
            .filter(|m| m.len() <= 1024)
            .map(str::to_owned);
        let ago = entry
            .get("last_active_ago")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        s.presence
            .set_remote(&user, state, status_msg, ago, mates)?;
    }
    Ok(())
}

fn to_device(s: &Services, origin: &ServerName, c: &Map<String, Value>) -> Result<()> {
    let Some(sender) = origin_user(origin, c.get("sender")) else {
        return Ok(());
    };
    let (Some(kind), Some(message_id), Some(messages)) = (
        c.get("type").and_then(Value::as_str),
        c.get("message_id").and_then(Value::as_str),
        c.get("messages").and_then(Value::as_object),
    ) else {
        return Ok(());
    };
    if message_id.is_empty() || message_id.chars().count() > 255 || kind.len() > 255 {
        return Ok(());
    }
    let mut recipients = Vec::new();
    'users: for (user, devices) in messages {
        let Ok(user_id) = UserId::parse(user.as_str()) else {
            continue;
        };
        // Only our own users; a message for anybody else is not ours to deliver.
        if user_id.server_name() != ours(s) {
            continue;
        }
        let Some(devices) = devices.as_object() else {
            continue;
        };
        for (device, content) in devices {
            if recipients.len() >= crate::service::to_device::MAX_RECIPIENTS {
                break 'users;
            }
            if !content.is_object() {
                continue;
            }
            recipients_for(&s.accounts, &user_id, device, content, &mut recipients)?;
        }
    }
    recipients.truncate(crate::service::to_device::MAX_RECIPIENTS);
    // The closed user groups: what the sender may not send to our users is not delivered (the
    // others of the same message still are; the write below applies the same rule to them all).
    recipients.retain(|r| {
        let ok = s.to_device.may_contact(&sender, &r.user);
        if !ok {
            tracing::debug!(%sender, user = %r.user, "to-device message refused by the closed user groups");
        }
        ok
    });
    if recipients.is_empty() {
        return Ok(());
    }
    // Filed under the sender and the message id: a message delivered again (another transaction
    // carrying it) is stored once.
    s.to_device.send(
        &sender,
        <&DeviceId>::from(FEDERATION_DEVICE),
        message_id,
        kind,
        recipients,
    )
}

/// `m.device_list_update` and `m.signing_key_update`: the user's keys changed. Local users
/// sharing a room with them see the user in sync's `device_lists.changed` (they then ask the
/// user's server for the keys).
fn keys_changed(s: &Services, origin: &ServerName, c: &Map<String, Value>) -> Result<()> {
    let Some(user) = origin_user(origin, c.get("user_id")) else {
        return Ok(());
    };
    let mates = room_mates(s, &user)?;
    if !mates.iter().any(|m| m.server_name() == ours(s)) {
        return Ok(());
    }
    let pending = s.globals.counter.next()?;
    let mut b = s.storage.batch();
    crate::service::keys::log_change(&mut b, pending.get(), &ListChange::Keys { user })?;
    b.commit()?;
    pending.finish(mates);
    Ok(())
}
