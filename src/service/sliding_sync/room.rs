//! One room of a sliding sync response: everything on its first sending (`initial`), then what
//! changed since the position it was last sent up to.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use ruma::{api::client::filter::RoomEventFilter, OwnedEventId, RoomId};
use serde_json::{json, Map, Value};

use super::{connection::SentRoom, Builder, RoomConfig, RoomInfo};
use crate::{
    error::Result,
    service::{
        rooms::Pdu,
        sync::{client_event, room_summary, stripped_state, timeline_window},
    },
};

/// The room's body (None when nothing changed since it was last sent) and what it leaves sent.
pub fn build(
    b: &Builder<'_>,
    info: &RoomInfo,
    config: &RoomConfig,
    previous: Option<&SentRoom>,
) -> Result<(Option<Value>, SentRoom)> {
    let s = b.s;
    let user = b.user();
    let room_id = &info.room_id;
    let required_state = Arc::new(config.required_state.clone());
    // Sent before with another membership: from an invite (stripped state only) it starts anew;
    // from joined to left it goes on up to the leave.
    let pending = |m: &str| matches!(m, "invite" | "knock");
    let initial = previous.is_none_or(|p| {
        p.membership != info.membership && (pending(&p.membership) || pending(&info.membership))
            || config.timeline_limit > p.timeline_limit && info.membership == "join"
    });

    if matches!(info.membership.as_str(), "invite" | "knock") {
        let sent = SentRoom {
            up_to: b.up_to,
            membership: info.membership.clone(),
            required_state,
            unread: (0, 0),
            timeline_limit: config.timeline_limit,
        };
        if !initial {
            return Ok((None, sent));
        }
        let stripped = stripped_state(s, user, room_id, &info.user_room)?;
        let mut body = Map::new();
        body.insert("initial".into(), Value::Bool(true));
        let field = if info.membership == "invite" {
            "invite_state"
        } else {
            "knock_state"
        };
        body.insert(field.into(), Value::Array(stripped));
        body.insert("bump_stamp".into(), json!(info.bump_stamp));
        body.insert("is_dm".into(), Value::Bool(info.is_dm));
        if let Some(name) = room_name(s, room_id)? {
            body.insert("name".into(), Value::String(name));
        }
        return Ok((Some(Value::Object(body)), sent));
    }

    // Joined, or left since the last response: the timeline ends at their leave event.
    let end = if info.membership == "join" {
        b.up_to
    } else {
        info.user_room.count.min(b.up_to)
    };
    let since = if initial {
        None
    } else {
        previous.map(|p| p.up_to)
    };
    let state_again = initial || previous.is_some_and(|p| *p.required_state != *required_state);
    let counts = s.push.notifications.unread(user, room_id, end, false)?;
    let unread = (counts.main.notifications, counts.main.highlights);
    let sent = SentRoom {
        up_to: end,
        membership: info.membership.clone(),
        required_state: required_state.clone(),
        unread,
        timeline_limit: config.timeline_limit,
    };
    // Fast path: nothing was written to the room since it was sent.
    let quiet = match (since, s.rooms.meta(room_id)?) {
        (Some(since), Some(meta)) => meta.last_count <= since,
        _ => false,
    };
    if quiet && !state_again && previous.is_some_and(|p| p.unread == unread) {
        return Ok((None, sent));
    }

    let timeline = timeline_window(
        s,
        user,
        room_id,
        &RoomEventFilter::default(),
        config.timeline_limit,
        since.unwrap_or(0),
        end,
    )?;
    let lazy: BTreeSet<String> = if config.required_state.lazy_members() {
        timeline
            .events
            .iter()
            .map(|(_, p)| p.sender.to_string())
            .collect()
    } else {
        BTreeSet::new()
    };
    let state = required_state_events(
        b,
        room_id,
        config,
        since.filter(|_| !state_again),
        end,
        &lazy,
    )?;

    // (`limited` with no events: new events a `timeline_limit` of 0 leaves out; the room moved.)
    if !initial
        && timeline.events.is_empty()
        && !timeline.limited
        && state.is_empty()
        && previous.is_some_and(|p| p.unread == unread)
    {
        return Ok((None, sent));
    }

    let mut body = Map::new();
    if initial {
        body.insert("initial".into(), Value::Bool(true));
    }
    let name = room_name(s, room_id)?;
    let summary = room_summary(s, user, room_id)?;
    match &name {
        Some(name) => {
            body.insert("name".into(), Value::String(name.clone()));
        }
        None => {
            let mut heroes = Vec::new();
            for hero in &summary.heroes {
                let content = s
                    .rooms
                    .state_get(room_id, "m.room.member", hero.as_str())?
                    .map(|p| p.content_value())
                    .unwrap_or(Value::Null);
                let mut h = json!({ "user_id": hero });
                for field in ["displayname", "avatar_url"] {
                    if let Some(v) = content.get(field).filter(|v| v.is_string()) {
                        h[field] = v.clone();
                    }
                }
                heroes.push(h);
            }
            body.insert("heroes".into(), Value::Array(heroes));
        }
    }
    if let Some(avatar) = s.rooms.state_get(room_id, "m.room.avatar", "")? {
        let url = avatar
            .content_value()
            .get("url")
            .cloned()
            .unwrap_or(Value::Null);
        body.insert("avatar".into(), url);
    }
    body.insert("joined_count".into(), json!(summary.joined));
    body.insert("invited_count".into(), json!(summary.invited));
    body.insert("notification_count".into(), json!(unread.0));
    body.insert("highlight_count".into(), json!(unread.1));
    body.insert("is_dm".into(), Value::Bool(info.is_dm));
    body.insert("bump_stamp".into(), json!(info.bump_stamp));

    let live_after = b.previous.position;
    let num_live = if live_after == 0 {
        0
    } else {
        timeline
            .events
            .iter()
            .filter(|(c, _)| *c > live_after)
            .count()
    };
    let events: Vec<Value> = timeline
        .events
        .iter()
        .map(|(_, p)| client_event(s, b.who, p))
        .collect();
    body.insert("timeline".into(), Value::Array(events));
    body.insert("num_live".into(), json!(num_live));
    body.insert("limited".into(), Value::Bool(timeline.limited));
    body.insert(
        "prev_batch".into(),
        Value::String(timeline.prev_batch(since, end)),
    );
    body.insert(
        "required_state".into(),
        Value::Array(state.iter().map(|p| p.to_client_value(None)).collect()),
    );
    Ok((Some(Value::Object(body)), sent))
}

