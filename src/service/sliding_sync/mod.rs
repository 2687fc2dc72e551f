//! Simplified Sliding Sync (MSC4186): `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
//!
//! A request names lists (the user's rooms filtered, sorted by recency, cut to ranges) and room
//! subscriptions; each room in a window or subscription is sent with its `required_state` and
//! the newest `timeline_limit` events. The server keeps per connection (user, device, `conn_id`)
//! what it sent of each room up to which stream position ([`connection`]), keyed by the `pos`
//! it answers with; the next request with that `pos` gets only what changed. Stream positions
//! are the same as classic `/sync`'s (see `service::sync`), and the long-poll, timeline walk,
//! stripped state, heroes and key counts are classic sync's functions.
//!
//! Files: `connection` (the in-memory state and `pos`), `lists` (which rooms, in which order),
//! `room` (one room's response), `extensions` (to-device, e2ee, account data, receipts, typing).

pub mod connection;
mod extensions;
mod lists;
mod room;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use ruma::{api::client::sync::sync_events::v5, OwnedRoomId, UserId};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    service::{
        accounts::Identity,
        sync::{long_poll, note_presence},
        Services,
    },
};

pub use connection::Connections;
use connection::{ConnKey, Snapshot};

/// Lists one request may name.
pub const MAX_LISTS: usize = 100;
/// Ranges one list may name.
pub const MAX_RANGES: usize = 100;
/// Room subscriptions one request may name.
pub const MAX_SUBSCRIPTIONS: usize = 1000;
/// `required_state` entries of one list or subscription.
pub const MAX_REQUIRED_STATE: usize = 100;
/// Most timeline events one room carries, whatever `timeline_limit` asks.
pub const MAX_TIMELINE_LIMIT: usize = 200;
/// Rooms one response carries at most; the rest (in order of recency) come with the next one.
pub const MAX_ROOMS_PER_RESPONSE: usize = 500;
/// Spaces one list's `spaces` filter may name.
pub const MAX_SPACES: usize = 50;
/// Longest `conn_id` accepted.
const MAX_CONN_ID: usize = 200;

/// The sliding sync service: connection state and the bump-stamp cache.
#[derive(Default)]
pub struct SlidingSync {
    pub connections: Connections,
    bumps: lists::BumpCache,
}

/// `required_state` of one room: (event type, state key) pairs with the wildcards `*` (any type,
/// any state key), `$ME` (the user's id) and `$LAZY` (members who sent timeline events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequiredState {
    entries: BTreeSet<(String, String)>,
}

impl RequiredState {
    fn add(&mut self, entries: &[(ruma::events::StateEventType, String)]) {
        for (kind, key) in entries.iter().take(MAX_REQUIRED_STATE) {
            self.entries.insert((kind.to_string(), key.clone()));
        }
    }

    /// Whether members of timeline senders are wanted (`m.room.member` with `$LAZY`).
    pub fn lazy_members(&self) -> bool {
        self.entries
            .iter()
            .any(|(k, s)| (k == "m.room.member" || k == "*") && s == "$LAZY")
    }

    /// Whether the state event (type, state key) is wanted; `lazy` are the members `$LAZY`
    /// asks for in this response.
    pub fn wants(
        &self,
        kind: &str,
        state_key: &str,
        user: &UserId,
        lazy: &BTreeSet<String>,
    ) -> bool {
        self.entries.iter().any(|(k, s)| {
            let kind_ok = k == "*" || k == kind;
            let key_ok = match s.as_str() {
                "*" => true,
                "$ME" => state_key == user.as_str(),
                "$LAZY" => kind == "m.room.member" && lazy.contains(state_key),
                other => other == state_key,
            };
            kind_ok && key_ok
        })
    }
}

/// What one room is asked for: the union of the lists and subscriptions it is in.
#[derive(Clone, Debug, Default)]
pub struct RoomConfig {
    pub required_state: RequiredState,
    pub timeline_limit: usize,
}

