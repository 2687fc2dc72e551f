//! Which rooms a request shows: the user's rooms, filtered per list, sorted by recency (bump
//! stamp, newest first), cut to the list's ranges; plus the room subscriptions.

use std::collections::{BTreeMap, HashMap, HashSet};

use parking_lot::Mutex;
use ruma::{api::client::sync::sync_events::v5, OwnedRoomId, RoomId};

use super::{Builder, RoomConfig, RoomInfo, Selection};
use crate::{error::Result, service::Services};

/// Events that move a room up the list (what a user would call activity).
const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];
/// Events one bump-stamp search looks at before settling for the oldest it saw.
const MAX_BUMP_SCAN: usize = 200;
/// Rooms whose bump stamp is cached; when full the cache is emptied (it refills quickly).
const BUMP_CACHE_ENTRIES: usize = 100_000;

/// The rooms of one list: how many pass its filters, and those in its ranges.
pub struct Window {
    pub count: usize,
    pub rooms: Vec<OwnedRoomId>,
}

/// Per room: up to which position its timeline was searched, and the newest bump found.
#[derive(Default)]
pub struct BumpCache {
    rooms: Mutex<HashMap<OwnedRoomId, (u64, u64)>>,
}

impl BumpCache {
    /// The stream position of the newest bump event at or before `up_to` (the timeline's end).
    /// Only the events after the cached search are read again.
    fn bump_stamp(&self, s: &Services, room_id: &RoomId, up_to: u64) -> Result<u64> {
        let top = match s.rooms.meta(room_id)? {
            Some(meta) => meta.last_count.min(up_to),
            None => return Ok(0),
        };
        let cached = self.rooms.lock().get(room_id).copied();
        let (after, fallback) = match cached {
            Some((searched, bump)) if searched == top => return Ok(bump),
            Some((searched, bump)) if searched < top => (searched, Some(bump)),
            _ => (0, None),
        };
        let mut found = None;
        let mut oldest = None;
        let mut end = top;
        let mut scanned = 0usize;
        'walk: while end > after && scanned < MAX_BUMP_SCAN {
            let (chunk, more) = s.rooms.timeline_since(room_id, after, end, 50)?;
            for (count, pdu) in chunk.iter().rev() {
                scanned += 1;
                oldest = Some(*count);
                end = count.saturating_sub(1);
                if BUMP_TYPES.contains(&pdu.kind.to_string().as_str()) {
                    found = Some(*count);
                    break 'walk;
                }
            }
            if !more || chunk.is_empty() {
                break;
            }
        }
        let bump = found.or(fallback).or(oldest).unwrap_or(top);
        let mut cache = self.rooms.lock();
        if cache.len() >= BUMP_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(room_id.to_owned(), (top, bump));
        Ok(bump)
    }
}

/// The rooms named in the user's `m.direct` account data.
fn direct_rooms(s: &Services, user: &ruma::UserId) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    if let Some(content) = s.account_data.get(user, None, "m.direct")? {
        if let Some(map) = content.as_object() {
            for rooms in map.values().filter_map(|v| v.as_array()) {
                out.extend(rooms.iter().filter_map(|r| r.as_str()).map(str::to_owned));
            }
        }
    }
    Ok(out)
}

/// The user's rooms a list may show: joined, invited and knocked, and those left or banned since
/// the connection's last response when that response showed them (so the client learns it).
fn candidate_rooms(b: &Builder<'_>) -> Result<HashMap<OwnedRoomId, RoomInfo>> {
    let s = b.s;
    let user = b.user();
    let direct = direct_rooms(s, user)?;
    let mut out = HashMap::new();
    for (room_id, ur) in s.rooms.user_rooms(user)? {
        // A membership change not yet below the watermark is read as of the watermark.
        let membership = if ur.count <= b.up_to {
            ur.membership.clone()
        } else {
            match s.rooms.membership_at(&room_id, user, b.up_to)? {
                Some(m) => m,
                None => continue,
            }
        };
        let shown = match membership.as_str() {
            "join" | "invite" | "knock" => true,
            "leave" | "ban" => {
                ur.count > b.previous.position && b.previous.rooms.contains_key(&room_id)
            }
            _ => false,
        };
        if !shown {
            continue;
        }
        let bump_stamp = if membership == "join" {
            s.sliding_sync.bumps.bump_stamp(s, &room_id, b.up_to)?
        } else {
            // Not joined: nothing after their membership event is theirs to see.
            ur.count.min(b.up_to)
        };
        let is_dm = direct.contains(room_id.as_str())
            || (membership == "invite" && invite_is_direct(s, &ur)?);
        out.insert(
            room_id.clone(),
            RoomInfo {
                room_id,
                membership,
                user_room: ur,
                bump_stamp,
                is_dm,
            },
        );
    }
    Ok(out)
}

