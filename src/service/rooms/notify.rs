//! The write path's side of push: who receives an event, and the room facts the push rules ask
//! about, served from the write path's caches (`service::push::evaluate` does the rest).

use ruma::{events::TimelineEventType, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{Pdu, Rooms};
use crate::{
    error::Result,
    service::push::evaluate::{evaluate, forget_unread, RoomFacts},
    storage::Batch,
};

impl Rooms {
    /// Evaluate push rules for the local recipients of `pdu` into `batch`. Call under the room's
    /// lock, before the membership caches learn about this event. Returns who was notified.
    pub(super) fn push_notifications(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        stored: &Value,
        pdu: &Pdu,
        count: u64,
    ) -> Result<Vec<OwnedUserId>> {
        let ours = |u: &UserId| u.server_name() == self.globals.server_name;
        let joined = self.joined_members(room_id)?;
        let mut recipients: Vec<OwnedUserId> = joined.iter().filter(|u| ours(u)).cloned().collect();
        let mut member_count = joined.len() as u64;
        if pdu.kind == TimelineEventType::RoomMember {
            if let Some(target) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) {
                let membership = pdu.membership().unwrap_or_default();
                let was_joined = joined.contains(&target);
                match membership.as_str() {
                    // An invite notifies its target, who is not a member yet.
                    "invite" if ours(&target) && !was_joined => recipients.push(target.clone()),
                    "join" if !was_joined => member_count += 1,
                    "leave" | "ban" if was_joined => member_count -= 1,
                    _ => {}
                }
                if ours(&target) && matches!(membership.as_str(), "leave" | "ban") {
                    forget_unread(&self.storage, batch, &target, room_id)?;
                    recipients.retain(|u| *u != target);
                }
            }
        }
        if recipients.is_empty() {
            return Ok(Vec::new());
        }
        let display_name = |user: &UserId| -> Option<String> {
            let member = self
                .state_get_for_auth(room_id, "m.room.member", user.as_str())
                .ok()??;
            member
                .content_value()
                .get("displayname")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        let room_notification_power = || -> Result<(i64, i64)> {
            let power = self.power_levels(room_id)?;
            Ok((power.user(&pdu.sender), power.room_notification()))
        };
        let facts = RoomFacts {
            room_id,
            member_count,
            display_name: &display_name,
            room_notification_power: &room_notification_power,
        };
        evaluate(
            &self.push_rules,
            batch,
            stored,
            pdu,
            count,
            &recipients,
            &facts,
        )
    }
}
