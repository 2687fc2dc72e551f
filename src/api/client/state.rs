//! Room state: read all of it, read one event, send one event.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, RawQuery, State},
    routing::get,
    Json, Router,
};
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};
use serde_json::{json, Value};

use super::room_id;
use crate::{
    api::ruma_wrapper::{ruma_route, Authed, JsonBody},
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<get_state_events::v3::Request, _, _>(r, all_state);
    let r = ruma_route::<get_state_event_for_key::v3::Request, _, _>(r, get_one);
    let mut r = ruma_route::<send_state_event::v3::Request, _, _>(r, put_one);
    // The empty state key: clients may leave the last segment out, or leave it empty.
    for version in ["r0", "v3"] {
        for tail in ["", "/"] {
            let path =
                format!("/_matrix/client/{version}/rooms/{{room_id}}/state/{{event_type}}{tail}");
            r = r.route(&path, get(get_empty_key).put(put_empty_key));
        }
    }
    r
}

async fn all_state(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path(room): Path<String>,
) -> Result<Json<Value>> {
    let events = s.rooms.visible_state(room_id(&room)?, &me.user_id, None)?;
    Ok(Json(Value::Array(
        events.iter().map(|p| p.to_client_value(None)).collect(),
    )))
}

async fn get_one(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, kind, key)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    read(&s, &me.user_id, &room, &kind, &key, &q)
}

async fn get_empty_key(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, kind)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    read(&s, &me.user_id, &room, &kind, "", &q)
}

/// `format=event` returns the whole event, otherwise (`content`, the default) its content.
fn read(
    s: &Services,
    user: &ruma::UserId,
    room: &str,
    kind: &str,
    key: &str,
    q: &HashMap<String, String>,
) -> Result<Json<Value>> {
    let whole = match q.get("format").map(String::as_str) {
        None | Some("content") => false,
        Some("event") => true,
        Some(_) => return Err(Error::invalid_param("format must be `content` or `event`")),
    };
    let pdu = s
        .rooms
        .visible_state_event(room_id(room)?, user, kind, key)?;
    Ok(Json(if whole {
        pdu.to_client_value(None)
    } else {
        pdu.content_value()
    }))
}

async fn put_one(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, kind, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    JsonBody(content): JsonBody,
) -> Result<Json<Value>> {
    let ts = super::message::appservice_ts(&me, &q)?;
    write(&s, &me, &room, &kind, &key, content, ts).await
}

async fn put_empty_key(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    Path((room, kind)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    JsonBody(content): JsonBody,
) -> Result<Json<Value>> {
    let ts = super::message::appservice_ts(&me, &q)?;
    write(&s, &me, &room, &kind, "", content, ts).await
}

async fn write(
    s: &Services,
    me: &crate::service::accounts::Identity,
    room: &str,
    kind: &str,
    key: &str,
    content: serde_json::Map<String, Value>,
    ts: Option<u64>,
) -> Result<Json<Value>> {
    // A suspended account may still leave.
    let leaving = kind == "m.room.member"
        && key == me.user_id.as_str()
        && content.get("membership").and_then(Value::as_str) == Some("leave");
    if !leaving {
        me.ensure_may_act()?;
    }
    let room = room_id(room)?;
    // A membership written as state is the same invite, join or knock as through its own
    // endpoint: the organization's policy service is asked about it too (the built-in rules
    // apply in the membership write path, whichever endpoint is used).
    if kind == "m.room.member" {
        if let Some(m @ ("invite" | "join" | "knock")) =
            content.get("membership").and_then(Value::as_str)
        {
            let mut d = serde_json::Map::new();
            if key != me.user_id.as_str() {
                d.insert("target".into(), Value::String(key.to_owned()));
            }
            crate::policy::access::check_hook(s, &me.user_id, Some(room), m, d).await?;
        }
    }
    let event_id = s
        .rooms
        .send_state(room, &me.user_id, kind, key, Value::Object(content), ts)
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}
