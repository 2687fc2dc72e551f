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
    who.ensure_not_suspended()?;
    s.rooms
        .create_alias(&req.room_alias, &req.room_id, &who.user_id)
        .await?;
    Ok(create_alias::v3::Response::new().into())
}

async fn resolve(
    State(s): State<Arc<Services>>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<RumaResponse<get_alias::v3::Response>> {
    // Only local aliases resolve until federation queries exist.
    let room_id = s
        .rooms
        .resolve_alias(&req.room_alias)?
        .ok_or_else(|| Error::not_found(format!("Room alias {} not found", req.room_alias)))?;
    Ok(get_alias::v3::Response::new(room_id, vec![s.globals.server_name.clone()]).into())
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
