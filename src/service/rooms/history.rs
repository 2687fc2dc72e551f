//! Room history for clients: `/messages` pagination and `/context` around one event.
//!
//! Tokens are stream positions, as sync's: `s<N>` is the position just after the event with
//! stream count N ("seen up to and including N"). Backwards from `s<N>` returns events with
//! count <= N, forwards those with count > N. A backwards page ends at `s<oldest - 1>`, so tokens
//! always sit between events and pages chain without gaps or repeats in either direction. (Sync's
//! `prev_batch` for a timeline starting at count C is `s<C-1>`.)

use std::collections::{BTreeSet, HashSet};

use ruma::{api::client::filter::RoomEventFilter, OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::{visibility::At, Pdu, Rooms};
use crate::{
    error::{Error, Result},
    service::filter::{lazy_loading, pdu_matches},
    storage::{keys, Table},
};

/// The largest page a client may ask for.
pub const MAX_PAGE: usize = 1000;

/// Parse an `s<count>` token. Anything after the digits (sync may append more positions) is
/// ignored; a token that does not start with `s<digits>` is refused.
pub fn parse_token(token: &str) -> Result<u64> {
    let digits: String = token
        .strip_prefix('s')
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if digits.is_empty() {
        return Err(Error::invalid_param("Invalid pagination token"));
    }
    digits
        .parse()
        .map_err(|_| Error::invalid_param("Invalid pagination token"))
}

pub fn token(count: u64) -> String {
    format!("s{count}")
}

/// A position in a room's history as `/messages` walks it: stream counts (`s<N>`, N >= 0) for
/// the timeline, negative numbers for the backfilled history before it (`b<K>`: between the
/// backfilled events with sequences K and K+1, which sit at positions -K and -(K+1)). Backwards
/// from position P means the events at positions <= P, forwards those at positions > P.
pub fn parse_position(token: &str) -> Result<i128> {
    match token.strip_prefix('b') {
        Some(rest) => {
            let seq: u64 = rest
                .parse()
                .map_err(|_| Error::invalid_param("Invalid pagination token"))?;
            Ok(-i128::from(seq) - 1)
        }
        None => Ok(i128::from(parse_token(token)?)),
    }
}

/// The token of a position (see [`parse_position`]).
pub fn token_at(pos: i128) -> String {
    if pos >= 0 {
        format!("s{pos}")
    } else {
        format!("b{}", -pos - 1)
    }
}

/// One page of `/messages`.
pub struct MessagesPage {
    pub chunk: Vec<Pdu>,
    pub start: String,
    pub end: Option<String>,
    pub state: Vec<Pdu>,
    /// The walk backwards reached the oldest event stored and other servers may have older
    /// ones: the caller may backfill and ask again.
    pub more_elsewhere: bool,
}

/// The answer of `/context`.
pub struct EventContext {
    pub event: Pdu,
    pub before: Vec<Pdu>,
    pub after: Vec<Pdu>,
    pub state: Vec<Pdu>,
    pub start: String,
    pub end: String,
}

impl Rooms {
    /// May `user` read the room's history at all? Members past and present may (what exactly they
    /// see is decided per event); others only if the room is world readable.
    pub(super) fn may_read_history(
        &self,
        room_id: &RoomId,
        user: &UserId,
        visibility: &str,
    ) -> Result<bool> {
        if !self.exists(room_id)? {
            return Ok(false);
        }
        if self.membership(room_id, user)?.is_some() {
            return Ok(true);
        }
        Ok(visibility == "world_readable" && self.peekable_by(room_id, user)?)
    }

    /// `/messages`: walk the room from `from` (exclusive) in one direction, returning up to
    /// `limit` events the user may see that pass `filter`, stopping at `to`.
    pub fn messages(
        &self,
        room_id: &RoomId,
        user: &UserId,
        from: Option<&str>,
        to: Option<&str>,
        backward: bool,
        limit: usize,
        filter: &RoomEventFilter,
    ) -> Result<MessagesPage> {
        let visibility = self.history_visibility(room_id)?;
        if !self.may_read_history(room_id, user, &visibility)? {
            return Err(Error::forbidden(
                "You are not allowed to read this room's history",
            ));
        }
        let from = match from {
            Some(t) => parse_position(t)?,
            // No token: after the newest event (backwards) or before the oldest one (forwards,
            // which starts at the oldest backfilled event).
            None if backward => i128::from(self.globals.counter.watermark()),
            None => i128::from(i64::MIN),
        };
        let to = to.map(parse_position).transpose()?;
        let limit = limit.min(MAX_PAGE);
        let start = token_at(from);
        if limit == 0 {
            return Ok(MessagesPage {
                chunk: vec![],
                start,
                end: None,
                state: vec![],
                more_elsewhere: false,
            });
        }

        // `to` is a position like `from`: the walk stops when it passes it.
        let beyond_to = |pos: i128| match to {
            Some(t) if backward => pos <= t,
            Some(t) => pos > t,
            None => false,
        };
        let mut viewer = self.viewer(room_id, user);
        let mut events = Vec::new();
        let mut last = None;
        let mut reached_to = false;
        let mut exhausted = true;
        // Bound the walk so a filter that matches nothing cannot scan a whole huge room.
        for (scanned, entry) in self.history_positions(room_id, from, backward)?.enumerate() {
            let (pos, event_id) = entry?;
            if beyond_to(pos) {
                reached_to = true;
                break;
            }
            if events.len() >= limit || scanned >= limit.max(1) * 20 {
                // There is more: the page ends here.
                exhausted = false;
                break;
            }
            last = Some(pos);
            if let Some(pdu) = self.pdu(&event_id)? {
                if pdu_matches(filter, &pdu) && viewer.can_see(&pdu, At::from_position(pos))? {
                    events.push(pdu);
                }
            }
        }
        // Backwards past everything stored: other servers may have more (backfill).
        let more_elsewhere =
            backward && exhausted && !reached_to && self.backfill_pending(room_id)?;

        // `end` is omitted when there is nothing more to read in this direction.
        let end = if reached_to || (exhausted && !more_elsewhere) {
            None
        } else {
            match last {
                Some(last) if backward => Some(token_at(last - 1)),
                Some(last) => Some(token_at(last)),
                None => Some(token_at(from)),
            }
        };

        let chunk: Vec<Pdu> = events;
        let state = if lazy_loading(filter) {
            self.member_events_of(room_id, user, chunk.iter().map(|p| p.sender.clone()))?
        } else {
            Vec::new()
        };
        Ok(MessagesPage {
            chunk,
            start,
            end,
            state,
            more_elsewhere,
        })
    }

    /// The room's events from position `from` on (see [`parse_position`]), as (position, event
    /// id): backwards the timeline and then the backfilled history, forwards the other way.
    #[allow(clippy::type_complexity)]
    fn history_positions<'a>(
        &'a self,
        room_id: &RoomId,
        from: i128,
        backward: bool,
    ) -> Result<Box<dyn Iterator<Item = Result<(i128, String)>> + 'a>> {
        let room = room_id.as_str();
        let prefix = keys::prefix(&[room]);
        let clamp = |v: i128| u64::try_from(v.max(0)).unwrap_or(u64::MAX);
        let timeline = |entry: Result<(Box<[u8]>, Box<[u8]>)>| {
            entry.map(|(k, v)| {
                (
                    i128::from(keys::count_suffix(&k).unwrap_or(0)),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
        };
        let backfilled = |entry: Result<(Box<[u8]>, Box<[u8]>)>| {
            entry.map(|(k, v)| {
                (
                    -i128::from(keys::count_suffix(&k).unwrap_or(0)),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
        };
        if backward {
            // Timeline counts <= from, newest first; then backfilled sequences >= -from.
            let tl = if from >= 1 {
                Some(
                    self.storage
                        .scan_from(
                            Table::Timeline,
                            &prefix,
                            &keys::with_count(&[room], clamp(from)),
                            true,
                        )?
                        .map(timeline),
                )
            } else {
                None
            };
            let bf = self
                .storage
                .scan_from(
                    Table::Backfill,
                    &prefix,
                    &keys::with_count(&[room], clamp(-from).max(1)),
                    false,
                )?
                .map(backfilled);
            Ok(Box::new(tl.into_iter().flatten().chain(bf)))
        } else {
            // Backfilled sequences < -from, newest last; then timeline counts > from.
            let bf = if from < -1 {
                Some(
                    self.storage
                        .scan_from(
                            Table::Backfill,
                            &prefix,
                            &keys::with_count(&[room], clamp(-from - 1)),
                            true,
                        )?
                        .map(backfilled),
                )
            } else {
                None
            };
            let tl = self
                .storage
                .scan_from(
                    Table::Timeline,
                    &prefix,
                    &keys::with_count(&[room], clamp(from.saturating_add(1))),
                    false,
                )?
                .map(timeline);
            Ok(Box::new(bf.into_iter().flatten().chain(tl)))
        }
    }

    /// The `m.room.member` events of the given senders as `reader` may know them (lazy-loaded
    /// members; see [`Rooms::visible_member_event`]).
    fn member_events_of(
        &self,
        room_id: &RoomId,
        reader: &UserId,
        senders: impl Iterator<Item = OwnedUserId>,
    ) -> Result<Vec<Pdu>> {
        // The reader's bound once for the page, then one read per sender.
        let Some(bound) = self.reader_state_bound(room_id, reader)? else {
            return Ok(Vec::new());
        };
        let senders: BTreeSet<OwnedUserId> = senders.collect();
        let mut out = Vec::new();
        for sender in senders {
            if let Some(p) = self.member_event_within(room_id, bound, &sender)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// `/context`: the event, up to `limit` visible events around it (half before, half after),
    /// and the room state at the last event returned.
    pub fn context(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &str,
        limit: usize,
        filter: &RoomEventFilter,
    ) -> Result<EventContext> {
        let not_found = || Error::not_found("Event not found");
        let Some(meta) = self.event_meta(event_id)? else {
            return match self.backfill_position(event_id)? {
                Some(pos) => self.context_in_history(room_id, user, event_id, pos, limit, filter),
                None => Err(not_found()),
            };
        };
        if meta.room_id != room_id {
            return Err(not_found());
        }
        let visibility = self.history_visibility(room_id)?;
        let event = self.pdu(event_id)?.ok_or_else(not_found)?;
        let mut viewer = self.viewer(room_id, user);
        if !self.may_read_history(room_id, user, &visibility)?
            || !viewer.can_see(&event, At::Stream(meta.count))?
        {
            return Err(not_found());
        }
        let limit = limit.min(MAX_PAGE);
        let before_limit = limit / 2;
        let after_limit = limit - before_limit;
        let mut keep = |count: u64, pdu: &Pdu| -> Result<bool> {
            Ok(pdu_matches(filter, pdu) && viewer.can_see(pdu, At::Stream(count))?)
        };
        let (before, _) = if before_limit > 0 {
            self.paginate(room_id, meta.count, true, before_limit, &mut keep)?
        } else {
            (vec![], None)
        };
        let (after, _) = if after_limit > 0 {
            self.paginate(room_id, meta.count, false, after_limit, &mut keep)?
        } else {
            (vec![], None)
        };
        let start = token(
            before
                .last()
                .map_or(meta.count, |(c, _)| *c)
                .saturating_sub(1),
        );
        let last_count = after.last().map_or(meta.count, |(c, _)| *c);
        let end = token(last_count);

        let before: Vec<Pdu> = before.into_iter().map(|(_, p)| p).collect();
        let after: Vec<Pdu> = after.into_iter().map(|(_, p)| p).collect();
        let state = if lazy_loading(filter) {
            let senders = before
                .iter()
                .chain(after.iter())
                .chain(std::iter::once(&event));
            self.member_events_of(room_id, user, senders.map(|p| p.sender.clone()))?
        } else {
            // The state after the last event returned.
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for id in self
                .state_at(room_id, last_count.saturating_add(1))?
                .into_values()
            {
                if seen.insert(id.clone()) {
                    if let Some(p) = self.pdu(id.as_str())? {
                        out.push(p);
                    }
                }
            }
            out
        };
        Ok(EventContext {
            event,
            before,
            after,
            state,
            start,
            end,
        })
    }

    /// The position (see [`parse_position`]) of a backfilled event: `-seq`.
    fn backfill_position(&self, event_id: &str) -> Result<Option<i128>> {
        Ok(self
            .storage
            .get(Table::BackfillIndex, event_id.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(|b| -i128::from(u64::from_be_bytes(b))))
    }

    /// `/context` around an event of the backfilled history (at position `pos`): the walk of
    /// `/messages` in both directions from it, with its tokens. Backfilled events are judged by
    /// the history visibility in force at them (`visibility.rs`), as `/messages` does; the
    /// state given is the one the room had when this server joined, the oldest it knows.
    fn context_in_history(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &str,
        pos: i128,
        limit: usize,
        filter: &RoomEventFilter,
    ) -> Result<EventContext> {
        let not_found = || Error::not_found("Event not found");
        // In this room's backfilled history (the index row names the room's sequence).
        let seq = u64::try_from(-pos).unwrap_or(0);
        let in_room = self
            .storage
            .get(Table::Backfill, &keys::with_count(&[room_id.as_str()], seq))?
            .is_some_and(|v| *v == *event_id.as_bytes());
        if !in_room {
            return Err(not_found());
        }
        let event = self.pdu(event_id)?.ok_or_else(not_found)?;
        let visibility = self.history_visibility(room_id)?;
        let mut viewer = self.viewer(room_id, user);
        if !self.may_read_history(room_id, user, &visibility)?
            || !viewer.can_see(&event, At::from_position(pos))?
        {
            return Err(not_found());
        }
        let limit = limit.min(MAX_PAGE);
        let before_limit = limit / 2;
        let after_limit = limit - before_limit;
        // Up to `want` visible events from `from` on, with the position of the last one.
        let mut walk =
            |from: i128, backward: bool, want: usize| -> Result<(Vec<Pdu>, Option<i128>)> {
                let mut out = Vec::new();
                let mut last = None;
                if want == 0 {
                    return Ok((out, last));
                }
                for (scanned, entry) in self.history_positions(room_id, from, backward)?.enumerate()
                {
                    if out.len() >= want || scanned >= want * 20 {
                        break;
                    }
                    let (p, id) = entry?;
                    let Some(pdu) = self.pdu(&id)? else { continue };
                    if pdu_matches(filter, &pdu) && viewer.can_see(&pdu, At::from_position(p))? {
                        out.push(pdu);
                        last = Some(p);
                    }
                }
                Ok((out, last))
            };
        // Older: positions <= pos - 1; newer: positions > pos.
        let (before, oldest) = walk(pos - 1, true, before_limit)?;
        let (after, newest) = walk(pos, false, after_limit)?;
        let start = token_at(oldest.unwrap_or(pos) - 1);
        let end = token_at(newest.unwrap_or(pos));
        let state = if lazy_loading(filter) {
            let senders = before
                .iter()
                .chain(after.iter())
                .chain(std::iter::once(&event));
            self.member_events_of(room_id, user, senders.map(|p| p.sender.clone()))?
        } else {
            let at = newest.and_then(|p| u64::try_from(p).ok()).unwrap_or(0);
            let mut out = Vec::new();
            for id in self.state_at(room_id, at.saturating_add(1))?.into_values() {
                if let Some(p) = self.pdu(id.as_str())? {
                    out.push(p);
                }
            }
            out
        };
        Ok(EventContext {
            event,
            before,
            after,
            state,
            start,
            end,
        })
    }

    /// An event as a client sees it: the device that sent it also gets its transaction id, and
    /// aggregated relations (thread summary, latest edit, references) are bundled in.
    pub fn client_event_for(&self, pdu: &Pdu, user: &UserId, device: &str) -> Result<Value> {
        let meta = if pdu.sender == user {
            self.event_meta(pdu.event_id.as_str())?
        } else {
            None
        };
        let txn = meta
            .as_ref()
            .and_then(|m| m.txn_id_for(&pdu.sender, user, device));
        let mut value = pdu.to_client_value(txn);
        if let Some(relations) = self.bundled_relations(pdu, user)? {
            value["unsigned"]["m.relations"] = relations;
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(parse_token("s42").unwrap(), 42);
        assert_eq!(parse_token("s42_7").unwrap(), 42);
        assert!(parse_token("42").is_err());
        assert!(parse_token("s").is_err());
        assert!(parse_token("s99999999999999999999999").is_err());
    }

    #[test]
    fn positions_in_backfilled_history() {
        // Timeline positions are the stream counts; backfilled sequence K sits at -K, and the
        // token b<K> lies between K and K+1.
        assert_eq!(parse_position("s7").unwrap(), 7);
        assert_eq!(parse_position("b0").unwrap(), -1);
        assert_eq!(parse_position("b5").unwrap(), -6);
        assert!(parse_position("b").is_err());
        assert!(parse_position("bx").is_err());
        for pos in [-9, -1, 0, 1, 42] {
            assert_eq!(parse_position(&token_at(pos)).unwrap(), pos);
        }
        // A backwards page ending at backfilled event 3 (position -3) ends at b3.
        assert_eq!(token_at(-3 - 1), "b3");
    }
}

/// Property tests: any pagination token is refused or read without panic, and every position
/// reads back from its token.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_pagination_tokens(
            raw in prop_oneof![text(), "[sb]?[0-9+-]{0,22}(_[0-9]{0,5})?"],
            count in any::<u64>(),
            seq in any::<u64>(),
        ) {
            let _ = parse_token(&raw);
            if let Ok(pos) = parse_position(&raw) {
                prop_assert!(pos >= -i128::from(u64::MAX) - 1 && pos <= i128::from(u64::MAX));
            }
            prop_assert_eq!(parse_token(&token(count)).ok(), Some(count));
            let backfilled = -i128::from(seq) - 1;
            for pos in [i128::from(count), backfilled] {
                prop_assert_eq!(parse_position(&token_at(pos)).ok(), Some(pos));
            }
        }
    }
}
