//! Dehydrated devices (MSC3814, unstable prefix `org.matrix.msc3814.v1`). Logic in
//! `service::dehydrated`.

use std::sync::Arc;

use axum::{
    extract::State,
    routing::{get, post},
    Json, Router,
};
use serde_json::Value;

use super::account::Segs;
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{dehydrated, Services},
};

const BASE: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(BASE, get(get_device).put(put_device).delete(delete_device))
        .route(&format!("{BASE}/{{device_id}}/events"), post(events))
}

async fn put_device(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    Ok(Json(dehydrated::put(&s, &who.user_id, &body)?))
}

async fn get_device(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    Ok(Json(dehydrated::get(&s, &who.user_id)?))
}

async fn delete_device(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    Ok(Json(dehydrated::delete(&s, &who.user_id)?))
}

async fn events(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let next_batch = match body.get("next_batch") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.as_str()),
        Some(_) => return Err(Error::bad_json("next_batch must be a string")),
    };
    Ok(Json(dehydrated::events(
        &s,
        &who.user_id,
        p.get(0)?,
        next_batch,
    )?))
}
