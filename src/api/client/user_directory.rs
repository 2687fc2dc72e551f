//! `POST /user_directory/search`. The logic is in `service::user_directory`.

use std::sync::Arc;

use axum::{extract::State, routing::post, Json, Router};
use serde_json::{json, Value};

use super::account::both;
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{user_directory, Services},
};

/// Results when the client names no limit.
const DEFAULT_LIMIT: usize = 10;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    both(r, "/user_directory/search", post(search))
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
