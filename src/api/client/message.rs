//! Sending message events, redacting, and reading one event.

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    Json, Router,
};
use ruma::{
    api::client::{message::send_message_event, redact::redact_event, room::get_room_event},
    EventId,
};
use serde_json::{json, Value};

use super::room_id;
use crate::{
    api::ruma_wrapper::{ruma_route, Authed, JsonBody},
    error::{Error, Result},
    service::{accounts::Identity, ratelimit::Action, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<send_message_event::v3::Request, _, _>(r, send);
    let r = ruma_route::<redact_event::v3::Request, _, _>(r, redact);
    ruma_route::<get_room_event::v3::Request, _, _>(r, get_event)
        .route(
            "/_matrix/client/v3/events/{event_id}",
            axum::routing::get(get_event_any_room),
        )
        .route(
            "/_matrix/client/r0/events/{event_id}",
            axum::routing::get(get_event_any_room),
        )
}

/// `GET /events/{eventId}` (deprecated): one event by id alone, if the caller may see it.
async fn get_event_any_room(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path(event): Path<String>,
) -> Result<Json<Value>> {
    let meta = s
        .rooms
        .event_meta(&event)?
        .ok_or_else(|| crate::error::Error::not_found("Event not found"))?;
    let (pdu, _) = s.rooms.visible_event(&meta.room_id, &me.user_id, &event)?;
    Ok(Json(s.rooms.client_event_for(
        &pdu,
        &me.user_id,
        me.device_id.as_str(),
    )?))
}

/// A retry of a request that already went through is answered with its event, without using
/// up the rate limit, once that event is durable (`Rooms::answer_retry`: the first request may
/// still be waiting for its fsync); anything else counts against the sender's message limit.
async fn replay_or_limit(s: &Services, me: &Identity, txn: &str) -> Result<Option<Json<Value>>> {
    if let Some(id) = s.rooms.transaction_event(&me.user_id, &me.device_id, txn)? {
        let id = s.rooms.answer_retry(id).await?;
        return Ok(Some(Json(json!({ "event_id": id }))));
    }
    if me.rate_limited() {
        s.ratelimit.check(Action::Message, me.user_id.as_str())?;
    }
    Ok(None)
}

/// Timestamp massaging: an appservice may set the event's `origin_server_ts` with `?ts=` (ms),
/// e.g. to keep the time a bridged message was sent on the other network. Ignored for anyone
/// else, as Synapse does.
pub(super) fn appservice_ts(me: &Identity, q: &Option<String>) -> Result<Option<u64>> {
    if me.appservice.is_none() {
        return Ok(None);
    }
    super::account::query_param(q, "ts")?
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| Error::invalid_param("ts must be a time in milliseconds"))
        })
        .transpose()
}

async fn send(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, kind, txn)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    JsonBody(content): JsonBody,
) -> Result<Json<Value>> {
    let ts = appservice_ts(&me, &q)?;
    let room_id = room_id(&room)?;
    me.ensure_may_act()?;
    if let Some(done) = replay_or_limit(&s, &me, &txn).await? {
        return Ok(done);
    }
    crate::policy::access::check_hook(
        &s,
        &me.user_id,
        Some(room_id),
        "send",
        [("event_type".to_owned(), json!(kind))]
            .into_iter()
            .collect(),
    )
    .await?;
    let event_id = s
        .rooms
        .send_message(
            room_id,
            &me.user_id,
            &me.device_id,
            &kind,
            Value::Object(content),
            &txn,
            ts,
        )
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

async fn redact(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, event, txn)): Path<(String, String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = room_id(&room)?;
    let target = <&EventId>::try_from(event.as_str())
        .map_err(|_| Error::invalid_param("Invalid event id"))?;
    let reason = match body.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r.as_str()),
        Some(_) => return Err(Error::bad_json("reason must be a string")),
    };
    // A suspended account may still redact its own events.
    if me.suspended
        && s.rooms
            .pdu(target.as_str())?
            .is_none_or(|p| p.sender != me.user_id)
    {
        me.ensure_may_act()?;
    }
    if let Some(done) = replay_or_limit(&s, &me, &txn).await? {
        return Ok(done);
    }
    let event_id = s
        .rooms
        .redact_event(room_id, &me.user_id, &me.device_id, target, reason, &txn)
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

async fn get_event(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, event)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let (pdu, _) = s
        .rooms
        .visible_event(room_id(&room)?, &me.user_id, &event)?;
    Ok(Json(s.rooms.client_event_for(
        &pdu,
        &me.user_id,
        me.device_id.as_str(),
    )?))
}
