//! Relations (`m.relates_to`): every event that relates to another is indexed under its parent
//! when it is written, so `/relations` reads the children of one event directly.

use ruma::{RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Pdu, Rooms};
use crate::{
    error::Result,
    storage::{keys, Batch, Table},
};

/// Most children one page returns.
pub const MAX_LIMIT: usize = 100;
/// Most index entries one page looks at (children the user may not see are skipped).
const MAX_SCAN: usize = 2000;

#[derive(Serialize, Deserialize)]
pub(super) struct Child {
    pub event_id: String,
    pub rel_type: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Empty in entries written before senders were indexed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sender: String,
    /// The child's room; empty in entries written before rooms were indexed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub room_id: String,
}

/// Index `pdu` (an event of `room_id`) under the event it relates to, in the caller's batch.
/// A parent known to be in another room is not related to: relations never cross rooms.
/// Returns the parent and relation type when it was indexed.
pub fn index(
    batch: &mut Batch,
    room_id: &RoomId,
    pdu: &Pdu,
    count: u64,
    parent_room: impl Fn(&str) -> Result<Option<ruma::OwnedRoomId>>,
) -> Result<Option<(String, String)>> {
    // Most events relate to nothing: skip parsing their content on the send path.
    if !pdu.content.get().contains("m.relates_to") {
        return Ok(None);
    }
    let content = pdu.content_value();
    let Some(rel) = content.get("m.relates_to") else {
        return Ok(None);
    };
    let (Some(parent), Some(rel_type)) = (
        rel.get("event_id").and_then(Value::as_str),
        rel.get("rel_type").and_then(Value::as_str),
    ) else {
        return Ok(None);
    };
    if parent.contains('\u{ff}') || parent_room(parent)?.is_some_and(|r| r != room_id) {
        return Ok(None);
    }
    let child = Child {
        event_id: pdu.event_id.to_string(),
        rel_type: rel_type.to_owned(),
        kind: pdu.kind.to_string(),
        sender: pdu.sender.to_string(),
        room_id: room_id.to_string(),
    };
    batch.put(
        Table::Relations,
        &keys::with_count(&[parent], count),
        &serde_json::to_vec(&child)?,
    )?;
    Ok(Some((parent.to_owned(), rel_type.to_owned())))
}

/// Remove a stored event (as JSON) from its parent's children, in the caller's batch.
pub fn unindex(batch: &mut Batch, stored: &Value, count: u64) -> Result<()> {
    let parent = stored
        .get("content")
        .and_then(|c| c.get("m.relates_to"))
        .and_then(|r| r.get("event_id"))
        .and_then(Value::as_str);
    match parent {
        Some(parent) if !parent.contains('\u{ff}') => {
            batch.delete(Table::Relations, &keys::with_count(&[parent], count))
        }
        _ => Ok(()),
    }
}

/// What `/relations` asks for.
pub struct RelationsQuery<'a> {
    pub parent: &'a str,
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// Start position: backwards, children at or below it; forwards, children above it.
    pub from: Option<u64>,
    /// Stop position (exclusive backwards, inclusive forwards).
    pub to: Option<u64>,
    pub limit: usize,
    pub backward: bool,
    /// Include children of children (up to [`MAX_DEPTH`] levels).
    pub recurse: bool,
}

/// How deep `recurse` follows relations (the depth the response reports).
pub const MAX_DEPTH: usize = 3;

impl Rooms {
    /// Children of a visible parent event the user may see, one page, with the token of the
    /// next page when there is more.
    pub fn relations(
        &self,
        room_id: &RoomId,
        user: &UserId,
        q: &RelationsQuery<'_>,
    ) -> Result<(Vec<Pdu>, Option<u64>)> {
        self.visible_event(room_id, user, q.parent)?;
        let mut viewer = self.viewer(room_id, user);
        let limit = q.limit.clamp(1, MAX_LIMIT);
        let candidates: Box<dyn Iterator<Item = Result<(u64, Child)>>> = if q.recurse {
            Box::new(self.descendants(q)?.into_iter().map(Ok))
        } else {
            let prefix = keys::prefix(&[q.parent]);
            let start = if q.backward {
                keys::with_count(&[q.parent], q.from.unwrap_or(u64::MAX))
            } else {
                keys::with_count(&[q.parent], q.from.map_or(0, |f| f.saturating_add(1)))
            };
            Box::new(
                self.storage
                    .scan_from(Table::Relations, &prefix, &start, q.backward)?
                    .take(MAX_SCAN)
                    .filter_map(|entry| match entry {
                        Ok((k, v)) => {
                            let count = keys::count_suffix(&k)?;
                            Some(
                                serde_json::from_slice(&v)
                                    .map(|c| (count, c))
                                    .map_err(Into::into),
                            )
                        }
                        Err(e) => Some(Err(e)),
                    }),
            )
        };
        let mut out = Vec::new();
        let mut next = None;
        for entry in candidates {
            let (count, child) = entry?;
            let past_end = match (q.to, q.backward) {
                (Some(to), true) => count <= to,
                (Some(to), false) => count > to,
                (None, _) => false,
            };
            if past_end {
                break;
            }
            if out.len() == limit {
                // There is more: the next page starts after the last child returned.
                next = Some(if q.backward {
                    count
                } else {
                    count.saturating_sub(1)
                });
                break;
            }
            if q.rel_type.is_some_and(|r| r != child.rel_type)
                || q.event_type.is_some_and(|t| t != child.kind)
                || !self.child_in_room(&child, room_id)?
            {
                continue;
            }
            if !viewer.can_see_child(&child, count)? {
                continue;
            }
            if let Some(pdu) = self.pdu(&child.event_id)? {
                out.push(pdu);
            }
        }
        Ok((out, next))
    }

    /// Is the child an event of `room_id`? (Old index entries do not name their room.)
    pub(super) fn child_in_room(&self, child: &Child, room_id: &RoomId) -> Result<bool> {
        if !child.room_id.is_empty() {
            return Ok(child.room_id == room_id.as_str());
        }
        Ok(self
            .event_meta(&child.event_id)?
            .is_some_and(|m| m.room_id == room_id))
    }

    /// Children, grandchildren and so on of the parent (up to [`MAX_DEPTH`] levels, at most
    /// [`MAX_SCAN`] in all), in the page's walking order from its start position.
    fn descendants(&self, q: &RelationsQuery<'_>) -> Result<Vec<(u64, Child)>> {
        let mut all = Vec::new();
        let mut level = vec![q.parent.to_owned()];
        for _ in 0..MAX_DEPTH {
            let mut next_level = Vec::new();
            for parent in &level {
                for entry in self
                    .storage
                    .scan_prefix(Table::Relations, &keys::prefix(&[parent]))?
                {
                    let (k, v) = entry?;
                    let (Some(count), Ok(child)) =
                        (keys::count_suffix(&k), serde_json::from_slice::<Child>(&v))
                    else {
                        continue;
                    };
                    next_level.push(child.event_id.clone());
                    all.push((count, child));
                    if all.len() >= MAX_SCAN {
                        break;
                    }
                }
            }
            if next_level.is_empty() || all.len() >= MAX_SCAN {
                break;
            }
            level = next_level;
        }
        all.retain(|(c, _)| match (q.backward, q.from) {
            (true, Some(f)) => *c <= f,
            (false, Some(f)) => *c > f,
            (_, None) => true,
        });
        all.sort_by_key(|(c, _)| *c);
        if q.backward {
            all.reverse();
        }
        Ok(all)
    }
}
