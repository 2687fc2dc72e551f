//! A local user joins (or knocks on, or leaves before ever joining) a room this server is not in:
//! the make_/send_ handshake with a server that is (`make_join` gives an event template, we sign
//! it, `send_join` gives the room's state and auth chain, which are checked and taken over).

use std::collections::HashMap;

use ruma::{
    room_version_rules::EventIdFormatVersion, OwnedEventId, OwnedServerName, RoomId, RoomVersionId,
    ServerName, UserId,
};
use serde_json::{json, Value};

use super::{
    incoming::{check_against_state, store_checked, urlencoding},
    pdu::{event_id_of, Incoming, KeyCache},
};
use crate::{
    error::{ErrCode, Error, Result},
    service::{
        rooms::{append::rules_for, membership::MemberProfile, StateIds, SUPPORTED_ROOM_VERSIONS},
        Services,
    },
    utils,
};

/// Most servers tried for one join.
const MAX_JOIN_SERVERS: usize = 5;
/// Largest `send_join` answer read: a room's whole state and auth chain.
const SEND_JOIN_LIMIT: usize = 128 * 1024 * 1024;
/// Most events of a `send_join` answer looked at.
const SEND_JOIN_EVENTS: usize = 100_000;

/// The servers to ask about a room, best first: the hints the client gave, then the room id's
/// server (room versions before 12 name their creator's server), without this server.
pub fn candidate_servers(
    services: &Services,
    room_id: &RoomId,
    hints: &[OwnedServerName],
) -> Vec<OwnedServerName> {
    let mut out: Vec<OwnedServerName> = Vec::new();
    let own = &services.globals.server_name;
    let from_id = room_id.server_name().map(ToOwned::to_owned);
    for s in hints.iter().cloned().chain(from_id) {
        if &s != own && !out.contains(&s) {
            out.push(s);
        }
    }
    out.truncate(MAX_JOIN_SERVERS);
    out
}

