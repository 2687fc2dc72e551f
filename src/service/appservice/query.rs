//! Asking appservices about ids in their namespaces that do not exist yet: a bridge creates its
//! ghost users and portal rooms on demand (`GET /_matrix/app/v1/users/{userId}` and
//! `/rooms/{roomAlias}`), and the lookup is then answered again.

use ruma::{OwnedRoomId, RoomAliasId, UserId};

use crate::{error::Result, service::Services};

/// The room a local alias names. When no room has it and an appservice's alias namespace covers
/// it, the appservice is asked (it may create the room and alias) and the alias looked up again.
pub async fn resolve_local_alias(s: &Services, alias: &RoomAliasId) -> Result<Option<OwnedRoomId>> {
    if let Some(room) = s.rooms.resolve_alias(alias)? {
        return Ok(Some(room));
    }
    let candidates: Vec<_> = s
        .appservices
        .all()
        .iter()
        .filter(|a| a.owns_alias(alias.as_str()) && a.registration.url.is_some())
        .cloned()
        .collect();
    for a in candidates {
        if s.appservices
            .client
            .query_alias(s, &a, alias.as_str())
            .await
        {
            if let Some(room) = s.rooms.resolve_alias(alias)? {
                return Ok(Some(room));
            }
        }
    }
    Ok(None)
}

/// Whether a local user exists; when not and an appservice's user namespace covers it, the
/// appservice is asked (it may register the user) and the answer is looked up again.
pub async fn local_user_exists(s: &Services, user: &UserId) -> Result<bool> {
    if s.accounts.exists(user)? {
        return Ok(true);
    }
    if user.server_name() != s.globals.server_name {
        return Ok(false);
    }
    let candidates: Vec<_> = s
        .appservices
        .all()
        .iter()
        .filter(|a| a.owns_user(user) && a.registration.url.is_some())
        .cloned()
        .collect();
    for a in candidates {
        if s.appservices.client.query_user(s, &a, user.as_str()).await && s.accounts.exists(user)? {
            return Ok(true);
        }
    }
    Ok(false)
}
