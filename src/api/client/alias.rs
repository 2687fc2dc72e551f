//! Room aliases: `/directory/room/{roomAlias}` and `/rooms/{roomId}/aliases`.

use std::sync::Arc;

use axum::{extract::State, Router};
use ruma::api::client::{
    alias::{create_alias, delete_alias, get_alias},
    room::aliases,
};

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<create_alias::v3::Request, _, _>(r, create);
    let r = ruma_route::<get_alias::v3::Request, _, _>(r, resolve);
    let r = ruma_route::<delete_alias::v3::Request, _, _>(r, delete);
    ruma_route::<aliases::v3::Request, _, _>(r, room_aliases)
}

async fn create(
    State(s): State<Arc<Services>>,
    req: Ruma<create_alias::v3::Request>,
) -> Result<RumaResponse<create_alias::v3::Response>> {
    let who = req.user()?;
    who.ensure_may_act()?;
    s.rooms
        .create_alias(&req.room_alias, &req.room_id, &who.user_id)
        .await?;
    Ok(create_alias::v3::Response::new().into())
}

async fn resolve(
    State(s): State<Arc<Services>>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<RumaResponse<get_alias::v3::Response>> {
    let not_found = || Error::not_found(format!("Room alias {} not found", req.room_alias));
    if req.room_alias.server_name() != s.globals.server_name {
        // Found by the interop tests with Synapse: aliases of other servers were never asked
        // about and so were always "not found" here. They are the alias's server's to answer.
        return remote_alias(&s, &req.room_alias)
            .await?
            .map(|(room_id, servers)| get_alias::v3::Response::new(room_id, servers).into())
            .ok_or_else(not_found);
    }
    let room_id = crate::service::appservice::query::resolve_local_alias(&s, &req.room_alias)
        .await?
        .ok_or_else(not_found)?;
    Ok(get_alias::v3::Response::new(room_id, vec![s.globals.server_name.clone()]).into())
}

/// The room an alias of another server names and the servers to join it through, asked of the
/// alias's server (`/query/directory`). As for remote profiles, any error of that server (it
/// does not know the alias, or cannot be reached or asked) is "not found": the client can do
/// no more about it. An answer without a valid room id is one too; servers in it that are not
/// valid names are left out, and the alias's server is always among them.
async fn remote_alias(
    s: &Services,
    alias: &ruma::RoomAliasId,
) -> Result<Option<(ruma::OwnedRoomId, Vec<ruma::OwnedServerName>)>> {
    let path = format!(
        "/_matrix/federation/v1/query/directory?room_alias={}",
        super::profile::utf8_percent(alias.as_str())
    );
    let Ok(answer) = s
        .federation
        .send(http::Method::GET, alias.server_name(), &path, None)
        .await
    else {
        return Ok(None);
    };
    let Some(room_id) = answer
        .get("room_id")
        .and_then(serde_json::Value::as_str)
        .and_then(|r| ruma::OwnedRoomId::try_from(r).ok())
    else {
        return Ok(None);
    };
    let mut servers: Vec<ruma::OwnedServerName> = answer
        .get("servers")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .filter_map(|n| ruma::OwnedServerName::try_from(n).ok())
        .take(100)
        .collect();
    if !servers.iter().any(|n| n == alias.server_name()) {
        servers.push(alias.server_name().to_owned());
    }
    Ok(Some((room_id, servers)))
}

async fn delete(
    State(s): State<Arc<Services>>,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<RumaResponse<delete_alias::v3::Response>> {
    let who = req.user()?;
    s.rooms
        .delete_alias(&req.room_alias, &who.user_id, who.admin)
        .await?;
    Ok(delete_alias::v3::Response::new().into())
}

async fn room_aliases(
    State(s): State<Arc<Services>>,
    req: Ruma<aliases::v3::Request>,
) -> Result<RumaResponse<aliases::v3::Response>> {
    let who = req.user()?;
    let readable = s.rooms.exists(&req.room_id)?
        && (s.rooms.is_joined(&req.room_id, &who.user_id)?
            || s.rooms.history_visibility(&req.room_id)? == "world_readable");
    if !readable {
        return Err(Error::forbidden("You are not in this room"));
    }
    Ok(aliases::v3::Response::new(s.rooms.local_aliases(&req.room_id)?).into())
}
