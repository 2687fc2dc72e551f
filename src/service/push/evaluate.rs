//! Push rule evaluation on the write path: for each local recipient of a new event, the first
//! matching rule of their rule set decides; notifying results go into the event's own batch.

use futures_util::FutureExt;
use ruma::{
    power_levels::NotificationPowerLevels,
    push::{FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx},
    room_version_rules::{AuthorizationRules, RoomPowerLevelsRules},
    serde::Raw,
    Int, OwnedUserId, RoomId, UInt, UserId,
};
use serde_json::Value;

use super::{
    notifications::{record, Notification},
    rules::RuleStore,
};
use crate::{
    error::Result,
    service::rooms::Pdu,
    storage::{keys, Batch, Table},
};

/// What evaluation needs to know about the room, supplied by the write path from its caches.
pub struct RoomFacts<'a> {
    pub room_id: &'a RoomId,
    /// Joined members, after this event.
    pub member_count: u64,
    /// The display name of a recipient in this room (for the display-name rule).
    pub display_name: &'a dyn Fn(&UserId) -> Option<String>,
    /// (sender's level, level needed for `@room`), asked only for events that could notify the
    /// room, so ordinary messages do not read power levels.
    pub room_notification_power: &'a dyn Fn() -> Result<(i64, i64)>,
}

/// Evaluate `event` (stored JSON of `pdu`, at stream position `count`) for `recipients` and add
/// the notifications to `batch`. Returns the users who got one (for the push gateways).
pub fn evaluate(
    rules: &RuleStore,
    batch: &mut Batch,
    event: &Value,
    pdu: &Pdu,
    count: u64,
    recipients: &[OwnedUserId],
    room: &RoomFacts<'_>,
) -> Result<Vec<OwnedUserId>> {
    let raw: Raw<Value> = Raw::new(event)?;
    let flat = FlattenedJson::from_raw(&raw);
    let content = pdu.content_value();
    let power = if may_notify_room(&content) {
        let (sender, needed) = (room.room_notification_power)()?;
        Some(power_context(&pdu.sender, sender, needed))
    } else {
        None
    };
    let thread = content
        .get("m.relates_to")
        .filter(|r| r.get("rel_type").and_then(Value::as_str) == Some("m.thread"))
        .and_then(|r| r.get("event_id"))
        .and_then(Value::as_str);
    let member_count = UInt::try_from(room.member_count).unwrap_or(UInt::MAX);
    let mut notified = Vec::new();
    let event_text = raw.json().get();
    // Each distinct notification is serialized once: recipients mostly share one.
    let mut serialized: Vec<(String, Vec<u8>)> = Vec::new();
    // The server-default rules decide the same for every user the event does not name (no
    // mention, not the state key): evaluated once for all of them.
    let mut shared: Option<Option<(usize, bool)>> = None;
    for user in recipients {
        if *user == pdu.sender {
            continue;
        }
        let rules = rules.get(user)?;
        let generic = rules.is_default && !event_text.contains(user.as_str());
        let outcome = match (&shared, generic) {
            (Some(o), true) => *o,
            _ => {
                let display_name = if rules.needs_display_name {
                    (room.display_name)(user).unwrap_or_else(|| user.localpart().to_owned())
                } else {
                    String::new()
                };
                let mut ctx = PushConditionRoomCtx::new(
                    room.room_id.to_owned(),
                    member_count,
                    user.clone(),
                    display_name,
                );
                if let Some(p) = &power {
                    ctx = ctx.with_power_levels(p.clone());
                }
                let actions = rules
                    .set
                    .iter()
                    // Conditions only await a thread-subscription lookup, which we do not
                    // configure: the future is always ready.
                    .find(|rule| rule.applies(&flat, &ctx).now_or_never().unwrap_or(false))
                    .map(|rule| rule.actions())
                    .filter(|actions| actions.iter().any(|a| a.should_notify()));
                let o = match actions {
                    None => None,
                    Some(actions) => {
                        let highlight = actions.iter().any(|a| a.is_highlight());
                        let key = serde_json::to_string(actions)?;
                        let index = match serialized.iter().position(|(k, _)| *k == key) {
                            Some(i) => i,
                            None => {
                                let notification = Notification {
                                    room_id: room.room_id.to_owned(),
                                    event_id: pdu.event_id.clone(),
                                    actions: actions.to_vec(),
                                    highlight,
                                    ts: u64::from(pdu.origin_server_ts.get()),
                                };
                                serialized.push((key, serde_json::to_vec(&notification)?));
                                serialized.len() - 1
                            }
                        };
                        Some((index, highlight))
                    }
                };
                if generic {
                    shared = Some(o);
                }
                o
            }
        };
        let Some((index, highlight)) = outcome else {
            continue;
        };
        record(
            batch,
            user,
            room.room_id,
            count,
            &serialized[index].1,
            highlight,
            thread,
        )?;
        notified.push(user.clone());
    }
    Ok(notified)
}

/// A user who leaves a room has nothing left to read there: their unread rows go with the
/// leave event's batch.
pub fn forget_unread(
    storage: &crate::storage::Storage,
    batch: &mut Batch,
    user: &UserId,
    room_id: &RoomId,
) -> Result<()> {
    let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
    for entry in storage.scan_prefix(Table::PushUnread, &prefix)? {
        let (k, _) = entry?;
        batch.delete(Table::PushUnread, &k)?;
    }
    Ok(())
}

/// Could the event notify the whole room (`@room` in the body or an intentional room mention)?
fn may_notify_room(content: &Value) -> bool {
    content.pointer("/m.mentions/room").and_then(Value::as_bool) == Some(true)
        || content
            .get("body")
            .and_then(Value::as_str)
            .is_some_and(|b| b.contains("@room"))
}

/// The power-levels context of the `sender_notification_permission` condition: only the
/// sender's level matters to it.
fn power_context(sender: &UserId, level: i64, needed: i64) -> PushConditionPowerLevelsCtx {
    let clamp = |v: i64| Int::new_saturating(v);
    let mut notifications = NotificationPowerLevels::new();
    notifications.room = clamp(needed);
    PushConditionPowerLevelsCtx::new(
        [(sender.to_owned(), clamp(level))].into_iter().collect(),
        clamp(level),
        notifications,
        // The sender's level already accounts for privileged creators.
        RoomPowerLevelsRules::new(&AuthorizationRules::V1, []),
    )
}
