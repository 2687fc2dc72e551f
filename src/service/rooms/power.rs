//! Power levels: who the room's creators are, a user's power level, and what it allows.
//!
//! Levels are read from the `m.room.power_levels` content as the auth rules read them: integers,
//! or (in old room versions) strings holding integers; absent or unreadable values take the
//! spec's defaults. The auth rules themselves (ruma state-res) still decide every event; these
//! answers are for the checks a request makes before building one.

use ruma::{events::StateEventType, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{append::rules_for, Rooms};
use crate::error::Result;

/// Power values may be integers or (in old rooms) strings holding integers.
fn as_level(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The power levels of a room.
#[derive(Clone, Debug, Default)]
pub struct PowerLevels {
    /// The `m.room.power_levels` content, if the room has one.
    content: Option<Value>,
    /// Users with unlimited power: the creators, in room versions that privilege them (v12).
    privileged: Vec<OwnedUserId>,
    /// The sender of `m.room.create`: power 100 while there is no power levels event.
    create_sender: Option<OwnedUserId>,
}

impl PowerLevels {
    /// Power levels read from a content alone (no creators known), e.g. one about to be sent.
    pub fn from_content(content: Value) -> PowerLevels {
        PowerLevels {
            content: Some(content),
            ..PowerLevels::default()
        }
    }

    /// Does `user` have unlimited power (a creator in a room version that privileges them)?
    pub fn is_privileged(&self, user: &UserId) -> bool {
        self.privileged.iter().any(|c| c == user)
    }

    /// The user's power level; `i64::MAX` for privileged creators.
    pub fn user(&self, user: &UserId) -> i64 {
        if self.is_privileged(user) {
            return i64::MAX;
        }
        match &self.content {
            Some(c) => c
                .get("users")
                .and_then(|u| u.get(user.as_str()))
                .and_then(as_level)
                .or_else(|| self.field("users_default"))
                .unwrap_or(0),
            // Without power levels the creator has 100, everybody else 0.
            None if self.create_sender.as_deref() == Some(user) => 100,
            None => 0,
        }
    }

    /// A top-level integer field of the content, if set and readable.
    fn field(&self, key: &str) -> Option<i64> {
        self.content.as_ref()?.get(key).and_then(as_level)
    }

    /// The level an action needs: "invite" (default 0), "kick", "ban", "redact" (default 50).
    pub fn action(&self, key: &str) -> i64 {
        let default = if key == "invite" { 0 } else { 50 };
        self.field(key).unwrap_or(default)
    }

    /// The level needed to send a state event of type `kind` (0 without power levels).
    pub fn state(&self, kind: &str) -> i64 {
        let Some(c) = &self.content else {
            return 0;
        };
        c.get("events")
            .and_then(|e| e.get(kind))
            .and_then(as_level)
            .or_else(|| self.field("state_default"))
            .unwrap_or(50)
    }

    /// The level needed to notify the whole room (`notifications.room`, default 50).
    pub fn room_notification(&self) -> i64 {
        self.content
            .as_ref()
            .and_then(|c| c.pointer("/notifications/room"))
            .and_then(as_level)
            .unwrap_or(50)
    }

    /// The level `state_default` gives state types the content does not list.
    pub fn state_default(&self) -> i64 {
        match &self.content {
            Some(_) => self.field("state_default").unwrap_or(50),
            None => 0,
        }
    }

    /// May `user` take the action ("invite", "kick", "ban", "redact")?
    pub fn may(&self, user: &UserId, action: &str) -> bool {
        self.user(user) >= self.action(action)
    }

    /// May `user` send a state event of type `kind`?
    pub fn may_send_state(&self, user: &UserId, kind: &str) -> bool {
        self.user(user) >= self.state(kind)
    }
}

impl Rooms {
    /// The room's creators: the create event's sender (or `creator` field in old versions)
    /// and, where the room version has them, `additional_creators`.
    pub fn creators_of_room(&self, room_id: &RoomId) -> Result<Vec<OwnedUserId>> {
        let Some(create) = self.state_get(room_id, "m.room.create", "")? else {
            return Ok(vec![]);
        };
        let content = create.content_value();
        let mut out = vec![create.sender.clone()];
        if let Some(c) = content
            .get("creator")
            .and_then(Value::as_str)
            .and_then(|c| UserId::parse(c).ok())
        {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        let rules = rules_for(&self.version(room_id)?)?;
        if rules.authorization.additional_room_creators {
            for c in content
                .get("additional_creators")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(u) = c.as_str().and_then(|c| UserId::parse(c).ok()) {
                    if !out.contains(&u) {
                        out.push(u);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The power levels in the room's current state.
    pub fn power_levels(&self, room_id: &RoomId) -> Result<PowerLevels> {
        let rules = rules_for(&self.version(room_id)?)?;
        let creators = self.creators_of_room(room_id)?;
        Ok(PowerLevels {
            content: self.state_content(room_id, &StateEventType::RoomPowerLevels, "")?,
            create_sender: creators.first().cloned(),
            privileged: if rules.authorization.explicitly_privilege_room_creators {
                creators
            } else {
                Vec::new()
            },
        })
    }

    /// Whether the user's power level allows sending the state event type `kind`.
    pub fn power_allows_state(&self, room_id: &RoomId, user: &UserId, kind: &str) -> Result<bool> {
        Ok(self.power_levels(room_id)?.may_send_state(user, kind))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn levels_from_content() {
        let alice = UserId::parse("@alice:x").unwrap();
        let bob = UserId::parse("@bob:x").unwrap();
        let pl = PowerLevels::from_content(json!({
            "users": { "@alice:x": "75" },
            "users_default": 10,
            "events": { "m.room.name": 60 },
            "kick": 20,
        }));
        assert_eq!(pl.user(&alice), 75);
        assert_eq!(pl.user(&bob), 10);
        assert_eq!(pl.state("m.room.name"), 60);
        assert_eq!(pl.state("m.room.topic"), 50);
        assert_eq!(pl.action("invite"), 0);
        assert_eq!(pl.action("kick"), 20);
        assert!(pl.may(&alice, "ban"));
        assert!(!pl.may(&bob, "ban"));
        assert!(pl.may_send_state(&alice, "m.room.name"));
        assert!(!pl.may_send_state(&bob, "m.room.name"));
    }
}