impl RoomConfig {
    fn merge(
        &mut self,
        required_state: &[(ruma::events::StateEventType, String)],
        limit: ruma::UInt,
    ) {
        self.required_state.add(required_state);
        let limit = usize::try_from(u64::from(limit))
            .unwrap_or(MAX_TIMELINE_LIMIT)
            .min(MAX_TIMELINE_LIMIT);
        self.timeline_limit = self.timeline_limit.max(limit);
    }
}

/// Reject requests beyond the bounds (400 `M_INVALID_PARAM`).
fn validate(req: &v5::Request) -> Result<()> {
    if req.lists.len() > MAX_LISTS {
        return Err(Error::invalid_param(format!("At most {MAX_LISTS} lists")));
    }
    if req.room_subscriptions.len() > MAX_SUBSCRIPTIONS {
        return Err(Error::invalid_param(format!(
            "At most {MAX_SUBSCRIPTIONS} room subscriptions"
        )));
    }
    if req.conn_id.as_ref().is_some_and(|c| c.len() > MAX_CONN_ID) {
        return Err(Error::invalid_param("conn_id is too long"));
    }
    for (name, list) in &req.lists {
        if list.ranges.len() > MAX_RANGES {
            return Err(Error::invalid_param(format!(
                "List {name}: at most {MAX_RANGES} ranges"
            )));
        }
        if list.ranges.iter().any(|(a, b)| a > b) {
            return Err(Error::invalid_param(format!(
                "List {name}: a range starts after its end"
            )));
        }
        if list.room_details.required_state.len() > MAX_REQUIRED_STATE {
            return Err(Error::invalid_param(format!(
                "List {name}: at most {MAX_REQUIRED_STATE} required_state entries"
            )));
        }
    }
    if req
        .room_subscriptions
        .values()
        .any(|s| s.required_state.len() > MAX_REQUIRED_STATE)
    {
        return Err(Error::invalid_param(format!(
            "At most {MAX_REQUIRED_STATE} required_state entries per subscription"
        )));
    }
    Ok(())
}

/// The `spaces` filter of each list (rooms that are children of these spaces), which ruma's
/// `ListFilters` does not model: read from the request's JSON.
pub fn spaces_filters(body: Option<&Value>) -> Result<HashMap<String, Vec<OwnedRoomId>>> {
    let mut out = HashMap::new();
    let Some(lists) = body.and_then(|b| b.get("lists")).and_then(Value::as_object) else {
        return Ok(out);
    };
    for (name, list) in lists {
        let Some(spaces) = list.pointer("/filters/spaces") else {
            continue;
        };
        let invalid = || Error::invalid_param(format!("List {name}: invalid spaces filter"));
        let spaces = spaces.as_array().ok_or_else(invalid)?;
        if spaces.len() > MAX_SPACES {
            return Err(Error::invalid_param(format!(
                "List {name}: at most {MAX_SPACES} spaces"
            )));
        }
        let ids = spaces
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(|id| OwnedRoomId::try_from(id).ok())
                    .ok_or_else(invalid)
            })
            .collect::<Result<Vec<_>>>()?;
        out.insert(name.clone(), ids);
    }
    Ok(out)
}

