//! Room creation: the events of a new room in the order the spec prescribes.

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId};
use serde_json::{json, Map, Value};

use super::{
    append::rules_for,
    membership::{member_content, MemberProfile},
    NewEvent, Rooms, SUPPORTED_ROOM_VERSIONS,
};
use crate::error::{ErrCode, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// A validated `/createRoom` request.
#[derive(Clone, Debug)]
pub struct CreateRoom {
    pub version: RoomVersionId,
    pub preset: Preset,
    /// Publish in the room directory.
    pub publish: bool,
    pub alias: Option<OwnedRoomAliasId>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// (type, state_key, content), in request order.
    pub initial_state: Vec<(String, String, Value)>,
    pub power_levels_override: Option<Map<String, Value>>,
    pub creation_content: Map<String, Value>,
}

/// Limits on list sizes a client may ask for in one request.
pub const MAX_INVITES: usize = 100;
pub const MAX_INITIAL_STATE: usize = 100;

impl Rooms {
    /// Create a room with `creator` joined and everything the request asks for.
    pub async fn create_room(
        &self,
        creator: &UserId,
        profile: &MemberProfile,
        req: CreateRoom,
    ) -> Result<OwnedRoomId> {
        if !SUPPORTED_ROOM_VERSIONS.contains(&req.version) {
            return Err(Error::new(
                ErrCode::UnsupportedRoomVersion,
                format!("Room version {} is not supported", req.version),
            ));
        }
        let rules = rules_for(&req.version)?;
        if req.invite.len() > MAX_INVITES || req.initial_state.len() > MAX_INITIAL_STATE {
            return Err(Error::invalid_param(
                "Too many invites or initial state events",
            ));
        }
        for (t, _, _) in &req.initial_state {
            if t == "m.room.create" || t == "m.room.member" {
                return Err(Error::new(
                    ErrCode::InvalidRoomState,
                    format!("{t} cannot be part of initial_state"),
                ));
            }
        }
        if let Some(alias) = &req.alias {
            self.ensure_alias_not_exclusive(alias, creator)?;
            if self.resolve_alias(alias)?.is_some() {
                return Err(Error::new(ErrCode::RoomInUse, "Room alias already taken"));
            }
        }
        let v12 = rules.authorization.explicitly_privilege_room_creators;

        // 1. m.room.create. The server decides the version and creator fields.
        let mut create = req.creation_content.clone();
        create.remove("room_version");
        create.remove("creator");
        if v12 && req.preset == Preset::TrustedPrivateChat && !req.invite.is_empty() {
            let mut extra: Vec<Value> = match create.remove("additional_creators") {
                Some(Value::Array(a)) => a,
                Some(_) => return Err(Error::bad_json("additional_creators must be an array")),
                None => Vec::new(),
            };
            for u in &req.invite {
                let v = Value::String(u.to_string());
                if !extra.contains(&v) && u.as_str() != creator.as_str() {
                    extra.push(v);
                }
            }
            create.insert("additional_creators".into(), Value::Array(extra));
        }
        let creators: Vec<String> = std::iter::once(creator.to_string())
            .chain(
                create
                    .get("additional_creators")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned),
            )
            .collect();
        let (room_id, _guard) = self
            .create_room_event(&req.version, creator, create)
            .await?;

        // Everything after the create event: an auth failure means the request's state is
        // inconsistent (e.g. an override that takes the creator's power away).
        let invalid = |e: Error| match e {
            // A policy's denial (an invitee the membership write path refuses) stays a 403.
            e if e.is_policy_denial() => e,
            Error::Matrix {
                code: ErrCode::Forbidden,
                message,
                ..
            } => Error::new(ErrCode::InvalidRoomState, message),
            other => other,
        };
        let send = async |event: NewEvent| -> Result<()> {
            self.append_locked(&room_id, creator, event, None)
                .await
                .map(|_| ())
                .map_err(invalid)
        };

        // 2. The creator joins.
        send(NewEvent::state(
            "m.room.member",
            creator.as_str(),
            member_content("join", Some(profile), None),
        ))
        .await?;
        self.audit_membership(&room_id, creator, creator, "join", Some("create"));

        // 3. Power levels, with the override applied on top.
        let mut users = Map::new();
        if !v12 {
            users.insert(creator.to_string(), json!(100));
            if req.preset == Preset::TrustedPrivateChat {
                for u in &req.invite {
                    users.insert(u.to_string(), json!(100));
                }
            }
        }
        let mut pl = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.avatar": 50,
                "m.room.tombstone": if v12 { 150 } else { 100 },
                "m.room.server_acl": 100,
                "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": if req.preset == Preset::PublicChat { 50 } else { 0 },
            "notifications": { "room": 50 },
        });
        if let (Some(over), Some(obj)) = (&req.power_levels_override, pl.as_object_mut()) {
            for (k, v) in over {
                obj.insert(k.clone(), v.clone());
            }
        }
        if v12 {
            // Creators have infinite power in v12 and must not be listed.
            if let Some(u) = pl.get_mut("users").and_then(Value::as_object_mut) {
                for c in &creators {
                    u.remove(c);
                }
            }
        }
        send(NewEvent::state("m.room.power_levels", "", pl)).await?;

        // 4. The canonical alias.
        if let Some(alias) = &req.alias {
            send(NewEvent::state(
                "m.room.canonical_alias",
                "",
                json!({ "alias": alias }),
            ))
            .await?;
        }

        // 5. Preset events, unless initial_state sets them.
        let in_initial = |t: &str| {
            req.initial_state
                .iter()
                .any(|(it, k, _)| it == t && k.is_empty())
        };
        let public = req.preset == Preset::PublicChat;
        if !in_initial("m.room.join_rules") {
            let rule = if public { "public" } else { "invite" };
            send(NewEvent::state(
                "m.room.join_rules",
                "",
                json!({ "join_rule": rule }),
            ))
            .await?;
        }
        if !in_initial("m.room.history_visibility") {
            send(NewEvent::state(
                "m.room.history_visibility",
                "",
                json!({ "history_visibility": "shared" }),
            ))
            .await?;
        }
        if !public && !in_initial("m.room.guest_access") {
            send(NewEvent::state(
                "m.room.guest_access",
                "",
                json!({ "guest_access": "can_join" }),
            ))
            .await?;
        }

        // 6. initial_state, in order.
        for (t, k, content) in &req.initial_state {
            send(NewEvent::state(t, k, content.clone())).await?;
        }

        // 7. Name and topic.
        if let Some(name) = &req.name {
            send(NewEvent::state("m.room.name", "", json!({ "name": name }))).await?;
        }
        if let Some(topic) = &req.topic {
            send(NewEvent::state(
                "m.room.topic",
                "",
                json!({ "topic": topic, "m.topic": [{ "body": topic, "mimetype": "text/plain" }] }),
            ))
            .await?;
        }

        // 8. Invites.
        for u in &req.invite {
            // Users of other servers are invited over federation once the room exists.
            if u.as_str() == creator.as_str() || u.server_name() != self.globals.server_name {
                continue;
            }
            self.invite_locked(&room_id, creator, u, None, req.is_direct, None)
                .await
                .map_err(invalid)?;
        }

        if let Some(alias) = &req.alias {
            // Checked above; taken since only when another request claimed it meanwhile.
            if !self.claim_alias(alias, &room_id, creator).await? {
                return Err(Error::new(ErrCode::RoomInUse, "Room alias already taken"));
            }
        }
        if req.publish {
            self.set_public(&room_id, true)?;
        }
        Ok(room_id)
    }
}
