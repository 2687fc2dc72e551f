//! Third-party networks (`/thirdparty/...`): the protocols bridges offer. No bridge is registered
//! yet, so there are no protocols, and lookups find nothing.

use std::sync::Arc;

use axum::{routing::get, Json, Router};
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let base = "/_matrix/client/v3/thirdparty";
    r.route(&format!("{base}/protocols"), get(protocols))
        .route(
            &format!("{base}/protocol/{{protocol}}"),
            get(unknown_protocol),
        )
        .route(
            &format!("{base}/location/{{protocol}}"),
            get(unknown_protocol),
        )
        .route(&format!("{base}/user/{{protocol}}"), get(unknown_protocol))
        .route(&format!("{base}/location"), get(nothing_found))
        .route(&format!("{base}/user"), get(nothing_found))
}

async fn protocols(Authed(_): Authed) -> Json<Value> {
    Json(json!({}))
}

async fn unknown_protocol(Authed(_): Authed) -> Result<Json<Value>> {
    Err(Error::not_found("No bridge offers this protocol"))
}

/// Reverse lookups by alias or user id: nothing is bridged.
async fn nothing_found(Authed(_): Authed) -> Json<Value> {
    Json(json!([]))
}
