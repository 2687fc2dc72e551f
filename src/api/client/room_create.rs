//! `POST /createRoom`.

use std::sync::Arc;

use axum::{extract::State, Json, Router};
use ruma::{
    api::client::room::{create_room, Visibility},
    RoomAliasId,
};
use serde_json::{json, Map, Value};

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma},
    error::{Error, Result},
    service::{
        rooms::{CreateRoom, MemberProfile, Preset},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    ruma_route::<create_room::v3::Request, _, _>(r, create)
}

/// The profile that goes into a user's member events.
pub(super) fn member_profile(s: &Services, user: &ruma::UserId) -> Result<MemberProfile> {
    Ok(MemberProfile {
        displayname: s.profiles.displayname(user)?,
        avatar_url: s.profiles.avatar_url(user)?,
    })
}

/// A JSON value from ruma's raw wrapper.
fn raw_json<T>(raw: &ruma::serde::Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

fn object(value: Value, field: &str) -> Result<Map<String, Value>> {
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(Error::bad_json(format!("{field} must be an object"))),
    }
}

fn preset_name(p: &Preset) -> &'static str {
    match p {
        Preset::PrivateChat => "private_chat",
        Preset::TrustedPrivateChat => "trusted_private_chat",
        Preset::PublicChat => "public_chat",
    }
}

async fn create(
    State(s): State<Arc<Services>>,
    req: Ruma<create_room::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = req.user()?.user_id.clone();
    let body = &req.body;

    let publish = body.visibility == Visibility::Public;
    let preset = match body.preset.as_ref().map(|p| p.as_str()) {
        None if publish => Preset::PublicChat,
        None => Preset::PrivateChat,
        Some("private_chat") => Preset::PrivateChat,
        Some("trusted_private_chat") => Preset::TrustedPrivateChat,
        Some("public_chat") => Preset::PublicChat,
        Some(other) => return Err(Error::bad_json(format!("Unknown preset {other}"))),
    };
    if publish {
        s.policy.may_publish_room(&user)?;
    }

    let alias = match &body.room_alias_name {
        Some(local) => {
            // A localpart only: no sigil, separator or whitespace.
            if local.is_empty()
                || local
                    .chars()
                    .any(|c| c == ':' || c == '#' || c.is_whitespace() || c.is_control())
            {
                return Err(Error::invalid_param(
                    "Invalid characters in room alias name",
                ));
            }
            let full = format!("#{local}:{}", s.globals.server_name);
            if full.len() > 255 {
                return Err(Error::invalid_param("Room alias is too long"));
            }
            Some(
                RoomAliasId::parse(full)
                    .map_err(|_| Error::invalid_param("Invalid room alias name"))?,
            )
        }
        None => None,
    };

    let mut initial_state = Vec::new();
    for raw in body
        .initial_state
        .iter()
        .take(crate::service::rooms::create::MAX_INITIAL_STATE + 1)
    {
        let ev = object(raw_json(raw)?, "initial_state entry")?;
        let kind = ev
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_json("initial_state entry needs a type"))?
            .to_owned();
        let state_key = match ev.get("state_key") {
            None => String::new(),
            Some(Value::String(k)) => k.clone(),
            Some(_) => return Err(Error::bad_json("state_key must be a string")),
        };
        let content = ev.get("content").cloned().unwrap_or_else(|| json!({}));
        if !content.is_object() {
            return Err(Error::bad_json("initial_state content must be an object"));
        }
        initial_state.push((kind, state_key, content));
    }

    let power_levels_override = match &body.power_level_content_override {
        Some(raw) => Some(object(raw_json(raw)?, "power_level_content_override")?),
        None => None,
    };
    let creation_content = match &body.creation_content {
        Some(raw) => object(raw_json(raw)?, "creation_content")?,
        None => Map::new(),
    };

    crate::policy::access::check_create(&s, &user, &creation_content, &body.invite)?;
    {
        let mut d = Map::new();
        d.insert("invite".into(), json!(body.invite));
        d.insert("is_direct".into(), json!(body.is_direct));
        d.insert("preset".into(), json!(preset_name(&preset)));
        if let Some(g) = creation_content.get(crate::policy::groups::ROOM_GROUP_KEY) {
            d.insert("group".into(), g.clone());
        }
        crate::policy::access::check_hook(&s, &user, None, "create_room", d).await?;
    }

    let request = CreateRoom {
        version: body
            .room_version
            .clone()
            .unwrap_or_else(|| s.config.default_room_version.clone()),
        preset,
        publish,
        alias,
        name: body.name.clone(),
        topic: body.topic.clone(),
        invite: body.invite.clone(),
        is_direct: body.is_direct,
        initial_state,
        power_levels_override,
        creation_content,
    };
    let profile = member_profile(&s, &user)?;
    let remote_invites: Vec<_> = request
        .invite
        .iter()
        .filter(|u| u.server_name() != s.globals.server_name)
        .cloned()
        .collect();
    let is_direct = request.is_direct;
    let room_id = s.rooms.create_room(&user, &profile, request).await?;
    for target in remote_invites {
        // The room exists either way; an invitee whose server cannot be reached is left out,
        // as an invite through /invite would fail for them too.
        if let Err(e) = crate::service::federation::invite::invite_remote(
            &s, &room_id, &user, &target, None, is_direct,
        )
        .await
        {
            tracing::warn!(%room_id, %target, error = %e, "inviting a user of another server failed");
        }
    }
    Ok(Json(json!({ "room_id": room_id })))
}
