//! Membership handshakes of other servers' users with rooms this server is in: `make_join` /
//! `send_join`, `make_leave` / `send_leave`, `make_knock` / `send_knock`, `invite`; and the
//! third-party invite exchange, which Hafen does not support (a clear 403).

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    routing::{get, put},
    Json, Router,
};
use ruma::{RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::Signed;
use crate::{
    error::{Error, Result},
    service::{
        federation::resident::{self, Handshake},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/make_join/{room_id}/{user_id}",
        get(make_join),
    )
    .route(
        "/_matrix/federation/v1/make_leave/{room_id}/{user_id}",
        get(make_leave),
    )
    .route(
        "/_matrix/federation/v1/make_knock/{room_id}/{user_id}",
        get(make_knock),
    )
    .route(
        "/_matrix/federation/v1/send_join/{room_id}/{event_id}",
        put(send_join_v1),
    )
    .route(
        "/_matrix/federation/v2/send_join/{room_id}/{event_id}",
        put(send_join_v2),
    )
    .route(
        "/_matrix/federation/v1/send_leave/{room_id}/{event_id}",
        put(send_leave_v1),
    )
    .route(
        "/_matrix/federation/v2/send_leave/{room_id}/{event_id}",
        put(send_leave_v2),
    )
    .route(
        "/_matrix/federation/v1/send_knock/{room_id}/{event_id}",
        put(send_knock),
    )
    .route(
        "/_matrix/federation/v1/invite/{room_id}/{event_id}",
        put(invite_v1),
    )
    .route(
        "/_matrix/federation/v2/invite/{room_id}/{event_id}",
        put(invite_v2),
    )
    .route(
        "/_matrix/federation/v1/exchange_third_party_invite/{room_id}",
        put(third_party_unsupported),
    )
    .route(
        "/_matrix/federation/v1/3pid/onbind",
        put(third_party_unsupported),
    )
}

fn room(id: &str) -> Result<&RoomId> {
    <&RoomId>::try_from(id).map_err(|_| Error::invalid_param("Invalid room id"))
}

fn user(id: &str) -> Result<&UserId> {
    <&UserId>::try_from(id).map_err(|_| Error::invalid_param("Invalid user id"))
}

/// Every `ver` query parameter.
fn versions(q: &Option<String>) -> Vec<String> {
    let Some(q) = q else { return Vec::new() };
    url::form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k == "ver")
        .map(|(_, v)| v.into_owned())
        .take(64)
        .collect()
}

fn body(signed: &Signed) -> Result<&Value> {
    signed
        .body
        .as_ref()
        .filter(|b| b.is_object())
        .ok_or_else(|| Error::bad_json("The body must be a JSON object"))
}

async fn make(
    s: &Services,
    signed: &Signed,
    room_id: &str,
    user_id: &str,
    q: &Option<String>,
    kind: Handshake,
) -> Result<Json<Value>> {
    let answer = resident::make_template(
        s,
        &signed.origin,
        room(room_id)?,
        user(user_id)?,
        kind,
        &versions(q),
    )
    .await?;
    Ok(Json(answer))
}

async fn make_join(
    State(s): State<Arc<Services>>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    make(&s, &signed, &room_id, &user_id, &q, Handshake::Join).await
}

async fn make_leave(
    State(s): State<Arc<Services>>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    make(&s, &signed, &room_id, &user_id, &q, Handshake::Leave).await
}

async fn make_knock(
    State(s): State<Arc<Services>>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    make(&s, &signed, &room_id, &user_id, &q, Handshake::Knock).await
}

async fn send_join_answer(
    s: &Services,
    signed: &Signed,
    room_id: &str,
    event_id: &str,
) -> Result<Value> {
    let join = resident::accept_membership(
        s,
        &signed.origin,
        room(room_id)?,
        event_id,
        body(signed)?,
        Handshake::Join,
    )
    .await?;
    resident::join_answer(s, &join)
}

async fn send_join_v1(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    let answer = send_join_answer(&s, &signed, &room_id, &event_id).await?;
    Ok(Json(json!([200, answer])))
}

async fn send_join_v2(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    Ok(Json(
        send_join_answer(&s, &signed, &room_id, &event_id).await?,
    ))
}

async fn send_leave(s: &Services, signed: &Signed, room_id: &str, event_id: &str) -> Result<()> {
    resident::accept_membership(
        s,
        &signed.origin,
        room(room_id)?,
        event_id,
        body(signed)?,
        Handshake::Leave,
    )
    .await?;
    Ok(())
}

async fn send_leave_v1(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    send_leave(&s, &signed, &room_id, &event_id).await?;
    Ok(Json(json!([200, {}])))
}

async fn send_leave_v2(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    send_leave(&s, &signed, &room_id, &event_id).await?;
    Ok(Json(json!({})))
}

async fn send_knock(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    let room_id = room(&room_id)?;
    resident::accept_membership(
        &s,
        &signed.origin,
        room_id,
        &event_id,
        body(&signed)?,
        Handshake::Knock,
    )
    .await?;
    // Full PDUs, create event included (Matrix 1.16); the knocking server strips them.
    let state = resident::public_state_pdus(&s, room_id)?;
    Ok(Json(json!({ "knock_room_state": state })))
}

async fn invite_v1(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    let event = body(&signed)?;
    let room_id = room(&room_id)?;
    // v1 carries no room version: the room's, if known here, else version 1.
    let version = s
        .rooms
        .meta(room_id)?
        .map(|m| m.version)
        .unwrap_or(RoomVersionId::V1);
    let state = event
        .get("unsigned")
        .and_then(|u| u.get("invite_room_state"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let signed_event = resident::receive_invite(
        &s,
        &signed.origin,
        room_id,
        &event_id,
        &version,
        event,
        state,
    )
    .await?;
    Ok(Json(json!([200, { "event": signed_event }])))
}

async fn invite_v2(
    State(s): State<Arc<Services>>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    let b = body(&signed)?;
    let version = b
        .get("room_version")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_json("room_version is missing"))
        .and_then(|v| {
            RoomVersionId::try_from(v).map_err(|_| Error::bad_json("Invalid room_version"))
        })?;
    let event = b
        .get("event")
        .filter(|e| e.is_object())
        .ok_or_else(|| Error::bad_json("event is missing"))?;
    let state = b
        .get("invite_room_state")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let signed_event = resident::receive_invite(
        &s,
        &signed.origin,
        room(&room_id)?,
        &event_id,
        &version,
        event,
        state,
    )
    .await?;
    Ok(Json(json!({ "event": signed_event })))
}

/// Third-party (email/phone) invites need an identity server; Hafen does not take part in them.
async fn third_party_unsupported(_signed: Signed) -> Result<Json<Value>> {
    Err(Error::forbidden(
        "Third-party invites are not supported by this server",
    ))
}
