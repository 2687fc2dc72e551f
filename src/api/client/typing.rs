//! Typing notifications: `PUT /rooms/{roomId}/typing/{userId}`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::put,
    Json, Router,
};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/client/v3/rooms/{room_id}/typing/{user_id}",
        put(set_typing),
    )
    .route(
        "/_matrix/client/r0/rooms/{room_id}/typing/{user_id}",
        put(set_typing),
    )
}

async fn set_typing(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((room_id, user_id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?.to_owned();
    super::own_user(
        &who,
        &user_id,
        "Cannot set the typing state of another user",
    )?;
    let typing = match body.get("typing") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::bad_json("'typing' must be a boolean")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing 'typing'")),
    };
    let timeout = if typing {
        match body.get("timeout") {
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| Error::bad_json("'timeout' must be a non-negative integer"))?,
            ),
            None => return Err(Error::new(ErrCode::MissingParam, "Missing 'timeout'")),
        }
    } else {
        None
    };
    if !s.rooms.is_joined(&room_id, &who.user_id)? {
        return Err(Error::forbidden("You are not joined to this room"));
    }
    let members = s.rooms.joined_members(&room_id)?.iter().cloned().collect();
    s.typing.set(&room_id, &who.user_id, timeout, members)?;
    if let Err(e) = crate::service::appservice::ephemeral::typing(&s, &room_id) {
        tracing::warn!("queueing typing for appservices: {e}");
    }
    if let Err(e) = crate::service::federation::edu::send_typing(&s, &room_id, &who.user_id, typing)
    {
        tracing::warn!("queueing a typing notification: {e}");
    }
    Ok(Json(json!({})))
}
