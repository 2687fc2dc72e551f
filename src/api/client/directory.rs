//! The published room directory: `/directory/list/room/{roomId}`, appservices' network lists
//! (`/directory/list/appservice/{networkId}/{roomId}`) and `/publicRooms`.

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
    error::{ErrCode, Error, Result},
    service::{
        rooms::directory::{DirectoryQuery, Networks},
        Services,
    },
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
                &format!(
                    "/_matrix/client/{v}/directory/list/appservice/{{network_id}}/{{room_id}}"
                ),
                put(set_appservice_visibility),
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

/// An appservice publishes a room in its network's list (`third_party_instance_id`
/// `<appservice id>|<network id>`). Only with an appservice's token (403 `M_FORBIDDEN`).
async fn set_appservice_visibility(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    Path((network_id, room_id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let Some(appservice) = &who.appservice else {
        return Err(Error::forbidden(
            "Only application services may publish rooms for a network",
        ));
    };
    let room_id = super::room_id(&room_id)?;
    let public = match body.get("visibility") {
        Some(Value::String(v)) if v == "public" => true,
        Some(Value::String(v)) if v == "private" => false,
        None => return Err(Error::new(ErrCode::MissingParam, "Missing 'visibility'")),
        Some(_) => {
            return Err(Error::invalid_param(
                "visibility must be `public` or `private`",
            ))
        }
    };
    if !s.rooms.exists(room_id)? {
        return Err(Error::not_found("Room not found"));
    }
    if public {
        s.policy.may_publish_room(&who.user_id)?;
    }
    let instance =
        crate::service::appservice::thirdparty::instance_id(appservice.id(), &network_id);
    s.rooms.set_public_in_network(room_id, &instance, public)?;
    Ok(Json(json!({})))
}

/// Which directory lists a query reads: `include_all_networks` (all), else
/// `third_party_instance_id` (one appservice network), else the server's own.
fn networks(include_all: bool, instance: Option<String>) -> Networks {
    match (include_all, instance) {
        (true, _) => Networks::All,
        (false, Some(i)) => Networks::Instance(i),
        (false, None) => Networks::Main,
    }
}

/// The server whose directory is asked for, when it is not this one (asked over federation).
fn remote_server(s: &Services, server: Option<&str>) -> Result<Option<ruma::OwnedServerName>> {
    match server {
        Some(name) if name != s.globals.server_name.as_str() => {
            ruma::OwnedServerName::try_from(name)
                .map(Some)
                .map_err(|_| Error::invalid_param("Invalid server name"))
        }
        _ => Ok(None),
    }
}

pub(crate) fn page_json(s: &Services, q: &DirectoryQuery) -> Result<Json<Value>> {
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
    if let Some(server) = remote_server(&s, q.get("server").map(String::as_str))? {
        let mut path = "/_matrix/federation/v1/publicRooms".to_owned();
        let mut params = Vec::new();
        for key in ["limit", "since"] {
            if let Some(v) = q.get(key) {
                params.push((key, v.as_str()));
            }
        }
        if !params.is_empty() {
            path.push('?');
            path.push_str(&serde_html_form::to_string(&params).map_err(Error::internal)?);
        }
        let answer = s
            .federation
            .send(http::Method::GET, &server, &path, None)
            .await?;
        return Ok(Json(answer));
    }
    let limit = match q.get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<u64>()
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .map_err(|_| Error::invalid_param("limit must be a non-negative integer"))?,
        ),
    };
    let include_all = match q.get("include_all_networks").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(Error::invalid_param(
                "include_all_networks must be true or false",
            ))
        }
    };
    let query = DirectoryQuery {
        limit,
        since: q.get("since").cloned(),
        networks: networks(include_all, q.get("third_party_instance_id").cloned()),
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
    if let Some(server) = remote_server(&s, q.get("server").map(String::as_str))? {
        let answer = s
            .federation
            .send(
                http::Method::POST,
                &server,
                "/_matrix/federation/v1/publicRooms",
                Some(Value::Object(body)),
            )
            .await?;
        return Ok(Json(answer));
    }
    page_json(&s, &post_query(&body)?)
}

/// The query of a `POST /publicRooms` body (client and federation alike).
pub(crate) fn post_query(body: &serde_json::Map<String, Value>) -> Result<DirectoryQuery> {
    let since = match body.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(Error::bad_json("since must be a string")),
    };
    let include_all = match body.get("include_all_networks") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::bad_json("include_all_networks must be a boolean")),
    };
    let instance = match body.get("third_party_instance_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(i)) => Some(i.clone()),
        Some(_) => return Err(Error::bad_json("third_party_instance_id must be a string")),
    };
    let mut query = DirectoryQuery {
        limit: parse_limit(body.get("limit"))?,
        since,
        networks: networks(include_all, instance),
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
    Ok(query)
}
