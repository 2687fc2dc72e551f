//! The write path for local events: build, authorize, sign, persist in one batch, wake readers.

use std::sync::Arc;

use ruma::{
    events::{StateEventType, TimelineEventType},
    room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules},
    CanonicalJsonObject, CanonicalJsonValue, DeviceId, OwnedEventId, OwnedRoomId, OwnedUserId,
    RoomId, RoomVersionId, UserId,
};
use serde_json::{json, Value};

use super::{pdu::to_canonical, EventMeta, Pdu, RoomMeta, Rooms, StateChange, UserRoom};
use crate::{
    error::{ErrCode, Error, Result},
    service::globals::PendingCount,
    storage::{keys, Storage, Table, WriteTicket},
    utils,
};

/// How many timestamps room creation tries before giving up on a free v12 room id.
const CREATE_ATTEMPTS: u64 = 64;

/// The largest event the spec allows, signatures included.
pub const MAX_PDU_BYTES: usize = 65_536;

/// An event a local user wants to send.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub kind: TimelineEventType,
    pub content: Value,
    pub state_key: Option<String>,
    pub redacts: Option<OwnedEventId>,
    /// The event's `origin_server_ts` when not now: an appservice's timestamp massaging (`?ts=`).
    pub origin_server_ts: Option<u64>,
}

impl NewEvent {
    pub fn message(kind: &str, content: Value) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            content,
            state_key: None,
            redacts: None,
            origin_server_ts: None,
        }
    }
    /// The same event with the given timestamp (an appservice's `?ts=`), if any.
    pub fn at(mut self, ts: Option<u64>) -> NewEvent {
        self.origin_server_ts = ts;
        self
    }
    pub fn state(kind: &str, state_key: &str, content: Value) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            content,
            state_key: Some(state_key.to_owned()),
            redacts: None,
            origin_server_ts: None,
        }
    }
}

/// An event written but not yet known to be on disk. Until it completes, the stream watermark
/// stays below it (sync does not show it) and nobody is woken for it.
pub struct Deferred<'a> {
    pending: PendingCount<'a>,
    /// Counts of further state changes the event brought (state resolution of a fork).
    extra: Vec<PendingCount<'a>>,
    wake: Vec<OwnedUserId>,
    ticket: WriteTicket,
    /// Users notified by this event, for the push gateways once it is durable.
    notified: Vec<OwnedUserId>,
    pushes: &'a crate::service::push::PendingPushes,
    /// Servers the event was queued for, to wake the federation sender once it is durable.
    federate: Vec<ruma::OwnedServerName>,
    federation_wake: &'a crate::service::federation::sender::Wake,
    /// Appservices the event was queued for, to wake their sender once it is durable.
    appservices: Vec<String>,
    appservice_queue: Option<&'a crate::service::appservice::queue::Queue>,
}

impl Deferred<'_> {
    /// Wait (without blocking an async worker) until the event is durable, then publish it.
    pub async fn complete(self, storage: &Storage) -> Result<()> {
        storage.durable(self.ticket).await?;
        self.publish();
        Ok(())
    }

    /// The event is durable: let the watermark pass it and wake whoever it concerns (syncs,
    /// push gateways, the federation sender).
    fn publish(self) {
        for p in self.extra {
            p.finish(Vec::new());
        }
        self.pending.finish(self.wake);
        if !self.notified.is_empty() {
            self.pushes.add(self.notified);
        }
        if !self.federate.is_empty() {
            self.federation_wake.add(self.federate);
        }
        if let (false, Some(queue)) = (self.appservices.is_empty(), self.appservice_queue) {
            queue.wake(self.appservices);
        }
    }
}

/// Where an event goes in its room's graph and state. Local events extend every forward
/// extremity and change the state by themselves ([`Placement::local`]); an event from another
/// server may extend only some extremities, and when it joins a fork the room's current state is
/// the resolution of the branches, which can differ from "current state plus the event".
pub(crate) struct Placement {
    /// Forward extremities after the event.
    pub extremities: Vec<OwnedEventId>,
    /// `None`: the event's own state (if any) is applied to the current state. `Some(changes)`:
    /// the current state changes by exactly these (type, state_key, new event id or `None` for
    /// removed), the outcome of state resolution.
    pub resolved: Option<Vec<(String, String, Option<OwnedEventId>)>>,
    /// The state before the event when it is not the current state (kept in `event_state`).
    pub state_before: Option<super::StateIds>,
    /// For another server's event: whether this server forwards it to the room's other servers
    /// (the resident server passing on a join it got through `send_join`); never for `/send`.
    /// Events of our own users are always sent.
    pub rebroadcast: bool,
}

