//! This server as the resident server of a room for other servers' users: event templates
//! (`make_join`, `make_leave`, `make_knock`), accepting the signed events (`send_join`,
//! `send_leave`, `send_knock`), and invites of local users to rooms elsewhere (`invite`).

use ruma::{events::StateEventType, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId};
use serde_json::{json, Value};

use super::{
    incoming::accept,
    pdu::{Incoming, KeyCache},
};
use crate::{
    error::{ErrCode, Error, Result},
    service::{
        rooms::{
            append::rules_for, membership::member_content, NewEvent, Pdu, Rooms,
            SUPPORTED_ROOM_VERSIONS,
        },
        Services,
    },
    storage::{keys, Table},
};

/// Most entries of `invite_room_state` kept with an invite.
const MAX_INVITE_STATE: usize = 64;

/// The membership handshakes another server can start here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Join,
    Leave,
    Knock,
}

impl Handshake {
    pub fn membership(self) -> &'static str {
        match self {
            Handshake::Join => "join",
            Handshake::Leave => "leave",
            Handshake::Knock => "knock",
        }
    }
}

/// Whether this server is in the room: it knows it and a local user is joined.
pub fn is_resident(rooms: &Rooms, room_id: &RoomId) -> Result<bool> {
    if !rooms.exists(room_id)? {
        return Ok(false);
    }
    let own = &rooms.globals.server_name;
    Ok(rooms
        .joined_members(room_id)?
        .iter()
        .any(|u| u.server_name() == own))
}

fn check_room_for(services: &Services, origin: &ServerName, room_id: &RoomId) -> Result<()> {
    if !is_resident(&services.rooms, room_id)? {
        return Err(Error::not_found("This server is not in the room"));
    }
    if !services.rooms.server_acl_allows(room_id, origin)? {
        return Err(Error::forbidden("The room's server ACL denies your server"));
    }
    Ok(())
}

/// `make_join`, `make_leave`, `make_knock`: the event the user's server should sign.
pub async fn make_template(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    kind: Handshake,
    versions: &[String],
) -> Result<Value> {
    if user.server_name() != origin {
        return Err(Error::forbidden("The user does not belong to your server"));
    }
    check_room_for(services, origin, room_id)?;
    let rooms = &services.rooms;
    let _guard = rooms.lock(room_id).await;
    let meta = rooms
        .meta(room_id)?
        .ok_or_else(|| Error::not_found("This server is not in the room"))?;
    if kind != Handshake::Leave {
        // A server that sends no `ver` supports room version 1 only.
        let offered = if versions.is_empty() {
            vec!["1".to_owned()]
        } else {
            versions.to_vec()
        };
        if !offered.iter().any(|v| v == meta.version.as_str()) {
            return Err(Error::new(
                ErrCode::IncompatibleRoomVersion,
                format!(
                    "The room has version {}, which your server does not support",
                    meta.version
                ),
            ));
        }
    }
    let rules = rules_for(&meta.version)?;
    let mut content = member_content(kind.membership(), None, None);
    if kind == Handshake::Join {
        let current = rooms.membership(room_id, user)?;
        let rule = rooms.join_rule(room_id)?;
        let restricted = matches!(rule.as_str(), "restricted" | "knock_restricted");
        if restricted && !matches!(current.as_deref(), Some("invite") | Some("join")) {
            match rooms.restricted_authoriser(room_id, user)? {
                Some(via) => {
                    content["join_authorised_via_users_server"] = Value::String(via.to_string())
                }
                None => {
                    return Err(Error::forbidden(
                        "The user is not in a room this room allows joining from",
                    ))
                }
            }
        }
    }
    let new = NewEvent::state("m.room.member", user.as_str(), content);
    let mut event = rooms.build_event(room_id, &meta, &rules, user, new)?;
    event["origin"] = Value::String(origin.to_string());
    // The template must pass the auth rules now, or the user's server is told no at once.
    let mut provisional = event.clone();
    provisional["event_id"] = Value::String("$template".to_owned());
    let pdu: Pdu = serde_json::from_value(provisional)
        .map_err(|e| Error::internal(format!("template: {e}")))?;
    ruma::state_res::check_state_dependent_auth_rules(
        &rules.authorization,
        &pdu,
        |t: &StateEventType, k: &str| {
            rooms
                .state_get_for_auth(room_id, &t.to_string(), k)
                .ok()
                .flatten()
        },
    )
    .map_err(|e| Error::forbidden(format!("You may not {} this room: {e}", kind.membership())))?;
    Ok(json!({ "event": event, "room_version": meta.version }))
}

