//! Room events from other servers: the checks the spec orders on receipt of a PDU, in order, and
//! what happens after them.
//!
//! 1. format, id, signatures, content hash ([`Federation::check_pdu`]; a changed content leaves
//!    only the redacted form);
//! 2. the auth events are fetched if missing (`/event_auth`), and the event must pass the auth
//!    rules against them, else it is rejected;
//! 3. missing prev events are asked for (`/get_missing_events`, at most [`MISSING_LIMIT`]), and
//!    for any still missing the state at them (`/state_ids`), so the state before the event is
//!    known: the current state when the event extends all forward extremities, else the
//!    resolution of the states after its prev events; the event must pass the auth rules
//!    against it, else it is rejected;
//! 4. soft failure: an event that would not pass against the current state is stored but not
//!    shown to clients and not built on;
//! 5. the event joins the timeline, and if it is on a fork the room's current state becomes the
//!    resolution of the current state and the state after the event.

use std::collections::{BTreeMap, HashMap, HashSet};

use ruma::{
    events::StateEventType, room_version_rules::RoomVersionRules, OwnedEventId, RoomId, ServerName,
};
use serde_json::{json, Value};

use super::pdu::{Incoming, KeyCache};
use crate::{
    error::{Error, Result},
    service::{
        rooms::{append::rules_for, append::Placement, Pdu, Rooms, StateIds},
        Services,
    },
};

/// Most events asked for in one `/get_missing_events`.
pub const MISSING_LIMIT: u64 = 20;
/// Most events fetched to learn the state at one missing prev event (`/state_ids` + `/event`).
const STATE_FETCH_LIMIT: usize = 5_000;
/// Most missing prev events whose state is fetched for one event.
const MISSING_PREVS_LIMIT: usize = 5;
/// Most events in one `/event_auth` answer that are looked at.
const AUTH_FETCH_LIMIT: usize = 5_000;

/// Process the PDUs of an incoming `/send` transaction: each is accepted into its room or gets
/// an error string, as the transaction's answer reports.
pub async fn handle_pdus(
    services: &Services,
    origin: &ServerName,
    pdus: Vec<Value>,
) -> BTreeMap<String, std::result::Result<(), String>> {
    let mut out = BTreeMap::new();
    let mut keys = KeyCache::default();
    for (i, value) in pdus.into_iter().enumerate() {
        let fallback = value
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("unknown-{i}"));
        match handle_one(services, origin, &value, &mut keys).await {
            Ok(id) => {
                out.insert(id.to_string(), Ok(()));
            }
            Err((id, e)) => {
                tracing::debug!(%origin, error = %e, "incoming PDU refused");
                out.insert(id.unwrap_or(fallback), Err(e.to_string()));
            }
        }
    }
    out
}

async fn handle_one(
    services: &Services,
    origin: &ServerName,
    value: &Value,
    keys: &mut KeyCache,
) -> std::result::Result<OwnedEventId, (Option<String>, Error)> {
    let room_id = value
        .get("room_id")
        .and_then(Value::as_str)
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or((None, Error::bad_json("room_id is missing")))?;
    let version = services
        .rooms
        .meta(&room_id)
        .map_err(|e| (None, e))?
        .ok_or((None, Error::not_found("This server is not in the room")))?
        .version;
    services
        .rooms
        .ensure_server_acl(&room_id, origin)
        .map_err(|e| (None, e))?;
    let incoming = services
        .federation
        .check_pdu(&version, value, Some(&room_id), keys)
        .await
        .map_err(|e| (None, e))?;
    let id = incoming.event_id.clone();
    accept(services, origin, incoming, true, false, keys)
        .await
        .map_err(|e| (Some(id.to_string()), e))?;
    Ok(id)
}

