//! Rooms bound to a group stay closed when the group changes: after a member is removed from a
//! group, or the group is deleted, this server's users who are no longer in the group leave the
//! rooms bound to it (joined, invited or knocking; the leave event goes to the other servers in
//! the room like any leave). At start the same check runs over every bound room, so a group
//! changed in the config file is enforced too. Each removal is a `policy_denied` audit entry
//! (action `remain_member`) besides the membership entry of the leave itself.
//!
//! Other servers' users in a bound room are their own server's to decide (it knows the group by
//! its own rules); this server cannot make them leave.

use std::sync::Weak;

use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::json;

use super::{access::ROOM_GROUP, audit::AuditEntry};
use crate::{error::Result, service::Services};

/// Most rooms one sweep looks at.
const MAX_ROOMS: usize = 1_000_000;

/// Make local users outside the group leave the rooms bound to `group` (every bound room when
/// None). Returns who left which room.
pub async fn remove_outsiders(
    s: &Services,
    group: Option<&str>,
) -> Result<Vec<(OwnedRoomId, OwnedUserId)>> {
    let mut removed = Vec::new();
    for room in s.rooms.room_ids(MAX_ROOMS)? {
        let Some(bound) = super::access::room_group(s, &room)? else {
            continue;
        };
        if group.is_some_and(|g| g != bound) {
            continue;
        }
        let members = s
            .rooms
            .members_with(&room, |m| matches!(m, "join" | "invite" | "knock"))?;
        for user in members {
            if user.server_name() != s.globals.server_name
                || s.access.groups.is_member(&bound, &user)
            {
                continue;
            }
            if remove_from_room(s, &room, &user, &bound).await? {
                removed.push((room.clone(), user));
            }
        }
    }
    Ok(removed)
}

/// Make `user` (a local user) leave the rooms bound to a group they are no longer in: after
/// their identity provider stopped naming a group (`claims::record_login`). Looks only at the
/// user's own rooms.
pub async fn remove_user_outside(s: &Services, user: &ruma::UserId) -> Result<Vec<OwnedRoomId>> {
    let mut removed = Vec::new();
    for (room, r) in s.rooms.user_rooms(user)? {
        if !matches!(r.membership.as_str(), "join" | "invite" | "knock") {
            continue;
        }
        let Some(bound) = super::access::room_group(s, &room)? else {
            continue;
        };
        if s.access.groups.is_member(&bound, user) {
            continue;
        }
        if remove_from_room(s, &room, user, &bound).await? {
            removed.push(room);
        }
    }
    Ok(removed)
}

/// `user` leaves `room`, bound to `group` they are not in; audited. False when the leave failed
/// (logged: the next sweep tries again).
async fn remove_from_room(
    s: &Services,
    room: &ruma::RoomId,
    user: &ruma::UserId,
    group: &str,
) -> Result<bool> {
    let reason = format!("No longer a member of the group {group} this room is bound to");
    if let Err(e) = s.rooms.leave_room(room, user, Some(&reason)).await {
        tracing::warn!(%room, %user, error = %e, "could not remove a user outside the room's group");
        return Ok(false);
    }
    s.audit.record(AuditEntry {
        kind: "policy_denied".to_owned(),
        user: Some(user.to_string()),
        room: Some(room.to_string()),
        detail: json!({
            "policy": ROOM_GROUP,
            "action": "remain_member",
            "group": group,
        }),
        ..AuditEntry::default()
    })?;
    Ok(true)
}

/// The check at start, in the background (after a config change of the groups).
pub async fn run_at_start(services: Weak<Services>) {
    let Some(s) = services.upgrade() else { return };
    if !s.access.groups.active() {
        return;
    }
    match remove_outsiders(&s, None).await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(
                count = removed.len(),
                "users outside their rooms' groups removed"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "the group check of bound rooms failed"),
    }
}
