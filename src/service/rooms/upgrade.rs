//! Room upgrades: replace a room by a new one of another room version, carrying its state over.

use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Map, Value};

use super::{append::rules_for, NewEvent, PowerLevels, Rooms, SUPPORTED_ROOM_VERSIONS};
use crate::error::{ErrCode, Error, Result};

/// State copied from the old room to the new one (power levels are handled on their own).
const COPIED_STATE: &[&str] = &[
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.canonical_alias",
];

/// The most bans carried over, so that an upgrade of a huge room stays bounded.
const MAX_COPIED_BANS: usize = 1000;

impl Rooms {
    /// Upgrade `room_id` to `new_version` on behalf of `user`. Returns the new room's id.
    pub async fn upgrade_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        new_version: &RoomVersionId,
        additional_creators: &[OwnedUserId],
    ) -> Result<OwnedRoomId> {
        if !SUPPORTED_ROOM_VERSIONS.contains(new_version) || new_version.rules().is_none() {
            return Err(Error::new(
                ErrCode::UnsupportedRoomVersion,
                format!("Room version {new_version} is not supported"),
            ));
        }
        if !self.exists(room_id)? || !self.is_joined(room_id, user)? {
            return Err(Error::forbidden("You are not in this room"));
        }
        let old_lock = self.lock(room_id).await;
        if self.state_get(room_id, "m.room.tombstone", "")?.is_some() {
            return Err(Error::new(
                ErrCode::Forbidden,
                "This room has already been replaced",
            ));
        }
        if !self.power_allows_state(room_id, user, "m.room.tombstone")? {
            return Err(Error::forbidden("You may not upgrade this room"));
        }
        let new_rules = rules_for(new_version)?;
        let old_meta = self
            .meta(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;

        // The create event: the old room's type, federation flag and closed user group (an
        // upgrade must not unbind a room from its group), and a pointer back.
        let old_create = self
            .state_get(room_id, "m.room.create", "")?
            .map(|p| p.content_value())
            .unwrap_or_else(|| json!({}));
        let mut create = Map::new();
        for key in ["type", "m.federate", crate::policy::groups::ROOM_GROUP_KEY] {
            if let Some(v) = old_create.get(key) {
                create.insert(key.into(), v.clone());
            }
        }
        let mut predecessor = json!({ "room_id": room_id });
        if let Some(last) = old_meta.extremities.first() {
            predecessor["event_id"] = json!(last);
        }
        create.insert("predecessor".into(), predecessor);
        let extra_creators: Vec<OwnedUserId> = if new_rules.authorization.additional_room_creators {
            additional_creators
                .iter()
                .filter(|u| *u != user)
                .take(100)
                .cloned()
                .collect()
        } else {
            vec![]
        };
        if !extra_creators.is_empty() {
            create.insert("additional_creators".into(), json!(extra_creators));
        }
        let (new_room, new_lock) = self.create_room_event(new_version, user, create).await?;

        // The upgrading user joins with their membership's profile fields.
        let mut member = json!({ "membership": "join" });
        if let Some(old) = self.state_get(room_id, "m.room.member", user.as_str())? {
            let c = old.content_value();
            for key in ["displayname", "avatar_url"] {
                if let Some(v) = c.get(key).filter(|v| v.is_string()) {
                    member[key] = v.clone();
                }
            }
        }
        self.append_locked(
            &new_room,
            user,
            NewEvent::state("m.room.member", user.as_str(), member),
            None,
        )
        .await?;

        // Power levels. Creators of a room version that privileges them must not be listed in
        // `users`; otherwise the upgrading user needs enough power to send the copied state, so
        // they get it for the time of the copy and the old levels are restored afterwards.
        let mut creators = vec![user.to_owned()];
        creators.extend(extra_creators.iter().cloned());
        let old_pl = self
            .state_get(room_id, "m.room.power_levels", "")?
            .map(|p| p.content_value());
        let mut final_pl = old_pl.clone().unwrap_or_else(|| json!({}));
        if !final_pl.is_object() {
            final_pl = json!({});
        }
        if !final_pl.get("users").is_none_or(Value::is_object) {
            final_pl["users"] = json!({});
        }
        if old_pl.is_none() && !new_rules.authorization.explicitly_privilege_room_creators {
            // Without power levels the old room's creator had 100.
            final_pl["users"][user.as_str()] = json!(100);
        }
        let privileged = new_rules.authorization.explicitly_privilege_room_creators;
        if privileged {
            if let Some(users) = final_pl.get_mut("users").and_then(Value::as_object_mut) {
                for c in &creators {
                    users.remove(c.as_str());
                }
            }
        } else if self.power_levels(room_id)?.is_privileged(user) {
            // A creator of the old room had unlimited power there: keep them in charge.
            final_pl["users"][user.as_str()] = json!(100);
        }
        let mut temp_pl = final_pl.clone();
        if !privileged {
            let levels = PowerLevels::from_content(final_pl.clone());
            let needed = needed_level(&levels);
            if levels.user(user) < needed {
                temp_pl["users"][user.as_str()] = json!(needed);
            }
        }
        self.append_locked(
            &new_room,
            user,
            NewEvent::state("m.room.power_levels", "", temp_pl.clone()),
            None,
        )
        .await?;

        for kind in COPIED_STATE {
            let Some(ev) = self.state_get(room_id, kind, "")? else {
                continue;
            };
            let content = ev.content_value();
            if content.as_object().is_none_or(|o| o.is_empty()) {
                continue;
            }
            // A join rule the new version does not know (e.g. restricted in v1) must not stop
            // the upgrade: the room then stays invite-only.
            if let Err(e) = self
                .append_locked(&new_room, user, NewEvent::state(kind, "", content), None)
                .await
            {
                tracing::info!(room = %new_room, kind, error = %e, "state not carried over in upgrade");
                if *kind == "m.room.join_rules" {
                    let _ = self
                        .append_locked(
                            &new_room,
                            user,
                            NewEvent::state(kind, "", json!({ "join_rule": "invite" })),
                            None,
                        )
                        .await;
                }
            }
        }

        // Bans stay bans.
        let banned: Vec<OwnedUserId> = self
            .members_with(room_id, |m| m == "ban")?
            .into_iter()
            .take(MAX_COPIED_BANS)
            .collect();
        for target in banned {
            let reason = self
                .state_get(room_id, "m.room.member", target.as_str())?
                .and_then(|p| p.content_value().get("reason").cloned());
            let mut content = json!({ "membership": "ban" });
            if let Some(r) = reason.filter(Value::is_string) {
                content["reason"] = r;
            }
            if let Err(e) = self
                .append_locked(
                    &new_room,
                    user,
                    NewEvent::state("m.room.member", target.as_str(), content),
                    None,
                )
                .await
            {
                tracing::info!(room = %new_room, error = %e, "ban not carried over in upgrade");
            }
        }
        if temp_pl != final_pl {
            self.append_locked(
                &new_room,
                user,
                NewEvent::state("m.room.power_levels", "", final_pl),
                None,
            )
            .await?;
        }
        drop(new_lock);

        // The tombstone points the old room's members at the new room.
        self.append_locked(
            room_id,
            user,
            NewEvent::state(
                "m.room.tombstone",
                "",
                json!({ "body": "This room has been replaced", "replacement_room": new_room }),
            ),
            None,
        )
        .await?;

        // Restrict the old room so that only moderators can still talk there (best effort:
        // the user may be allowed to send a tombstone but not power levels).
        if let Some(mut pl) = old_pl.filter(Value::is_object) {
            let users_default = pl.get("users_default").and_then(Value::as_i64).unwrap_or(0);
            let restricted = 50.max(users_default.saturating_add(1));
            let mut changed = false;
            for key in ["events_default", "invite"] {
                let current = pl.get(key).and_then(Value::as_i64).unwrap_or(0);
                if current < restricted {
                    pl[key] = json!(restricted);
                    changed = true;
                }
            }
            if changed {
                if let Err(e) = self
                    .append_locked(
                        room_id,
                        user,
                        NewEvent::state("m.room.power_levels", "", pl),
                        None,
                    )
                    .await
                {
                    tracing::info!(room = %room_id, error = %e, "old room power levels not restricted");
                }
            }
        }

        // The canonical alias now belongs to the new room.
        let has_alias = self
            .state_get(room_id, "m.room.canonical_alias", "")?
            .is_some_and(|p| p.content_value().as_object().is_some_and(|o| !o.is_empty()));
        if has_alias {
            if let Err(e) = self
                .append_locked(
                    room_id,
                    user,
                    NewEvent::state("m.room.canonical_alias", "", json!({})),
                    None,
                )
                .await
            {
                tracing::info!(room = %room_id, error = %e, "old room canonical alias not removed");
            }
        }
        drop(old_lock);

        self.move_aliases(room_id, &new_room).await?;
        if self.is_public(room_id)? {
            self.set_public(&new_room, true)?;
            self.set_public(room_id, false)?;
        }
        Ok(new_room)
    }
}

/// The highest power level the copied state needs from the upgrading user.
fn needed_level(levels: &PowerLevels) -> i64 {
    COPIED_STATE
        .iter()
        .chain(["m.room.power_levels"].iter())
        .map(|kind| levels.state(kind))
        .fold(levels.state_default().max(levels.action("ban")), i64::max)
}
