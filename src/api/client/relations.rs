//! `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]` and
//! `GET /_matrix/client/v1/rooms/{roomId}/threads`. The indexes and paging are in
//! `service::rooms::{relations, threads}`; aggregations in `service::rooms::aggregations`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use super::account::{query_param, uint_param, Segs};
use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    service::{
        accounts::Identity,
        rooms::{
            history::{parse_token, token},
            relations::{RelationsQuery, MAX_DEPTH},
            threads::ThreadsQuery,
            Pdu,
        },
        Services,
    },
};

/// Children per page when the client names no limit.
const DEFAULT_LIMIT: usize = 50;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let base = "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}";
    r.route(base, get(relations))
        .route(&format!("{base}/{{rel_type}}"), get(relations))
        .route(
            &format!("{base}/{{rel_type}}/{{event_type}}"),
            get(relations),
        )
        .route("/_matrix/client/v1/rooms/{room_id}/threads", get(threads))
}

/// A page of events as the client sees them, with the next page's token.
fn events_page(s: &Services, who: &Identity, events: &[Pdu], next: Option<u64>) -> Result<Value> {
    let chunk = events
        .iter()
        .map(|pdu| {
            s.rooms
                .client_event_for(pdu, &who.user_id, who.device_id.as_str())
        })
        .collect::<Result<Vec<Value>>>()?;
    let mut body = json!({ "chunk": chunk });
    if let Some(n) = next {
        body["next_batch"] = json!(token(n));
    }
    Ok(body)
}

async fn threads(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let room_id = super::room_id(p.get(0)?)?;
    let participated = match query_param(&q, "include")?.as_deref() {
        None | Some("all") => false,
        Some("participated") => true,
        Some(_) => return Err(Error::invalid_param("include must be all or participated")),
    };
    let from = query_param(&q, "from")?
        .map(|t| parse_token(&t))
        .transpose()?;
    let query = ThreadsQuery {
        participated,
        from,
        limit: uint_param(&q, "limit", DEFAULT_LIMIT)?,
    };
    let (roots, next) = s.rooms.threads(room_id, &who.user_id, &query)?;
    Ok(Json(events_page(&s, &who, &roots, next)?))
}

async fn relations(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let room_id = super::room_id(p.get(0)?)?;
    let parent = p.get(1)?;
    let backward = match query_param(&q, "dir")?.as_deref() {
        None | Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = uint_param(&q, "limit", DEFAULT_LIMIT)?;
    let from = query_param(&q, "from")?
        .map(|t| parse_token(&t))
        .transpose()?;
    let to = query_param(&q, "to")?
        .map(|t| parse_token(&t))
        .transpose()?;
    let recurse = match query_param(&q, "recurse")?.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("recurse must be true or false")),
    };
    let query = RelationsQuery {
        recurse,
        parent,
        rel_type: p.0.get(2).map(String::as_str),
        event_type: p.0.get(3).map(String::as_str),
        from,
        to,
        limit,
        backward,
    };
    let (children, next) = s.rooms.relations(room_id, &who.user_id, &query)?;
    let mut body = events_page(&s, &who, &children, next)?;
    if recurse {
        body["recursion_depth"] = json!(MAX_DEPTH);
    }
    Ok(Json(body))
}
