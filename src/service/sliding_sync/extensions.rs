//! The extensions of sliding sync: to-device messages (acknowledged through the extension's own
//! `since`), e2ee (device list changes, one-time key counts, fallback key types), account data
//! (global, and per room for the rooms in scope), receipts and typing (rooms in scope).
//!
//! "In scope" for the per-room extensions: the rooms in the windows of the lists the extension
//! names (all lists when it names none) and the subscriptions it names (`*` or no `rooms`: all).

use std::collections::{BTreeSet, HashMap};

use ruma::{
    api::client::sync::sync_events::v5::{self, request::ExtensionRoomConfig},
    OwnedRoomId,
};
use serde_json::{json, Map, Value};

use super::{Builder, Selection};
use crate::{
    error::{Error, Result},
    service::{
        accounts::Identity,
        receipts::receipt_content,
        sync::{device_list_changes, key_counts},
        to_device::MAX_PER_SYNC,
        Services,
    },
};

pub struct Extensions {
    pub body: Map<String, Value>,
    /// Whether any extension carries something new (key counts alone are not news).
    pub has_news: bool,
}

fn enabled(flag: Option<bool>) -> bool {
    flag == Some(true)
}

/// The to-device `since` token: the count of the last message the device has seen.
fn to_device_since(req: &v5::Request) -> Result<Option<u64>> {
    match req.extensions.to_device.since.as_deref() {
        None | Some("") => Ok(None),
        Some(t) => t
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Error::invalid_param("Invalid to_device since token")),
    }
}

/// The device has seen the messages its to-device `since` covers: they go.
pub fn acknowledge_to_device(s: &Services, who: &Identity, req: &v5::Request) -> Result<()> {
    if !enabled(req.extensions.to_device.enabled) {
        return Ok(());
    }
    if let Some(since) = to_device_since(req)? {
        s.to_device
            .acknowledge(&who.user_id, &who.device_id, since)?;
    }
    Ok(())
}

