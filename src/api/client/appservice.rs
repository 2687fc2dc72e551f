//! Client-Server endpoints for appservices: `POST /_matrix/client/v1/appservice/{appserviceId}/ping`
//! (the appservice checks that the homeserver can reach it).

use std::sync::Arc;

use axum::{extract::State, routing::post, Json, Router};
use serde_json::{json, Value};

use super::account::{opt_str, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    service::{appservice::client::PingError, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/client/v1/appservice/{appservice_id}/ping",
        post(ping),
    )
}

/// Only the appservice itself may ping (403 `M_FORBIDDEN` for anyone else). The errors are the
/// spec's: 400 `M_URL_NOT_SET`, 502 `M_BAD_STATUS` (with the appservice's status and body),
/// 502 `M_CONNECTION_FAILED`, 504 `M_CONNECTION_TIMEOUT`.
async fn ping(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let id = p.get(0)?;
    let appservice = match &who.appservice {
        Some(a) if a.id() == id => a.clone(),
        _ => {
            return Err(Error::forbidden(
                "Only the application service itself may ping it",
            ))
        }
    };
    let transaction_id = opt_str(&body, "transaction_id")?;
    match s
        .appservices
        .client
        .ping(&s, &appservice, transaction_id.as_deref())
        .await
    {
        Ok(took) => {
            s.appservices.queue.appservice_is_back(appservice.id());
            Ok(Json(json!({ "duration_ms": took.as_millis() as u64 })))
        }
        Err(PingError::UrlNotSet) => Err(Error::new(
            ErrCode::UrlNotSet,
            "The application service has no URL",
        )),
        Err(PingError::Timeout) => Err(Error::new(
            ErrCode::ConnectionTimeout,
            "The application service did not answer in time",
        )),
        Err(PingError::Failed(e)) => Err(Error::new(
            ErrCode::ConnectionFailed,
            format!("Cannot reach the application service: {e}"),
        )),
        Err(PingError::BadStatus(status, body)) => Err(Error::BadStatus { status, body }),
    }
}
