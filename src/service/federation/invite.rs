//! Inviting a user of another server: the invite is built and signed here, countersigned by the
//! invitee's server (`/invite/v2`, which also learns the room's stripped state), then written to
//! the room and sent to the room's servers like any local event.

use ruma::{signatures::PublicKeyMap, RoomId, UserId};
use serde_json::{json, Value};

use super::{incoming::urlencoding, pdu::KeyCache, resident::public_state_pdus};
use crate::{
    error::{Error, Result},
    service::{
        rooms::{membership::member_content, NewEvent},
        Services,
    },
};

pub async fn invite_remote(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    reason: Option<&str>,
    is_direct: bool,
) -> Result<()> {
    let rooms = &services.rooms;
    let guard = rooms.lock(room_id).await;
    rooms.require_joined(room_id, sender)?;
    match rooms.membership(room_id, target)?.as_deref() {
        Some("ban") => return Err(Error::forbidden("The user is banned from this room")),
        Some("join") => return Err(Error::forbidden("The user is already in this room")),
        _ => {}
    }
    let mut content = member_content("invite", None, reason);
    if is_direct {
        content["is_direct"] = Value::Bool(true);
    }
    let prepared = rooms
        .prepare_local(
            room_id,
            sender,
            NewEvent::state("m.room.member", target.as_str(), content),
        )
        .map_err(|e| match e.errcode() {
            "M_FORBIDDEN" => Error::forbidden("You may not invite users to this room"),
            _ => e,
        })?;
    // Full PDUs (create event included), as Matrix 1.16 requires of `invite_room_state`.
    let mut room_state = public_state_pdus(services, room_id)?;
    if let Some(p) = rooms.state_get(room_id, "m.room.member", sender.as_str())? {
        if let Some(pdu) = rooms.federation_pdu(&p.event_id)? {
            room_state.push(pdu);
        }
    }
    let event_id = prepared.pdu.event_id.clone();
    let version = prepared.meta.version.clone();
    // No room lock across the request to the invitee's server: a slow or hostile server would
    // otherwise stall every writer in the room. The event's prev events are fixed now; if the
    // room moves on meanwhile, the countersigned invite joins it as a fork would (below).
    drop(guard);
    let answer = services
        .federation
        .send(
            http::Method::PUT,
            target.server_name(),
            &format!(
                "/_matrix/federation/v2/invite/{}/{}",
                urlencoding(room_id.as_str()),
                urlencoding(event_id.as_str())
            ),
            Some(json!({
                "room_version": version,
                "event": prepared.obj,
                "invite_room_state": room_state,
            })),
        )
        .await?;
    let returned = answer
        .get("event")
        .filter(|e| e.is_object())
        .ok_or_else(|| Error::bad_json("The invitee's server returned no event"))?;
    let mut keys = KeyCache::default();
    let checked = services
        .federation
        .check_pdu(&version, returned, Some(room_id), &mut keys)
        .await?;
    if checked.event_id != event_id {
        return Err(Error::bad_json("The invitee's server changed the invite"));
    }
    // The invitee's server must have signed it: that signature is its consent to the invite.
    let target_keys = services
        .federation
        .event_signing_keys(target.server_name())
        .await?;
    let event_ts = u64::from(checked.pdu.origin_server_ts.0);
    let mut map = PublicKeyMap::new();
    map.insert(
        target.server_name().to_string(),
        super::pdu::valid_at(&target_keys, event_ts),
    );
    // Our own signature is on it too; every signer's keys must be known to check any.
    let own_keys = services
        .federation
        .event_signing_keys(&services.globals.server_name)
        .await?;
    map.insert(
        services.globals.server_name.to_string(),
        super::pdu::valid_at(&own_keys, event_ts),
    );
    let rules = crate::service::rooms::append::rules_for(&version)?;
    let redacted = ruma::canonical_json::redact(checked.obj.clone(), &rules.redaction, None)
        .map_err(|e| Error::bad_json(format!("cannot redact: {e}")))?;
    super::verify_signed_by_all(&map, &redacted).map_err(|e| {
        Error::bad_json(format!("The invitee's server did not sign the invite: {e}"))
    })?;

    // Placed like any event whose prev events may no longer be the room's extremities: checked
    // against the state before it and the current state, resolved if the room moved on.
    super::incoming::accept(
        services,
        &services.globals.server_name,
        checked,
        false,
        false,
        &mut keys,
    )
    .await?;
    if rooms.event_meta(event_id.as_str())?.is_none() {
        // Soft-failed: the room changed while the invitee's server was asked (the inviter left,
        // lost the power to invite, the invitee was banned).
        return Err(Error::forbidden(
            "The room changed while the invite was being sent; it no longer allows this invite",
        ));
    }
    rooms.audit_membership(room_id, target, sender, "invite", None);
    Ok(())
}
