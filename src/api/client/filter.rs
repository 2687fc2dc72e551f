//! Filters: stored per user, referenced by id from /sync and /messages.

use std::sync::Arc;

use axum::{
    extract::State,
    routing::{get, post},
    Json, Router,
};
use ruma::{api::client::filter::FilterDefinition, OwnedUserId};
use serde_json::{json, Value};

use super::account::{both, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    service::{accounts::Identity, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/user/{user_id}/filter", post(create));
    both(r, "/user/{user_id}/filter/{filter_id}", get(show))
}

fn own_user(id: &Identity, raw: &str) -> Result<OwnedUserId> {
    super::own_user(id, raw, "You cannot use another user's filters")
}

async fn create(
    State(s): State<Arc<Services>>,
    Authed(id): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    let filter = Value::Object(body);
    // Refuse filters whose known fields have the wrong types; unknown fields are kept as sent.
    serde_json::from_value::<FilterDefinition>(filter.clone())
        .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")))?;
    let filter_id = s.account_data.create_filter(&user, &filter)?;
    Ok(Json(json!({ "filter_id": filter_id })))
}

async fn show(State(s): State<Arc<Services>>, Authed(id): Authed, p: Segs) -> Result<Json<Value>> {
    let user = own_user(&id, p.get(0)?)?;
    Ok(Json(s.account_data.filter(&user, p.get(1)?)?))
}