/// `ver` query parameters: the room versions this server can join.
fn versions_query() -> String {
    SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|v| format!("ver={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Join `room_id` through one of `servers`. On return the room is in this server's store with
/// its state, and the user is joined.
pub async fn join_remote(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    servers: &[OwnedServerName],
    profile: &MemberProfile,
    reason: Option<&str>,
) -> Result<()> {
    if servers.is_empty() {
        return Err(Error::not_found(
            "This server is not in the room and knows no server to join it through",
        ));
    }
    let mut last_error = None;
    for server in servers {
        match join_through(services, server, room_id, user, profile, reason).await {
            Ok(()) => {
                services
                    .rooms
                    .audit_membership(room_id, user, user, "join", None);
                return Ok(());
            }
            Err(e) => {
                tracing::info!(%room_id, %server, error = %e, "remote join failed");
                let refusal = matches!(
                    e.errcode(),
                    "M_FORBIDDEN" | "M_INCOMPATIBLE_ROOM_VERSION" | "M_UNSUPPORTED_ROOM_VERSION"
                );
                last_error = Some(e);
                if refusal {
                    // The room said no; another server of it would say the same.
                    break;
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::not_found("No server could be asked")))
}

/// A signed membership event built from a resident server's template.
pub struct Signed {
    pub event_id: OwnedEventId,
    pub version: RoomVersionId,
    pub value: Value,
}

/// `make_<kind>` at `server`, and sign the template with our key. `kind` is join, leave or knock.
pub async fn make_membership(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    kind: &str,
    profile: Option<&MemberProfile>,
    reason: Option<&str>,
) -> Result<Signed> {
    let room = urlencoding(room_id.as_str());
    let who = urlencoding(user.as_str());
    let query = if kind == "leave" {
        String::new()
    } else {
        format!("?{}", versions_query())
    };
    let answer = services
        .federation
        .send(
            http::Method::GET,
            server,
            &format!("/_matrix/federation/v1/make_{kind}/{room}/{who}{query}"),
            None,
        )
        .await?;
    let version = match answer.get("room_version").and_then(Value::as_str) {
        Some(v) => RoomVersionId::try_from(v).map_err(|_| Error::bad_json("bad room_version"))?,
        None => RoomVersionId::V1,
    };
    if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
        return Err(Error::new(
            ErrCode::IncompatibleRoomVersion,
            format!("The room's version {version} is not supported here"),
        ));
    }
    let rules = rules_for(&version)?;
    let mut template = answer
        .get("event")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| Error::bad_json("make_join gave no event template"))?;
    // The template must be the event we asked for, nothing else.
    let expected_membership = kind;
    let content_ok = template.get("type").and_then(Value::as_str) == Some("m.room.member")
        && template.get("state_key").and_then(Value::as_str) == Some(user.as_str())
        && template.get("sender").and_then(Value::as_str) == Some(user.as_str())
        && template.get("room_id").and_then(Value::as_str) == Some(room_id.as_str())
        && template
            .get("content")
            .and_then(|c| c.get("membership"))
            .and_then(Value::as_str)
            == Some(expected_membership);
    if !content_ok {
        return Err(Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            format!("{server} offered a template for another event"),
        ));
    }
    let mut content = super::super::rooms::membership::member_content(kind, profile, reason);
    if let Some(via) = template
        .get("content")
        .and_then(|c| c.get("join_authorised_via_users_server"))
    {
        content["join_authorised_via_users_server"] = via.clone();
    }
    template.insert("content".into(), content);
    template.insert("origin_server_ts".into(), json!(utils::now_ms()));
    template.insert(
        "origin".into(),
        Value::String(services.globals.server_name.to_string()),
    );
    for field in ["hashes", "signatures", "unsigned", "event_id"] {
        template.remove(field);
    }
    if rules.event_id_format == EventIdFormatVersion::V1 {
        template.insert(
            "event_id".into(),
            Value::String(format!(
                "${}:{}",
                utils::random_string(18),
                services.globals.server_name
            )),
        );
    }
    let mut obj = crate::service::rooms::pdu::to_canonical(Value::Object(template))?;
    ruma::signatures::hash_and_sign_event(
        services.globals.server_name.as_str(),
        &services.globals.signing_key.keypair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| Error::bad_json(format!("cannot sign the event: {e}")))?;
    let event_id = event_id_of(&obj, &rules)?;
    Ok(Signed {
        event_id,
        version,
        value: serde_json::to_value(&obj)?,
    })
}

async fn join_through(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    profile: &MemberProfile,
    reason: Option<&str>,
) -> Result<()> {
    let signed = make_membership(
        services,
        server,
        room_id,
        user,
        "join",
        Some(profile),
        reason,
    )
    .await?;
    let answer = services
        .federation
        .send_limited(
            http::Method::PUT,
            server,
            &format!(
                "/_matrix/federation/v2/send_join/{}/{}?omit_members=false",
                urlencoding(room_id.as_str()),
                urlencoding(signed.event_id.as_str())
            ),
            Some(signed.value.clone()),
            SEND_JOIN_LIMIT,
        )
        .await?;
    // A restricted join comes back countersigned by the resident server that vouched for it.
    let join_value = match answer.get("event") {
        Some(e) if e.is_object() => e.clone(),
        _ => signed.value.clone(),
    };
    let mut keys = KeyCache::default();
    let join = services
        .federation
        .check_pdu(&signed.version, &join_value, Some(room_id), &mut keys)
        .await?;
    if join.event_id != signed.event_id {
        return Err(Error::bad_json("send_join returned another event"));
    }
    let rules = rules_for(&signed.version)?;

    let mut events: Vec<Incoming> = Vec::new();
    let mut state_ids: Vec<OwnedEventId> = Vec::new();
    for (field, is_state) in [("auth_chain", false), ("state", true)] {
        for value in answer
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(SEND_JOIN_EVENTS)
        {
            match services
                .federation
                .check_pdu(&signed.version, value, Some(room_id), &mut keys)
                .await
            {
                Ok(i) => {
                    if is_state {
                        state_ids.push(i.event_id.clone());
                    }
                    events.push(i);
                }
                Err(e) => tracing::debug!(error = %e, "an event of send_join was refused"),
            }
        }
    }
    // The room must be what we asked for: its create event is part of the state.
    let create_ok = events.iter().any(|i| {
        i.pdu.kind.to_string() == "m.room.create"
            && i.room_id == room_id
            && state_ids.contains(&i.event_id)
    });
    if !create_ok {
        return Err(Error::bad_json(
            "send_join gave no create event for the room",
        ));
    }

    // Remember the room (version) before checking: the checks read events by room.
    let known = store_checked(&services.rooms, events, &rules)?;
    let mut state = StateIds::new();
    for id in &state_ids {
        if let Some(p) = known.get(id) {
            if let Some(k) = &p.state_key {
                state.insert((p.kind.to_string(), k.clone()), id.clone());
            }
        }
    }
    let memberships: HashMap<OwnedEventId, String> = known
        .iter()
        .filter_map(|(id, p)| Some((id.clone(), p.membership()?)))
        .collect();
    check_against_state(&services.rooms, &rules, &join.pdu, &state)?;

    let _guard = services.rooms.lock(room_id).await;
    services
        .rooms
        .install_remote_state(
            room_id,
            &signed.version,
            &state,
            &memberships,
            u64::from(join.pdu.depth),
        )
        .await?;
    services.rooms.persist_remote_join(&join, state).await?;
    Ok(())
}

/// Ask the alias's server which room it names and which servers are in it.
pub async fn resolve_remote_alias(
    services: &Services,
    alias: &ruma::RoomAliasId,
) -> Result<(ruma::OwnedRoomId, Vec<OwnedServerName>)> {
    let answer = services
        .federation
        .send(
            http::Method::GET,
            alias.server_name(),
            &format!(
                "/_matrix/federation/v1/query/directory?room_alias={}",
                urlencoding(alias.as_str())
            ),
            None,
        )
        .await
        .map_err(|e| match e.errcode() {
            "M_NOT_FOUND" => Error::not_found(format!("Room alias {alias} not found")),
            _ => e,
        })?;
    let room_id = answer
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or_else(|| Error::not_found(format!("Room alias {alias} not found")))?;
    let servers = answer
        .get("servers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().and_then(|s| ServerName::parse(s).ok()))
        .take(MAX_JOIN_SERVERS)
        .collect();
    Ok((room_id, servers))
}

/// The server of whoever invited `user` to the room (or whose room the user knocked on), as
/// this server recorded it: the natural server to join or leave through.
fn membership_origin(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
) -> Result<Vec<OwnedServerName>> {
    let Some((_, ur)) = services
        .rooms
        .user_rooms(user)?
        .into_iter()
        .find(|(r, _)| r == room_id)
    else {
        return Ok(Vec::new());
    };
    Ok(services
        .rooms
        .pdu(ur.event_id.as_str())?
        .map(|p| vec![p.sender.server_name().to_owned()])
        .unwrap_or_default())
}

/// The membership this server recorded for a local user in a room it is not in (invite,
/// knock, leave), if any.
fn remote_membership(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
) -> Result<Option<String>> {
    Ok(services
        .rooms
        .user_rooms(user)?
        .into_iter()
        .find(|(r, _)| r == room_id)
        .map(|(_, ur)| ur.membership))
}

/// A local user joins a room: here when this server is in it, else through another server.
pub async fn join(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    hints: &[OwnedServerName],
    profile: &MemberProfile,
    reason: Option<&str>,
) -> Result<()> {
    crate::policy::access::check_hook(services, user, Some(room_id), "join", Default::default())
        .await?;
    if super::resident::is_resident(&services.rooms, room_id)? {
        crate::policy::access::check_join(services, room_id, user)?;
        return services
            .rooms
            .join_room(room_id, user, profile, reason)
            .await;
    }
    let mut hints = hints.to_vec();
    hints.extend(membership_origin(services, room_id, user)?);
    let servers = candidate_servers(services, room_id, &hints);
    let allowed: Vec<OwnedServerName> = servers
        .iter()
        .filter(|s| services.policy.may_federate_with(s).is_ok())
        .cloned()
        .collect();
    if allowed.is_empty() && !servers.is_empty() {
        // Only servers the federation policy shuts out could let us in.
        return crate::policy::access::check_federation(
            services,
            Some(user),
            Some(room_id),
            &servers[0],
            "join",
        );
    }
    let servers = allowed;
    if servers.is_empty() && services.rooms.exists(room_id)? {
        // Our own room, which every local user left: only local state to go by.
        crate::policy::access::check_join(services, room_id, user)?;
        return services
            .rooms
            .join_room(room_id, user, profile, reason)
            .await;
    }
    if services.accounts.user(user)?.is_some_and(|u| u.guest) {
        // A guest joins only rooms whose m.room.guest_access is can_join; the state of a room
        // elsewhere is not known before the join, and once the resident server has the join it
        // cannot be taken back here. So guests stay with rooms this server is in.
        return Err(Error::new(
            ErrCode::GuestAccessForbidden,
            "Guests may only join rooms this server is in",
        ));
    }
    join_remote(services, room_id, user, &servers, profile, reason).await
}

/// A local user knocks on a room: here when this server is in it, else through another server.
pub async fn knock(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    hints: &[OwnedServerName],
    profile: &MemberProfile,
    reason: Option<&str>,
) -> Result<()> {
    crate::policy::access::check_hook(services, user, Some(room_id), "knock", Default::default())
        .await?;
    if super::resident::is_resident(&services.rooms, room_id)? {
        crate::policy::access::check_membership(services, room_id, user, "knock")?;
        return services
            .rooms
            .knock_room(room_id, user, profile, reason)
            .await;
    }
    let servers = candidate_servers(services, room_id, hints);
    let mut last = Error::not_found("This server is not in the room and knows no server to ask");
    for server in &servers {
        match knock_through(services, server, room_id, user, profile, reason).await {
            Ok(()) => {
                services
                    .rooms
                    .audit_membership(room_id, user, user, "knock", None);
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn knock_through(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    profile: &MemberProfile,
    reason: Option<&str>,
) -> Result<()> {
    let signed = make_membership(
        services,
        server,
        room_id,
        user,
        "knock",
        Some(profile),
        reason,
    )
    .await?;
    let (answer, knock) =
        send_membership(services, server, room_id, &signed, "v1/send_knock").await?;
    let mut keys = KeyCache::default();
    // PDUs that are improperly signed or of another room are dropped before clients see the
    // list (Matrix 1.16); what is kept is stripped.
    let entries: Vec<Value> = answer
        .get("knock_room_state")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (state, _) =
        super::resident::checked_room_state(services, &signed.version, room_id, entries, &mut keys)
            .await;
    let mut stored = knock.stored_value()?;
    stored["unsigned"] = json!({ "knock_room_state": state });
    super::resident::record_remote_membership(services, room_id, user, "knock", &knock, stored)
        .await
}

/// A local user leaves a room: here when this server is in it; a rejected invite or withdrawn
/// knock of a room elsewhere goes through `make_leave`/`send_leave` at the server that sent it.
pub async fn leave(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<&str>,
) -> Result<()> {
    if super::resident::is_resident(&services.rooms, room_id)?
        || !matches!(
            remote_membership(services, room_id, user)?.as_deref(),
            Some("invite") | Some("knock")
        )
    {
        return services.rooms.leave_room(room_id, user, reason).await;
    }
    let mut last = None;
    for server in membership_origin(services, room_id, user)? {
        match leave_through(services, &server, room_id, user, reason).await {
            Ok(()) => {
                services
                    .rooms
                    .audit_membership(room_id, user, user, "leave", None);
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    // The other server cannot be told (down, or forgot the room): the user still does not want
    // the invite, so it is declined here.
    if let Some(e) = last {
        tracing::info!(%room_id, error = %e, "could not tell the inviting server of a rejection");
    }
    let Some((_, ur)) = services
        .rooms
        .user_rooms(user)?
        .into_iter()
        .find(|(r, _)| r == room_id)
    else {
        return Ok(());
    };
    services
        .rooms
        .record_local_decline(room_id, user, &ur.event_id)
        .await?;
    services
        .rooms
        .audit_membership(room_id, user, user, "leave", Some("reject_locally"));
    Ok(())
}

async fn leave_through(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<&str>,
) -> Result<()> {
    let signed = make_membership(services, server, room_id, user, "leave", None, reason).await?;
    let (_, leave) = send_membership(services, server, room_id, &signed, "v2/send_leave").await?;
    let stored = leave.stored_value()?;
    super::resident::record_remote_membership(services, room_id, user, "leave", &leave, stored)
        .await
}

/// `PUT /_matrix/federation/{endpoint}/{roomId}/{eventId}` with our signed membership event
/// (`endpoint`: `v1/send_knock`, `v2/send_leave`): the answer, and the event as checked for
/// storing.
async fn send_membership(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    signed: &Signed,
    endpoint: &str,
) -> Result<(Value, Incoming)> {
    let answer = services
        .federation
        .send(
            http::Method::PUT,
            server,
            &format!(
                "/_matrix/federation/{endpoint}/{}/{}",
                urlencoding(room_id.as_str()),
                urlencoding(signed.event_id.as_str())
            ),
            Some(signed.value.clone()),
        )
        .await?;
    let mut keys = KeyCache::default();
    let event = services
        .federation
        .check_pdu(&signed.version, &signed.value, Some(room_id), &mut keys)
        .await?;
    Ok((answer, event))
}
