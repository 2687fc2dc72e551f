//! `/search` over room events: the user's joined rooms are walked newest first and events whose
//! searched keys contain every term (case-insensitive) are returned. There is no full-text index
//! yet: each request reads a bounded number of events (`MAX_SCAN_TOTAL`, shared by the rooms) and pages
//! continue below the oldest position every room was searched to, so no match is skipped.
//! Encrypted events never match: the server cannot read them.

use std::collections::BTreeMap;

use ruma::{api::client::filter::RoomEventFilter, OwnedRoomId, RoomId, UserId};
use serde_json::Value;

use super::{visibility::At, Pdu, Rooms};
use crate::{
    error::{Error, Result},
    service::filter::pdu_matches,
    storage::{keys, Table},
};

/// Events one search reads in all, shared out over the rooms searched (each gets at least
/// [`MIN_SCAN_PER_ROOM`]): a user in many rooms cannot make one request read millions.
const MAX_SCAN_TOTAL: usize = 50_000;
const MIN_SCAN_PER_ROOM: usize = 200;
/// Results per page when the filter names no limit, and at most.
pub const DEFAULT_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 50;
/// Most terms a search term splits into.
const MAX_TERMS: usize = 16;

pub struct SearchQuery<'a> {
    pub term: &'a str,
    /// `content.body`, `content.name`, `content.topic`.
    pub keys: Vec<String>,
    pub filter: &'a RoomEventFilter,
    pub by_rank: bool,
    /// Continue below this position (the previous page's `next_batch`).
    pub before: Option<u64>,
}

pub struct SearchHit {
    pub count: u64,
    pub rank: f64,
    pub pdu: Pdu,
}

pub struct SearchResults {
    pub hits: Vec<SearchHit>,
    /// Matches found in the part searched (the spec's approximate `count`).
    pub total: usize,
    pub terms: Vec<String>,
    pub next: Option<u64>,
}

impl Rooms {
    pub fn search(&self, user: &UserId, q: &SearchQuery<'_>) -> Result<SearchResults> {
        let terms: Vec<String> = q
            .term
            .split_whitespace()
            .map(str::to_lowercase)
            .take(MAX_TERMS)
            .collect();
        if terms.is_empty() {
            return Err(Error::invalid_param("search_term must not be empty"));
        }
        let limit = q
            .filter
            .limit
            .map_or(DEFAULT_LIMIT, |l| {
                usize::try_from(u64::from(l)).unwrap_or(MAX_LIMIT)
            })
            .clamp(1, MAX_LIMIT);
        let rooms: Vec<OwnedRoomId> = self
            .joined_rooms(user)?
            .into_iter()
            .filter(|r| q.filter.rooms.as_ref().is_none_or(|rs| rs.contains(r)))
            .filter(|r| !q.filter.not_rooms.contains(r))
            .collect();
        let before = q.before.unwrap_or(u64::MAX);
        let mut hits = Vec::new();
        // The highest position some room was not searched below: results under it could be
        // incomplete, so this page stops there.
        let mut floor = 0u64;
        let budget = (MAX_SCAN_TOTAL / rooms.len().max(1)).max(MIN_SCAN_PER_ROOM);
        for room in &rooms {
            let (room_hits, frontier) =
                self.search_room(room, user, q, &terms, before, limit, budget)?;
            hits.extend(room_hits);
            if let Some(f) = frontier {
                floor = floor.max(f);
            }
        }
        hits.retain(|h| h.count >= floor);
        let total = hits.len();
        hits.sort_by_key(|h| std::cmp::Reverse(h.count));
        let next = if hits.len() > limit {
            hits.truncate(limit);
            hits.last().map(|h| h.count)
        } else if floor > 0 {
            Some(floor)
        } else {
            None
        };
        if q.by_rank {
            hits.sort_by(|a, b| b.rank.total_cmp(&a.rank).then(b.count.cmp(&a.count)));
        }
        Ok(SearchResults {
            hits,
            total,
            terms,
            next,
        })
    }

    /// Matches in one room below `before`, newest first, at most `limit` + 1, and the position
    /// the walk stopped at when it did not reach the room's beginning.
    fn search_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        q: &SearchQuery<'_>,
        terms: &[String],
        before: u64,
        limit: usize,
        budget: usize,
    ) -> Result<(Vec<SearchHit>, Option<u64>)> {
        let mut viewer = self.viewer(room_id, user);
        let prefix = keys::prefix(&[room_id.as_str()]);
        let start = keys::with_count(&[room_id.as_str()], before.saturating_sub(1));
        let mut out = Vec::new();
        let mut scanned = 0usize;
        for entry in self
            .storage
            .scan_from(Table::Timeline, &prefix, &start, true)?
        {
            let (k, v) = entry?;
            let Some(count) = keys::count_suffix(&k) else {
                continue;
            };
            if count >= before {
                continue;
            }
            scanned += 1;
            if out.len() > limit || scanned > budget {
                return Ok((out, Some(count.saturating_add(1))));
            }
            let Some(pdu) = self.pdu(&String::from_utf8_lossy(&v))? else {
                continue;
            };
            let Some(rank) = match_rank(&pdu, &q.keys, terms) else {
                continue;
            };
            if !pdu_matches(q.filter, &pdu) || !viewer.can_see(&pdu, At::Stream(count))? {
                continue;
            }
            out.push(SearchHit { count, rank, pdu });
        }
        Ok((out, None))
    }
}

/// How well the event matches: None unless every term occurs in one of the searched keys;
/// otherwise the number of occurrences.
fn match_rank(pdu: &Pdu, keys: &[String], terms: &[String]) -> Option<f64> {
    // Cheap pre-check on the raw content before parsing it; only for terms that JSON never
    // escapes (a quote or backslash in a term is written escaped in the raw text).
    if terms.iter().all(|t| !t.contains(['"', '\\'])) {
        let raw = pdu.content.get().to_lowercase();
        if !terms.iter().all(|t| raw.contains(t.as_str())) {
            return None;
        }
    }
    let content = pdu.content_value();
    let mut texts: BTreeMap<&str, String> = BTreeMap::new();
    for key in keys {
        let field = key.strip_prefix("content.").unwrap_or(key);
        if let Some(Value::String(s)) = content.get(field) {
            texts.insert(key.as_str(), s.to_lowercase());
        }
    }
    let mut rank = 0usize;
    for t in terms {
        let n: usize = texts.values().map(|s| s.matches(t.as_str()).count()).sum();
        if n == 0 {
            return None;
        }
        rank += n;
    }
    Some(rank as f64)
}