/// `send_join`, `send_leave`, `send_knock`: check the signed event and accept it into the room
/// (this server forwards it to the room's other servers). Returns the event as accepted
/// (countersigned by this server for a restricted join it vouched for).
pub async fn accept_membership(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    body: &Value,
    kind: Handshake,
) -> Result<Incoming> {
    check_room_for(services, origin, room_id)?;
    let version = services.rooms.version(room_id)?;
    let mut keys = KeyCache::default();
    let mut incoming = services
        .federation
        .check_pdu(&version, body, Some(room_id), &mut keys)
        .await?;
    if incoming.event_id.as_str() != event_id {
        return Err(Error::bad_json("The event id does not match the event"));
    }
    let pdu = &incoming.pdu;
    let right_kind = pdu.kind.to_string() == "m.room.member"
        && pdu.state_key.as_deref() == Some(pdu.sender.as_str())
        && pdu.membership().as_deref() == Some(kind.membership());
    if !right_kind {
        return Err(Error::bad_json(format!(
            "The event is not a {} of its sender",
            kind.membership()
        )));
    }
    if pdu.sender.server_name() != origin {
        return Err(Error::forbidden(
            "The sender does not belong to your server",
        ));
    }
    if kind == Handshake::Join {
        let via = pdu
            .content_value()
            .get("join_authorised_via_users_server")
            .and_then(Value::as_str)
            .and_then(|u| UserId::parse(u).ok());
        if via.is_some_and(|u| u.server_name() == services.globals.server_name) {
            // We vouch for this join: our signature is what the auth rules look for.
            let rules = rules_for(&version)?;
            ruma::signatures::hash_and_sign_event(
                services.globals.server_name.as_str(),
                &services.globals.signing_key.keypair,
                &mut incoming.obj,
                &rules.redaction,
            )
            .map_err(|e| Error::bad_json(format!("cannot countersign: {e}")))?;
        }
    }
    accept(services, origin, incoming.clone(), true, true, &mut keys).await?;
    if services
        .rooms
        .event_meta(incoming.event_id.as_str())?
        .is_none()
    {
        return Err(Error::forbidden(
            "The event was not accepted by the room's current state",
        ));
    }
    Ok(incoming)
}

/// The `send_join` answer: the state before the join and the auth chain of it and the join.
pub fn join_answer(services: &Services, join: &Incoming) -> Result<Value> {
    let rooms = &services.rooms;
    let state = rooms
        .state_ids_before(&join.event_id)?
        .ok_or_else(|| Error::internal("the join has no state"))?;
    let mut pdus = Vec::with_capacity(state.len());
    for id in state.values() {
        if let Some(p) = rooms.federation_pdu(id)? {
            pdus.push(p);
        }
    }
    let starts: Vec<&ruma::EventId> = state
        .values()
        .map(|id| id.as_ref())
        .chain(std::iter::once(join.event_id.as_ref()))
        .collect();
    let mut chain = Vec::new();
    for id in rooms.auth_chain(starts)? {
        if let Some(p) = rooms.federation_pdu(&id)? {
            chain.push(p);
        }
    }
    let servers: std::collections::BTreeSet<OwnedServerName> = rooms
        .joined_members(&join.room_id)?
        .iter()
        .map(|u| u.server_name().to_owned())
        .collect();
    Ok(json!({
        "origin": services.globals.server_name,
        "state": pdus,
        "auth_chain": chain,
        "event": join.obj,
        "members_omitted": false,
        "servers_in_room": servers,
    }))
}