/// Accept a checked event into its room (steps 2 to 5 of the module comment). `may_fetch`:
/// whether missing prev events may be asked for (not for events that themselves came from
/// `/get_missing_events`). `broadcast`: whether this server forwards the event to the other
/// servers in the room (events it is the resident server for: `send_join`, `send_leave`,
/// `send_knock`), never for events from `/send`.
pub async fn accept(
    services: &Services,
    origin: &ServerName,
    incoming: Incoming,
    may_fetch: bool,
    broadcast: bool,
    keys: &mut KeyCache,
) -> Result<()> {
    let rooms = &services.rooms;
    // An id that names a stored event of another room (room versions 1 and 2 let the sender
    // choose ids) is refused, not taken for "already there".
    rooms.pdu_of_room(&incoming.room_id, &incoming.event_id)?;
    // Already in the timeline, or in the history fetched by backfill: an old event that must
    // not be placed again as if it were new.
    if rooms.event_meta(incoming.event_id.as_str())?.is_some()
        || rooms.is_backfilled(incoming.event_id.as_str())?
    {
        return Ok(());
    }
    let meta = rooms
        .meta(&incoming.room_id)?
        .ok_or_else(|| Error::not_found("This server is not in the room"))?;
    let rules = rules_for(&meta.version)?;

    fetch_missing_auth(services, origin, &incoming, &meta.version, keys).await?;
    check_against_auth_events(rooms, &rules, &incoming.pdu, &HashMap::new())?;

    let mut prev_states: HashMap<OwnedEventId, StateIds> = HashMap::new();
    let missing: Vec<OwnedEventId> = missing_prevs(rooms, &incoming.pdu)?;
    if !missing.is_empty() && may_fetch {
        fetch_missing_prevs(services, origin, &incoming, &meta.extremities, keys).await;
        for prev in missing_prevs(rooms, &incoming.pdu)?
            .into_iter()
            .take(MISSING_PREVS_LIMIT)
        {
            let state =
                fetch_state_after(services, origin, &incoming, &prev, &meta.version, keys).await?;
            prev_states.insert(prev, state);
        }
    }

    let _guard = rooms.lock(&incoming.room_id).await;
    if rooms.event_meta(incoming.event_id.as_str())?.is_some() {
        return Ok(());
    }
    let meta = rooms
        .meta(&incoming.room_id)?
        .ok_or_else(|| Error::not_found("This server is not in the room"))?;
    let pdu = &incoming.pdu;

    let prevs: HashSet<&OwnedEventId> = pdu.prev_events.iter().collect();
    let extends_all = prevs == meta.extremities.iter().collect::<HashSet<_>>();
    let state_before = if extends_all {
        None
    } else {
        let mut states = Vec::new();
        for prev in &pdu.prev_events {
            if let Some(s) = prev_states.remove(prev) {
                states.push(s);
            } else if let Some(s) = rooms.state_ids_after(&incoming.room_id, prev)? {
                states.push(s);
            }
        }
        if states.is_empty() {
            return Err(Error::bad_json(
                "the state before the event cannot be worked out (its prev events are unknown)",
            ));
        }
        Some(rooms.resolve_states(&incoming.room_id, &meta.version, &states)?)
    };

    // Against the state before the event: rejected on failure.
    match &state_before {
        None => check_against_current(rooms, &rules, pdu)?,
        Some(state) => check_against_state(rooms, &rules, pdu, state)?,
    }
    // Against the current state: soft-failed on failure (kept, not shown, not built on).
    if state_before.is_some() && check_against_current(rooms, &rules, pdu).is_err() {
        tracing::info!(event = %pdu.event_id, "soft-failed an incoming event");
        rooms.store_outlier(&incoming)?;
        return Ok(());
    }

    // Our membership policies, for another server's invite, join or knock in a room here (the
    // same check as for local events). Refused, it is not stored: our users never share the room
    // with someone the law keeps from them, whatever other servers accepted.
    rooms.admit_membership(&incoming.room_id, pdu)?;

    let mut extremities: Vec<OwnedEventId> = meta
        .extremities
        .iter()
        .filter(|e| !prevs.contains(e))
        .cloned()
        .collect();
    extremities.push(pdu.event_id.clone());
    let placement = match state_before {
        None => Placement {
            extremities,
            resolved: None,
            state_before: None,
            rebroadcast: broadcast,
        },
        Some(before) => {
            let current = rooms.current_state_ids(&incoming.room_id)?;
            let mut after = before.clone();
            if let Some(k) = &pdu.state_key {
                after.insert((pdu.kind.to_string(), k.clone()), pdu.event_id.clone());
            }
            // The event is not stored yet; resolution reads it, so it goes in first as an
            // outlier (its timeline entry follows in the same room lock).
            rooms.store_outlier(&incoming)?;
            let resolved = rooms.resolve_states(
                &incoming.room_id,
                &meta.version,
                &[current.clone(), after],
            )?;
            let mut changes = Vec::new();
            for (key, id) in &resolved {
                if current.get(key) != Some(id) {
                    if key.0 == "m.room.member"
                        && *id != pdu.event_id
                        && !membership_admitted(rooms, &incoming.room_id, id)?
                    {
                        // A membership our policies refused (when it came, or now) must not
                        // come in through the state of a later event either: the key keeps its
                        // current value here, whatever the other servers resolved.
                        continue;
                    }
                    changes.push((key.0.clone(), key.1.clone(), Some(id.clone())));
                }
            }
            // Keys the resolution dropped (only one branch had them and their event fails the
            // auth rules against the resolved state) leave the current state: otherwise this
            // server keeps state that the other servers resolving the same fork do not have.
            for key in current.keys() {
                if !resolved.contains_key(key) {
                    changes.push((key.0.clone(), key.1.clone(), None));
                }
            }
            Placement {
                extremities,
                resolved: Some(changes),
                state_before: Some(before),
                rebroadcast: broadcast,
            }
        }
    };
    // A local user's membership changed by another server's user (a remote kick, ban, invite):
    // the audit entry, with the membership before the event to tell a kick from an unban.
    let local_member = remote_change_of_local_member(services, pdu).map(|target| {
        let before = rooms.membership(&incoming.room_id, &target).ok().flatten();
        (target, before)
    });
    let (_, deferred) = rooms.persist_deferred(
        &incoming.room_id,
        meta,
        incoming.obj.clone(),
        incoming.pdu.clone(),
        None,
        placement,
    )?;
    drop(_guard);
    if let Some((target, before)) = local_member {
        audit_remote_membership(services, &incoming, &target, before.as_deref());
    }
    deferred.complete(&services.storage).await
}

