//! Who may see which event: `m.room.history_visibility` applied to a user's membership history.

use ruma::{RoomId, UserId};

use super::Rooms;
use crate::{
    error::Result,
    storage::{keys, Table},
};

impl Rooms {
    /// The user's membership at stream position `count` (the last change at or before it).
    pub fn membership_at(
        &self,
        room_id: &RoomId,
        user: &UserId,
        count: u64,
    ) -> Result<Option<String>> {
        let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
        let mut from = prefix.clone();
        from.extend_from_slice(&count.to_be_bytes());
        Ok(self
            .storage
            .scan_from(Table::MembershipLog, &prefix, &from, true)?
            .next()
            .transpose()?
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether the user was joined at any point at or after `count`.
    fn joined_since(&self, room_id: &RoomId, user: &UserId, count: u64) -> Result<bool> {
        if self.membership_at(room_id, user, count)?.as_deref() == Some("join") {
            return Ok(true);
        }
        let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
        let mut from = prefix.clone();
        from.extend_from_slice(&count.to_be_bytes());
        for entry in self
            .storage
            .scan_from(Table::MembershipLog, &prefix, &from, false)?
            .take(1000)
        {
            let (_, v) = entry?;
            if &*v == b"join" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the user was ever joined to the room.
    pub fn was_ever_joined(&self, room_id: &RoomId, user: &UserId) -> Result<bool> {
        self.joined_since(room_id, user, 0)
    }

    /// The room's current history visibility ("shared" when unset, as the spec says).
    pub fn history_visibility(&self, room_id: &RoomId) -> Result<String> {
        Ok(self
            .state_content(
                room_id,
                &ruma::events::StateEventType::RoomHistoryVisibility,
                "",
            )?
            .and_then(|c| {
                c.get("history_visibility")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "shared".to_owned()))
    }

    /// May `user` see the event at stream position `count`? `visibility` is the room's history
    /// visibility, passed in so that a page of events looks it up once.
    pub fn user_can_see(
        &self,
        room_id: &RoomId,
        user: &UserId,
        count: u64,
        visibility: &str,
    ) -> Result<bool> {
        match visibility {
            "world_readable" => Ok(true),
            "shared" => self.joined_since(room_id, user, count),
            "invited" => Ok(matches!(
                self.membership_at(room_id, user, count)?.as_deref(),
                Some("join") | Some("invite")
            )),
            _ => Ok(self.membership_at(room_id, user, count)?.as_deref() == Some("join")),
        }
    }
}
