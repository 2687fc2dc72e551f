//! `/timestamp_to_event`: the event closest to a point in time. Stream positions grow with time
//! for local events, so a binary search over the room's timeline finds the neighbourhood in
//! O(log n) reads; a short walk from there picks the first visible event on the asked side.

use ruma::{OwnedEventId, RoomId, UserId};

use super::Rooms;
use crate::{
    error::{Error, Result},
    storage::{keys, Table},
};

/// Events looked at after the binary search (invisible ones are skipped).
const MAX_WALK: usize = 1000;

impl Rooms {
    /// The first event at or after `ts` (forward) or the last at or before it (backward) that
    /// the user may see, with its timestamp.
    pub fn event_at_time(
        &self,
        room_id: &RoomId,
        user: &UserId,
        ts: u64,
        forward: bool,
    ) -> Result<Option<(OwnedEventId, u64)>> {
        let visibility = self.history_visibility(room_id)?;
        if !self.may_read_history(room_id, user, &visibility)? {
            return Err(Error::forbidden(
                "You are not allowed to read this room's history",
            ));
        }
        let mut viewer = self.viewer(room_id, user);
        self.event_at_time_where(room_id, ts, forward, |count, pdu| {
            viewer.can_see(pdu, super::visibility::At::Stream(count))
        })
    }

    /// The event closest to `ts` on the asked side among those `may_see` accepts (by stream
    /// count and event): the search behind the client's and the federation's endpoint.
    pub fn event_at_time_where(
        &self,
        room_id: &RoomId,
        ts: u64,
        forward: bool,
        mut may_see: impl FnMut(u64, &super::Pdu) -> Result<bool>,
    ) -> Result<Option<(OwnedEventId, u64)>> {
        let prefix = keys::prefix(&[room_id.as_str()]);
        let event_ts = |count_from: u64| -> Result<Option<(u64, u64)>> {
            let start = keys::with_count(&[room_id.as_str()], count_from);
            let Some(entry) = self
                .storage
                .scan_from(Table::Timeline, &prefix, &start, false)?
                .next()
            else {
                return Ok(None);
            };
            let (k, v) = entry?;
            let count = keys::count_suffix(&k).unwrap_or(0);
            let pdu = self.pdu(&String::from_utf8_lossy(&v))?;
            Ok(pdu.map(|p| (count, u64::from(p.origin_server_ts.get()))))
        };
        // Smallest position from which the next event is on the far side of `ts`: after it or at
        // it when searching forwards, after it when searching backwards (or there is none).
        let before_target = |t: u64| if forward { t < ts } else { t <= ts };
        let (mut lo, mut hi) = (0u64, self.globals.counter.watermark().saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match event_ts(mid)? {
                Some((count, t)) if before_target(t) => lo = count.saturating_add(1),
                _ => hi = mid,
            }
        }
        let start = keys::with_count(
            &[room_id.as_str()],
            if forward { lo } else { lo.saturating_sub(1) },
        );
        for entry in self
            .storage
            .scan_from(Table::Timeline, &prefix, &start, !forward)?
            .take(MAX_WALK)
        {
            let (k, v) = entry?;
            let count = keys::count_suffix(&k).unwrap_or(0);
            let Some(pdu) = self.pdu(&String::from_utf8_lossy(&v))? else {
                continue;
            };
            let t = u64::from(pdu.origin_server_ts.get());
            let on_side = if forward { t >= ts } else { t <= ts };
            if on_side && may_see(count, &pdu)? {
                return Ok(Some((pdu.event_id, t)));
            }
        }
        Ok(None)
    }
}