/// Whether the membership event `id`, which state resolution would make current, passes the
/// membership policies (`Rooms::admit_membership`; a refusal is audited there and logged here).
fn membership_admitted(rooms: &Rooms, room_id: &RoomId, id: &OwnedEventId) -> Result<bool> {
    let Some(member) = rooms.pdu(id.as_str())? else {
        return Ok(true);
    };
    match rooms.admit_membership(room_id, &member) {
        Ok(()) => Ok(true),
        Err(e) if e.is_policy_denial() || e.errcode() == "M_GUEST_ACCESS_FORBIDDEN" => {
            tracing::info!(event = %id, error = %e, "a membership from state resolution was refused");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The local user whose membership `pdu` changes when it is an `m.room.member` event of a local
/// user sent by another server's user; None for every other event (no storage read).
fn remote_change_of_local_member(services: &Services, pdu: &Pdu) -> Option<ruma::OwnedUserId> {
    if pdu.kind != ruma::events::TimelineEventType::RoomMember {
        return None;
    }
    let local = &services.globals.server_name;
    if pdu.sender.server_name() == local {
        return None;
    }
    let target = ruma::UserId::parse(pdu.state_key.as_deref()?).ok()?;
    (target.server_name() == local).then_some(target)
}

/// Write the `membership` audit entry of a remote change of a local user's membership. Invites
/// this server countersigned came through `/invite` and are audited there already.
fn audit_remote_membership(
    services: &Services,
    incoming: &Incoming,
    target: &ruma::UserId,
    before: Option<&str>,
) {
    let Some(membership) = incoming.pdu.membership() else {
        return;
    };
    let action = match (membership.as_str(), before) {
        ("leave", Some("ban")) => Some("unban"),
        ("leave", _) => Some("kick"),
        ("ban", _) => Some("ban"),
        ("invite", _) => {
            let countersigned = incoming
                .obj
                .get("signatures")
                .and_then(|s| match s {
                    ruma::CanonicalJsonValue::Object(o) => {
                        o.get(services.globals.server_name.as_str())
                    }
                    _ => None,
                })
                .is_some();
            if countersigned {
                return;
            }
            None
        }
        _ => None,
    };
    services.rooms.audit_membership(
        &incoming.room_id,
        target,
        &incoming.pdu.sender,
        &membership,
        action,
    );
}

/// The prev events of `pdu` that are not in the room's timeline. (A prev event of another room
/// was refused before: [`check_against_auth_events`] runs first.)
fn missing_prevs(rooms: &Rooms, pdu: &Pdu) -> Result<Vec<OwnedEventId>> {
    let room_id = pdu.room()?;
    let mut out = Vec::new();
    for p in &pdu.prev_events {
        match rooms.event_meta(p.as_str())? {
            Some(meta) if meta.room_id == room_id => {}
            Some(_) => {
                return Err(Error::bad_json(format!(
                    "prev event {p} belongs to another room"
                )))
            }
            None => out.push(p.clone()),
        }
    }
    Ok(out)
}

/// Fetch the auth chain of the event from `origin` when some of its auth events are unknown,
/// and store the ones that pass their own auth checks as outliers.
async fn fetch_missing_auth(
    services: &Services,
    origin: &ServerName,
    incoming: &Incoming,
    version: &ruma::RoomVersionId,
    keys: &mut KeyCache,
) -> Result<()> {
    let rooms = &services.rooms;
    let mut unknown = false;
    for a in &incoming.pdu.auth_events {
        if rooms.pdu_of_room(&incoming.room_id, a)?.is_none() {
            unknown = true;
        }
    }
    if !unknown {
        return Ok(());
    }
    let path = format!(
        "/_matrix/federation/v1/event_auth/{}/{}",
        urlencoding(incoming.room_id.as_str()),
        urlencoding(incoming.event_id.as_str())
    );
    let answer = services
        .federation
        .send_limited(http::Method::GET, origin, &path, None, 64 * 1024 * 1024)
        .await?;
    let chain = answer
        .get("auth_chain")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    store_checked_outliers(services, &incoming.room_id, version, chain, keys).await?;
    for a in &incoming.pdu.auth_events {
        if rooms.pdu_of_room(&incoming.room_id, a)?.is_none() {
            return Err(Error::bad_json(format!("auth event {a} is unknown")));
        }
    }
    Ok(())
}

/// Check events of a room (signatures, hashes, auth against their own auth events, in depth
/// order) and store those that pass as outliers. Returns the ones stored or already known.
pub async fn store_checked_outliers(
    services: &Services,
    room_id: &RoomId,
    version: &ruma::RoomVersionId,
    events: Vec<Value>,
    keys: &mut KeyCache,
) -> Result<HashMap<OwnedEventId, Pdu>> {
    let rooms = &services.rooms;
    let rules = rules_for(version)?;
    let mut checked = Vec::new();
    for value in events.into_iter().take(AUTH_FETCH_LIMIT) {
        match services
            .federation
            .check_pdu(version, &value, Some(room_id), keys)
            .await
        {
            Ok(i) => checked.push(i),
            Err(e) => tracing::debug!(error = %e, "a fetched event was refused"),
        }
    }
    store_checked(rooms, checked, &rules)
}

/// Auth-check already verified events in depth order and store the ones that pass as outliers.
pub fn store_checked(
    rooms: &Rooms,
    mut checked: Vec<Incoming>,
    rules: &RoomVersionRules,
) -> Result<HashMap<OwnedEventId, Pdu>> {
    checked.sort_by_key(|i| (u64::from(i.pdu.depth), i.event_id.clone()));
    let mut known: HashMap<OwnedEventId, Pdu> = HashMap::new();
    for inc in checked {
        // Already stored: known, as stored (never replaced), when it is of this room; an id of
        // another room's event (room versions 1 and 2) is dropped with the rest of the lies.
        match rooms.pdu_of_room(&inc.room_id, &inc.event_id) {
            Ok(Some(stored)) => {
                known.insert(inc.event_id.clone(), stored);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(event = %inc.event_id, error = %e, "rejected a fetched event");
                continue;
            }
        }
        match check_against_auth_events(rooms, rules, &inc.pdu, &known) {
            Ok(()) => {
                rooms.store_outlier(&inc)?;
                known.insert(inc.event_id.clone(), inc.pdu.clone());
            }
            Err(e) => {
                tracing::debug!(event = %inc.event_id, error = %e, "rejected a fetched event")
            }
        }
    }
    Ok(known)
}

/// Ask `origin` for the events between our forward extremities and this event, and accept those
/// it returns, oldest first (without fetching further).
async fn fetch_missing_prevs(
    services: &Services,
    origin: &ServerName,
    incoming: &Incoming,
    extremities: &[OwnedEventId],
    keys: &mut KeyCache,
) {
    let path = format!(
        "/_matrix/federation/v1/get_missing_events/{}",
        urlencoding(incoming.room_id.as_str())
    );
    let body = json!({
        "earliest_events": extremities,
        "latest_events": [incoming.event_id],
        "limit": MISSING_LIMIT,
        "min_depth": 0,
    });
    let answer = match services
        .federation
        .send(http::Method::POST, origin, &path, Some(body))
        .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%origin, error = %e, "get_missing_events failed");
            return;
        }
    };
    let Ok(version) = services.rooms.version(&incoming.room_id) else {
        return;
    };
    let mut events = Vec::new();
    for value in answer
        .get("events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(MISSING_LIMIT as usize)
    {
        if let Ok(i) = services
            .federation
            .check_pdu(&version, value, Some(&incoming.room_id), keys)
            .await
        {
            events.push(i);
        }
    }
    events.sort_by_key(|i| u64::from(i.pdu.depth));
    for event in events {
        let id = event.event_id.clone();
        if let Err(e) = Box::pin(accept(services, origin, event, false, false, keys)).await {
            tracing::debug!(event = %id, error = %e, "a missing event was refused");
        }
    }
}

/// The state after a prev event this server does not have: `/state_ids` at it, the events of
/// it fetched and checked, plus the event itself.
async fn fetch_state_after(
    services: &Services,
    origin: &ServerName,
    incoming: &Incoming,
    prev: &OwnedEventId,
    version: &ruma::RoomVersionId,
    keys: &mut KeyCache,
) -> Result<StateIds> {
    let room = urlencoding(incoming.room_id.as_str());
    let answer = services
        .federation
        .send_limited(
            http::Method::GET,
            origin,
            &format!(
                "/_matrix/federation/v1/state_ids/{room}?event_id={}",
                urlencoding(prev.as_str())
            ),
            None,
            64 * 1024 * 1024,
        )
        .await?;
    let ids: Vec<OwnedEventId> = answer
        .get("pdu_ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(
            answer
                .get("auth_chain_ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        )
        .filter_map(|v| v.as_str().and_then(|s| OwnedEventId::try_from(s).ok()))
        .take(STATE_FETCH_LIMIT)
        .collect();
    let state_ids: Vec<OwnedEventId> = answer
        .get("pdu_ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().and_then(|s| OwnedEventId::try_from(s).ok()))
        .take(STATE_FETCH_LIMIT)
        .collect();
    let mut wanted: Vec<OwnedEventId> = Vec::new();
    for id in ids.iter().chain(std::iter::once(prev)) {
        // An id of another room's event stored here makes the whole answer a lie: refused.
        if services.rooms.pdu_of_room(&incoming.room_id, id)?.is_none() && !wanted.contains(id) {
            wanted.push(id.clone());
        }
    }
    let mut fetched = Vec::new();
    for chunk in wanted.chunks(16) {
        let results = futures_util::future::join_all(chunk.iter().map(|id| async move {
            let path = format!("/_matrix/federation/v1/event/{}", urlencoding(id.as_str()));
            services
                .federation
                .send(http::Method::GET, origin, &path, None)
                .await
        }))
        .await;
        for answer in results.into_iter().flatten() {
            if let Some(pdu) = answer
                .get("pdus")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
            {
                fetched.push(pdu.clone());
            }
        }
    }
    store_checked_outliers(services, &incoming.room_id, version, fetched, keys).await?;
    let mut state = StateIds::new();
    for id in state_ids.iter().chain(std::iter::once(prev)) {
        if let Some(p) = services.rooms.pdu_of_room(&incoming.room_id, id)? {
            if let Some(k) = p.state_key {
                state.insert((p.kind.to_string(), k), p.event_id);
            }
        }
    }
    Ok(state)
}

/// The auth rules against the event's own auth events (step 2). `extra`: events checked in the
/// same batch and not stored yet.
pub fn check_against_auth_events(
    rooms: &Rooms,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    extra: &HashMap<OwnedEventId, Pdu>,
) -> Result<()> {
    // Events never cross rooms: an event naming another room's event as prev or auth event is
    // rejected here, the first check every received or fetched event goes through after its
    // signatures; and auth events are only ever read as events of its room.
    rooms.ensure_refs_in_room(pdu)?;
    let room_id = pdu.room()?;
    let fetch = |id: &ruma::EventId| -> Option<Pdu> {
        extra
            .get(id)
            .filter(|p| p.room_id.as_deref() == Some(room_id))
            .cloned()
            .or_else(|| rooms.pdu_of_room_or_none(room_id, id))
    };
    if pdu.kind == ruma::events::TimelineEventType::RoomCreate
        && rules.authorization.room_create_event_id_as_room_id
    {
        // A v12 create event is checked as sent: without the room id derived from it.
        let mut sent = pdu.clone();
        sent.room_id = None;
        return ruma::state_res::check_state_independent_auth_rules(
            &rules.authorization,
            &sent,
            fetch,
        )
        .map_err(|e| Error::forbidden(format!("event not authorized: {e}")));
    }
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, fetch)
        .map_err(|e| Error::forbidden(format!("event not authorized: {e}")))?;
    let mut by_key: HashMap<(String, String), Pdu> = HashMap::new();
    // Room version 12 leaves the create event out of auth events: the room id names it.
    let create_id = if rules.authorization.room_create_event_id_as_room_id {
        pdu.room_id
            .as_ref()
            .and_then(|r| OwnedEventId::try_from(format!("${}", &r.as_str()[1..])).ok())
    } else {
        None
    };
    for id in pdu.auth_events.iter().chain(create_id.as_ref()) {
        let Some(a) = fetch(id) else {
            return Err(Error::bad_json(format!("auth event {id} is unknown")));
        };
        if let Some(k) = &a.state_key {
            by_key.insert((a.kind.to_string(), k.clone()), a);
        }
    }
    ruma::state_res::check_state_dependent_auth_rules(
        &rules.authorization,
        pdu,
        |t: &StateEventType, k: &str| by_key.get(&(t.to_string(), k.to_owned())).cloned(),
    )
    .map_err(|e| Error::forbidden(format!("event not authorized by its auth events: {e}")))
}

/// The auth rules against a given room state.
pub fn check_against_state(
    rooms: &Rooms,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    state: &StateIds,
) -> Result<()> {
    let room_id = pdu.room()?;
    ruma::state_res::check_state_dependent_auth_rules(
        &rules.authorization,
        pdu,
        |t: &StateEventType, k: &str| {
            state
                .get(&(t.to_string(), k.to_owned()))
                .and_then(|id| rooms.pdu_of_room_or_none(room_id, id))
        },
    )
    .map_err(|e| Error::forbidden(format!("event not authorized by the room state: {e}")))
}

/// The auth rules against the room's current state. Call under the room's lock.
pub fn check_against_current(rooms: &Rooms, rules: &RoomVersionRules, pdu: &Pdu) -> Result<()> {
    let room_id = pdu.room()?;
    ruma::state_res::check_state_dependent_auth_rules(
        &rules.authorization,
        pdu,
        |t: &StateEventType, k: &str| {
            rooms
                .state_get_for_auth(room_id, &t.to_string(), k)
                .ok()
                .flatten()
        },
    )
    .map_err(|e| Error::forbidden(format!("event not authorized by the current state: {e}")))
}

/// Percent-encode a path segment (ids contain `!`, `$`, `:`, `#`, and v12 ids `/`-free base64).
pub fn urlencoding(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
