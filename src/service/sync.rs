//! `/sync`: initial and incremental.
//!
//! A sync reads everything for the user in the stream range `(since, up_to]`, where `up_to` is
//! the counter's watermark (every count below it is committed, so nothing is skipped). Tokens are
//! `s<position>`: "the client has seen everything up to and including this position"; `/messages`
//! reads the same positions, so a timeline's `prev_batch` is the position just before its first event. When there is nothing new, the request waits on the user's notifier
//! until a change that concerns them is committed, or until the timeout.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use ruma::{
    api::client::filter::{FilterDefinition, RoomEventFilter},
    OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId,
};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    service::{
        accounts::Identity,
        filter::{lazy_loading, room_event_matches, sender_matches, type_matches},
        keys::ListChange,
        receipts::receipt_content,
        rooms::{visibility::At, Pdu, UserRoom},
        to_device::MAX_PER_SYNC,
        Services,
    },
};

/// Most timeline events one room sends in one sync, whatever the filter asks.
const MAX_TIMELINE_LIMIT: usize = 200;
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// How many events one timeline walk may look at before giving up (a filter that matches little).
const MAX_TIMELINE_SCAN: usize = 2000;
/// Longest long-poll a client may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);

pub struct SyncRequest {
    pub since: Option<u64>,
    /// The to-device part of the `since` token, when the last response delivered only part.
    pub since_to_device: Option<u64>,
    pub full_state: bool,
    pub filter: FilterDefinition,
    pub timeout: Duration,
    /// "online", "unavailable", "offline" (None: online).
    pub set_presence: Option<String>,
}

/// A sync token: `s<position>`, or `s<position>_<to-device>` when the device's to-device inbox
/// was delivered only in part (the second number is the last message delivered, which the next
/// sync acknowledges instead of the whole position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub position: u64,
    pub to_device: Option<u64>,
}

/// Parse a sync token (a bare number is accepted too).
pub fn parse_token(token: &str) -> Result<SyncToken> {
    let invalid = || Error::invalid_param("Invalid stream token");
    let body = token.strip_prefix('s').unwrap_or(token);
    let (position, to_device) = match body.split_once('_') {
        Some((p, t)) => (p, Some(t.parse::<u64>().map_err(|_| invalid())?)),
        None => (body, None),
    };
    Ok(SyncToken {
        position: position.parse::<u64>().map_err(|_| invalid())?,
        to_device,
    })
}

pub fn make_token(position: u64) -> String {
    format!("s{position}")
}

/// The users who share a joined room with `user` (the user included).
pub fn room_mates(services: &Services, user: &UserId) -> Result<Vec<OwnedUserId>> {
    let mut set: HashSet<OwnedUserId> = HashSet::new();
    set.insert(user.to_owned());
    for room in services.rooms.joined_rooms(user)? {
        set.extend(services.rooms.joined_members(&room)?.iter().cloned());
    }
    Ok(set.into_iter().collect())
}

