//! Asking other servers for a room's history older than ours (`/backfill`), when a client pages
//! back past the oldest event this server has (`/messages`). Each returned event is checked like
//! an incoming PDU's first steps: format, signatures, content hash ([`Federation::check_pdu`]),
//! and the auth rules against its own auth events (fetched when unknown, bounded); the events
//! that pass are kept apart from the timeline (`rooms::backfill`), so they are history, not news.
//!
//! [`Federation::check_pdu`]: super::Federation::check_pdu

use std::collections::HashSet;

use ruma::{OwnedEventId, OwnedServerName, RoomId};
use serde_json::Value;

use super::{
    incoming::{store_checked, urlencoding},
    pdu::KeyCache,
};
use crate::{
    error::Result,
    service::{rooms::append::rules_for, Services},
};

/// Most events asked for in one `/backfill` (the spec lets the server cap it too).
pub const BACKFILL_LIMIT: usize = 100;
/// Most servers asked for one page.
const MAX_SERVERS: usize = 3;
/// Most unknown auth events fetched (`/event`) for one page.
const MAX_AUTH_FETCH: usize = 50;
/// Largest `/backfill` answer read.
const ANSWER_LIMIT: usize = 32 * 1024 * 1024;

/// The servers to ask: the room id's server first (for room versions before 12, where the room
/// was created), then those of joined members, without this server.
fn servers_for(services: &Services, room_id: &RoomId) -> Result<Vec<OwnedServerName>> {
    let own = &services.globals.server_name;
    let by_member = super::sender::servers_in_room(&services.rooms, room_id, own)?;
    let mut out: Vec<OwnedServerName> = room_id
        .server_name()
        .filter(|s| *s != own)
        .map(ToOwned::to_owned)
        .into_iter()
        .collect();
    for s in by_member {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Fetch one page (at most `limit` events) of the room's history before ours from a server in
/// the room and store what passes the checks. Returns whether anything changed (events stored,
/// or extremities given up): `false` when no server could help.
pub async fn backfill(services: &Services, room_id: &RoomId, limit: usize) -> Result<bool> {
    let rooms = &services.rooms;
    let meta = rooms.backfill_meta(room_id)?;
    if meta.extremities.is_empty() {
        return Ok(false);
    }
    let version = rooms.version(room_id)?;
    let rules = rules_for(&version)?;
    let limit = limit.clamp(1, BACKFILL_LIMIT);
    let mut query: Vec<String> = meta
        .extremities
        .iter()
        .map(|e| format!("v={}", urlencoding(e.as_str())))
        .collect();
    query.push(format!("limit={limit}"));
    let path = format!(
        "/_matrix/federation/v1/backfill/{}?{}",
        urlencoding(room_id.as_str()),
        query.join("&")
    );
    let mut keys = KeyCache::default();
    for server in servers_for(services, room_id)?
        .into_iter()
        .take(MAX_SERVERS)
    {
        let answer = match services
            .federation
            .send_limited(http::Method::GET, &server, &path, None, ANSWER_LIMIT)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%server, %room_id, error = %e, "backfill failed");
                continue;
            }
        };
        let mut checked = Vec::new();
        let mut returned: Vec<OwnedEventId> = Vec::new();
        for value in answer
            .get("pdus")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(limit)
        {
            match services
                .federation
                .check_pdu(&version, value, Some(room_id), &mut keys)
                .await
            {
                Ok(i) => {
                    returned.push(i.event_id.clone());
                    checked.push(i);
                }
                Err(e) => {
                    if let Some(id) = value
                        .get("event_id")
                        .and_then(Value::as_str)
                        .and_then(|s| OwnedEventId::try_from(s).ok())
                    {
                        returned.push(id);
                    }
                    tracing::debug!(%server, error = %e, "a backfilled event was refused");
                }
            }
        }
        if returned.is_empty() {
            continue;
        }
        let page: HashSet<OwnedEventId> = checked.iter().map(|i| i.event_id.clone()).collect();

        // Auth events neither stored nor in the page: fetched one by one, checked the same way.
        let mut missing: Vec<OwnedEventId> = Vec::new();
        for i in &checked {
            for a in &i.pdu.auth_events {
                if !page.contains(a) && !missing.contains(a) && rooms.pdu(a.as_str())?.is_none() {
                    missing.push(a.clone());
                }
            }
        }
        for id in missing.iter().take(MAX_AUTH_FETCH) {
            let path = format!("/_matrix/federation/v1/event/{}", urlencoding(id.as_str()));
            let Ok(answer) = services
                .federation
                .send(http::Method::GET, &server, &path, None)
                .await
            else {
                continue;
            };
            if let Some(value) = answer
                .get("pdus")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
            {
                if let Ok(i) = services
                    .federation
                    .check_pdu(&version, value, Some(room_id), &mut keys)
                    .await
                {
                    if &i.event_id == id {
                        checked.push(i);
                    }
                }
            }
        }

        // Auth-checked in depth order and stored as outliers; the page's events that passed
        // (or were already stored) become history.
        let known = store_checked(rooms, checked, &rules)?;
        let events = known
            .into_iter()
            .filter(|(id, _)| page.contains(id))
            .map(|(_, p)| p)
            .collect();
        let _guard = rooms.lock(room_id).await;
        let placed = rooms.store_backfilled(room_id, &returned, events)?;
        tracing::debug!(%server, %room_id, placed, "backfilled");
        return Ok(true);
    }
    Ok(false)
}