impl Placement {
    pub fn local(event_id: &OwnedEventId) -> Placement {
        Placement {
            extremities: vec![event_id.clone()],
            resolved: None,
            state_before: None,
            rebroadcast: false,
        }
    }
}

/// A local event built, signed and authorized, not yet written.
pub(crate) struct Prepared {
    pub meta: RoomMeta,
    pub obj: CanonicalJsonObject,
    pub pdu: Pdu,
}

/// What sending produced.
#[derive(Clone, Debug)]
pub struct Sent {
    pub event_id: OwnedEventId,
    pub count: u64,
}

pub fn rules_for(version: &RoomVersionId) -> Result<RoomVersionRules> {
    version.rules().ok_or_else(|| {
        Error::new(
            ErrCode::UnsupportedRoomVersion,
            format!("Room version {version} is not supported"),
        )
    })
}

impl Rooms {
    /// Create the room: its `m.room.create` event. For room version 12 the room id is derived
    /// from the create event; for older versions it is random. The caller holds no lock yet
    /// (the room does not exist); the returned guard locks the new room.
    pub async fn create_room_event(
        &self,
        version: &RoomVersionId,
        sender: &UserId,
        mut content: serde_json::Map<String, Value>,
    ) -> Result<(OwnedRoomId, tokio::sync::OwnedMutexGuard<()>)> {
        let rules = rules_for(version)?;
        content.insert("room_version".into(), Value::String(version.to_string()));
        if !rules.authorization.use_room_create_sender {
            content.insert("creator".into(), Value::String(sender.to_string()));
        }
        let now = utils::now_ms();
        // Two identical requests in the same millisecond build the same v12 create event, and
        // so the same room id: the later one moves its timestamp on until the id is free.
        for attempt in 0..CREATE_ATTEMPTS {
            let (room_id, obj, pdu) =
                self.build_create_event(&rules, sender, &content, now + attempt)?;
            let guard = self.lock(&room_id).await;
            // Checked under the new room's lock, so two creators cannot both see it free.
            if self.exists(&room_id)? {
                continue;
            }
            let meta = RoomMeta {
                version: version.clone(),
                extremities: vec![],
                depth: 0,
                last_count: 0,
            };
            let placement = Placement::local(&pdu.event_id);
            self.persist(&room_id, meta, obj, pdu, None, placement)
                .await?;
            return Ok((room_id, guard));
        }
        Err(Error::new(ErrCode::RoomInUse, "Room already exists"))
    }

