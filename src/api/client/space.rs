//! Spaces and room previews: `GET /_matrix/client/v1/rooms/{roomId}/hierarchy` and
//! `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}`. Logic in `service::rooms::summary`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::get,
    Json, Router,
};
use ruma::{OwnedRoomId, RoomAliasId};
use serde_json::{json, Value};

use super::account::{query_param, uint_param, Segs};
use crate::{
    api::ruma_wrapper::{Authed, MaybeAuthed},
    error::{Error, Result},
    service::{
        rooms::summary::{
            HierarchyQuery, DEFAULT_HIERARCHY_LIMIT, DEFAULT_MAX_DEPTH, MAX_DEPTH,
            MAX_HIERARCHY_LIMIT,
        },
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/client/v1/rooms/{room_id}/hierarchy",
        get(hierarchy),
    )
    .route("/_matrix/client/v1/room_summary/{room}", get(room_summary))
}

async fn hierarchy(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let room_id = super::room_id(p.get(0)?)?;
    let suggested_only = match query_param(&q, "suggested_only")?.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("suggested_only must be true or false")),
    };
    let limit = uint_param(&q, "limit", DEFAULT_HIERARCHY_LIMIT)?;
    if limit == 0 {
        return Err(Error::invalid_param("limit must be greater than zero"));
    }
    let query = HierarchyQuery {
        suggested_only,
        max_depth: uint_param(&q, "max_depth", DEFAULT_MAX_DEPTH)?.min(MAX_DEPTH),
        limit: limit.min(MAX_HIERARCHY_LIMIT),
        from: query_param(&q, "from")?,
    };
    let (rooms, next) = s.rooms.hierarchy(room_id, &who.user_id, &query)?;
    let mut body = json!({ "rooms": rooms });
    if let Some(n) = next {
        body["next_batch"] = json!(n);
    }
    Ok(Json(body))
}

async fn room_summary(
    State(s): State<Arc<Services>>,
    MaybeAuthed(who): MaybeAuthed,
    p: Segs,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    let not_found = || Error::not_found("Room not found");
    let room_id: OwnedRoomId = if raw.starts_with('#') {
        let alias = <&RoomAliasId>::try_from(raw)
            .map_err(|_| Error::invalid_param("Invalid room alias"))?;
        s.rooms.resolve_alias(alias)?.ok_or_else(not_found)?
    } else {
        super::room_id(raw)?.to_owned()
    };
    let user = who.as_ref().map(|w| w.user_id.as_ref());
    // Rooms the caller may not preview are indistinguishable from unknown ones.
    if !s.rooms.may_preview(&room_id, user)? {
        return Err(not_found());
    }
    let mut summary = s.rooms.room_summary(&room_id)?;
    if let Some(u) = user {
        if let Some(m) = s.rooms.membership(&room_id, u)? {
            summary["membership"] = json!(m);
        }
    }
    Ok(Json(summary))
}
