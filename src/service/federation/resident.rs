//! This server as the resident server of a room for other servers' users: event templates
//! (`make_join`, `make_leave`, `make_knock`), accepting the signed events (`send_join`,
//! `send_leave`, `send_knock`), and invites of local users to rooms elsewhere (`invite`).

use ruma::{
    events::StateEventType, OwnedServerName, OwnedUserId, RoomId, RoomVersionId, ServerName, UserId,
};
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
    if kind != Handshake::Leave {
        crate::policy::access::check_membership(services, room_id, user, kind.membership())?;
    }
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
        if let Some(via) = restricted_join_authoriser(rooms, room_id, user)? {
            content["join_authorised_via_users_server"] = Value::String(via.to_string())
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

/// The join rule and its allow conditions for `user` joining `room_id` through this server,
/// asked by `make_join` (to fill the template) and by `send_join` (before countersigning) alike:
/// `None` when nobody needs to vouch (the rule is not restricted, or the user is invited or
/// joined already: the auth rules decide); `Some(via)`: a restricted join a local member who
/// may invite vouches for; 403 `M_FORBIDDEN` when the user meets none of the allow conditions.
pub fn restricted_join_authoriser(
    rooms: &Rooms,
    room_id: &RoomId,
    user: &UserId,
) -> Result<Option<OwnedUserId>> {
    let rule = rooms.join_rule(room_id)?;
    if !matches!(rule.as_str(), "restricted" | "knock_restricted") {
        return Ok(None);
    }
    let current = rooms.membership(room_id, user)?;
    if matches!(current.as_deref(), Some("invite") | Some("join")) {
        return Ok(None);
    }
    match rooms.restricted_authoriser(room_id, user)? {
        Some(via) => Ok(Some(via)),
        None => Err(Error::forbidden(
            "The user is not in a room this room allows joining from",
        )),
    }
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
    if kind == Handshake::Join {
        // The join rule, as make_join applies it, before anything is countersigned: a
        // restricted room stays restricted for a server that skips make_join and names one of
        // our users as the one vouching.
        let sender = body
            .get("sender")
            .and_then(Value::as_str)
            .and_then(|u| UserId::parse(u).ok())
            .ok_or_else(|| Error::bad_json("The event has no valid sender"))?;
        restricted_join_authoriser(&services.rooms, room_id, &sender)?;
    }
    let mut keys = KeyCache::default();
    // A restricted join naming one of our users in `join_authorised_via_users_server` must carry
    // our signature (room versions 8+: the authorising server signs it), and the PDU checks
    // below require every signature the event needs. The joining server cannot add it; we are
    // the one to, so it goes on before the checks. Whether the named user may vouch (joined,
    // allowed to invite) is for the auth rules in `accept`; if they refuse, the signed event is
    // dropped.
    let countersigned;
    let body = if kind == Handshake::Join && vouched_for_here(services, body) {
        countersigned = countersign(services, &version, body)?;
        &countersigned
    } else {
        body
    };
    let incoming = services
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
    if kind != Handshake::Leave {
        // The closed user groups and the room's group, again at the join or knock itself.
        crate::policy::access::check_membership(services, room_id, &pdu.sender, kind.membership())?;
        // The organization's policy service decides about other servers' users too.
        crate::policy::access::check_hook(
            services,
            &pdu.sender,
            Some(room_id),
            kind.membership(),
            [("remote".to_owned(), serde_json::json!(true))]
                .into_iter()
                .collect(),
        )
        .await?;
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

/// Whether a join event names one of our users as the one vouching for it.
fn vouched_for_here(services: &Services, event: &Value) -> bool {
    event
        .get("content")
        .and_then(|c| c.get("join_authorised_via_users_server"))
        .and_then(Value::as_str)
        .and_then(|u| UserId::parse(u).ok())
        .is_some_and(|u| u.server_name() == services.globals.server_name)
}

/// The event with our signature added (over its redacted form, as event signatures are); its
/// hashes and the other signatures are left as sent, for the PDU checks to verify.
fn countersign(services: &Services, version: &RoomVersionId, event: &Value) -> Result<Value> {
    let rules = rules_for(version)?;
    let mut obj = super::pdu::canonical_pdu(event)?;
    ruma::signatures::sign_event(
        services.globals.server_name.as_str(),
        &services.globals.signing_key.keypair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| Error::bad_json(format!("cannot countersign: {e}")))?;
    Ok(serde_json::to_value(obj)?)
}

/// The `send_join` answer: the state before the join and the auth chain of it and the join.
pub fn join_answer(services: &Services, join: &Incoming) -> Result<Value> {
    let rooms = &services.rooms;
    let state = rooms
        .state_ids_before(&join.event_id)?
        .ok_or_else(|| Error::internal("the join has no state"))?;
    // Only events of the room are served as its state and auth chain.
    let room_id = &join.room_id;
    let mut pdus = Vec::with_capacity(state.len());
    for id in state.values() {
        if let Some(p) = rooms.federation_pdu_of_room(room_id, id)? {
            pdus.push(p);
        }
    }
    let starts: Vec<&ruma::EventId> = state
        .values()
        .map(|id| id.as_ref())
        .chain(std::iter::once(join.event_id.as_ref()))
        .collect();
    let mut chain = Vec::new();
    for id in rooms.auth_chain(room_id, starts)? {
        if let Some(p) = rooms.federation_pdu_of_room(room_id, &id)? {
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
    // An id we store already: this very invite again (a retry) changes nothing; anything else
    // (room versions 1 and 2 let the sender choose ids) is refused, never stored over it.
    let already_stored = is_stored_already(&services.rooms, &incoming)?;
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
        || services
            .accounts
            .user(&target)?
            .is_none_or(|u| u.deactivated)
    {
        return Err(Error::not_found("No such user here"));
    }
    services.policy.may_federate_with(origin)?;
    let (stripped, has_create) =
        checked_room_state(services, version, room_id, invite_room_state, &mut keys).await;
    if !has_create && !stripped_room_state_tolerated(version) {
        // Spec (invite v1/v2, Matrix 1.16): SHOULD refuse with M_INVALID_PARAM for room
        // versions after 11 when the create event is missing or the entries are not PDUs.
        return Err(Error::invalid_param(
            "invite_room_state must hold the room's m.room.create event as a PDU",
        ));
    }
    crate::policy::access::check_contact(services, &pdu.sender, &target, Some(room_id), "invite")?;
    if is_resident(&services.rooms, room_id)? {
        crate::policy::access::check_invite(services, room_id, &pdu.sender, &target)?;
    }
    crate::policy::access::check_hook(
        services,
        &pdu.sender,
        Some(room_id),
        "invite",
        [
            ("target".to_owned(), serde_json::json!(target)),
            ("remote".to_owned(), serde_json::json!(true)),
        ]
        .into_iter()
        .collect(),
    )
    .await?;
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
    if !already_stored && !is_resident(&services.rooms, room_id)? {
        store_remote_invite(services, &incoming, &target, stripped).await?;
    }
    // The address and agent on record are the inviting server's (the request came from it).
    services
        .rooms
        .audit_membership(room_id, &target, &incoming.pdu.sender, "invite", None);
    Ok(signed)
}

/// The state events anyone about to join may see, as full PDUs in the room version's format:
/// what `invite_room_state` (invites) and `knock_room_state` (`send_knock`) carry to another
/// server. Since Matrix 1.16 these are PDUs and include the create event, so the receiver can
/// check their signatures and that they belong to the room (Synapse logs stripped events here
/// as unparseable; room version 12 receivers should refuse them). Clients get them stripped.
pub fn public_state_pdus(services: &Services, room_id: &RoomId) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for kind in crate::service::sync::PUBLIC_STATE_TYPES {
        if let Some(p) = services.rooms.state_get(room_id, kind, "")? {
            if let Some(pdu) = services.rooms.federation_pdu(&p.event_id)? {
                out.push(pdu);
            }
        }
    }
    Ok(out)
}

/// Room versions for which `invite_room_state` and `knock_room_state` may still be stripped
/// events, as servers before Matrix 1.16 sent them: the spec lets receivers skip the checks of
/// these lists for room versions 1 to 11, and asks them to apply the checks for later ones.
fn stripped_room_state_tolerated(version: &RoomVersionId) -> bool {
    use RoomVersionId::*;
    matches!(
        version,
        V1 | V2 | V3 | V4 | V5 | V6 | V7 | V8 | V9 | V10 | V11
    )
}

/// The `invite_room_state` or `knock_room_state` another server sent, as clients are shown it:
/// each entry that is a PDU must pass the PDU checks (format, signatures, hashes) and belong to
/// the room, and is kept stripped (`type`, `state_key`, `content`, `sender`); entries that are
/// already stripped are kept only for room versions where that is tolerated. Anything else is
/// dropped. Also says whether the room's create event was among the checked PDUs.
pub async fn checked_room_state(
    services: &Services,
    version: &RoomVersionId,
    room_id: &RoomId,
    entries: Vec<Value>,
    keys: &mut KeyCache,
) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut has_create = false;
    for entry in entries.into_iter().take(MAX_INVITE_STATE) {
        let Some(obj) = entry.as_object() else {
            continue;
        };
        if obj.contains_key("signatures") || obj.contains_key("hashes") {
            match services
                .federation
                .check_pdu(version, &entry, Some(room_id), keys)
                .await
            {
                Ok(i) if i.pdu.state_key.is_some() => {
                    has_create |= i.pdu.kind == ruma::events::TimelineEventType::RoomCreate;
                    out.push(i.pdu.to_stripped_value());
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%room_id, error = %e, "a room state entry was dropped"),
            }
            continue;
        }
        if !stripped_room_state_tolerated(version) {
            continue;
        }
        let well_formed = ["type", "state_key", "sender"]
            .iter()
            .all(|f| obj.get(*f).is_some_and(Value::is_string))
            && obj.get("content").is_some_and(Value::is_object);
        if well_formed {
            out.push(json!({
                "type": obj["type"],
                "state_key": obj["state_key"],
                "sender": obj["sender"],
                "content": obj["content"],
            }));
        }
    }
    (out, has_create)
}

/// Keep an invite to a room this server is not in: the event (with the stripped state in its
/// `unsigned`, where sync finds it), and the user's membership.
async fn store_remote_invite(
    services: &Services,
    invite: &Incoming,
    target: &UserId,
    stripped: Vec<Value>,
) -> Result<()> {
    let mut stored = invite.stored_value()?;
    stored["unsigned"] = json!({ "invite_room_state": stripped });
    record_remote_membership(services, &invite.room_id, target, "invite", invite, stored).await
}

/// Whether `event`'s id names an event this server stores already: `Ok(true)` when it is this
/// same event (room, sender, type, state key, content, timestamp), 400 `M_BAD_JSON` when it is
/// another one. A stored event is never replaced by another server's event of the same id.
pub(crate) fn is_stored_already(rooms: &Rooms, event: &Incoming) -> Result<bool> {
    let Some(stored) = rooms.pdu(event.event_id.as_str())? else {
        return Ok(false);
    };
    let new = &event.pdu;
    let same = stored.room_id == new.room_id
        && stored.sender == new.sender
        && stored.kind == new.kind
        && stored.state_key == new.state_key
        && stored.origin_server_ts == new.origin_server_ts
        && stored.content_value() == new.content_value();
    if !same {
        return Err(Error::bad_json(format!(
            "Another event with the id {} is known here",
            event.event_id
        )));
    }
    Ok(true)
}

/// Record a local user's membership in a room this server is not in (a remote invite, its
/// rejection, a knock): the event and the user's room list, in one batch. The event is
/// written only if its id is not stored yet ([`is_stored_already`]: never over another event).
pub(crate) async fn record_remote_membership(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    membership: &str,
    event: &Incoming,
    stored: Value,
) -> Result<()> {
    let write_event = !is_stored_already(&services.rooms, event)?;
    let pending = services.globals.counter.next()?;
    let count = pending.get();
    let mut batch = services.storage.batch();
    if write_event {
        batch.put(
            Table::Pdus,
            event.event_id.as_bytes(),
            &serde_json::to_vec(&stored)?,
        )?;
    }
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
    services.storage.durable(ticket).await?;
    pending.finish(vec![user.to_owned()]);
    Ok(())
}
