//! Server-Server API handlers, one file per spec area. Requests from other servers are
//! authenticated by [`Signed`] (`X-Matrix`), which every endpoint but the key and version ones
//! takes first.

mod directory;
mod events;
mod keys;
mod media;
mod membership;
mod query;
mod send;
mod space;
mod user;

use std::sync::Arc;

use axum::{
    extract::{FromRequest, Request},
    Router,
};
use ruma::OwnedServerName;
use serde_json::Value;

use crate::{
    api::ruma_wrapper::read_body_limited,
    error::{Error, Result},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = keys::routes(r);
    let r = user::routes(r);
    let r = directory::routes(r);
    let r = space::routes(r);
    let r = membership::routes(r);
    let r = send::routes(r);
    let r = events::routes(r);
    let r = media::routes(r);
    query::routes(r)
}

/// A request another server signed: who sent it, and its JSON body (if it has one).
pub struct Signed {
    pub origin: OwnedServerName,
    pub body: Option<Value>,
}

impl FromRequest<Arc<Services>> for Signed {
    type Rejection = Error;

    async fn from_request(req: Request, services: &Arc<Services>) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = read_body_limited(body, services.config.max_request_size).await?;
        let body = if bytes.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|_| Error::new(crate::error::ErrCode::NotJson, "Body is not JSON"))?,
            )
        };
        let uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok());
        // The federation policy first, audited: a server not allowed gets nothing.
        if let Some(claimed) = crate::service::federation::auth::claimed_origin(header) {
            crate::policy::access::check_federation_origin(services, &claimed, parts.uri.path())?;
        }
        let origin = services
            .federation
            .verify_request(&parts.method, uri, header, body.as_ref())
            .await?;
        // The origin is up: anything queued for it that was backing off goes now.
        services.federation.sender.server_is_back(&origin);
        Ok(Signed { origin, body })
    }
}
