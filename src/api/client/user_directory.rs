//! `POST /user_directory/search` (logic in `service::user_directory`) and `GET /mutual_rooms`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};

use super::account::{both, query_param};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{user_directory, Services},
};

/// Results when the client names no limit.
const DEFAULT_LIMIT: usize = 10;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    both(r, "/user_directory/search", post(search))
        .route("/_matrix/client/v1/mutual_rooms", get(mutual_rooms))
}

async fn search(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let term = match body.get("search_term") {
        Some(Value::String(t)) => t.clone(),
        Some(_) => return Err(Error::bad_json("search_term must be a string")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing search_term")),
    };
    let limit = match body.get("limit") {
        None | Some(Value::Null) => DEFAULT_LIMIT,
        Some(v) => v
            .as_u64()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .ok_or_else(|| Error::bad_json("limit must be a non-negative integer"))?,
    };
    let (results, limited) = user_directory::search(&s, &who.user_id, &term, limit)?;
    Ok(Json(json!({ "results": results, "limited": limited })))
}

/// Rooms per page of `/mutual_rooms`.
const MUTUAL_ROOMS_PAGE: usize = 100;

/// `GET /_matrix/client/v1/mutual_rooms?user_id=`: rooms both users have joined.
async fn mutual_rooms(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let Some(raw) = query_param(&q, "user_id")? else {
        return Err(Error::new(ErrCode::MissingParam, "Missing user_id"));
    };
    let other = ruma::UserId::parse(&raw)
        .map_err(|_| Error::invalid_param("user_id is not a valid user id"))?;
    if other == who.user_id {
        return Err(Error::invalid_param("user_id is your own user id"));
    }
    let offset = match query_param(&q, "from")? {
        None => 0,
        Some(t) => t
            .strip_prefix('m')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::invalid_param("Invalid from token"))?,
    };
    let mine = s.rooms.joined_rooms(&who.user_id)?;
    let mut shared: Vec<String> = mine
        .into_iter()
        .filter(|r| s.rooms.is_joined(r, &other).unwrap_or(false))
        .map(|r| r.to_string())
        .collect();
    shared.sort();
    let count = shared.len();
    let page: Vec<String> = shared
        .into_iter()
        .skip(offset)
        .take(MUTUAL_ROOMS_PAGE)
        .collect();
    let mut body = json!({ "joined": page, "count": count });
    if offset + MUTUAL_ROOMS_PAGE < count {
        body["next_batch"] = json!(format!("m{}", offset + MUTUAL_ROOMS_PAGE));
    }
    Ok(Json(body))
}