    /// The signed create event for `origin_server_ts`, with the room id it belongs to.
    fn build_create_event(
        &self,
        rules: &RoomVersionRules,
        sender: &UserId,
        content: &serde_json::Map<String, Value>,
        origin_server_ts: u64,
    ) -> Result<(OwnedRoomId, CanonicalJsonObject, Pdu)> {
        let room_id_v1 = if rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            Some(
                RoomId::parse(format!(
                    "!{}:{}",
                    utils::random_string(18),
                    self.globals.server_name
                ))
                .map_err(Error::internal)?,
            )
        };
        let mut obj = to_canonical(json!({
            "type": "m.room.create",
            "state_key": "",
            "sender": sender,
            "content": content,
            "origin_server_ts": origin_server_ts,
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }))?;
        if let Some(room_id) = &room_id_v1 {
            obj.insert(
                "room_id".into(),
                CanonicalJsonValue::String(room_id.to_string()),
            );
        }
        let event_id = self.sign_and_id(&mut obj, rules)?;
        let derived_id = room_id_v1.is_none();
        let room_id = match room_id_v1 {
            Some(id) => id,
            None => {
                RoomId::parse(format!("!{}", &event_id.as_str()[1..])).map_err(Error::internal)?
            }
        };
        let pdu = self.to_pdu(&obj, &event_id, &room_id)?;
        // A v12 create event has no room id of its own (the id derives from it); the check
        // must see it as sent.
        let mut checked = pdu.clone();
        if derived_id {
            checked.room_id = None;
        }
        ruma::state_res::check_state_independent_auth_rules(
            &rules.authorization,
            &checked,
            |_: &ruma::EventId| -> Option<Pdu> { None },
        )
        .map_err(Error::bad_json)?;
        Ok((room_id, obj, pdu))
    }

    /// Build, authorize, sign and write an event without waiting for the disk; the caller
    /// holds the room's lock and completes the returned [`Deferred`] after releasing it, so
    /// that events of one room share fsyncs (group commit).
    pub fn append_locked_deferred(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
        txn: Option<(&DeviceId, &str)>,
    ) -> Result<(Sent, Deferred<'_>)> {
        let prepared = self.prepare_local(room_id, sender, new)?;
        let placement = Placement::local(&prepared.pdu.event_id);
        self.persist_deferred(
            room_id,
            prepared.meta,
            prepared.obj,
            prepared.pdu,
            txn,
            placement,
        )
    }

    /// Build, sign and authorize a local event without writing it (an invite of another
    /// server's user is countersigned there first). The caller holds the room's lock.
    pub(crate) fn prepare_local(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
    ) -> Result<Prepared> {
        let meta = self
            .meta(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let rules = rules_for(&meta.version)?;
        if new.kind == TimelineEventType::RoomCreate {
            return Err(Error::forbidden(
                "A room has exactly one m.room.create event",
            ));
        }
        if !new.content.is_object() {
            return Err(Error::bad_json("content must be a JSON object"));
        }

        let event = self.build_event(room_id, &meta, &rules, sender, new)?;
        let mut obj = to_canonical(event)?;
        let event_id = self.sign_and_id(&mut obj, &rules)?;
        let pdu = self.to_pdu(&obj, &event_id, room_id)?;

        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |t: &StateEventType, k: &str| -> Option<Arc<Pdu>> {
                self.state_get_for_auth(room_id, &t.to_string(), k)
                    .ok()
                    .flatten()
            },
        )
        .map_err(|e| Error::forbidden(format!("Event not authorized: {e}")))?;
        // Allowed by the room's rules; now the law's: whoever asked for this membership.
        self.admit_membership(room_id, &pdu)?;
        Ok(Prepared { meta, obj, pdu })
    }

    /// The unsigned event a sender's new event becomes: auth events chosen from the current
    /// state, prev events the forward extremities. Also the template `make_join` and friends
    /// offer to other servers. The caller holds the room's lock.
    pub(crate) fn build_event(
        &self,
        room_id: &RoomId,
        meta: &RoomMeta,
        rules: &RoomVersionRules,
        sender: &UserId,
        new: NewEvent,
    ) -> Result<Value> {
        let content_raw = serde_json::value::to_raw_value(&new.content)?;
        let auth_types = ruma::state_res::auth_types_for_event(
            &new.kind,
            sender,
            new.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events = Vec::new();
        for (t, k) in &auth_types {
            if let Some(id) = self.state_event_id(room_id, &t.to_string(), k)? {
                if !auth_events.contains(&id) {
                    auth_events.push(id);
                }
            }
        }

        let mut content = new.content;
        let mut redacts_top = None;
        if let Some(redacts) = &new.redacts {
            if rules.redaction.content_field_redacts {
                if let Some(o) = content.as_object_mut() {
                    o.insert("redacts".into(), Value::String(redacts.to_string()));
                }
            }
            // Older room versions keep `redacts` at the top level; v11+ clients and servers
            // still read it there too, so it is set in both places where allowed.
            redacts_top = Some(redacts.to_string());
        }

        let depth = meta.depth + 1;
        let mut event = json!({
            "type": new.kind.to_string(),
            "room_id": room_id,
            "sender": sender,
            "content": content,
            "origin_server_ts": new.origin_server_ts.unwrap_or_else(utils::now_ms),
            "depth": depth,
            "prev_events": self.event_refs(&meta.extremities, rules)?,
            "auth_events": self.event_refs(&auth_events, rules)?,
        });
        if let Some(sk) = &new.state_key {
            event["state_key"] = Value::String(sk.clone());
        }
        if let Some(r) = redacts_top {
            event["redacts"] = Value::String(r);
        }
        Ok(event)
    }

    /// Build, authorize, sign and persist an event, durable on return. The caller holds the
    /// room's lock (so the next event of the room waits; [`Rooms::append_locked_deferred`]
    /// lets it go first). The wait for the disk is the syncer's: no fsync runs on this thread.
    pub async fn append_locked(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
        txn: Option<(&DeviceId, &str)>,
    ) -> Result<Sent> {
        let (sent, deferred) = self.append_locked_deferred(room_id, sender, new, txn)?;
        deferred.complete(&self.storage).await?;
        Ok(sent)
    }

    /// Lock the room and append one event.
    pub async fn append(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
        txn: Option<(&DeviceId, &str)>,
    ) -> Result<Sent> {
        let _guard = self.lock(room_id).await;
        self.append_locked(room_id, sender, new, txn).await
    }

    /// Room versions 1 and 2 reference events with their hashes; later versions by id.
    fn event_refs(&self, ids: &[OwnedEventId], rules: &RoomVersionRules) -> Result<Value> {
        match rules.events_reference_format {
            EventsReferenceFormatVersion::V1 => {
                let mut out = Vec::new();
                for id in ids {
                    let hashes = self
                        .storage
                        .get(Table::Pdus, id.as_bytes())?
                        .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
                        .and_then(|v| v.get("hashes").cloned())
                        .unwrap_or_else(|| json!({}));
                    out.push(json!([id, hashes]));
                }
                Ok(Value::Array(out))
            }
            _ => Ok(json!(ids)),
        }
    }

    /// Hash and sign the event and work out its id as the room version prescribes.
    fn sign_and_id(
        &self,
        obj: &mut CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> Result<OwnedEventId> {
        let key = &self.globals.signing_key;
        let event_id = match rules.event_id_format {
            EventIdFormatVersion::V1 => {
                let id = OwnedEventId::try_from(format!(
                    "${}:{}",
                    utils::random_string(18),
                    self.globals.server_name
                ))
                .map_err(Error::internal)?;
                obj.insert(
                    "event_id".into(),
                    CanonicalJsonValue::String(id.to_string()),
                );
                Some(id)
            }
            _ => None,
        };
        // Refuse oversized events before hashing: signing only grows them.
        if serde_json::to_vec(&obj)?.len() > MAX_PDU_BYTES {
            return Err(Error::new(
                ErrCode::TooLarge,
                "Event is larger than 65536 bytes",
            ));
        }
        ruma::signatures::hash_and_sign_event(
            self.globals.server_name.as_str(),
            &key.keypair,
            obj,
            &rules.redaction,
        )
        .map_err(|e| Error::bad_json(format!("cannot sign event: {e}")))?;
        let size = serde_json::to_vec(&obj)?.len();
        if size > MAX_PDU_BYTES {
            return Err(Error::new(
                ErrCode::TooLarge,
                "Event is larger than 65536 bytes",
            ));
        }
        match event_id {
            Some(id) => Ok(id),
            None => {
                let hash = ruma::signatures::reference_hash(obj, rules)
                    .map_err(|e| Error::new(ErrCode::TooLarge, format!("Event too large: {e}")))?;
                OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)
            }
        }
    }

    fn to_pdu(
        &self,
        obj: &CanonicalJsonObject,
        event_id: &OwnedEventId,
        room_id: &RoomId,
    ) -> Result<Pdu> {
        let mut value = serde_json::to_value(obj)?;
        value["event_id"] = Value::String(event_id.to_string());
        value["room_id"] = Value::String(room_id.to_string());
        serde_json::from_value(value).map_err(|e| Error::bad_json(format!("invalid event: {e}")))
    }

    /// Write the event and everything it changes in one batch, wait (on the syncer, not this
    /// thread) until it is on disk, then wake the users it concerns.
    pub(crate) async fn persist(
        &self,
        room_id: &RoomId,
        meta: RoomMeta,
        obj: CanonicalJsonObject,
        pdu: Pdu,
        txn: Option<(&DeviceId, &str)>,
        placement: Placement,
    ) -> Result<Sent> {
        let (sent, deferred) = self.persist_deferred(room_id, meta, obj, pdu, txn, placement)?;
        deferred.complete(&self.storage).await?;
        Ok(sent)
    }

    /// Write the event and everything it changes in one batch, without waiting for the disk.
    /// Nobody is woken and the stream watermark does not pass the event until
    /// [`Deferred::complete`]: sync never shows an event that a crash could still take back.
    pub(crate) fn persist_deferred(
        &self,
        room_id: &RoomId,
        mut meta: RoomMeta,
        obj: CanonicalJsonObject,
        mut pdu: Pdu,
        txn: Option<(&DeviceId, &str)>,
        placement: Placement,
    ) -> Result<(Sent, Deferred<'_>)> {
        let pending = self.globals.counter.next()?;
        let count = pending.get();
        let mut batch = self.storage.batch();
        let event_id = pdu.event_id.clone();
        let rules = rules_for(&meta.version)?;

        // Stored form: the signed PDU plus its id and room id, and unsigned data for clients.
        let mut stored = serde_json::to_value(&obj)?;
        stored["event_id"] = Value::String(event_id.to_string());
        stored["room_id"] = Value::String(room_id.to_string());

        let joined = self.joined_members(room_id)?;
        let mut wake: Vec<OwnedUserId> = joined.iter().cloned().collect();
        let mut member_changes: Vec<(OwnedUserId, bool)> = Vec::new();

        if let Some(state_key) = &pdu.state_key {
            let kind = pdu.kind.to_string();
            let state_key_str = state_key.as_str();
            let previous = self.state_get_for_auth(room_id, &kind, state_key_str)?;
            let was_joined = previous
                .as_ref()
                .is_some_and(|p| p.membership().as_deref() == Some("join"));
            if let Some(prev) = previous {
                let mut unsigned = serde_json::Map::new();
                unsigned.insert("prev_content".into(), super::pdu::raw_value(&prev.content));
                unsigned.insert("prev_sender".into(), Value::String(prev.sender.to_string()));
                unsigned.insert(
                    "replaces_state".into(),
                    Value::String(prev.event_id.to_string()),
                );
                stored["unsigned"] = Value::Object(unsigned.clone());
                pdu.unsigned = Some(unsigned);
            }
            if placement.resolved.is_none() {
                let membership = (pdu.kind == TimelineEventType::RoomMember)
                    .then(|| pdu.membership().unwrap_or_else(|| "leave".to_owned()));
                let change = StateChange {
                    event_type: kind.clone(),
                    state_key: state_key.clone(),
                    event_id: event_id.clone(),
                    removed: false,
                };
                if let Some(m) = self.write_state_change(
                    &mut batch, room_id, &change, membership, was_joined, count,
                )? {
                    wake.push(m.0.clone());
                    member_changes.push(m);
                }
            }
        }
        let mut extra = Vec::new();
        if let Some(changes) = &placement.resolved {
            for (kind, state_key, new_id) in changes {
                let current = self.state_get_for_auth(room_id, kind, state_key)?;
                // `None`: the key leaves the state. State resolution never drops a key every
                // branch had, but a key only one branch had goes when its event fails the auth
                // rules against the resolved state (spec: the iterative auth checks of state
                // resolution v2 drop it); every server resolving the fork must end without it.
                let (change_id, removed) = match (new_id, &current) {
                    (Some(id), _) => (id.clone(), false),
                    (None, Some(p)) => (p.event_id.clone(), true),
                    (None, None) => continue,
                };
                let was_joined = kind == "m.room.member"
                    && current
                        .as_ref()
                        .is_some_and(|p| p.membership().as_deref() == Some("join"));
                let membership = if kind == "m.room.member" {
                    let winner = match new_id {
                        None => None,
                        Some(id) if *id == event_id => Some(pdu.clone()),
                        Some(id) => self.pdu(id.as_str())?,
                    };
                    Some(
                        winner
                            .and_then(|p| p.membership())
                            .unwrap_or_else(|| "leave".to_owned()),
                    )
                } else {
                    None
                };
                let pending = self.globals.counter.next()?;
                let change = StateChange {
                    event_type: kind.clone(),
                    state_key: state_key.clone(),
                    event_id: change_id,
                    removed,
                };
                if let Some(m) = self.write_state_change(
                    &mut batch,
                    room_id,
                    &change,
                    membership,
                    was_joined,
                    pending.get(),
                )? {
                    wake.push(m.0.clone());
                    member_changes.push(m);
                }
                extra.push(pending);
            }
        }
        if let Some(state) = &placement.state_before {
            self.put_event_state(&mut batch, &event_id, state)?;
        }

        // A redaction strips the target event in storage: the content is really gone.
        if pdu.kind == TimelineEventType::RoomRedaction {
            if let Some(target_id) = pdu.redacts_id() {
                self.redact_stored(&mut batch, room_id, &target_id, &pdu, &rules)?;
            }
        }

        let notified = self.push_notifications(&mut batch, room_id, &stored, &pdu, count)?;
        batch.put(
            Table::Pdus,
            event_id.as_bytes(),
            &serde_json::to_vec(&stored)?,
        )?;
        let event_meta = EventMeta {
            room_id: room_id.to_owned(),
            count,
            device_id: txn.map(|(d, _)| d.to_string()),
            txn_id: txn.map(|(_, t)| t.to_owned()),
        };
        batch.put(
            Table::EventMeta,
            event_id.as_bytes(),
            &serde_json::to_vec(&event_meta)?,
        )?;
        batch.put(
            Table::Timeline,
            &keys::with_count(&[room_id.as_str()], count),
            event_id.as_bytes(),
        )?;
        let parent_room = |id: &str| Ok(self.event_meta(id)?.map(|m| m.room_id));
        if let Some((parent, rel_type)) =
            super::relations::index(&mut batch, room_id, &pdu, count, parent_room)?
        {
            if rel_type == "m.thread" {
                self.index_thread_reply(&mut batch, room_id, &parent, &pdu, count)?;
            }
        }
        if let Some((device, txn_id)) = txn {
            batch.put(
                Table::Transactions,
                &keys::join(&[pdu.sender.as_str(), device.as_str(), txn_id]),
                event_id.as_bytes(),
            )?;
        }
        meta.extremities = placement.extremities;
        meta.depth = meta.depth.max(u64::from(pdu.depth));
        meta.last_count = count;
        batch.put(
            Table::Rooms,
            room_id.as_bytes(),
            &serde_json::to_vec(&meta)?,
        )?;
        let federate =
            self.queue_for_federation(&mut batch, &joined, &pdu, count, placement.rebroadcast)?;
        let appservices = match &self.appservices {
            Some(a) => a.queue_event(&mut batch, room_id, &pdu, &joined, count, &|| {
                Ok(self
                    .local_aliases(room_id)?
                    .into_iter()
                    .map(|a| a.to_string())
                    .collect())
            })?,
            None => Vec::new(),
        };
        let ticket = batch.commit_deferred()?;

        // The targets (woken above) are the only members whose membership changed.
        for (target, joined) in member_changes {
            self.update_joined(room_id, &target, joined);
        }
        Ok((
            Sent { event_id, count },
            Deferred {
                pending,
                extra,
                wake,
                ticket,
                notified,
                pushes: &self.pending_pushes,
                federate,
                federation_wake: &self.federation_wake,
                appservices,
                appservice_queue: self.appservices.as_deref().map(|a| &a.queue),
            },
        ))
    }

    /// Make `change` the current state for its key, at stream position `count`; for membership
    /// events (`membership` given) update the member tables too. Returns the member and whether
    /// they are joined now, when the event is a membership.
    pub(crate) fn write_state_change(
        &self,
        batch: &mut crate::storage::Batch,
        room_id: &RoomId,
        change: &StateChange,
        membership: Option<String>,
        was_joined: bool,
        count: u64,
    ) -> Result<Option<(OwnedUserId, bool)>> {
        let state_key = keys::join(&[room_id.as_str(), &change.event_type, &change.state_key]);
        if change.removed {
            batch.delete(Table::RoomState, &state_key)?;
        } else {
            batch.put(Table::RoomState, &state_key, change.event_id.as_bytes())?;
        }
        batch.put(
            Table::StateLog,
            &keys::with_count(&[room_id.as_str()], count),
            &serde_json::to_vec(change)?,
        )?;
        let by_key = keys::with_count(
            &[room_id.as_str(), &change.event_type, &change.state_key],
            count,
        );
        let value: &[u8] = if change.removed {
            b""
        } else {
            change.event_id.as_bytes()
        };
        batch.put(Table::StateByKey, &by_key, value)?;
        let Some(membership) = membership else {
            return Ok(None);
        };
        let target = UserId::parse(change.state_key.as_str())
            .map_err(|_| Error::bad_json("m.room.member state_key must be a user id"))?;
        batch.put(
            Table::RoomMembers,
            &keys::join(&[room_id.as_str(), target.as_str()]),
            membership.as_bytes(),
        )?;
        let user_room = UserRoom {
            membership: membership.clone(),
            count,
            event_id: change.event_id.clone(),
        };
        batch.put(
            Table::UserRooms,
            &keys::join(&[target.as_str(), room_id.as_str()]),
            &serde_json::to_vec(&user_room)?,
        )?;
        let mut log_key = keys::prefix(&[target.as_str(), room_id.as_str()]);
        log_key.extend_from_slice(&count.to_be_bytes());
        batch.put(Table::MembershipLog, &log_key, membership.as_bytes())?;
        let joined = membership == "join";
        if was_joined != joined {
            // Who shares rooms with whom changed: E2EE clients track device lists by it.
            crate::service::keys::log_change(
                batch,
                count,
                &crate::service::keys::ListChange::Membership {
                    user: target.clone(),
                    room: room_id.to_owned(),
                    joined,
                },
            )?;
        }
        Ok(Some((target, joined)))
    }

    /// Queue the event, in its batch, for the servers that must receive it: every other server
    /// with a joined member (before the event; the target of a membership event too, so a kick,
    /// ban or leave reaches the user's server). Only events of our users, or remote events to
    /// `rebroadcast` (never to their own server). Uses the in-memory member set: no reads.
    fn queue_for_federation(
        &self,
        batch: &mut crate::storage::Batch,
        joined: &std::collections::HashSet<OwnedUserId>,
        pdu: &Pdu,
        count: u64,
        rebroadcast: bool,
    ) -> Result<Vec<ruma::OwnedServerName>> {
        let ours = &*self.globals.server_name;
        let origin = pdu.sender.server_name();
        if origin != ours && !rebroadcast {
            return Ok(Vec::new());
        }
        let target = (pdu.kind == TimelineEventType::RoomMember)
            .then(|| pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()))
            .flatten();
        let mut servers: std::collections::BTreeSet<&ruma::ServerName> = Default::default();
        for user in joined.iter().chain(target.as_ref()) {
            let server = user.server_name();
            if server != ours && server != origin {
                servers.insert(server);
            }
        }
        let servers: Vec<ruma::OwnedServerName> =
            servers.into_iter().map(ToOwned::to_owned).collect();
        for server in &servers {
            crate::service::federation::sender::queue_pdu(batch, server, count, &pdu.event_id)?;
        }
        Ok(servers)
    }

    /// Replace the stored target with its redacted form, keeping `redacted_because`.
    fn redact_stored(
        &self,
        batch: &mut crate::storage::Batch,
        room_id: &RoomId,
        target_id: &ruma::EventId,
        redaction: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<()> {
        self.strip_stored(
            batch,
            room_id,
            target_id,
            Some(redaction.to_client_value(None)),
            rules,
        )
    }

    /// Erasure of a user who already left a room: strip their event in storage as a redaction
    /// would (they can no longer send one there), without a redaction event.
    pub async fn erase_stored(&self, room_id: &RoomId, target_id: &ruma::EventId) -> Result<()> {
        let rules = rules_for(&self.version(room_id)?)?;
        let _guard = self.lock(room_id).await;
        let mut batch = self.storage.batch();
        self.strip_stored(&mut batch, room_id, target_id, None, &rules)?;
        batch.commit()
    }

    /// Replace the stored target with its redacted form; `because` (the redaction) is kept in
    /// `unsigned.redacted_because`.
    fn strip_stored(
        &self,
        batch: &mut crate::storage::Batch,
        room_id: &RoomId,
        target_id: &ruma::EventId,
        because: Option<Value>,
        rules: &RoomVersionRules,
    ) -> Result<()> {
        let Some(bytes) = self.storage.get(Table::Pdus, target_id.as_bytes())? else {
            return Ok(());
        };
        let mut value: Value = serde_json::from_slice(&bytes)?;
        if value.get("room_id").and_then(Value::as_str) != Some(room_id.as_str()) {
            return Ok(());
        }
        let event_id = value.get("event_id").cloned();
        let room = value.get("room_id").cloned();
        let state_key = value
            .get("type")
            .and_then(Value::as_str)
            .zip(value.get("state_key").and_then(Value::as_str))
            .map(|(t, k)| (t.to_owned(), k.to_owned()));
        // Redaction strips `m.relates_to`: the event is no longer its parent's child.
        if let Some(meta) = self.event_meta(target_id.as_str())? {
            super::relations::unindex(batch, &value, meta.count)?;
        }
        let unsigned = value.as_object_mut().and_then(|o| o.remove("unsigned"));
        let obj = to_canonical(value)?;
        let mut redacted = ruma::canonical_json::redact(obj, &rules.redaction, None)
            .map_err(|e| Error::internal(format!("redact: {e}")))?;
        let mut out = serde_json::to_value(redacted.clone())?;
        redacted.clear();
        if let Some(id) = event_id {
            out["event_id"] = id;
        }
        if let Some(r) = room {
            out["room_id"] = r;
        }
        let mut new_unsigned = serde_json::Map::new();
        if let Some(Value::Object(u)) = unsigned {
            // Keep only what does not reveal the removed content.
            if let Some(r) = u.get("replaces_state") {
                new_unsigned.insert("replaces_state".into(), r.clone());
            }
        }
        if let Some(because) = because {
            new_unsigned.insert("redacted_because".into(), because);
        }
        out["unsigned"] = Value::Object(new_unsigned);
        batch.put(
            Table::Pdus,
            target_id.as_bytes(),
            &serde_json::to_vec(&out)?,
        )?;
        // The batch commits before the room's lock is released, so no auth check can refill
        // the cache with the unredacted form.
        self.evict_for_auth(target_id);
        if let Some((kind, key)) = state_key {
            self.strip_successor_prev_content(
                batch,
                room_id,
                target_id,
                (&kind, &key),
                &out["content"],
            )?;
        }
        Ok(())
    }

    /// The state event that replaced `target_id` carries the target's content as
    /// `unsigned.prev_content` (what clients show as "changed their name from ..."): once the
    /// target is redacted, that copy becomes the redacted content too. The successor is the next
    /// change of the same state key (`state_by_key`).
    fn strip_successor_prev_content(
        &self,
        batch: &mut crate::storage::Batch,
        room_id: &RoomId,
        target_id: &ruma::EventId,
        (kind, state_key): (&str, &str),
        redacted_content: &Value,
    ) -> Result<()> {
        let Some(meta) = self.event_meta(target_id.as_str())? else {
            return Ok(());
        };
        // The next change of this key after the target: one seek in the per-key state log.
        let key_parts = [room_id.as_str(), kind, state_key];
        let prefix = keys::prefix(&key_parts);
        let from = keys::with_count(&key_parts, meta.count.saturating_add(1));
        let Some(entry) = self
            .storage
            .scan_from(Table::StateByKey, &prefix, &from, false)?
            .next()
        else {
            return Ok(());
        };
        let (_, next_id) = entry?;
        if next_id.is_empty() {
            return Ok(()); // the key left the state: no successor carries the content
        }
        let Some(bytes) = self.storage.get(Table::Pdus, &next_id)? else {
            return Ok(());
        };
        let mut successor: Value = serde_json::from_slice(&bytes)?;
        let replaces = successor["unsigned"]["replaces_state"] == target_id.as_str();
        if let (true, Some(unsigned)) = (
            replaces,
            successor.get_mut("unsigned").and_then(Value::as_object_mut),
        ) {
            if unsigned.contains_key("prev_content") {
                unsigned.insert("prev_content".into(), redacted_content.clone());
                batch.put(Table::Pdus, &next_id, &serde_json::to_vec(&successor)?)?;
            }
        }
        Ok(())
    }

    /// The event id an earlier request with this transaction id produced, if any.
    pub fn transaction_event(
        &self,
        user: &UserId,
        device: &DeviceId,
        txn_id: &str,
    ) -> Result<Option<OwnedEventId>> {
        let key = keys::join(&[user.as_str(), device.as_str(), txn_id]);
        match self.storage.get(Table::Transactions, &key)? {
            Some(v) => Ok(OwnedEventId::try_from(String::from_utf8_lossy(&v).into_owned()).ok()),
            None => Ok(None),
        }
    }
}
