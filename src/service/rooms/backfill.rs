//! History older than what this server has of a room, fetched from other servers (`/backfill`,
//! done by `service::federation::backfill`) and kept apart from the timeline.
//!
//! The timeline is keyed by the global stream count, so there is no position before a room's
//! first event. Backfilled events go to their own table instead, `backfill`: `room 0xff seq`,
//! where a higher sequence is older (each fetched page is ordered newest first, by depth, and
//! numbered on from the previous page). `/messages` walks the timeline backwards and then this
//! table (positions below the timeline's, tokens `b<seq>`); sync never reads it, so backfilled
//! events never show up as new. Per room a `BackfillMeta` row keeps the next sequence and the
//! backward extremities still to fetch: the prev events of our oldest events that we do not have.
//! A page (its events, their index rows, the new extremities) is written in one batch.

use std::collections::HashSet;

use ruma::{OwnedEventId, RoomId};
use serde::{Deserialize, Serialize};

use super::{Pdu, Rooms};
use crate::{
    error::Result,
    storage::{keys, Table},
};

/// Most backward extremities kept (each is a `v` of the next `/backfill`).
pub const MAX_EXTREMITIES: usize = 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackfillMeta {
    /// The sequence the next backfilled event gets (sequences start at 1).
    pub next: u64,
    /// Events before our oldest ones that we do not have yet.
    pub extremities: Vec<OwnedEventId>,
}

impl Rooms {
    /// Whether the event is in the room's backfilled history.
    pub fn is_backfilled(&self, event_id: &str) -> Result<bool> {
        self.storage
            .contains(Table::BackfillIndex, event_id.as_bytes())
    }

    /// Whether the event is in the timeline or the backfilled history (not just an outlier).
    fn has_history_event(&self, event_id: &str) -> Result<bool> {
        Ok(self.event_meta(event_id)?.is_some() || self.is_backfilled(event_id)?)
    }

    /// The room's backfill state. Before the first backfill, the extremities are the missing
    /// prev events of the room's first timeline event: the join of a room joined over
    /// federation, whose prev events are the joined server's latest events; none for a room
    /// created here, whose first event is the create event. (Only the first: a later event's
    /// missing prev can be one this server soft-failed, which must not become history.)
    pub fn backfill_meta(&self, room_id: &RoomId) -> Result<BackfillMeta> {
        if let Some(meta) = self
            .storage
            .get_json::<BackfillMeta>(Table::Backfill, room_id.as_bytes())?
        {
            return Ok(meta);
        }
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut extremities = Vec::new();
        for entry in self.storage.scan_prefix(Table::Timeline, &prefix)?.take(1) {
            let (_, id) = entry?;
            let Some(pdu) = self.pdu(&String::from_utf8_lossy(&id))? else {
                continue;
            };
            for prev in pdu.prev_events {
                if !extremities.contains(&prev) && !self.has_history_event(prev.as_str())? {
                    extremities.push(prev);
                }
            }
        }
        extremities.truncate(MAX_EXTREMITIES);
        Ok(BackfillMeta {
            next: 1,
            extremities,
        })
    }

    /// Whether older history of the room may be had from other servers.
    pub fn backfill_pending(&self, room_id: &RoomId) -> Result<bool> {
        Ok(!self.backfill_meta(room_id)?.extremities.is_empty())
    }

    /// Store one backfilled page: `events` (checked, already stored as outliers) go before the
    /// history we have, newest first; the extremities lose what the server returned (`returned`,
    /// accepted or not, so a refused event is not asked for again and again) and gain the
    /// accepted events' prev events we do not have. One batch. Call under the room's lock.
    /// Returns how many events were placed.
    pub(crate) fn store_backfilled(
        &self,
        room_id: &RoomId,
        returned: &[OwnedEventId],
        mut events: Vec<Pdu>,
    ) -> Result<usize> {
        let mut meta = self.backfill_meta(room_id)?;
        let mut fresh = Vec::new();
        let mut placed: HashSet<OwnedEventId> = HashSet::new();
        for pdu in events.drain(..) {
            if !self.has_history_event(pdu.event_id.as_str())?
                && placed.insert(pdu.event_id.clone())
            {
                fresh.push(pdu);
            }
        }
        // Newest first: the walk goes to higher sequences as it goes back in time.
        fresh.sort_by(|a, b| {
            u64::from(b.depth)
                .cmp(&u64::from(a.depth))
                .then_with(|| b.event_id.cmp(&a.event_id))
        });
        let mut batch = self.storage.batch();
        let mut seq = meta.next.max(1);
        for pdu in &fresh {
            batch.put(
                Table::Backfill,
                &keys::with_count(&[room_id.as_str()], seq),
                pdu.event_id.as_bytes(),
            )?;
            batch.put(
                Table::BackfillIndex,
                pdu.event_id.as_bytes(),
                &seq.to_be_bytes(),
            )?;
            if pdu.kind == ruma::events::TimelineEventType::RoomHistoryVisibility
                && pdu.state_key.as_deref() == Some("")
            {
                Rooms::log_backfilled_visibility(&mut batch, room_id, seq, pdu.event_id.as_str())?;
            }
            seq += 1;
        }
        let gone: HashSet<&OwnedEventId> = returned.iter().chain(placed.iter()).collect();
        let mut extremities: Vec<OwnedEventId> = meta
            .extremities
            .iter()
            .filter(|e| !gone.contains(e))
            .cloned()
            .collect();
        for pdu in &fresh {
            for prev in &pdu.prev_events {
                if !placed.contains(prev)
                    && !extremities.contains(prev)
                    && !self.has_history_event(prev.as_str())?
                {
                    extremities.push(prev.clone());
                }
            }
        }
        extremities.truncate(MAX_EXTREMITIES);
        meta.next = seq;
        meta.extremities = extremities;
        batch.put(
            Table::Backfill,
            room_id.as_bytes(),
            &serde_json::to_vec(&meta)?,
        )?;
        batch.commit()?;
        Ok(fresh.len())
    }
}