/// Whether the invite says the room is a direct chat (`is_direct` in the member event).
fn invite_is_direct(s: &Services, ur: &crate::service::rooms::UserRoom) -> Result<bool> {
    Ok(s.rooms.pdu(ur.event_id.as_str())?.is_some_and(|p| {
        p.content_value()
            .get("is_direct")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }))
}

/// Whether a room passes a list's filters (all given ones must hold).
fn passes(s: &Services, info: &RoomInfo, f: &v5::request::ListFilters) -> Result<bool> {
    if f.is_dm.is_some_and(|want| want != info.is_dm) {
        return Ok(false);
    }
    if f.is_invite
        .is_some_and(|want| want != (info.membership == "invite"))
    {
        return Ok(false);
    }
    if let Some(want) = f.is_encrypted {
        let encrypted = s
            .rooms
            .state_event_id(&info.room_id, "m.room.encryption", "")?
            .is_some();
        if want != encrypted {
            return Ok(false);
        }
    }
    if !f.room_types.is_empty() || !f.not_room_types.is_empty() {
        let room_type = s
            .rooms
            .state_get(&info.room_id, "m.room.create", "")?
            .and_then(|p| {
                p.content_value()
                    .get("type")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            });
        let matches = |t: &ruma::directory::RoomTypeFilter| t.as_str() == room_type.as_deref();
        if f.not_room_types.iter().any(matches) {
            return Ok(false);
        }
        if !f.room_types.is_empty() && !f.room_types.iter().any(matches) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The rooms that the spaces name as children (`m.space.child` with a `via`), as of now.
fn space_children(s: &Services, spaces: &[OwnedRoomId]) -> Result<HashSet<OwnedRoomId>> {
    let mut out = HashSet::new();
    for space in spaces {
        for ((kind, child), id) in s.rooms.current_state_ids(space)? {
            if kind != "m.space.child" {
                continue;
            }
            let linked = s.rooms.pdu(id.as_str())?.is_some_and(|p| {
                p.content_value()
                    .get("via")
                    .and_then(|v| v.as_array())
                    .is_some_and(|v| !v.is_empty())
            });
            if let (true, Ok(child)) = (linked, OwnedRoomId::try_from(child)) {
                out.insert(child);
            }
        }
    }
    Ok(out)
}

/// Filter, sort and cut every list; add the subscriptions.
pub fn select(b: &Builder<'_>) -> Result<Selection> {
    let s = b.s;
    let rooms = candidate_rooms(b)?;
    let mut sorted: Vec<&RoomInfo> = rooms.values().collect();
    // Most recent first; the room id breaks ties so the order is stable.
    sorted.sort_by(|a, c| {
        c.bump_stamp
            .cmp(&a.bump_stamp)
            .then_with(|| a.room_id.cmp(&c.room_id))
    });

    let mut configs: HashMap<OwnedRoomId, RoomConfig> = HashMap::new();
    let mut lists = BTreeMap::new();
    for (name, list) in &b.req.lists {
        let children = match b.spaces.get(name) {
            Some(spaces) => Some(space_children(s, spaces)?),
            None => None,
        };
        let mut members: Vec<&RoomInfo> = Vec::new();
        for info in &sorted {
            let keep = match &list.filters {
                Some(f) => passes(s, info, f)?,
                None => true,
            } && children.as_ref().is_none_or(|c| c.contains(&info.room_id));
            if keep {
                members.push(info);
            }
        }
        let count = members.len();
        let mut in_window: Vec<OwnedRoomId> = Vec::new();
        let mut seen: HashSet<usize> = HashSet::new();
        for (start, end) in &list.ranges {
            let start = usize::try_from(u64::from(*start)).unwrap_or(usize::MAX);
            let end = usize::try_from(u64::from(*end)).unwrap_or(usize::MAX);
            if start >= count {
                continue;
            }
            let last = end.min(count - 1);
            for (i, member) in members.iter().enumerate().take(last + 1).skip(start) {
                if seen.insert(i) {
                    in_window.push(member.room_id.clone());
                }
            }
        }
        for room_id in &in_window {
            configs.entry(room_id.clone()).or_default().merge(
                &list.room_details.required_state,
                list.room_details.timeline_limit,
            );
        }
        lists.insert(
            name.clone(),
            Window {
                count,
                rooms: in_window,
            },
        );
    }

    let mut subscribed = Vec::new();
    for (room_id, sub) in &b.req.room_subscriptions {
        // Only rooms the user is in (or invited to) can be subscribed to.
        if !rooms.contains_key(room_id) {
            continue;
        }
        configs
            .entry(room_id.clone())
            .or_default()
            .merge(&sub.required_state, sub.timeline_limit);
        subscribed.push(room_id.clone());
    }

    let wanted = sorted
        .iter()
        .filter_map(|info| {
            configs
                .remove(&info.room_id)
                .map(|c| (info.room_id.clone(), c))
        })
        .collect();
    Ok(Selection {
        rooms,
        lists,
        wanted,
        subscribed,
    })
}
