//! Rooms joined over federation: taking over the state a resident server gave, and placing our
//! join event on top of it.

use std::collections::HashMap;

use ruma::{OwnedEventId, RoomId, RoomVersionId};

use super::{append::Placement, RoomMeta, Rooms, StateChange, StateIds};
use crate::{error::Result, service::federation::pdu::Incoming};

impl Rooms {
    /// Make `state` the room's current state (the room is created here if new), writing every
    /// change to the state log with a stream position of its own, in one batch. `memberships`
    /// gives the membership of member events in `state`. The caller holds the room's lock; the
    /// events of `state` are stored (as outliers).
    pub(crate) async fn install_remote_state(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        state: &StateIds,
        memberships: &HashMap<OwnedEventId, String>,
        depth: u64,
    ) -> Result<()> {
        let current = self.current_state_ids(room_id)?;
        let mut batch = self.storage.batch();
        let mut pending = Vec::new();
        let mut changed_members = Vec::new();
        // Create first, then power levels and join rules, then the rest: the log's order is the
        // order readers rebuild state in, and any order gives the same final state.
        let mut entries: Vec<(&(String, String), &OwnedEventId)> = state.iter().collect();
        entries.sort_by_key(|((t, k), _)| (t != "m.room.create", t.clone(), k.clone()));
        for ((kind, key), id) in entries {
            if current.get(&(kind.clone(), key.clone())) == Some(id) {
                continue;
            }
            let count = self.globals.counter.next()?;
            let membership = (kind == "m.room.member").then(|| {
                memberships
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| "leave".to_owned())
            });
            let was_joined = kind == "m.room.member"
                && self
                    .membership(
                        room_id,
                        &ruma::UserId::parse(key.as_str()).map_err(|_| {
                            crate::error::Error::bad_json(
                                "a member event's state key is not a user",
                            )
                        })?,
                    )?
                    .as_deref()
                    == Some("join");
            let change = StateChange {
                event_type: kind.clone(),
                state_key: key.clone(),
                event_id: id.clone(),
                removed: false,
            };
            if let Some(m) = self.write_state_change(
                &mut batch,
                room_id,
                &change,
                membership,
                was_joined,
                count.get(),
            )? {
                changed_members.push(m);
            }
            pending.push(count);
        }
        let meta = match self.meta(room_id)? {
            Some(mut m) => {
                m.version = version.clone();
                m
            }
            None => RoomMeta {
                version: version.clone(),
                extremities: vec![],
                depth: depth.saturating_sub(1),
                last_count: 0,
            },
        };
        batch.put(
            crate::storage::Table::Rooms,
            room_id.as_bytes(),
            &serde_json::to_vec(&meta)?,
        )?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        for p in pending {
            p.finish(Vec::new());
        }
        for (user, joined) in changed_members {
            self.update_joined(room_id, &user, joined);
        }
        Ok(())
    }

    /// Place our join event (checked, countersigned where needed) on top of the installed state:
    /// it becomes the room's only forward extremity. The caller holds the room's lock.
    pub(crate) async fn persist_remote_join(
        &self,
        join: &Incoming,
        state_before: StateIds,
    ) -> Result<()> {
        let meta = self
            .meta(&join.room_id)?
            .ok_or_else(|| crate::error::Error::internal("room vanished during the join"))?;
        let placement = Placement {
            extremities: vec![join.event_id.clone()],
            resolved: None,
            state_before: Some(state_before),
            rebroadcast: false,
        };
        self.persist(
            &join.room_id,
            meta,
            join.obj.clone(),
            join.pdu.clone(),
            None,
            placement,
        )
        .await?;
        Ok(())
    }

    /// A local user declines an invite to a room elsewhere whose server cannot be told: the
    /// user's membership becomes `leave` here (still pointing at the invite event).
    pub async fn record_local_decline(
        &self,
        room_id: &RoomId,
        user: &ruma::UserId,
        invite_event: &OwnedEventId,
    ) -> Result<()> {
        let pending = self.globals.counter.next()?;
        let count = pending.get();
        let mut batch = self.storage.batch();
        let user_room = super::UserRoom {
            membership: "leave".to_owned(),
            count,
            event_id: invite_event.clone(),
        };
        batch.put(
            crate::storage::Table::UserRooms,
            &crate::storage::keys::join(&[user.as_str(), room_id.as_str()]),
            &serde_json::to_vec(&user_room)?,
        )?;
        let mut log_key = crate::storage::keys::prefix(&[user.as_str(), room_id.as_str()]);
        log_key.extend_from_slice(&count.to_be_bytes());
        batch.put(crate::storage::Table::MembershipLog, &log_key, b"leave")?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        pending.finish(vec![user.to_owned()]);
        Ok(())
    }
}
