//! Server-Server API handlers, one file per spec area. Only what needs no request signing is
//! here so far: the server's keys and version (the rest arrives with the federation work).

mod keys;

use std::sync::Arc;

use axum::Router;

use crate::service::Services;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    keys::routes(r)
}
