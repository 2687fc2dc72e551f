//! Membership: join, knock, invite, leave, forget, kick, ban, unban, joined rooms, members.

use std::sync::Arc;

use axum::{extract::State, Json, Router};
use ruma::{
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, get_member_events, invite_user, join_room_by_id,
            join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room,
            unban_user,
        },
    },
    OwnedRoomId, RoomOrAliasId,
};
use serde_json::{json, Map, Value};

use super::room_create::member_profile;
use crate::{
    api::ruma_wrapper::{ruma_route, Ruma},
    error::{Error, Result},
    service::{federation, rooms::Moderation, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<join_room_by_id::v3::Request, _, _>(r, join_by_id);
    let r = ruma_route::<join_room_by_id_or_alias::v3::Request, _, _>(r, join_by_id_or_alias);
    let r = ruma_route::<knock_room::v3::Request, _, _>(r, knock);
    let r = ruma_route::<invite_user::v3::Request, _, _>(r, invite);
    let r = ruma_route::<leave_room::v3::Request, _, _>(r, leave);
    let r = ruma_route::<forget_room::v3::Request, _, _>(r, forget);
    let r = ruma_route::<kick_user::v3::Request, _, _>(r, kick);
    let r = ruma_route::<ban_user::v3::Request, _, _>(r, ban);
    let r = ruma_route::<unban_user::v3::Request, _, _>(r, unban);
    let r = ruma_route::<joined_rooms::v3::Request, _, _>(r, joined);
    let r = ruma_route::<get_member_events::v3::Request, _, _>(r, members);
    ruma_route::<joined_members::v3::Request, _, _>(r, joined_members_handler)
}

/// A room id, or the room an alias on this server points to.
pub(super) fn resolve(s: &Services, target: &RoomOrAliasId) -> Result<OwnedRoomId> {
    match <&ruma::RoomId>::try_from(target) {
        Ok(id) => Ok(id.to_owned()),
        Err(alias) => s
            .rooms
            .resolve_alias(alias)?
            .ok_or_else(|| Error::not_found("Room alias not found")),
    }
}

/// A room id or alias, resolved through the alias's server when it is another server's, with
/// the servers to join through (the client's hints, then those the alias lookup named).
async fn resolve_with_servers(
    s: &Services,
    target: &RoomOrAliasId,
    hints: &[ruma::OwnedServerName],
) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
    let mut servers = hints.to_vec();
    let room_id = match <&ruma::RoomAliasId>::try_from(target) {
        Ok(alias) if alias.server_name() != s.globals.server_name => {
            let (room_id, more) = federation::join::resolve_remote_alias(s, alias).await?;
            servers.extend(more);
            servers.push(alias.server_name().to_owned());
            room_id
        }
        Ok(alias) => crate::service::appservice::query::resolve_local_alias(s, alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"))?,
        _ => resolve(s, target)?,
    };
    Ok((room_id, servers))
}

async fn join_by_id(
    State(s): State<Arc<Services>>,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    let profile = member_profile(&s, user)?;
    federation::join::join(&s, &req.room_id, user, &[], &profile, req.reason.as_deref()).await?;
    Ok(Json(json!({ "room_id": req.room_id })))
}

async fn join_by_id_or_alias(
    State(s): State<Arc<Services>>,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    let (room_id, servers) = resolve_with_servers(&s, &req.room_id_or_alias, &req.via).await?;
    let profile = member_profile(&s, user)?;
    federation::join::join(
        &s,
        &room_id,
        user,
        &servers,
        &profile,
        req.reason.as_deref(),
    )
    .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn knock(
    State(s): State<Arc<Services>>,
    req: Ruma<knock_room::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    let (room_id, servers) = resolve_with_servers(&s, &req.room_id_or_alias, &req.via).await?;
    let profile = member_profile(&s, user)?;
    federation::join::knock(
        &s,
        &room_id,
        user,
        &servers,
        &profile,
        req.reason.as_deref(),
    )
    .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn invite(
    State(s): State<Arc<Services>>,
    req: Ruma<invite_user::v3::Request>,
) -> Result<Json<Value>> {
    use invite_user::v3::InvitationRecipient;
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    let InvitationRecipient::UserId(target) = &req.recipient else {
        return Err(Error::forbidden("Third-party invites are not supported"));
    };
    // A bridge's ghost user may not exist yet: its appservice is asked to create it.
    crate::service::appservice::query::local_user_exists(&s, &target.user_id).await?;
    crate::policy::access::check_invite(&s, &req.room_id, user, &target.user_id)?;
    crate::policy::access::check_hook(
        &s,
        user,
        Some(&req.room_id),
        "invite",
        [("target".to_owned(), json!(target.user_id))]
            .into_iter()
            .collect(),
    )
    .await?;
    if target.user_id.server_name() != s.globals.server_name {
        federation::invite::invite_remote(
            &s,
            &req.room_id,
            user,
            &target.user_id,
            target.reason.as_deref(),
            false,
        )
        .await?;
        return Ok(Json(json!({})));
    }
    s.rooms
        .invite_user(
            &req.room_id,
            user,
            &target.user_id,
            target.reason.as_deref(),
            false,
            None,
        )
        .await?;
    Ok(Json(json!({})))
}

async fn leave(
    State(s): State<Arc<Services>>,
    req: Ruma<leave_room::v3::Request>,
) -> Result<Json<Value>> {
    let user = &req.user()?.user_id;
    federation::join::leave(&s, &req.room_id, user, req.reason.as_deref()).await?;
    Ok(Json(json!({})))
}

async fn forget(
    State(s): State<Arc<Services>>,
    req: Ruma<forget_room::v3::Request>,
) -> Result<Json<Value>> {
    s.rooms.forget_room(&req.room_id, &req.user()?.user_id)?;
    Ok(Json(json!({})))
}

async fn kick(
    State(s): State<Arc<Services>>,
    req: Ruma<kick_user::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    s.rooms
        .moderate(
            &req.room_id,
            user,
            &req.user_id,
            Moderation::Kick,
            req.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn ban(
    State(s): State<Arc<Services>>,
    req: Ruma<ban_user::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    s.rooms
        .moderate(
            &req.room_id,
            user,
            &req.user_id,
            Moderation::Ban,
            req.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn unban(
    State(s): State<Arc<Services>>,
    req: Ruma<unban_user::v3::Request>,
) -> Result<Json<Value>> {
    req.user()?.ensure_may_act()?;
    let user = &req.user()?.user_id;
    s.rooms
        .moderate(
            &req.room_id,
            user,
            &req.user_id,
            Moderation::Unban,
            req.reason.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn joined(
    State(s): State<Arc<Services>>,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<Json<Value>> {
    let rooms = s.rooms.joined_rooms(&req.user()?.user_id)?;
    Ok(Json(json!({ "joined_rooms": rooms })))
}

/// A stream position from a sync or pagination token: its first run of digits.
fn token_position(token: &str) -> Result<u64> {
    let digits: String = token
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .map_err(|_| Error::invalid_param("Invalid `at` token"))
}

async fn members(
    State(s): State<Arc<Services>>,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<Json<Value>> {
    let user = &req.user()?.user_id;
    let at = req.at.as_deref().map(token_position).transpose()?;
    let state = s
        .rooms
        .visible_state_of_type(&req.room_id, user, at, "m.room.member")?;
    let known =
        |m: Option<&ruma::events::room::member::MembershipState>| -> Result<Option<String>> {
            match m.map(|m| m.as_str()) {
                None => Ok(None),
                Some(m @ ("join" | "invite" | "leave" | "ban" | "knock")) => Ok(Some(m.to_owned())),
                Some(_) => Err(Error::invalid_param("Unknown membership")),
            }
        };
    let want = known(req.membership.as_ref())?;
    let skip = known(req.not_membership.as_ref())?;
    let chunk: Vec<Value> = state
        .iter()
        .filter(|p| {
            let m = p.membership().unwrap_or_default();
            want.as_ref().is_none_or(|w| *w == m) && skip.as_ref().is_none_or(|n| *n != m)
        })
        .map(|p| p.to_client_value(None))
        .collect();
    Ok(Json(json!({ "chunk": chunk })))
}

async fn joined_members_handler(
    State(s): State<Arc<Services>>,
    req: Ruma<joined_members::v3::Request>,
) -> Result<Json<Value>> {
    let user = &req.user()?.user_id;
    let mut joined = Map::new();
    for (member, profile) in s.rooms.joined_member_profiles(&req.room_id, user)? {
        let mut entry = Map::new();
        if let Some(d) = profile.displayname {
            entry.insert("display_name".into(), Value::String(d));
        }
        if let Some(a) = profile.avatar_url {
            entry.insert("avatar_url".into(), Value::String(a));
        }
        joined.insert(member.to_string(), Value::Object(entry));
    }
    Ok(Json(json!({ "joined": joined })))
}
