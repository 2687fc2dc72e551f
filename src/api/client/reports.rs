//! Reporting rooms, events and users (`/rooms/{roomId}/report[/{eventId}]`,
//! `/users/{userId}/report`) and OpenID tokens (`/user/{userId}/openid/request_token`).

use std::sync::Arc;

use axum::{extract::State, routing::post, Json, Router};
use ruma::EventId;
use serde_json::{json, Value};

use super::account::{both, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{
        reports::{reason_and_score, Target},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/rooms/{room_id}/report", post(report_room));
    let r = both(r, "/rooms/{room_id}/report/{event_id}", post(report_event));
    let r = both(r, "/users/{user_id}/report", post(report_user));
    both(
        r,
        "/user/{user_id}/openid/request_token",
        post(openid_token),
    )
}

async fn report_room(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(p.get(0)?)?;
    let (reason, _) = reason_and_score(&body)?;
    if !s.rooms.exists(room_id)? {
        return Err(Error::not_found("The room was not found"));
    }
    s.reports
        .file(&who.user_id, Target::Room(room_id), reason, None)?;
    Ok(Json(json!({})))
}

async fn report_event(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(p.get(0)?)?;
    let event_id =
        <&EventId>::try_from(p.get(1)?).map_err(|_| Error::invalid_param("Invalid event id"))?;
    let (reason, score) = reason_and_score(&body)?;
    // One answer for "no such event" and "not joined", so a report reveals nothing.
    let not_found =
        || Error::not_found("The event was not found or you are not joined to the room");
    if !s.rooms.is_joined(room_id, &who.user_id)? {
        return Err(not_found());
    }
    let in_room = s
        .rooms
        .event_meta(event_id.as_str())?
        .is_some_and(|m| m.room_id == room_id);
    if !in_room {
        return Err(not_found());
    }
    s.reports.file(
        &who.user_id,
        Target::Event(room_id, event_id),
        reason,
        score,
    )?;
    Ok(Json(json!({})))
}

async fn report_user(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = super::user_id(p.get(0)?)?;
    let (reason, _) = reason_and_score(&body)?;
    // Users of other servers cannot be looked up here; their reports are kept all the same.
    let local = *user.server_name() == *s.globals.server_name;
    if local && !s.accounts.exists(&user)? {
        return Err(Error::not_found("The user was not found"));
    }
    s.reports
        .file(&who.user_id, Target::User(&user), reason, None)?;
    Ok(Json(json!({})))
}

async fn openid_token(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(_): JsonBody,
) -> Result<Json<Value>> {
    super::own_user(
        &who,
        p.get(0)?,
        "Cannot request an OpenID token for another user",
    )?;
    let (token, expires_in) = s.reports.openid_token(&who.user_id)?;
    Ok(Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "matrix_server_name": s.globals.server_name,
        "expires_in": expires_in,
    })))
}