/// The room's name from `m.room.name`, when it has one.
fn room_name(s: &crate::service::Services, room_id: &RoomId) -> Result<Option<String>> {
    Ok(s.rooms
        .state_get(room_id, "m.room.name", "")?
        .and_then(|p| {
            p.content_value()
                .get("name")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        }))
}

/// The state the room's `required_state` asks for: all of it as of `end` (first sending, or
/// another `required_state`), else the state changed in `(since, end]`; plus, with `$LAZY`, the
/// member events of the timeline's senders.
fn required_state_events(
    b: &Builder<'_>,
    room_id: &RoomId,
    config: &RoomConfig,
    since: Option<u64>,
    end: u64,
    lazy: &BTreeSet<String>,
) -> Result<Vec<Pdu>> {
    let s = b.s;
    let user = b.user();
    let wanted = &config.required_state;
    let ids: HashMap<(String, String), OwnedEventId> = match since {
        Some(since) => {
            let mut changes = HashMap::new();
            for (_, change) in s.rooms.state_changes(room_id, since, end)? {
                // A key that left the state cannot be expressed to clients: no event.
                let key = (change.event_type, change.state_key);
                if change.removed {
                    changes.remove(&key);
                } else {
                    changes.insert(key, change.event_id);
                }
            }
            // Lazy members are sent with the events they sent, whether or not they changed.
            if !lazy.is_empty() {
                let current = state_ids_at(b, room_id, end)?;
                for member in lazy {
                    let key = ("m.room.member".to_owned(), member.clone());
                    if let Some(id) = current.get(&key) {
                        changes.insert(key, id.clone());
                    }
                }
            }
            changes
        }
        None => state_ids_at(b, room_id, end)?,
    };
    let mut out = Vec::new();
    for ((kind, state_key), id) in &ids {
        if !wanted.wants(kind, state_key, user, lazy) {
            continue;
        }
        if let Some(p) = s.rooms.pdu(id.as_str())? {
            out.push(p);
        }
    }
    out.sort_by(|a, c| {
        (a.kind.to_string(), a.state_key.as_deref())
            .cmp(&(c.kind.to_string(), c.state_key.as_deref()))
    });
    Ok(out)
}

/// The room's state as of position `end` (inclusive): the current state when nothing was written
/// after `end`, else rebuilt from the state log.
fn state_ids_at(
    b: &Builder<'_>,
    room_id: &RoomId,
    end: u64,
) -> Result<HashMap<(String, String), OwnedEventId>> {
    let current =
        b.s.rooms
            .meta(room_id)?
            .is_some_and(|m| m.last_count <= end);
    if current {
        b.s.rooms.current_state_ids(room_id)
    } else {
        b.s.rooms.state_at(room_id, end.saturating_add(1))
    }
}
