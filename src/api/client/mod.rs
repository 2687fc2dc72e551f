//! Client-Server API handlers, one file per spec area. `routes` registers them all.

mod account;
mod account_data;
mod admin;
mod admin_api;
mod admin_media;
mod alias;
mod appservice;
mod appservice_admin;
mod consent;
mod data_rights;
mod dehydrated;
mod devices;
pub(crate) mod directory;
mod discovery;
mod filter;
mod groups;
mod history;
mod key_backup;
mod keys;
pub(crate) mod media;
mod membership;
mod message;
mod presence;
mod profile;
mod push;
mod receipts;
mod relations;
mod reports;
mod room_create;
mod search;
mod session;
mod space;
mod sso;
mod state;
mod synapse_admin;
mod sync;
mod thirdparty;
mod typing;
mod upgrade;
mod user_directory;
mod voip;

pub(crate) use account::{query_param, ClientIp};

use std::sync::Arc;

use axum::Router;
use ruma::{OwnedUserId, RoomId, UserId};

use crate::{
    error::{Error, Result},
    service::{accounts::Identity, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = discovery::routes(r);
    let r = account::routes(r);
    let r = session::routes(r);
    let r = sso::routes(r);
    let r = devices::routes(r);
    let r = profile::routes(r);
    let r = push::routes(r);
    let r = account_data::routes(r);
    let r = filter::routes(r);
    let r = room_create::routes(r);
    let r = membership::routes(r);
    let r = state::routes(r);
    let r = message::routes(r);
    let r = alias::routes(r);
    let r = directory::routes(r);
    let r = upgrade::routes(r);
    let r = history::routes(r);
    let r = sync::routes(r);
    let r = typing::routes(r);
    let r = receipts::routes(r);
    let r = presence::routes(r);
    let r = keys::routes(r);
    let r = key_backup::routes(r);
    let r = reports::routes(r);
    let r = relations::routes(r);
    let r = user_directory::routes(r);
    let r = space::routes(r);
    let r = search::routes(r);
    let r = dehydrated::routes(r);
    let r = voip::routes(r);
    let r = admin::routes(r);
    let r = groups::routes(r);
    let r = appservice::routes(r);
    let r = appservice_admin::routes(r);
    let r = admin_api::routes(r);
    let r = admin_media::routes(r);
    let r = data_rights::routes(r);
    let r = consent::routes(r);
    let r = synapse_admin::routes(r);
    let r = thirdparty::routes(r);

    media::routes(r)
}

/// A room id from the request path.
pub(super) fn room_id(raw: &str) -> Result<&RoomId> {
    <&RoomId>::try_from(raw).map_err(|_| Error::invalid_param("Invalid room id"))
}

/// A user id from the request path.
pub(super) fn user_id(raw: &str) -> Result<OwnedUserId> {
    UserId::parse(raw).map_err(|_| Error::invalid_param("Invalid user id"))
}

/// A user id from the request path that must be the caller's own (`M_FORBIDDEN` with
/// `forbidden` otherwise): the user's account data, filters, profile, presence, typing.
pub(super) fn own_user(who: &Identity, raw: &str, forbidden: &str) -> Result<OwnedUserId> {
    let user = user_id(raw)?;
    if user != who.user_id {
        return Err(Error::forbidden(forbidden));
    }
    Ok(user)
}