/// The rooms a per-room extension applies to.
fn scope(
    sel: &Selection,
    lists: &Option<Vec<String>>,
    rooms: &Option<Vec<ExtensionRoomConfig>>,
) -> BTreeSet<OwnedRoomId> {
    let mut out = BTreeSet::new();
    for (name, window) in &sel.lists {
        if lists.as_ref().is_none_or(|l| l.contains(name)) {
            out.extend(window.rooms.iter().cloned());
        }
    }
    match rooms {
        None => out.extend(sel.subscribed.iter().cloned()),
        Some(rooms) => {
            for r in rooms {
                match r {
                    ExtensionRoomConfig::AllSubscribed => {
                        out.extend(sel.subscribed.iter().cloned())
                    }
                    ExtensionRoomConfig::Room(id) if sel.rooms.contains_key(id) => {
                        out.insert(id.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

pub fn build(
    b: &Builder<'_>,
    sel: &Selection,
    initial_rooms: &BTreeSet<OwnedRoomId>,
) -> Result<Extensions> {
    let ext = &b.req.extensions;
    let mut out = Extensions {
        body: Map::new(),
        has_news: false,
    };
    if enabled(ext.to_device.enabled) {
        to_device(b, &mut out)?;
    }
    if enabled(ext.e2ee.enabled) {
        e2ee(b, &mut out)?;
    }
    if enabled(ext.account_data.enabled) {
        let rooms = scope(sel, &ext.account_data.lists, &ext.account_data.rooms);
        account_data(b, &rooms, initial_rooms, &mut out)?;
    }
    if enabled(ext.receipts.enabled) {
        let rooms = scope(sel, &ext.receipts.lists, &ext.receipts.rooms);
        receipts(b, &rooms, initial_rooms, &mut out)?;
    }
    if enabled(ext.typing.enabled) {
        let rooms = scope(sel, &ext.typing.lists, &ext.typing.rooms);
        typing(b, &rooms, initial_rooms, &mut out)?;
    }
    Ok(out)
}

/// The position per-room data is new after: none for a room sent for the first time now.
fn room_since(b: &Builder<'_>, room: &OwnedRoomId, initial: &BTreeSet<OwnedRoomId>) -> Option<u64> {
    (b.previous.position > 0 && !initial.contains(room)).then_some(b.previous.position)
}

fn to_device(b: &Builder<'_>, out: &mut Extensions) -> Result<()> {
    let limit = b
        .req
        .extensions
        .to_device
        .limit
        .map(|l| usize::try_from(u64::from(l)).unwrap_or(MAX_PER_SYNC))
        .unwrap_or(MAX_PER_SYNC);
    let since = to_device_since(b.req)?.unwrap_or(0);
    let (events, last, more) =
        b.s.to_device
            .pending(&b.who.user_id, &b.who.device_id, b.up_to, limit)?;
    // All messages up to the position were delivered, unless more were waiting than one
    // response carries: then up to the last one delivered.
    let next = match (more, last) {
        (true, Some(last)) => last,
        _ => b.up_to,
    };
    out.has_news |= !events.is_empty();
    out.body.insert(
        "to_device".into(),
        json!({ "next_batch": next.max(since).to_string(), "events": events }),
    );
    Ok(())
}

fn e2ee(b: &Builder<'_>, out: &mut Extensions) -> Result<()> {
    let (changed, left) = if b.previous.position > 0 {
        device_list_changes(b.s, &b.who.user_id, b.previous.position, b.up_to)?
    } else {
        (Vec::new(), Vec::new())
    };
    out.has_news |= !changed.is_empty() || !left.is_empty();
    let (counts, fallback) = key_counts(b.s, b.who)?;
    out.body.insert(
        "e2ee".into(),
        json!({
            "device_lists": { "changed": changed, "left": left },
            "device_one_time_keys_count": counts,
            "device_unused_fallback_key_types": fallback,
        }),
    );
    Ok(())
}

fn account_data(
    b: &Builder<'_>,
    rooms: &BTreeSet<OwnedRoomId>,
    initial: &BTreeSet<OwnedRoomId>,
    out: &mut Extensions,
) -> Result<()> {
    let user = &b.who.user_id;
    let fresh = b.previous.position == 0;
    let entries = if fresh {
        b.s.account_data.all(user)?
    } else {
        b.s.account_data
            .changed_since(user, b.previous.position, b.up_to)?
    };
    let mut global = Vec::new();
    let mut by_room: HashMap<OwnedRoomId, Vec<Value>> = HashMap::new();
    let mut add = |room: Option<OwnedRoomId>, kind: String, content: Value| {
        let event = json!({ "type": kind, "content": content });
        match room {
            None => global.push(event),
            Some(r) if rooms.contains(&r) => by_room.entry(r).or_default().push(event),
            Some(_) => {}
        }
    };
    let first_sent: Vec<&OwnedRoomId> = initial.iter().filter(|r| rooms.contains(*r)).collect();
    for (room, kind, content) in entries {
        // A room sent for the first time gets all of its data below, not just the changes.
        if !fresh && room.as_ref().is_some_and(|r| initial.contains(r)) {
            continue;
        }
        add(room, kind, content);
    }
    if !fresh && !first_sent.is_empty() {
        for (room, kind, content) in b.s.account_data.all(user)? {
            if room.as_ref().is_some_and(|r| initial.contains(r)) {
                add(room, kind, content);
            }
        }
    }
    out.has_news |= !global.is_empty() || !by_room.is_empty();
    let rooms_json: Map<String, Value> = by_room
        .into_iter()
        .map(|(r, events)| (r.to_string(), Value::Array(events)))
        .collect();
    out.body.insert(
        "account_data".into(),
        json!({ "global": global, "rooms": rooms_json }),
    );
    Ok(())
}

/// A per-room extension: `event(room, since)` gives the room's event (None: nothing new).
fn per_room(
    b: &Builder<'_>,
    rooms: &BTreeSet<OwnedRoomId>,
    initial: &BTreeSet<OwnedRoomId>,
    out: &mut Extensions,
    name: &str,
    mut event: impl FnMut(&OwnedRoomId, Option<u64>) -> Result<Option<Value>>,
) -> Result<()> {
    let mut by_room = Map::new();
    for room in rooms {
        if let Some(ev) = event(room, room_since(b, room, initial))? {
            by_room.insert(room.to_string(), ev);
        }
    }
    out.has_news |= !by_room.is_empty();
    out.body.insert(name.into(), json!({ "rooms": by_room }));
    Ok(())
}

fn receipts(
    b: &Builder<'_>,
    rooms: &BTreeSet<OwnedRoomId>,
    initial: &BTreeSet<OwnedRoomId>,
    out: &mut Extensions,
) -> Result<()> {
    per_room(b, rooms, initial, out, "receipts", |room, since| {
        // Invitees and knockers see stripped state only, not who read what.
        if !b.s.rooms.is_joined(room, &b.who.user_id)? {
            return Ok(None);
        }
        let receipts = b.s.receipts.since(room, since, b.up_to)?;
        Ok(receipt_content(&receipts, &b.who.user_id)
            .map(|content| json!({ "type": "m.receipt", "content": content })))
    })
}

fn typing(
    b: &Builder<'_>,
    rooms: &BTreeSet<OwnedRoomId>,
    initial: &BTreeSet<OwnedRoomId>,
    out: &mut Extensions,
) -> Result<()> {
    per_room(b, rooms, initial, out, "typing", |room, since| {
        if !b.s.rooms.is_joined(room, &b.who.user_id)? {
            return Ok(None);
        }
        Ok(b.s
            .typing
            .typing_since(room, since)
            .map(|(_, users)| json!({ "type": "m.typing", "content": { "user_ids": users } })))
    })
}
