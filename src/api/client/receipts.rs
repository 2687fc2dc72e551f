//! Receipts and read markers: `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}` and
//! `POST /rooms/{roomId}/read_markers`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    routing::post,
    Json, Router,
};
use ruma::{EventId, OwnedEventId};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{receipts::send_receipt, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/client/v3/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
        post(receipt),
    )
    .route(
        "/_matrix/client/r0/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
        post(receipt),
    )
    .route(
        "/_matrix/client/v3/rooms/{room_id}/read_markers",
        post(read_markers),
    )
    .route(
        "/_matrix/client/r0/rooms/{room_id}/read_markers",
        post(read_markers),
    )
}

async fn receipt(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?.to_owned();
    let event_id =
        EventId::parse(&event_id).map_err(|_| Error::invalid_param("Invalid event id"))?;
    let thread = match body.get("thread_id") {
        None => None,
        Some(Value::String(t)) if !t.is_empty() => Some(t.as_str()),
        Some(_) => {
            return Err(Error::invalid_param(
                "thread_id field must be a non-empty string",
            ))
        }
    };
    send_receipt(&s, &who.user_id, &room_id, &receipt_type, &event_id, thread)?;
    Ok(Json(json!({})))
}

async fn read_markers(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?.to_owned();
    // Validate every field before storing any, so a bad request changes nothing.
    let mut markers: Vec<(&str, OwnedEventId)> = Vec::new();
    for kind in ["m.fully_read", "m.read", "m.read.private"] {
        match body.get(kind) {
            None | Some(Value::Null) => {}
            Some(Value::String(id)) => {
                let id = EventId::parse(id)
                    .map_err(|_| Error::invalid_param(format!("'{kind}' is not an event id")))?;
                markers.push((kind, id));
            }
            Some(_) => {
                return Err(Error::bad_json(format!(
                    "'{kind}' must be an event id string"
                )))
            }
        }
    }
    if !s.rooms.is_joined(&room_id, &who.user_id)? {
        return Err(Error::forbidden("You are not joined to this room"));
    }
    for (_, id) in &markers {
        if s.rooms
            .event_meta(id.as_str())?
            .filter(|m| m.room_id == room_id)
            .is_none()
        {
            return Err(Error::not_found("Unknown event in this room"));
        }
    }
    for (kind, id) in &markers {
        send_receipt(&s, &who.user_id, &room_id, kind, id, None)?;
    }
    Ok(Json(json!({})))
}