/// `invite` (v1 and v2): a user of `origin` invites a local user to a room. The invite is
/// countersigned and, when this server is not in the room, kept with the room's stripped state
/// so the user's clients can show it.
pub async fn receive_invite(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    version: &RoomVersionId,
    event: &Value,
    invite_room_state: Vec<Value>,
) -> Result<Value> {
    if !SUPPORTED_ROOM_VERSIONS.contains(version) {
        return Err(Error::new(
            ErrCode::IncompatibleRoomVersion,
            format!("Room version {version} is not supported here"),
        ));
    }
    if !services.rooms.server_acl_allows(room_id, origin)? {
        return Err(Error::forbidden("The room's server ACL denies your server"));
    }
    let mut keys = KeyCache::default();
    let mut incoming = services
        .federation
        .check_pdu(version, event, Some(room_id), &mut keys)
        .await?;
    if incoming.event_id.as_str() != event_id {
        return Err(Error::bad_json("The event id does not match the event"));
    }
    let pdu = &incoming.pdu;
    if pdu.kind.to_string() != "m.room.member" || pdu.membership().as_deref() != Some("invite") {
        return Err(Error::bad_json("The event is not an invite"));
    }
    if pdu.sender.server_name() != origin {
        return Err(Error::forbidden(
            "The sender does not belong to your server",
        ));
    }
    let target = pdu
        .state_key
        .as_deref()
        .and_then(|k| UserId::parse(k).ok())
        .ok_or_else(|| Error::bad_json("The invite names no user"))?;
    if target.server_name() != services.globals.server_name
        || !services
            .accounts
            .user(&target)?
            .is_some_and(|u| !u.deactivated)
    {
        return Err(Error::not_found("No such user here"));
    }
    services.policy.may_federate_with(origin)?;
    let rules = rules_for(version)?;
    ruma::signatures::hash_and_sign_event(
        services.globals.server_name.as_str(),
        &services.globals.signing_key.keypair,
        &mut incoming.obj,
        &rules.redaction,
    )
    .map_err(|e| Error::bad_json(format!("cannot countersign: {e}")))?;
    let signed = serde_json::to_value(&incoming.obj)?;
    // In the room already: the invite reaches the room's timeline through `/send`.
    if !is_resident(&services.rooms, room_id)? {
        let stripped: Vec<Value> = invite_room_state
            .into_iter()
            .filter(|e| e.is_object())
            .take(MAX_INVITE_STATE)
            .collect();
        store_remote_invite(services, &incoming, &target, stripped)?;
    }
    // The address and agent on record are the inviting server's (the request came from it).
    services
        .rooms
        .audit_membership(room_id, &target, &incoming.pdu.sender, "invite", None);
    Ok(signed)
}

/// Keep an invite to a room this server is not in: the event (with the stripped state in its
/// `unsigned`, where sync finds it), and the user's membership.
fn store_remote_invite(
    services: &Services,
    invite: &Incoming,
    target: &UserId,
    stripped: Vec<Value>,
) -> Result<()> {
    let mut stored = invite.stored_value()?;
    stored["unsigned"] = json!({ "invite_room_state": stripped });
    record_remote_membership(services, &invite.room_id, target, "invite", invite, stored)
}

/// Record a local user's membership in a room this server is not in (a remote invite, its
/// rejection, a knock): the event and the user's room list, in one batch.
pub(crate) fn record_remote_membership(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    membership: &str,
    event: &Incoming,
    stored: Value,
) -> Result<()> {
    let pending = services.globals.counter.next()?;
    let count = pending.get();
    let mut batch = services.storage.batch();
    batch.put(
        Table::Pdus,
        event.event_id.as_bytes(),
        &serde_json::to_vec(&stored)?,
    )?;
    let user_room = crate::service::rooms::UserRoom {
        membership: membership.to_owned(),
        count,
        event_id: event.event_id.clone(),
    };
    batch.put(
        Table::UserRooms,
        &keys::join(&[user.as_str(), room_id.as_str()]),
        &serde_json::to_vec(&user_room)?,
    )?;
    let mut log_key = keys::prefix(&[user.as_str(), room_id.as_str()]);
    log_key.extend_from_slice(&count.to_be_bytes());
    batch.put(Table::MembershipLog, &log_key, membership.as_bytes())?;
    let ticket = batch.commit_deferred()?;
    services.storage.make_durable(ticket)?;
    pending.finish(vec![user.to_owned()]);
    Ok(())
}
