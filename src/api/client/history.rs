//! Room history: `/rooms/{roomId}/messages`, `/rooms/{roomId}/context/{eventId}` and
//! `/rooms/{roomId}/timestamp_to_event`.
//!
//! Plain axum handlers (not ruma's request types) so that a missing `dir` is `M_MISSING_PARAM`
//! and a malformed filter or token is `M_INVALID_PARAM`, as the spec and clients expect.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, RawQuery, State},
    routing::get,
    Json, Router,
};
use ruma::{api::client::filter::RoomEventFilter, EventId};
use serde_json::{json, Value};

use super::account::query_param;
use crate::{
    api::ruma_wrapper::Authed,
    error::{ErrCode, Error, Result},
    service::{
        accounts::Identity,
        federation::backfill,
        rooms::{history::MAX_PAGE, Pdu},
        Services,
    },
};

/// Events asked for at least when backfilling for `/messages`.
const BACKFILL_PAGE: usize = 50;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let mut r = r;
    for v in ["r0", "v3"] {
        r = r
            .route(
                &format!("/_matrix/client/{v}/rooms/{{room_id}}/messages"),
                get(messages),
            )
            .route(
                &format!("/_matrix/client/{v}/rooms/{{room_id}}/context/{{event_id}}"),
                get(context),
            );
    }
    r.route(
        "/_matrix/client/v1/rooms/{room_id}/timestamp_to_event",
        get(timestamp_to_event),
    )
}

/// The `limit` query parameter: a non-negative integer, `default` when absent.
fn limit_param(q: &HashMap<String, String>, default: usize) -> Result<usize> {
    match q.get("limit") {
        None => Ok(default),
        Some(l) => l
            .parse::<u64>()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .map_err(|_| Error::invalid_param("limit must be a non-negative integer")),
    }
}

/// The `filter` query parameter: a JSON `RoomEventFilter`.
fn filter_param(q: &HashMap<String, String>) -> Result<RoomEventFilter> {
    match q.get("filter") {
        None => Ok(RoomEventFilter::default()),
        Some(f) if f.trim().is_empty() => Ok(RoomEventFilter::default()),
        Some(f) => serde_json::from_str(f)
            .map_err(|e| Error::invalid_param(format!("Invalid filter: {e}"))),
    }
}

fn client_events(s: &Services, who: &Identity, pdus: &[Pdu]) -> Result<Vec<Value>> {
    pdus.iter()
        .map(|p| {
            s.rooms
                .client_event_for(p, &who.user_id, who.device_id.as_str())
        })
        .collect()
}

async fn messages(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(room_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?;
    let backward = match q.get("dir").map(String::as_str) {
        Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(Error::invalid_param("dir must be `b` or `f`")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing parameter: dir")),
    };
    let limit = limit_param(&q, 10)?;
    let filter = filter_param(&q)?;
    let read = || {
        s.rooms.messages(
            room_id,
            &who.user_id,
            q.get("from").map(String::as_str),
            q.get("to").map(String::as_str),
            backward,
            limit,
            &filter,
        )
    };
    let mut page = read()?;
    // Paging back past the oldest event this server has of a room joined over federation: ask
    // a server in the room for the history before it (`/backfill`), at most twice per request.
    let mut rounds = 0;
    while page.more_elsewhere && page.chunk.len() < limit.min(MAX_PAGE) && rounds < 2 {
        rounds += 1;
        let fetched = match backfill::backfill(&s, room_id, limit.max(BACKFILL_PAGE)).await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(%room_id, error = %e, "backfill failed");
                false
            }
        };
        if !fetched {
            // No server could give more: for now this is the beginning of the history.
            page.end = None;
            break;
        }
        page = read()?;
    }
    let mut out = json!({
        "chunk": client_events(&s, &who, &page.chunk)?,
        "start": page.start,
    });
    if let Some(end) = page.end {
        out["end"] = json!(end);
    }
    if !page.state.is_empty() {
        out["state"] = json!(client_events(&s, &who, &page.state)?);
    }
    Ok(Json(out))
}

async fn context(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?;
    let event_id =
        <&EventId>::try_from(event_id.as_str()).map_err(|_| Error::not_found("Event not found"))?;
    let limit = limit_param(&q, 10)?;
    let filter = filter_param(&q)?;
    let ctx = s
        .rooms
        .context(room_id, &who.user_id, event_id.as_str(), limit, &filter)?;
    // events_before is in reverse chronological order, as the spec says.
    Ok(Json(json!({
        "event": s.rooms.client_event_for(&ctx.event, &who.user_id, who.device_id.as_str())?,
        "events_before": client_events(&s, &who, &ctx.before)?,
        "events_after": client_events(&s, &who, &ctx.after)?,
        "state": client_events(&s, &who, &ctx.state)?,
        "start": ctx.start,
        "end": ctx.end,
    })))
}

/// `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event?ts=&dir=`.
async fn timestamp_to_event(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(room): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room)?;
    let ts = query_param(&q, "ts")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing ts"))?
        .parse::<u64>()
        .map_err(|_| Error::invalid_param("ts must be a timestamp in milliseconds"))?;
    let forward = match query_param(&q, "dir")?.as_deref() {
        Some("f") => true,
        Some("b") => false,
        Some(_) => return Err(Error::invalid_param("dir must be f or b")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing dir")),
    };
    match s.rooms.event_at_time(room_id, &who.user_id, ts, forward)? {
        Some((event_id, at)) => Ok(Json(
            json!({ "event_id": event_id, "origin_server_ts": at }),
        )),
        None => Err(Error::not_found("No event found")),
    }
}