/// Run one sliding sync request, long-polling (with `pos`) when there is nothing new.
/// `spaces` are the lists' `spaces` filters (see [`spaces_filters`]).
pub async fn sync(
    services: &Services,
    who: &Identity,
    req: v5::Request,
    spaces: HashMap<String, Vec<OwnedRoomId>>,
) -> Result<Value> {
    validate(&req)?;
    let user = &who.user_id;
    note_presence(services, user, Some(req.set_presence.as_str()))?;

    let key: ConnKey = (
        user.clone(),
        who.device_id.clone(),
        req.conn_id.clone().unwrap_or_default(),
    );
    let conns = &services.sliding_sync.connections;
    let (nonce, previous) = match req.pos.as_deref() {
        None | Some("") => conns.start(&key),
        Some(pos) => conns.resume(&key, pos)?,
    };
    extensions::acknowledge_to_device(services, who, &req)?;

    let waits = previous.position > 0;
    let timeout = req.timeout.unwrap_or(Duration::ZERO);
    long_poll(services, user, timeout, |up_to, last| {
        let builder = Builder {
            s: services,
            who,
            req: &req,
            spaces: &spaces,
            previous: &previous,
            up_to: up_to.max(previous.position),
        };
        let (mut body, next, empty) = builder.build()?;
        if empty && waits && !last {
            return Ok(None);
        }
        body.insert("pos".into(), Value::String(conns.store(&key, &nonce, next)));
        if let Some(txn_id) = &req.txn_id {
            body.insert("txn_id".into(), Value::String(txn_id.clone()));
        }
        Ok(Some(Value::Object(body)))
    })
    .await
}

/// One attempt at a response, as of stream position `up_to`.
struct Builder<'a> {
    s: &'a Services,
    who: &'a Identity,
    req: &'a v5::Request,
    spaces: &'a HashMap<String, Vec<OwnedRoomId>>,
    previous: &'a Arc<Snapshot>,
    up_to: u64,
}

impl Builder<'_> {
    fn user(&self) -> &UserId {
        &self.who.user_id
    }

    /// The response without `pos`, the snapshot it leaves, and whether it carries nothing new.
    fn build(&self) -> Result<(Map<String, Value>, Snapshot, bool)> {
        let selection = lists::select(self)?;
        let mut next = Snapshot {
            position: self.up_to,
            rooms: self.previous.rooms.clone(),
            list_counts: HashMap::new(),
        };

        let mut lists_out = Map::new();
        let mut counts_changed = false;
        for (name, window) in &selection.lists {
            lists_out.insert(name.clone(), json!({ "count": window.count }));
            counts_changed |= self.previous.list_counts.get(name) != Some(&window.count);
            next.list_counts.insert(name.clone(), window.count);
        }

        let mut rooms_out = Map::new();
        let mut initial_rooms: BTreeSet<OwnedRoomId> = BTreeSet::new();
        for (room_id, config) in selection.wanted.iter().take(MAX_ROOMS_PER_RESPONSE) {
            let Some(info) = selection.rooms.get(room_id) else {
                continue;
            };
            let previous = self.previous.rooms.get(room_id);
            let (body, sent) = room::build(self, info, config, previous)?;
            if let Some(body) = body {
                if body.get("initial") == Some(&Value::Bool(true)) {
                    initial_rooms.insert(room_id.clone());
                }
                rooms_out.insert(room_id.to_string(), body);
            }
            next.rooms.insert(room_id.clone(), sent);
        }

        let extensions = extensions::build(self, &selection, &initial_rooms)?;
        let empty = !counts_changed && rooms_out.is_empty() && !extensions.has_news;

        let mut body = Map::new();
        body.insert("lists".into(), Value::Object(lists_out));
        body.insert("rooms".into(), Value::Object(rooms_out));
        body.insert("extensions".into(), Value::Object(extensions.body));
        Ok((body, next, empty))
    }
}

/// Rooms of the user a list or subscription may show, with what filters and sorting read.
pub struct RoomInfo {
    pub room_id: OwnedRoomId,
    /// Membership as of the response's position: "join", "invite", "knock", "leave", "ban".
    pub membership: String,
    pub user_room: crate::service::rooms::UserRoom,
    pub bump_stamp: u64,
    pub is_dm: bool,
}

/// What the lists and subscriptions select.
pub struct Selection {
    pub rooms: HashMap<OwnedRoomId, RoomInfo>,
    /// Per list: its room count and the rooms in its ranges, in list order.
    pub lists: BTreeMap<String, lists::Window>,
    /// Rooms to send, most recent first, with their merged configuration.
    pub wanted: Vec<(OwnedRoomId, RoomConfig)>,
    /// Subscribed rooms the user may see.
    pub subscribed: Vec<OwnedRoomId>,
}
