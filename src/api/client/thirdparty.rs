//! Third-party networks (`/thirdparty/...`): the protocols registered appservices (bridges)
//! declare, with lookups passed on to them (`service/appservice/thirdparty.rs`).

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::get,
    Json, Router,
};
use serde_json::Value;

use super::account::Segs;
use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    service::{appservice::thirdparty, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let base = "/_matrix/client/v3/thirdparty";
    r.route(&format!("{base}/protocols"), get(protocols))
        .route(&format!("{base}/protocol/{{protocol}}"), get(protocol))
        .route(&format!("{base}/location/{{protocol}}"), get(location))
        .route(&format!("{base}/user/{{protocol}}"), get(user))
        .route(&format!("{base}/location"), get(location_reverse))
        .route(&format!("{base}/user"), get(user_reverse))
}

/// The query the client sent, minus its token, to pass on to the appservices.
fn fields(q: &Option<String>) -> Result<Vec<(String, String)>> {
    let Some(q) = q else { return Ok(Vec::new()) };
    let pairs: Vec<(String, String)> =
        serde_html_form::from_str(q).map_err(|_| Error::invalid_param("Invalid query string"))?;
    Ok(pairs
        .into_iter()
        .filter(|(k, _)| k != "access_token")
        .take(100)
        .collect())
}

async fn protocols(State(s): State<Arc<Services>>, Authed(_): Authed) -> Result<Json<Value>> {
    Ok(Json(Value::Object(thirdparty::protocols(&s).await?)))
}

async fn protocol(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    Ok(Json(thirdparty::protocol(&s, p.get(0)?).await?))
}

async fn location(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let found = thirdparty::lookup(&s, "location", Some(p.get(0)?), &fields(&q)?).await?;
    Ok(Json(Value::Array(found)))
}

async fn user(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let found = thirdparty::lookup(&s, "user", Some(p.get(0)?), &fields(&q)?).await?;
    Ok(Json(Value::Array(found)))
}

async fn location_reverse(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let found = thirdparty::lookup(&s, "location", None, &fields(&q)?).await?;
    Ok(Json(Value::Array(found)))
}

async fn user_reverse(
    State(s): State<Arc<Services>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let found = thirdparty::lookup(&s, "user", None, &fields(&q)?).await?;
    Ok(Json(Value::Array(found)))
}
