//! Room history and state for other servers: `GET /event/{eventId}`, `/state/{roomId}`,
//! `/state_ids/{roomId}`, `/event_auth/{roomId}/{eventId}`, `/backfill/{roomId}` and
//! `POST /get_missing_events/{roomId}`. Parameters are parsed here; who may see what is decided
//! in `service::rooms::federation_read`.

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    routing::{get, post},
    Json, Router,
};
use ruma::{EventId, OwnedEventId, RoomId};
use serde_json::Value;

use super::Signed;
use crate::{
    error::{ErrCode, Error, Result},
    service::{
        rooms::{federation_read, MissingEventsQuery},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_matrix/federation/v1/event/{event_id}", get(event))
        .route("/_matrix/federation/v1/state/{room_id}", get(state))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route(
            "/_matrix/federation/v1/event_auth/{room_id}/{event_id}",
            get(event_auth),
        )
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route(
            "/_matrix/federation/v1/get_missing_events/{room_id}",
            post(get_missing_events),
        )
        .route(
            "/_matrix/federation/v1/timestamp_to_event/{room_id}",
            get(timestamp_to_event),
        )
}

/// `GET /timestamp_to_event/{roomId}?ts=&dir=`: the closest event the asking server may see.
async fn timestamp_to_event(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    let room_id = room_id(&room)?;
    let ts = crate::api::client::query_param(&q, "ts")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing ts"))?
        .parse::<u64>()
        .map_err(|_| Error::invalid_param("ts must be a timestamp in milliseconds"))?;
    let forward = match crate::api::client::query_param(&q, "dir")?.as_deref() {
        Some("f") => true,
        Some("b") => false,
        Some(_) => return Err(Error::invalid_param("dir must be f or b")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing dir")),
    };
    let view = s.rooms.server_view(room_id, &signed.origin)?;
    let found = s
        .rooms
        .event_at_time_where(room_id, ts, forward, |_, pdu| {
            match s.rooms.event_meta(pdu.event_id.as_str())? {
                Some(meta) => view.can_see(&s.rooms, pdu, &meta),
                None => Ok(false),
            }
        })?;
    match found {
        Some((event_id, at)) => Ok(Json(
            serde_json::json!({ "event_id": event_id, "origin_server_ts": at }),
        )),
        None => Err(Error::not_found("No event found")),
    }
}

fn room_id(s: &str) -> Result<&RoomId> {
    <&RoomId>::try_from(s).map_err(|_| Error::invalid_param("Invalid room id"))
}

fn event_id(s: &str) -> Result<&EventId> {
    <&EventId>::try_from(s).map_err(|_| Error::invalid_param("Invalid event id"))
}

fn missing(name: &str) -> Error {
    Error::new(
        ErrCode::MissingParam,
        format!("Missing query parameter `{name}`"),
    )
}

/// The query's parameters in order, repeated ones kept (`v=a&v=b`).
fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .take(1000)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The one `event_id` query parameter of `/state` and `/state_ids`.
fn state_event_id(raw: Option<&str>) -> Result<OwnedEventId> {
    let pairs = query_pairs(raw);
    let value = pairs
        .iter()
        .find(|(k, _)| k == "event_id")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| missing("event_id"))?;
    Ok(event_id(value)?.to_owned())
}

async fn event(
    State(s): State<Arc<Services>>,
    Path(id): Path<String>,
    signed: Signed,
) -> Result<Json<Value>> {
    let id = event_id(&id)?;
    Ok(Json(s.rooms.federation_event(&signed.origin, id)?))
}

async fn state(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    let room = room_id(&room)?;
    let at = state_event_id(q.as_deref())?;
    Ok(Json(s.rooms.federation_state(&signed.origin, room, &at)?))
}

async fn state_ids(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    let room = room_id(&room)?;
    let at = state_event_id(q.as_deref())?;
    Ok(Json(s.rooms.federation_state_ids(
        &signed.origin,
        room,
        &at,
    )?))
}

async fn event_auth(
    State(s): State<Arc<Services>>,
    Path((room, id)): Path<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>> {
    let room = room_id(&room)?;
    let id = event_id(&id)?;
    Ok(Json(s.rooms.federation_event_auth(
        &signed.origin,
        room,
        id,
    )?))
}

async fn backfill(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<Json<Value>> {
    let room = room_id(&room)?;
    let pairs = query_pairs(q.as_deref());
    let mut from = Vec::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == "v") {
        if from.len() >= federation_read::MAX_REQUEST_EVENTS {
            return Err(Error::invalid_param("Too many `v` event ids"));
        }
        from.push(event_id(v)?.to_owned());
    }
    if from.is_empty() {
        return Err(missing("v"));
    }
    let limit = pairs
        .iter()
        .find(|(k, _)| k == "limit")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| missing("limit"))?;
    let limit: usize = limit
        .parse()
        .map_err(|_| Error::invalid_param("`limit` must be a non-negative integer"))?;
    Ok(Json(s.rooms.federation_backfill(
        &signed.origin,
        room,
        &from,
        limit,
    )?))
}

/// A list of event ids from the body; `None` when absent.
fn id_list(body: &Value, key: &str) -> Result<Option<Vec<OwnedEventId>>> {
    let Some(v) = body.get(key) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| Error::bad_json(format!("`{key}` must be a list of event ids")))?;
    if list.len() > federation_read::MAX_REQUEST_EVENTS {
        return Err(Error::bad_json(format!("Too many event ids in `{key}`")));
    }
    list.iter()
        .map(|id| {
            id.as_str()
                .and_then(|s| EventId::parse(s).ok())
                .ok_or_else(|| Error::bad_json(format!("`{key}` must be a list of event ids")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A non-negative integer from the body, or `default` when absent.
fn count_field(body: &Value, key: &str, default: u64) -> Result<u64> {
    match body.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| Error::bad_json(format!("`{key}` must be a non-negative integer"))),
    }
}

async fn get_missing_events(
    State(s): State<Arc<Services>>,
    Path(room): Path<String>,
    signed: Signed,
) -> Result<Json<Value>> {
    let room = room_id(&room)?;
    let body = signed
        .body
        .as_ref()
        .filter(|b| b.is_object())
        .ok_or_else(|| Error::bad_json("The body must be a JSON object"))?;
    let earliest = id_list(body, "earliest_events")?
        .ok_or_else(|| Error::bad_json("`earliest_events` is required"))?;
    let latest = id_list(body, "latest_events")?
        .ok_or_else(|| Error::bad_json("`latest_events` is required"))?;
    let limit = count_field(
        body,
        "limit",
        federation_read::DEFAULT_MISSING_EVENTS as u64,
    )?;
    let query = MissingEventsQuery {
        earliest,
        latest,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        min_depth: count_field(body, "min_depth", 0)?,
    };
    Ok(Json(s.rooms.federation_missing_events(
        &signed.origin,
        room,
        &query,
    )?))
}
