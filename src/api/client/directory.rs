//! The published room directory: `/directory/list/room/{roomId}` and `/publicRooms`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, State},
    routing::{get, put},
    Json, Router,
};
use ruma::api::client::{directory::get_room_visibility, room::Visibility};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{ruma_route, Authed, JsonBody, Ruma, RumaResponse},
    error::{Error, Result},
    service::{rooms::directory::DirectoryQuery, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let mut r = ruma_route::<get_room_visibility::v3::Request, _, _>(r, get_visibility);
    for v in ["r0", "v3"] {
        r = r
            .route(
                &format!("/_matrix/client/{v}/directory/list/room/{{room_id}}"),
                put(set_visibility),
            )
            .route(
                &format!("/_matrix/client/{v}/publicRooms"),
                get(public_rooms_get).post(public_rooms_post),
            );
    }
    r
}

async fn get_visibility(
    State(s): State<Arc<Services>>,
    req: Ruma<get_room_visibility::v3::Request>,
) -> Result<RumaResponse<get_room_visibility::v3::Response>> {
    if !s.rooms.exists(&req.room_id)? {
        return Err(Error::not_found("Room not found"));
    }
    let visibility = if s.rooms.is_public(&req.room_id)? {
        Visibility::Public
    } else {
        Visibility::Private
    };
    Ok(get_room_visibility::v3::Response::new(visibility).into())
}

async fn set_visibility(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let room_id = super::room_id(&room_id)?;
    // The spec makes `public` the default.
    let public = match body.get("visibility") {
        None => true,
        Some(Value::String(v)) if v == "public" => true,
        Some(Value::String(v)) if v == "private" => false,
        Some(_) => {
            return Err(Error::invalid_param(
                "visibility must be `public` or `private`",
            ))
        }
    };
    if public {
        s.policy.may_publish_room(&who.user_id)?;
    }
    s.rooms
        .set_directory_visibility(room_id, &who.user_id, who.admin, public)?;
    Ok(Json(json!({})))
}

/// Only our own directory is served; asking for another server's needs federation.
fn check_server(s: &Services, server: Option<&str>) -> Result<()> {
    match server {
        Some(name) if name != s.globals.server_name.as_str() => Err(Error::invalid_param(
            "Only this server's room directory can be queried",
        )),
        _ => Ok(()),
    }
}

fn page_json(s: &Services, q: &DirectoryQuery) -> Result<Json<Value>> {
    let page = s.rooms.directory_page(q)?;
    let mut out = json!({
        "chunk": page.chunk,
        "total_room_count_estimate": page.total_room_count_estimate,
    });
    if let Some(n) = page.next_batch {
        out["next_batch"] = json!(n);
    }
    if let Some(p) = page.prev_batch {
        out["prev_batch"] = json!(p);
    }
    Ok(Json(out))
}

fn parse_limit(v: Option<&Value>) -> Result<Option<usize>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(Error::bad_json("limit must be a non-negative integer")),
        },
        Some(_) => Err(Error::bad_json("limit must be an integer")),
    }
}

/// GET needs no access token (the spec lists no security for it).
async fn public_rooms_get(
    State(s): State<Arc<Services>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    check_server(&s, q.get("server").map(String::as_str))?;
    let limit = match q.get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<u64>()
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .map_err(|_| Error::invalid_param("limit must be a non-negative integer"))?,
        ),
    };
    let query = DirectoryQuery {
        limit,
        since: q.get("since").cloned(),
        ..Default::default()
    };
    page_json(&s, &query)
}

async fn public_rooms_post(
    State(s): State<Arc<Services>>,
    Authed(_who): Authed,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    check_server(&s, q.get("server").map(String::as_str))?;
    let since = match body.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(Error::bad_json("since must be a string")),
    };
    let mut query = DirectoryQuery {
        limit: parse_limit(body.get("limit"))?,
        since,
        ..Default::default()
    };
    match body.get("filter") {
        None | Some(Value::Null) => {}
        Some(Value::Object(f)) => {
            query.search_term = match f.get("generic_search_term") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(Error::bad_json("generic_search_term must be a string")),
            };
            query.room_types = match f.get("room_types") {
                None | Some(Value::Null) => None,
                Some(Value::Array(types)) => Some(
                    types
                        .iter()
                        .take(100)
                        .map(|t| match t {
                            Value::Null => Ok(None),
                            Value::String(t) => Ok(Some(t.clone())),
                            _ => Err(Error::bad_json(
                                "room_types entries must be strings or null",
                            )),
                        })
                        .collect::<Result<_>>()?,
                ),
                Some(_) => return Err(Error::bad_json("room_types must be an array")),
            };
        }
        Some(_) => return Err(Error::bad_json("filter must be an object")),
    }
    page_json(&s, &query)
}