/// Whose device lists `user` must refetch (`changed`) or may forget (`left`), from the
/// device-list log between two positions: key changes of users sharing a room with them, users
/// who joined a room of theirs or whose rooms they joined, and users they no longer share any
/// room with. The user's own key changes are included (their other devices care).
pub fn device_list_changes(
    services: &Services,
    user: &UserId,
    from: u64,
    to: u64,
) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
    let changes = services.keys.changes(from, to)?;
    if changes.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let my_rooms: Vec<OwnedRoomId> = services.rooms.joined_rooms(user)?;
    let mut changed: BTreeSet<OwnedUserId> = BTreeSet::new();
    let mut left: BTreeSet<OwnedUserId> = BTreeSet::new();
    let mut note = |other: &UserId, joined: bool| {
        if joined {
            changed.insert(other.to_owned());
        } else {
            left.insert(other.to_owned());
        }
    };
    for (_, change) in changes {
        match change {
            ListChange::Keys { user: other } => note(&other, true),
            ListChange::Membership {
                user: other,
                room,
                joined,
            } => {
                if *other == *user {
                    for member in services.rooms.joined_members(&room)?.iter() {
                        if **member != *user {
                            note(member, joined);
                        }
                    }
                } else if my_rooms.contains(&room) || !joined {
                    note(&other, joined);
                }
            }
        }
    }
    // Judged by who shares a room now: a mate is never "left", a stranger never "changed".
    // Checked per candidate against the in-memory member sets of the user's rooms, rather than
    // building the set of everybody the user shares a room with on every sync.
    let shares_room = |other: &UserId| -> Result<bool> {
        if other == user {
            return Ok(true);
        }
        for room in &my_rooms {
            if services.rooms.joined_members(room)?.contains(other) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let mut changed_out = Vec::new();
    for u in changed {
        if shares_room(&u)? {
            changed_out.push(u);
        }
    }
    let mut left_out = Vec::new();
    for u in left {
        if *u != *user && !shares_room(&u)? {
            left_out.push(u);
        }
    }
    Ok((changed_out, left_out))
}

/// Mark the user present, as every sync does unless the client asks to stay offline
/// (`set_presence`: "online", "unavailable", "offline"; None is online).
pub fn note_presence(services: &Services, user: &UserId, set_presence: Option<&str>) -> Result<()> {
    if services.policy.presence_enabled() {
        let presence = set_presence.unwrap_or("online");
        if presence != "offline"
            && services
                .presence
                .set(user, presence, None, || room_mates(services, user))?
        {
            if let Err(e) = crate::service::appservice::ephemeral::presence(services, user) {
                tracing::warn!("queueing presence for appservices: {e}");
            }
            if let Err(e) = crate::service::federation::edu::send_presence(services, user) {
                tracing::warn!("queueing presence: {e}");
            }
        }
    }
    Ok(())
}

/// The long-poll both syncs share: `attempt(up_to, last)` builds a response up to the watermark
/// `up_to` and returns None when it has nothing to say (it must answer when `last`, the
/// timeout having passed). Between attempts the request sleeps on the user's notifier until a
/// change that concerns them is committed.
pub async fn long_poll<T>(
    services: &Services,
    user: &UserId,
    timeout: Duration,
    mut attempt: impl FnMut(u64, bool) -> Result<Option<T>>,
) -> Result<T> {
    // Subscribe before reading the watermark: a change committed in between still wakes us.
    let mut rx = services.globals.counter.notifier().subscribe(user);
    let deadline = tokio::time::Instant::now() + timeout.min(MAX_TIMEOUT);
    loop {
        let up_to = services.globals.counter.watermark();
        let last = tokio::time::Instant::now() >= deadline;
        if let Some(answer) = attempt(up_to, last)? {
            return Ok(answer);
        }
        if last {
            return Err(Error::internal("long poll gave no answer at its deadline"));
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The notifier went away (shutdown): answer with what we have.
                    tokio::time::sleep_until(deadline).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Run one `/sync` request, long-polling when there is nothing new.
pub async fn sync(services: &Services, who: &Identity, req: SyncRequest) -> Result<Value> {
    let user = &who.user_id;
    note_presence(services, user, req.set_presence.as_deref())?;

    // The device has seen everything its `since` token covers: those to-device messages go.
    if let Some(since) = req.since {
        let acknowledged = req.since_to_device.unwrap_or(since);
        services
            .to_device
            .acknowledge(user, &who.device_id, acknowledged)?;
    }

    long_poll(services, user, req.timeout, |up_to, last| {
        let builder = Builder {
            s: services,
            who,
            req: &req,
            up_to,
        };
        let (mut body, empty, to_device_partial) = builder.build()?;
        if empty && req.since.is_some() && !req.full_state && !last {
            return Ok(None);
        }
        let next = match req.since {
            Some(since) if empty => since,
            Some(since) => since.max(up_to),
            None => up_to,
        };
        let token = match to_device_partial {
            Some(last) => format!("{}_{last}", make_token(next)),
            None => make_token(next),
        };
        body["next_batch"] = Value::String(token);
        Ok(Some(body))
    })
    .await
}

/// The one-time key counts and unused fallback key types of a device, as both syncs send them.
pub fn key_counts(services: &Services, who: &Identity) -> Result<(Value, Value)> {
    let mut counts = services
        .keys
        .one_time_key_counts(&who.user_id, &who.device_id)?;
    // Clients read a missing count as "the server does not report counts": say zero.
    counts.entry("signed_curve25519".into()).or_insert(0);
    let fallback = services
        .keys
        .unused_fallback_key_types(&who.user_id, &who.device_id)?;
    Ok((json!(counts), json!(fallback)))
}

/// The event in client format; the sending device also gets its transaction id back.
pub fn client_event(services: &Services, who: &Identity, pdu: &Pdu) -> Value {
    services
        .rooms
        .client_event_for(pdu, &who.user_id, who.device_id.as_str())
        .unwrap_or_else(|_| pdu.to_client_value(None))
}

/// A room's view of the timeline for one sync.
pub struct Timeline {
    pub events: Vec<(u64, Pdu)>,
    pub limited: bool,
}

impl Timeline {
    /// Tokens are positions ("seen up to here", as `/messages` reads them): the position just
    /// before the first event continues backwards from it.
    pub fn prev_batch(&self, since: Option<u64>, up_to: u64) -> String {
        let prev = match self.events.first() {
            Some((count, _)) => count.saturating_sub(1),
            None => since.unwrap_or(up_to).min(up_to),
        };
        make_token(prev)
    }
}

/// The newest (at most `limit`) events in `(after, up_to]` the user may see and the filter lets
/// through; `limited` when more were left out (or the walk gave up on a filter matching little).
pub fn timeline_window(
    services: &Services,
    user: &UserId,
    room_id: &RoomId,
    filter: &RoomEventFilter,
    limit: usize,
    after: u64,
    up_to: u64,
) -> Result<Timeline> {
    let mut viewer = services.rooms.viewer(room_id, user);
    let mut out: Vec<(u64, Pdu)> = Vec::new();
    let mut top = up_to;
    let mut scanned = 0usize;
    let mut limited = false;
    'walk: while top > after {
        let (chunk, more) = services.rooms.timeline_since(room_id, after, top, 50)?;
        if chunk.is_empty() {
            break;
        }
        for (count, pdu) in chunk.into_iter().rev() {
            scanned += 1;
            top = count.saturating_sub(1);
            if !room_event_matches(
                filter,
                pdu.kind.to_string().as_str(),
                Some(pdu.sender.as_ref()),
            ) {
                continue;
            }
            // The history visibility in force at the event decides (the user's own
            // membership events are always theirs to see).
            if !viewer.can_see(&pdu, At::Stream(count))? {
                continue;
            }
            if out.len() >= limit {
                limited = true;
                break 'walk;
            }
            out.push((count, pdu));
        }
        if !more {
            break;
        }
        if scanned >= MAX_TIMELINE_SCAN {
            limited = true;
            break;
        }
    }
    out.reverse();
    Ok(Timeline {
        events: out,
        limited,
    })
}

/// Stripped state for an invite or knock: enough to show the room before joining.
pub fn stripped_state(
    services: &Services,
    user: &UserId,
    room_id: &RoomId,
    ur: &UserRoom,
) -> Result<Vec<Value>> {
    let own = services.rooms.pdu(ur.event_id.as_str())?;
    // A room this server is not in: the state the inviting (or knocked-at) server sent along.
    if !services.rooms.exists(room_id)? {
        let mut out: Vec<Value> = own
            .as_ref()
            .and_then(|p| p.unsigned.as_ref())
            .and_then(|u| {
                u.get("invite_room_state")
                    .or_else(|| u.get("knock_room_state"))
            })
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(own) = own {
            out.push(own.to_stripped_value());
        }
        return Ok(out);
    }
    let mut out = public_stripped_state(services, room_id)?;
    if let Some(own) = own {
        // The inviter's own member event tells the client who invited.
        if own.sender != *user {
            if let Some(p) =
                services
                    .rooms
                    .state_get(room_id, "m.room.member", own.sender.as_str())?
            {
                out.push(p.to_stripped_value());
            }
        }
        out.push(own.to_stripped_value());
    }
    Ok(out)
}

/// The types of the state events anyone about to join may see (their state keys are empty).
pub const PUBLIC_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// The state events anyone about to join may see, stripped: what invites and knocks carry.
pub fn public_stripped_state(services: &Services, room_id: &RoomId) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for kind in PUBLIC_STATE_TYPES {
        if let Some(p) = services.rooms.state_get(room_id, kind, "")? {
            out.push(p.to_stripped_value());
        }
    }
    Ok(out)
}

/// Who a room is named after when it has no name, and its member counts.
pub struct RoomSummary {
    /// Up to 5 other members (joined or invited; those who left when nobody else is here).
    pub heroes: Vec<OwnedUserId>,
    pub joined: usize,
    pub invited: usize,
}

pub fn room_summary(services: &Services, user: &UserId, room_id: &RoomId) -> Result<RoomSummary> {
    let joined = services.rooms.joined_members(room_id)?;
    let invited = services.rooms.members_with(room_id, |m| m == "invite")?;
    let mut heroes: Vec<OwnedUserId> = joined
        .iter()
        .chain(invited.iter())
        .filter(|u| u.as_str() != user.as_str())
        .cloned()
        .collect();
    heroes.sort();
    heroes.dedup();
    heroes.truncate(5);
    if heroes.is_empty() {
        // Nobody else is here: name the room after those who left.
        heroes = services
            .rooms
            .members_with(room_id, |m| m == "leave" || m == "ban")?
            .into_iter()
            .filter(|u| u.as_str() != user.as_str())
            .collect();
        heroes.sort();
        heroes.truncate(5);
    }
    Ok(RoomSummary {
        heroes,
        joined: joined.len(),
        invited: invited.len(),
    })
}

struct Builder<'a> {
    s: &'a Services,
    who: &'a Identity,
    req: &'a SyncRequest,
    up_to: u64,
}

impl Builder<'_> {
    fn user(&self) -> &UserId {
        &self.who.user_id
    }

    /// The response without `next_batch`, whether it carries nothing new, and the count of the
    /// last to-device message when more are waiting than one response carries.
    fn build(&self) -> Result<(Value, bool, Option<u64>)> {
        let user = self.user();
        let filter = &self.req.filter;
        let since = self.req.since;

        let account_data = match since {
            None => self.s.account_data.all(user)?,
            Some(since) => self.s.account_data.changed_since(user, since, self.up_to)?,
        };
        let mut room_account_data: HashMap<OwnedRoomId, Vec<Value>> = HashMap::new();
        let mut global_account_data = Vec::new();
        for (room, kind, content) in account_data {
            let event = json!({ "type": kind, "content": content });
            match room {
                Some(room) => {
                    if room_event_matches(&filter.room.account_data, &kind, None) {
                        room_account_data.entry(room).or_default().push(event);
                    }
                }
                None => {
                    if type_matches(
                        &filter.account_data.types,
                        &filter.account_data.not_types,
                        &kind,
                    ) {
                        global_account_data.push(event);
                    }
                }
            }
        }
        if let Some(limit) = filter.account_data.limit {
            global_account_data.truncate(usize::try_from(u64::from(limit)).unwrap_or(usize::MAX));
        }

        let mut join = Map::new();
        let mut invite = Map::new();
        let mut leave = Map::new();
        let mut knock = Map::new();
        for (room_id, ur) in self.s.rooms.user_rooms(user)? {
            if !self.room_wanted(&room_id) {
                continue;
            }
            // A membership change not yet below the watermark is read as of the watermark.
            let membership = if ur.count <= self.up_to {
                ur.membership.clone()
            } else {
                match self.s.rooms.membership_at(&room_id, user, self.up_to)? {
                    Some(m) => m,
                    None => continue,
                }
            };
            let was = match since {
                Some(since) => self.s.rooms.membership_at(&room_id, user, since)?,
                None => None,
            };
            let changed = match since {
                None => true,
                Some(since) => {
                    was.as_deref() != Some(membership.as_str())
                        || (ur.count > since && ur.count <= self.up_to)
                }
            };
            let room_ad = room_account_data.remove(&room_id).unwrap_or_default();
            match membership.as_str() {
                "join" => {
                    let newly_joined = since.is_none() || was.as_deref() != Some("join");
                    if let Some(v) = self.joined_room(&room_id, newly_joined, room_ad)? {
                        join.insert(room_id.to_string(), v);
                    }
                }
                "invite" if changed => {
                    let events = self.stripped_state(&room_id, &ur)?;
                    invite.insert(
                        room_id.to_string(),
                        json!({ "invite_state": { "events": events } }),
                    );
                }
                "knock" if changed => {
                    let events = self.stripped_state(&room_id, &ur)?;
                    knock.insert(
                        room_id.to_string(),
                        json!({ "knock_state": { "events": events } }),
                    );
                }
                "leave" | "ban" => {
                    let wanted = match since {
                        None => filter.room.include_leave,
                        Some(_) => changed,
                    };
                    if wanted {
                        leave.insert(room_id.to_string(), self.left_room(&room_id, &ur, room_ad)?);
                    }
                }
                _ => {}
            }
        }

        let presence = self.presence()?;
        let (to_device, to_device_last, to_device_more) =
            self.s
                .to_device
                .pending(user, &self.who.device_id, self.up_to, MAX_PER_SYNC)?;
        let (changed, left) = match since {
            Some(since) => device_list_changes(self.s, user, since, self.up_to)?,
            None => (Vec::new(), Vec::new()),
        };

        let mut body = Map::new();
        let mut rooms = Map::new();
        let empty = join.is_empty()
            && invite.is_empty()
            && leave.is_empty()
            && knock.is_empty()
            && global_account_data.is_empty()
            && presence.is_empty()
            && to_device.is_empty()
            && changed.is_empty()
            && left.is_empty();
        for (name, section) in [
            ("join", join),
            ("invite", invite),
            ("leave", leave),
            ("knock", knock),
        ] {
            if !section.is_empty() {
                rooms.insert(name.into(), Value::Object(section));
            }
        }
        if !rooms.is_empty() {
            body.insert("rooms".into(), Value::Object(rooms));
        }
        if !global_account_data.is_empty() {
            body.insert(
                "account_data".into(),
                json!({ "events": global_account_data }),
            );
        }
        if !presence.is_empty() {
            body.insert("presence".into(), json!({ "events": presence }));
        }
        // End-to-end encryption.
        body.insert("to_device".into(), json!({ "events": to_device }));
        body.insert(
            "device_lists".into(),
            json!({ "changed": changed, "left": left }),
        );
        let (counts, fallback) = key_counts(self.s, self.who)?;
        body.insert("device_one_time_keys_count".into(), counts);
        body.insert("device_unused_fallback_key_types".into(), fallback);
        let partial = to_device_more.then_some(to_device_last).flatten();
        Ok((Value::Object(body), empty, partial))
    }

    fn room_wanted(&self, room_id: &RoomId) -> bool {
        let f = &self.req.filter.room;
        if f.not_rooms.iter().any(|r| r == room_id) {
            return false;
        }
        match &f.rooms {
            Some(rooms) => rooms.iter().any(|r| r == room_id),
            None => true,
        }
    }

    /// One joined room, or None when nothing changed in it.
    fn joined_room(
        &self,
        room_id: &RoomId,
        newly_joined: bool,
        account_data: Vec<Value>,
    ) -> Result<Option<Value>> {
        let user = self.user();
        // A room joined since the last sync is sent as in an initial sync.
        let since = if newly_joined { None } else { self.req.since };
        let timeline = self.timeline(room_id, since.unwrap_or(0), self.up_to)?;
        let state = self.state(room_id, since, &timeline, self.up_to)?;

        let mut ephemeral = Vec::new();
        let eph_filter = &self.req.filter.room.ephemeral;
        if room_event_matches(eph_filter, "m.typing", None) {
            if let Some((_, users)) = self.s.typing.typing_since(room_id, since) {
                ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
            }
        }
        if room_event_matches(eph_filter, "m.receipt", None) {
            let receipts = self.s.receipts.since(room_id, since, self.up_to)?;
            if let Some(content) = receipt_content(&receipts, user) {
                ephemeral.push(json!({ "type": "m.receipt", "content": content }));
            }
        }

        if since.is_some()
            && timeline.events.is_empty()
            && state.is_empty()
            && ephemeral.is_empty()
            && account_data.is_empty()
        {
            return Ok(None);
        }

        let membership_changed = since.is_none()
            || state
                .iter()
                .chain(timeline.events.iter().map(|(_, p)| p))
                .any(|p| p.kind == ruma::events::TimelineEventType::RoomMember);
        let mut room = json!({
            "timeline": self.timeline_json(&timeline, since),
            "state": { "events": state.iter().map(|p| p.to_client_value(None)).collect::<Vec<_>>() },
            "ephemeral": { "events": ephemeral },
            "account_data": { "events": account_data },
        });
        self.unread_json(room_id, &mut room)?;
        if membership_changed {
            room["summary"] = self.summary(room_id)?;
        }
        Ok(Some(room))
    }

    /// A room the user left (or was kicked or banned from): the timeline up to the leave.
    fn left_room(
        &self,
        room_id: &RoomId,
        ur: &UserRoom,
        account_data: Vec<Value>,
    ) -> Result<Value> {
        let since = self.req.since;
        let end = ur.count.min(self.up_to);
        let timeline = self.timeline(room_id, since.unwrap_or(0), end)?;
        // The state as the user may know it: up to their leave, never after.
        let state = self.state(room_id, since, &timeline, end)?;
        Ok(json!({
            "timeline": self.timeline_json(&timeline, since),
            "state": { "events": state.iter().map(|p| p.to_client_value(None)).collect::<Vec<_>>() },
            "account_data": { "events": account_data },
        }))
    }

    fn timeline_json(&self, timeline: &Timeline, since: Option<u64>) -> Value {
        let events: Vec<Value> = timeline
            .events
            .iter()
            .map(|(_, p)| client_event(self.s, self.who, p))
            .collect();
        json!({
            "events": events,
            "limited": timeline.limited,
            "prev_batch": timeline.prev_batch(since, self.up_to),
        })
    }

    /// The newest events in `(after, up_to]` the user may see and the filter lets through.
    fn timeline(&self, room_id: &RoomId, after: u64, up_to: u64) -> Result<Timeline> {
        let filter = &self.req.filter.room.timeline;
        let limit = filter
            .limit
            .map(|l| usize::try_from(u64::from(l)).unwrap_or(MAX_TIMELINE_LIMIT))
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .min(MAX_TIMELINE_LIMIT);
        timeline_window(self.s, self.user(), room_id, filter, limit, after, up_to)
    }

    /// The `state` section: the full state at the start of the timeline for an initial sync
    /// (or `full_state`), else what changed between `since` and the start of the timeline.
    /// Nothing after stream position `last` (the sync's end, or a left room's leave) is used.
    fn state(
        &self,
        room_id: &RoomId,
        since: Option<u64>,
        timeline: &Timeline,
        last: u64,
    ) -> Result<Vec<Pdu>> {
        let user = self.user();
        let first = timeline
            .events
            .first()
            .map(|(c, _)| *c)
            .unwrap_or(last.saturating_add(1))
            .min(last.saturating_add(1));
        let in_timeline: HashSet<&OwnedEventId> =
            timeline.events.iter().map(|(_, p)| &p.event_id).collect();
        let ids: HashMap<(String, String), OwnedEventId> = match since {
            Some(since) if !self.req.full_state => {
                let mut changes = HashMap::new();
                if first > since.saturating_add(1) {
                    for (_, change) in self.s.rooms.state_changes(room_id, since, first - 1)? {
                        // A key that left the state cannot be expressed to clients: no event.
                        let key = (change.event_type, change.state_key);
                        if change.removed {
                            changes.remove(&key);
                        } else {
                            changes.insert(key, change.event_id);
                        }
                    }
                }
                changes
            }
            _ => self.s.rooms.state_at(room_id, first)?,
        };

        let filter = &self.req.filter.room.state;
        let lazy = lazy_loading(filter);
        let mut wanted_members: HashSet<String> = HashSet::new();
        if lazy {
            wanted_members.insert(user.to_string());
            for (_, p) in &timeline.events {
                wanted_members.insert(p.sender.to_string());
            }
        }
        let mut out = Vec::new();
        let mut members_sent: HashSet<String> = HashSet::new();
        for ((kind, state_key), id) in &ids {
            if in_timeline.contains(id) {
                continue;
            }
            if lazy && kind == "m.room.member" && !wanted_members.contains(state_key) {
                continue;
            }
            if let Some(p) = self.s.rooms.pdu(id.as_str())? {
                if room_event_matches(filter, kind, Some(p.sender.as_ref())) {
                    if kind == "m.room.member" {
                        members_sent.insert(state_key.clone());
                    }
                    out.push(p);
                }
            }
        }
        // Lazy loading without per-device tracking: senders of the timeline always come with
        // their member event (as with `include_redundant_members`), so clients can render them.
        if lazy && since.is_some() {
            let timeline_members: HashSet<&str> = timeline
                .events
                .iter()
                .filter(|(_, p)| p.kind == ruma::events::TimelineEventType::RoomMember)
                .filter_map(|(_, p)| p.state_key.as_deref())
                .collect();
            let mut missing: Vec<&String> = wanted_members
                .iter()
                .filter(|m| !members_sent.contains(*m) && !timeline_members.contains(m.as_str()))
                .collect();
            missing.sort();
            for member in missing {
                let at_last = self.s.rooms.state_get_at(
                    room_id,
                    last.saturating_add(1),
                    "m.room.member",
                    member,
                )?;
                let event = match at_last {
                    Some(id) => self.s.rooms.pdu(id.as_str())?,
                    None => None,
                };
                if let Some(p) = event {
                    if !in_timeline.contains(&p.event_id)
                        && room_event_matches(filter, "m.room.member", Some(p.sender.as_ref()))
                    {
                        out.push(p);
                    }
                }
            }
        }
        out.sort_by(|a, b| {
            (a.kind.to_string(), a.state_key.as_deref())
                .cmp(&(b.kind.to_string(), b.state_key.as_deref()))
        });
        Ok(out)
    }

    fn stripped_state(&self, room_id: &RoomId, ur: &UserRoom) -> Result<Vec<Value>> {
        stripped_state(self.s, self.user(), room_id, ur)
    }

    /// `summary`: heroes and member counts.
    fn summary(&self, room_id: &RoomId) -> Result<Value> {
        let summary = room_summary(self.s, self.user(), room_id)?;
        Ok(json!({
            "m.heroes": summary.heroes,
            "m.joined_member_count": summary.joined,
            "m.invited_member_count": summary.invited,
        }))
    }

    /// The room's unread counts from the push rules' notifications (see `service::push`), and
    /// per-thread counts when the filter asks for them.
    fn unread_json(&self, room_id: &RoomId, room: &mut Value) -> Result<()> {
        let split = self.req.filter.room.timeline.unread_thread_notifications;
        let counts = self
            .s
            .push
            .notifications
            .unread(self.user(), room_id, self.up_to, split)?;
        room["unread_notifications"] = json!({
            "notification_count": counts.main.notifications,
            "highlight_count": counts.main.highlights,
        });
        if split {
            let threads: Map<String, Value> = counts
                .threads
                .into_iter()
                .map(|(root, c)| {
                    (
                        root,
                        json!({
                            "notification_count": c.notifications,
                            "highlight_count": c.highlights,
                        }),
                    )
                })
                .collect();
            room["unread_thread_notifications"] = Value::Object(threads);
        }
        Ok(())
    }

    /// `m.presence` events of users sharing a room with the user, changed since `since`.
    fn presence(&self) -> Result<Vec<Value>> {
        if !self.s.policy.presence_enabled() {
            return Ok(Vec::new());
        }
        let f = &self.req.filter.presence;
        if !type_matches(&f.types, &f.not_types, "m.presence") {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut mates = room_mates(self.s, self.user())?;
        mates.sort();
        for mate in mates {
            if !sender_matches(&f.senders, &f.not_senders, &mate) {
                continue;
            }
            let Some(state) = self.s.presence.get(&mate)? else {
                continue;
            };
            if self.req.since.is_some_and(|since| state.count <= since) {
                continue;
            }
            out.push(json!({ "type": "m.presence", "sender": mate, "content": state.content() }));
        }
        if let Some(limit) = f.limit {
            out.truncate(usize::try_from(u64::from(limit)).unwrap_or(usize::MAX));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(parse_token("s12").ok().map(|t| t.position), Some(12));
        assert_eq!(
            parse_token("s12_7").ok(),
            Some(SyncToken {
                position: 12,
                to_device: Some(7)
            })
        );
        assert!(parse_token("x").is_err());
        assert!(parse_token("s1_x").is_err());
        assert_eq!(make_token(7), "s7");
    }
}

/// Property tests: any `since` token is refused or read without panic, and ours read back.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_sync_tokens(
            token in prop_oneof![text(), "s?[0-9+-]{0,22}(_[0-9+-]{0,22})?"],
            position in any::<u64>(),
            to_device in any::<u64>(),
        ) {
            if let Ok(t) = parse_token(&token) {
                // What was read is written and read again the same.
                let again = match t.to_device {
                    Some(d) => format!("{}_{d}", make_token(t.position)),
                    None => make_token(t.position),
                };
                prop_assert_eq!(parse_token(&again).ok(), Some(t));
            }
            prop_assert_eq!(parse_token(&make_token(position)).ok(), Some(SyncToken { position, to_device: None }));
            let partial = format!("{}_{to_device}", make_token(position));
            prop_assert_eq!(parse_token(&partial).ok(), Some(SyncToken { position, to_device: Some(to_device) }));
        }
    }
}
