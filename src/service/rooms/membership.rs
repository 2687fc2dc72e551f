//! Membership changes of local users (join, knock, invite, leave, kick, ban, unban, forget),
//! and which state a user may read.

use std::collections::HashMap;

use http::StatusCode;
use ruma::{events::StateEventType, OwnedEventId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::{NewEvent, Pdu, Rooms};
use crate::{
    error::{ErrCode, Error, Result},
    storage::{keys, Table},
};

/// Profile fields copied into a member event.
#[derive(Clone, Debug, Default)]
pub struct MemberProfile {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// A member event's content with the profile and optional reason.
pub fn member_content(
    membership: &str,
    profile: Option<&MemberProfile>,
    reason: Option<&str>,
) -> Value {
    let mut c = json!({ "membership": membership });
    if let Some(p) = profile {
        if let Some(d) = &p.displayname {
            c["displayname"] = Value::String(d.clone());
        }
        if let Some(a) = &p.avatar_url {
            c["avatar_url"] = Value::String(a.clone());
        }
    }
    if let Some(r) = reason {
        c["reason"] = Value::String(r.to_owned());
    }
    c
}

/// Most entries we read from a restricted join rule's `allow` list.
const MAX_ALLOW_ENTRIES: usize = 64;

impl Rooms {
    /// The room's join rule ("invite" when unset, as the auth rules assume).
    pub fn join_rule(&self, room_id: &RoomId) -> Result<String> {
        Ok(self
            .state_content(room_id, &StateEventType::RoomJoinRules, "")?
            .and_then(|c| {
                c.get("join_rule")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "invite".to_owned()))
    }

    /// For a restricted join: a local joined member with invite power who vouches for the
    /// joiner, when the joiner is in one of the rooms the join rule allows.
    pub(crate) fn restricted_authoriser(
        &self,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Option<OwnedUserId>> {
        let rules = self.state_content(room_id, &StateEventType::RoomJoinRules, "")?;
        let allow = rules
            .as_ref()
            .and_then(|c| c.get("allow"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut allowed = false;
        for entry in allow.iter().take(MAX_ALLOW_ENTRIES) {
            if entry.get("type").and_then(Value::as_str) != Some("m.room_membership") {
                continue;
            }
            let Some(other) = entry.get("room_id").and_then(Value::as_str) else {
                continue;
            };
            let Ok(other) = RoomId::parse(other) else {
                continue;
            };
            if self.exists(&other)? && self.is_joined(&other, user)? {
                allowed = true;
                break;
            }
        }
        if !allowed {
            return Ok(None);
        }
        let levels = self.power_levels(room_id)?;
        let mut candidates: Vec<OwnedUserId> = self
            .joined_members(room_id)?
            .iter()
            .filter(|u| u.server_name() == self.globals.server_name && levels.may(u, "invite"))
            .cloned()
            .collect();
        candidates.sort();
        Ok(candidates.into_iter().next())
    }

    /// Join a local room (no federation yet): invites, public and restricted rooms.
    pub async fn join_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        profile: &MemberProfile,
        reason: Option<&str>,
    ) -> Result<()> {
        if !self.exists(room_id)? {
            return Err(Error::not_found("Unknown room"));
        }
        let _guard = self.lock(room_id).await;
        let current = self.membership(room_id, user)?;
        match current.as_deref() {
            Some("ban") => return Err(Error::forbidden("You are banned from this room")),
            // Joining again changes nothing unless the profile changed.
            Some("join") => {
                let mine = self.state_get(room_id, "m.room.member", user.as_str())?;
                let same = mine.map(|p| p.content_value()).is_some_and(|c| {
                    c.get("displayname").and_then(Value::as_str) == profile.displayname.as_deref()
                        && c.get("avatar_url").and_then(Value::as_str)
                            == profile.avatar_url.as_deref()
                });
                if same {
                    return Ok(());
                }
            }
            _ => {}
        }
        let mut content = member_content("join", Some(profile), reason);
        let rule = self.join_rule(room_id)?;
        let restricted = matches!(rule.as_str(), "restricted" | "knock_restricted");
        if restricted && !matches!(current.as_deref(), Some("invite") | Some("join")) {
            match self.restricted_authoriser(room_id, user)? {
                Some(via) => {
                    content["join_authorised_via_users_server"] = Value::String(via.to_string())
                }
                None => {
                    return Err(Error::forbidden(
                        "You are not a member of any room this room allows joining from",
                    ))
                }
            }
        }
        let event = NewEvent::state("m.room.member", user.as_str(), content);
        self.append_locked(room_id, user, event, None)
            .await
            .map_err(|e| refusal(e, "You are not allowed to join this room"))?;
        self.audit_membership(room_id, user, user, "join", None);
        Ok(())
    }

    /// Ask to join a room whose join rule is `knock`.
    pub async fn knock_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        profile: &MemberProfile,
        reason: Option<&str>,
    ) -> Result<()> {
        if !self.exists(room_id)? {
            return Err(Error::not_found("Unknown room"));
        }
        let _guard = self.lock(room_id).await;
        match self.membership(room_id, user)?.as_deref() {
            Some("ban") => return Err(Error::forbidden("You are banned from this room")),
            Some("join") => return Err(Error::forbidden("You are already in this room")),
            Some("invite") => return Err(Error::forbidden("You are already invited to this room")),
            _ => {}
        }
        let event = NewEvent::state(
            "m.room.member",
            user.as_str(),
            member_content("knock", Some(profile), reason),
        );
        self.append_locked(room_id, user, event, None)
            .await
            .map_err(|e| refusal(e, "This room does not accept knocks"))?;
        self.audit_membership(room_id, user, user, "knock", None);
        Ok(())
    }

    /// `sender` invites `target`.
    pub async fn invite_user(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
        is_direct: bool,
        target_profile: Option<&MemberProfile>,
    ) -> Result<()> {
        let _guard = self.lock(room_id).await;
        self.invite_locked(room_id, sender, target, reason, is_direct, target_profile)
            .await
    }

    pub(crate) async fn invite_locked(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
        is_direct: bool,
        target_profile: Option<&MemberProfile>,
    ) -> Result<()> {
        self.require_joined(room_id, sender)?;
        match self.membership(room_id, target)?.as_deref() {
            Some("ban") => return Err(Error::forbidden("The user is banned from this room")),
            Some("join") => return Err(Error::forbidden("The user is already in this room")),
            _ => {}
        }
        let mut content = member_content("invite", target_profile, reason);
        if is_direct {
            content["is_direct"] = Value::Bool(true);
        }
        let event = NewEvent::state("m.room.member", target.as_str(), content);
        self.append_locked(room_id, sender, event, None)
            .await
            .map_err(|e| refusal(e, "You may not invite users to this room"))?;
        self.audit_membership(room_id, target, sender, "invite", None);
        Ok(())
    }

    /// Leave a room, reject an invite or withdraw a knock.
    pub async fn leave_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
    ) -> Result<()> {
        let _guard = self.lock(room_id).await;
        match self.membership(room_id, user)?.as_deref() {
            None if !self.exists(room_id)? => return Err(Error::not_found("Unknown room")),
            None => return Err(Error::forbidden("You are not in this room")),
            // Nothing to leave: already gone (or banned, which the user cannot undo).
            Some("leave") | Some("ban") => return Ok(()),
            _ => {}
        }
        let event = NewEvent::state(
            "m.room.member",
            user.as_str(),
            member_content("leave", None, reason),
        );
        self.append_locked(room_id, user, event, None).await?;
        self.audit_membership(room_id, user, user, "leave", None);
        Ok(())
    }

    /// Kick (`leave`), ban (`ban`) or unban (`leave` of a banned user) `target`.
    pub async fn moderate(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        action: Moderation,
        reason: Option<&str>,
    ) -> Result<()> {
        let _guard = self.lock(room_id).await;
        self.require_joined(room_id, sender)?;
        let current = self.membership(room_id, target)?;
        let membership = match action {
            Moderation::Kick => {
                if !matches!(
                    current.as_deref(),
                    Some("join") | Some("invite") | Some("knock")
                ) {
                    return Err(Error::forbidden("The user is not in this room"));
                }
                "leave"
            }
            Moderation::Ban => "ban",
            Moderation::Unban => {
                if current.as_deref() != Some("ban") {
                    return Err(Error::forbidden("The user is not banned"));
                }
                "leave"
            }
        };
        let event = NewEvent::state(
            "m.room.member",
            target.as_str(),
            member_content(membership, None, reason),
        );
        self.append_locked(room_id, sender, event, None)
            .await
            .map_err(|e| refusal(e, "You do not have the power to do this"))?;
        let name = match action {
            Moderation::Kick => "kick",
            Moderation::Ban => "ban",
            Moderation::Unban => "unban",
        };
        self.audit_membership(room_id, target, sender, membership, Some(name));
        Ok(())
    }

    /// Forget a room the user left. Refused while still joined.
    pub fn forget_room(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        match self.membership(room_id, user)?.as_deref() {
            Some("join") => Err(Error::with_status(
                ErrCode::Unknown,
                StatusCode::BAD_REQUEST,
                "You must leave the room before forgetting it",
            )),
            None if !self.exists(room_id)? => Err(Error::not_found("Unknown room")),
            _ => self.forget(room_id, user),
        }
    }

    /// Fail with `M_FORBIDDEN` unless `user` is joined (unknown rooms included, to not leak them).
    pub fn require_joined(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        if self.exists(room_id)? && self.is_joined(room_id, user)? {
            Ok(())
        } else {
            Err(Error::forbidden("You are not joined to this room"))
        }
    }

    /// The stream count of the user's last membership change in the room.
    fn last_membership_count(&self, room_id: &RoomId, user: &UserId) -> Result<Option<u64>> {
        let prefix = keys::prefix(&[user.as_str(), room_id.as_str()]);
        Ok(self
            .storage
            .last_with_prefix(Table::MembershipLog, &prefix)?
            .and_then(|(k, _)| keys::count_suffix(&k)))
    }

    /// The room state `user` may read, as (type, state_key) -> event id: the current state for
    /// members (and anyone in world-readable rooms), the state when they left for former members.
    /// `at` (a stream position) asks for the state at that point instead, within those bounds.
    pub fn visible_state_ids(
        &self,
        room_id: &RoomId,
        user: &UserId,
        at: Option<u64>,
    ) -> Result<HashMap<(String, String), OwnedEventId>> {
        match self.visible_state_bound(room_id, user, at)? {
            None => self.current_state_ids(room_id),
            Some(b) => self.state_at(room_id, b),
        }
    }

    /// The state events of one type `user` may read (see [`Self::visible_state_ids`]), e.g. the
    /// members, without reading the rest of the state.
    pub fn visible_state_of_type(
        &self,
        room_id: &RoomId,
        user: &UserId,
        at: Option<u64>,
        event_type: &str,
    ) -> Result<Vec<Pdu>> {
        let ids = match self.visible_state_bound(room_id, user, at)? {
            None => {
                let prefix = keys::prefix(&[room_id.as_str(), event_type]);
                let mut ids = Vec::new();
                for entry in self.storage.scan_prefix(Table::RoomState, &prefix)? {
                    let (_, v) = entry?;
                    ids.push(
                        OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned())
                            .map_err(Error::internal)?,
                    );
                }
                ids
            }
            Some(b) => self
                .state_of_type_at(room_id, event_type, b)?
                .into_values()
                .collect(),
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.pdu(id.as_str())? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.state_key.cmp(&b.state_key));
        Ok(out)
    }

    /// The `m.room.member` event of `member` as `reader` may know it: the current one for
    /// members (and in world-readable rooms), the one in force when they left for former
    /// members (a later profile change, kick or ban is not theirs to see); none for others.
    pub fn visible_member_event(
        &self,
        room_id: &RoomId,
        reader: &UserId,
        member: &UserId,
    ) -> Result<Option<Pdu>> {
        match self.reader_state_bound(room_id, reader)? {
            Some(bound) => self.member_event_within(room_id, bound, member),
            None => Ok(None),
        }
    }

    /// Where `reader`'s knowledge of the room's state ends: `Some(None)` the current state,
    /// `Some(Some(b))` the state before position `b`, `None` none of it.
    pub(crate) fn reader_state_bound(
        &self,
        room_id: &RoomId,
        reader: &UserId,
    ) -> Result<Option<Option<u64>>> {
        match self.visible_state_bound(room_id, reader, None) {
            Ok(bound) => Ok(Some(bound)),
            Err(Error::Matrix { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The `m.room.member` event of `member` within a bound of [`Self::reader_state_bound`].
    pub(crate) fn member_event_within(
        &self,
        room_id: &RoomId,
        bound: Option<u64>,
        member: &UserId,
    ) -> Result<Option<Pdu>> {
        let id = match bound {
            None => self.state_event_id(room_id, "m.room.member", member.as_str())?,
            Some(b) => self.state_get_at(room_id, b, "m.room.member", member.as_str())?,
        };
        match id {
            Some(id) => self.pdu(id.as_str()),
            None => Ok(None),
        }
    }

    /// The stream position before which `user` may read the room's state (`None`: the current
    /// state), or 403 when they may read none of it.
    fn visible_state_bound(
        &self,
        room_id: &RoomId,
        user: &UserId,
        at: Option<u64>,
    ) -> Result<Option<u64>> {
        if !self.exists(room_id)? {
            return Err(Error::forbidden("You are not in this room"));
        }
        let membership = self.membership(room_id, user)?;
        // `None` bound: the current state.
        let bound = if membership.as_deref() == Some("join") || self.peekable_by(room_id, user)? {
            None
        } else if matches!(membership.as_deref(), Some("leave") | Some("ban"))
            && self.was_ever_joined(room_id, user)?
        {
            match self.last_membership_count(room_id, user)? {
                Some(c) => Some(c.saturating_add(1)),
                None => return Err(Error::forbidden("You are not in this room")),
            }
        } else {
            return Err(Error::forbidden("You are not in this room"));
        };
        Ok(match (bound, at) {
            (Some(b), Some(a)) => Some(b.min(a.saturating_add(1))),
            (None, Some(a)) => Some(a.saturating_add(1)),
            (b, None) => b,
        })
    }

    /// The events of `visible_state_ids`.
    pub fn visible_state(
        &self,
        room_id: &RoomId,
        user: &UserId,
        at: Option<u64>,
    ) -> Result<Vec<Pdu>> {
        let ids = self.visible_state_ids(room_id, user, at)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.values() {
            if let Some(p) = self.pdu(id.as_str())? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| {
            (a.kind.to_string(), &a.state_key).cmp(&(b.kind.to_string(), &b.state_key))
        });
        Ok(out)
    }

    /// One state event `user` may read.
    pub fn visible_state_event(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_type: &str,
        state_key: &str,
    ) -> Result<Pdu> {
        let id = match self.visible_state_bound(room_id, user, None)? {
            None => self.state_event_id(room_id, event_type, state_key)?,
            Some(b) => self.state_get_at(room_id, b, event_type, state_key)?,
        }
        .ok_or_else(|| Error::not_found("Event not found"))?;
        self.pdu(id.as_str())?
            .ok_or_else(|| Error::not_found("Event not found"))
    }

    /// Joined members with their room display names and avatars, for a joined user (or anyone
    /// in a world-readable room).
    pub fn joined_member_profiles(
        &self,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Vec<(OwnedUserId, MemberProfile)>> {
        if !self.exists(room_id)?
            || !(self.is_joined(room_id, user)? || self.peekable_by(room_id, user)?)
        {
            return Err(Error::forbidden("You are not joined to this room"));
        }
        let mut members: Vec<OwnedUserId> = self.joined_members(room_id)?.iter().cloned().collect();
        members.sort();
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            let content = self
                .state_get(room_id, "m.room.member", m.as_str())?
                .map(|p| p.content_value())
                .unwrap_or(Value::Null);
            let field = |k: &str| content.get(k).and_then(Value::as_str).map(str::to_owned);
            out.push((
                m,
                MemberProfile {
                    displayname: field("displayname"),
                    avatar_url: field("avatar_url"),
                },
            ));
        }
        Ok(out)
    }
}

/// What a moderator does to a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moderation {
    Kick,
    Ban,
    Unban,
}

/// Auth-rule rejections become `M_FORBIDDEN` with a clear message; other errors pass through.
fn refusal(e: Error, message: &str) -> Error {
    if e.is_policy_denial() {
        // The policy's own message names it: kept as it is.
        return e;
    }
    match e {
        Error::Matrix {
            code: ErrCode::Forbidden,
            message: detail,
            ..
        } => Error::forbidden(format!("{message} ({detail})")),
        other => other,
    }
}
